//! The cross-model `report.html` (`compare-models --out DIR`): its sections, the figures inline
//! with captions, escaping, the same-architecture parts (expert matching, matched drift) and
//! their absence for different architectures, deterministic bytes.

mod common;

use moe_xray_report::crossmodel::{figures, render_html, CrossModelPage};

fn page(same: bool) -> (String, Vec<moe_xray_report::Figure>) {
    let (r, a, b, w) = common::crossmodel(same);
    let html = render_html(&CrossModelPage {
        report: &r,
        sim_a: &a,
        sim_b: &b,
        within: &w,
        command: "moe-xray compare-models runs/a runs/b --out cmp <x>",
    });
    let again = render_html(&CrossModelPage {
        report: &r,
        sim_a: &a,
        sim_b: &b,
        within: &w,
        command: "moe-xray compare-models runs/a runs/b --out cmp <x>",
    });
    assert_eq!(html, again, "deterministic bytes");
    (html, figures(&r, &a, &b, &w))
}

fn section<'a>(html: &'a str, id: &str) -> &'a str {
    let start = html
        .find(&format!("<section id=\"{id}\">"))
        .unwrap_or_else(|| panic!("section {id} missing"));
    let end = html[start..].find("</section>").unwrap() + start;
    &html[start..end]
}

#[test]
fn same_architecture_page_has_every_section_and_figure() {
    let (html, figs) = page(true);
    assert!(html.starts_with("<!DOCTYPE html>\n<html lang=\"en\">"));
    assert!(html.ends_with("</main>\n</body>\n</html>\n"));
    assert!(!html.contains("<script"), "no scripts");
    assert!(
        !html.contains(" src=") && !html.contains("href=\"http"),
        "no external resources"
    );
    for id in [
        "models",
        "similarity",
        "per-layer",
        "task-separation",
        "expert-matching",
        "reproduce",
    ] {
        section(&html, id);
        assert!(html.contains(&format!("<a href=\"#{id}\">")), "nav to {id}");
    }
    // the three figures, inline, each with a caption
    let ids: Vec<&str> = figs.iter().map(|f| f.id.as_str()).collect();
    assert_eq!(
        ids,
        [
            "fig-crossmodel-rsa",
            "fig-crossmodel-layer-cka",
            "fig-crossmodel-layer-rsa"
        ]
    );
    for f in &figs {
        let at = html
            .find(&format!("<figure id=\"figure-{}\"", f.id))
            .unwrap_or_else(|| panic!("{} not inline", f.id));
        let fig = &html[at..at + html[at..].find("</figure>").unwrap()];
        assert!(fig.contains(&format!(
            "<svg xmlns=\"http://www.w3.org/2000/svg\" id=\"{}\"",
            f.id
        )));
        assert!(fig.contains("<figcaption><strong>"), "{} caption", f.id);
        assert!(f.caption.len() > 80, "{} caption says what it shows", f.id);
    }
    assert!(section(&html, "similarity").contains("fig-crossmodel-rsa"));
    assert!(section(&html, "per-layer").contains("fig-crossmodel-layer-cka"));
    // RSA, Mantel p and CKA with their values
    let (r, ..) = common::crossmodel(true);
    let sim = section(&html, "similarity");
    for name in ["RSA (Spearman)", "Mantel p", "Mantel null", "linear CKA"] {
        assert!(
            sim.contains(&format!("<th scope=\"row\">{name}</th>")),
            "{name}"
        );
    }
    let cka = format!("{:.4}", r.cka.unwrap());
    assert!(sim.contains(&cka), "CKA value {cka}");
    assert!(sim.contains("99 permutations"));
    // task separation side by side: overall rows and one row per category (escaped)
    let sep = section(&html, "task-separation");
    for name in [
        "Cohen's d (own analysis)",
        "Cohen's d (shared prompts)",
        "classifier accuracy",
        "chance",
    ] {
        assert!(
            sep.contains(&name.replace('\'', "&#39;")) || sep.contains(name),
            "{name}"
        );
    }
    assert!(sep.contains("<td class=\"num\">0.900</td><td class=\"num\">0.800</td>"));
    assert!(
        sep.contains("story &lt;&amp;&gt;"),
        "category names escaped"
    );
    assert!(!html.contains("story <&>"));
    assert_eq!(sep.matches("<tr><td>").count(), 3, "one row per category");
    // the matching: one row per layer, every expert relabelled; the drift before and after
    let m = section(&html, "expert-matching");
    assert!(m.contains("8 of 8 experts are relabelled"), "{m}");
    assert_eq!(
        m.matches("<tr><td class=\"num\">").count(),
        2,
        "one row per layer"
    );
    assert!(m.contains("<table class=\"drift\">"));
    assert!(m.contains("mean JS divergence (bits)"));
    assert!(m.contains("<td class=\"num\">0.300000</td><td class=\"num\">0.000750</td>"));
    // the command is escaped
    assert!(section(&html, "reproduce").contains("--out cmp &lt;x&gt;"));
}

#[test]
fn different_architectures_say_why_there_is_no_matching() {
    let (html, figs) = page(false);
    assert_eq!(figs.len(), 3, "per-layer heatmaps across architectures");
    let m = section(&html, "expert-matching");
    assert!(m.contains("class=\"unavailable\""));
    assert!(m.contains("different architectures"), "{m}");
    assert!(!m.contains("<table"));
    assert!(html.contains("(expert indices do not correspond)"));
    assert!(section(&html, "per-layer").contains("fig-crossmodel-layer-rsa"));
    // a skipped per-layer section is explained instead of drawn
    let (mut r, a, b, w) = common::crossmodel(false);
    r.per_layer = moe_xray_stats::results::Section::skipped("too many values");
    let html = render_html(&CrossModelPage {
        report: &r,
        sim_a: &a,
        sim_b: &b,
        within: &w,
        command: "",
    });
    let pl = section(&html, "per-layer");
    assert!(pl.contains("Not computed: too many values."), "{pl}");
    assert!(!pl.contains("<svg"));
    assert!(html.contains("(command not recorded)"));
}

/// The matched-drift figure: one bar per layer and labelling (as numbered, matched), the bar
/// heights ordered as the JS values, absent when the drift was not computed.
#[test]
fn drift_figure_has_two_bars_per_layer() {
    use moe_xray_report::crossmodel::{drift_figure, DRIFT_ID};
    let (r, ..) = common::crossmodel(true);
    let svg = drift_figure(&r, DRIFT_ID).unwrap();
    let doc = roxmltree::Document::parse(&svg).unwrap();
    assert_eq!(doc.root_element().attribute("id"), Some(DRIFT_ID));
    let bars = |cls: &str| -> Vec<f64> {
        doc.descendants()
            .find(|n| n.attribute("class") == Some(cls))
            .unwrap()
            .children()
            .filter(|c| c.is_element())
            .map(|c| c.attribute("height").unwrap().parse::<f64>().unwrap())
            .collect()
    };
    let (u, m) = (bars("unmatched"), bars("matched"));
    assert_eq!((u.len(), m.len()), (2, 2));
    // js_bits: as numbered [0.4, 0.2], matched [0.001, 0.0005]
    assert!(u[0] > u[1] && u[1] > m[0] && m[0] >= m[1], "{u:?} {m:?}");
    assert!(
        (u[0] / u[1] - 2.0).abs() < 0.05,
        "heights proportional: {u:?}"
    );
    assert!(
        svg.contains("layer 1, as numbered: 0.2000 bits"),
        "tooltips"
    );
    // on the page, inside the matching section, with its caption
    let (html, _) = page(true);
    let sec = section(&html, "expert-matching");
    assert!(sec.contains(&format!("id=\"{DRIFT_ID}\"")));
    assert!(sec.contains("Matched drift per layer."));
    // no drift, no figure
    let (r, ..) = common::crossmodel(false);
    assert!(drift_figure(&r, DRIFT_ID).is_none());
    assert!(!page(false).0.contains(DRIFT_ID));
}

/// The N-run page: the N × N matrix figures (one cell per pair of runs, the Mantel p under
/// each RSA value), the table of pairs, the side-by-side separation with one column per run,
/// one section per pair with the drift figure only for the same-architecture pair.
#[test]
fn n_run_page_has_matrices_pairs_and_drift() {
    use moe_xray_report::crossmodel_multi::{
        figures as multi_figures, matrix_heatmap, pair_drift_id, render_html as multi_html,
        MultiModelPage,
    };
    let r = common::crossmodel_multi();
    assert_eq!(r.models.len(), 3);
    assert_eq!(r.models[2].num_layers, 3);
    for which in ["rsa", "cka"] {
        let svg = matrix_heatmap(&r, which).unwrap();
        let doc = roxmltree::Document::parse(&svg).unwrap();
        let cells = doc
            .descendants()
            .filter(|n| n.attribute("class") == Some("cell"))
            .count();
        assert_eq!(cells, 9, "{which}");
        let values: Vec<&str> = doc
            .descendants()
            .filter(|n| n.attribute("class") == Some("value"))
            .filter_map(|n| n.text())
            .collect();
        assert_eq!(values.len(), 6, "{which}: off-diagonal values");
        let m = if which == "rsa" {
            &r.matrices.rsa
        } else {
            &r.matrices.cka
        };
        let want = format!("{:.2}", m[0][1].unwrap());
        assert!(
            values.contains(&want.as_str()),
            "{which}: {want} in {values:?}"
        );
        let ps = doc
            .descendants()
            .filter(|n| n.attribute("class") == Some("p"))
            .count();
        assert_eq!(ps, if which == "rsa" { 6 } else { 0 });
    }
    assert!(matrix_heatmap(&r, "other").is_none());
    let html = multi_html(&MultiModelPage {
        report: &r,
        command: "moe-xray compare-models a b c --out cmp",
    });
    assert_eq!(
        html,
        multi_html(&MultiModelPage {
            report: &r,
            command: "moe-xray compare-models a b c --out cmp",
        }),
        "deterministic bytes"
    );
    assert!(!html.contains("<script"));
    for id in [
        "models",
        "matrices",
        "task-separation",
        "pairs",
        "reproduce",
    ] {
        assert!(html.contains(&format!("<section id=\"{id}\">")), "{id}");
    }
    for f in multi_figures(&r) {
        assert!(html.contains(&format!("id=\"{}\"", f.id)), "{}", f.id);
    }
    // one column per run in the separation table, three rows in the table of pairs
    let sep = section(&html, "task-separation");
    assert!(sep.contains("<th>R1</th><th>R2</th><th>R3</th>"));
    assert!(sep.contains("<th>d, R3</th>") && sep.contains("<th>recall, R1</th>"));
    assert!(sep.contains("story &lt;&amp;&gt;"), "escaped category");
    let pairs = section(&html, "matrices");
    assert_eq!(pairs.matches("<a href=\"#pair-").count(), 3);
    assert!(html.contains(&format!("id=\"{}\"", pair_drift_id(0, 1))));
    assert!(!html.contains(&pair_drift_id(0, 2)));
    assert!(section(&html, "pair-1-3").contains("Expert matching"));
    assert!(html.contains("<section id=\"expert-matching-1-3\">"));
    assert!(html.contains("different architectures") || html.contains("Not computed"));
}
