//! The token data of the confound controls (`lexical_baseline`, `token_matched`; definitions in
//! docs/statistics.md, "Confound controls"): the trace files are read again, once for the token
//! bags (and the residual sums of `--token-matched residual`), and a second time for
//! `--token-matched shared` once the shared token ids are known. The per-record work is
//! `moe_xray_stats::lexical`.

use std::path::PathBuf;

use moe_xray_stats::input::{empty_layer, PromptRow};
use moe_xray_stats::lexical::{shared_token_ids, PassShape, SharedPass, TokenInput, TokenPass};
use moe_xray_stats::results::TokenMatchMode;
use moe_xray_trace::{TokenType, TraceItem, TraceReader};

use crate::error::Result;

/// Feeds every item of `traces` to `push` until `stop` says so.
fn each_item(
    traces: &[PathBuf],
    mut push: impl FnMut(&TraceItem),
    stop: impl Fn() -> bool,
) -> Result<()> {
    for path in traces {
        for item in TraceReader::open(path)? {
            let (_, item) = item?;
            push(&item);
            if stop() {
                return Ok(());
            }
        }
    }
    Ok(())
}

/// The token input of the analysed prompts among `rows` (the exact path's buffered rows: the
/// prompts that `analyze` keeps — every layer non-empty, a category). `layers`: decoder index of
/// each signature row.
#[allow(clippy::too_many_arguments)]
pub fn token_input(
    traces: &[PathBuf],
    token_types: &[TokenType],
    weighted: bool,
    layers: &[u32],
    num_experts: usize,
    rows: &[PromptRow],
    mode: Option<TokenMatchMode>,
) -> Result<TokenInput> {
    let nl = layers.len();
    let kept: Vec<&PromptRow> = rows
        .iter()
        .filter(|r| {
            r.counts.len() == nl * num_experts
                && empty_layer(&r.counts, nl, num_experts).is_none()
                && r.category.as_deref().is_some_and(|c| !c.is_empty())
        })
        .collect();
    let ids: Vec<String> = kept.iter().map(|r| r.prompt_id.clone()).collect();
    let cats: Vec<String> = kept
        .iter()
        .map(|r| r.category.clone().unwrap_or_default())
        .collect();
    let shape = PassShape::new(layers, num_experts, token_types, weighted, &ids);
    let mut pass = TokenPass::new(shape.clone(), mode == Some(TokenMatchMode::Residual));
    {
        let cell = std::cell::RefCell::new(&mut pass);
        each_item(
            traces,
            |item| cell.borrow_mut().push(item),
            || cell.borrow().failed(),
        )?;
    }
    let (bags, residual) = pass.finish();
    let matched = match mode {
        None => None,
        Some(TokenMatchMode::Residual) => residual,
        Some(TokenMatchMode::Shared) => Some(match &bags {
            Err(e) => Err(e.clone()),
            Ok(b) => {
                let shared = shared_token_ids(b, &ids, &cats);
                if shared.is_empty() {
                    Err("no token id occurs in every category".to_string())
                } else {
                    let mut p2 = SharedPass::new(shape, shared);
                    each_item(traces, |item| p2.push(item), || false)?;
                    p2.finish()
                }
            }
        }),
    };
    Ok(TokenInput { bags, matched })
}
