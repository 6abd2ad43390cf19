#!/usr/bin/env bash
# Tools for the edge-runner checks: the aarch64 cross compiler, qemu user-mode emulation, CMake; then the TVM
# runtime (libraries + headers from the apache-tvm wheels) for x86-64 and aarch64 under build/tvm-<arch>/.
# Called by .ci/run; safe to run again (apt and the fetch script skip what is already there).
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SUDO=""
if [[ "$(id -u)" != "0" ]] && command -v sudo >/dev/null; then SUDO="sudo"; fi
need=()
for tool in aarch64-linux-gnu-g++ qemu-aarch64 cmake; do command -v "$tool" >/dev/null || need+=("$tool"); done
if (( ${#need[@]} )); then
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -q
  $SUDO apt-get install -y --no-install-recommends gcc-aarch64-linux-gnu g++-aarch64-linux-gnu qemu-user cmake
fi
"$REPO/scripts/fetch_tvm_runtime.sh" all
