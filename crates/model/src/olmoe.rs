//! The OLMoE forward pass (transformers' `OlmoeForCausalLM`) on candle, with a routing-capture
//! hook.
//!
//! Math, op for op as transformers does it (so that f32 routing matches to rounding):
//! embedding → per layer: input RMSNorm → attention (q/k/v projections, q_norm/k_norm RMSNorm over
//! the full projected q and k, optional `clip_qkv` clamp, RoPE with the rotate-half convention,
//! GQA, causal softmax attention in f32, output projection) → residual → post-attention RMSNorm →
//! MoE (router logits `gate(x)`, softmax over all experts in f32, top-k with ties to the lower
//! index, optional renormalisation, SwiGLU experts `down(silu(gate(x)) * up(x))` weighted and
//! summed in expert-index order) → residual; final RMSNorm; `lm_head` (tied or not).
//!
//! Batching is *ragged*: the token-wise parts (projections, norms, MoE) run on the concatenated
//! tokens of all sequences in the batch, while attention runs per sequence against that sequence's
//! own KV cache. There is no padding at all, so no real token's routing can depend on the batch.
//! Tokens are grouped by expert so that each expert runs once per step on all of its tokens.

use std::path::Path;

pub use candle_core::DType;
use candle_core::{Device, Tensor, D};
use moe_xray_trace::{RoutingDecision, RoutingSink, TokenType};
use rayon::prelude::*;

use crate::config::OlmoeConfig;
use crate::cpu_kernels::{matmul_t, MoeAccumulator, WSrc};
use crate::error::{ModelError, Result};
use crate::weights::{MappedTensor, WeightStore};

/// Parses a `--dtype` value (`f32`, `bf16`, `f16`).
pub fn parse_dtype(s: &str) -> Result<DType> {
    match s {
        "f32" | "float32" => Ok(DType::F32),
        "bf16" | "bfloat16" => Ok(DType::BF16),
        "f16" | "float16" => Ok(DType::F16),
        other => Err(ModelError::InvalidArgument(format!(
            "unsupported dtype `{other}` (f32, bf16, f16)"
        ))),
    }
}

/// Short name of a compute dtype ("f32", "bf16", "f16").
pub fn dtype_name(d: DType) -> &'static str {
    match d {
        DType::F32 => "f32",
        DType::BF16 => "bf16",
        DType::F16 => "f16",
        _ => "other",
    }
}

/// How to load a model.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Compute dtype; `None` = the checkpoint's stored dtype (what transformers does when loading
    /// with `torch_dtype` equal to the stored one).
    pub dtype: Option<DType>,
    pub device: Device,
    /// On the CPU, leave expert weights stored in the compute dtype (bf16 / f16) in the
    /// memory-mapped checkpoint and read them in place instead of copying them at load time
    /// (default: true; results are identical either way).
    pub map_experts: bool,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            dtype: None,
            device: Device::Cpu,
            map_experts: true,
        }
    }
}

#[derive(Debug)]
struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
}

impl Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = matmul_t(x, &self.weight)?;
        Ok(match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        })
    }
}

/// transformers' `OlmoeRMSNorm`: normalise in f32, cast back, then multiply by the weight in the
/// compute dtype.
#[derive(Debug)]
struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dtype = x.dtype();
        let xf = x.to_dtype(DType::F32)?;
        let var = xf.sqr()?.mean_keepdim(D::Minus1)?;
        let inv = (var + self.eps)?.sqrt()?.recip()?;
        let y = xf.broadcast_mul(&inv)?.to_dtype(dtype)?;
        Ok(y.broadcast_mul(&self.weight)?)
    }
}

#[derive(Debug)]
enum Experts {
    /// `mlp.experts.{e}.{gate,up,down}_proj.weight` (published checkpoints, transformers 4.x).
    PerExpert(Vec<[Tensor; 3]>),
    /// `mlp.experts.gate_up_proj` `[E, 2I, H]` and `mlp.experts.down_proj` `[E, H, I]`
    /// (transformers 5.x fused layout; gate rows first, then up rows).
    Fused { gate_up: Tensor, down: Tensor },
    /// Per-expert layout left in the memory-mapped files (CPU, stored dtype = compute dtype).
    PerExpertMapped(Vec<[MappedTensor; 3]>),
    /// Fused layout left in the memory-mapped files.
    FusedMapped {
        gate_up: MappedTensor,
        down: MappedTensor,
    },
}

#[derive(Debug)]
struct Layer {
    input_norm: RmsNorm,
    post_norm: RmsNorm,
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    q_norm: RmsNorm,
    k_norm: RmsNorm,
    router: Tensor,
    experts: Experts,
}

/// Per-sequence decoding state: position and KV cache.
#[derive(Debug, Clone)]
pub struct SeqState {
    pub prompt_id: String,
    /// Number of tokens already processed (= position of the next token).
    pub pos: usize,
    /// Length of the prompt being prefilled (see [`SeqState::set_prefill_span`]).
    prefill_span: usize,
    k: Vec<Option<Tensor>>,
    v: Vec<Option<Tensor>>,
}

impl SeqState {
    /// Declares that positions `0..span` are one prompt that may be fed in several chunks. While
    /// a chunk lies inside the span, its attention rows are laid out over `span` keys (the keys
    /// not yet computed are masked out and zero), exactly as in a one-shot prefill of the whole
    /// prompt, so chunked prefill gives bit-identical scores, routing and logits. Memory per
    /// chunk is `heads × chunk × span` scores instead of `heads × span²`.
    pub fn set_prefill_span(&mut self, span: usize) {
        self.prefill_span = span;
    }
}

/// One sequence's tokens for one forward step.
#[derive(Debug)]
pub struct StepSeq<'a> {
    pub state: &'a mut SeqState,
    pub tokens: &'a [u32],
    pub token_type: TokenType,
    /// Whether the next-token logits of this sequence are needed.
    pub want_logits: bool,
}

/// Router output of one layer for all tokens of a step.
struct LayerRouting {
    experts: Vec<u32>,
    weights: Vec<f32>,
    probs: Vec<f32>,
    /// First token row whose router logits or probabilities are not finite (nothing routed).
    non_finite_row: Option<usize>,
}

/// The error for a non-finite value at token `row` of a step (rows are the sequences' tokens,
/// concatenated in batch order).
fn non_finite(batch: &[StepSeq<'_>], row: usize, what: &'static str, where_: String) -> ModelError {
    let mut start = 0usize;
    for s in batch {
        if row < start + s.tokens.len() {
            return ModelError::NonFinite {
                prompt_id: s.state.prompt_id.clone(),
                what,
                where_,
                position: s.state.pos + (row - start),
            };
        }
        start += s.tokens.len();
    }
    ModelError::NonFinite {
        prompt_id: String::new(),
        what,
        where_,
        position: row,
    }
}

/// Checks the configuration's sizes against the checkpoint's tensors before anything is
/// allocated, naming `config.json` and the field that disagrees.
fn check_against_store(cfg: &OlmoeConfig, store: &WeightStore) -> Result<()> {
    let path = store.dir().join("config.json");
    let bad = |field: &str, value: usize, msg: String| {
        Err(ModelError::invalid(
            &path,
            format!("`{field}` = {value} does not match the checkpoint: {msg}"),
        ))
    };
    let embed = "model.embed_tokens.weight";
    if let Some(e) = store.entry(embed) {
        if e.shape.len() == 2 && e.shape[1] != cfg.hidden_size {
            return bad(
                "hidden_size",
                cfg.hidden_size,
                format!("`{embed}` has shape {:?}", e.shape),
            );
        }
        if e.shape.len() == 2 && e.shape[0] != cfg.vocab_size {
            return bad(
                "vocab_size",
                cfg.vocab_size,
                format!("`{embed}` has shape {:?}", e.shape),
            );
        }
    }
    let last = format!(
        "model.layers.{}.mlp.gate.weight",
        cfg.num_hidden_layers.saturating_sub(1)
    );
    if !store.contains(&last) {
        return bad(
            "num_hidden_layers",
            cfg.num_hidden_layers,
            format!("the checkpoint has no tensor `{last}`"),
        );
    }
    if let Some(e) = store.entry("model.layers.0.mlp.gate.weight") {
        if e.shape.first() != Some(&cfg.num_experts) {
            return bad(
                "num_experts",
                cfg.num_experts,
                format!("`model.layers.0.mlp.gate.weight` has shape {:?}", e.shape),
            );
        }
    }
    Ok(())
}

/// An OLMoE model ready to run.
#[derive(Debug)]
pub struct Olmoe {
    cfg: OlmoeConfig,
    device: Device,
    dtype: DType,
    embed: Tensor,
    layers: Vec<Layer>,
    norm: RmsNorm,
    lm_head: Tensor,
    inv_freq: Vec<f32>,
}

impl Olmoe {
    /// Loads `config.json` and the safetensors weights of a checkpoint directory.
    pub fn load(dir: &Path, opts: &LoadOptions) -> Result<Self> {
        let cfg = OlmoeConfig::from_dir(dir)?;
        let store = WeightStore::open(dir)?;
        Self::from_store(cfg, &store, opts)
    }

    pub fn from_store(cfg: OlmoeConfig, store: &WeightStore, opts: &LoadOptions) -> Result<Self> {
        check_against_store(&cfg, store)?;
        let dtype = opts.dtype.unwrap_or_else(|| store.dominant_dtype());
        let dev = &opts.device;
        let h = cfg.hidden_size;
        let hd = cfg.head_dim();
        let kv = cfg.num_key_value_heads * hd;
        let (e, i) = (cfg.num_experts, cfg.intermediate_size);
        let ld = |name: &str, shape: &[usize]| store.load(name, shape, Some(dtype), dev);
        let norm = |name: &str, n: usize| -> Result<RmsNorm> {
            Ok(RmsNorm {
                weight: ld(name, &[n])?,
                eps: cfg.rms_norm_eps,
            })
        };
        let lin = |name: &str, out: usize, inp: usize| -> Result<Linear> {
            Ok(Linear {
                weight: ld(&format!("{name}.weight"), &[out, inp])?,
                bias: if cfg.attention_bias {
                    Some(ld(&format!("{name}.bias"), &[out])?)
                } else {
                    None
                },
            })
        };
        let embed = ld("model.embed_tokens.weight", &[cfg.vocab_size, h])?;
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for l in 0..cfg.num_hidden_layers {
            let p = format!("model.layers.{l}");
            let fused_key = format!("{p}.mlp.experts.gate_up_proj");
            let down_key = format!("{p}.mlp.experts.down_proj");
            // On the CPU, experts stored in the compute dtype (bf16 / f16) stay in the mapping.
            let map = |name: &str, shape: &[usize]| -> Result<Option<MappedTensor>> {
                if dev.is_cpu() && opts.map_experts {
                    store.map(name, shape, dtype)
                } else {
                    Ok(None)
                }
            };
            let experts = if store.contains(&fused_key) {
                match (
                    map(&fused_key, &[e, 2 * i, h])?,
                    map(&down_key, &[e, h, i])?,
                ) {
                    (Some(gate_up), Some(down)) => Experts::FusedMapped { gate_up, down },
                    _ => Experts::Fused {
                        gate_up: store.load(&fused_key, &[e, 2 * i, h], None, dev)?,
                        down: store.load(&down_key, &[e, h, i], None, dev)?,
                    },
                }
            } else {
                let names = |x: usize| {
                    let q = format!("{p}.mlp.experts.{x}");
                    [
                        (format!("{q}.gate_proj.weight"), [i, h]),
                        (format!("{q}.up_proj.weight"), [i, h]),
                        (format!("{q}.down_proj.weight"), [h, i]),
                    ]
                };
                let mut mapped = Vec::with_capacity(e);
                for x in 0..e {
                    let [g, u, d] = names(x);
                    match (map(&g.0, &g.1)?, map(&u.0, &u.1)?, map(&d.0, &d.1)?) {
                        (Some(g), Some(u), Some(d)) => mapped.push([g, u, d]),
                        _ => break,
                    }
                }
                if mapped.len() == e {
                    Experts::PerExpertMapped(mapped)
                } else {
                    let mut v = Vec::with_capacity(e);
                    for x in 0..e {
                        let [g, u, d] = names(x);
                        v.push([
                            store.load(&g.0, &g.1, None, dev)?,
                            store.load(&u.0, &u.1, None, dev)?,
                            store.load(&d.0, &d.1, None, dev)?,
                        ]);
                    }
                    Experts::PerExpert(v)
                }
            };
            layers.push(Layer {
                input_norm: norm(&format!("{p}.input_layernorm.weight"), h)?,
                post_norm: norm(&format!("{p}.post_attention_layernorm.weight"), h)?,
                q_proj: lin(&format!("{p}.self_attn.q_proj"), h, h)?,
                k_proj: lin(&format!("{p}.self_attn.k_proj"), kv, h)?,
                v_proj: lin(&format!("{p}.self_attn.v_proj"), kv, h)?,
                o_proj: lin(&format!("{p}.self_attn.o_proj"), h, h)?,
                q_norm: norm(&format!("{p}.self_attn.q_norm.weight"), h)?,
                k_norm: norm(&format!("{p}.self_attn.k_norm.weight"), kv)?,
                router: ld(&format!("{p}.mlp.gate.weight"), &[e, h])?,
                experts,
            });
        }
        let final_norm = norm("model.norm.weight", h)?;
        let lm_head = if cfg.tie_word_embeddings {
            embed.clone()
        } else {
            ld("lm_head.weight", &[cfg.vocab_size, h])?
        };
        // transformers' default RoPE: inv_freq = 1 / base^(arange(0, d, 2) / d), all in f32.
        let base = cfg.rope_theta as f32;
        let inv_freq = (0..hd / 2)
            .map(|j| 1.0f32 / base.powf((2 * j) as f32 / hd as f32))
            .collect();
        Ok(Olmoe {
            cfg,
            device: dev.clone(),
            dtype,
            embed,
            layers,
            norm: final_norm,
            lm_head,
            inv_freq,
        })
    }

    pub fn config(&self) -> &OlmoeConfig {
        &self.cfg
    }

    /// The compute dtype.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Whether the expert weights are read in place from the memory-mapped checkpoint.
    pub fn experts_mapped(&self) -> bool {
        self.layers.iter().all(|l| {
            matches!(
                l.experts,
                Experts::PerExpertMapped(_) | Experts::FusedMapped { .. }
            )
        })
    }

    /// A fresh sequence state (empty KV cache).
    pub fn new_sequence(&self, prompt_id: &str) -> SeqState {
        SeqState {
            prompt_id: prompt_id.to_string(),
            pos: 0,
            prefill_span: 0,
            k: vec![None; self.cfg.num_hidden_layers],
            v: vec![None; self.cfg.num_hidden_layers],
        }
    }

    /// Checks that every token id is inside the vocabulary.
    pub fn check_tokens(&self, prompt_id: &str, tokens: &[u32]) -> Result<()> {
        match tokens.iter().find(|&&t| t as usize >= self.cfg.vocab_size) {
            Some(&t) => Err(ModelError::TokenOutOfRange {
                prompt_id: prompt_id.to_string(),
                token: t,
                vocab_size: self.cfg.vocab_size,
            }),
            None => Ok(()),
        }
    }

    fn rope_tables(&self, start: usize, len: usize) -> Result<(Tensor, Tensor)> {
        let half = self.inv_freq.len();
        let mut cos = Vec::with_capacity(len * half);
        let mut sin = Vec::with_capacity(len * half);
        for p in start..start + len {
            for &f in &self.inv_freq {
                let a = f * p as f32;
                cos.push(a.cos());
                sin.push(a.sin());
            }
        }
        let cos = Tensor::from_vec(cos, (len, half), &self.device)?.to_dtype(self.dtype)?;
        let sin = Tensor::from_vec(sin, (len, half), &self.device)?.to_dtype(self.dtype)?;
        Ok((cos, sin))
    }

    /// Runs one forward step over a ragged batch and reports every (token, layer) routing
    /// decision to `sink`, ordered per sequence by position, then layer. Returns, per sequence,
    /// the f32 logits of its last token when `want_logits` is set.
    pub fn forward(
        &self,
        batch: &mut [StepSeq<'_>],
        sink: &mut dyn RoutingSink,
    ) -> Result<Vec<Option<Vec<f32>>>> {
        let mut all_ids: Vec<u32> = Vec::new();
        for s in batch.iter() {
            if s.tokens.is_empty() {
                return Err(ModelError::InvalidArgument(format!(
                    "empty token chunk for prompt `{}`",
                    s.state.prompt_id
                )));
            }
            self.check_tokens(&s.state.prompt_id, s.tokens)?;
            all_ids.extend_from_slice(s.tokens);
        }
        if all_ids.is_empty() {
            return Ok(Vec::new());
        }
        let n_tok = all_ids.len();
        let ids = Tensor::from_vec(all_ids.clone(), n_tok, &self.device)?;
        let mut xs = self.embed.index_select(&ids, 0)?;
        let wants_probs = sink.wants_probs();
        let mut routing = Vec::with_capacity(self.layers.len());
        let ropes = batch
            .iter()
            .map(|s| self.rope_tables(s.state.pos, s.tokens.len()))
            .collect::<Result<Vec<_>>>()?;
        for (l, layer) in self.layers.iter().enumerate() {
            let residual = xs.clone();
            let h = layer.input_norm.forward(&xs)?;
            let attn = self.attention(l, layer, &h, batch, &ropes)?;
            xs = (residual + attn)?;
            let residual = xs.clone();
            let h = layer.post_norm.forward(&xs)?;
            let (moe, r) = self.moe(layer, &h, wants_probs)?;
            if let Some(row) = r.non_finite_row {
                return Err(non_finite(
                    batch,
                    row,
                    "router logits",
                    format!("layer {l}"),
                ));
            }
            routing.push(r);
            xs = (residual + moe)?;
        }
        // Logits of the last token of each sequence that wants them: one lm_head matmul for the
        // whole step (the final norm and the matmul are row-wise, so batching changes nothing).
        let mut last_rows = Vec::new();
        let mut row = 0usize;
        for s in batch.iter() {
            if s.want_logits {
                last_rows.push((row + s.tokens.len() - 1) as u32);
            }
            row += s.tokens.len();
        }
        let logits = if last_rows.is_empty() {
            Vec::new()
        } else {
            let n = last_rows.len();
            let idx = Tensor::from_vec(last_rows, n, &self.device)?;
            let h = self.norm.forward(&xs.index_select(&idx, 0)?)?;
            matmul_t(&h, &self.lm_head)?
                .to_dtype(DType::F32)?
                .flatten_all()?
                .to_vec1::<f32>()?
        };
        if let Some(bad) = logits.iter().position(|x| !x.is_finite()) {
            let vocab = self.cfg.vocab_size.max(1);
            let mut rows = Vec::new();
            let mut row = 0usize;
            for s in batch.iter() {
                if s.want_logits {
                    rows.push(row + s.tokens.len() - 1);
                }
                row += s.tokens.len();
            }
            let row = rows.get(bad / vocab).copied().unwrap_or(0);
            return Err(non_finite(
                batch,
                row,
                "output logits",
                "the final layer".into(),
            ));
        }
        // Report routing decisions: per sequence, per token, per layer.
        let k = self.cfg.num_experts_per_tok;
        let ne = self.cfg.num_experts;
        let mut row = 0usize;
        for s in batch.iter() {
            for (j, &tok) in s.tokens.iter().enumerate() {
                let r = row + j;
                for (l, lr) in routing.iter().enumerate() {
                    sink.record(&RoutingDecision {
                        prompt_id: &s.state.prompt_id,
                        layer: l as u32,
                        position: (s.state.pos + j) as u32,
                        token_id: tok,
                        token_type: s.token_type,
                        experts: &lr.experts[r * k..(r + 1) * k],
                        weights: &lr.weights[r * k..(r + 1) * k],
                        probs: if wants_probs {
                            Some(&lr.probs[r * ne..(r + 1) * ne])
                        } else {
                            None
                        },
                    })?;
                }
            }
            row += s.tokens.len();
        }
        let vocab = self.cfg.vocab_size;
        let mut out = Vec::with_capacity(batch.len());
        let mut next = 0usize;
        for s in batch.iter_mut() {
            if s.want_logits {
                out.push(Some(logits[next * vocab..(next + 1) * vocab].to_vec()));
                next += 1;
            } else {
                out.push(None);
            }
            s.state.pos += s.tokens.len();
        }
        Ok(out)
    }

    fn attention(
        &self,
        l: usize,
        layer: &Layer,
        h: &Tensor,
        batch: &mut [StepSeq<'_>],
        ropes: &[(Tensor, Tensor)],
    ) -> Result<Tensor> {
        let cfg = &self.cfg;
        let (nh, nkv, hd) = (
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim(),
        );
        let mut q = layer.q_norm.forward(&layer.q_proj.forward(h)?)?;
        let mut k = layer.k_norm.forward(&layer.k_proj.forward(h)?)?;
        let mut v = layer.v_proj.forward(h)?;
        if let Some(c) = cfg.clip_qkv {
            q = q.clamp(-c, c)?;
            k = k.clamp(-c, c)?;
            v = v.clamp(-c, c)?;
        }
        let scale = (hd as f64).powf(-0.5) as f32;
        // Sequences are independent here (each has its own KV cache), so they run on rayon's
        // threads; every sequence's computation is the same whatever the thread count.
        let mut offsets = Vec::with_capacity(batch.len());
        let mut row = 0usize;
        for s in batch.iter() {
            offsets.push(row);
            row += s.tokens.len();
        }
        let outs = batch
            .par_iter_mut()
            .zip(ropes.par_iter())
            .zip(offsets.par_iter())
            .map(|((s, (cos, sin)), &row)| -> Result<Tensor> {
                let t = s.tokens.len();
                let heads = |x: &Tensor, n: usize| -> Result<Tensor> {
                    Ok(x.narrow(0, row, t)?
                        .reshape((t, n, hd))?
                        .transpose(0, 1)?
                        .contiguous()?
                        .unsqueeze(0)?)
                };
                let qs = candle_nn::rotary_emb::rope_slow(&heads(&q, nh)?, cos, sin)?;
                let ks = candle_nn::rotary_emb::rope_slow(&heads(&k, nkv)?, cos, sin)?;
                let vs = heads(&v, nkv)?;
                let (ks, vs) = match (&s.state.k[l], &s.state.v[l]) {
                    (Some(pk), Some(pv)) => {
                        (Tensor::cat(&[pk, &ks], 2)?, Tensor::cat(&[pv, &vs], 2)?)
                    }
                    _ => (ks, vs),
                };
                s.state.k[l] = Some(ks.clone());
                s.state.v[l] = Some(vs.clone());
                let cached = ks.dim(2)?;
                // A prefill chunk inside the prompt span attends over `span` key slots (the
                // future ones zero and masked), as the one-shot prefill does.
                let span = s.state.prefill_span;
                let chunked = s.state.pos + t <= span && t < span;
                let (ks, vs, total) = if chunked && cached < span {
                    let pad = Tensor::zeros((1, nkv, span - cached, hd), ks.dtype(), ks.device())?;
                    (
                        Tensor::cat(&[&ks, &pad], 2)?,
                        Tensor::cat(&[&vs, &pad], 2)?,
                        span,
                    )
                } else {
                    (ks, vs, cached)
                };
                let rep = nh / nkv;
                let expand = |x: Tensor| -> Result<Tensor> {
                    if rep == 1 {
                        return Ok(x);
                    }
                    Ok(x.unsqueeze(2)?
                        .expand((1, nkv, rep, total, hd))?
                        .reshape((1, nh, total, hd))?)
                };
                let ks = expand(ks)?;
                let vs = expand(vs)?;
                // As transformers' eager attention: scores in the compute dtype, multiplied by
                // `head_dim ** -0.5` (computed in f32 and rounded once, like torch's reduced-precision
                // multiplication by a scalar), mask added, softmax in f32, cast back.
                // A chunk's queries are padded with zero rows so that candle's matmuls take the
                // same kernel as in the one-shot prefill (gemm picks its kernel from the shape:
                // a single row, or at most 16×16 outputs, use other reduction orders); the padded
                // rows are dropped after attention.
                let rows = if chunked {
                    let mut m = t.max(2);
                    if total * total > 256 {
                        m = m.max(256 / total + 1);
                    }
                    m.min(total)
                } else {
                    t
                };
                let qs = if rows > t {
                    let pad = Tensor::zeros((1, nh, rows - t, hd), qs.dtype(), qs.device())?;
                    Tensor::cat(&[&qs, &pad], 2)?
                } else {
                    qs
                };
                let scale_t = Tensor::new(scale, &self.device)?;
                let mut scores = qs
                    .matmul(&ks.t()?)?
                    .to_dtype(DType::F32)?
                    .broadcast_mul(&scale_t)?
                    .to_dtype(self.dtype)?;
                if t > 1 || chunked {
                    let past = cached - t;
                    // Rows at and after `t` are padding (never masked, dropped below).
                    let mask: Vec<f32> = (0..rows)
                        .flat_map(|i| {
                            (0..total).map(move |j| {
                                if i >= t || j <= past + i {
                                    0.0
                                } else {
                                    f32::NEG_INFINITY
                                }
                            })
                        })
                        .collect();
                    let mask = Tensor::from_vec(mask, (rows, total), &self.device)?
                        .to_dtype(self.dtype)?;
                    scores = scores.broadcast_add(&mask)?;
                }
                let probs = candle_nn::ops::softmax_last_dim(&scores.to_dtype(DType::F32)?)?
                    .to_dtype(self.dtype)?;
                let o = probs.matmul(&vs.contiguous()?)?; // [1, nh, rows, hd]
                let o = if rows > t { o.narrow(2, 0, t)? } else { o };
                Ok(o.squeeze(0)?.transpose(0, 1)?.reshape((t, nh * hd))?)
            })
            .collect::<Result<Vec<_>>>()?;
        let o = Tensor::cat(&outs, 0)?;
        layer.o_proj.forward(&o)
    }

    fn expert_weights(&self, layer: &Layer, e: usize) -> Result<[Tensor; 3]> {
        let i = self.cfg.intermediate_size;
        let [g, u, d] = match &layer.experts {
            Experts::PerExpert(v) => v[e].clone(),
            Experts::Fused { gate_up, down } => {
                let gu = gate_up.get(e)?;
                [gu.narrow(0, 0, i)?, gu.narrow(0, i, i)?, down.get(e)?]
            }
            Experts::PerExpertMapped(v) => [
                v[e][0].to_tensor(&self.device)?,
                v[e][1].to_tensor(&self.device)?,
                v[e][2].to_tensor(&self.device)?,
            ],
            Experts::FusedMapped { gate_up, down } => {
                let gu = gate_up.to_tensor(&self.device)?.get(e)?;
                [
                    gu.narrow(0, 0, i)?,
                    gu.narrow(0, i, i)?,
                    down.to_tensor(&self.device)?.get(e)?,
                ]
            }
        };
        let conv = |w: Tensor| -> Result<Tensor> {
            Ok(if w.dtype() == self.dtype {
                w
            } else {
                w.to_dtype(self.dtype)?
            })
        };
        Ok([conv(g)?, conv(u)?, conv(d)?])
    }

    fn moe(&self, layer: &Layer, h: &Tensor, wants_probs: bool) -> Result<(Tensor, LayerRouting)> {
        let (n_tok, hidden) = h.dims2()?;
        let ne = self.cfg.num_experts;
        let k = self.cfg.num_experts_per_tok;
        let logits = matmul_t(h, &layer.router)?.to_dtype(DType::F32)?;
        let probs = candle_nn::ops::softmax_last_dim(&logits)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        // NaN / infinite router logits give NaN probabilities (a -inf logit alone gives a finite
        // 0, also refused): never route on them.
        let non_finite_row = match probs.iter().position(|p| !p.is_finite()) {
            Some(i) => Some(i / ne.max(1)),
            None => logits
                .flatten_all()?
                .to_vec1::<f32>()?
                .iter()
                .position(|x| !x.is_finite())
                .map(|i| i / ne.max(1)),
        };
        if let Some(row) = non_finite_row {
            let empty = LayerRouting {
                experts: Vec::new(),
                weights: Vec::new(),
                probs: Vec::new(),
                non_finite_row: Some(row),
            };
            return Ok((h.clone(), empty));
        }
        let mut experts = Vec::with_capacity(n_tok * k);
        let mut weights = Vec::with_capacity(n_tok * k);
        // Per expert: (token row, combination weight).
        let mut groups: Vec<(Vec<u32>, Vec<f32>)> = vec![(Vec::new(), Vec::new()); ne];
        let mut order: Vec<u32> = (0..ne as u32).collect();
        for r in 0..n_tok {
            let p = &probs[r * ne..(r + 1) * ne];
            // torch.topk order: descending probability, ties to the lower index (stable sort).
            order.sort_by(|&a, &b| p[b as usize].total_cmp(&p[a as usize]).then(a.cmp(&b)));
            let top = &order[..k];
            let sum: f32 = top.iter().map(|&x| p[x as usize]).sum();
            for &x in top {
                let w = p[x as usize];
                experts.push(x);
                weights.push(w);
                let cw = if self.cfg.norm_topk_prob { w / sum } else { w };
                groups[x as usize].0.push(r as u32);
                groups[x as usize].1.push(cw);
            }
        }
        if MoeAccumulator::supports(h) {
            let mut acc = MoeAccumulator::new(h, self.cfg.intermediate_size)?;
            let (ii, hh) = (self.cfg.intermediate_size, hidden);
            for (e, (rows, ws)) in groups.iter().enumerate() {
                if rows.is_empty() {
                    continue;
                }
                match &layer.experts {
                    Experts::PerExpertMapped(v) => {
                        let [g, u, d] = &v[e];
                        acc.add_expert(
                            rows,
                            ws,
                            [
                                WSrc::Mapped(g, 0, ii * hh),
                                WSrc::Mapped(u, 0, ii * hh),
                                WSrc::Mapped(d, 0, hh * ii),
                            ],
                        )?;
                    }
                    Experts::FusedMapped { gate_up, down } => {
                        let o = e * 2 * ii * hh;
                        acc.add_expert(
                            rows,
                            ws,
                            [
                                WSrc::Mapped(gate_up, o, ii * hh),
                                WSrc::Mapped(gate_up, o + ii * hh, ii * hh),
                                WSrc::Mapped(down, e * hh * ii, hh * ii),
                            ],
                        )?;
                    }
                    _ => {
                        let [wg, wu, wd] = self.expert_weights(layer, e)?;
                        acc.add_expert(
                            rows,
                            ws,
                            [WSrc::Tensor(&wg), WSrc::Tensor(&wu), WSrc::Tensor(&wd)],
                        )?;
                    }
                }
            }
            return Ok((
                acc.finish(&self.device)?,
                LayerRouting {
                    experts,
                    weights,
                    probs: if wants_probs { probs } else { Vec::new() },
                    non_finite_row: None,
                },
            ));
        }
        // Other devices: the same computation with candle ops.
        let mut acc = Tensor::zeros((n_tok, hidden), self.dtype, &self.device)?;
        for (e, (rows, ws)) in groups.into_iter().enumerate() {
            if rows.is_empty() {
                continue;
            }
            let n = rows.len();
            let idx = Tensor::from_vec(rows, n, &self.device)?;
            let xe = h.index_select(&idx, 0)?;
            let [wg, wu, wd] = self.expert_weights(layer, e)?;
            let g = matmul_t(&xe, &wg)?;
            let u = matmul_t(&xe, &wu)?;
            // silu evaluated in f32 and rounded once (torch's reduced-precision kernels do the
            // same; candle's bf16 silu would round every intermediate).
            let act = (candle_nn::ops::silu(&g.to_dtype(DType::F32)?)?.to_dtype(self.dtype)? * u)?;
            let y = matmul_t(&act, &wd)?;
            let w = Tensor::from_vec(ws, (n, 1), &self.device)?.to_dtype(self.dtype)?;
            let y = y.broadcast_mul(&w)?;
            acc = acc.index_add(&idx, &y, 0)?;
        }
        Ok((
            acc,
            LayerRouting {
                experts,
                weights,
                probs: if wants_probs { probs } else { Vec::new() },
                non_finite_row: None,
            },
        ))
    }
}
