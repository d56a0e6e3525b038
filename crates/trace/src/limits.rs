//! Plain limits on sizes that come from input files and flags (`docs/trace-format.md`,
//! "Limits"). Every size taken from a trace, a manifest or a flag is checked against these before
//! anything is allocated from it, with checked arithmetic for every product.

/// Largest number of MoE layers L (and layer index + 1) accepted.
pub const MAX_LAYERS: usize = 1 << 12;
/// Largest number of experts per layer E (and expert index + 1) accepted.
pub const MAX_EXPERTS: usize = 1 << 12;
/// Largest L·E (the length of one prompt's counts / signature) accepted.
pub const MAX_LAYER_EXPERTS: usize = 1 << 20;
/// Largest token position + 1 accepted (the duplicate detector is a bitset over positions).
pub const MAX_POSITIONS: usize = 1 << 20;
/// Longest trace line accepted (256 MiB, far above the longest counts line, L·E = 2^20 counts
/// and weighted counts): a compressed file that expands to one endless line is refused instead
/// of being buffered whole.
pub const MAX_LINE_BYTES: usize = 1 << 28;
/// Largest number of count cells (prompts × (L·E + L)) held in memory at once by
/// [`crate::aggregate_paths`] (and by `moe-xray-health` when it keeps per-prompt counts):
/// 2^28 cells, 2 GiB of f64. Counts-mode files streamed with
/// [`crate::for_each_prompt_counts`] hold one prompt at a time and are not limited by it.
pub const MAX_TABLE_CELLS: usize = 1 << 28;

/// Checks dimensions against the limits and returns L·E. `top_k`, when given, must be between 1
/// and E. The message names the offending field (the caller adds the file).
pub fn check_dims(
    num_layers: usize,
    num_experts: usize,
    top_k: Option<usize>,
) -> std::result::Result<usize, String> {
    if num_layers == 0 {
        return Err("num_layers must be at least 1".into());
    }
    if num_experts == 0 {
        return Err("num_experts must be at least 1".into());
    }
    if num_layers > MAX_LAYERS {
        return Err(format!(
            "num_layers = {num_layers} exceeds the supported maximum {MAX_LAYERS}"
        ));
    }
    if num_experts > MAX_EXPERTS {
        return Err(format!(
            "num_experts = {num_experts} exceeds the supported maximum {MAX_EXPERTS}"
        ));
    }
    let cells = num_layers
        .checked_mul(num_experts)
        .filter(|&c| c <= MAX_LAYER_EXPERTS)
        .ok_or_else(|| {
            format!(
                "num_layers × num_experts = {num_layers} × {num_experts} exceeds the supported maximum {MAX_LAYER_EXPERTS}"
            )
        })?;
    if let Some(k) = top_k {
        if k == 0 || k > num_experts {
            return Err(format!(
                "top_k = {k} must be between 1 and num_experts = {num_experts}"
            ));
        }
    }
    Ok(cells)
}

/// Checks that `prompts` prompts of `cells` counts (plus `layers` token totals) each fit in
/// [`MAX_TABLE_CELLS`].
pub fn check_table(prompts: usize, cells: usize, layers: usize) -> std::result::Result<(), String> {
    let total = cells
        .checked_add(layers)
        .and_then(|per| per.checked_mul(prompts));
    match total {
        Some(t) if t <= MAX_TABLE_CELLS => Ok(()),
        _ => Err(format!(
            "{prompts} prompts × {cells} counts (num_layers × num_experts) exceed the {MAX_TABLE_CELLS} counts held in memory at once (use counts-mode traces, which are streamed, or fewer prompts per file set)"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dims_limits_and_overflow() {
        assert_eq!(check_dims(16, 64, Some(8)), Ok(1024));
        assert_eq!(check_dims(MAX_LAYERS, 256, None), Ok(MAX_LAYER_EXPERTS));
        for (l, e, k, needle) in [
            (0, 4, None, "num_layers must be at least 1"),
            (4, 0, None, "num_experts must be at least 1"),
            (1 << 40, 4, None, "num_layers = 1099511627776 exceeds"),
            (
                4,
                usize::MAX,
                None,
                "num_experts = 18446744073709551615 exceeds",
            ),
            (MAX_LAYERS, MAX_EXPERTS, None, "num_layers × num_experts"),
            (2, 4, Some(5), "top_k = 5"),
            (2, 4, Some(0), "top_k = 0"),
        ] {
            let msg = check_dims(l, e, k).unwrap_err();
            assert!(msg.contains(needle), "{l} {e} {k:?}: {msg}");
        }
    }

    #[test]
    fn table_limit_uses_checked_arithmetic() {
        assert!(check_table(1000, 1024, 16).is_ok());
        assert!(check_table(usize::MAX, 2, 1).is_err());
        assert!(check_table(2, usize::MAX, 1).is_err());
        assert!(check_table(MAX_TABLE_CELLS, 1, 0).is_ok());
        assert!(check_table(MAX_TABLE_CELLS, 1, 1).is_err());
    }
}
