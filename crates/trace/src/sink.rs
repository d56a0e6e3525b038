//! The boundary between the model (which makes routing decisions) and whatever consumes them
//! (trace writers, count aggregators, live statistics), in the spirit of ripgrep's `Sink`.

use crate::{Result, TokenType};

/// One routing decision, borrowed from the model's buffers for the duration of the call.
#[derive(Debug, Clone, Copy)]
pub struct RoutingDecision<'a> {
    /// Id of the prompt this token belongs to (several prompts may be interleaved in a batch).
    pub prompt_id: &'a str,
    /// Decoder-layer index, from 0 (dense layers, listed in the manifest's `routing` block, make
    /// no decisions).
    pub layer: u32,
    /// Token position within its own sequence (prompt tokens first), from 0; padding never counts.
    pub position: u32,
    pub token_id: u32,
    pub token_type: TokenType,
    /// Selected routed experts (never shared experts), in the order the family's router returns
    /// them (OLMoE: descending router probability, ties lower index first, as torch.topk).
    pub experts: &'a [u32],
    /// The coefficient applied to each selected expert's output, same order (after the family's
    /// renormalisation and scaling); OLMoE: the full-softmax probability before top-k
    /// renormalisation. See `docs/trace-format.md`.
    pub weights: &'a [f32],
    /// The family's full score vector over all experts (softmax probabilities or sigmoid scores,
    /// the manifest's `routing.scores`), when the run records it (`--record-probs`).
    pub probs: Option<&'a [f32]>,
}

/// Consumer of routing decisions. The model calls `begin_prompt` before the first decision of a
/// prompt, `record` for every (token, layer), and `end_prompt` once a prompt is finished (after
/// which a durable sink must have persisted it). Decisions of different prompts may interleave.
pub trait RoutingSink {
    fn begin_prompt(&mut self, prompt_id: &str, category: Option<&str>) -> Result<()>;
    fn record(&mut self, decision: &RoutingDecision<'_>) -> Result<()>;
    fn end_prompt(&mut self, prompt_id: &str) -> Result<()>;
    /// Whether this sink wants the full router distribution (`RoutingDecision::probs`).
    fn wants_probs(&self) -> bool {
        false
    }
}

/// A sink that drops everything (benchmarks of the bare model).
#[derive(Debug, Default, Clone, Copy)]
pub struct NullSink;

impl RoutingSink for NullSink {
    fn begin_prompt(&mut self, _: &str, _: Option<&str>) -> Result<()> {
        Ok(())
    }
    fn record(&mut self, _: &RoutingDecision<'_>) -> Result<()> {
        Ok(())
    }
    fn end_prompt(&mut self, _: &str) -> Result<()> {
        Ok(())
    }
}

impl<S: RoutingSink + ?Sized> RoutingSink for &mut S {
    fn begin_prompt(&mut self, prompt_id: &str, category: Option<&str>) -> Result<()> {
        (**self).begin_prompt(prompt_id, category)
    }
    fn record(&mut self, decision: &RoutingDecision<'_>) -> Result<()> {
        (**self).record(decision)
    }
    fn end_prompt(&mut self, prompt_id: &str) -> Result<()> {
        (**self).end_prompt(prompt_id)
    }
    fn wants_probs(&self) -> bool {
        (**self).wants_probs()
    }
}
