#!/usr/bin/env bash
# Per-family speed and memory, side by side with transformers, in one session on this machine.
#
#   tools/bench_families.sh [PRESET[:LAYERS] ...]
#
# For each synth-model preset (the published shape of a family; LAYERS decoder layers of it, so that
# the checkpoint fits this machine's disk and RAM — default list below), writes the checkpoint with
# `moe-xray synth-model` (bf16), runs `moe-xray bench model` (events capture) and transformers
# (tools/bench_hf.py, batch 1 = its fastest setting on this machine, no router hooks = the bare
# model), one after the other, never together, and prints one line per family: processed tok/s of
# each side, the ratio, and the peak RSS of each side. Environment: N (prompts of paper80, default 4),
# NEW (new tokens, default 8), THREADS (2), BATCH (moe-xray's ragged batch, default 4), HF_PYTHON
# (default /work/venvs/hf/bin/python; without it only the moe-xray side runs), OUT (default
# target/bench-families; checkpoints are deleted after each family unless KEEP=1).
set -euo pipefail
cd "$(dirname "$0")/.."
N=${N:-4}
NEW=${NEW:-8}
THREADS=${THREADS:-2}
BATCH=${BATCH:-4}
HF_PYTHON=${HF_PYTHON:-/work/venvs/hf/bin/python}
OUT=${OUT:-target/bench-families}
if [ $# -eq 0 ]; then
  set -- granite-3.0-3b-a800m qwen3-30b-a3b:4 deepseek-v2-lite:4 qwen1.5-moe-a2.7b:4 mixtral-8x7b:2 gpt-oss-20b:3 olmoe-1b-7b:4
fi
cargo build --release -p moe-xray
BIN=target/release/moe-xray
mkdir -p "$OUT"
for spec in "$@"; do
  preset=${spec%%:*}
  layers=""
  [ "$spec" != "$preset" ] && layers=${spec#*:}
  dir="$OUT/$preset${layers:+-$layers}"
  if [ ! -f "$dir/config.json" ]; then
    "$BIN" synth-model --preset "$preset" ${layers:+--layers "$layers"} --dtype bf16 --quiet --out "$dir"
  fi
  "$BIN" bench model --model "$dir" -n "$N" --max-new-tokens "$NEW" --batch-size "$BATCH" \
    --threads "$THREADS" --capture events --scratch "$OUT" --json > "$dir.moe-xray.json"
  if [ -x "$HF_PYTHON" ]; then
    "$HF_PYTHON" tools/bench_hf.py --model "$dir" -n "$N" --max-new-tokens "$NEW" --batch-size 1 \
      --threads "$THREADS" --no-capture --json "$dir.hf.json" > "$dir.hf.log" 2>&1 || echo "transformers failed: $dir.hf.log"
  fi
  python3 - "$preset" "$layers" "$dir.moe-xray.json" "$dir.hf.json" <<'PY'
import json, os, sys
preset, layers, mxf, hff = sys.argv[1:5]
mx = json.load(open(mxf))
cap = next((p for p in mx["passes"] if p["sink"] != "null"), mx["passes"][0])
line = f"{preset:24} layers {layers or 'all':>4}  moe-xray {cap['tokens_per_second']:8.2f} tok/s  RSS {mx['peak_rss_bytes']/1e9:6.2f} GB"
if os.path.exists(hff):
    hf_all = json.load(open(hff)); hf = hf_all["passes"][0]
    line += (f"   transformers (batch 1) {hf['tokens_per_second']:8.2f} tok/s  RSS {hf_all['peak_rss_bytes']/1e9:6.2f} GB"
             f"   ratio {cap['tokens_per_second']/hf['tokens_per_second']:5.2f}x")
print(line, flush=True)
PY
  [ "${KEEP:-0}" = 1 ] || rm -rf "$dir"
done
