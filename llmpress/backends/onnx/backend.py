"""The ``onnx`` target: export the rewritten IR to ``model.onnx`` and run it in ONNX Runtime.

``llmpress compile MODEL --pipeline w4a16 --target onnx -o DIR`` gives an artifact whose payload is one ONNX file
(weight-only layers as ``com.microsoft.MatMulNBits``, W8A8 as ``MatMulInteger``); ``llmpress eval``/``run`` load it
through ``OrtProgram`` with the same calling convention as every other backend.
"""
from __future__ import annotations

import platform
import shutil
import tempfile
from pathlib import Path
from typing import Any

from ...errors import ArtifactError
from ...ir.module import Module
from ..base import Backend, Compiled, Unsupported

__all__ = ["OnnxBackend", "OnnxCompiled"]

_FILE = "model.onnx"


class OnnxCompiled(Compiled):
    backend = "onnx"

    def __init__(self, path: Path, *, owns_dir: bool) -> None:
        from .runtime import OrtProgram

        self.path = path
        self._owns_dir = owns_dir
        self.program = OrtProgram(path)

    def forward(self, *inputs: Any) -> Any:
        out = self.program.forward(*inputs)
        return out if len(out) > 1 else out[0]

    def target_json(self) -> dict:
        return {"name": "onnx", "spec": {"opset": 18, "runtime": "onnxruntime"}, "arch": "any", "device": "cpu",
                "host": platform.machine()}

    def save_payload(self, folder: Path) -> dict:
        shutil.copy2(self.path, folder / _FILE)
        return {"model": _FILE}

    def __del__(self) -> None:
        if getattr(self, "_owns_dir", False):
            shutil.rmtree(self.path.parent, ignore_errors=True)


class OnnxBackend(Backend):
    name = "onnx"

    def supports(self, target: Any) -> bool:
        return target == "onnx"

    def check(self, module: Module, target: Any) -> list[Unsupported]:
        from .export import check

        return check(module)

    def lower(self, module: Module, target: Any = "onnx", *, progress: bool = True) -> OnnxCompiled:
        from .export import export

        tmp = Path(tempfile.mkdtemp(prefix="llmpress-onnx-"))
        try:
            export(module, tmp / _FILE, progress=progress)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return OnnxCompiled(tmp / _FILE, owns_dir=True)

    def load(self, folder: Path, manifest: dict) -> OnnxCompiled:
        path = folder / manifest["payload"].get("model", _FILE)
        if not path.is_file():
            raise ArtifactError(f"{path}: missing from the artifact")
        return OnnxCompiled(path, owns_dir=False)
