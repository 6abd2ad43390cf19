"""Per-layer sensitivity: how far the model's output moves when one linear alone is compressed.

A candidate compression ``C`` is pipeline text of weight-only passes (``quantize(bits=3,group=128)``,
``gptq(...)``, ``sparsify(...)``; its own ``include``/``exclude`` choose the layers). ``C`` runs once on a clone of
the module (weights are shared, nothing is copied); every linear it rewrote is a measured layer ``l``, with its
*effective weight* under ``C``: ``W_hat = (q - z) * s`` for an ``llmpress::wq_linear`` (the dequantization its
reference kernel computes), the edited weight for an ``aten.linear`` (pruning). Then, for each ``l`` alone, the
uncompressed graph runs on calibration windows with ``W_l`` swapped for ``W_hat_l`` and every other weight as it
was, and is compared with the uncompressed outputs:

- ``kl``: mean over predicted tokens t of ``KL(p_t || q_t) = sum_v p_t(v) (log p_t(v) - log q_t(v))``, ``p`` the
  softmax of the uncompressed logits, ``q`` with layer ``l`` compressed (nats per token, >= 0);
- ``ppl``: ``NLL_l - NLL_0``, the change of the mean next-token negative log-likelihood on the windows (nats per
  token; ``exp`` of it is the perplexity ratio ``ppl_l / ppl_0``).

Bytes are counted as ``llmpress.eval.size`` counts them (every stored tensor the layer's op reads: packed codes,
float32 scales, uint8 zero points, bias), before and after ``C``. Calibrated candidates (``gptq``) run on the whole
selection at once, as they would in a pipeline, and each layer's result is then measured alone. Candidates that
change weights outside the linears they compress (``awq``, ``smoothquant`` fold scales into norms) or turn a linear
into more than one op (``factorize``) cannot be measured one layer at a time and are refused with the reason.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal, Sequence

import torch
import torch.fx as fx
from torch.export.graph_signature import InputKind

from ..errors import ConfigError
from ..ir.meta import source_path
from ..ir.module import Module
from .base import PassContext
from .calibration import Calibration
from .select import linear_nodes

__all__ = ["LayerSensitivity", "CompressedLayer", "compress_layers", "SensitivityProbe", "sensitivity",
           "METRICS"]

log = logging.getLogger(__name__)

Metric = Literal["kl", "ppl"]
METRICS = ("kl", "ppl")

_LINEAR = torch.ops.aten.linear.default


@dataclass(frozen=True)
class CompressedLayer:
    """One linear as candidate ``C`` leaves it: the base graph's node, its effective weight and its bytes."""

    path: str
    node: fx.Node  # the aten.linear of the uncompressed module
    weight: torch.Tensor  # W_hat, float32 [out, in]
    numel: int  # parameters of the uncompressed weight
    bytes_before: int
    bytes_after: int
    op: str  # what C made of it (llmpress::wq_linear, aten::linear)

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.bytes_after / self.numel


@dataclass(frozen=True)
class LayerSensitivity:
    """Sensitivity of one layer to one candidate: ``score`` in nats per token (see the module docstring)."""

    path: str
    candidate: str
    metric: str
    score: float
    bytes_before: int
    bytes_after: int
    bits_per_weight: float

    def to_json(self) -> dict:
        return {"path": self.path, "candidate": self.candidate, "metric": self.metric, "score": self.score,
                "bytes_before": self.bytes_before, "bytes_after": self.bytes_after,
                "bits_per_weight": round(self.bits_per_weight, 4)}


def _op_name(node: fx.Node) -> str:
    return getattr(node.target, "name", lambda: str(node.target))()


def _weight_inputs(module: Module, node: fx.Node) -> list[str]:
    return [name for a in node.all_input_nodes if (name := module.weight_name(a))]


def _effective_weight(module: Module, node: fx.Node) -> torch.Tensor:
    """The dense float32 weight ``node`` multiplies by (a linear's weight, a weight-only wq_linear dequantized)."""
    from ..ir.ops.wq_linear import dequantize

    if node.target is _LINEAR:
        return module.weight(node.args[1]).detach().float()
    _, qweight, scales, zeros, _bias, bits, group, *act = node.args
    if act and act[0]:
        raise ConfigError(f"layer {source_path(node)!r} quantizes its activations too (act_bits={act[0]}): "
                          "sensitivity swaps a weight, so it measures weight-only compression")
    return dequantize(module.weight(qweight), module.weight(scales),
                      None if zeros is None else module.weight(zeros), bits, group)


def compress_layers(module: Module, candidate: str, ctx: PassContext) -> tuple[list[CompressedLayer], list[str]]:
    """Run ``candidate`` on a clone of ``module``; return every linear it rewrote with its effective weight and
    bytes, and the paths of linears it left as they were. Raises ``ConfigError`` (naming the pass and the layer or
    weight) when the candidate does more than rewrite linears one by one."""
    from ..eval.size import weight_bytes_by_name
    from ..preflight import check_layers
    from .manager import check_order, properties_of
    from .pipeline import build

    passes = build(candidate)
    if not passes:
        raise ConfigError("the candidate compression is an empty pipeline")
    check_order(passes, properties_of(module))
    missing = [p.name for p in passes if p.needs_calibration]
    if missing and ctx.calibration is None:
        raise ConfigError(f"candidate {candidate!r}: {', '.join(missing)} needs calibration data")
    check_layers(passes, module)  # a group that does not fit is reported before any layer is compressed
    clone = module.clone()
    for p in passes:
        clone = p.run(clone, PassContext(calibration=ctx.calibration, seed=ctx.seed, target=ctx.target,
                                         progress=False)).module
    base_w, new_w = module.weights(), clone.weights()
    bases = {}
    for n in linear_nodes(module):
        bases.setdefault(source_path(n) or n.name, []).append(n)
    linear_weights = {module.weight_name(n.args[1]) for ns in bases.values() for n in ns}
    changed = sorted(k for k, t in base_w.items() if k not in linear_weights and new_w.get(k) is not t)
    if changed:
        raise ConfigError(f"candidate {candidate!r} changes {len(changed)} weight(s) outside the linears it "
                          f"compresses ({', '.join(changed[:3])}{'...' if len(changed) > 3 else ''}): sensitivity "
                          "measures one layer at a time, so it takes weight-only passes (quantize, gptq, sparsify)")
    by_path: dict[str, list[fx.Node]] = {}
    for n in clone.graph.nodes:
        if n.op == "call_function" and _weight_inputs(clone, n):
            by_path.setdefault(source_path(n) or n.name, []).append(n)
    sizes_before, sizes_after = weight_bytes_by_name(module), weight_bytes_by_name(clone)
    layers, unchanged = [], []
    for path, nodes in bases.items():
        now = by_path.get(path, [])
        if len(nodes) != 1:
            raise ConfigError(f"layer {path!r} is called {len(nodes)} times: sensitivity needs one node per layer")
        base = nodes[0]
        if len(now) != 1 or now[0].target not in (_LINEAR, torch.ops.llmpress.wq_linear.default):
            ops = ", ".join(_op_name(n) for n in now) or "ops that no longer carry its name"
            raise ConfigError(f"candidate {candidate!r} turned layer {path!r} into {ops}: sensitivity measures "
                              "rewrites of a linear into one linear or llmpress::wq_linear")
        new = now[0]
        if new.target is _LINEAR and clone.weight(new.args[1]) is module.weight(base.args[1]):
            unchanged.append(path)
            continue
        layers.append(CompressedLayer(
            path=path, node=base, weight=_effective_weight(clone, new), numel=module.weight(base.args[1]).numel(),
            bytes_before=sum(sizes_before.get(w, 0) for w in _weight_inputs(module, base)),
            bytes_after=sum(sizes_after.get(w, 0) for w in _weight_inputs(clone, new)), op=_op_name(new)))
    return layers, unchanged


class SensitivityProbe:
    """The uncompressed module's outputs on ``samples`` calibration windows (of at most ``seq_len`` tokens; 0:
    whole windows), and ``score(node, weight)``: the metric with that one linear's weight swapped.

    Nothing before a linear depends on its weight, so the reference run keeps, at every ``aten.linear``, the values
    that are still to be read after it (residual stream, RoPE tables, mask, caches written so far, weights), and a
    score replays the graph from that linear on (an FX interpreter over the same nodes): the last layers cost a
    fraction of a forward, the first a whole one. Memory: about one forward's activations per window."""

    def __init__(self, module: Module, calibration: Calibration, *, metric: Metric = "kl", samples: int = 4,
                 seq_len: int = 128) -> None:
        if metric not in METRICS:
            raise ConfigError(f"sensitivity metric {metric!r} is not one of {', '.join(METRICS)}")
        if samples < 1:
            raise ConfigError(f"sensitivity needs samples >= 1, got {samples}")
        if seq_len != 0 and seq_len < 2:
            raise ConfigError(f"sensitivity needs seq_len >= 2 (or 0 for whole windows), got {seq_len}")
        if metric == "ppl" and module.lm is None:
            raise ConfigError("metric=ppl needs a language model (token ids in, logits out); use metric=kl")
        self.module, self.calibration, self.metric = module, calibration, metric
        self.batches = [b[:, :seq_len] if seq_len else b for b in calibration.batches[:samples]]
        self.tokens = sum(int(b.shape[1]) - (metric == "ppl") for b in self.batches)
        self.order = list(module.graph.nodes)
        self._pos = {n: i for i, n in enumerate(self.order)}
        last = {n: max([self._pos[u] for u in n.users], default=i) for i, n in enumerate(self.order)}
        at = {i: n for i, n in enumerate(self.order) if n.op == "call_function" and n.target is _LINEAR}
        self._snapshots: dict[fx.Node, list[dict]] = {n: [] for n in at.values()}
        self.reference = []
        with torch.no_grad():
            for b in self.batches:
                env = self._bind(b)
                self.reference.append(torch.log_softmax(self._run(env, 0, snap=(at, last)), -1))
        self.base_nll = self._nll(self.reference) if metric == "ppl" else 0.0

    def _bind(self, batch: torch.Tensor) -> dict:
        weights = self.module.weights()
        user = iter(self.calibration._inputs(self.module, batch))
        placeholders = [n for n in self.order if n.op == "placeholder"]
        return {n: next(user) if s.kind == InputKind.USER_INPUT else weights[s.target]
                for n, s in zip(placeholders, self.module.signature.input_specs)}

    def _run(self, env: dict, start: int, *, snap: tuple | None = None) -> torch.Tensor:
        """Run nodes ``start..`` on ``env``; return the first output as float32 ``[tokens, vocab]``. With ``snap``
        = (linears by position, last use of each node), keep the live values at each linear."""
        interp = fx.Interpreter(self.module.graph_module)
        interp.extra_traceback = False
        interp.env = env
        for i in range(start, len(self.order)):
            n = self.order[i]
            if snap is not None and i in snap[0]:
                self._snapshots[snap[0][i]].append({k: v for k, v in env.items() if snap[1][k] >= i})
            if n.op == "placeholder":
                continue
            if n.op == "output":
                out = n.args[0]
                out = env[out[0] if isinstance(out, (tuple, list)) else out]
                return out.reshape(-1, out.shape[-1]).float()
            env[n] = interp.run_node(n)
        raise ConfigError("the graph has no output")

    def _nll(self, logprobs: Sequence[torch.Tensor]) -> float:
        total = sum(float(-lp[:-1].gather(1, b[0, 1:, None]).sum()) for lp, b in zip(logprobs, self.batches))
        return total / self.tokens

    def shared(self, node: fx.Node) -> int:
        """How many ops read ``node``'s weight (more than 1: tied, and a swap would change the others too)."""
        return len(node.args[1].users)

    def score(self, node: fx.Node, weight: torch.Tensor) -> float:
        """The metric with ``node``'s weight replaced by ``weight`` (see the module docstring)."""
        if node not in self._snapshots:
            raise ConfigError(f"{node.name} is not an aten.linear of the module this probe ran")
        logprobs = []
        with torch.no_grad():
            for snapshot in self._snapshots[node]:
                env = dict(snapshot)
                env[node.args[1]] = weight
                logprobs.append(torch.log_softmax(self._run(env, self._pos[node]), -1))
        if self.metric == "ppl":
            return self._nll(logprobs) - self.base_nll
        kl = sum(float((ref.exp() * (ref - lp)).sum()) for ref, lp in zip(self.reference, logprobs))
        return kl / self.tokens


def sensitivity(module: Module, candidate: str, calibration: Calibration, *, metric: Metric = "kl",
                samples: int = 4, seq_len: int = 128, progress: bool = True, probe: SensitivityProbe | None = None,
                seed: int = 0) -> tuple[list[LayerSensitivity], list[tuple[str, str]]]:
    """Score every linear ``candidate`` compresses, one at a time; returns (rows in graph order, (path, reason) of
    layers not measured). ``probe`` reuses the reference outputs of an earlier call on the same module."""
    if calibration is None:
        raise ConfigError("sensitivity needs calibration data (--calib FILE or calibration=...)")
    probe = probe or SensitivityProbe(module, calibration, metric=metric, samples=samples, seq_len=seq_len)
    layers, unchanged = compress_layers(module, candidate, PassContext(calibration=calibration, seed=seed))
    skipped = [(p, "not compressed by the candidate") for p in unchanged]
    rows = []
    it = layers
    if progress and layers:
        from tqdm import tqdm

        it = tqdm(layers, desc=f"sensitivity {candidate}", unit="layer", leave=False)
    for layer in it:
        if probe.shared(layer.node) > 1:
            skipped.append((layer.path, f"its weight is shared with {probe.shared(layer.node) - 1} other op(s)"))
            continue
        rows.append(LayerSensitivity(layer.path, candidate, probe.metric, probe.score(layer.node, layer.weight),
                                     layer.bytes_before, layer.bytes_after, layer.bits_per_weight))
    log.info("sensitivity of %d layers to %s (%s on %d tokens), %d not measured", len(rows), candidate,
             probe.metric, probe.tokens, len(skipped))
    return rows, skipped
