"""Run an exported ONNX file in ONNX Runtime with llmpress's calling convention.

``OrtProgram(path)(input_ids, start_pos, *caches) -> (logits, *caches)`` takes and returns torch tensors, so the
generator (``llmpress.eval.generate.greedy``) and the perplexity evaluator use an ONNX model exactly like any
other backend's program. The caches are whatever ``lm.cache_specs()`` lists (float32 ``k_i``/``v_i``, or int8
codes + float32 scales after ``kv_quant(storage="int8")``); ``OrtProgram.empty_cache()`` allocates them from the
specs stored in the file, and an input of the wrong dtype is refused with the input's name and the dtype the
model takes (ONNX Runtime would not convert it).

W8A8 in the QDQ form (``llmpress.w8a8 = "qdq"``) on ORT's CPU provider: no CPU kernel fuses a MatMul whose
activation scale is per token (QDQ fusion wants a per-tensor activation scale), and ORT's constant folding keeps
``DequantizeLinear`` nodes so that QDQ fusions can see them, so by default every int8 weight is dequantized again at
each call (int8 weights resident). ``fold_qdq_weights=True`` sets ORT's ``session.disable_quant_qdq``, under which
constant folding dequantizes the weights once at load (the profile then shows DequantizeLinear on activations only),
at the cost of float32 weights in memory (4x the int8 bytes). ``benchmarks/onnx_w8a8.py`` measures the forms side by
side (tinystories-llama after ``smoothquant``, one thread; ``benchmarks/results/onnx_w8a8.md``): decode at 0.21x of
fp32 for QDQ, 0.82x for QDQ with folded weights, 0.42x for the ``integer`` form. Activations are still quantized
per token either way; the outputs differ only by float32 summation order (which can move an activation across a
rounding boundary, see ``llmpress_ops``).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ...errors import ArtifactError
from ...eval.generate import empty_cache
from ...ir.meta import LMInfo

__all__ = ["OrtProgram"]

_ORT_TO_NP = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
              "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(int8)": np.int8,
              "tensor(uint8)": np.uint8, "tensor(bool)": np.bool_}


class OrtProgram:
    """An ``onnxruntime.InferenceSession`` over ``path``; positional inputs in the model's input order."""

    def __init__(self, path: str | Path, *, threads: int | None = None, optimize: bool = True,
                 fold_qdq_weights: bool = False) -> None:
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
        if fold_qdq_weights:  # see the module docstring: constant folding then dequantizes int8 weights once
            so.add_session_config_entry("session.disable_quant_qdq", "1")
        try:
            self.session = ort.InferenceSession(str(self.path), so, providers=["CPUExecutionProvider"])
        except Exception as e:  # noqa: BLE001 - ORT raises its own exception types
            raise ArtifactError(f"{self.path}: ONNX Runtime cannot load the model: {e}") from e
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self._input_dtypes = [_ORT_TO_NP.get(i.type) for i in self.session.get_inputs()]
        self.metadata: dict[str, str] = dict(self.session.get_modelmeta().custom_metadata_map)
        props = self.metadata
        self.lm = LMInfo.from_json(json.loads(props["llmpress.lm"])) if "llmpress.lm" in props else None

    def empty_cache(self, batch: int = 1) -> list[torch.Tensor]:
        """Zero-filled caches for ``batch`` sequences, from the cache specs stored in the file."""
        if self.lm is None:
            raise ArtifactError(f"{self.path}: not a language model (no llmpress.lm metadata), so it has no cache")
        return empty_cache(self.lm, batch)

    def forward(self, *inputs: Any) -> tuple[torch.Tensor, ...]:
        if len(inputs) != len(self.input_names):
            raise ArtifactError(f"{self.path}: the model takes {len(self.input_names)} inputs "
                                f"({', '.join(self.input_names)}), got {len(inputs)}")
        feeds = {}
        for name, want, x in zip(self.input_names, self._input_dtypes, inputs):
            arr = _numpy(x)
            if want is not None and arr.dtype != want:
                raise ArtifactError(f"{self.path}: input {name!r} must be {np.dtype(want).name}, got "
                                    f"{arr.dtype.name} (allocate caches with empty_cache() from the model's "
                                    "cache specs)")
            feeds[name] = arr
        return tuple(torch.from_numpy(o) for o in self.session.run(self.output_names, feeds))

    __call__ = forward


def _numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().contiguous().numpy()
    return np.asarray(x)
