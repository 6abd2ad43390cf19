"""The IR: capture, the ``Module`` wrapper, compressed ops, typed node metadata, loaders."""
from __future__ import annotations

from .capture import capture
from .meta import LMInfo, compression, node_id, source_line, source_path
from .module import Module, VerifyError

__all__ = ["capture", "Module", "VerifyError", "LMInfo", "source_path", "node_id", "source_line", "compression",
           "load_model"]


def load_model(*args, **kwargs):
    """See ``llmpress.ir.loaders.load_model``."""
    from .loaders import load_model as _load

    return _load(*args, **kwargs)
