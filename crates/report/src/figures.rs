//! The study's figures as deterministic SVG (see `svg.rs` for why the SVG is hand-built).

use crate::results::{BaselineStats, Results};
use crate::svg::{
    category_style, colorbar, esc, legend, legend_width, nice_ticks, num, text_on_viridis,
    text_width, truncate, viridis, Anchor, Axes, LegendItem, LegendKind, Svg, OKABE_ITO,
};
use crate::{CategoryUsage, Figure};

/// Width of every figure in px (the report shows them at up to this width).
pub const FIG_WIDTH: f64 = 640.0;

/// Number of figures [`render_figures`] returns; the routing-health figures are numbered after
/// them.
pub(crate) const NUM_STUDY_FIGURES: usize = 7;

/// All figures, in report order. Figures whose data is missing or skipped are returned with
/// `available = false` and an SVG that says why, so the numbering never shifts.
pub fn render_figures(results: &Results, usage: Option<&CategoryUsage>) -> Vec<Figure> {
    let order = results.category_order();
    vec![
        fig_category_matrix(results),
        fig_baselines(results),
        fig_layer_d(results),
        fig_pca(results, &order),
        fig_tsne(results, &order),
        fig_confusion(results),
        fig_usage(results, usage),
    ]
}

fn figure(id: &str, title: &str, caption: String, svg: String, available: bool) -> Figure {
    Figure {
        id: id.to_string(),
        title: title.to_string(),
        caption,
        svg,
        available,
    }
}

fn placeholder(id: &str, title: &str, why: &str) -> String {
    let mut s = Svg::new(id, FIG_WIDTH, 120.0);
    s.title(title);
    s.text(
        FIG_WIDTH / 2.0,
        70.0,
        &format!("Not available: {}", truncate(why, 80)),
        13.0,
        Anchor::Middle,
        r##"fill="#555555""##,
    );
    s.finish(title, why)
}

pub(crate) fn unavailable(id: &str, title: &str, caption: &str, why: &str) -> Figure {
    figure(
        id,
        title,
        format!("{caption} Not drawn: {why}."),
        placeholder(id, title, why),
        false,
    )
}

// ---------------------------------------------------------------------------------------------
// Generic heatmap

struct Heatmap<'a> {
    id: &'a str,
    title: &'a str,
    desc: &'a str,
    rows: &'a [String],
    cols: &'a [String],
    /// Colour value per cell, already scaled into [lo, hi].
    values: &'a [Vec<f64>],
    /// Text per cell (empty = none).
    text: Vec<Vec<String>>,
    lo: f64,
    hi: f64,
    xlabel: &'a str,
    ylabel: &'a str,
    cbar_label: &'a str,
}

fn heatmap(h: Heatmap<'_>) -> String {
    let n_rows = h.rows.len().max(1);
    let n_cols = h.cols.len().max(1);
    let row_label_w = h
        .rows
        .iter()
        .map(|r| text_width(&truncate(r, 14), 12.0))
        .fold(30.0, f64::max);
    let left = 40.0 + row_label_w + 8.0;
    let right_reserved = 90.0;
    let avail = FIG_WIDTH - left - right_reserved;
    let cell = (avail / n_cols as f64).min(90.0);
    let top = 48.0;
    let grid_w = cell * n_cols as f64;
    let grid_h = cell * n_rows as f64;
    let max_col_w = h
        .cols
        .iter()
        .map(|c| text_width(&truncate(c, 14), 12.0))
        .fold(0.0, f64::max);
    let rotate = max_col_w > cell - 4.0;
    let col_label_h = if rotate { max_col_w * 0.6 + 16.0 } else { 20.0 };
    let height = top + grid_h + col_label_h + 44.0;
    let mut s = Svg::new(h.id, FIG_WIDTH, height);
    s.title(h.title);
    let span = if h.hi > h.lo { h.hi - h.lo } else { 1.0 };
    let font = if cell >= 60.0 {
        14.0
    } else if cell >= 40.0 {
        12.0
    } else {
        10.0
    };
    s.raw(r#"<g class="cells">"#);
    for (r, row) in h.values.iter().enumerate() {
        for (c, v) in row.iter().enumerate() {
            let t = (v - h.lo) / span;
            let x = left + c as f64 * cell;
            let y = top + r as f64 * cell;
            s.rect(
                x,
                y,
                cell,
                cell,
                &viridis(t),
                r##"stroke="#ffffff" stroke-width="1""##,
            );
            if let Some(full) = h.text.get(r).and_then(|row| row.get(c)) {
                // drop the "(…)" part, then the whole text, when it does not fit the cell
                let short = full.split(" (").next().unwrap_or("");
                let txt = [full.as_str(), short]
                    .into_iter()
                    .find(|t| text_width(t, font) <= cell - 4.0)
                    .unwrap_or("");
                if !txt.is_empty() {
                    s.text(
                        x + cell / 2.0,
                        y + cell / 2.0 + font * 0.35,
                        txt,
                        font,
                        Anchor::Middle,
                        &format!(r#"fill="{}" class="cell-value""#, text_on_viridis(t)),
                    );
                }
            }
        }
    }
    s.raw("</g>");
    for (r, label) in h.rows.iter().enumerate() {
        s.text(
            left - 8.0,
            top + (r as f64 + 0.5) * cell + 4.0,
            &truncate(label, 14),
            12.0,
            Anchor::End,
            r#"class="row-label""#,
        );
    }
    for (c, label) in h.cols.iter().enumerate() {
        let x = left + (c as f64 + 0.5) * cell;
        let y = top + grid_h + 16.0;
        if rotate {
            s.text(
                x,
                y,
                &truncate(label, 14),
                12.0,
                Anchor::End,
                &format!(
                    r#"class="col-label" transform="rotate(-35 {} {})""#,
                    num(x, 2),
                    num(y, 2)
                ),
            );
        } else {
            s.text(
                x,
                y,
                &truncate(label, 14),
                12.0,
                Anchor::Middle,
                r#"class="col-label""#,
            );
        }
    }
    // axis titles
    s.text(
        left + grid_w / 2.0,
        top + grid_h + col_label_h + 22.0,
        h.xlabel,
        13.0,
        Anchor::Middle,
        r#"class="axis-label""#,
    );
    let yx = 18.0;
    let yy = top + grid_h / 2.0;
    s.text(
        yx,
        yy,
        h.ylabel,
        13.0,
        Anchor::Middle,
        &format!(
            r#"class="axis-label" transform="rotate(-90 {} {})""#,
            num(yx, 2),
            num(yy, 2)
        ),
    );
    let cb_h = grid_h.clamp(80.0, 260.0);
    colorbar(
        &mut s,
        h.id,
        left + grid_w + 24.0,
        top + 14.0,
        14.0,
        cb_h - 14.0,
        h.lo,
        h.hi,
        h.cbar_label,
    );
    s.finish(h.title, h.desc)
}

fn min_max(vals: impl Iterator<Item = f64>) -> (f64, f64) {
    let mut lo = f64::INFINITY;
    let mut hi = f64::NEG_INFINITY;
    for v in vals.filter(|v| v.is_finite()) {
        lo = lo.min(v);
        hi = hi.max(v);
    }
    if !lo.is_finite() {
        return (0.0, 1.0);
    }
    if hi - lo < 1e-12 {
        return (lo - 0.5e-3, hi + 0.5e-3);
    }
    (lo, hi)
}

// ---------------------------------------------------------------------------------------------
// Figure 1

fn fig_category_matrix(r: &Results) -> Figure {
    let id = "fig1-category-similarity";
    let title = "Figure 1. Category × category routing similarity";
    let caption = "Mean routing similarity between the prompts of two categories. A prompt's \
        signature is its expert-selection share per layer (counts normalised over the experts of \
        each layer); sim(i, j) is the cosine of two signatures averaged over the layers. Entry \
        (A, B) is the mean of sim(i, j) over i in A and j in B; on the diagonal over the pairs \
        i < j within A. Colour scale: minimum to maximum entry.";
    let m = &r.category_similarity_matrix;
    let ok = !m.order.is_empty()
        && m.values.len() == m.order.len()
        && m.values.iter().all(|row| row.len() == m.order.len());
    if !ok {
        return unavailable(
            id,
            title,
            caption,
            "category_similarity_matrix is missing or not square",
        );
    }
    let (lo, hi) = min_max(m.values.iter().flatten().copied());
    let text = m
        .values
        .iter()
        .map(|row| row.iter().map(|v| num(*v, 3)).collect())
        .collect();
    let svg = heatmap(Heatmap {
        id,
        title,
        desc: caption,
        rows: &m.order,
        cols: &m.order,
        values: &m.values,
        text,
        lo,
        hi,
        xlabel: "category",
        ylabel: "category",
        cbar_label: "mean sim",
    });
    figure(id, title, caption.to_string(), svg, true)
}

// ---------------------------------------------------------------------------------------------
// Figure 2

fn fig_baselines(r: &Results) -> Figure {
    let id = "fig2-baselines";
    let title = "Figure 2. Within vs. across categories and null baselines";
    let b = &r.baselines;
    let reps: Vec<usize> = [
        b.permutation.done(),
        b.load_balance_uniform.done(),
        b.load_balance_marginal.done(),
    ]
    .iter()
    .flatten()
    .map(|x| x.reps)
    .collect();
    let reps_txt = reps
        .first()
        .map(|n| format!("{n} repetitions"))
        .unwrap_or_else(|| "the configured repetitions".into());
    let caption = format!(
        "Mean routing similarity of within-category pairs and across-category pairs (unordered \
        pairs i < j, error bars ±1 std over pairs, ddof = 1) next to three null baselines, each \
        the mean over {reps_txt} of the mean similarity over all pairs of a synthetic signature \
        set (error bars: mean over repetitions of the pair std). Load-balance (uniform): every \
        token picks k distinct experts uniformly at random, with each prompt's observed token \
        count per layer. Load-balance (marginal): the same with experts drawn without \
        replacement in proportion to the pooled per-layer expert load. Permutation: each \
        prompt's expert counts shuffled independently per layer. Numbers above the bars are the \
        means."
    );
    struct Bar {
        label: [&'static str; 2],
        color: &'static str,
        value: Option<(f64, f64)>,
    }
    let base = |x: Option<&BaselineStats>| x.map(|b| (b.mean, b.pair_std));
    let bars = [
        Bar {
            label: ["within", "category"],
            color: OKABE_ITO[0],
            value: Some((r.similarity.within.mean, r.similarity.within.std)),
        },
        Bar {
            label: ["load-balance", "(uniform)"],
            color: "#999999",
            value: base(b.load_balance_uniform.done()),
        },
        Bar {
            label: ["load-balance", "(marginal)"],
            color: OKABE_ITO[5],
            value: base(b.load_balance_marginal.done()),
        },
        Bar {
            label: ["permutation", ""],
            color: OKABE_ITO[1],
            value: base(b.permutation.done()),
        },
        Bar {
            label: ["across", "categories"],
            color: OKABE_ITO[3],
            value: Some((r.similarity.across.mean, r.similarity.across.std)),
        },
    ];
    let top_val = bars
        .iter()
        .filter_map(|b| b.value)
        .map(|(m, s)| m + s.max(0.0))
        .fold(0.0, f64::max);
    let low_val = bars
        .iter()
        .filter_map(|b| b.value)
        .map(|(m, s)| m - s.max(0.0))
        .fold(0.0, f64::min);
    let (ticks, dec) = nice_ticks(low_val, (top_val * 1.08).max(1e-6), 5);
    let ax = Axes {
        left: 84.0,
        top: 48.0,
        width: 530.0,
        height: 300.0,
        xmin: 0.0,
        xmax: bars.len() as f64,
        ymin: *ticks.first().unwrap_or(&0.0),
        ymax: *ticks.last().unwrap_or(&1.0),
    };
    let mut s = Svg::new(id, FIG_WIDTH, 440.0);
    s.title(title);
    let yt: Vec<(f64, String)> = ticks.iter().map(|t| (*t, num(*t, dec))).collect();
    ax.draw(&mut s, &[], &yt, "", "mean routing similarity");
    let slot = ax.width / bars.len() as f64;
    let bw = slot * 0.62;
    s.raw(r#"<g class="bars">"#);
    for (i, bar) in bars.iter().enumerate() {
        let cx = ax.left + (i as f64 + 0.5) * slot;
        match bar.value {
            Some((m, sd)) => {
                let y0 = ax.y(0.0);
                let y1 = ax.y(m);
                s.rect(
                    cx - bw / 2.0,
                    y0.min(y1),
                    bw,
                    (y0 - y1).abs(),
                    bar.color,
                    r#"class="bar""#,
                );
                let sd = if sd.is_finite() { sd.max(0.0) } else { 0.0 };
                let (ya, yb) = (ax.y(m - sd), ax.y(m + sd));
                s.line(cx, ya, cx, yb, "#222222", 1.5);
                s.line(cx - 8.0, ya, cx + 8.0, ya, "#222222", 1.5);
                s.line(cx - 8.0, yb, cx + 8.0, yb, "#222222", 1.5);
                s.text(
                    cx,
                    yb.min(y1) - 6.0,
                    &num(m, 3),
                    12.0,
                    Anchor::Middle,
                    r#"class="bar-value" font-weight="bold""#,
                );
            }
            None => {
                s.text(
                    cx,
                    ax.y(0.0) - 8.0,
                    "n/a",
                    12.0,
                    Anchor::Middle,
                    r##"fill="#555555""##,
                );
            }
        }
        s.text(
            cx,
            ax.bottom() + 18.0,
            bar.label[0],
            12.0,
            Anchor::Middle,
            r#"class="bar-label""#,
        );
        if !bar.label[1].is_empty() {
            s.text(
                cx,
                ax.bottom() + 33.0,
                bar.label[1],
                12.0,
                Anchor::Middle,
                r#"class="bar-label""#,
            );
        }
    }
    s.raw("</g>");
    s.text(
        ax.left + ax.width / 2.0,
        ax.bottom() + 58.0,
        "error bars: ±1 std over prompt pairs (baselines: mean pair std over repetitions)",
        11.0,
        Anchor::Middle,
        r##"fill="#444444""##,
    );
    let svg = s.finish(title, &caption);
    figure(id, title, caption, svg, true)
}

// ---------------------------------------------------------------------------------------------
// Figure 3

fn fig_layer_d(r: &Results) -> Figure {
    let id = "fig3-layer-cohens-d";
    let title = "Figure 3. Category separation per layer (Cohen's d)";
    let caption = "Cohen's d of within- vs. across-category similarity computed separately for \
        each MoE layer, with the per-layer cosine cos(s_i[l], s_j[l]) in place of the \
        layer-averaged similarity: d = (mean_within − mean_across) / pooled std (ddof = 1). The \
        dashed line is d for the layer-averaged similarity (all layers); d = 0 means no \
        separation.";
    if r.per_layer.is_empty() {
        return unavailable(id, title, caption, "per_layer is empty");
    }
    let layers: Vec<f64> = r.per_layer.iter().map(|l| l.layer as f64).collect();
    let ds: Vec<f64> = r.per_layer.iter().map(|l| l.cohens_d).collect();
    let overall = r.similarity.cohens_d;
    let (lo, hi) = min_max(
        ds.iter()
            .copied()
            .chain([0.0, if overall.is_finite() { overall } else { 0.0 }]),
    );
    let pad = (hi - lo) * 0.08;
    let lo_p = if lo >= 0.0 { 0.0 } else { lo - pad };
    let (yt, ydec) = nice_ticks(lo_p, hi + pad, 5);
    let (xmin, xmax) = min_max(layers.iter().copied());
    let items = [
        LegendItem {
            label: "per-layer d".into(),
            color: OKABE_ITO[0].into(),
            kind: LegendKind::Line {
                dashed: false,
                marker: true,
            },
        },
        LegendItem {
            label: format!("all layers (d = {})", num(overall, 2)),
            color: OKABE_ITO[3].into(),
            kind: LegendKind::Line {
                dashed: true,
                marker: false,
            },
        },
    ];
    let lw = legend_width("", &items);
    let ax = Axes {
        left: 84.0,
        top: 48.0,
        width: FIG_WIDTH - 84.0 - lw - 24.0,
        height: 290.0,
        xmin: xmin - 0.5,
        xmax: xmax + 0.5,
        ymin: yt[0],
        ymax: *yt.last().unwrap_or(&1.0),
    };
    let n = layers.len();
    let step = if n <= 16 {
        1
    } else if n <= 32 {
        2
    } else {
        4
    };
    let xt: Vec<(f64, String)> = r
        .per_layer
        .iter()
        .filter(|l| l.layer % step == 0)
        .map(|l| (l.layer as f64, l.layer.to_string()))
        .collect();
    let ytl: Vec<(f64, String)> = yt.iter().map(|t| (*t, num(*t, ydec))).collect();
    let mut s = Svg::new(id, FIG_WIDTH, 400.0);
    s.title(title);
    ax.draw(&mut s, &xt, &ytl, "MoE layer", "Cohen's d");
    if ax.ymin < 0.0 && ax.ymax > 0.0 {
        s.line(ax.left, ax.y(0.0), ax.right(), ax.y(0.0), "#555555", 1.0);
    }
    if overall.is_finite() {
        s.line_extra(
            ax.left,
            ax.y(overall),
            ax.right(),
            ax.y(overall),
            OKABE_ITO[3],
            2.0,
            r#"stroke-dasharray="6 4" class="overall-d""#,
        );
    }
    let pts: Vec<(f64, f64)> = layers
        .iter()
        .zip(&ds)
        .filter(|(_, d)| d.is_finite())
        .map(|(l, d)| (ax.x(*l), ax.y(*d)))
        .collect();
    s.polyline(&pts, OKABE_ITO[0], 2.0, r#"class="layer-line""#);
    for (x, y) in &pts {
        s.marker(
            crate::svg::Shape::Circle,
            *x,
            *y,
            4.5,
            OKABE_ITO[0],
            "layer-point",
        );
    }
    legend(&mut s, FIG_WIDTH - lw - 8.0, ax.top, "", &items);
    let svg = s.finish(title, caption);
    figure(id, title, caption.to_string(), svg, true)
}

// ---------------------------------------------------------------------------------------------
// Figures 4 and 5

#[allow(clippy::too_many_arguments)]
fn scatter(
    id: &str,
    title: &str,
    desc: &str,
    coords: &[[f64; 2]],
    cats: &[String],
    order: &[String],
    xlabel: &str,
    ylabel: &str,
) -> String {
    let pts: Vec<(f64, f64)> = coords.iter().map(|&[x, y]| (x, y)).collect();
    let (x0, x1) = min_max(pts.iter().map(|p| p.0));
    let (y0, y1) = min_max(pts.iter().map(|p| p.1));
    let (px, py) = ((x1 - x0) * 0.06, (y1 - y0) * 0.06);
    let (xt, xd) = nice_ticks(x0 - px, x1 + px, 5);
    let (yt, yd) = nice_ticks(y0 - py, y1 + py, 5);
    let mut items = Vec::new();
    for (ci, cat) in order.iter().enumerate() {
        let (color, shape) = category_style(ci);
        let n = cats.iter().filter(|c| *c == cat).count();
        if n > 0 {
            items.push(LegendItem {
                label: format!("{} (n = {n})", truncate(cat, 16)),
                color: color.into(),
                kind: LegendKind::Marker(shape),
            });
        }
    }
    let lw = legend_width("category", &items);
    let ax = Axes {
        left: 84.0,
        top: 48.0,
        width: (FIG_WIDTH - 84.0 - lw - 22.0).min(400.0),
        height: 360.0,
        xmin: xt[0],
        xmax: *xt.last().unwrap_or(&1.0),
        ymin: yt[0],
        ymax: *yt.last().unwrap_or(&1.0),
    };
    let mut s = Svg::new(id, FIG_WIDTH, 470.0);
    s.title(title);
    let xtl: Vec<(f64, String)> = xt.iter().map(|t| (*t, num(*t, xd))).collect();
    let ytl: Vec<(f64, String)> = yt.iter().map(|t| (*t, num(*t, yd))).collect();
    ax.draw(&mut s, &xtl, &ytl, xlabel, ylabel);
    s.raw(r#"<g class="points">"#);
    for (ci, cat) in order.iter().enumerate() {
        let (color, shape) = category_style(ci);
        for (p, c) in pts.iter().zip(cats) {
            if c == cat && p.0.is_finite() && p.1.is_finite() {
                s.marker(shape, ax.x(p.0), ax.y(p.1), 5.0, color, "point");
            }
        }
    }
    s.raw("</g>");
    legend(&mut s, FIG_WIDTH - lw - 8.0, ax.top, "category", &items);
    s.finish(title, desc)
}

fn prompt_cats(r: &Results) -> Vec<String> {
    (0..r.prompt_ids.len().max(r.prompt_categories.len()))
        .map(|i| {
            r.prompt_categories
                .get(i)
                .cloned()
                .unwrap_or_else(|| "unknown".into())
        })
        .collect()
}

fn order_with_unknown(order: &[String], cats: &[String]) -> Vec<String> {
    let mut o = order.to_vec();
    for c in cats {
        if !o.contains(c) {
            o.push(c.clone());
        }
    }
    o
}

fn fig_pca(r: &Results, order: &[String]) -> Figure {
    let id = "fig4-pca";
    let title = "Figure 4. PCA of routing signatures";
    let caption = "Principal component analysis of the N × (L·E) signature matrix (centred, \
        not scaled; component signs as scikit-learn's PCA). Each point is one prompt, coloured \
        and shaped by its category; axis labels give the share of the total variance explained \
        by each component.";
    let Some(p) = r.pca.done() else {
        let why = r.pca.why_missing().unwrap_or_default();
        return unavailable(id, title, caption, &why);
    };
    if p.coords.is_empty() {
        return unavailable(id, title, caption, "pca.coords is empty");
    }
    let ev = |i: usize| {
        p.explained_variance_ratio
            .get(i)
            .map(|v| format!(" ({} % of variance)", num(v * 100.0, 1)))
            .unwrap_or_default()
    };
    let cats = prompt_cats(r);
    let order = order_with_unknown(order, &cats);
    let svg = scatter(
        id,
        title,
        caption,
        &p.coords,
        &cats,
        &order,
        &format!("PC1{}", ev(0)),
        &format!("PC2{}", ev(1)),
    );
    figure(id, title, caption.to_string(), svg, true)
}

fn fig_tsne(r: &Results, order: &[String]) -> Figure {
    let id = "fig5-tsne";
    let title = "Figure 5. t-SNE of routing signatures";
    let Some(t) = r.tsne.done() else {
        let caption = "t-SNE embedding of the routing signatures.";
        let why = r.tsne.why_missing().unwrap_or_default();
        return unavailable(id, title, caption, &why);
    };
    let caption = format!(
        "Exact t-SNE of the signatures (squared Euclidean distances, perplexity {}, early \
        exaggeration 12 for 250 iterations, learning rate max(N/48, 50), 1000 iterations, PCA \
        initialisation, seeded; final KL divergence {}). Each point is one prompt, coloured and \
        shaped by its category. t-SNE preserves neighbourhoods, not distances: cluster sizes and \
        gaps between clusters are not meaningful.",
        num(t.perplexity, 2),
        num(t.kl_divergence, 3)
    );
    if t.coords.is_empty() {
        return unavailable(id, title, &caption, "tsne.coords is empty");
    }
    let cats = prompt_cats(r);
    let order = order_with_unknown(order, &cats);
    let svg = scatter(
        id, title, &caption, &t.coords, &cats, &order, "t-SNE 1", "t-SNE 2",
    );
    figure(id, title, caption, svg, true)
}

// ---------------------------------------------------------------------------------------------
// Confusion matrix

fn fig_confusion(r: &Results) -> Figure {
    let id = "fig6-confusion";
    let title = "Figure 6. Classifier confusion matrix (out-of-fold)";
    let Some(lr) = r.logreg_5fold.done() else {
        let caption = "Confusion matrix of the category classifier.";
        let why = r.logreg_5fold.why_missing().unwrap_or_default();
        return unavailable(id, title, caption, &why);
    };
    let caption = format!(
        "Out-of-fold predictions of multinomial logistic regression (L2, C = 1, standardised \
        signatures, scaler fit on each training fold) in stratified {}-fold cross-validation. \
        Rows: true category; columns: predicted category. Cells show the number of prompts and \
        the share of the row; colour encodes the row share. Accuracy {} ± {} (mean ± std over \
        folds), chance (majority class) {}.",
        lr.fold_accuracies.len().max(1),
        num(lr.accuracy_mean, 3),
        num(lr.accuracy_std, 3),
        num(lr.chance, 3)
    );
    let k = lr.labels.len();
    if k == 0 || lr.confusion.len() != k || lr.confusion.iter().any(|r| r.len() != k) {
        return unavailable(
            id,
            title,
            &caption,
            "logreg_5fold.confusion is missing or does not match labels",
        );
    }
    let shares: Vec<Vec<f64>> = lr
        .confusion
        .iter()
        .map(|row| {
            let t: f64 = row.iter().map(|&v| v as f64).sum();
            row.iter()
                .map(|&v| if t > 0.0 { v as f64 / t } else { 0.0 })
                .collect()
        })
        .collect();
    let text = lr
        .confusion
        .iter()
        .zip(&shares)
        .map(|(row, sh)| {
            row.iter()
                .zip(sh)
                .map(|(&v, p)| format!("{} ({}%)", num(v as f64, 0), num(p * 100.0, 0)))
                .collect()
        })
        .collect();
    let svg = heatmap(Heatmap {
        id,
        title,
        desc: &caption,
        rows: &lr.labels,
        cols: &lr.labels,
        values: &shares,
        text,
        lo: 0.0,
        hi: 1.0,
        xlabel: "predicted category",
        ylabel: "true category",
        cbar_label: "row share",
    });
    figure(id, title, caption, svg, true)
}

// ---------------------------------------------------------------------------------------------
// Expert usage per category

fn fig_usage(r: &Results, usage: Option<&CategoryUsage>) -> Figure {
    let id = "fig7-expert-usage";
    let title = "Figure 7. Expert usage per layer, by category";
    let Some(u) = usage else {
        return unavailable(
            id,
            title,
            "Mean routing signature of each category.",
            "no per-category expert usage was supplied",
        );
    };
    let (l, e) = (u.num_layers, u.num_experts);
    let caption = format!(
        "Mean routing signature of each category: cell (layer l, expert e) is the average over \
        the category's prompts of the share of that layer's expert selections that went to \
        expert e. Uniform routing would give 1/E = {} in every cell. One shared colour scale \
        for all panels.",
        num(1.0 / e.max(1) as f64, 4)
    );
    if l == 0 || e == 0 || u.categories.is_empty() {
        return unavailable(id, title, &caption, "empty expert-usage input");
    }
    if let Some((name, _)) = u.categories.iter().find(|(_, v)| v.len() != l * e) {
        return unavailable(
            id,
            title,
            &caption,
            &format!(
                "usage of category '{}' does not have L·E = {} values",
                name,
                l * e
            ),
        );
    }
    // keep the report's category order
    let order = r.category_order();
    let mut cats: Vec<&(String, Vec<f64>)> = u.categories.iter().collect();
    cats.sort_by_key(|(name, _)| order.iter().position(|o| o == name).unwrap_or(usize::MAX));

    let cols = if cats.len() == 1 { 1 } else { 2 };
    let left = 50.0;
    let gap_x = 36.0;
    let cbar_w = 70.0;
    let panel_w = (FIG_WIDTH - left - cbar_w - gap_x * (cols as f64 - 1.0)) / cols as f64;
    let cw = panel_w / e as f64;
    let ch = (cw * 1.6).clamp(4.0, 16.0).min(220.0 / l as f64).max(2.0);
    let panel_h = ch * l as f64;
    let head = 24.0;
    let foot = 30.0;
    let rows = cats.len().div_ceil(cols);
    let top = 44.0;
    let height = top + rows as f64 * (head + panel_h + foot) + 28.0;
    let (_, hi) = min_max(cats.iter().flat_map(|(_, v)| v.iter().copied()));
    let lo = 0.0;
    let hi = hi.max(1e-9);
    let mut s = Svg::new(id, FIG_WIDTH, height);
    s.title(title);
    let lstep = if l <= 8 {
        1
    } else if l <= 16 {
        4
    } else {
        8
    };
    let estep = if e <= 16 {
        4
    } else if e <= 64 {
        16
    } else {
        32
    };
    for (pi, (name, vals)) in cats.iter().enumerate() {
        let px = left + (pi % cols) as f64 * (panel_w + gap_x);
        let py = top + (pi / cols) as f64 * (head + panel_h + foot) + head;
        let (color, _) = category_style(order.iter().position(|o| o == name).unwrap_or(pi));
        s.rect(px, py - 17.0, 10.0, 10.0, color, "");
        s.text(
            px + 14.0,
            py - 8.0,
            &truncate(name, 30),
            12.0,
            Anchor::Start,
            r#"font-weight="bold" class="panel-title""#,
        );
        s.raw(&format!(
            r#"<g class="usage-panel" data-category="{}">"#,
            esc(name)
        ));
        for li in 0..l {
            for ei in 0..e {
                let v = vals[li * e + ei];
                // hairline overlap avoids anti-aliasing seams between cells
                s.rect(
                    px + ei as f64 * cw,
                    py + li as f64 * ch,
                    cw + 0.3,
                    ch + 0.3,
                    &viridis((v - lo) / (hi - lo)),
                    "",
                );
            }
        }
        s.raw("</g>");
        s.rect(
            px,
            py,
            panel_w,
            panel_h,
            "none",
            r##"stroke="#555555" stroke-width="0.8""##,
        );
        for li in (0..l).step_by(lstep) {
            // the decoder-layer index (rows are the MoE layers when some layers are dense)
            let label = r
                .moe_layers
                .as_ref()
                .and_then(|m| m.get(li).copied())
                .unwrap_or(li);
            s.text(
                px - 4.0,
                py + (li as f64 + 0.5) * ch + 4.0,
                &label.to_string(),
                10.0,
                Anchor::End,
                "",
            );
        }
        for ei in (0..e).step_by(estep) {
            s.text(
                px + (ei as f64 + 0.5) * cw,
                py + panel_h + 12.0,
                &ei.to_string(),
                10.0,
                Anchor::Middle,
                "",
            );
        }
        s.text(
            px + panel_w / 2.0,
            py + panel_h + 24.0,
            "expert",
            11.0,
            Anchor::Middle,
            r#"class="axis-label""#,
        );
        let yx = px - 26.0;
        let yy = py + panel_h / 2.0;
        s.text(
            yx,
            yy,
            "layer",
            11.0,
            Anchor::Middle,
            &format!(
                r#"class="axis-label" transform="rotate(-90 {} {})""#,
                num(yx, 2),
                num(yy, 2)
            ),
        );
    }
    colorbar(
        &mut s,
        id,
        FIG_WIDTH - cbar_w + 14.0,
        top + head + 10.0,
        12.0,
        (rows as f64 * (head + panel_h + foot) - head - 20.0).clamp(60.0, 240.0),
        lo,
        hi,
        "share",
    );
    let svg = s.finish(title, &caption);
    figure(id, title, caption, svg, true)
}

// ---------------------------------------------------------------------------------------------
// Routing over time (`windows`)

/// One line of a [`window_panel`]: points (x, y), colour, SVG class, dashed.
type Series<'a> = (Vec<(f64, f64)>, &'a str, &'a str, bool);

/// One panel of [`fig_windows`]: `series` of (x, y) with their legend items, on `ax`.
#[allow(clippy::too_many_arguments)]
fn window_panel(
    s: &mut Svg,
    ax: &Axes,
    xt: &[(f64, String)],
    ydec: usize,
    yt: &[f64],
    ylabel: &str,
    series: &[Series<'_>],
) {
    let ytl: Vec<(f64, String)> = yt.iter().map(|t| (*t, num(*t, ydec))).collect();
    ax.draw(s, xt, &ytl, "generated tokens (window start)", ylabel);
    if ax.ymin < 0.0 && ax.ymax > 0.0 {
        s.line(ax.left, ax.y(0.0), ax.right(), ax.y(0.0), "#555555", 1.0);
    }
    for (pts, color, class, dashed) in series {
        let px: Vec<(f64, f64)> = pts
            .iter()
            .filter(|(_, y)| y.is_finite())
            .map(|(x, y)| (ax.x(*x), ax.y(*y)))
            .collect();
        let extra = if *dashed {
            format!(r#"stroke-dasharray="6 4" class="{class}""#)
        } else {
            format!(r#"class="{class}""#)
        };
        s.polyline(&px, color, 2.0, &extra);
        if !*dashed {
            for (x, y) in &px {
                s.marker(
                    crate::svg::Shape::Circle,
                    *x,
                    *y,
                    4.0,
                    color,
                    "window-point",
                );
            }
        }
    }
}

/// Routing over time: Cohen's d and classifier accuracy per window of generated tokens, with
/// the prompt phase and (accuracy) chance for reference; `None` when `windows` was not computed.
pub fn fig_windows(r: &Results) -> Option<Figure> {
    let id = "fig-windows-task-information";
    let title = "Routing over time: task information per window of generated tokens";
    let w = r.windows.as_ref()?;
    let caption =
        "For each window of W generated tokens (x: first generated token of the window), \
        the routing signatures of those tokens only: top, Cohen's d of within- vs. \
        across-category similarity (as in the headline); bottom, the cross-validated \
        classifier's accuracy (same solver and standardisation as logreg_5fold; folds \
        restricted to the prompts in the window). Dashed: the prompt phase (prompt tokens \
        only) and, bottom, the chance rate. Windows whose categories have too few prompts \
        have no point. Definitions: docs/statistics.md, \"Routing over time\".";
    let w = match w {
        crate::results::Section::Done(w) => w,
        crate::results::Section::Skipped { skipped } => {
            return Some(unavailable(id, title, caption, skipped));
        }
    };
    if w.windows.is_empty() {
        return Some(unavailable(id, title, caption, "no window"));
    }
    let xs: Vec<f64> = w
        .windows
        .iter()
        .map(|x| x.start.unwrap_or(0) as f64)
        .collect();
    let d_of =
        |x: &crate::results::WindowStats| x.similarity.done().map_or(f64::NAN, |s| s.cohens_d);
    let acc_of =
        |x: &crate::results::WindowStats| x.classifier.done().map_or(f64::NAN, |c| c.accuracy_mean);
    let ds: Vec<(f64, f64)> = xs
        .iter()
        .zip(&w.windows)
        .map(|(x, s)| (*x, d_of(s)))
        .collect();
    let accs: Vec<(f64, f64)> = xs
        .iter()
        .zip(&w.windows)
        .map(|(x, s)| (*x, acc_of(s)))
        .collect();
    let (x0, x1) = min_max(xs.iter().copied());
    let span = (x1 - x0).max(1.0);
    let flat = |y: f64| vec![(x0, y), (x1, y)];
    let pd = d_of(&w.prompt_phase);
    let pa = acc_of(&w.prompt_phase);
    let chance = w
        .windows
        .iter()
        .chain([&w.generation_phase])
        .find_map(|x| x.classifier.done().map(|c| c.chance))
        .unwrap_or(f64::NAN);
    let (lo, hi) = min_max(
        ds.iter()
            .map(|p| p.1)
            .chain([0.0, pd])
            .filter(|v| v.is_finite()),
    );
    let (ydt, ydd) = nice_ticks(lo.min(0.0), hi.max(0.1) * 1.08, 5);
    let items = [
        LegendItem {
            label: "per window".into(),
            color: OKABE_ITO[0].into(),
            kind: LegendKind::Line {
                dashed: false,
                marker: true,
            },
        },
        LegendItem {
            label: "prompt phase".into(),
            color: OKABE_ITO[3].into(),
            kind: LegendKind::Line {
                dashed: true,
                marker: false,
            },
        },
        LegendItem {
            label: "chance".into(),
            color: "#888888".into(),
            kind: LegendKind::Line {
                dashed: true,
                marker: false,
            },
        },
    ];
    let lw = legend_width("", &items);
    let width = FIG_WIDTH - 84.0 - lw - 24.0;
    let mk = |top: f64, yt: &[f64]| Axes {
        left: 84.0,
        top,
        width,
        height: 200.0,
        xmin: x0 - 0.04 * span,
        xmax: x1 + 0.04 * span,
        ymin: yt[0],
        ymax: *yt.last().unwrap_or(&1.0),
    };
    let n = xs.len();
    let step = n.div_ceil(8).max(1);
    let xt: Vec<(f64, String)> = xs
        .iter()
        .enumerate()
        .filter(|(i, _)| i % step == 0)
        .map(|(_, x)| (*x, format!("{x}")))
        .collect();
    let mut s = Svg::new(id, FIG_WIDTH, 584.0);
    s.title(title);
    let top = mk(40.0, &ydt);
    window_panel(
        &mut s,
        &top,
        &xt,
        ydd,
        &ydt,
        "Cohen's d",
        &[
            (ds, OKABE_ITO[0], "window-d", false),
            (flat(pd), OKABE_ITO[3], "prompt-phase-d", true),
        ],
    );
    let (yat, yad) = nice_ticks(0.0, 1.0, 5);
    let bottom = mk(320.0, &yat);
    window_panel(
        &mut s,
        &bottom,
        &xt,
        yad,
        &yat,
        "accuracy",
        &[
            (accs, OKABE_ITO[0], "window-accuracy", false),
            (flat(pa), OKABE_ITO[3], "prompt-phase-accuracy", true),
            (flat(chance), "#888888", "chance", true),
        ],
    );
    legend(&mut s, FIG_WIDTH - lw - 8.0, top.top, "", &items);
    let svg = s.finish(title, caption);
    Some(figure(id, title, caption.to_string(), svg, true))
}
