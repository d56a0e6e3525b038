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
#   - moe-xray `bench model --skip-null` with routing capture (events) on the first 8 and on all 80 prompts of
#     paper80 (batch = number of prompts), once per kernel path in $KERNELS (default
#     "avx512 avx2": MOE_XRAY_KERNEL caps the matmul path; docs/performance.md);
#   - `llama-batched-bench -npp 22 -ntg 32 -npl 8,80` (prompt not shared: each sequence its own
#     22-token prompt, as the paper workload; unified KV cache large enough for 80 × 54 tokens,
#     -b 2048 -ub 512, llama.cpp's defaults otherwise) and `llama-bench -p 512 -n 32` (pp512,
#     tg32) with -t $THREADS.
#   - with HF_BATCH1=N (optional): transformers at its fastest setting here (batch 1, sdpa, router
#     hooks; tools/bench_hf.py) on the first N prompts of paper80, for the transformers ratio;
#   - with ON_GGUF=1 (optional): moe-xray also on the GGUF file itself (the very file llama.cpp
#     reads; its bf16 experts go through the same kernels as the safetensors checkpoint's).
# Environment: THREADS (2), LAYERS (16), KERNELS, LLAMA_DIR, GGUF, HF_PYTHON, OUT (results,
# default target/bench-vs-llama-cpp), SKIP_LLAMA_BENCH=1 (skip llama-bench), BIN (a moe-xray
# binary to use instead of building target/release/moe-xray), HF_BATCH1, ON_GGUF, SKIP_HF_DIR=1
# (no safetensors checkpoint: GGUF written by `moe-xray synth-model --format gguf --quant bf16`
# from the same seed, moe-xray measured on it; saves 13.8 GB of disk at 16 layers).
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
if [ "${SKIP_HF_DIR:-0}" = 1 ]; then
  if [ ! -f "$GGUF" ]; then
    "$BIN" synth-model --preset olmoe-1b-7b --layers "$LAYERS" --format gguf --quant bf16 --out "$GGUF"
  fi
  ON_GGUF=1
else
  if [ ! -f "$MODEL/config.json" ]; then
    "$BIN" synth-model --preset olmoe-1b-7b --layers "$LAYERS" --dtype bf16 --out "$MODEL"
  fi
fi
if [ ! -x "$LLAMA_DIR/bin/llama-batched-bench" ]; then
  LLAMA_DIR="$LLAMA_DIR" tools/build_llama_cpp.sh
fi
if [ ! -f "$GGUF" ]; then
  PYTHONPATH="$LLAMA_DIR/llama.cpp/gguf-py" "$HF_PYTHON" "$LLAMA_DIR/llama.cpp/convert_hf_to_gguf.py" \
    "$MODEL" --outtype bf16 --outfile "$GGUF"
fi
if [ -n "${HF_BATCH1:-}" ] && [ "${SKIP_HF_DIR:-0}" != 1 ]; then
  echo "== transformers (tools/bench_hf.py): $HF_BATCH1 prompts x 32 new tokens, batch 1, $THREADS threads, router hooks"
  "$HF_PYTHON" tools/bench_hf.py --model "$MODEL" -n "$HF_BATCH1" --max-new-tokens 32 --batch-size 1 \
    --threads "$THREADS" --dtype bf16 --json "$OUT/transformers-b1.json" > "$OUT/transformers-b1.log" 2>&1
  cat "$OUT/transformers-b1.json"; echo
fi
echo "llama.cpp $("$LLAMA_DIR/bin/llama-bench" --version 2>&1 | grep -m1 version || true)"

SOURCES=""
[ "${SKIP_HF_DIR:-0}" != 1 ] && SOURCES="hf"
[ "${ON_GGUF:-0}" = 1 ] && SOURCES="$SOURCES gguf"
for src in $SOURCES; do
  if [ "$src" = hf ]; then M="$MODEL"; TAG=""; else M="$GGUF"; TAG="-gguf"; fi
  for k in $KERNELS; do
    for n in 8 80; do
      echo "== moe-xray bench model ($src: $M): $n prompts x 32 new tokens, batch $n, $THREADS threads, events capture, MOE_XRAY_KERNEL=$k"
      MOE_XRAY_KERNEL=$k "$BIN" bench model --model "$M" -n "$n" --max-new-tokens 32 \
        --batch-size "$n" --threads "$THREADS" --capture events --skip-null --scratch "$OUT" --json \
        > "$OUT/moe-xray-$k-$n$TAG.json"
      grep -E '"(kernel|tokens_per_second|prefill_tokens_per_second|decode_tokens_per_second|peak_rss_bytes)"' \
        "$OUT/moe-xray-$k-$n$TAG.json" | tr -s ' ' | tr '\n' ' '
      echo
    done
  done
done

echo "== llama-batched-bench -npp 22 -ntg 32 -npl 8,80 -t $THREADS ($GGUF)"
"$LLAMA_DIR/bin/llama-batched-bench" -m "$GGUF" -c 4608 -b 2048 -ub 512 -npp 22 -ntg 32 \
  -npl 8,80 -t "$THREADS" -tb "$THREADS" --output-format jsonl 2>"$OUT/llama-batched-bench.log" |
  grep '^{' > "$OUT/llama-batched-bench.jsonl"
cat "$OUT/llama-batched-bench.jsonl"
if [ "${SKIP_LLAMA_BENCH:-0}" != 1 ]; then
  echo "== llama-bench -p 512 -n 32 -t $THREADS"
  "$LLAMA_DIR/bin/llama-bench" -m "$GGUF" -p 512 -n 32 -t "$THREADS" -o md 2>/dev/null |
    tee "$OUT/llama-bench.md"
fi

"$HF_PYTHON" - "$OUT" "$KERNELS" "$SOURCES" <<'EOF'
import json, os, sys
out, kernels, sources = sys.argv[1], sys.argv[2].split(), sys.argv[3].split()
ll = {r["pl"]: r for r in map(json.loads, open(f"{out}/llama-batched-bench.jsonl"))}
print()
print("moe-xray bench model (events capture) vs llama-batched-bench (same GGUF, -npp 22 -ntg 32,"
      " prompt not shared); tok/s = processed tokens / time")
print(f"{'':6}{'kernel':>13}{'prefill':>10}{'decode':>10}{'total':>10}   "
      f"{'llama pp':>9}{'llama tg':>9}{'llama':>9}{'ratio':>8}")
hf = None
if os.path.exists(f"{out}/transformers-b1.json"):
    hf = json.load(open(f"{out}/transformers-b1.json"))
for src, k in ((s, k) for s in sources for k in kernels):
  tag = "" if src == "hf" else "-gguf"
  print(f"moe-xray on the {'safetensors checkpoint' if src == 'hf' else 'same GGUF file'}:")
  for n in (8, 80):
        mx = json.load(open(f"{out}/moe-xray-{k}-{n}{tag}.json"))
        cap = next(p for p in mx["passes"] if p["sink"] != "null")
        r = ll.get(n)
        row = (f"{n:>3} pr{mx['kernel']:>13}{cap['prefill_tokens_per_second']:>10.2f}"
               f"{cap['decode_tokens_per_second']:>10.2f}{cap['tokens_per_second']:>10.2f}   ")
        if r:
            row += (f"{r['speed_pp']:>9.2f}{r['speed_tg']:>9.2f}{r['speed']:>9.2f}"
                    f"{cap['tokens_per_second'] / r['speed']:>7.2f}x")
        print(row)
print("ratio = moe-xray total / llama.cpp total (S t/s); > 1: moe-xray is faster")
if hf:
    t = hf.get("tokens_per_second") or next(p for p in hf["passes"] if p.get("sink") != "null")["tokens_per_second"]
    print(f"transformers batch 1 (its fastest setting here; router hooks): {t:.2f} tok/s")
    for src, k in ((s, k) for s in sources for k in kernels):
        tag = "" if src == "hf" else "-gguf"
        for n in (8, 80):
            mx = json.load(open(f"{out}/moe-xray-{k}-{n}{tag}.json"))
            cap = next(p for p in mx["passes"] if p["sink"] != "null")
            print(f"  moe-xray {src} {k} {n} prompts / transformers batch 1: {cap['tokens_per_second'] / t:.2f}x")
EOF
