//! GGUF input: the HF fixtures converted to llama.cpp's GGUF layout by
//! `tools/make_gguf_fixtures.py` (`fixtures/gguf/<name>/`).
//!
//! - F32 GGUF files route exactly as transformers on the HF fixture they come from (identical
//!   expert sets, weights within 1e-6, identical generated ids).
//! - Quantised files (Q8_0, Q4_0 experts multiplied in place by candle's `QMatMul`): the share of
//!   identical expert sets over the prompt tokens (teacher-forced: same input ids), mismatches
//!   only where transformers' own router margin is small.
//! - Split files load like the single file; bad files give one error naming the file and the
//!   tensor or key.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use common::Collect;
use moe_xray_model::config::{eos_token_ids, Family, GenerationDefaults, ModelConfig};
use moe_xray_model::generate::{generate_all, GenerateOptions, PromptInput};
use moe_xray_model::gguf::GgufFile;
use moe_xray_model::model::{LoadOptions, MoeModel};
use moe_xray_model::tokenizer::Tokenizer;
use moe_xray_test_support::fixture;
use serde_json::Value;

/// (GGUF fixture directory, HF fixture, family): every F32 conversion.
const F32: &[(&str, &str, Family)] = &[
    ("olmoe-tiny-mha", "olmoe-tiny-mha-f32", Family::Olmoe),
    ("qwen3moe-tiny", "qwen3moe-tiny-f32", Family::Qwen3Moe),
    ("qwen2moe-tiny", "qwen2moe-tiny-f32", Family::Qwen2Moe),
    (
        "deepseekv2-tiny-group",
        "deepseekv2-tiny-group-f32",
        Family::DeepseekV2,
    ),
    ("granitemoe-tiny", "granitemoe-tiny-f32", Family::GraniteMoe),
    ("gptoss-tiny", "gptoss-tiny-f32", Family::GptOss),
];

fn gguf_path(dir: &str, file: &str) -> PathBuf {
    fixture("gguf").join(dir).join(file)
}

fn jsonl(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn nums(v: &Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

struct Want {
    experts: Vec<u32>,
    weights: Vec<f64>,
    token_type: String,
    margin: f64,
}

fn expected(hf: &Path) -> HashMap<(String, u32, u32), Want> {
    jsonl(&hf.join("expected_trace.jsonl"))
        .into_iter()
        .map(|v| {
            (
                (
                    v["prompt_id"].as_str().unwrap().to_string(),
                    v["position"].as_u64().unwrap() as u32,
                    v["layer"].as_u64().unwrap() as u32,
                ),
                Want {
                    experts: ids(&v["experts"]),
                    weights: nums(&v["weights"]),
                    token_type: v["token_type"].as_str().unwrap().to_string(),
                    margin: v["margin"].as_f64().unwrap(),
                },
            )
        })
        .collect()
}

struct Run {
    records: Collect,
    generated: HashMap<String, Vec<u32>>,
}

/// Runs the HF fixture's prompts (and its number of new tokens) through `model_path`.
fn run(model_path: &Path, hf: &Path, batch: usize) -> Run {
    let cfg = ModelConfig::from_dir(model_path).unwrap();
    let gen_cfg = GenerationDefaults::from_dir(model_path).unwrap();
    let model = MoeModel::load(model_path, &LoadOptions::default()).unwrap();
    let gens = jsonl(&hf.join("expected_generations.jsonl"));
    let prompts: Vec<PromptInput> = gens
        .iter()
        .enumerate()
        .map(|(i, g)| PromptInput {
            id: g["prompt_id"].as_str().unwrap().to_string(),
            category: None,
            tokens: ids(&g["prompt_ids"]),
            index: i as u64,
        })
        .collect();
    let opts = GenerateOptions {
        max_new_tokens: gens[0]["max_new_tokens"].as_u64().unwrap() as usize,
        eos_token_ids: eos_token_ids(&cfg, gen_cfg.as_ref()),
        ..Default::default()
    };
    let mut records = Collect::default();
    let mut generated = HashMap::new();
    generate_all(&model, &prompts, batch, &opts, &mut records, &mut |g| {
        generated.insert(g.prompt_id.clone(), g.generated.clone());
        Ok(())
    })
    .unwrap();
    Run { records, generated }
}

fn sorted(v: &[u32]) -> Vec<u32> {
    let mut v = v.to_vec();
    v.sort_unstable();
    v
}

#[test]
fn gguf_configs_equal_the_hf_configs() {
    for (dir, hf, family) in F32 {
        let g = ModelConfig::from_dir(&gguf_path(dir, "model-f32.gguf")).unwrap();
        let h = ModelConfig::from_dir(&fixture("hf").join(hf)).unwrap();
        assert_eq!(g.family, *family, "{dir}");
        assert_eq!(g.moe, h.moe, "{dir}: MoE spec");
        assert_eq!(g.attn, h.attn, "{dir}: attention spec");
        assert_eq!(g.rope, h.rope, "{dir}: RoPE");
        assert_eq!(g.multipliers, h.multipliers, "{dir}");
        assert_eq!(
            (
                g.vocab_size,
                g.hidden_size,
                g.intermediate_size,
                g.num_hidden_layers,
                g.num_experts,
                g.num_experts_per_tok,
                g.norm_topk_prob,
                g.rms_norm_eps,
                g.tie_word_embeddings
            ),
            (
                h.vocab_size,
                h.hidden_size,
                h.intermediate_size,
                h.num_hidden_layers,
                h.num_experts,
                h.num_experts_per_tok,
                h.norm_topk_prob,
                h.rms_norm_eps,
                h.tie_word_embeddings
            ),
            "{dir}"
        );
    }
}

#[test]
fn f32_gguf_routes_exactly_as_transformers() {
    for (dir, hf_name, family) in F32 {
        let hf = fixture("hf").join(hf_name);
        let r = run(&gguf_path(dir, "model-f32.gguf"), &hf, 1);
        let want = expected(&hf);
        assert_eq!(r.records.records.len(), want.len(), "{dir}: records");
        let mut max_dw = 0f64;
        for rec in &r.records.records {
            let key = (rec.prompt_id.clone(), rec.position, rec.layer);
            let w = &want[&key];
            assert_eq!(rec.token_type.as_str(), w.token_type);
            let ws = rec.weights.as_ref().unwrap();
            let mut ours: Vec<(u32, f64)> = rec
                .experts
                .iter()
                .copied()
                .zip(ws.iter().map(|&x| x as f64))
                .collect();
            let mut theirs: Vec<(u32, f64)> = w
                .experts
                .iter()
                .copied()
                .zip(w.weights.iter().copied())
                .collect();
            if matches!(family, Family::DeepseekV2 | Family::DeepseekV3) {
                ours.sort_by_key(|p| p.0);
                theirs.sort_by_key(|p| p.0);
            }
            let (a, b): (Vec<u32>, Vec<u32>) = (
                ours.iter().map(|p| p.0).collect(),
                theirs.iter().map(|p| p.0).collect(),
            );
            assert_eq!(a, b, "{dir} {key:?}: experts");
            for (x, y) in ours.iter().zip(&theirs) {
                max_dw = max_dw.max((x.1 - y.1).abs());
            }
        }
        let tol = if *family == Family::GptOss {
            1.5e-6
        } else {
            1e-6
        };
        assert!(max_dw <= tol, "{dir}: |Δweight| {max_dw:.3e}");
        for g in jsonl(&hf.join("expected_generations.jsonl")) {
            let id = g["prompt_id"].as_str().unwrap();
            assert_eq!(r.generated[id], ids(&g["generated_ids"]), "{dir} {id}");
        }
        eprintln!(
            "{dir} (F32 GGUF): {} records, 100 % identical expert sets, identical generations, \
             max |Δweight| {max_dw:.2e}",
            want.len()
        );
    }
}

/// Share of identical expert sets over the prompt tokens, and the largest transformers router
/// margin at a mismatch.
fn agreement(dir: &str, file: &str, hf_name: &str) -> (f64, usize, f64) {
    let hf = fixture("hf").join(hf_name);
    let r = run(&gguf_path(dir, file), &hf, 1);
    let want = expected(&hf);
    let (mut same, mut total, mut worst) = (0usize, 0usize, 0f64);
    for rec in &r.records.records {
        if rec.token_type.as_str() != "prompt" {
            continue;
        }
        let w = &want[&(rec.prompt_id.clone(), rec.position, rec.layer)];
        total += 1;
        if sorted(&rec.experts) == sorted(&w.experts) {
            same += 1;
        } else {
            worst = worst.max(w.margin);
        }
    }
    (same as f64 / total as f64, total, worst)
}

#[test]
fn quantised_gguf_routing_agrees_with_transformers() {
    // Q8_0 experts: the gate/up projections of OLMoE (rows of 32), all of Granite's; rows of 16
    // (OLMoE's down projection) fall back to F16 as in llama.cpp's converter.
    let file = GgufFile::open(&gguf_path("granitemoe-tiny", "model-q8_0.gguf")).unwrap();
    assert_eq!(
        file.tensor_type("blk.0.ffn_down_exps.weight"),
        Some(candle_core::quantized::GgmlDType::Q8_0)
    );
    for (dir, file, hf, min_share, max_margin) in [
        (
            "olmoe-tiny-mha",
            "model-q8_0.gguf",
            "olmoe-tiny-mha-f32",
            0.95,
            0.05,
        ),
        (
            "granitemoe-tiny",
            "model-q8_0.gguf",
            "granitemoe-tiny-f32",
            0.95,
            0.05,
        ),
        (
            "olmoe-tiny-mha",
            "model-q4_0.gguf",
            "olmoe-tiny-mha-f32",
            0.85,
            0.15,
        ),
    ] {
        let (share, n, worst) = agreement(dir, file, hf);
        eprintln!(
            "{dir}/{file}: {:.2} % of {n} prompt-token expert sets identical to transformers; \
             largest router margin at a mismatch {worst:.4}",
            share * 100.0
        );
        assert!(share >= min_share, "{dir}/{file}: {share}");
        assert!(
            worst <= max_margin,
            "{dir}/{file}: mismatch at margin {worst}"
        );
    }
}

#[test]
fn split_gguf_loads_like_the_single_file() {
    let hf = fixture("hf").join("olmoe-tiny-mha-f32");
    let one = run(&gguf_path("olmoe-tiny-mha", "model-f32.gguf"), &hf, 4);
    // Any part names the set.
    for part in ["model-00001-of-00002.gguf", "model-00002-of-00002.gguf"] {
        let split = run(
            &fixture("gguf")
                .join("olmoe-tiny-mha")
                .join("split")
                .join(part),
            &hf,
            4,
        );
        assert_eq!(split.records.by_key(), one.records.by_key(), "{part}");
        assert_eq!(split.generated, one.generated);
    }
}

#[test]
fn tokenizer_and_chat_template_come_with_the_gguf() {
    let path = gguf_path("olmoe-tiny-mha", "model-f32.gguf");
    let hf = fixture("hf").join("olmoe-tiny-mha-f32");
    let tok = Tokenizer::from_dir(&path).unwrap();
    let want = Tokenizer::from_dir(&hf).unwrap();
    assert_eq!(
        tok.encode("fn main() { println!(\"hi\"); }", false)
            .unwrap(),
        want.encode("fn main() { println!(\"hi\"); }", false)
            .unwrap()
    );
    let msgs = vec![moe_xray_model::chat::Message {
        role: "user".into(),
        content: "Hello".into(),
    }];
    let g = moe_xray_model::chat::ChatTemplate::from_dir(&path).unwrap();
    let h = moe_xray_model::chat::ChatTemplate::from_dir(&hf).unwrap();
    assert_eq!(
        g.render(&msgs, true).unwrap(),
        h.render(&msgs, true).unwrap()
    );
    let gd = GenerationDefaults::from_dir(&path).unwrap().unwrap();
    let hd = GenerationDefaults::from_dir(&hf).unwrap().unwrap();
    assert_eq!(gd, hd);
    // No tokenizer.json beside the file: the tokenizer comes from the GGUF metadata and encodes
    // and decodes every fixture prompt as tokenizer.json does.
    let tmp = tempfile::tempdir().unwrap();
    for (dir, hf_name, _) in F32 {
        let lone = tmp.path().join(format!("{dir}.gguf"));
        std::fs::copy(gguf_path(dir, "model-f32.gguf"), &lone).unwrap();
        let meta = Tokenizer::from_dir(&lone).unwrap();
        let want = Tokenizer::from_dir(&fixture("hf").join(hf_name)).unwrap();
        for p in jsonl(&fixture("hf").join("prompts.jsonl")) {
            let text = p["text"].as_str().unwrap();
            let ids = meta.encode(text, true).unwrap();
            assert_eq!(ids, want.encode(text, true).unwrap(), "{dir}: {text}");
            assert_eq!(
                meta.decode(&ids, false).unwrap(),
                want.decode(&ids, false).unwrap()
            );
        }
    }
    // A pre-tokenizer this build does not know: one error saying where to put tokenizer.json.
    let p = tmp.path().join("pre.gguf");
    rewrite(&path, &p, |m, _| {
        m.insert(
            "tokenizer.ggml.pre".into(),
            candle_core::quantized::gguf_file::Value::String("deepseek-v3".into()),
        );
    });
    let e = Tokenizer::from_dir(&p).unwrap_err().to_string();
    assert!(
        e.contains("pre.gguf") && e.contains("deepseek-v3") && e.contains("tokenizer.json"),
        "{e}"
    );
}

fn load_err(path: &Path) -> String {
    let e = MoeModel::load(path, &LoadOptions::default()).unwrap_err();
    eprintln!("error: {e}");
    e.to_string()
}

/// Rewrites a GGUF file with candle's writer, after `edit` changed its metadata / tensors.
fn rewrite(
    src: &Path,
    dst: &Path,
    edit: impl FnOnce(
        &mut HashMap<String, candle_core::quantized::gguf_file::Value>,
        &mut Vec<(String, candle_core::quantized::QTensor)>,
    ),
) {
    use candle_core::quantized::gguf_file;
    let mut f = std::fs::File::open(src).unwrap();
    let c = gguf_file::Content::read(&mut f).unwrap();
    let mut names: Vec<&String> = c.tensor_infos.keys().collect();
    names.sort();
    let mut tensors: Vec<(String, candle_core::quantized::QTensor)> = names
        .into_iter()
        .map(|n| {
            (
                n.clone(),
                c.tensor(&mut f, n, &candle_core::Device::Cpu).unwrap(),
            )
        })
        .collect();
    let mut meta = c.metadata.clone();
    edit(&mut meta, &mut tensors);
    let mut keys: Vec<&String> = meta.keys().collect();
    keys.sort();
    let md: Vec<(&str, &gguf_file::Value)> = keys.iter().map(|k| (k.as_str(), &meta[*k])).collect();
    let ts: Vec<(&str, &candle_core::quantized::QTensor)> =
        tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let mut out = std::fs::File::create(dst).unwrap();
    gguf_file::write(&mut out, &md, &ts).unwrap();
}

#[test]
fn bad_gguf_files_give_one_clear_error() {
    use candle_core::quantized::gguf_file::Value as V;
    let src = gguf_path("olmoe-tiny-mha", "model-f32.gguf");
    let tmp = tempfile::tempdir().unwrap();

    // Truncated tensor data.
    let bytes = std::fs::read(&src).unwrap();
    let p = tmp.path().join("truncated.gguf");
    std::fs::write(&p, &bytes[..bytes.len() - 1000]).unwrap();
    let e = load_err(&p);
    assert!(
        e.contains("truncated.gguf") && e.contains("truncated") && e.contains("tensor `"),
        "{e}"
    );

    // Unsupported architecture.
    let p = tmp.path().join("arch.gguf");
    rewrite(&src, &p, |m, _| {
        m.insert("general.architecture".into(), V::String("mamba".into()));
    });
    let e = load_err(&p);
    assert!(
        e.contains("arch.gguf") && e.contains("unsupported GGUF architecture \"mamba\""),
        "{e}"
    );

    // Metadata that contradicts the tensor shapes.
    let p = tmp.path().join("experts.gguf");
    rewrite(&src, &p, |m, _| {
        m.insert("olmoe.expert_count".into(), V::U32(9));
    });
    let e = load_err(&p);
    assert!(
        e.contains("experts.gguf") && e.contains("blk.0.") && e.contains("shape mismatch"),
        "{e}"
    );

    // A tensor of the wrong shape.
    let p = tmp.path().join("shape.gguf");
    rewrite(&src, &p, |_, ts| {
        for (n, t) in ts.iter_mut() {
            if n == "blk.1.attn_q.weight" {
                let w = candle_core::Tensor::zeros(
                    (31, 32),
                    candle_core::DType::F32,
                    &candle_core::Device::Cpu,
                )
                .unwrap();
                *t = candle_core::quantized::QTensor::quantize(
                    &w,
                    candle_core::quantized::GgmlDType::F32,
                )
                .unwrap();
            }
        }
    });
    let e = load_err(&p);
    assert!(
        e.contains("shape.gguf") && e.contains("blk.1.attn_q.weight") && e.contains("[31, 32]"),
        "{e}"
    );

    // A missing metadata key.
    let p = tmp.path().join("key.gguf");
    rewrite(&src, &p, |m, _| {
        m.remove("olmoe.expert_used_count");
    });
    let e = load_err(&p);
    assert!(
        e.contains("key.gguf") && e.contains("`olmoe.expert_used_count`"),
        "{e}"
    );

    // An unknown tensor type (99 patched into the first tensor's type field; 39 = MXFP4 is
    // read, see tests/mxfp4.rs).
    let name = b"token_embd.weight";
    let at = bytes
        .windows(name.len())
        .position(|w| w == name)
        .expect("tensor name in the header");
    // name, n_dims (u32), dims (n × u64), type (u32)
    let nd_at = at + name.len();
    let nd = u32::from_le_bytes(bytes[nd_at..nd_at + 4].try_into().unwrap()) as usize;
    let ty_at = nd_at + 4 + 8 * nd;
    let mut patched = bytes.clone();
    patched[ty_at..ty_at + 4].copy_from_slice(&99u32.to_le_bytes());
    let p = tmp.path().join("unknown-type.gguf");
    std::fs::write(&p, &patched).unwrap();
    let e = load_err(&p);
    assert!(
        e.contains("unknown-type.gguf") && e.contains("99") && e.contains("MXFP4"),
        "{e}"
    );

    // A split set with a part missing.
    let dir = tmp.path().join("split");
    std::fs::create_dir(&dir).unwrap();
    let part1 = dir.join("model-00001-of-00002.gguf");
    std::fs::copy(
        fixture("gguf")
            .join("olmoe-tiny-mha")
            .join("split")
            .join("model-00001-of-00002.gguf"),
        &part1,
    )
    .unwrap();
    let e = load_err(&part1);
    assert!(
        e.contains("model-00002-of-00002.gguf") && e.contains("missing part 2"),
        "{e}"
    );
}

/// Deterministic uniform values in (-a, a) (a 64-bit LCG; test data only).
fn uniform(n: usize, a: f32, seed: u64) -> Vec<f32> {
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * a
        })
        .collect()
}

/// Writes an OLMoE-shaped GGUF with hidden and expert sizes of 256 (rows long enough for the
/// K-quants' 256-value blocks), every tensor F32 except the routed experts, stored as `experts`.
fn write_k_model(path: &Path, experts: candle_core::quantized::GgmlDType) {
    use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
    use candle_core::{Device, Tensor};
    let (v, h, i, e, layers) = (64usize, 256usize, 256usize, 8usize, 3usize);
    let mut seed = 1u64;
    let mut t = |shape: &[usize], a: f32, ty: GgmlDType| -> QTensor {
        seed += 1;
        let n: usize = shape.iter().product();
        let w = Tensor::from_vec(uniform(n, a, seed), shape, &Device::Cpu).unwrap();
        QTensor::quantize(&w, ty).unwrap()
    };
    let ones = |n: usize| {
        QTensor::quantize(
            &Tensor::ones(n, candle_core::DType::F32, &Device::Cpu).unwrap(),
            GgmlDType::F32,
        )
        .unwrap()
    };
    let lin = (3.0f32 / h as f32).sqrt();
    let f = GgmlDType::F32;
    let mut ts: Vec<(String, QTensor)> = vec![
        ("token_embd.weight".into(), t(&[v, h], 1.0, f)),
        ("output.weight".into(), t(&[v, h], lin, f)),
        ("output_norm.weight".into(), ones(h)),
    ];
    for l in 0..layers {
        let b = |s: &str| format!("blk.{l}.{s}.weight");
        ts.push((b("attn_norm"), ones(h)));
        ts.push((b("ffn_norm"), ones(h)));
        ts.push((b("attn_q_norm"), ones(h)));
        ts.push((b("attn_k_norm"), ones(h)));
        for p in ["attn_q", "attn_k", "attn_v", "attn_output"] {
            ts.push((b(p), t(&[h, h], lin, f)));
        }
        ts.push((b("ffn_gate_inp"), t(&[e, h], 4.0 * lin, f)));
        ts.push((b("ffn_gate_exps"), t(&[e, i, h], lin, experts)));
        ts.push((b("ffn_up_exps"), t(&[e, i, h], lin, experts)));
        ts.push((b("ffn_down_exps"), t(&[e, h, i], lin, experts)));
    }
    use gguf_file::Value as V;
    let meta: Vec<(&str, V)> = vec![
        ("general.architecture", V::String("olmoe".into())),
        ("olmoe.block_count", V::U32(layers as u32)),
        ("olmoe.context_length", V::U32(512)),
        ("olmoe.embedding_length", V::U32(h as u32)),
        ("olmoe.feed_forward_length", V::U32(i as u32)),
        ("olmoe.attention.head_count", V::U32(4)),
        ("olmoe.attention.head_count_kv", V::U32(4)),
        ("olmoe.attention.layer_norm_rms_epsilon", V::F32(1e-5)),
        ("olmoe.expert_count", V::U32(e as u32)),
        ("olmoe.expert_used_count", V::U32(2)),
        ("olmoe.vocab_size", V::U32(v as u32)),
    ];
    let md: Vec<(&str, &V)> = meta.iter().map(|(k, v)| (*k, v)).collect();
    let tr: Vec<(&str, &QTensor)> = ts.iter().map(|(n, q)| (n.as_str(), q)).collect();
    let mut out = std::fs::File::create(path).unwrap();
    gguf_file::write(&mut out, &md, &tr).unwrap();
}

fn trace_ids(path: &Path, prompts: &[PromptInput]) -> HashMap<(String, u32, u32), Vec<u32>> {
    let model = MoeModel::load(path, &LoadOptions::default()).unwrap();
    let opts = GenerateOptions {
        max_new_tokens: 1,
        ..Default::default()
    };
    let mut sink = Collect::default();
    generate_all(&model, prompts, 2, &opts, &mut sink, &mut |_| Ok(())).unwrap();
    sink.records
        .iter()
        .map(|r| {
            (
                (r.prompt_id.clone(), r.position, r.layer),
                sorted(&r.experts),
            )
        })
        .collect()
}

#[test]
fn k_quant_experts_route_close_to_f32() {
    use candle_core::quantized::GgmlDType;
    let tmp = tempfile::tempdir().unwrap();
    let prompts: Vec<PromptInput> = (0..4)
        .map(|p| PromptInput {
            id: format!("p{p}"),
            category: None,
            tokens: uniform(24, 1.0, 100 + p)
                .iter()
                .map(|x| ((x + 1.0) * 31.9) as u32)
                .collect(),
            index: p,
        })
        .collect();
    let reference = tmp.path().join("f32.gguf");
    write_k_model(&reference, GgmlDType::F32);
    let want = trace_ids(&reference, &prompts);
    for (ty, min_share) in [
        (GgmlDType::Q8_0, 0.95),
        (GgmlDType::Q6K, 0.95),
        (GgmlDType::Q5K, 0.9),
        (GgmlDType::Q4K, 0.85),
        (GgmlDType::Q4_0, 0.85),
    ] {
        let p = tmp.path().join(format!("{ty:?}.gguf"));
        write_k_model(&p, ty);
        assert_eq!(
            GgufFile::open(&p)
                .unwrap()
                .tensor_type("blk.1.ffn_down_exps.weight"),
            Some(ty)
        );
        let got = trace_ids(&p, &prompts);
        assert_eq!(got.len(), want.len());
        // Layer 0 routes before any expert ran: only later layers measure the quantisation.
        let later: Vec<_> = got.iter().filter(|(k, _)| k.2 > 0).collect();
        let same = later.iter().filter(|(k, v)| want[*k] == **v).count();
        let share = same as f64 / later.len() as f64;
        eprintln!(
            "{ty:?} experts: {:.2} % of {} expert sets (layers 1-2) identical to the F32 file's",
            share * 100.0,
            later.len()
        );
        assert!(share >= min_share, "{ty:?}: {share}");
    }
}

#[test]
fn quantised_routing_does_not_depend_on_the_batch() {
    let hf = fixture("hf").join("granitemoe-tiny-f32");
    let path = gguf_path("granitemoe-tiny", "model-q8_0.gguf");
    let one = run(&path, &hf, 1);
    let four = run(&path, &hf, 4);
    assert_eq!(one.records.by_key(), four.records.by_key());
    assert_eq!(one.generated, four.generated);
}

/// Splits every stacked expert tensor (`blk.N.ffn_X_exps.weight`) into the per-expert tensors
/// of older llama.cpp files (`blk.N.ffn_X.E.weight`), bytes unchanged.
fn unstack_experts(ts: &mut Vec<(String, candle_core::quantized::QTensor)>) {
    use candle_core::quantized::{QStorage, QTensor};
    let mut out = Vec::new();
    for (name, t) in ts.drain(..) {
        let Some(rest) = name.strip_suffix("_exps.weight") else {
            out.push((name, t));
            continue;
        };
        let (blk, proj) = rest.rsplit_once(".ffn_").unwrap();
        let dims = t.shape().dims().to_vec();
        let data = t.data().unwrap();
        let per = data.len() / dims[0];
        for x in 0..dims[0] {
            let storage = QStorage::from_data(
                std::borrow::Cow::Borrowed(&data[x * per..(x + 1) * per]),
                &candle_core::Device::Cpu,
                t.dtype(),
            )
            .unwrap();
            out.push((
                format!("{blk}.ffn_{proj}.{x}.weight"),
                QTensor::new(storage, (dims[1], dims[2])).unwrap(),
            ));
        }
    }
    *ts = out;
}

#[test]
fn per_expert_tensors_of_older_files_load_like_stacked_ones() {
    let hf = fixture("hf").join("olmoe-tiny-mha-f32");
    let tmp = tempfile::tempdir().unwrap();
    std::fs::copy(
        fixture("gguf")
            .join("olmoe-tiny-mha")
            .join("tokenizer.json"),
        tmp.path().join("tokenizer.json"),
    )
    .unwrap();
    for file in ["model-f32.gguf", "model-q8_0.gguf"] {
        let src = gguf_path("olmoe-tiny-mha", file);
        let dst = tmp.path().join(file);
        rewrite(&src, &dst, |_, ts| unstack_experts(ts));
        let f = GgufFile::open(&dst).unwrap();
        assert!(f.contains("blk.1.ffn_up.7.weight") && !f.contains("blk.1.ffn_up_exps.weight"));
        let stacked = run(&src, &hf, 2);
        let legacy = run(&dst, &hf, 2);
        assert_eq!(legacy.records.by_key(), stacked.records.by_key(), "{file}");
        assert_eq!(legacy.generated, stacked.generated, "{file}");
    }
}
