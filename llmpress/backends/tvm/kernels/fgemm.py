"""Float32 linear layers on CPU: ``y = x W^T`` for a weight ``W [N, K]`` the kernels read in a tiled layout.

TVM's frontend lowers ``aten.linear`` to ``matmul(x, permute_dims(W))``; scheduled as a plain matmul that reads
``W^T`` column tiles (the transpose computed at compile time), a batch-1 GEMV streams ``K`` strided runs per tile
and reaches about 45 GB/s of the machine's 75 here. ``dispatch.py`` rewrites such a matmul, when ``W`` is a weight
parameter, into the kernels below over a repacked ``W`` (computed at compile time like the quantized repacks):

    w[t, c, r, j] = W[R t + r, 8 c + j]         tile t of R = 4 rows, chunk c of 8 input features, [N/R, K/8, R, 8]

so a thread's tiles are one sequential stream, 32 bytes per row per chunk.

GEMV (decode), per tile: ``acc[r] += w[t, c, r, :] * x[8c : 8c+8]`` with two chains per row (8 independent
multiply-add chains), one horizontal sum per row at the end. GEMM (prefill): the dot-product micro-kernel of
``qgemm.gemm_float_func`` on the weights as stored: ``R x MT`` accumulators, two loads per ``R x MT`` multiply-adds.
With AVX-512 (``isa.name == "avx512vnni"``, the 512-bit build) one 64-byte load holds the chunks of rows 2p and
2p + 1, multiplied by the activation chunk repeated in both halves (as ``qwide.py`` does for integers).

Only the summation order differs from the reference (fp32 throughout).
"""
from __future__ import annotations

from typing import Any

from .qgemv import PARALLEL_MIN_MACS, hsum
from .qwide import _half_sum

__all__ = ["ROWS", "CHUNK", "fits", "repack_te", "gemv_func", "gemm_func"]

ROWS, CHUNK = 4, 8


def fits(n: int, k: int) -> bool:
    return n % ROWS == 0 and k % CHUNK == 0 and k >= 2 * CHUNK


def repack_te(w: Any) -> Any:
    from tvm import te

    n, k = (int(d) for d in w.shape)
    return te.compute((n // ROWS, k // CHUNK, ROWS, CHUNK), lambda t, c, r, j: w[t * ROWS + r, c * CHUNK + j],
                      name="w_tiled")


def _wide(isa: Any) -> bool:
    return isa.name == "avx512vnni"


def gemv_func(n: int, k: int, isa: Any) -> Any:
    """``(x f32 [1, K], w [N/4, K/8, 4, 8]) -> y f32 [1, N]``."""
    from tvm import tirx
    from tvm.script import tirx as T

    R, C, NT, KC = ROWS, CHUNK, n // ROWS, k // CHUNK
    par = n * k >= PARALLEL_MIN_MACS
    if _wide(isa):
        P, V = R // 2, T.ramp(0, 1, 16)

        def xx(x, c):
            v = x.vload([0, c * C], "float32x8")
            return tirx.vectorcombine("float32x16", v, v)

        @T.prim_func(private=True)
        def wide(x: T.Buffer((1, k), "float32"), w: T.Buffer((NT, KC, R, C), "float32"),
                 y: T.Buffer((1, n), "float32")):
            T.func_attr({"tirx.noalias": True})
            for t in T.parallel(NT) if par else T.serial(NT):
                acc = T.alloc_buffer((P, 2, 16), "float32", scope="global")
                for p in T.unroll(P):
                    acc[p, 0, V] = T.broadcast(T.float32(0), 16)
                    acc[p, 1, V] = T.broadcast(T.float32(0), 16)
                for c2 in range(KC // 2):
                    for h in T.unroll(2):
                        for p in T.unroll(P):
                            acc[p, h, V] = acc[p, h, V] + w.vload([t, c2 * 2 + h, 2 * p, 0], "float32x16") * xx(
                                x, c2 * 2 + h)
                for p in T.unroll(P):  # lanes 0-7: row 2p, lanes 8-15: row 2p + 1
                    acc[p, 0, V] = acc[p, 0, V] + acc[p, 1, V]
                    y[0, t * R + 2 * p] = _half_sum(acc, p, 0, half=0)
                    y[0, t * R + 2 * p + 1] = _half_sum(acc, p, 0, half=1)

        return wide

    V8 = T.ramp(0, 1, 8)

    @T.prim_func(private=True)
    def narrow(x: T.Buffer((1, k), "float32"), w: T.Buffer((NT, KC, R, C), "float32"),
               y: T.Buffer((1, n), "float32")):
        T.func_attr({"tirx.noalias": True})
        for t in T.parallel(NT) if par else T.serial(NT):
            acc = T.alloc_buffer((R, 2, 8), "float32", scope="global")
            for r in T.unroll(R):
                acc[r, 0, V8] = T.broadcast(T.float32(0), 8)
                acc[r, 1, V8] = T.broadcast(T.float32(0), 8)
            for c2 in range(KC // 2):
                for h in T.unroll(2):
                    for r in T.unroll(R):
                        acc[r, h, V8] = acc[r, h, V8] + w.vload([t, c2 * 2 + h, r, 0], "float32x8") * x.vload(
                            [0, (c2 * 2 + h) * C], "float32x8")
            for r in T.unroll(R):
                acc[r, 0, V8] = acc[r, 0, V8] + acc[r, 1, V8]
                y[0, t * R + r] = hsum(acc, r, 0)

    return narrow


def gemm_func(n: int, k: int, isa: Any) -> Any:
    """``(x f32 [M, K], w [N/4, K/8, 4, 8]) -> y f32 [M, N]``, M symbolic."""
    from tvm.script import tirx as T

    R, C, NT, KC = ROWS, CHUNK, n // ROWS, k // CHUNK
    MT = 2
    V8 = T.ramp(0, 1, 8)

    @T.prim_func(private=True)
    def func(var_x: T.handle, w: T.Buffer((NT, KC, R, C), "float32"), var_y: T.handle):
        T.func_attr({"tirx.noalias": True})
        M = T.int64()
        x = T.match_buffer(var_x, (M, k), "float32")
        y = T.match_buffer(var_y, (M, n), "float32")
        for t in T.parallel(NT):
            acc = T.alloc_buffer((R, MT, 8), "float32", scope="global")
            for m0 in range((M + MT - 1) // MT):
                for r, mi in T.grid(R, MT):
                    acc[r, mi, V8] = T.broadcast(T.float32(0), 8)
                for c in range(KC):
                    for mi in T.unroll(MT):
                        for r in T.unroll(R):
                            acc[r, mi, V8] = acc[r, mi, V8] + w.vload([t, c, r, 0], "float32x8") * x.vload(
                                [T.min(m0 * MT + mi, M - 1), c * C], "float32x8")
                for mi in T.unroll(MT):
                    if m0 * MT + mi < M:
                        for r in T.unroll(R):
                            y[m0 * MT + mi, t * R + r] = hsum(acc, r, mi)

    return func
