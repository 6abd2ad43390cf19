"""Greedy generation with a KV cache, for anything that follows the LM calling convention.

``forward(input_ids[B,T], start_pos[1], *caches) -> (logits, *caches)`` (see ``llmpress.ir.capture_hf``): the
prompt is one prefill call, then each new token is one decode call (T = 1) that reads and updates the cache, so
the prefix is never recomputed.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from ..errors import ConfigError, LlmpressError
from ..ir.meta import LMInfo

__all__ = ["greedy", "empty_cache"]


def empty_cache(lm: LMInfo, batch: int = 1) -> list[torch.Tensor]:
    """Zero-filled cache tensors for ``batch`` sequences, in call order (``lm.cache_specs()``)."""
    return [torch.zeros((batch, *c["shape"]), dtype=getattr(torch, c["dtype"])) for c in lm.cache_specs()]


def greedy(forward: Callable, lm: LMInfo, prompt_ids: Sequence[int], max_new_tokens: int, *,
           stop_ids: Sequence[int] = (), progress: bool = False) -> list[int]:
    """Return ``prompt_ids`` followed by up to ``max_new_tokens`` greedy tokens (stops early at ``stop_ids``).

    Generation stops at the cache length: a static cache holds ``lm.cache_len`` positions
    (``Artifact.generate_ids`` warns when that cuts a request short).
    """
    if max_new_tokens < 0:
        raise ConfigError(f"max_new_tokens must be 0 or more, got {max_new_tokens}")
    ids = list(prompt_ids)
    if not ids:
        raise LlmpressError("greedy() needs at least one prompt token (BOS)")
    budget = min(max_new_tokens, lm.cache_len - len(ids))
    if budget < 0:
        raise LlmpressError(f"prompt of {len(ids)} tokens does not fit the {lm.cache_len}-position KV cache")
    caches = empty_cache(lm)
    x = torch.tensor([ids], dtype=torch.int64)
    pos = 0
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=budget, desc="generate", unit="tok", leave=False)
    with torch.no_grad():
        for _ in range(budget):
            logits, *caches = forward(x, torch.tensor([pos], dtype=torch.int64), *caches)
            pos += x.shape[1]
            nxt = int(torch.as_tensor(logits)[0, -1].argmax())
            ids.append(nxt)
            if bar is not None:
                bar.update(1)
            if nxt in stop_ids:
                break
            x = torch.tensor([[nxt]], dtype=torch.int64)
    if bar is not None:
        bar.close()
    return ids
