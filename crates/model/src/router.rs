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

/// Routes one token. `logits` are its router logits (f32, router bias included); `scores` the
/// family's full score vector (softmax or sigmoid of the logits, computed by the caller).
pub fn route(
    p: &RouterParams<'_>,
    logits: &[f32],
    scores: &[f32],
    order: &mut Vec<u32>,
) -> TokenRoute {
    let k = p.top_k;
    match p.kind {
        RouterKind::SoftmaxTopK => {
            let experts = top_k_indices(scores, k, order);
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
            let experts = top_k_indices(logits, k, order);
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
            let experts = top_k_indices(&choice, k, order);
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
            let choice: Vec<f32> = match p.score_bias {
                Some(b) => scores.iter().zip(b).map(|(&s, &b)| s + b).collect(),
                None => scores.to_vec(),
            };
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
            let experts = top_k_indices(&masked, k, order);
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
