//! Rotary position embedding frequencies: transformers' default RoPE and YaRN
//! (`_compute_default_rope_parameters`, `_compute_yarn_parameters` in `modeling_rope_utils.py`).

use crate::config::RopeSpec;

/// `inv_freq` (f32, `dim / 2` values) and the attention scaling that multiplies cos and sin.
pub fn inv_freq(spec: &RopeSpec) -> (Vec<f32>, f32) {
    let dim = spec.dim;
    let base = spec.theta as f32;
    // transformers: 1 / base ** (arange(0, dim, 2, dtype=int64).float() / dim), all in f32.
    let pos_freqs: Vec<f32> = (0..dim / 2)
        .map(|j| base.powf((2 * j) as f32 / dim as f32))
        .collect();
    let Some(y) = spec.yarn else {
        return (pos_freqs.iter().map(|&p| 1.0f32 / p).collect(), 1.0);
    };
    let factor = y.factor;
    let get_mscale = |scale: f64, mscale: f64| {
        if scale <= 1.0 {
            1.0
        } else {
            0.1 * mscale * scale.ln() + 1.0
        }
    };
    let attention_factor = match y.attention_factor {
        Some(a) => a,
        None => match (y.mscale, y.mscale_all_dim) {
            (Some(m), Some(a)) if m != 0.0 && a != 0.0 => {
                get_mscale(factor, m) / get_mscale(factor, a)
            }
            _ => get_mscale(factor, 1.0),
        },
    };
    let base64 = spec.theta;
    let orig = y.original_max_position_embeddings as f64;
    let correction_dim = |rot: f64| {
        (dim as f64 * (orig / (rot * 2.0 * std::f64::consts::PI)).ln()) / (2.0 * base64.ln())
    };
    let (mut low, mut high) = (correction_dim(y.beta_fast), correction_dim(y.beta_slow));
    if y.truncate {
        low = low.floor();
        high = high.ceil();
    }
    let low = low.max(0.0);
    let high = high.min(dim as f64 - 1.0);
    // As torch: `(arange(d/2, f32) - low) / (high - low)` with the Python floats `low` and
    // `high - low` (computed in f64) rounded to f32 by the tensor ops.
    let high = if low == high { high + 0.001 } else { high };
    let (lo, range) = (low as f32, (high - low) as f32);
    let inv = pos_freqs
        .iter()
        .enumerate()
        .map(|(j, &p)| {
            let extrapolation = 1.0f32 / p;
            let interpolation = 1.0f32 / (factor as f32 * p);
            let ramp = ((j as f32 - lo) / range).clamp(0.0, 1.0);
            let extrapolation_factor = 1.0f32 - ramp;
            interpolation * (1.0 - extrapolation_factor) + extrapolation * extrapolation_factor
        })
        .collect();
    (inv, attention_factor as f32)
}
