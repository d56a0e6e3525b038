#!/usr/bin/env python3
"""Time the analysis of the paper-shape fixture (80 prompts x 16 layers x 64 experts, k=8) in
numpy / scikit-learn, as the baseline for the Rust speed target of issue 3 (>= 20x faster).

Same computations as `moe-xray analyze` with defaults, using the implementations in
tools/reference_stats.py (vectorised numpy; sklearn for t-SNE and logistic regression):
  * read trace + signatures + similarity block (within/across/d, category matrix, per-layer d)
  * 1000 reps of each baseline (permutation, load_balance_uniform, load_balance_marginal)
  * label permutation (1000) and stratified bootstrap (1000) significance
  * PCA (10 components, full SVD)
  * t-SNE exact (sklearn defaults, perplexity min(30, (N-1)/3), PCA init)
  * 5-fold logistic regression (StandardScaler + LogisticRegression(C=1, lbfgs, default tol 1e-4))
  * classifier permutation test, 200 reps (each a full 5-fold CV)
Wall clock (time.perf_counter), BLAS/OpenMP limited to 2 threads (the env vars are set before numpy
is imported, and threadpoolctl enforces the limit).

Usage:
  /work/venvs/sci/bin/python tools/bench_stats_sklearn.py [--write fixtures/stats/sklearn_bench.json]
Prints the JSON to stdout.
"""

from __future__ import annotations

import os

for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_v] = "2"

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import scipy  # noqa: E402
import sklearn  # noqa: E402
from threadpoolctl import threadpool_limits  # noqa: E402

sys.dont_write_bytecode = True  # no tools/__pycache__ in the work tree
sys.path.insert(0, str(Path(__file__).resolve().parent))
import reference_stats as R  # noqa: E402


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", default="paper_shape")
    ap.add_argument("--reps", type=int, default=1000)
    ap.add_argument("--sig-reps", type=int, default=1000)
    ap.add_argument("--clf-reps", type=int, default=200)
    ap.add_argument("--write", help="also write the JSON to this file")
    args = ap.parse_args()

    t = {}
    load_before = os.getloadavg()
    cpu0 = time.process_time()
    with threadpool_limits(limits=2):
        t0 = time.perf_counter()
        tab = R.read_table(R.FIXTURES / args.case)
        labels = np.array(tab.cats).astype(str)
        S3 = R.signatures(tab.A)
        X = S3.reshape(S3.shape[0], -1)
        t["read_and_signatures"] = time.perf_counter() - t0

        s = time.perf_counter()
        sim, block = R.similarity_block(S3, labels, sorted(set(labels.tolist())))
        t["similarity"] = time.perf_counter() - s

        for seed, kind in enumerate(["permutation", "load_balance_uniform", "load_balance_marginal"]):
            s = time.perf_counter()
            R.baseline(kind, tab.A, tab.U, tab.k, args.reps, seed)
            t[f"baseline_{kind}"] = time.perf_counter() - s
            print(f"baseline_{kind}: {t[f'baseline_{kind}']:.1f} s", file=sys.stderr, flush=True)

        s = time.perf_counter()
        R.pca_block(X)
        t["pca"] = time.perf_counter() - s

        s = time.perf_counter()
        ts = R.tsne_block(X)
        t["tsne_exact"] = time.perf_counter() - s

        fmap = R.read_folds(R.FIXTURES / args.case / "folds.csv")
        fold = np.array([fmap[p] for p in tab.ids])
        s = time.perf_counter()
        pred, accs, _ = R.cv_predict(X, labels, fold, 1e-4)
        t["logreg_5fold"] = time.perf_counter() - s
        acc = float(np.mean(pred == labels))

        s = time.perf_counter()
        R.label_permutation(sim, labels, args.sig_reps, 10)
        t["label_permutation"] = time.perf_counter() - s

        s = time.perf_counter()
        R.bootstrap(sim, labels, (pred == labels).astype(float), args.sig_reps, 11)
        t["bootstrap"] = time.perf_counter() - s

        s = time.perf_counter()
        R.classifier_permutation(X, labels, fold, acc, args.clf_reps, 12)
        t["classifier_permutation"] = time.perf_counter() - s
        t["total"] = time.perf_counter() - t0
        print({k: round(v, 2) for k, v in t.items()}, file=sys.stderr)
    cpu_total = time.process_time() - cpu0
    load_after = os.getloadavg()

    out = {
        "case": args.case,
        "shape": {"prompts": len(tab.ids), "layers": tab.L, "experts": tab.E, "top_k": tab.k},
        "reps": {"baselines": args.reps, "label_permutation": args.sig_reps, "bootstrap": args.sig_reps,
                 "classifier_permutation": args.clf_reps},
        "seconds": {k: round(v, 4) for k, v in t.items()},
        "threads": 2,
        "check": {"cohens_d": block["similarity"]["cohens_d"], "cv_accuracy": acc, "tsne_kl": ts["kl_divergence"]},
        "versions": {"python": sys.version.split()[0], "numpy": np.__version__, "scipy": scipy.__version__,
                     "sklearn": sklearn.__version__},
        "cpu_seconds_total": round(cpu_total, 4),
        "machine": {
            "cpu": cpu_model(),
            "nproc": os.cpu_count(),
            "loadavg_1_5_15_before": [round(x, 2) for x in load_before],
            "loadavg_1_5_15_after": [round(x, 2) for x in load_after],
            "note": "shared 2-core machine; other jobs may have been running (see loadavg)",
        },
        "command": "/work/venvs/sci/bin/python tools/bench_stats_sklearn.py --write fixtures/stats/sklearn_bench.json",
    }
    text = json.dumps(out, indent=1) + "\n"
    if args.write:
        R.write_atomic(Path(args.write), text)
    print(text, end="")


if __name__ == "__main__":
    main()
