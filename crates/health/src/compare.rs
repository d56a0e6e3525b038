//! Comparison of two runs: per-layer Jensen–Shannon divergence of expert load, per-prompt
//! signature shift, category-level shifts, and a label-permutation test of the mean per-layer JS.

use std::collections::{BTreeMap, HashMap};

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use crate::health::PromptLoad;
use crate::metrics::{js_divergence_bits, signature_similarity};
use crate::{HealthError, Result};

/// Largest number of permutations accepted (`compare --reps`, `health --mi --perms`); more would
/// run for days, and the null values are held in memory.
pub const MAX_PERMUTATIONS: usize = 10_000_000;

/// One run as needed by the comparison: its dimensions and per-prompt counts.
#[derive(Debug, Clone)]
pub struct RunData {
    pub label: String,
    /// Number of MoE layers (rows of each prompt's counts).
    pub num_layers: usize,
    /// Decoder-layer index of each row (`0..num_layers` when every decoder layer is MoE).
    pub layers: Vec<usize>,
    pub num_experts: usize,
    pub prompts: Vec<PromptLoad>,
}

/// Options of [`compare_runs`].
#[derive(Debug, Clone)]
pub struct CompareOptions {
    /// Permutation repetitions (0 disables the test; default 1000).
    pub reps: usize,
    /// Seed of the permutation test (default 0).
    pub seed: u64,
    /// Threshold on the maximum per-layer JS (bits) used by `--fail-above`.
    pub fail_above: Option<f64>,
}

impl Default for CompareOptions {
    fn default() -> Self {
        CompareOptions {
            reps: 1000,
            seed: 0,
            fail_above: None,
        }
    }
}

/// Summary of one compared run.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct RunSummary {
    pub label: String,
    pub prompts: usize,
    pub selections: f64,
}

/// JS divergence of one layer's pooled expert-load distributions.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct LayerJs {
    pub layer: usize,
    /// Base 2 (bits), in [0, 1].
    pub js_bits: f64,
    /// Natural log (nats) = js_bits · ln 2, in [0, ln 2].
    pub js_nats: f64,
}

/// Signature shift of one prompt present in both runs.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct PromptShift {
    pub prompt_id: String,
    pub category: Option<String>,
    /// `sim = (1/L) Σ_l cos(s_A[l], s_B[l])`.
    pub similarity: f64,
    /// `1 − sim`.
    pub shift: f64,
}

/// Mean shift of the shared prompts of one category.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct CategoryShift {
    pub category: String,
    pub n: usize,
    pub mean_shift: f64,
    /// Sample std (ddof = 1); `null` when n = 1.
    pub std_shift: Option<f64>,
}

/// A shared prompt whose shift could not be computed.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct SkippedPrompt {
    pub prompt_id: String,
    pub reason: String,
}

/// Label-permutation test of the mean per-layer JS (see `docs/health.md`).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct PermutationTest {
    pub statistic: String,
    pub observed: f64,
    pub null_mean: f64,
    /// ddof = 1.
    pub null_std: f64,
    /// `(1 + #{null ≥ observed}) / (1 + reps)`.
    pub p_value: f64,
    pub reps: usize,
    pub seed: u64,
}

/// The comparison report (`moe-xray compare --json`).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct CompareReport {
    pub schema_version: u32,
    pub num_layers: usize,
    pub num_experts: usize,
    pub run_a: RunSummary,
    pub run_b: RunSummary,
    pub per_layer: Vec<LayerJs>,
    pub mean_js_bits: f64,
    pub max_js_bits: f64,
    pub max_js_layer: usize,
    pub shared_prompts: usize,
    pub mean_shift: Option<f64>,
    pub prompt_shifts: Vec<PromptShift>,
    pub skipped_prompts: Vec<SkippedPrompt>,
    pub category_shifts: Vec<CategoryShift>,
    pub permutation: Option<PermutationTest>,
    pub fail_above: Option<f64>,
    /// `max_js_bits > fail_above` (when a threshold is set).
    pub exceeded: Option<bool>,
}

fn pooled(prompts: &[PromptLoad], le: usize) -> Vec<f64> {
    let mut out = vec![0.0; le];
    for p in prompts {
        for (o, c) in out.iter_mut().zip(&p.counts) {
            *o += c;
        }
    }
    out
}

/// Per-layer JS (bits) between two layer-major L×E load matrices; `None` for a layer where
/// either side has no selections.
pub fn per_layer_js(
    a: &[f64],
    b: &[f64],
    num_layers: usize,
    num_experts: usize,
) -> Vec<Option<f64>> {
    (0..num_layers)
        .map(|l| {
            let r = l * num_experts..(l + 1) * num_experts;
            js_divergence_bits(&a[r.clone()], &b[r])
        })
        .collect()
}

/// Mean over layers of the per-layer JS, a layer without selections on either side counting 0.
fn mean_js(a: &[f64], b: &[f64], nl: usize, ne: usize) -> f64 {
    per_layer_js(a, b, nl, ne)
        .iter()
        .map(|x| x.unwrap_or(0.0))
        .sum::<f64>()
        / nl as f64
}

/// Compares two runs. Errors when the layer or expert counts differ, or a run has a layer
/// without any selection.
pub fn compare_runs(a: &RunData, b: &RunData, opts: &CompareOptions) -> Result<CompareReport> {
    if (a.num_layers, a.num_experts) != (b.num_layers, b.num_experts) {
        return Err(HealthError::Mismatch(format!(
            "runs differ in shape: {} has {} layers x {} experts, {} has {} layers x {} experts (compare needs the same L and E; for models of different architectures analyze both runs and use `moe-xray compare-models`)",
            a.label, a.num_layers, a.num_experts, b.label, b.num_layers, b.num_experts
        )));
    }
    if a.layers != b.layers {
        return Err(HealthError::Mismatch(format!(
            "runs differ in their MoE layers: {} routes at decoder layers {:?}, {} at {:?} (compare needs the same layers)",
            a.label, a.layers, b.label, b.layers
        )));
    }
    let (nl, ne) = (a.num_layers, a.num_experts);
    if a.layers.len() != nl {
        return Err(HealthError::InvalidInput(format!(
            "{}: {} layer labels for {nl} layers",
            a.label,
            a.layers.len()
        )));
    }
    let le = moe_xray_trace::limits::check_dims(nl, ne, None)
        .map_err(|m| HealthError::InvalidInput(format!("{}: {m}", a.label)))?;
    if opts.reps > MAX_PERMUTATIONS {
        return Err(HealthError::InvalidInput(format!(
            "--reps {} exceeds the maximum {MAX_PERMUTATIONS}",
            opts.reps
        )));
    }
    for r in [a, b] {
        if r.prompts.is_empty() {
            return Err(HealthError::InvalidInput(format!(
                "{}: no prompts with selections of the chosen token types",
                r.label
            )));
        }
        if let Some(p) = r.prompts.iter().find(|p| p.counts.len() != le) {
            return Err(HealthError::InvalidInput(format!(
                "{}: prompt '{}' has {} counts, expected num_layers × num_experts = {le}",
                r.label,
                p.prompt_id,
                p.counts.len()
            )));
        }
    }
    let la = pooled(&a.prompts, le);
    let lb = pooled(&b.prompts, le);
    let mut per_layer = Vec::with_capacity(nl);
    for (l, js) in per_layer_js(&la, &lb, nl, ne).into_iter().enumerate() {
        let js = js.ok_or_else(|| {
            let which = if la[l * ne..(l + 1) * ne].iter().sum::<f64>() <= 0.0 {
                &a.label
            } else {
                &b.label
            };
            HealthError::InvalidInput(format!(
                "{which}: layer {} has no expert selections",
                a.layers[l]
            ))
        })?;
        per_layer.push(LayerJs {
            layer: a.layers[l],
            js_bits: js,
            js_nats: js * std::f64::consts::LN_2,
        });
    }
    let mean_js_bits = per_layer.iter().map(|x| x.js_bits).sum::<f64>() / nl as f64;
    let (mut max_js_layer, mut max_js_bits) = (0, f64::NEG_INFINITY);
    for x in &per_layer {
        if x.js_bits > max_js_bits {
            max_js_bits = x.js_bits;
            max_js_layer = x.layer;
        }
    }

    // Per-prompt shifts over prompt ids present in both runs (in run A's order).
    let b_index: HashMap<&str, usize> = b
        .prompts
        .iter()
        .enumerate()
        .map(|(i, p)| (p.prompt_id.as_str(), i))
        .collect();
    let mut prompt_shifts = Vec::new();
    let mut skipped_prompts = Vec::new();
    let mut shared = 0;
    for pa in &a.prompts {
        let Some(&ib) = b_index.get(pa.prompt_id.as_str()) else {
            continue;
        };
        shared += 1;
        let pb = &b.prompts[ib];
        match signature_similarity(&pa.counts, &pb.counts, nl, ne) {
            Some(sim) => prompt_shifts.push(PromptShift {
                prompt_id: pa.prompt_id.clone(),
                category: pa.category.clone().or_else(|| pb.category.clone()),
                similarity: sim,
                shift: 1.0 - sim,
            }),
            None => skipped_prompts.push(SkippedPrompt {
                prompt_id: pa.prompt_id.clone(),
                reason: "no selections in some layer in one of the runs".into(),
            }),
        }
    }
    let mean_shift = (!prompt_shifts.is_empty())
        .then(|| prompt_shifts.iter().map(|p| p.shift).sum::<f64>() / prompt_shifts.len() as f64);
    let mut by_cat: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
    for p in &prompt_shifts {
        if let Some(c) = &p.category {
            by_cat.entry(c.as_str()).or_default().push(p.shift);
        }
    }
    let category_shifts = by_cat
        .into_iter()
        .map(|(c, v)| {
            let n = v.len();
            let mean = v.iter().sum::<f64>() / n as f64;
            let std = (n > 1).then(|| {
                (v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1) as f64).sqrt()
            });
            CategoryShift {
                category: c.to_string(),
                n,
                mean_shift: mean,
                std_shift: std,
            }
        })
        .collect();

    let permutation = (opts.reps > 0).then(|| {
        permutation_test(
            &a.prompts,
            &b.prompts,
            nl,
            ne,
            mean_js_bits,
            opts.reps,
            opts.seed,
        )
    });
    Ok(CompareReport {
        schema_version: 1,
        num_layers: nl,
        num_experts: ne,
        run_a: RunSummary {
            label: a.label.clone(),
            prompts: a.prompts.len(),
            selections: la.iter().sum(),
        },
        run_b: RunSummary {
            label: b.label.clone(),
            prompts: b.prompts.len(),
            selections: lb.iter().sum(),
        },
        per_layer,
        mean_js_bits,
        max_js_bits,
        max_js_layer,
        shared_prompts: shared,
        mean_shift,
        prompt_shifts,
        skipped_prompts,
        category_shifts,
        permutation,
        fail_above: opts.fail_above,
        exceeded: opts.fail_above.map(|t| max_js_bits > t),
    })
}

/// Pools the prompts of both runs (each prompt-run an exchangeable unit), reassigns the run
/// labels uniformly at random preserving the sizes (n_A, n_B), and recomputes the mean per-layer
/// JS of the pooled loads. Repetition r uses `ChaCha8Rng::seed_from_u64(seed)` on stream r and a
/// Fisher–Yates shuffle of the unit indices; the first n_A shuffled units form run A.
pub fn permutation_test(
    a: &[PromptLoad],
    b: &[PromptLoad],
    nl: usize,
    ne: usize,
    observed: f64,
    reps: usize,
    seed: u64,
) -> PermutationTest {
    let le = nl * ne;
    let units: Vec<&[f64]> = a.iter().chain(b).map(|p| p.counts.as_slice()).collect();
    let mut total = vec![0.0; le];
    for u in &units {
        for (t, c) in total.iter_mut().zip(u.iter()) {
            *t += c;
        }
    }
    let n_a = a.len();
    let mut idx: Vec<usize> = (0..units.len()).collect();
    let mut sa = vec![0.0; le];
    let mut sb = vec![0.0; le];
    let mut null = Vec::with_capacity(reps.min(MAX_PERMUTATIONS));
    for r in 0..reps {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        rng.set_stream(r as u64);
        idx.sort_unstable();
        idx.shuffle(&mut rng);
        sa.iter_mut().for_each(|x| *x = 0.0);
        for &i in &idx[..n_a] {
            for (s, c) in sa.iter_mut().zip(units[i]) {
                *s += c;
            }
        }
        for ((s, t), x) in sb.iter_mut().zip(&total).zip(&sa) {
            *s = t - x;
        }
        null.push(mean_js(&sa, &sb, nl, ne));
    }
    let ge = null.iter().filter(|&&x| x >= observed).count();
    let n = null.len() as f64;
    let mean = null.iter().sum::<f64>() / n;
    let std = if null.len() > 1 {
        (null.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0)).sqrt()
    } else {
        0.0
    };
    PermutationTest {
        statistic: "mean over layers of JS(load_A[l], load_B[l]) in bits".into(),
        observed,
        null_mean: mean,
        null_std: std,
        p_value: (1.0 + ge as f64) / (1.0 + n),
        reps,
        seed,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(id: &str, cat: &str, counts: &[f64]) -> PromptLoad {
        PromptLoad {
            prompt_id: id.into(),
            category: Some(cat.into()),
            counts: counts.to_vec(),
        }
    }

    fn run(label: &str, prompts: Vec<PromptLoad>, ne: usize) -> RunData {
        RunData {
            label: label.into(),
            num_layers: 2,
            layers: vec![0, 1],
            num_experts: ne,
            prompts,
        }
    }

    #[test]
    fn identical_runs_have_zero_js_and_shift() {
        let ps = vec![
            p("a", "x", &[1., 2., 3., 4.]),
            p("b", "y", &[2., 0., 1., 1.]),
        ];
        let r = compare_runs(
            &run("A", ps.clone(), 2),
            &run("B", ps, 2),
            &CompareOptions::default(),
        )
        .unwrap();
        assert!(r.per_layer.iter().all(|l| l.js_bits.abs() < 1e-15));
        assert!(r.prompt_shifts.iter().all(|s| s.shift.abs() < 1e-12));
        let perm = r.permutation.unwrap();
        assert_eq!(perm.p_value, 1.0);
        assert_eq!(r.category_shifts.len(), 2);
    }

    #[test]
    fn shifted_runs_are_detected() {
        let a: Vec<_> = (0..10)
            .map(|i| p(&format!("p{i}"), "x", &[9., 1., 9., 1.]))
            .collect();
        let b: Vec<_> = (0..10)
            .map(|i| p(&format!("p{i}"), "x", &[1., 9., 1., 9.]))
            .collect();
        let opts = CompareOptions {
            reps: 200,
            seed: 3,
            fail_above: Some(0.1),
        };
        let r = compare_runs(&run("A", a.clone(), 2), &run("B", b.clone(), 2), &opts).unwrap();
        assert!(r.max_js_bits > 0.3);
        assert_eq!(r.exceeded, Some(true));
        let perm = r.permutation.as_ref().unwrap();
        assert!(perm.p_value < 0.01, "{perm:?}");
        assert_eq!(r.shared_prompts, 10);
        // determinism
        let r2 = compare_runs(&run("A", a, 2), &run("B", b, 2), &opts).unwrap();
        assert_eq!(r, r2);
    }

    #[test]
    fn shape_mismatch_is_a_clear_error() {
        let a = run("A", vec![p("a", "x", &[1., 2., 3., 4.])], 2);
        let mut b = run("B", vec![p("a", "x", &[1., 2., 3., 4., 5., 6.])], 3);
        b.num_experts = 3;
        let e = compare_runs(&a, &b, &CompareOptions::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("2 experts") && e.contains("3 experts"), "{e}");
    }
}
