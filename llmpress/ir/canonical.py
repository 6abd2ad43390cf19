"""Canonical form at capture: the no-op nodes torch.export leaves in transformers' graphs, dropped.

transformers' modules cast to the dtype they already have (``LlamaRMSNorm``: ``x.to(float32)`` ...
``weight * x.to(input_dtype)``; rotary embeddings: ``.float()``, ``.to(x.dtype)``), and torch.export records each
cast as ``aten.to.dtype`` (or ``to.dtype_layout`` / ``to.device``), each with an ``aten._assert_tensor_metadata``
check beside it. In a float32 graph on one device every one of them is the identity, but they sit between the ops
the passes' patterns look for (a norm is ``g * (x * rsqrt(mean(x^2) + eps))``; ``fold_norm``, ``smoothquant`` and the
backends' fused epilogues read it as such). ``drop_identity_ops`` removes them once, at capture, so every pass sees
one form whichever code wrote the model:

- ``to.dtype`` / ``to.dtype_layout`` / ``to.device`` / ``_to_copy`` whose output has its input's dtype and device
  (and layout), and ``alias``: their users read the input instead (the graph is functional: no node writes in place);
- ``_assert_tensor_metadata``: a check of a dtype the graph's own metadata already records, with no result.

A cast that changes the dtype (a real bf16 -> float32 one, a bool mask to float) stays.
"""
from __future__ import annotations

import logging

import torch
import torch.fx as fx

from .module import Module

__all__ = ["drop_identity_ops"]

log = logging.getLogger(__name__)

aten = torch.ops.aten
_CASTS = (aten.to.dtype, aten.to.dtype_layout, aten.to.device, aten._to_copy.default, aten.alias.default)
_CHECKS = (aten._assert_tensor_metadata.default,)


def _same(a: object, b: object) -> bool:
    return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype
            and a.device == b.device and a.layout == b.layout)


def drop_identity_ops(module: Module) -> int:
    """Remove identity casts and metadata checks (module docstring); returns how many nodes went."""
    dropped = 0
    for n in list(module.graph.nodes):
        if n.op != "call_function":
            continue
        if n.target in _CHECKS and not n.users:
            module.erase([n])
            dropped += 1
        elif n.target in _CASTS and isinstance(n.args[0], fx.Node) and _same(n.args[0].meta.get("val"),
                                                                             n.meta.get("val")):
            n.replace_all_uses_with(n.args[0])
            module.erase([n])
            dropped += 1
    if dropped:
        module.recompile()
        log.debug("dropped %d identity casts and metadata checks", dropped)
    return dropped
