"""``dce``: dead code elimination.

Removes ``call_function`` nodes whose results nobody uses and that have no side effects (FX's ``is_impure``: not
mutating ops, not the output; random ops count as pure here, since dropping an unused random draw changes no
output), repeating until nothing more dies, then drops weights nothing reads any more
(``Module.remove_unused_weights``). User inputs stay: they are the calling convention.
"""
from __future__ import annotations

from typing import ClassVar

import torch.fx as fx

from ..ir.module import Module
from .base import NoOptions, Pass, PassContext, PassResult

__all__ = ["DeadCodeElimination", "erase_dead_nodes"]


def erase_dead_nodes(module: Module, candidates: list[fx.Node] | None = None) -> int:
    """Erase unused side-effect-free ``call_function`` nodes (only among ``candidates`` when given); return how
    many. Walks the graph backwards so a chain of dead nodes goes in one sweep."""
    allowed = None if candidates is None else set(candidates)
    removed = 0
    for node in reversed(list(module.graph.nodes)):
        if node.op != "call_function" or node.users:
            continue
        if allowed is not None and node not in allowed:
            continue
        if node.is_impure(impure_random=False):
            continue
        module.graph.erase_node(node)
        removed += 1
    return removed


class DeadCodeElimination(Pass):
    name: ClassVar[str] = "dce"
    Options = NoOptions
    exact: ClassVar[bool] = True

    def run(self, module: Module, ctx: PassContext) -> PassResult:
        removed = erase_dead_nodes(module)
        weights = module.remove_unused_weights()
        if removed or weights:
            module.recompile()
        return PassResult(module, bool(removed or weights), {"removed_nodes": removed, "removed_weights": weights})
