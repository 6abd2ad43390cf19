"""``act_quant``: dynamic int8 activations for the weight-quantized linears ("w4a8").

Sets ``act_bits=8`` and ``act_group`` on every selected ``llmpress::wq_linear``, so the op computes (see
``llmpress/ir/ops/wq_linear.py``), per token t and block b of ``group`` consecutive input features::

    sa[t, b] = max_{i in b} |x[t, i]| / 127   (1 for an all-zero block)
    qa[t, i] = clamp(round(x[t, i] / sa[t, b]), -127, 127)
    y        = (qa * sa) @ W^T + bias

The change is explicit in the IR and implemented by every backend: the reference kernel quantizes and dequantizes
``x``; the TVM CPU kernels quantize each activation row once per call and multiply int8 codes with the integer
weight codes (``vpmaddubsw``/``vpdpbusd``/``sdot``), applying ``sa * s`` once per block. The cost in quality is
measured in ``benchmarks/quality.py`` (rows "... + act_quant").

``group=0`` (the default) uses each layer's weight group, the fastest form: the kernels then apply one float
scale per weight group. A smaller ``group`` (e.g. 32, llama.cpp's Q8_0 block) must divide each layer's weight
group; it costs one float multiply-add per block and quantizes outliers more locally.

Requires quantized weights (``quantize``, ``gptq``, ``awq``): layers that are not ``wq_linear`` are not touched
(``lm_head`` kept float by ``exclude=lm_head`` stays float). Stats: the layers marked, and every skipped one with
the reason.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..errors import ConfigError
from ..ir.meta import compression, set_compression, source_path
from ..ir.module import Module
from ..ir.ops.wq_linear import WQ_ARGS, wq_args
from .base import Pass, PassContext, PassResult, SelectOptions
from .select import Selector

__all__ = ["ActQuant", "ActQuantOptions"]

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class ActQuantOptions(SelectOptions):
    """``bits``: 8 (the only width with integer kernels); ``group``: activation block length (0: the layer's
    weight group)."""

    bits: int = 8
    group: int = 0

    def validate(self) -> None:
        if self.bits != 8:
            raise ConfigError(f"pass 'act_quant': bits={self.bits} is not supported (only 8)")
        if self.group < 0:
            raise ConfigError(f"pass 'act_quant': group={self.group} must be positive, or 0 for the weight group")


class ActQuant(Pass):
    name: ClassVar[str] = "act_quant"
    Options: ClassVar[type[ActQuantOptions]] = ActQuantOptions
    requires: ClassVar[frozenset[str]] = frozenset({"weights_quantized"})
    establishes: ClassVar[frozenset[str]] = frozenset({"activations_quantized"})

    def run(self, module: Module, ctx: PassContext) -> PassResult:
        o: ActQuantOptions = self.options
        o.validate()
        sel = Selector.from_options(o)
        op = torch.ops.llmpress.wq_linear.default
        plan, skipped = [], []
        for node in module.graph.nodes:
            if node.op != "call_function" or node.target is not op:
                continue
            path = source_path(node) or node.name
            ok, why = sel.match(path)
            if not ok:
                skipped.append((path, why))
                continue
            a = wq_args(node.args, node.kwargs)
            if a["act_bits"] == o.bits and (o.group == 0 or a["act_group"] == o.group):
                skipped.append((path, f"already int{o.bits} activations"))
                continue
            in_f = int(node.args[0].meta["val"].shape[-1])
            group = int(a["group_size"])
            ag = group if o.group == 0 else o.group
            if group % ag:
                # Checked for every layer before any is changed: a bad option leaves the module untouched.
                raise ConfigError(f"pass 'act_quant': group={o.group} does not divide the weight group {group} of "
                                  f"layer {path!r} (in_features {in_f}); use a divisor of {group} or group=0")
            plan.append((node, path, ag))
        layers = {}
        for node, path, ag in plan:
            a = wq_args(node.args, node.kwargs)
            node.args = tuple(a[k] for k in WQ_ARGS[:7]) + (o.bits, ag)
            node.kwargs = {}
            spec = dict(compression(node) or {})
            spec.update({"act_bits": o.bits, "act_group": ag})
            set_compression(node, spec)
            layers[path] = {"act_bits": o.bits, "act_group": ag}
        if plan:
            module.recompile()
        log.info("act_quant: int%d activations for %d linears, skipped %d", o.bits, len(plan), len(skipped))
        stats: dict = {"quantized": len(plan), "skipped": skipped, "layers": layers}
        if not plan and not skipped:
            skipped.append(("*", "no llmpress::wq_linear in the graph (quantize the weights first)"))
            stats = {"reason": "no quantized linears in the graph; put act_quant after quantize, gptq or awq",
                     **stats}
        return PassResult(module, bool(plan), stats)
