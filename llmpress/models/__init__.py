"""Export-friendly model definitions that llmpress captures (see ``llama``)."""
from __future__ import annotations

from .llama import Llama, LlamaConfig

__all__ = ["Llama", "LlamaConfig"]
