"""Numeric helpers shared by the weight-quantization passes (``quantize``, ``gptq``, ``awq``, ...).

Quantization grid of a group of weights ``w`` (one output row, ``group`` consecutive input columns), b bits:

- symmetric: ``q = clamp(round(w / s), -2^(b-1), 2^(b-1) - 1)``, ``w_hat = q * s`` with the absmax scale
  ``s = r * max|w| / (2^(b-1) - 1)``. Dividing by ``2^(b-1) - 1`` (not ``2^(b-1)`` or ``2^(b-1) - 1/2``) makes
  ``+-max|w|`` exactly representable, so the largest weight of a group is never clipped (for r = 1); the one extra
  negative level ``-2^(b-1)`` stays available to error-feedback methods such as GPTQ. This is the RTN baseline
  the reference model's README reports (int8 per channel 1.0000x, int4 g128 1.0038x, int3 g32 1.019x).
- asymmetric: ``s = r * (max(w, 0) - min(w, 0)) / (2^b - 1)``, zero point ``z = clamp(round(-r * min(w, 0) / s),
  0, 2^b - 1)``, ``q = clamp(round(w / s) + z, 0, 2^b - 1)``, ``w_hat = (q - z) * s``. The range always contains
  0 so that zero weights stay exactly zero.

``r`` is the clipping ratio: 1 for plain round-to-nearest; ``find_params(..., clip_search=True)`` searches
``r in {1, 1 - 1/grid, ..., 1 - maxshrink}`` per row and keeps the r minimizing ``sum |w - w_hat|^p`` (p = 2.4),
the MSE grid search of the GPTQ reference code's ``Quantizer(mse=True)``.

The rewrite helper ``replace_with_wq_linear`` turns an ``aten.linear`` into ``llmpress::wq_linear`` with the
storage layout of ``llmpress.ir.ops.wq_linear`` and records what was done on the new node.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from ..errors import ConfigError
from ..ir.meta import compression, set_compression, source_path
from ..ir.module import Module
from ..ir.ops.wq_linear import SUPPORTED_BITS, pack_weight, qrange, values_per_unit

__all__ = [
    "SUPPORTED_BITS",
    "check_bits",
    "check_group_option",
    "group_size_for",
    "group_problems",
    "group_sizes",
    "find_params",
    "quantize_codes",
    "dequantize_codes",
    "fake_quant",
    "rtn_quantize",
    "QuantizedWeight",
    "replace_with_wq_linear",
    "relative_error",
    "sqnr_db",
    "linear_weight",
    "weight_stem",
    "sparsity_mask",
    "SPARSITY_KEYS",
]


def check_bits(bits: int, *, pass_name: str) -> None:
    if bits not in SUPPORTED_BITS:
        raise ConfigError(f"pass {pass_name!r}: bits={bits} is not supported (choose one of "
                          f"{', '.join(map(str, sorted(SUPPORTED_BITS, reverse=True)))})")


def check_group_option(group: int, *, pass_name: str) -> None:
    if group < -1:
        raise ConfigError(f"pass {pass_name!r}: group={group} must be positive, or 0 / -1 for per channel")


def _group_problem(group: int, in_features: int, bits: int, layer: str) -> str | None:
    g = in_features if group in (0, -1) else group
    if in_features % g:
        return f"group={group} does not divide in_features={in_features} of layer {layer!r}"
    unit = values_per_unit(bits)
    if in_features % unit:
        return f"{bits}-bit packing needs in_features divisible by {unit}, layer {layer!r} has {in_features}"
    return None


def group_size_for(group: int, in_features: int, bits: int, *, layer: str, pass_name: str) -> int:
    """The group size used for a layer with ``in_features`` inputs (``group`` 0 or -1: per channel), or a
    ConfigError naming the layer when it does not divide the layer or the packed layout."""
    problem = _group_problem(group, in_features, bits, layer)
    if problem:
        raise ConfigError(f"pass {pass_name!r}: {problem}; choose a group that divides it or exclude the layer")
    return in_features if group in (0, -1) else group


def group_problems(module: Module, nodes, group: int, bits: int) -> list[str]:
    """Every selected linear (``nodes``) that ``group`` / ``bits`` do not fit, one line each."""
    out = []
    for node in nodes:
        _, w = linear_weight(module, node)
        problem = _group_problem(group, w.shape[1], bits, source_path(node) or node.name)
        if problem:
            out.append(problem)
    return out


def group_sizes(module: Module, nodes, group: int, bits: int, *, pass_name: str) -> dict:
    """{node: group size} for every selected linear, or one ConfigError listing every layer that does not fit,
    so a user fixes the options once instead of once per layer."""
    problems = group_problems(module, nodes, group, bits)
    if problems:
        raise ConfigError(f"pass {pass_name!r}: {len(problems)} layer(s) do not fit group={group}, bits={bits} "
                          "(choose a group that divides them, or exclude them):\n  " + "\n  ".join(problems))
    return {node: group_size_for(group, linear_weight(module, node)[1].shape[1], bits,
                                 layer=source_path(node) or node.name, pass_name=pass_name) for node in nodes}


def _grid(bits: int, sym: bool) -> tuple[int, int]:
    return qrange(bits, sym)


def _params_for_ratio(w: torch.Tensor, bits: int, sym: bool, r: float | torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale [rows] and zero point [rows] (None when symmetric) of each row of ``w`` [rows, cols]; with ratios
    ``r`` of shape [R, 1], scale and zero are [R, rows]."""
    lo, hi = _grid(bits, sym)
    if sym:
        amax = w.abs().amax(dim=1) * r
        scale = amax / hi
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        return scale, None
    wmin = w.amin(dim=1).clamp(max=0) * r
    wmax = w.amax(dim=1).clamp(min=0) * r
    scale = (wmax - wmin) / hi
    ok = scale > 0
    scale = torch.where(ok, scale, torch.ones_like(scale))
    zero = torch.clamp(torch.round(-wmin / scale), 0, hi)
    return scale, zero


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int) -> torch.Tensor:
    """Integer q (as float) for ``w`` [rows, cols] with per-row (or broadcastable) ``scale``/``zero``."""
    sym = zero is None
    lo, hi = _grid(bits, sym)
    s = scale if scale.dim() == w.dim() else scale.unsqueeze(-1)
    q = torch.round(w / s)
    if not sym:
        z = zero if zero.dim() == w.dim() else zero.unsqueeze(-1)
        q = q + z
    return q.clamp(lo, hi)


def dequantize_codes(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None) -> torch.Tensor:
    s = scale if scale.dim() == q.dim() else scale.unsqueeze(-1)
    if zero is None:
        return q * s
    z = zero if zero.dim() == q.dim() else zero.unsqueeze(-1)
    return (q - z) * s


def fake_quant(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int) -> torch.Tensor:
    """``w_hat = dequant(quant(w))`` on the grid given by ``scale``/``zero``."""
    return dequantize_codes(quantize_codes(w, scale, zero, bits), scale, zero)


def find_params(w: torch.Tensor, bits: int, sym: bool, *, clip_search: bool = False, grid: int = 100,
                maxshrink: float = 0.8, norm: float = 2.4) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-row grid of ``w`` [rows, cols]: (scale [rows], zero [rows] or None). See the module docstring."""
    w = w.float()
    scale, zero = _params_for_ratio(w, bits, sym, 1.0)
    if not clip_search:
        return scale, zero
    # All ratios at once ([R, rows, cols] per chunk of rows); argmin keeps the largest ratio among equal errors,
    # as a loop from r = 1 downwards with a strict "<" would.
    ratios = torch.tensor([1.0 - i / grid for i in range(int(maxshrink * grid) + 1)], device=w.device).unsqueeze(1)
    lo, hi = _grid(bits, sym)
    rows, cols = w.shape
    # Chunks of ~1M elements stay in cache across the eight elementwise steps below (64M-element chunks made
    # every step a trip to memory: 3x slower on 2 cores, same result since every row is its own problem).
    chunk = max(1, _CLIP_CHUNK // (ratios.shape[0] * max(cols, 1)))
    for r0 in range(0, rows, chunk):
        wc = w[r0:r0 + chunk]
        s_all, z_all = _params_for_ratio(wc, bits, sym, ratios)  # [R, rows]
        s3 = s_all.unsqueeze(-1)
        # |w - fake_quant(w)|^p in place: the operations of quantize_codes / dequantize_codes, in their order.
        d = wc.unsqueeze(0) / s3
        d.round_()
        if z_all is not None:
            z3 = z_all.unsqueeze(-1)
            d.add_(z3).clamp_(lo, hi).sub_(z3)
        else:
            d.clamp_(lo, hi)
        d.mul_(s3)
        torch.sub(wc.unsqueeze(0), d, out=d)
        err = d.abs_().pow_(norm).sum(-1)
        best = err.argmin(dim=0, keepdim=True)  # [1, rows]
        scale[r0:r0 + chunk] = s_all.gather(0, best).squeeze(0)
        if zero is not None:
            zero[r0:r0 + chunk] = z_all.gather(0, best).squeeze(0)
    return scale, zero


_CLIP_CHUNK = 1 << 20  # elements per chunk of the clipping search


def rtn_quantize(w: torch.Tensor, bits: int, group: int, sym: bool, *, clip_search: bool = False
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Round-to-nearest of ``w`` [out, in] in groups of ``group`` columns:
    (q int32 [out, in], scales float32 [out, in/group], zeros float32 [out, in/group] or None)."""
    out_f, in_f = w.shape
    ng = in_f // group
    wg = w.float().reshape(out_f * ng, group)
    scale, zero = find_params(wg, bits, sym, clip_search=clip_search)
    q = quantize_codes(wg, scale, zero, bits).reshape(out_f, in_f)
    return q.to(torch.int32), scale.reshape(out_f, ng), None if zero is None else zero.reshape(out_f, ng)


@dataclass
class QuantizedWeight:
    """The result of quantizing one linear weight: integer q [out, in], scales/zeros [out, in/group]."""

    q: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    bits: int
    group_size: int

    def dequantize(self) -> torch.Tensor:
        gi = torch.arange(self.q.shape[1]) // self.group_size
        z = None if self.zeros is None else self.zeros[:, gi].float()
        return dequantize_codes(self.q.float(), self.scales[:, gi].float(), z)


def relative_error(w: torch.Tensor, w_hat: torch.Tensor) -> float:
    """``||W - W_hat||_F / ||W||_F``."""
    w, w_hat = w.detach().float(), w_hat.detach().float()
    den = float(torch.linalg.norm(w))
    return float(torch.linalg.norm(w - w_hat)) / den if den > 0 else 0.0


def sqnr_db(ref: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio ``20 log10(||ref|| / ||ref - approx||)`` in dB."""
    ref, approx = ref.detach().float(), approx.detach().float()
    noise = float(torch.linalg.norm(ref - approx))
    sig = float(torch.linalg.norm(ref))
    return float("inf") if noise == 0 else 20.0 * torch.log10(torch.tensor(sig / noise)).item()


def linear_weight(module: Module, node: fx.Node) -> tuple[str, torch.Tensor]:
    """(state-dict name, tensor) of the weight of an ``aten.linear`` node."""
    wnode = node.args[1]
    return module.weight_name(wnode), module.weight(wnode)


def weight_stem(name: str) -> str:
    """``model.layers.0.mlp.up_proj`` for ``model.layers.0.mlp.up_proj.weight``: the prefix new weights share."""
    return name[: -len(".weight")] if name.endswith(".weight") else name


# What ``sparsify`` records on a linear and a later quantizer carries onto its ``wq_linear`` (``method`` becomes
# ``sparsify_method``: the quantizer's own ``method`` keeps its key).
SPARSITY_KEYS = ("sparsity", "pattern", "method")


def sparsity_mask(node: fx.Node, w: torch.Tensor) -> torch.Tensor | None:
    """Where ``w`` was pruned (bool ``[out, in]``, True = fixed at zero) when ``node``'s compression metadata says
    ``sparsify`` ran on it, else None. The mask is the weight's exact zeros: ``sparsify`` keeps the linear dense
    with zeros in it, so the zeros are the whole record, and no mask tensor has to follow the weight around."""
    spec = compression(node) or {}
    if spec.get("pass") != "sparsify":
        return None
    return w.detach() == 0


def _carried_sparsity(node: fx.Node) -> dict[str, Any]:
    spec = compression(node) or {}
    if spec.get("pass") != "sparsify":
        return {}
    return {("sparsify_method" if k == "method" else k): spec[k] for k in SPARSITY_KEYS if k in spec}


def replace_with_wq_linear(module: Module, node: fx.Node, qw: QuantizedWeight, *, spec: dict[str, Any]
                           ) -> tuple[fx.Node, fx.Node]:
    """Replace the ``aten.linear`` ``node`` by ``llmpress::wq_linear`` on the packed ``qw``.

    Adds the packed weight, scales (float32) and zero points (uint8, asymmetric only) as weights, rewires the
    users, erases the old node and records ``spec`` (plus bytes before/after) as the node's compression metadata.
    Returns (new node, the old weight placeholder) — the caller drops dead weights with
    ``module.remove_unused_weights(only=...)`` and recompiles once after all rewrites.
    """
    x = node.args[0]
    wnode = node.args[1]
    bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    wname, w = linear_weight(module, node)
    base = weight_stem(wname)
    sym = qw.zeros is None
    packed = pack_weight(qw.q, qw.bits, sym=sym)
    qnode = module.add_weight(module.fresh_weight_name(base + ".qweight"), packed)
    snode = module.add_weight(module.fresh_weight_name(base + ".scales"), qw.scales.to(torch.float32).contiguous())
    znode = None
    zeros = None
    if not sym:
        zeros = qw.zeros.round().to(torch.uint8).contiguous()
        znode = module.add_weight(module.fresh_weight_name(base + ".zeros"), zeros)
    new = module.call(torch.ops.llmpress.wq_linear.default, (x, qnode, snode, znode, bias, qw.bits, qw.group_size),
                      like=node)
    node.replace_all_uses_with(new)
    module.erase([node])
    after = packed.numel() * packed.element_size() + qw.scales.numel() * 4 + (zeros.numel() if zeros is not None else 0)
    # Rounding maps 0 to the code of 0 on both grids (symmetric q = 0; asymmetric q = z, the range holds 0), so the
    # zeros of a sparsified weight survive; its sparsity record moves to the new node, measured on what is stored.
    carried = _carried_sparsity(node)
    if carried:
        carried["sparsity"] = round(float((qw.dequantize() == 0).float().mean()), 4)
    earlier = compression(node) or {}  # what an earlier rewrite recorded (factorize's rank) stays visible
    full = {k: v for k, v in earlier.items() if k not in ("pass", "method", "bytes_before", "bytes_after")}
    if earlier.get("pass"):
        full["after"] = earlier["pass"]
    full.update(spec)
    full.update(carried)
    full.update({"bits": qw.bits, "group": qw.group_size, "sym": sym, "weight": wname,
                 "bytes_before": w.numel() * w.element_size(), "bytes_after": after,
                 "source": source_path(new)})
    set_compression(new, full)
    return new, wnode
