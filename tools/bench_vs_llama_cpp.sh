#!/usr/bin/env bash
# moe-xray and llama.cpp side by side on the same OLMoE-shaped bf16 checkpoint, same machine, same
# threads, the paper workload's shape (prompts of ~22 tokens, 32 new tokens, EOS ignored), at 8 and
# at 80 sequences; prints the CPU features, both sides and the ratio.
#
#   tools/bench_vs_llama_cpp.sh [MODEL_DIR]
#
# Steps (each skipped when its output exists):
#   1. MODEL_DIR (default target/olmoe-1b-7b-L$LAYERS) from `moe-xray synth-model --preset
#      olmoe-1b-7b --layers $LAYERS` (bf16; LAYERS default 16 = the full shape, 13.8 GB; 4 layers
#      = 3.6 GB);
#   2. llama.cpp built by tools/build_llama_cpp.sh into $LLAMA_DIR (default /work/llama);
#   3. the checkpoint converted to GGUF bf16 by llama.cpp's own convert_hf_to_gguf.py (run with
#      $HF_PYTHON, default /work/venvs/hf/bin/python: tools/requirements-hf.txt, plus the
#      vendored gguf-py on PYTHONPATH) into $GGUF (default $LLAMA_DIR/models/<name>-bf16.gguf).
# Then, one after the other (never together):
#   - moe-xray `bench model` with routing capture (events) on the first 8 and on all 80 prompts of
#     paper80 (batch = number of prompts), once per kernel path in $KERNELS (default
#     "avx512 avx2": MOE_XRAY_KERNEL caps the matmul path; docs/performance.md);
#   - `llama-batched-bench -npp 22 -ntg 32 -npl 8,80` (prompt not shared: each sequence its own
#     22-token prompt, as the paper workload; unified KV cache large enough for 80 × 54 tokens,
#     -b 2048 -ub 512, llama.cpp's defaults otherwise) and `llama-bench -p 512 -n 32` (pp512,
#     tg32) with -t $THREADS.
# Environment: THREADS (2), LAYERS (16), KERNELS, LLAMA_DIR, GGUF, HF_PYTHON, OUT (results,
# default target/bench-vs-llama-cpp), SKIP_LLAMA_BENCH=1 (skip llama-bench), BIN (a moe-xray
# binary to use instead of building target/release/moe-xray).
set -euo pipefail
cd "$(dirname "$0")/.."

THREADS=${THREADS:-2}
LAYERS=${LAYERS:-16}
KERNELS=${KERNELS:-avx512 avx2}
LLAMA_DIR=${LLAMA_DIR:-/work/llama}
HF_PYTHON=${HF_PYTHON:-/work/venvs/hf/bin/python}
MODEL=${1:-target/olmoe-1b-7b-L$LAYERS}
OUT=${OUT:-target/bench-vs-llama-cpp}
GGUF=${GGUF:-$LLAMA_DIR/models/$(basename "$MODEL")-bf16.gguf}
mkdir -p "$OUT" "$(dirname "$GGUF")"

echo "== CPU"
grep -m1 'model name' /proc/cpuinfo | sed 's/^[^:]*: //'
echo "cores online: $(nproc); features used by either side:"
grep -m1 '^flags' /proc/cpuinfo | tr ' ' '\n' |
  grep -xE 'avx|avx2|fma|f16c|avx512f|avx512bw|avx512vl|avx512_bf16|avx512_vnni|avx_vnni|avx512_fp16|amx_bf16|amx_int8|amx_tile' |
  tr '\n' ' '
echo

if [ -z "${BIN:-}" ]; then
  cargo build --release -p moe-xray
  BIN=target/release/moe-xray
fi
if [ ! -f "$MODEL/config.json" ]; then
  "$BIN" synth-model --preset olmoe-1b-7b --layers "$LAYERS" --dtype bf16 --out "$MODEL"
fi
if [ ! -x "$LLAMA_DIR/bin/llama-batched-bench" ]; then
  LLAMA_DIR="$LLAMA_DIR" tools/build_llama_cpp.sh
fi
if [ ! -f "$GGUF" ]; then
  PYTHONPATH="$LLAMA_DIR/llama.cpp/gguf-py" "$HF_PYTHON" "$LLAMA_DIR/llama.cpp/convert_hf_to_gguf.py" \
    "$MODEL" --outtype bf16 --outfile "$GGUF"
fi
echo "llama.cpp $("$LLAMA_DIR/bin/llama-bench" --version 2>&1 | grep -m1 version || true)"

for k in $KERNELS; do
  for n in 8 80; do
    echo "== moe-xray bench model: $n prompts x 32 new tokens, batch $n, $THREADS threads, events capture, MOE_XRAY_KERNEL=$k"
    MOE_XRAY_KERNEL=$k "$BIN" bench model --model "$MODEL" -n "$n" --max-new-tokens 32 \
      --batch-size "$n" --threads "$THREADS" --capture events --scratch "$OUT" --json \
      > "$OUT/moe-xray-$k-$n.json"
    grep -E '"(kernel|tokens_per_second|prefill_tokens_per_second|decode_tokens_per_second|peak_rss_bytes)"' \
      "$OUT/moe-xray-$k-$n.json" | tr -s ' ' | tr '\n' ' '
    echo
  done
done

echo "== llama-batched-bench -npp 22 -ntg 32 -npl 8,80 -t $THREADS (bf16 GGUF)"
"$LLAMA_DIR/bin/llama-batched-bench" -m "$GGUF" -c 4608 -b 2048 -ub 512 -npp 22 -ntg 32 \
  -npl 8,80 -t "$THREADS" -tb "$THREADS" --output-format jsonl 2>"$OUT/llama-batched-bench.log" |
  grep '^{' > "$OUT/llama-batched-bench.jsonl"
cat "$OUT/llama-batched-bench.jsonl"
if [ "${SKIP_LLAMA_BENCH:-0}" != 1 ]; then
  echo "== llama-bench -p 512 -n 32 -t $THREADS"
  "$LLAMA_DIR/bin/llama-bench" -m "$GGUF" -p 512 -n 32 -t "$THREADS" -o md 2>/dev/null |
    tee "$OUT/llama-bench.md"
fi

"$HF_PYTHON" - "$OUT" "$KERNELS" <<'EOF'
import json, sys
out, kernels = sys.argv[1], sys.argv[2].split()
ll = {r["pl"]: r for r in map(json.loads, open(f"{out}/llama-batched-bench.jsonl"))}
print()
print("moe-xray bench model (events capture) vs llama-batched-bench (bf16 GGUF, -npp 22 -ntg 32,"
      " prompt not shared); tok/s = processed tokens / time")
print(f"{'':6}{'kernel':>13}{'prefill':>10}{'decode':>10}{'total':>10}   "
      f"{'llama pp':>9}{'llama tg':>9}{'llama':>9}{'ratio':>8}")
for k in kernels:
    for n in (8, 80):
        mx = json.load(open(f"{out}/moe-xray-{k}-{n}.json"))
        cap = next(p for p in mx["passes"] if p["sink"] != "null")
        r = ll.get(n)
        row = (f"{n:>3} pr{mx['kernel']:>13}{cap['prefill_tokens_per_second']:>10.2f}"
               f"{cap['decode_tokens_per_second']:>10.2f}{cap['tokens_per_second']:>10.2f}   ")
        if r:
            row += (f"{r['speed_pp']:>9.2f}{r['speed_tg']:>9.2f}{r['speed']:>9.2f}"
                    f"{cap['tokens_per_second'] / r['speed']:>7.2f}x")
        print(row)
print("ratio = moe-xray total / llama.cpp total (S t/s); > 1: moe-xray is faster")
EOF
