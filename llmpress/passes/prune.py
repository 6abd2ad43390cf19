"""``prune``: structured pruning of gated-MLP channels and KV-head groups: the weights shrink, so every backend runs a
smaller model.

Match (structure first, as ``fuse_gate_up`` does): ``down(act(gate(x)) * up(x))`` with ``act`` silu/gelu and
``gate``, ``up``, ``down`` plain ``aten.linear`` nodes on stored 2-D float weights; the product's only reader is
``down`` (as its input), the gate's only reader the activation, and no weight is read elsewhere (tied). Which
linear is which is read from the graph, not from names; ``include``/``exclude`` globs only filter (a triple is
pruned when all three linears are selected).

Rewrite, with ``W_g, W_u: [inter, d]``, ``W_d: [d, inter]`` and ``K`` the kept intermediate channels (sorted)::

    down(silu(x W_g^T) * (x W_u^T))  ==>  silu(x W_g[K]^T) * (x W_u[K]^T) W_d[:, K]^T

Channel ``j`` of the intermediate activation ``h = act(gate(x)) * up(x)`` reaches the output only through column
``j`` of ``W_d``, so dropping it removes exactly ``h_j W_d[:, j]^T`` from the MLP's output; the kept channels
compute what they did before. Gate/up biases lose the same rows; ``down``'s bias is unchanged. The new weights
keep their names (``model.layers.0.mlp.gate_proj.weight`` is now ``[|K|, d]``); the shapes of the nodes in
between follow, so nothing downstream (no kernel, no runtime) needs to know the model was pruned.

Importance of channel ``j`` (``score=``), ranked within each MLP (each loses the same fraction, so every block
keeps one shape: one kernel schedule and one tuning record serve them all, and no block is hollowed out):

- ``wanda`` (default; Wanda's ``|W| ||x||`` taken per channel): ``s_j = ||h_j||_2 ||W_d[:, j]||_2`` with ``h_j``
  over every calibration token. ``||h_j W_d[:, j]^T||_F = s_j`` exactly: the norm of the output error that
  removing channel ``j`` alone causes on the calibration data. Blocks are calibrated in graph order
  (``calibration.BlockRunner``, as ``gptq``), so block i's statistics see blocks ``< i`` already pruned.
- ``magnitude``: ``s_j = ||W_g[j]|| ||W_u[j]|| ||W_d[:, j]||`` (no calibration data).
- ``random``: a seeded random order (``ctx.seed``): the baseline that shows what a score is worth.

Size: ``mlp=p`` removes the fraction ``p`` of each MLP's ``inter`` channels, the kept count rounded to a multiple
of ``multiple`` (default 32): ``|K| = multiple * round((1 - p) inter / multiple)``, at least one multiple. ``|K|`` is
``down``'s ``in_features``, so a later weight quantizer's ``group`` must divide it (``mlp=0.25`` of 1024 keeps 768,
which ``group=128`` divides; of 768 it keeps 576, which takes ``group=64`` or ``multiple=128``). An MLP where the
rounding keeps every channel is skipped with the reason.

``heads=p`` removes ``round(p n_kv)`` whole KV groups of every attention (each keeps the same count, so
``LMInfo.n_kv_heads`` and the KV cache inputs shrink with them): see ``prune_heads`` for the match, the rewrite, the
scores and why whole groups.

Order: before ``fuse_qkv`` / ``fuse_gate_up`` (after them gate and up are one linear and a split; ``forbids``
``qkv_fused`` because ``fuse_qkv(all_siblings=true)``, the ``fuse`` preset, fuses gate/up too) and before any
quantizer (it slices float weights only), and before ``kv_quant`` (whose int8 cache writes the head match does not
follow). ``factorize`` and ``sparsify`` may run after it. Calibration statistics of a block (o's and down's inputs)
are taken together, before any of the block is pruned.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
import torch.fx as fx
from torch.fx.passes.shape_prop import _extract_tensor_metadata

from ..errors import ConfigError
from ..ir.meta import compression, set_compression, source_path
from ..ir.module import Module
from .base import Pass, PassContext, PassResult, SelectOptions
from .fuse_gate_up import gated_pairs
from .hessian import _block_runner, block_key
from .prune_heads import AttentionGroup, find_attentions, group_scores, prune_attention, update_lm
from .select import select_linears

__all__ = ["Prune", "PruneOptions", "MLPTriple", "find_mlps", "channel_scores", "kept_channels", "kept_count"]

log = logging.getLogger(__name__)

_LINEAR = torch.ops.aten.linear.default


@dataclass(frozen=True)
class PruneOptions(SelectOptions):
    """``mlp``: fraction of each gated MLP's intermediate channels removed (0: none); ``heads``: fraction of each
    attention's KV groups removed (0: none); ``score``: wanda | magnitude | random; ``multiple``: the kept MLP
    channel count is rounded to a multiple of it."""

    mlp: float = 0.25
    heads: float = 0.0
    score: Literal["wanda", "magnitude", "random"] = "wanda"
    multiple: int = 32

    def validate(self) -> None:
        for key in ("mlp", "heads"):
            v = getattr(self, key)
            if not 0.0 <= v < 1.0:
                raise ConfigError(f"pass 'prune': {key}={v} must be in [0, 1) (the fraction removed)")
        if self.mlp == 0.0 and self.heads == 0.0:
            raise ConfigError("pass 'prune': mlp=0 and heads=0 remove nothing")
        if self.multiple < 1:
            raise ConfigError(f"pass 'prune': multiple={self.multiple} must be positive")


@dataclass
class MLPTriple:
    """One gated MLP found in the graph: ``down(mul(act(gate(x)), up(x)))``."""

    path: str  # the MLP's source path (``model.layers.0.mlp``)
    gate: fx.Node
    up: fx.Node
    down: fx.Node
    act: fx.Node
    mul: fx.Node

    @property
    def linears(self) -> tuple[fx.Node, fx.Node, fx.Node]:
        return self.gate, self.up, self.down


def _parent(path: str) -> str:
    return path.rsplit(".", 1)[0] if "." in path else path


def _bias(node: fx.Node):
    return node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")


def find_mlps(module: Module) -> tuple[list[MLPTriple], list[tuple[str, str]]]:
    """Every gated MLP whose channels can be pruned, and (path, reason) for each near miss."""
    found, skipped = [], []
    for mul, gate, up in gated_pairs(module):
        act = mul.args[1] if mul.args[0] is up else mul.args[0]
        path = _parent(source_path(gate) or gate.name)
        downs = list(mul.users)
        why = None
        if gate.target is not _LINEAR or up.target is not _LINEAR:
            why = "gate/up already quantized; put prune before the quantizer"
        elif len(downs) != 1 or downs[0].op != "call_function" or downs[0].target is not _LINEAR \
                or downs[0].args[0] is not mul:
            why = f"act(gate) * up is read by {[u.name for u in downs]}, not by one down projection alone"
        elif len(gate.users) != 1 or len(act.users) != 1 or len(up.users) != 1:
            why = "gate, up or the activation has readers besides the gated product"
        else:
            for lin in (gate, up, downs[0]):
                w = lin.args[1]
                if module.weight(w) is None or module.weight(w).dim() != 2:
                    why = f"{source_path(lin) or lin.name}'s weight is not a stored 2-D tensor"
                elif not module.weight(w).is_floating_point():
                    why = f"{source_path(lin) or lin.name}'s weight is not float"
                elif len(w.users) > 1:
                    why = f"{source_path(lin) or lin.name}'s weight is also read elsewhere (tied)"
                if why:
                    break
        if why:
            skipped.append((path, why))
        else:
            found.append(MLPTriple(path, gate, up, downs[0], act, mul))
    return found, skipped


def kept_count(inter: int, fraction: float, multiple: int) -> int:
    """``multiple * round((1 - fraction) * inter / multiple)``, at least ``multiple``, at most ``inter``."""
    k = multiple * int((1.0 - fraction) * inter / multiple + 0.5)
    return min(inter, max(multiple, k))


def channel_scores(w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor, *, score: str,
                   sumsq: torch.Tensor | None = None, seed: int = 0) -> torch.Tensor:
    """Importance ``[inter]`` of each intermediate channel (see the module docstring); ``sumsq``: ``sum_t h_tj^2``
    over the calibration tokens (``wanda``)."""
    down_norm = w_down.detach().float().norm(dim=0)
    if score == "wanda":
        if sumsq is None:
            raise ConfigError("prune(score=wanda) needs calibration data (--calib FILE or calibration=...)")
        return sumsq.double().clamp_min(0).sqrt().float() * down_norm
    if score == "magnitude":
        return w_gate.detach().float().norm(dim=1) * w_up.detach().float().norm(dim=1) * down_norm
    if score == "random":
        return torch.rand(down_norm.shape[0], generator=torch.Generator().manual_seed(seed))
    raise ConfigError(f"pass 'prune': unknown score {score!r}")


def kept_channels(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Indices of the ``keep`` highest scores, in ascending channel order (the kept channels keep their order)."""
    return torch.sort(torch.topk(scores, keep).indices).values


def _replace_weight(module: Module, old: fx.Node, tensor: torch.Tensor) -> fx.Node:
    """Put ``tensor`` (a new shape) behind the weight ``old`` under the same name; returns the new placeholder.
    ``set_weight`` keeps shapes fixed, so the old placeholder is swapped for a new one: first under a temporary
    name (the old one still exists), then under the original name once the old one is gone."""
    name = module.weight_name(old)
    tmp = module.add_weight(module.fresh_weight_name(f"{name}.pruning"), tensor)
    old.replace_all_uses_with(tmp)
    module.remove_unused_weights(only=[old])
    new = module.add_weight(name, tensor)
    tmp.replace_all_uses_with(new)
    module.remove_unused_weights(only=[tmp])
    return new


class Prune(Pass):
    name: ClassVar[str] = "prune"
    Options: ClassVar[type[PruneOptions]] = PruneOptions
    establishes: ClassVar[frozenset[str]] = frozenset({"pruned"})
    # It slices float linears: after a quantizer they are packed, after a fusion gate/up (q/k/v) are one, and after
    # kv_quant the cache writes are quantize ops the head match does not follow.
    forbids: ClassVar[frozenset[str]] = frozenset({"weights_quantized", "gate_up_fused", "qkv_fused", "kv_quantized"})

    @property
    def needs_calibration(self) -> bool:  # type: ignore[override] - only the wanda score reads activations
        return self.options.score == "wanda"

    def _plan(self, module: Module) -> tuple[list[MLPTriple | AttentionGroup], list[tuple[str, str]]]:
        """What to prune, in graph order, and (path, reason) for what is left alone."""
        o: PruneOptions = self.options
        selected, _ = select_linears(module, o)
        chosen = set(selected)
        todo: list[MLPTriple | AttentionGroup] = []
        skipped: list[tuple[str, str]] = []
        found: list[MLPTriple | AttentionGroup] = []
        if o.mlp > 0:
            mlps, miss = find_mlps(module)
            found += mlps
            skipped += miss
        if o.heads > 0:
            attns, miss = find_attentions(module)
            found += attns
            skipped += miss
        for t in found:
            spec = compression(t.linears[-1]) or {}
            out = [source_path(n) or n.name for n in t.linears if n not in chosen]
            if out:
                skipped.append((t.path, f"{', '.join(out)} not selected"))
            elif spec.get("pass") == self.name and (("groups" in spec) == isinstance(t, AttentionGroup)):
                what = "KV groups" if isinstance(t, AttentionGroup) else "channels"
                skipped.append((t.path, f"already pruned (kept {spec.get('kept')} of {spec.get('of')} {what})"))
            elif isinstance(t, AttentionGroup):
                if round(o.heads * t.n_kv) == 0 or round(o.heads * t.n_kv) >= t.n_kv:
                    skipped.append((t.path, f"heads={o.heads} of {t.n_kv} KV groups rounds to "
                                            f"{round(o.heads * t.n_kv)} removed: must leave between 1 and all"))
                else:
                    todo.append(t)
            else:
                inter = module.weight(t.down.args[1]).shape[1]
                if kept_count(inter, o.mlp, o.multiple) >= inter:
                    skipped.append((t.path, f"mlp={o.mlp} of {inter} channels rounded to a multiple of "
                                            f"{o.multiple} keeps them all"))
                else:
                    todo.append(t)
        order = {n: i for i, n in enumerate(module.graph.nodes)}
        todo.sort(key=lambda t: order[t.linears[-1]])
        return todo, skipped

    def run(self, module: Module, ctx: PassContext) -> PassResult:
        o: PruneOptions = self.options
        o.validate()
        calib = ctx.calibration
        if self.needs_calibration and calib is None:
            raise ConfigError("prune(score=wanda) needs calibration data (--calib FILE or calibration=...)")
        todo, skipped = self._plan(module)
        t0 = time.perf_counter()
        blocks: dict[str, list[MLPTriple | AttentionGroup]] = {}
        for t in todo:  # graph order, so blocks come in execution order
            blocks.setdefault(block_key(source_path(t.linears[-1]) or t.linears[-1].name), []).append(t)
        runner = None
        if self.needs_calibration and todo:
            runner = _block_runner(module, calib, {k: [t.linears[-1] for t in ts] for k, ts in blocks.items()},
                                   who=self.name)
        bar = None
        if ctx.progress and todo:
            from tqdm import tqdm

            bar = tqdm(total=len(todo), desc=f"prune {o.score}", unit="layer", leave=False)
        layers: dict[str, dict] = {}
        pruned_attn: list[AttentionGroup] = []
        kv_kept = 0
        before = after = 0
        with torch.no_grad():
            for key, items in blocks.items():
                # statistics of o's and down's inputs, both on the block before any of it is pruned
                sums = self._collect(module, calib, items, runner, key) if self.needs_calibration else {}
                for t in items:
                    last = t.linears[-1]
                    seed = ctx.seed + len(layers)
                    if isinstance(t, AttentionGroup):
                        info = self._prune_heads(module, t, sums.get(last), seed=seed)
                        pruned_attn.append(t)
                        kv_kept = info["kept"]
                    else:
                        info = self._prune_one(module, t, sums.get(last), seed=seed)
                    before += info.pop("bytes_before")
                    after += info.pop("bytes_after")
                    layers[t.path] = info
                    if bar is not None:
                        bar.update(1)
                update_lm(module, pruned_attn, kv_kept)  # the caches later calibration runs allocate follow
                module.recompile()  # the next block's statistics run on this block pruned
        if bar is not None:
            bar.close()
        seconds = time.perf_counter() - t0
        log.info("prune: %d layers (mlp=%g, heads=%g) by %s in %.1fs, skipped %d", len(layers), o.mlp, o.heads,
                 o.score, seconds, len(skipped))
        stats = {"pruned": len(layers), "score": o.score, "mlp": o.mlp, "heads": o.heads, "skipped": skipped,
                 "layers": layers, "bytes_before": before, "bytes_after": after, "seconds": seconds}
        if pruned_attn and module.lm is not None:
            stats["cache_specs"] = module.lm.cache_specs()
        if self.needs_calibration and layers:
            stats["calibration"] = repr(calib)
        return PassResult(module, bool(layers), stats)

    @staticmethod
    def _collect(module: Module, calib, items: list, runner, key: str) -> dict[fx.Node, torch.Tensor]:
        """``sum_t x_tj^2`` of each item's last linear's input (o, down) on the calibration data (float64)."""
        lasts = [t.linears[-1] for t in items]
        sums: dict[fx.Node, torch.Tensor] = {}

        def observe(node: fx.Node, x: torch.Tensor) -> None:
            sq = x.to(torch.float64).square().sum(0)
            sums[node] = sums[node] + sq if node in sums else sq

        if runner is not None and key in runner.keys:
            runner.collect(key, lasts, observe)
        else:
            calib.collect(module, lasts, observe)
        return sums

    def _prune_heads(self, module: Module, a: AttentionGroup, sumsq: torch.Tensor | None, *, seed: int) -> dict:
        o: PruneOptions = self.options
        keep = a.n_kv - round(o.heads * a.n_kv)
        scores = group_scores(module, a, score=o.score, sumsq=sumsq, seed=seed)
        groups = kept_channels(scores, keep)
        ws = [module.weight(n.args[1]) for n in a.linears]
        nbytes = sum(w.numel() * w.element_size() for w in ws)
        prune_attention(module, a, groups, _replace_weight)
        ws = [module.weight(n.args[1]) for n in a.linears]
        for lin in a.linears:
            set_compression(lin, {"pass": self.name, "score": o.score, "kept": keep, "of": a.n_kv,
                                  "groups": groups.tolist(), "layer": a.path})
        return {"kv_groups": a.n_kv, "kept": keep, "removed": a.n_kv - keep, "kept_groups": groups.tolist(),
                "heads": a.n_heads, "kept_heads": keep * (a.n_heads // a.n_kv),
                "score_kept": round(float(scores[groups].sum() / scores.sum().clamp_min(1e-30)), 6),
                "bytes_before": nbytes, "bytes_after": sum(w.numel() * w.element_size() for w in ws)}

    def _prune_one(self, module: Module, t: MLPTriple, sumsq: torch.Tensor | None, *, seed: int) -> dict:
        o: PruneOptions = self.options
        wg, wu, wd = (module.weight(n.args[1]) for n in t.linears)
        inter = wd.shape[1]
        keep = kept_count(inter, o.mlp, o.multiple)
        scores = channel_scores(wg, wu, wd, score=o.score, sumsq=sumsq, seed=seed)
        idx = kept_channels(scores, keep)
        before = sum(w.numel() * w.element_size() for w in (wg, wu, wd))
        new = {t.gate: wg[idx], t.up: wu[idx], t.down: wd[:, idx]}
        for lin in (t.gate, t.up):
            b = _bias(lin)
            if isinstance(b, fx.Node):
                _replace_weight(module, b, module.weight(b)[idx].contiguous())
        for lin, w in new.items():
            _replace_weight(module, lin.args[1], w.contiguous())
        for n in (t.gate, t.up, t.act, t.mul, t.down):  # shapes follow: [.., inter] -> [.., keep]
            module.infer_meta(n)
            if "tensor_meta" in n.meta:  # export's copy of the shape; a frontend may read it instead of "val"
                n.meta["tensor_meta"] = _extract_tensor_metadata(n.meta["val"])
        info = {"channels": inter, "kept": keep, "removed": inter - keep,
                "score_kept": round(float(scores[idx].sum() / scores.sum().clamp_min(1e-30)), 6)}
        for lin in t.linears:
            set_compression(lin, {"pass": self.name, "score": o.score, "kept": keep, "of": inter,
                                  "layer": t.path})
        after = sum(w.numel() * w.element_size() for w in new.values())
        return {**info, "bytes_before": before, "bytes_after": after}
