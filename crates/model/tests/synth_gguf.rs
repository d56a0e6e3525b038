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

// ---------------------------------------------------------------------------------------------
// `--quant mxfp4`: gpt-oss with ggml MXFP4 experts, the conversion of the HF MXFP4 checkpoint

fn mxfp4_spec() -> SynthSpec {
    let mut s = SynthSpec::preset("tiny-gpt-oss").unwrap();
    s.seed = 5;
    s.dtype = SynthDtype::Bf16;
    s.mxfp4_experts = true;
    s
}

/// name -> (shape, bytes) of a one-file safetensors checkpoint.
fn hf_tensors(dir: &Path) -> BTreeMap<String, (Vec<usize>, Vec<u8>)> {
    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(n, v)| (n, (v.shape().to_vec(), v.data().to_vec())))
        .collect()
}

fn bf16_values(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(2)
        .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
        .collect()
}

#[test]
fn hf_to_ggml_nibbles_moves_every_code_to_ggmls_place() {
    use moe_xray_kernels::mxfp4::{MxLayout, MxMatrix};
    use moe_xray_model::mxfp4::hf_to_ggml_nibbles;
    // every code at every place: byte j = (j, 15 - j) and a few shifted patterns
    for shift in 0..4u8 {
        let mut q = [0u8; 16];
        for (j, b) in q.iter_mut().enumerate() {
            let j = j as u8;
            *b = ((j + shift) & 15) | ((15 - j).wrapping_add(3 * shift) & 15) << 4;
        }
        let g = hf_to_ggml_nibbles(&q);
        for v in 0..32 {
            let hf = (q[v / 2] >> (4 * (v % 2))) & 15;
            let gg = (g[v % 16] >> (4 * (v / 16))) & 15;
            assert_eq!(hf, gg, "value {v}");
        }
        // and the kernel's two decoders agree on the values
        let scales = [120u8 + shift];
        let mut data = vec![scales[0]];
        data.extend_from_slice(&g);
        let a = MxMatrix::new(
            MxLayout::Hf {
                blocks: &q,
                scales: &scales,
            },
            1,
            32,
        )
        .unwrap();
        let b = MxMatrix::new(MxLayout::Ggml { data: &data }, 1, 32).unwrap();
        let (mut ra, mut rb) = ([0f32; 32], [0f32; 32]);
        a.dequantize_row(0, &mut ra);
        b.dequantize_row(0, &mut rb);
        assert_eq!(ra.map(f32::to_bits), rb.map(f32::to_bits));
    }
}

#[test]
fn gpt_oss_mxfp4_gguf_is_the_conversion_of_the_hf_mxfp4_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let spec = mxfp4_spec();
    let hf = tmp.path().join("hf");
    synth::write_checkpoint(&spec, &hf).unwrap();
    let g = tmp.path().join("m.gguf");
    let summary = write_gguf(&spec, GgufQuant::Mxfp4, &g).unwrap();
    assert_eq!(summary.tensor_types["MXFP4"], 3 * spec.num_layers);
    let f = GgufFile::open(&g).unwrap();
    let ht = hf_tensors(&hf);
    let (e, i, h) = (spec.num_experts, spec.intermediate_size, spec.hidden_size);
    // types: the converter's rule with the bf16 checkpoint's output type
    for l in 0..spec.num_layers {
        for p in ["gate", "up", "down"] {
            assert!(
                f.is_mxfp4(&format!("blk.{l}.ffn_{p}_exps.weight")),
                "{l} {p}"
            );
            assert_eq!(
                f.tensor_type(&format!("blk.{l}.ffn_{p}_exps.bias")),
                Some(GgmlDType::F32)
            );
        }
        for (n, want) in [
            ("attn_q.weight", GgmlDType::BF16),
            ("attn_output.weight", GgmlDType::BF16),
            ("attn_q.bias", GgmlDType::F32),
            ("attn_sinks.weight", GgmlDType::F32),
            ("attn_norm.weight", GgmlDType::F32),
            ("ffn_gate_inp.weight", GgmlDType::F32),
            ("ffn_gate_inp.bias", GgmlDType::F32),
        ] {
            assert_eq!(
                f.tensor_type(&format!("blk.{l}.{n}")),
                Some(want),
                "{l} {n}"
            );
        }
    }
    for (n, want) in [
        ("token_embd.weight", GgmlDType::BF16),
        ("output.weight", GgmlDType::BF16),
        ("output_norm.weight", GgmlDType::F32),
    ] {
        assert_eq!(f.tensor_type(n), Some(want), "{n}");
    }
    // the converter's order: the repacked experts first (per layer down, gate, up), then the rest
    // in HF name order (lm_head, embed_tokens, layers..., norm); a name's first occurrence in the
    // file is its tensor info
    let bytes = std::fs::read(&g).unwrap();
    let pos = |n: &str| {
        bytes
            .windows(n.len())
            .position(|w| w == n.as_bytes())
            .unwrap_or_else(|| panic!("{n} not in the file"))
    };
    let mut order: Vec<String> = Vec::new();
    for l in 0..spec.num_layers {
        for p in ["down", "gate", "up"] {
            order.push(format!("blk.{l}.ffn_{p}_exps.weight"));
        }
    }
    for n in [
        "output.weight",
        "token_embd.weight",
        "blk.0.attn_norm.weight",
        "blk.0.ffn_down_exps.bias",
        "blk.0.ffn_gate_exps.bias",
        "blk.0.ffn_up_exps.bias",
        "blk.0.ffn_gate_inp.bias",
        "blk.2.attn_v.weight",
        "output_norm.weight",
    ] {
        order.push(n.to_string());
    }
    for w in order.windows(2) {
        assert!(pos(&w[0]) < pos(&w[1]), "{} is not before {}", w[0], w[1]);
    }
    // the experts: the HF checkpoint's scale and E2M1 code of every value, in ggml's places
    // (HF: byte v/2 of a 16-byte block, low nibble for even v; ggml: byte 1 + v%16 of a 17-byte
    // block, low nibble for v < 16)
    let nib = |b: u8, high: bool| if high { b >> 4 } else { b & 15 };
    for l in 0..spec.num_layers {
        let hfb = |n: &str| &ht[&format!("model.layers.{l}.mlp.experts.{n}")].1;
        for (p, rows, k) in [("gate", i, h), ("up", i, h), ("down", h, i)] {
            let data = f
                .mxfp4_bytes(&format!("blk.{l}.ffn_{p}_exps.weight"))
                .unwrap();
            let data = data.bytes();
            let (blocks, scales) = if p == "down" {
                (hfb("down_proj_blocks"), hfb("down_proj_scales"))
            } else {
                (hfb("gate_up_proj_blocks"), hfb("gate_up_proj_scales"))
            };
            let nb = k / 32;
            assert_eq!(data.len(), e * rows * nb * 17);
            for x in 0..e {
                for r in 0..rows {
                    // HF row: gate = even rows of gate_up, up = odd rows
                    let hr = match p {
                        "gate" => x * 2 * i + 2 * r,
                        "up" => x * 2 * i + 2 * r + 1,
                        _ => x * h + r,
                    };
                    for b in 0..nb {
                        let gb = &data[((x * rows + r) * nb + b) * 17..][..17];
                        let hb = &blocks[(hr * nb + b) * 16..][..16];
                        assert_eq!(gb[0], scales[hr * nb + b], "{l} {p} {x} {r} {b}");
                        for v in 0..32 {
                            assert_eq!(
                                nib(gb[1 + v % 16], v >= 16),
                                nib(hb[v / 2], v % 2 == 1),
                                "layer {l} {p} expert {x} row {r} block {b} value {v}"
                            );
                        }
                    }
                }
            }
        }
    }
    // other tensors: the HF checkpoint's values (bf16), also where the file widens them to F32
    let deq = |n: &str| -> Vec<f32> {
        f.dequantized(n)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    };
    let hv = |n: &str| bf16_values(&ht[n].1);
    assert_eq!(deq("token_embd.weight"), hv("model.embed_tokens.weight"));
    assert_eq!(
        deq("blk.1.ffn_gate_inp.weight"),
        hv("model.layers.1.mlp.router.weight")
    );
    assert_eq!(
        deq("blk.2.attn_sinks.weight"),
        hv("model.layers.2.self_attn.sinks")
    );
    let gub = hv("model.layers.0.mlp.experts.gate_up_proj_bias");
    assert_eq!(
        deq("blk.0.ffn_up_exps.bias"),
        gub.iter().skip(1).step_by(2).copied().collect::<Vec<_>>()
    );

    // moe-xray routes both alike in exact mode (f32): the same expert sets and bit-identical
    // weights. At the HF checkpoint's bf16 the GGUF's experts run as llama.cpp runs them (Q8_0
    // activations, `ggml_vec_dot_mxfp4_q8_0`) and the HF checkpoint's on bf16 activations with
    // exactly decoded weights: the expert sets agree except near ties and after them.
    let tok = Tokenizer::from_dir(&hf).unwrap();
    for (what, opts) in [
        (
            "exact",
            LoadOptions {
                exact: true,
                ..Default::default()
            },
        ),
        (
            "bf16",
            LoadOptions {
                dtype: Some(candle_core::DType::BF16),
                ..Default::default()
            },
        ),
    ] {
        let a = route_model(&MoeModel::load(&hf, &opts).unwrap(), &tok);
        let b = route_model(&MoeModel::load(&g, &opts).unwrap(), &tok);
        assert_eq!(a.len(), b.len());
        assert!(!a.is_empty());
        let same = a.iter().filter(|(k, v)| &b[*k] == *v).count();
        let sets = a.iter().filter(|(k, v)| b[*k].0 == v.0).count();
        eprintln!(
            "{what}: GGUF MXFP4 = HF MXFP4 on {same}/{n} (token, layer) expert sets and weights, \
             {sets}/{n} expert sets",
            n = a.len()
        );
        if what == "exact" {
            assert_eq!(
                a, b,
                "{what}: the GGUF routes differently from the HF checkpoint"
            );
        } else {
            assert!(
                sets as f64 >= 0.9 * a.len() as f64,
                "{what}: only {sets}/{} expert sets agree",
                a.len()
            );
        }
    }
}

#[test]
fn mxfp4_gguf_bytes_are_reproducible_and_bad_specs_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let spec = mxfp4_spec();
    let write = |threads: usize, name: &str| -> Vec<u8> {
        let d = tmp.path().join(name);
        std::fs::create_dir_all(&d).unwrap();
        let p = d.join("m.gguf");
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap()
            .install(|| write_gguf(&spec, GgufQuant::Mxfp4, &p).unwrap());
        std::fs::read(&p).unwrap()
    };
    let a = write(1, "t1");
    let b = write(2, "t2");
    assert!(a == b, "MXFP4 GGUF bytes differ between 1 and 2 threads");
    // a spec without the mxfp4 flag writes the same file (the flag is implied by --quant mxfp4)
    let mut plain = spec.clone();
    plain.mxfp4_experts = false;
    let p = tmp.path().join("plain").join("m.gguf");
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    write_gguf(&plain, GgufQuant::Mxfp4, &p).unwrap();
    assert!(std::fs::read(&p).unwrap() == a);
    // another seed, other bytes
    let mut other = spec.clone();
    other.seed = 6;
    write_gguf(&other, GgufQuant::Mxfp4, &p).unwrap();
    assert!(std::fs::read(&p).unwrap() != a);
    // an f32 checkpoint: the unquantised 2-D tensors F32 (as `--outtype f32`)
    let mut f32spec = spec.clone();
    f32spec.dtype = SynthDtype::F32;
    let q = tmp.path().join("f32.gguf");
    write_gguf(&f32spec, GgufQuant::Mxfp4, &q).unwrap();
    let f = GgufFile::open(&q).unwrap();
    assert_eq!(f.tensor_type("blk.0.attn_q.weight"), Some(GgmlDType::F32));
    assert!(f.is_mxfp4("blk.0.ffn_down_exps.weight"));
    // refused: another family, sizes that are not multiples of 32, MXFP4 experts as another type
    let bad = tmp.path().join("bad.gguf");
    let olmoe = SynthSpec::preset("tiny").unwrap();
    let e = write_gguf(&olmoe, GgufQuant::Mxfp4, &bad)
        .unwrap_err()
        .to_string();
    assert!(e.contains("olmoe") && e.contains("mxfp4"), "{e}");
    let mut odd = spec.clone();
    odd.hidden_size = 48;
    let e = write_gguf(&odd, GgufQuant::Mxfp4, &bad)
        .unwrap_err()
        .to_string();
    assert!(e.contains("multiple of 32"), "{e}");
    let e = write_gguf(&spec, GgufQuant::Q8_0, &bad)
        .unwrap_err()
        .to_string();
    assert!(e.contains("--quant mxfp4"), "{e}");
    assert!(!bad.exists());
}
