//! `synth-model` checkpoints: byte reproducibility, exact HF layout, loadability, routing shape.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{DType, Device};
use moe_xray_model::config::OlmoeConfig;
use moe_xray_model::synth::{self, token_class, SynthDtype, SynthSpec, TokenClass};
use moe_xray_model::weights::WeightStore;
use safetensors::SafeTensors;

fn tiny() -> SynthSpec {
    SynthSpec::preset("tiny").unwrap()
}

fn read_all(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut m = BTreeMap::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        m.insert(
            e.file_name().to_string_lossy().into_owned(),
            std::fs::read(e.path()).unwrap(),
        );
    }
    m
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
    let (fa, fb) = (read_all(&a), read_all(&b));
    assert_eq!(fa.keys().collect::<Vec<_>>(), fb.keys().collect::<Vec<_>>());
    for (k, v) in &fa {
        assert!(v == &fb[k], "{k} differs between two runs");
    }
    // rewriting over an earlier synthetic checkpoint gives the same bytes again
    synth::write_checkpoint(&spec, &a).unwrap();
    assert_eq!(read_all(&a), fa);
    // another seed changes the weights
    spec.seed = 6;
    let c = tmp.path().join("c");
    synth::write_checkpoint(&spec, &c).unwrap();
    assert_ne!(read_all(&c)["model.safetensors"], fa["model.safetensors"]);
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
    let files = read_all(&three);
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
