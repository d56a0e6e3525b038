//! `report.html`: one self-contained page (inline SVG and CSS, no scripts, no network).

use std::fmt::Write as _;

use serde_json::Value;

use crate::figures::render_figures;
use crate::results::TokenMatchMode;
use crate::results::{BaselineStats, Results, Section, SyntheticKind};
use crate::svg::{esc, num};
use crate::{Figure, ReportInput};

const CSS: &str = r#"
:root { color-scheme: light; }
* { box-sizing: border-box; }
body { margin: 0; background: #f4f4f2; color: #1d1d1d;
  font: 15px/1.5 "DejaVu Sans", Helvetica, Arial, sans-serif; }
main { max-width: 1000px; margin: 0 auto; padding: 24px 28px 48px; background: #ffffff; }
h1 { font-size: 26px; margin: 0 0 4px; }
h2 { font-size: 20px; margin: 36px 0 10px; padding-bottom: 4px; border-bottom: 2px solid #e2e2e2; }
h3 { font-size: 16px; margin: 20px 0 6px; }
.sub { color: #444; margin: 0 0 12px; }
nav ol { columns: 2; margin: 8px 0 0; padding-left: 22px; font-size: 14px; }
a { color: #0061a0; }
table { border-collapse: collapse; width: 100%; margin: 8px 0 12px; font-size: 14px; }
th, td { border: 1px solid #d9d9d9; padding: 5px 8px; text-align: left; vertical-align: top; }
th { background: #f0f0ee; }
tbody tr:nth-child(even) td { background: #fafaf8; }
td.num { font-variant-numeric: tabular-nums; white-space: nowrap; }
td.def { color: #444; font-size: 13px; }
.headline th { width: 19%; }
.headline td.num { white-space: normal; width: 41%; }
.headline tr.group th { background: #e9eff4; color: #0b3d5c; font-size: 14px;
  border-top: 2px solid #0072B2; }
.interpretation { border: 3px solid #0072B2; background: #eef6fb; border-radius: 6px;
  padding: 12px 18px; margin: 18px 0; }
.interpretation.synthetic { border-color: #D55E00; background: #fff3ec; }
.interpretation.control { border-color: #009E73; background: #ecf8f3; }
.interpretation h2 { border: none; margin: 0 0 6px; padding: 0; }
.interpretation .verdict { font-size: 17px; font-weight: bold; }
figure { margin: 22px 0 30px; padding: 0; }
figure svg { display: block; max-width: 100%; height: auto; margin: 0 auto;
  border: 1px solid #e4e4e4; }
figcaption { max-width: 760px; margin: 8px auto 0; font-size: 14px; color: #333; }
figcaption strong { color: #111; }
.unavailable { color: #8a3b00; }
pre { background: #f5f5f3; border: 1px solid #dddddd; padding: 10px 12px; overflow-x: auto;
  font-size: 13px; white-space: pre-wrap; word-break: break-word; }
td pre { margin: 0; padding: 4px 6px; background: transparent; border: none; font-size: 13px;
  max-height: 14em; overflow-y: auto; }
.prompts td:first-child { white-space: nowrap; font-family: "DejaVu Sans Mono", monospace;
  font-size: 12px; }
.muted { color: #666; }
footer { margin-top: 40px; font-size: 12px; color: #666; }
@media print { body { background: #fff; } main { max-width: none; } }
"#;

fn p_fmt(p: Option<f64>) -> String {
    match p {
        Some(p) => num(p, 4),
        None => "n/a".into(),
    }
}

fn pm(mean: f64, sd: f64, dec: usize) -> String {
    format!("{} ± {}", num(mean, dec), num(sd, dec))
}

fn json_scalar(v: &Value) -> String {
    match v {
        Value::Null => "null".into(),
        Value::Bool(b) => b.to_string(),
        // non-integers rounded like every number a reader sees (full precision: results.json)
        Value::Number(n) => match n.as_f64() {
            Some(x) if !n.is_i64() && !n.is_u64() => crate::svg::short(x),
            _ => n.to_string(),
        },
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Flattens JSON into (dotted key, value) rows; long scalar arrays are abbreviated.
fn flatten(prefix: &str, v: &Value, out: &mut Vec<(String, String)>) {
    if out.len() >= 400 {
        return;
    }
    match v {
        Value::Object(m) => {
            if m.is_empty() && !prefix.is_empty() {
                out.push((prefix.to_string(), "{}".into()));
            }
            for (k, x) in m {
                let key = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                flatten(&key, x, out);
            }
        }
        Value::Array(a) if a.iter().all(|x| !x.is_object() && !x.is_array()) => {
            let shown: Vec<String> = a.iter().take(16).map(json_scalar).collect();
            let mut s = format!("[{}", shown.join(", "));
            if a.len() > 16 {
                let _ = write!(s, ", … ({} values)", a.len());
            }
            s.push(']');
            out.push((prefix.to_string(), s));
        }
        Value::Array(a) => {
            for (i, x) in a.iter().enumerate().take(50) {
                flatten(&format!("{prefix}[{i}]"), x, out);
            }
            if a.len() > 50 {
                out.push((prefix.to_string(), format!("… ({} entries)", a.len())));
            }
        }
        other => out.push((prefix.to_string(), json_scalar(other))),
    }
}

fn kv_table(class: &str, v: &Value) -> String {
    let mut rows = Vec::new();
    flatten("", v, &mut rows);
    if rows.is_empty() {
        return r#"<p class="muted">(none recorded)</p>"#.into();
    }
    let mut s = format!(
        r#"<table class="{class}"><thead><tr><th>field</th><th>value</th></tr></thead><tbody>"#
    );
    for (k, val) in rows {
        let _ = write!(s, "<tr><td>{}</td><td>{}</td></tr>", esc(&k), esc(&val));
    }
    s.push_str("</tbody></table>");
    s
}

fn model_name(input: &ReportInput) -> String {
    input
        .manifest()
        .get("model")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .unwrap_or("unknown model")
        .to_string()
}

fn baseline_row(s: &mut String, name: &str, b: &Section<BaselineStats>, def: &str) {
    let val = match b.done() {
        Some(b) => format!(
            "{} (spread of the mean over reps: {}; {} reps, seed {})",
            pm(b.mean, b.pair_std, 3),
            num(b.std, 4),
            b.reps,
            b.seed
        ),
        None => b.why_missing().unwrap_or_default(),
    };
    row(s, name, &val, def);
}

pub(crate) fn row(s: &mut String, name: &str, value: &str, def: &str) {
    let _ = write!(
        s,
        r#"<tr><th scope="row">{}</th><td class="num">{}</td><td class="def">{}</td></tr>"#,
        esc(name),
        esc(value),
        esc(def)
    );
}

fn headline(r: &Results) -> String {
    let sim = &r.similarity;
    let mut s = String::from(
        r#"<table class="headline"><thead><tr><th>quantity</th><th>value</th><th>definition</th></tr></thead><tbody>"#,
    );
    let dropped = if r.dropped_prompts.is_empty() {
        String::new()
    } else {
        format!(", {} dropped", r.dropped_prompts.len())
    };
    row(
        &mut s,
        "Prompts",
        &format!(
            "{} in {} categories{}",
            r.num_prompts,
            r.categories.len(),
            dropped
        ),
        &format!(
            "{} layers{} × {} experts, top-k = {}; categories: {}",
            r.num_layers,
            // with dense layers: which decoder layers the signatures come from
            r.moe_layers
                .as_ref()
                .map(|m| format!(
                    " (MoE layers: decoder layers {})",
                    m.iter()
                        .map(|l| l.to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                ))
                .unwrap_or_default(),
            r.num_experts,
            r.top_k,
            r.categories
                .iter()
                .map(|c| format!("{} ({})", c.name, c.n))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    );
    row(
        &mut s,
        "Within-category similarity",
        &format!(
            "{} ({} pairs)",
            pm(sim.within.mean, sim.within.std, 3),
            sim.within.n
        ),
        "mean ± std (ddof = 1) of sim(i, j) over unordered pairs i < j of the same category; sim = layer-averaged cosine of the per-layer expert-share signatures",
    );
    row(
        &mut s,
        "Across-category similarity",
        &format!(
            "{} ({} pairs)",
            pm(sim.across.mean, sim.across.std, 3),
            sim.across.n
        ),
        "the same over pairs of different categories",
    );
    let reps = r
        .label_permutation_reps()
        .map(|n| format!("{n} label permutations"))
        .unwrap_or_else(|| "label permutations".into());
    row(
        &mut s,
        "Within − across",
        &format!(
            "{} (p = {})",
            num(sim.within.mean - sim.across.mean, 4),
            p_fmt(r.p_within_minus_across())
        ),
        &format!("p = (1 + #{{permuted ≥ observed}}) / (1 + R) over {reps}"),
    );
    let ci = r
        .cohens_d_ci()
        .map(|(a, b)| format!(", 95 % CI [{}, {}]", num(a, 2), num(b, 2)))
        .unwrap_or_else(|| ", 95 % CI n/a".into());
    let boot = r
        .bootstrap_reps()
        .map(|n| format!("{n} stratified bootstrap resamples"))
        .unwrap_or_else(|| "stratified bootstrap".into());
    row(
        &mut s,
        "Cohen's d",
        &format!(
            "{}{} (p = {})",
            num(sim.cohens_d, 3),
            ci,
            p_fmt(r.p_cohens_d())
        ),
        &format!(
            "(mean_within − mean_across) / pooled std (ddof = 1); CI: percentile 2.5–97.5 % over {boot} of prompts within each category; p from the label permutations"
        ),
    );
    baseline_row(
        &mut s,
        "Baseline: load-balance (uniform)",
        &r.baselines.load_balance_uniform,
        "mean similarity over all pairs when every token picks k distinct experts uniformly (observed token counts); ± mean pair std",
    );
    baseline_row(
        &mut s,
        "Baseline: load-balance (marginal)",
        &r.baselines.load_balance_marginal,
        "as above, experts drawn in proportion to the pooled per-layer load",
    );
    baseline_row(
        &mut s,
        "Baseline: permutation",
        &r.baselines.permutation,
        "each prompt's expert counts permuted independently per layer",
    );
    match r.logreg_5fold.done() {
        Some(lr) => {
            let ci = r
                .accuracy_ci()
                .map(|(a, b)| format!(", 95 % CI [{}, {}]", num(a, 3), num(b, 3)))
                .unwrap_or_default();
            let cp = r
                .classifier_permutation_reps()
                .map(|n| format!("{n} label permutations"))
                .unwrap_or_else(|| "label permutations".into());
            row(
                &mut s,
                "Classifier accuracy",
                &format!(
                    "{}{} (chance {}, p = {})",
                    pm(lr.accuracy_mean, lr.accuracy_std, 3),
                    ci,
                    num(lr.chance, 3),
                    p_fmt(r.p_classifier())
                ),
                &format!(
                    "multinomial logistic regression (L2, C = 1) on standardised signatures, stratified {}-fold CV; mean ± std (ddof = 0) over folds; chance = majority-class rate; CI: bootstrap of the out-of-fold correctness; p over {cp} with the same folds",
                    lr.fold_accuracies.len().max(1)
                ),
            );
            row(
                &mut s,
                "Macro-F1",
                &num(lr.macro_f1_oof, 3),
                "unweighted mean over categories of F1 of the out-of-fold predictions",
            );
        }
        None => row(
            &mut s,
            "Classifier accuracy",
            &r.logreg_5fold.why_missing().unwrap_or_default(),
            "multinomial logistic regression, 5-fold CV",
        ),
    }
    lexical_rows(&mut s, r);
    if let Some(p) = r.pca.done() {
        let ev: Vec<String> = p
            .explained_variance_ratio
            .iter()
            .take(2)
            .map(|v| format!("{} %", num(v * 100.0, 1)))
            .collect();
        row(
            &mut s,
            "PCA explained variance (PC1, PC2)",
            &ev.join(", "),
            "share of total variance of the centred signature matrix",
        );
    }
    if let Some(t) = r.tsne.done() {
        row(
            &mut s,
            "t-SNE",
            &format!(
                "KL = {}, perplexity {}",
                num(t.kl_divergence, 3),
                num(t.perplexity, 2)
            ),
            "exact t-SNE, final Kullback–Leibler divergence",
        );
    }
    s.push_str("</tbody></table>");
    s
}

/// The confound-control rows beside the classifier: the lexical baseline and, when computed,
/// the token-matched similarity.
fn lexical_rows(s: &mut String, r: &Results) {
    match &r.lexical_baseline {
        Some(Section::Done(lx)) => {
            let c = &lx.classifier;
            row(
                s,
                "Lexical baseline accuracy",
                &format!(
                    "{} (chance {}, macro-F1 {}, {} token ids)",
                    pm(c.accuracy_mean, c.accuracy_std, 3),
                    num(c.chance, 3),
                    num(c.macro_f1_oof, 3),
                    lx.vocabulary
                ),
                "the same classifier, folds and standardisation on bag-of-token-id counts of the counted tokens: what token identity alone gives",
            );
        }
        Some(Section::Skipped { skipped }) => row(
            s,
            "Lexical baseline accuracy",
            &format!("skipped: {skipped}"),
            "the classifier on bag-of-token-id counts",
        ),
        None => {}
    }
    match &r.token_matched {
        Some(Section::Done(t)) => row(
            s,
            &format!("Token-matched Cohen's d ({})", t.mode.as_str()),
            &format!(
                "{} (within {}, across {}; {} prompts)",
                num(t.similarity.cohens_d, 3),
                num(t.similarity.within.mean, 3),
                num(t.similarity.across.mean, 3),
                t.num_prompts
            ),
            match t.mode {
                TokenMatchMode::Shared => {
                    "similarity statistics on the tokens whose id occurs in every category only"
                }
                TokenMatchMode::Residual => {
                    "similarity statistics after subtracting each token id's mean routing vector"
                }
            },
        ),
        Some(Section::Skipped { skipped }) => row(
            s,
            "Token-matched Cohen's d",
            &format!("skipped: {skipped}"),
            "similarity statistics on token-matched routing",
        ),
        None => {}
    }
}

/// The interpretation's sentence on the random-router control: the observed d and accuracy
/// against the floor of the same model with its router weights permuted (empty without it).
fn control_sentence(r: &Results) -> String {
    let Some(Section::Done(c)) = &r.random_router_control else {
        return String::new();
    };
    let d = r.similarity.cohens_d;
    let cd = c.similarity.cohens_d;
    let acc = match (r.logreg_5fold.done(), c.classifier.done()) {
        (Some(a), Some(b)) => format!(
            ", accuracy = {} vs {} under a random router (chance {})",
            num(a.accuracy_mean, 3),
            num(b.accuracy_mean, 3),
            num(a.chance, 3)
        ),
        _ => String::new(),
    };
    let verdict = if d.is_finite() && cd.is_finite() && d > cd {
        format!(
            "the learned router adds {} to the separation that token identity and attention give through a structure-free router",
            num(d - cd, 2)
        )
    } else {
        "the learned router does not separate the categories more than a structure-free router does, so the separation may come from token identity and attention alone".to_string()
    };
    format!(
        " Against the random-router control (router weights permuted, seed {}): d = {} vs {} under a random router{acc}; {verdict}.",
        c.seed,
        num(d, 2),
        num(cd, 2)
    )
}

/// The "Random-router control" section (empty without `random_router_control`).
fn control_section(r: &Results) -> String {
    let Some(c) = &r.random_router_control else {
        return String::new();
    };
    let mut s = String::from(
        "<section id=\"random-router-control\"><h2>Random-router control</h2>\n<p>The same model and prompts with every router weight (and router / score-correction bias) replaced by a seeded permutation of its own entries: the same values and scale, no learned structure. What remains of the category separation is the floor that token identity and attention explain (docs/statistics.md, \"Random-router control\").</p>\n",
    );
    match c {
        Section::Skipped { skipped } => {
            let _ = writeln!(s, "<p>Skipped: {}</p>", esc(skipped));
        }
        Section::Done(c) => {
            s.push_str("<table class=\"control\"><thead><tr><th></th><th>this model</th><th>random router</th></tr></thead><tbody>");
            let acc = |x: Option<(f64, f64)>| x.map_or("n/a".to_string(), |(a, sd)| pm(a, sd, 3));
            let rows = [
                (
                    "Cohen's d",
                    num(r.similarity.cohens_d, 3),
                    num(c.similarity.cohens_d, 3),
                ),
                (
                    "within / across similarity",
                    format!(
                        "{} / {}",
                        num(r.similarity.within.mean, 3),
                        num(r.similarity.across.mean, 3)
                    ),
                    format!(
                        "{} / {}",
                        num(c.similarity.within.mean, 3),
                        num(c.similarity.across.mean, 3)
                    ),
                ),
                (
                    "classifier accuracy",
                    acc(r
                        .logreg_5fold
                        .done()
                        .map(|l| (l.accuracy_mean, l.accuracy_std))),
                    acc(c
                        .classifier
                        .done()
                        .map(|l| (l.accuracy_mean, l.accuracy_std))),
                ),
                (
                    "prompts",
                    r.num_prompts.to_string(),
                    c.num_prompts.to_string(),
                ),
            ];
            for (k, a, b) in rows {
                let _ = write!(
                    s,
                    "<tr><th>{}</th><td>{}</td><td>{}</td></tr>",
                    esc(k),
                    esc(&a),
                    esc(&b)
                );
            }
            s.push_str("</tbody></table>\n");
            let _ = writeln!(
                s,
                "<p class=\"muted\">{}</p>",
                esc(&format!(
                    "Method {}, seed {}; the control's own results, figures and report are in {}/.",
                    c.method, c.seed, c.dir
                ))
            );
        }
    }
    s.push_str("</section>\n");
    s
}

/// The "Routing over time" section with its figure (empty without `windows`).
fn windows_section(r: &Results) -> String {
    let Some(w) = &r.windows else {
        return String::new();
    };
    let mut s = String::from("<section id=\"routing-over-time\"><h2>Routing over time</h2>\n");
    if let Section::Done(w) = w {
        let d = |x: &moe_xray_stats::results::WindowStats| {
            x.similarity
                .done()
                .map_or("n/a".to_string(), |s| num(s.cohens_d, 3))
        };
        let a = |x: &moe_xray_stats::results::WindowStats| {
            x.classifier
                .done()
                .map_or("n/a".to_string(), |c| num(c.accuracy_mean, 3))
        };
        let _ = writeln!(
            s,
            "<p>{}</p>",
            esc(&format!(
                "Windows of {} generated tokens (longest generation {} tokens). Prompt phase: d = {}, accuracy {}; generation phase: d = {}, accuracy {}; per-prompt similarity of the prompt-phase and generation-phase signatures {} (mean over {} prompts).",
                w.window_tokens,
                w.max_generated,
                d(&w.prompt_phase),
                a(&w.prompt_phase),
                d(&w.generation_phase),
                a(&w.generation_phase),
                num(w.phase_drift.mean, 3),
                w.phase_drift.num_prompts
            ))
        );
        s.push_str("<table class=\"windows\"><thead><tr><th>generated tokens</th><th>prompts</th><th>Cohen's d</th><th>accuracy</th><th>drift to next window</th></tr></thead><tbody>");
        for (i, x) in w.windows.iter().enumerate() {
            let drift = w.drift.get(i).map_or("".to_string(), |dr| {
                format!("{} ({} prompts)", num(dr.mean, 3), dr.num_prompts)
            });
            let _ = write!(
                s,
                "<tr><td>{}–{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                x.start.unwrap_or(0),
                x.end.unwrap_or(0),
                x.num_prompts,
                d(x),
                a(x),
                esc(&drift)
            );
        }
        s.push_str("</tbody></table>\n");
    }
    if let Some(f) = crate::figures::fig_windows(r) {
        s.push_str(&figure_html(&f));
    }
    s.push_str("</section>\n");
    s
}

/// The dose shown in the report's effect matrix: the largest `n`.
pub(crate) fn ablation_dose(a: &moe_xray_stats::ablation::AblationResults) -> Option<usize> {
    a.doses
        .iter()
        .enumerate()
        .max_by_key(|(i, d)| (d.n, std::cmp::Reverse(*i)))
        .map(|(i, _)| i)
}

/// The "Expert ablation" section: the effect matrix of the largest dose, the dose-response
/// curve and a table of each category's own (diagonal) effect against its largest effect on
/// another category, with bootstrap CIs and permutation p-values.
fn ablation_section(a: &moe_xray_stats::ablation::AblationResults) -> String {
    use crate::ablation::{dose_response, effect_matrix, DOSE_RESPONSE_ID, EFFECT_MATRIX_ID};
    let mut s = String::from("<section id=\"expert-ablation\"><h2>Expert ablation</h2>\n");
    let _ = writeln!(
        s,
        "<p>{}</p>",
        esc(&format!(
            "What is measured: for each category, its n most characteristic experts per MoE layer (largest signature contrast against the other categories{}) are masked in the router, and every prompt is scored teacher-forced on the unablated model's own greedy continuation ({} tokens at most). The effect is the change of next-token NLL (nats per continuation token; unablated mean {}) minus that of {} load-matched random expert sets of the same size (the excess). A category-specific causal role shows as a positive diagonal: masking a category's experts hurts its own prompts more than random experts do, and more than it hurts other categories. CIs: bootstrap over prompts ({} reps); p: one-sided paired sign-flip permutation test of excess > 0 ({} reps); seed {} (docs/statistics.md, \"Causal expert ablation\").",
            if a.settings.budget == "global" { ", global budget of n·L experts" } else { "" },
            a.settings.max_new_tokens,
            num(a.base_nll, 3),
            a.settings.control_draws,
            a.settings.boot_reps,
            a.settings.perm_reps,
            a.settings.seed
        ))
    );
    let nc = a.categories.len();
    if let Some(di) = ablation_dose(a) {
        let d = &a.doses[di];
        if d.cells.len() == nc * nc {
            let ci = |e: &moe_xray_stats::ablation::Estimate| {
                format!(
                    "{} [{}, {}]",
                    num(e.mean, 3),
                    num(e.ci95[0], 3),
                    num(e.ci95[1], 3)
                )
            };
            let _ = writeln!(
                s,
                "<p>{}</p>",
                esc(&format!(
                    "n = {} experts per layer: mean excess ΔNLL {} on the own category (diagonal) vs {} on the other categories (off-diagonal); ΔNLL {} vs {}.",
                    d.n,
                    num(d.diagonal_excess, 3),
                    num(d.off_diagonal_excess, 3),
                    num(d.diagonal_delta_nll, 3),
                    num(d.off_diagonal_delta_nll, 3)
                ))
            );
            s.push_str("<table class=\"ablation\"><thead><tr><th>experts masked of</th><th>own prompts: ΔNLL [95% CI]</th><th>own prompts: excess over random [95% CI]</th><th>p</th><th>largest other-category excess [95% CI]</th><th>p</th></tr></thead><tbody>");
            for (i, cat) in a.categories.iter().enumerate() {
                let row = &d.cells[i * nc..(i + 1) * nc];
                let own = &row[i];
                let other = row
                    .iter()
                    .enumerate()
                    .filter(|(j, _)| *j != i)
                    .map(|(_, c)| c)
                    // the first of equal ones
                    .reduce(|best, c| {
                        if c.excess.mean.total_cmp(&best.excess.mean).is_gt() {
                            c
                        } else {
                            best
                        }
                    });
                let (oc, op) = match other {
                    Some(o) => (
                        format!("{}: {}", o.evaluated, ci(&o.excess)),
                        num(o.p_excess, 3),
                    ),
                    None => ("n/a".to_string(), "n/a".to_string()),
                };
                let _ = write!(
                    s,
                    "<tr><th>{}</th><td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td></tr>",
                    esc(cat),
                    esc(&ci(&own.delta_nll)),
                    esc(&ci(&own.excess)),
                    esc(&num(own.p_excess, 3)),
                    esc(&oc),
                    esc(&op)
                );
            }
            s.push_str("</tbody></table>\n");
        }
        if let Some(svg) = effect_matrix(a, di) {
            s.push_str(&figure_html(&Figure {
                id: EFFECT_MATRIX_ID.to_string(),
                title: format!("Causal effect matrix (n = {})", d.n),
                caption: format!(
                    "Rows: the category whose {} most characteristic experts per MoE layer are masked; columns: the category whose prompts are scored. Colour and number: excess ΔNLL (characteristic minus load-matched random experts, nats per token) with its permutation p. The causal analogue of the category-similarity matrix.",
                    d.n
                ),
                svg,
                available: true,
            }));
        }
    }
    if !a.doses.is_empty() {
        s.push_str(&figure_html(&Figure {
            id: DOSE_RESPONSE_ID.to_string(),
            title: "Ablation dose-response".to_string(),
            caption: format!(
                "Mean ΔNLL against n, the experts masked per layer (doses {:?}): own category's prompts (diagonal), the other categories' prompts (off-diagonal), and own prompts with as many load-matched random experts masked.",
                a.settings.doses
            ),
            svg: dose_response(a),
            available: true,
        }));
    }
    if a.doses.len() == 1 {
        let _ = writeln!(
            s,
            "<p class=\"muted\">{}</p>",
            esc("One dose only: run with several (e.g. --ablate-n 1,2,4) for the dose-response curve.")
        );
    }
    s.push_str("</section>\n");
    s
}

/// The interpretation's sentence on the lexical baseline: the routing classifier's accuracy
/// relative to what token identity alone gives (empty when either is missing).
fn lexical_sentence(r: &Results) -> String {
    let (Some(lr), Some(Section::Done(lx))) = (r.logreg_5fold.done(), &r.lexical_baseline) else {
        return String::new();
    };
    let (a, b) = (lr.accuracy_mean, lx.classifier.accuracy_mean);
    let verdict = if a > b {
        format!("routing exceeds it by {} points", num(100.0 * (a - b), 1))
    } else {
        "routing does not exceed it, so the category information in routing may be token identity"
            .to_string()
    };
    format!(
        " Token identity alone (the same classifier on bag-of-token-id counts) reaches accuracy {}; {verdict}.",
        num(b, 3)
    )
}

fn interpretation(input: &ReportInput, r: &Results) -> String {
    let sim = &r.similarity;
    let d = sim.cohens_d;
    let ci = r.cohens_d_ci();
    let acc = r.logreg_5fold.done().map(|l| (l.accuracy_mean, l.chance));
    let acc_txt = acc
        .map(|(a, c)| {
            format!(
                "cross-validated accuracy {} against a chance rate of {}",
                num(a, 3),
                num(c, 3)
            )
        })
        .unwrap_or_else(|| "no classifier result".into());
    let numbers = format!(
        "Observed: within-category similarity {} vs. across {}, Cohen's d = {}{}, {}.{}",
        num(sim.within.mean, 3),
        num(sim.across.mean, 3),
        num(d, 2),
        ci.map(|(a, b)| format!(" (95 % CI {} to {})", num(a, 2), num(b, 2)))
            .unwrap_or_default(),
        acc_txt,
        lexical_sentence(r) + &control_sentence(r)
    );
    let mut s = String::new();
    match input.synthetic_kind() {
        Some(SyntheticKind::Random) => {
            s.push_str(r#"<section id="interpretation" class="interpretation synthetic"><h2>Interpretation</h2>"#);
            s.push_str(r#"<p class="verdict">This is a random-weight synthetic model. It has no task structure, so nothing in this report is evidence of task-specialised experts.</p>"#);
            let _ = write!(
                s,
                "<p>{}</p>",
                esc(&format!(
                    "The manifest marks the model as synthetic (random weights, never trained). \
                     Its router has learned nothing about the categories. Any separation between \
                     categories in the numbers and figures below comes from the prompts \
                     containing different tokens (a random router still maps different tokens \
                     to different experts) and from sampling noise; it is not evidence for the \
                     paper's claim. Use this report to see what the pipeline produces, then run \
                     it on a real checkpoint. {numbers}"
                ))
            );
        }
        Some(SyntheticKind::Planted) => {
            let found = d > 1.0 && acc.is_some_and(|(a, c)| a > c + 0.2);
            s.push_str(r#"<section id="interpretation" class="interpretation control"><h2>Interpretation</h2>"#);
            let _ = write!(
                s,
                r#"<p class="verdict">Positive control: a synthetic model whose router was deliberately made sensitive to token classes. {}</p>"#,
                if found {
                    "The pipeline recovered the planted structure (d > 1, accuracy well above chance)."
                } else {
                    "The pipeline did NOT recover the planted structure clearly (expected d > 1 and accuracy well above chance)."
                }
            );
            let _ = write!(
                s,
                "<p>{}</p>",
                esc(&format!(
                    "The structure was put there by construction, so this separation shows that \
                     the measurement works, not that real MoE models specialise by task. {numbers}"
                ))
            );
        }
        None => {
            s.push_str(
                r#"<section id="interpretation" class="interpretation"><h2>Interpretation</h2>"#,
            );
            let ci_excludes_zero = ci.map(|(a, b)| a > 0.0 || b < 0.0);
            let above_baselines = [
                r.baselines.permutation.done(),
                r.baselines.load_balance_uniform.done(),
                r.baselines.load_balance_marginal.done(),
            ]
            .iter()
            .flatten()
            .all(|b| sim.within.mean > b.mean);
            let verdict = match (d > 0.0, ci_excludes_zero) {
                (true, Some(true)) => format!(
                    "Prompts of the same category are routed more similarly than prompts of different categories (d = {}, CI excludes 0).",
                    num(d, 2)
                ),
                (_, Some(false)) => format!(
                    "No reliable category separation: the 95 % CI of d includes 0 (d = {}).",
                    num(d, 2)
                ),
                (true, None) => format!(
                    "Within-category routing similarity exceeds across-category similarity (d = {}); no bootstrap CI was available.",
                    num(d, 2)
                ),
                (false, _) => format!(
                    "Prompts of the same category are not routed more similarly than others (d = {}).",
                    num(d, 2)
                ),
            };
            let _ = write!(s, r#"<p class="verdict">{}</p>"#, esc(&verdict));
            let _ = write!(
                s,
                "<p>{}</p>",
                esc(&format!(
                    "{numbers} Within-category similarity is {} all null baselines. Caveats: \
                     categories also differ in vocabulary and format, so similar routing can \
                     reflect shared tokens rather than task; the prompt set is small and from \
                     one source; one model and one run.",
                    if above_baselines {
                        "above"
                    } else {
                        "not above"
                    }
                ))
            );
        }
    }
    s.push_str("</section>");
    s
}

/// The start of a self-contained page (doctype, head with the shared CSS, `<body><main>`); the
/// study report and the cross-model report share it (and [`page_close`]).
pub(crate) fn page_open(s: &mut String, title: &str) {
    s.push_str("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n");
    s.push_str("<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n");
    let _ = writeln!(s, "<title>{}</title>", esc(title));
    let _ = writeln!(s, "<style>{CSS}</style>\n</head>\n<body>\n<main>");
}

/// The end of a page opened by [`page_open`].
pub(crate) fn page_close(s: &mut String) {
    s.push_str("</main>\n</body>\n</html>\n");
}

pub(crate) fn figure_html(f: &Figure) -> String {
    format!(
        "<figure id=\"figure-{id}\" class=\"{cls}\">\n{svg}<figcaption><strong>{title}.</strong> {cap}</figcaption>\n</figure>\n",
        id = esc(&f.id),
        cls = if f.available { "fig" } else { "fig unavailable" },
        svg = f.svg,
        title = esc(f.title.trim_end_matches('.')),
        cap = esc(&f.caption)
    )
}

fn prompts_table(input: &ReportInput, r: &Results) -> String {
    if input.prompts.is_empty() {
        return r#"<p class="muted">No prompt table was supplied.</p>"#.into();
    }
    let mut s = String::from(
        r#"<table class="prompts"><thead><tr><th>id</th><th>category</th><th>prompt</th><th>generated text</th></tr></thead><tbody>"#,
    );
    for p in &input.prompts {
        let dropped = r
            .dropped_prompts
            .iter()
            .find(|d| d.prompt_id == p.id)
            .map(|d| format!(" (dropped: {})", d.reason))
            .unwrap_or_default();
        let _ = write!(
            s,
            "<tr><td>{}{}</td><td>{}</td><td><pre>{}</pre></td><td><pre>{}</pre></td></tr>",
            esc(&p.id),
            esc(&dropped),
            esc(&p.category),
            esc(&p.text),
            match &p.generated {
                Some(g) => esc(g),
                None => "<span class=\"muted\">(not recorded)</span>".into(),
            }
        );
    }
    s.push_str("</tbody></table>");
    s
}

/// Renders the whole report. Deterministic: the same input gives the same bytes.
pub fn render_report(input: &ReportInput) -> String {
    let r = input.results_with_categories();
    let figs = render_figures(&r, input.usage.as_ref());
    let model = model_name(input);
    let title = input
        .title
        .clone()
        .unwrap_or_else(|| format!("moe-xray routing report: {model}"));
    let mut s = String::new();
    page_open(&mut s, &title);
    let _ = writeln!(s, "<header><h1>{}</h1>", esc(&title));
    let _ = writeln!(
        s,
        "<p class=\"sub\">{}</p></header>",
        esc(&format!(
            "Do prompts of the same task category use the same experts? Routing signatures of {} prompts ({} categories) over {} MoE layers × {} experts, top-k = {}.",
            r.num_prompts,
            r.categories.len(),
            r.num_layers,
            r.num_experts,
            r.top_k
        ))
    );
    // table of contents (plain anchors, no script)
    s.push_str("<nav><ol>");
    s.push_str("<li><a href=\"#interpretation\">Interpretation</a></li><li><a href=\"#headline\">Headline numbers</a></li>");
    for f in &figs {
        let _ = write!(
            s,
            "<li><a href=\"#figure-{}\">{}</a></li>",
            esc(&f.id),
            esc(&f.title)
        );
    }
    if input.health.is_some() {
        s.push_str("<li><a href=\"#health\">Routing health</a></li>");
    }
    let confound = crate::confound_figures::fig_confounds(&r);
    if confound.is_some() {
        s.push_str("<li><a href=\"#confound-controls\">Confound controls</a></li>");
    }
    if r.random_router_control.is_some() {
        s.push_str("<li><a href=\"#random-router-control\">Random-router control</a></li>");
    }
    if r.windows.is_some() {
        s.push_str("<li><a href=\"#routing-over-time\">Routing over time</a></li>");
    }
    if input.ablation.is_some() {
        s.push_str("<li><a href=\"#expert-ablation\">Expert ablation</a></li>");
    }
    s.push_str("<li><a href=\"#manifest\">Model and run</a></li><li><a href=\"#prompts\">Prompts and generations</a></li><li><a href=\"#reproduce\">Reproduce</a></li></ol></nav>\n");

    s.push_str(&interpretation(input, &r));
    s.push('\n');
    s.push_str("<section id=\"headline\"><h2>Headline numbers</h2>\n");
    s.push_str(&headline(&r));
    s.push_str("</section>\n<section id=\"figures\"><h2>Figures</h2>\n");
    for f in &figs {
        s.push_str(&figure_html(f));
    }
    s.push_str("</section>\n");

    if let Some(f) = &confound {
        s.push_str("<section id=\"confound-controls\"><h2>Confound controls</h2>\n<p>What token identity alone gives, beside what routing gives: the lexical baseline classifier and the token-matched similarity statistics (docs/statistics.md, \"Confound controls\"; numbers in the headline table).</p>\n");
        s.push_str(&figure_html(f));
        s.push_str("</section>\n");
    }
    s.push_str(&control_section(&r));
    s.push_str(&windows_section(&r));
    if let Some(a) = &input.ablation {
        s.push_str(&ablation_section(a));
    }

    if let Some(h) = &input.health {
        s.push_str("<section id=\"health\"><h2>Routing health</h2>\n");
        for n in &h.notes {
            let _ = writeln!(s, "<p>{}</p>", esc(n));
        }
        s.push_str(&crate::health_section::summary_table(h));
        for f in &h.figures {
            s.push_str(&figure_html(f));
        }
        s.push_str("</section>\n");
    }

    if !r.dropped_prompts.is_empty() {
        s.push_str("<section id=\"dropped\"><h2>Dropped prompts</h2><table><thead><tr><th>prompt</th><th>reason</th></tr></thead><tbody>");
        for d in &r.dropped_prompts {
            let _ = write!(
                s,
                "<tr><td>{}</td><td>{}</td></tr>",
                esc(&d.prompt_id),
                esc(&d.reason)
            );
        }
        s.push_str("</tbody></table></section>\n");
    }

    s.push_str("<section id=\"manifest\"><h2>Model and run</h2>\n<h3>Capture manifest</h3>\n");
    s.push_str(&kv_table("manifest", input.manifest()));
    s.push_str("<h3>Analysis settings</h3>\n");
    let mut settings = serde_json::Map::new();
    settings.insert(
        "settings".into(),
        serde_json::to_value(&r.settings).unwrap_or_default(),
    );
    settings.insert("path".into(), Value::String(r.path.to_string()));
    settings.insert(
        "traces".into(),
        Value::Array(
            r.input
                .traces
                .iter()
                .map(|t| Value::String(t.clone()))
                .collect(),
        ),
    );
    settings.insert("tool_version".into(), Value::String(r.tool_version.clone()));
    settings.insert("schema_version".into(), Value::from(r.schema_version));
    s.push_str(&kv_table("settings", &Value::Object(settings)));
    s.push_str("<h3>Significance tests (all recorded fields)</h3>\n");
    let significance = serde_json::to_value(&r.significance).unwrap_or_default();
    s.push_str(&kv_table("significance", &significance));
    s.push_str("</section>\n");

    s.push_str("<section id=\"prompts\"><h2>Prompts and generations</h2>\n");
    s.push_str(&prompts_table(input, &r));
    s.push_str("</section>\n");

    s.push_str("<section id=\"reproduce\"><h2>Reproduce</h2>\n<p>This command regenerates the traces, results.json, figures and this report (same inputs and seed give byte-identical outputs):</p>\n");
    let cmd = if input.command.is_empty() {
        "(command not recorded)"
    } else {
        input.command.as_str()
    };
    let _ = writeln!(s, "<pre><code>{}</code></pre></section>", esc(cmd));
    let _ = writeln!(
        s,
        "<footer>Generated by moe-xray {} (results schema {}). Self-contained: no scripts, no external resources.</footer>",
        esc(&r.tool_version),
        r.schema_version
    );
    page_close(&mut s);
    s
}
