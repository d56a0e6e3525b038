//! Hostile model inputs at the library level (issue 14): huge or inconsistent config sizes,
//! lying safetensors headers, synth-model sizes, prompts longer than the context, chat templates
//! without limits, and non-finite weights (a fixture copy with a poisoned tensor written with the
//! `safetensors` crate).

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{tensors, write_model, write_safetensors, Collect, Spec};
use moe_xray_model::chat::ChatTemplate;
use moe_xray_model::config::OlmoeConfig;
use moe_xray_model::error::ModelError;
use moe_xray_model::generate::{
    fit_context, generate_all, GenerateOptions, Generation, PromptInput, Truncate,
};
use moe_xray_model::model::{LoadOptions, MoeModel};
use moe_xray_model::synth::SynthSpec;
use moe_xray_model::weights::WeightStore;

fn edit_config(dir: &Path, f: impl FnOnce(&mut serde_json::Map<String, serde_json::Value>)) {
    let p = dir.join("config.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    f(v.as_object_mut().unwrap());
    std::fs::write(&p, v.to_string()).unwrap();
}

fn load_err(dir: &Path) -> String {
    match MoeModel::load(dir, &LoadOptions::default()) {
        Ok(_) => panic!("loading {} should fail", dir.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn huge_config_sizes_fail_naming_config_and_field() {
    for (field, v) in [
        ("num_experts", serde_json::json!(1_000_000_000_000u64)),
        ("num_hidden_layers", serde_json::json!(1_000_000_000u64)),
        ("hidden_size", serde_json::json!(1u64 << 40)),
        ("vocab_size", serde_json::json!(u64::MAX)),
        ("max_position_embeddings", serde_json::json!(1u64 << 40)),
        ("num_key_value_heads", serde_json::json!(1u64 << 20)),
    ] {
        let d = tempfile::tempdir().unwrap();
        write_model(d.path(), &Spec::default());
        edit_config(d.path(), |m| {
            m.insert(field.into(), v.clone());
        });
        let e = load_err(d.path());
        assert!(
            e.contains("config.json") && e.contains(field) && e.contains("exceeds the limit"),
            "{field}: {e}"
        );
    }
}

#[test]
fn negative_float_and_missing_sizes_are_refused() {
    for (field, v) in [
        ("num_experts", serde_json::json!(-1)),
        ("hidden_size", serde_json::json!(32.5)),
        ("num_hidden_layers", serde_json::json!("2")),
        ("max_position_embeddings", serde_json::json!(0)),
    ] {
        let d = tempfile::tempdir().unwrap();
        write_model(d.path(), &Spec::default());
        edit_config(d.path(), |m| {
            m.insert(field.into(), v.clone());
        });
        let e = load_err(d.path());
        assert!(
            e.contains("config.json") && e.contains(field),
            "{field}: {e}"
        );
    }
    let d = tempfile::tempdir().unwrap();
    write_model(d.path(), &Spec::default());
    edit_config(d.path(), |m| {
        m.remove("num_experts");
    });
    let e = load_err(d.path());
    assert!(e.contains("missing required field `num_experts`"), "{e}");
}

#[test]
fn config_sizes_are_checked_against_the_checkpoint_before_allocating() {
    for (field, v) in [
        ("num_hidden_layers", 1000usize),
        ("num_experts", 4000),
        ("vocab_size", 100_000),
        ("hidden_size", 64),
    ] {
        let d = tempfile::tempdir().unwrap();
        write_model(d.path(), &Spec::default());
        edit_config(d.path(), |m| {
            m.insert(field.into(), v.into());
        });
        let e = load_err(d.path());
        assert!(
            e.contains("config.json") && e.contains(&format!("`{field}` = {v}")),
            "{field}: {e}"
        );
    }
}

#[test]
fn lying_safetensors_offsets_are_refused_with_the_file() {
    let d = tempfile::tempdir().unwrap();
    write_model(d.path(), &Spec::default());
    let p = d.path().join("model.safetensors");
    let bytes = std::fs::read(&p).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let name = header
        .as_object()
        .unwrap()
        .keys()
        .find(|k| *k != "__metadata__")
        .unwrap()
        .clone();
    for (key, value) in [
        ("data_offsets", serde_json::json!([0u64, u64::MAX])),
        ("data_offsets", serde_json::json!([u64::MAX - 8, u64::MAX])),
        ("shape", serde_json::json!([u64::MAX, u64::MAX])),
        ("shape", serde_json::json!([1, 1, 1, 1, 1, 1, 1, 1, 1, 1])),
        ("dtype", serde_json::json!("Q4")),
    ] {
        let mut h = header.clone();
        h[&name][key] = value.clone();
        let text = h.to_string().into_bytes();
        let mut out = (text.len() as u64).to_le_bytes().to_vec();
        out.extend_from_slice(&text);
        out.extend_from_slice(&bytes[8 + n..]);
        std::fs::write(&p, &out).unwrap();
        let e = WeightStore::open(d.path()).unwrap_err().to_string();
        assert!(
            e.contains("model.safetensors") && e.contains(&name),
            "{key} {value}: {e}"
        );
    }
    // A header length beyond the limit or the file.
    let mut out = (u64::MAX).to_le_bytes().to_vec();
    out.extend_from_slice(&bytes[8..]);
    std::fs::write(&p, &out).unwrap();
    let e = WeightStore::open(d.path()).unwrap_err().to_string();
    assert!(
        e.contains("header length") && e.contains("model.safetensors"),
        "{e}"
    );
}

#[test]
fn synth_sizes_beyond_the_limits_are_refused() {
    for (f, name) in [
        (
            (|s: &mut SynthSpec| s.num_experts = 1_000_000_000_000) as fn(&mut SynthSpec),
            "--experts",
        ),
        (|s: &mut SynthSpec| s.num_layers = 1_000_000_000, "--layers"),
        (|s: &mut SynthSpec| s.vocab_size = usize::MAX, "--vocab"),
        (
            |s: &mut SynthSpec| s.intermediate_size = 1 << 40,
            "--intermediate",
        ),
    ] {
        let mut s = SynthSpec::preset("tiny").unwrap();
        f(&mut s);
        let t = Instant::now();
        let e = s.validate().unwrap_err().to_string();
        assert!(e.contains(name) && e.contains("limit"), "{e}");
        assert!(t.elapsed() < Duration::from_secs(1));
    }
}

#[test]
fn fit_context_refuses_or_truncates() {
    let mut t: Vec<u32> = (0..100).collect();
    let e = fit_context("p7", &mut t, 30, 64, None).unwrap_err();
    assert!(
        matches!(&e, ModelError::PromptTooLong { prompt_id, tokens: 100, max_new_tokens: 30, max_position_embeddings: 64 } if prompt_id == "p7"),
        "{e}"
    );
    let msg = e.to_string();
    assert!(
        msg.contains("prompt `p7` has 100 tokens") && msg.contains("--truncate-prompts"),
        "{msg}"
    );
    assert_eq!(
        fit_context("p", &mut t, 30, 64, Some(Truncate::Left)).unwrap(),
        Some(100)
    );
    assert_eq!(t, (66..100).collect::<Vec<u32>>());
    let mut t: Vec<u32> = (0..100).collect();
    assert_eq!(
        fit_context("p", &mut t, 30, 64, Some(Truncate::Right)).unwrap(),
        Some(100)
    );
    assert_eq!(t, (0..34).collect::<Vec<u32>>());
    // Fits: untouched.
    assert_eq!(fit_context("p", &mut t, 30, 64, None).unwrap(), None);
    assert_eq!(t.len(), 34);
    // No room at all, even truncated; and sizes that would overflow.
    assert!(fit_context("p", &mut t, 64, 64, Some(Truncate::Left)).is_err());
    assert!(fit_context("p", &mut t, usize::MAX, 64, Some(Truncate::Left)).is_err());
}

fn prompt(id: &str, n: usize, vocab: usize) -> PromptInput {
    PromptInput {
        id: id.into(),
        category: None,
        tokens: (0..n).map(|i| (3 + i % (vocab - 3)) as u32).collect(),
        index: 0,
    }
}

#[test]
fn generation_enforces_max_position_embeddings() {
    let d = tempfile::tempdir().unwrap();
    let s = Spec::default();
    write_model(d.path(), &s);
    let model = MoeModel::load(d.path(), &LoadOptions::default()).unwrap();
    let max = model.config().max_position_embeddings;
    // 300 new tokens on a prompt of 10: more than the context (256).
    let opts = GenerateOptions {
        max_new_tokens: 300,
        ..Default::default()
    };
    let mut sink = Collect::default();
    let e = generate_all(
        &model,
        &[prompt("a", 10, s.vocab)],
        1,
        &opts,
        &mut sink,
        &mut |_| Ok(()),
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("prompt `a` has 10 tokens") && e.contains(&format!("{max}")),
        "{e}"
    );
    assert!(sink.records.is_empty() && sink.begun.is_empty());
    // Exactly the context fits.
    let opts = GenerateOptions {
        max_new_tokens: 6,
        ignore_eos: true,
        ..Default::default()
    };
    let mut n = 0;
    generate_all(
        &model,
        &[prompt("b", max - 6, s.vocab)],
        1,
        &opts,
        &mut sink,
        &mut |g: Generation| {
            n = g.generated.len();
            Ok(())
        },
    )
    .unwrap();
    assert_eq!(n, 6);
    assert!(sink.records.iter().all(|r| (r.position as usize) < max));
}

#[test]
fn hostile_templates_fail_fast_naming_why() {
    for (src, why) in [
        (
            "{% for i in range(100000) %}{{ 'x' * 10000 }}{% endfor %}",
            "output exceeds",
        ),
        ("{{ 'ab' * 40000000 }}", "output exceeds"),
        (
            "{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}",
            "fuel",
        ),
        (
            "{% macro f(n) %}{{ f(n) }}{% endmacro %}{{ f(1) }}",
            "chat template",
        ),
    ] {
        let t = ChatTemplate::new(src, "<s>", "</s>").unwrap();
        let start = Instant::now();
        let e = t.render_user("hi").unwrap_err().to_string();
        assert!(
            e.contains("chat template (<inline>)") && e.contains(why),
            "{src}: {e}"
        );
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "{src}: {:?}",
            start.elapsed()
        );
    }
    // A real template is unaffected, and a long message is allowed (limit grows with it).
    let t = ChatTemplate::new(
        "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}",
        "",
        "",
    )
    .unwrap();
    let long = "y".repeat(3 << 20);
    assert_eq!(t.render_user(&long).unwrap().len(), long.len() + 8);
}

/// A copy of the tiny model with tensor `name` poisoned by `f(index, value)`.
fn poisoned(dir: &Path, name: &str, f: impl Fn(usize, f32) -> f32) -> PathBuf {
    let s = Spec::default();
    write_model(dir, &s);
    let mut ts = tensors(&s);
    let t = ts.iter_mut().find(|t| t.0 == name).unwrap();
    for (i, v) in t.2.iter_mut().enumerate() {
        *v = f(i, *v);
    }
    write_safetensors(&dir.join("model.safetensors"), &ts, false);
    dir.to_path_buf()
}

fn run(
    model: &MoeModel,
    prompts: &[PromptInput],
) -> (Collect, Vec<String>, Result<(), ModelError>) {
    let mut sink = Collect::default();
    let mut done = Vec::new();
    let opts = GenerateOptions {
        max_new_tokens: 3,
        ignore_eos: true,
        ..Default::default()
    };
    let r = generate_all(model, prompts, 1, &opts, &mut sink, &mut |g| {
        done.push(g.prompt_id);
        Ok(())
    });
    (sink, done, r)
}

#[test]
fn nan_router_weights_fail_with_layer_and_prompt() {
    let d = tempfile::tempdir().unwrap();
    let dir = poisoned(d.path(), "model.layers.1.mlp.gate.weight", |_, _| f32::NAN);
    let model = MoeModel::load(&dir, &LoadOptions::default()).unwrap();
    let (sink, done, r) = run(&model, &[prompt("first", 5, 96)]);
    let e = r.unwrap_err().to_string();
    assert!(
        e.contains("non-finite router logits at layer 1 for prompt `first`"),
        "{e}"
    );
    assert!(done.is_empty());
    // Nothing of layer 1 was ever reported, so no NaN weight can reach a trace.
    assert!(sink
        .records
        .iter()
        .all(|r| r.layer == 0 || r.weights.as_ref().unwrap().iter().all(|w| w.is_finite())));
    assert!(sink.ended.is_empty());
}

#[test]
fn inf_embedding_fails_only_the_prompt_using_it() {
    let d = tempfile::tempdir().unwrap();
    let h = Spec::default().hidden;
    // Token 50's embedding row is +inf.
    let dir = poisoned(d.path(), "model.embed_tokens.weight", |i, v| {
        if i / h == 50 {
            f32::INFINITY
        } else {
            v
        }
    });
    let model = MoeModel::load(&dir, &LoadOptions::default()).unwrap();
    let clean = PromptInput {
        id: "clean".into(),
        category: None,
        tokens: vec![3, 4, 5, 6],
        index: 0,
    };
    let bad = PromptInput {
        id: "bad".into(),
        category: None,
        tokens: vec![3, 4, 50, 6],
        index: 1,
    };
    let (sink, done, r) = run(&model, &[clean, bad]);
    let e = r.unwrap_err().to_string();
    assert!(e.contains("at layer 0 for prompt `bad`"), "{e}");
    // The earlier prompt completed; the failing one never ended.
    assert_eq!(done, vec!["clean".to_string()]);
    assert_eq!(sink.ended, vec!["clean".to_string()]);
    assert!(sink
        .records
        .iter()
        .all(|r| r.weights.as_ref().unwrap().iter().all(|w| w.is_finite())));
}

#[test]
fn inf_lm_head_fails_on_output_logits() {
    let d = tempfile::tempdir().unwrap();
    let dir = poisoned(d.path(), "lm_head.weight", |i, v| {
        if i == 7 {
            f32::INFINITY
        } else {
            v
        }
    });
    let model = MoeModel::load(&dir, &LoadOptions::default()).unwrap();
    let (_, done, r) = run(&model, &[prompt("p", 4, 96)]);
    let e = r.unwrap_err().to_string();
    assert!(
        e.contains("non-finite output logits") && e.contains("prompt `p`"),
        "{e}"
    );
    assert!(done.is_empty());
}

#[test]
fn config_reader_accepts_the_real_fixture_configs() {
    let root = moe_xray_test_support::fixture("hf");
    for m in ["olmoe-tiny-mha-f32", "olmoe-tiny-bf16"] {
        let c = OlmoeConfig::from_dir(&root.join(m)).unwrap();
        assert!(c.parameter_count().unwrap() > 0);
    }
}
