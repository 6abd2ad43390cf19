"""``smoothquant``: migrate activation outliers into the weights, then int8 weights and int8 activations (W8A8).

Xiao et al. 2022, "SmoothQuant: Accurate and Efficient Post-Training Quantization for Large Language Models".
For the activation ``X [tokens, in]`` shared by the linears ``Y_l = X W_l^T`` (q/k/v after one norm, gate/up after
another), one scale per input channel j::

    s_j = max_t |X[t, j]|^alpha / max_{l, o} |W_l[o, j]|^(1 - alpha)        (both maxima clamped to >= 1e-5)
    X' = X diag(1/s)     W_l' = W_l diag(s)     so  X' W_l'^T = X W_l^T  exactly

``alpha`` (0..1) splits the quantization difficulty: 0 leaves the activations alone, 1 moves all of it to the
weights. ``1/s`` is folded into the op that produces ``X`` (found on the graph, see ``find_sites``): the RMSNorm
weight ``g`` (``x * rsqrt(var) * g / s``), or the output rows (and bias) of a preceding linear, directly or through
an elementwise gate (``down_proj(silu(gate(x)) * up(x))``: up's rows absorb ``1/s``). Every linear reading ``X``
gets ``W diag(s)``, quantized or not, so smoothing alone never changes the function (``quantize=false`` stops
there). Where the producer cannot absorb a scale (o_proj reads the attention output) the layer is quantized
unsmoothed and the reason is recorded.

Then each selected linear becomes ``llmpress::w8a8_linear`` (``llmpress.ir.ops.w8a8``): int8 weights per output
channel, ``ws[o] = max_i |W'[o, i]| / 127``, and dynamic per-token int8 activations inside the op.

Calibration: one pass over ``ctx.calibration`` records ``max_t |X[t, j]|`` of every distinct linear input (memory:
one vector per input) and keeps the first 256 tokens of each to report the output SQNR of every quantized layer.
All scales are computed from the original weights before any is folded, so the order of folding does not matter.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Callable, ClassVar

import torch
import torch.fx as fx

from ..errors import ConfigError
from ..ir.meta import set_compression, source_path
from ..ir.module import Module
from ..ir.ops import w8a8 as _w8a8_ops
from .base import Pass, PassContext, PassResult, SelectOptions
from .select import select_linears

__all__ = ["SmoothQuant", "SmoothQuantOptions", "ScaleSite", "find_sites", "WeightEdits", "replace_weight",
           "collect_inputs", "require_calibration"]

log = logging.getLogger(__name__)

_LINEAR = torch.ops.aten.linear.default
_MUL = torch.ops.aten.mul.Tensor
_W8A8 = torch.ops.llmpress.w8a8_linear.default
_SAMPLE_TOKENS = 256


# -- where a per-channel scale can go (shared with awq) ---------------------------------------------------------
@dataclass
class ScaleSite:
    """An activation ``x`` read only by linears (``consumers``), produced by an op that can absorb ``1/s``.

    ``kind``: ``"norm"`` (``target`` is the 1-D norm weight placeholder multiplied into ``x``), ``"linear"``
    (``x`` is the output of the linear ``target``) or ``"gated_linear"`` (``x = a * target(...)``, elementwise).
    """

    x: fx.Node
    consumers: list[fx.Node]
    selected: list[fx.Node]
    kind: str
    target: fx.Node
    producer: str


def _bias(linear: fx.Node):
    return linear.args[2] if len(linear.args) > 2 else linear.kwargs.get("bias")


def _private_weight(module: Module, node, shape_dims: int) -> str | None:
    """Why placeholder ``node`` cannot be rescaled on its own (None if it can)."""
    if not isinstance(node, fx.Node) or module.weight(node) is None:
        return "is not a stored weight"
    w = module.weight(node)
    if w.dim() != shape_dims or not w.is_floating_point():
        return f"is a {w.dim()}-D {w.dtype} weight, not a {shape_dims}-D float one"
    if len(node.users) != 1:
        return f"weight {module.weight_name(node)!r} is shared by {len(node.users)} nodes"
    return None


def _rescalable_linear(module: Module, lin: fx.Node) -> str | None:
    if lin.op != "call_function" or lin.target is not _LINEAR:
        return "not an aten.linear"
    why = _private_weight(module, lin.args[1], 2)
    if why:
        return f"its {why}"
    b = _bias(lin)
    if b is not None:
        why = _private_weight(module, b, 1)
        if why:
            return f"its bias {why}"
    return None


def _describe(node: fx.Node) -> str:
    path = source_path(node)
    name = getattr(node.target, "__name__", str(node.target)) if node.op == "call_function" else node.op
    return f"{name} ({path})" if path else name


def _analyse(module: Module, x: fx.Node, selected: list[fx.Node]) -> tuple[ScaleSite | None, str]:
    consumers = list(x.users)
    for u in consumers:
        if u.target is not _LINEAR or u.args[0] is not x or x in u.args[1:]:
            return None, f"its input also feeds {_describe(u)}, which cannot take the inverse scale"
        why = _rescalable_linear(module, u)
        if why:
            return None, f"its input also feeds {_describe(u)}: {why}"
    in_f = x.meta["val"].shape[-1]
    if x.op != "call_function":
        return None, "its input is a graph input"
    if x.target is _MUL and len(x.args) == 2:
        for w, other in (x.args, x.args[::-1]):
            if isinstance(w, fx.Node) and module.weight(w) is not None:
                if module.weight(w).shape != (in_f,):
                    return None, f"input comes from a mul by weight {module.weight_name(w)!r} of shape " \
                                 f"{list(module.weight(w).shape)}, not [{in_f}]"
                why = _private_weight(module, w, 1)
                if why:
                    return None, f"norm weight {why}"
                return ScaleSite(x, consumers, selected, "norm", w, _describe(x)), ""
        for lin, other in (x.args, x.args[::-1]):
            if isinstance(lin, fx.Node) and lin.target is _LINEAR and len(lin.users) == 1 \
                    and lin.meta["val"].shape == x.meta["val"].shape:
                why = _rescalable_linear(module, lin)
                if why:
                    return None, f"input comes from a gate on {_describe(lin)}: {why}"
                return ScaleSite(x, consumers, selected, "gated_linear", lin, _describe(lin)), ""
        return None, f"input comes from {_describe(x)} with no norm weight or linear operand to absorb the scale"
    if x.target is _LINEAR:
        why = _rescalable_linear(module, x)
        if why:
            return None, f"input comes from {_describe(x)}: {why}"
        return ScaleSite(x, consumers, selected, "linear", x, _describe(x)), ""
    if _is_attention_output(x):
        return None, (f"input is the attention output ({_describe(x)}), which cannot absorb a per-channel scale: "
                      "folding it into v_proj would pass through the KV cache and tie the scales of the query "
                      "heads sharing a key/value head (not implemented)")
    return None, f"input comes from {_describe(x)}, which cannot absorb a per-channel scale"


_LAYOUT = {torch.ops.aten.view.default, torch.ops.aten.reshape.default, torch.ops.aten.transpose.int,
           torch.ops.aten.permute.default, torch.ops.aten.contiguous.default, torch.ops.aten.clone.default}


def _is_attention_output(x: fx.Node) -> bool:
    """``x`` is ``probs @ values`` seen through reshapes/transposes (the input of o_proj)."""
    while x.op == "call_function" and x.target in _LAYOUT:
        x = x.args[0]
    return x.op == "call_function" and x.target in (torch.ops.aten.matmul.default, torch.ops.aten.bmm.default,
                                                    torch.ops.aten.scaled_dot_product_attention.default)


def find_sites(module: Module, selected: list[fx.Node]) -> tuple[list[ScaleSite], list[tuple[fx.Node, str]]]:
    """Group the selected linears by their input and find, on the graph, where each input's scale can be folded.

    Returns (sites, [(linear, reason)] for selected linears whose input cannot be rescaled)."""
    by_input: dict[fx.Node, list[fx.Node]] = {}
    for n in selected:
        by_input.setdefault(n.args[0], []).append(n)
    sites, not_scaled = [], []
    for x, sel in by_input.items():
        site, why = _analyse(module, x, sel)
        if site is None:
            not_scaled += [(n, why) for n in sel]
        else:
            sites.append(site)
    return sites, not_scaled


def replace_weight(module: Module, placeholder: fx.Node, tensor: torch.Tensor) -> fx.Node:
    """Point every user of ``placeholder`` at a new weight holding ``tensor``, under the same state-dict name when
    no other placeholder still reads it (clones share tensors, so stored tensors are never modified in place)."""
    name = module.weight_name(placeholder)
    tmp_name = name + ".__replaced"
    i = 0
    while tmp_name in module.weights():
        i += 1
        tmp_name = f"{name}.__replaced{i}"
    tmp = module.add_weight(tmp_name, tensor, kind="parameter" if tensor.is_floating_point() else "buffer")
    placeholder.replace_all_uses_with(tmp)
    module.remove_unused_weights(only=[placeholder])
    if name in module.weights():  # tied: another placeholder still reads the old tensor
        return tmp
    new = module.add_weight(name, tensor)
    tmp.replace_all_uses_with(new)
    module.remove_unused_weights(only=[tmp])
    return new


class WeightEdits:
    """Pending float weight changes (scale folding), applied at the end by ``commit``."""

    def __init__(self, module: Module) -> None:
        self.module = module
        self.tensors: dict[fx.Node, torch.Tensor] = {}

    def get(self, placeholder: fx.Node) -> torch.Tensor:
        return self.tensors.get(placeholder, self.module.weight(placeholder))

    def weight_of(self, linear: fx.Node) -> torch.Tensor:
        return self.get(linear.args[1])

    def fold(self, site: ScaleSite, s: torch.Tensor) -> None:
        """``x -> x / s`` at the producer, ``W -> W diag(s)`` in every consumer."""
        s = s.to(torch.float32)
        if site.kind == "norm":
            w = site.target
            self.tensors[w] = self.get(w) / s.to(self.get(w).dtype)
        else:
            lin = site.target
            self.tensors[lin.args[1]] = self.get(lin.args[1]) / s[:, None]
            b = _bias(lin)
            if b is not None:
                self.tensors[b] = self.get(b) / s
        for c in site.consumers:
            self.tensors[c.args[1]] = self.get(c.args[1]) * s[None, :]

    def commit(self) -> int:
        """Write every edited weight that is still read by the graph; returns how many were written."""
        n = 0
        for ph, t in self.tensors.items():
            if ph.graph is self.module.graph and ph.users:
                replace_weight(self.module, ph, t.contiguous())
                n += 1
        return n


# -- calibration ------------------------------------------------------------------------------------------------
def require_calibration(ctx: PassContext, pass_name: str):
    if ctx.calibration is None:
        raise ConfigError(f"{pass_name} needs calibration data (--calib FILE or calibration=...)")
    return ctx.calibration


def collect_inputs(module: Module, ctx: PassContext, nodes: list[fx.Node],
                   observer: Callable[[fx.Node, torch.Tensor], None]) -> None:
    """Run the calibration data through the graph, calling ``observer(node, x2d)`` with each listed node's input."""
    from .calibration import collect

    collect(module, nodes, observer, ctx.calibration, progress=ctx.progress)


# -- the pass -----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SmoothQuantOptions(SelectOptions):
    """``alpha`` in [0, 1]: migration strength; ``quantize``: false to smooth only (function unchanged)."""

    alpha: float = 0.5
    quantize: bool = True

    def validate(self) -> None:
        if not (0.0 <= self.alpha <= 1.0) or math.isnan(self.alpha):
            raise ConfigError(f"pass 'smoothquant': alpha={self.alpha} must be between 0 and 1")


@dataclass
class _InputStats:
    absmax: torch.Tensor | None = None
    sample: torch.Tensor | None = None
    tokens: int = 0

    def update(self, x2d: torch.Tensor) -> None:
        x2d = x2d.detach().to(torch.float32)
        m = x2d.abs().amax(dim=0)
        self.absmax = m if self.absmax is None else torch.maximum(self.absmax, m)
        if self.sample is None:
            self.sample = x2d[:_SAMPLE_TOKENS].clone()
        self.tokens += x2d.shape[0]


class SmoothQuant(Pass):
    name: ClassVar[str] = "smoothquant"
    Options: ClassVar[type[SmoothQuantOptions]] = SmoothQuantOptions
    establishes: ClassVar[frozenset[str]] = frozenset({"weights_quantized", "activations_quantized"})
    needs_calibration: ClassVar[bool] = True

    def run(self, module: Module, ctx: PassContext) -> PassResult:
        with torch.no_grad():
            return self._run(module, ctx)

    def _run(self, module: Module, ctx: PassContext) -> PassResult:
        o: SmoothQuantOptions = self.options
        o.validate()
        require_calibration(ctx, self.name)
        selected, skipped = select_linears(module, o)
        if not selected:
            return PassResult(module, False, {"quantized": 0, "smoothed": 0, "skipped": skipped})
        sites, not_scaled = find_sites(module, selected)
        inputs: dict[fx.Node, fx.Node] = {}  # one observed linear per distinct input
        for n in selected:
            inputs.setdefault(n.args[0], n)
        stats_by_input = {x: _InputStats() for x in inputs}
        rep_to_input = {rep: x for x, rep in inputs.items()}

        def observe(node: fx.Node, x2d: torch.Tensor) -> None:
            stats_by_input[rep_to_input[node]].update(x2d)

        collect_inputs(module, ctx, list(inputs.values()), observe)
        edits = WeightEdits(module)
        smoothed = {}
        input_scale: dict[fx.Node, torch.Tensor] = {}
        for site in sites:
            st = stats_by_input[site.x]
            if st.absmax is None:
                not_scaled += [(n, "never reached by the calibration data") for n in site.selected]
                continue
            w_max = torch.stack([module.weight(c.args[1]).abs().amax(dim=0) for c in site.selected]).amax(dim=0)
            s = st.absmax.clamp(min=1e-5).pow(o.alpha) / w_max.float().clamp(min=1e-5).pow(1 - o.alpha)
            s = s.clamp(min=1e-5)
            edits.fold(site, s)
            input_scale[site.x] = s
            smoothed[site.producer] = {"kind": site.kind,
                                       "consumers": [source_path(c) or c.name for c in site.consumers],
                                       "scale_min": float(s.min()), "scale_max": float(s.max()),
                                       "act_absmax_max": float(st.absmax.max())}
        layers: dict[str, dict] = {}
        before = after = 0
        dead = []
        if o.quantize:
            for n in selected:
                path = source_path(n) or n.name
                w = edits.weight_of(n).to(torch.float32)
                qw, ws = _w8a8_ops.quantize_weight(w)
                wq = module.add_weight(_fresh(module, _base(module, n) + ".qweight"), qw)
                sq = module.add_weight(_fresh(module, _base(module, n) + ".wscale"), ws)
                new = module.call(_W8A8, (n.args[0], wq, sq, _bias(n)), like=n)
                dead.append(n.args[1])
                st = stats_by_input[n.args[0]]
                sqnr = None
                if st.sample is not None:
                    # Against the smoothed float layer: the error of quantization alone.
                    xs = st.sample / input_scale[n.args[0]] if n.args[0] in input_scale else st.sample
                    ref = torch.nn.functional.linear(xs, w)
                    sqnr = _sqnr(ref, _w8a8_ops.w8a8_linear(xs, qw, ws, None))
                b0 = module.weight(n.args[1]).numel() * module.weight(n.args[1]).element_size()
                b1 = qw.numel() + ws.numel() * 4
                before, after = before + b0, after + b1
                rel = float(torch.linalg.norm(_w8a8_ops.dequantize_weight(qw, ws) - w)
                            / torch.linalg.norm(w).clamp(min=1e-30))
                info = {"pass": self.name, "method": "smoothquant w8a8", "bits": 8, "alpha": o.alpha,
                        "smoothed": n.args[0] in input_scale, "bytes_before": b0, "bytes_after": b1,
                        "rel_error": rel, "out_sqnr_db": sqnr, "source": path}
                n.replace_all_uses_with(new)
                module.erase([n])
                set_compression(new, info)
                layers[path] = {k: info[k] for k in ("smoothed", "rel_error", "out_sqnr_db")}
        written = edits.commit()
        if dead:
            module.remove_unused_weights(only=dead)
        module.recompile()
        log.info("smoothquant: smoothed %d inputs, quantized %d linears to W8A8, %d not smoothed",
                 len(smoothed), len(layers), len(not_scaled))
        stats = {"quantized": len(layers), "smoothed": len(smoothed), "weights_rescaled": written,
                 "skipped": skipped, "not_smoothed": [(source_path(n) or n.name, why) for n, why in not_scaled],
                 "bytes_before": before, "bytes_after": after, "sites": smoothed, "layers": layers,
                 "calibration_tokens": max((s.tokens for s in stats_by_input.values()), default=0)}
        return PassResult(module, bool(smoothed) or bool(layers), stats)


def _base(module: Module, linear: fx.Node) -> str:
    name = module.weight_name(linear.args[1])
    return name[: -len(".weight")] if name.endswith(".weight") else name


def _fresh(module: Module, name: str) -> str:
    names = module.weights()
    out, i = name, 0
    while out in names:
        i += 1
        out = f"{name}_{i}"
    return out


def _sqnr(ref: torch.Tensor, approx: torch.Tensor) -> float:
    noise = float((ref - approx).pow(2).sum())
    return float("inf") if noise == 0 else 10.0 * math.log10(float(ref.pow(2).sum()) / noise)
