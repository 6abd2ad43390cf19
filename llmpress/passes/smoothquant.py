"""``smoothquant``: migrate activation outliers into the weights, then int8 weights and int8 activations (W8A8).

Xiao et al. 2022, "SmoothQuant: Accurate and Efficient Post-Training Quantization for Large Language Models".
For the activation ``X [tokens, in]`` shared by the linears ``Y_l = X W_l^T`` (q/k/v after one norm, gate/up after
another), one scale per input channel j::

    s_j = max_t |X[t, j]|^alpha / max_{l, o} |W_l[o, j]|^(1 - alpha)        (both maxima clamped to >= 1e-5)
    X' = X diag(1/s)     W_l' = W_l diag(s)     so  X' W_l'^T = X W_l^T  exactly

``alpha`` (0..1) splits the quantization difficulty: 0 leaves the activations alone, 1 moves all of it to the
weights. ``1/s`` is folded into the op that produces ``X`` (found on the graph by ``scale_folding.find_sites``):
the RMSNorm weight ``g`` (``x * rsqrt(var) * g / s``), or the output rows (and bias) of a preceding linear,
directly or through an elementwise gate (``down_proj(silu(gate(x)) * up(x))``: up's rows absorb ``1/s``). Every
linear reading ``X`` gets ``W diag(s)``, quantized or not, so smoothing alone never changes the function
(``quantize=false`` stops there). Where the producer cannot absorb a scale (o_proj reads the attention output) the
layer is quantized unsmoothed and the reason is recorded.

Then each selected linear becomes ``llmpress::w8a8_linear`` (``llmpress.ir.ops.w8a8``): int8 weights per output
channel, ``ws[o] = max_i |W'[o, i]| / 127``, and dynamic per-token int8 activations inside the op.

Calibration: one pass over ``ctx.calibration`` records ``max_t |X[t, j]|`` of every distinct linear input (memory:
one vector per input) and keeps the first 256 tokens of each to report the output SQNR of every quantized layer.
All scales are computed from the original weights before any is folded, so the order of folding does not matter.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.fx as fx

from ..errors import ConfigError
from ..ir.meta import set_compression, source_path
from ..ir.module import Module
from ..ir.ops import w8a8 as _w8a8_ops
from .base import Pass, PassContext, PassResult, SelectOptions
from .scale_folding import WeightEdits, collect_input_stats, find_sites, linear_bias, require_calibration
from .quant_common import weight_stem
from .select import select_linears, why_none_selected

__all__ = ["SmoothQuant", "SmoothQuantOptions"]

log = logging.getLogger(__name__)

_W8A8 = torch.ops.llmpress.w8a8_linear.default
_SAMPLE_TOKENS = 256


@dataclass(frozen=True)
class SmoothQuantOptions(SelectOptions):
    """``alpha`` in [0, 1]: migration strength; ``quantize``: false to smooth only (function unchanged)."""

    alpha: float = 0.5
    quantize: bool = True

    def validate(self) -> None:
        if not (0.0 <= self.alpha <= 1.0) or math.isnan(self.alpha):
            raise ConfigError(f"pass 'smoothquant': alpha={self.alpha} must be between 0 and 1")


@dataclass
class _InputStats:
    absmax: torch.Tensor | None = None
    sample: torch.Tensor | None = None
    tokens: int = 0

    def update(self, x2d: torch.Tensor) -> None:
        x2d = x2d.detach().to(torch.float32)
        m = x2d.abs().amax(dim=0)
        self.absmax = m if self.absmax is None else torch.maximum(self.absmax, m)
        if self.sample is None:
            self.sample = x2d[:_SAMPLE_TOKENS].clone()
        self.tokens += x2d.shape[0]


class SmoothQuant(Pass):
    name: ClassVar[str] = "smoothquant"
    Options: ClassVar[type[SmoothQuantOptions]] = SmoothQuantOptions
    establishes: ClassVar[frozenset[str]] = frozenset({"weights_quantized", "activations_quantized"})
    forbids: ClassVar[frozenset[str]] = frozenset({"weights_quantized", "norms_folded"})  # see passes/base.py
    needs_calibration: ClassVar[bool] = True

    def run(self, module: Module, ctx: PassContext) -> PassResult:
        with torch.no_grad():
            return self._run(module, ctx)

    def _run(self, module: Module, ctx: PassContext) -> PassResult:
        o: SmoothQuantOptions = self.options
        o.validate()
        require_calibration(ctx, self.name)
        selected, skipped = select_linears(module, o)
        if not selected:
            return PassResult(module, False, {"reason": why_none_selected(module, skipped, self.name), "quantized": 0,
                                              "smoothed": 0, "skipped": skipped})
        sites, not_scaled = find_sites(module, selected)
        stats_by_input, _ = collect_input_stats(module, ctx, selected, _InputStats)
        edits = WeightEdits(module)
        smoothed = {}
        input_scale: dict[fx.Node, torch.Tensor] = {}
        for site in sites:
            st = stats_by_input[site.x]
            if st.absmax is None:
                not_scaled += [(n, "never reached by the calibration data") for n in site.selected]
                continue
            w_max = torch.stack([module.weight(c.args[1]).abs().amax(dim=0) for c in site.selected]).amax(dim=0)
            s = st.absmax.clamp(min=1e-5).pow(o.alpha) / w_max.float().clamp(min=1e-5).pow(1 - o.alpha)
            s = s.clamp(min=1e-5)
            edits.fold(site, s)
            input_scale[site.x] = s
            smoothed[site.producer] = {"kind": site.kind,
                                       "consumers": [source_path(c) or c.name for c in site.consumers],
                                       "scale_min": float(s.min()), "scale_max": float(s.max()),
                                       "act_absmax_max": float(st.absmax.max())}
        layers: dict[str, dict] = {}
        before = after = 0
        dead = []
        if o.quantize:
            for n in selected:
                path = source_path(n) or n.name
                w = edits.weight_of(n).to(torch.float32)
                qw, ws = _w8a8_ops.quantize_weight(w)
                stem = weight_stem(module.weight_name(n.args[1]))
                wq = module.add_weight(module.fresh_weight_name(stem + ".qweight"), qw)
                sq = module.add_weight(module.fresh_weight_name(stem + ".wscale"), ws)
                new = module.call(_W8A8, (n.args[0], wq, sq, linear_bias(n)), like=n)
                dead.append(n.args[1])
                st = stats_by_input[n.args[0]]
                sqnr = None
                if st.sample is not None:
                    # Against the smoothed float layer: the error of quantization alone.
                    xs = st.sample / input_scale[n.args[0]] if n.args[0] in input_scale else st.sample
                    ref = torch.nn.functional.linear(xs, w)
                    sqnr = _sqnr(ref, _w8a8_ops.w8a8_linear(xs, qw, ws, None))
                b0 = module.weight(n.args[1]).numel() * module.weight(n.args[1]).element_size()
                b1 = qw.numel() + ws.numel() * 4
                before, after = before + b0, after + b1
                rel = float(torch.linalg.norm(_w8a8_ops.dequantize_weight(qw, ws) - w)
                            / torch.linalg.norm(w).clamp(min=1e-30))
                info = {"pass": self.name, "method": "smoothquant w8a8", "bits": 8, "alpha": o.alpha,
                        "smoothed": n.args[0] in input_scale, "bytes_before": b0, "bytes_after": b1,
                        "rel_error": rel, "out_sqnr_db": sqnr, "source": path}
                n.replace_all_uses_with(new)
                module.erase([n])
                set_compression(new, info)
                layers[path] = {k: info[k] for k in ("smoothed", "rel_error", "out_sqnr_db")}
        written = edits.commit()
        if dead:
            module.remove_unused_weights(only=dead)
        module.recompile()
        log.info("smoothquant: smoothed %d inputs, quantized %d linears to W8A8, %d not smoothed",
                 len(smoothed), len(layers), len(not_scaled))
        stats = {"quantized": len(layers), "smoothed": len(smoothed), "weights_rescaled": written,
                 "skipped": skipped, "not_smoothed": [(source_path(n) or n.name, why) for n, why in not_scaled],
                 "bytes_before": before, "bytes_after": after, "sites": smoothed, "layers": layers,
                 "calibration_tokens": max((s.tokens for s in stats_by_input.values()), default=0)}
        return PassResult(module, bool(smoothed) or bool(layers), stats)


def _sqnr(ref: torch.Tensor, approx: torch.Tensor) -> float:
    noise = float((ref - approx).pow(2).sum())
    return float("inf") if noise == 0 else 10.0 * math.log10(float(ref.pow(2).sum()) / noise)
