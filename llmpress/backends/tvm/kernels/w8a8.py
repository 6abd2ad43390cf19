"""TVM kernels for ``llmpress::w8a8_linear``: dynamic per-token int8 activations, int8 x int8 -> int32 matmul.

Math (the reference is ``llmpress/ir/ops/w8a8.py``; every step below is the same float operation in the same
order, so the result matches it bit for bit in exact arithmetic and up to nothing but LLVM's instruction choice)::

    amax[m]  = max_k |x[m, k]|
    sx[m]    = amax[m] / 127          (1 where amax = 0)
    qx[m, k] = int8(clamp(nearbyint(x[m, k] / sx[m]), -127, 127))     round half to even, like torch.round
    acc[m, o] = sum_k int32(qx[m, k]) * int32(qw[o, k])                exact int32 (|acc| <= in * 127^2 < 2^31)
    y[m, o]  = float32(acc[m, o]) * sx[m] * ws[o]  (+ bias[o])

Two ``call_tir`` kernels, each one a shape dlight's GPU rules know (a row reduction with elementwise epilogue; an
integer matmul with an elementwise epilogue):

- ``llmpress_w8a8_quant_act``: ``x -> (qx int8 [..., in], sx float32 [...])`` (activation-sized outputs);
- ``llmpress_w8a8_matmul``: ``(qx, sx, qw, ws) -> y``; the int8 weight is read as stored, never widened in memory.

CPU schedules: rows in parallel for the activation quantization; for the matmul, output tiles in parallel, the int32
reduction vectorized (rfactor over ``lanes`` consecutive k) and the rescale done right after each output's sum.
"""
from __future__ import annotations

import tvm
from tvm import relax, te, tirx

from ....errors import UnsupportedOpError
from .common import KERNEL_ATTR, CpuSchedule, cpu_vector_lanes, new_schedule

__all__ = ["quant_act_te", "w8a8_matmul_te", "emit_w8a8_linear", "convert_w8a8_linear", "CPU_SCHEDULES"]

QMAX = 127


def quant_act_te(x: te.Tensor) -> list[te.Tensor]:
    """``(qx int8, sx float32)`` of ``x [..., in]``: per-row symmetric dynamic quantization."""
    lead, in_f = list(x.shape[:-1]), x.shape[-1]
    k = te.reduce_axis((0, in_f), name="k")
    amax = te.compute(lead, lambda *i: te.max(tirx.abs(x[(*i, k)]), axis=k), name="amax")
    sx = te.compute(lead, lambda *i: tirx.Select(amax[i] > tirx.const(0.0, "float32"),
                                                 amax[i] / tirx.const(float(QMAX), "float32"),
                                                 tirx.const(1.0, "float32")), name="sx")

    def quant(*i):
        r = tirx.nearbyint(x[i] / sx[i[:-1]])
        r = tirx.max(tirx.min(r, tirx.const(float(QMAX), "float32")), tirx.const(-float(QMAX), "float32"))
        return r.astype("int8")

    qx = te.compute(x.shape, quant, name="qx")
    return [qx, sx]


def w8a8_matmul_te(qx: te.Tensor, sx: te.Tensor, qweight: te.Tensor, wscale: te.Tensor) -> te.Tensor:
    out_f, in_f = qweight.shape
    k = te.reduce_axis((0, in_f), name="k")
    acc = te.compute((*qx.shape[:-1], out_f),
                     lambda *i: te.sum(qx[(*i[:-1], k)].astype("int32") * qweight[i[-1], k].astype("int32"), axis=k),
                     name="acc")
    return te.compute(acc.shape, lambda *i: acc[i].astype("float32") * sx[i[:-1]] * wscale[i[-1]].astype("float32"),
                      name="rescale")


def emit_w8a8_linear(bb: relax.BlockBuilder, x: relax.Expr, qweight: relax.Expr, wscale: relax.Expr,
                     bias: relax.Expr | None) -> relax.Expr:
    if qweight.ty.dtype != "int8":
        raise UnsupportedOpError(f"w8a8_linear: qweight must be int8, got {qweight.ty.dtype}", op="w8a8_linear")
    x_dtype = x.ty.dtype
    if x_dtype != "float32":
        x = bb.emit(relax.op.astype(x, "float32"))
    in_f = int(qweight.ty.shape[1])
    common = {"op_pattern": 8, "llmpress.in_features": in_f}
    q = bb.emit_te(quant_act_te, x, primfunc_name_hint="llmpress_w8a8_quant_act",
                   primfunc_attrs={KERNEL_ATTR: "w8a8_quant_act", **common})
    qx, sx = bb.emit(relax.TupleGetItem(q, 0)), bb.emit(relax.TupleGetItem(q, 1))
    y = bb.emit_te(w8a8_matmul_te, qx, sx, qweight, wscale, primfunc_name_hint="llmpress_w8a8_matmul",
                   primfunc_attrs={KERNEL_ATTR: "w8a8_matmul", **common})
    if bias is not None:
        b = bias if bias.ty.dtype == "float32" else bb.emit(relax.op.astype(bias, "float32"))
        y = bb.emit(relax.op.add(y, b))
    if x_dtype != "float32":
        y = bb.emit(relax.op.astype(y, x_dtype))
    return y


def convert_w8a8_linear(node, importer) -> relax.Expr:
    """``custom_convert_map`` entry for ``llmpress.w8a8_linear.default``."""
    args = list(node.args) + [None] * (4 - len(node.args))
    x, qweight, wscale, bias = args
    bias = node.kwargs.get("bias", bias)
    env = importer.env
    return emit_w8a8_linear(importer.block_builder, env[x], env[qweight], env[wscale],
                            None if bias is None else env[bias])


def _tile(n: int, candidates: tuple[int, ...]) -> int:
    return next((c for c in candidates if n % c == 0), 1)


def _schedule_quant_act(func: tirx.PrimFunc, target) -> tvm.s_tir.Schedule:
    """Rows in parallel; the amax reduction and the quantization of one row stay together."""
    sch = new_schedule(func, func)
    n_lead = len(func.params[0].shape) - 1
    sx = sch.get_sblock("sx")  # an output too, so it anchors the row loop (output blocks cannot move)
    loops = sch.get_loops(sx)
    row = sch.fuse(*loops) if n_lead > 1 else loops[0]
    sch.compute_at(sch.get_sblock("amax"), row)
    sch.reverse_compute_at(sch.get_sblock("qx"), row)
    sch.parallel(row)
    return sch


def _schedule_matmul(func: tirx.PrimFunc, target) -> tvm.s_tir.Schedule:
    """Output tiles in parallel, token loop inside, int32 reduction vectorized via rfactor, rescale per output."""
    sch = new_schedule(func, func)
    in_f = int(func.attrs["llmpress.in_features"])
    lanes = _tile(in_f, tuple(v for v in (16, 8, 4, 2) if v <= cpu_vector_lanes(target)))  # 32: rfactor refuses
    out_f = int(func.params[2].shape[0])
    n_lead = len(func.params[0].shape) - 1
    acc = sch.get_sblock("acc")
    loops = sch.get_loops(acc)
    lead, o, k = loops[:n_lead], loops[n_lead], loops[n_lead + 1]
    m = sch.fuse(*lead) if len(lead) > 1 else lead[0]
    o0, o1 = sch.split(o, [None, _tile(out_f, (8, 4, 2))])
    k0, k1 = sch.split(k, [None, lanes])
    sch.reorder(o0, m, o1, k0, k1)
    rf = sch.rfactor(k1, factor_axis=n_lead + 1)
    rf_loops = sch.get_loops(rf)
    sch.reverse_compute_at(acc, rf_loops[2])
    sch.reverse_compute_at(sch.get_sblock("rescale"), rf_loops[2])
    sch.vectorize(sch.get_loops(rf)[-1])
    sch.parallel(sch.get_loops(rf)[0])
    sch.decompose_reduction(rf, sch.get_loops(rf)[3])
    return sch


#: kernel tag -> CPU schedule (found through the op table, ``table.py``).
CPU_SCHEDULES: dict[str, CpuSchedule] = {
    "w8a8_quant_act": _schedule_quant_act,
    "w8a8_matmul": _schedule_matmul,
}
