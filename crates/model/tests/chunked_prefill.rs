//! Chunked prefill (issue 14): feeding a prompt in chunks of C tokens against the KV cache gives
//! bit-identical routing (experts, weights, full router distributions) and logits to a one-shot
//! prefill, on every committed HF fixture model, for several chunk sizes and batch sizes.

mod common;

use moe_xray_test_support::fixture;
use std::collections::HashMap;
use std::path::Path;

use common::Collect;
use moe_xray_model::generate::{generate_all, GenerateOptions, Generation, PromptInput};
use moe_xray_model::model::{LoadOptions, MoeModel, StepSeq};
use moe_xray_trace::TokenType;

const MODELS: &[&str] = &[
    "olmoe-tiny-mha-f32",
    "olmoe-tiny-gqa-f32",
    "olmoe-tiny-fused-f32",
    "olmoe-tiny-bf16",
];

/// The fixture prompts' token ids (from `expected_generations.jsonl`), plus one long prompt made
/// of all of them concatenated so that chunks cross many boundaries.
fn prompts(dir: &Path) -> Vec<PromptInput> {
    let text = std::fs::read_to_string(dir.join("expected_generations.jsonl")).unwrap();
    let mut out: Vec<PromptInput> = text
        .lines()
        .enumerate()
        .map(|(i, l)| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            PromptInput {
                id: v["prompt_id"].as_str().unwrap().to_string(),
                category: None,
                tokens: v["prompt_ids"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_u64().unwrap() as u32)
                    .collect(),
                index: i as u64,
            }
        })
        .collect();
    let all: Vec<u32> = out.iter().flat_map(|p| p.tokens.clone()).collect();
    let n = out.len() as u64;
    out.push(PromptInput {
        id: "all".into(),
        category: None,
        tokens: all,
        index: n,
    });
    out
}

/// Records as comparable bit patterns, keyed by (prompt, position, layer).
type Bits = HashMap<(String, u32, u32), (Vec<u32>, Vec<u32>, Vec<u32>, u8)>;

fn bits(c: &Collect) -> Bits {
    c.records
        .iter()
        .map(|r| {
            (
                (r.prompt_id.clone(), r.position, r.layer),
                (
                    r.experts.clone(),
                    r.weights
                        .as_ref()
                        .unwrap()
                        .iter()
                        .map(|w| w.to_bits())
                        .collect(),
                    r.probs
                        .as_ref()
                        .unwrap()
                        .iter()
                        .map(|w| w.to_bits())
                        .collect(),
                    r.token_type as u8,
                ),
            )
        })
        .collect()
}

fn generate(
    model: &MoeModel,
    ps: &[PromptInput],
    batch: usize,
    chunk: usize,
) -> (Bits, Vec<Generation>) {
    let opts = GenerateOptions {
        max_new_tokens: 5,
        ignore_eos: true,
        prefill_chunk: chunk,
        ..Default::default()
    };
    let mut sink = Collect {
        probs: true,
        ..Default::default()
    };
    let mut gens = Vec::new();
    generate_all(model, ps, batch, &opts, &mut sink, &mut |g| {
        gens.push(g);
        Ok(())
    })
    .unwrap();
    gens.sort_by(|a, b| a.prompt_id.cmp(&b.prompt_id));
    (bits(&sink), gens)
}

#[test]
fn chunked_generation_is_bit_identical_to_one_shot_prefill() {
    for name in MODELS {
        let dir = fixture("hf").join(name);
        let model = MoeModel::load(&dir, &LoadOptions::default()).unwrap();
        let ps = prompts(&dir);
        let longest = ps.iter().map(|p| p.tokens.len()).max().unwrap();
        assert!(longest > 40, "{name}: {longest}");
        let (want, want_gens) = generate(&model, &ps, 1, usize::MAX);
        for (batch, chunk) in [(1, 1), (1, 2), (4, 3), (4, 7), (16, 16), (3, 17), (3, 64)] {
            let (got, gens) = generate(&model, &ps, batch, chunk);
            assert_eq!(gens, want_gens, "{name}: batch {batch} chunk {chunk}");
            assert_eq!(got.len(), want.len(), "{name}: batch {batch} chunk {chunk}");
            for (k, v) in &want {
                assert_eq!(
                    got.get(k),
                    Some(v),
                    "{name}: batch {batch} chunk {chunk} at {k:?}"
                );
            }
        }
    }
}

/// The prompt's logits (and those of one decoding step after it) are bit-identical too.
#[test]
fn chunked_prefill_logits_are_bit_identical() {
    for name in MODELS {
        let dir = fixture("hf").join(name);
        let model = MoeModel::load(&dir, &LoadOptions::default()).unwrap();
        let p = prompts(&dir).pop().unwrap();
        let run = |chunk: usize| -> (Vec<u32>, Vec<u32>) {
            let mut st = model.new_sequence("p");
            st.set_prefill_span(p.tokens.len());
            let mut sink = Collect::default();
            let mut last = None;
            for c in p.tokens.chunks(chunk) {
                let end = st.pos + c.len() == p.tokens.len();
                let mut step = [StepSeq {
                    state: &mut st,
                    tokens: c,
                    token_type: TokenType::Prompt,
                    want_logits: end,
                }];
                last = model.forward(&mut step, &mut sink).unwrap().pop().unwrap();
            }
            let prefill: Vec<u32> = last.unwrap().iter().map(|x| x.to_bits()).collect();
            let mut step = [StepSeq {
                state: &mut st,
                tokens: &[7],
                token_type: TokenType::Generation,
                want_logits: true,
            }];
            let decode = model
                .forward(&mut step, &mut sink)
                .unwrap()
                .pop()
                .unwrap()
                .unwrap();
            (prefill, decode.iter().map(|x| x.to_bits()).collect())
        };
        let one_shot = run(p.tokens.len());
        for chunk in [1, 2, 5, 13, 16, 17] {
            assert_eq!(run(chunk), one_shot, "{name}: chunk {chunk}");
        }
    }
}
