//! One file per Hugging Face `model_type`, mirroring transformers' `modeling_<family>.py`: how
//! the family's `config.json` maps onto [`ModelConfig`] and how its checkpoints name each tensor
//! role. Everything else (the forward pass, generation, batching, the KV cache, the CPU kernels,
//! routing capture, `--resume`) is shared.

use crate::config::{Family, ModelConfig, Reader};
use crate::error::Result;
use crate::table::{Proj, Role};

mod common;
pub mod deepseek;
pub mod gpt_oss;
pub mod granitemoe;
pub mod mixtral;
pub mod olmoe;
pub mod qwen2_moe;
pub mod qwen3_moe;

/// `model_type`s this build runs.
pub const SUPPORTED: &[&str] = &[
    "olmoe",
    "mixtral",
    "qwen2_moe",
    "qwen3_moe",
    "deepseek_v2",
    "deepseek_v3",
    "gpt_oss",
    "granitemoe",
];

/// The family of a `model_type`.
pub fn family_of(model_type: &str) -> Option<Family> {
    Some(match model_type {
        "olmoe" => Family::Olmoe,
        "mixtral" => Family::Mixtral,
        "qwen2_moe" => Family::Qwen2Moe,
        "qwen3_moe" => Family::Qwen3Moe,
        "deepseek_v2" => Family::DeepseekV2,
        "deepseek_v3" => Family::DeepseekV3,
        "gpt_oss" => Family::GptOss,
        "granitemoe" => Family::GraniteMoe,
        _ => return None,
    })
}

pub(crate) fn parse_config(family: Family, r: &Reader<'_>) -> Result<ModelConfig> {
    match family {
        Family::Olmoe => olmoe::parse(r),
        Family::Mixtral => mixtral::parse(r),
        Family::Qwen2Moe => qwen2_moe::parse(r),
        Family::Qwen3Moe => qwen3_moe::parse(r),
        Family::DeepseekV2 | Family::DeepseekV3 => deepseek::parse(family, r),
        Family::GptOss => gpt_oss::parse(r),
        Family::GraniteMoe => granitemoe::parse(r),
    }
}

/// Whether the family's published checkpoints store the experts fused.
pub fn fused_by_default(family: Family) -> bool {
    matches!(family, Family::GptOss | Family::GraniteMoe)
}

/// Whether fused expert tensors are stored `[E, in, out]` (GPT-OSS) rather than `[E, out, in]`.
pub fn fused_transposed(family: Family) -> bool {
    matches!(family, Family::GptOss)
}

fn proj(p: Proj) -> &'static str {
    match p {
        Proj::Gate => "gate_proj",
        Proj::Up => "up_proj",
        Proj::Down => "down_proj",
    }
}

/// The module / parameter name of a role in `family`'s checkpoints.
pub fn name(family: Family, role: Role) -> String {
    let special = match family {
        Family::Mixtral => mixtral::name(role),
        Family::Qwen2Moe => qwen2_moe::name(role),
        Family::DeepseekV2 | Family::DeepseekV3 => deepseek::name(role),
        Family::GptOss => gpt_oss::name(role),
        Family::GraniteMoe => granitemoe::name(role),
        Family::Olmoe | Family::Qwen3Moe => None,
    };
    special.unwrap_or_else(|| default_name(role))
}

/// The names shared by most families (Llama-style decoder, `mlp.gate` router,
/// `mlp.experts.{e}.{gate,up,down}_proj` experts).
fn default_name(role: Role) -> String {
    let layer = |l: usize, rest: &str| format!("model.layers.{l}.{rest}");
    match role {
        Role::Embed => "model.embed_tokens".into(),
        Role::LmHead => "lm_head".into(),
        Role::FinalNorm => "model.norm".into(),
        Role::InputNorm(l) => layer(l, "input_layernorm"),
        Role::PostNorm(l) => layer(l, "post_attention_layernorm"),
        Role::Q(l) => layer(l, "self_attn.q_proj"),
        Role::K(l) => layer(l, "self_attn.k_proj"),
        Role::V(l) => layer(l, "self_attn.v_proj"),
        Role::O(l) => layer(l, "self_attn.o_proj"),
        Role::QNorm(l) => layer(l, "self_attn.q_norm"),
        Role::KNorm(l) => layer(l, "self_attn.k_norm"),
        Role::Sinks(l) => layer(l, "self_attn.sinks"),
        Role::QA(l) => layer(l, "self_attn.q_a_proj"),
        Role::QANorm(l) => layer(l, "self_attn.q_a_layernorm"),
        Role::QB(l) => layer(l, "self_attn.q_b_proj"),
        Role::KvA(l) => layer(l, "self_attn.kv_a_proj_with_mqa"),
        Role::KvANorm(l) => layer(l, "self_attn.kv_a_layernorm"),
        Role::KvB(l) => layer(l, "self_attn.kv_b_proj"),
        Role::Router(l) => layer(l, "mlp.gate"),
        Role::ScoreBias(l) => layer(l, "mlp.gate.e_score_correction_bias"),
        Role::Expert(l, e, p) => layer(l, &format!("mlp.experts.{e}.{}", proj(p))),
        Role::FusedGateUp(l) => layer(l, "mlp.experts.gate_up_proj"),
        Role::FusedDown(l) => layer(l, "mlp.experts.down_proj"),
        Role::Dense(l, p) => layer(l, &format!("mlp.{}", proj(p))),
        Role::Shared(l, p) => layer(l, &format!("mlp.shared_experts.{}", proj(p))),
        Role::SharedGate(l) => layer(l, "mlp.shared_expert_gate"),
    }
}
