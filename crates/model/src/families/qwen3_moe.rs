//! Qwen3-MoE (`modeling_qwen3_moe.py`): RMSNorm over each head's q and k before RoPE, explicit
//! `head_dim`, softmax router with optional renormalisation (`norm_topk_prob`), dense layers from
//! `mlp_only_layers` / `decoder_sparse_step`. Tensor names are the common ones.

use crate::config::{Family, ModelConfig, QkNorm, Reader, RouterKind};
use crate::error::Result;

pub(crate) fn parse(r: &Reader<'_>) -> Result<ModelConfig> {
    super::common::require_silu(r)?;
    let mut c = ModelConfig::common(Family::Qwen3Moe, r)?;
    c.intermediate_size = r.usize_req("moe_intermediate_size")?;
    // transformers 5.x writes `num_local_experts`; published checkpoints say `num_experts`.
    c.num_experts = match r.usize_opt("num_experts")? {
        Some(n) => n,
        None => r.usize_req("num_local_experts")?,
    };
    c.norm_topk_prob = r.bool_or("norm_topk_prob", false)?;
    c.attn.qkv_bias = c.attention_bias;
    c.attn.o_bias = c.attention_bias;
    c.attn.qk_norm = QkNorm::PerHead;
    c.moe.router = RouterKind::SoftmaxTopK;
    c.moe.moe_layers = super::common::qwen_moe_layers(r, c.num_hidden_layers)?;
    c.moe.dense_intermediate_size = r.usize_opt("intermediate_size")?.unwrap_or(0);
    // No published checkpoint of this family uses sliding-window attention, and transformers'
    // per-layer rule for it is not one moe-xray reproduces: refuse rather than guess.
    if r.bool_or("use_sliding_window", false)? {
        return Err(r.unsupported("`use_sliding_window` true".into()));
    }
    Ok(c)
}
