"""Prefill (many-token) quantized GEMM kernels for CPU, reading the tiled layout of ``qlayout.py``.

Same arithmetic as the GEMV forms of ``qgemv.py``; what changes is the reuse. Each thread takes whole tiles of
``R`` output rows; within a tile, ``MT`` tokens are processed together, so every decoded 32-weight run feeds ``MT``
dot products and every activation load feeds ``R``:

Integer form (``act_bits=8``; ``gemm_int_func``): ``R x MT`` int32x8 accumulators (4 x 2 = 8 registers) plus the
``R`` decoded runs and one activation run fit the 16 AVX2 registers::

    for tile t (parallel), token pair m0:
      for group g, activation block b:
        acc_i32[r, m] = sum_{k in b} c[r, k] * qa[m, k]        isa.dot_*: one byte-wise multiply-add per weight
        acc_f32[r, m] += float(acc_i32[r, m]) * sa[m, b]        then per group: * s[r, g] - s z asum[m, g]

Float form (``act_bits=0``; ``gemm_float_func``): a tile's weights are decoded to float32 once
(``[R, K]``, ``float(c - z) * s``: in L1/L2, never the whole matrix) and every token pair is a dot-product
micro-kernel over it: ``R x MT`` float32x8 accumulators, two loads per multiply-add pair::

    for tile t (parallel):  wf[r, k] = (c[r, k] - z) * s[r, g]
      for token pair m0:  acc[r, m] += wf[r, k:k+8] * x[m, k:k+8]

A token count that is not a multiple of ``MT`` reads the last token again for the missing ones (the loads stay
in bounds without a predicate in the inner loop) and does not store them.
"""
from __future__ import annotations

from typing import Any

from .bias import bias_buffer, with_bias
from .qgemv import _zero, hsum, store_rows, unroll_factor
from .qlayout import QLayout, codes, codes8

__all__ = ["gemm_int_func", "gemm_float_func", "MT"]

#: Tokens per micro-kernel step.
MT = 2


def gemm_int_func(layout: QLayout, isa: Any, act_group: int, *, swiglu: bool = False, bias: bool = False) -> Any:
    """``(qa i8 [M, K], sa f32 [M, K/act_group], asum f32 [M, K/group], w, sz) -> y f32 [M, N]``, M symbolic
    (``[M, N/2]`` with ``swiglu``: silu(gate) * up, ``epilogue.py``; with ``bias`` a ``b f32 [N]`` input before ``y``,
    ``bias.py``)."""
    from tvm.script import tirx as T

    R, K, N, G, GA = layout.rows, layout.in_features, layout.out_features, layout.group, act_group
    NT, NG, BPG, SUB = layout.tiles, layout.groups, G // GA, GA // 32
    U = unroll_factor(SUB, 4)
    dot = isa.dot_s8s8 if layout.signed else isa.dot_u8s8
    comp = not (layout.sym and layout.zero == 0)
    V = T.ramp(0, 1, 8)
    store = store_rows()
    bvec = bias_buffer(N, bias)

    @T.prim_func(private=True, check_well_formed=bvec is None)
    def func(var_qa: T.handle, var_sa: T.handle, var_asum: T.handle, w: T.Buffer(layout.w_shape, layout.dtype),
             sz: T.Buffer(layout.sz_shape, "float32"), var_y: T.handle):
        T.func_attr({"tirx.noalias": True})
        M = T.int64()
        qa = T.match_buffer(var_qa, (M, K), "int8")
        sa = T.match_buffer(var_sa, (M, K // GA), "float32")
        asum = T.match_buffer(var_asum, (M, NG), "float32")
        y = T.match_buffer(var_y, (M, N // 2 if swiglu else N), "float32")
        for t in T.parallel(NT):
            facc = T.alloc_buffer((R, MT, 8), "float32", scope="global")
            gacc = T.alloc_buffer((R, MT, 8), "float32", scope="global")
            iacc = T.alloc_buffer((R, MT, 8), "int32", scope="global")
            for m0 in range((M + MT - 1) // MT):
                for r, mi in T.grid(R, MT):
                    facc[r, mi, V] = T.broadcast(T.float32(0), 8)
                for g in range(NG):
                    for r, mi in T.grid(R, MT):
                        gacc[r, mi, V] = T.broadcast(T.float32(0), 8)
                    for b in range(BPG):
                        for r, mi in T.grid(R, MT):
                            iacc[r, mi, V] = T.broadcast(T.int32(0), 8)
                        for so in range(SUB // U):
                            for si in T.unroll(U):
                                for mi in T.unroll(MT):
                                    for r in T.unroll(R):
                                        iacc[r, mi, V] = dot(
                                            iacc[r, mi, V], codes(layout, w, t, g * G + b * GA + (so * U + si) * 32, r),
                                            qa.vload([T.min(m0 * MT + mi, M - 1), g * G + b * GA + (so * U + si) * 32],
                                                     "int8x32"))
                        for mi in T.unroll(MT):
                            for r in T.unroll(R):
                                gacc[r, mi, V] = gacc[r, mi, V] + T.Cast("float32x8", iacc[r, mi, V]) * T.broadcast(
                                    sa[T.min(m0 * MT + mi, M - 1), g * BPG + b], 8)
                    for mi in T.unroll(MT):
                        for r in T.unroll(R):
                            facc[r, mi, V] = facc[r, mi, V] + gacc[r, mi, V] * T.broadcast(sz[t, g, r, 0], 8)
                            if comp:
                                facc[r, mi, V] = facc[r, mi, V] - T.broadcast(
                                    sz[t, g, r, 0] * _zero(layout, sz, t, g, r)
                                    * asum[T.min(m0 * MT + mi, M - 1), g] * T.float32(0.125), 8)
                for mi in T.unroll(MT):
                    if m0 * MT + mi < M:
                        store(y, m0 * MT + mi, t, facc, R, swiglu, bvec, mi)

    return with_bias(func, bvec)


def gemm_float_func(layout: QLayout, *, swiglu: bool = False, bias: bool = False) -> Any:
    """``(x f32 [M, K], w, sz) -> y f32 [M, N]``, M symbolic (``[M, N/2]`` with ``swiglu``; ``bias`` as
    ``gemm_int_func``)."""
    from tvm.script import tirx as T

    R, K, N, G = layout.rows, layout.in_features, layout.out_features, layout.group
    NT, NG = layout.tiles, layout.groups
    V = T.ramp(0, 1, 8)
    store = store_rows()
    bvec = bias_buffer(N, bias)

    @T.prim_func(private=True, check_well_formed=bvec is None)
    def func(var_x: T.handle, w: T.Buffer(layout.w_shape, layout.dtype), sz: T.Buffer(layout.sz_shape, "float32"),
             var_y: T.handle):
        T.func_attr({"tirx.noalias": True})
        M = T.int64()
        x = T.match_buffer(var_x, (M, K), "float32")
        y = T.match_buffer(var_y, (M, N // 2 if swiglu else N), "float32")
        for t in T.parallel(NT):
            wf = T.alloc_buffer((R, K), "float32", scope="global")
            acc = T.alloc_buffer((R, MT, 8), "float32", scope="global")
            for g in range(NG):
                for k8 in range(G // 8):
                    for r in T.unroll(R):
                        wf[r, T.ramp(g * G + k8 * 8, 1, 8)] = (T.Cast("float32x8", codes8(
                            layout, w, t, g * G + k8 * 8, r)) - T.broadcast(_zero(layout, sz, t, g, r), 8)) \
                            * T.broadcast(sz[t, g, r, 0], 8)
            for m0 in range((M + MT - 1) // MT):
                for r, mi in T.grid(R, MT):
                    acc[r, mi, V] = T.broadcast(T.float32(0), 8)
                for k8 in range(K // 8):
                    for mi in T.unroll(MT):
                        for r in T.unroll(R):
                            acc[r, mi, V] = acc[r, mi, V] + wf.vload([r, k8 * 8], "float32x8") * x.vload(
                                [T.min(m0 * MT + mi, M - 1), k8 * 8], "float32x8")
                for mi in T.unroll(MT):
                    if m0 * MT + mi < M:
                        store(y, m0 * MT + mi, t, acc, R, swiglu, bvec, mi)

    return with_bias(func, bvec)
