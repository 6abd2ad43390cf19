"""``fold_constants``: evaluate at compile time what does not depend on the user's inputs.

A node is *constant* when it is a deterministic, side-effect-free ATen op (or ``getitem``) whose inputs are only
weights, literals and other constant nodes, and whose result has a static shape. Excluded on purpose:
- random ops (ATen tag ``nondeterministic_seeded``: ``randn``, ``bernoulli``, ``dropout``...): a fresh draw per run
  is their meaning;
- ``sym_size`` and anything with a symbolic shape: the value depends on the input's length;
- ops in the ``llmpress`` namespace: compressed ops stay explicit in the IR (backends pattern-match them), and
  evaluating e.g. a dequantize would store the full-precision weight again.

Constant nodes form connected groups (linked through the weights they read). A group is replaced by new buffers,
one per *root* (a constant node used by a non-constant node or the output), if it does not grow the model:

    bytes(new buffers) <= bytes(weights only this group reads, which are then dropped)

so ``transpose(W)`` replaces ``W`` when nothing else reads ``W``, but is left alone when ``W`` has other users (it
would store ``W`` twice). Groups that read no weight at all (``arange(32)``, ``full(...)``) are folded when their
buffers total at most ``max_literal_bytes``. Folding computes the same ATen ops on the same values the interpreter
would, so the folded values are bit-identical; they are stored contiguous, so a consumer that got a strided view
before (``x @ W.t()``) may now take another kernel and sum in another order: outputs agree to fp32 rounding.
"""
from __future__ import annotations

import operator
from collections import Counter
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.fx as fx

from ..errors import ConfigError
from ..ir.meta import source_path
from ..ir.module import Module
from .base import Pass, PassContext, PassOptions, PassResult
from .dce import erase_dead_nodes

__all__ = ["FoldConstants"]


@dataclass(frozen=True)
class FoldOptions(PassOptions):
    max_literal_bytes: int = 1 << 20  # largest total of buffers made from literals alone (no weight read)

    def validate(self) -> None:
        if self.max_literal_bytes < 0:
            raise ConfigError(f"fold_constants: option 'max_literal_bytes' must be >= 0, got {self.max_literal_bytes}")


def _static_tensors(val: Any) -> bool | None:
    """True: tensor(s) with static shapes; False: some symbolic dim; None: not tensors at all."""
    vals = list(val) if isinstance(val, (list, tuple)) else [val]
    if not vals or not all(isinstance(v, torch.Tensor) for v in vals):
        return None
    return all(not isinstance(d, torch.SymInt) for v in vals for d in v.shape)


def _nbytes(val: Any) -> int:
    return int(val.numel()) * val.element_size()


def _why_not(node: fx.Node) -> str | None:
    """Why a node whose inputs are all constant still cannot be folded (None: it can)."""
    t = node.target
    if t is operator.getitem:
        return None
    if not isinstance(t, torch._ops.OpOverload):
        return "not_an_aten_op"
    if t.namespace == "llmpress":
        return "llmpress_op"
    if t in (torch.ops.aten.sym_size.int,) or "sym_" in t._opname:
        return "symbolic_shape"
    if torch.Tag.nondeterministic_seeded in t.tags:
        return "random_op"
    if node.is_impure():
        return "side_effects"
    static = _static_tensors(node.meta.get("val"))
    if static is None:
        return "non_tensor_result"
    if not static:
        return "symbolic_shape"
    return None


class FoldConstants(Pass):
    name: ClassVar[str] = "fold_constants"
    Options = FoldOptions
    exact: ClassVar[bool] = True

    def run(self, module: Module, ctx: PassContext) -> PassResult:
        opts: FoldOptions = self.options  # type: ignore[assignment]
        weights = {n: module.weight(n) for n in module.graph.nodes if n.op == "placeholder"}
        weights = {n: w for n, w in weights.items() if w is not None}
        skipped: Counter = Counter()

        # 1. Constant nodes, in graph order; drop roots whose value is not a tensor (cannot become a weight).
        const: dict[fx.Node, None] = {}
        for node in module.graph.nodes:
            if node.op != "call_function":
                continue
            if not all(a in weights or a in const for a in node.all_input_nodes):
                continue
            why = _why_not(node)
            if why is not None:
                skipped[why] += 1
                continue
            const[node] = None
        changed = True
        while changed:
            changed = False
            for node in list(const):
                if node not in const:
                    continue
                if any(u not in const for u in node.users) and not isinstance(node.meta["val"], torch.Tensor):
                    # A tuple used by a non-constant node: drop it and everything computed from it.
                    stack = [node]
                    while stack:
                        n = stack.pop()
                        if n in const:
                            del const[n]
                            stack.extend(n.users)
                    skipped["non_tensor_result"] += 1
                    changed = True
        if not const:
            return PassResult(module, False, {"folded": 0, "new_weights": [], "skipped": dict(skipped)})

        # 2. Connected groups of constant nodes and the weights they read.
        parent: dict[fx.Node, fx.Node] = {}

        def find(x: fx.Node) -> fx.Node:
            while parent.setdefault(x, x) is not x:
                parent[x] = parent[parent[x]]
                x = parent[x]
            return x

        for node in const:
            for a in node.all_input_nodes:
                parent[find(a)] = find(node)
        groups: dict[fx.Node, list[fx.Node]] = {}
        for node in const:
            groups.setdefault(find(node), []).append(node)

        # 3. Decide per group, evaluate, replace roots by buffers.
        new_weights: list[str] = []
        folded_nodes: list[fx.Node] = []
        dead_weights: list[fx.Node] = []
        for members in groups.values():
            member_set = set(members)
            read = {a for n in members for a in n.all_input_nodes if a in weights}
            roots = [n for n in members if any(u not in member_set for u in n.users)]
            if not roots:
                continue  # unused constants: dead code, dce's job
            added = sum(_nbytes(r.meta["val"]) for r in roots)
            freed_w = [w for w in read if all(u in member_set for u in w.users)]
            freed = sum(_nbytes(weights[w]) for w in freed_w)
            if read and added > freed:
                skipped["grows_weights"] += len(members)
                continue
            if not read and added > opts.max_literal_bytes:
                skipped["literal_too_big"] += len(members)
                continue
            env: dict[fx.Node, Any] = {w: weights[w] for w in read}
            with torch.no_grad():
                for n in members:  # graph order, so inputs come first
                    args = fx.node.map_arg(n.args, lambda a: env[a])
                    kwargs = fx.node.map_arg(n.kwargs, lambda a: env[a])
                    env[n] = n.target(*args, **kwargs)
            for r in roots:
                # clone: the buffer must own its storage (a view would keep the dropped weight alive).
                value = env[r].detach().clone(memory_format=torch.contiguous_format)
                name = self._fresh_name(module, r)
                ph = module.add_weight(name, value, kind="buffer")
                r.replace_all_uses_with(ph)
                new_weights.append(name)
            folded_nodes += members
            dead_weights += freed_w
        if not new_weights:
            return PassResult(module, False, {"folded": 0, "new_weights": [], "skipped": dict(skipped)})
        folded = erase_dead_nodes(module, folded_nodes)
        removed = module.remove_unused_weights(only=dead_weights)
        module.recompile()
        return PassResult(module, True, {"folded": folded, "new_weights": new_weights, "removed_weights": removed,
                                         "skipped": dict(skipped)})

    @staticmethod
    def _fresh_name(module: Module, root: fx.Node) -> str:
        path = source_path(root)
        base = f"{path}.folded_{root.name}" if path else f"folded_{root.name}"
        return module.fresh_weight_name(base)
