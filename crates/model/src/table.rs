//! One table per family of tensor names and shapes, used by both the loader (which checks a
//! checkpoint against it before loading anything) and `synth-model` (which writes exactly these
//! tensors), so that the two cannot drift.
//!
//! Roles are family-neutral ("the router of layer 3"); each family's file in `families/` names
//! them as its transformers modeling file and published checkpoints do.

use crate::config::{Family, ModelConfig, QkNorm};
use crate::error::{ModelError, Result};
use crate::limits::checked_product;

/// Which projection of an MLP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proj {
    Gate,
    Up,
    Down,
}

/// A family-neutral tensor role. Module roles name a module (`.weight` / `.bias` are appended);
/// parameter roles (`Sinks`, `ScoreBias`, `FusedGateUp`, `FusedDown`) name the tensor itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Embed,
    LmHead,
    FinalNorm,
    InputNorm(usize),
    PostNorm(usize),
    Q(usize),
    K(usize),
    V(usize),
    O(usize),
    QNorm(usize),
    KNorm(usize),
    Sinks(usize),
    QA(usize),
    QANorm(usize),
    QB(usize),
    KvA(usize),
    KvANorm(usize),
    KvB(usize),
    Router(usize),
    ScoreBias(usize),
    Expert(usize, usize, Proj),
    FusedGateUp(usize),
    FusedDown(usize),
    Dense(usize, Proj),
    Shared(usize, Proj),
    SharedGate(usize),
}

impl Role {
    /// Whether the role names a parameter rather than a module.
    pub fn is_param(self) -> bool {
        matches!(
            self,
            Role::Sinks(_) | Role::ScoreBias(_) | Role::FusedGateUp(_) | Role::FusedDown(_)
        )
    }
}

/// How the routed experts of a checkpoint are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExpertLayout {
    /// The family's published layout (what `save_pretrained` writes).
    Canonical,
    /// One module per expert with gate / up / down projections.
    PerExpert,
    /// Fused `[E, 2I, H]` gate-up and `[E, H, I]` down tensors (GPT-OSS: `[E, H, 2I]` interleaved
    /// and `[E, I, H]`, with biases).
    Fused,
}

impl ExpertLayout {
    /// The concrete layout of `family` (resolving `Canonical`).
    pub fn resolve(self, family: Family) -> ExpertLayout {
        match self {
            ExpertLayout::Canonical => {
                if crate::families::fused_by_default(family) {
                    ExpertLayout::Fused
                } else {
                    ExpertLayout::PerExpert
                }
            }
            other => other,
        }
    }
}

/// How `synth-model` initialises a tensor.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Init {
    /// Norm weights.
    Ones,
    /// Token embeddings.
    Embedding,
    /// The output projection.
    LmHead,
    /// A projection reading `fan_in` inputs.
    Linear { fan_in: usize },
    /// A projection writing into the residual stream, reading `fan_in` inputs.
    Residual { fan_in: usize },
    /// Router weights (scaled so that routing is neither collapsed nor uniform).
    Router,
    /// Biases, sinks, correction biases: small random values.
    Bias,
}

/// One tensor of a checkpoint.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorSpec {
    pub name: String,
    pub shape: Vec<usize>,
    pub init: Init,
    pub role: Role,
}

/// Name of the module or parameter of `role` in `family`'s checkpoints.
pub fn role_name(family: Family, role: Role) -> String {
    crate::families::name(family, role)
}

/// Name of the weight tensor of `role` (`.weight` appended to modules).
pub fn weight_name(family: Family, role: Role) -> String {
    let n = role_name(family, role);
    if role.is_param() {
        n
    } else {
        format!("{n}.weight")
    }
}

/// Name of the bias tensor of `role` (`.bias` for modules, `_bias` for fused parameters).
pub fn bias_name(family: Family, role: Role) -> String {
    let n = role_name(family, role);
    if role.is_param() {
        format!("{n}_bias")
    } else {
        format!("{n}.bias")
    }
}

/// Every tensor of a checkpoint of `cfg` with experts stored in `layout`, sorted by name.
pub fn tensor_table(cfg: &ModelConfig, layout: ExpertLayout) -> Result<Vec<TensorSpec>> {
    let f = cfg.family;
    let layout = layout.resolve(f);
    let (h, v) = (cfg.hidden_size, cfg.vocab_size);
    let (nh, nkv, hd) = (
        cfg.num_attention_heads,
        cfg.num_key_value_heads,
        cfg.head_dim,
    );
    let (e, i) = (cfg.num_experts, cfg.intermediate_size);
    let mul = |dims: &[usize]| -> Result<usize> {
        checked_product(dims)
            .ok_or_else(|| ModelError::InvalidArgument(format!("tensor sizes {dims:?} overflow")))
    };
    let mut out: Vec<TensorSpec> = Vec::new();
    let mut w = |role: Role, shape: Vec<usize>, init: Init| {
        out.push(TensorSpec {
            name: weight_name(f, role),
            shape,
            init,
            role,
        })
    };
    let mut biases: Vec<(Role, Vec<usize>)> = Vec::new();
    w(Role::Embed, vec![v, h], Init::Embedding);
    w(Role::FinalNorm, vec![h], Init::Ones);
    if !cfg.tie_word_embeddings {
        w(Role::LmHead, vec![v, h], Init::LmHead);
    }
    for l in 0..cfg.num_hidden_layers {
        w(Role::InputNorm(l), vec![h], Init::Ones);
        w(Role::PostNorm(l), vec![h], Init::Ones);
        if let Some(m) = cfg.attn.mla {
            let qk = m.qk_nope_head_dim + m.qk_rope_head_dim;
            match m.q_lora_rank {
                Some(r) => {
                    w(Role::QA(l), vec![r, h], Init::Linear { fan_in: h });
                    if cfg.attn.o_bias {
                        biases.push((Role::QA(l), vec![r]));
                    }
                    w(Role::QANorm(l), vec![r], Init::Ones);
                    w(
                        Role::QB(l),
                        vec![mul(&[nh, qk])?, r],
                        Init::Linear { fan_in: r },
                    );
                }
                None => w(
                    Role::Q(l),
                    vec![mul(&[nh, qk])?, h],
                    Init::Linear { fan_in: h },
                ),
            }
            w(
                Role::KvA(l),
                vec![m.kv_lora_rank + m.qk_rope_head_dim, h],
                Init::Linear { fan_in: h },
            );
            w(Role::KvANorm(l), vec![m.kv_lora_rank], Init::Ones);
            if cfg.attn.o_bias {
                biases.push((Role::KvA(l), vec![m.kv_lora_rank + m.qk_rope_head_dim]));
                biases.push((Role::O(l), vec![h]));
            }
            w(
                Role::KvB(l),
                vec![
                    mul(&[nh, m.qk_nope_head_dim + m.v_head_dim])?,
                    m.kv_lora_rank,
                ],
                Init::Linear {
                    fan_in: m.kv_lora_rank,
                },
            );
            let vo = mul(&[nh, m.v_head_dim])?;
            w(Role::O(l), vec![h, vo], Init::Residual { fan_in: vo });
        } else {
            let (q, kv) = (mul(&[nh, hd])?, mul(&[nkv, hd])?);
            w(Role::Q(l), vec![q, h], Init::Linear { fan_in: h });
            w(Role::K(l), vec![kv, h], Init::Linear { fan_in: h });
            w(Role::V(l), vec![kv, h], Init::Linear { fan_in: h });
            w(Role::O(l), vec![h, q], Init::Residual { fan_in: q });
            if cfg.attn.qkv_bias {
                biases.push((Role::Q(l), vec![q]));
                biases.push((Role::K(l), vec![kv]));
                biases.push((Role::V(l), vec![kv]));
            }
            if cfg.attn.o_bias {
                biases.push((Role::O(l), vec![h]));
            }
            match cfg.attn.qk_norm {
                QkNorm::None => {}
                QkNorm::Full => {
                    w(Role::QNorm(l), vec![q], Init::Ones);
                    w(Role::KNorm(l), vec![kv], Init::Ones);
                }
                QkNorm::PerHead => {
                    w(Role::QNorm(l), vec![hd], Init::Ones);
                    w(Role::KNorm(l), vec![hd], Init::Ones);
                }
            }
            if cfg.attn.sinks {
                w(Role::Sinks(l), vec![nh], Init::Bias);
            }
        }
        let is_moe = cfg.moe.moe_layers.get(l).copied().unwrap_or(true);
        if !is_moe {
            let di = cfg.moe.dense_intermediate_size;
            w(
                Role::Dense(l, Proj::Gate),
                vec![di, h],
                Init::Linear { fan_in: h },
            );
            w(
                Role::Dense(l, Proj::Up),
                vec![di, h],
                Init::Linear { fan_in: h },
            );
            w(
                Role::Dense(l, Proj::Down),
                vec![h, di],
                Init::Residual { fan_in: di },
            );
            continue;
        }
        w(Role::Router(l), vec![e, h], Init::Router);
        if cfg.moe.router_bias {
            biases.push((Role::Router(l), vec![e]));
        }
        if cfg.moe.score_correction_bias {
            w(Role::ScoreBias(l), vec![e], Init::Bias);
        }
        match layout {
            ExpertLayout::Fused => {
                let transposed = crate::families::fused_transposed(f);
                let (gu, dn) = if transposed {
                    (vec![e, h, mul(&[2, i])?], vec![e, i, h])
                } else {
                    (vec![e, mul(&[2, i])?, h], vec![e, h, i])
                };
                w(Role::FusedGateUp(l), gu, Init::Linear { fan_in: h });
                w(Role::FusedDown(l), dn, Init::Residual { fan_in: i });
                if cfg.moe.expert_bias {
                    biases.push((Role::FusedGateUp(l), vec![e, mul(&[2, i])?]));
                    biases.push((Role::FusedDown(l), vec![e, h]));
                }
            }
            _ => {
                if cfg.moe.expert_bias {
                    return Err(ModelError::InvalidArgument(format!(
                        "{} experts with biases exist only in the fused layout",
                        f.model_type()
                    )));
                }
                for x in 0..e {
                    w(
                        Role::Expert(l, x, Proj::Gate),
                        vec![i, h],
                        Init::Linear { fan_in: h },
                    );
                    w(
                        Role::Expert(l, x, Proj::Up),
                        vec![i, h],
                        Init::Linear { fan_in: h },
                    );
                    w(
                        Role::Expert(l, x, Proj::Down),
                        vec![h, i],
                        Init::Residual { fan_in: i },
                    );
                }
            }
        }
        if let Some(s) = cfg.moe.shared {
            let si = s.intermediate_size;
            w(
                Role::Shared(l, Proj::Gate),
                vec![si, h],
                Init::Linear { fan_in: h },
            );
            w(
                Role::Shared(l, Proj::Up),
                vec![si, h],
                Init::Linear { fan_in: h },
            );
            w(
                Role::Shared(l, Proj::Down),
                vec![h, si],
                Init::Residual { fan_in: si },
            );
            if s.gated {
                w(Role::SharedGate(l), vec![1, h], Init::Linear { fan_in: h });
            }
        }
    }
    for (role, shape) in biases {
        out.push(TensorSpec {
            name: bias_name(f, role),
            shape,
            init: Init::Bias,
            role,
        });
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}
