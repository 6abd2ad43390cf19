"""Perplexity with one pinned protocol.

Protocol (the one the reference model's README reports 23.55 with, 54,668 tokens scored on TinyStories valid):
1. the text is split into paragraphs at blank lines (a line that is empty or holds only spaces/tabs);
2. each paragraph is tokenized without special tokens and preceded by BOS; the paragraphs are concatenated into
   one token stream ``s`` of length N;
3. the stream is cut into non-overlapping windows of ``context`` tokens: window k feeds
   ``s[k*context : (k+1)*context]`` from position 0 (fresh KV cache) and predicts the next token at every
   position, ``s[k*context+1 : (k+1)*context+1]`` (the last window is shorter);
4. perplexity = exp(mean NLL over all N-1 predicted tokens).
"""
from __future__ import annotations

import math
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from ..errors import ConfigError
from ..ir.meta import LMInfo
from .generate import empty_cache

__all__ = ["paragraphs", "token_stream", "perplexity", "PerplexityResult"]

_BLANK = re.compile(r"\n[ \t]*\n")


def paragraphs(text: str) -> list[str]:
    return [p.strip() for p in _BLANK.split(text) if p.strip()]


def token_stream(path_or_text: str | Path, tokenizer, *, max_tokens: int | None = None) -> list[int]:
    """BOS + tokens of each paragraph, concatenated (steps 1-2 of the protocol)."""
    p = Path(path_or_text) if not isinstance(path_or_text, str) or "\n" not in path_or_text else None
    if p is not None and not p.exists():
        raise ConfigError(f"data file {str(p)!r} does not exist")
    text = p.read_text(encoding="utf-8") if p is not None else str(path_or_text)
    stream: list[int] = []
    for para in paragraphs(text):
        stream += tokenizer.encode(para, bos=True)
        if max_tokens is not None and len(stream) > max_tokens:
            return stream[:max_tokens]
    return stream


@dataclass(frozen=True)
class PerplexityResult:
    perplexity: float
    nll: float
    tokens: int
    context: int
    windows: int
    seconds: float

    def to_json(self) -> dict:
        return asdict(self)


def perplexity(forward: Callable, lm: LMInfo | None, stream: Sequence[int], *, context: int = 256,
               progress: bool = True) -> PerplexityResult:
    """Score ``stream`` with ``forward`` (LM calling convention when ``lm`` is set, else ``ids -> logits``)."""
    if context < 2:
        raise ConfigError(f"context must be at least 2 tokens, got {context}")
    if lm is not None and context > lm.cache_len:
        raise ConfigError(f"context {context} exceeds the model's KV cache of {lm.cache_len} positions")
    if len(stream) < 2:
        raise ConfigError("perplexity needs at least 2 tokens of text")
    starts = list(range(0, len(stream) - 1, context))
    total_nll = 0.0
    count = 0
    t0 = time.perf_counter()
    it = starts
    if progress:
        from tqdm import tqdm

        it = tqdm(starts, desc="perplexity", unit="win", leave=False)
    with torch.no_grad():
        for s in it:
            window = stream[s : s + context + 1]
            ids = torch.tensor([window[:-1]], dtype=torch.int64)
            target = torch.tensor(window[1:], dtype=torch.int64)
            if lm is not None:
                out = forward(ids, torch.zeros(1, dtype=torch.int64), *empty_cache(lm))
                logits = out[0]
            else:
                logits = forward(ids)
                if isinstance(logits, (tuple, list)):
                    logits = logits[0]
            logits = torch.as_tensor(logits)[0].float()
            total_nll += float(torch.nn.functional.cross_entropy(logits, target, reduction="sum"))
            count += int(target.numel())
    nll = total_nll / count
    return PerplexityResult(perplexity=math.exp(nll), nll=nll, tokens=count, context=context, windows=len(starts),
                            seconds=time.perf_counter() - t0)
