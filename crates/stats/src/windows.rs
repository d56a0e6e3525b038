//! Routing over time (`--windows W`; definitions in `docs/statistics.md`, "Routing over time").
//!
//! The generated tokens of every analysed prompt are cut into windows of W tokens: generated
//! token j (j = its position minus the prompt's first generated position) is in window
//! `j / W`. Each window gets its own routing signatures (the counts of its tokens, normalised
//! per layer as in [`crate::signature`]), and on them the same statistics as the main analysis:
//! the within / across pair similarity and Cohen's d ([`crate::similarity::summarize`]) and the
//! cross-validated classifier ([`crate::cv::logreg_cv`], `logreg_5fold`'s solver and
//! standardisation). The prompt phase (prompt tokens only) and the generation phase (all
//! generated tokens) get the same statistics. Drift: per prompt, the similarity `v_a · v_b` (the
//! mean per-layer cosine, as `sim`) of its signatures in two consecutive windows (or of its
//! prompt and generation phases), averaged over the prompts that have both.
//!
//! A prompt enters a window only when the window has a routed token of it at every layer.
//! Categories of a window with fewer prompts than folds make its classifier `skipped`.
//!
//! The trace items are fed twice: [`WindowScan`] finds each prompt's first and last generated
//! position, [`WindowPass`] accumulates the window counts.

use std::collections::HashMap;

use moe_xray_trace::{TokenType, TraceItem};
use rand::RngCore;

use crate::cv::{self, CvOutcome};
use crate::results::{
    DriftStats, RoutingWindows, Section, SimilaritySummary, WindowClassifier, WindowStats,
};
use crate::signature::{embeddings, signatures};
use crate::similarity::{gram, mean_std, summarize};

/// Most windows of one analysis.
pub const MAX_WINDOWS: usize = 4096;
/// Largest `prompts × windows × L × E` of the window counts (8 bytes each).
pub const MAX_WINDOW_VALUES: usize = 1 << 27;

/// One routing decision of a trace item: (prompt id, token type, decoder layer, position,
/// experts with their increments).
struct Pick<'a> {
    prompt_id: &'a str,
    tt: TokenType,
    layer: u32,
    position: u32,
    picks: Vec<(u32, f64)>,
}

fn pick(item: &TraceItem, weighted: bool) -> Option<Pick<'_>> {
    let w = |x: Option<f32>| {
        if weighted {
            x.map_or(0.0, f64::from)
        } else {
            1.0
        }
    };
    match item {
        TraceItem::Record(r) => Some(Pick {
            prompt_id: &r.prompt_id,
            tt: r.token_type,
            layer: r.layer,
            position: r.position,
            picks: r
                .experts
                .iter()
                .enumerate()
                .map(|(j, &e)| (e, w(r.weights.as_ref().and_then(|x| x.get(j)).copied())))
                .collect(),
        }),
        TraceItem::Event(e) => Some(Pick {
            prompt_id: &e.prompt_id,
            tt: e.token_type,
            layer: e.layer,
            position: e.position,
            picks: vec![(e.expert, w(e.weight))],
        }),
        TraceItem::Counts(_) => None,
    }
}

/// The folds of a window's prompts: `(analysed-prompt indices, their labels among the window's
/// categories) -> (fold of each, number of folds)` (see [`window_folds`]).
pub type FoldsOf<'a> = dyn Fn(&[usize], &[usize]) -> (Vec<usize>, usize) + 'a;

/// What both passes share: the signature layers, the analysed prompts and the window size.
#[derive(Debug, Clone)]
pub struct WindowShape {
    /// Decoder layer → signature row (the MoE layers).
    rows: HashMap<u32, usize>,
    num_rows: usize,
    num_experts: usize,
    weighted: bool,
    window: usize,
    /// Analysed prompt id → index.
    prompts: HashMap<String, usize>,
}

impl WindowShape {
    /// `layers`: decoder-layer index of each signature row; `prompts`: the analysed prompts;
    /// `window`: W (at least 1).
    pub fn new(
        layers: &[u32],
        num_experts: usize,
        weighted: bool,
        window: usize,
        prompts: &[String],
    ) -> Self {
        WindowShape {
            rows: layers.iter().enumerate().map(|(i, &l)| (l, i)).collect(),
            num_rows: layers.len(),
            num_experts,
            weighted,
            window: window.max(1),
            prompts: prompts
                .iter()
                .enumerate()
                .map(|(i, p)| (p.clone(), i))
                .collect(),
        }
    }

    fn dim(&self) -> usize {
        self.num_rows.saturating_mul(self.num_experts)
    }

    fn select<'a>(&self, item: &'a TraceItem) -> Result<Option<(usize, usize, Pick<'a>)>, String> {
        let Some(d) = pick(item, self.weighted) else {
            return Err("counts-form traces have no token positions".into());
        };
        let Some(&p) = self.prompts.get(d.prompt_id) else {
            return Ok(None);
        };
        let Some(&row) = self.rows.get(&d.layer) else {
            return Ok(None);
        };
        Ok(Some((p, row, d)))
    }
}

/// Pass 1: the first and last generated position of every analysed prompt.
#[derive(Debug)]
pub struct WindowScan {
    shape: WindowShape,
    span: Vec<Option<(u32, u32)>>,
    failed: Option<String>,
}

impl WindowScan {
    pub fn new(shape: WindowShape) -> Self {
        let n = shape.prompts.len();
        WindowScan {
            shape,
            span: vec![None; n],
            failed: None,
        }
    }

    /// Whether a problem was met (further items are ignored).
    pub fn failed(&self) -> bool {
        self.failed.is_some()
    }

    pub fn push(&mut self, item: &TraceItem) {
        if self.failed.is_some() {
            return;
        }
        match self.shape.select(item) {
            Err(e) => self.failed = Some(e),
            Ok(None) => {}
            Ok(Some((p, _, d))) => {
                if d.tt == TokenType::Generation {
                    let s = self.span[p].get_or_insert((d.position, d.position));
                    s.0 = s.0.min(d.position);
                    s.1 = s.1.max(d.position);
                }
            }
        }
    }

    /// The second pass, or why there is none (counts-form traces, no generated token, too many
    /// windows or values).
    pub fn finish(self) -> Result<WindowPass, String> {
        if let Some(e) = self.failed {
            return Err(e);
        }
        let w = self.shape.window;
        let longest = self
            .span
            .iter()
            .flatten()
            .map(|&(a, b)| (b - a) as usize + 1)
            .max()
            .unwrap_or(0);
        if longest == 0 {
            return Err("no generated token in the analysed prompts".into());
        }
        let nwin = longest.div_ceil(w);
        if nwin > MAX_WINDOWS {
            return Err(format!(
                "{longest} generated tokens make {nwin} windows of {w}, more than the limit of {MAX_WINDOWS}"
            ));
        }
        let values = self
            .shape
            .prompts
            .len()
            .checked_mul(nwin + 2)
            .and_then(|x| x.checked_mul(self.shape.dim()));
        if values.is_none_or(|v| v > MAX_WINDOW_VALUES) {
            return Err(format!(
                "{} prompts × {} windows × {} (L·E) values exceed the limit of {MAX_WINDOW_VALUES}",
                self.shape.prompts.len(),
                nwin + 2,
                self.shape.dim()
            ));
        }
        let n = self.shape.prompts.len();
        Ok(WindowPass {
            shape: self.shape,
            first: self.span.iter().map(|s| s.map(|x| x.0)).collect(),
            longest,
            nwin,
            counts: vec![Vec::new(); n * (nwin + 2)],
            tokens: vec![0; n * (nwin + 2)],
        })
    }
}

/// Pass 2: the counts of every (prompt, window) and of both phases.
#[derive(Debug)]
pub struct WindowPass {
    shape: WindowShape,
    /// First generated position of each prompt.
    first: Vec<Option<u32>>,
    longest: usize,
    nwin: usize,
    /// `[prompt][slot]` (slot: windows `0..nwin`, then prompt phase, generation phase): L·E
    /// counts, allocated on first use.
    counts: Vec<Vec<f64>>,
    /// Tokens (records at signature row 0) per `[prompt][slot]`.
    tokens: Vec<u64>,
}

impl WindowPass {
    pub fn push(&mut self, item: &TraceItem) {
        let Ok(Some((p, row, d))) = self.shape.select(item) else {
            return;
        };
        let slots = self.nwin + 2;
        let mut targets = [None, None];
        match d.tt {
            TokenType::Prompt => targets[0] = Some(self.nwin),
            TokenType::Generation => {
                let Some(first) = self.first[p] else { return };
                let j = d.position.saturating_sub(first) as usize;
                let w = j / self.shape.window;
                if w >= self.nwin {
                    return;
                }
                targets = [Some(w), Some(self.nwin + 1)];
            }
        }
        let (ne, dim) = (self.shape.num_experts, self.shape.dim());
        for slot in targets.into_iter().flatten() {
            let k = p * slots + slot;
            if row == 0 {
                self.tokens[k] += 1;
            }
            let c = &mut self.counts[k];
            if c.is_empty() {
                *c = vec![0.0; dim];
            }
            for &(e, x) in &d.picks {
                let e = e as usize;
                if e < ne {
                    c[row * ne + e] += x;
                }
            }
        }
    }

    /// The `windows` section. `labels[i]` indexes `categories` for analysed prompt i;
    /// `folds(rows)` gives the classifier's fold assignment of those analysed prompts (in that
    /// order) and the number of folds.
    pub fn finish(
        self,
        labels: &[usize],
        categories: &[String],
        folds: &FoldsOf<'_>,
    ) -> Section<RoutingWindows> {
        let n = self.shape.prompts.len();
        if labels.len() != n {
            return Section::skipped(format!("{} labels for {n} analysed prompts", labels.len()));
        }
        if let Some(&l) = labels.iter().find(|&&l| l >= categories.len()) {
            return Section::skipped(format!(
                "label {l} outside the {} categories",
                categories.len()
            ));
        }
        let slots = self.nwin + 2;
        let (nl, ne) = (self.shape.num_rows, self.shape.num_experts);
        let slot = |s: usize| -> Slot {
            let mut rows = Vec::new();
            let mut counts = Vec::new();
            let mut tokens = 0u64;
            for p in 0..n {
                let c = &self.counts[p * slots + s];
                if c.len() != nl * ne {
                    continue;
                }
                let full = (0..nl).all(|l| c[l * ne..(l + 1) * ne].iter().sum::<f64>() > 0.0);
                if !full {
                    continue;
                }
                rows.push(p);
                counts.extend_from_slice(c);
                tokens += self.tokens[p * slots + s];
            }
            Slot {
                rows,
                counts,
                tokens,
            }
        };
        let ctx = Ctx {
            nl,
            ne,
            labels,
            categories,
            folds,
        };
        let w = self.shape.window;
        let mut windows = Vec::with_capacity(self.nwin);
        let mut slots_v = Vec::with_capacity(self.nwin);
        for s in 0..self.nwin {
            let sl = slot(s);
            let mut st = ctx.stats(&sl);
            st.start = Some(s * w);
            st.end = Some((s + 1) * w);
            windows.push(st);
            slots_v.push(sl);
        }
        let drifts = slots_v
            .windows(2)
            .map(|ab| drift(&ab[0], &ab[1], nl, ne))
            .collect();
        let (ps, gs) = (slot(self.nwin), slot(self.nwin + 1));
        Section::Done(RoutingWindows {
            window_tokens: w,
            max_generated: self.longest,
            prompt_phase: ctx.stats(&ps),
            generation_phase: ctx.stats(&gs),
            phase_drift: drift(&ps, &gs, nl, ne),
            windows,
            drift: drifts,
        })
    }
}

/// The classifier's folds of a window's prompts (`rows`: analysed-prompt indices, `local`: their
/// labels among the window's categories): the analysis's fold file restricted to them, or
/// stratified 5-fold over them seeded as `logreg_5fold`'s folds (`--seed`).
pub fn window_folds(
    file: Option<&(Vec<usize>, usize)>,
    seed: u64,
    rows: &[usize],
    local: &[usize],
) -> (Vec<usize>, usize) {
    match file {
        Some((f, k)) => (
            rows.iter()
                .map(|&i| f.get(i).copied().unwrap_or(0))
                .collect(),
            *k,
        ),
        None => {
            let fold_seed = crate::sub_rng(seed, crate::tags::FOLDS, 0).next_u64();
            (
                cv::stratified_kfold(local, crate::analyze::DEFAULT_FOLDS, fold_seed),
                crate::analyze::DEFAULT_FOLDS,
            )
        }
    }
}

/// The prompts of one window with their counts (row-major, L·E each).
struct Slot {
    rows: Vec<usize>,
    counts: Vec<f64>,
    tokens: u64,
}

struct Ctx<'a> {
    nl: usize,
    ne: usize,
    labels: &'a [usize],
    categories: &'a [String],
    folds: &'a FoldsOf<'a>,
}

impl Ctx<'_> {
    fn stats(&self, s: &Slot) -> WindowStats {
        let (nl, ne) = (self.nl, self.ne);
        let d = nl * ne;
        let n = s.rows.len();
        let labels: Vec<usize> = s.rows.iter().map(|&p| self.labels[p]).collect();
        let mut sizes = vec![0usize; self.categories.len()];
        labels.iter().for_each(|&c| {
            if let Some(x) = sizes.get_mut(c) {
                *x += 1;
            }
        });
        let base = WindowStats {
            start: None,
            end: None,
            num_prompts: n,
            tokens: s.tokens,
            similarity: Section::skipped("not computed"),
            classifier: Section::skipped("not computed"),
        };
        if sizes.iter().filter(|&&k| k >= 2).count() < 2 {
            let why = format!(
                "fewer than 2 categories with at least 2 prompts ({n} prompts have tokens at every layer)"
            );
            return WindowStats {
                similarity: Section::skipped(why.clone()),
                classifier: Section::skipped(why),
                ..base
            };
        }
        let v = embeddings(&s.counts, nl, ne);
        let sim = gram(&v, n, d);
        let similarity: SimilaritySummary = summarize(&sim, &labels);
        // The classifier over the categories present in the window.
        let present: Vec<usize> = (0..sizes.len()).filter(|&c| sizes[c] > 0).collect();
        let remap: HashMap<usize, usize> =
            present.iter().enumerate().map(|(i, &c)| (c, i)).collect();
        let local: Vec<usize> = labels
            .iter()
            .map(|c| remap.get(c).copied().unwrap_or(0))
            .collect();
        let names: Vec<String> = present
            .iter()
            .map(|&c| self.categories[c].clone())
            .collect();
        let (folds, n_folds) = (self.folds)(&s.rows, &local);
        let sig = signatures(&s.counts, nl, ne);
        let classifier = match cv::logreg_cv(&sig, n, d, &local, &names, &folds, n_folds) {
            Err(e) => Section::skipped(e.to_string()),
            Ok(CvOutcome::Skipped { reason }) => Section::skipped(reason),
            Ok(CvOutcome::Done(r)) => Section::Done(WindowClassifier {
                accuracy_mean: r.accuracy_mean,
                accuracy_std: r.accuracy_std,
                chance: r.chance,
                fold_accuracies: r.fold_accuracies,
                n_folds,
            }),
        };
        WindowStats {
            similarity: Section::Done(similarity),
            classifier,
            ..base
        }
    }
}

/// Per prompt present in both `a` and `b`, the similarity of its two signatures.
fn drift(a: &Slot, b: &Slot, nl: usize, ne: usize) -> DriftStats {
    let d = nl * ne;
    let va = embeddings(&a.counts, nl, ne);
    let vb = embeddings(&b.counts, nl, ne);
    let pos_b: HashMap<usize, usize> = b.rows.iter().enumerate().map(|(i, &p)| (p, i)).collect();
    let sims: Vec<f64> = a
        .rows
        .iter()
        .enumerate()
        .filter_map(|(i, p)| {
            let j = *pos_b.get(p)?;
            Some(
                va[i * d..(i + 1) * d]
                    .iter()
                    .zip(&vb[j * d..(j + 1) * d])
                    .map(|(x, y)| x * y)
                    .sum::<f64>(),
            )
        })
        .collect();
    let ms = mean_std(sims.iter().copied());
    DriftStats {
        num_prompts: sims.len(),
        mean: ms.mean,
        std: ms.std,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use moe_xray_trace::RoutingRecord;

    fn rec(p: &str, layer: u32, pos: u32, tt: TokenType, experts: &[u32]) -> TraceItem {
        TraceItem::Record(RoutingRecord {
            prompt_id: p.into(),
            category: None,
            layer,
            position: pos,
            token_id: Some(1),
            token_type: tt,
            experts: experts.to_vec(),
            weights: None,
            probs: None,
        })
    }

    /// Two categories of 2 prompts, 1 layer, 4 experts; category a routes to expert 0 in window
    /// 0 and to expert 1 in window 1, category b the other way round.
    fn items() -> Vec<TraceItem> {
        let mut v = Vec::new();
        for (p, cat) in [("a1", 0), ("a2", 0), ("b1", 1), ("b2", 1)] {
            v.push(rec(p, 0, 0, TokenType::Prompt, &[2]));
            for g in 0..4u32 {
                let e = if (g < 2) == (cat == 0) { 0 } else { 1 };
                v.push(rec(p, 0, 3 + g, TokenType::Generation, &[e]));
            }
        }
        v
    }

    fn run(w: usize) -> RoutingWindows {
        let ids: Vec<String> = ["a1", "a2", "b1", "b2"].map(String::from).to_vec();
        let shape = WindowShape::new(&[0], 4, false, w, &ids);
        let mut scan = WindowScan::new(shape);
        items().iter().for_each(|i| scan.push(i));
        let mut pass = scan.finish().unwrap();
        items().iter().for_each(|i| pass.push(i));
        let cats = vec!["a".to_string(), "b".to_string()];
        let folds = |rows: &[usize], _: &[usize]| (rows.iter().map(|&r| r % 2).collect(), 2);
        match pass.finish(&[0, 0, 1, 1], &cats, &folds) {
            Section::Done(r) => r,
            Section::Skipped { skipped } => panic!("{skipped}"),
        }
    }

    #[test]
    fn windows_split_generation_and_drift_measures_the_switch() {
        let r = run(2);
        assert_eq!(r.max_generated, 4);
        assert_eq!(r.windows.len(), 2);
        assert_eq!(r.windows[1].start, Some(2));
        assert_eq!(r.windows[0].tokens, 8);
        assert_eq!(r.prompt_phase.tokens, 4);
        assert_eq!(r.generation_phase.tokens, 16);
        // Within each window the categories route to disjoint experts: within 1, across 0.
        let s = r.windows[0].similarity.done().unwrap();
        assert_eq!((s.within.mean, s.across.mean), (1.0, 0.0));
        // Every prompt switches expert between the windows: drift similarity 0.
        assert_eq!(r.drift[0].mean, 0.0);
        assert_eq!(r.drift[0].num_prompts, 4);
        // The prompt phase routes every prompt to expert 2 (d undefined: zero spread).
        assert_eq!(r.prompt_phase.similarity.done().unwrap().within.mean, 1.0);
        // Phase drift: prompt (expert 2) vs generation (experts 0 and 1 half each): cosine 0.
        assert_eq!(r.phase_drift.mean, 0.0);
        // The generation phase mixes both experts equally for every prompt.
        let g = r.generation_phase.similarity.done().unwrap();
        assert!((g.within.mean - 1.0).abs() < 1e-12 && (g.across.mean - 1.0).abs() < 1e-12);
    }

    #[test]
    fn one_window_covers_everything_and_limits_hold() {
        let r = run(4);
        assert_eq!(r.windows.len(), 1);
        assert_eq!(r.drift.len(), 0);
        let ids = vec!["a1".to_string()];
        let shape = WindowShape::new(&[0], 4, false, 1, &ids);
        let mut scan = WindowScan::new(shape);
        scan.push(&rec("a1", 0, 0, TokenType::Generation, &[0]));
        scan.push(&rec("a1", 0, 100_000, TokenType::Generation, &[0]));
        let e = scan.finish().unwrap_err();
        assert!(e.contains("more than the limit"), "{e}");
        let shape = WindowShape::new(&[0], 4, false, 1, &ids);
        let e = WindowScan::new(shape).finish().unwrap_err();
        assert!(e.contains("no generated token"), "{e}");
    }
}
