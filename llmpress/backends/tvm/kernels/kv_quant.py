"""TVM kernels for the KV-cache ops: per-vector symmetric quantization of new keys/values.

``llmpress::kv_fake_quant`` (float cache), and for the int8 cache ``llmpress::kv_scale`` (the scales: the row
reduction below without its epilogue), ``llmpress::kv_codes`` (elementwise: ``clamp(nearbyint(x / s))`` cast to
int8, left fusable so it merges with the cache scatter) and ``llmpress::kv_dequant`` (``astype(codes) * s`` as Relax
ops, fused by ``FuseOps`` into the attention that reads it, so no float copy of the whole cache is kept).

Math (reference: ``llmpress/ir/ops/kv_quant.py``; the same float operations in the same order)::

    amax[..]   = max_d |x[.., d]|                      one scale per (batch, head, token)
    s[..]      = amax / qmax  (1 where amax = 0)       qmax = 2^(bits-1) - 1
    y[.., d]   = clamp(nearbyint(x[.., d] / s), -qmax, qmax) * s       round half to even, like torch.round

One ``call_tir`` (a row reduction + elementwise epilogue, a shape dlight's GPU ``Reduction`` rules know). CPU
schedule: all rows in parallel, the row's amax computed right before its elements are quantized.
"""
from __future__ import annotations

import tvm
from tvm import relax, te, tirx

from ....errors import UnsupportedOpError
from .common import KERNEL_ATTR, CpuSchedule, new_schedule

__all__ = ["kv_fake_quant_te", "emit_kv_fake_quant", "convert_kv_fake_quant", "convert_kv_scale",
           "convert_kv_codes", "convert_kv_dequant", "CPU_SCHEDULES"]


def _qmax(bits: int) -> float:
    if not 2 <= bits <= 8:
        raise UnsupportedOpError(f"KV-cache quantization: bits must be in 2..8, got {bits}", op="kv_quant")
    return float((1 << (bits - 1)) - 1)


def _scale_te(x: te.Tensor, qmax: float, *, keepdim: bool) -> te.Tensor:
    lead, d = list(x.shape[:-1]), x.shape[-1]
    k = te.reduce_axis((0, d), name="d")
    amax = te.compute(lead, lambda *i: te.max(tirx.abs(x[(*i, k)]), axis=k), name="amax")

    def scale(*i):
        i = i[:-1] if keepdim else i
        return tirx.Select(amax[i] > tirx.const(0.0, "float32"), amax[i] / tirx.const(qmax, "float32"),
                           tirx.const(1.0, "float32"))

    return te.compute([*lead, 1] if keepdim else lead, scale, name="scale")


def _round_clamp(v, qmax: float):
    r = tirx.nearbyint(v)
    return tirx.max(tirx.min(r, tirx.const(qmax, "float32")), tirx.const(-qmax, "float32"))


def kv_fake_quant_te(x: te.Tensor, *, bits: int) -> te.Tensor:
    qmax = _qmax(bits)
    scale = _scale_te(x, qmax, keepdim=False)
    return te.compute(x.shape, lambda *i: _round_clamp(x[i] / scale[i[:-1]], qmax) * scale[i[:-1]],
                      name="fake_quant")


def emit_kv_fake_quant(bb: relax.BlockBuilder, x: relax.Expr, bits: int) -> relax.Expr:
    _qmax(bits)
    x_dtype = x.ty.dtype
    if x_dtype != "float32":
        x = bb.emit(relax.op.astype(x, "float32"))
    y = bb.emit_te(lambda t: kv_fake_quant_te(t, bits=bits), x, primfunc_name_hint=f"llmpress_kv_fake_quant_b{bits}",
                   primfunc_attrs={KERNEL_ATTR: "kv_fake_quant", "op_pattern": 8})
    if x_dtype != "float32":
        y = bb.emit(relax.op.astype(y, x_dtype))
    return y


def convert_kv_fake_quant(node, importer) -> relax.Expr:
    """``custom_convert_map`` entry for ``llmpress.kv_fake_quant.default``."""
    x = node.args[0]
    bits = node.kwargs.get("bits", node.args[1] if len(node.args) > 1 else None)
    return emit_kv_fake_quant(importer.block_builder, importer.env[x], int(bits))


def _rows_in_parallel(func: tirx.PrimFunc, out_block: str, *, inline_scale: bool) -> tvm.s_tir.Schedule:
    """CPU schedule of a per-row reduction + epilogue: all rows in parallel, each row's amax computed right before
    its ``out_block`` elements."""
    sch = new_schedule(func, func)
    n_lead = len(func.params[0].shape) - 1
    if inline_scale:
        sch.compute_inline(sch.get_sblock("scale"))
    loops = sch.get_loops(sch.get_sblock(out_block))
    row = sch.fuse(*loops[:n_lead]) if n_lead > 1 else loops[0]
    sch.compute_at(sch.get_sblock("amax"), row)
    sch.parallel(row)
    return sch


def _schedule_cpu(func: tirx.PrimFunc, target) -> tvm.s_tir.Schedule:
    return _rows_in_parallel(func, "fake_quant", inline_scale=True)


def _f32(bb: relax.BlockBuilder, x: relax.Expr) -> relax.Expr:
    return x if x.ty.dtype == "float32" else bb.emit(relax.op.astype(x, "float32"))


def convert_kv_scale(node, importer) -> relax.Expr:
    """``custom_convert_map`` entry for ``llmpress.kv_scale.default``: ``float32[..., 1]`` absmax scales."""
    bb = importer.block_builder
    qmax = _qmax(int(node.args[1]))
    x = _f32(bb, importer.env[node.args[0]])
    return bb.emit_te(lambda t: _scale_te(t, qmax, keepdim=True), x, primfunc_name_hint="llmpress_kv_scale",
                      primfunc_attrs={KERNEL_ATTR: "kv_scale", "op_pattern": 8})


def convert_kv_codes(node, importer) -> relax.Expr:
    """``llmpress.kv_codes.default``: ``int8`` codes, elementwise (left fusable with the scatter that stores them)."""
    bb = importer.block_builder
    qmax = _qmax(int(node.args[2]))
    x = _f32(bb, importer.env[node.args[0]])
    s = importer.env[node.args[1]]

    def codes(xt: te.Tensor, st: te.Tensor) -> te.Tensor:
        return te.compute(xt.shape, lambda *i: _round_clamp(xt[i] / st[(*i[:-1], 0)], qmax).astype("int8"),
                          name="kv_codes")

    return bb.emit_te(codes, x, s, primfunc_name_hint="llmpress_kv_codes")


def convert_kv_dequant(node, importer) -> relax.Expr:
    """``llmpress.kv_dequant.default``: ``astype(codes, float32) * scale`` as Relax ops (fused with its reader)."""
    bb = importer.block_builder
    codes = importer.env[node.args[0]]
    scale = importer.env[node.args[1]]
    return bb.emit(relax.op.multiply(relax.op.astype(codes, "float32"), scale))


def _schedule_scale_cpu(func: tirx.PrimFunc, target) -> tvm.s_tir.Schedule:
    return _rows_in_parallel(func, "scale", inline_scale=False)


#: kernel tag -> CPU schedule (found through the op table, ``table.py``).
CPU_SCHEDULES: dict[str, CpuSchedule] = {
    "kv_fake_quant": _schedule_cpu,
    "kv_scale": _schedule_scale_cpu,
}
