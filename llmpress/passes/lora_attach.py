"""``lora_attach``: keep a LoRA adapter as a low-rank branch beside its (float or quantized) base layers.

For every module ``M`` of a PEFT adapter (``lora_common``) with ``A [r, in]``, ``B [out, r]`` and scale ``s``
(``alpha / r``, rsLoRA ``alpha / sqrt(r)``), the layer ``y = base(x)`` becomes::

    y = base(x) + s (x A^T) B^T

with ``base`` untouched (``aten.linear``, or ``llmpress::wq_linear`` after a quantizer: QLoRA-style inference, a
4-bit base and a float32 branch) and the branch in plain ``aten.linear``/``mul``/``add`` nodes
(``low_rank.attach_low_rank``), so every backend lowers it with no special kernel. The result equals PEFT's
unmerged forward over the same base weights within fp32 rounding.

Put it after the quantizer (``quantize(bits=4),lora_attach(adapter=DIR)``): a quantizer after it would quantize the
branch too (and stops when its group does not divide the rank). It must run before ``fuse_qkv``/``fuse_gate_up``
(``forbids``): the fused layer has no ``q_proj`` to attach to. A layer that already carries this adapter's branch is
skipped with the reason, so a second run changes nothing; another adapter attaches beside it (branches add up).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import ClassVar

from ..ir.meta import compression, source_path
from ..ir.module import Module
from .base import Pass, PassContext, PassResult
from .lora_common import WQ_LINEAR, LoraOptions, plan_lora
from .low_rank import attach_low_rank

__all__ = ["LoraAttach", "LoraAttachOptions"]

log = logging.getLogger(__name__)


def _is_wq(node) -> bool:
    return getattr(node.target, "name", lambda: "")() == WQ_LINEAR


@dataclass(frozen=True)
class LoraAttachOptions(LoraOptions):
    pass_name: ClassVar[str] = "lora_attach"


class LoraAttach(Pass):
    name: ClassVar[str] = "lora_attach"
    Options: ClassVar[type[LoraAttachOptions]] = LoraAttachOptions
    establishes: ClassVar[frozenset[str]] = frozenset({"lora_attached"})
    forbids: ClassVar[frozenset[str]] = frozenset({"qkv_fused", "gate_up_fused"})  # the q/k/v layers are gone

    def run(self, module: Module, ctx: PassContext) -> PassResult:
        o: LoraAttachOptions = self.options
        o.validate()
        plan = plan_lora(module, o.adapter, pass_name=self.name)  # every check before any edit
        adapter, pairs, tag, attached = plan.adapter, plan.pairs, plan.tag, plan.attached
        skipped: list[tuple[str, str]] = []
        todo = []
        for node, layer in pairs:
            path = source_path(node) or node.name
            if tag in attached.get(path, ()):
                skipped.append((path, "already has this adapter's lora branch (lora_attach ran before)"))
            else:
                todo.append((node, layer))
        layers: dict[str, dict] = {}
        added = 0
        for node, layer in todo:
            path = source_path(node) or node.name
            base = "wq_linear" if _is_wq(node) else "linear"
            attach_low_rank(module, node, layer.A, layer.B, layer.scale, "lora",
                            spec={"pass": self.name, "adapter": tag})
            nbytes = (layer.A.numel() + layer.B.numel()) * 4
            added += nbytes
            layers[path] = {"rank": layer.rank, "alpha": layer.alpha, "scale": layer.scale, "base": base,
                            "bytes_added": nbytes, **({"base_pass": compression(node)["pass"]}
                                                     if (compression(node) or {}).get("pass") else {})}
        if todo:
            module.recompile()
        log.info("lora_attach: %d branches from %s (%d layers skipped)", len(todo), adapter.folder, len(skipped))
        stats = {"attached": len(todo), "adapter": str(adapter.folder), "rslora": adapter.use_rslora,
                 "skipped": skipped, "bytes_added": added, "layers": layers}
        if not todo:
            stats = {"reason": "every adapted layer already has this adapter's lora branch", **stats}
        return PassResult(module, bool(todo), stats)
