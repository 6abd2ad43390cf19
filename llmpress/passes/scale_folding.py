"""Folding a per-channel scale into the op that produces a linear's input: the graph surgery behind ``smoothquant``
and ``awq`` (not a pass; both passes call it).

For an activation ``X [tokens, in]`` read only by linears ``Y_l = X W_l^T + b_l`` and a scale ``s > 0`` per input
channel ``j``::

    Y_l = (X diag(1/s)) (W_l diag(s))^T + b_l        exactly, for any s

so every consumer gets ``W_l' = W_l diag(s)`` (column ``j`` times ``s_j``) and ``1/s`` is folded into the producer
of ``X``, found on the graph (``find_sites``; ``ScaleSite.kind``):

- ``"norm"``: ``X = n(x) * g`` with a 1-D weight ``g`` (RMSNorm: ``n(x) = x * rsqrt(mean(x^2) + eps)``):
  ``g' = g / s``, since ``n(x) * (g / s) = X diag(1/s)``.
- ``"linear"``: ``X = Z A^T + c``: ``A' = diag(1/s) A`` (row ``j`` divided by ``s_j``), ``c' = c / s``.
- ``"gated_linear"``: ``X = a * (Z A^T + c)`` elementwise (``silu(gate(x)) * up(x)``): the same edit to ``A`` and
  ``c``, since ``a * (y / s) = (a * y) / s``.

``find_sites`` refuses a site, recording the reason, for example when ``X`` also feeds anything but a linear's
input, when a weight to edit is shared with another node (tied embeddings: the edit would leak), or when the
producer cannot absorb a per-channel scale at all (o_proj reads the attention output; folding into v_proj would
pass through the KV cache and tie the scales of query heads sharing a key/value head).

``WeightEdits`` keeps the edited tensors until ``commit``: a linear can be both a consumer of one site (columns
times ``s1``) and the producer of the next (rows divided by ``s2``), and ``diag(1/s2) W diag(s1)`` does not depend
on the order, so every scale can be computed from the original weights first. Stored tensors are never changed in
place (``replace_weight`` adds new ones). Both passes compute ``s`` from per-channel statistics of ``X`` over the
calibration data, collected with ``collect_input_stats``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol, TypeVar

import torch
import torch.fx as fx

from ..errors import ConfigError
from ..ir.meta import source_path
from ..ir.module import Module
from .base import PassContext

__all__ = ["ScaleSite", "find_sites", "WeightEdits", "replace_weight", "linear_bias", "InputStats",
           "collect_input_stats", "require_calibration"]

_LINEAR = torch.ops.aten.linear.default
_MUL = torch.ops.aten.mul.Tensor


# -- where a per-channel scale can go ----------------------------------------------------------------------------
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


def linear_bias(linear: fx.Node):
    """The bias operand of an ``aten.linear`` node (a node or None)."""
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
    b = linear_bias(lin)
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
    while tmp_name in module.stored_weights():
        i += 1
        tmp_name = f"{name}.__replaced{i}"
    tmp = module.add_weight(tmp_name, tensor, kind="parameter" if tensor.is_floating_point() else "buffer")
    placeholder.replace_all_uses_with(tmp)
    module.remove_unused_weights(only=[placeholder])
    if name in module.stored_weights():  # tied: another placeholder still reads the old tensor
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
            b = linear_bias(lin)
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


# -- the calibration statistics the scales are computed from ----------------------------------------------------
def require_calibration(ctx: PassContext, pass_name: str):
    if ctx.calibration is None:
        raise ConfigError(f"{pass_name} needs calibration data (--calib FILE or calibration=...)")
    return ctx.calibration


class InputStats(Protocol):
    """Running statistics of one linear input, fed ``[tokens, in]`` batches of it."""

    def update(self, x2d: torch.Tensor) -> None: ...


_S = TypeVar("_S", bound=InputStats)


def collect_input_stats(module: Module, ctx: PassContext, linears: list[fx.Node], new_stats: Callable[[], _S]
                        ) -> tuple[dict[fx.Node, _S], dict[fx.Node, fx.Node]]:
    """Run the calibration data through the graph once, feeding each distinct input of ``linears`` to its own
    ``new_stats()`` (linears sharing an input are observed once, through the first of them).

    Returns (stats by input node, the observed linear by input node)."""
    from .calibration import collect

    reps: dict[fx.Node, fx.Node] = {}
    for n in linears:
        reps.setdefault(n.args[0], n)
    stats = {x: new_stats() for x in reps}
    input_of = {rep: x for x, rep in reps.items()}

    def observe(node: fx.Node, x2d: torch.Tensor) -> None:
        stats[input_of[node]].update(x2d)

    collect(module, list(reps.values()), observe, ctx.calibration, progress=ctx.progress)
    return stats, reps
