"""Gemma 2 Hugging Face folders -> ``llmpress.models.Llama`` with Gemma's switches.

Gemma 2 is the Llama layout plus: embeddings scaled by ``sqrt(hidden_size)``; RMSNorms that multiply by
``1 + weight`` (the loader adds the 1 to every norm weight once, in float32, the value HF computes each call);
"sandwich" norms (``post_attention_layernorm`` normalizes the attention output, and a ``pre_``/``post_feedforward``
norm wraps the MLP); a GeGLU MLP (``gelu_pytorch_tanh``); attention scaled by ``query_pre_attn_scalar ** -0.5``
and soft-capped (``cap * tanh(s / cap)``); soft-capped logits; tied embeddings; sliding-window layers alternating
with global ones (exact here only while the cache fits the window, as for Mistral: ``hf._sliding_window_check``).
"""
from __future__ import annotations

from pathlib import Path

import torch

from ...errors import LoadError

__all__ = ["gemma_switches", "add_one_to_norms"]


def gemma_switches(cfg: dict, where: Path) -> dict:
    """The ``LlamaConfig`` fields Gemma 2 sets beyond the Llama layout's."""
    act = cfg.get("hidden_activation") or cfg.get("hidden_act") or "gelu_pytorch_tanh"
    if act not in ("gelu_pytorch_tanh", "gelu_new"):
        raise LoadError(f"{where}: hidden_activation {act!r} is not supported (Gemma's gelu_pytorch_tanh only)")
    dim = int(cfg["hidden_size"])
    scalar = cfg.get("query_pre_attn_scalar") or cfg.get("head_dim") or dim // int(cfg["num_attention_heads"])
    return dict(mlp="geglu", sandwich_norms=True, embed_scale=dim ** 0.5, attn_scale=float(scalar) ** -0.5,
                attn_softcap=float(cfg.get("attn_logit_softcapping") or 0.0),
                final_softcap=float(cfg.get("final_logit_softcapping") or 0.0))


def add_one_to_norms(weights: dict[str, torch.Tensor]) -> None:
    """Gemma's RMSNorm computes ``normed * (1 + w)``; ours ``w * normed``: store ``1 + w`` (float32, exact)."""
    for name in list(weights):
        if name.endswith("layernorm.weight") or name == "model.norm.weight":
            weights[name] = 1.0 + weights[name]
