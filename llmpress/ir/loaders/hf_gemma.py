"""Gemma 2 and Gemma 3 (text) Hugging Face folders -> ``llmpress.models.Llama`` with Gemma's switches.

Gemma 2 is the Llama layout plus: embeddings scaled by ``sqrt(hidden_size)``; RMSNorms that multiply by
``1 + weight`` (the loader adds the 1 to every norm weight once, in float32, the value HF computes each call);
"sandwich" norms (``post_attention_layernorm`` normalizes the attention output, and a ``pre_``/``post_feedforward``
norm wraps the MLP); a GeGLU MLP (``gelu_pytorch_tanh``); attention scaled by ``query_pre_attn_scalar ** -0.5``
and soft-capped (``cap * tanh(s / cap)``); soft-capped logits; tied embeddings; sliding-window layers alternating
with global ones (exact here only while the cache fits the window, as for Mistral: ``hf._sliding_window_check``).

Gemma 3 (``gemma3_text``) adds per-head q/k RMSNorms (also ``1 + w``) and gives its sliding-window layers their own
RoPE (``rope_parameters["sliding_attention"]``: another theta) while global layers use ``full_attention``'s
(possibly scaled); both tables come from transformers' own ``Gemma3RotaryEmbedding``. No soft-capping by default.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ...errors import LoadError

__all__ = ["GEMMA_TYPES", "gemma_switches", "add_one_to_norms"]

GEMMA_TYPES = ("gemma2", "gemma3_text")


def gemma_switches(cfg: dict, where: Path) -> dict:
    """The ``LlamaConfig`` fields Gemma 2 sets beyond the Llama layout's."""
    act = cfg.get("hidden_activation") or cfg.get("hidden_act") or "gelu_pytorch_tanh"
    if act not in ("gelu_pytorch_tanh", "gelu_new"):
        raise LoadError(f"{where}: hidden_activation {act!r} is not supported (Gemma's gelu_pytorch_tanh only)")
    dim = int(cfg["hidden_size"])
    scalar = cfg.get("query_pre_attn_scalar") or cfg.get("head_dim") or dim // int(cfg["num_attention_heads"])
    out = dict(mlp="geglu", sandwich_norms=True, embed_scale=dim ** 0.5, attn_scale=float(scalar) ** -0.5,
               attn_softcap=float(cfg.get("attn_logit_softcapping") or 0.0),
               final_softcap=float(cfg.get("final_logit_softcapping") or 0.0))
    if cfg.get("model_type") == "gemma3_text":
        if cfg.get("use_bidirectional_attention"):
            raise LoadError(f"{where}: use_bidirectional_attention=true is not a causal LM")
        out.update(qk_norm=True, **_gemma3_rope(cfg, where))
    return out


def _gemma3_rope(cfg: dict, where: Path) -> dict:
    """Both RoPE tables of Gemma 3, computed by transformers' ``Gemma3RotaryEmbedding`` from the config."""
    from transformers import AutoConfig
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RotaryEmbedding

    from .hf import STATIC_ROPE_TYPES

    try:
        hf = AutoConfig.for_model(**cfg)
        for kind, params in (hf.rope_parameters or {}).items():
            rope_type = (params or {}).get("rope_type", "default")
            if rope_type not in ("default", *STATIC_ROPE_TYPES):
                raise LoadError(f"{where}: rope scaling type {rope_type!r} ({kind}) is not supported")
        rope = Gemma3RotaryEmbedding(hf)
    except (KeyError, TypeError, ValueError) as e:
        raise LoadError(f"{where}: Gemma 3 RoPE: transformers could not compute it: {e}") from e
    local = tuple(i for i, t in enumerate(hf.layer_types) if t == "sliding_attention")
    out: dict = {"local_layers": local}
    if len(local) < len(hf.layer_types):  # some global layers (a model of only sliding layers has no such table)
        out.update(rope_inv_freq=tuple(float(f) for f in rope.full_attention_inv_freq),
                   rope_attention_scaling=float(rope.full_attention_attention_scaling))
    if local:
        out["rope_local_inv_freq"] = tuple(float(f) for f in rope.sliding_attention_inv_freq)
    return out


def add_one_to_norms(weights: dict[str, torch.Tensor]) -> None:
    """Gemma's RMSNorm computes ``normed * (1 + w)``; ours ``w * normed``: store ``1 + w`` (float32, exact). Every
    norm: the layer norms, the final one and Gemma 3's q/k norms."""
    for name in list(weights):
        if name.endswith("norm.weight"):
            weights[name] = 1.0 + weights[name]
