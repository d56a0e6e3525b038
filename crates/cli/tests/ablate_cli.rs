//! `moe-xray ablate` end to end on a tiny synthetic checkpoint: ablation.json is written, valid
//! against its types, byte-identical at 1 and 2 threads; bad options are refused before any work.

mod common;

use common::{moe_xray, s, stderr};
use moe_xray_stats::ablation::AblationResults;

fn prompts(dir: &std::path::Path) -> std::path::PathBuf {
    let p = dir.join("prompts.jsonl");
    let lines = [
        r#"{"id":"m1","category":"math","text":"What is 12 plus 30 divided by 6?"}"#,
        r#"{"id":"m2","category":"math","text":"Solve the equation 3x + 5 = 20 for x."}"#,
        r#"{"id":"c1","category":"code","text":"Write a Python function that returns the sum of a list."}"#,
        r#"{"id":"c2","category":"code","text":"How do I reverse a string in JavaScript?"}"#,
    ];
    std::fs::write(&p, lines.join("\n") + "\n").unwrap();
    p
}

#[test]
fn ablate_writes_a_reproducible_ablation_json() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("model");
    let o = moe_xray(&[
        "synth-model",
        "--preset",
        "tiny",
        "--planted",
        "--out",
        s(&model),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let p = prompts(tmp.path());
    let run = |out: &std::path::Path, threads: &str| {
        let o = moe_xray(&[
            "ablate",
            "--model",
            s(&model),
            "--prompts",
            s(&p),
            "--out",
            s(out),
            "--n",
            "1,2",
            "--control-draws",
            "1",
            "--max-new-tokens",
            "3",
            "--boot-reps",
            "50",
            "--perm-reps",
            "50",
            "--threads",
            threads,
            "--json",
            "--quiet",
        ]);
        assert!(o.status.success(), "{}", stderr(&o));
        let summary: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(summary["prompts"], 4);
        assert_eq!(summary["passes"], 1 + 2 * 2 * 2);
        std::fs::read(out.join("ablation.json")).unwrap()
    };
    let a = run(&tmp.path().join("a"), "1");
    let b = run(&tmp.path().join("b"), "2");
    assert!(a == b, "ablation.json differs between 1 and 2 threads");
    for out in ["a", "b"] {
        let dir = tmp.path().join(out);
        let m1 = std::fs::read_to_string(dir.join("ablation_matrix_n1.svg")).unwrap();
        assert!(m1.starts_with("<svg") && m1.contains("fig-ablation-matrix"));
        assert_eq!(m1.matches(r#"class="cell""#).count(), 4);
        assert!(dir.join("ablation_matrix_n2.svg").exists());
        let dr = std::fs::read_to_string(dir.join("ablation_dose_response.svg")).unwrap();
        assert!(dr.contains("fig-ablation-dose") && dr.contains(r#"class="own""#));
    }
    assert_eq!(
        std::fs::read(tmp.path().join("a/ablation_matrix_n2.svg")).unwrap(),
        std::fs::read(tmp.path().join("b/ablation_matrix_n2.svg")).unwrap()
    );
    let r: AblationResults = serde_json::from_slice(&a).unwrap();
    assert_eq!(r.categories, vec!["math", "code"]);
    assert_eq!(r.doses.len(), 2);
    for d in &r.doses {
        assert_eq!(d.cells.len(), 4);
        for m in &d.masked {
            assert!(m.characteristic.iter().all(|l| l.len() == d.n));
        }
        for c in &d.cells {
            assert!(c.p_excess > 0.0 && c.p_excess <= 1.0);
            assert!(c.delta_nll.ci95[0] <= c.delta_nll.mean + 1e-12);
            assert!(c.delta_nll.ci95[1] >= c.delta_nll.mean - 1e-12);
            assert!((0.0..=1.0).contains(&c.agreement));
        }
    }
    assert_eq!(r.continuation_tokens, vec![3; 4]);
}

#[test]
fn ablate_refuses_bad_doses_and_single_category_sets() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("model");
    assert!(
        moe_xray(&["synth-model", "--preset", "tiny", "--out", s(&model)])
            .status
            .success()
    );
    let p = prompts(tmp.path());
    let out = tmp.path().join("out");
    // tiny: 8 experts, top-2 -> at most 6 per layer can be masked (and 4 with a control)
    for (n, want) in [
        ("0", "at least 1"),
        ("7", "at most 6"),
        ("5", "load-matched control"),
    ] {
        let o = moe_xray(&[
            "ablate",
            "--model",
            s(&model),
            "--prompts",
            s(&p),
            "--out",
            s(&out),
            "--n",
            n,
            "--quiet",
        ]);
        assert!(!o.status.success());
        assert!(stderr(&o).contains(want), "--n {n}: {}", stderr(&o));
    }
    let one = tmp.path().join("one.jsonl");
    std::fs::write(
        &one,
        "{\"id\":\"a\",\"category\":\"x\",\"text\":\"hello there\"}\n",
    )
    .unwrap();
    let o = moe_xray(&[
        "ablate",
        "--model",
        s(&model),
        "--prompts",
        s(&one),
        "--out",
        s(&out),
        "--quiet",
    ]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("two categories"), "{}", stderr(&o));
    assert!(!out.join("ablation.json").exists());
}
