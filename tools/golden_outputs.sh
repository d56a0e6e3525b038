#!/usr/bin/env bash
# Usage: tools/golden_outputs.sh BIN OUTDIR
# Runs BIN (a moe-xray binary) on every committed fixture — analyze (exact and Gram paths, weighted), health,
# compare, trace at batch sizes 1 and 4 — with 1 and 2 threads, writing everything under OUTDIR. Run it with the
# binary before and after a change and `diff -r` the two OUTDIRs: a refactor must leave them byte-identical.
# (The manifests record the model path, so compare runs made from the same checkout.)
set -u
BIN=$1; OUT=$2; F=$(cd "$(dirname "$0")/.." && pwd)/fixtures
if [ -e "$OUT" ]; then echo "$OUT exists; give a new directory" >&2; exit 2; fi
mkdir -p "$OUT"
for t in 1 2; do
  for c in null paper_shape planted weighted_small; do
    RAYON_NUM_THREADS=$t $BIN analyze $F/stats/$c/trace.jsonl --folds $F/stats/$c/folds.csv --reps 200 --classifier-perm-reps 20 --out $OUT/analyze-$c-t$t >/dev/null 2>$OUT/analyze-$c-t$t.err
    RAYON_NUM_THREADS=$t $BIN analyze $F/stats/$c/trace.jsonl --gram --no-tsne --reps 100 --classifier-perm-reps 10 --out $OUT/analyze-gram-$c-t$t >/dev/null 2>$OUT/analyze-gram-$c-t$t.err
  done
  RAYON_NUM_THREADS=$t $BIN analyze $F/stats/weighted_small/trace.jsonl --weighted --reps 100 --classifier-perm-reps 10 --out $OUT/analyze-weighted-t$t >/dev/null 2>$OUT/analyze-weighted-t$t.err
  RAYON_NUM_THREADS=$t $BIN health $F/health/run_a --mi --json $OUT/health-a-t$t.json >/dev/null 2>&1
  RAYON_NUM_THREADS=$t $BIN compare $F/health/run_a $F/health/run_b --json $OUT/compare-t$t.json >/dev/null 2>&1
  for m in olmoe-tiny-mha-f32 olmoe-tiny-fused-f32; do
    for b in 1 4; do
      RAYON_NUM_THREADS=$t $BIN trace --model $F/hf/$m --prompts $F/hf/prompts.jsonl --max-new-tokens 6 --batch-size $b --out $OUT/trace-$m-b$b-t$t >/dev/null 2>&1
    done
  done
done
ls $OUT | wc -l
