//! Text outputs: the stdout tables and CSV files of `health` and `compare`.
//!
//! CSV is written by hand (numbers and ids only; ids are quoted per RFC 4180 when needed) so the
//! library needs no CSV dependency for a handful of columns.

use std::fmt::Write;

use crate::compare::CompareReport;
use crate::health::{HealthAccumulator, HealthReport};
use crate::mi::MiReport;

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

fn opt(v: Option<f64>) -> String {
    v.map(|x| x.to_string()).unwrap_or_default()
}

fn list(v: &[usize]) -> String {
    v.iter().map(usize::to_string).collect::<Vec<_>>().join(" ")
}

/// Human-readable health table.
pub fn health_table(r: &HealthReport) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "routing health: {} layers x {} experts, top-k {}, {} token records, {} counts lines",
        r.num_layers,
        r.num_experts,
        r.top_k.map_or("?".to_string(), |k| k.to_string()),
        r.inputs.token_records,
        r.inputs.counts_lines
    );
    let router = r.available.router_distribution;
    let _ = write!(
        s,
        "{:>5} {:>9} {:>8} {:>8} {:>7} {:>7} {:>5} {:>5}",
        "layer", "tokens", "H/lnE", "max/mean", "gini", "jain", "dead", "cold"
    );
    if router {
        let _ = write!(s, " {:>9} {:>8}", "router_H", "margin");
    }
    if r.available.coactivation {
        let _ = write!(s, "  top pair (lift)");
    }
    s.push('\n');
    for l in &r.layers {
        let _ = write!(
            s,
            "{:>5} {:>9} {:>8.4} {:>8.3} {:>7.4} {:>7.4} {:>5} {:>5}",
            l.layer,
            l.tokens,
            l.normalized_entropy,
            l.max_mean_ratio,
            l.gini,
            l.jain,
            l.dead_experts.len(),
            l.cold_experts.len()
        );
        if router {
            match &l.router {
                Some(rs) => {
                    let _ = write!(s, " {:>9.4} {:>8.4}", rs.entropy_mean, rs.margin_mean);
                }
                None => {
                    let _ = write!(s, " {:>9} {:>8}", "-", "-");
                }
            }
        }
        if let Some(p) = l.top_pairs.as_ref().and_then(|p| p.first()) {
            let _ = write!(s, "  {}+{} ({:.2})", p.i, p.j, p.lift);
        }
        s.push('\n');
    }
    let o = &r.overall;
    let _ = writeln!(
        s,
        "overall: mean H/lnE {:.4} (least balanced: layer {} at {:.4}), mean gini {:.4}, min jain {:.4}, max max/mean {:.3}, dead {}, cold {} (< {} x uniform share)",
        o.mean_normalized_entropy,
        o.least_balanced_layer,
        o.min_normalized_entropy,
        o.mean_gini,
        o.min_jain,
        o.max_max_mean_ratio,
        o.dead_experts,
        o.cold_experts,
        r.cold_fraction
    );
    for n in &r.notes {
        let _ = writeln!(s, "note: {n}");
    }
    s
}

/// One line per layer with the scalar metrics.
pub fn layers_csv(r: &HealthReport) -> String {
    let mut s = String::from(
        "layer,tokens,selections,normalized_entropy,entropy_nats,max_mean_ratio,gini,jain,dead_experts,cold_experts,router_entropy_mean,router_entropy_std,margin_mean,margin_std,margin_min\n",
    );
    for l in &r.layers {
        let rs = l.router.as_ref();
        let _ = writeln!(
            s,
            "{},{},{},{},{},{},{},{},{},{},{},{},{},{},{}",
            l.layer,
            l.tokens,
            l.selections,
            l.normalized_entropy,
            l.entropy_nats,
            l.max_mean_ratio,
            l.gini,
            l.jain,
            list(&l.dead_experts),
            list(&l.cold_experts),
            opt(rs.map(|r| r.entropy_mean)),
            opt(rs.map(|r| r.entropy_std)),
            opt(rs.filter(|r| r.margin_tokens > 0).map(|r| r.margin_mean)),
            opt(rs.filter(|r| r.margin_tokens > 0).map(|r| r.margin_std)),
            opt(rs.filter(|r| r.margin_tokens > 0).map(|r| r.margin_min)),
        );
    }
    s
}

/// Long-form load table: `layer,expert,load,share,status` (status: ok / cold / dead).
pub fn load_csv(r: &HealthReport) -> String {
    let mut s = String::from("layer,expert,load,share,status\n");
    for l in &r.layers {
        for e in 0..r.num_experts {
            let status = if l.dead_experts.contains(&e) {
                "dead"
            } else if l.cold_experts.contains(&e) {
                "cold"
            } else {
                "ok"
            };
            let _ = writeln!(s, "{},{e},{},{},{status}", l.layer, l.load[e], l.share[e]);
        }
    }
    s
}

/// Long-form co-activation counts `layer,i,j,count` (all i, j; diagonal = load), or `None`
/// without per-token input.
pub fn coactivation_csv(acc: &HealthAccumulator) -> Option<String> {
    let e = acc.num_experts();
    let mut s = String::from("layer,i,j,count\n");
    for (row, &l) in acc.layer_ids().iter().enumerate() {
        let c = acc.coactivation(row)?;
        for i in 0..e {
            for j in 0..e {
                let _ = writeln!(s, "{l},{i},{j},{}", c[i * e + j]);
            }
        }
    }
    Some(s)
}

/// Strongest pairs per layer: `layer,rank,i,j,count,expected,lift`.
pub fn pairs_csv(r: &HealthReport) -> Option<String> {
    let mut s = String::from("layer,rank,i,j,count,expected,lift\n");
    for l in &r.layers {
        for (rank, p) in l.top_pairs.as_ref()?.iter().enumerate() {
            let _ = writeln!(
                s,
                "{},{},{},{},{},{},{}",
                l.layer,
                rank + 1,
                p.i,
                p.j,
                p.count,
                p.expected,
                p.lift
            );
        }
    }
    Some(s)
}

/// Human-readable mutual-information summary.
pub fn mi_text(m: &MiReport) -> String {
    format!(
        "mutual information I(signature; task): {:.4} bits bias-corrected (plug-in {:.4} − permutation bias {:.4}; H(task) = {:.4} bits, normalised {:.3}), p = {:.4} ({} permutations), {} prompts, {} classes, {} PCA components x {} bins\n  classifier lower bound (leave-one-out {}-NN): {:.4} bits, p = {:.4}\n",
        m.mi_corrected_bits,
        m.mi_plugin_bits,
        m.bias_bits,
        m.label_entropy_bits,
        m.normalized,
        m.p_value,
        m.perms,
        m.n,
        m.num_classes,
        m.components,
        m.bins,
        m.knn,
        m.knn_lower_bound_bits,
        m.knn_p_value
    )
}

/// Human-readable comparison table.
pub fn compare_table(r: &CompareReport) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "compare: A = {} ({} prompts), B = {} ({} prompts); {} layers x {} experts",
        r.run_a.label, r.run_a.prompts, r.run_b.label, r.run_b.prompts, r.num_layers, r.num_experts
    );
    let _ = writeln!(s, "{:>5} {:>10} {:>10}", "layer", "JS (bits)", "JS (nats)");
    for l in &r.per_layer {
        let _ = writeln!(s, "{:>5} {:>10.6} {:>10.6}", l.layer, l.js_bits, l.js_nats);
    }
    let _ = writeln!(
        s,
        "mean JS {:.6} bits, max JS {:.6} bits (layer {})",
        r.mean_js_bits, r.max_js_bits, r.max_js_layer
    );
    match r.mean_shift {
        Some(m) => {
            let _ = writeln!(
                s,
                "shared prompts: {}, mean signature shift (1 - sim) {:.6}",
                r.shared_prompts, m
            );
        }
        None => {
            let _ = writeln!(
                s,
                "shared prompts: {} (no signature shifts)",
                r.shared_prompts
            );
        }
    }
    for c in &r.category_shifts {
        let _ = writeln!(
            s,
            "  {:<20} n={:<4} mean shift {:.6}{}",
            c.category,
            c.n,
            c.mean_shift,
            c.std_shift
                .map_or(String::new(), |x| format!(" (std {x:.6})"))
        );
    }
    if let Some(p) = &r.permutation {
        let _ = writeln!(
            s,
            "permutation test (mean per-layer JS, {} reps, seed {}): observed {:.6}, null mean {:.6} (std {:.6}), p = {:.4}",
            p.reps, p.seed, p.observed, p.null_mean, p.null_std, p.p_value
        );
    }
    if let (Some(t), Some(x)) = (r.fail_above, r.exceeded) {
        let _ = writeln!(
            s,
            "guard: max JS {:.6} {} --fail-above {t}",
            r.max_js_bits,
            if x { "EXCEEDS" } else { "within" }
        );
    }
    s
}

/// Per-prompt shifts: `prompt_id,category,similarity,shift`.
pub fn shifts_csv(r: &CompareReport) -> String {
    let mut s = String::from("prompt_id,category,similarity,shift\n");
    for p in &r.prompt_shifts {
        let _ = writeln!(
            s,
            "{},{},{},{}",
            csv_field(&p.prompt_id),
            csv_field(p.category.as_deref().unwrap_or("")),
            p.similarity,
            p.shift
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_quoting() {
        assert_eq!(csv_field("a,b"), "\"a,b\"");
        assert_eq!(csv_field("say \"hi\""), "\"say \"\"hi\"\"\"");
        assert_eq!(csv_field("plain"), "plain");
    }
}
