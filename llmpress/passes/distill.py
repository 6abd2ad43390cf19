"""``distill``: recover what lossy passes cost by training the compressed model to match the uncompressed one.

Teacher: the module as it was before the pipeline's first lossy pass (``ctx.teacher``, kept by the pass manager;
see ``manager``). Student: the current graph, run by the reference interpreter. On the calibration windows,
Adam minimizes ``KL(teacher || student)`` over the next-token distributions (``distill_train.kl_loss``, with
temperature ``tau``), training, per compressed layer:

- ``sparse`` (an ``aten.linear`` that ``sparsify`` pruned): its surviving weights under their mask ``M``
  (``M_ij = W_ij != 0``): the gradient is masked and ``W <- W * M`` after every step, so the zeros stay exactly zero
  and the pattern (N:M or unstructured) survives; nothing is attached.
- ``quantized`` (an ``llmpress::wq_linear``): a low-rank correction adapter, ``y = wq_linear(x) + (x A^T) B^T`` with
  ``A [rank, in]`` (Gaussian, std ``1/sqrt(in)``, seeded) and ``B [out, rank]`` starting at zero, so the adapted
  model starts exactly where the quantized one is. The adapter is two plain ``aten.linear`` nodes and an
  ``aten.add`` in the IR (no new op: every backend lowers them); the packed weight stays frozen (the op's autograd
  formula gives gradients to ``x`` only). The adapters add ``rank * (in + out)`` float32 weights per layer.
- ``scales`` (opt-in, alone or with ``quantized``): the float scales ``s`` of each ``wq_linear``, the integer codes
  frozen (``dL/ds[o,g] = sum_{i in g} dL/dW[o,i] (q[o,i] - z[o,g])``, the op's autograd formula); nothing is added.

Stats: what was trained (layers per kind, trained parameter count, adapter bytes), what was skipped and why, the
KL on the first and the last step's windows, and the seconds the training took. Deterministic given ``ctx.seed``,
the calibration set and the module (one thread: the test suite and the benchmarks pin it).
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.fx as fx

from ..errors import ConfigError
from ..ir.meta import compression, set_compression, source_path
from ..ir.module import Module
from .base import Pass, PassContext, PassResult, SelectOptions
from .distill_train import train_to_match
from .low_rank import attach_low_rank
from .select import Selector

__all__ = ["Distill", "DistillOptions", "TARGETS"]

log = logging.getLogger(__name__)

_LINEAR = torch.ops.aten.linear.default
TARGETS = ("sparse", "quantized", "scales")
_FLOAT = "float linear no lossy pass changed: nothing to recover"


def _wq_linear():
    import llmpress.ir.ops  # noqa: F401 - registers torch.ops.llmpress.*

    return torch.ops.llmpress.wq_linear.default


@dataclass(frozen=True)
class DistillOptions(SelectOptions):
    """``steps``: Adam steps, each over ``batch`` calibration windows cut to their first ``seq_len`` tokens (0: the
    whole window); ``lr``: learning rate of the adapters; ``sparse_lr``: of the surviving sparse weights (their
    scale is the weights', not the adapters'); ``scale_lr``: of the quantization scales; ``rank``: adapter rank;
    ``targets``: what to train (sparse | quantized | scales); ``temperature``: softmax temperature of the KL."""

    steps: int = 100
    lr: float = 1e-3
    sparse_lr: float = 1e-4
    scale_lr: float = 1e-4
    rank: int = 8
    targets: tuple[str, ...] = ("sparse", "quantized")
    batch: int = 4
    seq_len: int = 128
    temperature: float = 1.0

    def validate(self) -> None:
        where = "pass 'distill'"
        if self.steps < 1:
            raise ConfigError(f"{where}: steps={self.steps} must be at least 1")
        for key in ("lr", "sparse_lr", "scale_lr", "temperature"):
            v = getattr(self, key)
            if not (v > 0 and math.isfinite(v)):
                raise ConfigError(f"{where}: {key}={v} must be a positive number")
        if self.rank < 1:
            raise ConfigError(f"{where}: rank={self.rank} must be at least 1")
        if self.batch < 1:
            raise ConfigError(f"{where}: batch={self.batch} must be at least 1")
        if self.seq_len == 1 or self.seq_len < 0:
            raise ConfigError(f"{where}: seq_len={self.seq_len} must be 0 (whole windows) or at least 2")
        bad = [t for t in self.targets if t not in TARGETS]
        if bad or not self.targets:
            raise ConfigError(f"{where}: targets={'|'.join(self.targets)!r}: choose from {'|'.join(TARGETS)}")


class Distill(Pass):
    name: ClassVar[str] = "distill"
    Options: ClassVar[type[DistillOptions]] = DistillOptions
    needs_calibration: ClassVar[bool] = True
    needs_teacher: ClassVar[bool] = True

    def _select(self, module: Module) -> tuple[list[fx.Node], list[fx.Node], list[tuple[str, str]]]:
        """(sparse linears, quantized linears, (path, reason) skipped) among the weight linears of the graph."""
        o: DistillOptions = self.options
        sel = Selector.from_options(o)
        wq = _wq_linear()
        sparse: list[fx.Node] = []
        quant: list[fx.Node] = []
        skipped: list[tuple[str, str]] = []
        for n in module.graph.nodes:
            if n.op != "call_function" or n.target not in (_LINEAR, wq):
                continue
            spec = compression(n) or {}
            path = source_path(n) or n.name
            if spec.get("pass") == "distill":
                continue  # an adapter of an earlier distill: trained with its layer, not a layer of its own
            kind = "quantized" if n.target is wq else "sparse" if spec.get("pass") == "sparsify" else None
            if kind is None:
                skipped.append((path, _FLOAT))
                continue
            if kind not in o.targets and not (kind == "quantized" and "scales" in o.targets):
                skipped.append((path, f"{kind}, not in targets={'|'.join(o.targets)}"))
                continue
            if kind == "quantized" and spec.get("distill_rank") and "scales" not in o.targets:
                skipped.append((path, "already has a distill adapter"))
                continue
            ok, why = sel.match(source_path(n))
            if not ok:
                skipped.append((path, why))
                continue
            (quant if kind == "quantized" else sparse).append(n)
        return sparse, quant, skipped

    def run(self, module: Module, ctx: PassContext) -> PassResult:
        o: DistillOptions = self.options
        o.validate()
        sparse, quant, skipped = self._select(module)
        if not sparse and not quant:
            left_out = [why for _, why in skipped if why != _FLOAT]
            reason = (f"every compressed layer was left out ({len(left_out)}: {left_out[0]}...)" if left_out else
                      "no sparse or quantized layer to train (distill goes after sparsify / quantize / gptq / awq)")
            return PassResult(module, False, {"reason": reason, "skipped": skipped})
        calib = ctx.calibration
        if calib is None:
            raise ConfigError("distill needs calibration data (--calib FILE or calibration=...): it trains on it")
        if ctx.teacher is None:
            raise ConfigError("distill needs the uncompressed model as teacher: run it in a pipeline after the "
                              "lossy passes (the pass manager keeps the model from before the first one), or give "
                              "PassContext(teacher=...)")
        t0 = time.perf_counter()
        gen = torch.Generator().manual_seed(ctx.seed)
        leaves: dict[str, torch.Tensor] = {}
        masks: list[tuple[torch.Tensor, torch.Tensor]] = []
        layers: dict[str, dict] = {}
        for node in sparse:
            name = module.weight_name(node.args[1])
            w = module.weights()[name].detach().clone().float().requires_grad_(True)
            mask = w.detach() != 0
            leaves[name] = w
            masks.append((w, mask))
            layers[source_path(node) or node.name] = {"kind": "sparse", "weight": name,
                                                      "kept": int(mask.sum()), "sparsity": 1 - float(mask.float().mean())}
        adapters: list[tuple[fx.Node, fx.Node]] = []
        adapter_params = 0
        scale_nodes: list[fx.Node] = []
        for node in quant:
            path = source_path(node) or node.name
            layers[path] = {"kind": "quantized"}
            if "scales" in o.targets:
                sname = module.weight_name(node.args[2])
                leaves[sname] = module.weights()[sname].detach().clone().float().requires_grad_(True)
                scale_nodes.append(node.args[2])
                layers[path]["scales"] = sname
            if "quantized" not in o.targets or (compression(node) or {}).get("distill_rank"):
                continue
            out_f = node.meta["val"].shape[-1]
            in_f = node.args[0].meta["val"].shape[-1]
            r = min(o.rank, in_f, out_f)
            a = torch.randn(r, in_f, generator=gen) / math.sqrt(in_f)
            b = torch.zeros(out_f, r)
            _, a_ph, b_ph = attach_low_rank(module, node, a, b, 1.0, "distill", spec={"pass": "distill"})
            set_compression(node, {**(compression(node) or {}), "distill_rank": r})
            adapters.append((a_ph, b_ph))
            for ph in (a_ph, b_ph):
                leaves[module.weight_name(ph)] = module.weight(ph).detach().clone().requires_grad_(True)
            adapter_params += r * (in_f + out_f)
            layers[path].update({"rank": r, "adapter_params": r * (in_f + out_f)})
        if adapters:
            module.recompile()
        sparse_params = [leaves[module.weight_name(n.args[1])] for n in sparse]
        scale_params = [leaves[module.weight_name(n)] for n in scale_nodes]

        def remask() -> None:
            with torch.no_grad():
                for w, mask in masks:
                    w.mul_(mask)

        windows = [b if o.seq_len == 0 else b[:, : o.seq_len] for b in calib.batches]
        res = _train(module, ctx.teacher, calib, windows, leaves, sparse_params, scale_params, masks, remask, o, ctx)
        with torch.no_grad():
            for ph in [*(n.args[1] for n in sparse), *(p for pair in adapters for p in pair), *scale_nodes]:
                old = module.weight(ph)
                module.set_weight(ph, leaves[module.weight_name(ph)].detach().clone().to(old.dtype))
        seconds = time.perf_counter() - t0
        for node in sparse:  # the pattern survived: recompute, do not assume
            spec = dict(compression(node) or {})
            kept = module.weight(node.args[1]) != 0
            layers[source_path(node) or node.name]["sparsity_after"] = 1 - float(kept.float().mean())
            spec["distilled"] = True
            set_compression(node, spec)
        log.info("distill: %d sparse layers, %d adapters (rank %d), %d scales in %d steps, KL %.4f -> %.4f, %.1fs",
                 len(sparse), len(adapters), o.rank, len(scale_nodes), o.steps, res.loss_first, res.loss_last,
                 seconds)
        stats = {"sparse_layers": len(sparse), "adapters": len(adapters), "scales": len(scale_nodes), "rank": o.rank,
                 "trained_params": sum(int(t.numel()) for t in leaves.values()) - sum(
                     int((~m).sum()) for _, m in masks),
                 "adapter_bytes": adapter_params * 4, "steps": o.steps, "windows": len(windows),
                 "tokens_per_step": o.batch * int(windows[0].shape[1]), "kl_first": res.loss_first,
                 "kl_last": res.loss_last, "seconds": seconds, "skipped": skipped, "layers": layers,
                 "calibration": repr(calib)}
        return PassResult(module, True, stats)


def _train(module, teacher, calib, windows, leaves, sparse_params, scale_params, masks, remask, o, ctx):
    """``train_to_match`` with three parameter groups (adapters at ``lr``, sparse weights at ``sparse_lr``, scales
    at ``scale_lr``) and the sparse gradients masked, so Adam never moves a pruned weight."""
    hooks = [w.register_hook(lambda g, m=m: g * m) for w, m in masks]
    try:
        return train_to_match(
            module, teacher, windows, lambda ids: calib._inputs(module, ids), leaves, steps=o.steps, lr=o.lr,
            batch=o.batch, temperature=o.temperature, seed=ctx.seed, after_step=remask, progress=ctx.progress,
            lr_of={**{id(p): o.sparse_lr for p in sparse_params}, **{id(p): o.scale_lr for p in scale_params}})
    finally:
        for h in hooks:
            h.remove()
