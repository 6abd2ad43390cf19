"""TVM kernels for the llmpress compressed ops (imported only by the TVM backend; imports TVM).

Each op family has one file holding its TE definition, its ``custom_convert_map`` converter and its CPU schedule:

- ``wq_linear``: weight-only quantized linear, dequantization fused into the matmul reduction;
- ``w8a8``: per-token dynamic int8 activation quantization + int8 x int8 -> int32 matmul + rescale;
- ``kv_quant``: per (batch, head, token) fake quantization of new keys/values.

Use: add :data:`CONVERTERS` to the importer's ``custom_convert_map``, then run :func:`schedule_kernels` (a Relax
module pass) on the imported module before ``tvm.compile``; see ``common.py`` for why the split.
"""
from __future__ import annotations

from .common import KERNEL_ATTR, lowered_float_allocations, schedule_kernels
from .wq_linear import convert_wq_linear

__all__ = ["CONVERTERS", "KERNEL_ATTR", "schedule_kernels", "lowered_float_allocations", "convert_wq_linear"]

# FX target name (``node.target.__name__`` of ``torch.ops.llmpress.<op>.default``) -> converter(node, importer).
CONVERTERS = {
    "wq_linear.default": convert_wq_linear,
}
