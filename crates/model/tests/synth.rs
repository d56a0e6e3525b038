//! `synth-model` checkpoints: byte reproducibility, exact HF layout, loadability, routing shape.

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{DType, Device};
use moe_xray_model::config::OlmoeConfig;
use moe_xray_model::synth::{self, token_class, SynthDtype, SynthSpec, TokenClass};
use moe_xray_model::weights::WeightStore;
use moe_xray_test_support::dir_files;
use safetensors::SafeTensors;

fn tiny() -> SynthSpec {
    SynthSpec::preset("tiny").unwrap()
}

/// name -> (dtype, shape, bytes) over all safetensors files of a directory.
fn tensors(dir: &Path) -> BTreeMap<String, (String, Vec<usize>, Vec<u8>)> {
    let mut out = BTreeMap::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "safetensors") {
            let bytes = std::fs::read(&p).unwrap();
            let st = SafeTensors::deserialize(&bytes).unwrap();
            for (name, view) in st.tensors() {
                out.insert(
                    name,
                    (
                        format!("{:?}", view.dtype()),
                        view.shape().to_vec(),
                        view.data().to_vec(),
                    ),
                );
            }
        }
    }
    out
}

fn f32_tensor(t: &(String, Vec<usize>, Vec<u8>)) -> Vec<f32> {
    match t.0.as_str() {
        "F32" => {
            t.2.chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect()
        }
        "BF16" => {
            t.2.chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect()
        }
        "F16" => {
            t.2.chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect()
        }
        d => panic!("dtype {d}"),
    }
}

#[test]
fn synth_is_byte_reproducible_and_seed_dependent() {
    let tmp = tempfile::tempdir().unwrap();
    let mut spec = tiny();
    spec.seed = 5;
    spec.planted = true;
    let a = tmp.path().join("a");
    let b = tmp.path().join("b");
    synth::write_checkpoint(&spec, &a).unwrap();
    synth::write_checkpoint(&spec, &b).unwrap();
    let (fa, fb) = (dir_files(&a), dir_files(&b));
    assert_eq!(fa.keys().collect::<Vec<_>>(), fb.keys().collect::<Vec<_>>());
    for (k, v) in &fa {
        assert!(v == &fb[k], "{k} differs between two runs");
    }
    // rewriting over an earlier synthetic checkpoint gives the same bytes again
    synth::write_checkpoint(&spec, &a).unwrap();
    assert_eq!(dir_files(&a), fa);
    // another seed changes the weights
    spec.seed = 6;
    let c = tmp.path().join("c");
    synth::write_checkpoint(&spec, &c).unwrap();
    assert_ne!(dir_files(&c)["model.safetensors"], fa["model.safetensors"]);
    // no temporary directories are left behind
    let left: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left.len(), 3, "{left:?}");
}

#[test]
fn synth_sharding_does_not_change_tensor_bytes() {
    let tmp = tempfile::tempdir().unwrap();
    let one = tmp.path().join("one");
    let three = tmp.path().join("three");
    let mut spec = tiny();
    spec.dtype = SynthDtype::Bf16;
    synth::write_checkpoint(&spec, &one).unwrap();
    spec.shards = 3;
    synth::write_checkpoint(&spec, &three).unwrap();
    let files = dir_files(&three);
    for f in [
        "model-00001-of-00003.safetensors",
        "model-00002-of-00003.safetensors",
        "model-00003-of-00003.safetensors",
        "model.safetensors.index.json",
    ] {
        assert!(files.contains_key(f), "missing {f}");
    }
    assert!(!files.contains_key("model.safetensors"));
    assert_eq!(tensors(&one), tensors(&three));
    let idx: serde_json::Value =
        serde_json::from_slice(&files["model.safetensors.index.json"]).unwrap();
    let map = idx["weight_map"].as_object().unwrap();
    let t = tensors(&three);
    assert_eq!(map.len(), t.len());
    let total: usize = t.values().map(|x| x.2.len()).sum();
    assert_eq!(
        idx["metadata"]["total_size"].as_u64().unwrap() as usize,
        total
    );
    // every tensor is in the file the index names
    for (name, file) in map {
        let bytes = &files[file.as_str().unwrap()];
        let st = SafeTensors::deserialize(bytes).unwrap();
        assert!(st.tensor(name).is_ok(), "{name} not in {file}");
    }
}

#[test]
fn synth_layout_shapes_and_dtypes_match_hf() {
    let tmp = tempfile::tempdir().unwrap();
    let spec = SynthSpec {
        vocab_size: 300,
        hidden_size: 48,
        intermediate_size: 20,
        num_layers: 3,
        num_heads: 6,
        num_kv_heads: 2,
        num_experts: 5,
        top_k: 2,
        dtype: SynthDtype::F16,
        ..tiny()
    };
    let dir = tmp.path().join("m");
    let summary = synth::write_checkpoint(&spec, &dir).unwrap();
    let t = tensors(&dir);
    let hd = 8;
    let mut want: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    want.insert("model.embed_tokens.weight".into(), vec![300, 48]);
    want.insert("lm_head.weight".into(), vec![300, 48]);
    want.insert("model.norm.weight".into(), vec![48]);
    for l in 0..3 {
        let p = format!("model.layers.{l}");
        want.insert(format!("{p}.input_layernorm.weight"), vec![48]);
        want.insert(format!("{p}.post_attention_layernorm.weight"), vec![48]);
        want.insert(format!("{p}.self_attn.q_proj.weight"), vec![6 * hd, 48]);
        want.insert(format!("{p}.self_attn.k_proj.weight"), vec![2 * hd, 48]);
        want.insert(format!("{p}.self_attn.v_proj.weight"), vec![2 * hd, 48]);
        want.insert(format!("{p}.self_attn.o_proj.weight"), vec![48, 6 * hd]);
        want.insert(format!("{p}.self_attn.q_norm.weight"), vec![6 * hd]);
        want.insert(format!("{p}.self_attn.k_norm.weight"), vec![2 * hd]);
        want.insert(format!("{p}.mlp.gate.weight"), vec![5, 48]);
        for e in 0..5 {
            want.insert(
                format!("{p}.mlp.experts.{e}.gate_proj.weight"),
                vec![20, 48],
            );
            want.insert(format!("{p}.mlp.experts.{e}.up_proj.weight"), vec![20, 48]);
            want.insert(
                format!("{p}.mlp.experts.{e}.down_proj.weight"),
                vec![48, 20],
            );
        }
    }
    let got: BTreeMap<String, Vec<usize>> =
        t.iter().map(|(k, v)| (k.clone(), v.1.clone())).collect();
    assert_eq!(got, want);
    assert!(t.values().all(|v| v.0 == "F16"));
    let n: u64 = want
        .values()
        .map(|s| s.iter().product::<usize>() as u64)
        .sum();
    assert_eq!(summary.num_parameters, n);
    assert_eq!(summary.weight_bytes, 2 * n);
    // norms are exactly one, random tensors have the documented scale
    assert!(f32_tensor(&t["model.norm.weight"])
        .iter()
        .all(|&x| x == 1.0));
    let emb = f32_tensor(&t["model.embed_tokens.weight"]);
    let sd = (emb.iter().map(|&x| (x as f64).powi(2)).sum::<f64>() / emb.len() as f64).sqrt();
    assert!((sd - 1.0).abs() < 0.05, "embedding std {sd}");
    let q = f32_tensor(&t["model.layers.1.self_attn.q_proj.weight"]);
    let sq = (q.iter().map(|&x| (x as f64).powi(2)).sum::<f64>() / q.len() as f64).sqrt();
    assert!((sq - 1.0 / 48f64.sqrt()).abs() < 0.02, "q_proj std {sq}");
    // the safetensors header is 8-byte aligned and the data fills the file exactly
    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    let hlen = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    assert_eq!(hlen % 8, 0);
    assert_eq!(bytes.len() - 8 - hlen, summary.weight_bytes as usize);
}

#[test]
fn synth_config_and_side_files_parse() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("m");
    let mut spec = tiny();
    spec.num_kv_heads = 2;
    spec.norm_topk_prob = true;
    spec.dtype = SynthDtype::Bf16;
    synth::write_checkpoint(&spec, &dir).unwrap();
    let cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["model_type"], "olmoe");
    assert_eq!(cfg["architectures"][0], "OlmoeForCausalLM");
    assert_eq!(cfg["hidden_size"], 64);
    assert_eq!(cfg["num_hidden_layers"], 2);
    assert_eq!(cfg["num_experts"], 8);
    assert_eq!(cfg["num_experts_per_tok"], 2);
    assert_eq!(cfg["num_key_value_heads"], 2);
    assert_eq!(cfg["norm_topk_prob"], true);
    assert_eq!(cfg["dtype"], "bfloat16");
    assert_eq!(cfg["vocab_size"], 512);
    assert_eq!(cfg["eos_token_id"], 0);
    assert_eq!(cfg["rope_parameters"]["rope_type"], "default");
    // the project's config reader accepts it
    let c = OlmoeConfig::from_dir(&dir).unwrap();
    assert_eq!(
        (
            c.hidden_size,
            c.num_hidden_layers,
            c.num_experts,
            c.num_experts_per_tok,
            c.num_key_value_heads
        ),
        (64, 2, 8, 2, 2)
    );
    assert!(c.norm_topk_prob);
    assert_eq!(c.eos_token_id, vec![0]);
    let g: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("generation_config.json")).unwrap())
            .unwrap();
    assert_eq!(g["eos_token_id"], 0);
    let tc: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("tokenizer_config.json")).unwrap()).unwrap();
    assert!(tc["chat_template"]
        .as_str()
        .unwrap()
        .contains("<|assistant|>"));
    // the tokenizer loads with the tokenizers crate; ids stay in the vocabulary and round-trip
    let tok = tokenizers::Tokenizer::from_file(dir.join("tokenizer.json")).unwrap();
    let text = "def f(x):\n    return x * 2  # what? Once upon a time, 12 + 30 = 42.";
    let enc = tok.encode(text, false).unwrap();
    assert!(enc.get_ids().iter().all(|&i| (i as usize) < 512));
    assert!(
        enc.get_ids().len() < text.len(),
        "merges should shorten the byte sequence"
    );
    assert_eq!(tok.decode(enc.get_ids(), false).unwrap(), text);
    assert_eq!(tok.token_to_id("<|endoftext|>"), Some(0));
    assert_eq!(tok.token_to_id("<|padding|>"), Some(1));
    assert_eq!(tok.get_vocab_size(true), 512);
}

#[test]
fn synth_loads_with_the_weight_store() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("m");
    let mut spec = tiny();
    spec.shards = 2;
    spec.dtype = SynthDtype::Bf16;
    synth::write_checkpoint(&spec, &dir).unwrap();
    let ws = WeightStore::open(&dir).unwrap();
    assert_eq!(ws.dominant_dtype(), DType::BF16);
    let t = ws
        .load(
            "model.layers.1.mlp.experts.7.down_proj.weight",
            &[64, 32],
            Some(DType::F32),
            &Device::Cpu,
        )
        .unwrap();
    assert_eq!(t.dims(), &[64, 32]);
    let r = ws
        .load(
            "model.layers.0.mlp.gate.weight",
            &[8, 64],
            None,
            &Device::Cpu,
        )
        .unwrap();
    assert_eq!(r.dtype(), DType::BF16);
    assert!(ws.contains("lm_head.weight"));
}

#[test]
fn synth_small_preset_uses_the_olmo_tokenizer() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("m");
    let mut spec = SynthSpec::preset("small").unwrap();
    spec.num_layers = 1;
    spec.hidden_size = 16;
    spec.num_heads = 2;
    spec.num_kv_heads = 2;
    spec.planted = true;
    let s = synth::write_checkpoint(&spec, &dir).unwrap();
    assert!(s.tokenizer.starts_with("olmo"));
    assert_eq!(
        std::fs::read(dir.join("tokenizer.json")).unwrap(),
        synth::OLMO_TOKENIZER_JSON
    );
    assert!(std::fs::read_to_string(dir.join("TOKENIZER_LICENSE"))
        .unwrap()
        .contains("Apache License"));
    let tok = tokenizers::Tokenizer::from_file(dir.join("tokenizer.json")).unwrap();
    assert_eq!(tok.token_to_id("<|endoftext|>"), Some(50279));
    let counts = s.planted_class_counts.unwrap();
    assert!(
        counts.iter().all(|&c| c > 50),
        "every class has vocabulary entries: {counts:?}"
    );
    let cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["eos_token_id"], 50279);
    assert_eq!(cfg["vocab_size"], 50304);
}

/// Layer-0 router decisions computed directly from the written weights: RMSNorm(embedding) -> router.
/// (Attention is skipped; it is the part of layer 0's router input that the embedding dominates.)
fn layer0_topk(dir: &Path, k: usize) -> Vec<Vec<usize>> {
    let t = tensors(dir);
    let emb = f32_tensor(&t["model.embed_tokens.weight"]);
    let gate = f32_tensor(&t["model.layers.0.mlp.gate.weight"]);
    let h = t["model.embed_tokens.weight"].1[1];
    let e = t["model.layers.0.mlp.gate.weight"].1[0];
    emb.chunks(h)
        .map(|row| {
            let rms = (row.iter().map(|&x| (x as f64).powi(2)).sum::<f64>() / h as f64).sqrt();
            let mut logits: Vec<(f64, usize)> = (0..e)
                .map(|j| {
                    let w = &gate[j * h..(j + 1) * h];
                    (
                        row.iter()
                            .zip(w)
                            .map(|(&a, &b)| a as f64 * b as f64)
                            .sum::<f64>()
                            / rms,
                        j,
                    )
                })
                .collect();
            logits.sort_by(|a, b| b.0.total_cmp(&a.0));
            logits[..k].iter().map(|x| x.1).collect()
        })
        .collect()
}

#[test]
fn synth_router_is_not_collapsed() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("m");
    let mut spec = tiny();
    spec.num_experts = 16;
    spec.top_k = 4;
    synth::write_checkpoint(&spec, &dir).unwrap();
    let picks = layer0_topk(&dir, 4);
    let mut load = [0usize; 16];
    picks.iter().flatten().for_each(|&e| load[e] += 1);
    let mean = load.iter().sum::<usize>() as f64 / 16.0;
    let max = *load.iter().max().unwrap() as f64;
    assert!(load.iter().all(|&l| l > 0), "all experts used: {load:?}");
    assert!(max / mean < 2.0, "max/mean load {} ({load:?})", max / mean);
}

#[test]
fn synth_planted_router_follows_token_classes() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("m");
    let mut spec = tiny();
    spec.num_experts = 16;
    spec.top_k = 4;
    spec.planted = true;
    synth::write_checkpoint(&spec, &dir).unwrap();
    let tok = tokenizers::Tokenizer::from_file(dir.join("tokenizer.json")).unwrap();
    let picks = layer0_topk(&dir, 4);
    let (mut in_group, mut total) = (0usize, 0usize);
    let mut classes_seen = [0usize; 4];
    for (id, experts) in picks.iter().enumerate() {
        let Some(s) = tok.decode(&[id as u32], false).ok() else {
            continue;
        };
        if let Some(c) = token_class(&s) {
            classes_seen[c as usize] += 1;
            in_group += experts.iter().filter(|&&e| e % 4 == c as usize).count();
            total += experts.len();
        }
    }
    assert!(classes_seen.iter().all(|&n| n > 0), "{classes_seen:?}");
    let frac = in_group as f64 / total as f64;
    // chance is 1/4; the planted boost of 4 nats makes nearly all picks come from the class group
    assert!(
        frac > 0.8,
        "fraction of picks in the token's class group: {frac}"
    );
    assert_eq!(token_class(" return"), Some(TokenClass::Code));
}

#[test]
fn synth_rejects_bad_specs_without_writing() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("m");
    let mut spec = tiny();
    spec.num_heads = 5; // 64 % 5 != 0
    let e = synth::write_checkpoint(&spec, &dir)
        .unwrap_err()
        .to_string();
    assert!(e.contains("--heads"), "{e}");
    assert!(!dir.exists());
    let mut spec = tiny();
    spec.top_k = 9;
    assert!(synth::write_checkpoint(&spec, &dir)
        .unwrap_err()
        .to_string()
        .contains("--top-k"));
    let mut spec = tiny();
    spec.vocab_size = 100;
    assert!(synth::write_checkpoint(&spec, &dir)
        .unwrap_err()
        .to_string()
        .contains("--vocab"));
    assert!(SynthSpec::preset("huge")
        .unwrap_err()
        .to_string()
        .contains("olmoe-1b-7b"));
    assert!(SynthDtype::parse("f64").is_err());
    // an existing directory that is not a synthetic checkpoint is never overwritten
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("notes.txt"), "mine").unwrap();
    let e = synth::write_checkpoint(&tiny(), &dir)
        .unwrap_err()
        .to_string();
    assert!(e.contains("not a synthetic checkpoint"), "{e}");
    assert_eq!(
        std::fs::read_to_string(dir.join("notes.txt")).unwrap(),
        "mine"
    );
    assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 1);
}

#[test]
fn synth_olmoe_preset_has_the_published_shape() {
    let s = SynthSpec::preset("olmoe-1b-7b").unwrap();
    assert_eq!(
        (
            s.hidden_size,
            s.intermediate_size,
            s.num_heads,
            s.num_layers,
            s.num_experts,
            s.top_k,
            s.vocab_size
        ),
        (2048, 1024, 16, 16, 64, 8, 50304)
    );
    assert_eq!(s.dtype, SynthDtype::Bf16);
    // 6.92 B parameters (OLMoE-1B-7B: "7B total")
    let n = s.num_parameters();
    assert!((6_900_000_000..6_950_000_000).contains(&n), "{n}");
    s.validate().unwrap();
}

use moe_xray_model::config::{Family, RouterKind};
use moe_xray_model::table::{tensor_table, ExpertLayout};

#[test]
fn every_family_is_byte_reproducible_at_any_thread_count_and_shard_count() {
    for family in synth::FAMILIES {
        let mut spec = SynthSpec::preset(synth::tiny_preset(family)).unwrap();
        spec.seed = 3;
        spec.dtype = SynthDtype::Bf16;
        let tmp = tempfile::tempdir().unwrap();
        let one = common::write_with_threads(&spec, &tmp.path().join("a"), 1);
        let two = common::write_with_threads(&spec, &tmp.path().join("b"), 2);
        assert_eq!(one, two, "{family:?}: bytes depend on the thread count");
        // the weights are the family's tensor table, no more, no less
        let t = tensors(&tmp.path().join("a"));
        let table = tensor_table(&spec.model_config().unwrap(), ExpertLayout::Canonical).unwrap();
        assert_eq!(
            t.keys().cloned().collect::<Vec<_>>(),
            table.iter().map(|x| x.name.clone()).collect::<Vec<_>>(),
            "{family:?}"
        );
        for x in &table {
            assert_eq!(t[&x.name].1, x.shape, "{family:?} {}", x.name);
            // DeepSeek-V3's correction bias stays f32 in a bf16 checkpoint, as published
            let want = if x.name.ends_with("e_score_correction_bias") {
                "F32"
            } else {
                "BF16"
            };
            assert_eq!(t[&x.name].0, want, "{family:?} {}", x.name);
        }
        spec.shards = 3;
        let c = tmp.path().join("c");
        synth::write_checkpoint(&spec, &c).unwrap();
        assert!(c.join("model.safetensors.index.json").is_file());
        assert_eq!(tensors(&c), t, "{family:?}: sharding changed tensor bytes");
        // another seed, other weights
        spec.shards = 1;
        spec.seed = 4;
        let d = tmp.path().join("d");
        synth::write_checkpoint(&spec, &d).unwrap();
        assert_ne!(dir_files(&d)["model.safetensors"], one["model.safetensors"]);
    }
}

#[test]
fn every_preset_config_parses_back_to_the_spec() {
    for &name in synth::PRESETS {
        let s = SynthSpec::preset(name).unwrap();
        assert_eq!(SynthSpec::preset_family(name), Some(s.family), "{name}");
        s.validate().unwrap_or_else(|e| panic!("{name}: {e}"));
        let cfg = synth::config_json(&s);
        assert_eq!(cfg["model_type"], s.family.model_type(), "{name}");
        let c = s.model_config().unwrap();
        assert_eq!(c.family, s.family, "{name}");
        assert_eq!(
            (
                c.vocab_size,
                c.hidden_size,
                c.intermediate_size,
                c.num_hidden_layers,
                c.num_attention_heads,
                c.num_key_value_heads,
                c.num_experts,
                c.num_experts_per_tok,
                c.head_dim,
                c.tie_word_embeddings,
                c.max_position_embeddings,
            ),
            (
                s.vocab_size,
                s.hidden_size,
                s.intermediate_size,
                s.num_layers,
                s.num_heads,
                s.num_kv_heads,
                s.num_experts,
                s.top_k,
                s.head_dim(),
                s.tie_word_embeddings,
                s.max_position_embeddings,
            ),
            "{name}"
        );
        assert_eq!(c.rope_theta, s.rope_theta, "{name}");
        assert_eq!(c.rms_norm_eps, s.rms_norm_eps, "{name}");
        let dense: Vec<u32> = s.dense_layers.iter().map(|&l| l as u32).collect();
        assert_eq!(c.dense_layer_indices(), dense, "{name}");
        if !dense.is_empty() {
            assert_eq!(c.moe.dense_intermediate_size, s.dense_intermediate_size);
        }
        match s.family {
            Family::Olmoe | Family::Qwen2Moe | Family::Qwen3Moe | Family::DeepseekV3 => {
                assert_eq!(c.norm_topk_prob, s.norm_topk_prob, "{name}")
            }
            Family::Mixtral => assert!(c.norm_topk_prob),
            _ => assert!(!s.norm_topk_prob),
        }
        let shared = c
            .moe
            .shared
            .map(|x| (x.intermediate_size, x.count, x.gated));
        let want_shared = match s.family {
            Family::Qwen2Moe if s.shared_intermediate_size > 0 => {
                Some((s.shared_intermediate_size, 1, true))
            }
            Family::DeepseekV2 | Family::DeepseekV3 if s.num_shared_experts > 0 => Some((
                s.num_shared_experts * s.intermediate_size,
                s.num_shared_experts,
                false,
            )),
            _ => None,
        };
        assert_eq!(shared, want_shared, "{name}");
        let mla = c.attn.mla.map(|m| {
            (
                m.q_lora_rank,
                m.kv_lora_rank,
                m.qk_nope_head_dim,
                m.qk_rope_head_dim,
                m.v_head_dim,
            )
        });
        let want_mla = s.mla.map(|m| {
            (
                m.q_lora_rank,
                m.kv_lora_rank,
                m.qk_nope_head_dim,
                m.qk_rope_head_dim,
                m.v_head_dim,
            )
        });
        assert_eq!(mla, want_mla, "{name}");
        let windows: Vec<Option<usize>> = (0..s.num_layers)
            .map(|l| match s.family {
                Family::Mixtral => s.sliding_window,
                Family::GptOss => s.sliding_window.filter(|_| l % 2 == 0),
                _ => None,
            })
            .collect();
        assert_eq!(c.attn.sliding_window, windows, "{name}");
        assert_eq!(
            c.rope
                .yarn
                .map(|y| (y.factor, y.original_max_position_embeddings)),
            s.yarn
                .map(|y| (y.factor, y.original_max_position_embeddings)),
            "{name}"
        );
        match c.moe.router {
            RouterKind::DeepseekV2 {
                group_limited,
                n_group,
                topk_group,
                routed_scaling_factor,
            } => {
                assert_eq!(s.family, Family::DeepseekV2);
                assert_eq!(group_limited, s.n_group > 1, "{name}");
                assert_eq!(
                    (n_group, topk_group, routed_scaling_factor),
                    (s.n_group, s.topk_group, s.routed_scaling_factor)
                );
            }
            RouterKind::DeepseekV3 {
                n_group,
                topk_group,
                routed_scaling_factor,
            } => {
                assert_eq!(s.family, Family::DeepseekV3);
                assert_eq!(
                    (n_group, topk_group, routed_scaling_factor),
                    (s.n_group, s.topk_group, s.routed_scaling_factor)
                );
            }
            RouterKind::TopKSoftmax => {
                assert!(matches!(s.family, Family::GptOss | Family::GraniteMoe))
            }
            RouterKind::SoftmaxTopK => assert!(matches!(
                s.family,
                Family::Olmoe | Family::Mixtral | Family::Qwen2Moe | Family::Qwen3Moe
            )),
        }
        if let Some(m) = s.multipliers {
            assert_eq!(
                (
                    c.multipliers.embedding,
                    c.multipliers.residual,
                    c.multipliers.logits_scaling,
                    c.attn.scale
                ),
                (m.embedding, m.residual, m.logits_scaling, m.attention),
                "{name}"
            );
        }
        // the parameter count is the table's, as the loader computes it
        assert_eq!(
            s.num_parameters(),
            c.parameter_count().unwrap() as u64,
            "{name}"
        );
    }
}

#[test]
fn published_presets_have_the_published_parameter_counts() {
    // (preset, published total parameters in billions as the model cards state, tolerance)
    for (name, billions) in [
        ("olmoe-1b-7b", 6.92),
        ("mixtral-8x7b", 46.7),
        ("qwen1.5-moe-a2.7b", 14.3),
        ("qwen3-30b-a3b", 30.5),
        ("deepseek-v2-lite", 15.7),
        ("moonlight-16b-a3b", 16.0),
        ("gpt-oss-20b", 20.9),
        ("granite-3.0-3b-a800m", 3.3),
    ] {
        let s = SynthSpec::preset(name).unwrap();
        let n = s.num_parameters() as f64 / 1e9;
        eprintln!(
            "{name}: {} parameters, {} weight bytes",
            s.num_parameters(),
            s.weight_bytes()
        );
        assert!(
            (n - billions).abs() / billions < 0.02,
            "{name}: {n:.3} B parameters, published {billions} B"
        );
        assert_eq!(s.dtype, SynthDtype::Bf16, "{name}");
    }
}

#[test]
fn family_tensors_have_the_published_names() {
    let has = |preset: &str, names: &[(&str, &[usize])]| {
        let s = SynthSpec::preset(preset).unwrap();
        let t = tensor_table(&s.model_config().unwrap(), ExpertLayout::Canonical).unwrap();
        for (n, shape) in names {
            let x = t
                .iter()
                .find(|x| x.name == *n)
                .unwrap_or_else(|| panic!("{preset}: no {n}"));
            assert_eq!(&x.shape[..], *shape, "{preset} {n}");
        }
        t
    };
    has(
        "tiny-mixtral",
        &[
            ("model.layers.1.block_sparse_moe.gate.weight", &[8, 64]),
            (
                "model.layers.1.block_sparse_moe.experts.7.w1.weight",
                &[32, 64],
            ),
            (
                "model.layers.1.block_sparse_moe.experts.7.w2.weight",
                &[64, 32],
            ),
            ("model.layers.0.self_attn.k_proj.weight", &[32, 64]),
        ],
    );
    has(
        "tiny-qwen2-moe",
        &[
            ("model.layers.0.mlp.shared_expert.up_proj.weight", &[64, 64]),
            ("model.layers.0.mlp.shared_expert_gate.weight", &[1, 64]),
            ("model.layers.0.self_attn.q_proj.bias", &[64]),
            ("model.layers.1.mlp.up_proj.weight", &[128, 64]),
        ],
    );
    has(
        "tiny-qwen3-moe",
        &[
            ("model.layers.0.self_attn.q_proj.weight", &[128, 64]),
            ("model.layers.0.self_attn.q_norm.weight", &[32]),
            ("model.layers.1.mlp.experts.15.down_proj.weight", &[64, 16]),
        ],
    );
    has(
        "tiny-deepseek-v2",
        &[
            ("model.layers.0.mlp.gate_proj.weight", &[128, 64]),
            ("model.layers.1.self_attn.q_proj.weight", &[96, 64]),
            (
                "model.layers.1.self_attn.kv_a_proj_with_mqa.weight",
                &[40, 64],
            ),
            ("model.layers.1.self_attn.kv_b_proj.weight", &[128, 32]),
            (
                "model.layers.2.mlp.shared_experts.down_proj.weight",
                &[64, 32],
            ),
        ],
    );
    has(
        "tiny-deepseek-v3",
        &[
            ("model.layers.1.self_attn.q_a_proj.weight", &[32, 64]),
            ("model.layers.1.self_attn.q_b_proj.weight", &[96, 32]),
            ("model.layers.1.mlp.gate.e_score_correction_bias", &[16]),
        ],
    );
    has(
        "tiny-gpt-oss",
        &[
            ("model.layers.0.mlp.router.weight", &[8, 64]),
            ("model.layers.0.mlp.router.bias", &[8]),
            ("model.layers.0.mlp.experts.gate_up_proj", &[8, 64, 64]),
            ("model.layers.0.mlp.experts.gate_up_proj_bias", &[8, 64]),
            ("model.layers.0.mlp.experts.down_proj", &[8, 32, 64]),
            ("model.layers.0.self_attn.sinks", &[4]),
        ],
    );
    let t = has(
        "tiny-granitemoe",
        &[
            (
                "model.layers.0.block_sparse_moe.router.layer.weight",
                &[8, 64],
            ),
            (
                "model.layers.0.block_sparse_moe.input_linear.weight",
                &[8, 64, 64],
            ),
            (
                "model.layers.0.block_sparse_moe.output_linear.weight",
                &[8, 64, 32],
            ),
        ],
    );
    // tied embeddings: no lm_head
    assert!(t.iter().all(|x| x.name != "lm_head.weight"));
}

#[test]
fn bad_family_combinations_are_one_clear_error() {
    let err = |s: &SynthSpec| s.validate().unwrap_err().to_string();
    let mut s = SynthSpec::preset("tiny-qwen2-moe").unwrap();
    s.planted = true;
    assert!(err(&s).contains("--planted"), "{}", err(&s));
    let mut s = SynthSpec::preset("tiny-gpt-oss").unwrap();
    s.norm_topk_prob = true;
    assert!(err(&s).contains("norm-topk-prob"), "{}", err(&s));
    let mut s = SynthSpec::preset("tiny-deepseek-v3").unwrap();
    s.num_kv_heads = 2;
    assert!(err(&s).contains("--kv-heads"), "{}", err(&s));
    let mut s = SynthSpec::preset("tiny-deepseek-v2").unwrap();
    s.num_layers = 1;
    assert!(err(&s).contains("no MoE layer"), "{}", err(&s));
    let mut s = SynthSpec::preset("tiny-deepseek-v2").unwrap();
    s.num_experts = 10; // n_group 4
    assert!(err(&s).contains("n_group"), "{}", err(&s));
    let mut s = SynthSpec::preset("tiny-qwen3-moe").unwrap();
    s.dense_layers = vec![5];
    assert!(err(&s).contains("dense layer 5"), "{}", err(&s));
    let mut s = SynthSpec::preset("tiny").unwrap();
    s.sliding_window = Some(4);
    assert!(
        err(&s).contains("olmoe checkpoints have no sliding_window"),
        "{}",
        err(&s)
    );
    let mut s = SynthSpec::preset("tiny-mixtral").unwrap();
    s.mla = SynthSpec::preset("tiny-deepseek-v2").unwrap().mla;
    assert!(err(&s).contains("latent attention"), "{}", err(&s));
    let mut s = SynthSpec::preset("tiny-gpt-oss").unwrap();
    s.sliding_window = None;
    assert!(err(&s).contains("sliding_window"), "{}", err(&s));
    assert!(synth::parse_family("qwen3-moe").is_ok());
    assert!(synth::parse_family("llama")
        .unwrap_err()
        .to_string()
        .contains("deepseek_v3"));
}
