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
