//! gpt-oss in its published MXFP4 form (`fixtures/hf/gptoss-tiny-mxfp4`, written by
//! `tools/hf_ref_gptoss_mxfp4.py`): experts as `*_blocks` / `*_scales` computed from the packed
//! bytes, the exact mode (`LoadOptions::exact`, `--exact`) against transformers on the
//! dequantised weights in f32, the fast mode's agreement with the exact mode, and bad input.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use common::Collect;
use moe_xray_model::config::{eos_token_ids, GenerationDefaults, ModelConfig};
use moe_xray_model::generate::{generate_all, GenerateOptions, PromptInput};
use moe_xray_model::model::{LoadOptions, MoeModel};
use moe_xray_test_support::fixture;
use serde_json::Value;

const NAME: &str = "gptoss-tiny-mxfp4";

fn dir() -> PathBuf {
    fixture("hf").join(NAME)
}

fn jsonl(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap()
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

struct Want {
    experts: Vec<u32>,
    weights: Vec<f64>,
    margin: f64,
}

fn expected() -> HashMap<(String, u32, u32), Want> {
    jsonl(&dir().join("expected_trace.jsonl"))
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
                    weights: v["weights"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|x| x.as_f64().unwrap())
                        .collect(),
                    margin: v["margin"].as_f64().unwrap(),
                },
            )
        })
        .collect()
}

/// (prompt id, prompt ids, generated ids) of transformers' greedy generations.
fn generations() -> Vec<(String, Vec<u32>, Vec<u32>)> {
    jsonl(&dir().join("expected_generations.jsonl"))
        .into_iter()
        .map(|v| {
            (
                v["prompt_id"].as_str().unwrap().to_string(),
                ids(&v["prompt_ids"]),
                ids(&v["generated_ids"]),
            )
        })
        .collect()
}

fn gguf() -> PathBuf {
    fixture("gguf").join(NAME).join("model-mxfp4.gguf")
}

fn load(exact: bool) -> MoeModel {
    load_from(&dir(), exact)
}

fn load_from(path: &Path, exact: bool) -> MoeModel {
    MoeModel::load(
        path,
        &LoadOptions {
            exact,
            ..Default::default()
        },
    )
    .unwrap()
}

fn teacher_forced(model: &MoeModel) -> HashMap<(String, u32, u32), Vec<u32>> {
    let mut sink = Collect::default();
    for (id, p, g) in generations() {
        let all: Vec<u32> = p.iter().chain(&g).copied().collect();
        common::forward_once(model, &id, &all, &mut sink);
    }
    sink.by_key()
        .into_iter()
        .map(|(k, r)| (k, r.experts))
        .collect()
}

#[test]
fn exact_mode_matches_transformers_on_the_dequantised_weights() {
    check_exact(&dir(), true, "safetensors");
}

/// The same checkpoint as GGUF with MXFP4 (type 39) experts and F32 other tensors: `--exact`
/// computes the experts in f32 from the exactly decoded weights.
#[test]
fn gguf_mxfp4_exact_mode_matches_transformers_on_the_dequantised_weights() {
    check_exact(&gguf(), true, "GGUF exact");
}

/// The GGUF's default mode computes the MXFP4 experts as llama.cpp does (Q8_0 activations,
/// `ggml_vec_dot_mxfp4_q8_0`): it agrees with the exact routing except near ties and after them.
#[test]
fn gguf_mxfp4_default_mode_agrees_with_exact_mode() {
    let model = load_from(&gguf(), false);
    assert_eq!(model.dtype(), candle_core::DType::F32);
    agreement(
        &model,
        "GGUF default (Q8_0 activations, as llama.cpp)",
        0.85,
    );
}

fn check_exact(path: &Path, exact: bool, what: &str) {
    let d = dir();
    let cfg = ModelConfig::from_dir(&d).unwrap();
    let gen_cfg = GenerationDefaults::from_dir(&d).unwrap();
    let model = load_from(path, exact);
    assert_eq!(model.dtype(), candle_core::DType::F32);
    let gens = generations();
    let want = expected();
    for batch in [1usize, 4] {
        let inputs: Vec<PromptInput> = gens
            .iter()
            .enumerate()
            .map(|(i, (id, p, _))| PromptInput {
                id: id.clone(),
                category: None,
                tokens: p.clone(),
                index: i as u64,
            })
            .collect();
        let opts = GenerateOptions {
            max_new_tokens: 12,
            eos_token_ids: eos_token_ids(&cfg, gen_cfg.as_ref()),
            ..Default::default()
        };
        let mut sink = Collect::default();
        let mut got = HashMap::new();
        generate_all(&model, &inputs, batch, &opts, &mut sink, &mut |g| {
            got.insert(g.prompt_id.clone(), g.generated.clone());
            Ok(())
        })
        .unwrap();
        for (id, _, g) in &gens {
            assert_eq!(&got[id], g, "{id}: generated ids (batch {batch})");
        }
        assert_eq!(sink.records.len(), want.len());
        let mut max_dw = 0f64;
        for r in &sink.records {
            let key = (r.prompt_id.clone(), r.position, r.layer);
            let e = &want[&key];
            // gpt-oss ranks by descending logit: the order is defined, compare it too.
            assert_eq!(r.experts, e.experts, "{key:?} (batch {batch})");
            for (a, b) in r.weights.as_ref().unwrap().iter().zip(&e.weights) {
                max_dw = max_dw.max((f64::from(*a) - b).abs());
            }
        }
        assert!(max_dw <= 1.5e-6, "applied weights differ by {max_dw:.3e}");
        eprintln!(
            "{NAME} {what} (batch {batch}): {n}/{n} identical expert sets, identical \
             generations, max |Δweight| {max_dw:.2e}",
            n = sink.records.len()
        );
    }
}

#[test]
fn fast_mode_agreement_with_exact_mode_is_reported() {
    let fast = load(false);
    assert_eq!(fast.dtype(), candle_core::DType::BF16, "stored dtype");
    // Measured on this fixture (docs/quantized.md): bf16 activations move the router logits, so
    // sets differ where the exact margin is small or after an earlier difference.
    agreement(&fast, "fast (bf16 activations, MXFP4 weights)", 0.85);
}

/// Teacher-forced expert sets of `fast` against the exact mode's: at least `min_share` identical,
/// and every first difference of a sequence a near tie of transformers' routing.
fn agreement(fast: &MoeModel, what: &str, min_share: f64) {
    let exact = teacher_forced(&load(true));
    let got = teacher_forced(fast);
    let want = expected();
    assert_eq!(got.len(), exact.len());
    let mut keys: Vec<_> = exact.keys().cloned().collect();
    keys.sort();
    let mut same = 0usize;
    let mut report = Vec::new();
    for k in &keys {
        let (mut a, mut b) = (got[k].clone(), exact[k].clone());
        a.sort();
        b.sort();
        if a == b {
            same += 1;
        } else {
            report.push((k.clone(), a, b, want[k].margin));
        }
    }
    let n = keys.len();
    eprintln!(
        "{NAME}: {what} vs exact (f32): {same}/{n} identical (token, layer) expert sets \
         ({:.2} %)",
        100.0 * same as f64 / n as f64
    );
    let differs: std::collections::HashSet<(String, u32, u32)> =
        report.iter().map(|r| r.0.clone()).collect();
    let mut first = 0usize;
    for ((p, pos, l), a, b, m) in &report {
        // An earlier difference of the same sequence (lower layer, or an earlier position).
        let after = (0..*l).any(|x| differs.contains(&(p.clone(), *pos, x)))
            || (0..*pos).any(|x| (0..64).any(|y| differs.contains(&(p.clone(), x, y))));
        if !after {
            first += 1;
            // A first difference is a near tie of the exact routing (6e-3 to 2.7e-2 measured).
            assert!(
                *m < 0.05,
                "{p} pos {pos} layer {l}: margin {m} is no near tie"
            );
        }
        eprintln!(
            "  {p} pos {pos} layer {l}: fast {a:?} exact {b:?}; transformers' logit margin {m:.3e}{}",
            if after { " (after an earlier difference)" } else { "" }
        );
    }
    eprintln!(
        "  {first} of the {} differences are the first of their sequence",
        report.len()
    );
    assert!(
        same as f64 >= min_share * n as f64,
        "{what}: only {same}/{n} identical"
    );
}

/// A copy of the fixture with `edit` applied to its tensors and `cfg_edit` to its config.json.
fn corrupted(
    edit: impl Fn(&mut Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)>),
    cfg_edit: impl Fn(&mut Value),
) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    for f in std::fs::read_dir(dir()).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, tmp.path().join(f.file_name().unwrap())).unwrap();
    }
    let bytes = std::fs::read(dir().join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut ts: Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)> = st
        .tensors()
        .into_iter()
        .map(|(n, v)| (n, v.dtype(), v.shape().to_vec(), v.data().to_vec()))
        .collect();
    ts.sort_by(|a, b| a.0.cmp(&b.0));
    edit(&mut ts);
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = ts
        .iter()
        .map(|(n, d, s, b)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, &tmp.path().join("model.safetensors")).unwrap();
    let cp = tmp.path().join("config.json");
    let mut cfg: Value = serde_json::from_str(&std::fs::read_to_string(&cp).unwrap()).unwrap();
    cfg_edit(&mut cfg);
    std::fs::write(&cp, serde_json::to_string(&cfg).unwrap()).unwrap();
    tmp
}

fn load_err(d: &Path) -> String {
    let e = MoeModel::load(d, &LoadOptions::default()).unwrap_err();
    format!("{e}")
}

const GU: &str = "model.layers.1.mlp.experts.gate_up_proj";

#[test]
fn bad_mxfp4_input_gives_one_clear_error() {
    // Blocks of the wrong shape (one row of blocks too few).
    let t = corrupted(
        |ts| {
            let b = ts
                .iter_mut()
                .find(|t| t.0 == format!("{GU}_blocks"))
                .unwrap();
            b.2[1] -= 1;
            let keep = b.2.iter().product::<usize>();
            b.3.truncate(keep);
        },
        |_| {},
    );
    let e = load_err(t.path());
    assert!(
        e.contains(&format!("{GU}_blocks")) && e.contains("model.safetensors"),
        "{e}"
    );
    // Scales that do not match the blocks.
    let t = corrupted(
        |ts| {
            let s = ts
                .iter_mut()
                .find(|t| t.0 == format!("{GU}_scales"))
                .unwrap();
            s.2[2] += 1;
            let (e, r) = (s.2[0], s.2[1]);
            s.3.resize(e * r * s.2[2], 127);
        },
        |_| {},
    );
    let e = load_err(t.path());
    assert!(e.contains(&format!("{GU}_scales")), "{e}");
    // Blocks stored as another dtype.
    let t = corrupted(
        |ts| {
            let b = ts
                .iter_mut()
                .find(|t| t.0 == format!("{GU}_blocks"))
                .unwrap();
            b.1 = safetensors::Dtype::I8;
        },
        |_| {},
    );
    let e = load_err(t.path());
    assert!(
        e.contains(&format!("{GU}_blocks")) && e.contains("I8"),
        "{e}"
    );
    // An unknown quantisation method.
    let t = corrupted(
        |_| {},
        |c| c["quantization_config"]["quant_method"] = "gptq".into(),
    );
    let e = load_err(t.path());
    assert!(
        e.contains("config.json") && e.contains("gptq") && e.contains("mxfp4"),
        "{e}"
    );
    // MXFP4 tensors without quantization_config.
    let t = corrupted(
        |_| {},
        |c| {
            c.as_object_mut().unwrap().remove("quantization_config");
        },
    );
    let e = load_err(t.path());
    assert!(
        e.contains("config.json") && e.contains("quantization_config"),
        "{e}"
    );
    // Truncated data.
    let t = corrupted(|_| {}, |_| {});
    let p = t.path().join("model.safetensors");
    let len = std::fs::metadata(&p).unwrap().len();
    let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
    f.set_len(len - 100).unwrap();
    let e = load_err(t.path());
    assert!(e.contains("model.safetensors"), "{e}");
    // Exact mode with a contradicting dtype.
    let e = MoeModel::load(
        &dir(),
        &LoadOptions {
            exact: true,
            dtype: Some(candle_core::DType::BF16),
            ..Default::default()
        },
    )
    .unwrap_err();
    assert!(format!("{e}").contains("exact"), "{e}");
}

/// The GGUF fixture with its header bytes edited by `edit` (given the bytes and the offset of
/// tensor `name`'s dims).
fn patched_gguf(name: &str, edit: impl Fn(&mut Vec<u8>, usize)) -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let mut bytes = std::fs::read(gguf()).unwrap();
    let at = bytes
        .windows(name.len())
        .position(|w| w == name.as_bytes())
        .unwrap();
    // name, n_dims (u32), dims (n × u64), type (u32)
    edit(&mut bytes, at + name.len() + 4);
    let p = tmp.path().join("bad.gguf");
    std::fs::write(&p, &bytes).unwrap();
    (tmp, p)
}

#[test]
fn bad_gguf_mxfp4_input_gives_one_clear_error() {
    let up = "blk.1.ffn_up_exps.weight";
    // Rows of 48 values: not whole MXFP4 blocks.
    let (_t, p) = patched_gguf(up, |b, d| b[d..d + 8].copy_from_slice(&48u64.to_le_bytes()));
    let e = load_err(&p);
    assert!(
        e.contains("bad.gguf") && e.contains(up) && e.contains("MXFP4") && e.contains("32"),
        "{e}"
    );
    // A shape that contradicts the metadata (16 rows instead of 32 per expert).
    let (_t, p) = patched_gguf(up, |b, d| {
        b[d + 8..d + 16].copy_from_slice(&16u64.to_le_bytes())
    });
    let e = load_err(&p);
    assert!(e.contains("bad.gguf") && e.contains(up), "{e}");
    // An unknown type in place of MXFP4.
    let (_t, p) = patched_gguf(up, |b, d| {
        b[d + 24..d + 28].copy_from_slice(&77u32.to_le_bytes())
    });
    let e = load_err(&p);
    assert!(e.contains("bad.gguf") && e.contains("77"), "{e}");
    // Truncated tensor data.
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("short.gguf");
    let bytes = std::fs::read(gguf()).unwrap();
    std::fs::write(&p, &bytes[..bytes.len() - 1000]).unwrap();
    let e = load_err(&p);
    assert!(e.contains("short.gguf") && e.contains("truncated"), "{e}");
}

/// Teacher-forced expert lists and weights of `model` on the prompts + generations of HF fixture
/// `hf`.
/// ((prompt, position, layer), experts, weights as bits).
type Routed = ((String, u32, u32), Vec<u32>, Vec<u32>);

fn route_bits(model: &MoeModel, hf: &str) -> Vec<Routed> {
    let mut sink = Collect::default();
    for v in jsonl(&fixture("hf").join(hf).join("expected_generations.jsonl")) {
        let all: Vec<u32> = ids(&v["prompt_ids"])
            .into_iter()
            .chain(ids(&v["generated_ids"]))
            .collect();
        common::forward_once(model, v["prompt_id"].as_str().unwrap(), &all, &mut sink);
    }
    let mut out: Vec<_> = sink
        .records
        .iter()
        .map(|r| {
            (
                (r.prompt_id.clone(), r.position, r.layer),
                r.experts.clone(),
                r.weights
                    .as_ref()
                    .unwrap()
                    .iter()
                    .map(|w| w.to_bits())
                    .collect(),
            )
        })
        .collect();
    out.sort();
    out
}

/// Exact mode on GGUF quants: a Q4_0 / Q8_0 file in exact mode routes bit for bit as an F32 GGUF
/// holding its dequantised weights (so the exact mode dequantises exactly); the fast mode's
/// agreement (candle's `QMatMul`, 8-bit activations) with it is printed.
#[test]
fn exact_mode_on_gguf_quants_uses_the_exactly_dequantised_weights() {
    use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
    for file in ["model-q8_0.gguf", "model-q4_0.gguf"] {
        let src = fixture("gguf").join("olmoe-tiny-mha").join(file);
        let tmp = tempfile::tempdir().unwrap();
        let deq = tmp.path().join("dequantised.gguf");
        let mut f = std::fs::File::open(&src).unwrap();
        let c = gguf_file::Content::read(&mut f).unwrap();
        let mut names: Vec<&String> = c.tensor_infos.keys().collect();
        names.sort();
        let ts: Vec<(String, QTensor)> = names
            .into_iter()
            .map(|n| {
                let t = c
                    .tensor(&mut f, n, &candle_core::Device::Cpu)
                    .unwrap()
                    .dequantize(&candle_core::Device::Cpu)
                    .unwrap();
                (n.clone(), QTensor::quantize(&t, GgmlDType::F32).unwrap())
            })
            .collect();
        let mut keys: Vec<&String> = c.metadata.keys().collect();
        keys.sort();
        let md: Vec<(&str, &gguf_file::Value)> =
            keys.iter().map(|k| (k.as_str(), &c.metadata[*k])).collect();
        let tv: Vec<(&str, &QTensor)> = ts.iter().map(|(n, t)| (n.as_str(), t)).collect();
        gguf_file::write(&mut std::fs::File::create(&deq).unwrap(), &md, &tv).unwrap();
        std::fs::copy(
            src.with_file_name("tokenizer.json"),
            tmp.path().join("tokenizer.json"),
        )
        .unwrap();
        let exact = route_bits(&load_from(&src, true), "olmoe-tiny-mha-f32");
        let reference = route_bits(&load_from(&deq, false), "olmoe-tiny-mha-f32");
        assert_eq!(
            exact, reference,
            "{file}: exact mode vs dequantised F32 file"
        );
        let fast = route_bits(&load_from(&src, false), "olmoe-tiny-mha-f32");
        let same = fast
            .iter()
            .zip(&exact)
            .filter(|(a, b)| {
                let (mut x, mut y) = (a.1.clone(), b.1.clone());
                x.sort();
                y.sort();
                x == y
            })
            .count();
        // The fast mode computes otherwise (8-bit activations): its weights differ.
        let bit_same = fast.iter().zip(&exact).filter(|(a, b)| a.2 == b.2).count();
        assert!(
            bit_same < exact.len(),
            "{file}: fast mode equals exact mode bit for bit"
        );
        eprintln!(
            "olmoe-tiny-mha/{file}: exact mode bit-identical to the dequantised F32 file ({} \
             records); fast mode (quantised kernel) {same}/{} identical expert sets ({:.2} %), {bit_same} \
             with bit-identical weights",
            exact.len(),
            exact.len(),
            100.0 * same as f64 / exact.len() as f64
        );
        assert!(same as f64 >= 0.85 * exact.len() as f64);
    }
}
