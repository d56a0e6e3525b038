//! Synthetic inputs for the benchmarks (`moe-xray bench analyze`, `bench analyze-large`) and
//! tests: deterministic routing counts with planted category structure.

use crate::input::PromptRow;
use rand::{Rng, RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

/// Shape of a synthetic prompt set.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SynthShape {
    pub prompts: usize,
    pub categories: usize,
    pub layers: usize,
    pub experts: usize,
    pub top_k: usize,
    /// Tokens per prompt.
    pub tokens: usize,
    pub seed: u64,
}

/// Worker threads of the rayon pool.
pub fn threads() -> usize {
    rayon::current_num_threads()
}

/// Synthetic routing counts: each token picks k distinct experts from a category-tilted
/// distribution (expert weights 1 + 3·[e ≡ category mod 4] + per-prompt noise).
pub fn synthetic_rows(b: &SynthShape) -> Vec<PromptRow> {
    let mut rng = ChaCha8Rng::seed_from_u64(b.seed);
    (0..b.prompts)
        .map(|i| {
            let cat = i % b.categories;
            let mut counts = vec![0.0; b.layers * b.experts];
            for l in 0..b.layers {
                let w: Vec<f64> = (0..b.experts)
                    .map(|e| {
                        1.0 + 3.0 * ((e + l) % 4 == cat % 4) as u8 as f64 + rng.random::<f64>()
                    })
                    .collect();
                for _ in 0..b.tokens {
                    let mut chosen = vec![false; b.experts];
                    let mut left: f64 = w.iter().sum();
                    for _ in 0..b.top_k {
                        let mut u = rng.random::<f64>() * left;
                        let mut pick = 0;
                        for (e, &we) in w.iter().enumerate() {
                            if chosen[e] {
                                continue;
                            }
                            pick = e;
                            if u < we {
                                break;
                            }
                            u -= we;
                        }
                        chosen[pick] = true;
                        left -= w[pick];
                        counts[l * b.experts + pick] += 1.0;
                    }
                }
            }
            PromptRow {
                prompt_id: format!("p{i:05}"),
                category: Some(format!("cat{cat}")),
                counts,
                tokens_per_layer: vec![b.tokens as u64; b.layers],
            }
        })
        .collect()
}

/// Prompts `range` of a large synthetic set for the Gram-sums benchmark: counts are small random
/// integers (4 bits each) plus a category tilt, generated in parallel with one ChaCha8 stream per
/// prompt (so the data do not depend on the thread count).
pub fn large_rows(
    range: std::ops::Range<usize>,
    nl: usize,
    ne: usize,
    categories: usize,
    seed: u64,
) -> Vec<PromptRow> {
    let d = nl * ne;
    range
        .into_par_iter()
        .map(|i| {
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            rng.set_stream(i as u64);
            let cat = i % categories;
            let mut counts = Vec::with_capacity(d);
            let mut word = 0u64;
            for f in 0..d {
                if f % 16 == 0 {
                    word = rng.next_u64();
                }
                let x = (word >> (4 * (f % 16))) & 15;
                let tilt = if (f % ne + f / ne) % 4 == cat % 4 {
                    8.0
                } else {
                    0.0
                };
                counts.push(x as f64 + tilt + 1.0);
            }
            PromptRow {
                prompt_id: format!("p{i}"),
                category: Some(format!("cat{cat}")),
                counts,
                tokens_per_layer: Vec::new(),
            }
        })
        .collect()
}
