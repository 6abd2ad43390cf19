"""The ``onnx`` targets: export the rewritten IR to ``model.onnx`` and run it in ONNX Runtime.

``llmpress compile MODEL --pipeline w4a16 --target onnx -o DIR`` gives an artifact whose payload is one ONNX file
(weight-only layers as ``com.microsoft.MatMulNBits``, W8A8 as QuantizeLinear/DequantizeLinear + MatMul);
``llmpress eval``/``run`` load it through ``OrtProgram`` with the same calling convention as every other backend.

Targets (``TARGETS``): ``"onnx"`` and ``"onnx:qdq"`` export W8A8 layers as QDQ, ``"onnx:integer"`` as
``MatMulInteger`` (see ``llmpress_ops``); any other ``"onnx:..."`` is a ``ConfigError`` listing these, raised when
the target is chosen, before any work. The form is recorded in the manifest's target spec (``"w8a8"``) and in the
ONNX file's metadata (``llmpress.w8a8``).

Sparse layers (``sparsify``, alone or under a quantizer) are exported dense-equivalent: their zeros are ordinary
values of the MatMul / MatMulNBits weight. The payload says so per layer (``sparse_layers``: ``{source path:
{"pattern", "sparsity", "stored": "dense-equivalent", "why"}}``), so nobody reads the file size or ORT's speed as
a sparse one.
"""
from __future__ import annotations

import platform
import shutil
import tempfile
from pathlib import Path
from typing import Any

from ...errors import ArtifactError, ConfigError
from ...ir.module import Module
from ..base import Backend, Compiled, Unsupported

__all__ = ["OnnxBackend", "OnnxCompiled", "TARGETS", "target_options", "sparse_layers", "SPARSE_WHY"]

_FILE = "model.onnx"
#: Why ``sparse_layers`` are stored dense-equivalent.
SPARSE_WHY = ("ONNX has no sparse matmul op that ONNX Runtime's CPU provider runs: the zeros are stored and "
              "multiplied as ordinary weights")

# target -> export options; "onnx" is the default form
TARGETS: dict[str, dict[str, str]] = {"onnx": {"w8a8": "qdq"}, "onnx:qdq": {"w8a8": "qdq"},
                                      "onnx:integer": {"w8a8": "integer"}}


def target_options(target: Any) -> dict[str, str]:
    """Export options of an ``onnx`` target string (``ConfigError`` listing the targets for an unknown one)."""
    if target not in TARGETS:
        raise ConfigError(f"unknown ONNX target {target!r}: choose one of {', '.join(TARGETS)} ('onnx' = 'onnx:qdq': "
                          "W8A8 as QuantizeLinear/DequantizeLinear + MatMul; 'onnx:integer': W8A8 as MatMulInteger)")
    return dict(TARGETS[target])


class OnnxCompiled(Compiled):
    backend = "onnx"

    def __init__(self, path: Path, *, owns_dir: bool, sparse_layers: dict | None = None) -> None:
        from .runtime import OrtProgram

        self.path = path
        self.sparse_layers = dict(sparse_layers or {})
        self._owns_dir = owns_dir
        self.program = OrtProgram(path)
        self.w8a8 = self.program.metadata.get("llmpress.w8a8", "integer")  # files from before the option: integer

    def forward(self, *inputs: Any) -> Any:
        out = self.program.forward(*inputs)
        return out if len(out) > 1 else out[0]

    def set_threads(self, threads: int | None) -> None:
        from .runtime import OrtProgram

        self.program = OrtProgram(self.path, threads=threads)  # ORT fixes its intra-op threads per session

    def target_json(self) -> dict:
        return {"name": "onnx", "spec": {"opset": 18, "runtime": "onnxruntime", "w8a8": self.w8a8}, "arch": "any",
                "device": "cpu", "host": platform.machine()}

    def save_payload(self, folder: Path) -> dict:
        shutil.copy2(self.path, folder / _FILE)
        payload: dict[str, Any] = {"model": _FILE}
        if self.sparse_layers:  # only then: dense models keep the payload they had
            payload["sparse_layers"] = self.sparse_layers
        return payload

    def __del__(self) -> None:
        if getattr(self, "_owns_dir", False):
            shutil.rmtree(self.path.parent, ignore_errors=True)


class OnnxBackend(Backend):
    name = "onnx"

    def supports(self, target: Any) -> bool:
        """Every ``"onnx"`` / ``"onnx:<form>"`` string; an unknown form raises ``ConfigError`` here, so a typo fails
        when the target is chosen rather than after the passes ran."""
        if not isinstance(target, str) or not (target == "onnx" or target.startswith("onnx:")):
            return False
        target_options(target)
        return True

    def check(self, module: Module, target: Any) -> list[Unsupported]:
        from .export import check

        return check(module)

    def lower(self, module: Module, target: Any = "onnx", *, progress: bool = True) -> OnnxCompiled:
        from .export import export

        opts = target_options(target)
        tmp = Path(tempfile.mkdtemp(prefix="llmpress-onnx-"))
        try:
            export(module, tmp / _FILE, progress=progress, **opts)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return OnnxCompiled(tmp / _FILE, owns_dir=True, sparse_layers=sparse_layers(module))

    def load(self, folder: Path, manifest: dict) -> OnnxCompiled:
        path = folder / manifest["payload"].get("model", _FILE)
        if not path.is_file():
            raise ArtifactError(f"{path}: missing from the artifact")
        return OnnxCompiled(path, owns_dir=False, sparse_layers=manifest["payload"].get("sparse_layers"))


def sparse_layers(module: Module) -> dict[str, dict]:
    """Every linear ``sparsify`` ran on (its record, carried onto a later ``wq_linear``), by source path, as the
    payload's ``sparse_layers`` entry: exported dense-equivalent."""
    from ...ir.meta import compression, source_path

    out: dict[str, dict] = {}
    for node in module.graph.nodes:
        spec = compression(node) or {}
        if "sparsity" in spec and "pattern" in spec:
            out[source_path(node) or node.name] = {"pattern": spec["pattern"], "sparsity": spec["sparsity"],
                                                   "stored": "dense-equivalent", "why": SPARSE_WHY}
    return out
