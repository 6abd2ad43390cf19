#!/usr/bin/env bash
# Lay out the TVM runtime (shared libraries + C++ headers) that the edge runner links against, per architecture:
#
#   build/tvm-x86_64/{lib/libtvm_runtime.so,lib/libtvm_ffi.so,include/{tvm/runtime,tvm/ffi,dlpack}}
#   build/tvm-aarch64/... (the same, from the manylinux aarch64 wheels)
#
# x86-64 comes from the apache-tvm / apache-tvm-ffi wheels installed in the Python environment; aarch64 is
# downloaded with pip (same versions) into build/wheels and unpacked. Nothing is built from source.
#
# usage: scripts/fetch_tvm_runtime.sh [x86_64|aarch64|all]   (default: all)
# env:   PYTHON (default: .venv/bin/python, else python3), LLMPRESS_BUILD (default: <repo>/build)
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BUILD="${LLMPRESS_BUILD:-$REPO/build}"
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$REPO/.venv/bin/python" ]]; then PYTHON="$REPO/.venv/bin/python"; else PYTHON=python3; fi
fi
WHAT="${1:-all}"

TVM_VERSION="$("$PYTHON" -c 'from importlib.metadata import version; print(version("apache-tvm"))')"
FFI_VERSION="$("$PYTHON" -c 'from importlib.metadata import version; print(version("apache-tvm-ffi"))')"

# Copy the runtime out of a site-packages-like root ($1) into build/tvm-<arch> ($2).
layout() {
  local root="$1" dest="$2"
  for f in "$root/tvm/lib/libtvm_runtime.so" "$root/tvm_ffi/lib/libtvm_ffi.so" \
           "$root/tvm_ffi/include/tvm/ffi" "$root/tvm_ffi/include/dlpack"; do
    [[ -e "$f" ]] || { echo "fetch_tvm_runtime: $f missing (is this an apache-tvm $TVM_VERSION wheel?)" >&2; exit 1; }
  done
  rm -rf "$dest.tmp" && mkdir -p "$dest.tmp/lib" "$dest.tmp/include/tvm"
  cp "$root/tvm/lib/libtvm_runtime.so" "$root/tvm_ffi/lib/libtvm_ffi.so" "$dest.tmp/lib/"
  cp -r "$root/tvm_ffi/include/tvm/ffi" "$dest.tmp/include/tvm/"
  cp -r "$root/tvm_ffi/include/dlpack" "$dest.tmp/include/"
  [[ -d "$root/tvm/include/tvm/runtime" ]] && cp -r "$root/tvm/include/tvm/runtime" "$dest.tmp/include/tvm/"
  echo "apache-tvm==$TVM_VERSION apache-tvm-ffi==$FFI_VERSION" > "$dest.tmp/VERSION"
  rm -rf "$dest" && mv "$dest.tmp" "$dest"
  echo "fetch_tvm_runtime: $dest ready ($(cat "$dest/VERSION"))"
}

fetch_x86_64() {
  local site
  site="$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
  layout "$site" "$BUILD/tvm-x86_64"
}

fetch_aarch64() {
  local wheels="$BUILD/wheels" unpack="$BUILD/wheels/aarch64"
  mkdir -p "$wheels"
  if ! ls "$wheels"/apache_tvm-"$TVM_VERSION"-*aarch64*.whl >/dev/null 2>&1 \
     || ! ls "$wheels"/apache_tvm_ffi-"$FFI_VERSION"-*aarch64*.whl >/dev/null 2>&1; then
    "$PYTHON" -m pip download --no-deps --only-binary=:all: --platform manylinux_2_28_aarch64 \
      --python-version 3.11 "apache-tvm==$TVM_VERSION" "apache-tvm-ffi==$FFI_VERSION" -d "$wheels"
  fi
  rm -rf "$unpack" && mkdir -p "$unpack"
  # Only the runtime parts: the compiler library (~250 MB) is not needed on the device.
  "$PYTHON" - "$wheels" "$unpack" "$TVM_VERSION" "$FFI_VERSION" <<'PY'
import sys, zipfile
from pathlib import Path
wheels, out, tvm_v, ffi_v = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], sys.argv[4]
want = ("tvm/lib/libtvm_runtime.so", "tvm_ffi/lib/libtvm_ffi.so", "tvm/include/", "tvm_ffi/include/")
for pattern in (f"apache_tvm-{tvm_v}-*aarch64*.whl", f"apache_tvm_ffi-{ffi_v}-*aarch64*.whl"):
    whl = sorted(wheels.glob(pattern))[0]
    with zipfile.ZipFile(whl) as z:
        for name in z.namelist():
            if name.startswith(want) and not name.endswith("/"):
                z.extract(name, out)
PY
  layout "$unpack" "$BUILD/tvm-aarch64"
}

case "$WHAT" in
  x86_64) fetch_x86_64 ;;
  aarch64) fetch_aarch64 ;;
  all) fetch_x86_64; fetch_aarch64 ;;
  *) echo "usage: $0 [x86_64|aarch64|all]" >&2; exit 2 ;;
esac
