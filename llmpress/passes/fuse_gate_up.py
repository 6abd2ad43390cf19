"""``fuse_gate_up``: one linear instead of the gate and up projections of a gated MLP (SwiGLU).

Match (structure first): ``mul(act(gate(x)), up(x))`` (either operand order), ``act`` one of ``silu``/``gelu``,
where ``gate`` and ``up`` are ``aten.linear`` nodes with stored 2-D weights that read the *same input node*, agree
on bias presence, dtype and device, and whose weights (and biases) nothing else reads. Which linear is the gate is
read from the graph (the one under the activation), not from its name; ``include``/``exclude`` globs only filter.

Rewrite, with ``W_g, W_u: [inter, d]``::

    silu(x W_g^T) * (x W_u^T)   ==>   y = x [W_g; W_u]^T,   g, u = split(y, [inter, inter], -1),   silu(g) * u

Each output element is the same dot product as before; only the GEMM blocking may differ, so results agree to
fp32 rounding. The fused weight is ``<parent>.gate_up_proj.weight`` and the new nodes' source path is
``<parent>.gate_up_proj`` (as ``fuse_qkv(all_siblings=true)`` names it), so ``exclude=*.gate_up_proj`` and
``include=mlp`` select it; the fused layer quantizes like any linear (``fuse_gate_up,quantize(bits=4,group=128)``).
Near misses are recorded in ``stats["skipped"]`` with the reason (``gate_proj and up_proj read different
inputs``, ``bias presence differs``, already quantized: ``put fuse_gate_up before quantize``).
"""
from __future__ import annotations

from typing import ClassVar

import torch
import torch.fx as fx

from ..ir.meta import compression, source_path
from ..ir.module import Module
from .base import Pass, PassContext, PassResult, SelectOptions
from .fuse_qkv import compatible_linears, fuse_linears
from .select import select_linears

__all__ = ["FuseGateUp"]

_LINEAR = torch.ops.aten.linear.default
_MUL = torch.ops.aten.mul.Tensor
_ACTS = (torch.ops.aten.silu.default, torch.ops.aten.gelu.default)


def _leaf(path: str) -> str:
    return path.rsplit(".", 1)[-1]


def _is_wq(node: fx.Node) -> bool:
    return node.op == "call_function" and getattr(node.target, "name", lambda: "")() == "llmpress::wq_linear"


def _is_linear(node) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and (node.target is _LINEAR or _is_wq(node))


def gated_pairs(module: Module) -> list[tuple[fx.Node, fx.Node, fx.Node]]:
    """Every ``(mul, gate, up)`` with ``mul = act(gate) * up``, both linear (float or quantized), in graph order."""
    out = []
    for m in module.graph.nodes:
        if m.op != "call_function" or m.target is not _MUL or len(m.args) != 2:
            continue
        for act, up in (m.args, m.args[::-1]):
            if isinstance(act, fx.Node) and act.op == "call_function" and act.target in _ACTS and act.args \
                    and _is_linear(act.args[0]) and _is_linear(up) and act.args[0] is not up:
                out.append((m, act.args[0], up))
                break
    return out


class FuseGateUp(Pass):
    name: ClassVar[str] = "fuse_gate_up"
    Options = SelectOptions
    establishes: ClassVar[frozenset[str]] = frozenset({"gate_up_fused"})
    forbids: ClassVar[frozenset[str]] = frozenset({"weights_quantized"})  # it fuses float linears only
    exact: ClassVar[bool] = True

    def run(self, module: Module, ctx: PassContext) -> PassResult:
        opts: SelectOptions = self.options  # type: ignore[assignment]
        selected, sel_skipped = select_linears(module, opts)
        chosen = set(selected)
        left_out = dict(sel_skipped)
        skipped: list[tuple[str, str]] = []
        groups: list[list[fx.Node]] = []
        quantized: set[str] = set()
        used: set[fx.Node] = set()
        for _, gate, up in gated_pairs(module):
            gp, up_path = source_path(gate), source_path(up)
            if _is_wq(gate) or _is_wq(up):
                by = sorted({str((compression(n) or {}).get("pass") or "an earlier pass")
                             for n in (gate, up) if _is_wq(n)})
                quantized.update(by)
                why = f"already quantized (by {', '.join(by)}); put fuse_gate_up before {' and '.join(by)}"
                skipped += [(gp, why), (up_path, why)]
                continue
            out = [n for n in (gate, up) if n not in chosen]
            if out:
                for n in out:
                    skipped.append((source_path(n) or n.name, left_out.get(source_path(n) or n.name, "not selected")))
                continue
            if gate.args[0] is not up.args[0]:
                why = (f"{_leaf(gp)} and {_leaf(up_path)} read different inputs "
                       f"({gate.args[0].name}, {up.args[0].name})")
                skipped += [(gp, why), (up_path, why)]
                continue
            if gate in used or up in used:
                skipped.append((gp, "its linear is part of another gated pair"))
                continue
            pair = compatible_linears(module, [gate, up], skipped)
            if len(pair) < 2:
                if pair:
                    skipped.append((source_path(pair[0]), f"its partner {_leaf(gp if pair[0] is up else up_path)}"
                                                           " cannot be fused (see its reason)"))
                continue
            used.update(pair)
            groups.append(pair)

        fused_paths = [fuse_linears(module, g) for g in groups]
        if fused_paths:
            module.recompile()
        stats = {"fused": len(fused_paths), "groups": fused_paths, "skipped": skipped}
        if not fused_paths:
            stats = {"reason": self._why_nothing(module, skipped, quantized), **stats}
        return PassResult(module, bool(fused_paths), stats)

    @staticmethod
    def _why_nothing(module: Module, skipped: list[tuple[str, str]], quantized: set[str]) -> str:
        if quantized:
            q = sorted(quantized)
            return (f"the gate/up projections are already quantized (by {', '.join(q)}); put fuse_gate_up before "
                    f"{' and '.join(q)}")
        if any(_leaf(source_path(n) or "").startswith("gate_up_proj") for n in module.graph.nodes):
            return "the gate/up projections are already fused"
        if skipped:
            return f"no gate/up pair qualified ({len(skipped)} projections skipped, see 'skipped')"
        return "no gated MLP (act(gate(x)) * up(x), act silu or gelu, both linears) in the graph"
