//! Hostile use of the command line (issue 14): concurrent writers on one output directory,
//! a full disk, a damaged `generations.jsonl` under `--resume`, absurd `--threads`, duplicated OS
//! errors, and every subcommand on a missing input and an unwritable output.

use moe_xray_test_support::fixture;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};
mod common;
use common::{s, stderr};

/// The binary under test; `MOE_XRAY_TEST_BIN` points the tests at another build (e.g. the
/// pre-issue-14 one, to see that they catch what they are about).
fn bin() -> PathBuf {
    std::env::var_os("MOE_XRAY_TEST_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_moe-xray")))
}

fn moe(args: &[&str]) -> Output {
    Command::new(bin()).args(args).output().unwrap()
}

fn ok(o: &Output) {
    assert!(o.status.success(), "stderr: {}", stderr(o));
}

/// Exit code non-zero, an `error:` line, no panic.
fn fails_cleanly(o: &Output) -> String {
    let e = stderr(o);
    assert!(!o.status.success(), "unexpected success; stderr: {e}");
    assert_eq!(o.status.code(), Some(1), "stderr: {e}");
    assert!(
        !e.contains("panicked") && !e.contains("RUST_BACKTRACE"),
        "{e}"
    );
    assert!(e.contains("error: "), "{e}");
    e
}

/// The entries of `dir` (sorted names), or an empty list when it does not exist.
fn listing(dir: &Path) -> Vec<String> {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut v: Vec<String> = rd
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// All files under `dir` with their bytes, relative paths sorted.
fn tree(dir: &Path) -> Vec<(String, Vec<u8>)> {
    fn walk(root: &Path, d: &Path, out: &mut Vec<(String, Vec<u8>)>) {
        for e in std::fs::read_dir(d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(root, &p, out);
            } else {
                let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
                out.push((rel, std::fs::read(&p).unwrap()));
            }
        }
    }
    let mut v = Vec::new();
    walk(dir, dir, &mut v);
    v.sort();
    v
}

/// A tiny synthetic checkpoint (vocab 512, 2 layers, 8 experts) in `dir/model`.
fn tiny_model(dir: &Path) -> PathBuf {
    let m = dir.join("model");
    ok(&moe(&["synth-model", "--preset", "tiny", "--out", s(&m)]));
    m
}

/// A prompt file of `n` prompts in four categories.
fn prompt_file(dir: &Path, n: usize) -> PathBuf {
    let cats = ["math", "code", "story", "question"];
    let mut text = String::new();
    for i in 0..n {
        let c = cats[i % 4];
        text.push_str(
            &serde_json::json!({
                "id": format!("p{i:03}"),
                "category": c,
                "text": format!("Prompt number {i} about {c}: please continue this text for a while."),
            })
            .to_string(),
        );
        text.push('\n');
    }
    let p = dir.join(format!("prompts{n}.jsonl"));
    std::fs::write(&p, text).unwrap();
    p
}

fn trace_cmd(model: &Path, prompts: &Path, out: &Path, extra: &[&str]) -> Command {
    let mut c = Command::new(bin());
    c.args([
        "trace",
        "--model",
        s(model),
        "--prompts",
        s(prompts),
        "--out",
        s(out),
        "--quiet",
    ])
    .args(extra);
    c
}

// ---------------------------------------------------------------------------------------------
// 1. Two writers on one output directory.

#[test]
fn concurrent_traces_on_one_out_one_wins_the_other_fails_fast() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(tmp.path());
    let prompts = prompt_file(tmp.path(), 128);
    let out = tmp.path().join("out");
    let spawn = || {
        trace_cmd(
            &model,
            &prompts,
            &out,
            &["--max-new-tokens", "48", "--threads", "1"],
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
    };
    let t0 = Instant::now();
    let a = spawn();
    let b = spawn();
    let (a, b) = (a.wait_with_output().unwrap(), b.wait_with_output().unwrap());
    let wall = t0.elapsed();
    let (winner, loser) = match (a.status.success(), b.status.success()) {
        (true, false) => (a, b),
        (false, true) => (b, a),
        _ => panic!(
            "exactly one writer must succeed; stderr A: {}\nstderr B: {}",
            stderr(&a),
            stderr(&b)
        ),
    };
    let _ = winner;
    let e = fails_cleanly(&loser);
    assert!(
        e.contains("another moe-xray process is writing to this directory") && e.contains(s(&out)),
        "{e}"
    );
    // The survivor's trace parses completely: every prompt, every line valid JSON.
    let trace = std::fs::read_to_string(out.join("trace.jsonl")).unwrap();
    let mut ids = std::collections::BTreeSet::new();
    for (i, line) in trace.lines().enumerate() {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("trace.jsonl:{}: {e}", i + 1));
        ids.insert(v["prompt_id"].as_str().unwrap().to_string());
    }
    assert_eq!(ids.len(), 128);
    let gens = std::fs::read_to_string(out.join("generations.jsonl")).unwrap();
    assert_eq!(gens.lines().count(), 128);
    // and moe-xray's own reader accepts it
    ok(&moe(&["health", s(&out.join("trace.jsonl"))]));
    // no lock or temporary file is left behind
    assert_eq!(
        listing(&out),
        ["generations.jsonl", "manifest.json", "trace.jsonl"]
    );
    eprintln!("two concurrent traces: {:.1} s", wall.as_secs_f64());
}

/// While another process holds an output directory's lock (here: this test, through the same
/// `flock` the tool uses), every writing command refuses it at once, names it and writes nothing.
#[test]
fn every_writer_is_refused_while_the_lock_is_held() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(tmp.path());
    let prompts = prompt_file(tmp.path(), 4);
    let trace = fixture("").join("stats/null/trace.jsonl");
    let out = tmp.path().join("out");
    std::fs::create_dir(&out).unwrap();
    let hold = |path: &Path| {
        let f = std::fs::File::create(path).unwrap();
        f.try_lock().unwrap();
        f
    };
    let lock = hold(&out.join(".moe-xray.lock"));
    let (m, p, t, o) = (s(&model), s(&prompts), s(&trace), s(&out));
    for args in [
        vec!["trace", "--model", m, "--prompts", p, "--out", o],
        vec![
            "trace",
            "--model",
            m,
            "--prompts",
            p,
            "--out",
            o,
            "--resume",
        ],
        vec![
            "run",
            "--model",
            m,
            "--prompts",
            p,
            "--reps",
            "5",
            "--out",
            o,
        ],
        vec!["demo", "--out", o],
        vec!["analyze", t, "--reps", "5", "--out", o],
        vec!["health", t, "--csv", o],
        vec!["health", t, "--svg", o],
    ] {
        let t0 = Instant::now();
        let e = fails_cleanly(&moe(&args));
        assert!(
            e.contains(&format!(
                "{o}: another moe-xray process is writing to this directory"
            )),
            "{args:?}: {e}"
        );
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "{args:?} was not refused at once"
        );
        assert_eq!(
            listing(&out),
            [".moe-xray.lock"],
            "{args:?} wrote into the locked directory"
        );
    }
    drop(lock);
    // synth-model locks beside the checkpoint directory it replaces
    let beside = hold(&tmp.path().join(".model2.moe-xray.lock"));
    let e = fails_cleanly(&moe(&[
        "synth-model",
        "--out",
        s(&tmp.path().join("model2")),
    ]));
    assert!(e.contains("another moe-xray process"), "{e}");
    assert!(!tmp.path().join("model2").exists());
    drop(beside);
    // once released, the same commands work, and leave no lock file behind
    ok(&moe(&["analyze", t, "--reps", "5", "--out", o]));
    assert_eq!(
        listing(&out),
        ["prompt_similarity.csv", "results.json", "signatures.csv"]
    );
}

// ---------------------------------------------------------------------------------------------
// 2. All-or-nothing outputs on a full disk.

/// Mounts a tmpfs of `kib` KiB on `dir`; None (with the reason printed) where that is not allowed.
fn mount_tmpfs(dir: &Path, kib: u64) -> Option<Unmount> {
    std::fs::create_dir_all(dir).unwrap();
    let o = Command::new("mount")
        .args([
            "-t",
            "tmpfs",
            "-o",
            &format!("size={kib}k"),
            "tmpfs",
            s(dir),
        ])
        .output();
    match o {
        Ok(o) if o.status.success() => Some(Unmount(dir.to_path_buf())),
        Ok(o) => {
            eprintln!(
                "SKIPPED: cannot mount a tmpfs on {} ({}): disk-full test not run",
                dir.display(),
                stderr(&o).trim()
            );
            None
        }
        Err(e) => {
            eprintln!("SKIPPED: cannot run mount ({e}): disk-full test not run");
            None
        }
    }
}

struct Unmount(PathBuf);
impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn full_disk_leaves_no_partial_output_set() {
    let tmp = tempfile::tempdir().unwrap();
    let trace = fixture("").join("stats/paper_shape/trace.jsonl");
    // The full output set on an ordinary disk, to size the small one.
    let full = tmp.path().join("full");
    let args = |out: &Path| {
        vec![
            "analyze".to_string(),
            s(&trace).to_string(),
            "--reps".into(),
            "20".into(),
            "--classifier-perm-reps".into(),
            "5".into(),
            "--out".into(),
            s(out).to_string(),
        ]
    };
    let a: Vec<String> = args(&full);
    ok(&Command::new(bin()).args(&a).output().unwrap());
    let sizes: Vec<(String, u64)> = listing(&full)
        .into_iter()
        .map(|n| {
            let len = std::fs::metadata(full.join(&n)).unwrap().len();
            (n, len)
        })
        .collect();
    let total: u64 = sizes.iter().map(|x| x.1).sum();
    assert!(total > 64 * 1024, "{sizes:?}");
    // A disk that holds about half of it: the first CSV fits, the set does not.
    let kib = (total / 2 / 1024).max(16);
    let mnt = tmp.path().join("small");
    let Some(_guard) = mount_tmpfs(&mnt, kib) else {
        return;
    };
    // (a) a new output directory: nothing at all appears
    let out = mnt.join("analysis");
    let o = Command::new(bin()).args(args(&out)).output().unwrap();
    let e = fails_cleanly(&o);
    assert!(e.contains("No space left on device"), "{e}");
    assert_eq!(e.matches("No space left on device").count(), 1, "{e}");
    assert!(e.contains(s(&out)), "{e}");
    assert!(!out.exists(), "partial output: {:?}", listing(&out));
    assert!(listing(&mnt).is_empty(), "{:?}", listing(&mnt));
    // (b) an existing directory with an earlier result: it is left exactly as it was
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("results.json"), "{\"earlier\": true}\n").unwrap();
    let o = Command::new(bin()).args(args(&out)).output().unwrap();
    fails_cleanly(&o);
    assert_eq!(listing(&out), ["results.json"]);
    assert_eq!(
        std::fs::read_to_string(out.join("results.json")).unwrap(),
        "{\"earlier\": true}\n"
    );
    // (c) health's CSV and SVG directories
    let o = moe(&[
        "health",
        s(&trace),
        "--csv",
        s(&mnt.join("csv")),
        "--svg",
        s(&mnt.join("svg")),
        "--json",
        s(&mnt.join("health.json")),
    ]);
    // the health outputs of this trace are small: they may fit; if they do not, nothing appears
    if o.status.success() {
        assert!(mnt.join("health.json").is_file());
    } else {
        fails_cleanly(&o);
        assert_eq!(listing(&mnt), ["analysis"]);
    }
}

// ---------------------------------------------------------------------------------------------
// 3. --resume with a generations.jsonl that lost lines.

fn drop_last_lines(path: &Path, n: usize) {
    let text = std::fs::read_to_string(path).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let keep = &lines[..lines.len() - n];
    let mut t = keep.join("\n");
    if !t.is_empty() {
        t.push('\n');
    }
    std::fs::write(path, t).unwrap();
}

#[test]
fn resume_redoes_prompts_whose_generation_line_was_lost() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(tmp.path());
    let prompts = prompt_file(tmp.path(), 6);
    for (extra, lost) in [
        (vec!["--compress", "gz"], 1usize),
        (vec!["--compress", "zst", "--mode", "counts"], 2),
        (vec!["--batch-size", "2"], 3),
    ] {
        let full = tmp.path().join(format!("full-{lost}"));
        let mut args = vec!["--max-new-tokens", "5"];
        args.extend(&extra);
        ok(&trace_cmd(&model, &prompts, &full, &args).output().unwrap());
        let reference = tree(&full);
        let cut = tmp.path().join(format!("cut-{lost}"));
        std::fs::create_dir(&cut).unwrap();
        for (name, bytes) in &reference {
            std::fs::write(cut.join(name), bytes).unwrap();
        }
        drop_last_lines(&cut.join("generations.jsonl"), lost);
        // torn last line as well (a partial line without newline)
        if lost == 2 {
            let mut g = std::fs::read(cut.join("generations.jsonl")).unwrap();
            g.extend_from_slice(b"{\"prompt_id\":\"p0");
            std::fs::write(cut.join("generations.jsonl"), g).unwrap();
        }
        let mut rargs = args.clone();
        rargs.push("--resume");
        let o = trace_cmd(&model, &prompts, &cut, &rargs).output().unwrap();
        ok(&o);
        let resumed = tree(&cut);
        let names = |t: &[(String, Vec<u8>)]| t.iter().map(|x| x.0.clone()).collect::<Vec<_>>();
        assert_eq!(names(&resumed), names(&reference), "{extra:?}");
        for ((name, got), (_, want)) in resumed.iter().zip(&reference) {
            assert!(
                got == want,
                "{extra:?}: {name} differs from an uninterrupted run's ({} vs {} bytes)",
                got.len(),
                want.len()
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// 4. Thread counts.

#[test]
fn absurd_thread_counts_are_refused_on_every_command() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(tmp.path());
    let prompts = prompt_file(tmp.path(), 2);
    let out = tmp.path().join("out");
    for threads in ["100000", "0", "1025"] {
        for cmd in [
            vec![
                "trace",
                "--model",
                s(&model),
                "--prompts",
                s(&prompts),
                "--out",
                s(&out),
            ],
            vec![
                "run",
                "--model",
                s(&model),
                "--prompts",
                s(&prompts),
                "--out",
                s(&out),
            ],
            vec!["demo", "--out", s(&out)],
            vec!["bench", "model", "--model", s(&model), "-n", "1"],
        ] {
            let mut a = cmd.clone();
            a.extend(["--threads", threads]);
            let e = fails_cleanly(&moe(&a));
            assert!(
                e.contains(&format!("--threads {threads}: must be between 1 and 1024")),
                "{cmd:?}: {e}"
            );
            assert!(!out.exists(), "{cmd:?} wrote {:?}", listing(&out));
        }
    }
    // rayon's own variable, on a command without --threads
    let o = Command::new(bin())
        .env("RAYON_NUM_THREADS", "100000")
        .args([
            "analyze",
            s(&fixture("").join("stats/null/trace.jsonl")),
            "--out",
            s(&out),
        ])
        .output()
        .unwrap();
    let e = fails_cleanly(&o);
    assert!(e.contains("RAYON_NUM_THREADS=100000"), "{e}");
    assert!(!out.exists());
    // the largest accepted value works
    ok(&moe(&[
        "trace",
        "--model",
        s(&model),
        "--prompts",
        s(&prompts),
        "--out",
        s(&out),
        "--max-new-tokens",
        "2",
        "--threads",
        "1024",
        "--quiet",
    ]));
}

// ---------------------------------------------------------------------------------------------
// 5. An OS error is reported once.

#[test]
fn os_errors_are_not_repeated() {
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("missing.jsonl");
    let out = tmp.path().join("out");
    let o = moe(&["analyze", s(&missing), "--out", s(&out)]);
    let e = fails_cleanly(&o);
    assert_eq!(
        e,
        format!(
            "error: {}: No such file or directory (os error 2)\n",
            missing.display()
        )
    );
    for args in [
        vec!["health", s(&missing)],
        vec!["compare", s(&missing), s(&missing)],
        vec![
            "trace",
            "--model",
            s(&missing),
            "--prompts",
            s(&missing),
            "--out",
            s(&out),
        ],
    ] {
        let e = fails_cleanly(&moe(&args));
        let n = e.matches("os error 2").count() + e.matches("no such file").count();
        assert!(n <= 1, "{args:?}: {e}");
    }
}

// ---------------------------------------------------------------------------------------------
// 6. Every subcommand on a missing input and on an unwritable output.

#[test]
fn every_command_fails_cleanly_on_missing_input_and_unwritable_output() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(tmp.path());
    let prompts = prompt_file(tmp.path(), 2);
    let trace = fixture("").join("stats/null/trace.jsonl");
    let missing = tmp.path().join("missing");
    // A regular file where a directory is expected: no command can write below it (as root too).
    let blocker = tmp.path().join("blocker");
    std::fs::write(&blocker, "not a directory").unwrap();
    let bad_out = blocker.join("out");
    let out = tmp.path().join("out");
    let m = s(&model);
    let p = s(&prompts);
    let t = s(&trace);
    let mi = s(&missing);
    let o = s(&out);
    let bo = s(&bad_out);
    let bad_input: Vec<Vec<&str>> = vec![
        vec!["analyze", mi, "--out", o],
        vec!["analyze", t, "--prompts", mi, "--out", o],
        vec!["trace", "--model", mi, "--prompts", p, "--out", o],
        vec!["trace", "--model", m, "--prompts", mi, "--out", o],
        vec!["run", "--model", mi, "--prompts", p, "--out", o],
        vec!["run", "--model", m, "--prompts", mi, "--out", o],
        vec!["health", mi, "--csv", o],
        vec!["compare", mi, t, "--json", o],
        vec!["compare", t, mi, "--csv", o],
        vec!["synth-model", "--out", o, "--preset", "no-such-preset"],
        vec!["bench", "model", "--model", mi],
    ];
    for a in &bad_input {
        let e = fails_cleanly(&moe(a));
        if !a.contains(&"synth-model") {
            assert!(
                e.contains(mi),
                "{a:?}: the error does not name the file: {e}"
            );
        }
        assert!(!out.exists(), "{a:?} left {:?}", listing(&out));
    }
    let bad_output: Vec<Vec<&str>> = vec![
        vec!["analyze", t, "--reps", "5", "--out", bo],
        vec!["trace", "--model", m, "--prompts", p, "--out", bo],
        vec![
            "run",
            "--model",
            m,
            "--prompts",
            p,
            "--reps",
            "5",
            "--out",
            bo,
        ],
        vec!["demo", "--out", bo],
        vec!["health", t, "--csv", bo],
        vec!["health", t, "--svg", bo],
        vec!["health", t, "--json", bo],
        vec!["compare", t, t, "--json", bo],
        vec!["compare", t, t, "--svg", bo],
        vec!["compare", t, t, "--csv", bo],
        vec!["synth-model", "--out", bo],
        vec!["bench", "model", "--model", m, "-n", "1", "--scratch", bo],
    ];
    for a in &bad_output {
        let e = fails_cleanly(&moe(a));
        assert!(
            e.contains(s(&blocker)),
            "{a:?}: the error does not name the output: {e}"
        );
    }
    // nothing was written anywhere but the model and the prompt file
    assert_eq!(
        listing(tmp.path()),
        ["blocker", "model", "prompts2.jsonl"],
        "leftovers"
    );
    assert_eq!(
        std::fs::read_to_string(&blocker).unwrap(),
        "not a directory"
    );
}

/// compare writes its files together: one unwritable destination, none of them appears.
#[test]
fn compare_outputs_appear_together_or_not_at_all() {
    let tmp = tempfile::tempdir().unwrap();
    let t = fixture("").join("stats/null/trace.jsonl");
    let blocker = tmp.path().join("blocker");
    std::fs::write(&blocker, "x").unwrap();
    let json = tmp.path().join("c.json");
    let o = moe(&[
        "compare",
        s(&t),
        s(&t),
        "--reps",
        "5",
        "--json",
        s(&json),
        "--csv",
        s(&blocker.join("c.csv")),
    ]);
    fails_cleanly(&o);
    assert_eq!(listing(tmp.path()), ["blocker"]);
    let o = moe(&[
        "compare",
        s(&t),
        s(&t),
        "--reps",
        "5",
        "--json",
        s(&json),
        "--csv",
        s(&tmp.path().join("c.csv")),
    ]);
    ok(&o);
    assert_eq!(listing(tmp.path()), ["blocker", "c.csv", "c.json"]);
}
