"""Latency of the LM calling convention: prefill of N tokens (ms) and batch-1 decode (tokens/s)."""
from __future__ import annotations

import time
from typing import Callable

import torch

from ..ir.meta import LMInfo
from .generate import empty_cache

__all__ = ["measure", "summarize"]


def measure(forward: Callable, lm: LMInfo, *, prefill_tokens: int = 128, decode_tokens: int = 32,
            repeats: int = 3) -> dict:
    """Median prefill time of ``prefill_tokens`` tokens, and decode throughput right after it (one warm-up run)."""
    prefill_tokens = min(prefill_tokens, lm.cache_len - decode_tokens - 1)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, lm.vocab_size, (1, prefill_tokens), generator=g)
    zero = torch.zeros(1, dtype=torch.int64)
    times, rates = [], []
    with torch.no_grad():
        for r in range(repeats + 1):
            caches = empty_cache(lm)
            t0 = time.perf_counter()
            logits, *caches = forward(ids, zero, *caches)
            t1 = time.perf_counter()
            tok = torch.tensor([[int(torch.as_tensor(logits)[0, -1].argmax())]])
            t2 = time.perf_counter()
            for i in range(decode_tokens):
                logits, *caches = forward(tok, torch.tensor([prefill_tokens + i]), *caches)
                tok = torch.tensor([[int(torch.as_tensor(logits)[0, -1].argmax())]])
            t3 = time.perf_counter()
            if r:  # the first round warms up caches and lazy initialization
                times.append(t1 - t0)
                rates.append(decode_tokens / (t3 - t2))
    return summarize(prefill_tokens, times, rates)


def summarize(prefill_tokens: int, prefill_seconds: list[float], decode_rates: list[float]) -> dict:
    """Medians of repeated rounds, in the keys ``llmpress eval --json`` and the speed benchmark report."""
    times, rates = sorted(prefill_seconds), sorted(decode_rates)
    return {"prefill_tokens": prefill_tokens, "prefill_ms": 1000 * times[len(times) // 2],
            "decode_tokens_per_s": rates[len(rates) // 2]}
