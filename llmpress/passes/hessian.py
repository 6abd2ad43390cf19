"""Second-order statistics of linear inputs on the calibration data, collected block by block: the Hessian of
``gptq`` and SparseGPT (``sparsify``), the Gram matrix of SVD-LLM / ASVD (``factorize``) and of ``awq``'s search.

For a linear ``y = x W^T`` with calibration inputs ``X [n, in]``:

- Gram matrix ``G = X^T X`` (``GramStats.gram``, summed batch by batch with ``G += X_b^T X_b``), optionally with
  ``sum_t |x_t|`` (``abs_sum``, ASVD's and AWQ's channel magnitudes);
- Hessian of the layer's squared output error ``||X W^T - X W_hat^T||^2 / n``: ``H = 2 G / n`` (``hessian()``);
- relative output error of an approximation ``W_hat`` (``output_error``): ``||X (W - W_hat)^T||_F / ||X W^T||_F =
  sqrt(tr(D H D^T) / tr(W H W^T))`` with ``D = W - W_hat``;
- ``damped_cholesky``: the lower Cholesky factor of ``H + lambda I`` or the upper one ``U`` of ``(H + lambda I)^-1``
  (``U^T U``), ``lambda = damp * mean(diag H)`` retried 10x larger (up to 4 times) when Cholesky fails.

Block by block (``block_statistics``): layers are grouped by transformer block (``model.layers.3``: the source path
up to its first numeric segment) in graph order, and block i's statistics are taken on the graph as the caller left
it, so a caller that rewrites each block before asking for the next lets every block see the error of the earlier
ones. Layers reading one activation (``q/k/v_proj``) share an accumulator. ``calibration.BlockRunner`` runs one
block at a time; graph-prefix re-runs (``Calibration.collect``, bit-identical) are the fallback, with the reason
logged, for graphs whose blocks cannot run alone and for layers after the blocks (``lm_head``).
"""
from __future__ import annotations

import logging
from typing import Callable, Iterator

import torch
import torch.fx as fx

from ..errors import PassError
from ..ir.meta import source_path
from ..ir.module import Module
from .calibration import BlockRunner, BlocksNotIsolated

__all__ = ["GramStats", "gram_stats_with_abs", "collect_stats", "block_statistics", "block_key",
           "numbered_block", "damped_cholesky", "output_error", "BlockCollector"]

log = logging.getLogger(__name__)


class GramStats:
    """Running ``G = X^T X`` (and optionally ``sum_t |x_t|``) of one linear input, in ``dtype`` on ``device`` (each
    batch of activations is copied there: ``calib_device``); ``tokens`` rows."""

    def __init__(self, dtype: torch.dtype = torch.float32, *, abs_sum: bool = False,
                 device: torch.device | str = "cpu") -> None:
        self.dtype, self.track_abs, self.tokens = dtype, abs_sum, 0
        self.device = torch.device(device)
        self.gram: torch.Tensor | None = None
        self.abs_sum: torch.Tensor | None = None

    def update(self, x2d: torch.Tensor) -> None:
        x = x2d.detach().to(device=self.device, dtype=self.dtype)
        if self.gram is None:
            self.gram = torch.zeros(x.shape[1], x.shape[1], dtype=self.dtype, device=self.device)
            if self.track_abs:
                self.abs_sum = torch.zeros(x.shape[1], dtype=self.dtype, device=self.device)
        self.gram.addmm_(x.T, x)
        if self.track_abs:
            self.abs_sum += x.abs().sum(0)
        self.tokens += x.shape[0]

    def hessian(self) -> torch.Tensor:
        """``H = 2 G / n``."""
        return 2.0 * self.gram / self.tokens

    def mean_gram(self) -> torch.Tensor:
        """``G / n`` in float32 (0 rows: divided by 1)."""
        return (self.gram / max(self.tokens, 1)).to(torch.float32)

    def mean_abs(self) -> torch.Tensor:
        """``mean_t |x_t|`` in float32."""
        return (self.abs_sum / max(self.tokens, 1)).to(torch.float32)


def gram_stats_with_abs(device: torch.device | str = "cpu") -> GramStats:
    """The accumulator of ``factorize`` and ``awq``: float64 ``X^T X`` and ``sum |x|`` (``gptq`` and ``sparsify``
    use the float32 ``GramStats()``)."""
    return GramStats(torch.float64, abs_sum=True, device=device)


# (module, calibration, members, *, runner=None, key="") -> {input activation: statistics}
BlockCollector = Callable[..., dict]


def collect_stats(module: Module, calib, members: list[fx.Node], *, runner: BlockRunner | None = None,
                  key: str = "", new: Callable[..., GramStats] = GramStats,
                  device: torch.device | str = "cpu") -> dict[fx.Node, GramStats]:
    """Statistics per distinct input activation of ``members`` (keyed by ``node.args[0]``; layers reading one
    activation share them), from ``runner`` for block ``key`` or by re-running the graph prefix, accumulated on
    ``device`` (``new(device=device)``)."""
    rep: dict[fx.Node, fx.Node] = {}
    for n in members:
        rep.setdefault(n.args[0], n)
    stats: dict[fx.Node, GramStats] = {}

    def observe(node: fx.Node, x: torch.Tensor) -> None:
        k = node.args[0]
        if rep[k] is node:
            if k not in stats:
                stats[k] = new(device=device)
            stats[k].update(x)

    if runner is not None:
        runner.collect(key, members, observe)
    else:
        calib.collect(module, members, observe)
    return stats


def block_statistics(module: Module, calib, nodes: list[fx.Node], *, who: str,
                     collect: BlockCollector = collect_stats) -> Iterator[tuple[str, list[fx.Node], dict]]:
    """Yields ``(block key, the block's nodes, {input activation: statistics})`` per transformer block in graph
    order, each collected on the graph as the caller left it (see the module docstring)."""
    blocks: dict[str, list[fx.Node]] = {}
    for node in nodes:  # graph order, so blocks come in execution order
        blocks.setdefault(block_key(source_path(node) or node.name), []).append(node)
    runner = _block_runner(module, calib, blocks, who)
    for key, members in blocks.items():
        if runner is not None and key in runner.keys:
            yield key, members, collect(module, calib, members, runner=runner, key=key)
        else:
            yield key, members, collect(module, calib, members)


def block_key(path: str) -> str:
    """``model.layers.3.self_attn.q_proj`` -> ``model.layers.3``; a path without a numeric segment is its own
    block."""
    segs = path.split(".")
    for i, s in enumerate(segs):
        if s.isdigit():
            return ".".join(segs[: i + 1])
    return path


def _numbered(path: str) -> bool:
    return any(s.isdigit() for s in path.split("."))


def numbered_block(node: fx.Node) -> str | None:
    """The transformer block of a node (``model.layers.3``), or ``None`` for a node outside every block (a path
    without a numeric segment: embedding, final norm, ``lm_head``, the RoPE/mask prelude)."""
    path = source_path(node)
    return block_key(path) if path and _numbered(path) else None


def _block_runner(module: Module, calib, blocks: dict[str, list[fx.Node]], who: str) -> BlockRunner | None:
    """A layer-by-layer runner over the numbered blocks, or ``None`` (with the reason logged) when the graph's
    blocks cannot be run in isolation; the caller then re-runs the graph prefix per block with ``collect``."""
    keys = list(blocks)
    numbered = [i for i, k in enumerate(keys) if _numbered(k)]
    if not numbered:
        return None
    # Layers outside the numbered blocks (lm_head) use collect(); they must all come after the blocks: rewriting
    # one before or between them would change values the runner already holds.
    early = [k for i, k in enumerate(keys) if i < numbered[-1] and i not in numbered]
    if early:
        log.info("%s: layers %s come before transformer blocks; calibrating by graph prefix re-runs", who,
                 ", ".join(early))
        return None
    try:
        runner = BlockRunner(module, calib, numbered_block)
    except BlocksNotIsolated as e:
        log.info("%s: blocks cannot be run one at a time (%s); calibrating by graph prefix re-runs", who, e)
        return None
    lost = [keys[i] for i in numbered if keys[i] not in runner.keys]
    if lost:  # a selected layer's path is numbered but its node is not found in a block
        log.info("%s: blocks %s not found in the graph; calibrating by graph prefix re-runs", who, ", ".join(lost))
        return None
    return runner


def damped_cholesky(h: torch.Tensor, damp: float, *, layer: str, who: str, inverse: bool = False,
                    what: str = "Hessian") -> torch.Tensor:
    """Lower Cholesky factor ``L`` of ``H + lambda I`` (``L L^T``), or with ``inverse`` the upper factor ``U`` of
    ``(H + lambda I)^-1`` (``U^T U``); ``lambda = damp * mean(diag H)``, retried 10x larger (up to 4 times) when H
    is not positive definite enough for its dtype. ``who``: the pass named in messages; ``what``: the matrix."""
    mean_diag = float(torch.diagonal(h).mean())
    if mean_diag <= 0:
        raise PassError(f"{who}: the inputs of {layer!r} are all zero on the calibration data")
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    for attempt in range(5):
        lam = damp * (10.0 ** attempt) * mean_diag
        chol, info = torch.linalg.cholesky_ex(h + lam * eye)
        if int(info) == 0 and not inverse:
            return chol
        if int(info) == 0:
            upper, info2 = torch.linalg.cholesky_ex(torch.cholesky_inverse(chol), upper=True)
            if int(info2) == 0:
                return upper
        log.warning("%s: %s: Cholesky failed with dampening %.3g; retrying with %.3g", who, layer, lam, lam * 10)
    raise PassError(f"{who}: the {what} of {layer!r} is not positive definite even with dampening "
                    f"{damp * 1e4:g} x its mean diagonal; use more calibration data")


def output_error(w: torch.Tensor, w_hat: torch.Tensor, h: torch.Tensor) -> float:
    """``sqrt(tr(D H D^T) / tr(W H W^T))``, ``D = W - W_hat``: the relative output error on the calibration data
    (computed on ``h``'s device)."""
    w, w_hat = w.to(h.device), w_hat.to(h.device)
    d = w - w_hat
    num = float(((d @ h) * d).sum())  # tr(D H D^T)
    den = float(((w @ h) * w).sum())
    return (max(num, 0.0) / den) ** 0.5 if den > 0 else 0.0
