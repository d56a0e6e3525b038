//! `compare-models` against the numpy/scipy reference (`tools/reference_crossmodel.py` →
//! `fixtures/crossmodel/expected.json`) on the committed analysis directories, to 1e-9; the Mantel
//! p statistically (the reference enumerates all permutations for N ≤ 8, else draws its own);
//! positive control (a model against itself: RSA 1, CKA 1, no expert moved, zero drift) and null
//! control (prompt labels shuffled: RSA ≈ 0, Mantel p not small).

use std::path::{Path, PathBuf};

use moe_xray_pipeline::compare_models::{
    compare_models, CompareModelsOptions, CompareModelsOutput,
};
use moe_xray_stats::crossmodel::CrossModelOptions;
use moe_xray_test_support::{fixture, repo_root};
use serde_json::Value;

struct Quiet;
impl moe_xray_pipeline::Progress for Quiet {
    fn warn(&self, _msg: &str) {}
}

fn run(a: &str, b: &str, traces: Option<(&str, &str)>, reps: usize) -> CompareModelsOutput {
    let dir = fixture("crossmodel");
    compare_models(
        &CompareModelsOptions {
            a: dir.join(a),
            b: dir.join(b),
            traces_a: traces.map(|t| repo_root().join(t.0)),
            traces_b: traces.map(|t| repo_root().join(t.1)),
            stats: CrossModelOptions { reps, seed: 0 },
        },
        &Quiet,
    )
    .unwrap()
}

fn close(what: &str, got: Option<f64>, want: &Value) {
    match (got, want.as_f64()) {
        (None, None) => {}
        (Some(g), Some(w)) => assert!(
            (g - w).abs() <= 1e-9 * w.abs().max(1.0),
            "{what}: {g} vs reference {w}"
        ),
        (g, _) => panic!("{what}: {g:?} vs reference {want}"),
    }
}

fn expected() -> Value {
    let p = fixture("crossmodel").join("expected.json");
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn check_case(name: &str, out: &CompareModelsOutput, reps: usize) {
    let exp = &expected()["cases"][name];
    let r = &out.report;
    assert_eq!(
        r.shared_prompts as u64,
        exp["shared"].as_u64().unwrap(),
        "{name}"
    );
    close(
        &format!("{name} spearman"),
        r.rsa.spearman,
        &exp["spearman"],
    );
    close(&format!("{name} cka"), r.cka, &exp["cka"]);
    let pl = r.per_layer.done().unwrap();
    for (key, m) in [("cka", &pl.cka), ("rsa", &pl.rsa)] {
        let em = exp["per_layer"][key].as_array().unwrap();
        assert_eq!(m.len(), em.len());
        for (l, row) in m.iter().enumerate() {
            for (k, v) in row.iter().enumerate() {
                close(&format!("{name} per_layer {key}[{l}][{k}]"), *v, &em[l][k]);
            }
        }
    }
    let c = &r.categories;
    close(
        &format!("{name} d_shared a"),
        c.cohens_d_shared.a,
        &exp["cohens_d_shared"][0],
    );
    close(
        &format!("{name} d_shared b"),
        c.cohens_d_shared.b,
        &exp["cohens_d_shared"][1],
    );
    let pc = exp["per_category"].as_array().unwrap();
    assert_eq!(c.per_category.len(), pc.len());
    for (row, e) in c.per_category.iter().zip(pc) {
        assert_eq!(row.category, e["category"].as_str().unwrap());
        assert_eq!(row.n as u64, e["n"].as_u64().unwrap());
        close(&format!("{name} d[{}] a", row.category), row.d_a, &e["d_a"]);
        close(&format!("{name} d[{}] b", row.category), row.d_b, &e["d_b"]);
    }
    // Mantel p: binomial tolerance around the reference (exact or from its own permutations).
    let m = r.rsa.mantel.done().unwrap();
    let pref = exp["mantel"]["p"].as_f64().unwrap();
    let se = (pref * (1.0 - pref) / reps as f64).sqrt();
    assert!(
        (m.p - pref).abs() <= 5.0 * se + 2.0 / reps as f64,
        "{name}: Mantel p {} vs reference {pref}",
        m.p
    );
    let nm = exp["mantel"]["null_mean"].as_f64().unwrap();
    let ns = exp["mantel"]["null_std"].as_f64().unwrap();
    assert!((m.null_mean - nm).abs() <= 5.0 * ns / (reps as f64).sqrt() + 1e-12);
    // Matching and drift.
    match exp["matching"].as_array() {
        None => assert!(r.expert_matching.done().is_none() && r.matched_drift.done().is_none()),
        Some(layers) => {
            let em = r.expert_matching.done().unwrap();
            for (lm, e) in em.layers.iter().zip(layers) {
                let want: Vec<usize> = e["assignment"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_u64().unwrap() as usize)
                    .collect();
                assert_eq!(lm.assignment, want, "{name} layer {}", lm.layer);
                close(
                    "distance_identity",
                    Some(lm.distance_identity),
                    &e["distance_identity"],
                );
                close(
                    "distance_matched",
                    Some(lm.distance_matched),
                    &e["distance_matched"],
                );
            }
            let d = r.matched_drift.done().unwrap();
            for (which, got) in [("unmatched", &d.unmatched), ("matched", &d.matched)] {
                let e = &exp["drift"][which];
                for (l, js) in got.js_bits.iter().enumerate() {
                    close(
                        &format!("{name} {which} js[{l}]"),
                        Some(*js),
                        &e["js_bits"][l],
                    );
                }
                close(
                    &format!("{name} {which} mean js"),
                    Some(got.mean_js_bits),
                    &e["mean_js_bits"],
                );
                close(
                    &format!("{name} {which} mean shift"),
                    got.mean_shift,
                    &e["mean_shift"],
                );
            }
        }
    }
}

#[test]
fn same_architecture_matches_the_reference() {
    let out = run(
        "planted",
        "null",
        Some((
            "fixtures/stats/planted/trace.jsonl",
            "fixtures/stats/null/trace.jsonl",
        )),
        2000,
    );
    check_case("planted_vs_null", &out, 2000);
    // Null control: unrelated routing → RSA near 0, Mantel p not small.
    let r = &out.report;
    assert!(r.rsa.spearman.unwrap().abs() < 0.15, "{:?}", r.rsa);
    assert!(r.rsa.mantel.done().unwrap().p > 0.01);
    // Matching can only bring B's signatures closer to A's.
    for l in &r.expert_matching.done().unwrap().layers {
        assert!(l.distance_matched <= l.distance_identity + 1e-12);
    }
}

#[test]
fn a_model_against_itself_is_the_positive_control() {
    let t = "fixtures/stats/planted/trace.jsonl";
    let out = run("planted", "planted", Some((t, t)), 500);
    check_case("planted_vs_planted", &out, 500);
    let r = &out.report;
    assert!((r.rsa.spearman.unwrap() - 1.0).abs() < 1e-12);
    assert!((r.cka.unwrap() - 1.0).abs() < 1e-12);
    assert!(r.rsa.mantel.done().unwrap().p < 0.01);
    assert_eq!(r.expert_matching.done().unwrap().moved, 0);
    let d = r.matched_drift.done().unwrap();
    assert!(d.matched.mean_js_bits.abs() < 1e-12 && d.unmatched.mean_js_bits.abs() < 1e-12);
    assert_eq!(
        r.categories.cohens_d_shared.a,
        r.categories.cohens_d_shared.b
    );
}

#[test]
fn different_architectures_match_the_reference() {
    let out = run("mixtral", "olmoe", None, 2000);
    check_case("mixtral_vs_olmoe", &out, 2000);
    let r = &out.report;
    assert!(!r.same_architecture);
    let pl = r.per_layer.done().unwrap();
    assert_eq!((pl.cka.len(), pl.cka[0].len()), (2, 3));
}

/// Copies `src` to a temporary directory with the prompt ids of signatures.csv and results.json
/// permuted (prompt i gets the id of prompt σ(i), categories follow the ids).
fn shuffled_copy(src: &Path, tmp: &Path) -> PathBuf {
    let mut res: Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("results.json")).unwrap()).unwrap();
    let text = std::fs::read_to_string(src.join("signatures.csv")).unwrap();
    let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
    let n = lines.len() - 1;
    // A fixed scrambling permutation (7 is coprime with the 40 prompts).
    assert_eq!(n, 40);
    let perm: Vec<usize> = (0..n).map(|i| (7 * i + 3) % n).collect();
    let heads: Vec<(String, String)> = lines[1..]
        .iter()
        .map(|l| {
            let mut it = l.splitn(3, ',');
            (
                it.next().unwrap().to_string(),
                it.next().unwrap().to_string(),
            )
        })
        .collect();
    let mut ids = Vec::new();
    for i in 0..n {
        let rest = lines[i + 1].splitn(3, ',').nth(2).unwrap().to_string();
        let (id, cat) = &heads[perm[i]];
        lines[i + 1] = format!("{id},{cat},{rest}");
        ids.push(Value::String(id.clone()));
    }
    res["prompt_ids"] = Value::Array(ids);
    let out = tmp.join("shuffled");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("signatures.csv"), lines.join("\n") + "\n").unwrap();
    std::fs::write(
        out.join("results.json"),
        serde_json::to_string_pretty(&res).unwrap(),
    )
    .unwrap();
    out
}

#[test]
fn shuffled_prompt_labels_are_the_null_control() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = fixture("crossmodel");
    let b = shuffled_copy(&dir.join("planted"), tmp.path());
    let out = compare_models(
        &CompareModelsOptions {
            a: dir.join("planted"),
            b,
            stats: CrossModelOptions { reps: 500, seed: 1 },
            ..Default::default()
        },
        &Quiet,
    )
    .unwrap();
    let r = &out.report;
    assert_eq!(r.shared_prompts, 40);
    assert!(r.rsa.spearman.unwrap().abs() < 0.2, "{:?}", r.rsa);
    assert!(r.rsa.mantel.done().unwrap().p > 0.01, "{:?}", r.rsa);
    assert!(r.cka.unwrap() < 0.5, "{:?}", r.cka);
    // No traces: the drift is skipped with the reason, the matching is still there.
    assert!(r.expert_matching.done().is_some());
    assert!(r.matched_drift.why_missing().unwrap().contains("no traces"));
}

#[test]
fn hostile_analysis_directories_are_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = fixture("crossmodel");
    let bad = tmp.path().join("bad");
    std::fs::create_dir_all(&bad).unwrap();
    std::fs::copy(dir.join("planted/results.json"), bad.join("results.json")).unwrap();
    let text = std::fs::read_to_string(dir.join("planted/signatures.csv")).unwrap();
    let cases: Vec<(String, &str)> = vec![
        (text.replacen("l0_e0", "l0_e9", 1), "header does not match"),
        (
            text.replacen(",0.", ",-0.", 1),
            "not a finite non-negative number",
        ),
        (
            text.lines().take(5).collect::<Vec<_>>().join("\n"),
            "rows, results.json lists",
        ),
        ("\"unterminated".into(), "unterminated quoted field"),
    ];
    for (content, needle) in cases {
        std::fs::write(bad.join("signatures.csv"), content).unwrap();
        let e = compare_models(
            &CompareModelsOptions {
                a: dir.join("planted"),
                b: bad.clone(),
                ..Default::default()
            },
            &Quiet,
        )
        .err()
        .unwrap()
        .to_string();
        assert!(
            e.contains(needle) && e.contains("signatures.csv"),
            "{needle}: {e}"
        );
    }
    std::fs::remove_file(bad.join("signatures.csv")).unwrap();
    let e = compare_models(
        &CompareModelsOptions {
            a: dir.join("planted"),
            b: bad,
            ..Default::default()
        },
        &Quiet,
    )
    .err()
    .unwrap()
    .to_string();
    assert!(e.contains("no signatures.csv"), "{e}");
}

fn many(
    runs: &[&str],
    traces: &[&str],
    reps: usize,
) -> moe_xray_pipeline::compare_models::CompareManyOutput {
    let dir = fixture("crossmodel");
    moe_xray_pipeline::compare_models::compare_many(
        &moe_xray_pipeline::compare_models::CompareManyOptions {
            runs: runs.iter().map(|r| dir.join(r)).collect(),
            traces: traces.iter().map(|t| Some(repo_root().join(t))).collect(),
            stats: CrossModelOptions { reps, seed: 0 },
        },
        &Quiet,
    )
    .unwrap()
}

/// Three runs of the same 40 prompts (planted, null, planted counted on prompt tokens only):
/// every pair against its two-run reference case, the N × N matrices and each run's d on the
/// shared prompts against the reference's `multi` section, and pair (0, 1) byte-identical to the
/// two-run comparison.
#[test]
fn three_runs_match_the_reference_pair_by_pair() {
    let planted = "fixtures/stats/planted/trace.jsonl";
    let null = "fixtures/stats/null/trace.jsonl";
    let out = many(
        &["planted", "null", "planted_prompt"],
        &[planted, null, planted],
        2000,
    );
    let r = &out.report;
    assert_eq!(r.schema_version, 1);
    assert_eq!(r.models.len(), 3);
    assert_eq!(
        r.pairs.iter().map(|p| (p.a, p.b)).collect::<Vec<_>>(),
        vec![(0, 1), (0, 2), (1, 2)]
    );
    assert!(r.not_shared.iter().all(|v| v.is_empty()));
    for (k, name) in [
        "planted_vs_null",
        "planted_vs_planted_prompt",
        "null_vs_planted_prompt",
    ]
    .iter()
    .enumerate()
    {
        check_case(name, &out.pairs[k], 2000);
        assert_eq!(out.pairs[k].report, r.pairs[k].comparison);
    }
    let exp = &expected()["multi"]["planted_null_prompt"];
    assert_eq!(r.shared_prompts as u64, exp["shared"].as_u64().unwrap());
    for (key, m) in [("rsa", &r.matrices.rsa), ("cka", &r.matrices.cka)] {
        for i in 0..3 {
            assert_eq!(m[i][i], None, "{key} diagonal");
            for j in 0..3 {
                close(&format!("{key}[{i}][{j}]"), m[i][j], &exp[key][i][j]);
                assert_eq!(m[i][j], m[j][i], "{key} symmetric");
            }
        }
    }
    for i in 0..3 {
        close(
            &format!("d_shared[{i}]"),
            r.separation[i].cohens_d_shared,
            &exp["cohens_d_shared"][i],
        );
        assert_eq!(r.separation[i].per_category.len(), r.categories.len());
        let p = r.matrices.mantel_p[i][(i + 1) % 3].unwrap();
        assert!(p > 0.0 && p <= 1.0);
    }
    // The planted runs agree with each other (positive control) and not with the null run.
    assert!(r.matrices.rsa[0][2].unwrap() > 0.9 && r.matrices.mantel_p[0][2].unwrap() < 0.01);
    assert!(r.matrices.rsa[0][1].unwrap().abs() < 0.15);
    // Every pair has the same architecture: matching and matched drift for each.
    for p in &r.pairs {
        assert!(
            p.comparison.matched_drift.done().is_some(),
            "{}-{}",
            p.a,
            p.b
        );
    }
    // Pair (0, 1) is exactly the two-run comparison of those runs.
    let two = run("planted", "null", Some((planted, null)), 2000);
    assert_eq!(
        serde_json::to_string(&two.report).unwrap(),
        serde_json::to_string(&r.pairs[0].comparison).unwrap()
    );
}

/// Prompts missing from one run are left out of every pair and listed per run; too few runs,
/// trace lists of the wrong length and too few shared prompts are clear errors.
#[test]
fn n_run_shared_prompts_and_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = fixture("crossmodel");
    // Copies of `null` with only its first k prompts.
    let cut_copy = |k: usize| -> (PathBuf, Vec<Value>) {
        let cut = tmp.path().join(format!("cut{k}"));
        std::fs::create_dir_all(&cut).unwrap();
        let mut res: Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("null/results.json")).unwrap())
                .unwrap();
        let ids = res["prompt_ids"].as_array().unwrap().clone();
        res["prompt_ids"] = Value::Array(ids[..k].to_vec());
        std::fs::write(cut.join("results.json"), res.to_string()).unwrap();
        let text = std::fs::read_to_string(dir.join("null/signatures.csv")).unwrap();
        std::fs::write(
            cut.join("signatures.csv"),
            text.lines().take(k + 1).collect::<Vec<_>>().join("\n") + "\n",
        )
        .unwrap();
        (cut, ids)
    };
    let (cut, ids) = cut_copy(35);
    let opts = |runs: Vec<PathBuf>, traces: Vec<Option<PathBuf>>| {
        moe_xray_pipeline::compare_models::CompareManyOptions {
            runs,
            traces,
            stats: CrossModelOptions { reps: 50, seed: 0 },
        }
    };
    let out = moe_xray_pipeline::compare_models::compare_many(
        &opts(
            vec![dir.join("planted"), cut.clone(), dir.join("planted_prompt")],
            vec![],
        ),
        &Quiet,
    )
    .unwrap();
    let r = &out.report;
    assert_eq!(r.shared_prompts, 35);
    let mut missing: Vec<String> = ids[35..]
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    missing.sort();
    let sorted = |v: &Vec<String>| {
        let mut v = v.clone();
        v.sort();
        v
    };
    let got: Vec<Vec<String>> = r.not_shared.iter().map(sorted).collect();
    assert_eq!(got, vec![missing.clone(), vec![], missing.clone()]);
    // Pair (0, 2) shares all 40 prompts, but only the 35 of every run are compared.
    assert_eq!(r.pairs[1].comparison.shared_prompts, 35);
    assert_eq!(sorted(&r.pairs[1].comparison.only_in_b), missing);
    assert!(r.pairs[1]
        .comparison
        .matched_drift
        .why_missing()
        .unwrap()
        .contains("no traces"));
    let err = |o| {
        moe_xray_pipeline::compare_models::compare_many(&o, &Quiet)
            .err()
            .unwrap()
            .to_string()
    };
    let e = err(opts(vec![dir.join("planted")], vec![]));
    assert!(e.contains("takes 2 to"), "{e}");
    let e = err(opts(
        vec![
            dir.join("planted"),
            dir.join("null"),
            dir.join("planted_prompt"),
        ],
        vec![None],
    ));
    assert!(e.contains("one per run"), "{e}");
    let e = err(opts(vec![dir.join("planted"), cut_copy(2).0], vec![]));
    assert!(e.contains("2 shared prompts"), "{e}");
}
