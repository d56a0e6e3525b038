//! GPT-OSS (`modeling_gpt_oss.py`) in its bf16/f32 form: router with bias, top-k of the logits
//! then softmax over the k, attention with learned per-head sinks, alternating sliding / full
//! attention (`layer_types`), q/k/v/o biases, YaRN RoPE, and the clamped SwiGLU
//! (`swiglu_limit`, alpha 1.702) on experts stored fused and transposed with biases:
//! `gate_up_proj` `[E, H, 2I]` (gate and up interleaved along the last axis), `down_proj`
//! `[E, I, H]`.

use crate::config::{Activation, Family, ModelConfig, Reader, RouterKind};
use crate::error::{ModelError, Result};
use crate::table::Role;

pub(crate) fn parse(r: &Reader<'_>) -> Result<ModelConfig> {
    let mut c = ModelConfig::common(Family::GptOss, r)?;
    c.intermediate_size = r.usize_req("intermediate_size")?;
    c.num_experts = r.usize_req("num_local_experts")?;
    c.attention_bias = r.bool_or("attention_bias", true)?;
    c.attn.qkv_bias = c.attention_bias;
    c.attn.o_bias = c.attention_bias;
    c.attn.sinks = true;
    c.moe.router = RouterKind::TopKSoftmax;
    c.moe.router_bias = true;
    c.moe.expert_bias = true;
    let limit = r.f64_opt("swiglu_limit")?.unwrap_or(7.0);
    if !(limit.is_finite() && limit > 0.0) {
        return Err(ModelError::invalid(
            r.path,
            format!("`swiglu_limit` {limit} must be positive"),
        ));
    }
    c.moe.activation = Activation::GptOssClamped {
        limit,
        alpha: 1.702,
    };
    let (theta, yarn) = r.rope()?;
    c.rope.theta = theta;
    c.rope.yarn = yarn;
    c.attn.sliding_window = super::common::sliding_windows(r, c.num_hidden_layers, |l| l % 2 == 0)?;
    Ok(c)
}

pub(crate) fn name(role: Role) -> Option<String> {
    let layer = |l: usize, rest: &str| format!("model.layers.{l}.{rest}");
    Some(match role {
        Role::Router(l) => layer(l, "mlp.router"),
        _ => return None,
    })
}
