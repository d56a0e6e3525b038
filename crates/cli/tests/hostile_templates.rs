//! Chat templates that exhaust memory or time (issue 14, "Chat templates without limits"): fuel
//! cannot stop a template that builds a huge intermediate string, so `trace` renders every prompt
//! in one child process with an address-space limit and a wall-time limit
//! (`moe_xray_model::chat::ChatTemplate::render_all_sandboxed`). A hostile template gives one
//! clear error naming the template's file and the reason, a non-zero exit, no panic or abort and
//! no output; valid templates render byte-identically to in-process rendering.

use moe_xray_model::chat::{ChatTemplate, Message, Sandbox, RENDER_SUBCOMMAND};
use moe_xray_test_support::fixture;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
mod common;
use common::s;

fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_moe-xray"))
}

/// A private copy of fixture model `olmoe-tiny-mha-f32` in `dir` whose chat template is `template`.
fn model_with_template(dir: &Path, template: &str) -> PathBuf {
    let src = fixture("hf").join("olmoe-tiny-mha-f32");
    let dst = dir.join("model");
    std::fs::create_dir_all(&dst).unwrap();
    for e in std::fs::read_dir(&src).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
    }
    let cfg = dst.join("tokenizer_config.json");
    let mut v: Value = serde_json::from_str(&std::fs::read_to_string(&cfg).unwrap()).unwrap();
    v["chat_template"] = template.into();
    std::fs::write(&cfg, v.to_string()).unwrap();
    dst
}

fn trace(model: &Path, out: &Path) -> Output {
    Command::new(bin())
        .arg("trace")
        .args([
            "--model",
            s(model),
            "--prompts",
            s(&fixture("hf").join("prompts.jsonl")),
            "--out",
            s(out),
            "--chat-template",
            "--max-new-tokens",
            "2",
            "--quiet",
        ])
        .output()
        .unwrap()
}

/// Fails with exit code 1 (not a signal), no panic, a message naming the template's file and
/// containing one of `reasons`, and no output directory content.
fn refused(o: &Output, out: &Path, reasons: &[&str]) -> String {
    let e = String::from_utf8_lossy(&o.stderr).into_owned();
    assert_eq!(o.status.code(), Some(1), "exit status {:?}: {e}", o.status);
    assert!(!e.contains("panicked"), "{e}");
    assert!(e.contains("tokenizer_config.json"), "{e}");
    assert!(
        reasons.iter().any(|r| e.contains(r)),
        "{reasons:?} not in: {e}"
    );
    assert_eq!(e.trim().lines().count(), 1, "one error line: {e}");
    assert!(
        !out.exists() || std::fs::read_dir(out).unwrap().next().is_none(),
        "{} should hold no output",
        out.display()
    );
    e
}

#[test]
fn doubling_templates_fail_with_the_memory_limit() {
    for template in [
        // `~` doubling in a namespace loop: 2^64 bytes within a few hundred instructions.
        "{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}\
         {% endfor %}{{ ns.s|length }}",
        // The same with a recursive macro.
        "{% macro d(s, n) %}{% if n > 0 %}{{ d(s ~ s, n - 1) }}{% else %}{{ s|length }}\
         {% endif %}{% endmacro %}{{ d('x', 64) }}",
        // minijinja's 100 MB cap on `*`, then concatenated.
        "{% set s = 'x' * 100000000 %}{{ (s ~ s ~ s ~ s ~ s ~ s ~ s ~ s ~ s ~ s ~ s ~ s)|length }}",
    ] {
        let d = tempfile::tempdir().unwrap();
        let model = model_with_template(d.path(), template);
        let out = d.path().join("out");
        let t = Instant::now();
        let o = trace(&model, &out);
        let e = refused(&o, &out, &["memory limit"]);
        assert!(e.contains("1024 MiB"), "{e}");
        assert!(t.elapsed() < Duration::from_secs(20), "{:?}", t.elapsed());
    }
}

#[test]
fn heavy_loop_template_fails_on_fuel_or_time() {
    let d = tempfile::tempdir().unwrap();
    let model = model_with_template(
        d.path(),
        "{% for a in range(100000) %}{% for b in range(100000) %}{{ '' }}{% endfor %}{% endfor %}",
    );
    let out = d.path().join("out");
    let t = Instant::now();
    let o = trace(&model, &out);
    refused(&o, &out, &["fuel", "time limit"]);
    assert!(t.elapsed() < Duration::from_secs(20), "{:?}", t.elapsed());
}

#[test]
fn slow_template_is_stopped_at_the_time_limit() {
    // Each iteration allocates and scans 10 MB in one instruction: fuel lasts for hours.
    let t = ChatTemplate::new(
        "{% for i in range(100000) %}{% set x = ('x' * 10000000)|length %}{% endfor %}",
        "",
        "",
    )
    .unwrap();
    let start = Instant::now();
    let e = t
        .render_users_sandboxed(
            &["hi"],
            &Sandbox::with_exe(bin()).time_limit(Duration::from_millis(1500)),
        )
        .unwrap_err()
        .to_string();
    let took = start.elapsed();
    assert!(e.contains("time limit of 1.5 s"), "{e}");
    assert!(e.contains("<inline>"), "{e}");
    assert!(took >= Duration::from_millis(1500), "{took:?}");
    assert!(took < Duration::from_secs(10), "{took:?}");
}

#[test]
fn a_lower_memory_limit_is_enforced() {
    // 300 MB of intermediate strings: fine at the default 1 GiB, refused at 512 MiB.
    let t = ChatTemplate::new(
        "{% set s = 'x' * 100000000 %}{{ (s ~ s ~ s)|length }}",
        "",
        "",
    )
    .unwrap();
    let ok = t
        .render_users_sandboxed(&["hi"], &Sandbox::with_exe(bin()))
        .unwrap();
    assert_eq!(ok, ["300000000"]);
    let e = t
        .render_users_sandboxed(&["hi"], &Sandbox::with_exe(bin()).memory_limit(512 << 20))
        .unwrap_err()
        .to_string();
    assert!(e.contains("memory limit") && e.contains("512 MiB"), "{e}");
}

/// Conversations of `expected_chat.jsonl` plus awkward texts (escapes, control characters,
/// non-ASCII, empty, long).
fn conversations(model: &Path) -> Vec<(Vec<Message>, bool)> {
    let mut convs: Vec<(Vec<Message>, bool)> =
        std::fs::read_to_string(model.join("expected_chat.jsonl"))
            .unwrap()
            .lines()
            .map(|l| {
                let v: Value = serde_json::from_str(l).unwrap();
                (
                    serde_json::from_value(v["messages"].clone()).unwrap(),
                    v["add_generation_prompt"].as_bool().unwrap(),
                )
            })
            .collect();
    let long = "lorem ipsum ".repeat(20_000);
    for text in [
        "",
        "quotes \" and \\ backslashes \\n and {{ braces }} {% raw %}",
        "control \u{0}\u{1}\u{1f}\t\r\n chars",
        "non-ASCII: Grüße, 日本語, emoji 🦀, RTL \u{202e}",
        &long,
    ] {
        for add in [true, false] {
            convs.push((
                vec![
                    Message {
                        role: "system".into(),
                        content: "sys".into(),
                    },
                    Message {
                        role: "user".into(),
                        content: text.into(),
                    },
                ],
                add,
            ));
        }
    }
    convs
}

#[test]
fn sandboxed_rendering_is_identical_to_in_process() {
    let mut checked = 0;
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(fixture("hf"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("tokenizer_config.json").exists())
        .collect();
    // The OLMo tokenizer of the shared data, when it has a chat template.
    let olmo = moe_xray_test_support::repo_root().join("../shared/data/olmo-tokenizer");
    if olmo.join("tokenizer_config.json").exists() {
        dirs.push(olmo);
    } else {
        eprintln!("{}: no tokenizer_config.json, skipped", olmo.display());
    }
    dirs.sort();
    let sandbox = Sandbox::with_exe(bin());
    for dir in &dirs {
        let t = ChatTemplate::from_dir(dir).unwrap();
        let convs = conversations(dir);
        for add in [true, false] {
            let group: Vec<Vec<Message>> = convs
                .iter()
                .filter(|c| c.1 == add)
                .map(|c| c.0.clone())
                .collect();
            let sandboxed = t.render_all_sandboxed(&group, add, &sandbox).unwrap();
            assert_eq!(sandboxed.len(), group.len());
            for (conv, got) in group.iter().zip(&sandboxed) {
                assert_eq!(got, &t.render(conv, add).unwrap(), "{}", dir.display());
                checked += 1;
            }
        }
        // The fixture's transformers renderings.
        for line in std::fs::read_to_string(dir.join("expected_chat.jsonl"))
            .unwrap()
            .lines()
        {
            let v: Value = serde_json::from_str(line).unwrap();
            let msgs: Vec<Message> = serde_json::from_value(v["messages"].clone()).unwrap();
            let add = v["add_generation_prompt"].as_bool().unwrap();
            let got = t
                .render_all_sandboxed(std::slice::from_ref(&msgs), add, &sandbox)
                .unwrap();
            assert_eq!(got[0], v["rendered"].as_str().unwrap());
        }
    }
    assert!(checked >= 4 * 12, "{checked}");
    // No conversations: no child at all, even with a missing executable.
    let t = ChatTemplate::from_dir(&dirs[0]).unwrap();
    assert!(t
        .render_all_sandboxed(&[], true, &Sandbox::with_exe("/nonexistent/moe-xray"))
        .unwrap()
        .is_empty());
}

#[test]
fn template_errors_keep_their_in_process_message() {
    let sandbox = Sandbox::with_exe(bin());
    for src in [
        "{{ raise_exception('no system role') }}",
        "{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}",
        "{% for i in range(100000) %}{{ 'x' * 10000 }}{% endfor %}",
        "{{ messages[0].content.nope() }}",
    ] {
        let t = ChatTemplate::new(src, "<s>", "</s>").unwrap();
        let in_process = t.render_user("hi").unwrap_err().to_string();
        let sandboxed = t
            .render_users_sandboxed(&["hi", "there"], &sandbox)
            .unwrap_err()
            .to_string();
        assert_eq!(sandboxed, in_process);
    }
    // A missing renderer executable is one clear error too.
    let t = ChatTemplate::new("{{ messages[0].content }}", "", "").unwrap();
    let e = t
        .render_users_sandboxed(&["hi"], &Sandbox::with_exe("/nonexistent/moe-xray"))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("cannot start the sandboxed renderer /nonexistent/moe-xray"),
        "{e}"
    );
}

#[test]
fn render_subcommand_is_hidden_and_rejects_garbage() {
    let help = Command::new(bin()).arg("--help").output().unwrap();
    assert!(help.status.success());
    assert!(!String::from_utf8_lossy(&help.stdout).contains(RENDER_SUBCOMMAND));
    let mut child = Command::new(bin())
        .arg(RENDER_SUBCOMMAND)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(b"{\"not\": \"a request\"").unwrap();
    }
    let o = child.wait_with_output().unwrap();
    let e = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{e}");
    assert!(e.contains("invalid render request"), "{e}");
    assert!(o.stdout.is_empty());
}

#[test]
fn trace_with_a_chat_template_encodes_the_sandboxed_rendering() {
    // The prompt ids `trace` writes are the tokenizer's encoding of the in-process rendering.
    let d = tempfile::tempdir().unwrap();
    let model = fixture("hf").join("olmoe-tiny-mha-f32");
    let out = d.path().join("out");
    let o = trace(&model, &out);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let t = ChatTemplate::from_dir(&model).unwrap();
    let tok = moe_xray_model::tokenizer::Tokenizer::from_dir(&model).unwrap();
    let prompts: Vec<Value> = std::fs::read_to_string(fixture("hf").join("prompts.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let gens: Vec<Value> = std::fs::read_to_string(out.join("generations.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(gens.len(), prompts.len());
    for (p, g) in prompts.iter().zip(&gens) {
        assert_eq!(p["id"], g["prompt_id"]);
        let want = tok
            .encode(&t.render_user(p["text"].as_str().unwrap()).unwrap(), false)
            .unwrap();
        let got: Vec<u32> = serde_json::from_value(g["prompt_ids"].clone()).unwrap();
        assert_eq!(got, want);
    }
}
