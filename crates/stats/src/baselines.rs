//! Null baselines of the pair similarity (see `docs/statistics.md`): `permutation`,
//! `load_balance_uniform`, `load_balance_marginal`. Each repetition r draws a synthetic counts set
//! for all N prompts from its own random stream ([`crate::sub_rng`]), and records the mean `m_r`
//! and the std (ddof = 1) `q_r` of sim over all pairs i<j. Repetitions run in parallel (rayon) and
//! are reduced in order, so results are identical for any thread count.

use crate::input::AnalysisInput;
use crate::results::BaselineStats;
use crate::signature::embed_in_place;
use crate::similarity::{gram, mean_std};
use crate::{sub_rng, tags};
use rand::seq::SliceRandom;
use rand::RngCore;
use rayon::prelude::*;

/// Which null model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Baseline {
    Permutation,
    LoadBalanceUniform,
    LoadBalanceMarginal,
}

impl Baseline {
    fn tag(self) -> u64 {
        match self {
            Baseline::Permutation => tags::PERMUTATION,
            Baseline::LoadBalanceUniform => tags::LOAD_BALANCE_UNIFORM,
            Baseline::LoadBalanceMarginal => tags::LOAD_BALANCE_MARGINAL,
        }
    }
}

/// Uniform expert indices in `[0, E)` from a random stream. For E a power of two the indices are
/// bit fields of 64-bit words; otherwise Lemire's multiply-shift with rejection (exactly uniform).
/// Hand-written because the generic `random_range` spends one 32-bit draw per index, which is the
/// bottleneck of the load-balancing baselines.
struct IndexSampler {
    e: u32,
    bits: u32,
    mask: u64,
    buf: u64,
    left: u32,
}

impl IndexSampler {
    fn new(e: usize) -> Self {
        let e = e as u32;
        let pow2 = e.is_power_of_two();
        let bits = if pow2 { e.trailing_zeros() } else { 0 };
        IndexSampler {
            e,
            bits,
            mask: if pow2 { (1u64 << bits) - 1 } else { 0 },
            buf: 0,
            left: 0,
        }
    }

    #[inline]
    fn next(&mut self, rng: &mut impl RngCore) -> usize {
        if self.e.is_power_of_two() {
            if self.bits == 0 {
                return 0;
            }
            if self.left < self.bits {
                self.buf = rng.next_u64();
                self.left = 64;
            }
            let x = self.buf & self.mask;
            self.buf >>= self.bits;
            self.left -= self.bits;
            x as usize
        } else {
            // Lemire (2019), "Fast random integer generation in an interval".
            let threshold = self.e.wrapping_neg() % self.e;
            loop {
                let m = rng.next_u32() as u64 * self.e as u64;
                if (m as u32) >= threshold {
                    return (m >> 32) as usize;
                }
            }
        }
    }
}

/// Vose alias table over E experts, for draws proportional to a load vector.
struct Alias {
    prob: Vec<f64>,
    alias: Vec<usize>,
}

impl Alias {
    fn new(w: &[f64]) -> Self {
        let e = w.len();
        let total: f64 = w.iter().sum();
        let mut prob: Vec<f64> = w.iter().map(|x| x * e as f64 / total).collect();
        let mut alias: Vec<usize> = (0..e).collect();
        let (mut small, mut large): (Vec<usize>, Vec<usize>) = (0..e).partition(|&i| prob[i] < 1.0);
        while let (Some(s), Some(&l)) = (small.pop(), large.last()) {
            alias[s] = l;
            prob[l] -= 1.0 - prob[s];
            if prob[l] < 1.0 {
                large.pop();
                small.push(l);
            }
        }
        for i in large.into_iter().chain(small) {
            // Leftovers are 1 up to rounding; zero-weight entries can never be leftovers unless
            // every weight is zero, which callers exclude.
            if w[i] > 0.0 {
                prob[i] = 1.0;
            }
        }
        Alias { prob, alias }
    }

    /// One draw (32-bit column choice and 32-bit acceptance; bias below 2^-32).
    #[inline]
    fn draw(&self, rng: &mut impl RngCore) -> usize {
        let r = rng.next_u64();
        let col = (((r >> 32) * self.prob.len() as u64) >> 32) as usize;
        let u = (r & 0xffff_ffff) as f64 * (1.0 / 4_294_967_296.0);
        if u < self.prob[col] {
            col
        } else {
            self.alias[col]
        }
    }
}

/// Per-repetition statistics `(m_r, q_r)`.
fn rep_stats(counts: &mut [f64], n: usize, num_layers: usize, num_experts: usize) -> (f64, f64) {
    let d = num_layers * num_experts;
    for row in counts.chunks_mut(d) {
        embed_in_place(row, num_layers, num_experts);
    }
    let g = gram(counts, n, d);
    let s = mean_std(
        (0..n)
            .flat_map(|i| ((i + 1)..n).map(move |j| (i, j)))
            .map(|(i, j)| g[i * n + j]),
    );
    (s.mean, s.std)
}

/// Tokens per (prompt, layer) for the load-balancing baselines: `round(Σ_e A / k)` for unweighted
/// counts, the recorded per-layer token count in `--weighted` mode; at least 1.
pub fn tokens_per_layer(input: &AnalysisInput) -> Vec<u64> {
    let (n, nl, ne, k) = (input.n(), input.num_layers, input.num_experts, input.top_k);
    let mut t = Vec::with_capacity(n * nl);
    for i in 0..n {
        let row = input.counts_row(i);
        for l in 0..nl {
            let v = if input.weighted {
                input.tokens_per_layer[i * nl + l]
            } else {
                let s: f64 = row[l * ne..(l + 1) * ne].iter().sum();
                (s / k as f64).round() as u64
            };
            t.push(v.max(1));
        }
    }
    t
}

/// Draw one synthetic counts set (N × L·E) for repetition `rep`.
fn synth_counts(
    which: Baseline,
    input: &AnalysisInput,
    tokens: &[u64],
    pooled: &[f64],
    seed: u64,
    rep: u64,
) -> Vec<f64> {
    let (n, nl, ne, k) = (input.n(), input.num_layers, input.num_experts, input.top_k);
    let d = nl * ne;
    let mut rng = sub_rng(seed, which.tag(), rep);
    match which {
        Baseline::Permutation => {
            let mut out = input.counts.clone();
            for row in out.chunks_mut(d) {
                for layer in row.chunks_mut(ne) {
                    layer.shuffle(&mut rng);
                }
            }
            out
        }
        Baseline::LoadBalanceUniform => {
            let mut out = vec![0.0; n * d];
            let mut sampler = IndexSampler::new(ne);
            let mut chosen = vec![false; ne];
            let mut picks = Vec::with_capacity(k);
            for i in 0..n {
                for l in 0..nl {
                    let layer = &mut out[i * d + l * ne..i * d + (l + 1) * ne];
                    for _ in 0..tokens[i * nl + l] {
                        picks.clear();
                        if k == ne {
                            layer.iter_mut().for_each(|x| *x += 1.0);
                            continue;
                        }
                        if ne <= 64 {
                            // Same rejection of repeats, with a bit mask as the taken-set.
                            let mut mask = 0u64;
                            let mut got = 0;
                            while got < k {
                                let e = sampler.next(&mut rng);
                                let bit = 1u64 << e;
                                if mask & bit == 0 {
                                    mask |= bit;
                                    got += 1;
                                    layer[e] += 1.0;
                                }
                            }
                            continue;
                        }
                        // Rejection of repeats: exactly a uniform k-subset.
                        while picks.len() < k {
                            let e = sampler.next(&mut rng);
                            if !chosen[e] {
                                chosen[e] = true;
                                picks.push(e);
                            }
                        }
                        for &e in &picks {
                            chosen[e] = false;
                            layer[e] += 1.0;
                        }
                    }
                }
            }
            out
        }
        Baseline::LoadBalanceMarginal => {
            let mut out = vec![0.0; n * d];
            let tables: Vec<Option<Alias>> = (0..nl)
                .map(|l| {
                    let p = &pooled[l * ne..(l + 1) * ne];
                    let positive = p.iter().filter(|&&x| x > 0.0).count();
                    (positive > k).then(|| Alias::new(p))
                })
                .collect();
            let mut chosen = vec![false; ne];
            let mut picks = Vec::with_capacity(k);
            for i in 0..n {
                for l in 0..nl {
                    let p = &pooled[l * ne..(l + 1) * ne];
                    let total: f64 = p.iter().sum();
                    let layer = &mut out[i * d + l * ne..i * d + (l + 1) * ne];
                    let Some(alias) = &tables[l] else {
                        // Fewer than k (or exactly k) experts carry load: every token takes all of them.
                        let t = tokens[i * nl + l] as f64;
                        for (x, &w) in layer.iter_mut().zip(p) {
                            if w > 0.0 {
                                *x += t;
                            }
                        }
                        continue;
                    };
                    for _ in 0..tokens[i * nl + l] {
                        picks.clear();
                        let mut remaining = total;
                        while picks.len() < k {
                            let e = if remaining > 0.25 * total {
                                // Drawing from the full distribution and rejecting experts already
                                // taken gives exactly the renormalised sequential draw.
                                let e = alias.draw(&mut rng);
                                if chosen[e] || p[e] <= 0.0 {
                                    continue;
                                }
                                e
                            } else {
                                // Little mass left: inverse-CDF scan over the remaining experts.
                                let u = (rng.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64);
                                let mut target = u * remaining;
                                let mut pick = None;
                                for (e, &w) in p.iter().enumerate() {
                                    if chosen[e] || w <= 0.0 {
                                        continue;
                                    }
                                    pick = Some(e);
                                    if target < w {
                                        break;
                                    }
                                    target -= w;
                                }
                                match pick {
                                    Some(e) => e,
                                    None => break,
                                }
                            };
                            chosen[e] = true;
                            remaining -= p[e];
                            picks.push(e);
                        }
                        for &e in &picks {
                            chosen[e] = false;
                            layer[e] += 1.0;
                        }
                    }
                }
            }
            out
        }
    }
}

/// Run one baseline for `reps` repetitions.
pub fn run_baseline(
    which: Baseline,
    input: &AnalysisInput,
    reps: usize,
    seed: u64,
) -> BaselineStats {
    let (n, nl, ne) = (input.n(), input.num_layers, input.num_experts);
    let d = nl * ne;
    let tokens = tokens_per_layer(input);
    let mut pooled = vec![0.0; d];
    for i in 0..n {
        for (p, x) in pooled.iter_mut().zip(input.counts_row(i)) {
            *p += x;
        }
    }
    let per_rep: Vec<(f64, f64)> = (0..reps)
        .into_par_iter()
        .map(|r| {
            let mut c = synth_counts(which, input, &tokens, &pooled, seed, r as u64);
            rep_stats(&mut c, n, nl, ne)
        })
        .collect();
    let m = mean_std(per_rep.iter().map(|x| x.0));
    let q = mean_std(per_rep.iter().map(|x| x.1));
    BaselineStats {
        mean: m.mean,
        std: m.std,
        pair_std: q.mean,
        reps,
        seed,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::input::{build_input, PromptRow};

    fn toy(n: usize, nl: usize, ne: usize, k: usize) -> AnalysisInput {
        let rows = (0..n)
            .map(|i| {
                let mut counts = vec![0.0; nl * ne];
                for l in 0..nl {
                    for t in 0..10 {
                        for j in 0..k {
                            counts[l * ne + (i + t * j + l) % ne] += 1.0;
                        }
                    }
                }
                PromptRow {
                    prompt_id: format!("p{i}"),
                    category: Some(format!("c{}", i % 2)),
                    counts,
                    tokens_per_layer: vec![10; nl],
                }
            })
            .collect();
        build_input(nl, ne, k, false, rows).unwrap()
    }

    #[test]
    fn uniform_baseline_preserves_token_totals() {
        let inp = toy(6, 2, 8, 2);
        let tokens = tokens_per_layer(&inp);
        let c = synth_counts(Baseline::LoadBalanceUniform, &inp, &tokens, &[], 3, 0);
        for i in 0..6 {
            for l in 0..2 {
                let s: f64 = c[i * 16 + l * 8..i * 16 + l * 8 + 8].iter().sum();
                assert_eq!(s, (tokens[i * 2 + l] * 2) as f64);
                assert!(c[i * 16 + l * 8..i * 16 + l * 8 + 8]
                    .iter()
                    .all(|&x| x <= tokens[i * 2 + l] as f64));
            }
        }
    }

    #[test]
    fn marginal_never_draws_zero_load_experts() {
        let inp = toy(6, 1, 7, 3);
        let mut pooled = vec![5.0, 0.0, 1.0, 0.0, 2.0, 9.0, 0.5];
        let tokens = tokens_per_layer(&inp);
        let c = synth_counts(Baseline::LoadBalanceMarginal, &inp, &tokens, &pooled, 1, 4);
        for i in 0..6 {
            assert_eq!(c[i * 7 + 1], 0.0);
            assert_eq!(c[i * 7 + 3], 0.0);
            let s: f64 = c[i * 7..i * 7 + 7].iter().sum();
            assert_eq!(s, (tokens[i] * 3) as f64);
        }
        // Fewer than k loaded experts: all of them, every token.
        pooled = vec![0.0, 1.0, 0.0, 0.0, 0.0, 2.0, 0.0];
        let c = synth_counts(Baseline::LoadBalanceMarginal, &inp, &tokens, &pooled, 1, 4);
        assert_eq!(c[1], tokens[0] as f64);
        assert_eq!(c[5], tokens[0] as f64);
        assert_eq!(c[0], 0.0);
    }

    #[test]
    fn marginal_frequencies_follow_sequential_draws() {
        // Two draws without replacement from weights (3,1,1,1)/6: P(first picked at all) =
        // 1/2 + 3 * (1/6) * (3/5) = 0.8.
        let rows = (0..2)
            .map(|i| PromptRow {
                prompt_id: format!("p{i}"),
                category: Some(format!("c{i}")),
                counts: vec![3.0, 1.0, 1.0, 1.0],
                tokens_per_layer: vec![],
            })
            .chain((2..4).map(|i| PromptRow {
                prompt_id: format!("p{i}"),
                category: Some(format!("c{}", i % 2)),
                counts: vec![3.0, 1.0, 1.0, 1.0],
                tokens_per_layer: vec![],
            }))
            .collect();
        let mut inp = build_input(1, 4, 2, false, rows).unwrap();
        inp.counts.iter_mut().for_each(|x| *x *= 5000.0); // 15000 tokens per prompt
        let tokens = tokens_per_layer(&inp);
        let pooled = vec![3.0, 1.0, 1.0, 1.0];
        let c = synth_counts(Baseline::LoadBalanceMarginal, &inp, &tokens, &pooled, 9, 0);
        let t: f64 = tokens.iter().map(|&x| x as f64).sum();
        let f0: f64 = (0..4).map(|i| c[i * 4]).sum::<f64>() / t;
        // binomial sd ≈ sqrt(0.16/60000) ≈ 0.0016
        assert!((f0 - 0.8).abs() < 0.01, "{f0}");
    }

    #[test]
    fn baselines_are_deterministic_and_sane() {
        let inp = toy(8, 3, 16, 4);
        for b in [
            Baseline::Permutation,
            Baseline::LoadBalanceUniform,
            Baseline::LoadBalanceMarginal,
        ] {
            let a = run_baseline(b, &inp, 20, 7);
            let a2 = run_baseline(b, &inp, 20, 7);
            assert_eq!(a, a2);
            assert!(a.mean > 0.0 && a.mean < 1.0, "{b:?} {a:?}");
            assert!(a.std > 0.0 && a.pair_std > 0.0);
            let other = run_baseline(b, &inp, 20, 8);
            assert_ne!(a.mean, other.mean);
        }
    }

    #[test]
    fn index_sampler_is_uniform() {
        for e in [8usize, 7] {
            let mut s = IndexSampler::new(e);
            let mut rng = sub_rng(0, 99, 0);
            let mut h = vec![0usize; e];
            for _ in 0..70000 {
                h[s.next(&mut rng)] += 1;
            }
            let expect = 70000.0 / e as f64;
            for &x in &h {
                assert!((x as f64 - expect).abs() < 5.0 * expect.sqrt(), "{h:?}");
            }
        }
    }
}
