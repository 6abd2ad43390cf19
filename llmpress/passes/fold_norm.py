"""``fold_norm``: fold a norm's affine weight into the input columns of the linears that read it.

Match (structure first), a norm whose output is read only as the input of ``aten.linear`` nodes with stored,
private 2-D float weights:

- RMSNorm as captured: ``y = g * n`` (``aten.mul``, either operand order) with ``g`` a stored 1-D float weight of
  shape ``[d]`` and ``n = x * rsqrt(...)`` (a ``mul`` with an ``rsqrt`` operand);
- LayerNorm: ``aten.layer_norm(x, [d], g, beta, eps)`` with an affine weight ``g`` (and optional ``beta``).

Rewrite, for every reading linear ``z = y W^T + b`` (``W: [o, d]``)::

    (n * g) W^T + b  ==  n (W diag(g))^T + b                  W' = W * g[None, :]
    (n * g + beta) W^T + b  ==  n (W diag(g))^T + (b + W beta)   (LayerNorm with a bias)

then the RMSNorm's ``mul`` by ``g`` is removed (the linears read ``n``) and a LayerNorm loses its affine
arguments. Each product is the same up to fp32 rounding (``(n g) w`` vs ``n (g w)``): exact. Folding must reach
*every* reader, so a norm also read by something else (an attention score, a residual add, a quantized linear) is
a recorded near miss, and so is a reading linear whose weight is shared: the final norm before an ``lm_head`` tied to
the embedding would change the embedding too (``untie=true`` folds into a private copy of ``lm_head``'s weight,
one extra ``[vocab, d]`` tensor). ``include``/``exclude`` globs filter by the norm's source path
(``exclude=model.norm``). Near misses are in ``stats["skipped"]``. Run it before a quantizer (``forbids``
``weights_quantized``) and not before ``awq``/``smoothquant``, which fold their scales into the norm weights this
pass removes (they forbid ``norms_folded``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.fx as fx

from ..ir.meta import compression, source_path
from ..ir.module import Module
from .base import Pass, PassContext, PassResult, SelectOptions
from .scale_folding import linear_bias, replace_weight
from .select import Selector

__all__ = ["FoldNorm"]

_LINEAR = torch.ops.aten.linear.default
_MUL = torch.ops.aten.mul.Tensor
_RSQRT = torch.ops.aten.rsqrt.default
_LAYER_NORM = torch.ops.aten.layer_norm.default


@dataclass(frozen=True)
class FoldNormOptions(SelectOptions):
    untie: bool = False  # fold into a private copy of a linear weight shared with another node (tied lm_head)


def _is_wq(node: fx.Node) -> bool:
    return node.op == "call_function" and getattr(node.target, "name", lambda: "")() == "llmpress::wq_linear"


def _float_weight(module: Module, node, dims: int, shape: tuple | None = None) -> bool:
    t = module.weight(node) if isinstance(node, fx.Node) else None
    return t is not None and t.dim() == dims and t.is_floating_point() and (shape is None or tuple(t.shape) == shape)


def _norm_sites(module: Module) -> list[tuple[fx.Node, str, fx.Node, fx.Node | None]]:
    """``(y, kind, g, beta)`` for every affine norm output ``y`` in graph order (``kind``: rms / layer_norm)."""
    out = []
    for y in module.graph.nodes:
        if y.op != "call_function" or "val" not in y.meta or not isinstance(y.meta["val"], torch.Tensor):
            continue
        d = y.meta["val"].shape[-1] if y.meta["val"].dim() else None
        if y.target is _MUL and len(y.args) == 2:
            for g, n in (y.args, y.args[::-1]):
                if _float_weight(module, g, 1, (d,)) and isinstance(n, fx.Node) and n.op == "call_function" \
                        and n.target is _MUL and any(isinstance(a, fx.Node) and a.target is _RSQRT for a in n.args):
                    out.append((y, "rms", g, None))
                    break
        elif y.target is _LAYER_NORM and len(y.args) > 2 and y.args[2] is not None:
            beta = y.args[3] if len(y.args) > 3 else None
            if _float_weight(module, y.args[2], 1, (d,)) and (beta is None or _float_weight(module, beta, 1, (d,))):
                out.append((y, "layer_norm", y.args[2], beta))
    return out


def _other_readers(module: Module, w_node: fx.Node, lin: fx.Node) -> list[fx.Node]:
    """Nodes besides ``lin`` that read the weight behind ``w_node`` (a tied weight may back several placeholders)."""
    name = module.weight_name(w_node)
    phs = [p for p in module.graph.nodes if p.op == "placeholder" and module.weight_name(p) == name] or [w_node]
    return [u for p in phs for u in p.users if u is not lin]


def _describe(node: fx.Node) -> str:
    name = getattr(node.target, "__name__", str(node.target)) if node.op == "call_function" else node.op
    path = source_path(node)
    return f"{name} ({path})" if path else name


class FoldNorm(Pass):
    name: ClassVar[str] = "fold_norm"
    Options = FoldNormOptions
    establishes: ClassVar[frozenset[str]] = frozenset({"norms_folded"})
    forbids: ClassVar[frozenset[str]] = frozenset({"weights_quantized"})  # it edits float linear weights only
    exact: ClassVar[bool] = True

    def run(self, module: Module, ctx: PassContext) -> PassResult:
        opts: FoldNormOptions = self.options  # type: ignore[assignment]
        sel = Selector.from_options(opts)
        folded: list[str] = []
        skipped: list[tuple[str, str]] = []
        quantized: set[str] = set()
        untied: list[str] = []
        for y, kind, g, beta in _norm_sites(module):
            path = source_path(y) or y.name
            ok, why = sel.match(path)
            if not ok:
                skipped.append((path, why))
                continue
            why = self._why_not(module, y, opts.untie, quantized)
            if why:
                skipped.append((path, why))
                continue
            gv = module.weight(g)
            bv = module.weight(beta) if beta is not None else None
            for lin in list(y.users):
                w_node = lin.args[1]
                w = module.weight(w_node)
                new_w = (w * gv.to(w.dtype)[None, :]).contiguous()
                b = linear_bias(lin)
                new_b = None
                if bv is not None:
                    shift = (w.double() @ bv.double()).to(w.dtype)
                    new_b = shift if b is None else (module.weight(b) + shift)
                if _other_readers(module, w_node, lin):  # untie=true (checked above): a private copy for it
                    lp = source_path(lin) or lin.name
                    copy = module.add_weight(module.fresh_weight_name(f"{lp}.weight"), new_w, kind="parameter")
                    lin.replace_input_with(w_node, copy)
                    untied.append(lp)
                else:
                    replace_weight(module, w_node, new_w)
                if new_b is not None:
                    if b is None:
                        lp = source_path(lin) or lin.name
                        b_node = module.add_weight(module.fresh_weight_name(f"{lp}.bias"), new_b, kind="parameter")
                        lin.args = (lin.args[0], lin.args[1], b_node)
                    else:
                        replace_weight(module, b, new_b)
            if kind == "rms":
                n = y.args[1] if y.args[0] is g else y.args[0]
                y.replace_all_uses_with(n)
                module.graph.erase_node(y)
            else:
                y.args = (y.args[0], y.args[1], None, None, *y.args[4:])
            module.remove_unused_weights(only=[g, *([beta] if beta is not None else [])])
            folded.append(path)
        if folded:
            module.recompile()
        stats = {"folded": len(folded), "norms": folded, "skipped": skipped}
        if untied:
            stats["untied"] = untied
        if not folded:
            stats = {"reason": self._why_nothing(module, skipped, quantized), **stats}
        return PassResult(module, bool(folded), stats)

    @staticmethod
    def _why_not(module: Module, y: fx.Node, untie: bool, quantized: set[str]) -> str | None:
        """Why the norm output ``y`` cannot be folded into its readers (None if it can)."""
        if not y.users:
            return "its output is not read"
        for u in y.users:
            if _is_wq(u):
                by = str((compression(u) or {}).get("pass") or "an earlier pass")
                quantized.add(by)
                return f"it feeds {source_path(u)}, already quantized (by {by}); put fold_norm before {by}"
            if u.op != "call_function" or u.target is not _LINEAR or u.args[0] is not y or y in u.args[1:]:
                return f"its output also feeds {_describe(u)}, which is not a linear's input"
            if not _float_weight(module, u.args[1], 2):
                return f"its output feeds {_describe(u)}, whose weight is not a stored 2-D float tensor"
            b = linear_bias(u)
            if b is not None and (not _float_weight(module, b, 1) or len(b.users) > 1):
                return f"its output feeds {_describe(u)}, whose bias is not a private stored float tensor"
            others = sorted({source_path(o) or o.name for o in _other_readers(module, u.args[1], u)})
            if others and not untie:
                return (f"{source_path(u)}'s weight {module.weight_name(u.args[1])!r} is shared with "
                        f"{', '.join(others)} (tied embeddings): folding would change that too "
                        "(untie=true folds into a private copy)")
        return None

    @staticmethod
    def _why_nothing(module: Module, skipped: list[tuple[str, str]], quantized: set[str]) -> str:
        if quantized:
            q = sorted(quantized)
            return f"the linears after the norms are already quantized (by {', '.join(q)}); put fold_norm before " \
                   f"{' and '.join(q)}"
        if skipped:
            return f"no norm qualified ({len(skipped)} skipped, see 'skipped')"
        return "no norm with an affine weight (g * x * rsqrt(...) or layer_norm with a weight) in the graph"
