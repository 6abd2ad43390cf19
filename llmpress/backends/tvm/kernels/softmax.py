"""CPU softmax over the last axis (attention probabilities), vectorized, with a polynomial ``exp``.

TVM's legalized softmax runs, per row, a serial max chain, a scalar ``expf`` call per element and a serial sum
chain: on the ``[1, 8, 128, 512]`` scores of tinystories-llama its 8 layers took about 30% of the whole
prefill. This kernel computes, for each row ``x[r, :]`` of width ``D`` (``D`` a multiple of ``L = 16``)::

    m_part[r, l] = max_j x[r, j L + l]          m[r] = max_l m_part[r, l]        (16 independent max chains)
    e[r, c]      = fast_exp(x[r, c] - m[r])                                     (TVM's topi.fast_exp)
    s_part[r, l] = sum_j e[r, j L + l]          s[r] = sum_l s_part[r, l]        (16 independent sum chains)
    y[r, c]      = e[r, c] / s[r]

``fast_exp`` is Cephes-style: range reduction ``x = n ln2 + f`` and a degree-7 polynomial for ``e^f``, with inputs
clamped to [-88.38, 88.38] (so ``exp(-inf)`` is ~4e-39, not 0: a masked score contributes ``4e-39 * v / s``, far
below float32 resolution of the output); its relative error is about 1e-7, the order of float32 rounding. The
partial sums change the order of the float32 additions (as any vectorized softmax does). ``benchmarks/softmax.py``
measures it against TVM's own softmax and PyTorch (``benchmarks/results/softmax.md``: 1.88 -> 0.39 ms for the
shape above, tinystories prefill 49.6 -> 39.0 ms).

CPU targets only (``to_relax(cpu_kernels=True)``): the CPU schedule below runs heads in parallel, each row's
reductions and ``exp`` at the row, with the 16-wide inner loops vectorized (the partial reductions are unrolled
for LLVM's SLP vectorizer: TVM refuses to vectorize a spatial loop inside a reduction loop). Other softmax calls
(another axis, a width not a multiple of 16) keep TVM's own converter.
"""
from __future__ import annotations

from typing import Any

import tvm
from tvm import relax, te, tirx, topi

from .common import KERNEL_ATTR, CpuSchedule, new_schedule

__all__ = ["softmax_te", "softmax_converter", "LANES", "CPU_SCHEDULES"]

LANES = 16


def softmax_te(x: te.Tensor) -> te.Tensor:
    """Softmax over the last axis of ``x`` (last dimension a static multiple of ``LANES``)."""
    *lead, d = x.shape
    lane = LANES
    j = te.reduce_axis((0, d // lane), "j")
    m_part = te.compute((*lead, lane), lambda *i: te.max(x[(*i[:-1], j * lane + i[-1])], axis=j), name="max_part")
    lm = te.reduce_axis((0, lane), "lm")
    m = te.compute(lead, lambda *i: te.max(m_part[(*i, lm)], axis=lm), name="max")
    diff = te.compute(x.shape, lambda *i: x[i] - m[i[:-1]], name="diff")
    e = topi.math.fast_exp(diff)
    j2 = te.reduce_axis((0, d // lane), "j2")
    s_part = te.compute((*lead, lane), lambda *i: te.sum(e[(*i[:-1], j2 * lane + i[-1])], axis=j2), name="sum_part")
    ls = te.reduce_axis((0, lane), "ls")
    s = te.compute(lead, lambda *i: te.sum(s_part[(*i, ls)], axis=ls), name="sum")
    return te.compute(x.shape, lambda *i: e[i] / s[i[:-1]], name="softmax")


def softmax_converter(node: Any, importer: Any) -> relax.Expr:
    """``aten.softmax.int`` / ``aten._softmax.default`` converter: this kernel for a float32 softmax over the last
    axis whose width is a static multiple of ``LANES``; TVM's own converter otherwise."""
    x_node = node.args[0]
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", -1)
    val = x_node.meta.get("val")
    rank = val.dim() if val is not None else 0
    width = val.shape[-1] if val is not None else None
    if (val is None or str(val.dtype) != "torch.float32" or dim not in (-1, rank - 1) or rank < 2
            or not isinstance(width, int) or width % LANES):
        return importer._softmax(node)
    return importer.block_builder.emit_te(softmax_te, importer.env[x_node], primfunc_name_hint="llmpress_softmax",
                                          primfunc_attrs={KERNEL_ATTR: "softmax", "op_pattern": 8})


def _schedule_cpu(func: tirx.PrimFunc, target) -> tvm.s_tir.Schedule:
    sch = new_schedule(func, func)
    out = sch.get_sblock("softmax")
    loops = sch.get_loops(out)  # leading axes..., row, column
    if len(loops) >= 3:
        sch.parallel(sch.fuse(*loops[:-2]) if len(loops) > 3 else loops[0])
    row = sch.get_loops(out)[-2]
    _, inner = sch.split(sch.get_loops(out)[-1], [None, LANES])
    sch.vectorize(inner)
    sch.compute_inline(sch.get_sblock("diff"))
    exp_name = next(sch.get(b).name_hint for b in sch.get_child_blocks(sch.get_sblock("root"))
                    if sch.get(b).name_hint.endswith("fast_exp"))
    for name in ("sum", "sum_part", exp_name, "max", "max_part"):
        sch.compute_at(sch.get_sblock(name), row)
    for name in ("max_part", "sum_part"):
        block = sch.get_sblock(name)
        lane, red = sch.get_loops(block)[-2:]
        sch.reorder(red, lane)
        init = sch.decompose_reduction(block, red)
        sch.vectorize(sch.get_loops(init)[-1])
        sch.unroll(sch.get_loops(block)[-1])
    _, inner = sch.split(sch.get_loops(sch.get_sblock(exp_name))[-1], [None, LANES])
    sch.vectorize(inner)
    return sch


#: kernel tag -> CPU schedule (found through the op table, ``table.py``).
CPU_SCHEDULES: dict[str, CpuSchedule] = {
    "softmax": _schedule_cpu,
}
