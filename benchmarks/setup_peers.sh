#!/usr/bin/env bash
# Install the optional peer runtimes (benchmarks/requirements-peers.txt) into the project venv .venv. Idempotent.
#
# llama-cpp-python is built from source (so llama.cpp is compiled with -DGGML_NATIVE=ON for this CPU, like a
# user's local build) ONCE into benchmarks/.cache/wheels/; later runs reuse that wheel. The build took 255 s on
# this 2-core EPYC (longer on a busy machine) and runs under `nice -n 19`. Delete the wheel to rebuild, e.g. on
# another CPU: the wheel is native.
# Also extracts llama.cpp's HF -> GGUF conversion scripts from the sdist to benchmarks/.cache/llama.cpp/.
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
