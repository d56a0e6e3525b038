//! Hand-built SVG figures (as strings, so `moe-xray-report` can embed them): expert-load heatmap
//! (layer × expert), co-activation lift heatmap of one layer, per-layer JS bars of a comparison.
//!
//! Hand-written rather than a plotting crate: the figures are a few rectangles, and the report
//! crate uses the same plain-SVG approach with the Okabe–Ito palette, so the styles match and the
//! output is byte-deterministic.

use std::fmt::Write;

use crate::compare::CompareReport;
use crate::health::HealthReport;

/// Okabe–Ito palette.
pub const OKABE_ITO: [&str; 8] = [
    "#E69F00", "#56B4E9", "#009E73", "#F0E442", "#0072B2", "#D55E00", "#CC79A7", "#000000",
];
const ORANGE: (f64, f64, f64) = (230.0, 159.0, 0.0);
const BLUE: (f64, f64, f64) = (0.0, 114.0, 178.0);
const MID: (f64, f64, f64) = (247.0, 247.0, 247.0);
/// SVG element id of the load heatmap (= `health-` + the file stem written by `health --svg`).
pub const LOAD_ID: &str = "health-load_heatmap";
/// SVG element id of the per-layer JS bars.
pub const JS_ID: &str = "compare-js";

/// SVG element id of the co-activation heatmap of `layer`.
pub fn coactivation_id(layer: usize) -> String {
    format!("health-coactivation_layer{layer}")
}

const FONT: &str = "font-family=\"Helvetica, Arial, sans-serif\"";

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// Diverging colour for `v` in [-1, 1]: Okabe–Ito orange (−1) → light grey (0) → blue (+1).
fn diverging(v: f64) -> String {
    let v = if v.is_finite() {
        v.clamp(-1.0, 1.0)
    } else {
        0.0
    };
    let (to, t) = if v < 0.0 { (ORANGE, -v) } else { (BLUE, v) };
    let mix = |a: f64, b: f64| (a + (b - a) * t).round() as u8;
    format!(
        "#{:02X}{:02X}{:02X}",
        mix(MID.0, to.0),
        mix(MID.1, to.1),
        mix(MID.2, to.2)
    )
}

fn header(out: &mut String, id: &str, w: f64, h: f64, title: &str) {
    let _ = write!(
        out,
        "<svg xmlns=\"http://www.w3.org/2000/svg\" id=\"{}\" width=\"{w:.0}\" height=\"{h:.0}\" viewBox=\"0 0 {w:.0} {h:.0}\" {FONT} font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"#FFFFFF\"/>\n<text x=\"{:.1}\" y=\"18\" text-anchor=\"middle\" font-size=\"14\">{}</text>\n",
        esc(id),
        w / 2.0,
        esc(title)
    );
}

fn legend(out: &mut String, x: f64, y: f64, label_lo: &str, label_hi: &str, caption: &str) {
    let steps = 40;
    for s in 0..steps {
        let v = -1.0 + 2.0 * (s as f64 + 0.5) / steps as f64;
        let _ = writeln!(
            out,
            "<rect x=\"{:.1}\" y=\"{y:.1}\" width=\"4\" height=\"10\" fill=\"{}\"/>",
            x + 4.0 * s as f64,
            diverging(v)
        );
    }
    let _ = write!(
        out,
        "<text x=\"{x:.1}\" y=\"{:.1}\" font-size=\"10\">{}</text>\n<text x=\"{:.1}\" y=\"{:.1}\" font-size=\"10\" text-anchor=\"end\">{}</text>\n<text x=\"{:.1}\" y=\"{:.1}\" font-size=\"10\">{}</text>\n",
        y + 22.0,
        esc(label_lo),
        x + 160.0,
        y + 22.0,
        esc(label_hi),
        x + 170.0,
        y + 9.0,
        esc(caption)
    );
}

/// Load heatmap: rows = layers, columns = experts, colour = log2(share · E) clipped to [−2, 2]
/// (blue = above the uniform share, orange = below); dead experts are black.
pub fn load_heatmap(report: &HealthReport) -> String {
    let (nl, ne) = (report.num_layers, report.num_experts);
    let cell_w = (640.0 / ne as f64).clamp(2.0, 24.0);
    let cell_h = (360.0 / nl as f64).clamp(6.0, 24.0);
    let (left, top) = (60.0, 34.0);
    let w = left + cell_w * ne as f64 + 20.0;
    let h = top + cell_h * nl as f64 + 70.0;
    let mut out = String::new();
    header(
        &mut out,
        LOAD_ID,
        w.max(320.0),
        h,
        "Expert load by layer (share relative to uniform)",
    );
    for layer in &report.layers {
        let y = top + cell_h * layer.layer as f64;
        for (e, &s) in layer.share.iter().enumerate() {
            let fill = if layer.load[e] == 0.0 {
                "#000000".to_string()
            } else {
                diverging((s * ne as f64).log2() / 2.0)
            };
            let _ = writeln!(
                out,
                "<rect x=\"{:.2}\" y=\"{y:.2}\" width=\"{cell_w:.2}\" height=\"{cell_h:.2}\" fill=\"{fill}\"><title>layer {} expert {e}: share {:.4}</title></rect>",
                left + cell_w * e as f64,
                layer.layer,
                s
            );
        }
        if nl <= 32 || layer.layer % 4 == 0 {
            let _ = writeln!(
                out,
                "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\" font-size=\"10\">{}</text>",
                left - 4.0,
                y + cell_h / 2.0 + 3.0,
                layer.layer
            );
        }
    }
    let bottom = top + cell_h * nl as f64;
    let _ = write!(
        out,
        "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">expert</text>\n<text x=\"14\" y=\"{:.1}\" transform=\"rotate(-90 14 {:.1})\" text-anchor=\"middle\">layer</text>\n",
        left + cell_w * ne as f64 / 2.0,
        bottom + 16.0,
        top + cell_h * nl as f64 / 2.0,
        top + cell_h * nl as f64 / 2.0
    );
    legend(
        &mut out,
        left,
        bottom + 28.0,
        "¼×",
        "4×",
        "uniform share = centre; black = dead",
    );
    out.push_str("</svg>\n");
    out
}

/// Co-activation heatmap of one layer: colour = log2(lift) clipped to [−2, 2], lift = observed /
/// expected pair count (see `docs/health.md`); the diagonal is grey. `None` when the report has
/// no co-activation data or the layer is out of range.
pub fn coactivation_heatmap(report: &HealthReport, coact: &[u64], layer: usize) -> Option<String> {
    let ne = report.num_experts;
    let lh = report.layers.get(layer)?;
    if coact.len() != ne * ne || lh.tokens == 0 {
        return None;
    }
    let cell = (480.0 / ne as f64).clamp(3.0, 28.0);
    let (left, top) = (50.0, 34.0);
    let side = cell * ne as f64;
    let w = (left + side + 20.0).max(320.0);
    let h = top + side + 70.0;
    let mut out = String::new();
    header(
        &mut out,
        &coactivation_id(layer),
        w,
        h,
        &format!("Expert co-activation, layer {layer} (log2 lift)"),
    );
    let t = lh.tokens as f64;
    for i in 0..ne {
        for j in 0..ne {
            let fill = if i == j {
                "#BBBBBB".to_string()
            } else {
                let expected = lh.load[i] * lh.load[j] / t;
                let c = coact[i * ne + j] as f64;
                if expected <= 0.0 {
                    "#FFFFFF".to_string()
                } else if c == 0.0 {
                    diverging(-1.0)
                } else {
                    diverging((c / expected).log2() / 2.0)
                }
            };
            let _ = writeln!(
                out,
                "<rect x=\"{:.2}\" y=\"{:.2}\" width=\"{cell:.2}\" height=\"{cell:.2}\" fill=\"{fill}\"><title>experts {i},{j}: {} tokens</title></rect>",
                left + cell * j as f64,
                top + cell * i as f64,
                coact[i * ne + j]
            );
        }
    }
    let _ = write!(
        out,
        "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">expert j</text>\n<text x=\"14\" y=\"{:.1}\" transform=\"rotate(-90 14 {:.1})\" text-anchor=\"middle\">expert i</text>\n",
        left + side / 2.0,
        top + side + 16.0,
        top + side / 2.0,
        top + side / 2.0
    );
    legend(
        &mut out,
        left,
        top + side + 28.0,
        "¼× expected",
        "4×",
        "lift",
    );
    out.push_str("</svg>\n");
    Some(out)
}

/// Per-layer Jensen–Shannon divergence bars (bits) of a comparison, with the `--fail-above`
/// threshold as a dashed vermillion line when set.
pub fn js_bars(report: &CompareReport) -> String {
    let nl = report.num_layers;
    let bar = (560.0 / nl as f64).clamp(4.0, 40.0);
    let (left, top, plot_h) = (60.0, 34.0, 240.0);
    let w = (left + bar * nl as f64 + 30.0).max(360.0);
    let h = top + plot_h + 50.0;
    let mut ymax = report.max_js_bits.max(report.fail_above.unwrap_or(0.0)) * 1.1;
    if ymax.is_nan() || ymax <= 0.0 {
        ymax = 0.01;
    }
    let ymax = ymax.min(1.0);
    let y_of = |v: f64| top + plot_h - plot_h * (v / ymax).min(1.0);
    let mut out = String::new();
    header(
        &mut out,
        JS_ID,
        w,
        h,
        "Jensen–Shannon divergence of expert load per layer (bits)",
    );
    let _ = writeln!(
        out,
        "<line x1=\"{left:.1}\" y1=\"{:.1}\" x2=\"{left:.1}\" y2=\"{top:.1}\" stroke=\"#000000\"/>\n<line x1=\"{left:.1}\" y1=\"{:.1}\" x2=\"{:.1}\" y2=\"{:.1}\" stroke=\"#000000\"/>",
        top + plot_h,
        top + plot_h,
        left + bar * nl as f64,
        top + plot_h
    );
    for t in 0..=4 {
        let v = ymax * t as f64 / 4.0;
        let _ = writeln!(
            out,
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\" font-size=\"10\">{v:.3}</text>",
            left - 4.0,
            y_of(v) + 3.0
        );
    }
    for l in &report.per_layer {
        let x = left + bar * l.layer as f64;
        let y = y_of(l.js_bits);
        let _ = writeln!(
            out,
            "<rect x=\"{:.2}\" y=\"{y:.2}\" width=\"{:.2}\" height=\"{:.2}\" fill=\"{}\"><title>layer {}: JS {:.5} bits</title></rect>",
            x + bar * 0.1,
            bar * 0.8,
            top + plot_h - y,
            OKABE_ITO[4],
            l.layer,
            l.js_bits
        );
        if nl <= 32 || l.layer % 4 == 0 {
            let _ = writeln!(
                out,
                "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\" font-size=\"10\">{}</text>",
                x + bar / 2.0,
                top + plot_h + 12.0,
                l.layer
            );
        }
    }
    if let Some(t) = report.fail_above {
        let y = y_of(t);
        let _ = writeln!(
            out,
            "<line x1=\"{left:.1}\" y1=\"{y:.2}\" x2=\"{:.1}\" y2=\"{y:.2}\" stroke=\"{}\" stroke-dasharray=\"5,3\"/>\n<text x=\"{:.1}\" y=\"{:.2}\" text-anchor=\"end\" font-size=\"10\" fill=\"{}\">fail above {t}</text>",
            left + bar * nl as f64,
            OKABE_ITO[5],
            left + bar * nl as f64,
            y - 3.0,
            OKABE_ITO[5]
        );
    }
    let _ = writeln!(
        out,
        "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">layer</text>",
        left + bar * nl as f64 / 2.0,
        top + plot_h + 28.0
    );
    out.push_str("</svg>\n");
    out
}

/// A figure ready for the HTML report (same fields as `moe_xray_report::Figure`).
#[derive(Debug, Clone, PartialEq)]
pub struct HealthFigure {
    /// Stable id (also the SVG element id).
    pub id: String,
    pub title: String,
    pub caption: String,
    pub svg: String,
    /// False when the data was missing (the caption says why and the SVG is a short notice).
    pub available: bool,
}

fn notice(id: &str, text: &str) -> String {
    let mut out = String::new();
    header(&mut out, id, 480.0, 60.0, "");
    let _ = writeln!(
        out,
        "<text x=\"240\" y=\"36\" text-anchor=\"middle\">{}</text>\n</svg>",
        esc(text)
    );
    out
}

/// The health figures for the HTML report: the load heatmap and the co-activation heatmap of
/// `layer` (unavailable, with the reason, for counts-mode input).
pub fn report_figures(
    acc: &crate::health::HealthAccumulator,
    report: &HealthReport,
    layer: usize,
) -> Vec<HealthFigure> {
    let mut figs = vec![HealthFigure {
        id: LOAD_ID.to_string(),
        title: "Expert load by layer".to_string(),
        caption: format!(
            "Share of selections of each expert (columns) at each layer (rows) relative to the uniform share 1/{}: blue above, orange below (log2 scale clipped at 4x), black = dead expert (never selected). Mean normalised load entropy {:.4}, {} dead and {} cold (layer, expert) pairs.",
            report.num_experts,
            report.overall.mean_normalized_entropy,
            report.overall.dead_experts,
            report.overall.cold_experts
        ),
        svg: load_heatmap(report),
        available: true,
    }];
    let id = coactivation_id(layer);
    let co = acc
        .coactivation(layer)
        .and_then(|c| coactivation_heatmap(report, c, layer));
    figs.push(match co {
        Some(svg) => HealthFigure {
            id,
            title: format!("Expert co-activation at layer {layer}"),
            caption: "log2 lift of each expert pair: tokens selecting both experts over the count expected if they were selected independently at their observed rates (blue = together more often, orange = less often; diagonal grey).".to_string(),
            svg,
            available: true,
        },
        None => {
            let why = "co-activation needs per-token traces (records or flat events), not counts";
            HealthFigure {
                svg: notice(&id, why),
                id,
                title: format!("Expert co-activation at layer {layer}"),
                caption: why.to_string(),
                available: false,
            }
        }
    });
    figs
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::health::{HealthAccumulator, HealthOptions, TokenRouting};
    use moe_xray_trace::TokenType;

    #[test]
    fn figures_are_well_formed_and_deterministic() {
        let mut acc = HealthAccumulator::new(2, 4, HealthOptions::default()).unwrap();
        for (l, ex) in [(0, [0u32, 1]), (0, [1, 2]), (1, [3, 0])] {
            acc.add_token(&TokenRouting {
                prompt_id: "p",
                category: None,
                layer: l,
                token_type: TokenType::Prompt,
                experts: &ex,
                probs: None,
            })
            .unwrap();
        }
        let r = acc.report();
        let a = load_heatmap(&r);
        assert!(a.starts_with("<svg") && a.trim_end().ends_with("</svg>"));
        assert_eq!(
            a.matches("<rect x=").count() - 40,
            8,
            "8 cells + 40 legend steps"
        );
        assert!(a.contains("#000000"), "dead experts are black");
        assert_eq!(a, load_heatmap(&r));
        let c = coactivation_heatmap(&r, acc.coactivation(0).unwrap(), 0).unwrap();
        assert!(c.contains("layer 0"));
        assert!(coactivation_heatmap(&r, acc.coactivation(0).unwrap(), 5).is_none());
        assert!(a.contains("id=\"health-load_heatmap\""));
        let figs = report_figures(&acc, &r, 1);
        assert_eq!(figs.len(), 2);
        assert!(figs.iter().all(|f| f.available && f.svg.contains(&f.id)));
        assert_eq!(diverging(0.0), "#F7F7F7");
        assert_eq!(diverging(1.0), "#0072B2");
        assert_eq!(diverging(-1.0), "#E69F00");
    }
}
