//! OLMoE (`modeling_olmoe.py`): RMSNorm over the whole projected q and k, optional `clip_qkv`,
//! softmax router over all experts, top-k, optional renormalisation.
//!
//! Trace semantics kept from the first version of moe-xray: `weights` hold the full-softmax
//! probabilities of the chosen experts even when `norm_topk_prob` renormalises the applied
//! coefficients.

use crate::config::{Family, ModelConfig, QkNorm, Reader, RouterKind};
use crate::error::Result;

pub(crate) fn parse(r: &Reader<'_>) -> Result<ModelConfig> {
    let hidden_act = r.string_or("hidden_act", "silu")?;
    if hidden_act != "silu" {
        return Err(r.unsupported(format!("hidden_act `{hidden_act}` (only `silu`)")));
    }
    let mut c = ModelConfig::common(Family::Olmoe, r)?;
    // OLMoE has no `head_dim` field: heads split the hidden size.
    if r.obj.get("head_dim").is_some_and(|v| !v.is_null()) {
        return Err(r.unsupported("`head_dim` in an OLMoE config".into()));
    }
    c.intermediate_size = r.usize_req("intermediate_size")?;
    c.num_experts = r.usize_req("num_experts")?;
    c.norm_topk_prob = r.bool_or("norm_topk_prob", false)?;
    c.clip_qkv = r.f64_opt("clip_qkv")?;
    c.attn.clip_qkv = c.clip_qkv;
    c.attn.qkv_bias = c.attention_bias;
    c.attn.o_bias = c.attention_bias;
    c.attn.qk_norm = QkNorm::Full;
    c.moe.router = RouterKind::SoftmaxTopK;
    c.moe.record_probabilities = true;
    if c.num_attention_heads > 0 && c.hidden_size % c.num_attention_heads != 0 {
        return Err(crate::error::ModelError::invalid(
            r.path,
            format!(
                "hidden_size {} is not divisible by num_attention_heads {}",
                c.hidden_size, c.num_attention_heads
            ),
        ));
    }
    Ok(c)
}
