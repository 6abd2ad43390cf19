"""The GPTQ column loop and clipping search as they were before the CPU cost work (llmpress 9ec27c8), kept verbatim
as the baseline ``benchmarks/gptq_cost.py`` times against and checks the current code against (bit for bit)."""
from __future__ import annotations

import torch

from llmpress.passes.hessian import damped_cholesky
from llmpress.passes.quant_common import (
    QuantizedWeight,
    _params_for_ratio,
    dequantize_codes,
    fake_quant,
    quantize_codes,
)

__all__ = ["find_params", "gptq_quantize"]


def find_params(w: torch.Tensor, bits: int, sym: bool, *, clip_search: bool = False, grid: int = 100,
                maxshrink: float = 0.8, norm: float = 2.4) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-row grid of ``w`` [rows, cols]: (scale [rows], zero [rows] or None). See the module docstring."""
    w = w.float()
    scale, zero = _params_for_ratio(w, bits, sym, 1.0)
    if not clip_search:
        return scale, zero
    # All ratios at once ([R, rows, cols] per chunk of rows); argmin keeps the largest ratio among equal errors,
    # as a loop from r = 1 downwards with a strict "<" would.
    ratios = torch.tensor([1.0 - i / grid for i in range(int(maxshrink * grid) + 1)]).unsqueeze(1)
    rows, cols = w.shape
    chunk = max(1, (1 << 24) // (ratios.shape[0] * max(cols, 1)))
    for r0 in range(0, rows, chunk):
        wc = w[r0:r0 + chunk]
        s_all, z_all = _params_for_ratio(wc, bits, sym, ratios)  # [R, rows]
        err = (wc.unsqueeze(0) - fake_quant(wc.unsqueeze(0), s_all, z_all, bits)).abs().pow(norm).sum(-1)
        best = err.argmin(dim=0, keepdim=True)  # [1, rows]
        scale[r0:r0 + chunk] = s_all.gather(0, best).squeeze(0)
        if zero is not None:
            zero[r0:r0 + chunk] = z_all.gather(0, best).squeeze(0)
    return scale, zero


def gptq_quantize(w: torch.Tensor, h: torch.Tensor, *, bits: int, group: int, sym: bool, damp: float = 0.01,
                  block: int = 128, act_order: bool = False, clip_search: bool = True,
                  layer: str = "?", mask: torch.Tensor | None = None) -> QuantizedWeight:
    """GPTQ of one weight ``w [out, in]`` given ``h = 2 X^T X / n [in, in]`` (see the module docstring).
    ``group`` must divide ``in`` (use ``in`` for per channel).

    ``mask`` (bool ``[out, in]``, True where a weight is pruned, e.g. ``w == 0`` after ``sparsify``): those
    weights are fixed at zero, as in SparseGPT's joint sparsify-and-quantize. Each column's pruned entries get the
    code of 0 (``0`` symmetric, ``z`` asymmetric, so they dequantize to exactly 0) whatever earlier updates moved
    them to, and their error joins the column's error that later columns absorb; grids are found with them at 0."""
    W = w.detach().to(torch.float32).clone()
    H = h.detach().to(torch.float32).clone()
    out_f, cols = W.shape
    ng = cols // group
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    keep = None if mask is None else ~mask.to(torch.bool)
    if keep is not None:
        W = W * keep
    scales = torch.zeros(out_f, ng)
    zeros = None if sym else torch.zeros(out_f, ng)
    perm = invperm = None
    if act_order:
        for g in range(ng):  # static groups on the original column order
            s, z = find_params(W[:, g * group:(g + 1) * group], bits, sym, clip_search=clip_search)
            scales[:, g] = s
            if zeros is not None:
                zeros[:, g] = z
        perm = torch.argsort(torch.diagonal(H), descending=True)
        invperm = torch.argsort(perm)
        W = W[:, perm]
        H = H[perm][:, perm]
        if keep is not None:
            keep = keep[:, perm]
        col_group = (perm // group).tolist()
    U = damped_cholesky(H, damp, layer=layer, who="gptq", inverse=True)
    # Blocks aligned to groups: every group starts and ends inside one block, so its grid is computed on weights
    # that already carry every earlier column's update.
    bsz = group if group >= block else (block // group) * group
    Q = torch.zeros(out_f, cols)
    scale = zero = None
    for i1 in range(0, cols, bsz):
        i2 = min(i1 + bsz, cols)
        W1 = W[:, i1:i2].clone()
        E1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            c = i1 + i
            if act_order:
                g = col_group[c]
                scale = scales[:, g]
                zero = zeros[:, g] if zeros is not None else None
            elif c % group == 0:
                wg = W1[:, i:i + group] if keep is None else W1[:, i:i + group] * keep[:, c:c + group]
                scale, zero = find_params(wg, bits, sym, clip_search=clip_search)
                scales[:, c // group] = scale
                if zeros is not None:
                    zeros[:, c // group] = zero
            wc = W1[:, i]
            qc = quantize_codes(wc.unsqueeze(1), scale.unsqueeze(1), None if zero is None else zero.unsqueeze(1),
                                bits).squeeze(1)
            if keep is not None:  # pruned: the code of 0 (0 symmetric, the zero point asymmetric)
                qc = torch.where(keep[:, c], qc, torch.zeros_like(qc) if zero is None else zero)
            Q[:, c] = qc
            deq = dequantize_codes(qc, scale, zero)
            err = (wc - deq) / U1[i, i]
            W1[:, i:] -= err.unsqueeze(1) * U1[i, i:].unsqueeze(0)
            E1[:, i] = err
        if i2 < cols:
            W[:, i2:] -= E1 @ U[i1:i2, i2:]
    if act_order:
        Q = Q[:, invperm]
    return QuantizedWeight(Q.to(torch.int32), scales, zeros, bits, group)
