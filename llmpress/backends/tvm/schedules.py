"""CPU schedule rules applied after legalization (dlight-style: ordered, specific first, "not applicable" = None).

Filled in below; an empty list keeps TVM's default loop nests (correct, single-threaded, slow).
"""
from __future__ import annotations

from typing import Any

__all__ = ["cpu_rules"]


def cpu_rules(target: Any) -> list:
    """The schedule rules for an LLVM CPU target, most specific first."""
    from .kernels import kernel_rule  # llmpress compressed-op kernels (fused dequant-matmul, w8a8, kv quant)

    return [kernel_rule()]
