//! Cross-model comparison (`moe-xray compare-models`; definitions in `docs/statistics.md`,
//! "Cross-model comparison"): two analysis directories (each with `results.json` and
//! `signatures.csv`, as `analyze` and `run` write them) of the same prompt set, possibly from
//! models of other families with other numbers of layers and experts. The statistics are in
//! `moe_xray_stats::crossmodel`; here the directories are read and checked, and for the same
//! architecture the drift measures of `moe-xray compare` are computed from the traces with B's
//! experts as numbered and relabelled by the matching.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};

use moe_xray_health::compare::{compare_runs, CompareOptions, CompareReport};
use moe_xray_health::HealthOptions;
use moe_xray_stats::crossmodel::{
    compare_signatures, relabel_counts, CategoryComparison, CategoryRow, CrossModelOptions,
    CrossModelReport, Drift, ExpertMatching, MatchedDrift, ModelInfo, MultiModelReport, Pair,
    PairComparison, Side, SignatureComparison, MAX_MODELS, SCHEMA_VERSION,
};
use moe_xray_stats::results::{AnalysisResults, Section};
use moe_xray_trace::TokenType;

use crate::error::{invalid, IoContext, Result};
use crate::health::{read_run, Dims};
use crate::Progress;

/// Largest `signatures.csv` read (bytes).
pub const MAX_SIGNATURES_BYTES: u64 = 1 << 32;
/// Largest `results.json` read (bytes).
pub const MAX_RESULTS_BYTES: u64 = 1 << 30;

/// One analysis directory, read and checked.
#[derive(Debug, Clone)]
pub struct Analysis {
    /// The directory.
    pub dir: PathBuf,
    /// Its `results.json`.
    pub results: AnalysisResults,
    /// Decoder-layer index of each signature layer.
    pub layers: Vec<usize>,
    /// Category of each prompt of `results.prompt_ids` (from `signatures.csv`).
    pub categories: Vec<String>,
    /// N × (L·E) signatures in `results.prompt_ids` order.
    pub signatures: Vec<f64>,
}

fn read_limited(path: &Path, max: u64) -> Result<String> {
    let meta = std::fs::metadata(path).io_context(|| format!("reading {}", path.display()))?;
    if meta.len() > max {
        invalid!(
            "{}: {} bytes exceed the limit of {max} bytes",
            path.display(),
            meta.len()
        );
    }
    std::fs::read_to_string(path).io_context(|| format!("reading {}", path.display()))
}

/// Splits CSV text (RFC 4180: fields in double quotes may hold commas, quotes doubled, line
/// breaks) into records of fields. `None` on an unterminated quote.
fn csv_records(text: &str) -> Option<Vec<Vec<String>>> {
    let mut records = Vec::new();
    let mut record = Vec::new();
    let mut field = String::new();
    let mut chars = text.chars().peekable();
    let mut any = false;
    while let Some(c) = chars.next() {
        any = true;
        match c {
            '"' if field.is_empty() => loop {
                match chars.next()? {
                    '"' if chars.peek() == Some(&'"') => {
                        chars.next();
                        field.push('"');
                    }
                    '"' => break,
                    x => field.push(x),
                }
            },
            ',' => record.push(std::mem::take(&mut field)),
            '\r' if chars.peek() == Some(&'\n') => {}
            '\n' => {
                record.push(std::mem::take(&mut field));
                records.push(std::mem::take(&mut record));
                any = false;
            }
            x => field.push(x),
        }
    }
    if any {
        record.push(field);
        records.push(record);
    }
    Some(records)
}

/// Reads `dir/results.json` and `dir/signatures.csv` and checks that they belong together (the
/// same prompts in the same order, the columns `l{layer}_e{e}` of the results' layers and
/// experts, finite non-negative values).
pub fn read_analysis(dir: &Path) -> Result<Analysis> {
    let rp = dir.join("results.json");
    if !rp.is_file() {
        invalid!(
            "{}: no results.json (give a directory written by `moe-xray analyze` or `moe-xray run`)",
            dir.display()
        );
    }
    let results = AnalysisResults::from_json_str(&read_limited(&rp, MAX_RESULTS_BYTES)?)
        .map_err(|e| crate::PipelineError::Invalid(format!("{}: {e}", rp.display())))?;
    let (nl, ne) = (results.num_layers, results.num_experts);
    let d = moe_xray_trace::limits::check_dims(nl, ne, None)
        .map_err(|m| crate::PipelineError::Invalid(format!("{}: {m}", rp.display())))?;
    let layers: Vec<usize> = match &results.moe_layers {
        Some(m) if m.len() == nl => m.clone(),
        Some(m) => invalid!(
            "{}: moe_layers has {} entries for num_layers = {nl}",
            rp.display(),
            m.len()
        ),
        None => (0..nl).collect(),
    };
    let sp = dir.join("signatures.csv");
    if !sp.is_file() {
        invalid!(
            "{}: no signatures.csv (the gram_sums path of analyze does not write it; re-run analyze with --exact-pairs)",
            dir.display()
        );
    }
    let text = read_limited(&sp, MAX_SIGNATURES_BYTES)?;
    let records = csv_records(&text).ok_or_else(|| {
        crate::PipelineError::Invalid(format!("{}: unterminated quoted field", sp.display()))
    })?;
    let Some((header, rows)) = records.split_first() else {
        invalid!("{}: empty file", sp.display());
    };
    let mut expected = vec!["prompt_id".to_string(), "category".to_string()];
    for &l in &layers {
        for e in 0..ne {
            expected.push(format!("l{l}_e{e}"));
        }
    }
    if *header != expected {
        let at = header
            .iter()
            .zip(&expected)
            .position(|(a, b)| a != b)
            .unwrap_or(header.len().min(expected.len()));
        invalid!(
            "{}: header does not match results.json ({nl} layers × {ne} experts): column {} is {:?}, expected {:?}",
            sp.display(),
            at + 1,
            header.get(at).map(String::as_str).unwrap_or("(missing)"),
            expected.get(at).map(String::as_str).unwrap_or("(none)")
        );
    }
    if rows.len() != results.prompt_ids.len() {
        invalid!(
            "{}: {} rows, results.json lists {} prompts",
            sp.display(),
            rows.len(),
            results.prompt_ids.len()
        );
    }
    let mut signatures = Vec::with_capacity(rows.len().saturating_mul(d).min(1 << 28));
    let mut categories = Vec::with_capacity(rows.len());
    for (i, row) in rows.iter().enumerate() {
        if row.len() != d + 2 {
            invalid!(
                "{}: row {} has {} fields, expected {}",
                sp.display(),
                i + 2,
                row.len(),
                d + 2
            );
        }
        if row[0] != results.prompt_ids[i] {
            invalid!(
                "{}: row {} is prompt {:?}, results.json has {:?} there",
                sp.display(),
                i + 2,
                row[0],
                results.prompt_ids[i]
            );
        }
        categories.push(row[1].clone());
        for (j, f) in row[2..].iter().enumerate() {
            match f.parse::<f64>() {
                Ok(x) if x.is_finite() && x >= 0.0 => signatures.push(x),
                _ => invalid!(
                    "{}: row {}, column {}: {f:?} is not a finite non-negative number",
                    sp.display(),
                    i + 2,
                    expected[j + 2]
                ),
            }
        }
    }
    Ok(Analysis {
        dir: dir.to_path_buf(),
        results,
        layers,
        categories,
        signatures,
    })
}

/// Options of [`compare_models`].
#[derive(Debug, Clone, Default)]
pub struct CompareModelsOptions {
    /// Analysis directory of model A.
    pub a: PathBuf,
    /// Analysis directory of model B.
    pub b: PathBuf,
    /// Traces of A for the matched drift (a trace file or directory; default `A/traces` when it
    /// exists).
    pub traces_a: Option<PathBuf>,
    /// Traces of B (default `B/traces`).
    pub traces_b: Option<PathBuf>,
    /// Mantel permutations and seed (also the repetitions and seed of the drift's JS test).
    pub stats: CrossModelOptions,
}

/// The report and what the figures need besides it.
#[derive(Debug, Clone)]
pub struct CompareModelsOutput {
    /// The JSON report.
    pub report: CrossModelReport,
    /// Upper-triangle entries (pairs i<j of the shared prompts) of A's and B's similarity.
    pub sim_a: Vec<f64>,
    /// The same for B.
    pub sim_b: Vec<f64>,
    /// Whether pair k is within one category.
    pub within: Vec<bool>,
}

fn model_info(a: &Analysis) -> ModelInfo {
    let m = &a.results.input.manifest;
    let s = |v: Option<&serde_json::Value>| v.and_then(|x| x.as_str()).map(str::to_string);
    ModelInfo {
        label: a.dir.display().to_string(),
        model: s(m.get("model")),
        family: s(m.get("routing").and_then(|r| r.get("family"))),
        num_layers: a.results.num_layers,
        num_experts: a.results.num_experts,
        top_k: a.results.top_k,
        layers: a.layers.clone(),
        num_prompts: a.results.prompt_ids.len(),
    }
}

fn drift_of(r: &CompareReport) -> Drift {
    Drift {
        js_bits: r.per_layer.iter().map(|l| l.js_bits).collect(),
        mean_js_bits: r.mean_js_bits,
        max_js_bits: r.max_js_bits,
        mean_shift: r.mean_shift,
        permutation_p: r.permutation.as_ref().map(|p| p.p_value),
    }
}

fn token_types(r: &AnalysisResults, what: &Path) -> Result<Vec<TokenType>> {
    let mut out = Vec::new();
    for t in &r.settings.token_types {
        out.push(match t.as_str() {
            "prompt" => TokenType::Prompt,
            "generation" => TokenType::Generation,
            other => invalid!(
                "{}: settings.token_types has unknown token type {other:?}",
                what.display()
            ),
        });
    }
    Ok(out)
}

/// The drift measures of `compare` with B's experts as numbered and relabelled by `m`.
#[allow(clippy::too_many_arguments)]
fn matched_drift(
    a: &Analysis,
    b: &Analysis,
    ta: &Path,
    tb: &Path,
    m: &ExpertMatching,
    reps: usize,
    seed: u64,
    progress: &dyn Progress,
) -> Result<MatchedDrift> {
    let opts = |x: &Analysis| -> Result<HealthOptions> {
        Ok(HealthOptions {
            token_types: token_types(&x.results, &x.dir)?,
            ..HealthOptions::default()
        })
    };
    let dims = |x: &Analysis| Dims {
        model: None,
        num_layers: None,
        num_experts: Some(x.results.num_experts),
    };
    let ra = read_run(ta, &dims(a), &opts(a)?, progress)?;
    let rb = read_run(tb, &dims(b), &opts(b)?, progress)?;
    for (r, x) in [(&ra, a), (&rb, b)] {
        if r.layers != x.layers || r.num_experts != x.results.num_experts {
            invalid!(
                "{}: the traces route at decoder layers {:?} with {} experts, the analysis in {} at {:?} with {}",
                r.label,
                r.layers,
                r.num_experts,
                x.dir.display(),
                x.layers,
                x.results.num_experts
            );
        }
    }
    let co = CompareOptions {
        reps,
        seed,
        fail_above: None,
    };
    progress.step("compare-models: drift (as numbered and matched)");
    let unmatched = compare_runs(&ra, &rb, &co)?;
    let mut rm = rb.clone();
    for p in &mut rm.prompts {
        p.counts = relabel_counts(&p.counts, m, rb.num_experts);
    }
    let matched = compare_runs(&ra, &rm, &co)?;
    Ok(MatchedDrift {
        unmatched: drift_of(&unmatched),
        matched: drift_of(&matched),
    })
}

/// Compares two analyses of the same prompt set (see the module docs).
pub fn compare_models(
    opts: &CompareModelsOptions,
    progress: &dyn Progress,
) -> Result<CompareModelsOutput> {
    progress.step("compare-models: reading the analyses");
    let a = read_analysis(&opts.a)?;
    let b = read_analysis(&opts.b)?;
    compare_pair(
        &a,
        &b,
        None,
        opts.traces_a.as_deref(),
        opts.traces_b.as_deref(),
        &opts.stats,
        progress,
    )
}

/// Options of [`compare_many`].
#[derive(Debug, Clone, Default)]
pub struct CompareManyOptions {
    /// Analysis directories of the runs (at least 2, at most
    /// [`moe_xray_stats::crossmodel::MAX_MODELS`]).
    pub runs: Vec<PathBuf>,
    /// Traces of each run for the matched drift (empty, or one entry per run; `None`: the run's
    /// `traces/` when it exists).
    pub traces: Vec<Option<PathBuf>>,
    /// Mantel permutations and seed (the same for every pair).
    pub stats: CrossModelOptions,
}

/// The N-run comparison and, per pair, what its figures need.
#[derive(Debug, Clone)]
pub struct CompareManyOutput {
    /// The JSON report.
    pub report: MultiModelReport,
    /// Per pair, in `report.pairs` order: the similarities and within flags of its RSA scatter.
    pub pairs: Vec<CompareModelsOutput>,
}

/// Compares N ≥ 2 analyses of one prompt set: every pair i<j as [`compare_models`] compares two
/// runs, on the prompts that every run shares (in the first run's order), with the same seed;
/// the N × N RSA / Mantel p / CKA matrices and the task separation of each run side by side.
pub fn compare_many(
    opts: &CompareManyOptions,
    progress: &dyn Progress,
) -> Result<CompareManyOutput> {
    let n = opts.runs.len();
    if !(2..=MAX_MODELS).contains(&n) {
        invalid!("{n} analysis directories: compare-models takes 2 to {MAX_MODELS}");
    }
    if !opts.traces.is_empty() && opts.traces.len() != n {
        invalid!(
            "{} trace paths for {n} runs: give one per run, in the order of the runs",
            opts.traces.len()
        );
    }
    progress.step("compare-models: reading the analyses");
    let runs = opts
        .runs
        .iter()
        .map(|d| read_analysis(d))
        .collect::<Result<Vec<_>>>()?;
    let mut common: HashSet<String> = runs[0].results.prompt_ids.iter().cloned().collect();
    for r in &runs[1..] {
        let ids: HashSet<&str> = r.results.prompt_ids.iter().map(String::as_str).collect();
        common.retain(|id| ids.contains(id.as_str()));
    }
    let not_shared: Vec<Vec<String>> = runs
        .iter()
        .map(|r| {
            r.results
                .prompt_ids
                .iter()
                .filter(|id| !common.contains(id.as_str()))
                .cloned()
                .collect()
        })
        .collect();
    let trace = |i: usize| opts.traces.get(i).and_then(|t| t.as_deref());
    let mut outputs = Vec::with_capacity(n * (n - 1) / 2);
    let mut pairs = Vec::with_capacity(n * (n - 1) / 2);
    for i in 0..n {
        for j in i + 1..n {
            progress.step(&format!("compare-models: runs {} and {}", i + 1, j + 1));
            let out = compare_pair(
                &runs[i],
                &runs[j],
                Some(&common),
                trace(i),
                trace(j),
                &opts.stats,
                progress,
            )?;
            pairs.push(PairComparison {
                a: i,
                b: j,
                comparison: out.report.clone(),
            });
            outputs.push(out);
        }
    }
    let report = MultiModelReport::from_pairs(env!("CARGO_PKG_VERSION"), n, not_shared, pairs)
        .map_err(|e| crate::PipelineError::Invalid(format!("compare-models: {e}")))?;
    Ok(CompareManyOutput {
        report,
        pairs: outputs,
    })
}

/// The comparison of two read analyses. With `keep`, only the prompt ids in it count as shared
/// (the N-run comparison restricts every pair to the prompts of all runs); the others are listed
/// in `only_in_a` / `only_in_b`.
fn compare_pair(
    a: &Analysis,
    b: &Analysis,
    keep: Option<&HashSet<String>>,
    traces_a: Option<&Path>,
    traces_b: Option<&Path>,
    stats: &CrossModelOptions,
    progress: &dyn Progress,
) -> Result<CompareModelsOutput> {
    let b_index: HashMap<&str, usize> = b
        .results
        .prompt_ids
        .iter()
        .enumerate()
        .map(|(i, p)| (p.as_str(), i))
        .collect();
    let kept = |id: &str| keep.is_none_or(|k| k.contains(id));
    let mut shared = Vec::new(); // (index in A, index in B)
    let mut shared_ids: HashSet<&str> = HashSet::new();
    let mut only_in_a = Vec::new();
    for (i, id) in a.results.prompt_ids.iter().enumerate() {
        match b_index.get(id.as_str()).filter(|_| kept(id)) {
            Some(&j) => {
                shared_ids.insert(id.as_str());
                if a.categories[i] != b.categories[j] {
                    invalid!(
                        "prompt {id:?} has category {:?} in {} and {:?} in {} (compare-models needs runs of the same prompt set)",
                        a.categories[i],
                        a.dir.display(),
                        b.categories[j],
                        b.dir.display()
                    );
                }
                shared.push((i, j));
            }
            None => only_in_a.push(id.clone()),
        }
    }
    let only_in_b: Vec<String> = b
        .results
        .prompt_ids
        .iter()
        .filter(|id| !shared_ids.contains(id.as_str()))
        .cloned()
        .collect();
    let n = shared.len();
    let pick = |x: &Analysis, idx: &dyn Fn(&(usize, usize)) -> usize| -> Vec<f64> {
        let d = x.results.num_layers * x.results.num_experts;
        let mut out = Vec::with_capacity(n * d);
        for s in &shared {
            let i = idx(s);
            out.extend_from_slice(&x.signatures[i * d..(i + 1) * d]);
        }
        out
    };
    let sa = pick(a, &|s| s.0);
    let sb = pick(b, &|s| s.1);
    let cat_names: Vec<String> = {
        let mut v: Vec<String> = shared.iter().map(|s| a.categories[s.0].clone()).collect();
        v.sort();
        v.dedup();
        v
    };
    let cat_index: BTreeMap<&str, usize> = cat_names
        .iter()
        .enumerate()
        .map(|(i, c)| (c.as_str(), i))
        .collect();
    let labels: Vec<usize> = shared
        .iter()
        .map(|s| cat_index[a.categories[s.0].as_str()])
        .collect();
    let side = |x: &'_ Analysis, s: &'_ [f64]| -> (usize, usize, Vec<usize>, Vec<f64>) {
        (
            x.results.num_layers,
            x.results.num_experts,
            x.layers.clone(),
            s.to_vec(),
        )
    };
    let (la, ea, lya, sa) = side(a, &sa);
    let (lb, eb, lyb, sb) = side(b, &sb);
    progress.step("compare-models: RSA, CKA, matching");
    let cmp: SignatureComparison = compare_signatures(
        &Side {
            num_layers: la,
            num_experts: ea,
            layers: &lya,
            signatures: &sa,
        },
        &Side {
            num_layers: lb,
            num_experts: eb,
            layers: &lyb,
            signatures: &sb,
        },
        n,
        &labels,
        &cat_names,
        stats,
    )
    .map_err(|e| {
        crate::PipelineError::Invalid(format!(
            "comparing {} with {}: {e}",
            a.dir.display(),
            b.dir.display()
        ))
    })?;

    // Classifier numbers from each results.json.
    let recall = |x: &Analysis, cat: &str| -> Option<f64> {
        let lr = x.results.logreg_5fold.done()?;
        let k = lr.labels.iter().position(|l| l == cat)?;
        let row = lr.confusion.get(k)?;
        let total: u64 = row.iter().sum();
        (total > 0).then(|| row.get(k).copied().unwrap_or(0) as f64 / total as f64)
    };
    let lr = |x: &Analysis, f: &dyn Fn(&moe_xray_stats::results::LogRegResult) -> f64| {
        x.results
            .logreg_5fold
            .done()
            .map(f)
            .filter(|v| v.is_finite())
    };
    let fin = |x: f64| x.is_finite().then_some(x);
    let categories = CategoryComparison {
        cohens_d: Pair {
            a: fin(a.results.similarity.cohens_d),
            b: fin(b.results.similarity.cohens_d),
        },
        cohens_d_shared: cmp.cohens_d_shared,
        accuracy: Pair {
            a: lr(a, &|r| r.accuracy_mean),
            b: lr(b, &|r| r.accuracy_mean),
        },
        chance: Pair {
            a: lr(a, &|r| r.chance),
            b: lr(b, &|r| r.chance),
        },
        macro_f1: Pair {
            a: lr(a, &|r| r.macro_f1_oof),
            b: lr(b, &|r| r.macro_f1_oof),
        },
        per_category: cmp
            .per_category
            .iter()
            .map(|(c, k, da, db)| CategoryRow {
                category: c.clone(),
                n: *k,
                d_a: *da,
                d_b: *db,
                recall_a: recall(a, c),
                recall_b: recall(b, c),
            })
            .collect(),
    };

    let default_traces = |x: &Analysis| {
        let t = x.dir.join("traces");
        t.is_dir().then_some(t)
    };
    let matched_drift = match &cmp.expert_matching {
        Section::Done(m) => {
            match (
                traces_a
                    .map(Path::to_path_buf)
                    .or_else(|| default_traces(a)),
                traces_b
                    .map(Path::to_path_buf)
                    .or_else(|| default_traces(b)),
            ) {
                (Some(ta), Some(tb)) => Section::Done(matched_drift(
                    a, b, &ta, &tb, m, stats.reps, stats.seed, progress,
                )?),
                _ => Section::skipped(
                    "no traces (give --traces-a and --traces-b, or directories with traces/)",
                ),
            }
        }
        Section::Skipped { skipped } => Section::skipped(skipped.clone()),
    };
    let within = {
        let mut w = Vec::with_capacity(cmp.sim_a_upper.len());
        for i in 0..n {
            for j in i + 1..n {
                w.push(labels[i] == labels[j]);
            }
        }
        w
    };
    let report = CrossModelReport {
        schema_version: SCHEMA_VERSION,
        tool_version: env!("CARGO_PKG_VERSION").to_string(),
        model_a: model_info(a),
        model_b: model_info(b),
        shared_prompts: n,
        only_in_a,
        only_in_b,
        same_architecture: cmp.expert_matching.done().is_some(),
        rsa: cmp.rsa,
        cka: cmp.cka,
        per_layer: cmp.per_layer,
        categories,
        expert_matching: cmp.expert_matching,
        matched_drift,
    };
    Ok(CompareModelsOutput {
        report,
        sim_a: cmp.sim_a_upper,
        sim_b: cmp.sim_b_upper,
        within,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_records_handle_quotes_and_line_breaks() {
        let r = csv_records("a,b\n\"x,\"\"y\"\"\nz\",2\r\n").unwrap();
        assert_eq!(r, vec![vec!["a", "b"], vec!["x,\"y\"\nz", "2"]]);
        assert!(csv_records("\"open").is_none());
    }
}
