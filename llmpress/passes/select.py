"""Selectors: which nodes a pass touches.

Structure first, names only filter (STYLE.md): ``linear_nodes`` finds every ``aten.linear`` whose weight is a stored
2-D tensor by looking at the graph (capture puts GPT-2's ``Conv1D`` ``addmm`` layers in that form:
``ir.linear_form``), and a ``Selector`` built from ``include``/``exclude`` globs then narrows that set by
source-module path.

A pattern matches a module path when it ``fnmatch``-es any run of consecutive dotted segments of it: the full path,
any dotted suffix (``down_proj`` matches ``model.layers.0.mlp.down_proj``) and any enclosing module
(``model.layers.*.mlp`` and ``mlp`` match ``model.layers.0.mlp.down_proj``, ``lm_head`` matches ``lm_head``).
So a pattern names a module and everything inside it. Exclusion wins over inclusion; an empty ``include`` includes
everything.
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass

import torch
import torch.fx as fx

from ..ir.meta import source_path
from ..ir.module import Module
from .base import SelectOptions

__all__ = ["linear_nodes", "Selector", "select_linears", "pattern_matches", "why_none_selected"]

_LINEAR = torch.ops.aten.linear.default
_ADDMM = torch.ops.aten.addmm.default


def _addmm_skip(module: Module, node: fx.Node) -> str | None:
    """Why an ``aten.addmm`` on a stored weight (a ``Conv1D``-style layer that capture left as it was) is no
    linear to the passes, or None for an addmm on computed matrices (no layer at all)."""
    from ..ir.linear_form import addmm_problem

    w = node.args[2] if len(node.args) > 2 else None
    if not isinstance(w, fx.Node) or module.weight_name(w) is None:
        return None
    why = addmm_problem(module, node) or "not put in linear form (capture does: ir.linear_form.addmm_to_linear)"
    return f"addmm on a stored weight left out of the linear form: {why}"


def _linear_problem(module: Module, node: fx.Node) -> str | None:
    """Why an ``aten.linear`` node is not a plain weight linear, or None if it is."""
    if len(node.args) < 2 or not isinstance(node.args[1], fx.Node):
        return "linear without a weight argument"
    w = module.weight(node.args[1])
    if w is None:
        return "weight is computed in the graph, not a stored weight"
    if w.dim() != 2:
        return f"weight has {w.dim()} dims, not 2"
    return None


def linear_nodes(module: Module) -> list[fx.Node]:
    """Every ``aten.linear.default`` call whose weight is a stored 2-D weight placeholder, in graph order."""
    return [n for n in module.graph.nodes
            if n.op == "call_function" and n.target is _LINEAR and _linear_problem(module, n) is None]


def pattern_matches(pattern: str, path: str) -> bool:
    """True when ``pattern`` matches ``path`` or any run of its consecutive dotted segments (see module doc)."""
    if fnmatch.fnmatchcase(path, pattern):
        return True
    segs = path.split(".")
    n = len(segs)
    return any(fnmatch.fnmatchcase(".".join(segs[i:j]), pattern) for i in range(n) for j in range(i + 1, n + 1))


@dataclass(frozen=True)
class Selector:
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()

    @classmethod
    def from_options(cls, options: SelectOptions) -> "Selector":
        return cls(tuple(options.include), tuple(options.exclude))

    def match(self, path: str) -> tuple[bool, str]:
        """(selected?, why) for a source-module path."""
        for pat in self.exclude:
            if pattern_matches(pat, path):
                return False, f"excluded by {pat!r}"
        if self.include:
            for pat in self.include:
                if pattern_matches(pat, path):
                    return True, f"included by {pat!r}"
            return False, f"not included by {'|'.join(self.include)!r}"
        return True, "selected"


def why_none_selected(module: Module, skipped: list[tuple[str, str]], pass_name: str) -> str:
    """Why a pass over float ``aten.linear`` layers found none to work on: one sentence for its stats and the log.

    Already quantized layers (``llmpress::wq_linear``) are named with the pass that quantized them, since the usual
    cause is the order of the pipeline."""
    from ..ir.meta import compression

    quantized = [n for n in module.graph.nodes if n.op == "call_function"
                 and getattr(n.target, "name", lambda: "")() == "llmpress::wq_linear"]
    if quantized and not any(n.op == "call_function" and n.target is _LINEAR for n in module.graph.nodes):
        by = sorted({str((compression(n) or {}).get("pass") or "an earlier pass") for n in quantized})
        return (f"the linears are already quantized ({len(quantized)} llmpress::wq_linear, by {', '.join(by)}); "
                f"put {pass_name} before {' and '.join(by)}")
    if skipped:
        reasons = sorted({why for _, why in skipped})
        return f"every linear was left out ({len(skipped)}: {'; '.join(reasons[:3])}{'...' if len(reasons) > 3 else ''})"
    return "the graph has no linear layers with stored weights"


def select_linears(module: Module, options: SelectOptions) -> tuple[list[fx.Node], list[tuple[str, str]]]:
    """Weight linears the options select, and (source path, reason) for every linear left out.

    Left out are linears whose weight is not a stored 2-D tensor (structure), those the globs filter out, and
    ``addmm`` layers on stored weights that are not in the IR's linear form (``ir.linear_form``: capture puts
    GPT-2's ``Conv1D`` in it; one left as addmm is named here, never passed over in silence).
    """
    sel = Selector.from_options(options)
    selected: list[fx.Node] = []
    skipped: list[tuple[str, str]] = []
    for n in module.graph.nodes:
        if n.op == "call_function" and n.target is _ADDMM:
            why = _addmm_skip(module, n)
            if why is not None:
                skipped.append((source_path(n) or n.name, why))
            continue
        if n.op != "call_function" or n.target is not _LINEAR:
            continue
        path = source_path(n) or n.name
        problem = _linear_problem(module, n)
        if problem is not None:
            skipped.append((path, problem))
            continue
        ok, why = sel.match(source_path(n))
        if ok:
            selected.append(n)
        else:
            skipped.append((path, why))
    return selected, skipped
