//! `moe-xray import vllm|sglang`: imported routing gives the same signatures, health loads and
//! run comparison as moe-xray's own traces of the same routing (fixtures/health/run_a, run_b;
//! engine-format fixtures from tools/make_import_fixtures.py), and bad input fails with exit 1,
//! one error naming the file and record, and nothing written.

use moe_xray_test_support::repo_root;
use std::path::Path;
use std::process::Output;
mod common;
use common::{moe_xray, s};

fn fx(p: &str) -> String {
    repo_root()
        .join("fixtures/import")
        .join(p)
        .display()
        .to_string()
}
fn health_run(r: &str) -> String {
    repo_root()
        .join("fixtures/health")
        .join(r)
        .display()
        .to_string()
}

fn ok(args: &[&str]) -> Output {
    let o = moe_xray(args);
    assert!(
        o.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    o
}

fn import_vllm_a(out: &Path) {
    ok(&[
        "import",
        "vllm",
        &fx("vllm/run_a.npz"),
        "--requests",
        &fx("vllm/requests_a.jsonl"),
        "--config",
        &fx("config.json"),
        "--out",
        s(out),
    ]);
}

fn signatures(trace: &str, out: &Path) -> Vec<u8> {
    ok(&[
        "analyze",
        trace,
        "--reps",
        "20",
        "--no-tsne",
        "--no-classifier",
        "--out",
        s(out),
    ]);
    std::fs::read(out.join("signatures.csv")).unwrap()
}

#[test]
fn imports_give_the_signatures_of_moe_xrays_own_trace() {
    let d = tempfile::tempdir().unwrap();
    let own = signatures(
        &format!("{}/trace.jsonl", health_run("run_a")),
        &d.path().join("an_own"),
    );
    import_vllm_a(&d.path().join("va"));
    ok(&[
        "import",
        "sglang",
        &fx("sglang/responses_a.jsonl"),
        "--config",
        &fx("config.json"),
        "--out",
        s(&d.path().join("sa")),
    ]);
    for run in ["va", "sa"] {
        let t = d.path().join(run).join("trace.jsonl");
        let got = signatures(s(&t), &d.path().join(format!("an_{run}")));
        // The import keeps the model's decoder-layer numbering (dense layer 0, MoE layers 1..=3:
        // columns l1_e* .. l3_e*); the source trace numbers its 3 layers from 0. Same values.
        let text = String::from_utf8(got).unwrap();
        let (head, body) = text.split_once('\n').unwrap();
        assert!(head.contains(",l1_e0,") && !head.contains("l0_e"), "{head}");
        let relabelled = head
            .replace("l1_e", "L0_e")
            .replace("l2_e", "L1_e")
            .replace("l3_e", "L2_e")
            .replace('L', "l");
        assert_eq!(
            format!("{relabelled}\n{body}").into_bytes(),
            own,
            "{run}: signatures.csv differs from the source trace's"
        );
    }
    // The prompt similarities too.
    let a = std::fs::read(d.path().join("an_own/prompt_similarity.csv")).unwrap();
    let b = std::fs::read(d.path().join("an_va/prompt_similarity.csv")).unwrap();
    assert_eq!(a, b);
}

/// Every `"layer": n` / `"*_layer": n` (n >= 1) of a JSON document becomes n - 1, and `moe_layers` lists are
/// dropped (imports of the fixture model, whose decoder layer 0 is dense, vs the 3-layer source).
fn shift_layers(v: &mut serde_json::Value) {
    match v {
        serde_json::Value::Object(m) => {
            m.remove("moe_layers");
            for (k, x) in m.iter_mut() {
                match x.as_u64() {
                    Some(n) if k == "layer" || k.ends_with("_layer") => {
                        *x = serde_json::json!(n - 1)
                    }
                    _ => shift_layers(x),
                }
            }
        }
        serde_json::Value::Array(a) => a.iter_mut().for_each(shift_layers),
        _ => {}
    }
}

fn json(p: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

#[test]
fn health_and_compare_run_on_imported_dirs() {
    let d = tempfile::tempdir().unwrap();
    let va = d.path().join("va");
    let vb = d.path().join("vb");
    import_vllm_a(&va);
    ok(&[
        "import",
        "vllm",
        &fx("vllm/responses_b.jsonl"),
        "--config",
        &fx("config.json"),
        "--out",
        s(&vb),
    ]);
    let (h1, h2) = (d.path().join("h1.json"), d.path().join("h2.json"));
    // Layer 0 of the imported model is dense: the co-activation layer must be an MoE layer.
    ok(&["health", s(&va), "--layer", "1", "--json", s(&h1)]);
    ok(&["health", &health_run("run_a"), "--json", s(&h2)]);
    let (h1, h2) = (json(&h1), json(&h2));
    // Loads and balance are the same; the import has no router distribution (no weights/probs).
    for key in ["load", "gini", "jain", "dead_experts", "entropy_nats"] {
        for l in 0..3 {
            assert_eq!(
                h1["layers"][l][key], h2["layers"][l][key],
                "layer {l} {key}"
            );
        }
    }
    assert_eq!(h1["available"]["router_distribution"], false);

    // compare: two imported deployments give the same comparison as the source runs.
    let (c1, c2) = (d.path().join("c1.json"), d.path().join("c2.json"));
    ok(&["compare", s(&va), s(&vb), "--reps", "30", "--json", s(&c1)]);
    ok(&[
        "compare",
        &health_run("run_a"),
        &health_run("run_b"),
        "--reps",
        "30",
        "--json",
        s(&c2),
    ]);
    let (mut c1, mut c2) = (json(&c1), json(&c2));
    for c in [&mut c1, &mut c2] {
        c["run_a"]["label"] = serde_json::Value::Null;
        c["run_b"]["label"] = serde_json::Value::Null;
    }
    // The imports label layers by decoder index (1..=3), the source runs from 0.
    shift_layers(&mut c1);
    assert_eq!(c1, c2);
}

#[test]
fn recorder_dumps_import_and_feed_health() {
    let d = tempfile::tempdir().unwrap();
    let h_src = d.path().join("h_src.json");
    ok(&["health", &health_run("run_a"), "--json", s(&h_src)]);
    let want = json(&h_src);
    for mode in ["per_token", "per_pass", "stat"] {
        let out = d.path().join(mode);
        ok(&[
            "import",
            "sglang",
            &fx(&format!("sglang/{mode}.pt")),
            "--config",
            &fx("config.json"),
            "--out",
            s(&out),
        ]);
        let h = d.path().join(format!("h_{mode}.json"));
        ok(&["health", s(&out), "--layer", "1", "--json", s(&h)]);
        let got = json(&h);
        for l in 0..3 {
            assert_eq!(
                got["layers"][l]["load"], want["layers"][l]["load"],
                "{mode} layer {l}"
            );
        }
    }
}

/// Runs an import that must fail with exit 1; checks the message and that `out` is absent.
fn fails(args: &[&str], out: &Path, needles: &[&str]) {
    let o = moe_xray(args);
    let e = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{args:?}: {e}");
    for n in needles {
        assert!(e.contains(n), "stderr `{e}` lacks `{n}`");
    }
    assert_eq!(e.lines().count(), 1, "one error line: {e}");
    assert!(!out.exists(), "{} was written", out.display());
}

#[test]
fn bad_input_fails_cleanly_and_writes_nothing() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("o");
    let cfg = fx("config.json");
    // A pickle that would call os.system.
    fails(
        &[
            "import",
            "sglang",
            &fx("sglang/evil.pt"),
            "--config",
            &cfg,
            "--out",
            s(&out),
        ],
        &out,
        &["evil.pt", "data.pkl", "refused", "posix.system"],
    );
    // A truncated .npy.
    let npy = std::fs::read(fx("vllm/npy/code-00.npy")).unwrap();
    let cut = d.path().join("code-00.npy");
    std::fs::write(&cut, &npy[..npy.len() - 3]).unwrap();
    fails(
        &[
            "import",
            "vllm",
            s(&cut),
            "--requests",
            &fx("vllm/requests_a.jsonl"),
            "--config",
            &cfg,
            "--out",
            s(&out),
        ],
        &out,
        &["code-00.npy", "truncated .npy data"],
    );
    // A config that disagrees with the arrays' shape (top-k 3).
    let cfg3 = d.path().join("config.json");
    std::fs::write(
        &cfg3,
        r#"{"num_hidden_layers":4,"first_k_dense_replace":1,"n_routed_experts":8,"num_experts_per_tok":3}"#,
    )
    .unwrap();
    fails(
        &[
            "import",
            "vllm",
            &fx("vllm/responses_b.jsonl"),
            "--config",
            s(&cfg3),
            "--out",
            s(&out),
        ],
        &out,
        &[
            "responses_b.jsonl",
            "line 1",
            "wrong shape for the stated config",
            "num_experts_per_tok = 3",
        ],
    );
    // Expert ids out of range for a smaller stated expert count.
    let cfg6 = d.path().join("cfg6.json");
    std::fs::write(
        &cfg6,
        r#"{"num_hidden_layers":4,"first_k_dense_replace":1,"n_routed_experts":6,"num_experts_per_tok":2}"#,
    )
    .unwrap();
    fails(
        &[
            "import",
            "sglang",
            &fx("sglang/responses_a.jsonl"),
            "--config",
            s(&cfg6),
            "--out",
            s(&out),
        ],
        &out,
        &[
            "responses_a.jsonl",
            "line 1",
            "out of range (num_experts = 6)",
        ],
    );
    // SGLang base64 of the wrong shape for the stated layers.
    fails(
        &[
            "import",
            "sglang",
            &fx("sglang/responses_a.jsonl"),
            "--num-experts",
            "8",
            "--num-layers",
            "3",
            "--top-k",
            "2",
            "--out",
            s(&out),
        ],
        &out,
        &["responses_a.jsonl", "line 1", "base64 decodes to"],
    );
    // Usage errors.
    fails(
        &[
            "import",
            "vllm",
            &fx("vllm/run_a.npz"),
            "--config",
            &cfg,
            "--out",
            s(&out),
        ],
        &out,
        &["--requests"],
    );
    fails(
        &[
            "import",
            "vllm",
            &fx("sglang/stat.pt"),
            "--config",
            &cfg,
            "--out",
            s(&out),
        ],
        &out,
        &["import sglang"],
    );
    // A non-empty output directory is left alone.
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("x"), "keep").unwrap();
    let o = moe_xray(&[
        "import",
        "sglang",
        &fx("sglang/responses_a.jsonl"),
        "--config",
        &cfg,
        "--out",
        s(&out),
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(std::fs::read_dir(&out).unwrap().count(), 1);
}

fn hf_fx(m: &str, f: &str) -> String {
    repo_root()
        .join("fixtures/import/hf")
        .join(m)
        .join(f)
        .display()
        .to_string()
}

#[test]
fn import_hf_router_logits_feed_health_and_compare() {
    let d = tempfile::tempdir().unwrap();
    let m = "deepseekv3-tiny-f32";
    let cfg_dir = repo_root().join("fixtures/hf").join(m);
    let cfg = cfg_dir.join("config.json");
    let mut dirs = Vec::new();
    for f in ["router_logits.safetensors", "router_logits.pt"] {
        let out = d.path().join(f);
        ok(&[
            "import",
            "hf",
            &hf_fx(m, f),
            "--config",
            s(&cfg),
            "--requests",
            &hf_fx(m, "requests.jsonl"),
            "--out",
            s(&out),
        ]);
        // The routing block is the one moe-xray's own trace of this checkpoint writes.
        let man = json(&out.join("manifest.json"));
        let own = moe_xray_pipeline::trace::routing_layout(
            &moe_xray_model::config::ModelConfig::from_dir(&cfg_dir).unwrap(),
        );
        assert_eq!(man["routing"], serde_json::to_value(&own).unwrap());
        assert_eq!(man["num_layers"], 3);
        let h = d.path().join(format!("h_{f}.json"));
        ok(&["health", s(&out), "--layer", "1", "--json", s(&h)]);
        let h = json(&h);
        let layers: Vec<u64> = h["layers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l["layer"].as_u64().unwrap())
            .collect();
        assert_eq!(layers, vec![1, 2], "MoE layers labelled by decoder index");
        dirs.push(out);
    }
    // Two imports of the same routing: compare finds no drift.
    let c = d.path().join("c.json");
    ok(&[
        "compare",
        s(&dirs[0]),
        s(&dirs[1]),
        "--reps",
        "20",
        "--json",
        s(&c),
    ]);
    let c = json(&c);
    assert_eq!(c["mean_js_bits"].as_f64(), Some(0.0), "{c}");
    // Bad input: no config (the routing rule is the family's), logits of another model.
    let bad = d.path().join("bad");
    let st = hf_fx(m, "router_logits.safetensors");
    fails(
        &["import", "hf", &st, "--num-experts", "16", "--out", s(&bad)],
        &bad,
        &["needs --config"],
    );
    let other = repo_root().join("fixtures/hf/gptoss-tiny-f32/config.json");
    fails(
        &["import", "hf", &st, "--config", s(&other), "--out", s(&bad)],
        &bad,
        &[
            "router_logits.safetensors",
            "2 layers of router logits",
            "3 MoE layers",
        ],
    );
}

#[test]
fn compressed_jsonl_through_the_cli() {
    // fixtures/import/vllm/responses_b.jsonl.gz: the same responses, gzip (make_import_fixtures.py).
    let d = tempfile::tempdir().unwrap();
    let mut traces = Vec::new();
    for (i, p) in ["vllm/responses_b.jsonl", "vllm/responses_b.jsonl.gz"]
        .iter()
        .enumerate()
    {
        let out = d.path().join(format!("o{i}"));
        ok(&[
            "import",
            "vllm",
            &fx(p),
            "--config",
            &fx("config.json"),
            "--out",
            s(&out),
        ]);
        traces.push(std::fs::read(out.join("trace.jsonl")).unwrap());
    }
    assert_eq!(traces[0], traces[1]);
    // gzip content under a plain name: refused, nothing written.
    let hidden = d.path().join("hidden.jsonl");
    std::fs::copy(fx("vllm/responses_b.jsonl.gz"), &hidden).unwrap();
    fails(
        &[
            "import",
            "vllm",
            s(&hidden),
            "--config",
            &fx("config.json"),
            "--out",
            s(&d.path().join("bad")),
        ],
        &d.path().join("bad"),
        &["hidden.jsonl", "content is gzip"],
    );
}
