//! The report's "Routing health" section: the `moe-xray health` numbers presented like the
//! headline table (grouped, rounded to three significant digits, one definition per row; the
//! definitions are those of `docs/health.md`), followed by the health figures.

use std::fmt::Write as _;

use moe_xray_health::health::PairStat;
use moe_xray_health::{HealthAccumulator, HealthReport, MiReport};

use crate::health_figures::report_figures;
use crate::html::row;
use crate::svg::{esc, num, short, sig};
use crate::HealthSection;

/// Significant digits of every health number in the report.
const DIGITS: usize = 3;

fn s3(x: f64) -> String {
    sig(x, DIGITS)
}

impl HealthSection {
    /// The section for one run: the health report, the mutual information (when computed) and
    /// the figures (load heatmap; co-activation heatmap of `coactivation_layer`, or a notice
    /// saying why it is missing).
    pub fn new(
        acc: &HealthAccumulator,
        report: HealthReport,
        mutual_information: Option<MiReport>,
        coactivation_layer: usize,
    ) -> HealthSection {
        HealthSection {
            figures: report_figures(acc, &report, coactivation_layer),
            report: Some(report),
            mutual_information,
            notes: Vec::new(),
        }
    }
}

fn group(s: &mut String, name: &str) {
    let _ = write!(
        s,
        r#"<tr class="group"><th colspan="3" scope="rowgroup">{}</th></tr>"#,
        esc(name)
    );
}

fn load_balance(s: &mut String, r: &HealthReport) {
    let o = &r.overall;
    let pairs = r.num_layers.saturating_mul(r.num_experts);
    group(s, "Load balance");
    row(
        s,
        "Input",
        &format!(
            "{} layers × {} experts, top-k = {}; {} token records, {} counts lines",
            r.num_layers,
            r.num_experts,
            r.top_k.map_or_else(|| "?".to_string(), |k| k.to_string()),
            r.inputs.token_records,
            r.inputs.counts_lines
        ),
        &format!(
            "records counted, one per token and layer (token types: {}); load x_e = records selecting expert e, share p_e = x_e / S",
            r.token_types.join(", ")
        ),
    );
    row(
        s,
        "Normalised load entropy",
        &format!(
            "mean {}, lowest {} (layer {})",
            s3(o.mean_normalized_entropy),
            s3(o.min_normalized_entropy),
            o.least_balanced_layer
        ),
        "H/ln E, H = −Σ_e p_e ln p_e per layer; 1 = uniform, 0 = one expert takes all",
    );
    row(
        s,
        "Gini coefficient",
        &format!("mean {}, highest {}", s3(o.mean_gini), s3(o.max_gini)),
        "Σ_i Σ_j |x_i − x_j| / (2 E S) per layer; 0 = equal loads",
    );
    row(
        s,
        "Jain fairness",
        &format!("mean {}, lowest {}", s3(o.mean_jain), s3(o.min_jain)),
        "S² / (E Σ x_e²) per layer; 1 = equal loads, 1/E = one expert",
    );
    row(
        s,
        "Max / mean load",
        &format!("{} (highest layer)", s3(o.max_max_mean_ratio)),
        "max_e x_e / (S/E): busiest expert over the mean, in [1, E]",
    );
    row(
        s,
        "Dead experts",
        &format!("{} of {pairs} (layer, expert) pairs", o.dead_experts),
        "never selected at that layer: x_e = 0",
    );
    row(
        s,
        "Cold experts",
        &format!("{} of {pairs} (layer, expert) pairs", o.cold_experts),
        &format!(
            "x_e > 0 and p_e < f / E, f = {} (--cold-fraction)",
            short(r.cold_fraction)
        ),
    );
}

fn router_confidence(s: &mut String, r: &HealthReport) {
    group(s, "Router confidence");
    let why =
        "needs the full router distribution (probs, captured with --record-probs in records mode)";
    match r.overall.router_entropy_mean {
        Some(h) => {
            let ln_e = (r.num_experts.max(2) as f64).ln();
            row(
                s,
                "Router entropy",
                &format!("{} nats ({} of ln E)", s3(h), s3(h / ln_e)),
                "H = −Σ p ln p of each token's renormalised router probabilities; mean over tokens, then layers",
            );
        }
        None => row(s, "Router entropy", "not available", why),
    }
    match r.overall.router_margin_mean {
        Some(m) => {
            let min = r
                .layers
                .iter()
                .filter_map(|l| l.router.as_ref())
                .filter(|x| x.margin_tokens > 0)
                .map(|x| x.margin_min)
                .fold(f64::INFINITY, f64::min);
            row(
                s,
                "Top-k margin",
                &format!("mean {}, smallest {}", s3(m), s3(min)),
                "p_(k) − p_(k+1) of each token's sorted probabilities: last selected vs. first unselected expert; mean over tokens, then layers",
            );
        }
        None => row(s, "Top-k margin", "not available", why),
    }
}

fn coactivation(s: &mut String, r: &HealthReport) {
    group(s, "Co-activation");
    if !r.available.coactivation {
        row(
            s,
            "Strongest pair",
            "not available",
            "needs per-token input (routing records or flat events); counts-mode traces only give per-prompt totals",
        );
        return;
    }
    // Highest lift over all layers' strongest pairs (ties: earlier layer).
    let best = r
        .layers
        .iter()
        .filter_map(|l| Some((l.layer, l.top_pairs.as_ref()?.first()?)))
        .fold(
            None,
            |best: Option<(usize, &PairStat)>, (layer, p)| match best {
                Some((_, b)) if b.lift >= p.lift => best,
                _ => Some((layer, p)),
            },
        );
    let def = "lift = C_l[i,j] / (x_i x_j / T): tokens selecting both over the count expected under independence (T = tokens at the layer); highest over all layers";
    match best {
        Some((layer, p)) => row(
            s,
            "Strongest pair",
            &format!(
                "experts {} and {} at layer {layer}: lift {} ({} tokens, {} expected)",
                p.i,
                p.j,
                s3(p.lift),
                p.count,
                s3(p.expected)
            ),
            def,
        ),
        None => row(s, "Strongest pair", "no pair selected together", def),
    }
    if let Some(k) = r.top_k.filter(|&k| k >= 1 && r.num_experts >= 2) {
        let (k, e) = (k as f64, r.num_experts as f64);
        row(
            s,
            "Lift under uniform routing",
            &s3((k - 1.0) * e / (k * (e - 1.0))),
            "(k−1)E / (k(E−1)): every pair's lift under uniform random top-k; compare lifts with this, not with 1",
        );
    }
}

fn mutual_information(s: &mut String, m: Option<&MiReport>) {
    group(s, "Mutual information between signature and category");
    let Some(m) = m else {
        row(
            s,
            "I(signature; task)",
            "not computed",
            "needs prompt categories (moe-xray health --mi)",
        );
        return;
    };
    row(
        s,
        "I(signature; task)",
        &format!(
            "{} bits (p = {}, {} permutations; {} prompts, {} categories)",
            s3(m.mi_corrected_bits),
            num(m.p_value, 4),
            m.perms,
            m.n,
            m.num_classes
        ),
        &format!(
            "plug-in MI Î of category and the top {} principal components of the signatures ({} quantile bins each), minus its mean under label permutations; p = (1 + #{{Î_perm ≥ Î}}) / (1 + perms)",
            m.components, m.bins
        ),
    );
    row(
        s,
        "Normalised",
        &format!(
            "{} of H(task) = {} bits",
            s3(m.normalized),
            s3(m.label_entropy_bits)
        ),
        "I / H(task); 1 = the signature determines the category",
    );
    row(
        s,
        "Plug-in estimate − bias",
        &format!("{} − {} bits", s3(m.mi_plugin_bits), s3(m.bias_bits)),
        "uncorrected estimate and its mean under permuted labels",
    );
    row(
        s,
        "k-NN lower bound",
        &format!(
            "{} bits (p = {})",
            s3(m.knn_lower_bound_bits),
            num(m.knn_p_value, 4)
        ),
        &format!(
            "H(T) − mean_i(−log2 q(t_i | x_i)), q = leave-one-out {}-NN prediction (cosine, Laplace smoothing); may be < 0",
            m.knn
        ),
    );
}

/// The grouped, rounded summary table of the health section.
pub(crate) fn summary_table(h: &HealthSection) -> String {
    if h.report.is_none() && h.mutual_information.is_none() {
        return r#"<p class="muted">(no health summary recorded)</p>"#.into();
    }
    let mut s = String::from(
        r#"<p>Definitions of every statistic: docs/health.md.</p><table class="headline health-summary"><thead><tr><th>quantity</th><th>value</th><th>definition</th></tr></thead><tbody>"#,
    );
    if let Some(r) = &h.report {
        load_balance(&mut s, r);
        router_confidence(&mut s, r);
        coactivation(&mut s, r);
    }
    mutual_information(&mut s, h.mutual_information.as_ref());
    s.push_str("</tbody></table>");
    s
}
