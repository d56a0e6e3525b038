//! The large-N ("gram_sums") path: exact within/across mean, std and Cohen's d, per-layer d and
//! the category matrix without materialising the N² pairs.
//!
//! With `v_i` the similarity embedding (`sim(i,j) = v_i·v_j`), per category A we accumulate
//! `n_A`, `S_A = Σ v_i`, `M_A = Σ v_i v_iᵀ` (D×D, D = L·E), `Σ‖v_i‖²`, `Σ‖v_i‖⁴` and the per-layer
//! analogues of the last two. Then, over unordered pairs,
//!
//! - within A: `Σ sim = (‖S_A‖² − Σ‖v_i‖²)/2`, `Σ sim² = (‖M_A‖_F² − Σ‖v_i‖⁴)/2`;
//! - across A,B: `Σ sim = S_A·S_B`, `Σ sim² = ⟨M_A, M_B⟩_F`;
//! - per layer l (cosines = L·(v_il·v_jl)): the same with the l-th blocks, scaled by L and L².
//!
//! `M_A` is accumulated in blocks of prompts (f64 GEMM of the `gemm` crate) on the upper
//! triangle of layer-aligned tiles only (syrk-style; diagonal tiles as 3 of their 4 quarters),
//! tiles in parallel; every tile sums its blocks
//! in arrival order, so the result does not depend on the thread count.

use crate::error::{Result, StatsError};
use crate::input::{check_row, empty_layer, DroppedPrompt, PromptRow};
use crate::results::{CategoryMatrix, LayerStats, SimilaritySummary};
use crate::signature::embed_in_place;
use crate::similarity::{cohens_d, PairSums, WithinAcrossSums};
use moe_xray_kernels::linalg::{gemm_f64, MatMut, MatRef};
use nalgebra::DMatrix;
use rayon::prelude::*;
use std::collections::BTreeMap;

/// Features per tile side (rounded to whole layers).
pub const TILE: usize = 256;

/// Prompts per GEMM block.
pub const BLOCK: usize = 1024;

/// Most prompts of one category whose Gram sums are added ([`GramAccumulator::add_category`]),
/// so that the pair counts `n_A · n_B` fit in u64.
pub const MAX_CATEGORY_PROMPTS: u64 = 1 << 31;

struct CatAcc {
    n: u64,
    sum: Vec<f64>,
    norm2: f64,
    norm4: f64,
    layer_norm2: Vec<f64>,
    layer_norm4: Vec<f64>,
    /// Upper-triangular tiles of `M_A`, in `rects` order.
    tiles: Vec<DMatrix<f64>>,
    buf: Vec<f64>,
    buf_rows: usize,
}

/// Row and column feature ranges of one tile.
type Rect = ((usize, usize), (usize, usize));

/// Streaming accumulator of the Gram sums (see module docs).
pub struct GramAccumulator {
    num_layers: usize,
    num_experts: usize,
    d: usize,
    /// Tile boundaries in feature space (aligned with layers).
    /// Feature ranges `(rows, cols)` of the tiles: the upper triangle of `M_A` in layer-aligned
    /// rectangles. Diagonal tiles (rows = cols) are halved once more, so that only 3 of their 4
    /// quarters are computed.
    rects: Vec<Rect>,
    cats: BTreeMap<String, CatAcc>,
    prompt_ids: Vec<String>,
    dropped: Vec<DroppedPrompt>,
    missing_category: Vec<String>,
}

/// What [`GramAccumulator::push_outcome`] did with a prompt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PushOutcome {
    /// Counted in its category.
    Accepted,
    /// Dropped (a layer without selections), with the reason.
    Dropped(String),
    /// Not counted: the prompt has no category (an error at [`GramAccumulator::finish`]).
    NoCategory,
}

/// The sums of one category: the Gram-sums sufficient statistics (`n_A`, `S_A`, the norm sums
/// and the upper tiles of `M_A`) of a shard (`moe-xray map --gram-sums`).
#[derive(Debug, Clone, PartialEq)]
pub struct GramCategory {
    pub name: String,
    pub n: u64,
    /// `S_A` (D values).
    pub sum: Vec<f64>,
    pub norm2: f64,
    pub norm4: f64,
    /// Per layer (L values each).
    pub layer_norm2: Vec<f64>,
    pub layer_norm4: Vec<f64>,
    /// The upper tiles of `M_A`, each column-major, concatenated in tile order
    /// ([`GramAccumulator::tile_len`] values).
    pub tiles: Vec<f64>,
}

/// What the Gram-sums path produces.
#[derive(Debug, Clone, PartialEq)]
pub struct GramSummary {
    pub categories: Vec<(String, usize)>,
    pub prompt_ids: Vec<String>,
    pub dropped: Vec<DroppedPrompt>,
    pub similarity: SimilaritySummary,
    pub category_matrix: CategoryMatrix,
    pub per_layer: Vec<LayerStats>,
}

impl GramAccumulator {
    pub fn new(num_layers: usize, num_experts: usize) -> Self {
        let d = num_layers * num_experts;
        // Tiles of whole layers, about TILE features each.
        let per_tile = (TILE / num_experts.max(1)).max(1);
        let mut bounds = Vec::new();
        let mut l = 0;
        while l < num_layers {
            let l2 = (l + per_tile).min(num_layers);
            bounds.push((l * num_experts, l2 * num_experts));
            l = l2;
        }
        let t = bounds.len();
        let halves = |(s, e): (usize, usize)| {
            let layers = (e - s) / num_experts.max(1);
            if layers >= 2 {
                let m = s + (layers / 2) * num_experts;
                vec![(s, m), (m, e)]
            } else {
                vec![(s, e)]
            }
        };
        let mut rects = Vec::new();
        for p in 0..t {
            let h = halves(bounds[p]);
            for i in 0..h.len() {
                for j in i..h.len() {
                    rects.push((h[i], h[j]));
                }
            }
            for q in (p + 1)..t {
                rects.push((bounds[p], bounds[q]));
            }
        }
        GramAccumulator {
            num_layers,
            num_experts,
            d,
            rects,
            cats: BTreeMap::new(),
            prompt_ids: Vec::new(),
            dropped: Vec::new(),
            missing_category: Vec::new(),
        }
    }

    /// Number of prompts accepted so far.
    pub fn len(&self) -> usize {
        self.prompt_ids.len()
    }

    /// Whether no prompt has been accepted.
    pub fn is_empty(&self) -> bool {
        self.prompt_ids.is_empty()
    }

    /// Add one prompt (dropped and recorded if a layer is empty).
    pub fn push(&mut self, row: PromptRow) -> Result<()> {
        self.push_outcome(row).map(|_| ())
    }

    /// [`Self::push`], saying what was done with the prompt.
    pub fn push_outcome(&mut self, row: PromptRow) -> Result<PushOutcome> {
        check_row(&row, self.num_layers, self.num_experts)?;
        if let Some(l) = empty_layer(&row.counts, self.num_layers, self.num_experts) {
            let reason = format!("no selected tokens at layer {l} (zero total count)");
            self.dropped.push(DroppedPrompt {
                prompt_id: row.prompt_id,
                reason: reason.clone(),
            });
            return Ok(PushOutcome::Dropped(reason));
        }
        let Some(cat) = row.category.filter(|c| !c.is_empty()) else {
            self.missing_category.push(row.prompt_id);
            return Ok(PushOutcome::NoCategory);
        };
        let (d, nl, ne) = (self.d, self.num_layers, self.num_experts);
        let mut v = row.counts;
        embed_in_place(&mut v, nl, ne);
        let rects = &self.rects;
        let acc = self.cats.entry(cat).or_insert_with(|| CatAcc {
            n: 0,
            sum: vec![0.0; d],
            norm2: 0.0,
            norm4: 0.0,
            layer_norm2: vec![0.0; nl],
            layer_norm4: vec![0.0; nl],
            tiles: rects
                .iter()
                .map(|&(a, b)| DMatrix::zeros(a.1 - a.0, b.1 - b.0))
                .collect(),
            buf: vec![0.0; BLOCK * d],
            buf_rows: 0,
        });
        if acc.buf.is_empty() {
            acc.buf = vec![0.0; BLOCK * d];
        }
        acc.n += 1;
        let mut nrm2 = 0.0;
        for l in 0..nl {
            let x: f64 = v[l * ne..(l + 1) * ne].iter().map(|x| x * x).sum();
            acc.layer_norm2[l] += x;
            acc.layer_norm4[l] += x * x;
            nrm2 += x;
        }
        acc.norm2 += nrm2;
        acc.norm4 += nrm2 * nrm2;
        for (s, x) in acc.sum.iter_mut().zip(&v) {
            *s += x;
        }
        let r = acc.buf_rows;
        acc.buf[r * d..(r + 1) * d].copy_from_slice(&v);
        acc.buf_rows += 1;
        self.prompt_ids.push(row.prompt_id);
        if acc.buf_rows == BLOCK {
            flush(acc, d, &self.rects);
        }
        Ok(PushOutcome::Accepted)
    }

    /// Number of values of the concatenated upper tiles of one `M_A`.
    pub fn tile_len(&self) -> usize {
        self.rects
            .iter()
            .map(|&(a, b)| (a.1 - a.0) * (b.1 - b.0))
            .sum()
    }

    /// Flushes the buffered prompts and takes the sums of every category (in name order),
    /// leaving the accumulator without categories (the prompt lists stay).
    pub fn take_categories(&mut self) -> Vec<GramCategory> {
        let d = self.d;
        let cats = std::mem::take(&mut self.cats);
        cats.into_iter()
            .map(|(name, mut acc)| {
                flush(&mut acc, d, &self.rects);
                let mut tiles = Vec::with_capacity(self.tile_len());
                for t in &acc.tiles {
                    tiles.extend_from_slice(t.as_slice());
                }
                GramCategory {
                    name,
                    n: acc.n,
                    sum: acc.sum,
                    norm2: acc.norm2,
                    norm4: acc.norm4,
                    layer_norm2: acc.layer_norm2,
                    layer_norm4: acc.layer_norm4,
                    tiles,
                }
            })
            .collect()
    }

    /// Adds the sums of a category (from [`Self::take_categories`] of another accumulator of
    /// the same L and E); the prompts themselves are added with [`Self::add_prompt`].
    pub fn add_category(&mut self, c: GramCategory) -> Result<()> {
        let (d, nl) = (self.d, self.num_layers);
        if c.sum.len() != d
            || c.layer_norm2.len() != nl
            || c.layer_norm4.len() != nl
            || c.tiles.len() != self.tile_len()
        {
            return Err(StatsError::Dimension(format!(
                "category {:?}: Gram sums of {} / {} / {} / {} values, expected D = {d}, L = {nl}, tiles {}",
                c.name,
                c.sum.len(),
                c.layer_norm2.len(),
                c.layer_norm4.len(),
                c.tiles.len(),
                self.tile_len()
            )));
        }
        let rects = &self.rects;
        let acc = self.cats.entry(c.name.clone()).or_insert_with(|| CatAcc {
            n: 0,
            sum: vec![0.0; d],
            norm2: 0.0,
            norm4: 0.0,
            layer_norm2: vec![0.0; nl],
            layer_norm4: vec![0.0; nl],
            tiles: rects
                .iter()
                .map(|&(a, b)| DMatrix::zeros(a.1 - a.0, b.1 - b.0))
                .collect(),
            buf: Vec::new(),
            buf_rows: 0,
        });
        acc.n = acc
            .n
            .checked_add(c.n)
            .filter(|&n| n <= MAX_CATEGORY_PROMPTS)
            .ok_or_else(|| {
                StatsError::InvalidInput(format!(
                    "category {:?}: more than {MAX_CATEGORY_PROMPTS} prompts",
                    c.name
                ))
            })?;
        let add = |a: &mut [f64], b: &[f64]| a.iter_mut().zip(b).for_each(|(x, y)| *x += y);
        add(&mut acc.sum, &c.sum);
        acc.norm2 += c.norm2;
        acc.norm4 += c.norm4;
        add(&mut acc.layer_norm2, &c.layer_norm2);
        add(&mut acc.layer_norm4, &c.layer_norm4);
        let mut at = 0;
        for t in acc.tiles.iter_mut() {
            let len = t.len();
            add(t.as_mut_slice(), &c.tiles[at..at + len]);
            at += len;
        }
        Ok(())
    }

    /// Appends a prompt counted elsewhere (merging Gram-sums shards): its id to the accepted
    /// prompts, or to the dropped ones with the reason, or to those without a category.
    pub fn add_prompt(&mut self, prompt_id: String, outcome: PushOutcome) {
        match outcome {
            PushOutcome::Accepted => self.prompt_ids.push(prompt_id),
            PushOutcome::Dropped(reason) => self.dropped.push(DroppedPrompt { prompt_id, reason }),
            PushOutcome::NoCategory => self.missing_category.push(prompt_id),
        }
    }

    /// Finish: flush the partial blocks and compute all summaries.
    pub fn finish(mut self) -> Result<GramSummary> {
        if !self.missing_category.is_empty() {
            return Err(StatsError::InvalidInput(format!(
                "{} prompt(s) have no category (e.g. {:?}); give categories in the trace or with --prompts FILE",
                self.missing_category.len(),
                self.missing_category[0]
            )));
        }
        let counted: u64 = self.cats.values().map(|c| c.n).sum();
        if counted != self.prompt_ids.len() as u64 {
            return Err(StatsError::InvalidInput(format!(
                "the Gram sums count {counted} prompts but {} prompt ids were given",
                self.prompt_ids.len()
            )));
        }
        let big = self.cats.values().filter(|c| c.n >= 2).count();
        if big < 2 {
            let desc: Vec<_> = self
                .cats
                .iter()
                .map(|(c, a)| format!("{c}: {}", a.n))
                .collect();
            return Err(StatsError::InvalidInput(format!(
                "need at least 2 categories with at least 2 prompts each (after dropping {} prompt(s)); found {{{}}}",
                self.dropped.len(),
                desc.join(", ")
            )));
        }
        let (d, nl, ne) = (self.d, self.num_layers, self.num_experts);
        for acc in self.cats.values_mut() {
            flush(acc, d, &self.rects);
        }
        let names: Vec<String> = self.cats.keys().cloned().collect();
        let accs: Vec<&CatAcc> = self.cats.values().collect();
        let c = accs.len();
        let lf = nl as f64;
        // Frobenius inner products of M_A and M_B, whole and per diagonal layer block.
        let frob = |a: &CatAcc, b: &CatAcc| -> (f64, Vec<f64>) {
            let mut total = 0.0;
            let mut layer = vec![0.0; nl];
            for (t, &(rows, cols)) in self.rects.iter().enumerate() {
                let x = a.tiles[t].dot(&b.tiles[t]);
                let diagonal = rows == cols;
                total += if diagonal { x } else { 2.0 * x };
                if diagonal {
                    let (start, end) = rows;
                    for (l, acc) in layer.iter_mut().enumerate().take(end / ne).skip(start / ne) {
                        let o = l * ne - start;
                        let ba = a.tiles[t].view((o, o), (ne, ne));
                        let bb = b.tiles[t].view((o, o), (ne, ne));
                        *acc += ba.dot(&bb);
                    }
                }
            }
            (total, layer)
        };
        let dot = |x: &[f64], y: &[f64]| x.iter().zip(y).map(|(a, b)| a * b).sum::<f64>();
        // Pair sums: (n, Σsim, Σsim²) overall and per layer, for every category pair (a ≤ b).
        let ps = |n: u64, sum: f64, sum_sq: f64| PairSums { n, sum, sum_sq };
        let mut sums = vec![PairSums::default(); c * c];
        let mut lsums = vec![vec![PairSums::default(); nl]; c * c];
        for a in 0..c {
            for b in a..c {
                let (ma, mb) = (accs[a], accs[b]);
                let (f, fl) = frob(ma, mb);
                let s = dot(&ma.sum, &mb.sum);
                if a == b {
                    let n = ma.n * ma.n.saturating_sub(1) / 2;
                    sums[a * c + b] = ps(n, (s - ma.norm2) / 2.0, (f - ma.norm4) / 2.0);
                    for l in 0..nl {
                        let sl = dot(&ma.sum[l * ne..(l + 1) * ne], &ma.sum[l * ne..(l + 1) * ne]);
                        lsums[a * c + b][l] = ps(
                            n,
                            lf * (sl - ma.layer_norm2[l]) / 2.0,
                            lf * lf * (fl[l] - ma.layer_norm4[l]) / 2.0,
                        );
                    }
                } else {
                    let n = ma.n * mb.n;
                    sums[a * c + b] = ps(n, s, f);
                    for l in 0..nl {
                        let sl = dot(&ma.sum[l * ne..(l + 1) * ne], &mb.sum[l * ne..(l + 1) * ne]);
                        lsums[a * c + b][l] = ps(n, lf * sl, lf * lf * fl[l]);
                    }
                }
            }
        }
        let mut total = WithinAcrossSums::default();
        let mut layers = vec![WithinAcrossSums::default(); nl];
        for a in 0..c {
            for b in a..c {
                let pick = |x: &mut WithinAcrossSums, t: PairSums| {
                    let side = if a == b { &mut x.within } else { &mut x.across };
                    *side = side.merge(t);
                };
                pick(&mut total, sums[a * c + b]);
                for (l, x) in layers.iter_mut().enumerate() {
                    pick(x, lsums[a * c + b][l]);
                }
            }
        }
        let within = total.within.stats();
        let across = total.across.stats();
        let per_layer = layers
            .iter()
            .enumerate()
            .map(|(l, x)| {
                let (within_mean, across_mean, cohens_d) = x.summary();
                LayerStats {
                    layer: l,
                    within_mean,
                    across_mean,
                    cohens_d,
                }
            })
            .collect();
        let values = (0..c)
            .map(|a| {
                (0..c)
                    .map(|b| {
                        let t = sums[a.min(b) * c + a.max(b)];
                        t.sum / t.n as f64
                    })
                    .collect()
            })
            .collect();
        Ok(GramSummary {
            categories: names
                .iter()
                .cloned()
                .zip(accs.iter().map(|a| a.n as usize))
                .collect(),
            prompt_ids: self.prompt_ids,
            dropped: self.dropped,
            similarity: SimilaritySummary {
                within,
                across,
                cohens_d: cohens_d(&within, &across),
            },
            category_matrix: CategoryMatrix {
                order: names,
                values,
            },
            per_layer,
        })
    }
}

/// `M += Bᵀ B` on the upper tiles for the buffered rows, tiles in parallel. Each tile is one f64
/// GEMM of the `gemm` crate (runtime-selected AVX2/FMA or AVX-512 kernels, single-threaded per
/// tile), so a tile's summation order depends only on its own blocks, never on the thread count.
fn flush(acc: &mut CatAcc, d: usize, rects: &[Rect]) {
    let rows = acc.buf_rows;
    if rows == 0 {
        return;
    }
    let buf = &acc.buf[..rows * d];
    acc.tiles
        .par_iter_mut()
        .zip(rects.par_iter())
        .for_each(|(tile, &((a0, a1), (b0, b1)))| {
            let (m, n) = (a1 - a0, b1 - b0);
            assert!(tile.nrows() == m && tile.ncols() == n && b1 <= d && a1 <= d);
            // dst: the column-major m×n tile (row stride 1, column stride m). lhs element
            // (f, r) = buf[r·d + a0 + f] (feature f of prompt r): row stride 1, column stride d;
            // rhs element (r, g) = buf[r·d + b0 + g]: row stride d, column stride 1.
            // dst := dst + lhs·rhs.
            gemm_f64(
                MatMut::new(tile.as_mut_slice(), m, n, 1, m),
                MatRef::new(&buf[a0..], m, rows, 1, d),
                MatRef::new(&buf[b0..], rows, n, d, 1),
                true,
            );
        });
    acc.buf_rows = 0;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::input::build_input;
    use crate::signature::embeddings;
    use crate::similarity::{category_matrix, gram, per_layer, summarize};
    use rand::{Rng, SeedableRng};

    #[test]
    fn gram_path_matches_exact_pairs() {
        check_against_exact(3, 10, 300);
    }

    #[test]
    fn gram_path_matches_exact_pairs_with_several_tiles_and_blocks() {
        // 5 layers × 64 experts: tiles [0, 256) and [256, 320), off-diagonal tile included;
        // each of the 3 categories gets more prompts than one GEMM block, so blocks are flushed
        // before `finish`.
        const { assert!(5 * 64 > TILE) };
        check_against_exact(5, 64, 3 * BLOCK + 100);
    }

    /// Gram sums taken from three accumulators of interleaved parts and added into a fourth
    /// give the summary of one accumulator over all rows (to rounding); a count that disagrees
    /// with the ids is refused.
    #[test]
    fn categories_taken_and_added_equal_one_pass() {
        let (nl, ne) = (5, 64);
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(8);
        let rows: Vec<PromptRow> = (0..1500)
            .map(|i| PromptRow {
                prompt_id: format!("p{i}"),
                category: Some(["x", "y", "z"][i % 3].to_string()),
                counts: (0..nl * ne)
                    .map(|f| rng.random_range(0..4u32) as f64 + f64::from(f % ne == i % 7))
                    .collect(),
                tokens_per_layer: vec![],
            })
            .collect();
        let mut one = GramAccumulator::new(nl, ne);
        let mut parts: Vec<GramAccumulator> =
            (0..3).map(|_| GramAccumulator::new(nl, ne)).collect();
        let mut merged = GramAccumulator::new(nl, ne);
        for (i, r) in rows.iter().enumerate() {
            one.push(r.clone()).unwrap();
            let outcome = parts[i % 3].push_outcome(r.clone()).unwrap();
            merged.add_prompt(r.prompt_id.clone(), outcome);
        }
        let tiles = merged.tile_len();
        for p in parts.iter_mut() {
            for c in p.take_categories() {
                assert_eq!(c.tiles.len(), tiles);
                merged.add_category(c).unwrap();
            }
        }
        let (a, b) = (one.finish().unwrap(), merged.finish().unwrap());
        assert_eq!(a.prompt_ids, b.prompt_ids);
        assert_eq!(a.categories, b.categories);
        let close = |x: f64, y: f64| assert!((x - y).abs() < 1e-9, "{x} vs {y}");
        close(a.similarity.cohens_d, b.similarity.cohens_d);
        close(a.similarity.within.std, b.similarity.within.std);
        for (x, y) in a.per_layer.iter().zip(&b.per_layer) {
            close(x.cohens_d, y.cohens_d);
        }
        // Ids without sums.
        let mut bad = GramAccumulator::new(nl, ne);
        bad.add_prompt("q".into(), PushOutcome::Accepted);
        assert!(bad.finish().unwrap_err().to_string().contains("prompt ids"));
    }

    fn check_against_exact(nl: usize, ne: usize, n: usize) {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
        let rows: Vec<PromptRow> = (0..n)
            .map(|i| {
                let cat = i % 3;
                let counts = (0..nl * ne)
                    .map(|f| {
                        let bias = if f % ne == cat * 3 { 6.0 } else { 0.0 };
                        (rng.random_range(0..5u32) as f64 + bias).max(if f % ne == 0 {
                            1.0
                        } else {
                            0.0
                        })
                    })
                    .collect();
                PromptRow {
                    prompt_id: format!("p{i}"),
                    category: Some(["b", "a", "c"][cat].to_string()),
                    counts,
                    tokens_per_layer: vec![],
                }
            })
            .collect();
        let mut acc = GramAccumulator::new(nl, ne);
        for r in rows.clone() {
            acc.push(r).unwrap();
        }
        let g = acc.finish().unwrap();
        let inp = build_input(nl, ne, 2, false, rows).unwrap();
        let v = embeddings(&inp.counts, nl, ne);
        let sim = gram(&v, inp.n(), nl * ne);
        let s = summarize(&sim, &inp.labels);
        let close = |a: f64, b: f64| assert!((a - b).abs() < 1e-9, "{a} vs {b}");
        assert_eq!(g.similarity.within.n, s.within.n);
        assert_eq!(g.similarity.across.n, s.across.n);
        close(g.similarity.within.mean, s.within.mean);
        close(g.similarity.within.std, s.within.std);
        close(g.similarity.across.mean, s.across.mean);
        close(g.similarity.across.std, s.across.std);
        close(g.similarity.cohens_d, s.cohens_d);
        let cm = category_matrix(&sim, &inp.labels, &inp.categories);
        assert_eq!(cm.order, g.category_matrix.order);
        for a in 0..3 {
            for b in 0..3 {
                close(cm.values[a][b], g.category_matrix.values[a][b]);
            }
        }
        let pl = per_layer(&v, &inp.labels, nl, ne);
        for (x, y) in pl.iter().zip(&g.per_layer) {
            close(x.within_mean, y.within_mean);
            close(x.across_mean, y.across_mean);
            close(x.cohens_d, y.cohens_d);
        }
        assert_eq!(g.prompt_ids.len(), n);
    }
}
