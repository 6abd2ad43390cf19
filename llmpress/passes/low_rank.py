"""A low-rank branch beside a linear layer, as plain ATen ops: the graph form of LoRA (``lora_attach``) and of any
other trained low-rank correction (``distill``).

``attach_low_rank`` turns ``y = base(x)`` (an ``aten.linear`` or an ``llmpress::wq_linear``, left as it is) into::

    h = linear(x, A)          A [r, in]
    d = linear(h, B)          B [out, r]
    d = mul(d, scale)         (only when scale != 1)
    y = add(base(x), d)       = base(x) + scale * (x A^T) B^T

Only ``aten.linear``, ``aten.mul`` and ``aten.add`` are added, so every backend lowers the branch with the kernels
it already has, and the order of operations is PEFT's (``result + lora_B(lora_A(x)) * scaling``), so an attached
branch reproduces PEFT's unmerged forward bit for bit where the matmuls agree. ``A`` and ``B`` are stored as given
(float32 parameters ``<layer>.<name>_A.weight`` / ``<layer>.<name>_B.weight``), so the adapter can be read back out
of the graph; the two branch linears have source paths ``<layer>.<name>_A`` / ``<layer>.<name>_B`` (so
``exclude=q_proj`` still names them, and ``*.lora_B`` just one), the ``add`` keeps the layer's own path.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.fx as fx

from ..errors import ConfigError
from ..ir.meta import set_compression, set_source_path, source_path
from ..ir.module import Module

__all__ = ["Branch", "attach_low_rank", "branch_weight_name"]

_LINEAR = torch.ops.aten.linear.default


class Branch(NamedTuple):
    """What ``attach_low_rank`` added: the ``add`` node standing for the layer's output, and the weight
    placeholders of the two factors (trainable in place by ``distill``)."""

    output: fx.Node
    a: fx.Node
    b: fx.Node


def branch_weight_name(layer: str, name: str, which: str) -> str:
    """``<layer>.<name>_<which>.weight``: where ``attach_low_rank`` stores factor ``which`` ("A" or "B")."""
    return f"{layer}.{name}_{which}.weight"


def attach_low_rank(module: Module, linear_node: fx.Node, A: torch.Tensor, B: torch.Tensor, scale: float,
                    name: str, *, spec: dict[str, Any] | None = None) -> Branch:
    """Add ``scale * (x A^T) B^T`` to the output of ``linear_node`` (see the module docstring) and return the
    ``add`` node that now stands for the layer's output with the two factors' placeholders (``Branch``). ``spec`` is recorded as the compression metadata of the
    two branch linears (with ``branch``, ``rank``, ``scale`` and ``layer`` added). The caller recompiles once
    after all its edits."""
    x = linear_node.args[0]
    out_f = linear_node.meta["val"].shape[-1]
    in_f = x.meta["val"].shape[-1]
    if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1] or A.shape[1] != in_f or B.shape[0] != out_f:
        raise ConfigError(f"attach_low_rank: A {list(A.shape)} / B {list(B.shape)} do not fit the "
                          f"{out_f}x{in_f} layer {source_path(linear_node) or linear_node.name}")
    layer = source_path(linear_node) or linear_node.name
    dtype = linear_node.meta["val"].dtype
    users = list(linear_node.users)
    anchor = linear_node.next  # the branch goes right after the base layer: x and the base output exist there
    a_node = module.add_weight(module.fresh_weight_name(branch_weight_name(layer, name, "A")),
                               A.detach().to(dtype).contiguous(), kind="parameter")
    b_node = module.add_weight(module.fresh_weight_name(branch_weight_name(layer, name, "B")),
                               B.detach().to(dtype).contiguous(), kind="parameter")
    h = module.call(_LINEAR, (x, a_node), like=linear_node, before=anchor)
    d = module.call(_LINEAR, (h, b_node), like=linear_node, before=anchor)
    if scale != 1.0:
        d = module.call(torch.ops.aten.mul.Tensor, (d, float(scale)), like=linear_node, before=anchor)
    y = module.call(torch.ops.aten.add.Tensor, (linear_node, d), like=linear_node, before=anchor)
    set_source_path(h, f"{layer}.{name}_A")
    set_source_path(d.args[0] if scale != 1.0 else d, f"{layer}.{name}_B")
    if scale != 1.0:
        set_source_path(d, f"{layer}.{name}_B")
    rank = int(A.shape[0])
    for node, which in ((h, "A"), (d.args[0] if scale != 1.0 else d, "B")):
        set_compression(node, {**(spec or {}), "branch": which, "rank": rank, "scale": float(scale), "layer": layer})
    for u in users:
        u.replace_input_with(linear_node, y)
    return Branch(y, a_node, b_node)
