"""``quantize``: round-to-nearest (RTN) weight-only quantization, the baseline every other method is compared with.

Each selected ``aten.linear(x, W, b)`` becomes ``llmpress::wq_linear(x, qweight, scales, zeros, b, bits, group)``
with, per output row o and group g of ``group`` consecutive input columns (see ``quant_common``):

- symmetric (default): ``s[o,g] = max_i |W[o,i]| / (2^(b-1) - 1)``, ``q = clamp(round(W / s), -2^(b-1),
  2^(b-1) - 1)``: absmax never clips, zero stays zero;
- asymmetric (``sym=false``): ``s = (max(W,0) - min(W,0)) / (2^b - 1)``, ``z = round(-min(W,0) / s)``,
  ``q = clamp(round(W / s) + z, 0, 2^b - 1)``.

``W_hat = (q - z) * s``. Both grids hold 0 exactly (q = 0, or q = z), so the zeros of a layer ``sparsify`` pruned
stay exactly zero; such layers report their stored sparsity. Stats per layer: the relative Frobenius error
``||W - W_hat|| / ||W||``.
Options are checked against every selected layer (group divides ``in_features``) before anything is rewritten.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import ClassVar

from ..ir.meta import compression
from ..ir.module import Module
from .base import Pass, PassContext, PassResult, SelectOptions
from .quant_common import (
    QuantizedWeight,
    check_bits,
    check_group_option,
    group_sizes,
    relative_error,
    replace_with_wq_linear,
    rtn_quantize,
)
from .layer_rewrite import Layer, Rewritten, rewrite_linears
from .select import select_linears

__all__ = ["Quantize", "QuantizeOptions"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class QuantizeOptions(SelectOptions):
    """``bits`` in {8, 4, 3, 2}; ``group`` columns per scale (0 or -1: one scale per output channel);
    ``sym``: symmetric absmax grid (true) or min/max grid with a zero point (false)."""

    bits: int = 4
    group: int = 128
    sym: bool = True

    def validate(self) -> None:
        check_bits(self.bits, pass_name="quantize")
        check_group_option(self.group, pass_name="quantize")


class Quantize(Pass):
    name: ClassVar[str] = "quantize"
    Options: ClassVar[type[QuantizeOptions]] = QuantizeOptions
    establishes: ClassVar[frozenset[str]] = frozenset({"weights_quantized"})

    def run(self, module: Module, ctx: PassContext) -> PassResult:
        o: QuantizeOptions = self.options
        o.validate()
        nodes, skipped = select_linears(module, o)
        # Check every layer before rewriting any, so a bad option leaves the module untouched.
        groups = group_sizes(module, nodes, o.group, o.bits, pass_name=self.name)

        def rewrite(layer: Layer) -> Rewritten:
            w, g = layer.weight.detach(), groups[layer.node]
            q, scales, zeros = rtn_quantize(w, o.bits, g, o.sym)
            qw = QuantizedWeight(q, scales, zeros, o.bits, g)
            err = relative_error(w, qw.dequantize())
            new, wnode = replace_with_wq_linear(module, layer.node, qw,
                                                spec={"pass": self.name, "method": "rtn", "rel_error": err})
            record = {"bits": o.bits, "group": g, "rel_error": err}
            if "sparsify_method" in compression(new):  # sparsified earlier: its zeros stay exact
                record["sparsity"] = compression(new)["sparsity"]
            return Rewritten.replaced(new, wnode, record)

        done = rewrite_linears(module, ctx, nodes, rewrite, skipped=skipped, who=self.name)
        log.info("quantize: %d linears to %d bits, skipped %d", len(done.layers), o.bits, len(skipped))
        stats = done.stats(module, "quantized", self.name)
        sparse = sum("sparsity" in v for v in done.layers.values())
        if sparse:
            stats["sparse_layers"] = f"{sparse} sparsified layer(s): zeros round to the code of 0 and stay exact"
        return PassResult(module, bool(done.layers), stats)
