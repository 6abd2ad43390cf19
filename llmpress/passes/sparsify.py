"""``sparsify``: weight pruning to a sparsity target or an N:M pattern (magnitude, Wanda, SparseGPT).

Each selected ``aten.linear(x, W, b)`` stays a plain linear whose weight has zeros in it: the pruned model is
dense-equivalent, so every backend (reference, TVM cpu/arm64/cuda, ONNX) runs it unchanged with no new op. The TVM
CPU backend decides from the weight's zeros whether a sparse kernel pays (``backends/tvm/kernels/sparse_plan.py``)
and otherwise stores the weight compressed for dense compute; ONNX exports it dense-equivalent (said in the
manifest). What was done is recorded on the
node (``compression(node) = {"pass": "sparsify", "method", "sparsity", "pattern"}``, shown by ``llmpress
inspect``); a later ``quantize`` / ``gptq`` / ``awq`` reads the weight's zeros as the mask and keeps them exactly
zero (``quant_common.sparsity_mask``).

Patterns: ``unstructured`` removes the fraction ``sparsity`` (default 0.5) of the weights; ``N:M`` (``2:4``,
``4:8``) keeps the N highest-scoring of every M consecutive input columns of each output row (sparsity 1 - N/M),
the layout sparse tensor cores run. ``in_features`` must be a multiple of M.

Methods, with ``X [n, in]`` the layer's calibration inputs and ``H = 2 X^T X / n`` (GPTQ's Hessian, collected by
the same machinery: ``hessian.block_statistics``, block by block on the graph in which earlier blocks are pruned):

- ``magnitude``: score ``|W_ij|``, compared across the whole layer (unstructured) or within each group of M.
  No calibration.
- ``wanda`` (Sun et al. 2023, "A Simple and Effective Pruning Approach for Large Language Models"): score
  ``|W_ij| * ||X_j||_2`` (``||X_j||^2 = n H_jj / 2``), compared within each output row (unstructured: each row loses
  the same fraction) or within each group of M. The kept weights are not changed.
- ``sparsegpt`` (Frantar & Alistarh 2023, "SparseGPT: Massive Language Models Can Be Accurately Pruned in One-Shot"):
  with ``U = chol((H + lambda I)^-1)^T`` (upper; ``lambda = damp * mean(diag H)``, ``hessian.damped_cholesky``),
  columns are visited left to right in blocks of ``block`` (128). The mask is chosen adaptively per block, on the
  weights as updated so far: OBS saliency ``W_ij^2 / U_jj^2``, the lowest ``sparsity`` fraction of the block's
  ``[out, block]`` scores pruned (unstructured), or the lowest ``M - N`` of each row's group of M columns, chosen
  when the group's first column is reached (N:M). For column j: ``e = (w_j - m_j * w_j) / U_jj`` (``m_j`` keeps the
  unpruned entries), ``W[:, k] -= e U_jk`` for the later columns k of the block, and lazily ``W[:, after] -= E
  U[block, after]`` for the columns after it: the kept weights absorb the error of the pruned ones.

Stats: per layer the achieved sparsity (zeros / weights, including zeros the weight already had), the pattern and,
for the calibrated methods, the output error ``||X (W - W_s)^T||_F / ||X W^T||_F`` on the calibration set.
Measured on tinystories-llama: see README.md ("Sparsity") and tests/passes/test_sparsify.py.
"""
from __future__ import annotations

import functools
import logging
import math
import re
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
import torch.fx as fx

from ..errors import ConfigError
from ..ir.meta import compression, set_compression, source_path
from ..ir.module import Module
from . import calib_device
from .base import Pass, PassContext, PassResult, SelectOptions
from .hessian import collect_stats, damped_cholesky, output_error
from .layer_rewrite import Layer, Rewritten, rewrite_linears
from .quant_common import linear_weight
from .select import select_linears

__all__ = ["Sparsify", "SparsifyOptions", "parse_pattern", "prune_mask", "magnitude_prune", "wanda_prune",
           "sparsegpt_prune"]

log = logging.getLogger(__name__)

STORAGE = ("dense-equivalent in the IR: zeros in the weights; TVM CPU artifacts run a sparse kernel on a compressed "
           "form where the measured crossover says it is faster, else store them compressed (mask + values) and "
           "compute dense; ONNX stores them dense-equivalent")

_NM = re.compile(r"([0-9]+):([0-9]+)")


def parse_pattern(pattern: str) -> tuple[int, int] | None:
    """``"unstructured"`` -> None; ``"N:M"`` -> (N, M) with 0 < N < M; anything else is a ConfigError."""
    if pattern == "unstructured":
        return None
    m = _NM.fullmatch(pattern)
    if m is None or not 0 < int(m.group(1)) < int(m.group(2)):
        raise ConfigError(f"pass 'sparsify': pattern={pattern!r} is neither 'unstructured' nor N:M with "
                          "0 < N < M (2:4, 4:8)")
    return int(m.group(1)), int(m.group(2))


@dataclass(frozen=True)
class SparsifyOptions(SelectOptions):
    """``method``: magnitude | wanda | sparsegpt; ``sparsity``: fraction of weights removed (default 0.5 unstructured,
    1 - N/M for N:M); ``pattern``: unstructured or N:M (2:4, 4:8: keep N of every M consecutive inputs per row);
    ``damp`` / ``block``: SparseGPT's dampening (fraction of the mean Hessian diagonal) and columns per block."""

    method: Literal["magnitude", "wanda", "sparsegpt"] = "magnitude"
    sparsity: float | None = None
    pattern: str = "unstructured"
    damp: float = 0.01
    block: int = 128

    @property
    def nm(self) -> tuple[int, int] | None:
        return parse_pattern(self.pattern)

    @property
    def target(self) -> float:
        nm = self.nm
        if nm is not None:
            return 1.0 - nm[0] / nm[1]
        return 0.5 if self.sparsity is None else self.sparsity

    def validate(self) -> None:
        nm = parse_pattern(self.pattern)
        s = self.sparsity
        if s is not None and not (0.0 < s < 1.0 and math.isfinite(s)):
            raise ConfigError(f"pass 'sparsify': sparsity={s} must be in (0, 1)")
        if nm is not None and s is not None and abs(s - (1.0 - nm[0] / nm[1])) > 1e-9:
            raise ConfigError(f"pass 'sparsify': pattern={self.pattern} removes {1 - nm[0] / nm[1]:g} of the weights, "
                              f"not sparsity={s}; leave sparsity out for N:M patterns")
        if not 0 < self.damp < 1:
            raise ConfigError(f"pass 'sparsify': damp={self.damp} must be in (0, 1)")
        if self.block < 1:
            raise ConfigError(f"pass 'sparsify': block={self.block} must be positive")
        if nm is not None and self.block % nm[1]:
            raise ConfigError(f"pass 'sparsify': block={self.block} must be a multiple of M={nm[1]} "
                              f"(pattern={self.pattern}), so no group of M columns straddles two blocks")


# -- masks ----------------------------------------------------------------------------------------------------------
def prune_mask(score: torch.Tensor, *, sparsity: float = 0.5, nm: tuple[int, int] | None = None,
               per: Literal["layer", "row"] = "layer") -> torch.Tensor:
    """Bool ``[out, in]``, True where a weight is pruned: the lowest scores.

    N:M: the ``M - N`` lowest of each row's groups of M consecutive columns (``sparsity`` is ignored). Unstructured:
    ``round(sparsity * count)`` lowest over the whole matrix (``per="layer"``) or of each row (``per="row"``)."""
    rows, cols = score.shape
    mask = torch.zeros(rows, cols, dtype=torch.bool)
    if nm is not None:
        n, m = nm
        groups = score.reshape(rows, cols // m, m)
        idx = torch.topk(groups, m - n, dim=-1, largest=False).indices
        return mask.reshape(rows, cols // m, m).scatter_(-1, idx, True).reshape(rows, cols)
    if per == "row":
        k = round(sparsity * cols)
        if k:
            mask.scatter_(1, torch.topk(score, k, dim=1, largest=False).indices, True)
        return mask
    k = round(sparsity * score.numel())
    if k:
        mask.view(-1)[torch.topk(score.reshape(-1), k, largest=False).indices] = True
    return mask


def magnitude_prune(w: torch.Tensor, *, sparsity: float = 0.5, nm: tuple[int, int] | None = None) -> torch.Tensor:
    """``W`` with its smallest ``|W_ij|`` set to 0 (layer-wide, or per group of M for N:M)."""
    w = w.detach().float()
    return w.masked_fill(prune_mask(w.abs(), sparsity=sparsity, nm=nm, per="layer"), 0.0)


def wanda_prune(w: torch.Tensor, h: torch.Tensor, *, sparsity: float = 0.5, nm: tuple[int, int] | None = None
                ) -> torch.Tensor:
    """``W`` with its lowest ``|W_ij| * ||X_j||`` per output row (or per group of M) set to 0; ``h = 2 X^T X / n``,
    whose diagonal is proportional to ``||X_j||^2`` (a common factor per row does not change the ranking)."""
    w = w.detach().to(device=h.device, dtype=torch.float32)
    norms = torch.diagonal(h).float().clamp(min=0).sqrt()
    return w.masked_fill(prune_mask(w.abs() * norms.unsqueeze(0), sparsity=sparsity, nm=nm, per="row"), 0.0).cpu()


def sparsegpt_prune(w: torch.Tensor, h: torch.Tensor, *, sparsity: float = 0.5, nm: tuple[int, int] | None = None,
                    damp: float = 0.01, block: int = 128, layer: str = "?") -> torch.Tensor:
    """SparseGPT of one weight ``w [out, in]`` given ``h = 2 X^T X / n`` (see the module docstring). Pruned
    entries are exactly 0 in the result; the others carry the error compensation. The math runs on ``h``'s device;
    the result is on the CPU."""
    W = w.detach().to(device=h.device, dtype=torch.float32).clone()
    H = h.detach().to(torch.float32).clone()
    rows, cols = W.shape
    dead = torch.diagonal(H) == 0  # an input that never fires: its weights are free to prune (as in GPTQ)
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    U = damped_cholesky(H, damp, layer=layer, who="sparsify", inverse=True)
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        W1 = W[:, i1:i2].clone()
        U1 = U[i1:i2, i1:i2]
        d2 = torch.diagonal(U1).square().unsqueeze(0)
        E1 = torch.zeros_like(W1)
        if nm is None:  # adaptive mask: chosen per block, on the weights updated by every earlier block
            M1 = prune_mask(W1.square() / d2, sparsity=sparsity, per="layer")
        else:
            M1 = torch.zeros_like(W1, dtype=torch.bool)
        for i in range(i2 - i1):
            if nm is not None and i % nm[1] == 0:
                j = i + nm[1]
                M1[:, i:j] = prune_mask(W1[:, i:j].square() / d2[:, i:j], nm=nm)
            wc = W1[:, i]
            err = torch.where(M1[:, i], wc, torch.zeros_like(wc)) / U1[i, i]  # (w - mask(w)) / U_ii
            W1[:, i:] -= err.unsqueeze(1) * U1[i, i:].unsqueeze(0)
            E1[:, i] = err
        W1.masked_fill_(M1, 0.0)  # the update left them at 0 up to rounding; make it exact
        W[:, i1:i2] = W1
        if i2 < cols:
            W[:, i2:] -= E1 @ U[i1:i2, i2:]
    return W.cpu()


# -- the pass -------------------------------------------------------------------------------------------------------
class Sparsify(Pass):
    name: ClassVar[str] = "sparsify"
    Options: ClassVar[type[SparsifyOptions]] = SparsifyOptions
    establishes: ClassVar[frozenset[str]] = frozenset({"weights_sparse"})
    forbids: ClassVar[frozenset[str]] = frozenset({"weights_quantized"})  # it prunes float linears only

    @property
    def needs_calibration(self) -> bool:  # type: ignore[override] - magnitude needs none, the others do
        return self.options.method != "magnitude"

    def _select(self, module: Module) -> tuple[list[fx.Node], list[tuple[str, str]]]:
        nodes, skipped = select_linears(module, self.options)
        fresh = []
        for node in nodes:
            spec = compression(node) or {}
            if spec.get("pass") == "sparsify":
                skipped.append((source_path(node) or node.name, f"already sparsified ({spec.get('method')}, "
                                f"{spec.get('pattern')}, sparsity {spec.get('sparsity')})"))
            else:
                fresh.append(node)
        return fresh, skipped

    def layer_problems(self, module: Module) -> list[str]:
        """Every selected layer the pattern does not fit (``in_features`` not a multiple of M), one line each."""
        nm = self.options.nm
        if nm is None:
            return []
        out = []
        for node in self._select(module)[0]:
            in_f = linear_weight(module, node)[1].shape[1]
            if in_f % nm[1]:
                out.append(f"pattern={self.options.pattern} needs in_features divisible by {nm[1]}, layer "
                           f"{source_path(node) or node.name!r} has {in_f}")
        return out

    def run(self, module: Module, ctx: PassContext) -> PassResult:
        o: SparsifyOptions = self.options
        o.validate()
        nodes, skipped = self._select(module)
        problems = self.layer_problems(module)  # every layer checked before any is changed
        if problems:
            raise ConfigError(f"pass 'sparsify': {len(problems)} layer(s) do not fit pattern={o.pattern} (exclude "
                              "them or choose another pattern):\n  " + "\n  ".join(problems))
        calib = ctx.calibration
        if self.needs_calibration and calib is None and nodes:
            raise ConfigError(f"sparsify(method={o.method}) needs calibration data (--calib FILE or calibration=...)")
        nm, target = o.nm, o.target
        zeros = total = 0

        def rewrite(layer: Layer) -> Rewritten:
            nonlocal zeros, total
            w, node = layer.weight, layer.node
            h = None if layer.stats is None else layer.stats.hessian()
            if o.method == "magnitude":
                new = magnitude_prune(w, sparsity=target, nm=nm)
            elif o.method == "wanda":
                new = wanda_prune(w, h, sparsity=target, nm=nm)
            else:
                new = sparsegpt_prune(w, h, sparsity=target, nm=nm, damp=o.damp, block=o.block, layer=layer.path)
            _store(module, node, new.to(w.dtype))
            nz = int((new == 0).sum())
            zeros += nz
            total += new.numel()
            record = {"sparsity": nz / new.numel(), "pattern": o.pattern}
            if h is not None:
                record["output_error"] = output_error(w.float(), new.float(), h)
            set_compression(node, {"pass": self.name, "method": o.method, "sparsity": round(nz / new.numel(), 4),
                                   "pattern": o.pattern, "weight": module.weight_name(node.args[1])})
            return Rewritten(record)

        # A tied weight split off by _store is in the graph for the next block: the driver recompiles per block.
        collect = functools.partial(collect_stats, device=calib_device.resolve(ctx.calib_device))
        done = rewrite_linears(module, ctx, nodes, rewrite, skipped=skipped, who=self.name,
                               collect=collect if self.needs_calibration else None)
        log.info("sparsify: %d linears to %s sparsity %.3f by %s in %.1fs, skipped %d", len(nodes), o.pattern,
                 zeros / total if total else 0.0, o.method, done.seconds, len(skipped))
        stats = done.stats(module, "sparsified", self.name, byte_counts=False)
        stats.update(method=o.method, pattern=o.pattern, target_sparsity=target,
                     sparsity=zeros / total if total else 0.0, storage=STORAGE, seconds=done.seconds)
        if self.needs_calibration and nodes:
            stats["calibration"] = repr(calib)
        return PassResult(module, bool(nodes), stats)


def _store(module: Module, node: fx.Node, w: torch.Tensor) -> None:
    """Make ``w`` the weight of the linear ``node``. A weight read by anything else (a tied embedding / lm_head)
    gets a new placeholder for this linear alone, so the pruning never leaks into another op."""
    wnode = node.args[1]
    name = module.weight_name(wnode)
    shared = len(wnode.users) > 1 or sum(s.target == name for s in module.signature.input_specs) > 1
    if not shared:
        module.set_weight(wnode, w)
        return
    new = module.add_weight(module.fresh_weight_name(name), w)
    node.replace_input_with(wnode, new)
