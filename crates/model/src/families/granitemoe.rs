//! Granite-MoE (`modeling_granitemoe.py`): top-k of the router logits, softmax over the k;
//! embeddings × `embedding_multiplier`, attention scale `attention_multiplier`, each residual
//! branch × `residual_multiplier`, output logits ÷ `logits_scaling`. Experts are stored fused
//! (`input_linear` `[E, 2I, H]`, gate rows first; `output_linear` `[E, H, I]`).

use crate::config::{Family, ModelConfig, Reader, RouterKind};
use crate::error::Result;
use crate::table::Role;

pub(crate) fn parse(r: &Reader<'_>) -> Result<ModelConfig> {
    super::common::require_silu(r)?;
    let mut c = ModelConfig::common(Family::GraniteMoe, r)?;
    c.intermediate_size = r.usize_req("intermediate_size")?;
    c.num_experts = r.usize_req("num_local_experts")?;
    c.attn.qkv_bias = c.attention_bias;
    c.attn.o_bias = c.attention_bias;
    c.moe.router = RouterKind::TopKSoftmax;
    c.multipliers.embedding = r.f64_opt("embedding_multiplier")?.unwrap_or(1.0);
    c.multipliers.residual = r.f64_opt("residual_multiplier")?.unwrap_or(1.0);
    c.multipliers.logits_scaling = r.f64_opt("logits_scaling")?.unwrap_or(1.0);
    c.attn.scale = r.f64_opt("attention_multiplier")?.unwrap_or(1.0);
    Ok(c)
}

pub(crate) fn name(role: Role) -> Option<String> {
    let layer = |l: usize, rest: &str| format!("model.layers.{l}.{rest}");
    Some(match role {
        Role::Router(l) => layer(l, "block_sparse_moe.router.layer"),
        Role::FusedGateUp(l) => layer(l, "block_sparse_moe.input_linear.weight"),
        Role::FusedDown(l) => layer(l, "block_sparse_moe.output_linear.weight"),
        _ => return None,
    })
}
