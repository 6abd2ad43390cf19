#!/usr/bin/env bash
# Create .venv (if missing) and install llmpress with its pinned dependencies. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
# torch==2.13.0 is pinned in pyproject.toml; its CPU build is what pip finds first on these machines.
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[test]" 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -c "import llmpress, torch, tvm; print('llmpress', llmpress.__version__, '| torch', torch.__version__, '| tvm', tvm.__version__)"
