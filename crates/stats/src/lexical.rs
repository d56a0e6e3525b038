//! Confound controls (`docs/statistics.md`, "Confound controls"): what token identity alone
//! explains.
//!
//! * **Lexical baseline** ([`lexical_baseline`]): the classifier of `logreg_5fold` — the same
//!   folds, the same solver ([`crate::logreg`]), scikit-learn's `StandardScaler` fit on each
//!   training fold — on bag-of-token-id features: `x_i[t]` = number of counted tokens of prompt
//!   i with id t (each (token type, position) of the selected token types once), one feature per
//!   token id that occurs in the analysed prompts. The dense N × V matrix is never formed: the
//!   fit depends on the standardised rows only through their inner products (the optimum of an
//!   L2-penalised linear model lies in the span of the training rows, and the intercept is not
//!   penalised), so each fold's standardised training and test rows are replaced by an isometric
//!   embedding into at most N dimensions — `G = Z Zᵀ` (Z the standardised rows of the fold's
//!   training and test prompts, accumulated over blocks of [`FEATURE_BLOCK`] token ids) and
//!   `F = Q Λ^½` from its eigendecomposition (eigenvalues ≤ [`EIGEN_RTOL`] · λ_max left out) —
//!   which gives the same fits and predictions. Memory: O(N² + N·[`FEATURE_BLOCK`]) plus the
//!   sparse bags, whatever the vocabulary size. When a fold has at least as many prompts as
//!   there are token ids, the dense standardised rows are used directly (no larger).
//! * **Token-matched similarity** ([`token_matched`]): the pair statistics of `similarity`,
//!   `category_similarity_matrix` and `per_layer` on routing vectors from which token identity is
//!   removed: `shared` counts only (token, layer) records whose token id occurs in every category
//!   (among the analysed prompts); `residual` subtracts from each record's selection vector the
//!   mean selection vector of its token id at that layer over all analysed prompts.
//!
//! The per-record work happens in [`TokenPass`] (pass 1: bags and residual sums) and
//! [`SharedPass`] (pass 2 of `shared`: counts restricted to the shared token ids); the pipeline
//! feeds them the trace items.

use std::cmp::Ordering;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use moe_xray_trace::{TokenType, TraceItem};
use nalgebra::{DMatrix, SymmetricEigen};

use crate::cv::{self, CvError, FoldFeatures};
use crate::input::{AnalysisInput, DroppedPrompt};
use crate::results::{LexicalBaseline, LogRegResult, Section, TokenMatchMode, TokenMatched};
use crate::signature::embeddings;
use crate::similarity::{category_matrix, gram, per_layer, summarize};

/// Token ids per block when the Gram matrix of a fold's standardised bags is accumulated.
pub const FEATURE_BLOCK: usize = 256;
/// Eigenvalues of a fold's Gram matrix at or below this fraction of the largest are left out of
/// the embedding (directions the data do not span, up to rounding).
pub const EIGEN_RTOL: f64 = 1e-12;
/// Largest `token ids × L × E` of the `residual` mode's per-token mean vectors (8 bytes each).
pub const MAX_RESIDUAL_VALUES: usize = 1 << 26;
/// A residual layer whose norm is at most this fraction of the prompt's selection mass at that
/// layer is zero (e.g. every token of the prompt occurs only in it).
pub const RESIDUAL_ZERO_RTOL: f64 = 1e-9;

/// Token-matched routing rows of the analysed prompts (prompt id → L·E, layer-major).
#[derive(Debug, Clone, PartialEq)]
pub struct MatchedRows {
    pub mode: TokenMatchMode,
    pub rows: HashMap<String, Vec<f64>>,
    /// Selection mass of each prompt and layer before residualisation (prompt id → L); the
    /// scale of [`RESIDUAL_ZERO_RTOL`].
    pub mass: HashMap<String, Vec<f64>>,
    /// shared: token ids in every category; residual: distinct token ids.
    pub token_ids: usize,
    /// (token, layer) records used.
    pub records: u64,
}

/// The token data of an analysis, supplied by the caller (the pipeline reads the traces).
#[derive(Debug, Clone, PartialEq)]
pub struct TokenInput {
    /// prompt id → (token id, count), ascending token id; or why there are none.
    pub bags: Result<HashMap<String, Vec<(u32, u64)>>, String>,
    /// `--token-matched`: the rows, or why they were not computed; `None` when not requested.
    pub matched: Option<Result<MatchedRows, String>>,
}

fn tt_index(t: TokenType) -> u8 {
    match t {
        TokenType::Prompt => 0,
        TokenType::Generation => 1,
    }
}

/// One routing decision of a trace item: (token type, decoder layer, position, token id,
/// experts with their increments).
struct Decision<'a> {
    prompt_id: &'a str,
    tt: TokenType,
    layer: u32,
    position: u32,
    token_id: Option<u32>,
    /// (expert, increment): 1 or the router weight.
    picks: Vec<(u32, f64)>,
}

fn decision(item: &TraceItem, weighted: bool) -> Option<Decision<'_>> {
    match item {
        TraceItem::Record(r) => Some(Decision {
            prompt_id: &r.prompt_id,
            tt: r.token_type,
            layer: r.layer,
            position: r.position,
            token_id: r.token_id,
            picks: r
                .experts
                .iter()
                .enumerate()
                .map(|(j, &e)| {
                    let w = if weighted {
                        r.weights
                            .as_ref()
                            .and_then(|w| w.get(j))
                            .map_or(0.0, |&w| f64::from(w))
                    } else {
                        1.0
                    };
                    (e, w)
                })
                .collect(),
        }),
        TraceItem::Event(e) => Some(Decision {
            prompt_id: &e.prompt_id,
            tt: e.token_type,
            layer: e.layer,
            position: e.position,
            token_id: e.token_id,
            picks: vec![(
                e.expert,
                if weighted {
                    e.weight.map_or(0.0, f64::from)
                } else {
                    1.0
                },
            )],
        }),
        TraceItem::Counts(_) => None,
    }
}

/// Shape and selection shared by both passes.
#[derive(Debug, Clone)]
pub struct PassShape {
    /// Decoder layer → signature row (the MoE layers).
    rows: HashMap<u32, usize>,
    num_rows: usize,
    num_experts: usize,
    token_types: Vec<TokenType>,
    weighted: bool,
    /// Analysed prompt id → index.
    prompts: HashMap<String, usize>,
}

impl PassShape {
    /// `layers`: decoder-layer index of each signature row; `prompts`: the analysed prompts.
    pub fn new(
        layers: &[u32],
        num_experts: usize,
        token_types: &[TokenType],
        weighted: bool,
        prompts: &[String],
    ) -> Self {
        PassShape {
            rows: layers.iter().enumerate().map(|(i, &l)| (l, i)).collect(),
            num_rows: layers.len(),
            num_experts,
            token_types: token_types.to_vec(),
            weighted,
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

    /// The decision of `item` if it counts: a routing line of an analysed prompt, of a selected
    /// token type, at an MoE layer. Returns (prompt index, row, decision).
    fn select<'a>(
        &self,
        item: &'a TraceItem,
    ) -> Result<Option<(usize, usize, Decision<'a>)>, String> {
        let Some(d) = decision(item, self.weighted) else {
            return Err("counts-form traces have no token ids".into());
        };
        if !self.token_types.contains(&d.tt) {
            return Ok(None);
        }
        let Some(&p) = self.prompts.get(d.prompt_id) else {
            return Ok(None);
        };
        let Some(&row) = self.rows.get(&d.layer) else {
            return Ok(None);
        };
        if d.token_id.is_none() {
            return Err(format!(
                "the routing line of prompt {:?} at layer {} position {} has no token_id",
                d.prompt_id, d.layer, d.position
            ));
        }
        Ok(Some((p, row, d)))
    }
}

/// Residual sums of pass 1.
#[derive(Debug, Default)]
struct ResidualSums {
    /// token id → L·E summed selections over all analysed prompts.
    totals: HashMap<u32, Vec<f64>>,
    /// token id → L occurrences.
    occurrences: HashMap<u32, Vec<u64>>,
    /// per prompt: L·E counts.
    counts: Vec<Vec<f64>>,
    /// per prompt: token id → L occurrences.
    prompt_occ: Vec<HashMap<u32, Vec<u64>>>,
    /// per prompt: (token type, row, position) already counted as an occurrence.
    seen: Vec<HashSet<(u8, usize, u32)>>,
    records: u64,
    /// Why the residual mode cannot be computed (too many values).
    failed: Option<String>,
}

/// Pass 1 over the trace items: the token bags and, for `residual`, the per-token sums.
#[derive(Debug)]
pub struct TokenPass {
    shape: PassShape,
    /// per prompt: (token type, position) → token id.
    tokens: Vec<HashMap<(u8, u32), u32>>,
    residual: Option<ResidualSums>,
    failed: Option<String>,
}

impl TokenPass {
    pub fn new(shape: PassShape, residual: bool) -> Self {
        let n = shape.prompts.len();
        let residual = residual.then(|| ResidualSums {
            counts: vec![Vec::new(); n],
            prompt_occ: vec![HashMap::new(); n],
            seen: vec![HashSet::new(); n],
            ..ResidualSums::default()
        });
        TokenPass {
            tokens: vec![HashMap::new(); n],
            shape,
            residual,
            failed: None,
        }
    }

    /// Whether a problem was met (further items are ignored).
    pub fn failed(&self) -> bool {
        self.failed.is_some()
    }

    /// Feed one trace item. After the first problem (a counts line, a record without token id,
    /// two token ids at one position) every further item is ignored and [`TokenPass::finish`]
    /// reports it.
    pub fn push(&mut self, item: &TraceItem) {
        if self.failed.is_some() {
            return;
        }
        let (p, row, d) = match self.shape.select(item) {
            Ok(Some(x)) => x,
            Ok(None) => return,
            Err(e) => {
                self.failed = Some(e);
                return;
            }
        };
        let Some(token) = d.token_id else { return };
        let tt = tt_index(d.tt);
        let prev = *self.tokens[p].entry((tt, d.position)).or_insert(token);
        if prev != token {
            self.failed = Some(format!(
                "prompt {:?} has token ids {prev} and {token} at {} position {}",
                d.prompt_id,
                d.tt.as_str(),
                d.position
            ));
            return;
        }
        let (ne, dim, nl) = (
            self.shape.num_experts,
            self.shape.dim(),
            self.shape.num_rows,
        );
        let Some(res) = self.residual.as_mut() else {
            return;
        };
        if res.failed.is_some() {
            return;
        }
        if !res.totals.contains_key(&token) {
            let values = (res.totals.len() + 1).saturating_mul(dim);
            if values > MAX_RESIDUAL_VALUES {
                res.failed = Some(format!(
                    "more than {} distinct token ids × {dim} (L·E) values exceed the limit of {MAX_RESIDUAL_VALUES} per-token mean values",
                    res.totals.len()
                ));
                return;
            }
            res.totals.insert(token, vec![0.0; dim]);
            res.occurrences.insert(token, vec![0; nl]);
        }
        if res.seen[p].insert((tt, row, d.position)) {
            res.records += 1;
            if let Some(o) = res.occurrences.get_mut(&token) {
                o[row] += 1;
            }
            res.prompt_occ[p]
                .entry(token)
                .or_insert_with(|| vec![0; nl])[row] += 1;
        }
        if res.counts[p].is_empty() {
            res.counts[p] = vec![0.0; dim];
        }
        let totals = res.totals.get_mut(&token);
        let counts = &mut res.counts[p];
        if let Some(totals) = totals {
            for &(e, w) in &d.picks {
                let e = e as usize;
                if e < ne {
                    totals[row * ne + e] += w;
                    counts[row * ne + e] += w;
                }
            }
        }
    }

    /// The bags of every analysed prompt, and (`residual`) the residual rows.
    pub fn finish(self) -> (TokenBags, Option<Result<MatchedRows, String>>) {
        let ids: Vec<String> = {
            let mut v: Vec<(usize, String)> = self
                .shape
                .prompts
                .iter()
                .map(|(k, &i)| (i, k.clone()))
                .collect();
            v.sort();
            v.into_iter().map(|(_, k)| k).collect()
        };
        if let Some(e) = self.failed {
            let matched = self.residual.is_some().then(|| Err(e.clone()));
            return (Err(e), matched);
        }
        let bags: HashMap<String, Vec<(u32, u64)>> = ids
            .iter()
            .zip(&self.tokens)
            .map(|(id, toks)| {
                let mut bag: BTreeMap<u32, u64> = BTreeMap::new();
                for &t in toks.values() {
                    *bag.entry(t).or_default() += 1;
                }
                (id.clone(), bag.into_iter().collect())
            })
            .collect();
        let matched = self
            .residual
            .map(|res| residual_rows(res, &ids, &self.shape));
        (Ok(bags), matched)
    }
}

/// prompt id → (token id, count), or why there are none.
pub type TokenBags = Result<HashMap<String, Vec<(u32, u64)>>, String>;

fn residual_rows(
    res: ResidualSums,
    ids: &[String],
    shape: &PassShape,
) -> Result<MatchedRows, String> {
    if let Some(e) = res.failed {
        return Err(e);
    }
    let (nl, ne, dim) = (shape.num_rows, shape.num_experts, shape.dim());
    let mut rows = HashMap::new();
    let mut mass = HashMap::new();
    for (p, id) in ids.iter().enumerate() {
        let mut r = if res.counts[p].is_empty() {
            vec![0.0; dim]
        } else {
            res.counts[p].clone()
        };
        mass.insert(
            id.clone(),
            (0..nl)
                .map(|l| r[l * ne..(l + 1) * ne].iter().sum())
                .collect(),
        );
        // Σ over the prompt's tokens of n_it[l] · mean_t[l, :], in token-id order.
        let occ: BTreeMap<&u32, &Vec<u64>> = res.prompt_occ[p].iter().collect();
        for (t, n_it) in occ {
            let (Some(tot), Some(n_t)) = (res.totals.get(t), res.occurrences.get(t)) else {
                continue;
            };
            for l in 0..nl {
                if n_it[l] == 0 || n_t[l] == 0 {
                    continue;
                }
                let f = n_it[l] as f64 / n_t[l] as f64;
                for e in 0..ne {
                    r[l * ne + e] -= f * tot[l * ne + e];
                }
            }
        }
        rows.insert(id.clone(), r);
    }
    Ok(MatchedRows {
        mode: TokenMatchMode::Residual,
        rows,
        mass,
        token_ids: res.totals.len(),
        records: res.records,
    })
}

/// The token ids that occur in every category among the analysed prompts (`categories[i]` of
/// prompt `ids[i]`).
pub fn shared_token_ids(
    bags: &HashMap<String, Vec<(u32, u64)>>,
    ids: &[String],
    categories: &[String],
) -> BTreeSet<u32> {
    let mut per_cat: BTreeMap<&str, BTreeSet<u32>> = BTreeMap::new();
    for (id, c) in ids.iter().zip(categories) {
        let set = per_cat.entry(c.as_str()).or_default();
        if let Some(bag) = bags.get(id) {
            set.extend(bag.iter().map(|&(t, _)| t));
        }
    }
    let mut it = per_cat.into_values();
    let Some(mut shared) = it.next() else {
        return BTreeSet::new();
    };
    for s in it {
        shared = shared.intersection(&s).copied().collect();
    }
    shared
}

/// Pass 2 of `shared`: the counts of every analysed prompt restricted to the shared token ids.
#[derive(Debug)]
pub struct SharedPass {
    shape: PassShape,
    shared: BTreeSet<u32>,
    counts: Vec<Vec<f64>>,
    seen: Vec<HashSet<(u8, usize, u32)>>,
    records: u64,
    failed: Option<String>,
}

impl SharedPass {
    pub fn new(shape: PassShape, shared: BTreeSet<u32>) -> Self {
        let n = shape.prompts.len();
        SharedPass {
            counts: vec![Vec::new(); n],
            seen: vec![HashSet::new(); n],
            shape,
            shared,
            records: 0,
            failed: None,
        }
    }

    pub fn push(&mut self, item: &TraceItem) {
        if self.failed.is_some() {
            return;
        }
        let (p, row, d) = match self.shape.select(item) {
            Ok(Some(x)) => x,
            Ok(None) => return,
            Err(e) => {
                self.failed = Some(e);
                return;
            }
        };
        let Some(token) = d.token_id else { return };
        if !self.shared.contains(&token) {
            return;
        }
        let (ne, dim) = (self.shape.num_experts, self.shape.dim());
        if self.seen[p].insert((tt_index(d.tt), row, d.position)) {
            self.records += 1;
        }
        let c = &mut self.counts[p];
        if c.is_empty() {
            *c = vec![0.0; dim];
        }
        for &(e, w) in &d.picks {
            let e = e as usize;
            if e < ne {
                c[row * ne + e] += w;
            }
        }
    }

    pub fn finish(self) -> Result<MatchedRows, String> {
        if let Some(e) = self.failed {
            return Err(e);
        }
        let (nl, ne, dim) = (
            self.shape.num_rows,
            self.shape.num_experts,
            self.shape.dim(),
        );
        let mut rows = HashMap::new();
        let mut mass = HashMap::new();
        for (id, &p) in &self.shape.prompts {
            let r = if self.counts[p].is_empty() {
                vec![0.0; dim]
            } else {
                self.counts[p].clone()
            };
            mass.insert(
                id.clone(),
                (0..nl)
                    .map(|l| r[l * ne..(l + 1) * ne].iter().sum())
                    .collect(),
            );
            rows.insert(id.clone(), r);
        }
        Ok(MatchedRows {
            mode: TokenMatchMode::Shared,
            rows,
            mass,
            token_ids: self.shared.len(),
            records: self.records,
        })
    }
}

/// The standardised rows of one fold embedded isometrically (see the module docs): training
/// rows then test rows, as [`FoldFeatures`].
fn fold_embedding(
    rows: &[Vec<(usize, f64)>],
    vocab: usize,
    train: &[usize],
    test: &[usize],
) -> Result<FoldFeatures, CvError> {
    let ntr = train.len();
    let nf = ntr as f64;
    // scikit-learn's StandardScaler on the training rows (cv::StandardScaler's formulas, with
    // the zeros of the sparse rows added in closed form).
    let mut mean = vec![0.0; vocab];
    let mut nnz = vec![0usize; vocab];
    for &i in train {
        for &(j, x) in &rows[i] {
            mean[j] += x;
            nnz[j] += 1;
        }
    }
    mean.iter_mut().for_each(|m| *m /= nf);
    let mut ssq = vec![0.0; vocab];
    let mut corr = vec![0.0; vocab];
    for &i in train {
        for &(j, x) in &rows[i] {
            let t = x - mean[j];
            corr[j] += t;
            ssq[j] += t * t;
        }
    }
    let eps = f64::EPSILON;
    let scale: Vec<f64> = (0..vocab)
        .map(|j| {
            let zeros = (ntr - nnz[j]) as f64;
            let s = ssq[j] + zeros * mean[j] * mean[j];
            let c = corr[j] - zeros * mean[j];
            let var = (s - c * c / nf) / nf;
            let upper = nf * eps * var + (nf * mean[j] * eps).powi(2);
            if var <= upper {
                1.0
            } else {
                var.sqrt()
            }
        })
        .collect();
    let order: Vec<usize> = train.iter().chain(test).copied().collect();
    let m = order.len();
    if vocab <= m {
        // At most as many token ids as rows: the dense standardised rows themselves (no larger
        // than the N × N Gram matrix).
        let mut f = vec![0.0; m * vocab];
        for (a, &i) in order.iter().enumerate() {
            let row = &mut f[a * vocab..(a + 1) * vocab];
            for (j, v) in row.iter_mut().enumerate() {
                *v = -mean[j] / scale[j];
            }
            for &(j, x) in &rows[i] {
                row[j] = (x - mean[j]) / scale[j];
            }
        }
        let xte = f.split_off(ntr * vocab);
        return Ok((f, xte, vocab));
    }
    // Gram matrix of the standardised rows (training then test), over blocks of token ids.
    let mut g = DMatrix::<f64>::zeros(m, m);
    // Column-major B × m blocks: column a = the block's standardised features of row order[a].
    let mut dense: Vec<Vec<(usize, f64)>> = vec![Vec::new(); m];
    for (a, &i) in order.iter().enumerate() {
        dense[a] = rows[i].clone();
    }
    let mut cursor = vec![0usize; m];
    let mut start = 0;
    while start < vocab {
        let end = (start + FEATURE_BLOCK).min(vocab);
        let b = end - start;
        let mut blk = DMatrix::<f64>::zeros(b, m);
        for a in 0..m {
            let col = &mut blk.as_mut_slice()[a * b..(a + 1) * b];
            for (k, v) in col.iter_mut().enumerate() {
                let j = start + k;
                *v = -mean[j] / scale[j];
            }
            let r = &dense[a];
            while cursor[a] < r.len() && r[cursor[a]].0 < end {
                let (j, x) = r[cursor[a]];
                col[j - start] = (x - mean[j]) / scale[j];
                cursor[a] += 1;
            }
        }
        g.gemm_tr(1.0, &blk, &blk, 1.0);
        start = end;
    }
    let eig = SymmetricEigen::new(g);
    let lmax = eig.eigenvalues.iter().fold(0.0f64, |a, &b| a.max(b));
    let keep: Vec<usize> = (0..m)
        .filter(|&c| eig.eigenvalues[c] > EIGEN_RTOL * lmax && eig.eigenvalues[c] > 0.0)
        .collect();
    let d = keep.len().max(1);
    let mut f = vec![0.0; m * d];
    for (k, &c) in keep.iter().enumerate() {
        let s = eig.eigenvalues[c].sqrt();
        for a in 0..m {
            f[a * d + k] = eig.eigenvectors[(a, c)] * s;
        }
    }
    let xte = f.split_off(ntr * d);
    Ok((f, xte, d))
}

/// The lexical baseline on the analysed prompts of `input` with the classifier's folds.
pub fn lexical_baseline(
    input: &AnalysisInput,
    bags: &HashMap<String, Vec<(u32, u64)>>,
    folds: &[usize],
    n_folds: usize,
) -> Section<LexicalBaseline> {
    let mut vocab: BTreeMap<u32, usize> = BTreeMap::new();
    let mut tokens = 0u64;
    for id in &input.prompt_ids {
        if let Some(bag) = bags.get(id) {
            for &(t, c) in bag {
                vocab.insert(t, 0);
                tokens = tokens.saturating_add(c);
            }
        }
    }
    if vocab.is_empty() {
        return Section::skipped("no counted token has a token id");
    }
    for (k, v) in vocab.values_mut().enumerate() {
        *v = k;
    }
    let rows: Vec<Vec<(usize, f64)>> = input
        .prompt_ids
        .iter()
        .map(|id| {
            bags.get(id)
                .map(|bag| bag.iter().map(|&(t, c)| (vocab[&t], c as f64)).collect())
                .unwrap_or_default()
        })
        .collect();
    let v = vocab.len();
    let res = cv::logreg_cv_fold_features(
        input.n(),
        &input.labels,
        &input.categories,
        folds,
        n_folds,
        |_, train, test| fold_embedding(&rows, v, train, test),
    );
    match res {
        Err(e) => Section::skipped(e.to_string()),
        Ok(cv::CvOutcome::Skipped { reason }) => Section::skipped(reason),
        Ok(cv::CvOutcome::Done(r)) => Section::Done(LexicalBaseline {
            vocabulary: v,
            tokens,
            classifier: LogRegResult {
                accuracy_mean: r.accuracy_mean,
                accuracy_std: r.accuracy_std,
                chance: r.chance,
                confusion: r.confusion,
                fold_accuracies: r.fold_accuracies,
                oof_predictions: r
                    .oof_predictions
                    .iter()
                    .map(|&p| input.categories[p].clone())
                    .collect(),
                labels: r.labels,
                macro_f1_oof: r.macro_f1_oof,
                n_folds,
            },
        }),
    }
}

/// The token-matched pair statistics of the analysed prompts of `input`; `layers` relabels
/// `per_layer[].layer` with decoder indices.
pub fn token_matched(
    input: &AnalysisInput,
    m: &MatchedRows,
    layers: Option<&[usize]>,
) -> Section<TokenMatched> {
    let (nl, ne) = (input.num_layers, input.num_experts);
    let d = input.dim();
    let mut kept_rows = Vec::new();
    let mut labels = Vec::new();
    let mut dropped = Vec::new();
    for (i, id) in input.prompt_ids.iter().enumerate() {
        let (Some(r), Some(mass)) = (m.rows.get(id), m.mass.get(id)) else {
            dropped.push(DroppedPrompt {
                prompt_id: id.clone(),
                reason: "no token-matched routing".into(),
            });
            continue;
        };
        if r.len() != d || mass.len() != nl {
            return Section::skipped(format!(
                "token-matched row of prompt {id:?} has {} values, expected {d}",
                r.len()
            ));
        }
        let empty = (0..nl).find(|&l| {
            let norm = r[l * ne..(l + 1) * ne]
                .iter()
                .map(|x| x * x)
                .sum::<f64>()
                .sqrt();
            match m.mode {
                TokenMatchMode::Shared => mass[l].partial_cmp(&0.0) != Some(Ordering::Greater),
                TokenMatchMode::Residual => {
                    norm.partial_cmp(&(RESIDUAL_ZERO_RTOL * mass[l])) != Some(Ordering::Greater)
                }
            }
        });
        if let Some(l) = empty {
            let l = layers.and_then(|x| x.get(l).copied()).unwrap_or(l);
            dropped.push(DroppedPrompt {
                prompt_id: id.clone(),
                reason: match m.mode {
                    TokenMatchMode::Shared => {
                        format!("no token shared by every category at layer {l}")
                    }
                    TokenMatchMode::Residual => format!("zero residual at layer {l}"),
                },
            });
            continue;
        }
        kept_rows.extend_from_slice(r);
        labels.push(input.labels[i]);
    }
    let mut sizes = vec![0usize; input.categories.len()];
    labels.iter().for_each(|&c| sizes[c] += 1);
    if sizes.iter().filter(|&&s| s >= 2).count() < 2 {
        return Section::skipped(format!(
            "fewer than 2 categories with at least 2 prompts remain ({} of {} prompts dropped)",
            dropped.len(),
            input.n()
        ));
    }
    let n = labels.len();
    let v = embeddings(&kept_rows, nl, ne);
    let sim = gram(&v, n, d);
    let mut pl = per_layer(&v, &labels, nl, ne);
    if let Some(x) = layers {
        for p in &mut pl {
            if let Some(&dl) = x.get(p.layer) {
                p.layer = dl;
            }
        }
    }
    Section::Done(TokenMatched {
        mode: m.mode,
        num_prompts: n,
        token_ids: m.token_ids,
        records: m.records,
        dropped_prompts: dropped,
        similarity: summarize(&sim, &labels),
        category_similarity_matrix: category_matrix(&sim, &labels, &input.categories),
        per_layer: pl,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cv::StandardScaler;
    use moe_xray_trace::RoutingRecord;

    fn rec(p: &str, layer: u32, pos: u32, tok: u32, experts: &[u32]) -> TraceItem {
        TraceItem::Record(RoutingRecord {
            prompt_id: p.into(),
            category: None,
            layer,
            position: pos,
            token_id: Some(tok),
            token_type: TokenType::Prompt,
            experts: experts.to_vec(),
            weights: None,
            probs: None,
        })
    }

    /// The embedded fold reproduces the inner products of the dense standardised rows (Gram
    /// path over two feature blocks, and the dense path for a small vocabulary).
    #[test]
    fn fold_embedding_is_an_isometry_of_the_standardised_rows() {
        isometry(9, 300);
        isometry(9, 6);
    }

    fn isometry(n: usize, v: usize) {
        let mut dense = vec![0.0; n * v];
        let mut rows = vec![Vec::new(); n];
        for i in 0..n {
            for j in 0..v {
                if (i * 7 + j * 3) % 11 < 2 || j == 5 {
                    let x = ((i + j) % 4 + 1) as f64;
                    dense[i * v + j] = x;
                    rows[i].push((j, x));
                }
            }
        }
        let train = [0, 2, 3, 5, 6, 8];
        let test = [1, 4, 7];
        let (xtr, xte, d) = fold_embedding(&rows, v, &train, &test).unwrap();
        let gather = |idx: &[usize]| -> Vec<f64> {
            idx.iter()
                .flat_map(|&i| dense[i * v..(i + 1) * v].to_vec())
                .collect()
        };
        let sc = StandardScaler::fit(&gather(&train), train.len(), v);
        let z: Vec<f64> = [sc.transform(&gather(&train)), sc.transform(&gather(&test))].concat();
        let f: Vec<f64> = [xtr, xte].concat();
        let m = n;
        let mut worst: f64 = 0.0;
        for a in 0..m {
            for b in 0..m {
                let want: f64 = (0..v).map(|j| z[a * v + j] * z[b * v + j]).sum();
                let got: f64 = (0..d).map(|k| f[a * d + k] * f[b * d + k]).sum();
                worst = worst.max((want - got).abs() / (1.0 + want.abs()));
            }
        }
        assert!(worst < 1e-9, "inner products differ by {worst}");
    }

    fn input_of(ids: &[&str], labels: &[usize]) -> AnalysisInput {
        AnalysisInput {
            num_layers: 1,
            num_experts: 2,
            top_k: 1,
            weighted: false,
            prompt_ids: ids.iter().map(|s| s.to_string()).collect(),
            categories: vec!["a".into(), "b".into()],
            labels: labels.to_vec(),
            counts: vec![1.0; ids.len() * 2],
            tokens_per_layer: vec![1; ids.len()],
            dropped: vec![],
        }
    }

    /// Positive control: tokens that differ by category are classified perfectly; null
    /// control: the same token distribution in both categories is not.
    #[test]
    fn lexical_baseline_positive_and_null_controls() {
        let ids: Vec<String> = (0..20).map(|i| format!("p{i}")).collect();
        let idr: Vec<&str> = ids.iter().map(|s| s.as_str()).collect();
        let labels: Vec<usize> = (0..20).map(|i| i % 2).collect();
        let input = input_of(&idr, &labels);
        let folds: Vec<usize> = (0..20).map(|i| (i / 2) % 5).collect();
        let lexical = |f: &dyn Fn(usize) -> Vec<(u32, u64)>| {
            let bags = ids
                .iter()
                .enumerate()
                .map(|(i, id)| (id.clone(), f(i)))
                .collect();
            match lexical_baseline(&input, &bags, &folds, 5) {
                Section::Done(l) => l,
                Section::Skipped { skipped } => panic!("{skipped}"),
            }
        };
        // Category a uses ids 100.., b uses 200.., plus a common token.
        let pos = lexical(&|i| {
            let base = if i % 2 == 0 { 100 } else { 200 };
            vec![(7, 2), (base + (i as u32 % 3), 1)]
        });
        assert_eq!(pos.classifier.accuracy_mean, 1.0);
        assert_eq!(pos.vocabulary, 7);
        assert_eq!(pos.tokens, 60);
        // Token ids independent of the category (the same bag for prompts 2m and 2m+1).
        let null = lexical(&|i| vec![(7, 1), (300 + (i as u32 / 2) % 5, 2)]);
        assert!(
            null.classifier.accuracy_mean <= 0.6,
            "{:?}",
            null.classifier
        );
    }

    /// Residual by hand: one layer, two experts. Token 1 occurs in p0 (expert 0) and p1
    /// (expert 1): mean (½, ½); token 2 only in p0 (expert 0): mean (1, 0).
    /// p0 = (2,0) − (½,½) − (1,0) = (½, −½); p1 = (0,1) − (½,½) = (−½, ½).
    /// Shared (categories a: p0, b: p1): token 1 only -> p0 (1,0), p1 (0,1).
    #[test]
    fn residual_and_shared_rows_by_hand() {
        let ids = vec!["p0".to_string(), "p1".to_string()];
        let items = [
            rec("p0", 0, 0, 1, &[0]),
            rec("p0", 0, 1, 2, &[0]),
            rec("p1", 0, 0, 1, &[1]),
            rec("zz", 0, 0, 1, &[1]), // not analysed
        ];
        let shape = PassShape::new(&[0], 2, &[TokenType::Prompt], false, &ids);
        let mut pass = TokenPass::new(shape.clone(), true);
        items.iter().for_each(|i| pass.push(i));
        let (bags, res) = pass.finish();
        let bags = bags.unwrap();
        assert_eq!(bags["p0"], vec![(1, 1), (2, 1)]);
        let res = res.unwrap().unwrap();
        assert_eq!(res.rows["p0"], vec![0.5, -0.5]);
        assert_eq!(res.rows["p1"], vec![-0.5, 0.5]);
        assert_eq!((res.token_ids, res.records), (2, 3));
        let shared = shared_token_ids(&bags, &ids, &["a".into(), "b".into()]);
        assert_eq!(shared.into_iter().collect::<Vec<_>>(), vec![1]);
        let mut p2 = SharedPass::new(shape, [1].into_iter().collect());
        items.iter().for_each(|i| p2.push(i));
        let sh = p2.finish().unwrap();
        assert_eq!(sh.rows["p0"], vec![1.0, 0.0]);
        assert_eq!(sh.rows["p1"], vec![0.0, 1.0]);
        assert_eq!(sh.records, 2);
    }

    #[test]
    fn missing_or_conflicting_token_ids_are_reported() {
        let ids = vec!["p0".to_string()];
        let shape = PassShape::new(&[0, 1], 2, &[TokenType::Prompt], false, &ids);
        let mut pass = TokenPass::new(shape.clone(), false);
        pass.push(&rec("p0", 0, 3, 1, &[0]));
        pass.push(&rec("p0", 1, 3, 9, &[0]));
        let err = pass.finish().0.unwrap_err();
        assert!(err.contains("token ids 1 and 9"), "{err}");
        let mut pass = TokenPass::new(shape, false);
        let mut r = rec("p0", 0, 0, 1, &[0]);
        if let TraceItem::Record(x) = &mut r {
            x.token_id = None;
        }
        pass.push(&r);
        assert!(pass.failed());
        assert!(pass.finish().0.unwrap_err().contains("no token_id"));
    }
}
