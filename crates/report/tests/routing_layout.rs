//! Figures of a model with dense decoder layers: layer axes show decoder-layer indices.

mod common;

use moe_xray_health::{HealthAccumulator, HealthOptions, TokenRouting};
use moe_xray_report::health_figures::{coactivation_heatmap, load_heatmap};
use moe_xray_report::render_figures;
use moe_xray_trace::TokenType;

/// Texts of the right-aligned labels (`text-anchor="end"`: the row labels of the heatmaps).
fn end_labels(svg: &str) -> Vec<String> {
    let doc = roxmltree::Document::parse(svg).unwrap();
    doc.descendants()
        .filter(|n| n.has_tag_name("text") && n.attribute("text-anchor") == Some("end"))
        .map(|n| n.text().unwrap_or("").to_string())
        .collect()
}

#[test]
fn usage_panels_label_rows_with_decoder_layers() {
    let plain = common::results();
    let usage = common::usage();
    let mut dense = plain.clone();
    let labels: Vec<usize> = (0..plain.num_layers).map(|l| 2 * l + 1).collect();
    dense.moe_layers = Some(labels.clone());
    for (p, &d) in dense.per_layer.iter_mut().zip(&labels) {
        p.layer = d;
    }
    let fig = |r| {
        render_figures(r, Some(&usage))
            .into_iter()
            .find(|f| f.id == "fig7-expert-usage")
            .unwrap()
            .svg
    };
    let (a, b) = (end_labels(&fig(&dense)), end_labels(&fig(&plain)));
    assert_eq!(a.len(), b.len());
    assert!(!b.is_empty());
    // Every row label l of the plain figure is 2l + 1 in the figure with dense layers.
    for (x, y) in a.iter().zip(&b) {
        let y: usize = y.parse().unwrap();
        assert_eq!(x, &(2 * y + 1).to_string());
    }
}

#[test]
fn health_heatmaps_name_decoder_layers() {
    // Decoder layers 0..4; 1 and 3 are MoE layers.
    let mut acc = HealthAccumulator::with_layers(4, &[1, 3], 4, HealthOptions::default()).unwrap();
    for (layer, experts) in [(1usize, [0u32, 1]), (3, [2, 3]), (3, [0, 2]), (1, [1, 2])] {
        acc.add_token(&TokenRouting {
            prompt_id: "a",
            category: None,
            layer,
            token_type: TokenType::Prompt,
            experts: &experts,
            probs: None,
        })
        .unwrap();
    }
    let err = acc
        .add_token(&TokenRouting {
            prompt_id: "a",
            category: None,
            layer: 2,
            token_type: TokenType::Prompt,
            experts: &[0, 1],
            probs: None,
        })
        .unwrap_err();
    assert!(err.contains("layer 2 is a dense layer"), "{err}");
    let r = acc.report();
    let svg = load_heatmap(&r);
    assert_eq!(end_labels(&svg), vec!["1", "3"]);
    assert!(svg.contains("layer 3 expert 2: share"));
    // Row 1 is decoder layer 3.
    let co = coactivation_heatmap(&r, acc.coactivation(1).unwrap(), 1).unwrap();
    assert!(co.contains("health-coactivation_layer3"), "{co}");
    assert!(co.contains("at layer 3"));
}
