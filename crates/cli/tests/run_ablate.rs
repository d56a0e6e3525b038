//! `run --ablate` end to end on the planted positive control (`synth-model --preset tiny
//! --planted`): the ablation runs after the analysis on the same model and prompts, its
//! `ablation.json` and figures appear with the study's outputs, the report shows the "Expert
//! ablation" section, and the outputs do not depend on the thread count.

use std::path::Path;
use std::process::Command;

use moe_xray_test_support::repo_root;

fn moe_xray() -> Command {
    Command::new(env!("CARGO_BIN_EXE_moe-xray"))
}

fn ok(cmd: &mut Command) -> String {
    let out = cmd.output().expect("moe-xray runs");
    assert!(
        out.status.success(),
        "failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

fn json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// The four shortest paper80 prompts of each category.
fn prompts(dest: &Path) {
    let text = std::fs::read_to_string(repo_root().join("prompts/paper80.jsonl")).unwrap();
    let mut rows: Vec<(String, usize, String)> = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            let cat = v["category"].as_str().unwrap().to_string();
            (cat, v["text"].as_str().unwrap().len(), l.to_string())
        })
        .collect();
    rows.sort();
    let mut out = String::new();
    let mut cats = std::collections::BTreeMap::<String, usize>::new();
    for (c, _, l) in rows {
        let n = cats.entry(c).or_default();
        if *n < 4 {
            *n += 1;
            out.push_str(&l);
            out.push('\n');
        }
    }
    std::fs::write(dest, out).unwrap();
}

fn run(model: &Path, prompts: &Path, out: &Path, threads: &str) -> String {
    ok(moe_xray()
        .args(["run", "--model"])
        .arg(model)
        .arg("--prompts")
        .arg(prompts)
        .args([
            "--max-new-tokens",
            "4",
            "--reps",
            "50",
            "--threads",
            threads,
            "--ablate",
            "--ablate-n",
            "1,2",
            "--ablate-control-draws",
            "2",
            "--out",
        ])
        .arg(out))
}

#[test]
fn run_ablate_writes_ablation_with_the_study_and_reports_it() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("planted");
    ok(moe_xray()
        .args([
            "synth-model",
            "--preset",
            "tiny",
            "--planted",
            "--quiet",
            "--out",
        ])
        .arg(&model));
    let p = tmp.path().join("prompts.jsonl");
    prompts(&p);

    // --ablate-n without --ablate is refused by the argument parser.
    let out = moe_xray()
        .args(["run", "--model"])
        .arg(&model)
        .args(["--ablate-n", "1", "--out"])
        .arg(tmp.path().join("x"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(!tmp.path().join("x").join("results.json").exists());

    let a = tmp.path().join("a");
    let t = std::time::Instant::now();
    let stdout = run(&model, &p, &a, "2");
    eprintln!("run --ablate: {:.2} s", t.elapsed().as_secs_f64());
    assert!(stdout.contains("report:"), "{stdout}");

    let r = json(&a.join("ablation.json"));
    let doses = r["doses"].as_array().unwrap();
    assert_eq!(doses.len(), 2);
    assert_eq!(doses[0]["n"], 1);
    assert_eq!(doses[1]["n"], 2);
    assert_eq!(r["settings"]["control_draws"], 2);
    assert_eq!(r["settings"]["boot_reps"], 50);
    assert_eq!(r["settings"]["max_new_tokens"], 4);
    // the same prompts as the study, in the same order
    let study = json(&a.join("results.json"));
    assert_eq!(r["prompt_ids"], study["prompt_ids"]);
    assert_eq!(r["categories"].as_array().unwrap().len(), 4);
    // 1 unablated pass + 2 doses × 4 categories × (1 + 2 draws)
    assert_eq!(r["passes"], 25);
    for f in [
        "figures/ablation_matrix_n1.svg",
        "figures/ablation_matrix_n2.svg",
        "figures/ablation_dose_response.svg",
    ] {
        let svg = std::fs::read_to_string(a.join(f)).unwrap();
        assert!(svg.starts_with("<svg"), "{f}");
    }
    // The planted positive control: masking a category's own experts hurts its prompts more
    // than it hurts the other categories.
    let (diag, off) = (
        doses[1]["diagonal_excess"].as_f64().unwrap(),
        doses[1]["off_diagonal_excess"].as_f64().unwrap(),
    );
    eprintln!("n = 2: diagonal excess {diag}, off-diagonal {off}");
    assert!(diag > off, "diagonal {diag} vs off-diagonal {off}");

    let report = std::fs::read_to_string(a.join("report.html")).unwrap();
    for needle in [
        "<section id=\"expert-ablation\">",
        "href=\"#expert-ablation\"",
        "id=\"fig-ablation-matrix\"",
        "id=\"fig-ablation-dose\"",
        "Causal effect matrix (n = 2)",
        "<table class=\"ablation\">",
    ] {
        assert!(report.contains(needle), "{needle} missing from report.html");
    }

    // One thread: the same bytes (paths aside).
    let b = tmp.path().join("b");
    run(&model, &p, &b, "1");
    for f in [
        "ablation.json",
        "figures/ablation_matrix_n2.svg",
        "figures/ablation_dose_response.svg",
        "results.json",
    ] {
        let x = std::fs::read_to_string(a.join(f)).unwrap();
        let y = std::fs::read_to_string(b.join(f)).unwrap();
        let y = y.replace(b.to_str().unwrap(), a.to_str().unwrap());
        assert_eq!(x, y, "{f} differs between 1 and 2 threads");
    }
}
