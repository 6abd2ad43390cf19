#!/usr/bin/env bash
# Set up everything the test suite needs (venv, aarch64 cross toolchain, qemu, the aarch64 TVM runtime) and run it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if [ -f .ci/install-cross.sh ]; then
  bash .ci/install-cross.sh || echo "warning: cross toolchain setup failed; the arm64 edge tests will say why they skip" >&2
fi
exec .venv/bin/python -m pytest -q "$@"
