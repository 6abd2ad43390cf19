"""``aten.scaled_dot_product_attention`` for the LM graphs: grouped-query attention over the static KV cache.

A captured decoder (``llmpress.ir.capture_hf``) calls ``F.scaled_dot_product_attention(q, k_cache, v_cache,
attn_mask, scale=..., enable_gqa=True)`` with ``q [B, H, T, D]``, caches ``[B, KVH, S, D]`` (``H = rep * KVH``,
query head ``h`` reads KV head ``h // rep``) and a boolean mask ``[T, S]`` (True: the key takes part), i.e.::

    out[b, h, i] = sum_j softmax_j(scale * q[b, h, i] . k[b, h // rep, j]  over allowed j) * v[b, h // rep, j]

CPU kernel (``to_relax(cpu_kernels=True)``; ``attention_func``): one task per (batch, head, token) row, in
parallel; each walks the keys in blocks of 8 with an online softmax (running max ``m``, sum ``l`` and output
accumulator rescaled by ``exp(m_old - m_new)`` when the max grows), so no ``[T, S]`` score matrix exists and the
keys are read once. Masked keys are never read (a block of 8 all masked is skipped at once): with the causal mask
of a static cache, a decode step at position p reads p + 1 keys and values, not the whole cache. ``exp`` is the Cephes-style
polynomial of ``softmax.py`` (relative error ~1e-7); masked keys get probability exactly 0. Nothing of the cache
is copied (the GQA expansion some exporters emit would rewrite ``rep`` copies of it per call).

Other targets (and shapes the kernel does not take: a mask that is not ``[T, S]`` boolean, ``S`` not a multiple
of 8, dropout, ``is_causal``): the same math as Relax ops (repeat the KV heads, matmul, scale, mask, softmax,
matmul), which TVM's GPU schedules handle.
"""
from __future__ import annotations

import math
from typing import Any

from tvm import relax, tirx

from .common import KERNEL_ATTR

__all__ = ["attention_func", "sdpa_converter", "fast_exp"]

_LN2_HI, _LN2_LO = 0.693359375, -2.12194440e-4
_EXP_POLY = (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1)


def fast_exp(x: Any) -> Any:
    """``exp`` of a float32 (vector) expression: ``2^n * p(f)`` with ``x = n ln2 + f`` and the degree-7 Cephes
    polynomial (TVM's ``topi.math.fast_exp``), inputs clamped to [-88.38, 88.38]."""
    lanes = int(x.ty.dtype.lanes)
    vt = "float32" if lanes == 1 else f"float32x{lanes}"
    it = "int32" if lanes == 1 else f"int32x{lanes}"

    def c(v):
        s = tirx.const(v, "float32")
        return s if lanes == 1 else tirx.Broadcast(s, lanes)

    x = tirx.max(tirx.min(x, c(88.3762626647950)), c(-88.3762626647949))
    n = tirx.floor(x * c(1.44269504088896341) + c(0.5))
    f = x - n * c(_LN2_HI) - n * c(_LN2_LO)
    p = c(_EXP_POLY[0])
    for k in _EXP_POLY[1:]:
        p = p * f + c(k)
    p = p * f * f + f + c(1.0)
    two_n = tirx.reinterpret(vt, (tirx.Cast(it, n) + tirx.Cast(it, c(127.0))) << tirx.Cast(it, c(23.0)))
    return p * two_n


def attention_func(batch: int, heads: int, kv_heads: int, cache_len: int, head_dim: int, scale: float,
                   tokens: int | None) -> Any:
    """``(q f32 [B, H, T, D], k, v f32 [B, KVH, S, D], mask bool [T, S]) -> out f32 [B, H, T, D]``."""
    from tvm.script import tirx as T

    B, H, KVH, S, D = batch, heads, kv_heads, cache_len, head_dim
    REP = H // KVH
    KB, DV = S // 8, D // 8
    assert S % 8 == 0 and D % 8 == 0 and H % KVH == 0
    V8 = T.ramp(0, 1, 8)

    def hsum(v):
        return ((v[0] + v[1]) + (v[2] + v[3])) + ((v[4] + v[5]) + (v[6] + v[7]))

    @T.prim_func(private=True)
    def func(var_q: T.handle, var_k: T.handle, var_v: T.handle, var_mask: T.handle, var_o: T.handle):
        T.func_attr({"tirx.noalias": True})
        Tn = T.int64()
        q = T.match_buffer(var_q, (B, H, Tn if tokens is None else tokens, D), "float32")
        k = T.match_buffer(var_k, (B, KVH, S, D), "float32")
        v = T.match_buffer(var_v, (B, KVH, S, D), "float32")
        mask = T.match_buffer(var_mask, (Tn if tokens is None else tokens, S), "bool")
        o = T.match_buffer(var_o, (B, H, Tn if tokens is None else tokens, D), "float32")
        for row in T.parallel(B * H * q.shape[2]):
            acc = T.alloc_buffer((D,), "float32", scope="global")
            dot = T.alloc_buffer((8,), "float32", scope="global")
            sc = T.alloc_buffer((8,), "float32", scope="global")
            st = T.alloc_buffer((4,), "float32", scope="global")  # running max, running sum, new max, rescale
            b = row // (H * q.shape[2])
            h = row // q.shape[2] % H
            i = row % q.shape[2]
            st[0] = T.float32(-3.0e38)
            st[1] = T.float32(0)
            for d in range(DV):
                acc[T.ramp(d * 8, 1, 8)] = T.broadcast(T.float32(0), 8)
            for kb in range(KB):
                if (mask[i, kb * 8] or mask[i, kb * 8 + 1] or mask[i, kb * 8 + 2] or mask[i, kb * 8 + 3]
                        or mask[i, kb * 8 + 4] or mask[i, kb * 8 + 5] or mask[i, kb * 8 + 6]
                        or mask[i, kb * 8 + 7]):
                    for jj in range(8):
                        sc[jj] = T.float32(-3.0e38)
                        if mask[i, kb * 8 + jj]:  # masked keys are not read
                            dot[V8] = T.broadcast(T.float32(0), 8)
                            for d in range(DV):
                                dot[V8] = dot[V8] + q.vload([b, h, i, d * 8], "float32x8") * k.vload(
                                    [b, h // REP, kb * 8 + jj, d * 8], "float32x8")
                            sc[jj] = hsum(dot) * T.float32(scale)
                    st[2] = T.max(st[0], T.max(T.max(T.max(sc[0], sc[1]), T.max(sc[2], sc[3])),
                                               T.max(T.max(sc[4], sc[5]), T.max(sc[6], sc[7]))))
                    for jj in range(8):  # probabilities of the block, exactly 0 where masked
                        sc[jj] = T.Select(mask[i, kb * 8 + jj], fast_exp(sc[jj] - st[2]), T.float32(0))
                    # rescale what was accumulated under the old max (exp(old - new) <= 1)
                    st[3] = fast_exp(st[0] - st[2])
                    st[0] = st[2]
                    st[1] = st[1] * st[3] + hsum(sc)
                    for d in range(DV):
                        acc[T.ramp(d * 8, 1, 8)] = acc[T.ramp(d * 8, 1, 8)] * T.broadcast(st[3], 8)
                    for jj in range(8):
                        if mask[i, kb * 8 + jj]:
                            for d in range(DV):
                                acc[T.ramp(d * 8, 1, 8)] = acc[T.ramp(d * 8, 1, 8)] + T.broadcast(
                                    sc[jj], 8) * v.vload([b, h // REP, kb * 8 + jj, d * 8], "float32x8")
            for d in range(DV):
                o[b, h, i, T.ramp(d * 8, 1, 8)] = acc[T.ramp(d * 8, 1, 8)] / T.broadcast(st[1], 8)

    return func


def _arg(node: Any, i: int, name: str, default: Any) -> Any:
    return node.args[i] if len(node.args) > i else node.kwargs.get(name, default)


def sdpa_converter(cpu_kernel: bool):
    """The ``aten.scaled_dot_product_attention`` converter: the CPU kernel above when ``cpu_kernel`` and the call
    fits it, else the Relax composition (see the module docstring)."""

    def convert(node: Any, importer: Any) -> relax.Expr:
        bb = importer.block_builder
        q, k, v = (importer.env[a] for a in node.args[:3])
        mask_node = _arg(node, 3, "attn_mask", None)
        dropout = _arg(node, 4, "dropout_p", 0.0)
        causal = _arg(node, 5, "is_causal", False)
        scale = _arg(node, 6, "scale", None)
        gqa = _arg(node, 7, "enable_gqa", False)
        if dropout or causal or len(q.ty.shape.values) != 4:
            return importer._scaled_dot_product_attention(node)  # TVM's own (no GQA)
        qs = [_int(d) for d in q.ty.shape.values]
        ks = [_int(d) for d in k.ty.shape.values]
        b, h, _, d = qs
        _, kvh, s, _ = ks
        if None in (h, d, kvh) or (kvh != h and not gqa) or h % kvh:
            return importer._scaled_dot_product_attention(node)
        scale = float(scale) if scale is not None else 1.0 / math.sqrt(d)
        mask = importer.env[mask_node] if mask_node is not None else None
        # A symbolic batch or key length (an encoder's sequence) takes the Relax composition below
        fits = (cpu_kernel and None not in (b, s) and mask is not None and str(mask.ty.dtype) == "bool"
                and len(mask.ty.shape.values) == 2 and s % 8 == 0 and d % 8 == 0
                and all(str(x.ty.dtype) == "float32" for x in (q, k, v)))
        if fits:
            tokens = _int(q.ty.shape.values[2])
            func = attention_func(b, h, kvh, s, d, scale, tokens).with_attrs(
                {KERNEL_ATTR: "attention", "op_pattern": 8, "tirx.is_scheduled": True})
            gv = bb.add_func(func, f"llmpress_attention_h{h}_kv{kvh}_s{s}_d{d}" + ("_t1" if tokens == 1 else ""))
            return bb.emit(relax.call_tir(gv, [q, k, v, mask], relax.TensorType(q.ty.shape, "float32")))
        # Relax composition: the GQA heads repeated, then the standard attention math
        rep = h // kvh
        if rep > 1:
            k = bb.emit(relax.op.repeat(k, rep, axis=1))
            v = bb.emit(relax.op.repeat(v, rep, axis=1))
        scores = bb.emit(relax.op.matmul(q, relax.op.permute_dims(k, [0, 1, 3, 2])))
        scores = bb.emit(relax.op.multiply(scores, relax.const(scale, "float32")))
        if mask is not None:
            if str(mask.ty.dtype) == "bool":
                scores = bb.emit(relax.op.where(mask, scores, relax.const(float("-inf"), "float32")))
            else:
                scores = bb.emit(relax.op.add(scores, mask))
        probs = bb.emit(relax.op.nn.softmax(scores, axis=-1))
        return bb.emit(relax.op.matmul(probs, v))

    return convert


def _int(e: Any) -> int | None:
    return int(e) if isinstance(e, tirx.IntImm) else None
