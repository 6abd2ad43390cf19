"""Sparse CPU linear kernels that read compressed weights: float32 sliced-ELL and int4 2:4.

Which layers get them is decided at compile time from the weight's actual zeros and the crossover measured by
``benchmarks/sparse_kernels.py`` (``sparse_plan.py``); ``dispatch.py`` rewrites the chosen linears, the repacks
below run once in ``transform_params`` (``params.py``), and the artifact stores the compressed tensors as they are
(no expansion at load).

**float32, any zero pattern (unstructured, N:M): sliced ELL (SELL-8).** Output rows are taken ``R = 8`` at a time
(tile ``t`` = rows ``8t .. 8t + 7``, the lanes of one vector). Tile ``t`` owns steps ``ptr[t] .. ptr[t+1] - 1``,
``ptr[t+1] - ptr[t]`` = the most nonzeros of any of its rows; step ``s`` of the tile holds, for lane ``r``, the
``s``-th nonzero of row ``8t + r``::

    vals [S, 8] float32      value        (0 where row 8t + r has fewer nonzeros: padding)
    idx  [S, 8] uint16       its column   (0 for padding)          K <= 65536
    ptr  [NT + 1] int32      first step of each tile               NT = ceil(N / 8)

    y[m, 8t + r] = sum_{s in tile t} vals[s, r] * x[m, idx[s, r]]

so a nonzero costs 6 bytes against 4 per dense weight (break-even on bytes at s = 1/3), one 8-lane load of values
and indices serves 8 rows, and the activation is gathered (``x`` is K floats: in L1/L2). Padding only rounds a
tile up to its longest row (a per-matrix ELL pads every row to the longest of all).

**int4 2:4** (``wq_linear`` bits=4, symmetric, float activations): every group of 4 inputs of a row keeps at most 2
codes (a pruned weight's code is the zero point, 8). Per row and per 8 inputs (two groups ``2o``, ``2o + 1``) three
bytes, tiled like ELL (lane = row)::

    w [NT, K/8, 3, 8] uint8:  [.., 0, r] = c0 | c1 << 4 of group 2o (the two kept codes), [.., 1, r] the same of
                              group 2o + 1, [.., 2, r] = p0 | p1 << 2 | p0' << 4 | p1' << 6 (their positions 0..3)
    s [NT, K/G, 8] float32    the group scales

    y[m, 8t + r] = sum_g s[t, g, r] * sum_{kept j in g} (c_j - 8) * x[m, 4 * group_of(j) + p_j]

3 bits per weight against 4 (plus scales, unchanged). A group with fewer than two nonzeros keeps a zero code.

Both are plain TIR (gathers are vector loads at a vector of indices, which LLVM scalarizes or turns into a gather
instruction): the same code builds for x86 ``cpu`` and ``arm64``. Only the summation order differs from the
reference (fp32). A padding entry multiplies ``x[m, 0]`` by 0: an infinite activation there would give NaN where
the dense kernel gives it too (0 * inf), so nothing new.
"""
from __future__ import annotations

from typing import Any

__all__ = ["R", "MT", "ell_repack_func", "ell_gemv_func", "ell_gemm_func", "nm24_repack_func", "nm24_gemv_func",
           "nm24_gemm_func"]

#: Rows per tile: the lanes of one float32x8 vector (one AVX2 register, two NEON registers).
R = 8
#: Tokens per step of the GEMM forms (prefill): one weight step serves this many tokens.
MT = 4


# -- float32 SELL-8 --------------------------------------------------------------------------------------------------
def ell_repack_func(n: int, k: int, steps: int) -> Any:
    """``(W f32 [n, k]) -> (vals f32 [S, 8], idx u16 [S, 8], ptr i32 [NT + 1])``: the compaction of the module
    docstring, serial per tile (it runs once, at compile time, on the build machine)."""
    from tvm.script import tirx as T

    NT = (n + R - 1) // R

    @T.prim_func(private=True, check_well_formed=False)  # the root block (below) is what the check refuses
    def repack(w: T.Buffer((n, k), "float32"), vals: T.Buffer((steps, R), "float32"),
               idx: T.Buffer((steps, R), "uint16"), ptr: T.Buffer((NT + 1,), "int32")):
        T.func_attr({"tirx.noalias": True})
        # a root block: Relax reads a one-input call_tir for a reshape pattern, which needs one
        with T.sblock("root"):
            cnt = T.alloc_buffer((R,), "int32", scope="global")
            base = T.alloc_buffer((1,), "int32", scope="global")
            base[0] = 0
            for t in range(NT):
                ptr[t] = base[0]
                most = T.alloc_buffer((1,), "int32", scope="global")
                most[0] = 0
                for r in range(R):
                    cnt[r] = 0
                    if t * R + r < n:
                        for c in range(k):
                            if w[t * R + r, c] != T.float32(0):
                                vals[base[0] + cnt[r], r] = w[t * R + r, c]
                                idx[base[0] + cnt[r], r] = T.Cast("uint16", c)
                                cnt[r] = cnt[r] + 1
                    most[0] = T.max(most[0], cnt[r])
                for r in range(R):
                    for s in range(cnt[r], most[0]):  # padding: value 0 at column 0
                        vals[base[0] + s, r] = T.float32(0)
                        idx[base[0] + s, r] = T.uint16(0)
                base[0] = base[0] + most[0]
            ptr[NT] = base[0]

    return repack


def ell_gemv_func(n: int, k: int, steps: int) -> Any:
    """``(x f32 [1, k], vals, idx, ptr) -> y f32 [1, n]`` (decode): tiles in parallel, two 8-lane chains per tile."""
    from tvm.script import tirx as T

    from .qgemv import PARALLEL_MIN_MACS

    NT = (n + R - 1) // R
    par = 2 * steps * R >= PARALLEL_MIN_MACS // 4
    V = T.ramp(0, 1, R)

    @T.prim_func(private=True)
    def gemv(x: T.Buffer((1, k), "float32"), vals: T.Buffer((steps, R), "float32"),
             idx: T.Buffer((steps, R), "uint16"), ptr: T.Buffer((NT + 1,), "int32"),
             y: T.Buffer((1, n), "float32")):
        T.func_attr({"tirx.noalias": True})
        for t in T.parallel(NT) if par else T.serial(NT):
            acc = T.alloc_buffer((2, R), "float32", scope="global")
            acc[0, V] = T.broadcast(T.float32(0), R)
            acc[1, V] = T.broadcast(T.float32(0), R)
            for s2 in range((ptr[t + 1] - ptr[t]) // 2):  # (no scalar lets: TVM puts them in heap workspaces)
                for h in T.unroll(2):
                    acc[h, V] = acc[h, V] + vals.vload([ptr[t] + 2 * s2 + h, 0], "float32x8") * x[
                        0, T.Cast("int32x8", idx.vload([ptr[t] + 2 * s2 + h, 0], "uint16x8"))]
            for s in range(ptr[t] + (ptr[t + 1] - ptr[t]) // 2 * 2, ptr[t + 1]):
                acc[0, V] = acc[0, V] + vals.vload([s, 0], "float32x8") * x[
                    0, T.Cast("int32x8", idx.vload([s, 0], "uint16x8"))]
            acc[0, V] = acc[0, V] + acc[1, V]
            if n % R == 0:
                y[0, T.ramp(t * R, 1, R)] = acc[0, V]
            else:
                for r in range(R):
                    if t * R + r < n:
                        y[0, t * R + r] = acc[0, r]

    return gemv


def ell_gemm_func(n: int, k: int, steps: int) -> Any:
    """``(x f32 [M, k], vals, idx, ptr) -> y f32 [M, n]``, M symbolic (prefill): per tile, ``MT`` tokens per pass
    over its steps (one load of values and indices serves them)."""
    from tvm.script import tirx as T

    NT = (n + R - 1) // R
    V = T.ramp(0, 1, R)

    @T.prim_func(private=True)
    def gemm(var_x: T.handle, vals: T.Buffer((steps, R), "float32"), idx: T.Buffer((steps, R), "uint16"),
             ptr: T.Buffer((NT + 1,), "int32"), var_y: T.handle):
        T.func_attr({"tirx.noalias": True})
        M = T.int64()
        x = T.match_buffer(var_x, (M, k), "float32")
        y = T.match_buffer(var_y, (M, n), "float32")
        for t in T.parallel(NT):
            acc = T.alloc_buffer((MT, R), "float32", scope="global")
            for m0 in range((M + MT - 1) // MT):
                for mi in T.unroll(MT):
                    acc[mi, V] = T.broadcast(T.float32(0), R)
                for s in range(ptr[t], ptr[t + 1]):
                    for mi in T.unroll(MT):
                        acc[mi, V] = acc[mi, V] + vals.vload([s, 0], "float32x8") * x[
                            T.min(m0 * MT + mi, M - 1), T.Cast("int32x8", idx.vload([s, 0], "uint16x8"))]
                for mi in T.unroll(MT):
                    if m0 * MT + mi < M:
                        for r in range(R):
                            if t * R + r < n:
                                y[m0 * MT + mi, t * R + r] = acc[mi, r]

    return gemm


# -- int4 2:4 --------------------------------------------------------------------------------------------------------
def nm24_repack_func(n: int, k: int, group: int, scale_dtype: str = "float32") -> Any:
    """``(qweight u8 [n, k/2], scales [n, k/group]) -> (w u8 [NT, k/8, 3, 8], s f32 [NT, k/group, 8])`` (module
    docstring) from ``wq_linear``'s packed int4 codes (low nibble: even column). Kept codes are the nonzero ones in
    column order; a group with one nonzero keeps the zero code at the next position, one with none positions 0, 1
    (``measure_int4`` checked that no group holds more than two). Serial loops: it runs once, at compile time."""
    from tvm.script import tirx as T

    NT, NG = (n + R - 1) // R, k // group

    @T.prim_func(private=True)
    def repack(qw: T.Buffer((n, k // 2), "uint8"), sc: T.Buffer((n, NG), scale_dtype),
               w: T.Buffer((NT, k // 8, 3, R), "uint8"), s: T.Buffer((NT, NG, R), "float32")):
        T.func_attr({"tirx.noalias": True})
        pos = T.alloc_buffer((2,), "int32", scope="global")
        cd = T.alloc_buffer((2,), "int32", scope="global")
        cnt = T.alloc_buffer((1,), "int32", scope="global")
        pb = T.alloc_buffer((1,), "int32", scope="global")
        for t, r in T.grid(NT, R):
            for g in range(NG):
                s[t, g, r] = T.Cast("float32", sc[T.min(t * R + r, n - 1), g])
            for o in range(k // 8):
                pb[0] = 0
                for h in range(2):  # group 2o + h
                    cnt[0] = 0
                    pos[0] = 0
                    pos[1] = 1
                    cd[0] = 8
                    cd[1] = 8
                    for i in range(4):
                        c = (T.Cast("int32", qw[T.min(t * R + r, n - 1), o * 4 + h * 2 + i // 2]) >> (
                            (i % 2) * 4)) & 15
                        if c != 8 and cnt[0] < 2:
                            pos[cnt[0]] = i
                            cd[cnt[0]] = c
                            cnt[0] = cnt[0] + 1
                    if cnt[0] == 1:
                        pos[1] = (pos[0] + 1) % 4
                    w[t, o, h, r] = T.Cast("uint8", cd[0] | (cd[1] << 4))
                    pb[0] = pb[0] | ((pos[0] | (pos[1] << 2)) << (h * 4))
                w[t, o, 2, r] = T.Cast("uint8", pb[0])

    return repack


def _nm24_term(T: Any, w: Any, t: Any, o: Any, j: Any) -> tuple:
    """(signed code as float32x8, column as int32x8) of kept ``j`` (0..3: group ``2o + j // 2``, slot ``j % 2``) of
    octet ``o`` of tile ``t`` (TIR expressions; ``j`` an unrolled loop variable)."""
    from tvm import tirx

    def bc(v: Any) -> Any:
        return tirx.Broadcast(tirx.const(v, "int32") if isinstance(v, int) else v, R)

    codes = T.Cast("int32x8", w.vload([t, o, j // 2, 0], "uint8x8"))
    pos = T.Cast("int32x8", w.vload([t, o, 2, 0], "uint8x8"))
    code = (codes >> bc(4 * (j % 2))) & bc(15)
    col = ((pos >> bc(2 * j)) & bc(3)) + bc(o * 8 + (j // 2) * 4)
    return T.Cast("float32x8", code - bc(8)), col


def nm24_gemv_func(n: int, k: int, group: int) -> Any:
    """``(x f32 [1, k], w, s) -> y f32 [1, n]`` (decode, float activations): tiles in parallel, per quantization
    group two 8-lane chains of ``(c - 8) * x[col]``, scaled once per group."""
    from tvm.script import tirx as T

    from .qgemv import PARALLEL_MIN_MACS

    NT, NG, OG = (n + R - 1) // R, k // group, group // 8
    par = n * k // 2 >= PARALLEL_MIN_MACS // 4
    V = T.ramp(0, 1, R)

    @T.prim_func(private=True)
    def gemv(x: T.Buffer((1, k), "float32"), w: T.Buffer((NT, k // 8, 3, R), "uint8"),
             s: T.Buffer((NT, NG, R), "float32"), y: T.Buffer((1, n), "float32")):
        T.func_attr({"tirx.noalias": True})
        for t in T.parallel(NT) if par else T.serial(NT):
            facc = T.alloc_buffer((R,), "float32", scope="global")
            gacc = T.alloc_buffer((2, R), "float32", scope="global")
            facc[V] = T.broadcast(T.float32(0), R)
            for g in range(NG):
                gacc[0, V] = T.broadcast(T.float32(0), R)
                gacc[1, V] = T.broadcast(T.float32(0), R)
                for oi in range(OG):
                    for j in T.unroll(4):
                        gacc[j % 2, V] = gacc[j % 2, V] + _nm24_term(T, w, t, g * OG + oi, j)[0] * x[
                            0, _nm24_term(T, w, t, g * OG + oi, j)[1]]
                facc[V] = facc[V] + (gacc[0, V] + gacc[1, V]) * s.vload([t, g, 0], "float32x8")
            if n % R == 0:
                y[0, T.ramp(t * R, 1, R)] = facc[V]
            else:
                for r in range(R):
                    if t * R + r < n:
                        y[0, t * R + r] = facc[r]

    return gemv


def nm24_gemm_func(n: int, k: int, group: int) -> Any:
    """``(x f32 [M, k], w, s) -> y f32 [M, n]``, M symbolic (prefill): ``MT`` tokens per pass over a tile."""
    from tvm.script import tirx as T

    NT, NG, OG = (n + R - 1) // R, k // group, group // 8
    V = T.ramp(0, 1, R)

    @T.prim_func(private=True)
    def gemm(var_x: T.handle, w: T.Buffer((NT, k // 8, 3, R), "uint8"), s: T.Buffer((NT, NG, R), "float32"),
             var_y: T.handle):
        T.func_attr({"tirx.noalias": True})
        M = T.int64()
        x = T.match_buffer(var_x, (M, k), "float32")
        y = T.match_buffer(var_y, (M, n), "float32")
        for t in T.parallel(NT):
            facc = T.alloc_buffer((MT, R), "float32", scope="global")
            gacc = T.alloc_buffer((MT, R), "float32", scope="global")
            for m0 in range((M + MT - 1) // MT):
                for mi in T.unroll(MT):
                    facc[mi, V] = T.broadcast(T.float32(0), R)
                for g in range(NG):
                    for mi in T.unroll(MT):
                        gacc[mi, V] = T.broadcast(T.float32(0), R)
                    for oi in range(OG):
                        for j in T.unroll(4):
                            for mi in T.unroll(MT):
                                gacc[mi, V] = gacc[mi, V] + _nm24_term(T, w, t, g * OG + oi, j)[0] * x[
                                    T.min(m0 * MT + mi, M - 1), _nm24_term(T, w, t, g * OG + oi, j)[1]]
                    for mi in T.unroll(MT):
                        facc[mi, V] = facc[mi, V] + gacc[mi, V] * s.vload([t, g, 0], "float32x8")
                for mi in T.unroll(MT):
                    if m0 * MT + mi < M:
                        for r in range(R):
                            if t * R + r < n:
                                y[m0 * MT + mi, t * R + r] = facc[mi, r]

    return gemm
