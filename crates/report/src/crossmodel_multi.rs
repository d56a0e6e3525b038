//! The N-run cross-model comparison (`moe-xray compare-models R1 R2 R3 … --out DIR`): N × N
//! matrix figures of RSA (with the Mantel p in each cell) and linear CKA, the table of every
//! pair, the task separation of every run side by side, and for every pair of the same
//! architecture its expert matching and matched-drift figure. Same page frame and toolkit as the
//! two-run page (`crossmodel.rs`).

use std::fmt::Write as _;

use moe_xray_stats::crossmodel::MultiModelReport;

use crate::crossmodel::{cell, matching_section, reproduce_and_close};
use crate::figures::FIG_WIDTH;
use crate::html::{figure_html, page_open};
use crate::svg::{
    colorbar, diverging, diverging_colorbar, esc, num, sig, text_on_viridis, truncate, viridis,
    Anchor, Svg, DIAGONAL_GREY,
};
use crate::Figure;

/// Element id of the N × N matrix figure of `"rsa"` or `"cka"`.
pub fn matrix_id(which: &str) -> String {
    format!("fig-crossmodel-matrix-{which}")
}

/// Element id of the matched-drift figure of pair (a, b) (0-based run indices).
pub fn pair_drift_id(a: usize, b: usize) -> String {
    format!("fig-crossmodel-drift-{}-{}", a + 1, b + 1)
}

/// Short name of run i: "R{i+1}".
fn run_name(i: usize) -> String {
    format!("R{}", i + 1)
}

/// The N × N matrix of `"rsa"` (Spearman, diverging −1…1, the Mantel p printed under each value)
/// or `"cka"` (viridis 0…1); rows and columns are the runs R1…RN in the order given, the diagonal
/// grey. `None` for any other `which`.
pub fn matrix_heatmap(r: &MultiModelReport, which: &str) -> Option<String> {
    let (m, name) = match which {
        "rsa" => (&r.matrices.rsa, "RSA (Spearman)"),
        "cka" => (&r.matrices.cka, "linear CKA"),
        _ => return None,
    };
    let n = r.models.len();
    let cell_px = (440.0 / n.max(1) as f64).clamp(14.0, 72.0);
    let (left, top) = (72.0, 56.0);
    let g = cell_px * n as f64;
    let width = (left + g + 120.0).max(FIG_WIDTH);
    let height = top + g + 56.0;
    let id = matrix_id(which);
    let title = format!("{name} of every pair of runs");
    let desc = format!(
        "{name} of the routing signatures of run i (row) and run j (column) over the {} prompts shared by all {n} runs; {}; diagonal grey (a run against itself).",
        r.shared_prompts,
        r.models
            .iter()
            .enumerate()
            .map(|(i, x)| format!("{} = {}", run_name(i), x.label))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let mut s = Svg::new(&id, width, height);
    s.title(&title);
    s.raw(r#"<g class="cells">"#);
    let labels = n <= 12;
    for (i, row) in m.iter().enumerate() {
        for (j, v) in row.iter().enumerate() {
            let (x, y) = (left + j as f64 * cell_px, top + i as f64 * cell_px);
            let p = r
                .matrices
                .mantel_p
                .get(i)
                .and_then(|row| row.get(j))
                .copied()
                .flatten();
            let fill = match v {
                _ if i == j => DIAGONAL_GREY.to_string(),
                Some(v) if which == "cka" => viridis(*v),
                Some(v) => diverging(*v),
                None => DIAGONAL_GREY.to_string(),
            };
            let tip = if i == j {
                format!("{}: the run itself", run_name(i))
            } else if which == "rsa" {
                format!(
                    "{} × {}: Spearman {}, Mantel p {}",
                    run_name(i),
                    run_name(j),
                    cell(*v, 4),
                    cell(p, 4)
                )
            } else {
                format!("{} × {}: CKA {}", run_name(i), run_name(j), cell(*v, 4))
            };
            s.rect_titled(x, y, cell_px, cell_px, &fill, r#"class="cell""#, &tip);
            if labels && i != j {
                let ink = match (which, v) {
                    ("cka", Some(v)) => text_on_viridis(*v),
                    _ => "#000000",
                };
                let cx = x + cell_px / 2.0;
                let value = v.map(|v| num(v, 2)).unwrap_or_else(|| "n/a".into());
                let dy = if which == "rsa" { -2.0 } else { 4.0 };
                s.text(
                    cx,
                    y + cell_px / 2.0 + dy,
                    &value,
                    11.0,
                    Anchor::Middle,
                    &format!(r#"class="value" fill="{ink}""#),
                );
                if which == "rsa" {
                    s.text(
                        cx,
                        y + cell_px / 2.0 + 11.0,
                        &p.map(|p| format!("p {}", sig(p, 2))).unwrap_or_default(),
                        9.0,
                        Anchor::Middle,
                        &format!(r#"class="p" fill="{ink}""#),
                    );
                }
            }
        }
    }
    s.raw("</g>");
    s.rect(
        left,
        top,
        g,
        g,
        "none",
        r##"stroke="#555555" stroke-width="0.8""##,
    );
    for i in 0..n {
        let c = (i as f64 + 0.5) * cell_px;
        s.text(
            left - 6.0,
            top + c + 4.0,
            &run_name(i),
            11.0,
            Anchor::End,
            r#"class="row-label""#,
        );
        s.text(
            left + c,
            top + g + 14.0,
            &run_name(i),
            11.0,
            Anchor::Middle,
            r#"class="col-label""#,
        );
    }
    let cbh = g.clamp(80.0, 240.0);
    if which == "cka" {
        colorbar(
            &mut s,
            &id,
            left + g + 24.0,
            top,
            14.0,
            cbh,
            0.0,
            1.0,
            "CKA",
        );
    } else {
        let ticks: Vec<(f64, String)> = [-1.0, -0.5, 0.0, 0.5, 1.0]
            .iter()
            .map(|t| (*t, num(*t, 1)))
            .collect();
        diverging_colorbar(
            &mut s,
            &id,
            left + g + 24.0,
            top,
            14.0,
            cbh,
            &ticks,
            "Spearman",
        );
    }
    Some(s.finish(&title, &desc))
}

/// The two matrix figures with their captions.
pub fn figures(r: &MultiModelReport) -> Vec<Figure> {
    let mut out = Vec::new();
    for (which, title, caption) in [
        (
            "rsa",
            "RSA between every pair of runs",
            "Spearman correlation of the prompt × prompt routing-similarity matrices of run i (row) and run j (column), over the prompts that every run shares; under each value the one-sided Mantel permutation p (B's prompt labels permuted). Blue is positive, orange negative; the diagonal is grey.",
        ),
        (
            "cka",
            "Linear CKA between every pair of runs",
            "Linear centred kernel alignment of the signature matrices (N × L·E each) of run i and run j over the shared prompts: 1 means the same prompt geometry up to rotation and scale, 0 unrelated. It needs no correspondence between experts or layers, so runs of different architectures are compared directly.",
        ),
    ] {
        if let Some(svg) = matrix_heatmap(r, which) {
            out.push(Figure {
                id: matrix_id(which),
                title: title.into(),
                caption: caption.into(),
                svg,
                available: true,
            });
        }
    }
    out
}

/// What the N-run `report.html` shows.
#[derive(Debug, Clone, Copy)]
pub struct MultiModelPage<'a> {
    pub report: &'a MultiModelReport,
    /// The command that made it (shown under "Reproduce"; empty: not recorded).
    pub command: &'a str,
}

fn opt_text(x: &Option<String>) -> String {
    x.clone().unwrap_or_else(|| "(not recorded)".into())
}

fn models_table(r: &MultiModelReport) -> String {
    let mut s = String::from(
        r#"<table class="models"><thead><tr><th>run</th><th>analysis directory</th><th>model</th><th>family</th><th>MoE layers × experts</th><th>top-k</th><th>prompts analysed</th><th>not shared by every run</th></tr></thead><tbody>"#,
    );
    for (i, m) in r.models.iter().enumerate() {
        let _ = write!(
            s,
            r#"<tr><th scope="row">{}</th><td>{}</td><td>{}</td><td>{}</td><td class="num">{} × {}</td><td class="num">{}</td><td class="num">{}</td><td class="num">{}</td></tr>"#,
            run_name(i),
            esc(&m.label),
            esc(&opt_text(&m.model)),
            esc(&opt_text(&m.family)),
            m.num_layers,
            m.num_experts,
            m.top_k,
            m.num_prompts,
            r.not_shared.get(i).map(Vec::len).unwrap_or(0)
        );
    }
    s.push_str("</tbody></table>");
    s
}

fn pairs_table(r: &MultiModelReport) -> String {
    let mut s = String::from(
        r#"<table class="pairs"><thead><tr><th>pair</th><th>RSA (Spearman)</th><th>Mantel p</th><th>linear CKA</th><th>same architecture</th><th>experts relabelled</th><th>mean JS as numbered → matched (bits)</th></tr></thead><tbody>"#,
    );
    for p in &r.pairs {
        let c = &p.comparison;
        let moved = c
            .expert_matching
            .done()
            .map(|m| {
                let total: usize = m.layers.iter().map(|l| l.assignment.len()).sum();
                format!("{} of {total}", m.moved)
            })
            .unwrap_or_else(|| "n/a".into());
        let drift = c
            .matched_drift
            .done()
            .map(|d| {
                format!(
                    "{} → {}",
                    num(d.unmatched.mean_js_bits, 6),
                    num(d.matched.mean_js_bits, 6)
                )
            })
            .unwrap_or_else(|| "n/a".into());
        let _ = write!(
            s,
            r##"<tr><th scope="row"><a href="#pair-{a1}-{b1}">{} × {}</a></th><td class="num">{}</td><td class="num">{}</td><td class="num">{}</td><td>{}</td><td class="num">{}</td><td class="num">{}</td></tr>"##,
            run_name(p.a),
            run_name(p.b),
            cell(c.rsa.spearman, 4),
            cell(c.rsa.mantel.done().map(|m| m.p), 4),
            cell(c.cka, 4),
            if c.same_architecture { "yes" } else { "no" },
            esc(&moved),
            esc(&drift),
            a1 = p.a + 1,
            b1 = p.b + 1,
        );
    }
    s.push_str("</tbody></table>");
    s
}

fn separation_table(r: &MultiModelReport) -> String {
    let head: String = (0..r.models.len())
        .map(|i| format!("<th>{}</th>", run_name(i)))
        .collect();
    let mut s = format!(
        r#"<table class="separation"><thead><tr><th></th>{head}<th>definition</th></tr></thead><tbody>"#
    );
    type Get = fn(&moe_xray_stats::crossmodel::ModelSeparation) -> Option<f64>;
    let rows: [(&str, Get, &str); 5] = [
        (
            "Cohen's d (own analysis)",
            |m| m.cohens_d,
            "within- vs across-category similarity, all prompts of each results.json",
        ),
        (
            "Cohen's d (shared prompts)",
            |m| m.cohens_d_shared,
            "the same, on the prompts every run shares",
        ),
        (
            "classifier accuracy",
            |m| m.accuracy,
            "5-fold logistic regression on the signatures (logreg_5fold.accuracy_mean)",
        ),
        ("chance", |m| m.chance, "majority-class rate"),
        (
            "macro F1 (out of fold)",
            |m| m.macro_f1,
            "logreg_5fold.macro_f1_oof",
        ),
    ];
    for (name, get, def) in rows {
        let cells: String = r
            .separation
            .iter()
            .map(|m| format!(r#"<td class="num">{}</td>"#, cell(get(m), 3)))
            .collect();
        let _ = write!(
            s,
            r#"<tr><th scope="row">{}</th>{cells}<td class="def">{}</td></tr>"#,
            esc(name),
            esc(def)
        );
    }
    s.push_str("</tbody></table>");
    if !r.categories.is_empty() {
        let _ = write!(
            s,
            r#"<table class="per-category"><thead><tr><th>category</th><th>n</th>{}{}</tr></thead><tbody>"#,
            (0..r.models.len())
                .map(|i| format!("<th>d, {}</th>", run_name(i)))
                .collect::<String>(),
            (0..r.models.len())
                .map(|i| format!("<th>recall, {}</th>", run_name(i)))
                .collect::<String>()
        );
        for (k, c) in r.categories.iter().enumerate() {
            let get =
                |f: &dyn Fn(&moe_xray_stats::crossmodel::CategoryCell) -> Option<f64>| -> String {
                    r.separation
                        .iter()
                        .map(|m| {
                            format!(
                                r#"<td class="num">{}</td>"#,
                                cell(m.per_category.get(k).and_then(f), 3)
                            )
                        })
                        .collect()
                };
            let _ = write!(
                s,
                r#"<tr><td>{}</td><td class="num">{}</td>{}{}</tr>"#,
                esc(&c.category),
                c.n,
                get(&|x| x.d),
                get(&|x| x.recall)
            );
        }
        s.push_str("</tbody></table>");
        s.push_str(r#"<p class="muted">d of a category: its within-category pairs against the pairs with one prompt in it, on the shared prompts; recall: the share of its prompts the run's own classifier assigns to it.</p>"#);
    }
    s
}

/// Renders the N-run `report.html`: one self-contained page (inline SVG, the study report's CSS,
/// no scripts, no network). Deterministic: the same input gives the same bytes.
pub fn render_html(p: &MultiModelPage<'_>) -> String {
    let r = p.report;
    let n = r.models.len();
    let title = format!("moe-xray cross-model comparison of {n} runs");
    let mut s = String::new();
    page_open(&mut s, &title);
    let _ = writeln!(s, "<header><h1>{}</h1>", esc(&title));
    let names: Vec<String> = r
        .models
        .iter()
        .enumerate()
        .map(|(i, m)| {
            format!(
                "{} {}",
                run_name(i),
                truncate(m.model.as_deref().unwrap_or(&m.label), 60)
            )
        })
        .collect();
    let _ = writeln!(
        s,
        "<p class=\"sub\">{}</p></header>",
        esc(&format!(
            "Do these models route the same prompts alike? {} prompts shared by every run; {}.",
            r.shared_prompts,
            names.join(", ")
        ))
    );
    s.push_str("<nav><ol><li><a href=\"#models\">Runs</a></li><li><a href=\"#matrices\">Pairwise RSA and CKA</a></li><li><a href=\"#task-separation\">Task separation side by side</a></li><li><a href=\"#pairs\">Every pair: expert matching and matched drift</a></li><li><a href=\"#reproduce\">Reproduce</a></li></ol></nav>\n");
    s.push_str("<section id=\"models\"><h2>Runs</h2>\n");
    s.push_str(&models_table(r));
    s.push_str("</section>\n");
    s.push_str("<section id=\"matrices\"><h2>Pairwise RSA and CKA</h2>\n");
    s.push_str(&pairs_table(r));
    for f in figures(r) {
        s.push_str(&figure_html(&f));
    }
    s.push_str("</section>\n");
    s.push_str("<section id=\"task-separation\"><h2>Task separation side by side</h2>\n");
    s.push_str(&separation_table(r));
    s.push_str("</section>\n");
    s.push_str("<section id=\"pairs\"><h2>Every pair: expert matching and matched drift</h2>\n<p>Each pair is compared exactly as <code>compare-models A B</code> compares two runs (on the prompts every run shares); <code>compare-models A B --out DIR</code> gives its full page with the RSA scatter and per-layer matrices.</p>\n");
    for pc in &r.pairs {
        let (a1, b1) = (pc.a + 1, pc.b + 1);
        let _ = writeln!(
            s,
            "<section id=\"pair-{a1}-{b1}\"><h3>{} × {}: {} vs {}</h3>",
            run_name(pc.a),
            run_name(pc.b),
            esc(&pc.comparison.model_a.label),
            esc(&pc.comparison.model_b.label)
        );
        s.push_str(&matching_section(
            &pc.comparison,
            &format!("expert-matching-{a1}-{b1}"),
            &pair_drift_id(pc.a, pc.b),
            true,
        ));
        s.push_str("</section>\n");
    }
    s.push_str("</section>\n");
    reproduce_and_close(
        &mut s,
        p.command,
        &r.tool_version,
        &format!("N-run cross-model schema {}", r.schema_version),
    );
    s
}
