//! Internal consistency of the OLMoE forward pass on tiny random checkpoints: an independent
//! naive f64 reference, KV-cache decoding vs full recompute, batch-size independence, layouts.

mod common;

use std::path::Path;

use common::{write_model, Collect, Spec};
use moe_xray_model::generate::{generate_all, GenerateOptions, Generation, PromptInput};
use moe_xray_model::model::{LoadOptions, MoeModel, StepSeq};
use moe_xray_trace::TokenType;

fn load(dir: &Path) -> MoeModel {
    MoeModel::load(dir, &LoadOptions::default()).unwrap()
}

fn prompts() -> Vec<PromptInput> {
    let toks: [&[u32]; 5] = [
        &[5, 17, 33, 2, 90, 41, 7],
        &[3],
        &[60, 61, 62, 63, 64, 65, 66, 67, 68, 69, 70, 12],
        &[11, 11, 11, 11],
        &[95, 0, 44, 8, 19],
    ];
    toks.iter()
        .enumerate()
        .map(|(i, t)| PromptInput {
            id: format!("p{i}"),
            category: None,
            tokens: t.to_vec(),
            index: i as u64,
        })
        .collect()
}

fn run(
    model: &MoeModel,
    batch: usize,
    opts: &GenerateOptions,
    probs: bool,
) -> (Collect, Vec<Generation>) {
    let mut sink = Collect {
        probs,
        ..Default::default()
    };
    let mut gens = Vec::new();
    generate_all(model, &prompts(), batch, opts, &mut sink, &mut |g| {
        gens.push(g);
        Ok(())
    })
    .unwrap();
    gens.sort_by(|a, b| a.prompt_id.cmp(&b.prompt_id));
    (sink, gens)
}

fn greedy(n: usize) -> GenerateOptions {
    GenerateOptions {
        max_new_tokens: n,
        ..Default::default()
    }
}

// ---------------------------------------------------------------------------------------------
// Naive reference in f64 written straight from transformers' modeling_olmoe.py (no KV cache,
// whole sequence at once), used to check the candle implementation's routing and logits.

struct Ref {
    s: Spec,
    t: std::collections::HashMap<String, Vec<f64>>,
}

impl Ref {
    fn new(s: Spec) -> Self {
        let t = common::tensors(&s)
            .into_iter()
            .map(|(n, _, v)| (n, v.into_iter().map(|x| x as f64).collect()))
            .collect();
        Ref { s, t }
    }
    fn w(&self, n: &str) -> &[f64] {
        &self.t[n]
    }
    fn lin(x: &[f64], w: &[f64], out: usize) -> Vec<f64> {
        let inp = x.len();
        (0..out)
            .map(|o| (0..inp).map(|i| x[i] * w[o * inp + i]).sum())
            .collect()
    }
    fn rms(x: &[f64], w: &[f64]) -> Vec<f64> {
        let var = x.iter().map(|v| v * v).sum::<f64>() / x.len() as f64;
        let r = 1.0 / (var + 1e-5).sqrt();
        x.iter().zip(w).map(|(v, g)| v * r * g).collect()
    }
    /// Returns (per token, per layer: (experts, weights)), last-token logits.
    #[allow(clippy::type_complexity)]
    fn forward(&self, toks: &[u32]) -> (Vec<Vec<(Vec<u32>, Vec<f64>)>>, Vec<f64>) {
        let s = &self.s;
        let (h, n) = (s.hidden, toks.len());
        let hd = h / s.heads;
        let rep = s.heads / s.kv_heads;
        let emb = self.w("model.embed_tokens.weight");
        let mut xs: Vec<Vec<f64>> = toks
            .iter()
            .map(|&t| emb[t as usize * h..(t as usize + 1) * h].to_vec())
            .collect();
        let mut routes = vec![Vec::new(); n];
        let rope = |v: &mut [f64], pos: usize| {
            let half = hd / 2;
            for hh in 0..v.len() / hd {
                let b = &mut v[hh * hd..(hh + 1) * hd];
                let orig = b.to_vec();
                for j in 0..half {
                    let f = 1.0 / 10000f64.powf((2 * j) as f64 / hd as f64);
                    let (c, sn) = ((f * pos as f64).cos(), (f * pos as f64).sin());
                    b[j] = orig[j] * c - orig[j + half] * sn;
                    b[j + half] = orig[j + half] * c + orig[j] * sn;
                }
            }
        };
        for l in 0..s.layers {
            let p = format!("model.layers.{l}");
            let hn: Vec<Vec<f64>> = xs
                .iter()
                .map(|x| Self::rms(x, self.w(&format!("{p}.input_layernorm.weight"))))
                .collect();
            let kvd = s.kv_heads * hd;
            let mut q = Vec::new();
            let mut k = Vec::new();
            let mut v = Vec::new();
            for (i, x) in hn.iter().enumerate() {
                let mut qi = Self::rms(
                    &Self::lin(x, self.w(&format!("{p}.self_attn.q_proj.weight")), h),
                    self.w(&format!("{p}.self_attn.q_norm.weight")),
                );
                let mut ki = Self::rms(
                    &Self::lin(x, self.w(&format!("{p}.self_attn.k_proj.weight")), kvd),
                    self.w(&format!("{p}.self_attn.k_norm.weight")),
                );
                let mut vi = Self::lin(x, self.w(&format!("{p}.self_attn.v_proj.weight")), kvd);
                if let Some(c) = s.clip_qkv {
                    for z in qi.iter_mut().chain(ki.iter_mut()).chain(vi.iter_mut()) {
                        *z = z.clamp(-c, c);
                    }
                }
                rope(&mut qi, i);
                rope(&mut ki, i);
                q.push(qi);
                k.push(ki);
                v.push(vi);
            }
            for i in 0..n {
                let mut o = vec![0.0; h];
                for hh in 0..s.heads {
                    let kh = hh / rep;
                    let sc: Vec<f64> = (0..=i)
                        .map(|j| {
                            (0..hd)
                                .map(|d| q[i][hh * hd + d] * k[j][kh * hd + d])
                                .sum::<f64>()
                                / (hd as f64).sqrt()
                        })
                        .collect();
                    let m = sc.iter().cloned().fold(f64::MIN, f64::max);
                    let z: f64 = sc.iter().map(|x| (x - m).exp()).sum();
                    for (j, x) in sc.iter().enumerate() {
                        let a = (x - m).exp() / z;
                        for d in 0..hd {
                            o[hh * hd + d] += a * v[j][kh * hd + d];
                        }
                    }
                }
                let o = Self::lin(&o, self.w(&format!("{p}.self_attn.o_proj.weight")), h);
                for d in 0..h {
                    xs[i][d] += o[d];
                }
            }
            for i in 0..n {
                let x = Self::rms(
                    &xs[i],
                    self.w(&format!("{p}.post_attention_layernorm.weight")),
                );
                let logits = Self::lin(&x, self.w(&format!("{p}.mlp.gate.weight")), s.experts);
                let m = logits.iter().cloned().fold(f64::MIN, f64::max);
                let z: f64 = logits.iter().map(|x| (x - m).exp()).sum();
                let pr: Vec<f64> = logits.iter().map(|x| (x - m).exp() / z).collect();
                let mut idx: Vec<usize> = (0..s.experts).collect();
                idx.sort_by(|&a, &b| pr[b].partial_cmp(&pr[a]).unwrap().then(a.cmp(&b)));
                let top = &idx[..s.top_k];
                let sum: f64 = top.iter().map(|&e| pr[e]).sum();
                let mut out = vec![0.0; h];
                for &e in top {
                    let (g, u, d) = if s.fused {
                        let gu = self.w(&format!("{p}.mlp.experts.gate_up_proj"));
                        let n2 = 2 * s.inter * h;
                        let base = &gu[e * n2..(e + 1) * n2];
                        let dn = self.w(&format!("{p}.mlp.experts.down_proj"));
                        (
                            base[..s.inter * h].to_vec(),
                            base[s.inter * h..].to_vec(),
                            dn[e * h * s.inter..(e + 1) * h * s.inter].to_vec(),
                        )
                    } else {
                        let q = format!("{p}.mlp.experts.{e}");
                        (
                            self.w(&format!("{q}.gate_proj.weight")).to_vec(),
                            self.w(&format!("{q}.up_proj.weight")).to_vec(),
                            self.w(&format!("{q}.down_proj.weight")).to_vec(),
                        )
                    };
                    let gg = Self::lin(&x, &g, s.inter);
                    let uu = Self::lin(&x, &u, s.inter);
                    let act: Vec<f64> = gg
                        .iter()
                        .zip(&uu)
                        .map(|(a, b)| a / (1.0 + (-a).exp()) * b)
                        .collect();
                    let y = Self::lin(&act, &d, h);
                    let w = if s.norm_topk_prob { pr[e] / sum } else { pr[e] };
                    for dd in 0..h {
                        out[dd] += w * y[dd];
                    }
                }
                routes[i].push((
                    top.iter().map(|&e| e as u32).collect(),
                    top.iter().map(|&e| pr[e]).collect(),
                ));
                for d in 0..h {
                    xs[i][d] += out[d];
                }
            }
        }
        let last = Self::rms(&xs[n - 1], self.w("model.norm.weight"));
        let head = if s.tie {
            self.w("model.embed_tokens.weight")
        } else {
            self.w("lm_head.weight")
        };
        (routes, Self::lin(&last, head, s.vocab))
    }
}

fn check_against_reference(spec: Spec) {
    let dir = tempfile::tempdir().unwrap();
    write_model(dir.path(), &spec);
    let model = load(dir.path());
    let reference = Ref::new(spec);
    let toks: Vec<u32> = vec![5, 17, 33, 2, 90, 41, 7, 7, 63];
    let mut state = model.new_sequence("x");
    let mut sink = Collect::default();
    let logits = model
        .forward(
            &mut [StepSeq {
                state: &mut state,
                tokens: &toks,
                token_type: TokenType::Prompt,
                want_logits: true,
            }],
            &mut sink,
        )
        .unwrap()[0]
        .clone()
        .unwrap();
    let (routes, ref_logits) = reference.forward(&toks);
    let mut max_w = 0f64;
    for r in &sink.records {
        let (e, w) = &routes[r.position as usize][r.layer as usize];
        assert_eq!(&r.experts, e, "token {} layer {}", r.position, r.layer);
        for (a, b) in r.weights.as_ref().unwrap().iter().zip(w) {
            max_w = max_w.max((*a as f64 - b).abs());
        }
    }
    assert_eq!(sink.records.len(), toks.len() * reference.s.layers);
    assert!(max_w < 1e-5, "router weight diff {max_w}");
    let max_l = logits
        .iter()
        .zip(&ref_logits)
        .map(|(a, b)| (*a as f64 - b).abs())
        .fold(0.0, f64::max);
    assert!(max_l < 1e-4, "logit diff {max_l}");
}

#[test]
fn matches_naive_reference_gqa() {
    check_against_reference(Spec::default());
}

#[test]
fn matches_naive_reference_norm_topk_tied_clip_fused() {
    check_against_reference(Spec {
        norm_topk_prob: true,
        tie: true,
        clip_qkv: Some(0.8),
        fused: true,
        kv_heads: 4,
        top_k: 3,
        seed: 9,
        ..Default::default()
    });
}

#[test]
fn kv_cache_decoding_equals_full_recompute() {
    let dir = tempfile::tempdir().unwrap();
    write_model(dir.path(), &Spec::default());
    let model = load(dir.path());
    let (inc, gens) = run(&model, 1, &greedy(6), false);
    // Recompute every prompt + generated sequence in one forward without a cache.
    for g in &gens {
        let all: Vec<u32> = g
            .prompt_tokens
            .iter()
            .chain(&g.generated)
            .copied()
            .collect();
        let mut full = Collect::default();
        common::forward_once(&model, &g.prompt_id, &all, &mut full);
        let inc_map = inc.by_key();
        for r in &full.records {
            let o = &inc_map[&(g.prompt_id.clone(), r.position, r.layer)];
            assert_eq!(
                o.experts, r.experts,
                "{} pos {} layer {}",
                g.prompt_id, r.position, r.layer
            );
            assert_eq!(o.token_id, r.token_id);
            for (a, b) in o
                .weights
                .as_ref()
                .unwrap()
                .iter()
                .zip(r.weights.as_ref().unwrap())
            {
                assert!((a - b).abs() < 1e-5, "{a} vs {b}");
            }
        }
        // Every prompt and generated token has records (including the last generated one).
        assert_eq!(full.records.len(), all.len() * 2);
        assert_eq!(
            inc.records
                .iter()
                .filter(|r| r.prompt_id == g.prompt_id)
                .count(),
            all.len() * 2
        );
    }
}

#[test]
fn batch_size_does_not_change_results() {
    let dir = tempfile::tempdir().unwrap();
    write_model(
        dir.path(),
        &Spec {
            seed: 3,
            ..Default::default()
        },
    );
    let model = load(dir.path());
    let (a, ga) = run(&model, 1, &greedy(5), true);
    for bs in [2, 5] {
        let (b, gb) = run(&model, bs, &greedy(5), true);
        assert_eq!(ga, gb, "generations differ at batch size {bs}");
        assert_eq!(a.records.len(), b.records.len());
        let bm = b.by_key();
        for r in &a.records {
            let o = &bm[&(r.prompt_id.clone(), r.position, r.layer)];
            assert_eq!(o.experts, r.experts);
            for (x, y) in o
                .weights
                .as_ref()
                .unwrap()
                .iter()
                .zip(r.weights.as_ref().unwrap())
            {
                // Exactly equal: on the CPU every token's computation is independent of its batch.
                assert_eq!(x.to_bits(), y.to_bits(), "bs {bs}: {x} vs {y}");
            }
        }
        // Per-prompt record order is the same whatever the batch.
        for id in ["p0", "p2"] {
            let ka: Vec<_> = a
                .records
                .iter()
                .filter(|r| r.prompt_id == id)
                .map(|r| (r.position, r.layer))
                .collect();
            let kb: Vec<_> = b
                .records
                .iter()
                .filter(|r| r.prompt_id == id)
                .map(|r| (r.position, r.layer))
                .collect();
            assert_eq!(ka, kb);
        }
    }
}

#[test]
fn probs_are_a_distribution_and_weights_come_from_them() {
    let dir = tempfile::tempdir().unwrap();
    write_model(
        dir.path(),
        &Spec {
            norm_topk_prob: true,
            ..Default::default()
        },
    );
    let model = load(dir.path());
    let (c, _) = run(&model, 2, &greedy(2), true);
    for r in &c.records {
        let p = r.probs.as_ref().unwrap();
        assert_eq!(p.len(), 8);
        assert!((p.iter().sum::<f32>() - 1.0).abs() < 1e-5);
        let w = r.weights.as_ref().unwrap();
        for (e, wv) in r.experts.iter().zip(w) {
            assert_eq!(
                p[*e as usize], *wv,
                "weights must be pre-renormalisation probabilities"
            );
        }
        assert!(w[0] >= w[1]);
        let min_sel = w.iter().cloned().fold(f32::MAX, f32::min);
        for (e, pv) in p.iter().enumerate() {
            if !r.experts.contains(&(e as u32)) {
                assert!(*pv <= min_sel);
            }
        }
    }
}

#[test]
fn fused_and_per_expert_layouts_agree() {
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    write_model(
        a.path(),
        &Spec {
            seed: 5,
            ..Default::default()
        },
    );
    write_model(
        b.path(),
        &Spec {
            seed: 5,
            fused: true,
            ..Default::default()
        },
    );
    let (ca, ga) = run(&load(a.path()), 2, &greedy(4), false);
    let (cb, gb) = run(&load(b.path()), 2, &greedy(4), false);
    assert_eq!(ga, gb);
    assert_eq!(ca.records, cb.records);
}

#[test]
fn mapped_and_copied_experts_agree_in_bf16_for_both_layouts() {
    for fused in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        write_model(
            dir.path(),
            &Spec {
                seed: 9,
                bf16: true,
                fused,
                hidden: 48,
                inter: 40,
                ..Default::default()
            },
        );
        let mapped = load(dir.path());
        let copied = MoeModel::load(
            dir.path(),
            &LoadOptions {
                map_experts: false,
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(mapped.dtype(), candle_core::DType::BF16);
        assert!(
            mapped.experts_mapped(),
            "fused={fused}: experts should stay in the mapping"
        );
        assert!(!copied.experts_mapped());
        let (ca, ga) = run(&mapped, 2, &greedy(4), true);
        let (cb, gb) = run(&copied, 2, &greedy(4), true);
        assert_eq!(ga, gb, "fused={fused}");
        assert_eq!(ca.records, cb.records, "fused={fused}");
    }
}

#[test]
fn thread_count_does_not_change_results() {
    for bf16 in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        write_model(
            dir.path(),
            &Spec {
                seed: 11,
                bf16,
                hidden: 64,
                inter: 40,
                ..Default::default()
            },
        );
        let model = load(dir.path());
        let in_pool = |threads: usize| {
            rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap()
                .install(|| run(&model, 3, &greedy(5), true))
        };
        let (c1, g1) = in_pool(1);
        for threads in [2, 3] {
            let (c, g) = in_pool(threads);
            assert_eq!(g, g1, "bf16={bf16} threads={threads}");
            assert_eq!(c.records, c1.records, "bf16={bf16} threads={threads}");
        }
    }
}

#[test]
fn hf_generate_compat_skips_only_the_last_token() {
    let dir = tempfile::tempdir().unwrap();
    write_model(dir.path(), &Spec::default());
    let model = load(dir.path());
    let (full, g1) = run(&model, 3, &greedy(4), false);
    let (compat, g2) = run(
        &model,
        3,
        &GenerateOptions {
            hf_generate_compat: true,
            ..greedy(4)
        },
        false,
    );
    assert_eq!(g1, g2);
    for g in &g1 {
        let n = |c: &Collect| {
            c.records
                .iter()
                .filter(|r| r.prompt_id == g.prompt_id && r.token_type == TokenType::Generation)
                .count()
        };
        assert_eq!(g.generated.len(), 4);
        assert_eq!(n(&full), 4 * 2);
        assert_eq!(n(&compat), 3 * 2);
    }
    assert_eq!(
        full.begun,
        full.ended
            .iter()
            .cloned()
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect::<Vec<_>>()
    );
}

#[test]
fn eos_stops_unless_ignored() {
    let dir = tempfile::tempdir().unwrap();
    write_model(dir.path(), &Spec::default());
    let model = load(dir.path());
    let (_, g) = run(&model, 5, &greedy(6), false);
    // Use the first generated token of p0 as EOS: generation must stop right there.
    let eos = g[0].generated[0];
    let opts = GenerateOptions {
        eos_token_ids: vec![eos],
        ..greedy(6)
    };
    let (c, g2) = run(&model, 5, &opts, false);
    assert_eq!(g2[0].generated, vec![eos]);
    assert!(g2[0].stopped_on_eos);
    // Its EOS token is still routed (extra forward), one generation token per layer.
    assert_eq!(
        c.records
            .iter()
            .filter(|r| r.prompt_id == "p0" && r.token_type == TokenType::Generation)
            .count(),
        2
    );
    let (_, g3) = run(
        &model,
        5,
        &GenerateOptions {
            ignore_eos: true,
            ..opts
        },
        false,
    );
    assert_eq!(g3[0].generated.len(), 6);
}

#[test]
fn bf16_checkpoint_computed_in_f32_matches_f32_checkpoint_of_same_values() {
    // Weights rounded to bf16 and stored as bf16, computed in f32, must equal the f32 checkpoint
    // holding the same rounded values.
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    let spec = Spec {
        seed: 11,
        ..Default::default()
    };
    let ts: Vec<_> = common::tensors(&spec)
        .into_iter()
        .map(|(n, s, v)| {
            (
                n,
                s,
                v.into_iter()
                    .map(|x| half::bf16::from_f32(x).to_f32())
                    .collect::<Vec<_>>(),
            )
        })
        .collect();
    for d in [a.path(), b.path()] {
        std::fs::write(
            d.join("config.json"),
            common::config_json(&spec).to_string(),
        )
        .unwrap();
    }
    common::write_safetensors(&a.path().join("model.safetensors"), &ts, false);
    common::write_safetensors(&b.path().join("model.safetensors"), &ts, true);
    let ma = load(a.path());
    let mb = MoeModel::load(
        b.path(),
        &LoadOptions {
            dtype: Some(candle_core::DType::F32),
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(mb.dtype(), candle_core::DType::F32);
    let (ca, ga) = run(&ma, 2, &greedy(3), false);
    let (cb, gb) = run(&mb, 2, &greedy(3), false);
    assert_eq!(ga, gb);
    assert_eq!(ca.records, cb.records);
    // And native bf16 compute stays close (expert sets mostly equal).
    let mc = load(b.path());
    assert_eq!(mc.dtype(), candle_core::DType::BF16);
    let (cc, _) = run(&mc, 2, &greedy(3), false);
    let m = cc.by_key();
    let same = ca
        .records
        .iter()
        .filter(|r| {
            m.get(&(r.prompt_id.clone(), r.position, r.layer))
                .map(|o| o.experts == r.experts)
                .unwrap_or(false)
        })
        .count();
    assert!(
        same as f64 >= 0.7 * ca.records.len() as f64,
        "{same}/{}",
        ca.records.len()
    );
}
