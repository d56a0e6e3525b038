//! `import hf` against real transformers output: router logits saved by
//! tools/make_import_fixtures_torch.py (safetensors and torch.save, one right-padded batch) for
//! tiny checkpoints of fixtures/hf/, routed by the family's rule, must give the routing of
//! fixtures/hf/<model>/expected_trace.jsonl (transformers' batch-1 teacher-forced forward):
//! same tokens, positions, token ids and types, decoder layers, expert sets (lists where
//! transformers sorts them), weights within 1e-6. Also the real-torch SGLang dumps and bad input.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use moe_xray_import::{hf, sglang, ModelShape, Staged};
use moe_xray_test_support::repo_root;
use moe_xray_trace::Manifest;
use serde_json::{json, Value};

fn hf_dir(m: &str) -> PathBuf {
    repo_root().join("fixtures/hf").join(m)
}
fn fx(m: &str, f: &str) -> PathBuf {
    repo_root().join("fixtures/import/hf").join(m).join(f)
}

fn lines(p: &Path) -> Vec<Value> {
    std::fs::read_to_string(p)
        .unwrap()
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn import(model: &str, input: &Path, requests: bool, out: &Path) -> moe_xray_import::Result<()> {
    let shape = ModelShape::from_config(&hf_dir(model).join("config.json"))?;
    let router = hf::HfRouter::load(&shape)?;
    let mut st = Staged::create(out, shape)?;
    let req = fx(model, "requests.jsonl");
    hf::import(
        &mut st,
        &router,
        &[input.to_path_buf()],
        requests.then_some(req.as_path()),
    )?;
    st.finish("hf", json!({}))?;
    Ok(())
}

type Key = (String, u64, u64);

fn by_key(v: &[Value]) -> BTreeMap<Key, Value> {
    v.iter()
        .map(|r| {
            (
                (
                    r["prompt_id"].as_str().unwrap().to_string(),
                    r["position"].as_u64().unwrap(),
                    r["layer"].as_u64().unwrap(),
                ),
                r.clone(),
            )
        })
        .collect()
}

/// (records compared, largest weight difference).
fn compare(model: &str, got: &Path, ordered: bool) -> (usize, f64) {
    let want = by_key(&lines(&hf_dir(model).join("expected_trace.jsonl")));
    let got = by_key(&lines(got));
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        want.keys().collect::<Vec<_>>(),
        "{model}: records (prompt, position, decoder layer)"
    );
    let mut max_dw = 0f64;
    for (k, w) in &want {
        let g = &got[k];
        for f in ["category", "token_id", "token_type"] {
            assert_eq!(g[f], w[f], "{model} {k:?} {f}");
        }
        let pairs = |r: &Value| -> Vec<(u64, f64)> {
            r["experts"]
                .as_array()
                .unwrap()
                .iter()
                .zip(r["weights"].as_array().unwrap())
                .map(|(e, x)| (e.as_u64().unwrap(), x.as_f64().unwrap()))
                .collect()
        };
        let (mut pg, mut pw) = (pairs(g), pairs(w));
        if !ordered {
            pg.sort_by_key(|p| p.0);
            pw.sort_by_key(|p| p.0);
        }
        let eg: Vec<u64> = pg.iter().map(|p| p.0).collect();
        let ew: Vec<u64> = pw.iter().map(|p| p.0).collect();
        assert_eq!(eg, ew, "{model} {k:?}: experts");
        for (a, b) in pg.iter().zip(&pw) {
            max_dw = max_dw.max((a.1 - b.1).abs());
        }
    }
    assert!(max_dw <= 1e-6, "{model}: weights differ by {max_dw}");
    (want.len(), max_dw)
}

#[test]
fn router_logits_give_the_transformers_routing() {
    // (model, expert lists in transformers' order?)
    for (model, ordered) in [
        ("olmoe-tiny-mha-f32", true),
        ("gptoss-tiny-f32", true),
        ("qwen3moe-tiny-f32", true),
        ("deepseekv3-tiny-f32", false),
    ] {
        let d = tempfile::tempdir().unwrap();
        let mut traces = Vec::new();
        for f in ["router_logits.safetensors", "router_logits.pt"] {
            let out = d.path().join(f);
            import(model, &fx(model, f), true, &out).unwrap();
            let (n, dw) = compare(model, &out.join("trace.jsonl"), ordered);
            eprintln!("{model} {f}: {n} records equal, max weight diff {dw:.2e}");
            traces.push(std::fs::read(out.join("trace.jsonl")).unwrap());
            // The manifest carries the model's routing block (decoder layers, dense layers).
            let m = Manifest::read(out.join("manifest.json")).unwrap();
            let cfg = moe_xray_model::config::ModelConfig::from_dir(&hf_dir(model)).unwrap();
            let r = m.routing.as_ref().unwrap();
            assert_eq!(r.moe_layers, cfg.moe_layer_indices(), "{model}");
            assert_eq!(r.dense_layers, cfg.dense_layer_indices(), "{model}");
            assert_eq!(r.family, cfg.model_type());
            assert_eq!(m.num_layers, cfg.num_hidden_layers);
            assert!(
                m.extra["import"]["padding_tokens_skipped"]
                    .as_u64()
                    .unwrap()
                    > 0
            );
        }
        // safetensors and torch.save of the same tensors import to the same bytes.
        assert_eq!(traces[0], traces[1], "{model}: .safetensors vs .pt");
    }
}

#[test]
fn half_precision_logits_read_alike_from_pt_and_safetensors() {
    let m = "olmoe-tiny-mha-f32";
    let d = tempfile::tempdir().unwrap();
    for tag in ["bf16", "f16"] {
        let mut t = Vec::new();
        for ext in ["safetensors", "pt"] {
            let out = d.path().join(format!("{tag}.{ext}"));
            import(m, &fx(m, &format!("router_logits_{tag}.{ext}")), true, &out).unwrap();
            t.push(std::fs::read_to_string(out.join("trace.jsonl")).unwrap());
        }
        assert_eq!(t[0], t[1], "{tag}");
        // Rounding the logits changes some weights but the trace covers the same records.
        assert_eq!(t[0].lines().count(), 540, "{tag}");
    }
}

#[test]
fn without_requests_rows_are_named_by_file_and_all_prompt_tokens() {
    let d = tempfile::tempdir().unwrap();
    let m = "olmoe-tiny-mha-f32";
    let out = d.path().join("o");
    import(m, &fx(m, "router_logits.safetensors"), false, &out).unwrap();
    let recs = lines(&out.join("trace.jsonl"));
    assert_eq!(recs[0]["prompt_id"], "router_logits/0");
    assert!(recs.iter().all(|r| r["token_type"] == "prompt"));
    let ids: std::collections::BTreeSet<&str> = recs
        .iter()
        .map(|r| r["prompt_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), 8);
}

fn fails(model: &str, input: &Path, requests: bool, needles: &[&str]) {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("out");
    let e = import(model, input, requests, &out)
        .unwrap_err()
        .to_string();
    for n in needles {
        assert!(e.contains(n), "{input:?}: {e:?} lacks {n:?}");
    }
    assert!(!out.exists(), "{e}: output written");
    assert_eq!(
        std::fs::read_dir(d.path()).unwrap().count(),
        0,
        "{e}: staging left behind"
    );
}

fn save_st(path: &Path, tensors: Tensors<'_>) {
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .map(|(n, d, s, b)| {
            (
                n.to_string(),
                safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap(),
            )
        })
        .collect();
    safetensors::tensor::serialize_to_file(views, None, path).unwrap();
}

type Tensors<'a> = Vec<(&'a str, safetensors::Dtype, Vec<usize>, Vec<u8>)>;

fn f32s(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

#[test]
fn bad_router_logits_are_rejected_with_file_and_record() {
    let d = tempfile::tempdir().unwrap();
    let m = "olmoe-tiny-mha-f32"; // 2 MoE layers, 8 experts, top-2
    use safetensors::Dtype::{F32, I64};
    let ok = f32s(&[0.5; 3 * 8]);
    let cases: Vec<(&str, Tensors<'_>, Vec<&str>)> = vec![
        (
            "one_layer.safetensors",
            vec![("router_logits.0", F32, vec![3, 8], ok.clone())],
            vec![
                "one_layer.safetensors",
                "router_logits",
                "1 layers",
                "2 MoE layers",
            ],
        ),
        (
            "experts.safetensors",
            vec![
                ("router_logits.0", F32, vec![4, 6], ok.clone()),
                ("router_logits.1", F32, vec![4, 6], ok.clone()),
            ],
            vec!["experts.safetensors", "6 experts", "config has 8"],
        ),
        (
            "nan.safetensors",
            vec![
                ("router_logits.0", F32, vec![3, 8], ok.clone()),
                ("router_logits.1", F32, vec![3, 8], {
                    let mut v = vec![0.5f32; 24];
                    v[17] = f32::NAN;
                    f32s(&v)
                }),
            ],
            vec![
                "nan.safetensors",
                "batch row 0",
                "token 2, MoE layer 1",
                "non-finite",
            ],
        ),
        (
            "ids.safetensors",
            vec![
                ("router_logits.0", F32, vec![3, 8], ok.clone()),
                ("router_logits.1", F32, vec![3, 8], ok.clone()),
                ("input_ids", I64, vec![2, 2], vec![0u8; 32]),
            ],
            vec![
                "ids.safetensors",
                "router_logits",
                "3 rows",
                "batch 2 x seq 2",
            ],
        ),
        (
            "none.safetensors",
            vec![("logits", F32, vec![3, 8], ok.clone())],
            vec!["none.safetensors", "no tensor router_logits.0"],
        ),
    ];
    for (name, tensors, needles) in cases {
        let p = d.path().join(name);
        save_st(&p, tensors);
        fails(m, &p, false, &needles);
    }
    // Truncated safetensors file.
    let good = std::fs::read(fx(m, "router_logits.safetensors")).unwrap();
    let p = d.path().join("cut.safetensors");
    std::fs::write(&p, &good[..good.len() / 2]).unwrap();
    fails(m, &p, false, &["cut.safetensors", "not a safetensors file"]);
    // Requests that disagree with the batch rows: too few lines, a wrong token count.
    for (req, needles) in [
        (
            "{\"prompt_id\":\"a\",\"prompt_tokens\":3}\n",
            vec![
                "router_logits.safetensors",
                "batch row 1",
                "requests file has 1 lines",
            ],
        ),
        (
            "{\"prompt_id\":\"a\",\"prompt_tokens\":3,\"completion_tokens\":1}\n",
            vec!["batch row 0", "prompt_tokens 3 + completion_tokens 1"],
        ),
    ] {
        let rp = d.path().join("requests.jsonl");
        std::fs::write(&rp, req).unwrap();
        let out = d.path().join("o1");
        let shape = ModelShape::from_config(&hf_dir(m).join("config.json")).unwrap();
        let router = hf::HfRouter::load(&shape).unwrap();
        let mut st = Staged::create(&out, shape).unwrap();
        let e = hf::import(
            &mut st,
            &router,
            &[fx(m, "router_logits.safetensors")],
            Some(&rp),
        )
        .unwrap_err()
        .to_string();
        drop(st);
        assert!(!out.exists());
        for n in needles {
            assert!(e.contains(n), "{e:?} lacks {n:?}");
        }
        std::fs::remove_file(&rp).unwrap();
    }
    // A config of another model: the logits have the wrong number of experts.
    let e = {
        let out = d.path().join("o2");
        let shape =
            ModelShape::from_config(&hf_dir("gptoss-tiny-f32").join("config.json")).unwrap();
        let router = hf::HfRouter::load(&shape).unwrap();
        let mut st = Staged::create(&out, shape).unwrap();
        let r = hf::import(&mut st, &router, &[fx(m, "router_logits.pt")], None);
        assert!(!out.exists());
        r.unwrap_err().to_string()
    };
    assert!(
        e.contains("router_logits.pt") && e.contains("2 layers of router logits"),
        "{e}"
    );
    // A pickle that would call a function is refused (real torch.save of a __reduce__ object).
    let evil = repo_root().join("fixtures/import/sglang/torch/evil.pt");
    fails(m, &evil, false, &["evil.pt", "refused"]);
}

fn ok_run(out: &Path, f: impl FnOnce(&mut Staged) -> moe_xray_import::Result<()>) -> PathBuf {
    let shape = ModelShape::from_config(&repo_root().join("fixtures/import/config.json")).unwrap();
    let mut st = Staged::create(out, shape).unwrap();
    f(&mut st).unwrap();
    st.finish("sglang", json!({})).unwrap().0
}

#[test]
fn sglang_dumps_saved_by_real_torch_parse_identically() {
    let d = tempfile::tempdir().unwrap();
    for mode in ["per_token", "per_pass", "stat"] {
        let ours = repo_root().join(format!("fixtures/import/sglang/{mode}.pt"));
        let torch = repo_root().join(format!("fixtures/import/sglang/torch/{mode}.pt"));
        // The decoded data is the same (tensors compared by value below, storage keys may differ).
        let a = ok_run(&d.path().join(format!("a_{mode}")), |s| {
            sglang::import_pt(s, std::slice::from_ref(&ours), 2)
        });
        let b = ok_run(&d.path().join(format!("b_{mode}")), |s| {
            sglang::import_pt(s, std::slice::from_ref(&torch), 2)
        });
        let ta = std::fs::read_to_string(a.join("trace.jsonl")).unwrap();
        let tb = std::fs::read_to_string(b.join("trace.jsonl")).unwrap();
        assert!(!ta.is_empty());
        // Prompt ids carry the file stem, equal here; the traces are byte-identical.
        assert_eq!(ta, tb, "{mode}");
    }
}
