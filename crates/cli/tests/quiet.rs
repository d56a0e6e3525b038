//! `--quiet` on `synth-model`: no summary, no progress, and the same checkpoint bytes.
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
