//! Routing-health figures (issue 7) drawn with the report's SVG toolkit (`svg.rs`): the expert-load
//! heatmap (layer × expert), the co-activation lift heatmap of one layer and the per-layer
//! Jensen–Shannon bars of `moe-xray compare`. Same palette, font stack, escaping, title, axis and
//! colour-bar style as the study's figures; `moe-xray health --svg` / `compare --svg` write these
//! documents as they are, and the report embeds them (numbered after the study's figures).
//!
//! The health crate computes the numbers and knows nothing about SVG; this module only reads its
//! report types.

use moe_xray_health::compare::CompareReport;
use moe_xray_health::{HealthAccumulator, HealthReport};

use crate::figures::{unavailable, FIG_WIDTH, NUM_STUDY_FIGURES};
use crate::svg::{
    diverging, diverging_colorbar, nice_ticks, num, short, sig, Anchor, Axes, Svg, DIAGONAL_GREY,
    OKABE_ITO,
};
use crate::Figure;

/// SVG element id of the load heatmap (= `health-` + the file stem written by `health --svg`).
pub const LOAD_ID: &str = "health-load_heatmap";
/// SVG element id of the per-layer JS bars.
pub const JS_ID: &str = "compare-js";

/// SVG element id of the co-activation heatmap of `layer`.
pub fn coactivation_id(layer: usize) -> String {
    format!("health-coactivation_layer{layer}")
}

const LOAD_TITLE: &str = "Expert load by layer (share relative to uniform)";
const JS_TITLE: &str = "Jensen–Shannon divergence of expert load per layer (bits)";

fn coactivation_title(layer: usize) -> String {
    format!("Expert co-activation at layer {layer} (log2 lift)")
}

/// Colour-bar ticks of a log2 ratio clipped to ±2, on the [−1, 1] scale of [`diverging`].
fn ratio_ticks() -> Vec<(f64, String)> {
    [
        ("¼×", -1.0),
        ("½×", -0.5),
        ("1×", 0.0),
        ("2×", 0.5),
        ("4×", 1.0),
    ]
    .iter()
    .map(|(l, v)| (*v, l.to_string()))
    .collect()
}

/// log2(ratio) / 2, i.e. the ratio on the [−1, 1] scale of [`diverging`] (clipped there).
fn log_ratio(r: f64) -> f64 {
    r.log2() / 2.0
}

/// Label every `step`-th index so that at most `max` labels are shown (steps 1, 2, 4, 8, …).
fn label_step(n: usize, max: usize) -> usize {
    let mut step = 1usize;
    while n.div_ceil(step) > max && step < n {
        step = step.saturating_mul(2);
    }
    step
}

/// Vertical axis title rotated by −90° at (x, y).
fn ylabel(s: &mut Svg, x: f64, y: f64, label: &str) {
    s.text(
        x,
        y,
        label,
        13.0,
        Anchor::Middle,
        &format!(
            r#"class="axis-label" transform="rotate(-90 {} {})""#,
            num(x, 2),
            num(y, 2)
        ),
    );
}

/// A swatch with a label below the colour bar (e.g. black = dead expert).
fn swatch(s: &mut Svg, x: f64, y: f64, fill: &str, label: &str) {
    s.rect(
        x,
        y,
        12.0,
        12.0,
        fill,
        r##"stroke="#555555" stroke-width="0.8""##,
    );
    s.text(x + 17.0, y + 10.0, label, 11.0, Anchor::Start, "");
}

/// Space on the right of a heatmap for the colour bar, its tick labels and the swatches.
const CBAR_SPACE: f64 = 96.0;
/// Minimum space on the left of a heatmap for the row labels and the axis title.
const LEFT: f64 = 62.0;

/// Left edge of a heatmap `grid_w` px wide, centred (with its colour bar) in the figure.
fn centred_left(grid_w: f64) -> f64 {
    LEFT + ((FIG_WIDTH - LEFT - grid_w - CBAR_SPACE) / 2.0).max(0.0)
}

/// Load heatmap as a standalone document (`moe-xray health --svg`).
pub fn load_heatmap(report: &HealthReport) -> String {
    load_heatmap_titled(report, LOAD_ID, LOAD_TITLE)
}

fn load_heatmap_titled(report: &HealthReport, id: &str, title: &str) -> String {
    let (nl, ne) = (report.num_layers, report.num_experts);
    let desc = format!(
        "Share of the selections of each expert (columns) at each layer (rows) relative to the uniform share 1/{ne}: colour = log2(share · E) clipped to ±2, blue above and orange below the uniform share, black = dead expert (never selected)."
    );
    let top = 48.0;
    let cw = ((FIG_WIDTH - LEFT - CBAR_SPACE) / ne.max(1) as f64).min(40.0);
    // square cells when they fit, otherwise at most 320 px of rows
    let ch = (320.0 / nl.max(1) as f64).min(cw.max(24.0)).max(2.0);
    let (grid_w, grid_h) = (cw * ne as f64, ch * nl as f64);
    let left = centred_left(grid_w);
    let cb_h = grid_h.clamp(80.0, 260.0) - 14.0;
    let cb_bottom = top + 14.0 + cb_h;
    let height = (top + grid_h + 60.0).max(cb_bottom + 52.0);
    let mut s = Svg::new(id, FIG_WIDTH, height);
    s.title(title);
    s.raw(r#"<g class="cells">"#);
    for (row, layer) in report.layers.iter().enumerate() {
        let y = top + ch * row as f64;
        for (e, (&share, &load)) in layer.share.iter().zip(&layer.load).enumerate() {
            let fill = if load == 0.0 {
                "#000000".to_string()
            } else {
                diverging(log_ratio(share * ne as f64))
            };
            s.rect_titled(
                left + cw * e as f64,
                y,
                cw,
                ch,
                &fill,
                "",
                &format!("layer {} expert {e}: share {}", layer.layer, sig(share, 3)),
            );
        }
    }
    s.raw("</g>");
    let labels: Vec<usize> = report.layers.iter().map(|l| l.layer).collect();
    let cx = heatmap_frame(
        &mut s,
        id,
        (left, top, grid_w, grid_h),
        (nl, ch, "layer", Some(&labels)),
        (ne, cw, "expert"),
        cb_h,
        "share · E",
    );
    swatch(&mut s, cx, cb_bottom + 14.0, "#000000", "dead");
    s.finish(title, &desc)
}

/// The frame of a heatmap drawn at `(left, top)` with size `grid_w × grid_h`: its outline, row
/// labels (`rows` = count, cell height, axis label, label of each row when not its index) and
/// column labels (`cols` = count, cell height, axis label), at most 16
/// of each, the axis labels, and the diverging colour bar to its right. Returns the colour bar's x.
fn heatmap_frame(
    s: &mut Svg,
    id: &str,
    (left, top, grid_w, grid_h): (f64, f64, f64, f64),
    rows: (usize, f64, &str, Option<&[usize]>),
    cols: (usize, f64, &str),
    cb_h: f64,
    cb_label: &str,
) -> f64 {
    s.rect(
        left,
        top,
        grid_w,
        grid_h,
        "none",
        r##"stroke="#555555" stroke-width="0.8""##,
    );
    let (nr, rh, rlabel, names) = rows;
    for r in (0..nr).step_by(label_step(nr, 16)) {
        let name = names.and_then(|n| n.get(r).copied()).unwrap_or(r);
        s.text(
            left - 6.0,
            top + (r as f64 + 0.5) * rh + 4.0,
            &name.to_string(),
            11.0,
            Anchor::End,
            r#"class="row-label""#,
        );
    }
    let (nc, cw, clabel) = cols;
    for c in (0..nc).step_by(label_step(nc, 16)) {
        s.text(
            left + (c as f64 + 0.5) * cw,
            top + grid_h + 14.0,
            &c.to_string(),
            11.0,
            Anchor::Middle,
            r#"class="col-label""#,
        );
    }
    s.text(
        left + grid_w / 2.0,
        top + grid_h + 34.0,
        clabel,
        13.0,
        Anchor::Middle,
        r#"class="axis-label""#,
    );
    ylabel(s, left - 42.0, top + grid_h / 2.0, rlabel);
    let cx = left + grid_w + 24.0;
    diverging_colorbar(s, id, cx, top + 14.0, 14.0, cb_h, &ratio_ticks(), cb_label);
    cx
}

/// Co-activation heatmap of one layer as a standalone document: colour = log2(lift) clipped to
/// ±2, lift = observed / expected pair count (see `docs/health.md`); the diagonal is grey.
/// `None` when `coact` is not an E × E matrix or the layer is out of range or empty. `row` is the
/// layer's row in `report.layers` (ids and titles name its decoder-layer index).
pub fn coactivation_heatmap(report: &HealthReport, coact: &[u64], row: usize) -> Option<String> {
    let layer = report.layers.get(row)?.layer;
    coactivation_heatmap_titled(
        report,
        coact,
        row,
        &coactivation_id(layer),
        &coactivation_title(layer),
    )
}

fn coactivation_heatmap_titled(
    report: &HealthReport,
    coact: &[u64],
    row: usize,
    id: &str,
    title: &str,
) -> Option<String> {
    let ne = report.num_experts;
    let lh = report.layers.get(row)?;
    let layer = lh.layer;
    if Some(coact.len()) != ne.checked_mul(ne) || lh.tokens == 0 || lh.load.len() != ne {
        return None;
    }
    let desc = format!(
        "log2 lift of each expert pair at layer {layer}: tokens selecting both experts over the count expected if they were selected independently at their observed rates, clipped to ±2 (blue = together more often, orange = less often); diagonal grey."
    );
    let top = 48.0;
    let cell = ((FIG_WIDTH - LEFT - CBAR_SPACE) / ne.max(1) as f64).min(40.0);
    let side = cell * ne as f64;
    let left = centred_left(side);
    let cb_h = side.clamp(80.0, 260.0) - 14.0;
    let cb_bottom = top + 14.0 + cb_h;
    let height = (top + side + 60.0).max(cb_bottom + 70.0);
    let mut s = Svg::new(id, FIG_WIDTH, height);
    s.title(title);
    let t = lh.tokens as f64;
    let mut unused = false;
    s.raw(r#"<g class="cells">"#);
    for i in 0..ne {
        for j in 0..ne {
            let c = coact[i * ne + j];
            let expected = lh.load[i] * lh.load[j] / t;
            let (fill, tip) = if i == j {
                (
                    DIAGONAL_GREY.to_string(),
                    format!("expert {i}: selected by {c} tokens"),
                )
            } else if expected <= 0.0 {
                unused = true;
                (
                    "#ffffff".to_string(),
                    format!("experts {i}, {j}: an expert is never selected"),
                )
            } else {
                let lift = c as f64 / expected;
                let fill = if c == 0 {
                    diverging(-1.0)
                } else {
                    diverging(log_ratio(lift))
                };
                (
                    fill,
                    format!("experts {i}, {j}: {c} tokens, lift {}", sig(lift, 3)),
                )
            };
            s.rect_titled(
                left + cell * j as f64,
                top + cell * i as f64,
                cell,
                cell,
                &fill,
                "",
                &tip,
            );
        }
    }
    s.raw("</g>");
    let cx = heatmap_frame(
        &mut s,
        id,
        (left, top, side, side),
        (ne, cell, "expert i", None),
        (ne, cell, "expert j"),
        cb_h,
        "lift",
    );
    swatch(&mut s, cx, cb_bottom + 14.0, DIAGONAL_GREY, "diagonal");
    if unused {
        swatch(&mut s, cx, cb_bottom + 32.0, "#ffffff", "dead expert");
    }
    Some(s.finish(title, &desc))
}

/// Per-layer Jensen–Shannon divergence bars (bits) of a comparison (`moe-xray compare --svg`),
/// with the `--fail-above` threshold as a dashed vermillion line when set.
pub fn js_bars(report: &CompareReport) -> String {
    let id = JS_ID;
    let title = JS_TITLE;
    let nl = report.per_layer.len();
    let desc = format!(
        "Jensen–Shannon divergence (bits) between the pooled expert-load distributions of run A ({}) and run B ({}) at each of {nl} layers{}.",
        report.run_a.label,
        report.run_b.label,
        report
            .fail_above
            .map(|t| format!("; dashed line: --fail-above {}", short(t)))
            .unwrap_or_default()
    );
    let mut top_val = report.max_js_bits.max(report.fail_above.unwrap_or(0.0)) * 1.1;
    if !top_val.is_finite() || top_val <= 0.0 {
        top_val = 0.01;
    }
    let (ticks, dec) = nice_ticks(0.0, top_val.min(1.0), 5);
    let ax = Axes {
        left: 84.0,
        top: 48.0,
        width: FIG_WIDTH - 84.0 - 30.0,
        height: 280.0,
        xmin: -0.5,
        xmax: nl.max(1) as f64 - 0.5,
        ymin: 0.0,
        ymax: *ticks.last().unwrap_or(&1.0),
    };
    let step = label_step(nl, 16);
    let xt: Vec<(f64, String)> = (0..nl)
        .step_by(step)
        .map(|l| (l as f64, l.to_string()))
        .collect();
    let yt: Vec<(f64, String)> = ticks.iter().map(|t| (*t, num(*t, dec))).collect();
    let mut s = Svg::new(id, FIG_WIDTH, 400.0);
    s.title(title);
    ax.draw(&mut s, &xt, &yt, "MoE layer", "JS divergence (bits)");
    let slot = ax.width / nl.max(1) as f64;
    s.raw(r#"<g class="bars">"#);
    for (i, l) in report.per_layer.iter().enumerate() {
        let v = if l.js_bits.is_finite() {
            l.js_bits.clamp(0.0, ax.ymax)
        } else {
            0.0
        };
        let x = ax.x(i as f64) - slot * 0.35;
        let y = ax.y(v);
        s.rect_titled(
            x,
            y,
            slot * 0.7,
            ax.bottom() - y,
            OKABE_ITO[0],
            r#"class="bar""#,
            &format!("layer {}: JS {} bits", l.layer, sig(l.js_bits, 3)),
        );
    }
    s.raw("</g>");
    if let Some(t) = report.fail_above.filter(|t| t.is_finite()) {
        let y = ax.y(t.clamp(0.0, ax.ymax));
        s.line_extra(
            ax.left,
            y,
            ax.right(),
            y,
            OKABE_ITO[3],
            2.0,
            r#"stroke-dasharray="6 4" class="threshold""#,
        );
        s.text(
            ax.right() - 4.0,
            y - 5.0,
            &format!("fail above {}", short(t)),
            11.0,
            Anchor::End,
            &format!(r#"fill="{}""#, OKABE_ITO[3]),
        );
    }
    s.finish(title, &desc)
}

/// The routing-health figures of the report, numbered after the study's figures: the load
/// heatmap and the co-activation heatmap of row `row` of `report.layers` (named by its
/// decoder-layer index; unavailable, with the reason, for counts-mode input or an out-of-range
/// row).
pub fn report_figures(acc: &HealthAccumulator, report: &HealthReport, row: usize) -> Vec<Figure> {
    let layer = report.layers.get(row).map_or(row, |l| l.layer);
    let n = NUM_STUDY_FIGURES + 1;
    let title = format!("Figure {n}. Expert load by layer");
    let caption = format!(
        "Share of the selections of each expert (columns) at each layer (rows) relative to the uniform share 1/{}: log2(share · E) clipped to ±2, blue above and orange below the uniform share, black = dead expert (never selected). Mean normalised load entropy {}, {} dead and {} cold (layer, expert) pairs.",
        report.num_experts,
        sig(report.overall.mean_normalized_entropy, 3),
        report.overall.dead_experts,
        report.overall.cold_experts
    );
    let load = Figure {
        id: LOAD_ID.to_string(),
        svg: load_heatmap_titled(report, LOAD_ID, &title),
        title,
        caption,
        available: true,
    };
    let id = coactivation_id(layer);
    let title = format!("Figure {}. Expert co-activation at layer {layer}", n + 1);
    let caption = "log2 lift of each expert pair: tokens selecting both experts over the count expected if they were selected independently at their observed rates, clipped to ±2 (blue = together more often, orange = less often; diagonal grey). Under uniform random top-k routing every pair has lift (k−1)E / (k(E−1)) < 1.";
    let co = acc
        .coactivation(row)
        .and_then(|c| coactivation_heatmap_titled(report, c, row, &id, &title));
    let co = match co {
        Some(svg) => Figure {
            id,
            title,
            caption: caption.to_string(),
            svg,
            available: true,
        },
        None => {
            let why = if acc.has_coactivation() {
                format!("layer {layer} has no routed tokens or does not exist")
            } else {
                "co-activation needs per-token traces (records or flat events), not counts"
                    .to_string()
            };
            unavailable(&id, &title, caption, &why)
        }
    };
    vec![load, co]
}

#[cfg(test)]
mod tests {
    use super::*;
    use moe_xray_health::{HealthOptions, TokenRouting};
    use moe_xray_trace::TokenType;

    fn acc() -> HealthAccumulator {
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
        acc
    }

    #[test]
    fn figures_are_well_formed_and_deterministic() {
        let acc = acc();
        let r = acc.report();
        let a = load_heatmap(&r);
        assert!(a.starts_with("<svg") && a.trim_end().ends_with("</svg>"));
        let cells = a.split(r#"<g class="cells">"#).nth(1).unwrap();
        let cells = cells.split("</g>").next().unwrap();
        assert_eq!(cells.matches("<rect ").count(), 8, "2 layers × 4 experts");
        assert!(
            cells.contains(r##"fill="#000000""##),
            "dead experts are black"
        );
        assert_eq!(a, load_heatmap(&r));
        assert!(a.contains(r#"id="health-load_heatmap""#));
        let c = coactivation_heatmap(&r, acc.coactivation(0).unwrap(), 0).unwrap();
        assert!(c.contains("layer 0"));
        assert!(coactivation_heatmap(&r, acc.coactivation(0).unwrap(), 5).is_none());
        assert!(coactivation_heatmap(&r, &[1, 2, 3], 0).is_none());
        let figs = report_figures(&acc, &r, 1);
        assert_eq!(figs.len(), 2);
        assert!(figs.iter().all(|f| f.available && f.svg.contains(&f.id)));
        assert!(figs[0].title.starts_with("Figure 8. "));
        assert!(figs[1].title.starts_with("Figure 9. "));
        let missing = report_figures(&acc, &r, 7);
        assert!(!missing[1].available);
        assert!(missing[1].caption.contains("layer 7"));
    }

    #[test]
    fn label_steps_stay_readable() {
        assert_eq!(label_step(8, 16), 1);
        assert_eq!(label_step(16, 16), 1);
        assert_eq!(label_step(64, 16), 4);
        assert_eq!(label_step(100, 16), 8);
        assert_eq!(label_step(0, 16), 1);
    }
}
