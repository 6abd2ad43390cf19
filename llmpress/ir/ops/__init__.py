"""Compressed ops of the ``llmpress`` namespace (``torch.ops.llmpress.*``).

Importing this package registers every op (a ``torch.library`` custom op with a reference kernel and a fake
kernel), which a graph containing them needs to run, export, or be loaded with ``torch.export.load``.
One op family per file; add an import line here for each.
"""
from __future__ import annotations

from . import kv_quant
from . import w8a8
from . import wq_linear

__all__ = ["kv_quant", "w8a8", "wq_linear"]
