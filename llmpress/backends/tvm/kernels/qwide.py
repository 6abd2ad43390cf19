"""The integer quantized kernels on 512-bit registers (AVX-512 VNNI): GEMV (decode) and GEMM (prefill).

Same layout (``qlayout.py``), same arithmetic as the 256-bit forms of ``qgemv.py``/``qgemm.py``; what changes is
the width. In the tiled layout rows ``2p`` and ``2p + 1`` of a tile are adjacent for a given chunk (``w[t, c, r,
:]``, 32 bytes each), so one 64-byte load holds the 32-feature runs of two rows; the activation run is repeated in
both halves of the register, and one ``vpdpbusd`` (``llvm.x86.avx512.vpdpbusd.512``) multiplies 64 weight bytes:
the int32 lanes 0-7 hold row ``2p``'s partial sums, lanes 8-15 row ``2p + 1``'s::

    acc[p, m] (int32x16) += vpdpbusd(codes(rows 2p, 2p+1), qa[m, k:k+32] twice)       per 32 features
    per group g:  facc[p, m] += float(acc) * (s_rows * sa[m, g]) - s_rows * z_rows * asum[m, g] / 8

8-bit codes (stored signed) are made unsigned by flipping the sign bit (``c + 128``); their zero point becomes
``z + 128`` (AVX-512 has no ``vpsignb`` for the 256-bit forms' sign trick). Layouts with two planes (3-bit) keep
the 256-bit kernels: their rows are not adjacent in memory.

GEMM: a tile's 2 row pairs times ``MT_WIDE`` (4) tokens = 8 int32x16 accumulators.
"""
from __future__ import annotations

from typing import Any

from .bias import bias_buffer, plus_bias, with_bias
from .qgemv import PARALLEL_MIN_MACS, unroll_factor
from .epilogue import silu_mul, swiglu_flush, swiglu_tiles
from .qlayout import QLayout

__all__ = ["wide_applies", "gemv_wide_func", "gemm_wide_func", "MT_WIDE"]

#: Tokens per GEMM step on AVX-512: 2 row pairs x 4 tokens = 8 int32x16 accumulators (8 tokens: 16 spill in the
#: group tail; measured 240 vs 154 GMAC/s on one core, 1024 x 2048).
MT_WIDE = 4


def wide_applies(layout: QLayout, isa: Any) -> bool:
    """Whether the 512-bit kernels take this layout on this instruction set."""
    return isa.name == "avx512vnni" and len(layout.planes) == 1 and layout.rows % 2 == 0


def _codes64(layout: QLayout, w: Any, t: Any, k0: Any, p: Any) -> Any:
    """``uint8x64``: the codes of features ``k0 .. k0 + 31`` of rows ``2p`` and ``2p + 1`` (8-bit: ``c + 128``)."""
    from tvm import tirx

    CH = layout.chunk
    c, within = k0 // CH, k0 % CH
    if layout.signed:
        v = w.vload([t, c, 2 * p, within], "int8x64")
        return tirx.reinterpret("uint8x64", v ^ tirx.Broadcast(tirx.const(-128, "int8"), 64))
    plane = layout.planes[0]
    v = w.vload([t, c, 2 * p, 32 * (within // plane.run)], "uint8x64")
    if plane.per_byte > 1:
        i = (within // 32) % plane.per_byte
        v = v >> tirx.Broadcast((i * plane.bits).astype("uint8"), 64)
        v = v & tirx.Broadcast(tirx.const((1 << plane.bits) - 1, "uint8"), 64)
    return v


def _act64(qa: Any, m: Any, k0: Any) -> Any:
    from tvm import tirx

    a = qa.vload([m, k0], "int8x32")
    return tirx.vectorcombine("int8x64", a, a)


def _vnni(acc: Any, w: Any, a: Any) -> Any:
    from tvm import tirx

    return tirx.call_llvm_pure_intrin("int32x16", "llvm.x86.avx512.vpdpbusd.512", acc, w, a)


def _pair(lo: Any, hi: Any) -> Any:
    """float32x16 with ``lo`` in lanes 0-7 and ``hi`` in lanes 8-15."""
    from tvm import tirx

    return tirx.vectorcombine("float32x16", tirx.Broadcast(lo, 8), tirx.Broadcast(hi, 8))


def _zero(layout: QLayout, sz: Any, t: Any, g: Any, r: Any) -> Any:
    from tvm import tirx

    if layout.sym:
        return tirx.const(float(layout.zero + (128 if layout.signed else 0)), "float32")
    return sz[t, g, r, 1] + tirx.const(128.0 if layout.signed else 0.0, "float32")


def _half_sum(buf: Any, *idx: Any, half: int) -> Any:
    vals = [buf[(*idx, half * 8 + i)] for i in range(8)]
    while len(vals) > 1:
        vals = [vals[i] + vals[i + 1] for i in range(0, len(vals), 2)]
    return vals[0]


def gemv_wide_func(layout: QLayout, act_group: int, *, swiglu: bool = False, bias: bool = False) -> Any:
    """``(qa i8 [1, K], sa f32 [1, K/act_group], asum f32 [1, K/group], w, sz) -> y f32 [1, N]`` (``[1, N/2]``
    with ``swiglu``: silu(gate) * up, weights in the row order of ``epilogue.py``; needs ``R = 4``; with ``bias`` a
    ``b f32 [N]`` input before ``y``, added in the store: ``bias.py``)."""
    from tvm.script import tirx as T

    R, K, N, G, GA = layout.rows, layout.in_features, layout.out_features, layout.group, act_group
    NT, NG, BPG, SUB = layout.tiles, layout.groups, G // GA, GA // 32
    P = R // 2
    U = unroll_factor(SUB, 4)
    par = N * K >= PARALLEL_MIN_MACS
    V = T.ramp(0, 1, 16)
    bvec = bias_buffer(N, bias)
    # with swiglu: C tiles per step of the parallel loop, their HC outputs through one vector silu_mul (epilogue.py)
    C = swiglu_tiles(NT, P, swiglu)
    HC = C * P
    staged = swiglu and HC > 1
    flush = swiglu_flush()

    def k_of(g, b, so, si):
        return g * G + b * GA + (so * U + si) * 32

    @T.macro
    def tile(facc, qa, sa, asum, w, sz, t):
        # facc[p, :] = the 16 lane sums of tile t's row pair p (scales and zero points applied)
        gacc = T.alloc_buffer((P, 16), "float32", scope="global")
        iacc = T.alloc_buffer((P, 16), "int32", scope="global")
        for p in T.unroll(P):
            facc[p, V] = T.broadcast(T.float32(0), 16)
        for g in range(NG):
            for p in T.unroll(P):
                gacc[p, V] = T.broadcast(T.float32(0), 16)
            for b in range(BPG):
                for p in T.unroll(P):
                    iacc[p, V] = T.broadcast(T.int32(0), 16)
                for so in range(SUB // U):
                    for si in T.unroll(U):
                        for p in T.unroll(P):
                            iacc[p, V] = _vnni(iacc[p, V], _codes64(layout, w, t, k_of(g, b, so, si), p),
                                               _act64(qa, 0, k_of(g, b, so, si)))
                for p in T.unroll(P):
                    gacc[p, V] = gacc[p, V] + T.Cast("float32x16", iacc[p, V]) * T.broadcast(
                        sa[0, g * BPG + b], 16)
            for p in T.unroll(P):
                facc[p, V] = facc[p, V] + (gacc[p, V] - _pair(
                    _zero(layout, sz, t, g, 2 * p), _zero(layout, sz, t, g, 2 * p + 1)) * T.broadcast(
                    asum[0, g] * T.float32(0.125), 16)) * _pair(sz[t, g, 2 * p, 0], sz[t, g, 2 * p + 1, 0])

    @T.prim_func(private=True, check_well_formed=bvec is None)
    def func(qa: T.Buffer((1, K), "int8"), sa: T.Buffer((1, K // GA), "float32"), asum: T.Buffer((1, NG), "float32"),
             w: T.Buffer(layout.w_shape, layout.dtype), sz: T.Buffer(layout.sz_shape, "float32"),
             y: T.Buffer((1, N // 2 if swiglu else N), "float32")):
        T.func_attr({"tirx.noalias": True})
        if staged:
            for tc in T.parallel(NT // C) if par else T.serial(NT // C):
                gu = T.alloc_buffer((2, HC), "float32", scope="global")
                for ti in T.serial(C):
                    facc = T.alloc_buffer((P, 16), "float32", scope="global")
                    tile(facc, qa, sa, asum, w, sz, tc * C + ti)
                    for h in T.unroll(2):  # pair 0: gate rows t H, t H + 1; pair 1: their up rows (epilogue.py)
                        gu[0, ti * P + h] = _half_sum(facc, 0, half=h)
                        gu[1, ti * P + h] = _half_sum(facc, 1, half=h)
                flush(y, 0, tc, gu, HC)
        else:
            for t in T.parallel(NT) if par else T.serial(NT):
                facc = T.alloc_buffer((P, 16), "float32", scope="global")
                tile(facc, qa, sa, asum, w, sz, t)
                if swiglu:  # pair 0: gate rows t H, t H + 1; pair 1: their up rows (epilogue.py)
                    y[0, t * P] = silu_mul(_half_sum(facc, 0, half=0), _half_sum(facc, 1, half=0))
                    y[0, t * P + 1] = silu_mul(_half_sum(facc, 0, half=1), _half_sum(facc, 1, half=1))
                else:
                    for p in T.unroll(P):
                        y[0, t * R + 2 * p] = plus_bias(_half_sum(facc, p, half=0), bvec, t * R + 2 * p)
                        y[0, t * R + 2 * p + 1] = plus_bias(_half_sum(facc, p, half=1), bvec, t * R + 2 * p + 1)

    return with_bias(func, bvec)


def gemm_wide_func(layout: QLayout, act_group: int, *, swiglu: bool = False, bias: bool = False) -> Any:
    """``(qa i8 [M, K], sa f32 [M, K/act_group], asum f32 [M, K/group], w, sz) -> y f32 [M, N]``, M symbolic
    (``[M, N/2]`` with ``swiglu``, ``bias`` as ``gemv_wide_func``)."""
    from tvm.script import tirx as T

    R, K, N, G, GA = layout.rows, layout.in_features, layout.out_features, layout.group, act_group
    NT, NG, BPG, SUB = layout.tiles, layout.groups, G // GA, GA // 32
    P, MT = R // 2, MT_WIDE
    U = unroll_factor(SUB, 2)
    V = T.ramp(0, 1, 16)
    bvec = bias_buffer(N, bias)

    def k_of(g, b, so, si):
        return g * G + b * GA + (so * U + si) * 32

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
            facc = T.alloc_buffer((P, MT, 16), "float32", scope="global")
            gacc = T.alloc_buffer((P, MT, 16), "float32", scope="global")
            iacc = T.alloc_buffer((P, MT, 16), "int32", scope="global")
            for m0 in range((M + MT - 1) // MT):
                for p, mi in T.grid(P, MT):
                    facc[p, mi, V] = T.broadcast(T.float32(0), 16)
                for g in range(NG):
                    for p, mi in T.grid(P, MT):
                        gacc[p, mi, V] = T.broadcast(T.float32(0), 16)
                    for b in range(BPG):
                        for p, mi in T.grid(P, MT):
                            iacc[p, mi, V] = T.broadcast(T.int32(0), 16)
                        for so in range(SUB // U):
                            for si in T.unroll(U):
                                for mi in T.unroll(MT):
                                    for p in T.unroll(P):
                                        iacc[p, mi, V] = _vnni(
                                            iacc[p, mi, V], _codes64(layout, w, t, k_of(g, b, so, si), p),
                                            _act64(qa, T.min(m0 * MT + mi, M - 1), k_of(g, b, so, si)))
                        for mi in T.unroll(MT):
                            for p in T.unroll(P):
                                gacc[p, mi, V] = gacc[p, mi, V] + T.Cast("float32x16", iacc[p, mi, V]) * T.broadcast(
                                    sa[T.min(m0 * MT + mi, M - 1), g * BPG + b], 16)
                    for mi in T.unroll(MT):
                        for p in T.unroll(P):
                            facc[p, mi, V] = facc[p, mi, V] + (gacc[p, mi, V] - _pair(
                                _zero(layout, sz, t, g, 2 * p), _zero(layout, sz, t, g, 2 * p + 1)) * T.broadcast(
                                asum[T.min(m0 * MT + mi, M - 1), g] * T.float32(0.125), 16)) * _pair(
                                sz[t, g, 2 * p, 0], sz[t, g, 2 * p + 1, 0])
                for mi in T.unroll(MT):
                    if m0 * MT + mi < M:
                        if swiglu:
                            y[m0 * MT + mi, t * P] = silu_mul(_half_sum(facc, 0, mi, half=0),
                                                              _half_sum(facc, 1, mi, half=0))
                            y[m0 * MT + mi, t * P + 1] = silu_mul(_half_sum(facc, 0, mi, half=1),
                                                                  _half_sum(facc, 1, mi, half=1))
                        else:
                            for p in T.unroll(P):
                                y[m0 * MT + mi, t * R + 2 * p] = plus_bias(_half_sum(facc, p, mi, half=0), bvec,
                                                                           t * R + 2 * p)
                                y[m0 * MT + mi, t * R + 2 * p + 1] = plus_bias(_half_sum(facc, p, mi, half=1), bvec,
                                                                               t * R + 2 * p + 1)

    return with_bias(func, bvec)
