//! `signature_table` (the signatures alone, as the Python package's `signatures()` returns
//! them) equals the signatures `analyze` computes and writes to `signatures.csv`.

use moe_xray_pipeline::analyze::{analyze, signature_table, signatures_csv, AnalyzeOptions};
use moe_xray_pipeline::NoProgress;
use moe_xray_stats::analyze::Outputs;
use moe_xray_test_support::fixture;
use moe_xray_trace::TokenType;

fn fast(mut o: AnalyzeOptions) -> AnalyzeOptions {
    o.reps = 5;
    o.classifier_perm_reps = 2;
    o.no_tsne = true;
    o
}

#[test]
fn signature_table_equals_the_analysis_signatures() {
    for (case, weighted, types) in [
        (
            "planted",
            false,
            vec![TokenType::Prompt, TokenType::Generation],
        ),
        ("weighted_small", true, vec![TokenType::Prompt]),
    ] {
        let mut o = fast(AnalyzeOptions::new(vec![fixture(format!(
            "stats/{case}/trace.jsonl"
        ))]));
        o.weighted = weighted;
        o.token_types = types;
        let t = signature_table(&o, &NoProgress).unwrap();
        let Outputs::Exact(e) = analyze(&o, &NoProgress).unwrap() else {
            panic!("{case}: expected the exact path");
        };
        assert_eq!(t.prompt_ids, e.results.prompt_ids, "{case}");
        assert_eq!(t.signatures, e.signatures, "{case}");
        assert_eq!(t.num_layers, e.results.num_layers);
        assert_eq!(t.num_experts, e.results.num_experts);
        assert_eq!(t.layers, (0..t.num_layers).collect::<Vec<_>>());
        let cats: Vec<String> = t.categories.iter().map(|c| c.clone().unwrap()).collect();
        assert_eq!(cats, e.prompt_categories);
        assert_eq!(t.dropped, e.results.dropped_prompts, "{case}");
        // the same CSV text as `analyze` writes
        assert_eq!(
            signatures_csv(&e.results, &t.signatures, &cats),
            signatures_csv(&e.results, &e.signatures, &e.prompt_categories)
        );
    }
}

#[test]
fn signature_table_drops_prompts_with_an_empty_layer_and_checks_files() {
    let dir = tempfile::tempdir().unwrap();
    let trace = dir.path().join("t.jsonl");
    // prompt b has records at layer 0 only: dropped (no selection at layer 1), as analyze drops it
    std::fs::write(
        &trace,
        concat!(
            r#"{"prompt_id":"a","category":"x","layer":0,"position":0,"token_type":"prompt","experts":[0]}"#, "\n",
            r#"{"prompt_id":"a","category":"x","layer":1,"position":0,"token_type":"prompt","experts":[1]}"#, "\n",
            r#"{"prompt_id":"b","category":"y","layer":0,"position":0,"token_type":"prompt","experts":[1]}"#, "\n",
        ),
    )
    .unwrap();
    let mut o = AnalyzeOptions::new(vec![trace.clone()]);
    o.num_layers = Some(2);
    o.num_experts = Some(2);
    o.top_k = Some(1);
    let t = signature_table(&o, &NoProgress).unwrap();
    assert_eq!(t.prompt_ids, vec!["a"]);
    assert_eq!(t.signatures, vec![1.0, 0.0, 0.0, 1.0]);
    assert_eq!(t.dropped.len(), 1);
    assert_eq!(t.dropped[0].prompt_id, "b");
    assert!(
        t.dropped[0].reason.contains("layer 1"),
        "{}",
        t.dropped[0].reason
    );

    std::fs::write(&trace, "{\"prompt_id\": 1}\n").unwrap();
    let err = signature_table(&o, &NoProgress).unwrap_err().to_string();
    assert!(err.contains("t.jsonl"), "{err}");
}
