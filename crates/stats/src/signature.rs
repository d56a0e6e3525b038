//! Routing signatures `s_i[l,e] = A_i[l,e] / Σ_e' A_i[l,e']` and the similarity embedding
//! `v_i = concat_l (s_i[l,:] / ||s_i[l,:]||) / sqrt(L)`, so that `sim(i,j) = v_i · v_j`.

/// Normalise one counts row (length L·E) into its signature, in place. A layer with zero total
/// stays all-zero (callers drop such prompts before).
pub fn signature_in_place(row: &mut [f64], num_layers: usize, num_experts: usize) {
    for l in 0..num_layers {
        let layer = &mut row[l * num_experts..(l + 1) * num_experts];
        let s: f64 = layer.iter().sum();
        if s > 0.0 {
            layer.iter_mut().for_each(|x| *x /= s);
        }
    }
}

/// Turn a signature (or counts) row into its similarity embedding `v`, in place: each layer is
/// scaled to unit Euclidean norm, then the whole vector by `1/sqrt(L)`. Cosine is scale-invariant,
/// so counts and signatures give the same `v`. A zero layer stays zero.
pub fn embed_in_place(row: &mut [f64], num_layers: usize, num_experts: usize) {
    let inv_sqrt_l = 1.0 / (num_layers as f64).sqrt();
    for l in 0..num_layers {
        let layer = &mut row[l * num_experts..(l + 1) * num_experts];
        let nrm = layer.iter().map(|x| x * x).sum::<f64>().sqrt();
        if nrm > 0.0 {
            let f = inv_sqrt_l / nrm;
            layer.iter_mut().for_each(|x| *x *= f);
        }
    }
}

/// Signatures of all prompts: N × (L·E), row-major.
pub fn signatures(counts: &[f64], num_layers: usize, num_experts: usize) -> Vec<f64> {
    let mut s = counts.to_vec();
    let d = num_layers * num_experts;
    if d > 0 {
        for row in s.chunks_mut(d) {
            signature_in_place(row, num_layers, num_experts);
        }
    }
    s
}

/// Similarity embeddings of all prompts: N × (L·E), row-major.
pub fn embeddings(counts: &[f64], num_layers: usize, num_experts: usize) -> Vec<f64> {
    let mut v = counts.to_vec();
    let d = num_layers * num_experts;
    if d > 0 {
        for row in v.chunks_mut(d) {
            embed_in_place(row, num_layers, num_experts);
        }
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_rows_sum_to_one_per_layer() {
        let s = signatures(&[1., 3., 0., 2., 2., 0.], 2, 3);
        assert_eq!(s, vec![0.25, 0.75, 0.0, 0.5, 0.5, 0.0]);
    }

    #[test]
    fn embedding_has_unit_norm_and_dot_is_mean_cosine() {
        let a = [1., 3., 0., 2., 2., 0.];
        let b = [3., 1., 0., 0., 1., 1.];
        let va = embeddings(&a, 2, 3);
        let vb = embeddings(&b, 2, 3);
        let na: f64 = va.iter().map(|x| x * x).sum();
        assert!((na - 1.0).abs() < 1e-15);
        // layer 0: cos((1,3,0),(3,1,0)) = 6/10; layer 1: cos((2,2,0),(0,1,1)) = 2/(sqrt8 sqrt2) = 1/2
        let dot: f64 = va.iter().zip(&vb).map(|(x, y)| x * y).sum();
        assert!((dot - 0.55).abs() < 1e-15, "{dot}");
    }
}
