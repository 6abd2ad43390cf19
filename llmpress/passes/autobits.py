"""``autobits``: mixed-precision weight quantization under a size budget, chosen from measured sensitivity.

For the selected linears ``l`` and candidates ``c`` (``bits``/``group`` pairs written ``BgG``: ``3g128``,
``8g0`` per channel, all RTN as ``quantize`` does it), with ``s[l, c]`` the sensitivity of the model to quantizing
``l`` alone with ``c`` (``llmpress.passes.sensitivity``: KL to the float model's next-token distribution, or the
NLL increase, on ``samples`` calibration windows) and ``B[l, c]`` the bytes ``l`` stores under ``c`` (packed codes
+ float32 scales + zero points, as ``llmpress.eval.size`` counts them), it picks one candidate per layer to

    minimize   sum_l s[l, c_l]        subject to   sum_l B[l, c_l] <= budget

(``unit=bits``: ``budget`` bits per weight, so the bound is ``budget * sum_l numel_l / 8`` bytes; ``unit=bytes``:
the bound itself). Summing per-layer scores is the usual additive model of HAWQ-style mixed precision. The
multiple-choice knapsack is solved exactly by dynamic programming over byte counts rounded *up* to a unit
``u = ceil(bound / 100000)`` (so the rounded plan fitting ``floor(bound / u)`` units guarantees the true bytes
fit; the rounding gives up at most ``u`` bytes per layer).

The result is written as explicit pipeline text, one ``scope(include=...)[quantize(bits=..,group=..)]`` per chosen
candidate, which this pass then builds and runs: ``stats["resolved_pipeline"]`` holds it, the artifact manifest
records it (``resolved_pipeline``), and compiling that text reproduces the same weights without calibration.
"""
from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch

from ..errors import ConfigError, PassError
from ..ir.module import Module
from .base import Pass, PassContext, PassResult, SelectOptions
from .quant_common import SUPPORTED_BITS, group_problems
from .select import select_linears, why_none_selected

__all__ = ["AutoBits", "AutoBitsOptions", "parse_candidate", "solve_budget"]

log = logging.getLogger(__name__)

_CANDIDATE = re.compile(r"([0-9]+)g(-?[0-9]+)")
_STATES = 100_000  # DP resolution: byte counts are rounded up to bound / _STATES


def parse_candidate(text: str) -> tuple[int, int]:
    """``"3g128"`` -> (3, 128); ``"8g0"``: per output channel."""
    m = _CANDIDATE.fullmatch(text)
    if not m:
        raise ConfigError(f"pass 'autobits': candidate {text!r} is not BITSgGROUP (e.g. 3g128, 8g0)")
    bits, group = int(m.group(1)), int(m.group(2))
    if bits not in SUPPORTED_BITS:
        raise ConfigError(f"pass 'autobits': candidate {text!r}: bits={bits} is not supported (choose one of "
                          f"{', '.join(map(str, sorted(SUPPORTED_BITS, reverse=True)))})")
    if group < -1:
        raise ConfigError(f"pass 'autobits': candidate {text!r}: group must be positive, or 0 / -1 per channel")
    return bits, group


@dataclass(frozen=True)
class AutoBitsOptions(SelectOptions):
    """``budget``: bits per weight over the selected linears (``unit=bits``, scales and zero points included) or
    their total bytes (``unit=bytes``); ``candidates``: ``BgG`` pairs to choose from; ``sym``: symmetric grids;
    ``metric``: ``kl`` or ``ppl`` (see ``sensitivity``); ``samples`` calibration windows of at most ``seq_len``
    tokens (0: whole windows) to measure on."""

    budget: float = 3.5
    unit: Literal["bits", "bytes"] = "bits"
    candidates: tuple[str, ...] = ("2g64", "3g128", "4g128", "8g0")
    sym: bool = True
    metric: Literal["kl", "ppl"] = "kl"
    samples: int = 4
    seq_len: int = 128

    def validate(self) -> None:
        if not (self.budget > 0 and math.isfinite(self.budget)):
            raise ConfigError(f"pass 'autobits': budget must be a positive number, got {self.budget}")
        if not self.candidates:
            raise ConfigError("pass 'autobits': candidates must name at least one BITSgGROUP (e.g. 3g128|4g128)")
        if len(set(self.candidates)) != len(self.candidates):
            raise ConfigError(f"pass 'autobits': candidates repeat one: {'|'.join(self.candidates)}")
        for c in self.candidates:
            parse_candidate(c)
        if self.samples < 1:
            raise ConfigError(f"pass 'autobits': samples must be at least 1, got {self.samples}")
        if self.seq_len != 0 and self.seq_len < 2:
            raise ConfigError(f"pass 'autobits': seq_len must be at least 2 (or 0: whole windows), got {self.seq_len}")

    def candidate_text(self, candidate: str, include: tuple[str, ...] = (), exclude: tuple[str, ...] = ()) -> str:
        """The ``quantize`` element that applies ``candidate``."""
        bits, group = parse_candidate(candidate)
        opts = [f"bits={bits}", f"group={group}"] + ([] if self.sym else ["sym=false"])
        opts += [f"include={'|'.join(include)}"] if include else []
        opts += [f"exclude={'|'.join(exclude)}"] if exclude else []
        return f"quantize({','.join(opts)})"


def solve_budget(scores: torch.Tensor, costs: torch.Tensor, bound: int) -> list[int] | None:
    """Minimize ``sum_l scores[l, c_l]`` subject to ``sum_l costs[l, c_l] <= bound`` (bytes, ``[L, C]`` each) by
    dynamic programming over costs rounded up to ``ceil(bound / 100000)``; the chosen candidate per layer, or None
    when even the cheapest plan does not fit."""
    n_layers, _ = scores.shape
    unit = max(1, math.ceil(bound / _STATES))
    units = -(-costs.long() // unit)  # ceil
    states = bound // unit + 1
    inf = float("inf")
    best = torch.full((states,), inf, dtype=torch.float64)
    best[0] = 0.0
    choice = torch.zeros((n_layers, states), dtype=torch.int16)
    for l in range(n_layers):
        options = torch.full((scores.shape[1], states), inf, dtype=torch.float64)
        for c in range(scores.shape[1]):
            k = int(units[l, c])
            if k < states:
                options[c, k:] = best[: states - k] + float(scores[l, c])
        best, choice[l] = options.min(dim=0)
    end = int(torch.argmin(best))
    if not math.isfinite(float(best[end])):
        return None
    plan = [0] * n_layers
    for l in range(n_layers - 1, -1, -1):
        plan[l] = int(choice[l, end])
        end -= int(units[l, plan[l]])
    return plan


class AutoBits(Pass):
    """``autobits``: per-layer bits and group under a size budget, from measured sensitivity (RTN quantize)."""

    name: ClassVar[str] = "autobits"
    Options: ClassVar[type[AutoBitsOptions]] = AutoBitsOptions
    establishes: ClassVar[frozenset[str]] = frozenset({"weights_quantized"})
    needs_calibration: ClassVar[bool] = True

    def layer_problems(self, module: Module) -> list[str]:
        """Every candidate must fit every selected layer (its group divides in_features, its packing too)."""
        o: AutoBitsOptions = self.options
        nodes, _ = select_linears(module, o)
        out = []
        for c in o.candidates:
            bits, group = parse_candidate(c)
            out += [f"candidate {c}: {msg}" for msg in group_problems(module, nodes, group, bits)]
        return out

    def run(self, module: Module, ctx: PassContext) -> PassResult:
        from .pipeline import Element, Pipeline, build, print_pipeline
        from .sensitivity import SensitivityProbe, compress_layers

        o: AutoBitsOptions = self.options
        o.validate()
        if ctx.calibration is None:
            raise ConfigError("autobits needs calibration data (--calib FILE or calibration=...)")
        nodes, skipped = select_linears(module, o)
        if not nodes:
            return PassResult(module, False, {"quantized": 0, "skipped": skipped, "resolved_pipeline": "",
                                              "reason": why_none_selected(module, skipped, self.name)})
        problems = self.layer_problems(module)
        if problems:
            raise ConfigError(f"pass 'autobits': {len(problems)} candidate/layer pair(s) do not fit (drop the "
                              "candidate or exclude the layers):\n  " + "\n  ".join(problems))
        # Cheap first: quantize a clone per candidate for the effective weights and exact bytes, and refuse a
        # budget no plan meets before the sensitivity runs.
        per_candidate = {}
        for c in o.candidates:
            layers, _ = compress_layers(module, o.candidate_text(c, o.include, o.exclude), ctx)
            per_candidate[c] = {layer.path: layer for layer in layers}
        paths = [p for p in per_candidate[o.candidates[0]]]
        numel = sum(per_candidate[o.candidates[0]][p].numel for p in paths)
        costs = torch.tensor([[per_candidate[c][p].bytes_after for c in o.candidates] for p in paths])
        bound = int(math.floor(o.budget * numel / 8)) if o.unit == "bits" else int(o.budget)
        cheapest = int(costs.min(dim=1).values.sum())
        if cheapest > bound:
            have = f"{8 * cheapest / numel:.4f} bits per weight" if o.unit == "bits" else f"{cheapest} bytes"
            raise ConfigError(f"pass 'autobits': budget={o.budget} {o.unit} is below the smallest plan the "
                              f"candidates allow ({have}, every layer at its cheapest candidate)")
        probe = SensitivityProbe(module, ctx.calibration, metric=o.metric, samples=o.samples, seq_len=o.seq_len)
        tied = [p for p in paths if probe.shared(per_candidate[o.candidates[0]][p].node) > 1]
        if tied:
            raise ConfigError(f"pass 'autobits': {', '.join(tied)} share(s) a weight with other ops (tied); "
                              "exclude them")
        work = [(p, c) for p in paths for c in o.candidates]
        if ctx.progress:
            from tqdm import tqdm

            work = tqdm(work, desc="autobits sensitivity", unit="probe", leave=False)
        score = {(p, c): probe.score(per_candidate[c][p].node, per_candidate[c][p].weight) for p, c in work}
        scores = torch.tensor([[score[p, c] for c in o.candidates] for p in paths], dtype=torch.float64)
        plan = solve_budget(scores, costs, bound)
        if plan is None:  # the rounding can cost a bound that only the exact cheapest plan meets
            plan = [int(i) for i in costs.argmin(dim=1)]
        chosen = {p: o.candidates[i] for p, i in zip(paths, plan)}
        elements = []
        for c in sorted(o.candidates, key=lambda c: (-parse_candidate(c)[0], c)):
            group = [p for p in paths if chosen[p] == c]
            if group:
                bits, g = parse_candidate(c)
                opts = (("bits", bits), ("group", g)) + ((("sym", False),) if not o.sym else ())
                elements.append((c, group, Element("scope", (("include", "|".join(group)),),
                                                   Pipeline((Element("quantize", opts),)))))
        text = print_pipeline(Pipeline(tuple(e for _, _, e in elements)))
        # Apply the emitted text itself, so what the manifest records is by construction what ran.
        for p, (c, group, elem) in zip(build(text), elements):
            res = p.run(module, PassContext(seed=ctx.seed, target=ctx.target, progress=False))
            if sorted(res.stats.get("layers", {})) != sorted(group):
                raise PassError(f"autobits: the emitted {elem} selected {sorted(res.stats.get('layers', {}))}, "
                                f"not the {len(group)} layers planned for {c}")
        bytes_after = int(sum(costs[i, j] for i, j in enumerate(plan)))
        bytes_before = sum(per_candidate[o.candidates[0]][p].bytes_before for p in paths)
        counts = {c: sum(v == c for v in chosen.values()) for c in o.candidates}
        log.info("autobits: %d linears at %.4f bits per weight (budget %s %s): %s", len(paths),
                 8 * bytes_after / numel, o.budget, o.unit, counts)
        stats = {
            "quantized": len(paths), "skipped": skipped, "budget": o.budget, "unit": o.unit,
            "bits_per_weight": round(8 * bytes_after / numel, 6), "bytes_before": bytes_before,
            "bytes_after": bytes_after, "bound_bytes": bound, "counts": counts, "metric": o.metric,
            "tokens": probe.tokens, "predicted_score": float(sum(scores[i, j] for i, j in enumerate(plan))),
            "layers": {p: {"choice": chosen[p], "params": per_candidate[chosen[p]][p].numel, "bits_per_weight": round(8 * costs[i, plan[i]].item() /
                                                                         per_candidate[chosen[p]][p].numel, 4),
                           "scores": {c: score[p, c] for c in o.candidates}} for i, p in enumerate(paths)},
            "resolved_pipeline": text,
        }
        return PassResult(module, True, stats)
