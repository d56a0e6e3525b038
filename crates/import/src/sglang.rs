//! SGLang: per-request `routed_experts` (server flag `--enable-return-routed-experts`, request
//! field `return_routed_experts: true`), returned in `meta_info.routed_experts` of `/generate`
//! responses as base64 of a little-endian int32 C-order array `[seq_len - 1, num_hidden_layers,
//! num_experts_per_tok]` (python/sglang/srt/layers/moe/routed_experts_capturer.py allocates the
//! buffer with those dimensions; python/sglang/srt/managers/tokenizer_manager.py base64-encodes
//! it into meta_info). `seq_len = prompt_tokens + completion_tokens`; the last generated token is
//! never forwarded, so it has no row. No router weights; dense layers hold zeros.
//!
//! Each JSONL line is one `/generate` response object. The prompt id is the line's `prompt_id`
//! (added by whoever logged the responses) or else `meta_info.id`; `category` is optional.

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::jsonl::{for_each_line, opt_string, opt_usize};
use crate::output::{Sequence, Staged};
use crate::{ImportError, Result};

/// Imports `/generate` responses; `layers` (the array's layer dimension) and `k` come from the
/// config (`num_hidden_layers`, `num_experts_per_tok`) or the CLI.
pub fn import_jsonl(staged: &mut Staged, files: &[PathBuf], layers: usize, k: usize) -> Result<()> {
    for file in files {
        for_each_line(file, |line, v| {
            import_response(staged, file, line, &v, layers, k)
        })?;
    }
    Ok(())
}

fn import_response(
    staged: &mut Staged,
    file: &Path,
    line: usize,
    v: &Value,
    layers: usize,
    k: usize,
) -> Result<()> {
    let rec = format!("line {line}");
    let bad = |m: String| ImportError::invalid(file, &rec, m);
    if !v.is_object() {
        return Err(bad(
            "expected a JSON object (one /generate response per line)".into(),
        ));
    }
    let meta = v
        .get("meta_info")
        .filter(|m| m.is_object())
        .ok_or_else(|| bad("missing meta_info".into()))?;
    let id = match opt_string(v, "prompt_id").map_err(bad)? {
        Some(s) => s,
        None => opt_string(meta, "id")
            .map_err(|m| bad(format!("meta_info.{m}")))?
            .ok_or_else(|| bad("missing prompt_id and meta_info.id".into()))?,
    };
    let category = opt_string(v, "category").map_err(bad)?;
    let p = opt_usize(meta, "prompt_tokens")
        .map_err(|m| bad(format!("meta_info.{m}")))?
        .ok_or_else(|| bad("missing meta_info.prompt_tokens".into()))?;
    let c = opt_usize(meta, "completion_tokens")
        .map_err(|m| bad(format!("meta_info.{m}")))?
        .ok_or_else(|| bad("missing meta_info.completion_tokens".into()))?;
    let b64 = match meta.get("routed_experts") {
        Some(Value::String(s)) => s,
        None | Some(Value::Null) => {
            return Err(bad(
                "no meta_info.routed_experts (start SGLang with --enable-return-routed-experts and send return_routed_experts: true)".into(),
            ))
        }
        Some(x) => return Err(bad(format!("meta_info.routed_experts: expected a base64 string, found {}", short(x)))),
    };
    let seq_len = p
        .checked_add(c)
        .ok_or_else(|| bad("token counts overflow".into()))?;
    if seq_len == 0 {
        return Err(bad("prompt_tokens + completion_tokens is 0".into()));
    }
    let rows = seq_len - 1;
    let need = rows
        .checked_mul(layers)
        .and_then(|x| x.checked_mul(k))
        .and_then(|x| x.checked_mul(4))
        .ok_or_else(|| bad("array size overflows".into()))?;
    // The decoded length follows from the text alone: check it before decoding anything.
    if b64.len() % 4 == 0 {
        let pad = b64.bytes().rev().take_while(|&c| c == b'=').count().min(2);
        let len = b64.len() / 4 * 3 - pad;
        if len != need {
            return Err(bad(format!(
                "base64 decodes to {len} bytes, but int32 [{rows}, {layers}, {k}] (prompt_tokens {p} + completion_tokens {c} - 1 rows) needs {need}"
            )));
        }
    }
    let bytes =
        crate::b64::decode(b64).map_err(|m| bad(format!("meta_info.routed_experts: {m}")))?;
    if bytes.len() != need {
        return Err(bad(format!(
            "base64 decodes to {} bytes, but int32 [{rows}, {layers}, {k}] (prompt_tokens {p} + completion_tokens {c} - 1 rows) needs {need}",
            bytes.len()
        )));
    }
    let vals: Vec<i64> = bytes
        .chunks_exact(4)
        .map(|b| i32::from_le_bytes([b[0], b[1], b[2], b[3]]) as i64)
        .collect();
    staged.write_sequence(
        file,
        &rec,
        &Sequence {
            prompt_id: id,
            category,
            prompt_tokens: p.min(rows),
            rows: &vals,
            n_rows: rows,
            layers,
            k,
            token_ids: None,
            weights: None,
        },
    )
}

fn short(v: &Value) -> String {
    let s = v.to_string();
    if s.len() > 40 {
        format!(
            "{}…",
            &s[..s.char_indices().nth(40).map_or(s.len(), |(i, _)| i)]
        )
    } else {
        s
    }
}

/// Imports expert-distribution recorder dumps (`torch.save` of
/// python/sglang/srt/eplb/expert_distribution.py, `_DetailAccumulator.dump` for the `per_token`
/// and `per_pass` modes, `_StatAccumulator.dump` for `stat`). The dumps carry no request ids, so
/// each unit becomes one pseudo-prompt:
/// - `per_token`: each record (one forward pass of one rank) → prompt `<file stem>/rank<r>/pass<id>`
///   with its `topk_ids_of_layer` ([layers, tokens, 8] physical ids, -1 in unused slots) mapped
///   to logical experts with `last_physical_to_logical_map`; tokens of a DECODE pass
///   (`forward_mode` 2) are generation tokens, of any other pass prompt tokens;
/// - `per_pass`: each record's `global_physical_count` ([layers, physical experts]) → counts of
///   prompt `<stem>/rank<r>/pass<id>`, physical replicas summed into their logical expert;
/// - `stat`: `logical_count` ([steps, layers, logical experts]) → counts of prompt `<stem>/step<s>`.
///
/// `k` (top-k) must be known (config or `--top-k`): the per-token array has 8 slots and counts
/// do not say k.
pub fn import_pt(staged: &mut Staged, files: &[PathBuf], k: usize) -> Result<()> {
    use crate::pickle::{TorchFile, Value as P};
    for file in files {
        let stem = file
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or("dump")
            .to_string();
        let mut tf = TorchFile::open(file)?;
        let data = tf.data.clone();
        let tensor = |v: Option<&P>, what: &str| -> Result<crate::pickle::TensorRef> {
            match v {
                Some(P::Tensor(t)) => Ok(t.clone()),
                Some(other) => Err(ImportError::invalid(
                    file,
                    what,
                    format!("expected a tensor, found {}", other.kind()),
                )),
                None => Err(ImportError::invalid(file, what, "missing")),
            }
        };
        if let Some(P::List(records)) = data.get("records") {
            let mt = tensor(
                data.get("last_physical_to_logical_map"),
                "last_physical_to_logical_map",
            )?;
            if mt.shape.len() != 2 {
                return Err(ImportError::invalid(
                    file,
                    "last_physical_to_logical_map",
                    format!(
                        "wrong shape {:?}, expected [layers, physical experts]",
                        mt.shape
                    ),
                ));
            }
            let map = tf.int_tensor(file, "last_physical_to_logical_map", &mt)?;
            let (ml, mp) = (mt.shape[0] as usize, mt.shape[1] as usize);
            for (i, r) in records.iter().enumerate() {
                let rec = format!("records[{i}]");
                let bad = |m: String| ImportError::invalid(file, &rec, m);
                let int = |key: &str| -> Result<i64> {
                    match r.get(key) {
                        Some(P::Int(n)) => Ok(*n),
                        _ => Err(ImportError::invalid(
                            file,
                            &rec,
                            format!("missing integer {key}"),
                        )),
                    }
                };
                let rank = int("rank")?;
                let pass = int("forward_pass_id")?;
                let id = format!("{stem}/rank{rank}/pass{pass}");
                let phys_to_log = |l: usize, p: i64| -> std::result::Result<i64, String> {
                    if p == -1 {
                        return Ok(-1);
                    }
                    if p < 0 || p as usize >= mp || l >= ml {
                        return Err(format!(
                            "layer {l}: physical expert id {p} out of range (map is [{ml}, {mp}])"
                        ));
                    }
                    Ok(map[l * mp + p as usize])
                };
                if let Some(v) = r.get("topk_ids_of_layer") {
                    let t = tensor(Some(v), &rec)?;
                    if t.shape.len() != 3 || t.shape[0] as usize != ml {
                        return Err(bad(format!(
                            "topk_ids_of_layer has shape {:?}, expected [{ml}, tokens, slots]",
                            t.shape
                        )));
                    }
                    let (layers, tokens, slots) = (
                        t.shape[0] as usize,
                        t.shape[1] as usize,
                        t.shape[2] as usize,
                    );
                    if slots < k {
                        return Err(bad(format!("wrong shape for the stated config: {slots} slots per token, top_k is {k}")));
                    }
                    let ids = tf.int_tensor(file, &rec, &t)?;
                    let mut rows = Vec::with_capacity(tokens * layers * k);
                    for tok in 0..tokens {
                        for l in 0..layers {
                            let base = (l * tokens + tok) * slots;
                            let s = &ids[base..base + slots];
                            if let Some(j) = s[k..].iter().position(|&x| x != -1) {
                                return Err(bad(format!(
                                    "token {tok}, layer {l}: slot {} holds {} but top_k is {k}",
                                    k + j,
                                    s[k + j]
                                )));
                            }
                            for &p in &s[..k] {
                                rows.push(
                                    phys_to_log(l, p)
                                        .map_err(|m| bad(format!("token {tok}: {m}")))?,
                                );
                            }
                        }
                    }
                    let decode = matches!(r.get("forward_mode"), Some(P::Int(2)));
                    let token_ids = match r.get("input_ids") {
                        Some(P::List(ids)) if ids.len() == tokens => ids
                            .iter()
                            .map(|x| match x {
                                P::Int(n) => u32::try_from(*n).ok(),
                                _ => None,
                            })
                            .collect::<Option<Vec<u32>>>(),
                        _ => None,
                    };
                    staged.write_sequence(
                        file,
                        &rec,
                        &Sequence {
                            prompt_id: id,
                            category: None,
                            prompt_tokens: if decode { 0 } else { tokens },
                            rows: &rows,
                            n_rows: tokens,
                            layers,
                            k,
                            token_ids,
                            weights: None,
                        },
                    )?;
                } else {
                    let t = tensor(r.get("global_physical_count"), &rec)?;
                    if t.shape.len() != 2 || t.shape[0] as usize != ml || t.shape[1] as usize != mp
                    {
                        return Err(bad(format!(
                            "global_physical_count has shape {:?}, expected [{ml}, {mp}]",
                            t.shape
                        )));
                    }
                    let phys = tf.int_tensor(file, &rec, &t)?;
                    let e = staged.shape().num_experts;
                    let mut logical = vec![0i64; ml * e];
                    for l in 0..ml {
                        for p in 0..mp {
                            let c = phys[l * mp + p];
                            if c == 0 {
                                continue;
                            }
                            let lg = map[l * mp + p];
                            if lg < 0 || lg as usize >= e {
                                return Err(bad(format!("layer {l}: physical expert {p} maps to logical expert {lg}, out of range (num_experts = {e})")));
                            }
                            let slot = &mut logical[l * e + lg as usize];
                            *slot = slot
                                .checked_add(c)
                                .ok_or_else(|| bad("count overflows".into()))?;
                        }
                    }
                    staged.write_counts(file, &rec, &id, &logical, ml, k)?;
                }
            }
        } else if let Some(v) = data.get("logical_count") {
            let t = tensor(Some(v), "logical_count")?;
            let (steps, layers, e) = match t.shape.as_slice() {
                [s, l, e] => (*s as usize, *l as usize, *e as usize),
                [l, e] => (1, *l as usize, *e as usize),
                s => {
                    return Err(ImportError::invalid(
                        file,
                        "logical_count",
                        format!("wrong shape {s:?}, expected [steps, layers, experts]"),
                    ))
                }
            };
            let counts = tf.int_tensor(file, "logical_count", &t)?;
            for s in 0..steps {
                let rec = format!("logical_count[{s}]");
                let block = &counts[s * layers * e..(s + 1) * layers * e];
                staged.write_counts(file, &rec, &format!("{stem}/step{s}"), block, layers, k)?;
            }
        } else {
            return Err(ImportError::invalid_file(
                file,
                "not an SGLang expert-distribution dump: no `records` (per_token / per_pass) and no `logical_count` (stat)",
            ));
        }
    }
    Ok(())
}
