//! Structure tests of report.html: sections, numbers, escaping, interpretation box, health
//! section and the files written by `write_report`.

mod common;

use moe_xray_report::{render_report, write_report, Figure, HealthSection, SyntheticKind};

fn section<'a>(html: &'a str, id: &str) -> &'a str {
    let start = html
        .find(&format!("<section id=\"{id}\""))
        .unwrap_or_else(|| panic!("section {id} missing"));
    let end = html[start..].find("</section>").unwrap() + start;
    &html[start..end]
}

#[test]
fn report_has_all_sections_in_order() {
    let html = render_report(&common::input());
    assert!(html.starts_with("<!DOCTYPE html>"));
    let ids = [
        "interpretation",
        "headline",
        "figures",
        "manifest",
        "prompts",
        "reproduce",
    ];
    let mut last = 0;
    for id in ids {
        let pos = html
            .find(&format!("<section id=\"{id}\""))
            .unwrap_or_else(|| panic!("{id} missing"));
        assert!(pos > last, "{id} out of order");
        last = pos;
    }
    // seven inline figures, each with a caption
    assert_eq!(html.matches("<figure id=\"figure-").count(), 7);
    assert_eq!(html.matches("<figcaption>").count(), 7);
    assert_eq!(
        html.matches("<svg xmlns=\"http://www.w3.org/2000/svg\"")
            .count(),
        7
    );
    // self-contained: no scripts, no external resources
    assert!(!html.contains("<script"));
    assert!(!html.contains("http://") || html.matches("http://").count() == 7); // only SVG xmlns
    assert!(!html.contains("https://"));
    assert!(!html.contains("<link"));
}

#[test]
fn headline_table_shows_the_numbers() {
    let html = render_report(&common::input());
    let h = section(&html, "headline");
    for needle in [
        "0.741 ± 0.063 (760 pairs)",
        "0.603 ± 0.058 (2400 pairs)",
        "0.1385 (p = 0.0010)",
        "2.305, 95 % CI [2.01, 2.63] (p = 0.0010)",
        "0.152 ± 0.025",
        "0.311 ± 0.040",
        "0.190 ± 0.030",
        "0.912 ± 0.031, 95 % CI [0.838, 0.963] (chance 0.250, p = 0.0050)",
        "Macro-F1",
        "18.4 %, 9.2 %",
        "1000 label permutations",
        "over 200 label permutations",
    ] {
        assert!(h.contains(needle), "headline lacks {needle:?}");
    }
}

#[test]
fn prompts_and_generations_are_escaped() {
    let html = render_report(&common::input());
    let p = section(&html, "prompts");
    assert_eq!(p.matches("<tr>").count(), 1 + 80);
    assert!(p.contains(
        "Explain this HTML: &lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt; &amp; why it&#39;s unsafe"
    ));
    assert!(p.contains("&lt;/pre&gt;&lt;b&gt;bold?&lt;/b&gt; The &lt;script&gt; tag"));
    assert!(!html.contains("<script>"));
    assert!(!html.contains("<b>bold"));
}

#[test]
fn manifest_settings_and_command_are_shown() {
    let mut input = common::input();
    input.command = "moe-xray run --out 'a&b' <x>".into();
    let html = render_report(&input);
    let m = section(&html, "manifest");
    assert!(
        m.contains("<td>model</td><td>example-olmoe (hand-made test fixture, not real data)</td>")
    );
    assert!(m.contains("<td>generation.max_new_tokens</td><td>32</td>"));
    assert!(m.contains("<td>settings.seed</td><td>0</td>"));
    assert!(m.contains("<td>bootstrap.cohens_d_ci95</td><td>[2.01, 2.63]</td>"));
    let r = section(&html, "reproduce");
    assert!(r.contains("moe-xray run --out &#39;a&amp;b&#39; &lt;x&gt;"));
}

#[test]
fn real_model_gets_a_data_driven_interpretation() {
    let html = render_report(&common::input());
    let i = section(&html, "interpretation");
    assert!(i.contains("class=\"interpretation\""));
    assert!(
        i.contains("more similarly than prompts of different categories (d = 2.31, CI excludes 0)")
    );
    assert!(i.contains("above all null baselines"));
    assert!(!i.contains("random-weight"));
}

#[test]
fn synthetic_model_is_flagged_as_no_evidence() {
    // detected from the manifest
    let mut input = common::input();
    input.results.input.manifest["synthetic"] = serde_json::json!({"kind": "random", "seed": 0});
    input.results.input.manifest["model"] = serde_json::json!("synthetic-olmoe-tiny");
    let html = render_report(&input);
    let i = section(&html, "interpretation");
    assert!(i.contains("interpretation synthetic"));
    assert!(i.contains("random-weight synthetic model"));
    assert!(i.contains("no task structure"));
    assert!(i.contains("not evidence"));
    // override wins over the manifest
    input.synthetic = Some(SyntheticKind::Planted);
    let html = render_report(&input);
    let i = section(&html, "interpretation");
    assert!(i.contains("interpretation control"));
    assert!(i.contains("Positive control"));
    assert!(i.contains("recovered the planted structure"));
    // planted but no structure found → says so
    input.results.similarity.cohens_d = 0.2;
    let html = render_report(&input);
    assert!(section(&html, "interpretation").contains("did NOT recover"));
}

#[test]
fn no_separation_is_reported_honestly() {
    let mut input = common::input();
    input.results.similarity.cohens_d = 0.1;
    let moe_xray_report::results::Section::Done(b) = &mut input.results.significance.bootstrap
    else {
        panic!("fixture has a bootstrap section")
    };
    b.cohens_d_ci95 = [-0.2, 0.4];
    let html = render_report(&input);
    assert!(section(&html, "interpretation").contains("No reliable category separation"));
}

#[test]
fn health_section_is_included_when_given() {
    let mut input = common::input();
    assert!(!render_report(&input).contains("id=\"health\""));
    input.health = Some(HealthSection {
        report: None,
        mutual_information: None,
        figures: vec![Figure {
            id: "health-load".into(),
            title: "Figure 8. Expert load".into(),
            caption: "Load <share> per expert.".into(),
            svg: "<svg xmlns=\"http://www.w3.org/2000/svg\" id=\"health-load\" width=\"10\" height=\"10\"><rect width=\"10\" height=\"10\"/></svg>\n".into(),
            available: true,
        }],
        notes: vec!["Dead experts <never selected>.".into()],
    });
    let html = render_report(&input);
    let h = section(&html, "health");
    assert!(h.contains("(no health summary recorded)"));
    assert!(h.contains("<figure id=\"figure-health-load\""));
    assert!(h.contains("Load &lt;share&gt; per expert."));
    assert!(h.contains("Dead experts &lt;never selected&gt;."));
    assert!(html.contains("<a href=\"#health\">"));
}

#[test]
fn write_report_writes_figures_and_html() {
    let dir = tempfile::tempdir().unwrap();
    let input = common::input();
    let path = write_report(dir.path().join("run"), &input).unwrap();
    assert_eq!(path, dir.path().join("run").join("report.html"));
    let html = std::fs::read_to_string(&path).unwrap();
    assert_eq!(html, render_report(&input));
    let mut names: Vec<String> = std::fs::read_dir(dir.path().join("run").join("figures"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "fig1-category-similarity.svg",
            "fig2-baselines.svg",
            "fig3-layer-cohens-d.svg",
            "fig4-pca.svg",
            "fig5-tsne.svg",
            "fig6-confusion.svg",
            "fig7-expert-usage.svg"
        ]
    );
    // no temp files left behind; second write gives identical bytes
    let before = std::fs::read(dir.path().join("run/figures/fig4-pca.svg")).unwrap();
    write_report(dir.path().join("run"), &input).unwrap();
    assert_eq!(
        before,
        std::fs::read(dir.path().join("run/figures/fig4-pca.svg")).unwrap()
    );
    assert_eq!(
        std::fs::read_dir(dir.path().join("run")).unwrap().count(),
        2
    );
}

#[test]
fn write_report_error_names_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("not-a-dir");
    std::fs::write(&file, "x").unwrap();
    let err = write_report(&file, &common::input())
        .unwrap_err()
        .to_string();
    assert!(err.contains("not-a-dir"), "{err}");
}

#[test]
fn category_usage_from_signatures_averages_by_category() {
    let a = [0.5, 0.5, 1.0, 0.0];
    let b = [0.0, 1.0, 0.0, 1.0];
    let c = [1.0, 0.0, 0.5, 0.5];
    let u = moe_xray_report::CategoryUsage::from_signatures(
        2,
        2,
        [("x", &a[..]), ("y", &c[..]), ("x", &b[..])],
    )
    .unwrap();
    assert_eq!(u.categories.len(), 2);
    assert_eq!(
        u.categories[0],
        ("x".to_string(), vec![0.25, 0.75, 0.5, 0.5])
    );
    assert_eq!(u.categories[1], ("y".to_string(), c.to_vec()));
    let err = moe_xray_report::CategoryUsage::from_signatures(2, 3, [("x", &a[..])]).unwrap_err();
    assert!(err.to_string().contains("expected L·E = 6"));
}

/// The lexical baseline sits beside the classifier, and the interpretation states the routing
/// classifier's accuracy relative to it; token-matched statistics get their own row.
#[test]
fn lexical_baseline_row_and_interpretation_sentence() {
    use moe_xray_report::results::{
        LexicalBaseline, Section, SimilaritySummary, TokenMatchMode, TokenMatched,
    };
    let mut input = common::input();
    let html = render_report(&input);
    assert!(!html.contains("Lexical baseline"));
    assert!(!html.contains("confound-controls"));
    assert!(!section(&html, "interpretation").contains("Token identity alone"));
    let Section::Done(lr) = input.results.logreg_5fold.clone() else {
        panic!("fixture has a classifier")
    };
    let mut lex = lr.clone();
    lex.accuracy_mean = lr.accuracy_mean - 0.25;
    input.results.lexical_baseline = Some(Section::Done(LexicalBaseline {
        vocabulary: 989,
        tokens: 5000,
        classifier: lex.clone(),
    }));
    input.results.token_matched = Some(Section::Done(TokenMatched {
        mode: TokenMatchMode::Residual,
        num_prompts: 78,
        token_ids: 989,
        records: 1000,
        dropped_prompts: vec![],
        similarity: SimilaritySummary {
            cohens_d: 0.159,
            ..SimilaritySummary::default()
        },
        category_similarity_matrix: Default::default(),
        per_layer: vec![],
    }));
    let html = render_report(&input);
    let head = section(&html, "headline");
    assert!(head.contains("Lexical baseline accuracy"), "{head}");
    assert!(head.contains("989 token ids"));
    assert!(head.contains("Token-matched Cohen") && head.contains("d (residual)"));
    assert!(head.contains("0.159"));
    // the confound-control section with its figure, linked from the table of contents
    let c = section(&html, "confound-controls");
    assert!(c.contains("id=\"fig-confound-controls\""), "{c}");
    assert!(c.contains("Confound controls: routing against token identity."));
    assert!(html.contains("<li><a href=\"#confound-controls\">Confound controls</a></li>"));
    let i = section(&html, "interpretation");
    assert!(i.contains("Token identity alone"), "{i}");
    assert!(i.contains("routing exceeds it by 25.0 points"), "{i}");
    // Lexical at least as accurate as routing: said plainly.
    lex.accuracy_mean = lr.accuracy_mean + 0.05;
    input.results.lexical_baseline = Some(Section::Done(LexicalBaseline {
        vocabulary: 989,
        tokens: 5000,
        classifier: lex,
    }));
    let i = render_report(&input);
    assert!(section(&i, "interpretation").contains("routing does not exceed it"));
    // Skipped (counts-form traces): the reason is shown, no sentence.
    input.results.lexical_baseline = Some(Section::skipped("counts-form traces have no token ids"));
    let html = render_report(&input);
    assert!(section(&html, "headline").contains("skipped: counts-form traces have no token ids"));
    assert!(!section(&html, "interpretation").contains("Token identity alone"));
}

#[test]
fn expert_ablation_section_when_ablation_is_present() {
    let mut input = common::input();
    let html = render_report(&input);
    assert!(!html.contains("id=\"expert-ablation\""));
    assert!(!html.contains("#expert-ablation"));
    input.ablation = Some(common::ablation());
    let html = render_report(&input);
    assert!(html.contains("<li><a href=\"#expert-ablation\">Expert ablation</a></li>"));
    let s = section(&html, "expert-ablation");
    // caption of what is measured, the largest dose's matrix, the dose-response curve
    assert!(s.contains("What is measured"), "{s}");
    assert!(s.contains("load-matched random"));
    assert!(s.contains("Causal effect matrix (n = 2)"));
    assert!(s.contains("id=\"fig-ablation-matrix\""));
    assert!(s.contains("id=\"fig-ablation-dose\""));
    assert!(!s.contains("One dose only"));
    // diagonal vs off-diagonal summary of the largest dose: 0.2 vs 0.004
    assert!(
        s.contains("mean excess ΔNLL 0.200 on the own category (diagonal) vs 0.004"),
        "{s}"
    );
    // the table: one row per ablated category, own effect with CI and p, largest other effect
    let table = &s[s.find("<table class=\"ablation\">").unwrap()..];
    assert_eq!(table.matches("</td></tr>").count(), 3);
    assert!(table.contains(
        "<tr><th>code</th><td class=\"num\">0.220 [0.210, 0.230]</td><td class=\"num\">0.200 [0.190, 0.210]</td><td class=\"num\">0.005</td><td class=\"num\">math: 0.004 [-0.006, 0.014]</td><td class=\"num\">0.400</td></tr>"
    ), "{table}");
    // after the figures section, before the manifest
    let (a, f, m) = (
        html.find("id=\"expert-ablation\"").unwrap(),
        html.find("id=\"figures\"").unwrap(),
        html.find("id=\"manifest\"").unwrap(),
    );
    assert!(f < a && a < m);
    // deterministic
    assert_eq!(html, render_report(&input));

    // one dose: its matrix, the note on the dose-response curve
    let mut one = common::ablation();
    one.doses.truncate(1);
    one.settings.doses.truncate(1);
    input.ablation = Some(one);
    let html = render_report(&input);
    let s = section(&html, "expert-ablation");
    assert!(s.contains("Causal effect matrix (n = 1)"));
    assert!(s.contains("One dose only"));
}
