"""The reference backend: runs the IR in PyTorch. The oracle of every numerical test.

Its artifact payload is the exported program itself (``program.pt2``, ``torch.export.save``), so a reference
artifact can be inspected, evaluated and re-lowered later.
"""
from __future__ import annotations

import platform
from pathlib import Path
from typing import Any

import torch

from ..errors import ArtifactError
from ..ir.module import Module
from .base import Backend, Compiled

__all__ = ["ReferenceBackend", "ReferenceCompiled"]


class ReferenceCompiled(Compiled):
    backend = "reference"

    def __init__(self, module: Module) -> None:
        self.module = module
        self._fn = module.exported_program.module()

    def forward(self, *inputs: Any) -> Any:
        with torch.no_grad():
            return self._fn(*inputs)

    def target_json(self) -> dict:
        return {"name": "reference", "spec": None, "arch": "any", "device": "cpu", "host": platform.machine()}

    def save_payload(self, folder: Path) -> dict:
        _import_ops()
        torch.export.save(self.module.exported_program, str(folder / "program.pt2"))
        return {"program": "program.pt2"}


def _import_ops() -> None:
    try:  # the compressed-op library must be registered before a program holding its ops is (de)serialized
        import llmpress.ir.ops  # noqa: F401
    except ImportError:
        pass


class ReferenceBackend(Backend):
    name = "reference"

    def supports(self, target: Any) -> bool:
        return target in (None, "reference")

    def lower(self, module: Module, target: Any = "reference", *, progress: bool = True) -> ReferenceCompiled:
        return ReferenceCompiled(module)

    def load(self, folder: Path, manifest: dict) -> ReferenceCompiled:
        from ..ir.meta import LMInfo

        _import_ops()
        path = folder / manifest["payload"]["program"]
        try:
            ep = torch.export.load(str(path))
        except Exception as e:  # noqa: BLE001 - any failure here means the file is unusable
            raise ArtifactError(f"{path}: cannot load the exported program: {e}") from e
        lm = LMInfo.from_json(manifest["lm"]) if manifest.get("lm") else None
        return ReferenceCompiled(Module(ep, lm=lm, info={"source": str(folder)}))
