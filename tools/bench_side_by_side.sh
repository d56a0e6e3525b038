#!/usr/bin/env bash
# Issue 6's side-by-side benchmark in one command: moe-xray and Hugging Face transformers on the
# full OLMoE-1B-7B shape (random weights, bf16), same prompts, same token counts, same threads,
# one after the other in the same session, then the ratio.
#
#   tools/bench_side_by_side.sh [short|paper] [MODEL_DIR]
#
#   short  8 prompts of paper80 x 8 new tokens           (~2 min for moe-xray, ~3 min for transformers)
#   paper  all 80 prompts of paper80 x 32 new tokens      (the paper workload; ~6 + ~12 min)
#
# MODEL_DIR (default target/olmoe-1b-7b) is written with `moe-xray synth-model --preset olmoe-1b-7b`
# if it has no config.json (13.8 GB, streamed, ~3-7 min). Environment: THREADS (default 2), BATCH
# (moe-xray's prompts per ragged batch; default 8 for short, 80 for paper), HF_BATCH (transformers'
# left-padded batch; default 8: at this shape transformers already peaks at ~23.4 GB of the 24 GB with
# batch 8, and padding wastes more compute the larger its batch), HF_PYTHON (default
# /work/venvs/hf/bin/python: a virtualenv with tools/requirements-hf.txt; without it only the
# moe-xray side runs), OUT (results directory, default target/bench-side-by-side).
#
# moe-xray runs `bench model`: a NullSink pass and an events-capture pass in one process (capture
# overhead). transformers runs tools/bench_hf.py with router hooks (counts). Peak RSS of each side is
# VmHWM of its own process. Run it on an otherwise idle machine: the two sides run one after the
# other, never together (transformers needs ~23 GB at this shape).
set -euo pipefail
cd "$(dirname "$0")/.."

MODE=${1:-short}
MODEL=${2:-target/olmoe-1b-7b}
THREADS=${THREADS:-2}
HF_PYTHON=${HF_PYTHON:-/work/venvs/hf/bin/python}
HF_BATCH=${HF_BATCH:-8}
OUT=${OUT:-target/bench-side-by-side}
case "$MODE" in
  short) N=8; NEW=8; BATCH=${BATCH:-8} ;;
  paper) N=0; NEW=32; BATCH=${BATCH:-80} ;;
  *) echo "usage: $0 [short|paper] [MODEL_DIR]" >&2; exit 2 ;;
esac

cargo build --release -p moe-xray
BIN=target/release/moe-xray
if [ ! -f "$MODEL/config.json" ]; then
  "$BIN" synth-model --preset olmoe-1b-7b --out "$MODEL"
fi
mkdir -p "$OUT"

echo "== moe-xray bench model ($MODE: -n $N, $NEW new tokens, batch $BATCH, $THREADS threads)"
"$BIN" bench model --model "$MODEL" -n "$N" --max-new-tokens "$NEW" --batch-size "$BATCH" \
  --threads "$THREADS" --capture events --scratch "$OUT" --json > "$OUT/moe-xray-$MODE.json"
cat "$OUT/moe-xray-$MODE.json"

if [ ! -x "$HF_PYTHON" ]; then
  echo "no transformers environment at $HF_PYTHON (set HF_PYTHON); moe-xray side only" >&2
  exit 0
fi
echo "== transformers (tools/bench_hf.py, router hooks on, batch $HF_BATCH)"
"$HF_PYTHON" tools/bench_hf.py --model "$MODEL" -n "$N" --max-new-tokens "$NEW" \
  --batch-size "$HF_BATCH" --threads "$THREADS" --json "$OUT/hf-$MODE.json"

"$HF_PYTHON" - "$OUT/moe-xray-$MODE.json" "$OUT/hf-$MODE.json" <<'EOF'
import json, sys
mx = json.load(open(sys.argv[1]))
hf_all = json.load(open(sys.argv[2]))
hf = hf_all["passes"][0]
null = next(p for p in mx["passes"] if p["sink"] == "null")
cap = next((p for p in mx["passes"] if p["sink"] != "null"), null)
print()
print(f"{'':24}{'moe-xray (' + cap['sink'] + ')':>22}{'transformers (hooks)':>24}{'ratio':>8}")
for key, label in [("prefill_tokens_per_second", "prefill tok/s"),
                   ("decode_tokens_per_second", "decode tok/s"),
                   ("tokens_per_second", "processed tok/s (wall)")]:
    print(f"{label:24}{cap[key]:>22.2f}{hf[key]:>24.2f}{cap[key] / hf[key]:>7.2f}x")
print(f"{'wall s (excl. load)':24}{cap['wall_seconds']:>22.1f}{hf['wall_seconds']:>24.1f}")
print(f"{'load s':24}{mx['load_seconds']:>22.1f}{hf_all['load_seconds']:>24.1f}")
print(f"{'peak RSS GB':24}{mx['peak_rss_bytes'] / 1e9:>22.2f}{hf_all['peak_rss_bytes'] / 1e9:>24.2f}")
print(f"tokens: moe-xray {cap['prefill_tokens']} + {cap['decode_tokens']}, "
      f"transformers {hf['prefill_tokens']} + {hf['decode_tokens']}")
if mx.get("capture_overhead") is not None:
    print(f"moe-xray capture overhead ({cap['sink']} vs null, wall): {100 * mx['capture_overhead']:+.2f} %")
if mx.get("capture_share") is not None:
    print(f"moe-xray time inside the {cap['sink']} writer: {cap['sink_seconds']:.3f} s = "
          f"{100 * mx['capture_share']:.2f} % of that pass (measured directly)")
EOF
