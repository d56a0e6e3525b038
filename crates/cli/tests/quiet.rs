//! `--quiet` on `synth-model` and `run`: no summary, no progress, and the same output bytes.
//! (`analyze`, `health` and `compare` are covered in tests/analyze.rs and tests/health.rs.)

use std::path::Path;
use std::process::Command;

fn files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let p = e.unwrap().path();
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            (name, std::fs::read(&p).unwrap())
        })
        .collect();
    v.sort();
    v
}

#[test]
fn synth_model_quiet_prints_nothing_and_writes_the_same_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let mut outs = Vec::new();
    for quiet in [false, true] {
        let dir = tmp.path().join(format!("m{quiet}"));
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_moe-xray"));
        cmd.args(["synth-model", "--out", dir.to_str().unwrap()]);
        if quiet {
            cmd.arg("--quiet");
        }
        let o = cmd.output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        assert_eq!(
            o.stdout.is_empty(),
            quiet,
            "{}",
            String::from_utf8_lossy(&o.stdout)
        );
        // stderr is not a terminal here: the spinner draws nothing.
        assert!(
            o.stderr.is_empty(),
            "{}",
            String::from_utf8_lossy(&o.stderr)
        );
        outs.push(files(&dir));
    }
    assert!(!outs[0].is_empty());
    assert!(outs[0] == outs[1], "--quiet changed the checkpoint");
}

#[test]
fn run_quiet_prints_nothing_and_writes_the_same_study() {
    let tmp = tempfile::tempdir().unwrap();
    let model = moe_xray_test_support::fixture("hf/olmoe-tiny-mha-f32");
    let prompts = moe_xray_test_support::fixture("hf/prompts.jsonl");
    let mut outs = Vec::new();
    for quiet in [false, true] {
        // The same relative --out in two working directories: the outputs may name it.
        let cwd = tmp.path().join(format!("w{quiet}"));
        std::fs::create_dir(&cwd).unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_moe-xray"));
        cmd.current_dir(&cwd).arg("run").arg("--model").arg(&model);
        cmd.arg("--prompts").arg(&prompts);
        cmd.args(["--max-new-tokens", "2", "--reps", "10", "--out", "study"]);
        if quiet {
            cmd.arg("--quiet");
        }
        let o = cmd.output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let stdout = String::from_utf8_lossy(&o.stdout);
        if quiet {
            assert!(o.stdout.is_empty(), "{stdout}");
            assert!(
                o.stderr.is_empty(),
                "{}",
                String::from_utf8_lossy(&o.stderr)
            );
        } else {
            assert!(stdout.contains("report: study/report.html"), "{stdout}");
        }
        let dir = cwd.join("study");
        outs.push((
            files(&dir.join("traces")),
            std::fs::read(dir.join("results.json")).unwrap(),
            std::fs::read(dir.join("health.json")).unwrap(),
        ));
    }
    assert!(outs[0] == outs[1], "--quiet changed an output file");
}
