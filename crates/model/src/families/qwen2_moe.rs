//! Qwen2-MoE (`modeling_qwen2_moe.py`): q/k/v projections with bias, softmax router with
//! optional renormalisation (`norm_topk_prob`), one shared expert whose output is multiplied by
//! `sigmoid(shared_expert_gate(x))`, dense layers from `mlp_only_layers` / `decoder_sparse_step`.

use crate::config::{Family, ModelConfig, Reader, RouterKind, SharedSpec};
use crate::error::Result;
use crate::table::Role;

pub(crate) fn parse(r: &Reader<'_>) -> Result<ModelConfig> {
    super::common::require_silu(r)?;
    let mut c = ModelConfig::common(Family::Qwen2Moe, r)?;
    c.intermediate_size = r.usize_req("moe_intermediate_size")?;
    c.num_experts = r.usize_req("num_experts")?;
    c.norm_topk_prob = r.bool_or("norm_topk_prob", false)?;
    c.attn.qkv_bias = r.bool_or("qkv_bias", true)?;
    c.moe.router = RouterKind::SoftmaxTopK;
    c.moe.moe_layers = super::common::qwen_moe_layers(r, c.num_hidden_layers)?;
    c.moe.dense_intermediate_size = r.usize_req("intermediate_size")?;
    let shared = r.usize_opt("shared_expert_intermediate_size")?.unwrap_or(0);
    if shared > 0 {
        c.moe.shared = Some(SharedSpec {
            intermediate_size: shared,
            count: 1,
            gated: true,
        });
    }
    // No published checkpoint of this family uses sliding-window attention, and transformers'
    // per-layer rule for it is not one moe-xray reproduces: refuse rather than guess.
    if r.bool_or("use_sliding_window", false)? {
        return Err(r.unsupported("`use_sliding_window` true".into()));
    }
    Ok(c)
}

pub(crate) fn name(role: Role) -> Option<String> {
    let layer = |l: usize, rest: &str| format!("model.layers.{l}.{rest}");
    Some(match role {
        Role::Shared(l, p) => layer(
            l,
            &format!(
                "mlp.shared_expert.{}",
                match p {
                    crate::table::Proj::Gate => "gate_proj",
                    crate::table::Proj::Up => "up_proj",
                    crate::table::Proj::Down => "down_proj",
                }
            ),
        ),
        _ => return None,
    })
}
