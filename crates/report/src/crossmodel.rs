//! Figures of the cross-model comparison (`moe-xray compare-models --svg-dir DIR`), drawn with
//! the one SVG toolkit (`svg.rs`):
//! - [`rsa_scatter`]: every pair i<j of shared prompts as a point (similarity in A, similarity in
//!   B), within-category pairs in blue, across-category pairs in orange;
//! - [`layer_heatmap`]: the L_A × L_B matrix of per-layer CKA (viridis, 0…1) or RSA (diverging,
//!   −1…1).

use moe_xray_stats::crossmodel::CrossModelReport;

use crate::figures::FIG_WIDTH;
use crate::svg::{
    colorbar, diverging, diverging_colorbar, legend, legend_width, nice_ticks, num, sig, viridis,
    Anchor, Axes, LegendItem, LegendKind, Shape, Svg, DIAGONAL_GREY, OKABE_ITO,
};

/// At most this many points are drawn in the scatter (every k-th pair beyond it).
pub const MAX_SCATTER_POINTS: usize = 20_000;

/// Element id of the RSA scatter.
pub const RSA_SCATTER_ID: &str = "fig-crossmodel-rsa";

fn fmt_opt(x: Option<f64>, digits: usize) -> String {
    x.map(|v| sig(v, digits))
        .unwrap_or_else(|| "undefined".into())
}

/// Scatter of the two models' prompt-pair similarities (`sim_a[k]`, `sim_b[k]`; `within[k]`
/// whether pair k is within one category). Returns the SVG document.
pub fn rsa_scatter(
    report: &CrossModelReport,
    sim_a: &[f64],
    sim_b: &[f64],
    within: &[bool],
) -> String {
    let n = sim_a.len().min(sim_b.len()).min(within.len());
    let step = n.div_ceil(MAX_SCATTER_POINTS).max(1);
    let finite = |v: &[f64]| {
        let it = v[..n].iter().copied().filter(|x| x.is_finite());
        let lo = it.clone().fold(f64::INFINITY, f64::min);
        let hi = it.fold(f64::NEG_INFINITY, f64::max);
        if lo.is_finite() && hi > lo {
            (lo, hi)
        } else if lo.is_finite() {
            (lo - 0.5, lo + 0.5)
        } else {
            (0.0, 1.0)
        }
    };
    let (xlo, xhi) = finite(sim_a);
    let (ylo, yhi) = finite(sim_b);
    let (xt, xd) = nice_ticks(xlo, xhi, 5);
    let (yt, yd) = nice_ticks(ylo, yhi, 5);
    let ax = Axes {
        left: 84.0,
        top: 56.0,
        width: 380.0,
        height: 320.0,
        xmin: *xt.first().unwrap_or(&xlo),
        xmax: *xt.last().unwrap_or(&xhi),
        ymin: *yt.first().unwrap_or(&ylo),
        ymax: *yt.last().unwrap_or(&yhi),
    };
    let mantel_p = report.rsa.mantel.done().map(|m| m.p);
    let title = format!(
        "RSA: Spearman {} (Mantel p {}), linear CKA {}",
        fmt_opt(report.rsa.spearman, 3),
        fmt_opt(mantel_p, 3),
        fmt_opt(report.cka, 3)
    );
    let desc = format!(
        "Similarity of each pair of the {} shared prompts under model A ({}) against model B ({}); {} pairs{}. Within-category pairs blue circles, across-category pairs orange squares.",
        report.shared_prompts,
        report.model_a.label,
        report.model_b.label,
        n,
        if step > 1 {
            format!(", every {step}th drawn")
        } else {
            String::new()
        }
    );
    let mut s = Svg::new(RSA_SCATTER_ID, FIG_WIDTH, 440.0);
    s.title(&title);
    let xticks: Vec<(f64, String)> = xt.iter().map(|t| (*t, num(*t, xd))).collect();
    let yticks: Vec<(f64, String)> = yt.iter().map(|t| (*t, num(*t, yd))).collect();
    ax.draw(
        &mut s,
        &xticks,
        &yticks,
        "similarity in model A",
        "similarity in model B",
    );
    for (cls, want, color, shape) in [
        ("across", false, OKABE_ITO[1], Shape::Square),
        ("within", true, OKABE_ITO[0], Shape::Circle),
    ] {
        s.raw(&format!(r#"<g class="{cls}">"#));
        for k in (0..n).step_by(step) {
            if within[k] != want || !sim_a[k].is_finite() || !sim_b[k].is_finite() {
                continue;
            }
            s.marker(shape, ax.x(sim_a[k]), ax.y(sim_b[k]), 2.5, color, "pt");
        }
        s.raw("</g>");
    }
    let items = [
        LegendItem {
            label: "within category".into(),
            color: OKABE_ITO[0].into(),
            kind: LegendKind::Marker(Shape::Circle),
        },
        LegendItem {
            label: "across".into(),
            color: OKABE_ITO[1].into(),
            kind: LegendKind::Marker(Shape::Square),
        },
    ];
    let lx = (ax.right() + 16.0).min(FIG_WIDTH - legend_width("pairs", &items) - 4.0);
    legend(&mut s, lx, ax.top, "pairs", &items);
    s.finish(&title, &desc)
}

/// Heatmap of the per-layer `"cka"` or `"rsa"` matrix (rows: A's MoE layers, columns: B's,
/// labelled by decoder index). `None` when the per-layer section was skipped or `which` is
/// neither.
pub fn layer_heatmap(report: &CrossModelReport, which: &str) -> Option<String> {
    let pl = report.per_layer.done()?;
    let (m, name) = match which {
        "cka" => (&pl.cka, "linear CKA"),
        "rsa" => (&pl.rsa, "RSA (Spearman)"),
        _ => return None,
    };
    let (nr, nc) = (pl.layers_a.len(), pl.layers_b.len());
    let id = format!("fig-crossmodel-layer-{which}");
    let cell = (420.0 / nr.max(nc).max(1) as f64).clamp(4.0, 40.0);
    let (left, top) = (84.0, 56.0);
    let (gw, gh) = (cell * nc as f64, cell * nr as f64);
    let width = (left + gw + 110.0).max(FIG_WIDTH);
    let height = top + gh + 60.0;
    let title = format!("Per-layer {name}: model A layer × model B layer");
    let desc = format!(
        "{name} of the signatures at each MoE layer of model A ({}, rows) with each MoE layer of model B ({}, columns); decoder-layer indices; grey: undefined.",
        report.model_a.label, report.model_b.label
    );
    let mut s = Svg::new(&id, width, height);
    s.title(&title);
    s.raw(r#"<g class="cells">"#);
    for (r, row) in m.iter().enumerate() {
        for (c, v) in row.iter().enumerate() {
            let fill = match v {
                Some(v) if which == "cka" => viridis(*v),
                Some(v) => diverging(*v),
                None => DIAGONAL_GREY.to_string(),
            };
            s.rect_titled(
                left + c as f64 * cell,
                top + r as f64 * cell,
                cell,
                cell,
                &fill,
                r#"class="cell""#,
                &format!(
                    "A layer {} × B layer {}: {}",
                    pl.layers_a[r],
                    pl.layers_b[c],
                    fmt_opt(*v, 4)
                ),
            );
        }
    }
    s.raw("</g>");
    s.rect(
        left,
        top,
        gw,
        gh,
        "none",
        r##"stroke="#555555" stroke-width="0.8""##,
    );
    let step = |n: usize| n.div_ceil(16).max(1);
    for r in (0..nr).step_by(step(nr)) {
        s.text(
            left - 6.0,
            top + (r as f64 + 0.5) * cell + 4.0,
            &pl.layers_a[r].to_string(),
            11.0,
            Anchor::End,
            r#"class="row-label""#,
        );
    }
    for c in (0..nc).step_by(step(nc)) {
        s.text(
            left + (c as f64 + 0.5) * cell,
            top + gh + 14.0,
            &pl.layers_b[c].to_string(),
            11.0,
            Anchor::Middle,
            r#"class="col-label""#,
        );
    }
    s.text(
        left + gw / 2.0,
        top + gh + 34.0,
        "model B layer",
        13.0,
        Anchor::Middle,
        r#"class="axis-label""#,
    );
    let (yx, yy) = (left - 40.0, top + gh / 2.0);
    s.text(
        yx,
        yy,
        "model A layer",
        13.0,
        Anchor::Middle,
        &format!(
            r#"class="axis-label" transform="rotate(-90 {} {})""#,
            num(yx, 1),
            num(yy, 1)
        ),
    );
    let cbx = left + gw + 24.0;
    let cbh = gh.clamp(80.0, 240.0);
    if which == "cka" {
        colorbar(&mut s, &id, cbx, top, 14.0, cbh, 0.0, 1.0, "CKA");
    } else {
        let ticks: Vec<(f64, String)> = [-1.0, -0.5, 0.0, 0.5, 1.0]
            .iter()
            .map(|t| (*t, num(*t, 1)))
            .collect();
        diverging_colorbar(&mut s, &id, cbx, top, 14.0, cbh, &ticks, "Spearman");
    }
    Some(s.finish(&title, &desc))
}

#[cfg(test)]
mod tests {
    use super::*;
    use moe_xray_stats::crossmodel::{
        compare_signatures, CategoryComparison, CrossModelOptions, ModelInfo, Pair, Side,
    };
    use moe_xray_stats::results::Section;

    fn report() -> (CrossModelReport, Vec<f64>, Vec<f64>, Vec<bool>) {
        let n = 9;
        let labels: Vec<usize> = (0..n).map(|i| i % 3).collect();
        // A: 2 layers × 3 experts, B: 3 layers × 2 experts; category c prefers expert c % E.
        let sig = |l: usize, e: usize| -> Vec<f64> {
            let mut s = Vec::new();
            for (i, &c) in labels.iter().enumerate() {
                for layer in 0..l {
                    let mut row: Vec<f64> = (0..e)
                        .map(|x| {
                            1.0 + (x == c % e) as u8 as f64 * 3.0
                                + ((i + layer + x) % 3) as f64 * 0.1
                        })
                        .collect();
                    let t: f64 = row.iter().sum();
                    row.iter_mut().for_each(|v| *v /= t);
                    s.extend(row);
                }
            }
            s
        };
        let (sa, sb) = (sig(2, 3), sig(3, 2));
        let cats: Vec<String> = ["a", "b", "c"].iter().map(|s| s.to_string()).collect();
        let c = compare_signatures(
            &Side {
                num_layers: 2,
                num_experts: 3,
                layers: &[0, 1],
                signatures: &sa,
            },
            &Side {
                num_layers: 3,
                num_experts: 2,
                layers: &[1, 2, 3],
                signatures: &sb,
            },
            n,
            &labels,
            &cats,
            &CrossModelOptions { reps: 50, seed: 0 },
        )
        .unwrap();
        let info = |l: usize, e: usize| ModelInfo {
            label: format!("m{l}x{e} <&>"),
            model: None,
            family: None,
            num_layers: l,
            num_experts: e,
            top_k: 1,
            layers: (0..l).collect(),
            num_prompts: n,
        };
        let mut within = Vec::new();
        for i in 0..n {
            for j in i + 1..n {
                within.push(labels[i] == labels[j]);
            }
        }
        let none = Pair { a: None, b: None };
        let r = CrossModelReport {
            schema_version: 1,
            tool_version: "test".into(),
            model_a: info(2, 3),
            model_b: info(3, 2),
            shared_prompts: n,
            only_in_a: vec![],
            only_in_b: vec![],
            same_architecture: false,
            rsa: c.rsa,
            cka: c.cka,
            per_layer: c.per_layer,
            categories: CategoryComparison {
                cohens_d: none,
                cohens_d_shared: c.cohens_d_shared,
                accuracy: none,
                chance: none,
                macro_f1: none,
                per_category: vec![],
            },
            expert_matching: c.expert_matching,
            matched_drift: Section::skipped("test"),
        };
        (r, c.sim_a_upper, c.sim_b_upper, within)
    }

    #[test]
    fn scatter_draws_every_pair_in_its_class() {
        let (r, a, b, w) = report();
        let svg = rsa_scatter(&r, &a, &b, &w);
        let doc = roxmltree::Document::parse(&svg).unwrap();
        let count = |cls: &str| {
            doc.descendants()
                .find(|n| n.attribute("class") == Some(cls))
                .map(|g| g.children().filter(|c| c.is_element()).count())
                .unwrap()
        };
        let nw = w.iter().filter(|x| **x).count();
        assert_eq!(count("within"), nw);
        assert_eq!(count("across"), w.len() - nw);
        assert!(svg.contains("m2x3 &lt;&amp;&gt;"), "labels are escaped");
        assert_eq!(svg, rsa_scatter(&r, &a, &b, &w), "deterministic");
    }

    #[test]
    fn layer_heatmaps_have_one_cell_per_layer_pair() {
        let (mut r, ..) = report();
        for which in ["cka", "rsa"] {
            let svg = layer_heatmap(&r, which).unwrap();
            let doc = roxmltree::Document::parse(&svg).unwrap();
            let cells = doc
                .descendants()
                .filter(|n| n.attribute("class") == Some("cell"))
                .count();
            assert_eq!(cells, 2 * 3, "{which}");
            assert!(
                svg.contains("B layer 3"),
                "decoder indices label the columns"
            );
        }
        assert!(layer_heatmap(&r, "other").is_none());
        r.per_layer = Section::skipped("too large");
        assert!(layer_heatmap(&r, "cka").is_none());
    }
}
