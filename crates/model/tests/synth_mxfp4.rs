//! `synth-model --quant mxfp4`: gpt-oss checkpoints with the routed experts in their published
//! MXFP4 form (`*_blocks` / `*_scales`, `quantization_config`), byte-reproducible, the same seed's
//! values quantised, loadable by moe-xray; and the quantiser itself.

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use common::Collect;
use moe_xray_kernels::mxfp4::{MxLayout, MxMatrix};
use moe_xray_model::model::{LoadOptions, MoeModel};
use moe_xray_model::mxfp4::{quantize_block, FP4_VALUES};
use moe_xray_model::synth::{self, SynthDtype, SynthSpec};
use moe_xray_test_support::dir_files;
use safetensors::SafeTensors;

fn spec(mxfp4: bool) -> SynthSpec {
    let mut s = SynthSpec::preset("tiny-gpt-oss").unwrap();
    s.seed = 5;
    s.dtype = SynthDtype::Bf16;
    s.mxfp4_experts = mxfp4;
    s
}

/// name -> (dtype, shape, bytes) over all safetensors files of a directory.
type Tensors = BTreeMap<String, (String, Vec<usize>, Vec<u8>)>;

fn tensors(dir: &Path) -> Tensors {
    let mut out = BTreeMap::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "safetensors") {
            let bytes = std::fs::read(&p).unwrap();
            let st = SafeTensors::deserialize(&bytes).unwrap();
            for (name, view) in st.tensors() {
                let v = (
                    format!("{:?}", view.dtype()),
                    view.shape().to_vec(),
                    view.data().to_vec(),
                );
                out.insert(name, v);
            }
        }
    }
    out
}

fn bf16_values(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(2)
        .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
        .collect()
}

#[test]
fn quantize_block_follows_the_reference_quantiser() {
    // every E2M1 value times a power of two is exact: max |x| = 6 · 2^-3 gives scale 2^-3
    let mut x = [0f32; 32];
    for (i, v) in x.iter_mut().enumerate() {
        *v = FP4_VALUES[i % 16] * 0.125;
    }
    let (e, q) = quantize_block(&x);
    assert_eq!(e, 127 - 3);
    for (j, &byte) in q.iter().enumerate() {
        let (lo, hi) = ((2 * j) % 16, (2 * j + 1) % 16);
        // −0 is never chosen: +0 comes first in table order
        let lo = if lo == 8 { 0 } else { lo };
        assert_eq!(byte, lo as u8 | ((hi as u8) << 4), "byte {j}");
    }
    // saturation above 6 units (max 7.5: floor(log2) = 2, scale 1), ties to the first code
    let mut x = [0f32; 32];
    x[0] = 7.5;
    x[1] = 0.25; // between 0 and 0.5: code 0
    x[2] = -0.25; // between +0 and -0.5: code 0 (first)
    x[3] = 2.5; // between 2 (code 4) and 3 (code 5): code 4
    x[4] = -5.0; // between -4 (code 14) and -6 (code 15): code 14
    let (e, q) = quantize_block(&x);
    assert_eq!(e, 127);
    assert_eq!(q[0], 7); // high nibble: 0.25 -> code 0
    assert_eq!(q[1], 4 << 4); // low nibble: -0.25 -> code 0

    assert_eq!(q[2], 14);
    // an all-zero block: scale byte 0, all codes 0
    assert_eq!(quantize_block(&[0f32; 32]), (0, [0u8; 16]));
    // tiny values clamp the exponent at 0 (2^-127)
    let (e, _) = quantize_block(&[1e-39f32; 32]);
    assert_eq!(e, 0);
    // decoding gives the nearest representable value: error at most half a step (1 unit at 6)
    let x: [f32; 32] = std::array::from_fn(|i| ((i as f32) * 0.37).sin() * 3.1);
    let (e, q) = quantize_block(&x);
    let sc = [e];
    let m = MxMatrix::new(
        MxLayout::Hf {
            blocks: &q,
            scales: &sc,
        },
        1,
        32,
    )
    .unwrap();
    let d = m.dequantize();
    let unit = 2f32.powi(i32::from(e) - 127);
    for (a, b) in x.iter().zip(&d) {
        assert!((a - b).abs() <= unit + 1e-7, "{a} decoded as {b}");
    }
}

#[test]
fn mxfp4_checkpoint_is_the_published_layout_and_quantises_the_bf16_values() {
    let tmp = tempfile::tempdir().unwrap();
    let mx = spec(true);
    let one = common::write_with_threads(&mx, &tmp.path().join("a"), 1);
    let two = common::write_with_threads(&mx, &tmp.path().join("b"), 2);
    assert_eq!(one, two, "bytes depend on the thread count");
    let bf_dir = tmp.path().join("bf16");
    synth::write_checkpoint(&spec(false), &bf_dir).unwrap();
    let bf = tensors(&bf_dir);
    let t = tensors(&tmp.path().join("a"));

    // config.json: quantization_config as openai/gpt-oss-20b has it
    let cfg: serde_json::Value = serde_json::from_slice(&one["config.json"]).unwrap();
    assert_eq!(
        cfg["quantization_config"],
        serde_json::json!({
            "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                       "model.embed_tokens", "lm_head"],
            "quant_method": "mxfp4"
        })
    );
    let info: serde_json::Value = serde_json::from_slice(&one["synth.json"]).unwrap();
    assert_eq!(info["expert_quant"], "mxfp4");

    let (h, i, e) = (mx.hidden_size, mx.intermediate_size, mx.num_experts);
    let mut packed = 0;
    let mut stored = 0u64;
    for (name, (dt, shape, bytes)) in &t {
        stored += bytes.len() as u64;
        let Some(base) = name
            .strip_suffix("_blocks")
            .or_else(|| name.strip_suffix("_scales"))
        else {
            // everything else: the bf16 checkpoint's bytes
            assert_eq!(
                bf.get(name),
                Some(&(dt.clone(), shape.clone(), bytes.clone())),
                "{name}"
            );
            continue;
        };
        assert!(!bf.contains_key(name) && bf.contains_key(base), "{name}");
        assert!(!t.contains_key(base), "{base} stored twice");
        assert_eq!(dt, "U8", "{name}");
        // [E, in, out] in the bf16 checkpoint; the packed rows are its output units
        let (k, rows) = if base.ends_with("gate_up_proj") {
            (h, 2 * i)
        } else {
            (i, h)
        };
        assert_eq!(bf[base].1, vec![e, k, rows], "{base}");
        if name.ends_with("_scales") {
            assert_eq!(shape, &vec![e, rows, k / 32], "{name}");
            continue;
        }
        packed += 1;
        assert_eq!(shape, &vec![e, rows, k / 32, 16], "{name}");
        let scales = &t[&format!("{base}_scales")].2;
        let w = bf16_values(&bf[base].2);
        let (mut err2, mut ref2) = (0f64, 0f64);
        for x in 0..e {
            let blk = &bytes[x * rows * k / 2..(x + 1) * rows * k / 2];
            let sc = &scales[x * rows * k / 32..(x + 1) * rows * k / 32];
            let m = MxMatrix::new(
                MxLayout::Hf {
                    blocks: blk,
                    scales: sc,
                },
                rows,
                k,
            )
            .unwrap();
            let deq = m.dequantize();
            for r in 0..rows {
                for b in 0..k / 32 {
                    // the block is the reference quantiser applied to the bf16 values
                    let v: [f32; 32] =
                        std::array::from_fn(|j| w[x * k * rows + (b * 32 + j) * rows + r]);
                    let (s, q) = quantize_block(&v);
                    let at = r * (k / 32) + b;
                    assert_eq!(sc[at], s, "{name} expert {x} row {r} block {b}");
                    assert_eq!(&blk[at * 16..at * 16 + 16], &q, "{name} {x} {r} {b}");
                    for (j, vj) in v.iter().enumerate() {
                        let d = f64::from(deq[r * k + b * 32 + j]) - f64::from(*vj);
                        err2 += d * d;
                        ref2 += f64::from(*vj).powi(2);
                    }
                }
            }
        }
        // MXFP4 keeps about 2 significant bits: relative RMS error of a normal sample ≈ 0.1
        let rel = (err2 / ref2).sqrt();
        assert!(rel > 0.02 && rel < 0.2, "{name}: relative RMS error {rel}");
    }
    assert_eq!(packed, 2 * mx.num_layers);
    assert_eq!(stored, mx.weight_bytes());

    // shards split the same tensors
    let mut sharded = mx.clone();
    sharded.shards = 3;
    let c = tmp.path().join("c");
    synth::write_checkpoint(&sharded, &c).unwrap();
    assert!(c.join("model.safetensors.index.json").is_file());
    assert_eq!(tensors(&c), t);
    // another seed, other bytes
    let mut other = mx.clone();
    other.seed = 6;
    let d = tmp.path().join("d");
    synth::write_checkpoint(&other, &d).unwrap();
    assert_ne!(dir_files(&d)["model.safetensors"], one["model.safetensors"]);
}

fn route(model: &MoeModel, tokens: &[u32]) -> BTreeMap<(u32, u32), Vec<u32>> {
    let mut sink = Collect::default();
    common::forward_once(model, "p", tokens, &mut sink);
    sink.records
        .iter()
        .map(|r| ((r.position, r.layer), r.experts.clone()))
        .collect()
}

#[test]
fn mxfp4_checkpoint_loads_and_routes_close_to_the_bf16_one() {
    let tmp = tempfile::tempdir().unwrap();
    let (mxd, bfd) = (tmp.path().join("mx"), tmp.path().join("bf"));
    synth::write_checkpoint(&spec(true), &mxd).unwrap();
    synth::write_checkpoint(&spec(false), &bfd).unwrap();
    let load = |d: &Path, exact: bool| {
        MoeModel::load(
            d,
            &LoadOptions {
                exact,
                ..Default::default()
            },
        )
        .unwrap()
    };
    let tokens: Vec<u32> = (0..48u32).map(|j| (j * 37 + 11) % 500 + 2).collect();
    let bf = route(&load(&bfd, true), &tokens);
    let mx = route(&load(&mxd, true), &tokens);
    let fast = route(&load(&mxd, false), &tokens);
    assert_eq!(bf.len(), tokens.len() * spec(true).num_layers);
    assert_eq!(mx.len(), bf.len());
    assert_eq!(fast.len(), bf.len());
    let same = |a: &BTreeMap<(u32, u32), Vec<u32>>, layer: Option<u32>| {
        let keys: Vec<_> = a
            .keys()
            .filter(|k| layer.is_none_or(|l| k.1 == l))
            .collect();
        let n = keys
            .iter()
            .filter(|k| {
                let (mut x, mut y) = (a[k].clone(), bf[k].clone());
                x.sort_unstable();
                y.sort_unstable();
                x == y
            })
            .count();
        n as f64 / keys.len() as f64
    };
    // layer 0's router reads the embeddings and attention only: the experts' quantisation cannot
    // change it
    assert_eq!(same(&mx, Some(0)), 1.0);
    // later layers see the quantised experts' outputs: mostly the same choices
    let all = same(&mx, None);
    assert!(all >= 0.7, "MXFP4 vs bf16 routing agreement {all}");
    assert!(same(&fast, None) >= 0.7);
}
