"""The one explicit pass registry: every pass class is listed here, by hand (no import side effects)."""
from __future__ import annotations

from ..errors import ConfigError
from .base import Pass, did_you_mean

__all__ = ["PASSES", "get_pass", "pass_names"]


def _all() -> list[type[Pass]]:
    # One import per pass file. Keep the list sorted by module name.
    from .act_quant import ActQuant
    from .autobits import AutoBits
    from .awq import AWQ
    from .dce import DeadCodeElimination
    from .distill import Distill
    from .factorize import Factorize
    from .fold_constants import FoldConstants
    from .fold_norm import FoldNorm
    from .fuse_gate_up import FuseGateUp
    from .fuse_qkv import FuseQKV
    from .gptq import GPTQ
    from .kv_quant import KVQuant
    from .lora_attach import LoraAttach
    from .lora_merge import LoraMerge
    from .prune import Prune
    from .quantize import Quantize
    from .smoothquant import SmoothQuant
    from .sparsify import Sparsify

    return [
        ActQuant,
        AutoBits,
        AWQ,
        DeadCodeElimination,
        Distill,
        Factorize,
        FoldConstants,
        FoldNorm,
        FuseGateUp,
        FuseQKV,
        GPTQ,
        KVQuant,
        LoraAttach,
        LoraMerge,
        Prune,
        Quantize,
        SmoothQuant,
        Sparsify,
    ]


_CACHE: dict[str, type[Pass]] | None = None


def PASSES() -> dict[str, type[Pass]]:  # noqa: N802 - reads as a constant
    global _CACHE
    if _CACHE is None:
        _CACHE = {cls.name: cls for cls in _all()}
    return _CACHE


def pass_names() -> list[str]:
    return sorted(PASSES())


def get_pass(name: str) -> type[Pass]:
    try:
        return PASSES()[name]
    except KeyError:
        raise ConfigError(f"unknown pass {name!r}{did_you_mean(name, PASSES())}") from None
