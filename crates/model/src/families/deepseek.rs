//! DeepSeek-V2 and DeepSeek-V3 (`modeling_deepseek_v2.py`, `modeling_deepseek_v3.py`; V3 is
//! also the layout of Kimi / Moonlight-style checkpoints): multi-head latent attention with
//! interleaved RoPE on the rope part and optional YaRN, `first_k_dense_replace` dense layers,
//! shared experts, router logits in f32.
//! - V2: softmax scores, `greedy` or `group_limited_greedy` (group score = its best expert),
//!   weights × `routed_scaling_factor`, `norm_topk_prob` ignored.
//! - V3: sigmoid scores, choice by score + `e_score_correction_bias` (f32), groups ranked by the
//!   sum of their two best choice scores, weights = scores of the chosen experts, optionally
//!   renormalised, × `routed_scaling_factor`; indices come back unsorted.

use crate::config::{Family, MlaSpec, ModelConfig, Reader, RouterKind, SharedSpec};
use crate::error::{ModelError, Result};
use crate::table::Role;

/// transformers' `yarn_get_mscale`.
pub(crate) fn yarn_get_mscale(scale: f64, mscale: f64) -> f64 {
    if scale <= 1.0 {
        1.0
    } else {
        0.1 * mscale * scale.ln() + 1.0
    }
}

pub(crate) fn parse(family: Family, r: &Reader<'_>) -> Result<ModelConfig> {
    super::common::require_silu(r)?;
    let mut c = ModelConfig::common(family, r)?;
    let v3 = family == Family::DeepseekV3;
    c.intermediate_size = r.usize_req("moe_intermediate_size")?;
    c.num_experts = r.usize_req("n_routed_experts")?;
    c.moe.dense_intermediate_size = r.usize_req("intermediate_size")?;
    let q_lora_rank = r.usize_opt("q_lora_rank")?;
    let mla = MlaSpec {
        q_lora_rank,
        kv_lora_rank: r.usize_req("kv_lora_rank")?,
        qk_nope_head_dim: r.usize_req("qk_nope_head_dim")?,
        qk_rope_head_dim: r.usize_req("qk_rope_head_dim")?,
        v_head_dim: r.usize_req("v_head_dim")?,
        lora_norm_eps: 1e-6,
    };
    for (name, v) in [
        ("kv_lora_rank", mla.kv_lora_rank),
        ("qk_rope_head_dim", mla.qk_rope_head_dim),
        ("v_head_dim", mla.v_head_dim),
        ("q_lora_rank", q_lora_rank.unwrap_or(1)),
    ] {
        if v == 0 || v > crate::limits::MAX_INTERMEDIATE_SIZE {
            return Err(ModelError::invalid(
                r.path,
                format!(
                    "`{name}` = {v} must be between 1 and {}",
                    crate::limits::MAX_INTERMEDIATE_SIZE
                ),
            ));
        }
    }
    if mla.qk_nope_head_dim > crate::limits::MAX_INTERMEDIATE_SIZE {
        return Err(ModelError::invalid(
            r.path,
            "`qk_nope_head_dim` exceeds the limit",
        ));
    }
    // `attention_bias`: biases on q_a_proj, kv_a_proj_with_mqa and o_proj (not q_proj, q_b_proj,
    // kv_b_proj).
    c.attn.o_bias = c.attention_bias;
    // `head_dim` in DeepSeek configs is the rope head dim; q/k heads are nope + rope wide.
    c.head_dim = mla.qk_nope_head_dim + mla.qk_rope_head_dim;
    c.num_key_value_heads = c.num_attention_heads;
    c.attn.mla = Some(mla);
    let (theta, yarn) = r.rope()?;
    c.rope.theta = theta;
    c.rope.yarn = yarn;
    c.rope.dim = mla.qk_rope_head_dim;
    c.rope.interleaved = true;
    let mut scale = (c.head_dim as f64).powf(-0.5);
    if let Some(y) = yarn {
        if let Some(m) = y.mscale_all_dim.filter(|&m| m != 0.0) {
            let s = yarn_get_mscale(y.factor, m);
            scale *= s * s;
        }
    }
    c.attn.scale = scale;
    let first_dense = r.usize_opt("first_k_dense_replace")?.unwrap_or(0);
    let freq = r.usize_opt("moe_layer_freq")?.unwrap_or(1);
    if freq == 0 {
        return Err(ModelError::invalid(
            r.path,
            "`moe_layer_freq` must be positive",
        ));
    }
    c.moe.moe_layers = (0..c.num_hidden_layers)
        .map(|l| l >= first_dense && l % freq == 0)
        .collect();
    let shared = r.usize_opt("n_shared_experts")?.unwrap_or(0);
    if shared > 0 {
        c.moe.shared = Some(SharedSpec {
            intermediate_size: c.intermediate_size.checked_mul(shared).ok_or_else(|| {
                ModelError::invalid(
                    r.path,
                    "`n_shared_experts` × `moe_intermediate_size` overflows",
                )
            })?,
            count: shared,
            gated: false,
        });
    }
    c.moe.router_logits_f32 = true;
    c.moe.weights_in_compute_dtype = false;
    if r.bool_or("mlp_bias", false)? {
        return Err(r.unsupported("`mlp_bias` true in a DeepSeek config".into()));
    }
    if v3 && !r.bool_or("rope_interleave", true)? {
        c.rope.interleaved = false;
    }
    let scaling = r.f64_opt("routed_scaling_factor")?.unwrap_or(1.0);
    if !(scaling.is_finite() && scaling > 0.0) {
        return Err(ModelError::invalid(
            r.path,
            format!("`routed_scaling_factor` {scaling} must be positive"),
        ));
    }
    let n_group = r.usize_opt("n_group")?.unwrap_or(1);
    let topk_group = r.usize_opt("topk_group")?.unwrap_or(1);
    if v3 {
        c.norm_topk_prob = r.bool_or("norm_topk_prob", true)?;
        let scoring = r.string_or("scoring_func", "sigmoid")?;
        if scoring != "sigmoid" {
            return Err(r.unsupported(format!("DeepSeek-V3 `scoring_func` `{scoring}`")));
        }
        let method = r.string_or("topk_method", "noaux_tc")?;
        if method != "noaux_tc" {
            return Err(r.unsupported(format!("DeepSeek-V3 `topk_method` `{method}`")));
        }
        c.moe.score_correction_bias = true;
        c.moe.router = RouterKind::DeepseekV3 {
            n_group,
            topk_group,
            routed_scaling_factor: scaling,
        };
    } else {
        let method = r.string_or("topk_method", "greedy")?;
        let group_limited = match method.as_str() {
            "greedy" => false,
            "group_limited_greedy" => true,
            other => {
                return Err(r.unsupported(format!(
                    "DeepSeek-V2 `topk_method` `{other}` (greedy, group_limited_greedy)"
                )))
            }
        };
        c.moe.router = RouterKind::DeepseekV2 {
            group_limited,
            n_group,
            topk_group,
            routed_scaling_factor: scaling,
        };
    }
    Ok(c)
}

pub(crate) fn name(_role: Role) -> Option<String> {
    None
}
