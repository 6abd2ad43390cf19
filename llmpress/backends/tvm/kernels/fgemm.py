"""Float32 linear layers on CPU: ``y = x W^T`` for a weight ``W [N, K]`` the kernels read in a tiled layout.

TVM's frontend lowers ``aten.linear`` to ``matmul(x, permute_dims(W))``; scheduled as a plain matmul that reads
``W^T`` column tiles (the transpose computed at compile time), a batch-1 GEMV streams ``K`` strided runs per tile
and reaches about 45 GB/s of the machine's 75 here. ``dispatch.py`` rewrites such a matmul, when ``W`` is a weight
parameter, into the kernels below over a repacked ``W`` (computed at compile time like the quantized repacks):

    w[t, c, r, j] = W[R t + r, 8 c + j]         tile t of R = 4 rows, chunk c of 8 input features, [N/R, K/8, R, 8]

so a thread's tiles are one sequential stream, 32 bytes per row per chunk.

GEMV (decode), per tile: ``acc[r] += w[t, c, r, :] * x[8c : 8c+8]`` with two chains per row (8 independent
multiply-add chains), one horizontal sum per row at the end. GEMM (prefill): a dot-product micro-kernel on the
weights as stored, ``R x MT`` accumulators (4 rows x 2 tokens), cache-blocked over tiles and K (``gemm_func``).
With AVX-512 (``isa.name == "avx512vnni"``, the 512-bit build) one 64-byte load holds the chunks of rows 2p and
2p + 1, multiplied by the activation chunk repeated in both halves (as ``qwide.py`` does for integers); its GEMM
takes 2 row pairs x 6 tokens. 128 x 4096 x 4096 on 2 Zen 5 cores: 103 GMAC/s (256-bit), 162 (512-bit).

Only the summation order differs from the reference (fp32 throughout).
"""
from __future__ import annotations

from typing import Any

from .bias import bias_buffer, plus_bias, with_bias
from .qgemv import PARALLEL_MIN_MACS, hsum, store_rows
from .qwide import _half_sum

__all__ = ["ROWS", "CHUNK", "fits", "repack_te", "gemv_func", "gemm_func", "gemm_swiglu_fits"]

ROWS, CHUNK = 4, 8
#: Tokens per step of the 512-bit GEMM (``_gemm_wide``).
MT_WIDE = 6
#: GEMM cache blocking (``gemm_func``): at most this many tiles per task (fewer when that would leave under
#: ``MIN_TASKS`` tasks for the thread pool), chunks per K block (1024 features).
TILE_BLOCK, MIN_TASKS, K_BLOCK = 16, 32, 128


def _tile_block(nt: int) -> int:
    return max(1, min(TILE_BLOCK, nt // MIN_TASKS))


def fits(n: int, k: int) -> bool:
    return n % ROWS == 0 and k % CHUNK == 0 and k >= 2 * CHUNK


def repack_te(w: Any, *, swiglu: bool = False) -> Any:
    """``W [N, K]`` -> the tiled ``[N/4, K/8, 4, 8]``; with ``swiglu`` the rows in ``epilogue.source_row`` order."""
    from tvm import te

    from .epilogue import source_row

    n, k = (int(d) for d in w.shape)

    def row(t, r):
        return source_row(t, r, ROWS, n // 2) if swiglu else t * ROWS + r

    return te.compute((n // ROWS, k // CHUNK, ROWS, CHUNK), lambda t, c, r, j: w[row(t, r), c * CHUNK + j],
                      name="w_tiled")


def gemm_swiglu_fits(k: int) -> bool:
    """Whether the GEMM can apply the SwiGLU epilogue: K in one cache block (the sums are final after one pass;
    with several blocks ``y`` holds partial sums, so the caller un-permutes the output instead)."""
    return k // CHUNK <= K_BLOCK


def _wide(isa: Any) -> bool:
    return isa.name == "avx512vnni"


def gemv_func(n: int, k: int, isa: Any, *, swiglu: bool = False, bias: bool = False) -> Any:
    """``(x f32 [1, K], w [N/4, K/8, 4, 8]) -> y f32 [1, N]``; ``[1, N/2]`` with ``swiglu`` (silu(gate) * up, the
    weights repacked with ``swiglu``: ``epilogue.py``); with ``bias`` a ``b f32 [N]`` input before ``y``, added in
    the store (``bias.py``)."""
    from tvm import tirx
    from tvm.script import tirx as T

    from .epilogue import silu_mul

    NO = n // 2 if swiglu else n
    store = store_rows()
    bvec = bias_buffer(n, bias)

    R, C, NT, KC = ROWS, CHUNK, n // ROWS, k // CHUNK
    par = n * k >= PARALLEL_MIN_MACS
    if _wide(isa):
        P, V = R // 2, T.ramp(0, 1, 16)

        def xx(x, c):
            v = x.vload([0, c * C], "float32x8")
            return tirx.vectorcombine("float32x16", v, v)

        @T.prim_func(private=True, check_well_formed=bvec is None)
        def wide(x: T.Buffer((1, k), "float32"), w: T.Buffer((NT, KC, R, C), "float32"),
                 y: T.Buffer((1, NO), "float32")):
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
                for c in range(KC - KC % 2, KC):  # an odd chunk count's last chunk
                    for p in T.unroll(P):
                        acc[p, 0, V] = acc[p, 0, V] + w.vload([t, c, 2 * p, 0], "float32x16") * xx(x, c)
                for p in T.unroll(P):  # lanes 0-7: row 2p, lanes 8-15: row 2p + 1
                    acc[p, 0, V] = acc[p, 0, V] + acc[p, 1, V]
                if swiglu:  # pair 0: gate rows t P, t P + 1; pair 1: their up rows
                    y[0, t * P] = silu_mul(_half_sum(acc, 0, 0, half=0), _half_sum(acc, 1, 0, half=0))
                    y[0, t * P + 1] = silu_mul(_half_sum(acc, 0, 0, half=1), _half_sum(acc, 1, 0, half=1))
                else:
                    for p in T.unroll(P):
                        y[0, t * R + 2 * p] = plus_bias(_half_sum(acc, p, 0, half=0), bvec, t * R + 2 * p)
                        y[0, t * R + 2 * p + 1] = plus_bias(_half_sum(acc, p, 0, half=1), bvec, t * R + 2 * p + 1)

        return with_bias(wide, bvec)

    V8 = T.ramp(0, 1, 8)

    @T.prim_func(private=True, check_well_formed=bvec is None)
    def narrow(x: T.Buffer((1, k), "float32"), w: T.Buffer((NT, KC, R, C), "float32"),
               y: T.Buffer((1, NO), "float32")):
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
            for c in range(KC - KC % 2, KC):  # an odd chunk count's last chunk
                for r in T.unroll(R):
                    acc[r, 0, V8] = acc[r, 0, V8] + w.vload([t, c, r, 0], "float32x8") * x.vload([0, c * C],
                                                                                                "float32x8")
            for r in T.unroll(R):
                acc[r, 0, V8] = acc[r, 0, V8] + acc[r, 1, V8]
            store(y, 0, t, acc, R, swiglu, bvec, 0)

    return with_bias(narrow, bvec)


def _kb_sum(y: Any, m: Any, col: Any, v: Any, kb: Any, bias: Any = None) -> Any:
    """What ``y[m, col]`` becomes after K block ``kb`` adds ``v``: ``v`` (plus the bias) for the first block."""
    from tvm import tirx

    return tirx.Select(kb == 0, plus_bias(v, bias, col), y[m, col] + v)


def gemm_func(n: int, k: int, isa: Any, *, swiglu: bool = False, bias: bool = False) -> Any:
    """``(x f32 [M, K], w [N/4, K/8, 4, 8]) -> y f32 [M, N]``, M symbolic; ``[M, N/2]`` with ``swiglu``
    (``gemm_swiglu_fits(k)`` must hold); ``bias`` as ``gemv_func`` (added with the first K block's sums).

    Blocked for the caches: a task takes up to ``TILE_BLOCK`` tiles and sweeps them K block by K block (``K_BLOCK``
    chunks), token step by token step, so a step's activation rows (``MT x K_BLOCK`` floats) stay in L1 for every
    tile of the block, and the block's weights in L2 for every step. Unblocked (tile by tile over all of K) every
    tile streamed all of ``x`` from L3: 111 vs 161 GMAC/s at 128 x 4096 x 4096 on 2 Zen 5 cores (512-bit form)."""
    from tvm.script import tirx as T

    if swiglu and not gemm_swiglu_fits(k):
        raise ValueError(f"fgemm: the SwiGLU epilogue needs K <= {K_BLOCK * CHUNK}, got {k}")
    if _wide(isa):
        return _gemm_wide(n, k, swiglu, bias)
    R, C, NT, KC = ROWS, CHUNK, n // ROWS, k // CHUNK
    MT, TB, KB = 2, _tile_block(NT), K_BLOCK
    V8 = T.ramp(0, 1, 8)
    store = store_rows()
    bvec = bias_buffer(n, bias)

    @T.prim_func(private=True, check_well_formed=bvec is None)
    def func(var_x: T.handle, w: T.Buffer((NT, KC, R, C), "float32"), var_y: T.handle):
        T.func_attr({"tirx.noalias": True})
        M = T.int64()
        x = T.match_buffer(var_x, (M, k), "float32")
        y = T.match_buffer(var_y, (M, n // 2 if swiglu else n), "float32")
        for tb in T.parallel((NT + TB - 1) // TB):
            acc = T.alloc_buffer((R, MT, 8), "float32", scope="global")
            for kb in range((KC + KB - 1) // KB):
                for m0 in range((M + MT - 1) // MT):
                    for tt in range(T.min(TB, NT - tb * TB)):
                        for r, mi in T.grid(R, MT):
                            acc[r, mi, V8] = T.broadcast(T.float32(0), 8)
                        for c in range(kb * KB, T.min(KC, kb * KB + KB)):
                            for mi in T.unroll(MT):
                                for r in T.unroll(R):
                                    acc[r, mi, V8] = acc[r, mi, V8] + w.vload([tb * TB + tt, c, r, 0],
                                                                              "float32x8") * x.vload(
                                        [T.min(m0 * MT + mi, M - 1), c * C], "float32x8")
                        for mi in T.unroll(MT):
                            if m0 * MT + mi < M:
                                if swiglu:  # one K block: the sums are final
                                    store(y, m0 * MT + mi, tb * TB + tt, acc, R, True, None, mi)
                                else:
                                    for r in T.unroll(R):
                                        y[m0 * MT + mi, (tb * TB + tt) * R + r] = _kb_sum(
                                            y, m0 * MT + mi, (tb * TB + tt) * R + r, hsum(acc, r, mi), kb, bvec)

    return with_bias(func, bvec)


def _gemm_wide(n: int, k: int, swiglu: bool = False, bias: bool = False) -> Any:
    """The GEMM on 512-bit registers: a 64-byte load holds one chunk of rows 2p and 2p + 1, times the token's chunk
    repeated in both halves; 2 row pairs x ``MT_WIDE`` tokens = 12 float32x16 accumulators (12 independent FMA
    chains cover 2 FMA units x 4 cycles of latency), 2 weight loads and 6 activation loads per 12 FMAs. Blocked as
    ``gemm_func``."""
    from tvm import tirx
    from tvm.script import tirx as T

    from .epilogue import silu_mul

    R, C, NT, KC = ROWS, CHUNK, n // ROWS, k // CHUNK
    P, MT, TB, KB, V = R // 2, MT_WIDE, _tile_block(NT), K_BLOCK, T.ramp(0, 1, 16)
    bvec = bias_buffer(n, bias)

    def xx(x, m, c):
        v = x.vload([m, c * C], "float32x8")
        return tirx.vectorcombine("float32x16", v, v)

    @T.prim_func(private=True, check_well_formed=bvec is None)
    def func(var_x: T.handle, w: T.Buffer((NT, KC, R, C), "float32"), var_y: T.handle):
        T.func_attr({"tirx.noalias": True})
        M = T.int64()
        x = T.match_buffer(var_x, (M, k), "float32")
        y = T.match_buffer(var_y, (M, n // 2 if swiglu else n), "float32")
        for tb in T.parallel((NT + TB - 1) // TB):
            acc = T.alloc_buffer((P, MT, 16), "float32", scope="global")
            for kb in range((KC + KB - 1) // KB):
                for m0 in range((M + MT - 1) // MT):
                    for tt in range(T.min(TB, NT - tb * TB)):
                        for p, mi in T.grid(P, MT):
                            acc[p, mi, V] = T.broadcast(T.float32(0), 16)
                        for c in range(kb * KB, T.min(KC, kb * KB + KB)):
                            for mi in T.unroll(MT):
                                for p in T.unroll(P):
                                    acc[p, mi, V] = acc[p, mi, V] + w.vload([tb * TB + tt, c, 2 * p, 0],
                                                                            "float32x16") * xx(
                                        x, T.min(m0 * MT + mi, M - 1), c)
                        for mi in T.unroll(MT):
                            if m0 * MT + mi < M:
                                if swiglu:  # one K block: the sums are final
                                    y[m0 * MT + mi, (tb * TB + tt) * P] = silu_mul(
                                        _half_sum(acc, 0, mi, half=0), _half_sum(acc, 1, mi, half=0))
                                    y[m0 * MT + mi, (tb * TB + tt) * P + 1] = silu_mul(
                                        _half_sum(acc, 0, mi, half=1), _half_sum(acc, 1, mi, half=1))
                                else:
                                    for p in T.unroll(P):
                                        y[m0 * MT + mi, (tb * TB + tt) * R + 2 * p] = _kb_sum(
                                            y, m0 * MT + mi, (tb * TB + tt) * R + 2 * p,
                                            _half_sum(acc, p, mi, half=0), kb, bvec)
                                        y[m0 * MT + mi, (tb * TB + tt) * R + 2 * p + 1] = _kb_sum(
                                            y, m0 * MT + mi, (tb * TB + tt) * R + 2 * p + 1,
                                            _half_sum(acc, p, mi, half=1), kb, bvec)

    return with_bias(func, bvec)
