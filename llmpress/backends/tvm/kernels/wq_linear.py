"""TVM kernel for ``llmpress::wq_linear``: weight-only quantized linear with dequantization fused into the matmul.

Math (the storage layout is the one documented in ``llmpress/ir/ops/wq_linear.py``)::

    y[m, o] = sum_k x[m, k] * W[o, k] (+ bias[o])
    W[o, k] = (q[o, k] - z[o, g]) * s[o, g],   g = k // group_size
    q[o, k] = code(o, k) - 2^(b-1)   (symmetric, bits < 8)      code(o, k) (asymmetric; bits = 8 symmetric: int8)
    code    = (byte[o, k/2] >> 4*(k%2)) & 15                    (bits = 4)
              (byte[o, k/4] >> 2*(k%4)) & 3                     (bits = 2)
              (w24 >> 3*(k%8)) & 7, w24 = b[3j] | b[3j+1]<<8 | b[3j+2]<<16, j = k/8   (bits = 3)

Each W element is computed exactly as the reference does (``float(q) * s`` or ``(float(q) - float(z)) * s``, one
rounding), so the kernel differs from the reference only in the fp32 summation order of the reduction.

The converter emits the generic TE (:func:`wq_linear_te`): two stages, ``dequant`` (W) and ``matmul``, the
prologue pattern TVM's dlight GPU rules (``Matmul``/``GEMV``) expect and inline into the reduction (on CUDA a
64 x 16 dequantized tile lives in shared memory per step). On CPU the schedule rule rebuilds the function (same
parameters) in one of two forms, with P values per packing unit (k = u*P + n) and activations deinterleaved once
(``xs[m, n, u] = x[m, u*P + n]``, an activation-sized copy):

GEMV form (:func:`wq_linear_cpu_te`, decode call sites: ``common.specialize_decode``): each weight is unpacked,
offset and scaled in registers right where it is multiplied; no float weight storage at all::

    parallel for o0 in out / OT:                      # output-feature tiles across threads
      for m in tokens, o1 in OT:
        acc[0:V] = 0                                  # V partial sums in vector registers
        for g, n, j0:                                 # s[o, g], z[o, g] and the shift bits*n are scalars here
          acc[0:V] += xs[m, n, u:u+V] * ((code(q[o, u:u+V], n) - z[o, g]) * s[o, g])   # contiguous, vectorized
        y[m, o] = sum(acc[0:V])                       # horizontal sum

GEMM form (:func:`wq_linear_cpu_gemm_te`, everything else, i.e. prefill): per thread, one column tile of the
weight (``in x V`` floats, V = vector width: 48 KB for in = 768 on AVX2) is decoded and reused by every token under
a register-blocked outer-product matmul; the full ``[out, in]`` float weight never exists::

    parallel for o0 in out / V:
      tile[n, u, 0:V] = (code(q[o0*V + 0:V, u], n) - z) * s          # decoded once per column tile
      for m0 in tokens / 4, (n, u):  acc[0:4, 0:V] += xs[m0*4 + 0:4, n, u] (broadcast) * tile[n, u, 0:V]
"""
from __future__ import annotations

import logging
from typing import Any

import tvm
from tvm import relax, te, tirx

from ....errors import UnsupportedOpError
from .common import KERNEL_ATTR, CpuSchedule, cpu_vector_lanes, new_schedule

__all__ = ["wq_linear_te", "wq_linear_cpu_te", "wq_linear_cpu_gemm_te", "emit_wq_linear", "convert_wq_linear",
           "schedule_cpu", "act_fake_quant_te", "CPU_SCHEDULES"]

log = logging.getLogger(__name__)

_VALUES_PER_UNIT = {8: 1, 4: 2, 3: 8, 2: 4}


def _i32(e: Any) -> tirx.PrimExpr:
    return e.astype("int32")


def _code(qweight: te.Tensor, o, k, bits: int) -> tirx.PrimExpr:
    """The unsigned stored code (int32) of element (o, k); for bits=8 the stored integer itself."""
    if bits == 8:
        return _i32(qweight[o, k])
    if bits == 4:
        byte = _i32(qweight[o, k // 2])
        return (byte >> _i32((k % 2) * 4)) & 15
    if bits == 2:
        byte = _i32(qweight[o, k // 4])
        return (byte >> _i32((k % 4) * 2)) & 3
    if bits == 3:
        j = k // 8
        word = _i32(qweight[o, j * 3]) | (_i32(qweight[o, j * 3 + 1]) << 8) | (_i32(qweight[o, j * 3 + 2]) << 16)
        return (word >> _i32((k % 8) * 3)) & 7
    raise UnsupportedOpError(f"wq_linear: bits={bits} has no TVM kernel (supported 2, 3, 4, 8)", op="wq_linear")


def _in_features(packed_columns: Any, bits: int) -> int:
    """Input features of a weight stored as ``packed_columns`` bytes per row (3-bit packs 8 values in 3 bytes)."""
    return int(packed_columns) * _VALUES_PER_UNIT[bits] // (3 if bits == 3 else 1)


def _weight(code: tirx.PrimExpr, scales: te.Tensor, zeros: te.Tensor | None, o, g, bits: int) -> tirx.PrimExpr:
    """The dequantized float32 weight of a stored code in row ``o``, group ``g``: ``(code - 2^(bits-1)) * s``
    (symmetric; 8-bit codes are already signed) or ``(code - z) * s`` (asymmetric)."""
    if zeros is None:
        q = code if bits == 8 else code - (1 << (bits - 1))
        return tirx.Cast("float32", q) * scales[o, g].astype("float32")
    return (tirx.Cast("float32", code) - zeros[o, g].astype("float32")) * scales[o, g].astype("float32")


def wq_linear_te(x: te.Tensor, qweight: te.Tensor, scales: te.Tensor, zeros: te.Tensor | None = None, *,
                 bits: int, group_size: int) -> te.Tensor:
    """TE of ``x @ dequant(qweight, scales, zeros)^T`` (bias is added outside the kernel).

    ``x`` is float32 ``[..., in]`` (any number of leading dims, symbolic allowed)."""
    out_f = qweight.shape[0]
    in_f = _in_features(qweight.shape[1], bits)
    w = te.compute((out_f, in_f), lambda o, k: _weight(_code(qweight, o, k, bits), scales, zeros, o, k // group_size,
                                                       bits), name="dequant")
    k = te.reduce_axis((0, in_f), name="k")
    lead = list(x.shape[:-1])

    def mm(*idx):
        return te.sum(x[(*idx[:-1], k)] * w[idx[-1], k], axis=k)

    return te.compute((*lead, out_f), mm, name="matmul")


def act_fake_quant_te(x: te.Tensor, *, act_group: int) -> te.Tensor:
    """``xa = qa * sa``: per-block dynamic int8 quantization of ``x [..., in]`` and back (the op's ``act_bits=8``
    semantics, the reference's float operations). The generic path (GPU targets, CPU layers the quantized kernels
    do not cover) runs it before the float kernel; on CPU the dispatch pass (``dispatch.py``) replaces the pair by
    the integer kernels and this stage disappears."""
    lead, in_f = list(x.shape[:-1]), x.shape[-1]
    j = te.reduce_axis((0, act_group), name="j")
    amax = te.compute((*lead, in_f // act_group),
                      lambda *i: te.max(tirx.abs(x[(*i[:-1], i[-1] * act_group + j)]), axis=j), name="amax")
    qmax = tirx.const(127.0, "float32")
    sa = te.compute(amax.shape, lambda *i: tirx.Select(amax[i] > tirx.const(0.0, "float32"), amax[i] / qmax,
                                                       tirx.const(1.0, "float32")), name="sa")

    def fq(*i):
        s = sa[(*i[:-1], i[-1] // act_group)]
        return tirx.max(tirx.min(tirx.nearbyint(x[i] / s), qmax), -qmax) * s

    return te.compute(x.shape, fq, name="xa")


def emit_wq_linear(bb: relax.BlockBuilder, x: relax.Expr, qweight: relax.Expr, scales: relax.Expr,
                   zeros: relax.Expr | None, bias: relax.Expr | None, bits: int, group_size: int,
                   act_bits: int = 0, act_group: int = 0) -> relax.Expr:
    """Emit the fused kernel as one ``call_tir`` (+ a Relax ``add`` for the bias); returns the output var. With
    ``act_bits=8`` the activations first pass through ``act_fake_quant_te`` (its own tagged ``call_tir``)."""
    if bits not in _VALUES_PER_UNIT:
        raise UnsupportedOpError(f"wq_linear: bits={bits} has no TVM kernel (supported 2, 3, 4, 8)", op="wq_linear")
    if group_size % _VALUES_PER_UNIT[bits]:
        raise UnsupportedOpError(f"wq_linear: the TVM kernels need group_size ({group_size}) to be a multiple of the "
                                 f"{_VALUES_PER_UNIT[bits]} values one {bits}-bit packing unit holds", op="wq_linear")
    if act_bits not in (0, 8):
        raise UnsupportedOpError(f"wq_linear: act_bits={act_bits} has no TVM kernel (0 or 8)", op="wq_linear")
    x_dtype = x.ty.dtype
    if x_dtype != "float32":
        x = bb.emit(relax.op.astype(x, "float32"))
    sym = zeros is None
    in_f = _in_features(qweight.ty.shape[1], bits)
    act_group = (act_group or group_size) if act_bits else 0
    if act_bits:
        x = bb.emit_te(lambda t: act_fake_quant_te(t, act_group=act_group), x,
                       primfunc_name_hint=f"llmpress_act_fake_quant_g{act_group}",
                       primfunc_attrs={KERNEL_ATTR: "act_fake_quant", "op_pattern": 8, "llmpress.token_dims": 1,
                                       "llmpress.act_group": act_group})
    name = f"llmpress_wq_linear_b{bits}_g{group_size}_{'sym' if sym else 'asym'}"
    # op_pattern 8 (kOpaque): FuseOps must not merge the kernel into a new, unscheduled function.
    # llmpress.token_dims: the leading dims of x count tokens (decode call sites get a GEMV-scheduled copy).
    attrs = {KERNEL_ATTR: "wq_linear", "op_pattern": 8, "llmpress.token_dims": 1, "llmpress.bits": bits,
             "llmpress.group_size": group_size, "llmpress.in_features": in_f, "llmpress.act_bits": act_bits,
             "llmpress.act_group": act_group}
    args = [x, qweight, scales] + ([] if sym else [zeros])
    y = bb.emit_te(lambda *a: wq_linear_te(*a, bits=bits, group_size=group_size), *args,
                   primfunc_name_hint=name, primfunc_attrs=attrs)
    if bias is not None:
        y = bb.emit(relax.op.add(y, relax.op.astype(bias, "float32") if bias.ty.dtype != "float32"
                                 else bias))
    if x_dtype != "float32":
        y = bb.emit(relax.op.astype(y, x_dtype))
    return y


def convert_wq_linear(node, importer) -> relax.Expr:
    """``custom_convert_map`` entry for ``llmpress.wq_linear.default`` (signature ``(fx.Node, importer)``)."""
    from ....ir.ops.wq_linear import wq_args

    a = wq_args(node.args, node.kwargs)
    env = importer.env

    def get(name):
        v = a.get(name)
        return None if v is None else env[v]

    return emit_wq_linear(importer.block_builder, get("x"), get("qweight"), get("scales"), get("zeros"),
                          get("bias"), int(a["bits"]), int(a["group_size"]), int(a["act_bits"]),
                          int(a["act_group"]))


def schedule_act_fake_quant(func: tirx.PrimFunc, target) -> tvm.s_tir.Schedule:
    """Rows in parallel, each row's block maxima and its quantized values computed together."""
    sch = new_schedule(func, func)
    xa = sch.get_sblock("xa")
    loops = sch.get_loops(xa)
    row = sch.fuse(*loops[:-1]) if len(loops) > 2 else loops[0]
    sch.compute_at(sch.get_sblock("sa"), row)
    sch.compute_at(sch.get_sblock("amax"), row)
    sch.parallel(row)
    return sch


def _pick_tile(n: int, candidates: tuple[int, ...]) -> int:
    for c in candidates:
        if n % c == 0:
            return c
    return 1


def _unit_code(qweight: te.Tensor, o, u, n, bits: int) -> tirx.PrimExpr:
    """Code of value ``n`` of packing unit ``u`` in row ``o`` (unit = 1 byte for bits 8/4/2, 3 bytes for bits 3)."""
    if bits == 8:
        return _i32(qweight[o, u])
    if bits == 3:
        word = _i32(qweight[o, u * 3]) | (_i32(qweight[o, u * 3 + 1]) << 8) | (_i32(qweight[o, u * 3 + 2]) << 16)
        return (word >> _i32(n * 3)) & 7
    return (_i32(qweight[o, u]) >> _i32(n * bits)) & ((1 << bits) - 1)


def wq_linear_cpu_te(x: te.Tensor, qweight: te.Tensor, scales: te.Tensor, zeros: te.Tensor | None = None, *,
                     bits: int, group_size: int) -> te.Tensor:
    """CPU formulation of the same math, shaped so that the vectorized loop reads contiguous memory.

    With P values per packing unit and k = u*P + n (unit u, position n), the activations are first deinterleaved
    (``xs[m, n, u] = x[m, u*P + n]``, an activation-sized copy), and the reduction runs over (group g, position n,
    unit-in-group j)::

        y[m, o] = sum_{g, n, j} xs[m, n, u] * ((code(o, u, n) - z[o, g]) * s[o, g]),   u = g*(group/P) + j

    so a vector over j loads consecutive activations and consecutive packed bytes, and the scale/zero of the group
    are scalars. Every weight is still dequantized exactly as the reference does it; only the order of the fp32 sum
    changes. Needs P | group_size."""
    per, units, xs = _deinterleaved(x, qweight, bits)
    in_f, ug = units * per, group_size // per
    g = te.reduce_axis((0, in_f // group_size), name="g")
    n = te.reduce_axis((0, per), name="n")
    j = te.reduce_axis((0, ug), name="j")

    def body(*idx):
        o = idx[-1]
        u = g * ug + j
        w = _weight(_unit_code(qweight, o, u, n, bits), scales, zeros, o, g, bits)
        return te.sum(xs[(*idx[:-1], n, u)] * w, axis=[g, n, j])

    return te.compute((*x.shape[:-1], qweight.shape[0]), body, name="matmul")


def wq_linear_cpu_gemm_te(x: te.Tensor, qweight: te.Tensor, scales: te.Tensor, zeros: te.Tensor | None = None, *,
                          bits: int, group_size: int) -> te.Tensor:
    """Prefill (GEMM) formulation: the same math as :func:`wq_linear_cpu_te`, with the dequantized weight as a
    separate stage ``dequant[n, u, o]`` (transposed: output features contiguous) that the schedule computes one
    column tile of ``OT`` outputs at a time and reuses for every token; the matmul is an outer-product kernel whose
    ``4 x OT`` accumulators stay in registers::

        parallel for o0:  tile[P, units, OT] = dequant(outputs o0*OT ...)          # in L1/L2, never the whole W
                          for m0 (4 tokens at a time), k: acc[4, 0:OT] += xs[m, k] (broadcast) * tile[k, 0:OT]
    """
    per, units, xs = _deinterleaved(x, qweight, bits)
    out_f, ug = qweight.shape[0], group_size // per
    wd = te.compute((per, units, out_f), lambda n, u, o: _weight(_unit_code(qweight, o, u, n, bits), scales, zeros, o,
                                                                 u // ug, bits), name="dequant")
    n = te.reduce_axis((0, per), name="n")
    u = te.reduce_axis((0, units), name="u")
    return te.compute((*x.shape[:-1], out_f), lambda *i: te.sum(xs[(*i[:-1], n, u)] * wd[n, u, i[-1]], axis=[n, u]),
                      name="matmul")


def _deinterleaved(x: te.Tensor, qweight: te.Tensor, bits: int) -> tuple[int, int, te.Tensor]:
    """``(P, units, xs)`` of the CPU forms: P values per packing unit, the unit count, and the activations
    deinterleaved by position in the unit, ``xs[m, n, u] = x[m, u*P + n]`` (8-bit: a plain ``[m, 1, K]`` view)."""
    per = _VALUES_PER_UNIT[bits]
    units = _in_features(qweight.shape[1], bits) // per
    lead = list(x.shape[:-1])
    if per == 1:  # 8-bit: nothing to deinterleave
        return per, units, te.compute((*lead, 1, units), lambda *i: x[(*i[:-2], i[-1])], name="x_deinterleave")
    return per, units, te.compute((*lead, per, units), lambda *i: x[(*i[:-2], i[-1] * per + i[-2])],
                                  name="x_deinterleave")


def _schedule_gemm(sch: tvm.s_tir.Schedule, n_lead: int, out_tile: int, token_tile: int = 4) -> None:
    """Outer-product schedule of :func:`wq_linear_cpu_gemm_te` (see its docstring). ``out_tile`` = one vector."""
    blk = sch.get_sblock("matmul")
    loops = sch.get_loops(blk)
    lead, o, n, u = loops[:n_lead], loops[n_lead], loops[n_lead + 1], loops[n_lead + 2]
    m = sch.fuse(*lead) if len(lead) > 1 else lead[0]
    o0, o1 = sch.split(o, [None, out_tile])
    m0, m1 = sch.split(m, [None, token_tile])
    sch.reorder(o0, m0, n, u, m1, o1)
    acc = sch.cache_write(blk, 0, "local")
    sch.reverse_compute_at(acc, m0)
    sch.unroll(m1)
    sch.vectorize(o1)  # before decompose_reduction: the block must still be a reduction block
    sch.parallel(o0)
    init = sch.decompose_reduction(blk, n)
    sch.vectorize(sch.get_loops(init)[-1])
    sch.vectorize(sch.get_loops(acc)[-1])
    dq = sch.get_sblock("dequant")
    sch.compute_at(dq, o0)
    sch.vectorize(sch.get_loops(dq)[-1])


# Below this many multiply-adds a one-token call runs on one thread: waking the pool costs more than it saves
# (a 256 x 768 GEMV is ~20 us of work on one core).
_PARALLEL_MIN_MACS = 1 << 20


def _vectorize_reduction(sch: tvm.s_tir.Schedule, blk, n_lead: int, lanes: int, out_tile: int, *,
                         parallel: bool = True):
    """Shared tail of the CPU schedules: loops ``(*lead, o, *reduce)`` -> parallel output tiles, token loop, an
    rfactor over the innermost ``lanes`` of the last reduction loop (vectorized), and a horizontal sum right after
    each output's partial sums. Returns the parallel loop."""
    loops = sch.get_loops(blk)
    lead, o, red = loops[:n_lead], loops[n_lead], loops[n_lead + 1:]
    m = sch.fuse(*lead) if len(lead) > 1 else lead[0]
    o0, o1 = sch.split(o, [None, out_tile])
    r0, r1 = sch.split(red[-1], [None, lanes])
    sch.reorder(o0, m, o1, *red[:-1], r0, r1)
    rf = sch.rfactor(r1, factor_axis=n_lead + 1)
    rf_loops = sch.get_loops(rf)
    sch.reverse_compute_at(blk, rf_loops[2])
    sch.vectorize(sch.get_loops(rf)[-1])
    outer = sch.get_loops(rf)[0]
    if parallel:
        sch.parallel(outer)
    sch.decompose_reduction(rf, sch.get_loops(rf)[3])
    return outer


def schedule_cpu(func: tirx.PrimFunc, target) -> tvm.s_tir.Schedule:
    """The CPU kernel. Decode call sites (``llmpress.decode``, see ``common.specialize_decode``) get the GEMV form
    (:func:`wq_linear_cpu_te`: every weight decoded in registers where it is used, nothing stored; output tiles in
    parallel, the reduction vectorized via rfactor, a horizontal sum per output); every other call gets the GEMM
    form (:func:`wq_linear_cpu_gemm_te`: one decoded column tile of ``in x vector-width`` floats per thread, reused by
    all tokens, under a register-blocked outer-product matmul)."""
    bits = int(func.attrs["llmpress.bits"])
    group = int(func.attrs["llmpress.group_size"])
    decode = bool(func.attrs.get("llmpress.decode", False))
    bufs = list(func.params)  # TVM 0.27: parameters are buffer vars carrying shape and dtype
    x_buf, q_buf, s_buf = bufs[0], bufs[1], bufs[2]
    z_buf = bufs[3] if len(bufs) == 5 else None
    x = te.placeholder(x_buf.shape, x_buf.dtype, name="x")
    q = te.placeholder(q_buf.shape, q_buf.dtype, name="qweight")
    s = te.placeholder(s_buf.shape, s_buf.dtype, name="scales")
    z = te.placeholder(z_buf.shape, z_buf.dtype, name="zeros") if z_buf is not None else None
    per = _VALUES_PER_UNIT[bits]
    lanes = _pick_tile(group // per, tuple(v for v in (32, 16, 8, 4, 2) if v <= cpu_vector_lanes(target)))
    out_f = int(q_buf.shape[0])
    n_lead = len(x_buf.shape) - 1
    te_fn = wq_linear_cpu_te if decode else wq_linear_cpu_gemm_te
    y = te_fn(x, q, s, z, bits=bits, group_size=group)
    args = [x, q, s] + ([z] if z is not None else []) + [y]
    sch = new_schedule(te.create_prim_func(args), func)
    if decode:
        in_f = int(func.attrs["llmpress.in_features"])
        _vectorize_reduction(sch, sch.get_sblock("matmul"), n_lead, lanes, _pick_tile(out_f, (8, 4, 2)),
                             parallel=out_f * in_f >= _PARALLEL_MIN_MACS)
    else:
        vec = cpu_vector_lanes(target)
        _schedule_gemm(sch, n_lead, _pick_tile(out_f, tuple(v for v in (32, 16, 8, 4, 2) if v <= vec)))
    return sch


#: kernel tag -> CPU schedule (found through the op table, ``table.py``).
CPU_SCHEDULES: dict[str, CpuSchedule] = {
    "act_fake_quant": schedule_act_fake_quant,
    "wq_linear": schedule_cpu,
}
