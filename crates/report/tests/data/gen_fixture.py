# Run from this folder: python3 gen_fixture.py (stdlib only). Hand-made, realistic-looking results.json fixture for the report tests (NOT real analysis output),
# in exactly the results.json schema (docs/results.schema.json; the report refuses anything else).
import json, math, random
random.seed(7)
cats = ["code", "factual", "math", "story"]
N_PER = 20; L = 16; E = 64; K = 8
ids = []; pcats = []
for c in cats:
    for i in range(N_PER):
        ids.append(f"{c}-{i+1:02d}"); pcats.append(c)
# interleave order like a prompt file would be (grouped by category is fine)
centers = {c: (random.uniform(-1, 1) * 3, random.uniform(-1, 1) * 3) for c in cats}
pca = []
for c in pcats:
    cx, cy = centers[c]
    pca.append([round(cx * 0.05 + random.gauss(0, 0.03), 6), round(cy * 0.04 + random.gauss(0, 0.025), 6)])
tc = {"code": (-20, 15), "factual": (18, 12), "math": (-15, -18), "story": (20, -14)}
tsne = [[round(tc[c][0] + random.gauss(0, 4), 4), round(tc[c][1] + random.gauss(0, 4), 4)] for c in pcats]
M = [[0.0] * 4 for _ in range(4)]
for a in range(4):
    for b in range(4):
        M[a][b] = round(0.58 + random.uniform(0, 0.05) if a != b else 0.74 + random.uniform(-0.04, 0.04), 6)
for a in range(4):
    for b in range(a):
        M[a][b] = M[b][a]
per_layer = []
for l in range(L):
    d = 0.6 + 1.4 * math.sin(math.pi * (l + 0.5) / L) + random.gauss(0, 0.12)
    per_layer.append({"layer": l, "within_mean": round(0.55 + 0.02 * d, 6), "across_mean": round(0.5, 6), "cohens_d": round(d, 6)})
conf = [[17, 1, 2, 0], [0, 19, 0, 1], [2, 0, 18, 0], [0, 1, 0, 19]]
# out-of-fold predictions consistent with the confusion matrix (row = true category)
oof = [cats[p] for row in conf for p, k in enumerate(row) for _ in range(k)]
res = {
  "schema_version": 1, "tool_version": "0.1.0",
  "input": {"traces": ["traces/trace.jsonl.zst"],
            "manifest": {"model": "example-olmoe (hand-made test fixture, not real data)", "num_layers": L, "num_experts": E, "top_k": K,
                         "dtype": "bf16", "generation": {"max_new_tokens": 32, "do_sample": False, "chat_template": False},
                         "prompt_set_hash": "sha256:3f1c0de2a9", "tool_version": "0.1.0", "capture_mode": "counts"}},
  "settings": {"token_types": ["prompt", "generation"], "weighted": False, "reps": 1000, "seed": 0,
               "perm_reps": 1000, "boot_reps": 1000, "classifier_perm_reps": 200},
  "num_prompts": 80, "num_layers": L, "num_experts": E, "top_k": K,
  "categories": [{"name": c, "n": N_PER} for c in cats],
  "prompt_ids": ids, "dropped_prompts": [], "path": "exact_pairs",
  "similarity": {"within": {"n": 760, "mean": 0.7412, "std": 0.0634}, "across": {"n": 2400, "mean": 0.6027, "std": 0.0581}, "cohens_d": 2.3051},
  "category_similarity_matrix": {"order": cats, "values": M},
  "per_layer": per_layer,
  "baselines": {"permutation": {"mean": 0.1904, "std": 0.0011, "pair_std": 0.0305, "reps": 1000, "seed": 0},
                "load_balance_uniform": {"mean": 0.1521, "std": 0.0009, "pair_std": 0.0248, "reps": 1000, "seed": 0},
                "load_balance_marginal": {"mean": 0.3113, "std": 0.0014, "pair_std": 0.0402, "reps": 1000, "seed": 0}},
  "significance": {"label_permutation": {"reps": 1000, "seed": 0, "observed_within_minus_across": 0.1385, "observed_cohens_d": 2.3051,
                                         "p_within_minus_across": 0.000999, "p_cohens_d": 0.000999},
                   "bootstrap": {"reps": 1000, "seed": 0, "confidence": 0.95, "cohens_d_ci95": [2.01, 2.63], "accuracy_ci95": [0.8375, 0.9625]},
                   "classifier_permutation": {"null_mean": 0.2531, "observed_accuracy": 0.9125, "p": 0.004975, "reps": 200, "seed": 0}},
  "pca": {"explained_variance_ratio": [0.1843, 0.0921, 0.0611, 0.0502, 0.0433, 0.0391, 0.0342, 0.0301, 0.0288, 0.0251],
          "coords": pca},
  "tsne": {"coords": tsne, "kl_divergence": 0.4213, "n_iter": 999, "perplexity": 26.333333333333332},
  "logreg_5fold": {"accuracy_mean": 0.9125, "accuracy_std": 0.030618621784789725, "chance": 0.25, "confusion": conf,
                   "fold_accuracies": [0.9375, 0.875, 0.875, 0.9375, 0.9375], "labels": cats, "macro_f1_oof": 0.9119,
                   "n_folds": 5, "oof_predictions": oof}
}
json.dump(res, open("results.json", "w"), indent=1)
# per-category mean signatures (L*E, each layer sums to 1)
usage = {"num_layers": L, "num_experts": E, "categories": []}
for ci, c in enumerate(cats):
    v = []
    for l in range(L):
        w = [random.gammavariate(0.6, 1.0) for _ in range(E)]
        for e in range(E):
            if (e * 7 + l * 3 + ci * 11) % 64 < 6: w[e] += 3.0
        s = sum(w); v += [round(x / s, 6) for x in w]
    usage["categories"].append([c, v])
json.dump(usage, open("usage.json", "w"))
texts = {"code": "Write a Python function that returns the n-th Fibonacci number.", "factual": "What is the capital of Australia?",
         "math": "Solve for x: 3x + 7 = 22.", "story": "Tell a short story about a lighthouse keeper."}
with open("prompts.jsonl", "w") as f:
    for i, c in zip(ids, pcats):
        text = texts[c]
        gen = " Sure. Here is an answer..."
        if i == "code-03":
            text = "Explain this HTML: <script>alert('x')</script> & why it's unsafe"
            gen = "</pre><b>bold?</b> The <script> tag runs JavaScript."
        f.write(json.dumps({"id": i, "category": c, "text": text, "generated": gen}) + "\n")
