//! Bad checkpoints and inputs: each gives one clear error naming what is wrong, never a panic.

mod common;

use std::path::Path;

use common::{write_model, Collect, Spec};
use moe_xray_model::config::OlmoeConfig;
use moe_xray_model::error::ModelError;
use moe_xray_model::generate::{generate_all, GenerateOptions, PromptInput};
use moe_xray_model::model::{LoadOptions, MoeModel};
use moe_xray_model::tokenizer::Tokenizer;

fn load_err(dir: &Path) -> String {
    match MoeModel::load(dir, &LoadOptions::default()) {
        Ok(_) => panic!("loading {} should fail", dir.display()),
        Err(e) => e.to_string(),
    }
}

fn edit_config(dir: &Path, f: impl FnOnce(&mut serde_json::Map<String, serde_json::Value>)) {
    let p = dir.join("config.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    f(v.as_object_mut().unwrap());
    std::fs::write(&p, v.to_string()).unwrap();
}

#[test]
fn missing_model_type_lists_supported() {
    let d = tempfile::tempdir().unwrap();
    write_model(d.path(), &Spec::default());
    edit_config(d.path(), |m| {
        m.remove("model_type");
    });
    let e = load_err(d.path());
    assert!(
        e.contains("no `model_type`") && e.contains("supported model types: olmoe"),
        "{e}"
    );
    assert!(e.contains("config.json"), "{e}");
}

#[test]
fn unknown_model_type_lists_supported() {
    let d = tempfile::tempdir().unwrap();
    write_model(d.path(), &Spec::default());
    edit_config(d.path(), |m| {
        m.insert("model_type".into(), "dbrx".into());
    });
    let e = load_err(d.path());
    assert!(
        e.contains("\"dbrx\"")
            && e.contains("supported model types: olmoe, mixtral, qwen2_moe, qwen3_moe, deepseek_v2, deepseek_v3, gpt_oss, granitemoe"),
        "{e}"
    );
}

#[test]
fn unknown_rope_scaling_is_rejected_and_5x_form_is_read() {
    let d = tempfile::tempdir().unwrap();
    write_model(d.path(), &Spec::default());
    edit_config(d.path(), |m| {
        m.insert(
            "rope_scaling".into(),
            serde_json::json!({"rope_type": "longrope", "factor": 4.0}),
        );
    });
    let e = load_err(d.path());
    assert!(e.contains("longrope") && e.contains("unsupported"), "{e}");
    let text = r#"{"model_type":"olmoe","vocab_size":10,"hidden_size":8,"intermediate_size":4,
        "num_hidden_layers":1,"num_attention_heads":2,"num_experts":4,"num_experts_per_tok":2,
        "rope_parameters":{"rope_type":"default","rope_theta":500000.0},"eos_token_id":[3,4]}"#;
    let c = OlmoeConfig::from_json_str(text, Path::new("c.json")).unwrap();
    assert_eq!(c.rope_theta, 500000.0);
    assert_eq!(c.num_key_value_heads, 2);
    assert_eq!(c.eos_token_id, vec![3, 4]);
    assert!(!c.norm_topk_prob && !c.tie_word_embeddings && c.clip_qkv.is_none());
    let bad = text.replace("\"hidden_size\":8", "\"hidden_size\":\"8\"");
    let e = OlmoeConfig::from_json_str(&bad, Path::new("c.json"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("hidden_size") && e.contains("c.json"), "{e}");
}

#[test]
fn missing_tensor_is_named() {
    let d = tempfile::tempdir().unwrap();
    let s = Spec::default();
    std::fs::write(
        d.path().join("config.json"),
        common::config_json(&s).to_string(),
    )
    .unwrap();
    let ts: Vec<_> = common::tensors(&s)
        .into_iter()
        .filter(|t| t.0 != "model.layers.1.mlp.experts.3.up_proj.weight")
        .collect();
    common::write_safetensors(&d.path().join("model.safetensors"), &ts, false);
    let e = load_err(d.path());
    assert!(
        e.contains("missing tensor `model.layers.1.mlp.experts.3.up_proj.weight`"),
        "{e}"
    );
}

#[test]
fn shape_mismatch_names_tensor_expected_and_found() {
    let d = tempfile::tempdir().unwrap();
    let s = Spec::default();
    write_model(d.path(), &s);
    edit_config(d.path(), |m| {
        m.insert("intermediate_size".into(), 12.into());
    });
    let e = load_err(d.path());
    assert!(
        e.contains("shape mismatch")
            && e.contains("model.layers.0.mlp.experts.0.down_proj.weight")
            && e.contains("expected [32, 12], found [32, 16]"),
        "{e}"
    );
    assert!(e.contains("model.safetensors"), "{e}");
}

#[test]
fn truncated_and_lying_safetensors_are_errors() {
    let d = tempfile::tempdir().unwrap();
    write_model(d.path(), &Spec::default());
    let p = d.path().join("model.safetensors");
    let bytes = std::fs::read(&p).unwrap();
    std::fs::write(&p, &bytes[..bytes.len() - 100]).unwrap();
    let e = load_err(d.path());
    assert!(
        e.contains("model.safetensors") && e.contains("invalid safetensors"),
        "{e}"
    );
    // Header length larger than the file.
    let mut lying = bytes.clone();
    lying[..8].copy_from_slice(&(1u64 << 40).to_le_bytes());
    std::fs::write(&p, &lying).unwrap();
    let e = load_err(d.path());
    assert!(e.contains("invalid safetensors"), "{e}");
    // A file shorter than the 8-byte header length.
    std::fs::write(&p, [1u8, 2, 3]).unwrap();
    assert!(load_err(d.path()).contains("invalid safetensors"));
    // No weights at all.
    std::fs::remove_file(&p).unwrap();
    assert!(load_err(d.path()).contains("no model.safetensors"));
}

#[test]
fn sharded_index_pointing_to_wrong_file_is_an_error() {
    let d = tempfile::tempdir().unwrap();
    write_model(d.path(), &Spec::default());
    std::fs::rename(
        d.path().join("model.safetensors"),
        d.path().join("model-00001-of-00001.safetensors"),
    )
    .unwrap();
    let names: Vec<String> = common::tensors(&Spec::default())
        .into_iter()
        .map(|t| t.0)
        .collect();
    let mut wm = serde_json::Map::new();
    for n in &names {
        wm.insert(n.clone(), "model-00001-of-00001.safetensors".into());
    }
    let idx = d.path().join("model.safetensors.index.json");
    std::fs::write(
        &idx,
        serde_json::json!({"metadata": {}, "weight_map": wm}).to_string(),
    )
    .unwrap();
    MoeModel::load(d.path(), &LoadOptions::default()).unwrap();
    wm.insert(
        "model.extra.weight".into(),
        "model-00001-of-00001.safetensors".into(),
    );
    std::fs::write(&idx, serde_json::json!({"weight_map": wm}).to_string()).unwrap();
    let e = load_err(d.path());
    assert!(
        e.contains("model.extra.weight") && e.contains("index"),
        "{e}"
    );
    wm.remove("model.extra.weight");
    wm.insert(names[0].clone(), "model-00002-of-00002.safetensors".into());
    std::fs::write(&idx, serde_json::json!({"weight_map": wm}).to_string()).unwrap();
    let e = load_err(d.path());
    assert!(e.contains("model-00002-of-00002.safetensors"), "{e}");
}

#[test]
fn token_out_of_range_is_an_error() {
    let d = tempfile::tempdir().unwrap();
    write_model(d.path(), &Spec::default());
    let m = MoeModel::load(d.path(), &LoadOptions::default()).unwrap();
    let p = vec![PromptInput {
        id: "bad".into(),
        category: None,
        tokens: vec![1, 96],
        index: 0,
    }];
    let mut sink = Collect::default();
    let e = generate_all(
        &m,
        &p,
        1,
        &GenerateOptions::default(),
        &mut sink,
        &mut |_| Ok(()),
    )
    .unwrap_err();
    assert!(
        matches!(
            e,
            ModelError::TokenOutOfRange {
                token: 96,
                vocab_size: 96,
                ..
            }
        ),
        "{e}"
    );
    assert!(e.to_string().contains("`bad`"));
    assert!(
        sink.records.is_empty() && sink.begun.is_empty(),
        "nothing may be recorded"
    );
    let empty = vec![PromptInput {
        id: "e".into(),
        category: None,
        tokens: vec![],
        index: 0,
    }];
    assert!(generate_all(
        &m,
        &empty,
        1,
        &GenerateOptions::default(),
        &mut sink,
        &mut |_| Ok(())
    )
    .is_err());
}

#[test]
fn missing_or_broken_tokenizer_is_an_error() {
    let d = tempfile::tempdir().unwrap();
    let e = Tokenizer::from_dir(d.path()).unwrap_err().to_string();
    assert!(
        e.contains("tokenizer.json") && e.contains("cannot read"),
        "{e}"
    );
    std::fs::write(d.path().join("tokenizer.json"), "{not json").unwrap();
    let e = Tokenizer::from_dir(d.path()).unwrap_err().to_string();
    assert!(e.contains("tokenizer.json"), "{e}");
}
