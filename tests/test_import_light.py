"""`import llmpress` stays light: TVM and ONNX Runtime load only when a backend needs them."""
from __future__ import annotations

import subprocess
import sys


def test_import_does_not_load_heavy_backends():
    code = ("import sys, llmpress, llmpress.ir, llmpress.passes.base, llmpress.api, llmpress.cli; "
            "print(','.join(m for m in ('tvm', 'onnxruntime') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
