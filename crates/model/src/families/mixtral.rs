//! Mixtral (`modeling_mixtral.py`): softmax over all experts, top-k, always renormalised;
//! sliding-window attention when `sliding_window` is set. Published checkpoints keep the experts
//! under `block_sparse_moe` as `w1` (gate), `w3` (up) and `w2` (down).

use crate::config::{Family, ModelConfig, Reader, RouterKind};
use crate::error::Result;
use crate::table::{Proj, Role};

pub(crate) fn parse(r: &Reader<'_>) -> Result<ModelConfig> {
    super::common::require_silu(r)?;
    let mut c = ModelConfig::common(Family::Mixtral, r)?;
    c.intermediate_size = r.usize_req("intermediate_size")?;
    c.num_experts = r.usize_req("num_local_experts")?;
    c.norm_topk_prob = true;
    c.moe.router = RouterKind::SoftmaxTopK;
    c.moe.weights_in_compute_dtype = false;
    let window = r.usize_opt("sliding_window")?;
    c.attn.sliding_window =
        super::common::sliding_windows(r, c.num_hidden_layers, |_| window.is_some())?;
    Ok(c)
}

pub(crate) fn name(role: Role) -> Option<String> {
    let layer = |l: usize, rest: &str| format!("model.layers.{l}.{rest}");
    Some(match role {
        Role::Router(l) => layer(l, "block_sparse_moe.gate"),
        Role::Expert(l, e, p) => {
            let w = match p {
                Proj::Gate => "w1",
                Proj::Down => "w2",
                Proj::Up => "w3",
            };
            layer(l, &format!("block_sparse_moe.experts.{e}.{w}"))
        }
        _ => return None,
    })
}
