"""Hugging Face model folders -> transformers' own ``nn.Module``.

Every causal LM transformers can build (``AutoModelForCausalLM``: Llama, Qwen2/3, Mistral, Phi-3, Gemma 2/3, GPT-2,
StableLM, ...) loads as transformers' model (``hf_generic``), and ``capture`` takes it through transformers'
``StaticCache`` with the KV-cache calling convention (``llmpress.ir.capture_hf``). No model is written here per
architecture: what transformers computes is what gets compressed. (Until 2026-12, the Llama families were rebuilt
as a hand-written decoder; it was not measurably faster, ``benchmarks/results/capture_paths.md``, so it went.)

Checkpoints are read as they come: one ``model.safetensors`` or shards listed by ``model.safetensors.index.json``,
bf16/fp16 tensors upcast to float32 one at a time (the IR is float32). ``lazy=True`` (what ``capture``/``compile``
of a path use) reads no weight: the module's parameters are shape-only fakes and each is read when a pass asks.
End-of-sequence ids come from ``config.json`` and ``generation_config.json``.

Checked before any weight is read, each failure a ``LoadError`` naming the file: ``config.json`` (present, a JSON
object with a ``model_type``), RoPE variants a static cache cannot compute (their frequencies change with the
sequence length at run time), and the checkpoint's headers (every parameter present with its shape and a float
dtype: ``hf_generic``).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from ...errors import LoadError

__all__ = ["read_config", "load_hf", "check_rope", "DYNAMIC_ROPE_TYPES"]

log = logging.getLogger(__name__)

#: RoPE variants whose frequencies depend on the sequence length at run time (transformers' ``dynamic_rope_update``):
#: one static-cache graph cannot compute them.
DYNAMIC_ROPE_TYPES = ("dynamic", "longrope")


def read_config(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.is_file():
        raise LoadError(f"{folder}: no config.json (not a Hugging Face model folder)")
    try:
        cfg = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LoadError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(cfg, dict):
        raise LoadError(f"{path}: expected a JSON object, found {type(cfg).__name__}")
    if not isinstance(cfg.get("model_type"), str):
        raise LoadError(f"{path}: no model_type (transformers needs it to know the architecture)")
    return cfg


def _rope_types(cfg: dict) -> set[str]:
    """Every ``rope_type`` named by ``rope_scaling`` / ``rope_parameters`` (Gemma 3 nests one entry per layer type)."""
    kinds: set[str] = set()
    for src in (cfg.get("rope_parameters"), cfg.get("rope_scaling")):
        if not isinstance(src, dict):
            continue
        entries = [v for v in src.values() if isinstance(v, dict)] or [src]
        for e in entries:
            kinds.add(str(e.get("rope_type", e.get("type", "default"))))
    return kinds


def check_rope(cfg: dict, where: Path) -> None:
    """Refuse a RoPE variant that changes with the sequence length (``DYNAMIC_ROPE_TYPES``), naming it."""
    bad = sorted(_rope_types(cfg) & set(DYNAMIC_ROPE_TYPES))
    if bad:
        raise LoadError(f"{where}: rope scaling type {bad[0]!r} is not supported: its frequencies change with the "
                        "sequence length at run time, and llmpress compiles one graph over a static KV cache "
                        "(every other rope type is computed by transformers' own code)")


def load_hf(folder: Path, *, cache_len: int | None = None, lazy: bool = False) -> tuple[torch.nn.Module, dict]:
    """Build the model of a Hugging Face folder; returns it and ``config.json``.

    ``lazy``: read no weight now; the parameters are shape-only fakes and the module carries where each one is
    (``hf_generic``, ``ir.lazy``): ``capture`` hands them to the ``ir.Module``, which reads a weight when a pass
    asks. Such a module cannot run in PyTorch itself; capture it. ``cache_len``: the static KV cache's length
    (default ``max_position_embeddings``)."""
    cfg = read_config(folder)
    check_rope(cfg, folder / "config.json")
    from .hf_generic import load_generic  # which reads the checkpoint's headers first (hf_checkpoint)

    return load_generic(folder, cfg, cache_len=cache_len, lazy=lazy), cfg
