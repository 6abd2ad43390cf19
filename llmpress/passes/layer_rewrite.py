"""The layer-rewrite driver: the skeleton of the passes that rewrite selected linears one at a time (``quantize``,
``gptq``, ``awq``, ``sparsify``, ``factorize``), so each supplies only its own math.

A pass selects and checks its layers (every option and layer before any work), then ``rewrite_linears``:

1. with ``collect`` (a ``hessian.BlockCollector``) goes block by block (``hessian.block_statistics``), block i's
   input statistics taken on the graph whose blocks ``< i`` are rewritten; without it, all layers are one batch;
2. calls ``rewrite(Layer)`` per layer (with a progress bar; ``Layer.weight`` is read now, from the checkpoint for a
   lazy module, and the heap's freed pages are returned after each: one float layer resident at a time), which
   rewrites that layer and returns a ``Rewritten``
   (its stats record, bytes before/after, the weight placeholder it may have left unread) or a string: the reason
   it left the layer alone (added to ``skipped``);
3. after each block (without ``collect``: after ``finish()``, the pass's last edit) drops the weights the rewrites
   left unread (``Module.remove_unused_weights(only=...)``: no others) and recompiles once;
4. returns ``Rewrites`` (per-layer records by source path, skipped, byte totals, seconds); ``Rewrites.stats`` gives
   the common part of the pass's stats.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.fx as fx

from ..host import release_freed_memory
from ..ir.meta import compression, source_path
from ..ir.module import Module
from .base import PassContext
from .hessian import BlockCollector, block_statistics
from .select import why_none_selected

__all__ = ["Layer", "Rewritten", "Rewrites", "rewrite_linears"]


@dataclass
class Layer:
    """One selected ``aten.linear`` as the rewrite callback sees it: the node, its source path, its weight, its
    input activation as collected (``x``) and that input's calibration statistics (``None`` without ``collect``)."""

    node: fx.Node
    path: str
    weight: torch.Tensor
    x: fx.Node
    stats: Any = None


@dataclass
class Rewritten:
    """What rewriting one layer did: ``record`` goes to ``stats["layers"][path]``; ``dead``: the old weight
    placeholder, dropped at the end of the block if nothing reads it any more."""

    record: dict[str, Any]
    bytes_before: int = 0
    bytes_after: int = 0
    dead: fx.Node | None = None

    @classmethod
    def replaced(cls, new: fx.Node, dead: fx.Node, record: dict[str, Any]) -> "Rewritten":
        """A layer replaced by ``new``, whose compression metadata holds the byte counts (``wq_linear``)."""
        spec = compression(new)
        return cls(record, spec["bytes_before"], spec["bytes_after"], dead)


@dataclass
class Rewrites:
    """The outcome of ``rewrite_linears``."""

    layers: dict[str, dict[str, Any]] = field(default_factory=dict)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    bytes_before: int = 0
    bytes_after: int = 0
    seconds: float = 0.0
    finished: Any = None  # what finish() returned

    def stats(self, module: Module, count_key: str, who: str, *, byte_counts: bool = True) -> dict[str, Any]:
        """``{count_key: layers rewritten, "skipped", "bytes_before", "bytes_after", "layers"}``, led by the
        ``reason`` when no layer was rewritten."""
        out: dict[str, Any] = {count_key: len(self.layers), "skipped": self.skipped}
        if byte_counts:
            out.update(bytes_before=self.bytes_before, bytes_after=self.bytes_after)
        out["layers"] = self.layers
        if not self.layers:
            out = {"reason": why_none_selected(module, self.skipped, who), **out}
        return out


def rewrite_linears(module: Module, ctx: PassContext, nodes: list[fx.Node],
                    rewrite: Callable[[Layer], "Rewritten | str"], *, skipped: list[tuple[str, str]], who: str,
                    desc: str | None = None, collect: BlockCollector | None = None,
                    finish: Callable[[], Any] | None = None) -> Rewrites:
    """Rewrite ``nodes`` one at a time with ``rewrite`` (see the module docstring). ``skipped``: what selection
    left out, extended with the layers ``rewrite`` declines. ``desc``: the progress bar's label (``who``)."""
    if collect is not None and finish is not None:
        raise ValueError("rewrite_linears: finish runs after the single batch of an uncalibrated rewrite only")
    t0 = time.perf_counter()
    out = Rewrites(skipped=skipped)
    bar = None
    if ctx.progress and nodes:
        from tqdm import tqdm

        bar = tqdm(total=len(nodes), desc=desc or who, unit="layer", leave=False)
    if collect is not None and nodes:
        batches = block_statistics(module, ctx.calibration, nodes, who=who, collect=collect)
    else:
        batches = iter([("", nodes, None)])
    lazy = any(module.is_lazy(module.weight_name(n.args[1]) or "") for n in nodes)
    with torch.no_grad():
        for _, members, stats in batches:
            # Inputs as collected: a member reading another member's output (the factors of a factorized layer)
            # sees that input replaced once the first is rewritten.
            inputs = {node: node.args[0] for node in members}
            dead: list[fx.Node] = []
            done = 0
            for node in members:
                path = source_path(node) or node.name
                x = inputs[node]
                result = rewrite(Layer(node, path, module.weight(node.args[1]), x,
                                       None if stats is None else stats.get(x)))
                if bar is not None:
                    bar.update(1)
                if lazy:  # the layer's float weight was read for this rewrite and is dropped: free its pages
                    release_freed_memory()
                if isinstance(result, str):
                    out.skipped.append((path, result))
                    continue
                done += 1
                out.layers[path] = result.record
                out.bytes_before += result.bytes_before
                out.bytes_after += result.bytes_after
                if result.dead is not None:
                    dead.append(result.dead)
            if finish is not None:
                out.finished = finish()
            if dead:
                module.remove_unused_weights(only=dead)
            if done:
                module.recompile()
            del stats
    if bar is not None:
        bar.close()
    out.seconds = time.perf_counter() - t0
    return out
