#!/usr/bin/env bash
# Install the optional peer runtimes (benchmarks/requirements-peers.txt) into the project venv .venv. Idempotent.
#
# llama-cpp-python is built from source (so llama.cpp is compiled with -DGGML_NATIVE=ON for this CPU, like a
# user's local build) ONCE into benchmarks/.cache/wheels/; later runs reuse that wheel. The build took 255 s on
# this 2-core EPYC (longer on a busy machine) and runs under `nice -n 19`. Delete the wheel to rebuild, e.g. on
# another CPU: the wheel is native.
# Also extracts llama.cpp's HF -> GGUF conversion scripts from the sdist to benchmarks/.cache/llama.cpp/.
#
# --avx2: also build llama.cpp for AVX2/FMA/F16C only (GGML_NATIVE=OFF, no AVX-512, no VNNI: what a machine like
# CI's runs) into benchmarks/.cache/wheels-avx2/ and unpack it to benchmarks/.cache/llamacpp-avx2/, which
# benchmarks/avx2.py imports in a child process (two llama_cpp builds cannot share one).
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION=0.3.36
CACHE=benchmarks/.cache
PY=.venv/bin/python
[ -x "$PY" ] || { echo "no .venv: run scripts/setup.sh first" >&2; exit 1; }
mkdir -p "$CACHE/sdist" "$CACHE/wheels"

SDIST="$CACHE/sdist/llama_cpp_python-$VERSION.tar.gz"
if [ ! -f "$SDIST" ]; then
  "$PY" -m pip download -q --disable-pip-version-check --no-deps --no-binary :all: \
    "llama-cpp-python==$VERSION" -d "$CACHE/sdist"
fi

WHEEL=$(ls "$CACHE"/wheels/llama_cpp_python-"$VERSION"-*.whl 2>/dev/null | head -1 || true)
if [ -z "$WHEEL" ]; then
  echo "building llama-cpp-python $VERSION from source (GGML_NATIVE=ON, a few minutes)..."
  t0=$(date +%s)
  CMAKE_ARGS="-DGGML_NATIVE=ON" CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) \
    nice -n 19 "$PY" -m pip wheel -q --disable-pip-version-check --no-deps -w "$CACHE/wheels" "$SDIST"
  WHEEL=$(ls "$CACHE"/wheels/llama_cpp_python-"$VERSION"-*.whl | head -1)
  echo "built $WHEEL in $(( $(date +%s) - t0 )) s"
else
  echo "reusing $WHEEL"
fi
"$PY" -m pip install -q --disable-pip-version-check --no-deps --force-reinstall "$WHEEL"
"$PY" -m pip install -qq --disable-pip-version-check --no-deps diskcache==5.6.3
"$PY" -m pip install -qq --disable-pip-version-check -e ".[bench]"  # matplotlib (plots), onnx-ir (ORT int4 peer)

# llama.cpp's conversion scripts (same commit as the compiled library), for benchmarks/peers/llamacpp.py::to_gguf
LCPP="$CACHE/llama.cpp"
if [ ! -f "$LCPP/convert_hf_to_gguf.py" ]; then
  rm -rf "$LCPP.tmp" && mkdir -p "$LCPP.tmp"
  tar xzf "$SDIST" -C "$LCPP.tmp" --strip-components=3 \
    "llama_cpp_python-$VERSION/vendor/llama.cpp/convert_hf_to_gguf.py" \
    "llama_cpp_python-$VERSION/vendor/llama.cpp/conversion" \
    "llama_cpp_python-$VERSION/vendor/llama.cpp/gguf-py"
  rm -rf "$LCPP" && mv "$LCPP.tmp" "$LCPP"
fi
"$PY" -c "import llama_cpp; print('llama_cpp', llama_cpp.__version__, llama_cpp.llama_print_system_info().decode())"

if [ "${1:-}" = "--avx2" ]; then
  AVX2_WHEEL=$(ls "$CACHE"/wheels-avx2/llama_cpp_python-"$VERSION"-*.whl 2>/dev/null | head -1 || true)
  if [ -z "$AVX2_WHEEL" ]; then
    echo "building llama-cpp-python $VERSION for AVX2 only (GGML_NATIVE=OFF)..."
    t0=$(date +%s)
    CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON \
-DGGML_AVX_VNNI=OFF -DGGML_AVX512=OFF -DGGML_AVX512_VNNI=OFF -DGGML_AVX512_VBMI=OFF -DGGML_AVX512_BF16=OFF" \
      CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) \
      nice -n 19 "$PY" -m pip wheel -q --disable-pip-version-check --no-deps -w "$CACHE/wheels-avx2" "$SDIST"
    AVX2_WHEEL=$(ls "$CACHE"/wheels-avx2/llama_cpp_python-"$VERSION"-*.whl | head -1)
    echo "built $AVX2_WHEEL in $(( $(date +%s) - t0 )) s"
  fi
  rm -rf "$CACHE/llamacpp-avx2" && "$PY" -m pip install -q --disable-pip-version-check --no-deps \
    --target "$CACHE/llamacpp-avx2" "$AVX2_WHEEL"
  PYTHONPATH="$CACHE/llamacpp-avx2" "$PY" -c \
    "import llama_cpp; print('llama_cpp (AVX2 build)', llama_cpp.llama_print_system_info().decode())"
fi
