"""Run an exported ONNX file in ONNX Runtime with llmpress's calling convention.

``OrtProgram(path)(input_ids, start_pos, *caches) -> (logits, *caches)`` takes and returns torch tensors, so the
generator (``llmpress.eval.generate.greedy``) and the perplexity evaluator use an ONNX model exactly like any
other backend's program.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ...errors import ArtifactError
from ...ir.meta import LMInfo

__all__ = ["OrtProgram"]


class OrtProgram:
    """An ``onnxruntime.InferenceSession`` over ``path``; positional inputs in the model's input order."""

    def __init__(self, path: str | Path, *, threads: int | None = None, optimize: bool = True) -> None:
        import onnxruntime as ort

        self.path = Path(path)
        if not self.path.exists():
            raise ArtifactError(f"{self.path}: no such ONNX file")
        so = ort.SessionOptions()
        if threads is not None:
            so.intra_op_num_threads = threads
            so.inter_op_num_threads = 1
        if not optimize:
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        try:
            self.session = ort.InferenceSession(str(self.path), so, providers=["CPUExecutionProvider"])
        except Exception as e:  # noqa: BLE001 - ORT raises its own exception types
            raise ArtifactError(f"{self.path}: ONNX Runtime cannot load the model: {e}") from e
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        props = self.session.get_modelmeta().custom_metadata_map
        self.lm = LMInfo.from_json(json.loads(props["llmpress.lm"])) if "llmpress.lm" in props else None

    def forward(self, *inputs: Any) -> tuple[torch.Tensor, ...]:
        if len(inputs) != len(self.input_names):
            raise ArtifactError(f"{self.path}: the model takes {len(self.input_names)} inputs "
                                f"({', '.join(self.input_names)}), got {len(inputs)}")
        feeds = {n: _numpy(x) for n, x in zip(self.input_names, inputs)}
        return tuple(torch.from_numpy(o) for o in self.session.run(self.output_names, feeds))

    __call__ = forward


def _numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().contiguous().numpy()
    return np.asarray(x)
