#!/usr/bin/env python3
"""The sharded analysis of a Hive-partitioned Parquet routing dataset on Apache Spark.

Recipe (docs/statistics.md, "Sharded analysis"; docs/trace-format.md, "Parquet"):

1. Spark reads the dataset `ROOT/run=<name>/category=<category>/part-<N>.parquet` directly (the
   partition columns `run` and `category` come from the paths) and reports per-run, per-category
   row counts and the per-layer expert selection counts with Spark SQL.
2. The map step runs as Spark tasks: one task per (run, part i of N); each task runs
   `moe-xray map ROOT/run=<name> --part i/N --out SHARD` on its executor (the binary must be on
   every executor, e.g. shipped with `--files` / a container image) and returns the shard's path
   and SHA-256. Shards are small: per-prompt counts (L x E numbers per prompt), not records.
3. The driver runs `moe-xray merge` on each run's shards: the results.json of one `analyze` over
   the whole run, byte for byte (the map/merge equality is tested in the Rust test suite, and
   `--check` here checks it again against `moe-xray analyze` on the same dataset).

The Spark job only schedules and moves shard paths; every statistic is moe-xray's own code.

Usage (local mode, as tested; pinned versions in tools/requirements-spark.txt, Java 17):
    python tools/spark_map_merge.py --bin target/debug/moe-xray --dataset DS --parts 4 \
        --out OUT [--prompts prompts.jsonl] [--master local[2]] [--check] [-- analysis options]

Analysis options after `--` (e.g. `--reps 200 --seed 1`) are passed to `merge` (and to the
`analyze` of `--check`). Writes OUT/<run>/results.json (+ the other outputs of `merge`),
OUT/shards/, and OUT/spark-summary.json (row counts, per-layer expert counts from Spark SQL,
shard hashes, timings).
"""

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def run_dirs(root):
    """The run directories of a dataset root (the root itself when it has no run= level)."""
    runs = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("run="))
    return runs or [root]


def main():
    argv = sys.argv[1:]
    extra = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bin", required=True, help="the moe-xray binary (on every executor)")
    ap.add_argument("--dataset", required=True, help="Hive-partitioned Parquet dataset root")
    ap.add_argument("--parts", type=int, default=4, help="map tasks per run")
    ap.add_argument("--out", required=True)
    ap.add_argument("--prompts", help="prompt file (categories of records without one)")
    ap.add_argument("--master", default="local[2]")
    ap.add_argument("--check", action="store_true",
                    help="also run `moe-xray analyze` on each run and compare results.json bytes")
    args = ap.parse_args(argv)

    from pyspark.sql import SparkSession
    from pyspark.sql import functions as F

    binary = str(Path(args.bin).resolve())
    root = Path(args.dataset).resolve()
    out = Path(args.out).resolve()
    if out.exists():
        sys.exit(f"{out}: already exists")
    shards_dir = out / "shards"
    shards_dir.mkdir(parents=True)
    prompts = str(Path(args.prompts).resolve()) if args.prompts else None
    if args.parts < 1:
        sys.exit("--parts must be at least 1")

    spark = (SparkSession.builder.master(args.master).appName("moe-xray map/merge")
             .config("spark.ui.enabled", "false").getOrCreate())
    spark.sparkContext.setLogLevel("ERROR")
    summary = {"dataset": str(root), "parts": args.parts, "master": args.master,
               "spark_version": spark.version}
    t0 = time.time()

    # 1. Spark reads the dataset itself: partition columns from the paths.
    df = spark.read.parquet(str(root))
    cols = df.columns
    group = [c for c in ("run", "category") if c in cols]
    rows = df.groupBy(*group).count().orderBy(*group).collect() if group else []
    summary["rows"] = [r.asDict() for r in rows]
    summary["total_rows"] = df.count()
    # Per-layer expert selection counts (every routed (token, layer) record counts each chosen
    # expert once), the same numbers `moe-xray` counts; written for inspection.
    per_layer = (df.select("layer", F.explode("experts").alias("expert"))
                 .groupBy("layer", "expert").count().orderBy("layer", "expert").collect())
    summary["expert_counts"] = [[r["layer"], r["expert"], r["count"]] for r in per_layer]
    summary["spark_read_seconds"] = round(time.time() - t0, 3)

    # 2. The map step as Spark tasks.
    runs = run_dirs(root)
    tasks = [(str(r), i) for r in runs for i in range(args.parts)]
    parts = args.parts

    def map_task(task):
        run_dir, i = task
        name = Path(run_dir).name.replace("=", "_") or "run"
        shard = shards_dir / f"{name}.part-{i}-of-{parts}.mxshard"
        cmd = [binary, "map", run_dir, "--part", f"{i}/{parts}", "--out", str(shard), "--quiet"]
        if prompts:
            cmd += ["--prompts", prompts]
        t = time.time()
        p = subprocess.run(cmd, capture_output=True, text=True)
        if p.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({p.returncode}): {p.stderr.strip()}")
        return (run_dir, i, str(shard), sha256(shard), os.path.getsize(shard), round(time.time() - t, 3))

    t1 = time.time()
    results = (spark.sparkContext.parallelize(tasks, len(tasks)).map(map_task).collect())
    summary["map_seconds"] = round(time.time() - t1, 3)
    summary["shards"] = [{"run": r, "part": i, "path": s, "sha256": h, "bytes": b, "seconds": sec}
                         for (r, i, s, h, b, sec) in sorted(results)]
    spark.stop()

    # 3. Merge per run on the driver.
    t2 = time.time()
    summary["runs"] = []
    for r in runs:
        shards = [s for (rr, _, s, _, _, _) in sorted(results) if rr == str(r)]
        dest = out / (r.name.replace("=", "_") if r != root else "run")
        cmd = [binary, "merge", *shards, "--out", str(dest), "--quiet", *extra]
        subprocess.run(cmd, check=True)
        entry = {"run": str(r), "out": str(dest), "results_sha256": sha256(dest / "results.json")}
        if args.check:
            ref = out / ("check-" + dest.name)
            acmd = [binary, "analyze", str(r), "--out", str(ref), "--quiet", *extra]
            if prompts:
                acmd += ["--prompts", prompts]
            subprocess.run(acmd, check=True)
            same = (dest / "results.json").read_bytes() == (ref / "results.json").read_bytes()
            entry["analyze_results_sha256"] = sha256(ref / "results.json")
            entry["identical_to_analyze"] = same
            if not same:
                print(f"MISMATCH: {dest}/results.json differs from {ref}/results.json", file=sys.stderr)
        summary["runs"].append(entry)
    summary["merge_seconds"] = round(time.time() - t2, 3)
    (out / "spark-summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps({k: summary[k] for k in ("total_rows", "map_seconds", "merge_seconds", "runs")},
                     indent=1))
    if args.check and not all(e["identical_to_analyze"] for e in summary["runs"]):
        sys.exit(1)


if __name__ == "__main__":
    main()
