//! Shared helpers: a tiny random OLMoE checkpoint written with the `safetensors` crate, and a
//! sink that keeps every routing decision.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::Path;

use moe_xray_trace::{RoutingDecision, RoutingRecord, RoutingSink};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use safetensors::{serialize_to_file, Dtype, View};

pub struct Spec {
    pub vocab: usize,
    pub hidden: usize,
    pub inter: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub experts: usize,
    pub top_k: usize,
    pub norm_topk_prob: bool,
    pub tie: bool,
    pub clip_qkv: Option<f64>,
    pub fused: bool,
    pub bf16: bool,
    pub seed: u64,
}

impl Default for Spec {
    fn default() -> Self {
        Spec {
            vocab: 96,
            hidden: 32,
            inter: 16,
            layers: 2,
            heads: 4,
            kv_heads: 2,
            experts: 8,
            top_k: 2,
            norm_topk_prob: false,
            tie: false,
            clip_qkv: None,
            fused: false,
            bf16: false,
            seed: 1,
        }
    }
}

struct Raw {
    dtype: Dtype,
    shape: Vec<usize>,
    data: Vec<u8>,
}

impl View for &Raw {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

pub fn config_json(s: &Spec) -> serde_json::Value {
    serde_json::json!({
        "architectures": ["OlmoeForCausalLM"],
        "model_type": "olmoe",
        "vocab_size": s.vocab,
        "hidden_size": s.hidden,
        "intermediate_size": s.inter,
        "num_hidden_layers": s.layers,
        "num_attention_heads": s.heads,
        "num_key_value_heads": s.kv_heads,
        "hidden_act": "silu",
        "max_position_embeddings": 256,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "rope_scaling": null,
        "attention_bias": false,
        "clip_qkv": s.clip_qkv,
        "num_experts": s.experts,
        "num_experts_per_tok": s.top_k,
        "norm_topk_prob": s.norm_topk_prob,
        "tie_word_embeddings": s.tie,
        "torch_dtype": if s.bf16 { "bfloat16" } else { "float32" },
        "eos_token_id": 2,
        "pad_token_id": 1,
    })
}

/// All tensors of the checkpoint, as f32 values (name, shape, values).
pub fn tensors(s: &Spec) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    let mut rng = ChaCha8Rng::seed_from_u64(s.seed);
    let mut out = Vec::new();
    let mut rand = |n: usize, scale: f32| -> Vec<f32> {
        (0..n)
            .map(|_| rng.random_range(-1.0f32..1.0) * scale)
            .collect()
    };
    let h = s.hidden;
    let hd = h / s.heads;
    let kv = s.kv_heads * hd;
    out.push((
        "model.embed_tokens.weight".into(),
        vec![s.vocab, h],
        rand(s.vocab * h, 1.0),
    ));
    for l in 0..s.layers {
        let p = format!("model.layers.{l}");
        let sc = 1.0 / (h as f32).sqrt();
        out.push((
            format!("{p}.input_layernorm.weight"),
            vec![h],
            rand(h, 0.2).iter().map(|x| 1.0 + x).collect(),
        ));
        out.push((
            format!("{p}.post_attention_layernorm.weight"),
            vec![h],
            rand(h, 0.2).iter().map(|x| 1.0 + x).collect(),
        ));
        out.push((
            format!("{p}.self_attn.q_proj.weight"),
            vec![h, h],
            rand(h * h, sc),
        ));
        out.push((
            format!("{p}.self_attn.k_proj.weight"),
            vec![kv, h],
            rand(kv * h, sc),
        ));
        out.push((
            format!("{p}.self_attn.v_proj.weight"),
            vec![kv, h],
            rand(kv * h, sc),
        ));
        out.push((
            format!("{p}.self_attn.o_proj.weight"),
            vec![h, h],
            rand(h * h, sc),
        ));
        out.push((
            format!("{p}.self_attn.q_norm.weight"),
            vec![h],
            rand(h, 0.2).iter().map(|x| 1.0 + x).collect(),
        ));
        out.push((
            format!("{p}.self_attn.k_norm.weight"),
            vec![kv],
            rand(kv, 0.2).iter().map(|x| 1.0 + x).collect(),
        ));
        out.push((
            format!("{p}.mlp.gate.weight"),
            vec![s.experts, h],
            rand(s.experts * h, 1.0),
        ));
        let mut gates = Vec::new();
        let mut ups = Vec::new();
        let mut downs = Vec::new();
        for _ in 0..s.experts {
            gates.push(rand(s.inter * h, sc));
            ups.push(rand(s.inter * h, sc));
            downs.push(rand(h * s.inter, 1.0 / (s.inter as f32).sqrt()));
        }
        if s.fused {
            let mut gu = Vec::new();
            let mut dn = Vec::new();
            for e in 0..s.experts {
                gu.extend_from_slice(&gates[e]);
                gu.extend_from_slice(&ups[e]);
                dn.extend_from_slice(&downs[e]);
            }
            out.push((
                format!("{p}.mlp.experts.gate_up_proj"),
                vec![s.experts, 2 * s.inter, h],
                gu,
            ));
            out.push((
                format!("{p}.mlp.experts.down_proj"),
                vec![s.experts, h, s.inter],
                dn,
            ));
        } else {
            for e in 0..s.experts {
                let q = format!("{p}.mlp.experts.{e}");
                out.push((
                    format!("{q}.gate_proj.weight"),
                    vec![s.inter, h],
                    gates[e].clone(),
                ));
                out.push((
                    format!("{q}.up_proj.weight"),
                    vec![s.inter, h],
                    ups[e].clone(),
                ));
                out.push((
                    format!("{q}.down_proj.weight"),
                    vec![h, s.inter],
                    downs[e].clone(),
                ));
            }
        }
    }
    out.push(("model.norm.weight".into(), vec![h], vec![1.0; h]));
    if !s.tie {
        out.push((
            "lm_head.weight".into(),
            vec![s.vocab, h],
            rand(s.vocab * h, 1.0 / (h as f32).sqrt()),
        ));
    }
    out
}

pub fn write_safetensors(path: &Path, ts: &[(String, Vec<usize>, Vec<f32>)], bf16: bool) {
    let raws: Vec<(String, Raw)> = ts
        .iter()
        .map(|(n, shape, v)| {
            let data: Vec<u8> = if bf16 {
                v.iter()
                    .flat_map(|x| half::bf16::from_f32(*x).to_le_bytes())
                    .collect()
            } else {
                v.iter().flat_map(|x| x.to_le_bytes()).collect()
            };
            (
                n.clone(),
                Raw {
                    dtype: if bf16 { Dtype::BF16 } else { Dtype::F32 },
                    shape: shape.clone(),
                    data,
                },
            )
        })
        .collect();
    let views: Vec<(String, &Raw)> = raws.iter().map(|(n, r)| (n.clone(), r)).collect();
    serialize_to_file(views, None, path).unwrap();
}

/// Writes a complete tiny checkpoint into `dir`.
pub fn write_model(dir: &Path, s: &Spec) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_string_pretty(&config_json(s)).unwrap(),
    )
    .unwrap();
    write_safetensors(&dir.join("model.safetensors"), &tensors(s), s.bf16);
}

/// Runs `tokens` through a fresh sequence `id` in one forward step without a cache (teacher
/// forcing), reporting every routing decision to `sink`.
pub fn forward_once(
    model: &moe_xray_model::model::MoeModel,
    id: &str,
    tokens: &[u32],
    sink: &mut dyn RoutingSink,
) {
    let mut st = model.new_sequence(id);
    model
        .forward(
            &mut [moe_xray_model::model::StepSeq {
                state: &mut st,
                tokens,
                token_type: moe_xray_trace::TokenType::Prompt,
                want_logits: false,
            }],
            sink,
        )
        .unwrap();
}

/// Keeps every decision as an owned record.
#[derive(Default)]
pub struct Collect {
    pub records: Vec<RoutingRecord>,
    pub probs: bool,
    pub begun: Vec<String>,
    pub ended: Vec<String>,
}

impl RoutingSink for Collect {
    fn begin_prompt(&mut self, id: &str, _c: Option<&str>) -> moe_xray_trace::Result<()> {
        self.begun.push(id.to_string());
        Ok(())
    }
    fn record(&mut self, d: &RoutingDecision<'_>) -> moe_xray_trace::Result<()> {
        self.records.push(RoutingRecord {
            prompt_id: d.prompt_id.to_string(),
            category: None,
            layer: d.layer,
            position: d.position,
            token_id: Some(d.token_id),
            token_type: d.token_type,
            experts: d.experts.to_vec(),
            weights: Some(d.weights.to_vec()),
            probs: d.probs.map(|p| p.to_vec()),
        });
        Ok(())
    }
    fn end_prompt(&mut self, id: &str) -> moe_xray_trace::Result<()> {
        self.ended.push(id.to_string());
        Ok(())
    }
    fn wants_probs(&self) -> bool {
        self.probs
    }
}

impl Collect {
    /// Records keyed by (prompt, position, layer).
    pub fn by_key(&self) -> HashMap<(String, u32, u32), RoutingRecord> {
        self.records
            .iter()
            .map(|r| ((r.prompt_id.clone(), r.position, r.layer), r.clone()))
            .collect()
    }
}

/// Every file of a checkpoint written by `spec` inside a rayon pool of `threads` threads.
pub fn write_with_threads(
    spec: &moe_xray_model::synth::SynthSpec,
    dir: &Path,
    threads: usize,
) -> std::collections::BTreeMap<String, Vec<u8>> {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .unwrap();
    pool.install(|| moe_xray_model::synth::write_checkpoint(spec, dir).unwrap());
    moe_xray_test_support::dir_files(dir)
}
