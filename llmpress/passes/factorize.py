"""``factorize``: low-rank factorization of linear layers (truncated SVD, ASVD, SVD-LLM).

A selected ``y = x W^T + b`` with ``W [m, n]`` (out, in) becomes two plain ``aten.linear`` nodes::

    h = x A^T          A = factor_v [r, n]
    y = h B^T + b      B = factor_u [m, r]

so every backend runs them with no new op, and a later ``quantize``/``gptq`` quantizes the factors like any other
linear. The layer keeps ``r (m + n)`` of its ``m n`` parameters. Each method factorizes a scaled matrix
``W T = U S V^T`` (SVD), keeps the ``r`` largest singular values and splits them evenly between the factors (so
both have similar magnitudes, which suits a later quantizer)::

    B = U_r S_r^(1/2),   A = S_r^(1/2) V_r^T T^-1,   W_hat = B A = U_r S_r V_r^T T^-1

- ``svd``: ``T = I``: plain truncated SVD, the best rank-r approximation of ``W`` in the Frobenius norm.
- ``asvd`` (Yuan et al. 2023, "ASVD: Activation-aware Singular Value Decomposition"): ``T = diag(s)`` with
  ``s_j = mean_t |x_tj|^alpha`` (``alpha`` 0.5) over the calibration inputs: input channels with large activations
  weigh more in the truncation. (``s`` is clamped to at least ``1e-6 max(s)`` so dead channels stay invertible.)
- ``svd_llm`` (Wang et al. 2024, "SVD-LLM: Truncation-aware Singular Value Decomposition"): ``T = L``, the lower
  Cholesky factor of the Gram matrix of the inputs ``X^T X = L L^T`` (GPTQ's Hessian up to scale), dampened by
  ``damp * mean(diag)`` (retried 10x larger, up to 4 times, when not positive definite). Then
  ``||X (W - W_hat)^T||_F = ||(W - W_hat) L||_F`` and truncating the SVD of ``W L`` minimizes the layer's output
  error on the calibration data exactly: each dropped singular value costs its own square, no more.

Rank, one of (``ratio``/``energy`` ranks are rounded to a multiple of ``multiple``, default 32, then capped at
``min(m, n)``):

- ``rank=N``: that rank for every layer, used as given (not rounded);
- ``ratio=p``: keep the fraction ``p`` of the layer's parameters, ``r = p m n / (m + n)`` rounded to the nearest
  multiple (at least one multiple);
- ``energy=e``: the smallest rank keeping the fraction ``e`` of ``sum S^2`` of the method's scaled matrix, rounded
  up to a multiple.

Why ``multiple`` (default 32): the second factor's ``in_features`` is the rank, and a later weight quantizer needs
its group (and its bit packing, at most 8 values per unit) to divide ``in_features``. 32 keeps every bit width and
``group`` 32 (or 16, 8) working while changing a rank by at most 16; for ``quantize(group=128)`` after
``factorize`` pass ``multiple=128`` (or quantize the ``*.factor_u`` layers with a smaller group), otherwise
``quantize`` stops before any work and lists the layers whose rank its group does not divide.

A layer whose rank would not make it smaller (``r (m + n) >= m n``), whose weight is also read elsewhere (tied),
or which is already a factor is skipped with the reason in ``stats["skipped"]``, not an error. The new nodes'
source paths are ``<layer>.factor_v`` and ``<layer>.factor_u`` (so ``exclude=q_proj`` still names both, and
``*.factor_u`` just the second), and their compression metadata records ``rank``, the method and the layer.
Per layer, ``stats["layers"]`` has the rank, the parameters kept, the energy kept and the relative errors.

Calibration (``asvd``, ``svd_llm``): as ``gptq`` does, block by block in graph order (``calibration.BlockRunner``,
falling back to graph-prefix re-runs), so the statistics of block i are taken on the graph whose blocks ``< i``
are already factorized; memory is one block boundary's values plus one ``[n, n]`` Gram matrix per distinct input.

Selection follows ``quantize``: every linear with a stored 2-D weight, filtered by ``include``/``exclude``;
``exclude=lm_head`` keeps the output head dense (the rows in ``benchmarks/quality.py`` and the tests do).

Measured on tinystories-llama (every linear but ``lm_head``, 16K-token valid prefix, 32 calibration windows of 256
tokens from ``calib.txt``): see ``tests/passes/test_factorize.py`` and the README.
"""
from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
import torch.fx as fx

from ..errors import ConfigError, PassError
from ..ir.meta import compression, set_compression, set_source_path, source_path
from ..ir.module import Module
from . import calib_device
from .base import Pass, PassContext, PassResult, SelectOptions
from .hessian import collect_stats, damped_cholesky, gram_stats_with_abs, output_error
from .layer_rewrite import Layer, Rewritten, rewrite_linears
from .quant_common import linear_weight, relative_error, weight_stem
from .select import select_linears

__all__ = ["Factorize", "FactorizeOptions", "Factors", "choose_rank", "factorize_weight", "NO_CALIBRATION"]

log = logging.getLogger(__name__)

_LINEAR = torch.ops.aten.linear.default
NO_CALIBRATION = "factorize(method={}) needs calibration data (--calib FILE or calibration=...)"


@dataclass(frozen=True)
class FactorizeOptions(SelectOptions):
    """``method``: svd | asvd | svd_llm; exactly one of ``rank`` (fixed), ``ratio`` (fraction of each layer's
    parameters kept) or ``energy`` (fraction of squared singular values kept); ``multiple``: ranks from ratio/energy
    are rounded to a multiple of it; ``alpha``: ASVD's activation exponent; ``damp``: SVD-LLM's Gram dampening as a
    fraction of its mean diagonal."""

    method: Literal["svd", "asvd", "svd_llm"] = "svd"
    rank: int | None = None
    ratio: float | None = None
    energy: float | None = None
    multiple: int = 32
    alpha: float = 0.5
    damp: float = 0.01

    def validate(self) -> None:
        given = [k for k in ("rank", "ratio", "energy") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ConfigError("pass 'factorize': give exactly one of rank=N, ratio=P, energy=E"
                              + (f" (got {', '.join(given)})" if given else ""))
        if self.rank is not None and self.rank < 1:
            raise ConfigError(f"pass 'factorize': rank={self.rank} must be positive")
        if self.ratio is not None and not 0 < self.ratio < 1:
            raise ConfigError(f"pass 'factorize': ratio={self.ratio} must be in (0, 1) (the fraction of each "
                              "layer's parameters kept)")
        if self.energy is not None and not 0 < self.energy < 1:
            raise ConfigError(f"pass 'factorize': energy={self.energy} must be in (0, 1)")
        if self.multiple < 1:
            raise ConfigError(f"pass 'factorize': multiple={self.multiple} must be positive")
        if self.alpha < 0:
            raise ConfigError(f"pass 'factorize': alpha={self.alpha} must be >= 0")
        if not 0 < self.damp < 1:
            raise ConfigError(f"pass 'factorize': damp={self.damp} must be in (0, 1)")


def choose_rank(m: int, n: int, s2: torch.Tensor | None = None, *, rank: int | None = None,
                ratio: float | None = None, energy: float | None = None, multiple: int = 32) -> int:
    """The rank for an ``m x n`` weight (see the module docstring); ``s2``: squared singular values, descending
    (needed for ``energy``). Capped at ``min(m, n)``; whether it makes the layer smaller is the caller's check."""
    full = min(m, n)
    if rank is not None:
        r = rank
    elif ratio is not None:
        exact = ratio * m * n / (m + n)
        r = max(multiple, multiple * math.floor(exact / multiple + 0.5))
    elif energy is not None:
        if s2 is None:
            raise ValueError("energy needs the squared singular values")
        cum = torch.cumsum(s2.double(), 0) / s2.double().sum().clamp_min(1e-300)
        k = int((cum < energy - 1e-12).sum()) + 1  # smallest k with cum[k-1] >= energy
        r = multiple * math.ceil(k / multiple)
    else:
        raise ValueError("give one of rank, ratio, energy")
    return min(r, full)


@dataclass
class Factors:
    """``W ~= u @ v``: ``v [r, n]`` (the first linear), ``u [m, r]`` (the second), and what was kept."""

    u: torch.Tensor
    v: torch.Tensor
    rank: int
    energy: float  # fraction of sum S^2 of the scaled matrix kept

    def weight(self) -> torch.Tensor:
        return self.u @ self.v


def factorize_weight(w: torch.Tensor, *, method: str = "svd", rank: int | None = None, ratio: float | None = None,
                     energy: float | None = None, multiple: int = 32, absmean: torch.Tensor | None = None,
                     gram: torch.Tensor | None = None, alpha: float = 0.5, damp: float = 0.01,
                     layer: str = "?") -> Factors:
    """Factor one weight ``w [m, n]`` (see the module docstring). ``absmean [n]``: mean |x_j| (``asvd``);
    ``gram [n, n]``: ``X^T X`` up to scale (``svd_llm``). The math runs in float64, on the statistics' device;
    factors have ``w``'s dtype and are on the CPU."""
    stats = gram if gram is not None else absmean
    W = w.detach().to(device=w.device if stats is None else stats.device, dtype=torch.float64)
    m, n = W.shape
    if method == "svd":
        scaled = W
    elif method == "asvd":
        if absmean is None:
            raise PassError(f"factorize: asvd needs activation statistics for {layer!r}")
        s = absmean.detach().to(torch.float64).clamp_min(0) ** alpha
        s = s.clamp_min(1e-6 * float(s.max()) if float(s.max()) > 0 else 1.0)
        scaled = W * s
    elif method == "svd_llm":
        if gram is None:
            raise PassError(f"factorize: svd_llm needs activation statistics for {layer!r}")
        L = damped_cholesky(gram.detach().to(torch.float64), damp, layer=layer, who="factorize", what="Gram matrix")
        scaled = W @ L
    else:
        raise ConfigError(f"factorize: unknown method {method!r}")
    U, S, Vh = torch.linalg.svd(scaled, full_matrices=False)
    s2 = S * S
    r = choose_rank(m, n, s2, rank=rank, ratio=ratio, energy=energy, multiple=multiple)
    root = S[:r].sqrt()
    u = U[:, :r] * root
    v = root.unsqueeze(1) * Vh[:r]
    if method == "asvd":
        v = v / s
    elif method == "svd_llm":
        v = torch.linalg.solve_triangular(L, v, upper=False, left=False)  # v L^-1
    kept = float(s2[:r].sum() / s2.sum()) if float(s2.sum()) > 0 else 1.0
    return Factors(u.to(w.dtype).cpu().contiguous(), v.to(w.dtype).cpu().contiguous(), r, kept)


class Factorize(Pass):
    name: ClassVar[str] = "factorize"
    Options: ClassVar[type[FactorizeOptions]] = FactorizeOptions
    establishes: ClassVar[frozenset[str]] = frozenset({"weights_factorized"})
    forbids: ClassVar[frozenset[str]] = frozenset({"weights_quantized"})  # it factorizes float linears only

    @property
    def needs_calibration(self) -> bool:  # type: ignore[override] - depends on the method
        return self.options.method != "svd"

    def run(self, module: Module, ctx: PassContext) -> PassResult:
        o: FactorizeOptions = self.options
        o.validate()
        calib = ctx.calibration
        if o.method != "svd" and calib is None:
            raise ConfigError(NO_CALIBRATION.format(o.method))
        nodes, skipped = select_linears(module, o)
        todo = []
        for node in nodes:
            path = source_path(node) or node.name
            spec = compression(node)
            if spec and spec.get("pass") == self.name:
                skipped.append((path, "already a factor of a factorized layer"))
            elif len(node.args[1].users) > 1:
                skipped.append((path, "its weight is also read elsewhere (tied); the dense copy would stay"))
            elif o.rank is not None or o.ratio is not None:
                # The rank is known without an SVD: skip layers it would not shrink before collecting anything.
                m, n = linear_weight(module, node)[1].shape
                r = choose_rank(m, n, rank=o.rank, ratio=o.ratio, multiple=o.multiple)
                if r * (m + n) >= m * n:
                    skipped.append((path, _not_smaller(r, m, n)))
                else:
                    todo.append(node)
            else:
                todo.append(node)

        def rewrite(layer: Layer) -> Rewritten | str:
            w, st = layer.weight, layer.stats
            m, n = w.shape
            f = factorize_weight(
                w, method=o.method, rank=o.rank, ratio=o.ratio, energy=o.energy, multiple=o.multiple,
                absmean=None if st is None else st.abs_sum / st.tokens,
                gram=None if st is None else st.gram, alpha=o.alpha, damp=o.damp, layer=layer.path)
            if f.rank * (m + n) >= m * n:
                return _not_smaller(f.rank, m, n)
            w_hat = f.weight().float()
            info = {"rank": f.rank, "params_before": m * n, "params_after": f.rank * (m + n),
                    "kept": round(f.rank * (m + n) / (m * n), 4), "energy": round(f.energy, 6),
                    "rel_error": relative_error(w, w_hat)}
            if st is not None:
                info["output_error"] = output_error(w.float(), w_hat, st.gram.float())
            wnode = self._replace(module, layer.node, f, method=o.method, info=info)
            return Rewritten(info, w.numel() * w.element_size(), (f.u.numel() + f.v.numel()) * f.u.element_size(),
                             wnode)

        calibrated = o.method != "svd"
        collect = functools.partial(collect_stats, new=gram_stats_with_abs,
                                    device=calib_device.resolve(ctx.calib_device)) if calibrated else None
        done = rewrite_linears(module, ctx, todo, rewrite, skipped=skipped, who=self.name,
                               desc=f"factorize {o.method}", collect=collect)
        log.info("factorize: %d linears (%s), skipped %d, %.1fs", len(done.layers), o.method, len(skipped),
                 done.seconds)
        result = {**done.stats(module, "factorized", self.name), "method": o.method, "seconds": done.seconds}
        if calibrated:
            result["calibration"] = repr(calib)
        return PassResult(module, bool(done.layers), result)

    def _replace(self, module: Module, node: fx.Node, f: Factors, *, method: str, info: dict) -> fx.Node:
        """``linear(x, W, b)`` -> ``linear(linear(x, A), B, b)``; returns the old weight placeholder."""
        x, wnode = node.args[0], node.args[1]
        bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        wname = module.weight_name(wnode)
        stem = weight_stem(wname)
        path = source_path(node) or node.name
        vnode = module.add_weight(module.fresh_weight_name(f"{stem}.factor_v.weight"), f.v, kind="parameter")
        unode = module.add_weight(module.fresh_weight_name(f"{stem}.factor_u.weight"), f.u, kind="parameter")
        h = module.call(_LINEAR, (x, vnode), like=node)
        y = module.call(_LINEAR, (h, unode) if bias is None else (h, unode, bias), like=node)
        for new, leaf, weight in ((h, "factor_v", f.v), (y, "factor_u", f.u)):
            set_source_path(new, f"{path}.{leaf}")
            # bytes_before on the first factor only, so sums over nodes count the dense weight once
            set_compression(new, {"pass": self.name, "method": method, "rank": f.rank, "factor": leaf[-1],
                                  "layer": path, "weight": wname, "kept": info["kept"],
                                  "rel_error": info["rel_error"],
                                  "bytes_before": module.weight(wnode).numel() * module.weight(wnode).element_size()
                                  if leaf == "factor_v" else 0,
                                  "bytes_after": weight.numel() * weight.element_size()})
        node.replace_all_uses_with(y)
        module.erase([node])
        return wnode


def _not_smaller(r: int, m: int, n: int) -> str:
    return (f"rank {r} keeps {r * (m + n):,} >= {m * n:,} parameters of the {m}x{n} weight: not smaller")
