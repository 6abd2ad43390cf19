#!/usr/bin/env bash
# Set up everything the test suite needs (venv, aarch64 cross toolchain, qemu, the aarch64 TVM runtime) and run it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if [ -f .ci/install-cross.sh ]; then
  bash .ci/install-cross.sh || echo "warning: cross toolchain setup failed; the arm64 edge tests will say why they skip" >&2
fi
# One pytest-xdist worker per core (at most 4: each worker holds its own torch/TVM state), a test file per unit of
# work and the file groups of tests/conftest.py on one worker; `-n 0` among the arguments runs in one process.
workers=$(nproc 2>/dev/null || echo 1)
(( workers > 4 )) && workers=4
dist=()
(( workers > 1 )) && dist=(-n "$workers" --dist loadfile)
exec .venv/bin/python -m pytest -q ${dist[@]+"${dist[@]}"} "$@"
