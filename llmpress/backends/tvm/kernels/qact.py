"""Dynamic int8 quantization of activation rows, the first half of every ``act_bits=8`` linear on CPU.

For each token row ``m`` and block ``b`` of ``act_group`` features (``llmpress/ir/ops/wq_linear.py``; the same
float32 operations as the reference, so the codes are bit-identical)::

    sa[m, b]   = max_{k in b} |x[m, k]| / 127          (1 where the block is all zero)
    qa[m, k]   = int8(clamp(nearbyint(x[m, k] / sa[m, b]), -127, 127))     round half to even
    asum[m, g] = sum_{b in g} sa[m, b] * sum_{k in b} qa[m, k]             per weight group g (when needed)

``asum`` is ``sum_k xa[m, k]`` over a weight group, in the terms the kernels need to subtract a zero point
(``(c - z) * s`` summed against the activations is ``s * (sum c xa - z * asum)``). One call serves every linear reading the same ``x`` (Relax's common
subexpression elimination merges the calls: ``q``/``k``/``v`` quantize once). Rows run in parallel when there are
many (prefill); a one-token call is serial (K = 2048 takes about a microsecond).
"""
from __future__ import annotations

from typing import Any

__all__ = ["act_quant_func"]

QMAX = 127.0


def act_quant_func(in_features: int, act_group: int, group: int, *, tokens: int | None) -> Any:
    """The PrimFunc ``(x f32 [M, K]) -> (qa i8 [M, K], sa f32 [M, K / act_group], asum f32 [M, K / group])``;
    ``tokens`` is M when static (decode: 1), None for a symbolic M (prefill)."""
    from tvm.script import tirx as T

    K, GA, G = in_features, act_group, group
    NB, NG, BPG = K // GA, K // G, G // GA
    f32, lanes = "float32", 8
    assert GA % lanes == 0 and G % GA == 0 and K % G == 0

    def hmax(v):
        return T.max(T.max(T.max(v[0], v[1]), T.max(v[2], v[3])), T.max(T.max(v[4], v[5]), T.max(v[6], v[7])))

    def hsum(v):
        return ((v[0] + v[1]) + (v[2] + v[3])) + ((v[4] + v[5]) + (v[6] + v[7]))

    @T.macro
    def block(x, qa, sa, m, b, isums):
        """Quantize block ``b`` of row ``m``; store its code sum in ``isums[b % BPG]``."""
        mx = T.alloc_buffer((lanes,), f32, scope="global")
        acc = T.alloc_buffer((lanes,), "int32", scope="global")
        s = T.alloc_buffer((1,), f32, scope="global")
        mx[T.ramp(0, 1, lanes)] = T.broadcast(T.float32(0), lanes)
        for c in range(GA // lanes):
            mx[T.ramp(0, 1, lanes)] = T.max(mx[T.ramp(0, 1, lanes)], T.abs(x.vload([m, b * GA + c * lanes],
                                                                                    "float32x8")))
        s[0] = T.Select(hmax(mx) > T.float32(0), hmax(mx) / T.float32(QMAX), T.float32(1))
        sa[m, b] = s[0]
        acc[T.ramp(0, 1, lanes)] = T.broadcast(T.int32(0), lanes)
        for c in range(GA // lanes):
            r = T.nearbyint(x.vload([m, b * GA + c * lanes], "float32x8") / T.broadcast(s[0], lanes))
            r = T.max(T.min(r, T.broadcast(T.float32(QMAX), lanes)), T.broadcast(T.float32(-QMAX), lanes))
            qa[m, T.ramp(b * GA + c * lanes, 1, lanes)] = T.Cast("int8x8", r)
            acc[T.ramp(0, 1, lanes)] = acc[T.ramp(0, 1, lanes)] + T.Cast("int32x8", r)
        isums[b % BPG] = T.Cast(f32, hsum(acc)) * s[0]

    @T.prim_func(private=True, check_well_formed=False)  # the root block (below) is s_tir, not plain tirx
    def func(var_x: T.handle, var_qa: T.handle, var_sa: T.handle, var_asum: T.handle):
        T.func_attr({"tirx.noalias": True})
        M = T.int64()
        x = T.match_buffer(var_x, (M if tokens is None else tokens, K), f32)
        qa = T.match_buffer(var_qa, (M if tokens is None else tokens, K), "int8")
        sa = T.match_buffer(var_sa, (M if tokens is None else tokens, NB), f32)
        asum = T.match_buffer(var_asum, (M if tokens is None else tokens, NG), f32)
        with T.sblock("root"):  # a root block: Relax's reshape analysis expects one on single-input kernels
            for m in T.parallel(x.shape[0]) if tokens is None else T.serial(tokens):
                isums = T.alloc_buffer((BPG,), f32, scope="global")
                for g in range(NG):
                    for bb in range(BPG):
                        block(x, qa, sa, m, g * BPG + bb, isums)
                    asum[m, g] = T.float32(0)
                    for bb in range(BPG):
                        asum[m, g] = asum[m, g] + isums[bb]

    return func
