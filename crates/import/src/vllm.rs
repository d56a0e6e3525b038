//! vLLM: `routed_experts` recorded with `enable_return_routed_experts`.
//!
//! What vLLM records (vllm/outputs.py, `CompletionOutput.routed_experts`, "[seq_len,layer_num,
//! topk]"; the capturer fills one slot per forwarded token, i.e. `prompt + generated - 1` rows,
//! because the last generated token is never fed back): int32 expert ids per token, per decoder
//! layer (`num_hidden_layers`, dense layers included), top-k. No router weights; no prompt
//! boundary (hence the requests file); no request id inside the array.
//!
//! Two sources:
//! - arrays saved with `np.save` (`.npy`, one request, named by the file stem) or `np.savez`
//!   (`.npz`, one request per member, named by the member) plus `--requests FILE`;
//! - JSONL of OpenAI-compatible responses (`/v1/completions`, `/v1/chat/completions`) that carry
//!   the top-level `prompt_routed_experts` ([prompt_tokens][layers][k]) and per choice
//!   `routed_experts` ([completion_tokens - 1][layers][k]).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::jsonl::{array3, for_each_line, opt_string, opt_usize};
use crate::npy::{for_each_npz, read_npy, IntArray};
use crate::output::{Sequence, Staged};
use crate::requests::{read_requests, RequestInfo};
use crate::{ImportError, Result};

/// Imports `.npy` / `.npz` arrays; `requests` gives each array's prompt length.
pub fn import_arrays(staged: &mut Staged, files: &[PathBuf], requests: &Path) -> Result<()> {
    let reqs = read_requests(requests)?;
    for file in files {
        let is_npz = file
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("npz"));
        if is_npz {
            for_each_npz(file, |name, arr| {
                let rec = format!("array {name:?}");
                import_array(staged, file, &rec, &name, &arr, &reqs, requests)
            })?;
            continue;
        }
        let arrays: Vec<(String, IntArray)> = {
            let name = file
                .file_stem()
                .and_then(|s| s.to_str())
                .filter(|s| !s.is_empty())
                .ok_or_else(|| {
                    ImportError::invalid_file(file, "cannot name the request after this file")
                })?
                .to_string();
            vec![(name, read_npy(file)?)]
        };
        for (name, arr) in arrays {
            let rec = format!("array {name:?}");
            import_array(staged, file, &rec, &name, &arr, &reqs, requests)?;
        }
    }
    Ok(())
}

fn import_array(
    staged: &mut Staged,
    file: &Path,
    rec: &str,
    name: &str,
    arr: &IntArray,
    reqs: &HashMap<String, RequestInfo>,
    requests: &Path,
) -> Result<()> {
    let bad = |m: String| ImportError::invalid(file, rec, m);
    if arr.shape.len() != 3 {
        return Err(bad(format!(
            "wrong shape: expected [tokens, layers, top_k], found {:?}",
            arr.shape
        )));
    }
    let info = reqs.get(name).ok_or_else(|| {
        bad(format!(
            "no line with prompt_id {name:?} in the requests file {}",
            requests.display()
        ))
    })?;
    let rows = arr.shape[0];
    check_rows(rows, info.prompt_tokens, info.completion_tokens).map_err(bad)?;
    staged.write_sequence(
        file,
        rec,
        &Sequence {
            prompt_id: name.to_string(),
            category: info.category.clone(),
            prompt_tokens: info.prompt_tokens,
            rows: &arr.data,
            n_rows: rows,
            layers: arr.shape[1],
            k: arr.shape[2],
            token_ids: None,
            weights: None,
        },
    )
}

/// vLLM records `prompt + completion - 1` rows (the last generated token is never forwarded).
fn check_rows(
    rows: usize,
    prompt: usize,
    completion: Option<usize>,
) -> std::result::Result<(), String> {
    match completion {
        Some(c) if c >= 1 => {
            let want = prompt + c - 1;
            if rows != want {
                return Err(format!(
                    "wrong shape: {rows} token rows, but prompt_tokens {prompt} + completion_tokens {c} - 1 = {want}"
                ));
            }
        }
        _ => {
            if rows < prompt {
                return Err(format!(
                    "wrong shape: {rows} token rows are fewer than prompt_tokens {prompt}"
                ));
            }
        }
    }
    Ok(())
}

/// A routing value of a response: nested lists `[tokens][layers][k]`, or the compact form
/// `{"encoding": "base64", "dtype": "int16"|"int32"|..., "shape": [tokens, layers, k], "data": "..."}`
/// (little-endian, C order) that some vLLM releases return.
fn routing_value(
    v: &serde_json::Value,
    name: &str,
    dims: Option<(usize, usize)>,
) -> std::result::Result<(Vec<i64>, usize, usize, usize), String> {
    let Some(obj) = v.as_object() else {
        return array3(v, name, dims);
    };
    let enc = obj.get("encoding").and_then(Value::as_str);
    if enc != Some("base64") {
        return Err(format!(
            "{name}: expected nested lists or {{\"encoding\": \"base64\", ...}}"
        ));
    }
    let size = match obj.get("dtype").and_then(Value::as_str) {
        Some("int8") => 1,
        Some("int16") => 2,
        Some("int32") => 4,
        Some("int64") => 8,
        d => return Err(format!("{name}: unsupported dtype {d:?}")),
    };
    let shape: Vec<usize> = obj
        .get("shape")
        .and_then(Value::as_array)
        .and_then(|a| {
            a.iter()
                .map(|x| x.as_u64().and_then(|n| usize::try_from(n).ok()))
                .collect::<Option<Vec<_>>>()
        })
        .filter(|s| s.len() == 3)
        .ok_or_else(|| format!("{name}: shape must be [tokens, layers, top_k]"))?;
    let (rows, layers, k) = (shape[0], shape[1], shape[2]);
    if let Some((l0, k0)) = dims {
        if (layers, k) != (l0, k0) {
            return Err(format!("wrong shape: {name} is [{rows}, {layers}, {k}], the prompt's routing has [.., {l0}, {k0}]"));
        }
    }
    let need = rows
        .checked_mul(layers)
        .and_then(|x| x.checked_mul(k))
        .and_then(|x| x.checked_mul(size))
        .ok_or_else(|| format!("{name}: shape overflows"))?;
    let data = obj
        .get("data")
        .and_then(Value::as_str)
        .ok_or_else(|| format!("{name}: missing data"))?;
    let bytes = crate::b64::decode(data).map_err(|m| format!("{name}: {m}"))?;
    if bytes.len() != need {
        return Err(format!(
            "{name}: base64 decodes to {} bytes, but the stated shape [{rows}, {layers}, {k}] needs {need}",
            bytes.len()
        ));
    }
    let vals = bytes
        .chunks_exact(size)
        .map(|c| match size {
            1 => c[0] as i8 as i64,
            2 => i16::from_le_bytes([c[0], c[1]]) as i64,
            4 => i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as i64,
            _ => i64::from_le_bytes(crate::exact_bytes(c)),
        })
        .collect();
    Ok((vals, rows, layers, k))
}

/// Imports JSONL of OpenAI-compatible responses.
pub fn import_jsonl(staged: &mut Staged, files: &[PathBuf]) -> Result<()> {
    for file in files {
        for_each_line(file, |line, v| import_response(staged, file, line, &v))?;
    }
    Ok(())
}

fn import_response(staged: &mut Staged, file: &Path, line: usize, v: &Value) -> Result<()> {
    let rec = format!("line {line}");
    let bad = |m: String| ImportError::invalid(file, &rec, m);
    if !v.is_object() {
        return Err(bad("expected a JSON object (one response per line)".into()));
    }
    let base_id = match opt_string(v, "prompt_id").map_err(bad)? {
        Some(s) => s,
        None => opt_string(v, "id")
            .map_err(bad)?
            .ok_or_else(|| bad("missing prompt_id and id".into()))?,
    };
    let category = opt_string(v, "category").map_err(bad)?;
    let usage = v.get("usage").cloned().unwrap_or(Value::Null);
    let prompt_tokens = opt_usize(&usage, "prompt_tokens")
        .map_err(|m| bad(format!("usage.{m}")))?
        .ok_or_else(|| bad("missing usage.prompt_tokens".into()))?;
    let pre = v
        .get("prompt_routed_experts")
        .filter(|x| !x.is_null())
        .ok_or_else(|| {
            bad(
                "no prompt_routed_experts (was vLLM started with --enable-return-routed-experts?)"
                    .into(),
            )
        })?;
    let (prompt_vals, p_rows, layers, k) =
        routing_value(pre, "prompt_routed_experts", None).map_err(bad)?;
    if p_rows != prompt_tokens {
        return Err(bad(format!(
            "wrong shape: prompt_routed_experts has {p_rows} rows, usage.prompt_tokens is {prompt_tokens}"
        )));
    }
    let choices = v
        .get("choices")
        .and_then(Value::as_array)
        .ok_or_else(|| bad("missing choices".into()))?;
    if choices.is_empty() {
        return Err(bad("empty choices".into()));
    }
    let total_completion =
        opt_usize(&usage, "completion_tokens").map_err(|m| bad(format!("usage.{m}")))?;
    for (ci, ch) in choices.iter().enumerate() {
        let crec = format!("line {line}, choice {ci}");
        let cbad = |m: String| ImportError::invalid(file, &crec, m);
        let completion = match ch.get("token_ids").and_then(Value::as_array) {
            Some(ids) => {
                if let (1, Some(c)) = (choices.len(), total_completion) {
                    if c != ids.len() {
                        return Err(cbad(format!(
                            "usage.completion_tokens {c} differs from the choice's {} token_ids",
                            ids.len()
                        )));
                    }
                }
                Some(ids.len())
            }
            None if choices.len() == 1 => total_completion,
            None => None,
        };
        let (gen_vals, g_rows) = match ch.get("routed_experts").filter(|x| !x.is_null()) {
            Some(gen) => {
                let (v, r, _, _) =
                    routing_value(gen, "routed_experts", Some((layers, k))).map_err(cbad)?;
                (v, r)
            }
            // One generated token (or none) has no forwarded generation row.
            None if matches!(completion, Some(0 | 1)) => (Vec::new(), 0),
            None => return Err(cbad("no routed_experts in this choice".into())),
        };
        if let Some(c) = completion {
            if c >= 1 && g_rows != c - 1 {
                return Err(cbad(format!(
                    "wrong shape: routed_experts has {g_rows} rows, expected completion tokens {c} - 1 (the last generated token is never forwarded)"
                )));
            }
        }
        let id = if choices.len() == 1 {
            base_id.clone()
        } else {
            let idx = opt_usize(ch, "index").map_err(cbad)?.unwrap_or(ci);
            format!("{base_id}/{idx}")
        };
        // Token ids, when the response carries both prompt_token_ids and the choice's token_ids.
        let token_ids = match (
            v.get("prompt_token_ids").and_then(Value::as_array),
            ch.get("token_ids").and_then(Value::as_array),
        ) {
            (Some(p), Some(c)) if p.len() == prompt_tokens && c.len() == g_rows + 1 => Some(
                p.iter()
                    .chain(&c[..g_rows])
                    .map(|x| x.as_u64().and_then(|n| u32::try_from(n).ok()))
                    .collect::<Option<Vec<u32>>>()
                    .ok_or_else(|| cbad("token ids must be integers in 0..2^32".into()))?,
            ),
            _ => None,
        };
        let mut rows = prompt_vals.clone();
        rows.extend_from_slice(&gen_vals);
        staged.write_sequence(
            file,
            &crec,
            &Sequence {
                prompt_id: id,
                category: category.clone(),
                prompt_tokens,
                rows: &rows,
                n_rows: p_rows + g_rows,
                layers,
                k,
                token_ids,
                weights: None,
            },
        )?;
    }
    Ok(())
}
