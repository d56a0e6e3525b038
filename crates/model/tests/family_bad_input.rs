//! Bad checkpoints of the non-OLMoE families: a missing or contradictory config field names the
//! field, a tensor that does not match the family's table is named with both shapes, and nothing
//! panics.

use std::path::Path;

use moe_xray_model::model::{LoadOptions, MoeModel};
use moe_xray_test_support::fixture;

/// A copy of a fixture checkpoint in a temporary directory.
fn copy_fixture(name: &str) -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    for e in std::fs::read_dir(fixture("hf").join(name)).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), d.path().join(e.file_name())).unwrap();
    }
    d
}

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
fn missing_family_fields_are_named() {
    for (fixture, field) in [
        ("mixtral-tiny-swa-f32", "num_local_experts"),
        ("qwen2moe-tiny-f32", "moe_intermediate_size"),
        ("deepseekv3-tiny-f32", "kv_lora_rank"),
        ("deepseekv2-tiny-group-f32", "n_routed_experts"),
        ("gptoss-tiny-f32", "num_local_experts"),
        ("granitemoe-tiny-f32", "num_local_experts"),
    ] {
        let d = copy_fixture(fixture);
        edit_config(d.path(), |m| {
            m.remove(field);
        });
        let e = load_err(d.path());
        assert!(
            e.contains(&format!("missing required field `{field}`")) && e.contains("config.json"),
            "{fixture}: {e}"
        );
    }
}

#[test]
fn contradictory_family_fields_are_named() {
    // Four groups cannot pick five of them.
    let d = copy_fixture("deepseekv3-tiny-f32");
    edit_config(d.path(), |m| {
        m.insert("topk_group".into(), 5.into());
    });
    let e = load_err(d.path());
    assert!(e.contains("topk_group") && e.contains("n_group"), "{e}");
    // 16 experts do not split into 3 groups.
    let d = copy_fixture("deepseekv2-tiny-group-f32");
    edit_config(d.path(), |m| {
        m.insert("n_group".into(), 3.into());
    });
    let e = load_err(d.path());
    assert!(e.contains("`n_group` 3 must divide"), "{e}");
    // A layer_types list of the wrong length.
    let d = copy_fixture("gptoss-tiny-f32");
    edit_config(d.path(), |m| {
        m.insert("layer_types".into(), serde_json::json!(["full_attention"]));
    });
    let e = load_err(d.path());
    assert!(e.contains("`layer_types` has 1 entries"), "{e}");
    // An unimplemented rope type.
    let d = copy_fixture("deepseekv2-tiny-greedy-f32");
    edit_config(d.path(), |m| {
        m.insert(
            "rope_parameters".into(),
            serde_json::json!({"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}),
        );
    });
    let e = load_err(d.path());
    assert!(
        e.contains("dynamic") && e.contains("only `default` and `yarn`"),
        "{e}"
    );
}

#[test]
fn tensors_that_do_not_match_the_family_table_are_named() {
    // The expert layer count says 3 experts fewer: the router no longer matches.
    let d = copy_fixture("mixtral-tiny-swa-f32");
    edit_config(d.path(), |m| {
        m.insert("num_local_experts".into(), 5.into());
    });
    let e = load_err(d.path());
    assert!(
        e.contains("num_experts") && e.contains("block_sparse_moe.gate.weight"),
        "{e}"
    );
    // A wrong MLA width: kv_b_proj's shape disagrees, named with both shapes.
    let d = copy_fixture("deepseekv3-tiny-f32");
    edit_config(d.path(), |m| {
        m.insert("v_head_dim".into(), 10.into());
    });
    let e = load_err(d.path());
    assert!(
        e.contains("shape mismatch") && e.contains("expected") && e.contains("found"),
        "{e}"
    );
    // A shared expert the checkpoint does not have.
    let d = copy_fixture("deepseekv2-tiny-greedy-f32");
    edit_config(d.path(), |m| {
        m.insert("n_shared_experts".into(), 3.into());
    });
    let e = load_err(d.path());
    assert!(
        e.contains("shared_experts") && e.contains("shape mismatch"),
        "{e}"
    );
}
