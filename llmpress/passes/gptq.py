"""``gptq``: GPTQ weight quantization (Frantar et al. 2022, "GPTQ: Accurate Post-Training Quantization for
Generative Pre-trained Transformers").

For a linear layer ``y = x W^T`` with calibration inputs ``X [n, in]``, GPTQ minimizes the output error
``||X W^T - X W_hat^T||^2`` one input column at a time (Optimal Brain Quantization). With the Hessian of that
objective ``H = 2 X^T X / n``:

1. dead inputs (``H[i,i] == 0``: the column never sees a non-zero activation) get ``H[i,i] = 1`` and
   ``W[:, i] = 0``, as in the reference implementation;
2. dampening ``H += lambda I`` with ``lambda = damp * mean(diag(H))`` (``damp`` 0.01); when the Cholesky
   factorization fails the dampening is retried 10x larger (up to 4 times) with a warning;
3. ``U = chol(H^-1)^T``, the upper Cholesky factor of the inverse (``H^-1 = U^T U``); row ``i`` of ``U`` holds
   the OBS update for column ``i`` given that columns ``< i`` are already fixed;
4. columns are processed left to right: ``q_i = quant(w_i)``, ``e_i = (w_i - q_i) / U[i,i]``, and the remaining
   columns of the block absorb the error, ``W[:, j] -= e_i U[i, j]`` (j > i). Blocks of ``block`` (128)
   columns are updated eagerly inside the block and lazily outside it (``W[:, after] -= E U[block, after]``, one
   matmul per block), which gives the same result with far less memory traffic;
5. groups: the scale (and zero point) of a group of ``group`` columns is computed when its first column is
   reached, on the weights as updated so far (blocks are aligned to groups so every group lies in one block).
   The grid of a group is found by ``quant_common.find_params``: absmax (symmetric) or min/max (asymmetric),
   optionally (``clip_search``, default on) shrunk by the clipping ratio that minimizes ``sum |w - w_hat|^2.4``
   over ``r in [0.2, 1]``, the MSE grid search of the reference ``Quantizer(mse=True)``;
6. ``act_order``: columns are processed by decreasing ``H[i,i]`` (most salient inputs first, while the most
   freedom is left to absorb errors). Group grids are then "static": computed up front on the original column
   groups ``i // group``, so the stored layout (one scale per group of consecutive columns) stays valid.

The layer's reconstruction error on the calibration activations is ``||X (W - W_hat)^T||_F / ||X W^T||_F =
sqrt(tr(D H D^T) / tr(W H W^T))`` with ``D = W - W_hat`` (undamped ``H``); it is recorded per layer.

Sequential, block by block (``layer_rewrite``, ``hessian``): the Hessians of block i are collected on the graph in
which blocks ``< i`` are already quantized, so each block corrects for the error of the blocks before it; layers
reading one activation (``q/k/v_proj``) share one Hessian.

Measured on the reference model (tinystories-llama, all linears but ``lm_head``, perplexity on all of
``valid.txt``, 32 calibration windows of 256 tokens from ``calib.txt``): int3 g128 1.0040x fp32 (RTN 1.0282x),
int2 g64 1.0308x symmetric / 1.0229x asymmetric (RTN 1.654x / 1.083x). int4 g128 with the default calibration
(128 windows of 256 tokens) on 2 threads: 20 s, against 30 s with prefix re-runs (identical weights).

CPU cost (``benchmarks/gptq_cost.py``, a 1.1B-shaped block, 2 cores): the column loop works on ``W^T`` so each
column's update is a contiguous row (the strided walk over ``W`` was most of the loop), the clipping search runs in
cache-sized chunks in place, and each shared input is factored once: 2.1 s per linear against 7.6 s, same codes bit
for bit. ``calib_device`` (``passes/calib_device.py``) moves the statistics and this math to another device.
"""
from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.fx as fx

from ..errors import ConfigError
from ..ir.meta import compression
from ..ir.module import Module
from . import calib_device
from .base import Pass, PassContext, PassResult, SelectOptions
from .hessian import collect_stats, damped_cholesky, output_error
from .layer_rewrite import Layer, Rewritten, rewrite_linears
from .quant_common import (
    QuantizedWeight,
    check_bits,
    check_group_option,
    dequantize_codes,
    find_params,
    group_sizes,
    quantize_codes,
    relative_error,
    replace_with_wq_linear,
    sparsity_mask,
)
from .select import select_linears

__all__ = ["GPTQ", "GPTQOptions", "HessianFactor", "factor_hessian", "gptq_quantize", "NO_CALIBRATION"]

log = logging.getLogger(__name__)

NO_CALIBRATION = "gptq needs calibration data (--calib FILE or calibration=...)"


@dataclass(frozen=True)
class GPTQOptions(SelectOptions):
    """``bits`` in {8, 4, 3, 2}; ``group`` columns per scale (0 or -1: per channel); ``sym``: symmetric grid;
    ``damp``: dampening as a fraction of the mean Hessian diagonal; ``block``: columns per lazy-update block;
    ``act_order``: process columns by decreasing Hessian diagonal; ``clip_search``: MSE search of the clipping
    ratio of each group's grid."""

    bits: int = 4
    group: int = 128
    sym: bool = True
    damp: float = 0.01
    block: int = 128
    act_order: bool = False
    clip_search: bool = True

    def validate(self) -> None:
        check_bits(self.bits, pass_name="gptq")
        check_group_option(self.group, pass_name="gptq")
        if not 0 < self.damp < 1:
            raise ConfigError(f"pass 'gptq': damp={self.damp} must be in (0, 1)")
        if self.block < 1:
            raise ConfigError(f"pass 'gptq': block={self.block} must be positive")


@dataclass
class HessianFactor:
    """What GPTQ needs from ``H`` alone, so the layers reading one activation (``q/k/v_proj``, ``gate/up_proj``)
    factor it once: the ``dead`` inputs, the ``act_order`` permutation (``None`` without), and ``U`` (of the
    permuted, dampened ``H``), all on ``H``'s device."""

    dead: torch.Tensor
    perm: torch.Tensor | None
    U: torch.Tensor


def factor_hessian(h: torch.Tensor, *, damp: float = 0.01, act_order: bool = False, layer: str = "?"
                   ) -> HessianFactor:
    """Steps 1-3 and the ``act_order`` permutation of the module docstring, on ``h``'s device."""
    H = h.detach().to(torch.float32).clone()
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1.0
    perm = None
    if act_order:
        perm = torch.argsort(torch.diagonal(H), descending=True)
        H = H[perm][:, perm]
    return HessianFactor(dead, perm, damped_cholesky(H, damp, layer=layer, who="gptq", inverse=True))


def gptq_quantize(w: torch.Tensor, h: torch.Tensor, *, bits: int, group: int, sym: bool, damp: float = 0.01,
                  block: int = 128, act_order: bool = False, clip_search: bool = True,
                  layer: str = "?", mask: torch.Tensor | None = None,
                  factor: HessianFactor | None = None) -> QuantizedWeight:
    """GPTQ of one weight ``w [out, in]`` given ``h = 2 X^T X / n [in, in]`` (see the module docstring).
    ``group`` must divide ``in`` (use ``in`` for per channel). The math runs on ``h``'s device; the result is on
    the CPU. ``factor``: ``factor_hessian(h, damp=damp, act_order=act_order)`` when the caller already has it.

    ``mask`` (bool ``[out, in]``, True where a weight is pruned, e.g. ``w == 0`` after ``sparsify``): those
    weights are fixed at zero, as in SparseGPT's joint sparsify-and-quantize. Each column's pruned entries get the
    code of 0 (``0`` symmetric, ``z`` asymmetric, so they dequantize to exactly 0) whatever earlier updates moved
    them to, and their error joins the column's error that later columns absorb; grids are found with them at 0."""
    dev = h.device
    if factor is None:
        factor = factor_hessian(h, damp=damp, act_order=act_order, layer=layer)
    W = w.detach().to(device=dev, dtype=torch.float32).clone()
    out_f, cols = W.shape
    ng = cols // group
    W[:, factor.dead] = 0.0
    keep = None if mask is None else ~mask.to(device=dev, dtype=torch.bool)
    if keep is not None:
        W = W * keep
    scales = torch.zeros(out_f, ng, device=dev)
    zeros = None if sym else torch.zeros(out_f, ng, device=dev)
    perm = factor.perm
    if act_order:
        for g in range(ng):  # static groups on the original column order
            s, z = find_params(W[:, g * group:(g + 1) * group], bits, sym, clip_search=clip_search)
            scales[:, g] = s
            if zeros is not None:
                zeros[:, g] = z
        W = W[:, perm]
        if keep is not None:
            keep = keep[:, perm]
        col_group = (perm // group).tolist()
    U = factor.U
    # Transposed working copies: column c of W is row c of WT, so every per-column step below reads and writes
    # contiguous memory (the column-major walk over W [out, in] was most of the time on the CPU). Same operations
    # on the same values: the result is bit-identical to the untransposed loop.
    WT = W.T.contiguous()
    keepT = None if keep is None else keep.T.contiguous()
    del W
    # Blocks aligned to groups: every group starts and ends inside one block, so its grid is computed on weights
    # that already carry every earlier column's update.
    bsz = group if group >= block else (block // group) * group
    QT = torch.empty(cols, out_f, device=dev)
    scale = zero = None
    for i1 in range(0, cols, bsz):
        i2 = min(i1 + bsz, cols)
        W1 = WT[i1:i2]  # a view: the in-block updates land in WT
        E1 = torch.empty(i2 - i1, out_f, device=dev)
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            c = i1 + i
            if act_order:
                g = col_group[c]
                scale = scales[:, g]
                zero = zeros[:, g] if zeros is not None else None
            elif c % group == 0:
                wg = W1[i:i + group] if keepT is None else W1[i:i + group] * keepT[c:c + group]
                scale, zero = find_params(wg.T.contiguous(), bits, sym, clip_search=clip_search)
                scales[:, c // group] = scale
                if zeros is not None:
                    zeros[:, c // group] = zero
            wc = W1[i]
            qc = quantize_codes(wc, scale, zero, bits)
            if keepT is not None:  # pruned: the code of 0 (0 symmetric, the zero point asymmetric)
                qc = torch.where(keepT[c], qc, torch.zeros_like(qc) if zero is None else zero)
            QT[c] = qc
            err = (wc - dequantize_codes(qc, scale, zero)) / U1[i, i]
            W1[i + 1:] -= U1[i, i + 1:].unsqueeze(1) * err.unsqueeze(0)  # row i is done: no need to update it
            E1[i] = err
        if i2 < cols:
            WT[i2:] -= torch.mm(E1.T, U[i1:i2, i2:]).T
    Q = QT.T if perm is None else QT.T[:, torch.argsort(perm)]
    return QuantizedWeight(Q.to(torch.int32).cpu().contiguous(), scales.cpu(), None if zeros is None else zeros.cpu(),
                           bits, group)


class GPTQ(Pass):
    name: ClassVar[str] = "gptq"
    Options: ClassVar[type[GPTQOptions]] = GPTQOptions
    establishes: ClassVar[frozenset[str]] = frozenset({"weights_quantized"})
    forbids: ClassVar[frozenset[str]] = frozenset({"weights_quantized"})  # see passes/base.py
    needs_calibration: ClassVar[bool] = True

    def run(self, module: Module, ctx: PassContext) -> PassResult:
        o: GPTQOptions = self.options
        o.validate()
        calib = ctx.calibration
        if calib is None:
            raise ConfigError(NO_CALIBRATION)
        device = calib_device.resolve(ctx.calib_device)
        nodes, skipped = select_linears(module, o)
        groups: dict[fx.Node, int] = group_sizes(module, nodes, o.group, o.bits, pass_name=self.name)  # before any work
        # The Hessian and its factors of the last layer's input: the layers reading one activation come one after
        # another (q/k/v_proj, gate/up_proj), so each activation's H is formed and factored once.
        last: list = [None, None, None]  # [statistics, H, HessianFactor]

        def rewrite(layer: Layer) -> Rewritten:
            w, g = layer.weight, groups[layer.node]
            if last[0] is not layer.stats:
                h = layer.stats.hessian()
                last[:] = [layer.stats, h, factor_hessian(h, damp=o.damp, act_order=o.act_order, layer=layer.path)]
            h, factor = last[1], last[2]
            mask = sparsity_mask(layer.node, w)
            qw = gptq_quantize(w, h, bits=o.bits, group=g, sym=o.sym, damp=o.damp, block=o.block,
                               act_order=o.act_order, clip_search=o.clip_search, layer=layer.path, mask=mask,
                               factor=factor)
            w_hat = qw.dequantize()
            rel = relative_error(w, w_hat)
            out_err = output_error(w.float(), w_hat, h)
            new, wnode = replace_with_wq_linear(module, layer.node, qw, spec={
                "pass": self.name, "method": "gptq", "rel_error": rel, "output_error": out_err, "damp": o.damp,
                "act_order": o.act_order})
            record = {"bits": o.bits, "group": g, "rel_error": rel, "output_error": out_err}
            if mask is not None:
                record["sparsity"] = compression(new)["sparsity"]
            return Rewritten.replaced(new, wnode, record)

        done = rewrite_linears(module, ctx, nodes, rewrite, skipped=skipped, who=self.name,
                               collect=functools.partial(self._hessians, device=device))
        last.clear()
        log.info("gptq: %d linears to %d bits in %.1fs (%d calibration batches), skipped %d", len(done.layers),
                 o.bits, done.seconds, calib.samples, len(skipped))
        stats = {**done.stats(module, "quantized", self.name), "seconds": done.seconds, "calibration": repr(calib),
                 "calib_device": str(device)}
        sparse_kept = sum("sparsity" in v for v in done.layers.values())
        if sparse_kept:
            stats["sparse_layers"] = (f"{sparse_kept} sparsified layer(s): pruned weights fixed at 0 and their error "
                                      "compensated (SparseGPT-style)")
        return PassResult(module, bool(done.layers), stats)

    @staticmethod
    def _hessians(module: Module, calib, members: list[fx.Node], **where) -> dict:
        """One block's Hessian accumulators (``hessian.collect_stats``); a seam the interrupt test replaces."""
        return collect_stats(module, calib, members, **where)
