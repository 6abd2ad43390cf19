"""TVM kernels for the llmpress compressed ops.

Each op family has one file holding its TE definition, its ``custom_convert_map`` converter and its CPU schedule:

- ``wq_linear``: weight-only quantized linear, dequantization fused into the matmul reduction;
- ``w8a8``: per-token dynamic int8 activation quantization + int8 x int8 -> int32 matmul + rescale;
- ``kv_quant``: per (batch, head, token) quantization of new keys/values (fake, or int8 codes + scales
  for an int8 cache, dequantized where attention reads it).

Use: merge :data:`CONVERTERS` into the importer's converters, then schedule with :func:`kernel_rule` (first rule of a
CPU ``ApplyDefaultSchedule``) or :func:`schedule_kernels` (a module pass); see ``common.py`` for the design.

Importing this package does not import TVM (the TVM backend package promises that); the converters and helpers
below import their modules on first use.
"""
from __future__ import annotations

from typing import Any

__all__ = ["CONVERTERS", "schedule_kernels", "kernel_rule", "specialize_decode", "lowered_float_allocations"]


def _lazy(module: str, name: str):
    def convert(node: Any, importer: Any) -> Any:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{module}"), name)(node, importer)

    convert.__name__ = name
    return convert


#: full op name -> converter(fx node, ExportedProgramImporter) -> relax value.
CONVERTERS = {
    "llmpress.wq_linear.default": _lazy("wq_linear", "convert_wq_linear"),
    "llmpress.w8a8_linear.default": _lazy("w8a8", "convert_w8a8_linear"),
    "llmpress.kv_fake_quant.default": _lazy("kv_quant", "convert_kv_fake_quant"),
    "llmpress.kv_scale.default": _lazy("kv_quant", "convert_kv_scale"),
    "llmpress.kv_codes.default": _lazy("kv_quant", "convert_kv_codes"),
    "llmpress.kv_dequant.default": _lazy("kv_quant", "convert_kv_dequant"),
}


def _load_all() -> Any:
    from . import common, kv_quant, softmax, w8a8, wq_linear  # noqa: F401 - registers the CPU schedules

    return common


def schedule_kernels(target: Any) -> Any:
    """Relax module pass giving every llmpress kernel its CPU schedule (see ``common.schedule_kernels``)."""
    return _load_all().schedule_kernels(target)


def kernel_rule() -> Any:
    """dlight ``ScheduleRule`` for the llmpress kernels on CPU (see ``common.kernel_rule``)."""
    return _load_all().kernel_rule()


def specialize_decode() -> Any:
    """Relax module pass pointing decode (T = 1) call sites at GEMV-scheduled kernel copies (see ``common``)."""
    return _load_all().specialize_decode()


def lowered_float_allocations(func: Any, target: Any) -> list[tuple[str, str]]:
    return _load_all().lowered_float_allocations(func, target)
