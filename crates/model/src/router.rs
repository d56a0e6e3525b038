//! Routers: from one token's router logits and scores to its experts and their coefficients,
//! exactly as each family's transformers router does (ties go to the lower expert index, as
//! `torch.topk` on the CPU does).

use crate::config::RouterKind;

/// One token's routing.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenRoute {
    /// Chosen experts, in descending order of the quantity the family ranks them by.
    pub experts: Vec<u32>,
    /// The coefficient applied to each chosen expert's output.
    pub applied: Vec<f32>,
    /// What the trace records as `weights` (the applied coefficients, except OLMoE's
    /// full-softmax probabilities).
    pub recorded: Vec<f32>,
}

/// Settings of a router that do not depend on the token.
#[derive(Debug, Clone, Copy)]
pub struct RouterParams<'a> {
    pub kind: RouterKind,
    pub top_k: usize,
    pub norm_topk_prob: bool,
    /// OLMoE: record full-softmax probabilities rather than the applied coefficients.
    pub record_probabilities: bool,
    /// DeepSeek-V3's `e_score_correction_bias` (f32), added to the scores for the choice only.
    pub score_bias: Option<&'a [f32]>,
}

/// Experts masked out of the router, per decoder layer (causal ablation, `moe-xray ablate`):
/// `layer(l)[e]` = expert `e` of decoder layer `l` cannot be chosen. Layers without an entry
/// route as usual.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RouterMask {
    layers: Vec<Option<Vec<bool>>>,
}

impl RouterMask {
    /// No expert masked.
    pub fn new() -> Self {
        RouterMask::default()
    }

    /// Masks `experts` of decoder layer `layer` (a router of `num_experts` experts), in addition
    /// to those already masked there. Errors on an expert index out of range.
    pub fn mask_experts(
        &mut self,
        layer: usize,
        num_experts: usize,
        experts: &[u32],
    ) -> std::result::Result<(), String> {
        if layer >= crate::limits::MAX_LAYERS {
            return Err(format!("expert mask: layer {layer} is out of range"));
        }
        if self.layers.len() <= layer {
            self.layers.resize(layer + 1, None);
        }
        let row = self.layers[layer].get_or_insert_with(|| vec![false; num_experts]);
        if row.len() != num_experts {
            return Err(format!(
                "expert mask of layer {layer}: {} experts given before, {num_experts} now",
                row.len()
            ));
        }
        for &e in experts {
            match row.get_mut(e as usize) {
                Some(m) => *m = true,
                None => {
                    return Err(format!(
                    "expert mask of layer {layer}: expert {e} is out of range (0..{num_experts})"
                ))
                }
            }
        }
        Ok(())
    }

    /// The mask of decoder layer `l` (`None`: nothing masked there).
    pub fn layer(&self, l: usize) -> Option<&[bool]> {
        self.layers.get(l).and_then(|m| m.as_deref())
    }

    /// Decoder layers with a mask, ascending.
    pub fn layers(&self) -> impl Iterator<Item = (usize, &[bool])> + '_ {
        self.layers
            .iter()
            .enumerate()
            .filter_map(|(l, m)| m.as_deref().map(|m| (l, m)))
    }

    /// Number of masked (layer, expert) pairs.
    pub fn masked_count(&self) -> usize {
        self.layers()
            .map(|(_, m)| m.iter().filter(|&&x| x).count())
            .sum()
    }
}

/// Indices of the `k` largest values (descending, ties to the lower index).
pub fn top_k_indices(values: &[f32], k: usize, order: &mut Vec<u32>) -> Vec<u32> {
    order.clear();
    order.extend(0..values.len() as u32);
    order.sort_by(|&a, &b| {
        values[b as usize]
            .total_cmp(&values[a as usize])
            .then(a.cmp(&b))
    });
    order[..k.min(order.len())].to_vec()
}

/// Softmax of a few values in f32 (max subtracted first, as torch does).
fn softmax_small(x: &[f32]) -> Vec<f32> {
    let m = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let e: Vec<f32> = x.iter().map(|&v| (v - m).exp()).collect();
    let s: f32 = e.iter().sum();
    e.iter().map(|&v| v / s).collect()
}

/// Experts allowed by group-limited selection: the `topk_group` groups with the best group
/// score (`group_score` of each group's values), all other experts' values replaced by `fill`
/// (transformers' `masked_fill(~mask, fill)`: 0 in DeepSeek-V2, -inf in V3).
fn mask_groups(
    choice: &[f32],
    n_group: usize,
    topk_group: usize,
    group_score: impl Fn(&[f32]) -> f32,
    fill: f32,
    order: &mut Vec<u32>,
) -> Vec<f32> {
    let per = choice.len() / n_group.max(1);
    let scores: Vec<f32> = choice.chunks(per.max(1)).map(&group_score).collect();
    let groups = top_k_indices(&scores, topk_group, order);
    let mut masked = vec![fill; choice.len()];
    for g in groups {
        let g = g as usize;
        masked[g * per..(g + 1) * per].copy_from_slice(&choice[g * per..(g + 1) * per]);
    }
    masked
}

/// Indices of the `k` largest values (descending, ties to the lower index), never a masked one
/// before an unmasked one: masked indices (`mask[i]`) rank after every unmasked index whatever
/// their value, so a masked expert is chosen only if fewer than `k` experts are unmasked (which
/// [`check_mask`] refuses).
fn top_k_unmasked(
    values: &[f32],
    k: usize,
    mask: Option<&[bool]>,
    order: &mut Vec<u32>,
) -> Vec<u32> {
    let Some(mask) = mask else {
        return top_k_indices(values, k, order);
    };
    let masked = |i: u32| mask.get(i as usize).copied().unwrap_or(false);
    order.clear();
    order.extend(0..values.len() as u32);
    order.sort_by(|&a, &b| {
        masked(a)
            .cmp(&masked(b))
            .then(values[b as usize].total_cmp(&values[a as usize]))
            .then(a.cmp(&b))
    });
    order[..k.min(order.len())].to_vec()
}

/// Checks an expert mask of one MoE layer (`true` = masked) against the router: one entry per
/// expert and at least `top_k` experts left unmasked, so that a masked expert is never chosen.
pub fn check_mask(
    mask: &[bool],
    num_experts: usize,
    top_k: usize,
) -> std::result::Result<(), String> {
    if mask.len() != num_experts {
        return Err(format!(
            "expert mask has {} entries, the router has {num_experts} experts",
            mask.len()
        ));
    }
    let free = mask.iter().filter(|&&m| !m).count();
    if free < top_k {
        return Err(format!(
            "expert mask leaves {free} of {num_experts} experts unmasked, fewer than top_k = {top_k}"
        ));
    }
    Ok(())
}

/// Routes one token. `logits` are its router logits (f32, router bias included); `scores` the
/// family's full score vector (softmax or sigmoid of the logits, computed by the caller).
pub fn route(
    p: &RouterParams<'_>,
    logits: &[f32],
    scores: &[f32],
    order: &mut Vec<u32>,
) -> TokenRoute {
    route_masked(p, logits, scores, None, order)
}

/// [`route`] with some experts masked out (`mask[e]` = expert `e` cannot be chosen; checked by
/// [`check_mask`]). The caller sets the masked experts' router logits to `-inf` *before* computing
/// `scores`, as a router hook in transformers does, so the family's own rule selects and weights
/// the remaining experts: softmax-then-top-k renormalises the softmax over the unmasked experts,
/// top-k-then-softmax never ranks a `-inf` logit, sigmoid scores of masked experts are 0. On top
/// of that every selection below ranks masked experts after all unmasked ones, so a masked
/// expert is never chosen even where the family's rule would rank a 0 or `-inf` value among the
/// top k (DeepSeek-V3's correction bias is added to a masked expert's score 0; DeepSeek-V2's
/// group mask fills other groups with 0). DeepSeek-V3's group scores (sum of the two best choice
/// values) count masked experts as `-inf`.
pub fn route_masked(
    p: &RouterParams<'_>,
    logits: &[f32],
    scores: &[f32],
    mask: Option<&[bool]>,
    order: &mut Vec<u32>,
) -> TokenRoute {
    let k = p.top_k;
    match p.kind {
        RouterKind::SoftmaxTopK => {
            let experts = top_k_unmasked(scores, k, mask, order);
            let probs: Vec<f32> = experts.iter().map(|&x| scores[x as usize]).collect();
            let applied = if p.norm_topk_prob {
                let sum: f32 = probs.iter().sum();
                probs.iter().map(|&w| w / sum).collect()
            } else {
                probs.clone()
            };
            let recorded = if p.record_probabilities {
                probs
            } else {
                applied.clone()
            };
            TokenRoute {
                experts,
                applied,
                recorded,
            }
        }
        RouterKind::TopKSoftmax => {
            let experts = top_k_unmasked(logits, k, mask, order);
            let top: Vec<f32> = experts.iter().map(|&x| logits[x as usize]).collect();
            let applied = softmax_small(&top);
            TokenRoute {
                experts,
                recorded: applied.clone(),
                applied,
            }
        }
        RouterKind::DeepseekV2 {
            group_limited,
            n_group,
            topk_group,
            routed_scaling_factor,
        } => {
            let choice = if group_limited {
                mask_groups(
                    scores,
                    n_group,
                    topk_group,
                    |g| g.iter().copied().fold(f32::NEG_INFINITY, f32::max),
                    0.0,
                    order,
                )
            } else {
                scores.to_vec()
            };
            let experts = top_k_unmasked(&choice, k, mask, order);
            let applied: Vec<f32> = experts
                .iter()
                .map(|&x| choice[x as usize] * routed_scaling_factor as f32)
                .collect();
            TokenRoute {
                experts,
                recorded: applied.clone(),
                applied,
            }
        }
        RouterKind::DeepseekV3 {
            n_group,
            topk_group,
            routed_scaling_factor,
        } => {
            let mut choice: Vec<f32> = match p.score_bias {
                Some(b) => scores.iter().zip(b).map(|(&s, &b)| s + b).collect(),
                None => scores.to_vec(),
            };
            if let Some(m) = mask {
                for (c, &m) in choice.iter_mut().zip(m) {
                    if m {
                        *c = f32::NEG_INFINITY;
                    }
                }
            }
            let top2 = |g: &[f32]| {
                let (mut a, mut b) = (f32::NEG_INFINITY, f32::NEG_INFINITY);
                for &v in g {
                    if v > a {
                        b = a;
                        a = v;
                    } else if v > b {
                        b = v;
                    }
                }
                a + b
            };
            let masked = mask_groups(&choice, n_group, topk_group, top2, f32::NEG_INFINITY, order);
            let experts = top_k_unmasked(&masked, k, mask, order);
            let mut w: Vec<f32> = experts.iter().map(|&x| scores[x as usize]).collect();
            if p.norm_topk_prob {
                let den: f32 = w.iter().sum::<f32>() + 1e-20;
                w.iter_mut().for_each(|v| *v /= den);
            }
            w.iter_mut()
                .for_each(|v| *v *= routed_scaling_factor as f32);
            TokenRoute {
                experts,
                recorded: w.clone(),
                applied: w,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(kind: RouterKind, k: usize) -> RouterParams<'static> {
        RouterParams {
            kind,
            top_k: k,
            norm_topk_prob: false,
            record_probabilities: false,
            score_bias: None,
        }
    }

    fn mask(n: usize, masked: &[usize]) -> Vec<bool> {
        let mut m = vec![false; n];
        masked.iter().for_each(|&i| m[i] = true);
        m
    }

    /// Softmax of the logits with the masked ones at -inf, as the model computes the scores.
    fn masked_softmax(logits: &[f32], m: &[bool]) -> Vec<f32> {
        let x: Vec<f32> = logits
            .iter()
            .zip(m)
            .map(|(&v, &m)| if m { f32::NEG_INFINITY } else { v })
            .collect();
        softmax_small(&x)
    }

    #[test]
    fn softmax_topk_mask_renormalises_over_the_unmasked() {
        let mut o = Vec::new();
        let logits = [2.0f32, 1.0, 0.5, 0.0];
        let m = mask(4, &[0]);
        let scores = masked_softmax(&logits, &m);
        assert_eq!(scores[0], 0.0);
        let mut p = params(RouterKind::SoftmaxTopK, 2);
        p.record_probabilities = true;
        let r = route_masked(&p, &logits, &scores, Some(&m), &mut o);
        assert_eq!(r.experts, vec![1, 2]);
        // softmax over experts 1..4 only
        let z = 1.0f32.exp() + 0.5f32.exp() + 1.0;
        assert!((r.recorded[0] - 1.0f32.exp() / z).abs() < 1e-6);
        let unmasked = route(&p, &logits, &softmax_small(&logits), &mut o);
        assert_eq!(unmasked.experts, vec![0, 1]);
    }

    #[test]
    fn topk_softmax_mask_skips_masked_logits() {
        let mut o = Vec::new();
        let m = mask(4, &[1, 3]);
        let logits = [0.0f32, f32::NEG_INFINITY, 1.0, f32::NEG_INFINITY];
        let r = route_masked(
            &params(RouterKind::TopKSoftmax, 2),
            &logits,
            &[],
            Some(&m),
            &mut o,
        );
        assert_eq!(r.experts, vec![2, 0]);
        let e = 1.0f32.exp();
        assert!((r.applied[0] - e / (e + 1.0)).abs() < 1e-6);
    }

    #[test]
    fn masked_expert_is_never_chosen_by_any_router() {
        // Every kind, every single masked expert, scores where the masked one would win.
        let kinds = [
            RouterKind::SoftmaxTopK,
            RouterKind::TopKSoftmax,
            RouterKind::DeepseekV2 {
                group_limited: false,
                n_group: 1,
                topk_group: 1,
                routed_scaling_factor: 1.0,
            },
            RouterKind::DeepseekV2 {
                group_limited: true,
                n_group: 4,
                topk_group: 1,
                routed_scaling_factor: 1.0,
            },
            RouterKind::DeepseekV3 {
                n_group: 4,
                topk_group: 2,
                routed_scaling_factor: 2.5,
            },
        ];
        let mut o = Vec::new();
        let bias = [0.9f32, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.8];
        for kind in kinds {
            for masked in 0..8usize {
                for k in [1usize, 2, 4] {
                    let logits: Vec<f32> = (0..8)
                        .map(|e| {
                            if e == masked {
                                f32::NEG_INFINITY
                            } else {
                                (e as f32 * 0.37).sin()
                            }
                        })
                        .collect();
                    let m = mask(8, &[masked]);
                    let scores: Vec<f32> = match kind {
                        RouterKind::DeepseekV3 { .. } => {
                            logits.iter().map(|&x| 1.0 / (1.0 + (-x).exp())).collect()
                        }
                        _ => masked_softmax(&logits, &m),
                    };
                    let mut p = params(kind, k);
                    if matches!(kind, RouterKind::DeepseekV3 { .. }) {
                        p.score_bias = Some(&bias);
                    }
                    let r = route_masked(&p, &logits, &scores, Some(&m), &mut o);
                    assert_eq!(r.experts.len(), k, "{kind:?}");
                    assert!(
                        !r.experts.contains(&(masked as u32)),
                        "{kind:?} k={k} masked={masked}: {:?}",
                        r.experts
                    );
                    assert!(r.applied.iter().all(|w| w.is_finite()), "{kind:?}");
                }
            }
        }
    }

    #[test]
    fn mask_checks_and_router_mask_bookkeeping() {
        assert!(check_mask(&mask(4, &[0, 1]), 4, 2).is_ok());
        assert!(check_mask(&mask(4, &[0, 1, 2]), 4, 2).is_err());
        assert!(check_mask(&mask(3, &[]), 4, 2).is_err());
        let mut rm = RouterMask::new();
        rm.mask_experts(2, 4, &[1, 3]).unwrap();
        rm.mask_experts(2, 4, &[1]).unwrap();
        assert!(rm.mask_experts(2, 5, &[0]).is_err());
        assert!(rm.mask_experts(0, 4, &[4]).is_err());
        assert_eq!(rm.layer(2), Some(&[false, true, false, true][..]));
        assert_eq!(rm.layer(1), None);
        assert_eq!(rm.masked_count(), 2);
    }

    #[test]
    fn ties_go_to_the_lower_index() {
        let mut o = Vec::new();
        assert_eq!(top_k_indices(&[0.5, 0.7, 0.7, 0.1], 2, &mut o), vec![1, 2]);
    }

    #[test]
    fn topk_softmax_normalises_over_the_chosen() {
        let mut o = Vec::new();
        let r = route(
            &params(RouterKind::TopKSoftmax, 2),
            &[0.0, 2.0, 1.0, 2.0f32.ln() + 1.0],
            &[],
            &mut o,
        );
        assert_eq!(r.experts, vec![1, 3]);
        assert!((r.applied[0] + r.applied[1] - 1.0).abs() < 1e-6);
    }

    #[test]
    fn v3_bias_changes_the_choice_but_not_the_weights() {
        let mut o = Vec::new();
        let bias = [0.0f32, 0.0, 0.9, 0.0];
        let kind = RouterKind::DeepseekV3 {
            n_group: 2,
            topk_group: 2,
            routed_scaling_factor: 2.0,
        };
        let mut p = params(kind, 1);
        p.score_bias = Some(&bias);
        let r = route(&p, &[], &[0.6, 0.5, 0.2, 0.1], &mut o);
        assert_eq!(r.experts, vec![2]);
        assert!((r.applied[0] - 0.2 * 2.0).abs() < 1e-6);
    }

    #[test]
    fn group_limited_masks_other_groups() {
        let mut o = Vec::new();
        // Groups {0,1} (best 0.3) and {2,3} (best 0.4): only group 1 is kept.
        let kind = RouterKind::DeepseekV2 {
            group_limited: true,
            n_group: 2,
            topk_group: 1,
            routed_scaling_factor: 1.0,
        };
        let r = route(&params(kind, 2), &[], &[0.3, 0.29, 0.4, 0.01], &mut o);
        assert_eq!(r.experts, vec![2, 3]);
    }
}
