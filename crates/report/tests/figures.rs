//! Snapshot-style structure tests of the SVG figures.

mod common;

use moe_xray_report::{render_figures, Figure};

fn parse(svg: &str) -> roxmltree::Document<'_> {
    roxmltree::Document::parse(svg).unwrap_or_else(|e| panic!("SVG is not well-formed XML: {e}"))
}

fn count(doc: &roxmltree::Document<'_>, tag: &str, class: Option<&str>) -> usize {
    doc.descendants()
        .filter(|n| n.has_tag_name(tag))
        .filter(|n| class.is_none_or(|c| n.attribute("class") == Some(c)))
        .count()
}

fn texts(doc: &roxmltree::Document<'_>) -> Vec<String> {
    doc.descendants()
        .filter(|n| n.has_tag_name("text"))
        .map(|n| n.text().unwrap_or("").to_string())
        .collect()
}

/// How many `tag` children the first element of class `class` has.
fn children_of_class(doc: &roxmltree::Document<'_>, class: &str, tag: &str) -> usize {
    doc.descendants()
        .find(|n| n.attribute("class") == Some(class))
        .unwrap_or_else(|| panic!("no element of class {class}"))
        .children()
        .filter(|n| n.has_tag_name(tag))
        .count()
}

/// Asserts that every string of `want` is one of the text elements `t`.
fn has_texts(t: &[String], want: &[&str]) {
    for w in want {
        assert!(t.iter().any(|x| x == w), "no text {w:?} in {t:?}");
    }
}

fn all() -> Vec<Figure> {
    let mut r = common::results();
    let map = common::prompts()
        .into_iter()
        .map(|p| (p.id, p.category))
        .collect();
    r.fill_prompt_categories(&map);
    render_figures(&r, Some(&common::usage()))
}

/// The parsed SVG of the fixture's figure `id` (the figures are rendered once, by [`all`], for
/// the tests that only read them).
fn figure_doc(id: &str) -> roxmltree::Document<'static> {
    static FIGURES: std::sync::OnceLock<Vec<Figure>> = std::sync::OnceLock::new();
    let f = FIGURES
        .get_or_init(all)
        .iter()
        .find(|f| f.id == id)
        .unwrap_or_else(|| panic!("no figure {id}"));
    parse(&f.svg)
}

#[test]
fn seven_figures_with_valid_svg_root() {
    let figs = all();
    let ids: Vec<&str> = figs.iter().map(|f| f.id.as_str()).collect();
    assert_eq!(
        ids,
        [
            "fig1-category-similarity",
            "fig2-baselines",
            "fig3-layer-cohens-d",
            "fig4-pca",
            "fig5-tsne",
            "fig6-confusion",
            "fig7-expert-usage"
        ]
    );
    for f in &figs {
        assert!(f.available, "{} should be available", f.id);
        let doc = parse(&f.svg);
        let root = doc.root_element();
        assert_eq!(root.tag_name().name(), "svg");
        assert_eq!(root.attribute("id"), Some(f.id.as_str()));
        assert_eq!(root.attribute("width"), Some("640.00"));
        let vb = root.attribute("viewBox").unwrap();
        assert!(vb.starts_with("0 0 640.00 "), "{vb}");
        let h: f64 = vb.split(' ').nth(3).unwrap().parse().unwrap();
        assert!((100.0..1200.0).contains(&h), "{}: height {h}", f.id);
        assert_eq!(root.attribute("height").unwrap().parse::<f64>().unwrap(), h);
        // accessible title = figure title, caption in desc
        let title = doc.descendants().find(|n| n.has_tag_name("title")).unwrap();
        assert_eq!(title.text(), Some(f.title.as_str()));
        assert!(f.caption.len() > 80, "{} caption too short", f.id);
        // visible title text
        assert!(texts(&doc).iter().any(|t| t == &f.title), "{}", f.id);
    }
}

#[test]
fn category_heatmap_has_values_in_cells_and_labels() {
    let doc = figure_doc("fig1-category-similarity");
    assert_eq!(children_of_class(&doc, "cells", "rect"), 16);
    assert_eq!(count(&doc, "text", Some("cell-value")), 16);
    let t = texts(&doc);
    let r = common::results();
    let v = r.category_similarity_matrix.values[1][2];
    assert!(t.contains(&format!("{v:.3}")), "cell value {v:.3} printed");
    for c in ["code", "factual", "math", "story"] {
        assert_eq!(t.iter().filter(|x| *x == c).count(), 2, "{c} row+col label");
    }
    has_texts(&t, &["mean sim"]); // colour bar label
    assert!(doc.descendants().any(|n| n.has_tag_name("linearGradient")));
}

#[test]
fn baseline_bars_with_error_bars_and_values() {
    let doc = figure_doc("fig2-baselines");
    assert_eq!(count(&doc, "rect", Some("bar")), 5);
    let t = texts(&doc);
    // bar values, bar labels, axis label
    has_texts(&t, &["0.741", "0.603", "0.190", "0.152", "0.311"]);
    has_texts(
        &t,
        &["within", "across", "permutation", "(uniform)", "(marginal)"],
    );
    has_texts(&t, &["mean routing similarity"]);
    // 3 lines per error bar (stem + 2 caps)
    assert_eq!(children_of_class(&doc, "bars", "line"), 15);
}

#[test]
fn layer_d_line_has_one_marker_per_layer_and_legend() {
    let doc = figure_doc("fig3-layer-cohens-d");
    assert_eq!(count(&doc, "circle", Some("layer-point")), 16);
    let line = doc
        .descendants()
        .find(|n| n.attribute("class") == Some("layer-line"))
        .unwrap();
    assert_eq!(line.attribute("points").unwrap().split(' ').count(), 16);
    let t = texts(&doc);
    has_texts(
        &t,
        &[
            "MoE layer",
            "Cohen's d",
            "per-layer d",
            "all layers (d = 2.31)",
        ],
    );
    assert_eq!(count(&doc, "line", Some("overall-d")), 1);
}

#[test]
fn scatter_plots_have_all_points_legend_and_variance_labels() {
    for id in ["fig4-pca", "fig5-tsne"] {
        let doc = figure_doc(id);
        let points = doc
            .descendants()
            .filter(|n| n.attribute("class") == Some("point"))
            .count();
        assert_eq!(points, 80, "{id}");
        // four categories → four marker shapes / colours
        let fills: std::collections::BTreeSet<&str> = doc
            .descendants()
            .filter(|n| n.attribute("class") == Some("point"))
            .map(|n| n.attribute("fill").unwrap())
            .collect();
        assert_eq!(fills.len(), 4, "{id}");
        let t = texts(&doc);
        // legend entries and title
        has_texts(
            &t,
            &[
                "code (n = 20)",
                "math (n = 20)",
                "story (n = 20)",
                "factual (n = 20)",
                "category",
            ],
        );
    }
    let t = texts(&figure_doc("fig4-pca"));
    has_texts(&t, &["PC1 (18.4 % of variance)", "PC2 (9.2 % of variance)"]);
}

#[test]
fn confusion_matrix_shows_counts_and_row_shares() {
    let doc = figure_doc("fig6-confusion");
    assert_eq!(count(&doc, "text", Some("cell-value")), 16);
    let t = texts(&doc);
    has_texts(
        &t,
        &[
            "17 (85%)",
            "19 (95%)",
            "predicted category",
            "true category",
        ],
    );
}

#[test]
fn usage_heatmap_has_one_panel_per_category_with_l_by_e_cells() {
    let doc = figure_doc("fig7-expert-usage");
    let panels: Vec<_> = doc
        .descendants()
        .filter(|n| n.attribute("class") == Some("usage-panel"))
        .collect();
    assert_eq!(panels.len(), 4);
    for p in &panels {
        assert_eq!(
            p.children().filter(|n| n.has_tag_name("rect")).count(),
            16 * 64
        );
    }
    let t = texts(&doc);
    has_texts(&t, &["expert", "layer", "share"]);
}

#[test]
fn rendering_is_byte_deterministic() {
    let a = all();
    let b = all();
    assert_eq!(a, b);
    let html_a = moe_xray_report::render_report(&common::input());
    let html_b = moe_xray_report::render_report(&common::input());
    assert_eq!(html_a, html_b);
}

#[test]
fn skipped_sections_become_labelled_placeholders() {
    let mut v: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(common::data_dir().join("results.json")).unwrap(),
    )
    .unwrap();
    v["tsne"] = serde_json::json!({"skipped": "fewer than 4 prompts"});
    v["logreg_5fold"] = serde_json::json!({"skipped": "class 'math' has 2 prompts < 5 folds"});
    v["pca"] = serde_json::json!({"skipped": "not computed on the gram_sums path"});
    let r = moe_xray_report::Results::from_json_str(&v.to_string(), std::path::Path::new("x.json"))
        .unwrap();
    let figs = render_figures(&r, None);
    assert_eq!(figs.len(), 7);
    let by = |id: &str| figs.iter().find(|f| f.id == id).unwrap();
    assert!(!by("fig5-tsne").available);
    assert!(by("fig5-tsne")
        .svg
        .contains("skipped: fewer than 4 prompts"));
    assert!(!by("fig6-confusion").available);
    assert!(!by("fig6-confusion")
        .caption
        .contains("class &#39;math&#39;"));
    assert!(by("fig6-confusion")
        .caption
        .contains("class 'math' has 2 prompts"));
    assert!(by("fig6-confusion")
        .svg
        .contains("class &#39;math&#39; has 2 prompts"));
    assert!(!by("fig4-pca").available);
    assert!(by("fig4-pca")
        .svg
        .contains("skipped: not computed on the gram_sums path"));
    assert!(!by("fig7-expert-usage").available);
    assert!(by("fig1-category-similarity").available);
    for f in &figs {
        parse(&f.svg);
    }
}

#[test]
fn results_json_must_be_exactly_the_schema() {
    let text = std::fs::read_to_string(common::data_dir().join("results.json")).unwrap();
    let origin = std::path::Path::new("runs/x/results.json");
    let parse = |t: &str| moe_xray_report::Results::from_json_str(t, origin);
    // The committed fixture is the schema.
    parse(&text).unwrap();
    // A missing section is an error naming the file, the line and the field.
    let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v.as_object_mut().unwrap().remove("pca");
    let err = parse(&serde_json::to_string_pretty(&v).unwrap())
        .unwrap_err()
        .to_string();
    assert!(err.starts_with("runs/x/results.json:"), "{err}");
    assert!(err.contains("missing field `pca`"), "{err}");
    // Guessed spellings are not accepted: `cohens_d_ci` is not `cohens_d_ci95`.
    let renamed = text.replacen("\"cohens_d_ci95\"", "\"cohens_d_ci\"", 1);
    let err = parse(&renamed).unwrap_err().to_string();
    assert!(err.contains("cohens_d_ci95"), "{err}");
    // Another major schema_version is refused before its fields are read.
    for (version, shown) in [("2", "2"), ("\"1\"", "\"1\""), ("null", "null")] {
        let other = text.replacen(
            "\"schema_version\": 1,",
            &format!("\"schema_version\": {version},"),
            1,
        );
        let err = parse(&other).unwrap_err();
        assert!(
            matches!(err, moe_xray_report::ReportError::Schema { .. }),
            "{err}"
        );
        let msg = err.to_string();
        assert!(
            msg.starts_with("runs/x/results.json: results.json schema_version "),
            "{msg}"
        );
        assert!(
            msg.contains(&format!("schema_version {shown} is not supported")),
            "{msg}"
        );
    }
}

#[test]
fn bad_results_json_error_names_file_and_line() {
    let err = moe_xray_report::Results::from_json_str(
        "{\n \"similarity\": [1,\n",
        std::path::Path::new("runs/x/results.json"),
    )
    .unwrap_err()
    .to_string();
    assert!(err.starts_with("runs/x/results.json:"), "{err}");
    assert!(err.contains(":2:") || err.contains(":3:"), "{err}");
}

#[test]
fn heatmap_text_is_dropped_when_cells_are_too_small() {
    let mut r = common::results();
    let n = 24;
    r.category_similarity_matrix.order = (0..n).map(|i| format!("category-{i:02}")).collect();
    r.category_similarity_matrix.values = (0..n)
        .map(|a| (0..n).map(|b| if a == b { 0.9 } else { 0.5 }).collect())
        .collect();
    let figs = render_figures(&r, None);
    let doc = parse(&figs[0].svg);
    assert_eq!(children_of_class(&doc, "cells", "rect"), n * n);
    assert_eq!(count(&doc, "text", Some("cell-value")), 0);
    // long labels are rotated and truncated
    has_texts(&texts(&doc), &["category-07"]);
    assert!(figs[0].svg.contains("rotate(-35"));
}

/// The confound-control figure: two routing/lexical accuracy bars with one dot per fold and a
/// chance line; per-layer d lines on all tokens and token-matched with one point per layer and
/// an overall dashed line each; a skipped lexical baseline says why; absent without both.
#[test]
fn confound_figure_shows_lexical_and_token_matched() {
    use moe_xray_report::confound_figures::{fig_confounds, CONFOUND_ID};
    use moe_xray_stats::results::Section;
    let mut r = common::results();
    assert!(
        fig_confounds(&r).is_none(),
        "no confound sections, no figure"
    );
    common::with_confounds(&mut r);
    let f = fig_confounds(&r).unwrap();
    assert_eq!(f.id, CONFOUND_ID);
    let doc = parse(&f.svg);
    let folds = r.logreg_5fold.done().unwrap().fold_accuracies.len();
    for cls in ["routing", "lexical"] {
        let g = doc
            .descendants()
            .find(|n| n.attribute("class") == Some(cls))
            .unwrap_or_else(|| panic!("no group {cls}"));
        let bars = g
            .descendants()
            .filter(|n| n.attribute("class") == Some("bar"))
            .count();
        let dots = g
            .descendants()
            .filter(|n| n.attribute("class") == Some("fold"))
            .count();
        assert_eq!((bars, dots), (1, folds), "{cls}");
    }
    // the lexical bar is lower (0.25 less accurate): its rect starts further down
    let bar_y = |cls: &str| -> f64 {
        doc.descendants()
            .find(|n| n.attribute("class") == Some(cls))
            .unwrap()
            .descendants()
            .find(|n| n.attribute("class") == Some("bar"))
            .unwrap()
            .attribute("y")
            .unwrap()
            .parse()
            .unwrap()
    };
    assert!(bar_y("lexical") > bar_y("routing") + 10.0);
    assert_eq!(count(&doc, "line", Some("chance")), 1);
    let nl = r.per_layer.len();
    for cls in ["all-tokens", "token-matched"] {
        let g = doc
            .descendants()
            .find(|n| n.attribute("class") == Some(cls))
            .unwrap();
        let pts = g
            .descendants()
            .filter(|n| n.attribute("class") == Some("layer-point"))
            .count();
        let overall = g
            .descendants()
            .filter(|n| n.attribute("class") == Some("overall"))
            .count();
        assert_eq!((pts, overall), (nl, 1), "{cls}");
    }
    if let Some(keep) = std::env::var_os("MOE_XRAY_CONFOUND_SVG") {
        std::fs::write(keep, &f.svg).unwrap();
    }
    assert!(f.caption.contains("residual"));
    assert_eq!(count(&doc, "text", Some("not-computed")), 0);
    // skipped lexical baseline, no token-matched: the panels say so
    r.lexical_baseline = Some(Section::skipped("counts-form traces have no token ids"));
    r.token_matched = None;
    let f = fig_confounds(&r).unwrap();
    let doc = parse(&f.svg);
    let notes: Vec<String> = doc
        .descendants()
        .filter(|n| n.attribute("class") == Some("not-computed"))
        .map(|n| n.text().unwrap_or("").to_string())
        .collect();
    let all = notes.join(" ");
    assert!(
        all.contains("skipped: counts-form traces have no"),
        "{notes:?}"
    );
    assert!(notes.iter().all(|t| t.chars().count() <= 40), "{notes:?}");
    assert!(
        notes.iter().any(|t| t.contains("not requested")),
        "{notes:?}"
    );
    assert!(texts(&doc).iter().all(|t| !t.contains("NaN")));
}
