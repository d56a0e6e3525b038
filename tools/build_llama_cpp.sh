#!/usr/bin/env bash
# Builds llama.cpp's benchmark tools (llama-batched-bench, llama-bench, llama-quantize) from the
# source distribution that the llama-cpp-python package publishes on PyPI (its vendor/llama.cpp),
# at a pinned version, into $LLAMA_DIR (default /work/llama, outside the repository).
#
#   tools/build_llama_cpp.sh            # -> $LLAMA_DIR/bin/llama-batched-bench, llama-bench, ...
#
# Needs: python3 (venv + pip), gcc/g++, make. cmake comes from PyPI (pinned in
# tools/requirements-llama.txt) into $LLAMA_DIR/venv. The build is native (-DGGML_NATIVE=ON:
# llama.cpp's default, it uses every instruction-set extension of the CPU it is built on, e.g.
# AVX-512 BF16 / VNNI), CPU only, without curl. It prints the vendored llama.cpp commit.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
LLAMA_CPP_PYTHON_VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
LLAMA_DIR="${LLAMA_DIR:-/work/llama}"
JOBS="${JOBS:-$(nproc)}"
mkdir -p "$LLAMA_DIR"
if [ ! -x "$LLAMA_DIR/venv/bin/cmake" ]; then
  python3 -m venv "$LLAMA_DIR/venv"
  "$LLAMA_DIR/venv/bin/pip" install -q -r "$here/requirements-llama.txt"
fi
sdist="$LLAMA_DIR/sdist/llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION.tar.gz"
if [ ! -f "$sdist" ]; then
  # --no-build-isolation: pip prepares the sdist's metadata with the scikit-build-core wheel of
  # the venv instead of building its build dependencies (cmake, ninja) from source.
  "$LLAMA_DIR/venv/bin/pip" download --no-binary :all: --no-deps --no-build-isolation \
    "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION" -d "$LLAMA_DIR/sdist"
fi
src="$LLAMA_DIR/src/llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION"
if [ ! -d "$src" ]; then
  mkdir -p "$LLAMA_DIR/src"
  tar xzf "$sdist" -C "$LLAMA_DIR/src"
fi
cpp="$src/vendor/llama.cpp"
build="$LLAMA_DIR/build-$LLAMA_CPP_PYTHON_VERSION"
"$LLAMA_DIR/venv/bin/cmake" -S "$cpp" -B "$build" -DCMAKE_BUILD_TYPE=Release \
  -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DBUILD_SHARED_LIBS=OFF \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF >/dev/null
"$LLAMA_DIR/venv/bin/cmake" --build "$build" -j "$JOBS" \
  --target llama-batched-bench llama-bench llama-quantize
mkdir -p "$LLAMA_DIR/bin"
for t in llama-batched-bench llama-bench llama-quantize; do
  ln -sf "$build/bin/$t" "$LLAMA_DIR/bin/$t"
done
ln -sfn "$cpp" "$LLAMA_DIR/llama.cpp"
echo "llama-cpp-python $LLAMA_CPP_PYTHON_VERSION, vendored llama.cpp:"
"$LLAMA_DIR/bin/llama-bench" --version 2>&1 | head -3 || true
