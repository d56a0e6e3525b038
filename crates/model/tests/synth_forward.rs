//! Synthetic checkpoints run through the project's own loader and forward pass.

use moe_xray_model::generate::{generate_all, GenerateOptions, PromptInput};
use moe_xray_model::model::{LoadOptions, MoeModel};
use moe_xray_model::synth::{self, token_class, SynthDtype, SynthSpec};
use moe_xray_trace::{RoutingDecision, RoutingSink, TokenType};

#[derive(Default)]
struct Keep {
    /// (prompt, layer, position, token, experts)
    rows: Vec<(String, u32, u32, u32, Vec<u32>)>,
}

impl RoutingSink for Keep {
    fn begin_prompt(&mut self, _: &str, _: Option<&str>) -> moe_xray_trace::Result<()> {
        Ok(())
    }
    fn record(&mut self, d: &RoutingDecision<'_>) -> moe_xray_trace::Result<()> {
        self.rows.push((
            d.prompt_id.to_string(),
            d.layer,
            d.position,
            d.token_id,
            d.experts.to_vec(),
        ));
        assert!(d.token_type == TokenType::Prompt || d.token_type == TokenType::Generation);
        Ok(())
    }
    fn end_prompt(&mut self, _: &str) -> moe_xray_trace::Result<()> {
        Ok(())
    }
}

const TEXTS: [&str; 4] = [
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))",
    "What is 12 + 30? Solve the equation 3x = 12 and compute the sum.",
    "Once upon a time she walked into the forest at night and said hello.",
    "Why is the sky blue? Explain where the capital of France is.",
];

fn run(spec: &SynthSpec) -> (Keep, usize) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("m");
    synth::write_checkpoint(spec, &dir).unwrap();
    let model = MoeModel::load(&dir, &LoadOptions::default()).unwrap();
    let tok = tokenizers::Tokenizer::from_file(dir.join("tokenizer.json")).unwrap();
    let prompts: Vec<PromptInput> = TEXTS
        .iter()
        .enumerate()
        .map(|(i, t)| PromptInput {
            id: format!("p{i}"),
            category: None,
            tokens: tok.encode(*t, false).unwrap().get_ids().to_vec(),
            index: i as u64,
        })
        .collect();
    let n_prompt_tokens: usize = prompts.iter().map(|p| p.tokens.len()).sum();
    let opts = GenerateOptions {
        max_new_tokens: 3,
        ignore_eos: true,
        ..Default::default()
    };
    let mut sink = Keep::default();
    let mut done = 0usize;
    generate_all(&model, &prompts, 2, &opts, &mut sink, &mut |_| {
        done += 1;
        Ok(())
    })
    .unwrap();
    assert_eq!(done, 4);
    (sink, n_prompt_tokens)
}

#[test]
fn synth_checkpoint_runs_in_the_rust_model_and_routes_broadly() {
    let mut spec = SynthSpec::preset("tiny").unwrap();
    spec.num_experts = 16;
    spec.top_k = 4;
    spec.num_kv_heads = 2;
    spec.dtype = SynthDtype::Bf16;
    spec.shards = 2;
    let (sink, n_prompt) = run(&spec);
    // every prompt token and every generated token (3 each, the last one included) at every layer
    assert_eq!(sink.rows.len(), (n_prompt + 4 * 3) * spec.num_layers);
    for layer in 0..spec.num_layers as u32 {
        let mut load = vec![0usize; 16];
        for r in sink.rows.iter().filter(|r| r.1 == layer) {
            assert_eq!(r.4.len(), 4);
            let mut e = r.4.clone();
            e.sort();
            e.dedup();
            assert_eq!(e.len(), 4, "distinct experts");
            r.4.iter().for_each(|&x| load[x as usize] += 1);
        }
        let mean = load.iter().sum::<usize>() as f64 / 16.0;
        let max = *load.iter().max().unwrap() as f64;
        assert!(
            load.iter().filter(|&&l| l > 0).count() >= 15,
            "layer {layer}: {load:?}"
        );
        assert!(max / mean < 2.5, "layer {layer}: max/mean {}", max / mean);
    }
}

#[test]
fn synth_planted_checkpoint_routes_token_classes_to_their_groups() {
    let mut spec = SynthSpec::preset("tiny").unwrap();
    spec.num_experts = 16;
    spec.top_k = 4;
    spec.planted = true;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("tok");
    synth::write_checkpoint(&spec, &dir).unwrap();
    let tok = tokenizers::Tokenizer::from_file(dir.join("tokenizer.json")).unwrap();
    let (sink, _) = run(&spec);
    let (mut hit, mut total) = (0usize, 0usize);
    for (_, _, _, token, experts) in &sink.rows {
        let s = tok.decode(&[*token], false).unwrap();
        if let Some(c) = token_class(&s) {
            hit += experts.iter().filter(|&&e| e % 4 == c as u32).count();
            total += experts.len();
        }
    }
    assert!(total > 100, "class tokens in the prompts: {total}");
    let frac = hit as f64 / total as f64;
    // chance is 0.25
    assert!(
        frac > 0.6,
        "fraction of class tokens' picks in their group: {frac}"
    );
}

/// The tiny preset of every family: written, loaded by the project's model, run on text of the
/// four prompt categories (prompt + 4 generated tokens): every MoE layer (and only those) makes
/// decisions, every expert is used and no expert takes more than 3× its fair share.
#[test]
fn every_family_tiny_preset_loads_runs_and_routes_like_a_trained_model() {
    for (family, seed) in synth::FAMILIES
        .into_iter()
        .flat_map(|f| [(f, 0u64), (f, 1)])
    {
        let mut spec = SynthSpec::preset(synth::tiny_preset(family)).unwrap();
        assert_eq!(spec.family, family);
        spec.seed = seed;
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("m");
        let summary = synth::write_checkpoint(&spec, &dir).unwrap();
        assert_eq!(summary.model_type, family.model_type());
        let cfg = spec.model_config().unwrap();
        let routing = synth::routing_summary(&dir, &synth::ROUTING_TEXTS, 4).unwrap();
        let layers: Vec<u32> = routing.iter().map(|r| r.layer).collect();
        assert_eq!(layers, cfg.moe_layer_indices(), "{family:?}: MoE layers");
        for r in &routing {
            eprintln!(
                "{:12} seed {seed} layer {}: {}/{} experts used, max/mean load {:.2} ({} selections)",
                family.model_type(),
                r.layer,
                r.experts_used,
                r.num_experts,
                r.max_over_mean_load,
                r.selections
            );
            assert_eq!(
                r.experts_used, spec.num_experts,
                "{family:?} layer {}",
                r.layer
            );
            assert!(
                r.max_over_mean_load < 3.0,
                "{family:?} layer {}: max/mean load {}",
                r.layer,
                r.max_over_mean_load
            );
        }
    }
}
