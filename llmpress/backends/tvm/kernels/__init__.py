"""TVM kernels for the llmpress compressed ops.

Each op family has one file holding its TE definition, its ``custom_convert_map`` converters and its CPU schedules
(a module-level ``CPU_SCHEDULES`` dict, kernel tag -> schedule):

- ``wq_linear``: weight-only quantized linear, dequantization fused into the matmul reduction;
- ``w8a8``: per-token dynamic int8 activation quantization + int8 x int8 -> int32 matmul + rescale;
- ``kv_quant``: per (batch, head, token) quantization of new keys/values (fake, or int8 codes + scales
  for an int8 cache, dequantized where attention reads it).

Which op lowers through which converter, and which file schedules which kernel, is written once, in
``table.OPS`` (see ``table.py``); :data:`CONVERTERS` and the schedule lookup are derived from it. Adding an op here:
its converter and ``CPU_SCHEDULES`` in the family's file, one ``table.OPS`` entry, nothing else
(``tests/backends/test_op_tables.py`` checks that every registered op has one and every declared schedule exists).

Use: merge :data:`CONVERTERS` into the importer's converters, then schedule with :func:`kernel_rule` (first rule of a
CPU ``ApplyDefaultSchedule``) or :func:`schedule_kernels` (a module pass); see ``common.py`` for the design.

Importing this package does not import TVM (the TVM backend package promises that); the converters and helpers
below import their modules on first use.
"""
from __future__ import annotations

from typing import Any

from . import table

__all__ = ["CONVERTERS", "schedule_kernels", "kernel_rule", "specialize_decode", "lowered_float_allocations"]

#: full op name -> converter(fx node, ExportedProgramImporter) -> relax value; one per ``table.OPS`` entry.
CONVERTERS = {op: table.converter(op) for op in table.OPS}


def _common() -> Any:
    from . import common

    return common


def schedule_kernels(target: Any) -> Any:
    """Relax module pass giving every llmpress kernel its CPU schedule (see ``common.schedule_kernels``)."""
    return _common().schedule_kernels(target)


def kernel_rule() -> Any:
    """dlight ``ScheduleRule`` for the llmpress kernels on CPU (see ``common.kernel_rule``)."""
    return _common().kernel_rule()


def specialize_decode() -> Any:
    """Relax module pass pointing decode (T = 1) call sites at GEMV-scheduled kernel copies (see ``common``)."""
    return _common().specialize_decode()


def lowered_float_allocations(func: Any, target: Any) -> list[tuple[str, str]]:
    return _common().lowered_float_allocations(func, target)
