//! Generation over batches of prompts with routing capture.
//!
//! Decoding is greedy by default (argmax, ties to the lowest token id like `torch.argmax`), or
//! temperature / top-p sampling with a per-prompt ChaCha8 stream derived from the seed and the
//! prompt's index in the input, so results do not depend on the batch size.
//!
//! **The last generated token.** transformers' `generate()` never feeds the final generated token
//! back through the model, so its routing is never observed. By default we run one extra forward
//! step on it (its logits are discarded) so that every generated token has routing records;
//! `hf_generate_compat` skips that step and then records exactly the tokens `generate()` routes.
//!
//! **Context length.** Every prompt must fit the model's context: prompt tokens + `max_new_tokens`
//! ≤ `max_position_embeddings` ([`fit_context`] refuses or truncates; [`generate_batch`] refuses).
//!
//! **Chunked prefill.** A prompt is fed in chunks of at most [`GenerateOptions::prefill_chunk`]
//! tokens against its KV cache, so attention memory is bounded by `chunk × context` per head, not
//! by the square of the prompt length. Routing and logits are bit-identical to a one-shot prefill
//! (the attention rows of a chunk are laid out over the whole prompt, see
//! [`SeqState::set_prefill_span`]).

use moe_xray_trace::{RoutingSink, TokenType};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::error::{ModelError, Result};
use crate::model::{MoeModel, SeqState, StepSeq};
use crate::router::RouterMask;

/// Default number of prompt tokens per prefill step ([`GenerateOptions::prefill_chunk`]).
pub const DEFAULT_PREFILL_CHUNK: usize = 512;

/// Sampling instead of greedy decoding.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sampling {
    pub temperature: f32,
    pub top_p: f32,
    pub seed: u64,
}

/// Generation settings.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateOptions {
    pub max_new_tokens: usize,
    pub eos_token_ids: Vec<u32>,
    pub ignore_eos: bool,
    /// `None` = greedy.
    pub sampling: Option<Sampling>,
    /// Skip the extra forward step on the last generated token (like `generate()`).
    pub hf_generate_compat: bool,
    /// Prompt tokens per prefill step (chunked prefill; results do not depend on it).
    pub prefill_chunk: usize,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        GenerateOptions {
            max_new_tokens: 32,
            eos_token_ids: Vec::new(),
            ignore_eos: false,
            sampling: None,
            hf_generate_compat: false,
            prefill_chunk: DEFAULT_PREFILL_CHUNK,
        }
    }
}

/// Which end of a too-long prompt to cut (`--truncate-prompts`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Truncate {
    /// Drop the first tokens (keep the end of the prompt).
    Left,
    /// Drop the last tokens (keep the beginning of the prompt).
    Right,
}

impl Truncate {
    pub fn name(self) -> &'static str {
        match self {
            Truncate::Left => "left",
            Truncate::Right => "right",
        }
    }
}

/// Positions a prompt of `prompt_len` tokens needs with `max_new_tokens` new tokens, or `None` on
/// overflow.
fn positions_needed(prompt_len: usize, max_new_tokens: usize) -> Option<usize> {
    prompt_len.checked_add(max_new_tokens)
}

fn too_long(id: &str, tokens: usize, max_new_tokens: usize, max_pos: usize) -> ModelError {
    ModelError::PromptTooLong {
        prompt_id: id.to_string(),
        tokens,
        max_new_tokens,
        max_position_embeddings: max_pos,
    }
}

/// Makes `tokens` fit the context: prompt + `max_new_tokens` ≤ `max_position_embeddings`. Without
/// `truncate` a prompt that does not fit is an error naming it and its token count; with it the
/// prompt is cut on that side. Returns the original token count when the prompt was truncated.
pub fn fit_context(
    prompt_id: &str,
    tokens: &mut Vec<u32>,
    max_new_tokens: usize,
    max_position_embeddings: usize,
    truncate: Option<Truncate>,
) -> Result<Option<usize>> {
    let n = tokens.len();
    if positions_needed(n, max_new_tokens).is_some_and(|p| p <= max_position_embeddings) {
        return Ok(None);
    }
    let budget = max_position_embeddings.saturating_sub(max_new_tokens);
    match truncate {
        Some(side) if budget > 0 => {
            match side {
                Truncate::Left => {
                    tokens.drain(..n - budget);
                }
                Truncate::Right => tokens.truncate(budget),
            }
            Ok(Some(n))
        }
        _ => Err(too_long(
            prompt_id,
            n,
            max_new_tokens,
            max_position_embeddings,
        )),
    }
}

/// One prompt to run.
#[derive(Debug, Clone, PartialEq)]
pub struct PromptInput {
    pub id: String,
    pub category: Option<String>,
    pub tokens: Vec<u32>,
    /// Index of the prompt in the whole input (selects its sampling stream).
    pub index: u64,
}

/// The result of one prompt.
#[derive(Debug, Clone, PartialEq)]
pub struct Generation {
    pub prompt_id: String,
    pub prompt_tokens: Vec<u32>,
    pub generated: Vec<u32>,
    /// Whether generation stopped on an EOS token.
    pub stopped_on_eos: bool,
}

fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0usize;
    for (i, &v) in logits.iter().enumerate() {
        // strictly greater: ties keep the lower id (torch.argmax); NaN never wins.
        if v > logits[best] || logits[best].is_nan() && !v.is_nan() {
            best = i;
        }
    }
    best as u32
}

/// transformers' temperature + top-p warpers followed by multinomial sampling.
fn sample(logits: &[f32], s: &Sampling, rng: &mut ChaCha8Rng) -> u32 {
    let scaled: Vec<f32> = logits.iter().map(|&x| x / s.temperature).collect();
    let max = scaled.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut probs: Vec<(u32, f64)> = scaled
        .iter()
        .enumerate()
        .map(|(i, &x)| (i as u32, ((x - max) as f64).exp()))
        .collect();
    let total: f64 = probs.iter().map(|p| p.1).sum();
    for p in probs.iter_mut() {
        p.1 /= total;
    }
    // Keep the smallest set of most probable tokens whose mass reaches top_p (at least one).
    probs.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    let mut keep = 0usize;
    let mut mass = 0.0f64;
    for p in &probs {
        keep += 1;
        mass += p.1;
        if mass >= s.top_p as f64 {
            break;
        }
    }
    let kept = &probs[..keep.max(1)];
    let z: f64 = kept.iter().map(|p| p.1).sum();
    let mut u = rng.random::<f64>() * z;
    for p in kept {
        if u < p.1 {
            return p.0;
        }
        u -= p.1;
    }
    kept[kept.len() - 1].0
}

/// Validates generation options.
pub fn check_options(opts: &GenerateOptions) -> Result<()> {
    if let Some(s) = &opts.sampling {
        if !(s.temperature.is_finite() && s.temperature > 0.0) {
            return Err(ModelError::InvalidArgument(format!(
                "temperature must be positive, got {}",
                s.temperature
            )));
        }
        if !(s.top_p > 0.0 && s.top_p <= 1.0) {
            return Err(ModelError::InvalidArgument(format!(
                "top_p must be in (0, 1], got {}",
                s.top_p
            )));
        }
    }
    if opts.prefill_chunk == 0 {
        return Err(ModelError::InvalidArgument(
            "prefill chunk must be at least 1 token".into(),
        ));
    }
    Ok(())
}

struct Active {
    input: usize,
    state: SeqState,
    generated: Vec<u32>,
    next: Vec<u32>,
    /// Tokens of `next` already fed (prefill chunks; 0 for decoding steps).
    fed: usize,
    token_type: TokenType,
    /// The chunk in `next` is the final one (only its routing is wanted).
    last: bool,
    stopped_on_eos: bool,
    rng: Option<ChaCha8Rng>,
}

/// Runs all `prompts` together as one ragged batch: prefill, then decoding steps until each
/// prompt is done. `on_done` is called for each prompt right after `sink.end_prompt`.
pub fn generate_batch(
    model: &MoeModel,
    prompts: &[PromptInput],
    opts: &GenerateOptions,
    sink: &mut dyn RoutingSink,
    on_done: &mut dyn FnMut(Generation) -> Result<()>,
) -> Result<()> {
    check_options(opts)?;
    for p in prompts {
        if p.tokens.is_empty() {
            return Err(ModelError::InvalidArgument(format!(
                "prompt `{}` has no tokens",
                p.id
            )));
        }
        model.check_tokens(&p.id, &p.tokens)?;
        let max_pos = model.config().max_position_embeddings;
        if positions_needed(p.tokens.len(), opts.max_new_tokens).is_none_or(|n| n > max_pos) {
            return Err(too_long(
                &p.id,
                p.tokens.len(),
                opts.max_new_tokens,
                max_pos,
            ));
        }
    }
    let mut active: Vec<Active> = Vec::with_capacity(prompts.len());
    for (i, p) in prompts.iter().enumerate() {
        sink.begin_prompt(&p.id, p.category.as_deref())?;
        let mut state = model.new_sequence(&p.id);
        state.set_prefill_span(p.tokens.len());
        active.push(Active {
            input: i,
            state,
            generated: Vec::new(),
            next: p.tokens.clone(),
            fed: 0,
            token_type: TokenType::Prompt,
            last: opts.max_new_tokens == 0,
            stopped_on_eos: false,
            rng: opts.sampling.map(|s| {
                let mut r = ChaCha8Rng::seed_from_u64(s.seed);
                r.set_stream(p.index);
                r
            }),
        });
    }
    while !active.is_empty() {
        let logits = {
            let chunk = opts.prefill_chunk;
            let mut step: Vec<StepSeq<'_>> = active
                .iter_mut()
                .map(|a| {
                    let end = a.next.len().min(a.fed.saturating_add(chunk));
                    let final_chunk = end == a.next.len();
                    StepSeq {
                        want_logits: !a.last && final_chunk,
                        state: &mut a.state,
                        tokens: &a.next[a.fed..end],
                        token_type: a.token_type,
                    }
                })
                .collect();
            model.forward(&mut step, sink)?
        };
        let mut still = Vec::with_capacity(active.len());
        for (mut a, lg) in active.into_iter().zip(logits) {
            let end = a.next.len().min(a.fed.saturating_add(opts.prefill_chunk));
            if end < a.next.len() {
                // More prefill chunks to come.
                a.fed = end;
                still.push(a);
                continue;
            }
            a.fed = 0;
            let done = match (a.last, lg) {
                (true, _) | (false, None) => true,
                (false, Some(lg)) => {
                    let tok = match (&opts.sampling, a.rng.as_mut()) {
                        (Some(s), Some(rng)) => sample(&lg, s, rng),
                        _ => argmax(&lg),
                    };
                    a.generated.push(tok);
                    let eos = !opts.ignore_eos && opts.eos_token_ids.contains(&tok);
                    a.stopped_on_eos = eos;
                    let finished = eos || a.generated.len() >= opts.max_new_tokens;
                    a.next = vec![tok];
                    a.token_type = TokenType::Generation;
                    a.last = finished;
                    finished && opts.hf_generate_compat
                }
            };
            if done {
                let p = &prompts[a.input];
                sink.end_prompt(&p.id)?;
                on_done(Generation {
                    prompt_id: p.id.clone(),
                    prompt_tokens: p.tokens.clone(),
                    generated: a.generated,
                    stopped_on_eos: a.stopped_on_eos,
                })?;
            } else {
                still.push(a);
            }
        }
        active = still;
    }
    Ok(())
}

/// Runs prompts in consecutive batches of `batch_size` (results in input order through
/// `on_done`, which is called as each prompt finishes).
pub fn generate_all(
    model: &MoeModel,
    prompts: &[PromptInput],
    batch_size: usize,
    opts: &GenerateOptions,
    sink: &mut dyn RoutingSink,
    on_done: &mut dyn FnMut(Generation) -> Result<()>,
) -> Result<()> {
    if batch_size == 0 {
        return Err(ModelError::InvalidArgument(
            "batch size must be at least 1".into(),
        ));
    }
    for chunk in prompts.chunks(batch_size) {
        generate_batch(model, chunk, opts, sink, on_done)?;
    }
    Ok(())
}

/// One prompt and the continuation it is scored on ([`teacher_force_batch`]).
#[derive(Debug, Clone, PartialEq)]
pub struct ForcedInput {
    pub id: String,
    pub category: Option<String>,
    pub prompt: Vec<u32>,
    /// The tokens scored: the logits after `prompt + continuation[..i]` are scored on
    /// `continuation[i]`.
    pub continuation: Vec<u32>,
}

/// Teacher-forced scores of one [`ForcedInput`].
#[derive(Debug, Clone, PartialEq)]
pub struct TeacherForced {
    pub prompt_id: String,
    /// Per continuation token: `-log softmax(logits)[token]` (computed in f64 from the f32 logits).
    pub nll: Vec<f64>,
    /// Per continuation token: the argmax of the logits that predict it (ties to the lowest id).
    pub argmax: Vec<u32>,
    /// Per continuation token: the f32 logits that predict it (only when asked for).
    pub logits: Option<Vec<Vec<f32>>>,
}

/// `-log softmax(logits)[target]` in f64.
pub fn token_nll(logits: &[f32], target: u32) -> f64 {
    let m = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let z: f64 = logits.iter().map(|&x| (x as f64 - m).exp()).sum();
    let t = logits.get(target as usize).copied().unwrap_or(f32::NAN) as f64;
    m + z.ln() - t
}

struct Forced {
    state: SeqState,
    /// `prompt ++ continuation[..T-1]`: the tokens fed.
    fed_tokens: Vec<u32>,
    prompt_len: usize,
    fed: usize,
    out: TeacherForced,
}

/// Scores each input's continuation teacher-forced (the routing of every fed token — the prompt
/// and all continuation tokens but the last — goes to `sink`), with `mask`'s experts masked out of
/// the routers (`None`: the model as it is). The prompt is prefilled in chunks of
/// `prefill_chunk` tokens, then the continuation is fed one token per step exactly as greedy
/// generation feeds its own tokens, so scoring a model's own greedy continuation without a mask
/// gives back that continuation as the argmax at every position.
pub fn teacher_force_batch(
    model: &MoeModel,
    inputs: &[ForcedInput],
    mask: Option<&RouterMask>,
    prefill_chunk: usize,
    keep_logits: bool,
    sink: &mut dyn RoutingSink,
) -> Result<Vec<TeacherForced>> {
    if prefill_chunk == 0 {
        return Err(ModelError::InvalidArgument(
            "prefill chunk must be at least 1 token".into(),
        ));
    }
    if let Some(m) = mask {
        model.check_router_mask(m)?;
    }
    let max_pos = model.config().max_position_embeddings;
    let mut seqs: Vec<Forced> = Vec::with_capacity(inputs.len());
    for p in inputs {
        if p.prompt.is_empty() {
            return Err(ModelError::InvalidArgument(format!(
                "prompt `{}` has no tokens",
                p.id
            )));
        }
        model.check_tokens(&p.id, &p.prompt)?;
        model.check_tokens(&p.id, &p.continuation)?;
        if positions_needed(p.prompt.len(), p.continuation.len()).is_none_or(|n| n > max_pos) {
            return Err(too_long(
                &p.id,
                p.prompt.len(),
                p.continuation.len(),
                max_pos,
            ));
        }
        let mut fed_tokens = p.prompt.clone();
        if let Some((_, head)) = p.continuation.split_last() {
            fed_tokens.extend_from_slice(head);
        }
        let mut state = model.new_sequence(&p.id);
        state.set_prefill_span(p.prompt.len());
        seqs.push(Forced {
            state,
            fed_tokens,
            prompt_len: p.prompt.len(),
            fed: 0,
            out: TeacherForced {
                prompt_id: p.id.clone(),
                nll: Vec::with_capacity(p.continuation.len()),
                argmax: Vec::with_capacity(p.continuation.len()),
                logits: keep_logits.then(Vec::new),
            },
        });
    }
    for p in inputs {
        sink.begin_prompt(&p.id, p.category.as_deref())?;
    }
    // The end (exclusive) of the next chunk of a sequence.
    let chunk_end = |f: &Forced| -> usize {
        if f.fed < f.prompt_len {
            f.prompt_len.min(f.fed.saturating_add(prefill_chunk))
        } else {
            f.fed + 1
        }
    };
    loop {
        let ends: Vec<usize> = seqs.iter().map(chunk_end).collect();
        let live: Vec<usize> = (0..seqs.len())
            .filter(|&i| seqs[i].fed < seqs[i].fed_tokens.len())
            .collect();
        if live.is_empty() {
            break;
        }
        let wants: Vec<bool> = live
            .iter()
            .map(|&i| {
                ends[i] >= seqs[i].prompt_len
                    && ends[i] - seqs[i].prompt_len < inputs[i].continuation.len()
            })
            .collect();
        let logits = {
            let mut step: Vec<StepSeq<'_>> = Vec::with_capacity(live.len());
            let mut li = 0usize;
            for (i, f) in seqs.iter_mut().enumerate() {
                if li < live.len() && live[li] == i {
                    step.push(StepSeq {
                        want_logits: wants[li],
                        tokens: &f.fed_tokens[f.fed..ends[i]],
                        token_type: if f.fed < f.prompt_len {
                            TokenType::Prompt
                        } else {
                            TokenType::Generation
                        },
                        state: &mut f.state,
                    });
                    li += 1;
                }
            }
            model.forward_masked(&mut step, sink, mask)?
        };
        for (&i, lg) in live.iter().zip(logits) {
            let f = &mut seqs[i];
            let end = ends[i];
            f.fed = end;
            if let Some(lg) = lg {
                let target = inputs[i].continuation[end - f.prompt_len];
                f.out.nll.push(token_nll(&lg, target));
                f.out.argmax.push(argmax(&lg));
                if let Some(keep) = f.out.logits.as_mut() {
                    keep.push(lg);
                }
            }
        }
    }
    let mut out = Vec::with_capacity(seqs.len());
    for (p, f) in inputs.iter().zip(seqs) {
        sink.end_prompt(&p.id)?;
        out.push(f.out);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argmax_ties_take_lowest_id() {
        assert_eq!(argmax(&[1.0, 3.0, 3.0, 2.0]), 1);
        assert_eq!(argmax(&[f32::NAN, 0.5, 0.1]), 1);
    }

    #[test]
    fn top_p_tiny_is_greedy() {
        let s = Sampling {
            temperature: 1.0,
            top_p: 1e-6,
            seed: 0,
        };
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        for _ in 0..20 {
            assert_eq!(sample(&[0.1, 2.0, 1.9, -1.0], &s, &mut rng), 1);
        }
    }

    #[test]
    fn sampling_respects_distribution() {
        let s = Sampling {
            temperature: 1.0,
            top_p: 1.0,
            seed: 0,
        };
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let logits = [0.0f32, (3.0f32).ln()];
        let n = 4000;
        let ones = (0..n)
            .filter(|_| sample(&logits, &s, &mut rng) == 1)
            .count();
        let frac = ones as f64 / n as f64;
        assert!((frac - 0.75).abs() < 0.03, "{frac}");
    }
}
