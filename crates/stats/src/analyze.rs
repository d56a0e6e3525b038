//! Orchestration: from validated counts to `results.json` ([`AnalysisResults`]).
//!
//! Two paths (`"path"` in results.json):
//! - `exact_pairs` ([`analyze_exact`]): the N×N similarity matrix, every statistic of
//!   `docs/statistics.md` (baselines, significance, PCA, t-SNE, classifier).
//! - `gram_sums` ([`analyze_gram`]): for large N, the pair statistics from per-category sums and
//!   Gram matrices ([`crate::large_n`]); the sections that need all prompts in memory (baselines,
//!   significance, PCA, t-SNE, classifier) are `{"skipped": reason}`.
//!
//! [`Collector`] streams prompts and picks the path (automatically above
//! [`DEFAULT_GRAM_THRESHOLD`] prompts, or forced).

use crate::baselines::{run_baseline, Baseline};
use crate::cv;
use crate::error::{Result, StatsError};
use crate::input::{build_input, AnalysisInput, DroppedPrompt, PromptRow};
use crate::large_n::{GramAccumulator, GramSummary};
use crate::pca::{pca, SignConvention};
use crate::results::*;
use crate::signature::{embeddings, signatures};
use crate::significance::{bootstrap_d, label_permutation};
use crate::similarity::{category_matrix, gram, per_layer, summarize};
use crate::tsne;
use crate::{sub_rng, tags};
use rand::RngCore;

/// Above this many prompts the automatic choice is the Gram-sums path.
pub const DEFAULT_GRAM_THRESHOLD: usize = 5000;
/// Number of folds of the classifier when no fold file is given.
pub const DEFAULT_FOLDS: usize = 5;
/// Number of PCA components reported (at most N−1).
pub const PCA_COMPONENTS: usize = 10;

/// Which computation path to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathChoice {
    /// `exact_pairs` up to `threshold` prompts, `gram_sums` above.
    Auto {
        threshold: usize,
    },
    ExactPairs,
    GramSums,
}

impl Default for PathChoice {
    fn default() -> Self {
        PathChoice::Auto {
            threshold: DEFAULT_GRAM_THRESHOLD,
        }
    }
}

/// Settings of an analysis.
#[derive(Debug, Clone, PartialEq)]
pub struct AnalyzeOptions {
    /// Repetitions per baseline.
    pub reps: usize,
    /// Label permutations of the similarity test.
    pub perm_reps: usize,
    /// Bootstrap resamples (Cohen's d and classifier accuracy).
    pub boot_reps: usize,
    /// Label permutations of the classifier test.
    pub classifier_perm_reps: usize,
    pub seed: u64,
    /// Fold of every prompt (in input order) and number of folds; `None`: stratified 5-fold.
    pub folds: Option<(Vec<usize>, usize)>,
    /// A fold file (CSV `prompt_id,fold`), read for the kept prompts when `folds` is `None`.
    pub folds_file: Option<std::path::PathBuf>,
    /// For `settings.token_types` only (the counts are already restricted).
    pub token_types: Vec<String>,
    pub weighted: bool,
    pub traces: Vec<String>,
    pub manifest: serde_json::Value,
    pub pca_sign: SignConvention,
    pub path: PathChoice,
    /// Skip the t-SNE embedding (`{"skipped": ...}`).
    pub skip_tsne: bool,
    /// Skip the classifier and its tests.
    pub skip_classifier: bool,
    /// Decoder-layer index of each signature layer (the manifest's `routing.moe_layers` when
    /// some layers are dense), or `None` when signature layer l is decoder layer l. Written as `moe_layers` and used as the
    /// `per_layer[].layer` labels; must have one entry per layer.
    pub layers: Option<Vec<usize>>,
    /// Token ids of the analysed prompts for the confound controls (`lexical_baseline`,
    /// `token_matched`; [`crate::lexical`]); `None`: neither section is written.
    pub tokens: Option<std::sync::Arc<crate::lexical::TokenInput>>,
}

impl Default for AnalyzeOptions {
    fn default() -> Self {
        AnalyzeOptions {
            reps: 1000,
            perm_reps: 1000,
            boot_reps: 1000,
            classifier_perm_reps: 200,
            seed: 0,
            folds: None,
            folds_file: None,
            token_types: vec!["prompt".into(), "generation".into()],
            weighted: false,
            traces: Vec::new(),
            manifest: serde_json::json!({}),
            pca_sign: SignConvention::default(),
            path: PathChoice::default(),
            skip_tsne: false,
            skip_classifier: false,
            layers: None,
            tokens: None,
        }
    }
}

/// Everything the exact path computes: results plus the matrices written as CSV.
#[derive(Debug, Clone)]
pub struct ExactOutputs {
    pub results: AnalysisResults,
    /// N × (L·E) signatures, row-major.
    pub signatures: Vec<f64>,
    /// N × N similarity matrix, row-major.
    pub similarity: Vec<f64>,
    /// Category of every prompt, in `results.prompt_ids` order.
    pub prompt_categories: Vec<String>,
    /// Out-of-fold class probabilities of the classifier, row-major N × `logreg_5fold.labels`
    /// (`None` when the classifier was skipped). Written only to the Parquet per-prompt table.
    pub oof_probabilities: Option<Vec<f64>>,
}

/// Outputs of either path.
#[derive(Debug, Clone)]
pub enum Outputs {
    Exact(Box<ExactOutputs>),
    Gram(Box<AnalysisResults>),
}

impl Outputs {
    pub fn results(&self) -> &AnalysisResults {
        match self {
            Outputs::Exact(e) => &e.results,
            Outputs::Gram(r) => r,
        }
    }
}

/// The parts of `results.json` that both paths compute: the header (version, inputs, settings,
/// dimensions, categories, prompts) and the pair statistics.
struct Common {
    num_layers: usize,
    num_experts: usize,
    top_k: usize,
    categories: Vec<CategoryCount>,
    prompt_ids: Vec<String>,
    dropped_prompts: Vec<DroppedPrompt>,
    path: AnalysisPath,
    similarity: SimilaritySummary,
    category_similarity_matrix: CategoryMatrix,
    per_layer: Vec<LayerStats>,
}

/// The sections that need all prompts in memory (computed on the exact path only).
struct AllPromptSections {
    baselines: Baselines,
    significance: Significance,
    pca: Section<PcaResult>,
    tsne: Section<TsneResult>,
    logreg_5fold: Section<LogRegResult>,
}

/// Assembles `results.json`; the header is built here and only here.
fn assemble(opts: &AnalyzeOptions, c: Common, s: AllPromptSections) -> AnalysisResults {
    let mut per_layer = c.per_layer;
    if let Some(labels) = &opts.layers {
        for p in &mut per_layer {
            if let Some(&d) = labels.get(p.layer) {
                p.layer = d;
            }
        }
    }
    AnalysisResults {
        schema_version: SCHEMA_VERSION,
        tool_version: env!("CARGO_PKG_VERSION").to_string(),
        input: InputInfo {
            traces: opts.traces.clone(),
            manifest: opts.manifest.clone(),
        },
        settings: Settings {
            token_types: opts.token_types.clone(),
            weighted: opts.weighted,
            reps: opts.reps,
            seed: opts.seed,
            perm_reps: opts.perm_reps,
            boot_reps: opts.boot_reps,
            classifier_perm_reps: opts.classifier_perm_reps,
        },
        num_prompts: c.prompt_ids.len(),
        num_layers: c.num_layers,
        moe_layers: opts.layers.clone(),
        num_experts: c.num_experts,
        top_k: c.top_k,
        categories: c.categories,
        prompt_ids: c.prompt_ids,
        dropped_prompts: c.dropped_prompts,
        path: c.path,
        similarity: c.similarity,
        category_similarity_matrix: c.category_similarity_matrix,
        per_layer,
        baselines: s.baselines,
        significance: s.significance,
        pca: s.pca,
        tsne: s.tsne,
        logreg_5fold: s.logreg_5fold,
        lexical_baseline: None,
        token_matched: None,
        windows: None,
        random_router_control: None,
    }
}

/// The whole analysis on the exact path; returns only `results.json`.
pub fn analyze(input: &AnalysisInput, opts: &AnalyzeOptions) -> Result<AnalysisResults> {
    Ok(analyze_exact(input, opts)?.results)
}

/// The whole analysis on the exact (all pairs) path.
pub fn analyze_exact(input: &AnalysisInput, opts: &AnalyzeOptions) -> Result<ExactOutputs> {
    let (n, nl, ne) = (input.n(), input.num_layers, input.num_experts);
    let d = nl * ne;
    let sig = signatures(&input.counts, nl, ne);
    let v = embeddings(&input.counts, nl, ne);
    let sim = gram(&v, n, d);
    let similarity = summarize(&sim, &input.labels);
    let cat_matrix = category_matrix(&sim, &input.labels, &input.categories);
    let layers = per_layer(&v, &input.labels, nl, ne);

    let (seed, reps) = (opts.seed, opts.reps);
    let baseline = |b| {
        if reps == 0 {
            Section::skipped("0 repetitions requested")
        } else {
            Section::Done(run_baseline(b, input, reps, seed))
        }
    };
    let baselines = || Baselines {
        permutation: baseline(Baseline::Permutation),
        load_balance_uniform: baseline(Baseline::LoadBalanceUniform),
        load_balance_marginal: baseline(Baseline::LoadBalanceMarginal),
    };
    let significance = || {
        let label_perm = if opts.perm_reps == 0 {
            Section::skipped("0 repetitions requested")
        } else {
            Section::Done(label_permutation(&sim, &input.labels, opts.perm_reps, seed))
        };
        let d_ci =
            (opts.boot_reps > 0).then(|| bootstrap_d(&sim, &input.labels, opts.boot_reps, seed));
        (label_perm, d_ci)
    };
    let projections = || {
        let pca_res = match pca(&sig, n, d, PCA_COMPONENTS, opts.pca_sign) {
            Ok(p) => Section::Done(p),
            Err(e) => Section::skipped(e.to_string()),
        };
        let tsne_res = if opts.skip_tsne {
            Section::skipped("disabled (--no-tsne)")
        } else {
            let perplexity = tsne::default_perplexity(n);
            match tsne::tsne(&sig, n, d, perplexity) {
                Ok(t) => Section::Done(t),
                Err(e) => Section::skipped(e.to_string()),
            }
        };
        (pca_res, tsne_res)
    };
    // The sections are independent and each is deterministic, so they run concurrently (the
    // serial t-SNE and the classifier's serial parts fill the cores between the baselines'
    // parallel repetitions); the results do not depend on the schedule.
    let (baselines, ((label_perm, d_ci), ((pca_res, tsne_res), clf))) =
        rayon::join(baselines, || {
            rayon::join(significance, || {
                rayon::join(projections, || classifier(input, &sig, opts))
            })
        });
    let (logreg, acc_ci, clf_perm, oof_probabilities) = clf?;
    let bootstrap = match d_ci {
        None => Section::skipped("0 repetitions requested"),
        Some(ci) => Section::Done(Bootstrap {
            reps: opts.boot_reps,
            seed,
            confidence: 0.95,
            cohens_d_ci95: ci,
            accuracy_ci95: acc_ci,
        }),
    };
    let sizes = input.category_sizes();
    let common = Common {
        num_layers: nl,
        num_experts: ne,
        top_k: input.top_k,
        categories: input
            .categories
            .iter()
            .zip(&sizes)
            .map(|(c, &k)| CategoryCount {
                name: c.clone(),
                n: k,
            })
            .collect(),
        prompt_ids: input.prompt_ids.clone(),
        dropped_prompts: input.dropped.clone(),
        path: AnalysisPath::ExactPairs,
        similarity,
        category_similarity_matrix: cat_matrix,
        per_layer: layers,
    };
    let sections = AllPromptSections {
        baselines,
        significance: Significance {
            label_permutation: label_perm,
            bootstrap,
            classifier_permutation: clf_perm,
        },
        pca: pca_res,
        tsne: tsne_res,
        logreg_5fold: logreg,
    };
    let mut results = assemble(opts, common, sections);
    confound_controls(input, opts, &mut results)?;
    Ok(ExactOutputs {
        results,
        signatures: sig,
        similarity: sim,
        prompt_categories: input
            .labels
            .iter()
            .map(|&c| input.categories[c].clone())
            .collect(),
        oof_probabilities,
    })
}

/// The confound-control sections (`lexical_baseline`, `token_matched`) from `opts.tokens`.
fn confound_controls(
    input: &AnalysisInput,
    opts: &AnalyzeOptions,
    results: &mut AnalysisResults,
) -> Result<()> {
    let Some(tokens) = opts.tokens.as_deref() else {
        return Ok(());
    };
    results.lexical_baseline = Some(match &tokens.bags {
        Err(why) => Section::skipped(why.clone()),
        Ok(_) if opts.skip_classifier => Section::skipped("disabled (--no-classifier)"),
        Ok(bags) => {
            let (folds, n_folds) = fold_assignment(input, opts)?;
            crate::lexical::lexical_baseline(input, bags, &folds, n_folds)
        }
    });
    results.token_matched = tokens.matched.as_ref().map(|m| match m {
        Err(why) => Section::skipped(why.clone()),
        Ok(rows) => crate::lexical::token_matched(input, rows, opts.layers.as_deref()),
    });
    Ok(())
}

/// The classifier's folds: `opts.folds`, the fold file, or stratified 5-fold seeded from
/// `opts.seed`.
fn fold_assignment(input: &AnalysisInput, opts: &AnalyzeOptions) -> Result<(Vec<usize>, usize)> {
    let n = input.n();
    let from_file = match (&opts.folds, &opts.folds_file) {
        (None, Some(path)) => Some(
            cv::read_folds_csv(path, &input.prompt_ids)
                .map_err(|e| StatsError::InvalidInput(e.to_string()))?,
        ),
        _ => None,
    };
    Ok(match from_file.as_ref().or(opts.folds.as_ref()) {
        Some((f, k)) => {
            if f.len() != n {
                return Err(StatsError::Dimension(format!(
                    "fold assignment has {} entries for {n} prompts",
                    f.len()
                )));
            }
            (f.clone(), *k)
        }
        None => {
            let fold_seed = sub_rng(opts.seed, tags::FOLDS, 0).next_u64();
            (
                cv::stratified_kfold(&input.labels, DEFAULT_FOLDS, fold_seed),
                DEFAULT_FOLDS,
            )
        }
    })
}

type ClassifierSections = (
    Section<LogRegResult>,
    Option<[f64; 2]>,
    Section<ClassifierPermutation>,
    Option<Vec<f64>>,
);

/// Cross-validated logistic regression, its accuracy bootstrap and its permutation test
/// (implemented in [`crate::cv`]).
fn classifier(
    input: &AnalysisInput,
    sig: &[f64],
    opts: &AnalyzeOptions,
) -> Result<ClassifierSections> {
    if opts.skip_classifier {
        let why = "disabled (--no-classifier)";
        return Ok((Section::skipped(why), None, Section::skipped(why), None));
    }
    let (n, d) = (input.n(), input.dim());
    let (folds, n_folds) = fold_assignment(input, opts)?;
    let perm_seed = sub_rng(opts.seed, tags::CLASSIFIER_PERMUTATION, 0).next_u64();
    // The permutation test reuses the CV's prepared folds and observed fits.
    let (cvres, perm) = cv::logreg_cv_with_permutation(
        sig,
        n,
        d,
        &input.labels,
        &input.categories,
        &folds,
        n_folds,
        opts.classifier_perm_reps,
        perm_seed,
    )
    .map_err(|e| StatsError::Other(e.to_string()))?;
    let res = match cvres {
        cv::CvOutcome::Done(r) => r,
        cv::CvOutcome::Skipped { reason } => {
            return Ok((
                Section::skipped(reason.clone()),
                None,
                Section::skipped(reason),
                None,
            ));
        }
    };
    let boot_seed = sub_rng(opts.seed, tags::ACCURACY_BOOTSTRAP, 0).next_u64();
    let acc_ci =
        cv::accuracy_bootstrap_ci(&res.correct, opts.boot_reps, boot_seed).map(|b| [b.lo, b.hi]);
    let oof_proba = res.oof_proba;
    let oof_predictions = res
        .oof_predictions
        .iter()
        .map(|&p| input.categories[p].clone())
        .collect();
    let logreg = Section::Done(LogRegResult {
        accuracy_mean: res.accuracy_mean,
        accuracy_std: res.accuracy_std,
        chance: res.chance,
        confusion: res.confusion,
        fold_accuracies: res.fold_accuracies,
        labels: res.labels,
        macro_f1_oof: res.macro_f1_oof,
        n_folds,
        oof_predictions,
    });
    let perm = match perm {
        cv::CvOutcome::Done(p) => Section::Done(ClassifierPermutation {
            null_mean: p.null_mean,
            observed_accuracy: p.observed,
            p: p.p_value,
            reps: p.reps,
            seed: opts.seed,
        }),
        cv::CvOutcome::Skipped { reason } => Section::skipped(reason),
    };
    Ok((logreg, acc_ci, perm, Some(oof_proba)))
}

/// `results.json` of the Gram-sums path.
pub fn analyze_gram(
    g: GramSummary,
    num_layers: usize,
    num_experts: usize,
    top_k: Option<usize>,
    opts: &AnalyzeOptions,
) -> AnalysisResults {
    let reason = "not computed on the gram_sums path (large N); use --exact-pairs for all sections";
    let common = Common {
        num_layers,
        num_experts,
        top_k: top_k.unwrap_or(0),
        categories: g
            .categories
            .into_iter()
            .map(|(name, n)| CategoryCount { name, n })
            .collect(),
        prompt_ids: g.prompt_ids,
        dropped_prompts: g.dropped,
        path: AnalysisPath::GramSums,
        similarity: g.similarity,
        category_similarity_matrix: g.category_matrix,
        per_layer: g.per_layer,
    };
    let sections = AllPromptSections {
        baselines: Baselines {
            permutation: Section::skipped(reason),
            load_balance_uniform: Section::skipped(reason),
            load_balance_marginal: Section::skipped(reason),
        },
        significance: Significance {
            label_permutation: Section::skipped(reason),
            bootstrap: Section::skipped(reason),
            classifier_permutation: Section::skipped(reason),
        },
        pca: Section::skipped(reason),
        tsne: Section::skipped(reason),
        logreg_5fold: Section::skipped(reason),
    };
    let mut r = assemble(opts, common, sections);
    r.lexical_baseline = Some(Section::skipped(reason));
    r.token_matched = opts
        .tokens
        .as_ref()
        .and_then(|t| t.matched.as_ref())
        .map(|_| Section::skipped(reason));
    r
}

/// Streams prompts and chooses the path: rows are buffered until the threshold is exceeded, then
/// moved into a [`GramAccumulator`] (a single pass over the input either way).
pub struct Collector {
    num_layers: usize,
    num_experts: usize,
    choice: PathChoice,
    rows: Vec<PromptRow>,
    gram: Option<GramAccumulator>,
}

impl Collector {
    pub fn new(num_layers: usize, num_experts: usize, choice: PathChoice) -> Self {
        let gram = matches!(choice, PathChoice::GramSums)
            .then(|| GramAccumulator::new(num_layers, num_experts));
        Collector {
            num_layers,
            num_experts,
            choice,
            rows: Vec::new(),
            gram,
        }
    }

    pub fn push(&mut self, row: PromptRow) -> Result<()> {
        if let Some(g) = &mut self.gram {
            return g.push(row);
        }
        self.rows.push(row);
        if let PathChoice::Auto { threshold } = self.choice {
            if self.rows.len() > threshold {
                let mut g = GramAccumulator::new(self.num_layers, self.num_experts);
                for r in self.rows.drain(..) {
                    g.push(r)?;
                }
                self.gram = Some(g);
            }
        }
        Ok(())
    }

    /// Finish with the chosen path. `top_k` is required on the exact path.
    pub fn finish(self, top_k: Option<usize>, opts: &AnalyzeOptions) -> Result<Outputs> {
        if let Some(g) = self.gram {
            let summary = g.finish()?;
            return Ok(Outputs::Gram(Box::new(analyze_gram(
                summary,
                self.num_layers,
                self.num_experts,
                top_k,
                opts,
            ))));
        }
        let top_k = match top_k {
            Some(k) => k,
            None => infer_top_k(&self.rows, self.num_layers, self.num_experts, opts.weighted)?,
        };
        let input = build_input(
            self.num_layers,
            self.num_experts,
            top_k,
            opts.weighted,
            self.rows,
        )?;
        Ok(Outputs::Exact(Box::new(analyze_exact(&input, opts)?)))
    }

    /// Prompt ids of the rows buffered so far (exact path), e.g. to read a fold file.
    pub fn buffered(&self) -> &[PromptRow] {
        &self.rows
    }
}

/// k from unweighted counts: `Σ_e A[l,e] / tokens[l]` must be the same integer everywhere.
fn infer_top_k(rows: &[PromptRow], nl: usize, ne: usize, weighted: bool) -> Result<usize> {
    let err = || {
        StatsError::InvalidInput(
            "top_k is unknown: give it in manifest.json beside the traces, --model DIR or --top-k"
                .into(),
        )
    };
    if weighted {
        return Err(err());
    }
    let mut k = None;
    for r in rows {
        for l in 0..nl {
            let t = r.tokens_per_layer.get(l).copied().unwrap_or(0);
            if t == 0 {
                continue;
            }
            let s: f64 = r.counts[l * ne..(l + 1) * ne].iter().sum();
            let q = s / t as f64;
            if (q - q.round()).abs() > 1e-9 || q < 1.0 {
                return Err(err());
            }
            match k {
                None => k = Some(q.round() as usize),
                Some(k0) if k0 != q.round() as usize => return Err(err()),
                _ => {}
            }
        }
    }
    k.ok_or_else(err)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::similarity::mean_std;

    /// Three prompts, L = 2 layers, E = 2 experts, categories a, a, b:
    /// p0: layer0 (1,0), layer1 (1,1); p1: (1,1), (1,0); p2: (0,1), (1,1).
    /// By hand: sim(0,1) = ½(cos((1,0),(1,1)) + cos((1,1),(1,0))) = ½(1/√2 + 1/√2) = 1/√2;
    /// sim(0,2) = ½(0 + 1) = 0.5; sim(1,2) = ½(1/√2 + 1/√2) = 1/√2.
    /// within: n = 1, mean 1/√2; across: n = 2, mean (0.5 + 1/√2)/2 = 0.603553,
    /// std (ddof 1) = (1/√2 − 0.5)/√2 = 0.146447. Category matrix (a,a) = 1/√2, (a,b) = 0.603553.
    /// Layer 0 cosines: (0,1) 1/√2, (0,2) 0, (1,2) 1/√2 -> within 1/√2, across 1/(2√2);
    /// layer 1: (0,1) 1/√2, (0,2) 1, (1,2) 1/√2 -> within 1/√2, across (1 + 1/√2)/2.
    #[test]
    fn three_prompt_hand_example() {
        let counts = [1., 0., 1., 1., 1., 1., 1., 0., 0., 1., 1., 1.];
        let labels = [0, 0, 1];
        let sig = signatures(&counts, 2, 2);
        assert_eq!(&sig[..4], &[1.0, 0.0, 0.5, 0.5]);
        let v = embeddings(&counts, 2, 2);
        let sim = gram(&v, 3, 4);
        let r = std::f64::consts::FRAC_1_SQRT_2;
        let tol = 1e-15;
        assert!((sim[1] - r).abs() < tol && (sim[2] - 0.5).abs() < tol && (sim[5] - r).abs() < tol);
        assert!((sim[0] - 1.0).abs() < tol);
        let s = summarize(&sim, &labels);
        assert_eq!((s.within.n, s.across.n), (1, 2));
        assert!((s.within.mean - r).abs() < tol);
        assert!((s.across.mean - 0.603_553_390_593_273_8).abs() < 1e-15);
        assert!((s.across.std - 0.146_446_609_406_726_24).abs() < 1e-15);
        let cm = category_matrix(&sim, &labels, &["a".into(), "b".into()]);
        assert!((cm.values[0][0] - r).abs() < tol);
        assert!((cm.values[0][1] - 0.603_553_390_593_273_8).abs() < tol);
        assert_eq!(cm.values[0][1], cm.values[1][0]);
        assert!(cm.values[1][1].is_nan()); // no pair inside b
        let pl = per_layer(&v, &labels, 2, 2);
        assert!((pl[0].within_mean - r).abs() < tol && (pl[0].across_mean - r / 2.0).abs() < tol);
        assert!((pl[1].within_mean - r).abs() < tol);
        assert!((pl[1].across_mean - (1.0 + r) / 2.0).abs() < tol);
        let m = mean_std([0.5, r].into_iter());
        assert_eq!(m.n, 2);
    }

    fn small_input() -> AnalysisInput {
        let rows = crate::bench::synthetic_rows(&crate::bench::SynthShape {
            prompts: 16,
            categories: 2,
            layers: 3,
            experts: 8,
            top_k: 2,
            tokens: 12,
            seed: 3,
        });
        build_input(3, 8, 2, false, rows).unwrap()
    }

    #[test]
    fn results_are_identical_for_one_and_two_threads() {
        let input = small_input();
        let opts = AnalyzeOptions {
            reps: 40,
            perm_reps: 40,
            boot_reps: 40,
            classifier_perm_reps: 5,
            folds: Some(((0..16).map(|i| (i / 2) % 2).collect(), 2)),
            ..AnalyzeOptions::default()
        };
        let run = |threads| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            pool.install(|| serde_json::to_string(&analyze(&input, &opts).unwrap()).unwrap())
        };
        let one = run(1);
        assert_eq!(one, run(2));
        let v: serde_json::Value = serde_json::from_str(&one).unwrap();
        assert_eq!(v["path"], "exact_pairs");
        assert!(v["baselines"]["permutation"]["mean"].as_f64().unwrap() > 0.0);
        assert!(
            v["logreg_5fold"]["fold_accuracies"].as_array().is_some(),
            "{}",
            v["logreg_5fold"]
        );
    }

    #[test]
    fn collector_paths_agree_and_auto_switches() {
        let rows = crate::bench::synthetic_rows(&crate::bench::SynthShape {
            prompts: 30,
            categories: 3,
            layers: 2,
            experts: 8,
            top_k: 2,
            tokens: 10,
            seed: 1,
        });
        let opts = AnalyzeOptions {
            reps: 0,
            perm_reps: 0,
            boot_reps: 0,
            skip_tsne: true,
            skip_classifier: true,
            ..AnalyzeOptions::default()
        };
        let mut exact = Collector::new(2, 8, PathChoice::ExactPairs);
        let mut auto = Collector::new(2, 8, PathChoice::Auto { threshold: 10 });
        for r in rows {
            exact.push(r.clone()).unwrap();
            auto.push(r).unwrap();
        }
        let e = exact.finish(None, &opts).unwrap();
        let a = auto.finish(None, &opts).unwrap();
        let (e, a) = (e.results(), a.results());
        assert_eq!(e.path, AnalysisPath::ExactPairs);
        assert_eq!(a.path, AnalysisPath::GramSums);
        assert_eq!(e.top_k, 2); // inferred from counts / tokens
        assert!((e.similarity.cohens_d - a.similarity.cohens_d).abs() < 1e-9);
        assert!(a.pca.done().is_none());
    }
}
