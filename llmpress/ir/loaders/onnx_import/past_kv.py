"""Decoders exported with a growing KV cache (optimum's convention, also what ``torch.onnx.export(dynamo=True)`` of
a Hugging Face model with a ``DynamicCache`` writes) seen through llmpress's static-cache calling convention.

The file's convention: inputs ``input_ids[B,T]``, ``attention_mask[B,P+T]``, ``position_ids[B,T]`` and
``past_key_values.{i}.key|value[B,H,P,D]``; outputs ``logits[B,T,V]`` and ``present.{i}.key|value[B,H,P+T,D]``
with ``present = concat(past, new)`` along the sequence axis.

llmpress's convention (``LMInfo``): ``forward(input_ids[B,T], start_pos[1], *caches) -> (logits, *caches')`` with
static caches ``[B,H,L,D]`` (``L = cache_len``) in the order ``k_0, v_0, k_1, ...``; position ``start_pos + t`` is
written at cache row ``start_pos + t``.

``PastKVDecoder`` maps one onto the other without any data-dependent shape: the whole static cache is fed as the
past (``P = L``); the attention mask keeps past row ``j`` iff ``j < start_pos`` and keeps every new token (the
graph's own causal mask orders the new tokens among themselves, since their cache positions ``L + t`` follow every
past row); ``position_ids = start_pos + t`` gives RoPE the true positions; and the new keys/values,
``present[:, :, L:]``, are scattered into the caches at rows ``start_pos + t``. So attention sees exactly the
keys at positions ``0 .. start_pos + t``, as the original model would.

Files that lack ``attention_mask`` or ``position_ids`` cannot be driven this way (the unused cache rows would be
attended to, or RoPE would see position ``L + t``) and are refused with a ``LoadError``.
"""
from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ....errors import LoadError
from ...meta import LMInfo

__all__ = ["PastKVLayout", "PastKVDecoder", "detect_past_kv", "DEFAULT_CACHE_LEN"]

log = logging.getLogger(__name__)

DEFAULT_CACHE_LEN = 2048  # when neither the caller nor a config.json beside the file says
_PAST = re.compile(r"^past_key_values\.(\d+)\.(key|value)$")
_PRESENT = re.compile(r"^present\.(\d+)\.(key|value)$")


@dataclass(frozen=True)
class PastKVLayout:
    """Where the graph's inputs and outputs are (indices into its input / output lists)."""

    input_ids: int
    attention_mask: int
    position_ids: int
    past: tuple[int, ...]  # k_0, v_0, k_1, v_1, ...
    logits: int
    present: tuple[int, ...]  # same order as past
    n_kv_heads: int
    head_dim: int
    vocab_size: int

    @property
    def n_layers(self) -> int:
        return len(self.past) // 2


def _layer_slots(names: list[str], pattern: re.Pattern, what: str, source: str) -> dict[tuple[int, int], int]:
    slots = {}
    for i, name in enumerate(names):
        m = pattern.match(name)
        if m:
            slots[(int(m.group(1)), 0 if m.group(2) == "key" else 1)] = i
    n = max((layer for layer, _ in slots), default=-1) + 1
    missing = [f"{what}.{layer}.{('key', 'value')[kv]}" for layer in range(n) for kv in (0, 1)
               if (layer, kv) not in slots]
    if missing:
        raise LoadError(f"{source}: KV-cache {what} incomplete, missing {', '.join(missing)}")
    return slots


def detect_past_kv(graph) -> PastKVLayout | None:
    """The cache layout of an ``OnnxModule`` with ``past_key_values.*`` inputs, None for a graph without them."""
    src = graph.source
    names = [n for n, _, _ in graph.input_info]
    if not any(_PAST.match(n) for n in names):
        return None
    past = _layer_slots(names, _PAST, "past_key_values", src)
    present = _layer_slots(graph.output_names, _PRESENT, "present", src)
    if set(present) != set(past):
        raise LoadError(f"{src}: {len(past) // 2} past_key_values layers but {len(present) // 2} present layers")
    need = ("input_ids", "attention_mask", "position_ids")
    absent = [n for n in need if n not in names]
    if absent:
        raise LoadError(f"{src}: a decoder with past_key_values inputs needs {', '.join(need)} to run with a static "
                        f"cache; this one has no {', '.join(absent)}")
    other = [n for n in names if n not in need and not _PAST.match(n)]
    if other:
        raise LoadError(f"{src}: unexpected input(s) {', '.join(other)} beside input_ids, attention_mask, "
                        "position_ids and past_key_values.*")
    if "logits" not in graph.output_names:
        raise LoadError(f"{src}: a decoder with past_key_values has no 'logits' output")
    dims = graph.input_info[past[(0, 0)]][2]
    logits_dims = next(vi for vi in graph.output_dims if vi[0] == "logits")[1]
    if len(dims) != 4 or not isinstance(dims[1], int) or not isinstance(dims[3], int) or \
            not logits_dims or not isinstance(logits_dims[-1], int):
        raise LoadError(f"{src}: past_key_values must be [batch, kv_heads, past, head_dim] with static kv_heads and "
                        f"head_dim, and logits must end in a static vocab size (got {dims} and {logits_dims})")
    order = [(layer, kv) for layer in range(len(past) // 2) for kv in (0, 1)]
    return PastKVLayout(input_ids=names.index("input_ids"), attention_mask=names.index("attention_mask"),
                        position_ids=names.index("position_ids"), past=tuple(past[k] for k in order),
                        logits=graph.output_names.index("logits"), present=tuple(present[k] for k in order),
                        n_kv_heads=dims[1], head_dim=dims[3], vocab_size=logits_dims[-1])


def _config_beside(source: str) -> dict:
    """optimum writes the model's config.json next to the .onnx file: its context length and special tokens."""
    cfg = Path(source).parent / "config.json"
    try:
        return json.loads(cfg.read_text()) if cfg.is_file() else {}
    except (OSError, ValueError):
        log.warning("%s: unreadable, ignored", cfg)
        return {}


class PastKVDecoder(nn.Module):
    """An imported decoder with a growing cache, run with llmpress's static cache (see the module docstring)."""

    def __init__(self, graph, layout: PastKVLayout, *, cache_len: int | None = None) -> None:
        super().__init__()
        self.body, self.layout, self.source = graph, layout, graph.source
        cfg = _config_beside(graph.source)
        if cache_len is None:
            cache_len = int(cfg.get("max_position_embeddings") or 0) or DEFAULT_CACHE_LEN
            if not cfg.get("max_position_embeddings"):
                log.warning("%s: no config.json with max_position_embeddings beside it; KV cache of %d positions",
                            graph.source, cache_len)
        if cache_len < 1:
            raise LoadError(f"{graph.source}: cache_len must be at least 1, got {cache_len}")
        self.cache_len = int(cache_len)
        eos = cfg.get("eos_token_id", 2)
        eos_ids = tuple(int(e) for e in (eos if isinstance(eos, list) else [eos]) if e is not None)
        bos = cfg.get("bos_token_id", 1)
        self._lm = LMInfo(n_layers=layout.n_layers, n_kv_heads=layout.n_kv_heads, head_dim=layout.head_dim,
                          cache_len=self.cache_len, vocab_size=layout.vocab_size,
                          bos_id=-1 if bos is None else int(bos), eos_id=eos_ids[0] if eos_ids else -1,
                          eos_ids=eos_ids)
        self.info = {**graph.info, "kv_cache": "past_key_values", "cache_len": self.cache_len}

    def lm_info(self) -> LMInfo:
        return self._lm

    def forward(self, input_ids: torch.Tensor, start_pos: torch.Tensor, *caches: torch.Tensor):
        lay, big_l = self.layout, self.cache_len
        b, t = input_ids.shape
        positions = start_pos + torch.arange(t, dtype=torch.int64)  # [T]
        past_kept = (torch.arange(big_l, dtype=torch.int64) < start_pos).to(torch.int64)  # rows 0 .. start_pos-1
        feeds: list[torch.Tensor | None] = [None] * len(self.body.input_info)
        feeds[lay.input_ids] = input_ids
        feeds[lay.attention_mask] = torch.cat([past_kept[None].expand(b, big_l),
                                               torch.ones(b, t, dtype=torch.int64)], dim=1)
        feeds[lay.position_ids] = positions[None].expand(b, t)
        for slot, cache in zip(lay.past, caches):
            feeds[slot] = cache
        outs = self.body(*feeds)
        outs = outs if isinstance(outs, tuple) else (outs,)
        idx = positions.view(1, 1, t, 1).expand(b, lay.n_kv_heads, t, lay.head_dim)
        new_caches = [torch.scatter(cache, 2, idx, outs[slot][:, :, big_l:])  # present = concat(past, new)
                      for slot, cache in zip(lay.present, caches)]
        return (outs[lay.logits], *new_caches)

    # -- capture helpers (the same protocol as OnnxModule) -----------------------------------------------------------
    def empty_cache(self, batch: int = 1) -> list[torch.Tensor]:
        shape = (batch, self.layout.n_kv_heads, self.cache_len, self.layout.head_dim)
        return [torch.zeros(shape) for _ in self.layout.past]

    def example_inputs(self, seq_len: int = 8) -> tuple[torch.Tensor, ...]:
        seq_len = min(seq_len, self.cache_len)
        return (torch.ones(1, seq_len, dtype=torch.int64), torch.zeros(1, dtype=torch.int64), *self.empty_cache())

    def dynamic_shapes(self) -> tuple:
        seq = torch.export.Dim("seq", min=1, max=self.cache_len)
        return ({1: seq}, None, tuple(None for _ in self.layout.past))
