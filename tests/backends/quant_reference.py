"""Inputs and exact references for the quantized CPU kernels (``kernels/qgemv.py``, ``qgemm.py``, ``qact.py``).

The kernels read the tiled layout (``repack``: computed on this machine, as a build does) and compute with the
layout's codes ``c`` and zero points ``zc`` (``kernel_codes``). ``exact_int`` / ``exact_float`` evaluate what a
kernel computes in float64 from the same inputs and return ``S``, the sum of the absolute values of every product
term: any float32 evaluation whose terms pass through at most ``n`` roundings is within ``gamma(n) * S`` of the
exact value (Higham, Accuracy and Stability, 3.1), with or without fused multiply-adds.
"""
from __future__ import annotations

import numpy as np
import torch

from llmpress.ir.ops.wq_linear import pack_weight, qrange, quantize_activation_blocks

__all__ = ["U32", "U64", "gamma", "weights", "kernel_codes", "repack", "act_inputs", "exact_int", "exact_float"]

U32, U64 = 2.0 ** -24, 2.0 ** -53  # unit roundoff of float32, float64


def gamma(n: int, u: float = U32) -> float:
    """``n u / (1 - n u)``: the relative bound of ``n`` roundings."""
    return n * u / (1 - n * u)


def weights(bits: int, sym: bool, group: int, out_f: int, in_f: int, *, seed: int = 0):
    """``(q, s, z)`` as the op stores them: signed q when symmetric, uint8 zero points when not."""
    g = torch.Generator().manual_seed(1000 * bits + 10 * group + sym + seed)
    lo, hi = qrange(bits, sym)
    q = torch.randint(lo, hi + 1, (out_f, in_f), generator=g)
    q[0], q[1] = lo, hi  # the extreme codes on whole rows
    s = torch.rand(out_f, in_f // group, generator=g) * 0.05 + 0.01
    z = None if sym else torch.randint(0, 1 << bits, (out_f, in_f // group), generator=g).to(torch.uint8)
    return q, s, z


def kernel_codes(bits: int, sym: bool, q, z, group: int):
    """The codes ``c`` and zero points ``zc`` the kernels compute with (``qlayout.py``), as float64: ``c - zc`` is
    ``q - z`` in every case."""
    from llmpress.backends.tvm.kernels.qlayout import ZERO_SYM

    q = q.double().numpy()
    n_groups = q.shape[1] // group
    if sym:
        off = ZERO_SYM[bits] if bits < 8 else 0
        return q + off, np.full((q.shape[0], n_groups), float(off))
    zc = z.double().numpy() - (128.0 if bits == 8 else 0.0)
    return q - (128.0 if bits == 8 else 0.0), zc


def repack(cases: list) -> list[tuple[np.ndarray, np.ndarray]]:
    """The tiled ``(w, sz)`` of every ``(layout, q, s, z)`` in ``cases``, computed on this machine as a build does
    (``params.py``: a permutation of bytes, the same for every target); one TVM build for all of them."""
    import tvm
    from tvm import te

    from llmpress.backends.tvm.kernels.qlayout import repack_te

    funcs, inputs = {}, []
    for i, (layout, q, s, z) in enumerate(cases):
        packed = pack_weight(q, layout.bits, sym=layout.sym)
        arrays = [packed.numpy(), s.numpy()] + ([z.numpy()] if z is not None else [])
        ph = [te.placeholder(a.shape, str(a.dtype), name=f"p{j}") for j, a in enumerate(arrays)]
        funcs[f"repack{i}"] = te.create_prim_func(ph + repack_te(layout, *ph)).with_attr("global_symbol",
                                                                                           f"repack{i}")
        inputs.append(arrays)
    mod = tvm.compile(tvm.IRModule(funcs), tvm.target.Target("llvm")).jit()
    out = []
    for i, ((layout, *_), arrays) in enumerate(zip(cases, inputs)):
        w = tvm.runtime.tensor(np.zeros(layout.w_shape, layout.dtype))
        sz = tvm.runtime.tensor(np.zeros(layout.sz_shape, "float32"))
        mod[f"repack{i}"](*[tvm.runtime.tensor(a) for a in arrays], w, sz)
        out.append((w.numpy(), sz.numpy()))
    return out


def act_inputs(x: np.ndarray, ga: int, group: int):
    """``qa`` (int8), ``sa``, ``asum`` of ``x`` as the reference quantizes (torch, float32): the integer kernels'
    inputs, the same for every build."""
    k = x.shape[1]
    qa, sa = quantize_activation_blocks(torch.from_numpy(x), ga)
    blocks = qa.reshape(x.shape[0], k // ga, ga).sum(-1) * sa  # float32
    asum = blocks.reshape(x.shape[0], k // group, group // ga).sum(-1)
    return qa.to(torch.int8).numpy(), sa.numpy(), asum.numpy()


def exact_int(c, zc, s, qa, sa, asum, group: int, ga: int):
    """``y = sum_g s (sum_{b in g} sa_b sum_{k in b} c qa - zc asum_g)`` and ``S``, the sum of |terms|."""
    (m, k), n = qa.shape, c.shape[0]
    qa = qa.astype(np.float64).reshape(m, k // ga, ga)
    cb = c.reshape(n, k // ga, ga)
    dot = np.einsum("obk,mbk->mob", cb, qa)  # exact: integers below 2^53
    adot = np.einsum("obk,mbk->mob", np.abs(cb), np.abs(qa))
    bpg = group // ga
    blk = (dot * sa.astype(np.float64)[:, None, :]).reshape(m, n, k // group, bpg).sum(-1)
    ablk = (adot * sa.astype(np.float64)[:, None, :]).reshape(m, n, k // group, bpg).sum(-1)
    a64 = asum.astype(np.float64)[:, None, :]
    s64 = s.double().numpy()[None]
    y = (s64 * (blk - zc[None] * a64)).sum(-1)
    big_s = (s64 * (ablk + np.abs(zc[None]) * np.abs(a64))).sum(-1)
    return y, big_s


def exact_float(c, zc, s, x, group: int):
    """``y = sum_g s (sum_{k in g} c x - zc sum_{k in g} x)`` and ``S``."""
    (m, k), n = x.shape, c.shape[0]
    xg = x.astype(np.float64).reshape(m, k // group, group)
    cg = c.reshape(n, k // group, group)
    y = (s.double().numpy()[None] * (np.einsum("ogk,mgk->mog", cg, xg) - zc[None] * xg.sum(-1)[:, None])).sum(-1)
    big_s = (s.double().numpy()[None] * (np.einsum("ogk,mgk->mog", np.abs(cg), np.abs(xg))
                                         + np.abs(zc[None]) * np.abs(xg).sum(-1)[:, None])).sum(-1)
    return y, big_s
