//! `moe-xray run`, `trace`, `health` and `compare` on the tiny transformers-made checkpoint of
//! every supported family (fixtures/hf, f32 and bf16): the whole study is produced, the trace
//! manifest's `routing` block describes the checkpoint (MoE and dense layers, shared experts,
//! router, scores), records exist only at MoE layers, and the analysis and health label their
//! layers with decoder-layer indices. Bad checkpoints fail with one clear error and write nothing.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use moe_xray_test_support::fixture;
use serde_json::Value;

mod common;
use common::{moe_xray, s, stderr};

/// What the manifest must say about a fixture, written from fixtures/hf/README.md (not computed
/// by the code under test).
struct Expect {
    dir: &'static str,
    family: &'static str,
    moe: &'static [u32],
    dense: &'static [u32],
    shared: u64,
    router: &'static str,
    scores: &'static str,
    experts: usize,
    top_k: usize,
}

const OLMOE_WEIGHTS: &str = "full-softmax probability of each chosen expert (coefficients renormalised when norm_topk_prob)";
const APPLIED_WEIGHTS: &str = "coefficient applied to each routed expert's output";

#[rustfmt::skip]
const FIXTURES: &[Expect] = &[
    Expect { dir: "deepseekv2-tiny-greedy-f32", family: "deepseek_v2", moe: &[1, 2], dense: &[0], shared: 2, router: "deepseek_v2", scores: "softmax", experts: 12, top_k: 3 },
    Expect { dir: "deepseekv2-tiny-group-bf16", family: "deepseek_v2", moe: &[1, 2], dense: &[0], shared: 1, router: "deepseek_v2", scores: "softmax", experts: 16, top_k: 3 },
    Expect { dir: "deepseekv2-tiny-group-f32", family: "deepseek_v2", moe: &[1, 2], dense: &[0], shared: 1, router: "deepseek_v2", scores: "softmax", experts: 16, top_k: 3 },
    Expect { dir: "deepseekv3-tiny-bf16", family: "deepseek_v3", moe: &[1, 2], dense: &[0], shared: 1, router: "deepseek_v3", scores: "sigmoid", experts: 16, top_k: 4 },
    Expect { dir: "deepseekv3-tiny-f32", family: "deepseek_v3", moe: &[1, 2], dense: &[0], shared: 1, router: "deepseek_v3", scores: "sigmoid", experts: 16, top_k: 4 },
    Expect { dir: "gptoss-tiny-bf16", family: "gpt_oss", moe: &[0, 1, 2], dense: &[], shared: 0, router: "topk_softmax", scores: "softmax", experts: 12, top_k: 3 },
    Expect { dir: "gptoss-tiny-f32", family: "gpt_oss", moe: &[0, 1, 2], dense: &[], shared: 0, router: "topk_softmax", scores: "softmax", experts: 12, top_k: 3 },
    Expect { dir: "gptoss-tiny-mxfp4", family: "gpt_oss", moe: &[0, 1, 2], dense: &[], shared: 0, router: "topk_softmax", scores: "softmax", experts: 12, top_k: 3 },
    Expect { dir: "granitemoe-tiny-bf16", family: "granitemoe", moe: &[0, 1, 2], dense: &[], shared: 0, router: "topk_softmax", scores: "softmax", experts: 8, top_k: 2 },
    Expect { dir: "granitemoe-tiny-f32", family: "granitemoe", moe: &[0, 1, 2], dense: &[], shared: 0, router: "topk_softmax", scores: "softmax", experts: 8, top_k: 2 },
    Expect { dir: "mixtral-tiny-swa-bf16", family: "mixtral", moe: &[0, 1], dense: &[], shared: 0, router: "softmax_topk", scores: "softmax", experts: 8, top_k: 2 },
    Expect { dir: "mixtral-tiny-swa-f32", family: "mixtral", moe: &[0, 1], dense: &[], shared: 0, router: "softmax_topk", scores: "softmax", experts: 8, top_k: 2 },
    Expect { dir: "olmoe-tiny-bf16", family: "olmoe", moe: &[0, 1, 2, 3], dense: &[], shared: 0, router: "softmax_topk", scores: "softmax", experts: 12, top_k: 3 },
    Expect { dir: "olmoe-tiny-fused-f32", family: "olmoe", moe: &[0, 1], dense: &[], shared: 0, router: "softmax_topk", scores: "softmax", experts: 10, top_k: 3 },
    Expect { dir: "olmoe-tiny-gqa-f32", family: "olmoe", moe: &[0, 1, 2], dense: &[], shared: 0, router: "softmax_topk", scores: "softmax", experts: 16, top_k: 4 },
    Expect { dir: "olmoe-tiny-mha-f32", family: "olmoe", moe: &[0, 1], dense: &[], shared: 0, router: "softmax_topk", scores: "softmax", experts: 8, top_k: 2 },
    Expect { dir: "qwen2moe-tiny-bf16", family: "qwen2_moe", moe: &[0, 2], dense: &[1], shared: 1, router: "softmax_topk", scores: "softmax", experts: 12, top_k: 4 },
    Expect { dir: "qwen2moe-tiny-f32", family: "qwen2_moe", moe: &[0, 2], dense: &[1], shared: 1, router: "softmax_topk", scores: "softmax", experts: 12, top_k: 4 },
    Expect { dir: "qwen3moe-tiny-bf16", family: "qwen3_moe", moe: &[1, 2], dense: &[0], shared: 0, router: "softmax_topk", scores: "softmax", experts: 12, top_k: 3 },
    Expect { dir: "qwen3moe-tiny-f32", family: "qwen3_moe", moe: &[1, 2], dense: &[0], shared: 0, router: "softmax_topk", scores: "softmax", experts: 16, top_k: 4 },
];

fn hf() -> PathBuf {
    fixture("hf")
}

fn prompts() -> PathBuf {
    hf().join("prompts.jsonl")
}

fn read_json(p: &Path) -> Value {
    let text = std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn ok(o: &std::process::Output, what: &str) {
    assert!(o.status.success(), "{what} failed: {}", stderr(o));
}

/// `moe-xray run` on fixture `dir` into `out` with few tokens and repetitions.
fn run_study(dir: &str, out: &Path) {
    let model = hf().join(dir);
    let o = moe_xray(&[
        "run",
        "--model",
        s(&model),
        "--prompts",
        s(&prompts()),
        "--max-new-tokens",
        "3",
        "--reps",
        "20",
        "--out",
        s(out),
        "--quiet",
    ]);
    ok(&o, &format!("run on {dir}"));
}

fn as_u32s(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap_or_else(|| panic!("not an array: {v}"))
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

/// Every check of one fixture's study folder.
fn check_study(e: &Expect, out: &Path) {
    let ctx = e.dir;
    for f in [
        "results.json",
        "report.html",
        "health.json",
        "signatures.csv",
        "traces/trace.jsonl.gz",
        "traces/generations.jsonl",
        "traces/manifest.json",
    ] {
        assert!(out.join(f).exists(), "{ctx}: {f} missing");
    }
    // The manifest: decoder layers, routed experts, and the routing block.
    let m = read_json(&out.join("traces/manifest.json"));
    assert_eq!(
        m["num_layers"].as_u64().unwrap() as usize,
        e.moe.len() + e.dense.len(),
        "{ctx}"
    );
    assert_eq!(
        m["num_experts"].as_u64().unwrap() as usize,
        e.experts,
        "{ctx}"
    );
    assert_eq!(m["top_k"].as_u64().unwrap() as usize, e.top_k, "{ctx}");
    let r = &m["routing"];
    assert_eq!(r["family"], e.family, "{ctx}");
    assert_eq!(as_u32s(&r["moe_layers"]), e.moe, "{ctx}");
    assert_eq!(as_u32s(&r["dense_layers"]), e.dense, "{ctx}");
    assert_eq!(r["num_shared_experts"].as_u64().unwrap(), e.shared, "{ctx}");
    assert_eq!(r["router"], e.router, "{ctx}");
    assert_eq!(r["scores"], e.scores, "{ctx}");
    let weights = if e.family == "olmoe" {
        OLMOE_WEIGHTS
    } else {
        APPLIED_WEIGHTS
    };
    assert_eq!(r["weights"], weights, "{ctx}");

    // Records: only at MoE layers, every routed token once per MoE layer, k experts and weights,
    // the full score vector of the family.
    let moe: BTreeSet<u32> = e.moe.iter().copied().collect();
    let mut n_records = 0usize;
    let mut layers_seen = BTreeSet::new();
    let mut prob_sums = Vec::new();
    for item in moe_xray_trace::TraceReader::open(out.join("traces/trace.jsonl.gz")).unwrap() {
        let (_, item) = item.unwrap();
        let moe_xray_trace::TraceItem::Record(rec) = item else {
            panic!("{ctx}: unexpected trace item {item:?}");
        };
        assert!(
            moe.contains(&rec.layer),
            "{ctx}: record at layer {} (MoE layers {:?})",
            rec.layer,
            e.moe
        );
        layers_seen.insert(rec.layer);
        assert_eq!(rec.experts.len(), e.top_k, "{ctx}");
        assert_eq!(
            rec.weights.as_ref().map(Vec::len),
            Some(e.top_k),
            "{ctx}: weights"
        );
        assert!(
            rec.experts.iter().all(|&x| (x as usize) < e.experts),
            "{ctx}"
        );
        let probs = rec.probs.as_ref().expect("run records probs");
        assert_eq!(probs.len(), e.experts, "{ctx}");
        assert!(probs.iter().all(|&p| (0.0..=1.0).contains(&p)), "{ctx}");
        prob_sums.push(probs.iter().map(|&p| p as f64).sum::<f64>());
        n_records += 1;
    }
    assert_eq!(layers_seen, moe, "{ctx}: every MoE layer has records");
    if e.scores == "softmax" {
        assert!(
            prob_sums.iter().all(|s| (s - 1.0).abs() < 1e-2),
            "{ctx}: softmax scores sum to 1"
        );
    } else {
        // Independent sigmoid scores: their sums are not 1.
        assert!(
            prob_sums.iter().any(|s| (s - 1.0).abs() > 0.1),
            "{ctx}: sigmoid scores"
        );
    }
    let gens = std::fs::read_to_string(out.join("traces/generations.jsonl")).unwrap();
    let tokens: usize = gens
        .lines()
        .map(|l| {
            let g: Value = serde_json::from_str(l).unwrap();
            g["prompt_ids"].as_array().unwrap().len() + g["generated_ids"].as_array().unwrap().len()
        })
        .sum();
    assert_eq!(gens.lines().count(), 8, "{ctx}");
    // The last generated token is routed too (no --hf-generate-compat).
    assert_eq!(
        n_records,
        tokens * e.moe.len(),
        "{ctx}: records = tokens x MoE layers"
    );

    // The analysis: signatures over the MoE layers, labelled by decoder index.
    let res = read_json(&out.join("results.json"));
    assert_eq!(res["num_prompts"], 8, "{ctx}");
    assert_eq!(
        res["num_layers"].as_u64().unwrap() as usize,
        e.moe.len(),
        "{ctx}"
    );
    assert_eq!(
        res["num_experts"].as_u64().unwrap() as usize,
        e.experts,
        "{ctx}"
    );
    // `moe_layers` is written when signature layer l is not decoder layer l.
    if e.dense.is_empty() {
        assert!(
            res.get("moe_layers").is_none() || as_u32s(&res["moe_layers"]) == e.moe,
            "{ctx}"
        );
    } else {
        assert_eq!(as_u32s(&res["moe_layers"]), e.moe, "{ctx}");
    }
    let per_layer: Vec<u32> = res["per_layer"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["layer"].as_u64().unwrap() as u32)
        .collect();
    assert_eq!(per_layer, e.moe, "{ctx}: per_layer labels");
    let header = std::fs::read_to_string(out.join("signatures.csv")).unwrap();
    let header = header.lines().next().unwrap();
    assert_eq!(
        header.split(',').count(),
        2 + e.moe.len() * e.experts,
        "{ctx}: signatures.csv columns"
    );
    for &d in e.dense {
        assert!(
            !header.contains(&format!(",l{d}_e0,")),
            "{ctx}: dense layer {d} in signatures.csv"
        );
    }
    // Health: the MoE layers, by decoder index.
    let h = read_json(&out.join("health.json"));
    let hl: Vec<u32> = h["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["layer"].as_u64().unwrap() as u32)
        .collect();
    assert_eq!(hl, e.moe, "{ctx}: health layers");
    let report = std::fs::read_to_string(out.join("report.html")).unwrap();
    assert!(report.contains("<svg"), "{ctx}: report has figures");
}

#[test]
fn run_produces_the_study_for_every_family_fixture() {
    // Every model directory in fixtures/hf is listed above (a new fixture must be added).
    let mut dirs: Vec<String> = std::fs::read_dir(hf())
        .unwrap()
        .map(|d| d.unwrap().path())
        .filter(|p| p.join("config.json").exists())
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    dirs.sort();
    let listed: Vec<String> = FIXTURES.iter().map(|e| e.dir.to_string()).collect();
    assert_eq!(dirs, listed, "fixtures/hf and FIXTURES differ");
    let families: BTreeSet<&str> = FIXTURES.iter().map(|e| e.family).collect();
    assert_eq!(
        families.into_iter().collect::<Vec<_>>(),
        {
            let mut v = moe_xray_model::config::SUPPORTED_MODEL_TYPES.to_vec();
            v.sort();
            v
        },
        "a fixture for every supported family"
    );

    let tmp = tempfile::tempdir().unwrap();
    for e in FIXTURES {
        let out = tmp.path().join(e.dir);
        run_study(e.dir, &out);
        check_study(e, &out);
    }

    // health on two families' runs (one with a dense middle layer): tables by decoder layer, and
    // a dense layer is refused as the co-activation layer.
    let q2 = tmp.path().join("qwen2moe-tiny-f32/traces");
    let o = moe_xray(&["health", s(&q2), "--layer", "2"]);
    ok(&o, "health qwen2_moe");
    let table = String::from_utf8_lossy(&o.stdout);
    assert!(table.contains("routing health"), "{table}");
    let o = moe_xray(&["health", s(&q2), "--layer", "1"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("dense layer"), "{}", stderr(&o));
    let gpt = tmp.path().join("gptoss-tiny-f32/traces");
    let svg = tmp.path().join("gpt_svg");
    ok(
        &moe_xray(&[
            "health",
            s(&gpt),
            "--layer",
            "2",
            "--svg",
            s(&svg),
            "--quiet",
        ]),
        "health gpt_oss",
    );
    assert!(svg.join("coactivation_layer2.svg").exists());

    // compare: the same family in f32 and bf16 (same layers and experts) works ...
    let v3f = tmp.path().join("deepseekv3-tiny-f32/traces");
    let v3b = tmp.path().join("deepseekv3-tiny-bf16/traces");
    let o = moe_xray(&["compare", s(&v3f), s(&v3b), "--reps", "20", "--json"]);
    ok(&o, "compare deepseek_v3 f32 vs bf16");
    let c: Value = serde_json::from_slice(&o.stdout).unwrap();
    let cl: Vec<u32> = c["per_layer"]
        .as_array()
        .unwrap_or_else(|| panic!("compare JSON: {c}"))
        .iter()
        .map(|l| l["layer"].as_u64().unwrap() as u32)
        .collect();
    assert_eq!(cl, [1, 2], "compare labels the decoder layers");
    // ... and two runs that route at different decoder layers are refused.
    let q3b = tmp.path().join("qwen3moe-tiny-bf16/traces");
    let o = moe_xray(&["compare", s(&q2), s(&q3b), "--reps", "0"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("MoE layers"), "{}", stderr(&o));
}

/// An interrupted `trace` of a model with a dense middle layer (qwen2_moe) resumes to the same
/// bytes as an uninterrupted one: the last prompt's records cut mid-line and its generation line
/// lost, as a crash leaves them.
#[test]
fn trace_resume_with_a_dense_layer_is_byte_identical() {
    let tmp = tempfile::tempdir().unwrap();
    let model = hf().join("qwen2moe-tiny-f32");
    let prompts = prompts();
    let trace = |out: &Path, resume: bool| {
        let mut a = vec![
            "trace",
            "--model",
            s(&model),
            "--prompts",
            s(&prompts),
            "--out",
            s(out),
            "--max-new-tokens",
            "3",
            "--batch-size",
            "1",
            "--record-probs",
            "--quiet",
        ];
        if resume {
            a.push("--resume");
        }
        let o = moe_xray(&a);
        ok(&o, "trace");
    };
    let full = tmp.path().join("full");
    trace(&full, false);
    let cut = tmp.path().join("cut");
    std::fs::create_dir_all(&cut).unwrap();
    for f in ["trace.jsonl", "generations.jsonl", "manifest.json"] {
        std::fs::copy(full.join(f), cut.join(f)).unwrap();
    }
    // The last prompt's lines: cut in the middle of its first record.
    let text = std::fs::read_to_string(full.join("trace.jsonl")).unwrap();
    let last_id = {
        let last: Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
        last["prompt_id"].as_str().unwrap().to_string()
    };
    let start = text
        .find(&format!("\"prompt_id\":\"{last_id}\""))
        .map(|i| text[..i].rfind('\n').map_or(0, |n| n + 1))
        .unwrap();
    assert!(start > 0);
    std::fs::write(cut.join("trace.jsonl"), &text.as_bytes()[..start + 20]).unwrap();
    let gens = std::fs::read_to_string(full.join("generations.jsonl")).unwrap();
    let kept: String = gens
        .lines()
        .take(gens.lines().count() - 1)
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(cut.join("generations.jsonl"), kept).unwrap();
    trace(&cut, true);
    for f in ["trace.jsonl", "generations.jsonl", "manifest.json"] {
        assert_eq!(
            std::fs::read(cut.join(f)).unwrap(),
            std::fs::read(full.join(f)).unwrap(),
            "{f} differs after resume"
        );
    }
    // No record at the dense layer 1.
    assert!(!text.contains("\"layer\":1,"));
}

/// `bench model` on families with dense layers and shared experts: the shape printout names them,
/// and both passes (null and counts capture) make one routing decision per token and MoE layer.
#[test]
fn bench_model_counts_decisions_at_moe_layers_only() {
    for (dir, family, moe, dense, shared) in [
        ("qwen2moe-tiny-f32", "qwen2_moe", 2u64, vec![1u64], 1u64),
        ("deepseekv2-tiny-greedy-f32", "deepseek_v2", 2, vec![0], 2),
    ] {
        let model = hf().join(dir);
        let prompts = prompts();
        let scratch = tempfile::tempdir().unwrap();
        let args = [
            "bench",
            "model",
            "--model",
            s(&model),
            "--prompts",
            s(&prompts),
            "-n",
            "3",
            "--max-new-tokens",
            "2",
            "--capture",
            "counts",
            "--scratch",
            s(scratch.path()),
        ];
        let mut json = args.to_vec();
        json.push("--json");
        let o = moe_xray(&json);
        ok(&o, &format!("bench model {dir}"));
        let v: Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(v["family"], family);
        assert_eq!(v["num_layers"], 3);
        assert_eq!(v["num_moe_layers"], moe);
        let d: Vec<u64> = v["dense_layers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap())
            .collect();
        assert_eq!(d, dense);
        assert_eq!(v["num_shared_experts"], shared);
        let passes = v["passes"].as_array().unwrap();
        assert_eq!(passes.len(), 2);
        for p in passes {
            let tokens =
                p["prefill_tokens"].as_u64().unwrap() + p["decode_tokens"].as_u64().unwrap();
            assert!(tokens > 0);
            assert_eq!(
                p["routing_decisions"].as_u64().unwrap(),
                tokens * moe,
                "{dir}"
            );
        }
        // The table's header line names the family, the dense layers and the shared experts.
        let o = moe_xray(&args);
        ok(&o, &format!("bench model {dir} (table)"));
        let table = String::from_utf8_lossy(&o.stdout);
        let want = format!(
            "({family}, 3 layers ({moe} MoE, dense {dense:?}) x {} experts + {shared} shared,",
            v["num_experts"]
        );
        assert!(table.contains(&want), "{want} not in {table}");
    }
}

/// A copy of fixture `name` in a temporary directory, to be damaged.
fn copy_fixture(name: &str, tmp: &Path) -> PathBuf {
    let src = hf().join(name);
    let dst = tmp.join(name);
    std::fs::create_dir_all(&dst).unwrap();
    for f in std::fs::read_dir(&src).unwrap() {
        let p = f.unwrap().path();
        std::fs::copy(&p, dst.join(p.file_name().unwrap())).unwrap();
    }
    dst
}

/// `trace` and `run` on a damaged checkpoint: both fail, nothing is written, and the error
/// contains every one of `needles`.
fn refused(model: &Path, tmp: &Path, needles: &[&str]) {
    for cmd in ["trace", "run"] {
        let out = tmp.join(format!("out-{cmd}"));
        let o = moe_xray(&[
            cmd,
            "--model",
            s(model),
            "--prompts",
            s(&prompts()),
            "--out",
            s(&out),
            "--max-new-tokens",
            "2",
            "--quiet",
        ]);
        assert!(!o.status.success(), "{cmd} accepted a bad checkpoint");
        let err = stderr(&o);
        for n in needles {
            assert!(err.contains(n), "{cmd}: `{n}` not in: {err}");
        }
        assert!(!out.exists(), "{cmd} wrote {}", out.display());
    }
}

fn edit_config(dir: &Path, f: impl FnOnce(&mut serde_json::Map<String, Value>)) {
    let p = dir.join("config.json");
    let mut c = read_json(&p);
    f(c.as_object_mut().unwrap());
    std::fs::write(&p, serde_json::to_string_pretty(&c).unwrap()).unwrap();
}

#[test]
fn unsupported_model_type_lists_the_supported_ones() {
    let tmp = tempfile::tempdir().unwrap();
    let model = copy_fixture("mixtral-tiny-swa-f32", tmp.path());
    edit_config(&model, |c| {
        c.insert("model_type".into(), "llama".into());
    });
    refused(
        &model,
        tmp.path(),
        &[
            "\"llama\"",
            "olmoe",
            "mixtral",
            "qwen2_moe",
            "qwen3_moe",
            "deepseek_v2",
            "deepseek_v3",
            "gpt_oss",
            "granitemoe",
        ],
    );
}

#[test]
fn missing_config_field_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let model = copy_fixture("deepseekv3-tiny-f32", tmp.path());
    edit_config(&model, |c| {
        assert!(c.remove("kv_lora_rank").is_some());
    });
    refused(&model, tmp.path(), &["config.json", "`kv_lora_rank`"]);
}

#[test]
fn tensor_shape_mismatch_names_the_tensor_and_both_shapes() {
    let tmp = tempfile::tempdir().unwrap();
    let model = copy_fixture("qwen3moe-tiny-f32", tmp.path());
    // Transpose the recorded shape of the dense layer's gate projection in the safetensors header
    // (same byte size, so the file itself stays valid).
    let path = model.join("model.safetensors");
    let mut bytes = std::fs::read(&path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut header = String::from_utf8(bytes[8..8 + n].to_vec()).unwrap();
    let key = header
        .find("\"model.layers.0.mlp.gate_proj.weight\"")
        .expect("dense gate_proj in the header");
    let at = key + header[key..].find("\"shape\":[64,48]").unwrap();
    header.replace_range(at..at + 15, "\"shape\":[48,64]");
    bytes[8..8 + n].copy_from_slice(header.as_bytes());
    std::fs::write(&path, bytes).unwrap();
    refused(
        &model,
        tmp.path(),
        &[
            "model.layers.0.mlp.gate_proj.weight",
            "[64, 48]",
            "[48, 64]",
        ],
    );
}
