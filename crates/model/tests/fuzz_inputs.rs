//! Property tests over hostile model inputs (issue 14): `config.json` under structured mutations,
//! safetensors headers from arbitrary bytes and from mutations of a valid header, and chat
//! templates from arbitrary strings. Each asserts: no panic, an `Ok` or one error naming the file,
//! and (for templates) a bounded running time thanks to minijinja's fuel.
//!
//! CI runs a bounded number of cases (well under 30 s in total). For a longer run:
//! `PROPTEST_CASES=20000 cargo test --release -p moe-xray-model --test fuzz_inputs`.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use moe_xray_model::chat::ChatTemplate;
use moe_xray_model::config::OlmoeConfig;
use moe_xray_model::limits;
use moe_xray_model::weights::WeightStore;
use proptest::prelude::*;
use serde_json::Value;

/// Cases per property: `PROPTEST_CASES` when set, else `default`.
fn cases(default: u32) -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn base_config() -> serde_json::Map<String, Value> {
    let v = common::config_json(&common::Spec::default());
    v.as_object().unwrap().clone()
}

const FIELDS: &[&str] = &[
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "max_position_embeddings",
    "num_experts",
    "num_experts_per_tok",
    "rms_norm_eps",
    "rope_theta",
    "clip_qkv",
    "eos_token_id",
    "model_type",
];

fn hostile_value() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<u64>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        (0u32..64).prop_map(|s| Value::from(1u64 << s)),
        (0u32..64).prop_map(|s| Value::from((1u64 << s).wrapping_sub(1))),
        any::<f64>()
            .prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
        Just(Value::from(1e300)),
        Just(Value::from(-1)),
        Just(Value::from(64.5)),
        ".{0,8}".prop_map(Value::from),
        Just(Value::Bool(true)),
        Just(serde_json::json!([1, 2, 3])),
        Just(serde_json::json!({"a": 1})),
    ]
}

#[derive(Debug, Clone)]
enum Mutation {
    Set(usize, Value),
    Remove(usize),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (0..FIELDS.len(), hostile_value()).prop_map(|(f, v)| Mutation::Set(f, v)),
        (0..FIELDS.len()).prop_map(Mutation::Remove),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(256), ..ProptestConfig::default() })]

    /// Any mutation of a valid config either parses to sizes inside the documented limits or
    /// fails with an error naming config.json.
    #[test]
    fn config_mutations_never_panic(muts in prop::collection::vec(mutation(), 1..4)) {
        let mut m = base_config();
        for mu in &muts {
            match mu {
                Mutation::Set(f, v) => { m.insert(FIELDS[*f].into(), v.clone()); }
                Mutation::Remove(f) => { m.remove(FIELDS[*f]); }
            }
        }
        let text = Value::Object(m).to_string();
        match OlmoeConfig::from_json_str(&text, Path::new("x/config.json")) {
            Ok(c) => {
                for (name, v, lim) in [
                    ("vocab", c.vocab_size, limits::MAX_VOCAB_SIZE),
                    ("hidden", c.hidden_size, limits::MAX_HIDDEN_SIZE),
                    ("inter", c.intermediate_size, limits::MAX_INTERMEDIATE_SIZE),
                    ("layers", c.num_hidden_layers, limits::MAX_LAYERS),
                    ("experts", c.num_experts, limits::MAX_EXPERTS),
                    ("pos", c.max_position_embeddings, limits::MAX_POSITION_EMBEDDINGS),
                ] {
                    prop_assert!(v >= 1 && v <= lim, "{name} = {v}");
                }
            }
            Err(e) => prop_assert!(e.to_string().contains("config.json"), "{e}"),
        }
    }

    /// Arbitrary bytes: the header check and the store never panic; errors name the file.
    #[test]
    fn safetensors_arbitrary_bytes(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        let p = Path::new("m/model.safetensors");
        if let Err(e) = limits::check_safetensors_header(p, &bytes) {
            prop_assert!(e.to_string().contains("model.safetensors"), "{e}");
        }
    }

    /// Structured mutations of a valid header (sizes, offsets, dtypes, shapes), written to a file
    /// and opened by the store: either it opens and every tensor lies inside the file, or one
    /// error names the file.
    #[test]
    fn safetensors_header_mutations(
        field in 0usize..6,
        value in hostile_value(),
        len_delta in -3i64..3,
    ) {
        let d = tempfile::tempdir().unwrap();
        let valid = valid_file();
        let n = u64::from_le_bytes(valid[..8].try_into().unwrap()) as usize;
        let mut header: Value = serde_json::from_slice(&valid[8..8 + n]).unwrap();
        let t = header.as_object_mut().unwrap().get_mut("a").unwrap().as_object_mut().unwrap();
        match field {
            0 => { t.insert("dtype".into(), value); }
            1 => { t.insert("shape".into(), value); }
            2 => { t.insert("shape".into(), Value::Array(vec![value, Value::from(2)])); }
            3 => { t.insert("data_offsets".into(), value); }
            4 => { t.insert("data_offsets".into(), Value::Array(vec![Value::from(0), value])); }
            _ => { t.insert("data_offsets".into(), Value::Array(vec![value, Value::from(24)])); }
        }
        let h = header.to_string().into_bytes();
        let declared = (h.len() as i64 + len_delta).max(0) as u64;
        let mut bytes = declared.to_le_bytes().to_vec();
        bytes.extend_from_slice(&h);
        bytes.extend_from_slice(&valid[8 + n..]);
        let path = d.path().join("model.safetensors");
        std::fs::write(&path, &bytes).unwrap();
        match WeightStore::open(d.path()) {
            Ok(store) => {
                if let Some(e) = store.entry("a") {
                    prop_assert!(e.start <= e.end && e.end <= bytes.len());
                }
            }
            Err(e) => prop_assert!(e.to_string().contains("model.safetensors"), "{e}"),
        }
    }

    /// Arbitrary template text (and fragments of real templates): rendering never panics and
    /// finishes quickly, whatever loops the text builds.
    #[test]
    fn chat_templates_render_bounded(src in template_text()) {
        let start = Instant::now();
        if let Ok(t) = ChatTemplate::new(&src, "<s>", "</s>") {
            match t.render_user("hello") {
                Ok(s) => prop_assert!(s.len() <= moe_xray_model::chat::MAX_RENDERED_BASE + 4 * 5),
                Err(e) => prop_assert!(e.to_string().contains("chat template"), "{e}"),
            }
        }
        prop_assert!(start.elapsed() < Duration::from_secs(5), "{src:?} took {:?}", start.elapsed());
    }
}

fn template_text() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        Just("{% for i in range(100000) %}".to_string()),
        Just("{% for m in messages %}".to_string()),
        Just("{% endfor %}".to_string()),
        Just("{{ 'ab' * 40000000 }}".to_string()),
        Just("{{ m['content'] }}".to_string()),
        Just("{{ bos_token }}".to_string()),
        Just("{% if add_generation_prompt %}A:{% endif %}".to_string()),
        Just("{% set x = x ~ x %}".to_string()),
        Just("{{ raise_exception('no') }}".to_string()),
        Just("{% macro f(n) %}{{ f(n) }}{% endmacro %}{{ f(1) }}".to_string()),
        "[ -~]{0,12}".prop_map(|s| s),
    ];
    prop::collection::vec(piece, 0..8).prop_map(|v| v.concat())
}

/// A valid single-tensor file: tensor `a`, F32 [3, 2].
fn valid_file() -> Vec<u8> {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("v.safetensors");
    common::write_safetensors(&p, &[("a".to_string(), vec![3, 2], vec![1.0; 6])], false);
    std::fs::read(&p).unwrap()
}
