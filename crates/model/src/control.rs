//! The random-router control (`run --control random-router`, docs/statistics.md "Random-router
//! control"): every router weight of a loaded model — the router matrix `[E, H]` of each MoE
//! layer, its bias (GPT-OSS) and its score-correction bias (DeepSeek-V3) — is replaced by a
//! seeded uniform permutation of its own entries.
//!
//! Why a permutation of the entries rather than fresh normal draws: the re-drawn tensor has
//! exactly the original's values — the same scale, norm, distribution and outliers, in the
//! stored precision without any rounding — while the learned structure (which hidden-state
//! directions each expert's row reads) is destroyed: after the permutation every row is a random
//! selection of the matrix's entries with no relation to the expert or to the hidden state's
//! features. The routing that remains reflects what the token and its context contribute to the
//! hidden state (embedding, attention), read through a structure-free router of the right scale:
//! the floor that token identity and attention alone explain.
//!
//! Stream of tensor `t` of decoder layer `l`: `ChaCha8Rng::seed_from_u64(seed)` switched to stream
//! `(l << 2) | t` (t = 0 router matrix, 1 router bias, 2 score-correction bias); the permutation
//! is Fisher–Yates (`rand`'s `SliceRandom::shuffle`). The same seed gives the same weights.

use candle_core::{DType, Tensor};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::error::Result;

/// Name of the method in results.json (`random_router_control.method`).
pub const METHOD: &str = "permute_entries";

/// Which tensor of a layer a permutation is for (part of its stream id).
#[derive(Debug, Clone, Copy)]
pub enum RouterTensor {
    Weight = 0,
    Bias = 1,
    ScoreBias = 2,
}

/// The permutation of `n` entries for tensor `t` of decoder layer `layer`.
pub fn permutation(seed: u64, layer: usize, t: RouterTensor, n: usize) -> Vec<usize> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(((layer as u64) << 2) | t as u64);
    let mut p: Vec<usize> = (0..n).collect();
    p.shuffle(&mut rng);
    p
}

/// `out[i] = v[perm[i]]`.
pub fn apply<T: Copy>(v: &[T], perm: &[usize]) -> Vec<T> {
    perm.iter().filter_map(|&i| v.get(i).copied()).collect()
}

/// The tensor with its entries (flattened, row-major) permuted by `perm`; same shape, dtype
/// and device (values go through f32, exact for bf16 / f16 / f32).
pub fn permute_tensor(t: &Tensor, perm: &[usize]) -> Result<Tensor> {
    let dtype = t.dtype();
    let shape = t.dims().to_vec();
    let v = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let out = apply(&v, perm);
    Ok(Tensor::from_vec(out, shape, t.device())?.to_dtype(dtype)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permutations_are_seeded_distinct_and_complete() {
        let a = permutation(7, 3, RouterTensor::Weight, 100);
        assert_eq!(a, permutation(7, 3, RouterTensor::Weight, 100));
        assert_ne!(a, permutation(8, 3, RouterTensor::Weight, 100));
        assert_ne!(a, permutation(7, 4, RouterTensor::Weight, 100));
        assert_ne!(a, permutation(7, 3, RouterTensor::Bias, 100));
        let mut s = a.clone();
        s.sort_unstable();
        assert_eq!(s, (0..100).collect::<Vec<_>>());
    }

    #[test]
    fn permuted_tensor_keeps_values_shape_and_dtype() {
        let dev = candle_core::Device::Cpu;
        let v: Vec<f32> = (0..12).map(|i| i as f32 * 0.5 - 2.0).collect();
        let t = Tensor::from_vec(v.clone(), (3, 4), &dev)
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap();
        let p = permutation(1, 0, RouterTensor::Weight, 12);
        let u = permute_tensor(&t, &p).unwrap();
        assert_eq!(u.dims(), &[3, 4]);
        assert_eq!(u.dtype(), DType::BF16);
        let got = u
            .to_dtype(DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(got, apply(&v, &p));
        let mut a = got.clone();
        let mut b = v.clone();
        a.sort_by(f32::total_cmp);
        b.sort_by(f32::total_cmp);
        assert_eq!(a, b);
    }
}
