"""Batch-1 (decode) quantized GEMV kernels for CPU, reading the tiled layout of ``qlayout.py``.

Both forms give each thread whole tiles of ``R`` output rows; a tile's weights are one contiguous stream, one
activation load serves ``R`` rows, and every accumulator lives in a register (``global``-scope stack buffers that
LLVM promotes: TVM 0.27 puts ``local`` buffers of CPU kernels in heap workspaces, one memory round trip per
access). A 32-feature run of one row is decoded with two or three byte-wise vector ops (``qlayout.codes``).

Integer form (``act_bits=8``; ``gemv_int_func``), per tile ``t``, row ``r``, weight group ``g``, activation block
``b``::

    acc_i32[r]  = sum_{k in b} c[r, k] * qa[k]                  isa.dot_u8s8 / dot_s8s8: int32 lanes, exact
    acc_f32[r] += float(acc_i32[r]) * sa[b] (* s[r, g] when the block is the whole group)
    ... once per group: acc_f32[r] (*= s[r, g]) -= s[r, g] * z * asum[g]       z: zero point, asum: sum of xa
    y[R t + r]  = sum of the 8 lanes of acc_f32[r]

so a weight costs one byte-wise multiply-add, and the float work is per block, not per weight.

Float form (``act_bits=0``; ``gemv_float_func``): 8 codes at a time are loaded and widened to int32 lanes in one
instruction, converted to float32 and multiplied with the float activations; the scale and the zero point are
applied once per group (``xsum``: the activations' sum per group, computed once per call)::

    acc_f32[r] += float(c[r, k]) * x[k]                 8 lanes, two chains per row
    ... once per group:  y_r += s[r, g] * (acc_f32[r] - z * xsum[g])

Below ``PARALLEL_MIN_MACS`` multiply-adds a kernel runs on the calling thread (waking the pool costs more).
"""
from __future__ import annotations

import functools
from typing import Any

from .bias import bias_buffer, with_bias
from .epilogue import swiglu_flush, swiglu_tiles
from .qlayout import QLayout, codes, codes8

__all__ = ["gemv_int_func", "gemv_float_func", "PARALLEL_MIN_MACS", "hsum", "unroll_factor", "store_rows"]

#: Below this many multiply-adds per call, a kernel runs serially (a 256 x 768 GEMV is ~10 us on one core).
PARALLEL_MIN_MACS = 1 << 20


def hsum(buf: Any, *idx: Any, lanes: int = 8) -> Any:
    """Pairwise sum of ``buf[*idx, 0:lanes]`` (TIR expression)."""
    vals = [buf[(*idx, i)] for i in range(lanes)]
    while len(vals) > 1:
        vals = [vals[i] + vals[i + 1] for i in range(0, len(vals), 2)]
    return vals[0]


@functools.cache
def store_rows() -> Any:
    """TIR macro ``store_rows(y, m, t, acc, R, swiglu, bias)``: the output stage of a tile of ``R`` rows whose sums are
    ``acc[r, 0:8]`` (token ``m``)::

        y[m, t R + r] = sum(acc[r, :]) (+ bias[t R + r])                      r < R
        y[m, t H + r] = silu_mul(sum(acc[r, :]), sum(acc[r + H, :]))          r < H = R/2, with ``swiglu``

    (the SwiGLU row order of ``epilogue.py``). ``idx``: further indices of ``acc`` before the lanes (the token of
    a GEMM step)."""
    from tvm.script import tirx as T

    from .bias import plus_bias
    from .epilogue import silu_mul

    @T.macro
    def store(y, m, t, acc, R, swiglu, bias, *idx):
        if swiglu:
            for r in T.unroll(R // 2):
                y[m, t * (R // 2) + r] = silu_mul(hsum(acc, r, *idx), hsum(acc, r + R // 2, *idx))
        else:
            for r in T.unroll(R):
                y[m, t * R + r] = plus_bias(hsum(acc, r, *idx), bias, t * R + r)

    return store


@functools.cache
def stage_rows() -> Any:
    """TIR macro ``stage(gu, ti, acc, R)``: the gate and up sums of tile ``ti`` of a ``swiglu_tiles`` step into
    ``gu[0 | 1, ti H + r]`` (``H = R / 2``), for ``epilogue.swiglu_flush``."""
    from tvm.script import tirx as T

    @T.macro
    def stage(gu, ti, acc, R):
        for r in T.unroll(R // 2):
            gu[0, ti * (R // 2) + r] = hsum(acc, r)
            gu[1, ti * (R // 2) + r] = hsum(acc, r + R // 2)

    return stage


def unroll_factor(n: int, limit: int = 8) -> int:
    """The largest power of two <= ``limit`` dividing ``n``."""
    u = limit
    while n % u:
        u //= 2
    return u


def _zero(layout: QLayout, sz: Any, t: Any, g: Any, r: Any) -> Any:
    from tvm import tirx

    return tirx.const(float(layout.zero), "float32") if layout.sym else sz[t, g, r, 1]


def gemv_int_func(layout: QLayout, isa: Any, act_group: int, *, swiglu: bool = False, bias: bool = False) -> Any:
    """``(qa i8 [1, K], sa f32 [1, K/act_group], asum f32 [1, K/group], w, sz) -> y f32 [1, N]``; with ``swiglu``
    (weights in ``epilogue.source_row`` order) ``y f32 [1, N/2]`` = silu(gate) * up (``epilogue.py``); with ``bias``
    a ``b f32 [N]`` input before ``y``, added in the store (``bias.py``)."""
    from tvm.script import tirx as T

    R, K, N, G, GA = layout.rows, layout.in_features, layout.out_features, layout.group, act_group
    NT, NG, BPG, SUB = layout.tiles, layout.groups, G // GA, GA // 32
    run16 = 0 if layout.signed else isa.i16_run((1 << layout.bits) - 1)
    # U: runs of 32 features unrolled together; on AVX2 their vpmaddubsw results are summed in int16 (at most
    # run16 of them) and widened once per run, saving a vpmaddwd per 32 weights
    U = unroll_factor(SUB, min(8, run16) if run16 else 8)
    dot = isa.dot_s8s8 if layout.signed else isa.dot_u8s8
    comp = not (layout.sym and layout.zero == 0)
    par = N * K >= PARALLEL_MIN_MACS
    V = T.ramp(0, 1, 8)
    V16 = T.ramp(0, 1, 16)
    store = store_rows()
    stage, flush = stage_rows(), swiglu_flush()
    bvec = bias_buffer(N, bias)
    # with swiglu: C tiles per step of the parallel loop, their HC outputs through one vector silu_mul (epilogue.py)
    C = swiglu_tiles(NT, R // 2, swiglu)
    HC = C * (R // 2)
    staged = swiglu and HC > 1

    def k_of(g, b, so, si):
        return g * G + b * GA + (so * U + si) * 32

    @T.macro
    def accumulate(iacc, acc16, w, qa, t, g, b, so):
        if run16 > 0:
            for r in T.unroll(R):
                acc16[r, V16] = T.broadcast(T.int16(0), 16)
            for si in T.unroll(U):
                for r in T.unroll(R):
                    acc16[r, V16] = isa.madd_u8s8_i16(acc16[r, V16], codes(layout, w, t, k_of(g, b, so, si), r),
                                                      qa.vload([0, k_of(g, b, so, si)], "int8x32"))
            for r in T.unroll(R):
                iacc[r, V] = iacc[r, V] + isa.widen_i16(acc16[r, V16])
        else:
            for si in T.unroll(U):
                for r in T.unroll(R):
                    iacc[r, V] = dot(iacc[r, V], codes(layout, w, t, k_of(g, b, so, si), r),
                                     qa.vload([0, k_of(g, b, so, si)], "int8x32"))

    @T.macro
    def tile(facc, qa, sa, asum, w, sz, t):
        # facc[r, :] = the 8 lane sums of tile t's row r (scale, zero point and activation scales applied)
        gacc = T.alloc_buffer((R, 8), "float32", scope="global")
        iacc = T.alloc_buffer((R, 8), "int32", scope="global")
        acc16 = T.alloc_buffer((R, 16), "int16", scope="global")
        for r in T.unroll(R):
            facc[r, V] = T.broadcast(T.float32(0), 8)
        for g in range(NG):
            for r in T.unroll(R):
                gacc[r, V] = T.broadcast(T.float32(0), 8)
            for b in range(BPG):
                for r in T.unroll(R):
                    iacc[r, V] = T.broadcast(T.int32(0), 8)
                for so in range(SUB // U):
                    accumulate(iacc, acc16, w, qa, t, g, b, so)
                for r in T.unroll(R):
                    gacc[r, V] = gacc[r, V] + T.Cast("float32x8", iacc[r, V]) * T.broadcast(
                        sa[0, g * BPG + b], 8)
            for r in T.unroll(R):
                facc[r, V] = facc[r, V] + gacc[r, V] * T.broadcast(sz[t, g, r, 0], 8)
                if comp:
                    facc[r, V] = facc[r, V] - T.broadcast(
                        sz[t, g, r, 0] * _zero(layout, sz, t, g, r) * asum[0, g] * T.float32(0.125), 8)

    @T.prim_func(private=True, check_well_formed=bvec is None)
    def func(qa: T.Buffer((1, K), "int8"), sa: T.Buffer((1, K // GA), "float32"), asum: T.Buffer((1, NG), "float32"),
             w: T.Buffer(layout.w_shape, layout.dtype), sz: T.Buffer(layout.sz_shape, "float32"),
             y: T.Buffer((1, N // 2 if swiglu else N), "float32")):
        T.func_attr({"tirx.noalias": True})
        if staged:
            for tc in T.parallel(NT // C) if par else T.serial(NT // C):
                gu = T.alloc_buffer((2, HC), "float32", scope="global")
                for ti in T.serial(C):
                    facc = T.alloc_buffer((R, 8), "float32", scope="global")
                    tile(facc, qa, sa, asum, w, sz, tc * C + ti)
                    stage(gu, ti, facc, R)
                flush(y, 0, tc, gu, HC)
        else:
            for t in T.parallel(NT) if par else T.serial(NT):
                facc = T.alloc_buffer((R, 8), "float32", scope="global")
                tile(facc, qa, sa, asum, w, sz, t)
                store(y, 0, t, facc, R, swiglu, bvec)

    return with_bias(func, bvec)


def gemv_float_func(layout: QLayout, *, swiglu: bool = False, bias: bool = False) -> Any:
    """``(x f32 [1, K], w, sz) -> y f32 [1, N]`` (``[1, N/2]`` with ``swiglu``, ``bias`` as ``gemv_int_func``)."""
    from tvm.script import tirx as T

    R, K, N, G = layout.rows, layout.in_features, layout.out_features, layout.group
    NT, NG = layout.tiles, layout.groups
    par = N * K >= PARALLEL_MIN_MACS
    V = T.ramp(0, 1, 8)
    store = store_rows()
    stage, flush = stage_rows(), swiglu_flush()
    bvec = bias_buffer(N, bias)
    # with swiglu: C tiles per step of the parallel loop, their HC outputs through one vector silu_mul (epilogue.py)
    C = swiglu_tiles(NT, R // 2, swiglu)
    HC = C * (R // 2)
    staged = swiglu and HC > 1
    # Order of the 8-feature steps: when a group holds whole chunks, the values one byte run holds (feature
    # j, 32 + j, ... of the chunk) are decoded one after the other, so each 8-byte load is used at once.
    CH = layout.chunk if G % layout.chunk == 0 else 32
    PER = CH // 32  # values per byte position within a step run
    STEPS = G // CH

    def k_of(g, so, j, i):
        return g * G + so * CH + i * 32 + j * 8

    @T.macro
    def tile(facc, x, xsum, w, sz, t):
        # facc[r, :] = the 8 lane sums of tile t's row r (scale and zero point applied)
        gacc = T.alloc_buffer((R, 2, 8), "float32", scope="global")
        for r in T.unroll(R):
            facc[r, V] = T.broadcast(T.float32(0), 8)
        for g in range(NG):
            for r in T.unroll(R):
                gacc[r, 0, V] = T.broadcast(T.float32(0), 8)
                gacc[r, 1, V] = T.broadcast(T.float32(0), 8)
            for so in range(STEPS):
                for j in T.unroll(4):
                    for i in T.unroll(PER):
                        for r in T.unroll(R):  # two chains per row: 8 independent multiply-add chains per tile
                            gacc[r, i % 2, V] = gacc[r, i % 2, V] + T.Cast("float32x8", codes8(
                                layout, w, t, k_of(g, so, j, i), r)) * x.vload([0, k_of(g, so, j, i)], "float32x8")
            for r in T.unroll(R):
                facc[r, V] = facc[r, V] + (gacc[r, 0, V] + gacc[r, 1, V] - T.broadcast(
                    _zero(layout, sz, t, g, r) * xsum[g] * T.float32(0.125), 8)) * T.broadcast(
                    sz[t, g, r, 0], 8)

    @T.prim_func(private=True, check_well_formed=bvec is None)
    def func(x: T.Buffer((1, K), "float32"), w: T.Buffer(layout.w_shape, layout.dtype),
             sz: T.Buffer(layout.sz_shape, "float32"), y: T.Buffer((1, N // 2 if swiglu else N), "float32")):
        T.func_attr({"tirx.noalias": True})
        # sum of the activations per group, once per call (read by every thread): the zero point's term
        xsum = T.alloc_buffer((NG,), "float32", scope="global")
        xacc = T.alloc_buffer((8,), "float32", scope="global")
        for g in range(NG):
            xacc[V] = T.broadcast(T.float32(0), 8)
            for k in range(G // 8):
                xacc[V] = xacc[V] + x.vload([0, g * G + k * 8], "float32x8")
            xsum[g] = hsum(xacc)
        if staged:
            for tc in T.parallel(NT // C) if par else T.serial(NT // C):
                gu = T.alloc_buffer((2, HC), "float32", scope="global")
                for ti in T.serial(C):
                    facc = T.alloc_buffer((R, 8), "float32", scope="global")
                    tile(facc, x, xsum, w, sz, tc * C + ti)
                    stage(gu, ti, facc, R)
                flush(y, 0, tc, gu, HC)
        else:
            for t in T.parallel(NT) if par else T.serial(NT):
                facc = T.alloc_buffer((R, 8), "float32", scope="global")
                tile(facc, x, xsum, w, sz, t)
                store(y, 0, t, facc, R, swiglu, bvec)

    return with_bias(func, bvec)
