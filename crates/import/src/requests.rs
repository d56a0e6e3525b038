//! The requests file of array imports (`--requests FILE`): one JSON object per line,
//! `{"prompt_id": "...", "prompt_tokens": P, "completion_tokens": C, "category": "..."}`
//! (`id` is accepted for `prompt_id`; `completion_tokens` and `category` are optional). It says
//! where each request's prompt ends, which the arrays themselves do not record.

use std::collections::HashMap;
use std::path::Path;

use crate::jsonl::{for_each_line, opt_string, opt_usize};
use crate::{ImportError, Result};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestInfo {
    pub prompt_tokens: usize,
    pub completion_tokens: Option<usize>,
    pub category: Option<String>,
    /// Line of the requests file (for messages).
    pub line: usize,
}

pub fn read_requests(path: &Path) -> Result<HashMap<String, RequestInfo>> {
    let mut out = HashMap::new();
    for_each_line(path, |line, v| {
        let rec = format!("line {line}");
        let bad = |m: String| ImportError::invalid(path, &rec, m);
        if !v.is_object() {
            return Err(bad("expected a JSON object".into()));
        }
        let id = match opt_string(&v, "prompt_id").map_err(bad)? {
            Some(s) => s,
            None => opt_string(&v, "id")
                .map_err(bad)?
                .ok_or_else(|| bad("missing prompt_id".into()))?,
        };
        let prompt_tokens = opt_usize(&v, "prompt_tokens")
            .map_err(bad)?
            .ok_or_else(|| bad("missing prompt_tokens".into()))?;
        let info = RequestInfo {
            prompt_tokens,
            completion_tokens: opt_usize(&v, "completion_tokens").map_err(bad)?,
            category: opt_string(&v, "category").map_err(bad)?,
            line,
        };
        if out.insert(id.clone(), info).is_some() {
            return Err(bad(format!("duplicate prompt_id {id:?}")));
        }
        Ok(())
    })?;
    Ok(out)
}
