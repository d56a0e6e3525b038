//! The [`HealthAccumulator`] as bytes and its exact merge: the health section of an analysis
//! shard (`moe-xray map --health`, `moe-xray merge --health`; docs/statistics.md, "Sharded
//! analysis"). Every part of the accumulator is an integer count or an exact sum
//! ([`crate::exact`]), so merging the accumulators of any split of the prompts, in any order,
//! gives the accumulator of one pass over all of them, and the same report bytes.
//!
//! Layout (version 1; LEB128 unsigned integers unless said otherwise): version byte 1; decoder
//! layers; L (MoE rows) and the L decoder-layer indices; E; the token types (count, then one byte
//! each: 0 prompt, 1 generation); per-token records; counts lines; k (0 = none, k + 1) and a byte
//! 1 when k varies; L token totals; L·E loads (integers below 2^53); a byte 1 followed by the
//! L·E² co-activation counts, or 0 when they are all zero or not kept; per layer the moments of
//! the router entropy, then of the top-k margin: count, minimum (byte 0, or 1 and f64 LE),
//! non-finite sum (the same), and the three sums Σx⁺, Σ|x⁻| (units 2^−1074) and Σx² (units
//! 2^−2148) as a limb count (≤ [`crate::exact::MAX_LIMBS`]) and u64 LE limbs.

use std::io::Read;

use moe_xray_trace::TokenType;

use crate::exact::{ExactMoments, MomentParts, MAX_LIMBS};
use crate::health::{HealthAccumulator, HealthOptions};
use crate::{HealthError, Result};

/// Version byte of the serialized accumulator.
pub const STATE_VERSION: u8 = 1;
/// Largest integer every f64 below it holds exactly.
const EXACT_INT: u64 = 1 << 53;

fn put(buf: &mut Vec<u8>, mut x: u64) {
    while x >= 0x80 {
        buf.push((x as u8) | 0x80);
        x >>= 7;
    }
    buf.push(x as u8);
}

fn put_opt_f64(buf: &mut Vec<u8>, x: Option<f64>) {
    match x {
        None => buf.push(0),
        Some(v) => {
            buf.push(1);
            buf.extend_from_slice(&v.to_le_bytes());
        }
    }
}

fn put_limbs(buf: &mut Vec<u8>, limbs: &[u64]) {
    put(buf, limbs.len() as u64);
    for l in limbs {
        buf.extend_from_slice(&l.to_le_bytes());
    }
}

impl HealthAccumulator {
    /// The accumulator as bytes (module docs). Errors when per-prompt counts are kept (they are
    /// not part of the state) or a load is not an integer below 2^53.
    pub fn to_state_bytes(&self) -> std::result::Result<Vec<u8>, String> {
        if self.opts.keep_prompts {
            return Err("per-prompt counts (--mi) are not part of a health shard".into());
        }
        let mut b = vec![STATE_VERSION];
        put(&mut b, self.row_of.len() as u64);
        put(&mut b, self.num_layers as u64);
        for &l in &self.layer_ids {
            put(&mut b, l as u64);
        }
        put(&mut b, self.num_experts as u64);
        put(&mut b, self.opts.token_types.len() as u64);
        for t in &self.opts.token_types {
            b.push(match t {
                TokenType::Prompt => 0,
                TokenType::Generation => 1,
            });
        }
        put(&mut b, self.per_token_records);
        put(&mut b, self.counts_lines);
        put(&mut b, self.top_k.map_or(0, |k| k as u64 + 1));
        b.push(u8::from(self.top_k_varies));
        for &t in &self.tokens {
            put(&mut b, t);
        }
        for &x in &self.load {
            if !(x >= 0.0 && x < EXACT_INT as f64 && x.fract() == 0.0) {
                return Err(format!(
                    "load {x} is not an integer below 2^53 (cannot be merged exactly)"
                ));
            }
            put(&mut b, x as u64);
        }
        if self.coact.iter().any(|&c| c != 0) {
            b.push(1);
            for &c in &self.coact {
                put(&mut b, c);
            }
        } else {
            b.push(0);
        }
        for l in 0..self.num_layers {
            for m in [&self.entropy[l], &self.margin[l]] {
                let p = m.parts();
                put(&mut b, p.n);
                put_opt_f64(&mut b, p.min);
                put_opt_f64(&mut b, p.special);
                put_limbs(&mut b, &p.pos);
                put_limbs(&mut b, &p.neg);
                put_limbs(&mut b, &p.sq);
            }
        }
        Ok(b)
    }

    /// Reads an accumulator written by [`Self::to_state_bytes`] from `r`; `name` (the file and
    /// section) is used in errors. The token types come from the state; `cold_fraction` and
    /// `top_pairs` (report options) from `opts`. Every count is checked before anything is
    /// allocated from it.
    pub fn from_state(name: &str, r: &mut dyn Read, opts: &HealthOptions) -> Result<Self> {
        let mut s = Src { r, name };
        let v = s.byte("version")?;
        if v != STATE_VERSION {
            return Err(s.bad("version", format!("{v} (this build reads {STATE_VERSION})")));
        }
        let decoder = s.small("decoder layers", moe_xray_trace::limits::MAX_LAYERS as u64)?;
        let nl = s.small("num_layers", decoder as u64)?;
        let mut layers = Vec::with_capacity(nl);
        for _ in 0..nl {
            layers.push(s.small("layers", u64::from(u32::MAX))? as u32);
        }
        let ne = s.small("num_experts", moe_xray_trace::limits::MAX_EXPERTS as u64)?;
        let nt = s.small("token types", 2)?;
        let mut token_types = Vec::with_capacity(nt);
        for _ in 0..nt {
            let t = match s.byte("token types")? {
                0 => TokenType::Prompt,
                1 => TokenType::Generation,
                x => return Err(s.bad("token types", format!("unknown token type {x}"))),
            };
            if token_types.contains(&t) {
                return Err(s.bad("token types", "a token type twice"));
            }
            token_types.push(t);
        }
        let hopts = HealthOptions {
            token_types,
            keep_prompts: false,
            ..opts.clone()
        };
        let mut acc = HealthAccumulator::with_layers(decoder, &layers, ne, hopts)
            .map_err(|e| s.bad("dimensions", e))?;
        acc.per_token_records = s.varint("token records")?;
        acc.counts_lines = s.varint("counts lines")?;
        let k = s.varint("top_k")?;
        acc.top_k = match k {
            0 => None,
            k if k - 1 <= ne as u64 => Some((k - 1) as usize),
            k => return Err(s.bad("top_k", format!("{} > num_experts {ne}", k - 1))),
        };
        acc.top_k_varies = match s.byte("top_k varies")? {
            0 => false,
            1 => true,
            x => return Err(s.bad("top_k varies", format!("{x} (expected 0 or 1)"))),
        };
        for t in acc.tokens.iter_mut() {
            *t = s.varint("tokens")?;
        }
        for x in acc.load.iter_mut() {
            let v = s.varint("load")?;
            if v >= EXACT_INT {
                return Err(s.bad("load", format!("{v} ≥ 2^53")));
            }
            *x = v as f64;
        }
        match s.byte("co-activation flag")? {
            0 => {}
            1 if !acc.coact_too_large => {
                for c in acc.coact.iter_mut() {
                    *c = s.varint("co-activation")?;
                }
            }
            x => {
                return Err(s.bad(
                    "co-activation flag",
                    format!("{x} (expected 0, or 1 when L·E² is within the limit)"),
                ))
            }
        }
        for l in 0..acc.num_layers {
            for which in ["router entropy", "top-k margin"] {
                let n = s.varint(which)?;
                let min = s.opt_f64(which)?;
                let special = s.opt_f64(which)?;
                let pos = s.limbs(which)?;
                let neg = s.limbs(which)?;
                let sq = s.limbs(which)?;
                let m = ExactMoments::from_parts(MomentParts {
                    n,
                    min,
                    special,
                    pos,
                    neg,
                    sq,
                })
                .map_err(|e| s.bad(which, format!("layer row {l}: {e}")))?;
                if which == "router entropy" {
                    acc.entropy[l] = m;
                } else {
                    acc.margin[l] = m;
                }
            }
        }
        let mut extra = [0u8; 1];
        match s.r.read(&mut extra) {
            Ok(0) => Ok(acc),
            Ok(_) => Err(s.bad("end", "data after the health state")),
            Err(e) => Err(s.bad("end", e)),
        }
    }

    /// Adds `other` (same layers, experts and token types) to `self`: exactly the accumulator
    /// of one pass over the input of both. Per-prompt counts (`keep_prompts`) are not merged.
    pub fn merge(&mut self, other: &HealthAccumulator) -> std::result::Result<(), String> {
        if self.row_of != other.row_of
            || self.num_experts != other.num_experts
            || self.opts.token_types != other.opts.token_types
        {
            return Err(format!(
                "health states differ: layers {:?} vs {:?} of {} vs {} decoder layers, {} vs {} experts, token types {:?} vs {:?}",
                self.layer_ids,
                other.layer_ids,
                self.row_of.len(),
                other.row_of.len(),
                self.num_experts,
                other.num_experts,
                self.opts.token_types,
                other.opts.token_types
            ));
        }
        if self.opts.keep_prompts || other.opts.keep_prompts {
            return Err("per-prompt counts (--mi) cannot be merged".into());
        }
        let overflow = |what: &str| format!("{what} overflows");
        for (a, &b) in self.load.iter_mut().zip(&other.load) {
            let s = *a + b;
            if s >= EXACT_INT as f64 {
                return Err(overflow("an expert load beyond 2^53"));
            }
            *a = s;
        }
        for (a, &b) in self.tokens.iter_mut().zip(&other.tokens) {
            *a = a.saturating_add(b);
        }
        if self.coact_too_large != other.coact_too_large {
            return Err("health states differ in whether co-activation is kept".into());
        }
        for (a, &b) in self.coact.iter_mut().zip(&other.coact) {
            *a = a
                .checked_add(b)
                .ok_or_else(|| overflow("a co-activation count"))?;
        }
        self.per_token_records = self
            .per_token_records
            .checked_add(other.per_token_records)
            .ok_or_else(|| overflow("the token-record count"))?;
        self.counts_lines = self
            .counts_lines
            .checked_add(other.counts_lines)
            .ok_or_else(|| overflow("the counts-line count"))?;
        for (a, b) in self.entropy.iter_mut().zip(&other.entropy) {
            a.merge(b)?;
        }
        for (a, b) in self.margin.iter_mut().zip(&other.margin) {
            a.merge(b)?;
        }
        self.top_k_varies |= other.top_k_varies;
        match (self.top_k, other.top_k) {
            (None, k) => self.top_k = k,
            (Some(a), Some(b)) if a != b => self.top_k_varies = true,
            _ => {}
        }
        Ok(())
    }
}

struct Src<'a> {
    r: &'a mut dyn Read,
    name: &'a str,
}

impl Src<'_> {
    fn bad(&self, field: &str, msg: impl std::fmt::Display) -> HealthError {
        HealthError::InvalidInput(format!("{}: health field {field}: {msg}", self.name))
    }

    fn exact(&mut self, buf: &mut [u8], field: &str) -> Result<()> {
        self.r.read_exact(buf).map_err(|e| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                self.bad(field, "truncated (unexpected end)")
            } else {
                self.bad(field, e)
            }
        })
    }

    fn byte(&mut self, field: &str) -> Result<u8> {
        let mut b = [0u8; 1];
        self.exact(&mut b, field)?;
        Ok(b[0])
    }

    fn varint(&mut self, field: &str) -> Result<u64> {
        let mut x = 0u64;
        for i in 0..10 {
            let b = self.byte(field)?;
            if i == 9 && b > 1 {
                return Err(self.bad(field, "varint overflows 64 bits"));
            }
            x |= u64::from(b & 0x7f) << (7 * i);
            if b & 0x80 == 0 {
                return Ok(x);
            }
        }
        Err(self.bad(field, "varint longer than 10 bytes"))
    }

    fn small(&mut self, field: &str, max: u64) -> Result<usize> {
        let v = self.varint(field)?;
        if v > max {
            return Err(self.bad(field, format!("{v} exceeds {max}")));
        }
        Ok(v as usize)
    }

    fn opt_f64(&mut self, field: &str) -> Result<Option<f64>> {
        match self.byte(field)? {
            0 => Ok(None),
            1 => {
                let mut b = [0u8; 8];
                self.exact(&mut b, field)?;
                Ok(Some(f64::from_le_bytes(b)))
            }
            x => Err(self.bad(field, format!("flag {x} (expected 0 or 1)"))),
        }
    }

    fn limbs(&mut self, field: &str) -> Result<Vec<u64>> {
        let n = self.small(field, MAX_LIMBS as u64)?;
        let mut v = Vec::with_capacity(n);
        let mut b = [0u8; 8];
        for _ in 0..n {
            self.exact(&mut b, field)?;
            v.push(u64::from_le_bytes(b));
        }
        Ok(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::health::TokenRouting;

    fn tok<'a>(p: &'a str, layer: usize, experts: &'a [u32], probs: &'a [f32]) -> TokenRouting<'a> {
        TokenRouting {
            prompt_id: p,
            category: None,
            layer,
            token_type: TokenType::Prompt,
            experts,
            probs: Some(probs),
        }
    }

    fn filled(parts: usize, which: usize) -> HealthAccumulator {
        let mut acc =
            HealthAccumulator::with_layers(3, &[0, 2], 4, HealthOptions::default()).unwrap();
        let data: [(&str, usize, [u32; 2], [f32; 4]); 6] = [
            ("a", 0, [0, 1], [0.5, 0.3, 0.1, 0.1]),
            ("a", 2, [2, 1], [0.1, 0.3, 0.4, 0.2]),
            ("b", 0, [3, 1], [0.05, 0.25, 0.3, 0.4]),
            ("b", 2, [0, 1], [0.7, 0.1, 0.1, 0.1]),
            ("c", 0, [1, 0], [0.3, 0.31, 0.19, 0.2]),
            ("c", 2, [2, 3], [0.0, 0.0, 0.6, 0.4]),
        ];
        for (i, (p, l, e, pr)) in data.iter().enumerate() {
            if (i / 2) % parts == which {
                acc.add_token(&tok(p, *l, e, pr)).unwrap();
            }
        }
        acc
    }

    #[test]
    fn state_round_trips_and_merges_into_one_pass() {
        let one = filled(1, 0);
        let want = serde_json::to_string(&one.report()).unwrap();
        for parts in [2, 3] {
            for order in [false, true] {
                let mut merged =
                    HealthAccumulator::with_layers(3, &[0, 2], 4, HealthOptions::default())
                        .unwrap();
                let mut idx: Vec<usize> = (0..parts).collect();
                if order {
                    idx.reverse();
                }
                for i in idx {
                    let bytes = filled(parts, i).to_state_bytes().unwrap();
                    let back = HealthAccumulator::from_state(
                        "s",
                        &mut &bytes[..],
                        &HealthOptions::default(),
                    )
                    .unwrap();
                    merged.merge(&back).unwrap();
                }
                assert_eq!(serde_json::to_string(&merged.report()).unwrap(), want);
            }
        }
    }

    #[test]
    fn hostile_states_are_refused_naming_the_field() {
        let good = filled(1, 0).to_state_bytes().unwrap();
        let read = |b: &[u8]| {
            HealthAccumulator::from_state("f.mxs health", &mut &b[..], &HealthOptions::default())
                .map(|_| ())
                .unwrap_err()
                .to_string()
        };
        for cut in [1, 5, good.len() / 2, good.len() - 1] {
            let e = read(&good[..cut]);
            assert!(
                e.contains("f.mxs health") && e.contains("health field"),
                "{e}"
            );
        }
        let mut t = good.clone();
        t.push(0);
        assert!(read(&t).contains("end"));
        let mut t = good.clone();
        t[0] = 2;
        assert!(read(&t).contains("version"));
        // Decoder layers beyond the limit, before anything is allocated.
        let mut t = vec![1u8];
        put(&mut t, u64::MAX >> 1);
        assert!(read(&t).contains("decoder layers"));
        // More MoE rows than decoder layers.
        let t = [1u8, 3, 4];
        assert!(read(&t).contains("num_layers"));
        // Layers not ascending.
        let t = [1u8, 3, 2, 2, 0, 4, 1, 0];
        assert!(read(&t).contains("dimensions"));
        // A limb count beyond the limit (the last field is the margin's Σx² limb count).
        let mut c = HealthAccumulator::new(1, 2, HealthOptions::default()).unwrap();
        c.add_counts("p", None, TokenType::Prompt, &[3, 1], 2)
            .unwrap();
        let mut t = c.to_state_bytes().unwrap();
        let at = t.len() - 1;
        assert_eq!(t[at], 0, "no router distribution: empty sums");
        t[at] = 0xff;
        t.push(0x01);
        assert!(read(&t).contains("top-k margin"));
        // Unknown token type.
        let mut t = good[..6].to_vec();
        let e = {
            // version, decoder 3, L 2, layers 0 2, E 4, then token-type count 1 and type 7
            t.truncate(6);
            t.extend_from_slice(&[1, 7]);
            read(&t)
        };
        assert!(e.contains("token types"), "{e}");
        // Merge refuses a different shape.
        let mut a = filled(1, 0);
        let b = HealthAccumulator::new(3, 4, HealthOptions::default()).unwrap();
        assert!(a.merge(&b).is_err());
    }
}
