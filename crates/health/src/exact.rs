//! Exact, order-independent moments of f64 values (count, minimum, Σx and Σx² as exact
//! fixed-point integers), so that the per-token router statistics of `health` are the same
//! bytes whatever the order of the tokens and however they are split into shards and merged
//! (docs/health.md, "Router entropy and margin"; docs/statistics.md, "Sharded analysis").
//!
//! A finite x = m·2^e (m < 2^53, e ≥ −1074) is added to Σx as the integer m·2^(e+1074) and to
//! Σx² as m²·2^(2e+2148), in unsigned little-endian u64 limbs (positive and negative parts of
//! Σx apart). Mean and variance are computed from the exact sums at the end:
//! mean = Σx / n, var = (n·Σx² − (Σx)²) / n², the numerator exact, each a correctly rounded
//! conversion followed by f64 divisions. Non-finite values are summed apart in f64 (they make
//! the mean ±∞ or NaN and the std NaN, as Welford's recurrence did).
//!
//! Hand-written rather than a crate: the exact-summation crates (e.g. `xsum`-style
//! superaccumulators) sum x but not x² exactly and have no stable serialised form that a shard
//! can carry; a general big-integer crate would do, but only "add m·2^s", compare/subtract and one
//! correctly rounded conversion are needed (the limbs are the shard format, docs/statistics.md).

use std::cmp::Ordering;

/// Bits below the binary point of Σx (the exponent of the smallest subnormal).
const SUM_SHIFT: i64 = 1074;
/// Bits below the binary point of Σx².
const SQ_SHIFT: i64 = 2 * SUM_SHIFT;
/// Most limbs a serialized sum may have (Σx of 2^64 values needs 34, Σx² 68).
pub const MAX_LIMBS: usize = 80;

/// Unsigned big integer: little-endian u64 limbs without trailing zero limbs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Big(Vec<u64>);

impl Big {
    /// From little-endian limbs (trailing zeros removed).
    pub fn from_limbs(mut limbs: Vec<u64>) -> Big {
        while limbs.last() == Some(&0) {
            limbs.pop();
        }
        Big(limbs)
    }

    /// The limbs (no trailing zero).
    pub fn limbs(&self) -> &[u64] {
        &self.0
    }

    fn is_zero(&self) -> bool {
        self.0.is_empty()
    }

    /// Adds `words` (little-endian) starting at limb `at`.
    fn add_words(&mut self, at: usize, words: &[u64]) {
        let need = at + words.len();
        if self.0.len() < need {
            self.0.resize(need, 0);
        }
        let mut carry = 0u64;
        let mut i = at;
        for &w in words {
            let (s1, c1) = self.0[i].overflowing_add(w);
            let (s2, c2) = s1.overflowing_add(carry);
            self.0[i] = s2;
            carry = u64::from(c1) + u64::from(c2);
            i += 1;
        }
        while carry != 0 {
            if i == self.0.len() {
                self.0.push(0);
            }
            let (s, c) = self.0[i].overflowing_add(carry);
            self.0[i] = s;
            carry = u64::from(c);
            i += 1;
        }
        while self.0.last() == Some(&0) {
            self.0.pop();
        }
    }

    /// Adds `m · 2^shift`.
    fn add_shifted(&mut self, m: u128, shift: u64) {
        if m == 0 {
            return;
        }
        let at = (shift / 64) as usize;
        let bit = (shift % 64) as u32;
        let (w0, w1) = (m as u64, (m >> 64) as u64);
        let words = if bit == 0 {
            [w0, w1, 0]
        } else {
            [
                w0 << bit,
                (w1 << bit) | (w0 >> (64 - bit)),
                w1 >> (64 - bit),
            ]
        };
        self.add_words(at, &words);
    }

    /// `self + other`.
    pub fn add(&mut self, other: &Big) {
        self.add_words(0, &other.0.clone());
    }

    fn cmp_mag(&self, o: &Big) -> Ordering {
        self.0
            .len()
            .cmp(&o.0.len())
            .then_with(|| self.0.iter().rev().cmp(o.0.iter().rev()))
    }

    /// `self − o` for `self ≥ o` (0 otherwise).
    fn sub(&self, o: &Big) -> Big {
        if self.cmp_mag(o) != Ordering::Greater {
            return Big::default();
        }
        let mut out = self.0.clone();
        let mut borrow = 0u64;
        for (i, x) in out.iter_mut().enumerate() {
            let y = o.0.get(i).copied().unwrap_or(0);
            let (d1, b1) = x.overflowing_sub(y);
            let (d2, b2) = d1.overflowing_sub(borrow);
            *x = d2;
            borrow = u64::from(b1) + u64::from(b2);
        }
        Big::from_limbs(out)
    }

    fn mul(&self, o: &Big) -> Big {
        if self.is_zero() || o.is_zero() {
            return Big::default();
        }
        let mut out = vec![0u64; self.0.len() + o.0.len()];
        for (i, &a) in self.0.iter().enumerate() {
            let mut carry = 0u128;
            for (j, &b) in o.0.iter().enumerate() {
                let t = u128::from(a) * u128::from(b) + u128::from(out[i + j]) + carry;
                out[i + j] = t as u64;
                carry = t >> 64;
            }
            let mut k = i + o.0.len();
            while carry != 0 {
                let t = u128::from(out[k]) + carry;
                out[k] = t as u64;
                carry = t >> 64;
                k += 1;
            }
        }
        Big::from_limbs(out)
    }

    fn bit_len(&self) -> u64 {
        match self.0.last() {
            None => 0,
            Some(&top) => 64 * (self.0.len() as u64 - 1) + u64::from(64 - top.leading_zeros()),
        }
    }

    fn bit(&self, i: u64) -> bool {
        self.0
            .get((i / 64) as usize)
            .is_some_and(|w| (w >> (i % 64)) & 1 == 1)
    }

    /// `self · 2^−shift` as f64, rounded to nearest (one rounding unless the result is
    /// subnormal or overflows).
    fn to_f64_scaled(&self, shift: i64) -> f64 {
        let nb = self.bit_len();
        if nb == 0 {
            return 0.0;
        }
        let (top, low_bits) = if nb <= 64 {
            (self.0[0], 0u64)
        } else {
            let lo = nb - 64;
            let mut top = 0u64;
            for i in 0..64 {
                if self.bit(lo + i) {
                    top |= 1 << i;
                }
            }
            let sticky = (0..lo).any(|i| self.bit(i));
            (top | u64::from(sticky), lo)
        };
        // u64 -> f64 rounds to nearest, ties to even; the sticky bit keeps ties exact.
        ldexp(top as f64, low_bits as i64 - shift)
    }
}

/// `x · 2^k` by exact power-of-two steps.
fn ldexp(mut x: f64, mut k: i64) -> f64 {
    let pow2 = |k: i64| f64::from_bits(((k + 1023) as u64) << 52);
    while k > 1000 {
        x *= pow2(1000);
        k -= 1000;
    }
    while k < -1000 {
        x *= pow2(-1000);
        k += 1000;
    }
    x * pow2(k)
}

/// `(m, e)` with `x = m · 2^e` exactly, for a finite non-zero x (sign dropped).
fn decompose(x: f64) -> (u64, i64) {
    let bits = x.to_bits();
    let exp = ((bits >> 52) & 0x7ff) as i64;
    let frac = bits & ((1u64 << 52) - 1);
    if exp == 0 {
        (frac, -1074)
    } else {
        (frac | (1u64 << 52), exp - 1075)
    }
}

/// Count, minimum, mean and population std (ddof 0) of a stream of f64 values, mergeable
/// exactly (see the module docs).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ExactMoments {
    n: u64,
    /// Smallest non-NaN value (total order, so −0 < +0); `None` before the first.
    min: Option<f64>,
    pos: Big,
    neg: Big,
    sq: Big,
    /// Sum of the non-finite values, if any.
    special: Option<f64>,
}

/// The serialized form of [`ExactMoments`] (read back with [`ExactMoments::from_parts`]).
#[derive(Debug, Clone, PartialEq)]
pub struct MomentParts {
    pub n: u64,
    pub min: Option<f64>,
    pub special: Option<f64>,
    /// Σ of the positive values, in units of 2^−1074.
    pub pos: Vec<u64>,
    /// Σ of |negative values|, in units of 2^−1074.
    pub neg: Vec<u64>,
    /// Σ x², in units of 2^−2148.
    pub sq: Vec<u64>,
}

impl ExactMoments {
    /// Adds one value.
    pub fn push(&mut self, x: f64) {
        self.n += 1;
        if !x.is_nan() && self.min.is_none_or(|m| x.total_cmp(&m) == Ordering::Less) {
            self.min = Some(x);
        }
        if !x.is_finite() {
            self.special = Some(self.special.map_or(x, |s| s + x));
            return;
        }
        if x == 0.0 {
            return;
        }
        let (m, e) = decompose(x);
        let target = if x > 0.0 {
            &mut self.pos
        } else {
            &mut self.neg
        };
        target.add_shifted(u128::from(m), (e + SUM_SHIFT) as u64);
        self.sq
            .add_shifted(u128::from(m) * u128::from(m), (2 * e + SQ_SHIFT) as u64);
    }

    /// Adds every value of `other` (exact: the result equals pushing all values into one).
    pub fn merge(&mut self, other: &ExactMoments) -> std::result::Result<(), String> {
        self.n = self
            .n
            .checked_add(other.n)
            .ok_or("value count overflows 2^64")?;
        if let Some(m) = other.min {
            if self.min.is_none_or(|s| m.total_cmp(&s) == Ordering::Less) {
                self.min = Some(m);
            }
        }
        if let Some(s) = other.special {
            self.special = Some(self.special.map_or(s, |t| t + s));
        }
        self.pos.add(&other.pos);
        self.neg.add(&other.neg);
        self.sq.add(&other.sq);
        Ok(())
    }

    /// Number of values.
    pub fn count(&self) -> u64 {
        self.n
    }

    /// Smallest value (0 when there is none).
    pub fn min(&self) -> f64 {
        self.min.unwrap_or(0.0)
    }

    /// |Σx| in units of 2^−1074 and whether Σx < 0.
    fn signed_sum(&self) -> (Big, bool) {
        match self.pos.cmp_mag(&self.neg) {
            Ordering::Less => (self.neg.sub(&self.pos), true),
            _ => (self.pos.sub(&self.neg), false),
        }
    }

    /// Mean (0 when there is no value).
    pub fn mean(&self) -> f64 {
        if self.n == 0 {
            return 0.0;
        }
        if let Some(s) = self.special {
            return s;
        }
        let (s, negative) = self.signed_sum();
        let m = s.to_f64_scaled(SUM_SHIFT) / self.n as f64;
        if negative {
            -m
        } else {
            m
        }
    }

    /// Population standard deviation (ddof 0; 0 when there is no value).
    pub fn std(&self) -> f64 {
        if self.n == 0 {
            return 0.0;
        }
        if self.special.is_some() {
            return f64::NAN;
        }
        let (s, _) = self.signed_sum();
        let nq = self.sq.mul(&Big(vec![self.n]));
        let num = nq.sub(&s.mul(&s));
        let nf = self.n as f64;
        (num.to_f64_scaled(SQ_SHIFT) / nf / nf).sqrt()
    }

    /// The state, for serialization.
    pub fn parts(&self) -> MomentParts {
        MomentParts {
            n: self.n,
            min: self.min,
            special: self.special,
            pos: self.pos.0.clone(),
            neg: self.neg.0.clone(),
            sq: self.sq.0.clone(),
        }
    }

    /// A state read back; errors when a sum has more than [`MAX_LIMBS`] limbs or the parts
    /// contradict each other (values without a count, a NaN minimum).
    pub fn from_parts(p: MomentParts) -> std::result::Result<Self, String> {
        for (name, v) in [
            ("sum", &p.pos),
            ("negative sum", &p.neg),
            ("sum of squares", &p.sq),
        ] {
            if v.len() > MAX_LIMBS {
                return Err(format!("{name}: {} limbs exceed {MAX_LIMBS}", v.len()));
            }
        }
        let m = ExactMoments {
            n: p.n,
            min: p.min,
            pos: Big::from_limbs(p.pos),
            neg: Big::from_limbs(p.neg),
            sq: Big::from_limbs(p.sq),
            special: p.special,
        };
        let empty = m.pos.is_zero() && m.neg.is_zero() && m.sq.is_zero() && m.special.is_none();
        if (m.n == 0 && (!empty || m.min.is_some())) || m.min.is_some_and(f64::is_nan) {
            return Err(format!(
                "count {} inconsistent with the minimum or the sums",
                m.n
            ));
        }
        if m.special.is_some_and(f64::is_finite) {
            return Err("the sum of non-finite values is finite".into());
        }
        Ok(m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn welford(xs: &[f64]) -> (f64, f64) {
        let (mut n, mut mean, mut m2) = (0f64, 0f64, 0f64);
        for &x in xs {
            n += 1.0;
            let d = x - mean;
            mean += d / n;
            m2 += d * (x - mean);
        }
        (mean, (m2 / n).sqrt())
    }

    #[test]
    fn agrees_with_welford_and_with_hand_values() {
        let mut m = ExactMoments::default();
        for x in [1.0, 2.0, 3.0, 4.0] {
            m.push(x);
        }
        assert_eq!(m.mean(), 2.5);
        assert_eq!(m.std(), 1.25f64.sqrt());
        assert_eq!(m.min(), 1.0);
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        for scale in [1e-150, 1e-5, 1.0, 3.7, 1e100] {
            let xs: Vec<f64> = (0..1000)
                .map(|_| scale * (rng.random::<f64>() - 0.3))
                .collect();
            let mut m = ExactMoments::default();
            xs.iter().for_each(|&x| m.push(x));
            let (wm, ws) = welford(&xs);
            assert!((m.mean() - wm).abs() <= 1e-12 * scale, "{scale}");
            assert!((m.std() - ws).abs() <= 1e-10 * ws, "{scale}");
        }
        // Subnormals and a constant stream: std exactly 0.
        let mut m = ExactMoments::default();
        for _ in 0..7 {
            m.push(5e-324);
        }
        assert_eq!((m.mean(), m.std()), (5e-324, 0.0));
    }

    #[test]
    fn merge_is_exact_and_order_independent() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(9);
        let xs: Vec<f64> = (0..500)
            .map(|i| (rng.random::<f64>() - 0.5) * 10f64.powi(i % 40 - 20))
            .collect();
        let mut all = ExactMoments::default();
        xs.iter().for_each(|&x| all.push(x));
        let mut rev = ExactMoments::default();
        xs.iter().rev().for_each(|&x| rev.push(x));
        let mut parts = [
            ExactMoments::default(),
            ExactMoments::default(),
            ExactMoments::default(),
        ];
        for (i, &x) in xs.iter().enumerate() {
            parts[i % 3].push(x);
        }
        let mut merged = ExactMoments::default();
        for p in parts.iter().rev() {
            merged.merge(p).unwrap();
        }
        assert_eq!(all, rev);
        assert_eq!(all, merged);
        assert_eq!(all.mean().to_bits(), merged.mean().to_bits());
        assert_eq!(all.std().to_bits(), merged.std().to_bits());
        let back = ExactMoments::from_parts(all.parts()).unwrap();
        assert_eq!(back, all);
    }

    #[test]
    fn non_finite_values_and_bad_parts() {
        let mut m = ExactMoments::default();
        m.push(1.0);
        m.push(f64::INFINITY);
        assert_eq!(m.mean(), f64::INFINITY);
        assert!(m.std().is_nan());
        m.push(f64::NEG_INFINITY);
        assert!(m.mean().is_nan());
        let mut p = ExactMoments::default().parts();
        p.sq = vec![1; MAX_LIMBS + 1];
        assert!(ExactMoments::from_parts(p).is_err());
        let mut p = ExactMoments::default().parts();
        p.pos = vec![3];
        assert!(ExactMoments::from_parts(p).is_err());
    }
}
