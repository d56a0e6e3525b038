//! Importers against the committed fixtures of tools/make_import_fixtures.py: the imported
//! routing must equal moe-xray's own trace of the same routing (fixtures/health/run_a, run_b),
//! and every kind of bad input must fail with one error naming the file and record, writing
//! nothing.

use moe_xray_test_support::repo_root;
use std::path::{Path, PathBuf};

use moe_xray_import::{sglang, vllm, ModelShape, Staged};
use moe_xray_trace::{aggregate_paths, AggregateOptions, Manifest, TokenType};
use serde_json::json;

fn fx(p: &str) -> PathBuf {
    repo_root().join("fixtures/import").join(p)
}
fn shape() -> ModelShape {
    ModelShape::from_config(&fx("config.json")).unwrap()
}

fn opts() -> AggregateOptions {
    AggregateOptions::default()
}

/// (prompt id, category, counts) of a trace, in first-appearance order.
fn table(trace: &Path) -> Vec<(String, Option<String>, Vec<f64>)> {
    let t = aggregate_paths(&[trace.to_path_buf()], &opts()).unwrap();
    t.prompts
        .into_iter()
        .map(|p| (p.prompt_id, p.category, p.counts))
        .collect()
}

fn pooled(trace: &Path) -> Vec<f64> {
    let t = table(trace);
    let mut out = vec![0.0; t[0].2.len()];
    for (_, _, c) in t {
        for (o, x) in out.iter_mut().zip(c) {
            *o += x;
        }
    }
    out
}

fn run(
    out: &Path,
    f: impl FnOnce(&mut Staged) -> moe_xray_import::Result<()>,
) -> moe_xray_import::Result<PathBuf> {
    let mut st = Staged::create(out, shape())?;
    f(&mut st)?;
    Ok(st.finish("test", json!({}))?.0)
}

fn source(run: &str) -> PathBuf {
    repo_root()
        .join("fixtures/health")
        .join(run)
        .join("trace.jsonl")
}

#[test]
fn vllm_npz_gives_the_source_trace_counts() {
    let d = tempfile::tempdir().unwrap();
    let out = run(&d.path().join("a"), |s| {
        vllm::import_arrays(s, &[fx("vllm/run_a.npz")], &fx("vllm/requests_a.jsonl"))
    })
    .unwrap();
    assert_eq!(table(&out.join("trace.jsonl")), table(&source("run_a")));
    // Deterministic: a second import writes the same bytes.
    let again = run(&d.path().join("a2"), |s| {
        vllm::import_arrays(s, &[fx("vllm/run_a.npz")], &fx("vllm/requests_a.jsonl"))
    })
    .unwrap();
    for f in ["trace.jsonl", "manifest.json"] {
        assert_eq!(
            std::fs::read(out.join(f)).unwrap(),
            std::fs::read(again.join(f)).unwrap(),
            "{f}"
        );
    }
    let m = Manifest::read(out.join("manifest.json")).unwrap();
    // Decoder layers, as in moe-xray's own traces: the routing block names the dense layer 0 and
    // the records carry decoder-layer indices 1..=3.
    assert_eq!((m.num_layers, m.num_experts, m.top_k), (4, 8, 2));
    let r = m.routing.as_ref().unwrap();
    assert_eq!(
        (r.moe_layers.as_slice(), r.dense_layers.as_slice()),
        (&[1, 2, 3][..], &[0][..])
    );
    assert_eq!(
        (r.family.as_str(), r.router.as_str()),
        ("deepseek_v2", "deepseek_v2")
    );
    let layers: std::collections::BTreeSet<u64> = std::fs::read_to_string(out.join("trace.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["layer"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert_eq!(layers.into_iter().collect::<Vec<_>>(), vec![1, 2, 3]);
    assert_eq!(m.model, "fixture-moe-4l");
    assert_eq!(m.extra["import"]["moe_layers_of_source"], json!([1, 2, 3]));
    // Same token types and positions as the source: compare per token type too.
    for tt in [TokenType::Prompt, TokenType::Generation] {
        let o = AggregateOptions {
            token_types: vec![tt],
            ..opts()
        };
        let a = aggregate_paths(&[out.join("trace.jsonl")], &o).unwrap();
        let b = aggregate_paths(&[source("run_a")], &o).unwrap();
        assert_eq!(a.prompts, b.prompts, "{tt:?}");
    }
}

#[test]
fn vllm_npy_and_responses_give_the_source_trace_counts() {
    let d = tempfile::tempdir().unwrap();
    let out = run(&d.path().join("b"), |s| {
        vllm::import_jsonl(s, &[fx("vllm/responses_b.jsonl")])
    })
    .unwrap();
    assert_eq!(table(&out.join("trace.jsonl")), table(&source("run_b")));
    let out = run(&d.path().join("one"), |s| {
        vllm::import_arrays(
            s,
            &[fx("vllm/npy/code-00.npy")],
            &fx("vllm/requests_a.jsonl"),
        )
    })
    .unwrap();
    let t = table(&out.join("trace.jsonl"));
    assert_eq!(t.len(), 1);
    assert_eq!(t[0], table(&source("run_a"))[0]);
}

#[test]
fn sglang_responses_give_the_source_trace_counts() {
    let d = tempfile::tempdir().unwrap();
    let out = run(&d.path().join("a"), |s| {
        sglang::import_jsonl(s, &[fx("sglang/responses_a.jsonl")], 4, 2)
    })
    .unwrap();
    assert_eq!(table(&out.join("trace.jsonl")), table(&source("run_a")));
}

#[test]
fn sglang_recorder_dumps_give_the_source_load() {
    let d = tempfile::tempdir().unwrap();
    let want = pooled(&source("run_a"));
    for (i, f) in ["per_token.pt", "per_pass.pt", "stat.pt"]
        .iter()
        .enumerate()
    {
        let out = run(&d.path().join(format!("o{i}")), |s| {
            sglang::import_pt(s, &[fx(&format!("sglang/{f}"))], 2)
        })
        .unwrap();
        assert_eq!(pooled(&out.join("trace.jsonl")), want, "{f}");
        let m = Manifest::read(out.join("manifest.json")).unwrap();
        let mode = if *f == "per_token.pt" {
            "events"
        } else {
            "counts"
        };
        assert_eq!(m.capture_mode, mode, "{f}");
    }
    // per_token: decode passes are generation tokens.
    let out = d.path().join("o0/trace.jsonl");
    let g = aggregate_paths(
        &[out],
        &AggregateOptions {
            token_types: vec![TokenType::Generation],
            ..opts()
        },
    )
    .unwrap();
    let gs: f64 = g.prompts.iter().flat_map(|p| p.counts.iter()).sum();
    let src = aggregate_paths(
        &[source("run_a")],
        &AggregateOptions {
            token_types: vec![TokenType::Generation],
            ..opts()
        },
    )
    .unwrap();
    let ss: f64 = src.prompts.iter().flat_map(|p| p.counts.iter()).sum();
    assert_eq!(gs, ss);
}

/// Runs an import that must fail: the message names `file` and `record`, and `out` is absent.
fn fails(
    out: &Path,
    needles: &[&str],
    f: impl FnOnce(&mut Staged) -> moe_xray_import::Result<()>,
) -> String {
    let e = run(out, f).unwrap_err().to_string();
    for n in needles {
        assert!(e.contains(n), "error `{e}` lacks `{n}`");
    }
    assert!(!out.exists(), "{} was written", out.display());
    let parent = out.parent().unwrap();
    for entry in std::fs::read_dir(parent).unwrap() {
        let name = entry.unwrap().file_name();
        assert!(
            !name.to_string_lossy().starts_with(".moe-xray-staging-"),
            "staging dir left behind"
        );
    }
    e
}

#[test]
fn pickle_that_calls_a_function_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let e = fails(
        &d.path().join("o"),
        &["evil.pt", "data.pkl", "refused", "posix.system"],
        |s| sglang::import_pt(s, &[fx("sglang/evil.pt")], 2),
    );
    assert!(!e.contains("moe-xray-must-never-run-this"));
}

fn npy_i32(shape: &[usize], vals: &[i32]) -> Vec<u8> {
    let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    let mut h = format!(
        "{{'descr': '<i4', 'fortran_order': False, 'shape': ({}), }}",
        dims.join(", ")
    );
    while (10 + h.len() + 1) % 64 != 0 {
        h.push(' ');
    }
    h.push('\n');
    let mut b = b"\x93NUMPY\x01\x00".to_vec();
    b.extend_from_slice(&(h.len() as u16).to_le_bytes());
    b.extend_from_slice(h.as_bytes());
    for v in vals {
        b.extend_from_slice(&v.to_le_bytes());
    }
    b
}

#[test]
fn bad_vllm_arrays_are_rejected_with_file_and_record() {
    let d = tempfile::tempdir().unwrap();
    let req = d.path().join("req.jsonl");
    std::fs::write(
        &req,
        "{\"prompt_id\":\"r1\",\"prompt_tokens\":1,\"completion_tokens\":2}\n",
    )
    .unwrap();
    let out = d.path().join("o");
    // Two rows (1 prompt + 2 completion - 1), four decoder layers (layer 0 dense), top-2.
    let good: Vec<i32> = vec![0, 0, 1, 2, 3, 4, 5, 6, 0, 0, 7, 0, 1, 2, 3, 4];
    let f = d.path().join("r1.npy");
    std::fs::write(&f, npy_i32(&[2, 4, 2], &good)).unwrap();
    run(&d.path().join("ok"), |s| {
        vllm::import_arrays(s, std::slice::from_ref(&f), &req)
    })
    .unwrap();

    let mut bad = good.clone();
    bad[5] = 8;
    std::fs::write(&f, npy_i32(&[2, 4, 2], &bad)).unwrap();
    fails(
        &out,
        &[
            "r1.npy",
            "array \"r1\"",
            "token 0 (prompt), layer 2",
            "expert id 8 out of range",
        ],
        |s| vllm::import_arrays(s, std::slice::from_ref(&f), &req),
    );
    let mut dup = good.clone();
    dup[11] = 7;
    std::fs::write(&f, npy_i32(&[2, 4, 2], &dup)).unwrap();
    fails(
        &out,
        &["r1.npy", "token 1 (generation), layer 1", "selected twice"],
        |s| vllm::import_arrays(s, std::slice::from_ref(&f), &req),
    );
    // Wrong shapes for the stated config: 3 decoder layers, top-1, 3 rows for 1 + 2 - 1.
    for (shape, vals, needle) in [
        (
            vec![2usize, 5, 2],
            [&good[..], &[0, 1, 0, 1]].concat(),
            "matches neither num_hidden_layers = 4 nor the 3 MoE layers",
        ),
        (
            vec![2, 8, 1],
            good.clone(),
            "top-k dimension 1 differs from num_experts_per_tok = 2",
        ),
        (
            vec![1, 4, 2],
            good[..8].to_vec(),
            "1 token rows, but prompt_tokens 1 + completion_tokens 2 - 1 = 2",
        ),
        (vec![16], good.clone(), "expected [tokens, layers, top_k]"),
    ] {
        std::fs::write(&f, npy_i32(&shape, &vals)).unwrap();
        fails(&out, &["r1.npy", "wrong shape", needle], |s| {
            vllm::import_arrays(s, std::slice::from_ref(&f), &req)
        });
    }
    // Truncated .npy, at several cuts.
    let full = npy_i32(&[2, 4, 2], &good);
    for cut in [3, 9, 40, full.len() - 1] {
        std::fs::write(&f, &full[..cut]).unwrap();
        fails(&out, &["r1.npy"], |s| {
            vllm::import_arrays(s, std::slice::from_ref(&f), &req)
        });
    }
    std::fs::write(&f, &full[..full.len() - 4]).unwrap();
    fails(&out, &["r1.npy", "truncated .npy data"], |s| {
        vllm::import_arrays(s, std::slice::from_ref(&f), &req)
    });
    // A request without a line in the requests file.
    let g = d.path().join("other.npy");
    std::fs::write(&g, npy_i32(&[2, 4, 2], &good)).unwrap();
    fails(
        &out,
        &["other.npy", "no line with prompt_id \"other\""],
        |s| vllm::import_arrays(s, &[g], &req),
    );
    // -1 padding: a token that is -1 in every MoE layer is skipped; a partial -1 is an error.
    let mut pad = good.clone();
    for x in &mut pad[10..16] {
        *x = -1;
    }
    std::fs::write(&f, npy_i32(&[2, 4, 2], &pad)).unwrap();
    let o = run(&d.path().join("pad"), |s| {
        vllm::import_arrays(s, std::slice::from_ref(&f), &req)
    })
    .unwrap();
    let m = Manifest::read(o.join("manifest.json")).unwrap();
    assert_eq!(m.extra["import"]["padding_tokens_skipped"], 1);
    pad[10] = 3;
    pad[11] = 4;
    std::fs::write(&f, npy_i32(&[2, 4, 2], &pad)).unwrap();
    fails(
        &out,
        &["r1.npy", "token 1 (generation)", "not in all"],
        |s| vllm::import_arrays(s, std::slice::from_ref(&f), &req),
    );
}

#[test]
fn bad_responses_are_rejected_with_file_and_line() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("o");
    let src = std::fs::read_to_string(fx("sglang/responses_a.jsonl")).unwrap();
    let lines: Vec<&str> = src.lines().collect();
    let f = d.path().join("sg.jsonl");
    // Base64 that does not decode to the stated shape: claim one more completion token.
    let mut v: serde_json::Value = serde_json::from_str(lines[1]).unwrap();
    let c = v["meta_info"]["completion_tokens"].as_u64().unwrap();
    v["meta_info"]["completion_tokens"] = json!(c + 1);
    std::fs::write(&f, format!("{}\n{}\n", lines[0], v)).unwrap();
    fails(
        &out,
        &["sg.jsonl", "line 2", "base64 decodes to", "needs"],
        |s| sglang::import_jsonl(s, std::slice::from_ref(&f), 4, 2),
    );
    // Corrupt base64.
    let mut v: serde_json::Value = serde_json::from_str(lines[0]).unwrap();
    let b = v["meta_info"]["routed_experts"]
        .as_str()
        .unwrap()
        .to_string();
    v["meta_info"]["routed_experts"] = json!(format!("!{}", &b[1..]));
    std::fs::write(&f, format!("{v}\n")).unwrap();
    fails(
        &out,
        &["sg.jsonl", "line 1", "invalid base64 character"],
        |s| sglang::import_jsonl(s, std::slice::from_ref(&f), 4, 2),
    );
    v["meta_info"]["routed_experts"] = json!(&b[..b.len() - 1]);
    std::fs::write(&f, format!("{v}\n")).unwrap();
    fails(&out, &["sg.jsonl", "line 1", "not a multiple of 4"], |s| {
        sglang::import_jsonl(s, std::slice::from_ref(&f), 4, 2)
    });
    // Wrong layer count for the stated config.
    std::fs::write(&f, format!("{}\n", lines[0])).unwrap();
    fails(&out, &["sg.jsonl", "line 1", "base64 decodes to"], |s| {
        sglang::import_jsonl(s, std::slice::from_ref(&f), 3, 2)
    });
    // Truncated last line.
    std::fs::write(&f, &lines[0][..lines[0].len() / 2]).unwrap();
    fails(&out, &["sg.jsonl", "line 1", "truncated last line"], |s| {
        sglang::import_jsonl(s, std::slice::from_ref(&f), 4, 2)
    });

    // vLLM responses: ragged arrays, out-of-range ids, wrong generation rows.
    let src = std::fs::read_to_string(fx("vllm/responses_b.jsonl")).unwrap();
    let first = src.lines().next().unwrap();
    let f = d.path().join("vl.jsonl");
    let base: serde_json::Value = serde_json::from_str(first).unwrap();
    let mut v = base.clone();
    v["prompt_routed_experts"][0][2] = json!([1, 2, 3]);
    std::fs::write(&f, format!("{v}\n")).unwrap();
    fails(
        &out,
        &[
            "vl.jsonl",
            "line 1",
            "wrong shape: prompt_routed_experts[0][2] has 3 experts, expected 2",
        ],
        |s| vllm::import_jsonl(s, std::slice::from_ref(&f)),
    );
    let mut v = base.clone();
    v["choices"][0]["routed_experts"][0][1] = json!([9, 1]);
    std::fs::write(&f, format!("{v}\n")).unwrap();
    fails(
        &out,
        &["vl.jsonl", "line 1, choice 0", "expert id 9 out of range"],
        |s| vllm::import_jsonl(s, std::slice::from_ref(&f)),
    );
    let mut v = base.clone();
    let c = v["usage"]["completion_tokens"].as_u64().unwrap();
    v["usage"]["completion_tokens"] = json!(c + 2);
    v["choices"][0]["token_ids"] = serde_json::Value::Null;
    std::fs::write(&f, format!("{v}\n")).unwrap();
    fails(
        &out,
        &[
            "vl.jsonl",
            "line 1, choice 0",
            "wrong shape: routed_experts has",
        ],
        |s| vllm::import_jsonl(s, std::slice::from_ref(&f)),
    );
    // usage and token_ids disagree.
    let mut v = base.clone();
    v["usage"]["completion_tokens"] = json!(c + 2);
    std::fs::write(&f, format!("{v}\n")).unwrap();
    fails(
        &out,
        &["vl.jsonl", "line 1, choice 0", "differs from the choice's"],
        |s| vllm::import_jsonl(s, std::slice::from_ref(&f)),
    );
    // Duplicate prompt ids across lines.
    std::fs::write(&f, format!("{first}\n{first}\n")).unwrap();
    fails(&out, &["vl.jsonl", "line 2", "duplicate prompt id"], |s| {
        vllm::import_jsonl(s, std::slice::from_ref(&f))
    });
}

#[test]
fn damaged_torch_files_are_rejected() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("o");
    let bytes = std::fs::read(fx("sglang/stat.pt")).unwrap();
    let f = d.path().join("cut.pt");
    for cut in [10, bytes.len() / 2, bytes.len() - 30] {
        std::fs::write(&f, &bytes[..cut]).unwrap();
        fails(&out, &["cut.pt"], |s| {
            sglang::import_pt(s, std::slice::from_ref(&f), 2)
        });
    }
    // Not a dump at all.
    fails(&out, &["run_a.npz", "data.pkl"], |s| {
        sglang::import_pt(s, &[fx("vllm/run_a.npz")], 2)
    });
    // A top-k that does not divide the counts.
    let mut sh = shape();
    sh.top_k = None;
    let mut st = Staged::create(&out, sh).unwrap();
    let e = sglang::import_pt(&mut st, &[fx("sglang/stat.pt")], 3)
        .unwrap_err()
        .to_string();
    drop(st);
    assert!(
        e.contains("stat.pt")
            && e.contains("logical_count[0]")
            && e.contains("not a multiple of top_k = 3"),
        "{e}"
    );
    assert!(!out.exists());
}

#[test]
fn failed_import_removes_the_directories_it_created() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("new/deeper/o");
    let e = run(&out, |s| sglang::import_pt(s, &[fx("sglang/evil.pt")], 2)).unwrap_err();
    assert!(e.to_string().contains("refused"));
    assert!(!d.path().join("new").exists());
    let o = run(&out, |s| {
        sglang::import_jsonl(s, &[fx("sglang/responses_a.jsonl")], 4, 2)
    })
    .unwrap();
    assert!(o.join("manifest.json").is_file());
}

#[test]
fn output_directory_must_be_new_or_empty() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("o");
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("keep.txt"), "x").unwrap();
    let e = Staged::create(&out, shape()).err().unwrap().to_string();
    assert!(e.contains("not empty"), "{e}");
    assert_eq!(std::fs::read_to_string(out.join("keep.txt")).unwrap(), "x");
    std::fs::remove_file(out.join("keep.txt")).unwrap();
    let o = run(&out, |s| {
        sglang::import_jsonl(s, &[fx("sglang/responses_a.jsonl")], 4, 2)
    })
    .unwrap();
    assert!(o.join("trace.jsonl").is_file() && o.join("manifest.json").is_file());
}

fn b64(bytes: &[u8]) -> String {
    const A: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut s = String::new();
    for c in bytes.chunks(3) {
        let n = (c[0] as u32) << 16
            | (*c.get(1).unwrap_or(&0) as u32) << 8
            | *c.get(2).unwrap_or(&0) as u32;
        for i in 0..4 {
            if i <= c.len() {
                s.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                s.push('=');
            }
        }
    }
    s
}

/// Nested lists → vLLM's compact `{"encoding": "base64", "dtype": "int16", ...}` form.
fn compact(v: &serde_json::Value) -> serde_json::Value {
    let rows = v.as_array().unwrap();
    let (l, k) = (
        rows[0].as_array().unwrap().len(),
        rows[0][0].as_array().unwrap().len(),
    );
    let mut bytes = Vec::new();
    for r in rows {
        for sel in r.as_array().unwrap() {
            for x in sel.as_array().unwrap() {
                bytes.extend_from_slice(&(x.as_i64().unwrap() as i16).to_le_bytes());
            }
        }
    }
    json!({"encoding": "base64", "dtype": "int16", "shape": [rows.len(), l, k], "data": b64(&bytes)})
}

#[test]
fn vllm_compact_base64_form_equals_nested_lists() {
    let d = tempfile::tempdir().unwrap();
    let src = std::fs::read_to_string(fx("vllm/responses_b.jsonl")).unwrap();
    let mut out = String::new();
    for line in src.lines() {
        let mut v: serde_json::Value = serde_json::from_str(line).unwrap();
        v["prompt_routed_experts"] = compact(&v["prompt_routed_experts"]);
        v["choices"][0]["routed_experts"] = compact(&v["choices"][0]["routed_experts"]);
        out.push_str(&format!("{v}\n"));
    }
    let f = d.path().join("compact.jsonl");
    std::fs::write(&f, &out).unwrap();
    let o = run(&d.path().join("c"), |s| {
        vllm::import_jsonl(s, std::slice::from_ref(&f))
    })
    .unwrap();
    assert_eq!(table(&o.join("trace.jsonl")), table(&source("run_b")));
    // Stated shape and data disagree.
    let mut v: serde_json::Value = serde_json::from_str(out.lines().next().unwrap()).unwrap();
    let rows = v["prompt_routed_experts"]["shape"][0].as_u64().unwrap();
    v["prompt_routed_experts"]["shape"][0] = json!(rows + 1);
    std::fs::write(&f, format!("{v}\n")).unwrap();
    fails(
        &d.path().join("o"),
        &[
            "compact.jsonl",
            "line 1",
            "prompt_routed_experts: base64 decodes to",
            "needs",
        ],
        |s| vllm::import_jsonl(s, std::slice::from_ref(&f)),
    );
}

/// (prompt id, position, token type) -> token id of a records trace.
fn token_ids(trace: &Path) -> std::collections::BTreeMap<(String, u32, String), Option<u64>> {
    std::fs::read_to_string(trace)
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (
                (
                    v["prompt_id"].as_str().unwrap().to_string(),
                    v["position"].as_u64().unwrap() as u32,
                    v["token_type"].as_str().unwrap().to_string(),
                ),
                v["token_id"].as_u64(),
            )
        })
        .collect()
}

#[test]
fn token_ids_are_kept_when_the_source_has_them() {
    let d = tempfile::tempdir().unwrap();
    let out = run(&d.path().join("b"), |s| {
        vllm::import_jsonl(s, &[fx("vllm/responses_b.jsonl")])
    })
    .unwrap();
    let got = token_ids(&out.join("trace.jsonl"));
    assert_eq!(got, token_ids(&source("run_b")));
    assert!(got.values().all(Option::is_some));
    // The recorder's per-token dump carries input_ids: every imported token keeps its id.
    let out = run(&d.path().join("pt"), |s| {
        sglang::import_pt(s, &[fx("sglang/per_token.pt")], 2)
    })
    .unwrap();
    let mut got: Vec<u64> = token_ids(&out.join("trace.jsonl"))
        .into_values()
        .map(Option::unwrap)
        .collect();
    let mut want: Vec<u64> = token_ids(&source("run_a"))
        .into_values()
        .map(Option::unwrap)
        .collect();
    got.sort_unstable();
    want.sort_unstable();
    assert_eq!(got, want);
}

#[test]
fn compressed_jsonl_imports_like_plain_text() {
    use std::io::Write;
    let d = tempfile::tempdir().unwrap();
    let plain = std::fs::read(fx("vllm/responses_b.jsonl")).unwrap();
    let gz = {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        // Two members (concatenated gzip streams are one file).
        let (a, b) = plain.split_at(plain.len() / 2);
        e.write_all(a).unwrap();
        let mut out = e.finish().unwrap();
        let mut e2 = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        e2.write_all(b).unwrap();
        out.extend(e2.finish().unwrap());
        out
    };
    let zst = zstd::encode_all(&plain[..], 3).unwrap();
    let want = run(&d.path().join("plain"), |s| {
        vllm::import_jsonl(s, &[fx("vllm/responses_b.jsonl")])
    })
    .unwrap();
    let want = std::fs::read(want.join("trace.jsonl")).unwrap();
    for (name, bytes) in [("r.jsonl.gz", &gz), ("r.jsonl.zst", &zst)] {
        let p = d.path().join(name);
        std::fs::write(&p, bytes).unwrap();
        let out = run(&d.path().join(format!("o_{name}")), |s| {
            vllm::import_jsonl(s, std::slice::from_ref(&p))
        })
        .unwrap();
        assert_eq!(
            std::fs::read(out.join("trace.jsonl")).unwrap(),
            want,
            "{name}"
        );
        // SGLang responses too.
        let sp = d.path().join(format!("sg_{name}"));
        let sg = std::fs::read(fx("sglang/responses_a.jsonl")).unwrap();
        std::fs::write(
            &sp,
            if name.ends_with(".gz") {
                let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
                e.write_all(&sg).unwrap();
                e.finish().unwrap()
            } else {
                zstd::encode_all(&sg[..], 1).unwrap()
            },
        )
        .unwrap();
        let out = run(&d.path().join(format!("s_{name}")), |s| {
            sglang::import_jsonl(s, std::slice::from_ref(&sp), 4, 2)
        })
        .unwrap();
        assert_eq!(table(&out.join("trace.jsonl")), table(&source("run_a")));
    }
    // Bad compressed input: named by file (and line where the stream breaks), nothing written.
    let cases: Vec<(&str, Vec<u8>, Vec<&str>)> = vec![
        (
            "cut.jsonl.gz",
            gz[..gz.len() / 3].to_vec(),
            vec!["cut.jsonl.gz", "line ", "gzip"],
        ),
        (
            "cut.jsonl.zst",
            zst[..zst.len() / 2].to_vec(),
            vec!["cut.jsonl.zst", "line ", "zstd"],
        ),
        (
            "gz_as.jsonl.zst",
            gz.clone(),
            vec![
                "gz_as.jsonl.zst",
                "file name says zstd but the content is gzip",
            ],
        ),
        (
            "plain.jsonl.gz",
            plain.clone(),
            vec!["plain.jsonl.gz", "does not start with the gzip magic"],
        ),
        (
            "hidden.jsonl",
            zst.clone(),
            vec![
                "hidden.jsonl",
                "file name says plain but the content is zstd",
            ],
        ),
    ];
    for (name, bytes, needles) in cases {
        let p = d.path().join(name);
        std::fs::write(&p, bytes).unwrap();
        fails(&d.path().join(format!("bad_{name}")), &needles, |s| {
            vllm::import_jsonl(s, std::slice::from_ref(&p))
        });
    }
}
