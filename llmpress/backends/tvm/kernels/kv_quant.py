"""TVM kernel for ``llmpress::kv_fake_quant``: per-vector symmetric fake quantization of new keys/values.

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
from .common import KERNEL_ATTR, new_schedule, register_cpu_schedule

__all__ = ["kv_fake_quant_te", "emit_kv_fake_quant", "convert_kv_fake_quant"]


def kv_fake_quant_te(x: te.Tensor, *, bits: int) -> te.Tensor:
    qmax = float((1 << (bits - 1)) - 1)
    lead, d = list(x.shape[:-1]), x.shape[-1]
    k = te.reduce_axis((0, d), name="d")
    amax = te.compute(lead, lambda *i: te.max(tirx.abs(x[(*i, k)]), axis=k), name="amax")
    scale = te.compute(lead, lambda *i: tirx.Select(amax[i] > tirx.const(0.0, "float32"),
                                                    amax[i] / tirx.const(qmax, "float32"),
                                                    tirx.const(1.0, "float32")), name="scale")

    def fq(*i):
        r = tirx.nearbyint(x[i] / scale[i[:-1]])
        r = tirx.max(tirx.min(r, tirx.const(qmax, "float32")), tirx.const(-qmax, "float32"))
        return r * scale[i[:-1]]

    return te.compute(x.shape, fq, name="fake_quant")


def emit_kv_fake_quant(bb: relax.BlockBuilder, x: relax.Expr, bits: int) -> relax.Expr:
    if not 2 <= bits <= 8:
        raise UnsupportedOpError(f"kv_fake_quant: bits must be in 2..8, got {bits}", op="kv_fake_quant")
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


@register_cpu_schedule("kv_fake_quant")
def _schedule_cpu(func: tirx.PrimFunc, target) -> tvm.s_tir.Schedule:
    sch = new_schedule(func, func)
    n_lead = len(func.params[0].shape) - 1
    sch.compute_inline(sch.get_sblock("scale"))
    out = sch.get_sblock("fake_quant")
    loops = sch.get_loops(out)
    row = sch.fuse(*loops[:n_lead]) if n_lead > 1 else loops[0]
    sch.compute_at(sch.get_sblock("amax"), row)
    sch.parallel(row)
    return sch
