"""ONNX Runtime's own int4 weight quantizer as a peer: ``MatMulNBitsQuantizer`` on llmpress's fp32 ONNX export.

The fp32 file comes from ``llmpress.backends.onnx.export(module, path)``; ORT's quantizer rewrites every
``MatMul`` whose weight is a constant into ``MatMulNBits`` (4 bits, symmetric, one float scale per ``block_size``
weights along the input dimension), the lm_head included (``benchmarks/quality.py`` excludes it to match llmpress's
own int4 recipe; here the peer is ORT's quantizer as a user would run it on the whole model). ``accuracy_level``
picks the kernel's compute type: 0 (attribute left out) dequantizes to float32 and runs an fp32 GEMM; 4 quantizes
the activations to int8 per block at run time and uses integer dot products (faster, slightly less exact).

The result runs through ``llmpress.backends.onnx.OrtProgram``, so ``llmpress.eval.latency.measure`` times it with
the same calling convention (``program(ids, start_pos, *caches) -> (logits, *caches)``) as llmpress's own files.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

__all__ = ["quantize_int4", "count_ops"]

_EXTERNAL_DATA_BYTES = 3 << 29  # above 1.5 GiB of initializers, save as external data (protobuf's limit is 2 GiB)


def quantize_int4(fp32_path: str | Path, out_path: str | Path, *, block_size: int = 128, accuracy_level: int = 0,
                  threads: int | None = None) -> Any:
    """Quantize ``fp32_path`` to ``out_path`` (reused when it exists) and return an ``OrtProgram`` over it with
    ``threads`` intra-op threads. Use ``count_ops(out_path)`` to see how many MatMuls were converted."""
    from llmpress.backends.onnx import OrtProgram

    out = Path(out_path)
    if not out.is_file():
        import onnx
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        # accuracy_level 0 means "unset" to MatMulNBits; the quantizer writes the attribute only when it is truthy
        q = MatMulNBitsQuantizer(onnx.load(str(fp32_path)), bits=4, block_size=block_size, is_symmetric=True,
                                 accuracy_level=accuracy_level or None)
        logging.getLogger(q.__module__).setLevel(logging.WARNING)  # one INFO line per skipped MatMul otherwise
        q.process()
        size = sum(len(t.raw_data) for t in q.model.model.graph.initializer)
        out.parent.mkdir(parents=True, exist_ok=True)
        q.model.save_model_to_file(str(out), use_external_data_format=size > _EXTERNAL_DATA_BYTES)
    return OrtProgram(out, threads=threads)


def count_ops(path: str | Path) -> dict[str, int]:
    """Number of nodes per op type among MatMul / MatMulNBits / Gather / GatherBlockQuantized (what was quantized)."""
    import onnx

    counts: dict[str, int] = {}
    for node in onnx.load(str(path), load_external_data=False).graph.node:
        if node.op_type in ("MatMul", "MatMulNBits", "Gather", "GatherBlockQuantized"):
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts
