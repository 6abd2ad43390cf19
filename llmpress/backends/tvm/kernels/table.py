"""The TVM backend's op table: for every ``llmpress`` op, its converter and the module holding its CPU schedules.

The single source every other list of this package is derived from:

- ``kernels.CONVERTERS`` (what ``lower.to_relax`` hands TVM's frontend) is built from :data:`OPS`;
- the CPU schedules are looked up through it: a kernel tagged ``llmpress.kernel = tag`` is scheduled by
  ``CPU_SCHEDULES[tag]`` of the module that declares ``tag`` (:func:`cpu_schedules`); nothing registers itself by
  being imported;
- ``tests/backends/test_op_tables.py`` walks every registered ``torch.ops.llmpress`` op and fails, naming it, when
  it has no entry here, when an entry's module lacks a schedule it declares, or when a module holds a schedule no
  entry declares.

An entry (:class:`Lowering`) names a file of this package (the op family's kernels), the converter in it, and the
``llmpress.kernel`` tags the converter emits, each of which must have a CPU schedule in that file's
``CPU_SCHEDULES`` dict (without one the kernel builds serial). A converter that emits no tagged kernel (Relax ops
fused by TVM, an elementwise kernel left fusable) says why in ``unscheduled``: an empty entry is a decision, not an
omission.

This module imports neither TVM nor the kernel files (``import llmpress.backends.tvm`` stays light); the kernel
files load on the first conversion or scheduling.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Callable

__all__ = ["Lowering", "OPS", "ATEN_KERNELS", "DISPATCHED", "schedule_modules", "cpu_schedules", "converter"]


@dataclass(frozen=True)
class Lowering:
    """How one op lowers: ``module.converter(fx_node, importer) -> relax.Expr``, whose tagged kernels
    (``scheduled``) are scheduled on CPU by ``module.CPU_SCHEDULES``; ``unscheduled`` says why an entry emits none."""

    module: str
    converter: str
    scheduled: tuple[str, ...] = ()
    unscheduled: str = ""

    def __post_init__(self) -> None:
        if bool(self.scheduled) == bool(self.unscheduled):
            raise ValueError(f"Lowering {self.module}.{self.converter}: give either the scheduled kernel tags or, "
                             "when the converter emits none, the reason (unscheduled=...), not both or neither")


#: full op name (``Module.op_histogram`` spelling) -> its lowering. One block per op family (``llmpress/ir/ops``).
OPS: dict[str, Lowering] = {
    # wq_linear: fused dequantize-matmul (+ the activation fake-quant stage when act_bits=8); on CPU the dispatch
    # pass (dispatch.py) replaces the layers its tiled layout covers, the rest keep these schedules
    "llmpress.wq_linear.default": Lowering("wq_linear", "convert_wq_linear", ("wq_linear", "act_fake_quant")),
    # w8a8: per-token activation quantization, then the int8 x int8 -> int32 matmul with its rescale
    "llmpress.w8a8_linear.default": Lowering("w8a8", "convert_w8a8_linear", ("w8a8_quant_act", "w8a8_matmul")),
    # kv_quant: float-cache fake quantization; int8-cache scales, codes, and the dequantization attention reads
    "llmpress.kv_fake_quant.default": Lowering("kv_quant", "convert_kv_fake_quant", ("kv_fake_quant",)),
    "llmpress.kv_scale.default": Lowering("kv_quant", "convert_kv_scale", ("kv_scale",)),
    "llmpress.kv_codes.default": Lowering(
        "kv_quant", "convert_kv_codes",
        unscheduled="an untagged elementwise kernel, left fusable so FuseOps merges it into the cache scatter"),
    "llmpress.kv_dequant.default": Lowering(
        "kv_quant", "convert_kv_dequant",
        unscheduled="Relax astype + multiply, fused by FuseOps into the attention that reads the cache"),
}

#: ATen ops whose CPU lowering llmpress replaces (``lower.to_relax(cpu_kernels=True)`` installs the converters,
#: which take per-call settings): kernel file -> the tags whose CPU schedules it holds.
ATEN_KERNELS: dict[str, tuple[str, ...]] = {
    "softmax": ("softmax",),  # aten.softmax.int / aten._softmax.default
}


#: Kernel files whose PrimFuncs the CPU dispatch pass (``dispatch.py``) emits in place of a linear: hand-written,
#: already scheduled loop nests (``tirx.is_scheduled``), so they hold no ``CPU_SCHEDULES``. File -> what it lowers.
DISPATCHED: dict[str, str] = {
    "fgemm": "float32 linears: GEMV/GEMM over 4-row tiled weights",
    "qgemv": "quantized linears, decode: GEMV (int8 or float activations)",
    "qgemm": "quantized linears, prefill: GEMM",
    "qwide": "quantized linears on AVX-512 VNNI: 512-bit GEMV/GEMM",
    "qact": "per-block int8 activation quantization feeding the integer kernels",
    "sparse": "sparse linears (chosen by sparse_plan.py): float32 SELL-8 and int4 2:4 GEMV/GEMM",
}


def schedule_modules() -> dict[str, tuple[str, ...]]:
    """Kernel file -> the tags whose CPU schedules it must hold, over :data:`OPS` and :data:`ATEN_KERNELS`."""
    out: dict[str, dict[str, None]] = {}  # dicts as ordered sets
    for module, tags in [(low.module, low.scheduled) for low in OPS.values()] + list(ATEN_KERNELS.items()):
        out.setdefault(module, {}).update(dict.fromkeys(tags))
    return {m: tuple(tags) for m, tags in out.items()}


def _module(name: str) -> Any:
    return importlib.import_module(f"{__package__}.{name}")


@lru_cache(maxsize=None)
def cpu_schedules() -> dict[str, Callable]:
    """Kernel tag -> ``fn(func, target) -> tvm.s_tir.Schedule``, each read from the ``CPU_SCHEDULES`` of the file the
    tables name for it (imports those files, hence TVM). A declared schedule that its file lacks is a ``LookupError``
    naming both, raised on first use rather than a kernel silently built serial."""
    out: dict[str, Callable] = {}
    for module, tags in schedule_modules().items():
        provided = getattr(_module(module), "CPU_SCHEDULES", {})
        for tag in tags:
            if tag not in provided:
                raise LookupError(f"kernels/{module}.py has no CPU_SCHEDULES[{tag!r}], which the op table declares")
            out[tag] = provided[tag]
    return out


def converter(op: str) -> Callable[[Any, Any], Any]:
    """The converter of ``OPS[op]``, importing its kernel file on first call (so building the map imports no TVM)."""
    low = OPS[op]

    def convert(node: Any, importer: Any) -> Any:
        return getattr(_module(low.module), low.converter)(node, importer)

    convert.__name__ = low.converter
    return convert
