//! The confound-control figure of the study report (issue 19, "Confound controls" in
//! `docs/statistics.md`): what token identity alone gives beside what routing gives.
//! - Left panel: classifier accuracy on the routing signatures (`logreg_5fold`) beside the same
//!   classifier on bag-of-token-id counts (`lexical_baseline`): mean ± std over folds as a bar
//!   with its error bar, each fold as a dot, chance as a dashed line.
//! - Right panel: Cohen's d per MoE layer on all counted tokens (`per_layer`) and on token-matched
//!   routing (`token_matched.per_layer`), with each overall d as a dashed line.
//!
//! A panel whose section was skipped or not requested says so in place of its marks.

use crate::figures::FIG_WIDTH;
use crate::results::{LogRegResult, Results, Section};
use crate::svg::{
    legend, nice_ticks, num, truncate, Anchor, Axes, LegendItem, LegendKind, Shape, Svg, OKABE_ITO,
};
use crate::Figure;

/// Element id of the confound-control figure.
pub const CONFOUND_ID: &str = "fig-confound-controls";

const ROUTING: &str = OKABE_ITO[0];
const LEXICAL: &str = OKABE_ITO[1];

fn say(s: &mut Svg, ax: &Axes, what: &str) {
    s.text(
        ax.left + ax.width / 2.0,
        ax.top + 14.0,
        &truncate(what, 40),
        11.0,
        Anchor::Middle,
        r##"class="not-computed" fill="#555555""##,
    );
}

/// `text` in lines of at most `width` characters (words kept whole unless longer than a line),
/// at most `max_lines`, the last one cut with "…" when the text does not fit.
fn wrap(text: &str, width: usize, max_lines: usize) -> Vec<String> {
    let mut lines: Vec<String> = Vec::new();
    let mut cur = String::new();
    for word in text.split_whitespace() {
        let w = truncate(word, width);
        if !cur.is_empty() && cur.chars().count() + 1 + w.chars().count() > width {
            lines.push(std::mem::take(&mut cur));
        }
        if !cur.is_empty() {
            cur.push(' ');
        }
        cur.push_str(&w);
    }
    if !cur.is_empty() {
        lines.push(cur);
    }
    if lines.len() > max_lines {
        lines.truncate(max_lines);
        if let Some(last) = lines.last_mut() {
            *last = truncate(&format!("{last} …"), width);
        }
    }
    lines
}

fn accuracy_panel(s: &mut Svg, ax: &Axes, r: &Results) {
    let yt: Vec<(f64, String)> = [0.0, 0.25, 0.5, 0.75, 1.0]
        .iter()
        .map(|t| (*t, num(*t, 2)))
        .collect();
    let routing = r.logreg_5fold.done();
    let lexical = match &r.lexical_baseline {
        Some(Section::Done(l)) => Some(&l.classifier),
        _ => None,
    };
    let xt = vec![(0.5, "routing".to_string()), (1.5, "token ids".to_string())];
    ax.draw(s, &xt, &yt, "features", "classifier accuracy");
    let chance = routing.or(lexical).map(|c| c.chance);
    if let Some(c) = chance.filter(|c| c.is_finite()) {
        s.line_extra(
            ax.left,
            ax.y(c),
            ax.right(),
            ax.y(c),
            "#555555",
            1.5,
            r#"stroke-dasharray="5 4" class="chance""#,
        );
    }
    let bar =
        |s: &mut Svg, slot: f64, c: Option<&LogRegResult>, color: &str, cls: &str, why: &str| {
            let Some(c) = c.filter(|c| c.accuracy_mean.is_finite()) else {
                // the reason in lines that fit the slot (at most 6, the last one cut)
                let lines = wrap(why, 16, 6);
                let y0 = ax.y(0.5) - 6.0 * (lines.len() as f64 - 1.0);
                for (k, line) in lines.iter().enumerate() {
                    s.text(
                        ax.x(slot + 0.5),
                        y0 + 12.0 * k as f64,
                        line,
                        10.0,
                        Anchor::Middle,
                        r##"class="not-computed" fill="#555555""##,
                    );
                }
                return;
            };
            let (x0, x1) = (ax.x(slot + 0.2), ax.x(slot + 0.8));
            let m = c.accuracy_mean.clamp(0.0, 1.0);
            s.raw(&format!(r#"<g class="{cls}">"#));
            s.rect_titled(
                x0,
                ax.y(m),
                x1 - x0,
                ax.y(0.0) - ax.y(m),
                color,
                r#"class="bar" fill-opacity="0.75""#,
                &format!(
                    "{cls}: accuracy {} ± {} over {} folds (chance {})",
                    num(c.accuracy_mean, 3),
                    num(c.accuracy_std, 3),
                    c.fold_accuracies.len(),
                    num(c.chance, 3)
                ),
            );
            let sd = if c.accuracy_std.is_finite() {
                c.accuracy_std
            } else {
                0.0
            };
            let xc = ax.x(slot + 0.5);
            let (lo, hi) = ((m - sd).max(0.0), (m + sd).min(1.0));
            s.line_extra(
                xc,
                ax.y(lo),
                xc,
                ax.y(hi),
                "#222222",
                1.5,
                r#"class="error-bar""#,
            );
            let n = c.fold_accuracies.len().max(1) as f64;
            for (k, a) in c.fold_accuracies.iter().enumerate() {
                if a.is_finite() {
                    let jitter = (k as f64 + 0.5) / n * 0.36 - 0.18;
                    s.marker(
                        Shape::Circle,
                        ax.x(slot + 0.5 + jitter),
                        ax.y(a.clamp(0.0, 1.0)),
                        3.0,
                        "#222222",
                        "fold",
                    );
                }
            }
            s.raw("</g>");
        };
    let why_routing = r.logreg_5fold.why_missing().unwrap_or_default();
    bar(s, 0.0, routing, ROUTING, "routing", &why_routing);
    let why_lexical = match &r.lexical_baseline {
        Some(Section::Skipped { skipped }) => format!("skipped: {skipped}"),
        None => "not computed".into(),
        Some(Section::Done(_)) => "undefined".into(),
    };
    bar(s, 1.0, lexical, LEXICAL, "lexical", &why_lexical);
}

fn layer_panel(s: &mut Svg, ax_in: &Axes, r: &Results) {
    let tm = match &r.token_matched {
        Some(Section::Done(t)) => Some(t),
        _ => None,
    };
    let all: Vec<(f64, f64)> = r
        .per_layer
        .iter()
        .map(|l| (l.layer as f64, l.cohens_d))
        .collect();
    let matched: Vec<(f64, f64)> = tm
        .map(|t| {
            t.per_layer
                .iter()
                .map(|l| (l.layer as f64, l.cohens_d))
                .collect()
        })
        .unwrap_or_default();
    let overall = [
        Some(r.similarity.cohens_d),
        tm.map(|t| t.similarity.cohens_d),
    ];
    let ys = all
        .iter()
        .chain(&matched)
        .map(|p| p.1)
        .chain(overall.iter().flatten().copied())
        .chain([0.0])
        .filter(|y| y.is_finite());
    let (lo, hi) = ys.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), y| {
        (a.min(y), b.max(y))
    });
    let pad = ((hi - lo) * 0.08).max(0.05);
    let (yt, yd) = nice_ticks(if lo >= 0.0 { 0.0 } else { lo - pad }, hi + pad, 5);
    let xs = all.iter().chain(&matched).map(|p| p.0);
    let (xmin, xmax) = xs.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), x| {
        (a.min(x), b.max(x))
    });
    let (xmin, xmax) = if xmin.is_finite() {
        (xmin - 0.5, xmax + 0.5)
    } else {
        (0.0, 1.0)
    };
    let ax = Axes {
        xmin,
        xmax,
        ymin: yt[0],
        ymax: *yt.last().unwrap_or(&1.0),
        ..*ax_in
    };
    let nl = all.len().max(matched.len());
    let step = nl.div_ceil(8).max(1);
    let xt: Vec<(f64, String)> = all
        .iter()
        .step_by(step)
        .map(|p| (p.0, format!("{}", p.0 as usize)))
        .collect();
    let ytl: Vec<(f64, String)> = yt.iter().map(|t| (*t, num(*t, yd))).collect();
    ax.draw(s, &xt, &ytl, "MoE layer", "Cohen's d");
    if ax.ymin < 0.0 && ax.ymax > 0.0 {
        s.line(ax.left, ax.y(0.0), ax.right(), ax.y(0.0), "#555555", 1.0);
    }
    for (pts, d, color, cls) in [
        (&all, overall[0], ROUTING, "all-tokens"),
        (&matched, overall[1], LEXICAL, "token-matched"),
    ] {
        s.raw(&format!(r#"<g class="{cls}">"#));
        if let Some(d) = d.filter(|d| d.is_finite()) {
            s.line_extra(
                ax.left,
                ax.y(d),
                ax.right(),
                ax.y(d),
                color,
                1.5,
                r#"stroke-dasharray="6 4" class="overall""#,
            );
        }
        let px: Vec<(f64, f64)> = pts
            .iter()
            .filter(|p| p.1.is_finite())
            .map(|p| (ax.x(p.0), ax.y(p.1)))
            .collect();
        s.polyline(&px, color, 2.0, r#"class="layer-line""#);
        for (x, y) in &px {
            s.marker(Shape::Circle, *x, *y, 3.5, color, "layer-point");
        }
        s.raw("</g>");
    }
    match &r.token_matched {
        Some(Section::Skipped { skipped }) => {
            say(s, &ax, &format!("token-matched skipped: {skipped}"))
        }
        None => say(s, &ax, "token-matched: not requested"),
        Some(Section::Done(_)) => {}
    }
}

/// The confound-control figure; `None` when neither the lexical baseline nor the token-matched
/// statistics were computed or attempted (`results.json` without both sections).
pub fn fig_confounds(r: &Results) -> Option<Figure> {
    if r.lexical_baseline.is_none() && r.token_matched.is_none() {
        return None;
    }
    let title = "Confound controls: routing against token identity";
    let mode = match &r.token_matched {
        Some(Section::Done(t)) => format!("token-matched ({})", t.mode.as_str()),
        _ => "token-matched".into(),
    };
    let mut s = Svg::new(CONFOUND_ID, FIG_WIDTH, 430.0);
    s.title(title);
    let left = Axes {
        left: 76.0,
        top: 56.0,
        width: 180.0,
        height: 250.0,
        xmin: 0.0,
        xmax: 2.0,
        ymin: 0.0,
        ymax: 1.0,
    };
    let right = Axes {
        left: 366.0,
        width: 250.0,
        ..left
    };
    s.text(
        left.left + left.width / 2.0,
        46.0,
        "classifier accuracy",
        12.0,
        Anchor::Middle,
        r#"font-weight="bold""#,
    );
    s.text(
        right.left + right.width / 2.0,
        46.0,
        "category separation per layer",
        12.0,
        Anchor::Middle,
        r#"font-weight="bold""#,
    );
    accuracy_panel(&mut s, &left, r);
    layer_panel(&mut s, &right, r);
    let items = [
        LegendItem {
            label: "routing signatures (all counted tokens)".into(),
            color: ROUTING.into(),
            kind: LegendKind::Marker(Shape::Square),
        },
        LegendItem {
            label: format!("token identity: lexical baseline / {mode}"),
            color: LEXICAL.into(),
            kind: LegendKind::Marker(Shape::Square),
        },
        LegendItem {
            label: "chance (left); overall d (right)".into(),
            color: "#555555".into(),
            kind: LegendKind::Line {
                dashed: true,
                marker: false,
            },
        },
    ];
    legend(&mut s, left.left, 352.0, "", &items);
    let lex = match &r.lexical_baseline {
        Some(Section::Done(l)) => format!(
            "lexical baseline accuracy {}",
            num(l.classifier.accuracy_mean, 3)
        ),
        _ => "no lexical baseline".into(),
    };
    let desc = format!(
        "Left: classifier accuracy on routing signatures ({}) and on bag-of-token-id counts ({lex}), bars mean over folds, dots single folds, dashed chance. Right: Cohen's d per MoE layer on all tokens (overall {}) and {mode}.",
        r.logreg_5fold
            .done()
            .map(|c| num(c.accuracy_mean, 3))
            .unwrap_or_else(|| "not computed".into()),
        num(r.similarity.cohens_d, 3)
    );
    let svg = s.finish(title, &desc);
    Some(Figure {
        id: CONFOUND_ID.into(),
        title: "Confound controls: routing against token identity".into(),
        caption: format!(
            "Left: the 5-fold classifier on the routing signatures (blue) beside the same classifier, folds and standardisation on bag-of-token-id counts of exactly the counted tokens (orange, the lexical baseline): bars are the mean accuracy over folds with ± one std, dots the single folds, the dashed line chance. Routing that is not more accurate than token identity alone carries no task information beyond which tokens the prompts contain. Right: Cohen's d of within- vs across-category similarity per MoE layer on all counted tokens (blue) and on {mode} routing (orange), each overall d as a dashed line; the drop from blue to orange is the part of the separation that token identity explains."
        ),
        svg,
        available: true,
    })
}

#[cfg(test)]
mod tests {
    use super::wrap;

    #[test]
    fn wrap_keeps_words_and_limits_lines() {
        assert_eq!(
            wrap("category 0 has fewer prompts than folds", 16, 6),
            vec!["category 0 has", "fewer prompts", "than folds"]
        );
        assert_eq!(wrap("averyveryverylongword x", 8, 6), vec!["averyve…", "x"]);
        let cut = wrap("a b c d e f g h", 3, 2);
        assert_eq!(cut, vec!["a b", "c …"]);
        assert!(wrap("", 10, 3).is_empty());
    }
}
