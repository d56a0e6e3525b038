//! `synth-model --format gguf`: synthetic checkpoints written as llama.cpp GGUF files.
//!
//! - Every family's tiny preset as F32 GGUF loads with the project's GGUF reader, describes the
//!   same model as the safetensors checkpoint of the same seed, and routes identically to it.
//! - Q8_0 and Q4_K_M files: llama.cpp's type mix, and the share of identical expert sets against
//!   the f32 safetensors model of the same seed (prompt tokens, teacher-forced) is reported and
//!   bounded from below.
//! - The bytes do not depend on the thread count; the tokenizer built from the GGUF metadata
//!   encodes like the checkpoint's tokenizer.json.

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::quantized::GgmlDType;
use common::Collect;
use moe_xray_model::config::ModelConfig;
use moe_xray_model::generate::{generate_all, GenerateOptions, PromptInput};
use moe_xray_model::gguf::GgufFile;
use moe_xray_model::model::{LoadOptions, MoeModel};
use moe_xray_model::synth::{self, SynthDtype, SynthSpec};
use moe_xray_model::synth_gguf::{write_gguf, GgufQuant};
use moe_xray_model::tokenizer::Tokenizer;

const TEXTS: [&str; 4] = [
    "def merge_sort(items):\n    return sorted(items)",
    "What is 128 / 16 + 3 * 7? Solve 4x - 9 = 23.",
    "Once upon a time, the old lighthouse keeper climbed the stairs.",
    "What is the capital of Australia and when was it founded?",
];

/// Routing of the prompt tokens (one new token, not compared) of `TEXTS`.
/// Sorted expert set and weights per (prompt, position, layer).
type Routing = BTreeMap<(String, u32, u32), (Vec<u32>, Vec<f32>)>;

fn route(path: &Path, tok: &Tokenizer) -> Routing {
    let model = MoeModel::load(path, &LoadOptions::default())
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    route_model(&model, tok)
}

fn route_model(model: &MoeModel, tok: &Tokenizer) -> Routing {
    let prompts: Vec<PromptInput> = TEXTS
        .iter()
        .enumerate()
        .map(|(i, t)| PromptInput {
            id: format!("p{i}"),
            category: None,
            tokens: tok.encode(t, false).unwrap(),
            index: i as u64,
        })
        .collect();
    let opts = GenerateOptions {
        max_new_tokens: 1,
        ignore_eos: true,
        ..Default::default()
    };
    let mut sink = Collect::default();
    generate_all(model, &prompts, 2, &opts, &mut sink, &mut |_| Ok(())).unwrap();
    sink.records
        .into_iter()
        .filter(|r| r.token_type == moe_xray_trace::TokenType::Prompt)
        .map(|r| {
            let mut e = r.experts.clone();
            e.sort_unstable();
            (
                (r.prompt_id, r.position, r.layer),
                (e, r.weights.unwrap_or_default()),
            )
        })
        .collect()
}

fn write_pair(
    spec: &SynthSpec,
    quant: GgufQuant,
    dir: &Path,
) -> (std::path::PathBuf, std::path::PathBuf) {
    let st = dir.join("st");
    let mut s32 = spec.clone();
    s32.dtype = SynthDtype::F32;
    s32.shards = 1;
    synth::write_checkpoint(&s32, &st).unwrap();
    let g = dir.join(format!("m-{}.gguf", quant.name()));
    write_gguf(spec, quant, &g).unwrap();
    (st, g)
}

#[test]
fn every_family_f32_gguf_routes_like_its_safetensors_checkpoint() {
    for preset in [
        "tiny",
        "tiny-mixtral",
        "tiny-qwen2-moe",
        "tiny-qwen3-moe",
        "tiny-deepseek-v2",
        "tiny-deepseek-v3",
        "tiny-gpt-oss",
        "tiny-granitemoe",
    ] {
        let tmp = tempfile::tempdir().unwrap();
        let mut spec = SynthSpec::preset(preset).unwrap();
        spec.seed = 5;
        if let Some(y) = spec.yarn.as_mut() {
            // llama.cpp's metadata has one YaRN mscale (tiny-deepseek-v3 has mscale 1.0 and
            // mscale_all_dim 0.707, which GGUF cannot express: see `write_gguf`)
            y.mscale = y.mscale_all_dim;
        }
        let (st, g) = write_pair(&spec, GgufQuant::F32, tmp.path());
        let file = GgufFile::open(&g).unwrap();
        let (a, b) = (
            ModelConfig::from_dir(&st).unwrap(),
            ModelConfig::from_dir(&g).unwrap(),
        );
        assert_eq!(a.family, b.family, "{preset}");
        assert_eq!(a.moe, b.moe, "{preset}: MoE spec");
        assert_eq!(a.attn, b.attn, "{preset}: attention spec");
        assert_eq!(a.rope, b.rope, "{preset}: RoPE");
        assert_eq!(a.multipliers, b.multipliers, "{preset}");
        assert_eq!(
            (
                a.vocab_size,
                a.hidden_size,
                a.intermediate_size,
                a.num_hidden_layers
            ),
            (
                b.vocab_size,
                b.hidden_size,
                b.intermediate_size,
                b.num_hidden_layers
            ),
            "{preset}"
        );
        assert_eq!(file.tensor_type("token_embd.weight"), Some(GgmlDType::F32));
        // the tokenizer built from the metadata encodes as tokenizer.json does
        let tj = Tokenizer::from_dir(&st).unwrap();
        let tg = Tokenizer::from_dir(&g).unwrap();
        for t in TEXTS {
            assert_eq!(
                tj.encode(t, false).unwrap(),
                tg.encode(t, false).unwrap(),
                "{preset}: {t}"
            );
        }
        let (ra, rb) = (route(&st, &tj), route(&g, &tg));
        assert_eq!(ra.len(), rb.len(), "{preset}");
        let mut max_dw = 0f32;
        for (k, (ea, wa)) in &ra {
            let (eb, wb) = &rb[k];
            assert_eq!(ea, eb, "{preset}: {k:?}");
            for (x, y) in wa.iter().zip(wb) {
                max_dw = max_dw.max((x - y).abs());
            }
        }
        assert!(max_dw < 1e-5, "{preset}: max |Δweight| {max_dw}");
        eprintln!("{preset}: f32 GGUF = safetensors on {} (token, layer) sets, max |Δweight| {max_dw:.2e}", ra.len());
    }
}

/// An OLMoE shape whose rows are multiples of 256, so that the k-quants apply (no fallback).
fn k_quant_spec() -> SynthSpec {
    let mut s = SynthSpec::preset("tiny").unwrap();
    s.hidden_size = 256;
    s.intermediate_size = 256;
    s.num_experts = 16;
    s.top_k = 4;
    s.num_layers = 2;
    s.num_heads = 4;
    s.num_kv_heads = 4;
    s.seed = 11;
    s
}

#[test]
fn quantised_files_have_llama_cpps_mix_and_route_close_to_f32() {
    let tmp = tempfile::tempdir().unwrap();
    let spec = k_quant_spec();
    let mut st_path = None;
    let mut agreement = BTreeMap::new();
    for (quant, min) in [(GgufQuant::Q8_0, 0.97), (GgufQuant::Q4KM, 0.75)] {
        let d = tmp.path().join(quant.name());
        let (st, g) = write_pair(&spec, quant, &d);
        let f = GgufFile::open(&g).unwrap();
        let ty = |n: &str| f.tensor_type(n).unwrap_or_else(|| panic!("{n} missing"));
        // never quantised: norms, routers
        for n in [
            "output_norm.weight",
            "blk.0.attn_norm.weight",
            "blk.1.ffn_norm.weight",
            "blk.0.ffn_gate_inp.weight",
            "blk.0.attn_q_norm.weight",
        ] {
            assert_eq!(ty(n), GgmlDType::F32, "{quant:?} {n}");
        }
        match quant {
            GgufQuant::Q8_0 => {
                for n in [
                    "token_embd.weight",
                    "output.weight",
                    "blk.1.ffn_down_exps.weight",
                ] {
                    assert_eq!(ty(n), GgmlDType::Q8_0, "{n}");
                }
            }
            _ => {
                // llama-quantize Q4_K_M, 2 blocks: use_more_bits(i, 2) holds for i = 1 only
                for (n, want) in [
                    ("output.weight", GgmlDType::Q6K),
                    ("token_embd.weight", GgmlDType::Q4K),
                    ("blk.0.attn_q.weight", GgmlDType::Q4K),
                    ("blk.0.attn_v.weight", GgmlDType::Q4K),
                    ("blk.1.attn_v.weight", GgmlDType::Q6K),
                    ("blk.0.ffn_down_exps.weight", GgmlDType::Q4K),
                    ("blk.1.ffn_down_exps.weight", GgmlDType::Q6K),
                    ("blk.1.ffn_gate_exps.weight", GgmlDType::Q4K),
                    ("blk.1.ffn_up_exps.weight", GgmlDType::Q4K),
                ] {
                    assert_eq!(ty(n), want, "{n}");
                }
            }
        }
        let tok = Tokenizer::from_dir(&st).unwrap();
        let (ra, rb) = (route(&st, &tok), route(&g, &tok));
        let same = ra.iter().filter(|(k, (e, _))| &rb[*k].0 == e).count();
        let frac = same as f64 / ra.len() as f64;
        eprintln!(
            "{}: {same}/{} (token, layer) expert sets identical to the f32 safetensors model ({:.1} %)",
            quant.name(),
            ra.len(),
            100.0 * frac
        );
        assert!(frac >= min, "{quant:?}: agreement {frac}");
        agreement.insert(quant.name(), frac);
        st_path = Some(st);
    }
    assert!(agreement["q8_0"] >= agreement["q4_k_m"]);
    assert!(st_path.is_some());
}

#[test]
fn bytes_do_not_depend_on_the_thread_count_and_overwrite_is_guarded() {
    let tmp = tempfile::tempdir().unwrap();
    let spec = k_quant_spec();
    let write = |threads: usize, name: &str| -> Vec<u8> {
        // same file name (it is part of `general.name`), different directories
        let d = tmp.path().join(name);
        std::fs::create_dir_all(&d).unwrap();
        let p = d.join("m.gguf");
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap()
            .install(|| write_gguf(&spec, GgufQuant::Q4KM, &p).unwrap());
        std::fs::read(&p).unwrap()
    };
    let a = write(1, "t1");
    let b = write(2, "t2");
    if let Some(i) = a.iter().zip(&b).position(|(x, y)| x != y) {
        panic!(
            "Q4_K_M bytes differ between 1 and 2 threads at byte {i} of {}",
            a.len()
        );
    }
    assert_eq!(a.len(), b.len());
    // a file synth-model wrote may be replaced; any other file may not
    let p = tmp.path().join("t1").join("m.gguf");
    write_gguf(&spec, GgufQuant::Q8_0, &p).unwrap();
    let other = tmp.path().join("other.gguf");
    std::fs::write(&other, b"not a gguf").unwrap();
    let e = write_gguf(&spec, GgufQuant::Q8_0, &other)
        .unwrap_err()
        .to_string();
    assert!(e.contains("not a GGUF file written by synth-model"), "{e}");
    assert_eq!(std::fs::read(&other).unwrap(), b"not a gguf");
    let e = write_gguf(&spec, GgufQuant::Q8_0, &tmp.path().join("x.bin"))
        .unwrap_err()
        .to_string();
    assert!(e.contains(".gguf"), "{e}");
    // no temporary files left behind
    let names: Vec<String> = std::fs::read_dir(tmp.path().join("t1"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(names.iter().all(|n| !n.contains("partial")), "{names:?}");
}

#[test]
fn mapped_experts_compute_what_loaded_experts_compute() {
    use moe_xray_model::gguf::{load_model_with, ExpertResidency};
    let tmp = tempfile::tempdir().unwrap();
    let spec = k_quant_spec();
    let g = tmp.path().join("m.gguf");
    write_gguf(&spec, GgufQuant::Q4KM, &g).unwrap();
    let tok = Tokenizer::from_dir(&g).unwrap();
    let opts = LoadOptions::default();
    let loaded = load_model_with(&g, &opts, Some(ExpertResidency::Loaded)).unwrap();
    let mapped = load_model_with(&g, &opts, Some(ExpertResidency::Mapped)).unwrap();
    let (a, b) = (route_model(&loaded, &tok), route_model(&mapped, &tok));
    assert!(!a.is_empty());
    assert_eq!(a, b, "mapped experts route differently from loaded ones");
}
