//! Figures of the causal expert ablation (`moe-xray ablate --svg`): the effect matrix (ablated ×
//! evaluated category, the causal analogue of the category-similarity matrix) and the
//! dose-response curve (effect against the number of masked experts per layer).

use moe_xray_stats::ablation::AblationResults;

use crate::figures::FIG_WIDTH;
use crate::svg::{
    diverging, diverging_colorbar, esc, legend, legend_width, nice_ticks, num, short, Anchor, Axes,
    LegendItem, LegendKind, Shape, Svg, OKABE_ITO,
};

/// Element id of the effect-matrix figure.
pub const EFFECT_MATRIX_ID: &str = "fig-ablation-matrix";
/// Element id of the dose-response figure.
pub const DOSE_RESPONSE_ID: &str = "fig-ablation-dose";

/// Heatmap of dose `dose`'s `excess` ΔNLL (characteristic minus load-matched random, nats per
/// token) per (ablated, evaluated) category; the colour scale is symmetric around 0 with the
/// largest |excess| at its ends; cells show the value and the permutation p. `None` if there is
/// no such dose.
pub fn effect_matrix(r: &AblationResults, dose: usize) -> Option<String> {
    let d = r.doses.get(dose)?;
    let nc = r.categories.len();
    if nc == 0 || d.cells.len() != nc * nc {
        return None;
    }
    let scale = d
        .cells
        .iter()
        .map(|c| c.excess.mean.abs())
        .filter(|x| x.is_finite())
        .fold(0.0f64, f64::max)
        .max(1e-12);
    let cell = (360.0 / nc as f64).clamp(28.0, 90.0);
    let (left, top) = (110.0, 70.0);
    let gw = cell * nc as f64;
    let width = (left + gw + 130.0).max(FIG_WIDTH);
    let height = top + gw + 70.0;
    let title = format!(
        "Causal effect matrix: excess ΔNLL, {} experts per layer masked",
        d.n
    );
    let desc = format!(
        "Rows: category whose {} most characteristic experts per MoE layer are masked; columns: category whose prompts are scored. Colour and number: mean change of next-token NLL (nats per continuation token) minus that of load-matched random experts ({} draws); p: one-sided paired permutation p-value. A category-specific causal role shows as a positive diagonal.",
        d.n, r.settings.control_draws
    );
    let mut s = Svg::new(EFFECT_MATRIX_ID, width, height);
    s.title(&title);
    for (a, ca) in r.categories.iter().enumerate() {
        for (e, ce) in r.categories.iter().enumerate() {
            let c = &d.cells[a * nc + e];
            let (x, y) = (left + e as f64 * cell, top + a as f64 * cell);
            let tip = format!(
                "{ca} masked → {ce} prompts: excess {} [{}, {}], ΔNLL {} (random {}), p {}",
                short(c.excess.mean),
                short(c.excess.ci95[0]),
                short(c.excess.ci95[1]),
                short(c.delta_nll.mean),
                short(c.delta_nll_random.mean),
                short(c.p_excess)
            );
            s.rect_titled(
                x,
                y,
                cell,
                cell,
                &diverging(c.excess.mean / scale),
                r##"class="cell" stroke="#ffffff""##,
                &tip,
            );
            if cell >= 40.0 {
                let ink = if (c.excess.mean / scale).abs() > 0.6 {
                    r##"fill="#ffffff""##
                } else {
                    r##"fill="#222222""##
                };
                s.text(
                    x + cell / 2.0,
                    y + cell / 2.0,
                    &num(c.excess.mean, 3),
                    11.0,
                    Anchor::Middle,
                    ink,
                );
                s.text(
                    x + cell / 2.0,
                    y + cell / 2.0 + 13.0,
                    &format!("p {}", num(c.p_excess, 3)),
                    9.0,
                    Anchor::Middle,
                    ink,
                );
            }
        }
        s.text(
            left - 6.0,
            top + (a as f64 + 0.5) * cell + 4.0,
            &esc(ca),
            12.0,
            Anchor::End,
            r##"fill="#222222""##,
        );
        s.text(
            left + (a as f64 + 0.5) * cell,
            top - 8.0,
            &esc(ca),
            12.0,
            Anchor::Middle,
            r##"fill="#222222""##,
        );
    }
    s.text(
        left + gw / 2.0,
        top + gw + 24.0,
        "evaluated category (prompts scored)",
        13.0,
        Anchor::Middle,
        r#"class="axis-label""#,
    );
    s.text(
        16.0,
        top - 30.0,
        "rows: ablated category",
        12.0,
        Anchor::Start,
        r#"class="axis-label""#,
    );
    let ticks = vec![
        (-1.0, short(-scale)),
        (0.0, "0".to_string()),
        (1.0, short(scale)),
    ];
    diverging_colorbar(
        &mut s,
        "ablation-cb",
        left + gw + 30.0,
        top,
        14.0,
        gw.min(240.0),
        &ticks,
        "excess ΔNLL",
    );
    Some(s.finish(&title, &desc))
}

/// ΔNLL against the dose (experts masked per layer): own category (diagonal) and other categories
/// (off-diagonal) with the characteristic experts, and own category with load-matched random ones.
pub fn dose_response(r: &AblationResults) -> String {
    let xs: Vec<f64> = r.doses.iter().map(|d| d.n as f64).collect();
    let own: Vec<f64> = r.doses.iter().map(|d| d.diagonal_delta_nll).collect();
    let other: Vec<f64> = r.doses.iter().map(|d| d.off_diagonal_delta_nll).collect();
    let random: Vec<f64> = r
        .doses
        .iter()
        .map(|d| d.diagonal_delta_nll - d.diagonal_excess)
        .collect();
    let all = own
        .iter()
        .chain(&other)
        .chain(&random)
        .copied()
        .filter(|x| x.is_finite());
    let lo = all.clone().fold(0.0f64, f64::min);
    let hi = all.fold(0.0f64, f64::max);
    let hi = if hi > lo { hi } else { lo + 1.0 };
    let (yt, yd) = nice_ticks(lo, hi, 5);
    let xmax = xs.iter().copied().fold(1.0f64, f64::max);
    let (xt, _) = nice_ticks(0.0, xmax, 5);
    let ax = Axes {
        left: 84.0,
        top: 56.0,
        width: 380.0,
        height: 300.0,
        xmin: 0.0,
        xmax: *xt.last().unwrap_or(&xmax),
        ymin: *yt.first().unwrap_or(&lo),
        ymax: *yt.last().unwrap_or(&hi),
    };
    let title = "Dose-response: ΔNLL against experts masked per layer".to_string();
    let desc = format!(
        "Mean change of next-token NLL (nats per continuation token) when each category's n most characteristic experts per MoE layer are masked, on its own prompts (blue) and on the other categories' prompts (orange), and when as many load-matched random experts are masked (grey, own prompts); doses {:?}.",
        r.settings.doses
    );
    let mut s = Svg::new(DOSE_RESPONSE_ID, FIG_WIDTH, 420.0);
    s.title(&title);
    let xticks: Vec<(f64, String)> = xt.iter().map(|t| (*t, num(*t, 0))).collect();
    let yticks: Vec<(f64, String)> = yt.iter().map(|t| (*t, num(*t, yd))).collect();
    ax.draw(
        &mut s,
        &xticks,
        &yticks,
        "experts masked per layer (n)",
        "ΔNLL (nats / token)",
    );
    let series = [
        ("own", &own, OKABE_ITO[0], Shape::Circle, false),
        ("other", &other, OKABE_ITO[1], Shape::Square, false),
        ("random", &random, "#888888", Shape::Diamond, true),
    ];
    for (cls, ys, color, shape, dashed) in series {
        let pts: Vec<(f64, f64)> = xs
            .iter()
            .zip(ys.iter())
            .filter(|(_, y)| y.is_finite())
            .map(|(&x, &y)| (ax.x(x), ax.y(y)))
            .collect();
        s.raw(&format!(r#"<g class="{cls}">"#));
        s.polyline(
            &pts,
            color,
            2.0,
            if dashed {
                r#"stroke-dasharray="5 4""#
            } else {
                ""
            },
        );
        for &(x, y) in &pts {
            s.marker(shape, x, y, 3.5, color, "pt");
        }
        s.raw("</g>");
    }
    let items = [
        LegendItem {
            label: "own category".into(),
            color: OKABE_ITO[0].into(),
            kind: LegendKind::Line {
                dashed: false,
                marker: true,
            },
        },
        LegendItem {
            label: "other categories".into(),
            color: OKABE_ITO[1].into(),
            kind: LegendKind::Line {
                dashed: false,
                marker: true,
            },
        },
        LegendItem {
            label: "load-matched random".into(),
            color: "#888888".into(),
            kind: LegendKind::Line {
                dashed: true,
                marker: true,
            },
        },
    ];
    let lx = (ax.right() + 16.0).min(FIG_WIDTH - legend_width("masked", &items) - 4.0);
    legend(&mut s, lx, ax.top, "masked", &items);
    s.finish(&title, &desc)
}
