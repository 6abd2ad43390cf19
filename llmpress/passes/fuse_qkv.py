"""``fuse_qkv``: one linear instead of the q/k/v projections that read the same activation.

Match (structure first): ``aten.linear`` nodes with stored 2-D weights that read the *same input node*, agree on
bias presence, dtype and device, and whose weights (and biases) nothing else reads. By default only the
projections whose source modules are named ``q_proj``/``k_proj``/``v_proj`` under one parent module are fused
(the names filter the structural match: gate/up of an MLP also share an input, but fusing those is a different
rewrite); ``all_siblings=true`` fuses every such group of sibling linears. ``min_group`` (default 3) is the
smallest group fused; 2 allows q/k-only pairs.

Rewrite, for members ``i = 1..n`` with weights ``W_i: [o_i, d]`` and biases ``b_i``::

    y_i = x W_i^T + b_i   ==>   y = x [W_1; ...; W_n]^T + [b_1; ...; b_n],   y_i = split(y, [o_1..o_n], -1)[i]

Each output element is the same dot product as before; only the GEMM blocking may differ, so results agree to
fp32 rounding. The fused weight is ``<parent>.qkv_proj.weight`` (for other groups ``<parent>.<a>_<b>_proj``), and
the new nodes' source path is ``<parent>.qkv_proj``. Near misses are recorded in ``stats["skipped"]`` with the
reason (``k_proj reads a different input``...).
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.fx as fx

from ..errors import ConfigError
from ..ir.meta import source_path
from ..ir.module import Module
from .base import Pass, PassContext, PassResult, SelectOptions
from .select import select_linears

__all__ = ["FuseQKV", "compatible_linears", "fuse_linears"]

_QKV = ("q_proj", "k_proj", "v_proj")
_LINEAR = torch.ops.aten.linear.default


@dataclass(frozen=True)
class FuseQKVOptions(SelectOptions):
    min_group: int = 3
    all_siblings: bool = False

    def validate(self) -> None:
        if self.min_group < 2:
            raise ConfigError(f"fuse_qkv: option 'min_group' must be at least 2, got {self.min_group}")
        if not self.all_siblings and self.min_group > 3:
            raise ConfigError(f"fuse_qkv: option 'min_group'={self.min_group} can never match q/k/v (at most 3); "
                              "use all_siblings=true for larger groups")


def _leaf(path: str) -> str:
    return path.rsplit(".", 1)[-1]


def _parent(path: str) -> str:
    return path.rsplit(".", 1)[0] if "." in path else ""


def _fused_leaf(leaves: list[str]) -> str:
    stems = [leaf[:-len("_proj")] if leaf.endswith("_proj") else leaf for leaf in leaves]
    return ("".join(stems) if all(len(s) == 1 for s in stems) else "_".join(stems)) + "_proj"


def _common_prefix(paths: list[str]) -> str:
    parts = [p.split(".") for p in paths]
    out = []
    for segs in zip(*parts):
        if len(set(segs)) != 1:
            break
        out.append(segs[0])
    return ".".join(out)


class FuseQKV(Pass):
    name: ClassVar[str] = "fuse_qkv"
    Options = FuseQKVOptions
    establishes: ClassVar[frozenset[str]] = frozenset({"qkv_fused"})
    forbids: ClassVar[frozenset[str]] = frozenset({"weights_quantized"})  # it fuses float linears only
    exact: ClassVar[bool] = True

    def run(self, module: Module, ctx: PassContext) -> PassResult:
        opts: FuseQKVOptions = self.options  # type: ignore[assignment]
        selected, sel_skipped = select_linears(module, opts)
        wanted = (lambda p: True) if opts.all_siblings else (lambda p: _leaf(p) in _QKV)
        skipped: list[tuple[str, str]] = [(p, why) for p, why in sel_skipped if wanted(p)]

        # Structural siblings: linears reading the same input node (graph order).
        by_input: dict[fx.Node, list[fx.Node]] = {}
        for n in selected:
            by_input.setdefault(n.args[0], []).append(n)
        # q/k/v under one parent, to explain a projection that reads another input.
        qkv_by_parent: dict[str, list[fx.Node]] = {}
        for n in selected:
            if _leaf(source_path(n)) in _QKV:
                qkv_by_parent.setdefault(_parent(source_path(n)), []).append(n)

        groups: list[list[fx.Node]] = []
        for x, sibs in by_input.items():
            if not opts.all_siblings:
                named = [n for n in sibs if _leaf(source_path(n)) in _QKV]
                rest = [n for n in sibs if n not in named]
                if named and rest:
                    for n in rest:
                        skipped.append((source_path(n), "shares its input with q/k/v but is not q_proj/k_proj/v_proj"))
                elif len(rest) >= 2:
                    for n in rest:
                        skipped.append((source_path(n), "shares its input with " + ", ".join(
                            _leaf(source_path(m)) for m in rest if m is not n)
                            + " but they are not q/k/v projections (all_siblings=true fuses them)"))
                # One fused group per parent module.
                parts: dict[str, list[fx.Node]] = {}
                for n in named:
                    parts.setdefault(_parent(source_path(n)), []).append(n)
                candidates = [sorted(p, key=lambda n: _QKV.index(_leaf(source_path(n)))) for p in parts.values()]
            else:
                candidates = [sibs] if len(sibs) >= 2 else []
            for cand in candidates:
                cand = compatible_linears(module, cand, skipped)
                if not cand:
                    continue
                if len(cand) < opts.min_group:
                    why = (f"only {', '.join(_leaf(source_path(n)) for n in cand)} read{'s' if len(cand) == 1 else ''}"
                           f" {x.name} (min_group={opts.min_group})")
                    parent = _parent(source_path(cand[0]))
                    elsewhere = [n for n in qkv_by_parent.get(parent, []) if n.args[0] is not x]
                    if not opts.all_siblings and elsewhere:
                        why += "; " + "; ".join(f"{_leaf(source_path(n))} reads a different input "
                                                f"({n.args[0].name}, not {x.name})" for n in elsewhere)
                    for n in cand:
                        skipped.append((source_path(n), why))
                    continue
                groups.append(cand)

        fused_paths = [fuse_linears(module, g) for g in groups]
        if fused_paths:
            module.recompile()
        stats = {"fused": len(fused_paths), "groups": fused_paths, "skipped": skipped}
        if not fused_paths:
            stats = {"reason": self._why_nothing(module, skipped), **stats}
        return PassResult(module, bool(fused_paths), stats)

    @staticmethod
    def _why_nothing(module: Module, skipped: list[tuple[str, str]]) -> str:
        from ..ir.meta import compression

        quantized = sorted({str((compression(n) or {}).get("pass") or "an earlier pass") for n in module.graph.nodes
                            if n.op == "call_function" and _leaf(source_path(n) or "") in _QKV
                            and getattr(n.target, "name", lambda: "")() == "llmpress::wq_linear"})
        if quantized:
            return (f"the q/k/v projections are already quantized (by {', '.join(quantized)}); put fuse_qkv before "
                    f"{' and '.join(quantized)}")
        if any(_leaf(source_path(n) or "").startswith("qkv_proj") for n in module.graph.nodes):
            return "the q/k/v projections are already fused"
        if skipped:
            return f"no group qualified ({len(skipped)} projections skipped, see 'skipped')"
        return "no q_proj/k_proj/v_proj linears read one input"


def compatible_linears(module: Module, cand: list[fx.Node], skipped: list[tuple[str, str]]) -> list[fx.Node]:
    """Drop (and record) members of a sibling group that cannot share one linear with the first: bias, dtype,
    tied weights."""
    keep = []
    for n in cand:
        w_node = n.args[1]
        bias = n.args[2] if len(n.args) > 2 else n.kwargs.get("bias")
        w = module.weight(w_node)
        why = None
        if len(w_node.users) > 1:
            why = "its weight is also read elsewhere (tied); fusing would store it twice"
        elif bias is not None and (not isinstance(bias, fx.Node) or module.weight(bias) is None):
            why = "its bias is computed in the graph, not a stored weight"
        elif bias is not None and len(bias.users) > 1:
            why = "its bias is also read elsewhere"
        elif keep:
            first = keep[0]
            fb = first.args[2] if len(first.args) > 2 else first.kwargs.get("bias")
            fw = module.weight(first.args[1])
            if (fb is None) != (bias is None):
                why = f"bias presence differs from {_leaf(source_path(first))}"
            elif (w.dtype, w.device) != (fw.dtype, fw.device):
                why = f"weight dtype/device differs from {_leaf(source_path(first))}"
        if why is None:
            keep.append(n)
        else:
            skipped.append((source_path(n), why))
    return keep


def fuse_linears(module: Module, group: list[fx.Node]) -> str:
    """Replace the sibling linears ``group`` (one input) by one linear with their weights concatenated in group
    order and a ``split_with_sizes``; returns the fused source path (``<parent>.<a>_<b>_proj``)."""
    paths = [source_path(n) for n in group]
    prefix = _common_prefix([_parent(p) for p in paths])
    leaf = _fused_leaf([_leaf(p) for p in paths])
    fused_path = f"{prefix}.{leaf}" if prefix else leaf
    existing, base, i = module.stored_weights(), fused_path, 1
    while f"{fused_path}.weight" in existing or f"{fused_path}.bias" in existing:
        fused_path, i = f"{base}_{i}", i + 1  # a model that already has a qkv_proj beside q/k/v
    order = {n: i for i, n in enumerate(module.graph.nodes)}
    first = min(group, key=order.__getitem__)  # insert before the earliest member: x is defined by then
    x = group[0].args[0]
    w_nodes = [n.args[1] for n in group]
    b_nodes = [n.args[2] if len(n.args) > 2 else n.kwargs.get("bias") for n in group]
    weight = torch.cat([module.weight(w) for w in w_nodes], dim=0)
    args: tuple = (x, module.add_weight(f"{fused_path}.weight", weight, kind="parameter"))
    if b_nodes[0] is not None:
        bias = torch.cat([module.weight(b) for b in b_nodes], dim=0)
        args += (module.add_weight(f"{fused_path}.bias", bias, kind="parameter"),)
    sizes = [int(module.weight(w).shape[0]) for w in w_nodes]
    lin = module.call(_LINEAR, args, like=first)
    split = module.call(torch.ops.aten.split_with_sizes.default, (lin, sizes, -1), like=first)
    outs = [module.call(operator.getitem, (split, i), like=first) for i in range(len(group))]
    stack = dict(first.meta.get("nn_module_stack") or {})
    if stack:
        last_key, (_, _) = list(stack.items())[-1]
        del stack[last_key]
        stack[f"L__self__{fused_path}"] = (fused_path, "torch.nn.modules.linear.Linear")
    for n in (lin, split, *outs):
        if stack:
            n.meta["nn_module_stack"] = dict(stack)
        else:
            n.meta["llmpress_source"] = fused_path
    for n, out in zip(group, outs):
        n.replace_all_uses_with(out)
        module.graph.erase_node(n)
    module.remove_unused_weights(only=[*w_nodes, *(b for b in b_nodes if b is not None)])
    return fused_path
