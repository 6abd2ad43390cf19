"""Evaluation: perplexity (one pinned protocol), sizes, greedy generation, latency."""
from __future__ import annotations

from .generate import empty_cache, greedy
from .perplexity import PerplexityResult, paragraphs, perplexity, token_stream
from .size import parameter_bytes, weight_bytes_by_name

__all__ = ["greedy", "empty_cache", "perplexity", "token_stream", "paragraphs", "PerplexityResult",
           "parameter_bytes", "weight_bytes_by_name"]
