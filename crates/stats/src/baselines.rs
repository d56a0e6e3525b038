//! Null baselines of the pair similarity (see `docs/statistics.md`): `permutation`,
//! `load_balance_uniform`, `load_balance_marginal`. Each repetition r draws a synthetic counts set
//! for all N prompts from its own random stream ([`rep_rng`]), and records the mean `m_r` and the
//! std (ddof = 1) `q_r` of sim over all pairs i<j. Repetitions run in parallel (rayon) and are
//! reduced in order, so results are identical for any thread count.
//!
//! Per repetition, `sim(i,j) = (1/L) Σ_l G_l[i,j] / sqrt(G_l[i,i] G_l[j,j])` with the per-layer
//! Gram matrices `G_l = C_l C_lᵀ` of the synthetic counts (N×E per layer). When the counts are
//! integers below 2^15 whose per-layer dot products stay below 2^31 (always the case for the
//! load-balancing baselines at realistic token counts), the counts are stored as i16 and `G_l` is
//! computed *exactly* in integers (`moe_xray_kernels::gram`): the result does not depend on the
//! summation order, the SIMD kernel or the thread count. Otherwise (router-weighted counts, very
//! long prompts) it is computed in f64 by the `gemm` crate. For E ≤ 64 experts the
//! load-balancing draws come from `moe_xray_kernels::sampler` (bit-mask k-subsets, four token
//! lanes) and the permutations of 33–64 experts from `moe_xray_kernels::shuffle`. This file is
//! the null models only: every SIMD kernel, lane mask and bit-sliced counter lives in the
//! `moe-xray-kernels` crate.

use crate::input::AnalysisInput;
use crate::results::BaselineStats;
use crate::similarity::mean_std;
use crate::{sub_rng, tags};
use moe_xray_kernels::cpu::{with_avx, AvxBody};
use moe_xray_kernels::gram::{accumulate_normalised, gram_upper};
use moe_xray_kernels::linalg::{gemm_f64, MatMut, MatRef};
use moe_xray_kernels::rng::Rng4;
use moe_xray_kernels::sampler::{count_tokens, count_tokens_i16, AliasTable, Draw, Fields};
use moe_xray_kernels::shuffle;
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

/// xoshiro256++ (Blackman & Vigna 2021), seeded from the repetition's ChaCha8 stream
/// ([`sub_rng`], see [`RepRng`]); the one implementation lives in `moe_xray_kernels::rng`.
pub use moe_xray_kernels::rng::Xoshiro256pp;

/// The random words of one baseline repetition: xoshiro256++ seeded with the first four words of
/// `sub_rng(seed, tag, rep)`.
pub struct RepRng {
    gen: Xoshiro256pp,
}

impl RepRng {
    pub fn new(seed: u64, tag: u64, rep: u64) -> Self {
        RepRng {
            gen: Xoshiro256pp::from_rng(&mut sub_rng(seed, tag, rep)),
        }
    }

    #[inline]
    pub fn next_u64(&mut self) -> u64 {
        self.gen.next_u64()
    }
}

/// The four-lane generator of repetition `rep` of `tag` (the samplers' and shuffles' stream):
/// lane j seeded with words 4 + 4j .. 8 + 4j of `sub_rng(seed, tag, rep)` (words 0..4 seed
/// [`RepRng`]), the tie stream with words 20..24.
fn rng4(seed: u64, tag: u64, rep: u64) -> Rng4 {
    let mut c = sub_rng(seed, tag, rep);
    for _ in 0..4 {
        c.next_u64();
    }
    Rng4::from_rng(&mut c)
}

/// The random words of baseline repetition `rep`.
fn rep_rng(which: Baseline, seed: u64, rep: u64) -> RepRng {
    RepRng::new(seed, which.tag(), rep)
}

/// Exactly uniform integers below a bound, from 16-bit slices of the generator's 64-bit words
/// (four per word) with Lemire's multiply-shift rejection ("Fast random integer generation in an
/// interval", 2019); bounds above 2^16 use whole words. Hand-written because a generic range
/// sampler spends a whole 32- or 64-bit draw per index, which is the bottleneck of the
/// load-balancing baselines.
struct Below {
    buf: u64,
    left: u32,
}

impl Below {
    fn new() -> Self {
        Below { buf: 0, left: 0 }
    }

    #[inline]
    fn next16(&mut self, rng: &mut RepRng) -> u32 {
        if self.left == 0 {
            self.buf = rng.next_u64();
            self.left = 4;
        }
        let x = self.buf as u16 as u32;
        self.buf >>= 16;
        self.left -= 1;
        x
    }

    /// Uniform in `[0, range)`, `range ≥ 1`.
    #[inline]
    fn below(&mut self, rng: &mut RepRng, range: usize) -> usize {
        if range <= 1 << 16 {
            let s = range as u32;
            loop {
                let m = self.next16(rng) * s;
                let lo = m & 0xffff;
                // Reject the (2^16 mod s) smallest low parts; the division runs with
                // probability s/2^16 only.
                if lo >= s || lo >= ((1u32 << 16) - s) % s {
                    return (m >> 16) as usize;
                }
            }
        } else {
            let s = range as u64;
            loop {
                let m = rng.next_u64() as u128 * s as u128;
                let lo = m as u64;
                if lo >= s || lo >= s.wrapping_neg() % s {
                    return (m >> 64) as usize;
                }
            }
        }
    }
}

/// Element type of the synthetic counts: i16 when the per-layer Gram matrices are exact in i32
/// (see module docs), else f64.
trait Elem: Copy + Send + Sync + 'static {
    const ZERO: Self;
    fn from_f64(x: f64) -> Self;
    /// Upper triangle (with the diagonal) of `G = C Cᵀ` for the row-major N×E block `c`, as f64.
    fn layer_gram(c: &[Self], n: usize, ne: usize, g: &mut [f64]);
    /// Counts of `t` tokens drawn by [`count_tokens`] (E ≤ 64) into `layer`.
    fn draw_counts(rng: &mut Rng4, t: u64, d: Draw, k: usize, layer: &mut [Self]);
    /// The blocks of `ne` values of `src`, each permuted uniformly ([`shuffle`], 33 ≤ E ≤ 64).
    fn permute_blocks(rng: &mut Rng4, src: &[Self], dst: &mut [Self], ne: usize);
    /// [`layer_gram`](Elem::layer_gram), the `inv` loop of [`rep_stats`] and
    /// [`accumulate_layer`] in one pass, with the same values; `false` (nothing written) when
    /// no fused kernel applies.
    fn accumulate_fused(
        _c: &[Self],
        _n: usize,
        _ne: usize,
        _inv: &mut [f64],
        _acc: &mut [f64],
    ) -> bool {
        false
    }
}

impl Elem for i16 {
    const ZERO: Self = 0;
    fn from_f64(x: f64) -> Self {
        x as i16
    }
    fn layer_gram(c: &[Self], n: usize, ne: usize, g: &mut [f64]) {
        gram_upper(c, n, ne, g);
    }
    fn draw_counts(rng: &mut Rng4, t: u64, d: Draw, k: usize, layer: &mut [Self]) {
        count_tokens_i16(rng, t, d, k, layer);
    }
    fn permute_blocks(rng: &mut Rng4, src: &[Self], dst: &mut [Self], ne: usize) {
        shuffle::permute_blocks_i16(rng, src, dst, ne);
    }
    fn accumulate_fused(c: &[Self], n: usize, ne: usize, inv: &mut [f64], acc: &mut [f64]) -> bool {
        accumulate_normalised(c, n, ne, inv, acc)
    }
}

impl Elem for f64 {
    const ZERO: Self = 0.0;
    fn from_f64(x: f64) -> Self {
        x
    }
    fn layer_gram(c: &[Self], n: usize, ne: usize, g: &mut [f64]) {
        f64_gram(c, n, ne, g);
    }
    fn draw_counts(rng: &mut Rng4, t: u64, d: Draw, k: usize, layer: &mut [Self]) {
        let mut c = [0u64; 64];
        count_tokens(rng, t, d, k, &mut c[..layer.len()]);
        for (x, &y) in layer.iter_mut().zip(&c) {
            *x = y as f64;
        }
    }
    fn permute_blocks(rng: &mut Rng4, src: &[Self], dst: &mut [Self], ne: usize) {
        shuffle::permute_blocks(rng, src, dst, ne);
    }
}

/// Bounds of the exact integer path: entries fit in an i16, dot products in an i32.
const I16_MAX: f64 = 32_767.0;
const I32_EXACT: f64 = 2_147_483_648.0;

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

/// Everything a repetition needs that does not change between repetitions.
struct Setup<'a> {
    which: Baseline,
    input: &'a AnalysisInput,
    tokens: &'a [u64],
    pooled: &'a [f64],
    /// Per-layer alias tables of the pooled load (`None`: at most k experts carry load).
    tables: Vec<Option<AliasTable>>,
    /// Per layer: the k−1 heaviest experts hold less than 74 % of the pooled load (margin
    /// against rounding of the `remaining` bookkeeping), so the marginal sampler's inverse-CDF
    /// branch can never be reached and every pick is an alias draw with rejection.
    fast: Vec<bool>,
    seed: u64,
}

impl<'a> Setup<'a> {
    fn new(
        which: Baseline,
        input: &'a AnalysisInput,
        tokens: &'a [u64],
        pooled: &'a [f64],
        seed: u64,
    ) -> Self {
        let (nl, ne, k) = (input.num_layers, input.num_experts, input.top_k);
        let tables = if which == Baseline::LoadBalanceMarginal {
            (0..nl)
                .map(|l| {
                    let p = &pooled[l * ne..(l + 1) * ne];
                    let positive = p.iter().filter(|&&x| x > 0.0).count();
                    (positive > k).then(|| AliasTable::new(p))
                })
                .collect()
        } else {
            Vec::new()
        };
        let marginal = which == Baseline::LoadBalanceMarginal;
        let fast = (0..if marginal { nl } else { 0 })
            .map(|l| {
                let p = &pooled[l * ne..(l + 1) * ne];
                let total: f64 = p.iter().sum();
                let mut sorted = p.to_vec();
                sorted.sort_by(|a, b| b.total_cmp(a));
                let top: f64 = sorted.iter().take(k.saturating_sub(1)).sum();
                top < 0.74 * total
            })
            .collect();
        Setup {
            which,
            input,
            tokens,
            pooled,
            tables,
            fast,
            seed,
        }
    }

    /// Whether every repetition's counts fit the exact integer path (see module docs).
    fn int_exact(&self) -> bool {
        let input = self.input;
        let (n, nl, ne, k) = (input.n(), input.num_layers, input.num_experts, input.top_k);
        match self.which {
            Baseline::Permutation => {
                // Σ_e a_e b_e ≤ max_e a_e · Σ_e b_e for non-negative integer counts.
                let mut max_count: f64 = 0.0;
                let mut max_sum: f64 = 0.0;
                for i in 0..n {
                    for layer in input.counts_row(i).chunks(ne) {
                        if layer.iter().any(|&x| x < 0.0 || x.fract() != 0.0) {
                            return false;
                        }
                        let s: f64 = layer.iter().sum();
                        max_sum = max_sum.max(s);
                        max_count = max_count.max(layer.iter().copied().fold(0.0, f64::max));
                    }
                }
                nl > 0 && max_count <= I16_MAX && max_count * max_sum < I32_EXACT
            }
            // counts ≤ t per expert and Σ_e = k·t (at most k·t when fewer experts carry load).
            _ => {
                let t = self.tokens.iter().copied().max().unwrap_or(0) as f64;
                t <= I16_MAX && k as f64 * t * t < I32_EXACT
            }
        }
    }
}

/// Reusable buffers of one worker.
struct Work<T> {
    /// Synthetic counts, layer-major: `c[(l·N + i)·E + e]`.
    c: Vec<T>,
    /// One per-layer Gram matrix, N×N row-major (upper triangle and diagonal used).
    g: Vec<f64>,
    /// `Σ_l G_l[i,j] r_il r_jl` for i<j (row-major N×N, upper part used).
    acc: Vec<f64>,
    /// `r_il = 1/sqrt(G_l[i,i])` (0 for an empty layer) of the current layer.
    inv: Vec<f64>,
    pairs: Vec<f64>,
}

impl<T: Elem> Work<T> {
    fn new(n: usize, nl: usize, ne: usize) -> Self {
        Work {
            c: vec![T::ZERO; nl * n * ne],
            g: vec![0.0; n * n],
            acc: vec![0.0; n * n],
            inv: vec![0.0; n],
            pairs: Vec::with_capacity(n * n.saturating_sub(1) / 2),
        }
    }
}

/// The observed counts in the layer-major layout of [`Work::c`] (permutation baseline only).
fn observed<T: Elem>(s: &Setup) -> Vec<T> {
    if s.which != Baseline::Permutation {
        return Vec::new();
    }
    let input = s.input;
    let (n, nl, ne) = (input.n(), input.num_layers, input.num_experts);
    let mut c = vec![T::ZERO; nl * n * ne];
    for i in 0..n {
        let row = input.counts_row(i);
        for l in 0..nl {
            for (x, &y) in c[(l * n + i) * ne..(l * n + i + 1) * ne]
                .iter_mut()
                .zip(&row[l * ne..(l + 1) * ne])
            {
                *x = T::from_f64(y);
            }
        }
    }
    c
}

/// Taken-set of one token (bit set over the experts).
#[inline]
fn is_taken(taken: &[u64], e: usize) -> bool {
    taken[e >> 6] & (1u64 << (e & 63)) != 0
}

/// Draw the synthetic counts of repetition `rep` into `c` (layer-major, see [`Work`]).
fn synth_counts<T: Elem>(s: &Setup, rep: u64, c: &mut [T], base: &[T]) {
    let input = s.input;
    let (n, nl, ne, k) = (input.n(), input.num_layers, input.num_experts, input.top_k);
    let mut rng = rep_rng(s.which, s.seed, rep);
    let mut rng4 = rng4(s.seed, s.which.tag(), rep);
    let mut below = Below::new();
    let at = |l: usize, i: usize| (l * n + i) * ne;
    // Integer counts of one (prompt, layer), converted to T at the end. Consecutive tokens count
    // into LANES separate arrays, so that increments of the same expert by neighbouring tokens do
    // not wait on each other through memory.
    const LANES: usize = 4;
    let mut cnt = vec![0u32; LANES * ne];
    let words = ne.div_ceil(64);
    let mut taken = vec![0u64; words];
    // E ≤ 64: `t` tokens drawn by `sampler` (its four-lane stream), counts written to `layer`.
    let mut count_into =
        |layer: &mut [T], d: Draw, t: u64| T::draw_counts(&mut rng4, t, d, k, layer);
    match s.which {
        Baseline::Permutation => {
            if shuffle::uses_sort(ne) {
                // 33 ≤ E ≤ 64: every block (memory order) sorted by random keys from the four
                // lanes of `rng4`, ties redrawn — exactly uniform (`moe_xray_kernels::shuffle`).
                T::permute_blocks(&mut rng4, base, c, ne);
                return;
            }
            // The observed counts, already in the layout and type of `c`.
            c.copy_from_slice(base);
            for i in 0..n {
                for l in 0..nl {
                    let layer = &mut c[at(l, i)..at(l, i) + ne];
                    // Fisher–Yates: a uniform permutation of the expert axis.
                    for m in (1..ne).rev() {
                        let j = below.below(&mut rng, m + 1);
                        layer.swap(m, j);
                    }
                }
            }
        }
        Baseline::LoadBalanceUniform => {
            for i in 0..n {
                for l in 0..nl {
                    let t = s.tokens[i * nl + l];
                    let layer = &mut c[at(l, i)..at(l, i) + ne];
                    if k >= ne {
                        let tt = T::from_f64(t as f64);
                        layer.iter_mut().for_each(|x| *x = tt);
                        continue;
                    }
                    if ne <= 64 {
                        count_into(layer, Draw::Uniform(Fields::new(ne)), t);
                        continue;
                    }
                    // E > 64: Floyd's algorithm (Bentley & Floyd, CACM 1987) on taken-set words:
                    // for j = E−k, …, E−1 draw u uniform in [0, j] and take u, or j if u is
                    // already taken — a uniform k-subset with exactly k draws.
                    cnt.iter_mut().for_each(|x| *x = 0);
                    for tok in 0..t {
                        taken.iter_mut().for_each(|w| *w = 0);
                        for j in (ne - k)..ne {
                            let u = below.below(&mut rng, j + 1);
                            let e = if is_taken(&taken, u) { j } else { u };
                            taken[e >> 6] |= 1u64 << (e & 63);
                            cnt[(tok as usize % LANES) * ne + e] += 1;
                        }
                    }
                    for (e, x) in layer.iter_mut().enumerate() {
                        let y: u32 = (0..LANES).map(|q| cnt[q * ne + e]).sum();
                        *x = T::from_f64(y as f64);
                    }
                }
            }
        }
        Baseline::LoadBalanceMarginal => {
            for l in 0..nl {
                let p = &s.pooled[l * ne..(l + 1) * ne];
                let total: f64 = p.iter().sum();
                // Experts without load are never drawn: every token starts with them taken.
                let mut zero = vec![0u64; words];
                for (e, &w) in p.iter().enumerate() {
                    if w <= 0.0 {
                        zero[e >> 6] |= 1u64 << (e & 63);
                    }
                }
                let fast = s.fast[l];
                for i in 0..n {
                    let t = s.tokens[i * nl + l];
                    let layer = &mut c[at(l, i)..at(l, i) + ne];
                    let Some(alias) = &s.tables[l] else {
                        // At most k experts carry load: every token takes all of them.
                        let tt = T::from_f64(t as f64);
                        for (x, &w) in layer.iter_mut().zip(p) {
                            *x = if w > 0.0 { tt } else { T::ZERO };
                        }
                        continue;
                    };
                    if fast && ne <= 64 {
                        // Even after k−1 picks more than a quarter of the mass is left, so every
                        // pick is an alias draw with rejection: no mass bookkeeping needed.
                        count_into(layer, Draw::Alias(alias), t);
                        continue;
                    }
                    cnt.iter_mut().for_each(|x| *x = 0);
                    // General path (E > 64, or heavy experts): taken-set words and the mass left.
                    for tok in 0..t {
                        taken.copy_from_slice(&zero);
                        let mut remaining = total;
                        let mut got = 0;
                        while got < k {
                            let e = if remaining > 0.25 * total {
                                // Drawing from the full distribution and rejecting experts already
                                // taken gives exactly the renormalised sequential draw.
                                let e = alias.draw(rng.next_u64() as u32) as usize;
                                if is_taken(&taken, e) {
                                    continue;
                                }
                                e
                            } else {
                                // Little mass left: inverse-CDF scan over the remaining experts.
                                let u = (rng.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64);
                                let mut target = u * remaining;
                                let mut pick = None;
                                for (e, &w) in p.iter().enumerate() {
                                    if is_taken(&taken, e) {
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
                            taken[e >> 6] |= 1u64 << (e & 63);
                            remaining -= p[e];
                            got += 1;
                            cnt[(tok as usize % LANES) * ne + e] += 1;
                        }
                    }
                    for (e, x) in layer.iter_mut().enumerate() {
                        let y: u32 = (0..LANES).map(|q| cnt[q * ne + e]).sum();
                        *x = T::from_f64(y as f64);
                    }
                }
            }
        }
    }
}

/// `G = C Cᵀ` for the row-major N×E block `c`, into the row-major N×N `g` (gemm crate,
/// single-threaded; repetitions are the parallel unit).
fn f64_gram(c: &[f64], n: usize, ne: usize, g: &mut [f64]) {
    assert!(c.len() == n * ne && g.len() == n * n);
    if n == 0 || ne == 0 {
        return;
    }
    // dst (row-major n×n) := c · cᵀ, cᵀ viewed as element (e, j) at j·ne + e.
    gemm_f64(
        MatMut::new(g, n, n, n, 1),
        MatRef::new(c, n, ne, ne, 1),
        MatRef::new(c, ne, n, 1, ne),
        false,
    );
}

/// Per-repetition statistics `(m_r, q_r)` of the counts in `w.c`.
fn rep_stats<T: Elem>(w: &mut Work<T>, n: usize, nl: usize, ne: usize) -> (f64, f64) {
    w.acc.iter_mut().for_each(|x| *x = 0.0);
    for l in 0..nl {
        let layer = &w.c[l * n * ne..(l + 1) * n * ne];
        if T::accumulate_fused(layer, n, ne, &mut w.inv, &mut w.acc) {
            continue;
        }
        T::layer_gram(layer, n, ne, &mut w.g);
        for i in 0..n {
            let gii = w.g[i * n + i];
            w.inv[i] = if gii > 0.0 { 1.0 / gii.sqrt() } else { 0.0 };
        }
        accumulate_layer(&w.g, &w.inv, &mut w.acc, n);
    }
    let inv_l = 1.0 / nl as f64;
    w.pairs.clear();
    for i in 0..n {
        w.pairs
            .extend(w.acc[i * n + i + 1..(i + 1) * n].iter().map(|x| x * inv_l));
    }
    let s = mean_std(w.pairs.iter().copied());
    (s.mean, s.std)
}

/// `acc[i·n + j] += g[i·n + j] · r_i · r_j` for i < j. Each element's operations are the same
/// with and without AVX (separate multiplies and adds, no contraction), so the results are too.
fn accumulate_layer(g: &[f64], inv: &[f64], acc: &mut [f64], n: usize) {
    struct Body<'a> {
        g: &'a [f64],
        inv: &'a [f64],
        acc: &'a mut [f64],
        n: usize,
    }
    impl AvxBody for Body<'_> {
        type Output = ();
        #[inline(always)]
        fn run(self) {
            let Body { g, inv, acc, n } = self;
            for i in 0..n {
                let ri = inv[i];
                let grow = &g[i * n + i + 1..(i + 1) * n];
                let arow = &mut acc[i * n + i + 1..(i + 1) * n];
                for ((a, &gij), &rj) in arow.iter_mut().zip(grow).zip(&inv[i + 1..n]) {
                    *a += gij * ri * rj;
                }
            }
        }
    }
    // Compiled with AVX where the CPU has it (same operations, same results).
    with_avx(Body { g, inv, acc, n })
}

fn run_reps<T: Elem>(s: &Setup, reps: usize) -> Vec<(f64, f64)> {
    let (n, nl, ne) = (s.input.n(), s.input.num_layers, s.input.num_experts);
    // Converted once and shared by all workers.
    let base = observed::<T>(s);
    (0..reps)
        .into_par_iter()
        .map_init(
            || Work::<T>::new(n, nl, ne),
            |w, r| {
                synth_counts(s, r as u64, &mut w.c, &base);
                rep_stats(w, n, nl, ne)
            },
        )
        .collect()
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
    let setup = Setup::new(which, input, &tokens, &pooled, seed);
    let per_rep = if setup.int_exact() {
        run_reps::<i16>(&setup, reps)
    } else {
        run_reps::<f64>(&setup, reps)
    };
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
    use crate::signature::embeddings;
    use crate::similarity::gram;

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

    /// Synthetic counts of one repetition, back in row-major N × (L·E).
    fn synth(
        which: Baseline,
        inp: &AnalysisInput,
        pooled: &[f64],
        seed: u64,
        rep: u64,
    ) -> Vec<f64> {
        let (n, nl, ne) = (inp.n(), inp.num_layers, inp.num_experts);
        let tokens = tokens_per_layer(inp);
        let s = Setup::new(which, inp, &tokens, pooled, seed);
        let mut c = vec![0.0f64; n * nl * ne];
        let base = observed::<f64>(&s);
        synth_counts(&s, rep, &mut c, &base);
        let mut out = vec![0.0; n * nl * ne];
        for l in 0..nl {
            for i in 0..n {
                for e in 0..ne {
                    out[i * nl * ne + l * ne + e] = c[(l * n + i) * ne + e];
                }
            }
        }
        out
    }

    #[test]
    fn xoshiro_matches_reference_output() {
        // First output of xoshiro256++ from state (1, 2, 3, 4): rotl(1 + 4, 23) + 1.
        let mut r = Xoshiro256pp::from_state([1, 2, 3, 4]);
        assert_eq!(r.next_u64(), 41_943_041);
        assert_ne!(r.next_u64(), 41_943_041);
    }

    #[test]
    fn uniform_baseline_preserves_token_totals() {
        let inp = toy(6, 2, 8, 2);
        let tokens = tokens_per_layer(&inp);
        let c = synth(Baseline::LoadBalanceUniform, &inp, &[0.0; 16], 3, 0);
        for i in 0..6 {
            for l in 0..2 {
                let layer = &c[i * 16 + l * 8..i * 16 + l * 8 + 8];
                let s: f64 = layer.iter().sum();
                assert_eq!(s, (tokens[i * 2 + l] * 2) as f64);
                assert!(layer.iter().all(|&x| x <= tokens[i * 2 + l] as f64));
            }
        }
    }

    #[test]
    fn permutation_baseline_permutes_each_layer() {
        let inp = toy(5, 3, 7, 3);
        let c = synth(Baseline::Permutation, &inp, &[], 2, 1);
        let mut moved = false;
        for i in 0..5 {
            for l in 0..3 {
                let mut a = c[i * 21 + l * 7..i * 21 + l * 7 + 7].to_vec();
                let mut b = inp.counts_row(i)[l * 7..l * 7 + 7].to_vec();
                moved |= a != b;
                a.sort_by(f64::total_cmp);
                b.sort_by(f64::total_cmp);
                assert_eq!(a, b);
            }
        }
        assert!(moved);
    }

    #[test]
    fn marginal_never_draws_zero_load_experts() {
        let inp = toy(6, 1, 7, 3);
        let mut pooled = vec![5.0, 0.0, 1.0, 0.0, 2.0, 9.0, 0.5];
        let tokens = tokens_per_layer(&inp);
        let c = synth(Baseline::LoadBalanceMarginal, &inp, &pooled, 1, 4);
        for i in 0..6 {
            assert_eq!(c[i * 7 + 1], 0.0);
            assert_eq!(c[i * 7 + 3], 0.0);
            let s: f64 = c[i * 7..i * 7 + 7].iter().sum();
            assert_eq!(s, (tokens[i] * 3) as f64);
        }
        // Fewer than k loaded experts: all of them, every token.
        pooled = vec![0.0, 1.0, 0.0, 0.0, 0.0, 2.0, 0.0];
        let c = synth(Baseline::LoadBalanceMarginal, &inp, &pooled, 1, 4);
        assert_eq!(c[1], tokens[0] as f64);
        assert_eq!(c[5], tokens[0] as f64);
        assert_eq!(c[0], 0.0);
    }

    #[test]
    fn marginal_frequencies_follow_sequential_draws() {
        // Two draws without replacement from weights (3,1,1,1)/6: P(first picked at all) =
        // 1/2 + 3 * (1/6) * (3/5) = 0.8.
        let rows = (0..4)
            .map(|i| PromptRow {
                prompt_id: format!("p{i}"),
                category: Some(format!("c{}", i % 2)),
                counts: vec![3.0, 1.0, 1.0, 1.0],
                tokens_per_layer: vec![],
            })
            .collect();
        let mut inp = build_input(1, 4, 2, false, rows).unwrap();
        inp.counts.iter_mut().for_each(|x| *x *= 5000.0); // 15000 tokens per prompt
        let tokens = tokens_per_layer(&inp);
        let c = synth(
            Baseline::LoadBalanceMarginal,
            &inp,
            &[3.0, 1.0, 1.0, 1.0],
            9,
            0,
        );
        let t: f64 = tokens.iter().map(|&x| x as f64).sum();
        let f0: f64 = (0..4).map(|i| c[i * 4]).sum::<f64>() / t;
        // binomial sd ≈ sqrt(0.16/60000) ≈ 0.0016
        assert!((f0 - 0.8).abs() < 0.01, "{f0}");
    }

    #[test]
    fn rep_stats_is_the_mean_and_std_of_pair_similarity() {
        let inp = toy(7, 3, 9, 2);
        let (n, nl, ne) = (inp.n(), inp.num_layers, inp.num_experts);
        let counts = synth(Baseline::LoadBalanceUniform, &inp, &[], 5, 2);
        let v = embeddings(&counts, nl, ne);
        let g = gram(&v, n, nl * ne);
        let want = mean_std(
            (0..n)
                .flat_map(|i| ((i + 1)..n).map(move |j| (i, j)))
                .map(|(i, j)| g[i * n + j]),
        );
        let mut w = Work::<i16>::new(n, nl, ne);
        for l in 0..nl {
            for i in 0..n {
                for e in 0..ne {
                    w.c[(l * n + i) * ne + e] = counts[i * nl * ne + l * ne + e] as i16;
                }
            }
        }
        let (m, q) = rep_stats(&mut w, n, nl, ne);
        assert!((m - want.mean).abs() < 1e-13, "{m} {}", want.mean);
        assert!((q - want.std).abs() < 1e-13, "{q} {}", want.std);
    }

    #[test]
    fn integer_and_f64_grams_agree_exactly_on_integer_counts() {
        let inp = toy(9, 2, 16, 4);
        let tokens = tokens_per_layer(&inp);
        let pooled: Vec<f64> = (0..32).map(|i| 1.0 + (i % 5) as f64).collect();
        for b in [
            Baseline::Permutation,
            Baseline::LoadBalanceUniform,
            Baseline::LoadBalanceMarginal,
        ] {
            let s = Setup::new(b, &inp, &tokens, &pooled, 3);
            assert!(s.int_exact());
            assert_eq!(run_reps::<i16>(&s, 6), run_reps::<f64>(&s, 6), "{b:?}");
        }
        let mut weighted = inp.clone();
        weighted.counts[0] = 0.5;
        let s = Setup::new(Baseline::Permutation, &weighted, &tokens, &pooled, 3);
        assert!(!s.int_exact());
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
    fn baselines_do_not_depend_on_thread_count() {
        let inp = toy(10, 2, 16, 3);
        let on = |threads: usize, b: Baseline| {
            rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap()
                .install(|| run_baseline(b, &inp, 37, 11))
        };
        for b in [
            Baseline::Permutation,
            Baseline::LoadBalanceUniform,
            Baseline::LoadBalanceMarginal,
        ] {
            assert_eq!(on(1, b), on(2, b), "{b:?}");
            assert_eq!(on(1, b), on(3, b), "{b:?}");
        }
    }

    #[test]
    fn below_is_uniform() {
        for e in [8usize, 7, 63, 70_001] {
            let mut s = Below::new();
            let mut rng = RepRng::new(0, 99, 0);
            let buckets = e.min(7);
            let mut h = vec![0usize; buckets];
            for _ in 0..70000 {
                let x = s.below(&mut rng, e);
                assert!(x < e);
                h[x * buckets / e] += 1;
            }
            for (b, &x) in h.iter().enumerate() {
                let width = ((b + 1) * e).div_ceil(buckets) - (b * e).div_ceil(buckets);
                let expect = 70000.0 * width as f64 / e as f64;
                assert!(
                    (x as f64 - expect).abs() < 5.0 * expect.sqrt(),
                    "{e}: {h:?}"
                );
            }
        }
    }
}
