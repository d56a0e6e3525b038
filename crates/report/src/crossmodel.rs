//! Figures of the cross-model comparison (`moe-xray compare-models --svg-dir DIR`), drawn with
//! the one SVG toolkit (`svg.rs`):
//! - [`rsa_scatter`]: every pair i<j of shared prompts as a point (similarity in A, similarity in
//!   B), within-category pairs in blue, across-category pairs in orange;
//! - [`layer_heatmap`]: the L_A × L_B matrix of per-layer CKA (viridis, 0…1) or RSA (diverging,
//!   −1…1);
//! - [`render_html`]: the comparison's self-contained `report.html` (`compare-models --out DIR`),
//!   on the study report's page skeleton and CSS, with these figures inline and captioned.

use std::fmt::Write as _;

use moe_xray_stats::crossmodel::{CrossModelReport, Pair};
use moe_xray_stats::results::Section;

use crate::figures::FIG_WIDTH;
use crate::html::{figure_html, page_close, page_open};
use crate::svg::{
    colorbar, diverging, diverging_colorbar, esc, legend, legend_width, nice_ticks, num, sig,
    viridis, Anchor, Axes, LegendItem, LegendKind, Shape, Svg, DIAGONAL_GREY, OKABE_ITO,
};
use crate::Figure;

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

/// Element id of the matched-drift figure of the two-run page.
pub const DRIFT_ID: &str = "fig-crossmodel-drift";

/// Grouped bars of the per-layer JS divergence (bits) of the pooled expert loads with B's
/// experts as numbered and after the matching (`matched_drift`), one group per MoE layer
/// (decoder index). `id` is the SVG element id. `None` when the matched drift was not computed.
pub fn drift_figure(report: &CrossModelReport, id: &str) -> Option<String> {
    let d = report.matched_drift.done()?;
    let (u, m) = (&d.unmatched.js_bits, &d.matched.js_bits);
    let nl = u.len().min(m.len());
    let layers: Vec<usize> = match report.expert_matching.done() {
        Some(em) if em.layers.len() == nl => em.layers.iter().map(|l| l.layer).collect(),
        _ => report.model_a.layers.iter().copied().take(nl).collect(),
    };
    let hi = u[..nl]
        .iter()
        .chain(&m[..nl])
        .copied()
        .filter(|x| x.is_finite())
        .fold(0.0, f64::max);
    let (yt, yd) = nice_ticks(0.0, if hi > 0.0 { hi } else { 1.0 }, 5);
    let plot_w = (nl as f64 * 28.0).clamp(240.0, 560.0);
    let ax = Axes {
        left: 84.0,
        top: 56.0,
        width: plot_w,
        height: 240.0,
        xmin: 0.0,
        xmax: nl.max(1) as f64,
        ymin: 0.0,
        ymax: *yt.last().unwrap_or(&1.0),
    };
    let items = [
        LegendItem {
            label: "experts as numbered".into(),
            color: OKABE_ITO[1].into(),
            kind: LegendKind::Marker(Shape::Square),
        },
        LegendItem {
            label: "experts matched".into(),
            color: OKABE_ITO[0].into(),
            kind: LegendKind::Marker(Shape::Square),
        },
    ];
    let width = (ax.right() + 24.0 + legend_width("B's experts", &items)).max(FIG_WIDTH);
    let title = format!(
        "Matched drift: mean JS {} → {} bits",
        sig(d.unmatched.mean_js_bits, 3),
        sig(d.matched.mean_js_bits, 3)
    );
    let desc = format!(
        "Per-layer Jensen–Shannon divergence (bits) of the pooled expert loads of model A ({}) and model B ({}), with B's experts as numbered (orange) and relabelled by the Hungarian matching (blue), over {nl} MoE layers.",
        report.model_a.label, report.model_b.label
    );
    let mut s = Svg::new(id, width, 360.0);
    s.title(&title);
    let step = nl.div_ceil(16).max(1);
    let xticks: Vec<(f64, String)> = (0..nl)
        .step_by(step)
        .map(|l| {
            (
                l as f64 + 0.5,
                layers.get(l).map(|x| x.to_string()).unwrap_or_default(),
            )
        })
        .collect();
    let yticks: Vec<(f64, String)> = yt.iter().map(|t| (*t, num(*t, yd))).collect();
    ax.draw(
        &mut s,
        &xticks,
        &yticks,
        "MoE layer (decoder index)",
        "JS divergence (bits)",
    );
    let slot = ax.width / nl.max(1) as f64;
    let bw = slot * 0.38;
    for (cls, vals, color, off, what) in [
        ("unmatched", u, OKABE_ITO[1], 0.1, "as numbered"),
        ("matched", m, OKABE_ITO[0], 0.52, "matched"),
    ] {
        s.raw(&format!(r#"<g class="{cls}">"#));
        for (l, &x) in vals.iter().enumerate().take(nl) {
            let v = if x.is_finite() { x.max(0.0) } else { 0.0 };
            let (y0, y1) = (ax.y(0.0), ax.y(v));
            s.rect_titled(
                ax.left + (l as f64 + off) * slot,
                y1,
                bw,
                (y0 - y1).max(0.0),
                color,
                r#"class="bar""#,
                &format!(
                    "layer {}, {what}: {} bits",
                    layers.get(l).copied().unwrap_or(l),
                    sig(x, 4)
                ),
            );
        }
        s.raw("</g>");
    }
    legend(&mut s, ax.right() + 24.0, ax.top, "B's experts", &items);
    Some(s.finish(&title, &desc))
}

/// The matched-drift figure with its caption (`None` when the drift was not computed).
pub fn drift_fig(report: &CrossModelReport, id: &str) -> Option<Figure> {
    Some(Figure {
        id: id.to_string(),
        title: "Matched drift per layer".into(),
        caption: "Jensen–Shannon divergence (bits) between the two models' pooled expert loads at each MoE layer, with model B's experts as numbered (orange) and after relabelling them by the Hungarian matching of usage profiles (blue). The part of the drift that the matching removes is only a renumbering of experts; what remains is a change in how the load is spread.".into(),
        svg: drift_figure(report, id)?,
        available: true,
    })
}

/// The figures of the cross-model comparison with their captions, in report order: the RSA
/// scatter, then the per-layer CKA and RSA heatmaps when the per-layer section was computed.
pub fn figures(
    report: &CrossModelReport,
    sim_a: &[f64],
    sim_b: &[f64],
    within: &[bool],
) -> Vec<Figure> {
    let mut out = vec![Figure {
        id: RSA_SCATTER_ID.into(),
        title: "RSA scatter of prompt-pair similarities".into(),
        caption: format!(
            "Each point is a pair of shared prompts: its routing similarity sim(i,j) (mean over MoE layers of the cosine of the two signatures) under model A on the x axis and under model B on the y axis; blue circles are pairs of the same category, orange squares pairs of different categories. Points along a rising diagonal mean the two models agree on which prompts route alike; the RSA coefficient is the Spearman correlation of these {} pairs and the Mantel p permutes B's prompt labels.",
            sim_a.len().min(sim_b.len()).min(within.len())
        ),
        svg: rsa_scatter(report, sim_a, sim_b, within),
        available: true,
    }];
    for (which, title, caption) in [
        (
            "cka",
            "Per-layer linear CKA",
            "Linear CKA (0 = unrelated, 1 = identical up to rotation and scale) of model A's signatures at one MoE layer (rows) with model B's at another (columns), over the shared prompts. A bright diagonal means corresponding layers carry the same prompt structure; grey cells are undefined (a constant layer).",
        ),
        (
            "rsa",
            "Per-layer RSA",
            "Spearman correlation of the per-layer prompt-similarity matrices (cosine of the two prompts' signatures at that layer) of model A (rows) and model B (columns); blue is positive, orange negative, grey undefined.",
        ),
    ] {
        if let Some(svg) = layer_heatmap(report, which) {
            out.push(Figure {
                id: format!("fig-crossmodel-layer-{which}"),
                title: title.into(),
                caption: caption.into(),
                svg,
                available: true,
            });
        }
    }
    out
}

/// What the cross-model `report.html` shows (`moe-xray compare-models --out DIR`).
#[derive(Debug, Clone, Copy)]
pub struct CrossModelPage<'a> {
    /// The comparison.
    pub report: &'a CrossModelReport,
    /// Upper-triangle similarities of A (pairs i<j of the shared prompts).
    pub sim_a: &'a [f64],
    /// The same for B.
    pub sim_b: &'a [f64],
    /// Whether pair k is within one category.
    pub within: &'a [bool],
    /// The command that made it (shown under "Reproduce"; empty: not recorded).
    pub command: &'a str,
}

pub(crate) fn cell(x: Option<f64>, digits: usize) -> String {
    x.map(|v| num(v, digits)).unwrap_or_else(|| "n/a".into())
}

fn model_table(r: &CrossModelReport) -> String {
    let mut s = String::from(
        r#"<table class="models"><thead><tr><th></th><th>model A</th><th>model B</th></tr></thead><tbody>"#,
    );
    let (a, b) = (&r.model_a, &r.model_b);
    let opt = |x: &Option<String>| x.clone().unwrap_or_else(|| "(not recorded)".into());
    let layers = |v: &[usize]| {
        let mut t = v
            .iter()
            .take(32)
            .map(|l| l.to_string())
            .collect::<Vec<_>>()
            .join(", ");
        if v.len() > 32 {
            t.push_str(", …");
        }
        t
    };
    for (name, va, vb) in [
        ("analysis directory", a.label.clone(), b.label.clone()),
        ("model", opt(&a.model), opt(&b.model)),
        ("family", opt(&a.family), opt(&b.family)),
        (
            "MoE layers",
            a.num_layers.to_string(),
            b.num_layers.to_string(),
        ),
        (
            "decoder index of the MoE layers",
            layers(&a.layers),
            layers(&b.layers),
        ),
        (
            "experts per layer",
            a.num_experts.to_string(),
            b.num_experts.to_string(),
        ),
        ("top-k", a.top_k.to_string(), b.top_k.to_string()),
        (
            "prompts analysed",
            a.num_prompts.to_string(),
            b.num_prompts.to_string(),
        ),
        (
            "prompts only in this analysis",
            r.only_in_a.len().to_string(),
            r.only_in_b.len().to_string(),
        ),
    ] {
        let _ = write!(
            s,
            r#"<tr><th scope="row">{}</th><td>{}</td><td>{}</td></tr>"#,
            esc(name),
            esc(&va),
            esc(&vb)
        );
    }
    s.push_str("</tbody></table>");
    s
}

fn pair_row(s: &mut String, name: &str, p: Pair, digits: usize, def: &str) {
    let _ = write!(
        s,
        r#"<tr><th scope="row">{}</th><td class="num">{}</td><td class="num">{}</td><td class="def">{}</td></tr>"#,
        esc(name),
        cell(p.a, digits),
        cell(p.b, digits),
        esc(def)
    );
}

fn separation_table(r: &CrossModelReport) -> String {
    let c = &r.categories;
    let mut s = String::from(
        r#"<table class="separation"><thead><tr><th></th><th>model A</th><th>model B</th><th>definition</th></tr></thead><tbody>"#,
    );
    pair_row(
        &mut s,
        "Cohen's d (own analysis)",
        c.cohens_d,
        3,
        "within- vs across-category similarity, all prompts of each results.json",
    );
    pair_row(
        &mut s,
        "Cohen's d (shared prompts)",
        c.cohens_d_shared,
        3,
        "the same, recomputed on the prompts both analyses share",
    );
    pair_row(
        &mut s,
        "classifier accuracy",
        c.accuracy,
        3,
        "5-fold logistic regression on the signatures (logreg_5fold.accuracy_mean)",
    );
    pair_row(&mut s, "chance", c.chance, 3, "majority-class rate");
    pair_row(
        &mut s,
        "macro F1 (out of fold)",
        c.macro_f1,
        3,
        "logreg_5fold.macro_f1_oof",
    );
    s.push_str("</tbody></table>");
    if !c.per_category.is_empty() {
        s.push_str(
            r#"<table class="per-category"><thead><tr><th>category</th><th>n</th><th>d, A</th><th>d, B</th><th>recall, A</th><th>recall, B</th></tr></thead><tbody>"#,
        );
        for row in &c.per_category {
            let _ = write!(
                s,
                r#"<tr><td>{}</td><td class="num">{}</td><td class="num">{}</td><td class="num">{}</td><td class="num">{}</td><td class="num">{}</td></tr>"#,
                esc(&row.category),
                row.n,
                cell(row.d_a, 3),
                cell(row.d_b, 3),
                cell(row.recall_a, 3),
                cell(row.recall_b, 3)
            );
        }
        s.push_str("</tbody></table>");
        s.push_str(r#"<p class="muted">d of a category: its within-category pairs against the pairs with one prompt in it; recall: the share of its prompts the classifier assigns to it (from the confusion matrix).</p>"#);
    }
    s
}

/// "Not computed: reason." for a skipped section (empty for a computed one).
fn skipped<T>(section: &Section<T>) -> String {
    match section {
        Section::Done(_) => String::new(),
        Section::Skipped { skipped } => format!(
            r#"<p class="unavailable">Not computed: {}.</p>"#,
            esc(skipped.trim_end_matches('.'))
        ),
    }
}

/// The expert-matching section with id `section_id` (its heading an `h2`, or an `h4` inside a
/// pair of the N-run page when `nested`), the drift figure with element id `drift_id`.
pub(crate) fn matching_section(
    r: &CrossModelReport,
    section_id: &str,
    drift_id: &str,
    nested: bool,
) -> String {
    let (h, sub) = if nested { ("h4", "h5") } else { ("h2", "h3") };
    let mut s = format!(
        "<section id=\"{}\"><{h}>Expert matching and matched drift</{h}>\n",
        esc(section_id)
    );
    let Some(m) = r.expert_matching.done() else {
        s.push_str(&skipped(&r.expert_matching));
        s.push_str("</section>\n");
        return s;
    };
    let total: usize = m.layers.iter().map(|l| l.assignment.len()).sum();
    let _ = writeln!(
        s,
        "<p>{}</p>",
        esc(&format!(
            "Same architecture: the experts of model B are matched to those of model A per layer by usage profile ({}). {} of {} experts are relabelled. The Frobenius distance of the N × E signature blocks before and after the matching shows how much of the difference is only numbering.",
            m.method, m.moved, total
        ))
    );
    s.push_str(
        r#"<table class="matching"><thead><tr><th>layer</th><th>experts moved</th><th>distance as numbered</th><th>distance matched</th><th>matched expert of B for A's 0, 1, …</th></tr></thead><tbody>"#,
    );
    for l in &m.layers {
        let mut assign = l
            .assignment
            .iter()
            .take(64)
            .map(|x| x.to_string())
            .collect::<Vec<_>>()
            .join(" ");
        if l.assignment.len() > 64 {
            assign.push_str(" …");
        }
        let _ = write!(
            s,
            r#"<tr><td class="num">{}</td><td class="num">{}</td><td class="num">{}</td><td class="num">{}</td><td>{}</td></tr>"#,
            l.layer,
            l.moved,
            num(l.distance_identity, 4),
            num(l.distance_matched, 4),
            esc(&assign)
        );
    }
    let _ = write!(s, "</tbody></table>\n<{sub}>Matched drift</{sub}>\n");
    match r.matched_drift.done() {
        Some(d) => {
            s.push_str(
                r#"<table class="drift"><thead><tr><th></th><th>experts as numbered</th><th>experts matched</th><th>definition</th></tr></thead><tbody>"#,
            );
            let (u, m) = (&d.unmatched, &d.matched);
            pair_row(
                &mut s,
                "mean JS divergence (bits)",
                Pair {
                    a: Some(u.mean_js_bits),
                    b: Some(m.mean_js_bits),
                },
                6,
                "Jensen–Shannon divergence of the pooled per-layer expert loads, mean over layers",
            );
            pair_row(
                &mut s,
                "max JS divergence (bits)",
                Pair {
                    a: Some(u.max_js_bits),
                    b: Some(m.max_js_bits),
                },
                6,
                "the largest layer's",
            );
            pair_row(
                &mut s,
                "mean signature shift",
                Pair {
                    a: u.mean_shift,
                    b: m.mean_shift,
                },
                4,
                "mean over shared prompts of 1 − sim(s_A, s_B)",
            );
            pair_row(
                &mut s,
                "permutation p (mean JS)",
                Pair {
                    a: u.permutation_p,
                    b: m.permutation_p,
                },
                4,
                "run labels permuted between the two runs",
            );
            s.push_str("</tbody></table>\n");
            if let Some(f) = drift_fig(r, drift_id) {
                s.push_str(&figure_html(&f));
            }
        }
        None => s.push_str(&skipped(&r.matched_drift)),
    }
    s.push_str("</section>\n");
    s
}

/// Renders the cross-model `report.html`: one self-contained page (inline SVG and the study
/// report's CSS, no scripts, no network). Deterministic: the same input gives the same bytes.
pub fn render_html(p: &CrossModelPage<'_>) -> String {
    let r = p.report;
    let figs = figures(r, p.sim_a, p.sim_b, p.within);
    let title = format!(
        "moe-xray cross-model comparison: {} vs {}",
        r.model_a.model.as_deref().unwrap_or(&r.model_a.label),
        r.model_b.model.as_deref().unwrap_or(&r.model_b.label)
    );
    let mut s = String::new();
    page_open(&mut s, &title);
    let _ = writeln!(s, "<header><h1>{}</h1>", esc(&title));
    let _ = writeln!(
        s,
        "<p class=\"sub\">{}</p></header>",
        esc(&format!(
            "Do two models route the same prompts alike? {} shared prompts; model A: {} MoE layers × {} experts, model B: {} × {}{}.",
            r.shared_prompts,
            r.model_a.num_layers,
            r.model_a.num_experts,
            r.model_b.num_layers,
            r.model_b.num_experts,
            if r.same_architecture {
                " (same architecture: experts are matched)"
            } else {
                " (expert indices do not correspond)"
            }
        ))
    );
    s.push_str("<nav><ol><li><a href=\"#models\">Models</a></li><li><a href=\"#similarity\">Representational similarity</a></li><li><a href=\"#per-layer\">Per layer</a></li><li><a href=\"#task-separation\">Task separation side by side</a></li><li><a href=\"#expert-matching\">Expert matching and matched drift</a></li><li><a href=\"#reproduce\">Reproduce</a></li></ol></nav>\n");

    s.push_str("<section id=\"models\"><h2>Models</h2>\n");
    s.push_str(&model_table(r));
    s.push_str("</section>\n");

    s.push_str("<section id=\"similarity\"><h2>Representational similarity</h2>\n");
    s.push_str(
        r#"<table class="headline"><thead><tr><th>statistic</th><th>value</th><th>definition</th></tr></thead><tbody>"#,
    );
    crate::html::row(
        &mut s,
        "RSA (Spearman)",
        &cell(r.rsa.spearman, 4),
        &format!(
            "rank correlation of the two prompt × prompt similarity matrices over {} pairs i<j",
            r.rsa.pairs
        ),
    );
    match r.rsa.mantel.done() {
        Some(m) => {
            crate::html::row(
                &mut s,
                "Mantel p",
                &num(m.p, 4),
                &format!(
                    "one-sided, {} permutations of B's prompt labels (seed {}): (1 + #null ≥ observed) / (1 + reps)",
                    m.reps, m.seed
                ),
            );
            crate::html::row(
                &mut s,
                "Mantel null",
                &format!("{} ± {}", num(m.null_mean, 4), num(m.null_std, 4)),
                "mean ± std of the Spearman coefficient under permutation",
            );
        }
        None => crate::html::row(
            &mut s,
            "Mantel p",
            "n/a",
            &r.rsa.mantel.why_missing().unwrap_or_default(),
        ),
    }
    crate::html::row(
        &mut s,
        "linear CKA",
        &cell(r.cka, 4),
        "centred kernel alignment of the two signature matrices (N × L·E each): 1 = the same prompt geometry up to rotation and scale",
    );
    s.push_str("</tbody></table>\n");
    s.push_str(&figure_html(&figs[0]));
    s.push_str("</section>\n");

    s.push_str("<section id=\"per-layer\"><h2>Per layer</h2>\n");
    if figs.len() > 1 {
        for f in &figs[1..] {
            s.push_str(&figure_html(f));
        }
    } else {
        s.push_str(&skipped(&r.per_layer));
    }
    s.push_str("</section>\n");

    s.push_str("<section id=\"task-separation\"><h2>Task separation side by side</h2>\n");
    s.push_str(&separation_table(r));
    s.push_str("</section>\n");

    s.push_str(&matching_section(r, "expert-matching", DRIFT_ID, false));

    reproduce_and_close(
        &mut s,
        p.command,
        &r.tool_version,
        &format!("cross-model schema {}", r.schema_version),
    );
    s
}

/// The "Reproduce" section (the command line), the footer naming the tool version and `schema`,
/// and the end of the page: shared by the two-run and N-run comparison pages.
pub(crate) fn reproduce_and_close(s: &mut String, command: &str, tool_version: &str, schema: &str) {
    s.push_str("<section id=\"reproduce\"><h2>Reproduce</h2>\n<p>This command regenerates the comparison (same inputs and seed give byte-identical outputs):</p>\n");
    let cmd = if command.is_empty() {
        "(command not recorded)"
    } else {
        command
    };
    let _ = writeln!(s, "<pre><code>{}</code></pre></section>", esc(cmd));
    let _ = writeln!(
        s,
        "<footer>Generated by moe-xray {} ({schema}). Self-contained: no scripts, no external resources.</footer>",
        esc(tool_version),
    );
    page_close(s);
}

#[cfg(test)]
mod tests {
    use super::*;
    use moe_xray_stats::crossmodel::{
        compare_signatures, CategoryComparison, CrossModelOptions, ModelInfo, Pair, Side,
    };

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
