"""``awq``: activation-aware weight quantization (weight-only, same ``wq_linear`` format as ``quantize``).

Lin et al. 2023, "AWQ: Activation-aware Weight Quantization for LLM Compression and Acceleration".
Weights that meet large activations matter most; scaling their input channels up before round-to-nearest
protects them. For the activation ``X [tokens, in]`` read by the selected linears ``W_l`` (q/k/v after one norm,
gate/up after another, down after the up-projection gate), with per-channel mean magnitude
``m_j = mean_t |X[t, j]|``::

    s(a) = m^a / sqrt(max_j m_j^a * min_j m_j^a)                     (m^a clamped to >= 1e-4)
    a*   = argmin_{a in {0, 1/n, ..., (n-1)/n}}  sum_l || X W_l^T - (X diag(1/s)) Q(W_l diag(s))^T ||_F^2

``Q`` is the RTN grid of ``quantize`` (``quant_common``; ``bits``, ``group``, ``sym``); ``a = 0`` is plain RTN, so
the chosen scale is never worse than RTN on the calibration objective. The objective is the output error of the
linears themselves (the paper measures the enclosing block's output; the linear output keeps memory bounded and
the search exact): with ``H = X^T X / tokens`` and ``D_l = W_l - Q(W_l diag(s)) diag(1/s)`` it is
``sum_l tr(D_l H D_l^T)``, so calibration only accumulates ``H`` and ``m`` per distinct input.

``1/s`` is folded into the op producing ``X`` (found on the graph by ``scale_folding.find_sites``: the RMSNorm weight
shared by the linears reading it, the rows of a preceding linear, or of the linear inside an elementwise gate such
as ``silu(gate) * up``), ``W_l diag(s)`` into every linear reading ``X`` -- exact before quantization. A layer whose
producer cannot absorb a scale (o_proj reads the attention output; v_proj -> o_proj would have to pass through the
KV cache and, with grouped-query attention, tie scales across heads) is quantized unscaled and the reason recorded.

Clipping search (``clip=true``), per output row and group g, on the scaled weight ``W'`` and ``H' = diag(1/s) H
diag(1/s)``: ``r in {1, 1 - 1/20, ..., 0.55}``, ``W'_c = clamp(W', r * min, r * max)`` (``+-r * max|W'|`` when
symmetric), keep the r minimizing ``(W' - Q(W'_c))_g H'_gg (W' - Q(W'_c))_g^T`` (the group's own block of H', as
the reference implementation does with the group's input slice). Then ``W'_c`` is quantized with the RTN grid.

Stats per layer: the chosen ``a``, the relative weight error, and the relative output error on the calibration
activations ``sqrt(tr(D H D^T) / tr(W H W^T))`` -- next to what RTN gives (``rtn_out_error``).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.fx as fx

from ..errors import ConfigError
from ..ir.meta import source_path
from ..ir.module import Module
from .base import Pass, PassContext, PassResult, SelectOptions
from .hessian import gram_stats_with_abs
from .hessian import output_error as relative_output_error
from .layer_rewrite import Layer, Rewritten, rewrite_linears
from .quant_common import (
    QuantizedWeight,
    check_bits,
    check_group_option,
    fake_quant,
    find_params,
    group_sizes,
    relative_error,
    replace_with_wq_linear,
    rtn_quantize,
)
from .scale_folding import WeightEdits, collect_input_stats, find_sites, require_calibration
from .select import select_linears, why_none_selected

__all__ = ["AWQ", "AWQOptions", "search_scale", "clip_search", "output_error"]

log = logging.getLogger(__name__)

_CLIP_GRID = 20
_CLIP_MAX_SHRINK = 0.5


@dataclass(frozen=True)
class AWQOptions(SelectOptions):
    """``bits`` in {8, 4, 3, 2}; ``group`` columns per scale (0 or -1: per channel); ``sym`` as in ``quantize``;
    ``n_grid`` points of the scale exponent search; ``clip``: search a clipping ratio per group."""

    bits: int = 4
    group: int = 128
    sym: bool = True
    n_grid: int = 20
    clip: bool = True

    def validate(self) -> None:
        check_bits(self.bits, pass_name="awq")
        check_group_option(self.group, pass_name="awq")
        if self.n_grid < 1:
            raise ConfigError(f"pass 'awq': n_grid={self.n_grid} must be at least 1")


def _fake_rtn(w: torch.Tensor, bits: int, group: int, sym: bool) -> torch.Tensor:
    """``Q(W)``: the RTN grid of ``quantize`` (``quant_common.find_params``) applied to every ``group`` consecutive
    values of the last axis; any leading shape (a stack of candidate weights) is allowed."""
    wg = w.reshape(-1, group)
    scale, zero = find_params(wg, bits, sym)
    return fake_quant(wg, scale, zero, bits).reshape(w.shape)


def output_error(d: torch.Tensor, h: torch.Tensor) -> float:
    """``tr(D H D^T)``: the summed squared output error over the calibration tokens (per token, H is a mean)."""
    return float(((d @ h) * d).sum())


_CHUNK = 4  # candidates evaluated at once: bounds the memory of the stacked candidate weights


def search_scale(weights: list[torch.Tensor], groups: list[int], h: torch.Tensor, mean_abs: torch.Tensor, *,
                 bits: int, sym: bool, n_grid: int) -> tuple[torch.Tensor, float, list[float]]:
    """(s, chosen exponent a, loss for every a) of the grid search in the module docstring."""
    exps = torch.arange(n_grid, dtype=torch.float32) / n_grid
    s_all = mean_abs.clamp(min=0)[None, :].pow(exps[:, None]).clamp(min=1e-4)  # [n_grid, in]
    s_all = s_all / (s_all.amax(1, keepdim=True) * s_all.amin(1, keepdim=True)).sqrt()
    losses = torch.zeros(n_grid, dtype=torch.float64)
    for c in range(0, n_grid, _CHUNK):
        sc = s_all[c:c + _CHUNK, None, :]  # [k, 1, in]
        for w, g in zip(weights, groups):
            d = w[None] - _fake_rtn(w[None] * sc, bits, g, sym) / sc  # [k, out, in]
            losses[c:c + _CHUNK] += ((d @ h) * d).sum((1, 2)).double()
    best = int(torch.argmin(losses))  # first minimum: the smallest exponent among ties
    return s_all[best], best / n_grid, losses.tolist()


def clip_search(w: torch.Tensor, h: torch.Tensor, *, bits: int, group: int, sym: bool) -> tuple[torch.Tensor, float]:
    """``W`` clamped per (row, group) to the ratio minimizing the group's output error; (clamped W, mean ratio)."""
    out_f, in_f = w.shape
    ng = in_f // group
    wg = w.reshape(out_f, ng, group)
    hb = torch.stack([h[i * group:(i + 1) * group, i * group:(i + 1) * group] for i in range(ng)])  # [ng, g, g]
    if sym:
        hi = wg.abs().amax(dim=-1, keepdim=True)
        lo = -hi
    else:
        hi = wg.amax(dim=-1, keepdim=True).clamp(min=0)
        lo = wg.amin(dim=-1, keepdim=True).clamp(max=0)
    ratios = 1.0 - torch.arange(int(_CLIP_MAX_SHRINK * _CLIP_GRID), dtype=torch.float32) / _CLIP_GRID
    errs = []
    for c in range(0, len(ratios), _CHUNK):
        r = ratios[c:c + _CHUNK, None, None, None]  # [k, 1, 1, 1]
        wc = torch.maximum(torch.minimum(wg[None], hi[None] * r), lo[None] * r)  # [k, out, ng, g]
        d = wg[None] - _fake_rtn(wc, bits, group, sym)
        dg = d.permute(2, 0, 1, 3).reshape(ng, -1, group)  # [ng, k*out, g]
        e = (torch.bmm(dg, hb) * dg).sum(-1)  # [ng, k*out]
        errs.append(e.reshape(ng, -1, out_f).permute(1, 2, 0))  # [k, out, ng]
    best = torch.argmin(torch.cat(errs), dim=0)  # [out, ng]; first minimum: the mildest clipping among ties
    best_r = ratios[best][..., None]
    clipped = torch.maximum(torch.minimum(wg, hi * best_r), lo * best_r)
    return clipped.reshape(out_f, in_f), float(best_r.mean())


class AWQ(Pass):
    name: ClassVar[str] = "awq"
    Options: ClassVar[type[AWQOptions]] = AWQOptions
    establishes: ClassVar[frozenset[str]] = frozenset({"weights_quantized"})
    forbids: ClassVar[frozenset[str]] = frozenset({"weights_quantized", "norms_folded"})  # see passes/base.py
    needs_calibration: ClassVar[bool] = True

    def run(self, module: Module, ctx: PassContext) -> PassResult:
        with torch.no_grad():
            return self._run(module, ctx)

    def _run(self, module: Module, ctx: PassContext) -> PassResult:
        o: AWQOptions = self.options
        o.validate()
        selected, skipped = select_linears(module, o)
        group_of: dict[fx.Node, int] = group_sizes(module, selected, o.group, o.bits,  # before any work
                                                   pass_name=self.name)
        require_calibration(ctx, self.name)
        if not selected:
            return PassResult(module, False, {"reason": why_none_selected(module, skipped, self.name), "quantized": 0,
                                              "scaled": 0, "skipped": skipped})
        sites, not_scaled = find_sites(module, selected)
        hstats, reps = collect_input_stats(module, ctx, selected, gram_stats_with_abs)
        unseen = [x for x, st in hstats.items() if st.tokens == 0]
        if unseen:
            raise ConfigError(f"awq: the calibration data never reached the input of "
                              f"{source_path(reps[unseen[0]]) or reps[unseen[0]].name}")

        edits = WeightEdits(module)
        scale_of: dict[fx.Node, torch.Tensor] = {}
        site_stats: dict[str, dict] = {}
        alpha_of: dict[fx.Node, float] = {}
        it = sites
        if ctx.progress:
            from tqdm import tqdm

            it = tqdm(sites, desc="awq scales", unit="input", leave=False)
        for site in it:
            st = hstats[site.x]
            ws = [module.weight(c.args[1]).to(torch.float32) for c in site.selected]
            s, a, losses = search_scale(ws, [group_of[c] for c in site.selected], st.mean_gram(), st.mean_abs(),
                                        bits=o.bits, sym=o.sym, n_grid=o.n_grid)
            edits.fold(site, s)
            scale_of[site.x] = s
            for c in site.selected:
                alpha_of[c] = a
            site_stats[site.producer] = {"kind": site.kind, "alpha": a, "loss_rtn": losses[0],
                                         "loss_awq": min(losses),
                                         "consumers": [source_path(c) or c.name for c in site.consumers]}

        def rewrite(layer: Layer) -> Rewritten:
            n, x, g = layer.node, layer.x, group_of[layer.node]
            h = hstats[x].mean_gram()
            if x in scale_of:
                inv = 1.0 / scale_of[x]
                h = h * inv[:, None] * inv[None, :]
            w = edits.weight_of(n).to(torch.float32)
            clip_ratio = 1.0
            wc = w
            if o.clip:
                wc, clip_ratio = clip_search(w, h, bits=o.bits, group=g, sym=o.sym)
            q, scales, zeros = rtn_quantize(wc, o.bits, g, o.sym)
            qw = QuantizedWeight(q, scales, zeros, o.bits, g)
            w_hat = qw.dequantize()
            out_err = relative_output_error(w, w_hat, h)
            # RTN on the unscaled, unclipped weight in the same coordinates, for comparison.
            w0 = layer.weight.to(torch.float32)
            rtn_err = relative_output_error(w0, _fake_rtn(w0, o.bits, g, o.sym), hstats[x].mean_gram())
            info = {"pass": self.name, "method": "awq", "alpha": alpha_of.get(n), "scaled": x in scale_of,
                    "clip_ratio_mean": clip_ratio, "rel_error": relative_error(w, w_hat), "out_error": out_err,
                    "rtn_out_error": rtn_err}
            new, wnode = replace_with_wq_linear(module, n, qw, spec=info)
            return Rewritten.replaced(new, wnode, {k: info[k] for k in (
                "alpha", "scaled", "clip_ratio_mean", "rel_error", "out_error", "rtn_out_error")})

        # The scales reach the producers (norms, rows of earlier linears) once every layer is quantized.
        done = rewrite_linears(module, ctx, selected, rewrite, skipped=skipped, who=self.name, desc="awq quantize",
                               finish=edits.commit)
        log.info("awq: %d linears to %d bits (group %s), %d inputs scaled, %d layers unscaled", len(done.layers),
                 o.bits, o.group, len(site_stats), len(not_scaled))
        stats = {"quantized": len(done.layers), "scaled": len(site_stats), "weights_rescaled": done.finished,
                 "skipped": skipped, "not_scaled": [(source_path(n) or n.name, why) for n, why in not_scaled],
                 "bytes_before": done.bytes_before, "bytes_after": done.bytes_after, "sites": site_stats,
                 "layers": done.layers, "calibration_tokens": max(st.tokens for st in hstats.values())}
        return PassResult(module, True, stats)
