//! The routing-health part of the report: health figures drawn with the report's SVG toolkit
//! (palette, font stack, escaping, layout conventions) and the grouped, rounded, defined
//! "Routing health" table. Health data: the committed `fixtures/health` runs.

mod common;

use std::path::PathBuf;

use moe_xray_health::compare::{compare_runs, CompareOptions};
use moe_xray_health::input::read_run_data;
use moe_xray_health::mi::{mutual_information, signatures_with_labels, MiOptions};
use moe_xray_health::{accumulate_run, resolve_run, HealthAccumulator, HealthOptions};
use moe_xray_report::health_figures::{self, coactivation_heatmap, js_bars, load_heatmap};
use moe_xray_report::{
    render_figures, render_report, Figure, HealthSection, Results, FIGURE_FONT, OKABE_ITO,
};

fn fixture(name: &str) -> PathBuf {
    moe_xray_test_support::fixture("health").join(name)
}

/// Run A of the health fixtures: 12 prompts in 3 categories, L = 3, E = 8, k = 2, records with
/// `probs`, expert 7 dead at layer 2.
fn run_a() -> HealthAccumulator {
    let run = resolve_run(&fixture("run_a")).unwrap();
    let opts = HealthOptions {
        keep_prompts: true,
        ..HealthOptions::default()
    };
    accumulate_run(&run, None, opts).unwrap()
}

fn section(acc: &HealthAccumulator) -> HealthSection {
    let report = acc.report();
    let (sigs, labels, _) =
        signatures_with_labels(acc.prompts(), report.num_layers, report.num_experts);
    let mi = mutual_information(
        &sigs,
        &labels,
        &MiOptions {
            perms: 99,
            ..MiOptions::default()
        },
    )
    .unwrap();
    HealthSection::new(acc, report, Some(mi), 2)
}

fn parse(svg: &str) -> roxmltree::Document<'_> {
    roxmltree::Document::parse(svg).unwrap_or_else(|e| panic!("SVG is not well-formed XML: {e}"))
}

fn rgb(hex: &str) -> Option<[i32; 3]> {
    let h = hex.strip_prefix('#')?;
    if h.len() != 6 {
        return None;
    }
    let c = |i: usize| i32::from_str_radix(&h[i..i + 2], 16).ok();
    Some([c(0)?, c(2)?, c(4)?])
}

/// True when `c` is a colour of the shared palette: an Okabe–Ito colour, a grey (white and
/// black included), or a point of the diverging scale between light grey and Okabe–Ito
/// orange / blue (±1 per channel for rounding).
fn in_shared_palette(c: &str) -> bool {
    let Some(p) = rgb(c) else {
        return false;
    };
    if OKABE_ITO.iter().any(|o| o.eq_ignore_ascii_case(c)) || (p[0] == p[1] && p[1] == p[2]) {
        return true;
    }
    let mid = [0xf7, 0xf7, 0xf7];
    [OKABE_ITO[0], OKABE_ITO[1]].iter().any(|end| {
        let e = rgb(end).unwrap();
        (0..=1000).any(|k| {
            let t = k as f64 / 1000.0;
            (0..3).all(|i| {
                let v = mid[i] as f64 + (e[i] - mid[i]) as f64 * t;
                (v - p[i] as f64).abs() <= 1.0
            })
        })
    })
}

/// Every colour (fill, stroke, stop-color) an SVG uses, except `none` and gradient references.
fn colours(doc: &roxmltree::Document<'_>) -> Vec<String> {
    let mut out = Vec::new();
    for n in doc.descendants() {
        for a in ["fill", "stroke", "stop-color"] {
            if let Some(v) = n.attribute(a) {
                if v != "none" && !v.starts_with("url(") {
                    out.push(v.to_string());
                }
            }
        }
    }
    out
}

fn root_attribute_names(doc: &roxmltree::Document<'_>) -> Vec<String> {
    let mut v: Vec<String> = doc
        .root_element()
        .attributes()
        .map(|a| a.name().to_string())
        .collect();
    v.sort();
    v
}

fn health_svgs() -> Vec<(String, String)> {
    let acc = run_a();
    let r = acc.report();
    let opts = HealthOptions::default();
    let a = read_run_data(&fixture("run_a"), &opts).unwrap();
    let b = read_run_data(&fixture("run_b"), &opts).unwrap();
    let cmp = compare_runs(
        &a,
        &b,
        &CompareOptions {
            reps: 0,
            seed: 0,
            fail_above: Some(0.04),
        },
    )
    .unwrap();
    let mut v = vec![
        ("load".to_string(), load_heatmap(&r)),
        (
            "coactivation".to_string(),
            coactivation_heatmap(&r, acc.coactivation(2).unwrap(), 2).unwrap(),
        ),
        ("js".to_string(), js_bars(&cmp)),
    ];
    for f in section(&acc).figures {
        v.push((f.id, f.svg));
    }
    v
}

#[test]
fn health_figures_use_the_shared_palette_font_and_layout() {
    let study = render_figures(&common::results(), Some(&common::usage()));
    let study_doc = parse(&study[0].svg);
    let study_root = study_doc.root_element();
    for (name, svg) in health_svgs() {
        let doc = parse(&svg);
        let root = doc.root_element();
        assert_eq!(root.attribute("font-family"), Some(FIGURE_FONT), "{name}");
        assert_eq!(
            root_attribute_names(&doc),
            root_attribute_names(&study_doc),
            "{name}: root attributes differ from the study figures'"
        );
        assert_eq!(root.attribute("width"), study_root.attribute("width"));
        assert_eq!(root.attribute("class"), Some("figure-svg"));
        // accessible title and description, as every study figure has
        let id = root.attribute("id").unwrap();
        for (tag, suffix) in [("title", "-title"), ("desc", "-desc")] {
            let el = root
                .children()
                .find(|n| n.has_tag_name(tag))
                .unwrap_or_else(|| panic!("{name}: no <{tag}>"));
            assert_eq!(el.attribute("id"), Some(format!("{id}{suffix}").as_str()));
        }
        // the title line is styled like the study figures' (15 px bold)
        let title = doc.descendants().find(|n| n.has_tag_name("text")).unwrap();
        assert_eq!(title.attribute("font-size"), Some("15.0"), "{name}");
        assert_eq!(title.attribute("font-weight"), Some("bold"), "{name}");
        for c in colours(&doc) {
            assert!(in_shared_palette(&c), "{name}: colour {c} is off-palette");
        }
        // one font stack: no element sets its own font family
        assert_eq!(svg.matches("font-family=").count(), 1, "{name}");
    }
}

#[test]
fn health_figures_snapshot_structure() {
    let svgs = health_svgs();
    let get = |n: &str| &svgs.iter().find(|(k, _)| k == n).unwrap().1;
    // load heatmap: 3 layers × 8 experts, expert 7 of layer 2 is dead (black)
    let load = parse(get("load"));
    let cells = load
        .descendants()
        .find(|n| n.attribute("class") == Some("cells"))
        .unwrap();
    let rects: Vec<_> = cells
        .children()
        .filter(|n| n.has_tag_name("rect"))
        .collect();
    assert_eq!(rects.len(), 24);
    let dead: Vec<String> = rects
        .iter()
        .filter(|r| r.attribute("fill") == Some("#000000"))
        .map(|r| r.first_element_child().unwrap().text().unwrap().to_string())
        .collect();
    assert_eq!(dead, ["layer 2 expert 7: share 0"]);
    let texts: Vec<&str> = load.descendants().filter_map(|n| n.text()).collect();
    for want in ["expert", "layer", "¼×", "1×", "4×", "dead", "share · E"] {
        assert!(texts.contains(&want), "load heatmap has no text {want:?}");
    }
    // JS bars: one Okabe–Ito blue bar per layer, threshold dashed in vermillion
    let js = parse(get("js"));
    let bars: Vec<_> = js
        .descendants()
        .filter(|n| n.attribute("class") == Some("bar"))
        .collect();
    assert_eq!(bars.len(), 3);
    assert!(bars
        .iter()
        .all(|b| b.attribute("fill") == Some(OKABE_ITO[0])));
    let th = js
        .descendants()
        .find(|n| n.attribute("class") == Some("threshold"))
        .unwrap();
    assert_eq!(th.attribute("stroke"), Some(OKABE_ITO[3]));
    // report versions are numbered after the seven study figures
    let figs = section(&run_a()).figures;
    let titles: Vec<&str> = figs.iter().map(|f| f.title.as_str()).collect();
    assert_eq!(
        titles,
        [
            "Figure 8. Expert load by layer",
            "Figure 9. Expert co-activation at layer 2"
        ]
    );
    for f in &figs {
        let doc = parse(&f.svg);
        assert!(doc
            .descendants()
            .any(|n| n.has_tag_name("text") && n.text() == Some(f.title.as_str())));
    }
    // deterministic bytes
    assert_eq!(health_svgs(), health_svgs());
}

#[test]
fn coactivation_figure_says_why_it_is_missing_for_counts() {
    let run = resolve_run(&fixture("run_a_counts")).unwrap();
    let acc = accumulate_run(&run, None, HealthOptions::default()).unwrap();
    let figs = health_figures::report_figures(&acc, &acc.report(), 0);
    assert!(figs[0].available);
    assert!(!figs[1].available);
    assert!(figs[1].caption.contains("per-token traces"));
    parse(&figs[1].svg);
}

/// The fixture's results.json with the category `code` renamed to `name`.
fn results_with_category(name: &str) -> Results {
    let text = std::fs::read_to_string(common::data_dir().join("results.json")).unwrap();
    let quoted = serde_json::to_string(name).unwrap();
    let text = text.replace("\"code\"", &quoted);
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("results.json");
    std::fs::write(&p, text).unwrap();
    Results::read(&p).unwrap()
}

#[test]
fn escaping_handles_all_five_characters_in_figures_and_report() {
    let name = "a'b\"<c>&";
    let mut input = common::input();
    input.results = results_with_category(name);
    for p in &mut input.prompts {
        if p.category == "code" {
            p.category = name.to_string();
        }
    }
    let mut usage = common::usage();
    for c in &mut usage.categories {
        if c.0 == "code" {
            c.0 = name.to_string();
        }
    }
    input.usage = Some(usage);
    let figs: Vec<Figure> = render_figures(&input.results_with_categories(), input.usage.as_ref());
    let mut seen_text = 0;
    let mut seen_attr = 0;
    for f in &figs {
        let doc = parse(&f.svg);
        seen_text += doc
            .descendants()
            .filter(|n| n.text().is_some_and(|t| t.contains(name)))
            .count();
        seen_attr += doc
            .descendants()
            .filter(|n| n.attribute("data-category") == Some(name))
            .count();
        assert!(!f.svg.contains(name), "{}: raw name in the SVG", f.id);
    }
    assert!(seen_text >= 4, "category name shown in {seen_text} texts");
    assert_eq!(seen_attr, 1, "usage panel attribute");
    let html = render_report(&input);
    assert!(!html.contains(name));
    assert!(html.contains("a&#39;b&quot;&lt;c&gt;&amp;"));
}

fn health_html() -> (String, String) {
    let mut input = common::input();
    input.health = Some(section(&run_a()));
    let html = render_report(&input);
    let start = html
        .find("<section id=\"health\">")
        .expect("health section");
    let end = start + html[start..].find("</section>").unwrap();
    let sec = html[start..end].to_string();
    (html, sec)
}

#[test]
fn health_section_is_grouped_rounded_and_defined() {
    let (html, sec) = health_html();
    // no long floats anywhere in the report (the old section printed 17-digit values)
    let long = regex::Regex::new(r"[0-9]\.[0-9]{7,}").unwrap();
    assert!(
        long.find(&html).is_none(),
        "long float in report.html: {:?}",
        long.find(&html).map(|m| m.as_str())
    );
    // no flattened JSON keys
    assert!(!sec.contains("mutual_information."));
    assert!(!sec.contains("overall."));
    // four groups, in order
    let groups: Vec<&str> =
        regex::Regex::new(r#"<tr class="group"><th colspan="3" scope="rowgroup">([^<]*)</th>"#)
            .unwrap()
            .captures_iter(&sec)
            .map(|c| c.get(1).unwrap().as_str())
            .collect();
    assert_eq!(
        groups,
        [
            "Load balance",
            "Router confidence",
            "Co-activation",
            "Mutual information between signature and category"
        ]
    );
    // every data row: name, value, non-empty definition
    let rows = regex::Regex::new(
        r#"<tr><th scope="row">([^<]+)</th><td class="num">([^<]+)</td><td class="def">([^<]+)</td></tr>"#,
    )
    .unwrap();
    let n = rows.captures_iter(&sec).count();
    assert_eq!(n, sec.matches("<tr><th scope=\"row\">").count());
    assert!(n >= 14, "only {n} rows");
    // same table style as the headline numbers
    assert!(sec.contains(r#"<table class="headline health-summary">"#));
    // rounded values
    let r = run_a().report();
    assert!(sec.contains(&format!(
        "mean {:.3}, lowest {:.3} (layer {})",
        r.overall.mean_normalized_entropy,
        r.overall.min_normalized_entropy,
        r.overall.least_balanced_layer
    )));
    assert!(
        sec.contains("1 of 24 (layer, expert) pairs"),
        "dead experts"
    );
    assert!(sec.contains("Figure 8. Expert load by layer"));
    assert!(sec.contains("<figure id=\"figure-health-load_heatmap\""));
    assert!(html.contains("<a href=\"#health\">"));
}

#[test]
fn health_definitions_match_docs() {
    let (_, sec) = health_html();
    let docs = std::fs::read_to_string(moe_xray_test_support::doc("health.md")).unwrap();
    // the formulas of the table's definitions, as docs/health.md writes them
    for f in [
        "H/ln E",
        "H = −Σ_e p_e ln p_e",
        "Σ_i Σ_j |x_i − x_j| / (2 E S)",
        "S² / (E Σ x_e²)",
        "max_e x_e / (S/E)",
        "p_(k) − p_(k+1)",
        "C_l[i,j] / (x_i x_j / T)",
        "(k−1)E / (k(E−1))",
        "(1 + #{Î_perm ≥ Î}) / (1 + perms)",
        "H(T) − mean_i(−log2 q(t_i | x_i))",
    ] {
        assert!(docs.contains(f), "docs/health.md lacks {f:?}");
        let html = moe_xray_report::html_escape(f);
        assert!(sec.contains(&html), "health section lacks {f:?}");
    }
}
