//! `moe-xray synth-model` for every supported family: `--family F` writes the family's tiny
//! checkpoint, `--routing` reports every MoE layer's expert use and load (every expert used,
//! max/mean load below 3), the same command writes the same bytes again, and `trace` runs on the
//! checkpoint with the family's routing block in its manifest.

use moe_xray_test_support::{dir_files, fixture};
use serde_json::Value;

mod common;
use common::{moe_xray, s, stderr};

const FAMILIES: [(&str, &[u64]); 8] = [
    ("olmoe", &[0, 1]),
    ("mixtral", &[0, 1]),
    ("qwen2_moe", &[0, 2]),
    ("qwen3_moe", &[0, 1]),
    ("deepseek_v2", &[1, 2]),
    ("deepseek_v3", &[1, 2]),
    ("gpt_oss", &[0, 1, 2]),
    ("granitemoe", &[0, 1]),
];

#[test]
fn synth_model_writes_routes_and_traces_every_family() {
    let tmp = tempfile::tempdir().unwrap();
    for (family, moe_layers) in FAMILIES {
        let a = tmp.path().join(format!("{family}-a"));
        let o = moe_xray(&[
            "synth-model",
            "--family",
            family,
            "--out",
            s(&a),
            "--routing",
            "--json",
        ]);
        assert!(o.status.success(), "{family}: {}", stderr(&o));
        let v: Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(v["model_type"], family);
        let routing = v["routing"].as_array().unwrap();
        let layers: Vec<u64> = routing
            .iter()
            .map(|r| r["layer"].as_u64().unwrap())
            .collect();
        assert_eq!(layers, moe_layers, "{family}");
        for r in routing {
            assert_eq!(r["experts_used"], r["num_experts"], "{family}: {r}");
            let load = r["max_over_mean_load"].as_f64().unwrap();
            assert!((1.0..3.0).contains(&load), "{family}: {r}");
        }
        // the same command, another directory: the same bytes
        let b = tmp.path().join(format!("{family}-b"));
        let o = moe_xray(&["synth-model", "--family", family, "--out", s(&b), "--quiet"]);
        assert!(o.status.success(), "{family}: {}", stderr(&o));
        assert_eq!(
            dir_files(&a),
            dir_files(&b),
            "{family}: bytes differ between runs"
        );
        // the pipeline runs it
        let t = tmp.path().join(format!("{family}-trace"));
        let o = moe_xray(&[
            "trace",
            "--model",
            s(&a),
            "--prompts",
            s(&fixture("hf").join("prompts.jsonl")),
            "--out",
            s(&t),
            "--max-new-tokens",
            "2",
            "--quiet",
        ]);
        assert!(o.status.success(), "{family}: {}", stderr(&o));
        let m: Value =
            serde_json::from_str(&std::fs::read_to_string(t.join("manifest.json")).unwrap())
                .unwrap();
        assert_eq!(m["routing"]["family"], family);
        assert_eq!(
            m["routing"]["moe_layers"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap())
                .collect::<Vec<_>>(),
            moe_layers,
            "{family}"
        );
    }
}

#[test]
fn synth_model_refuses_contradictory_family_and_preset() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("m");
    let o = moe_xray(&[
        "synth-model",
        "--family",
        "mixtral",
        "--preset",
        "deepseek-v2-lite",
        "--out",
        s(&out),
    ]);
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(
        e.contains("deepseek_v2") && e.contains("tiny-mixtral") && e.lines().count() <= 2,
        "{e}"
    );
    assert!(!out.exists());
}
