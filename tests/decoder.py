"""A Llama decoder written for capture: static KV cache passed in and returned as tensors.

The parameter names follow Hugging Face's ``LlamaForCausalLM`` (``model.layers.0.self_attn.q_proj``...), so
weights map one to one and include/exclude globs read the same as they do on the Hugging Face model.

Signature of ``forward`` (the calling convention every backend and runner shares)::

    forward(input_ids: int64[B, T], start_pos: int64[1], k_0, v_0, ..., k_{L-1}, v_{L-1})
        -> (logits: float[B, T, V], k_0', v_0', ..., k_{L-1}', v_{L-1}')

Each cache is ``float[B, n_kv_heads, cache_len, head_dim]`` as captured (``kv_quant`` later replaces each with
int8 codes + float32 scales; ``LMInfo.cache_specs()`` always lists the current layout); tokens ``input_ids[:, t]`` sit at position
``start_pos + t`` and are written into the cache there. Prefill is ``start_pos = 0`` with T tokens, decode is
T = 1, so one graph (and one set of compression rewrites) serves both. Attention spans the whole cache with a
causal mask ``key_pos <= query_pos``; masked scores are exactly zero after the softmax, so the result equals
attention over the valid prefix. It is one ``scaled_dot_product_attention`` call with ``enable_gqa`` (the query
heads of a group share their KV head; no backend has to copy the cache per query head).

The same module computes the Llama-layout family and its relatives (``LlamaConfig`` switches): Mistral (Llama layout; its sliding
window is accepted only where it covers the whole cache, so attention is exact, see ``loaders.hf``), Qwen2 (bias on
q/k/v: ``qkv_bias``), Qwen3 (per-head RMSNorm of q and k before RoPE: ``qk_norm``), and Llama's own
``attention_bias`` / ``mlp_bias`` options; Phi-3 (fused checkpoint tensors split at load); GPT-2 (``norm="layer"``,
``positions="learned"``, ``mlp="gelu"``); Gemma 2 (``embed_scale``, ``sandwich_norms``, ``mlp="geglu"``,
soft-capped attention and logits); Gemma 3 (also ``qk_norm`` and a second RoPE table for ``local_layers``).
``loaders.hf`` maps each family's config and tensors onto these switches.

RoPE uses the rotate-half layout of Hugging Face; cos/sin tables are precomputed buffers
(``cos[p, i] = cos(p * theta^(-2(i mod d/2)/d))``), which is what HF computes at run time.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["LlamaConfig", "Llama"]


@dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    hidden_dim: int
    max_seq_len: int
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    tie_embeddings: bool = False
    bos_id: int = 1
    eos_id: int = 2
    head_dim: int = 0  # 0: dim // n_heads
    qkv_bias: bool = False  # bias on q/k/v projections (Qwen2; Llama/Qwen3 attention_bias)
    o_bias: bool = False  # bias on the output projection (Llama/Qwen3 attention_bias)
    mlp_bias: bool = False  # bias on gate/up/down (Llama mlp_bias)
    qk_norm: bool = False  # RMSNorm over head_dim on each query and key head before RoPE (Qwen3)
    eos_ids: tuple = ()  # every end-of-sequence id (config.json and generation_config.json); eos_id is the first
    arch: str = "llama"  # the Hugging Face model_type this config came from (for logs and the manifest)
    # Scaled RoPE (linear / llama3 / yarn): the inverse frequencies and the factor on cos/sin, as computed by
    # transformers' ``ROPE_INIT_FUNCTIONS`` from config.json (``llmpress.ir.loaders.hf``); () means the default
    # ``1 / theta^(2i/d)`` and factor 1.
    rope_inv_freq: tuple = ()
    rope_attention_scaling: float = 1.0
    # GPT-2-style switches (``llmpress.ir.loaders.hf_gpt2``): LayerNorm with bias instead of RMSNorm, learned
    # absolute positions (``model.embed_positions``) instead of RoPE, and the MLP's form.
    norm: str = "rms"  # "rms" | "layer"
    positions: str = "rope"  # "rope" | "learned"
    mlp: str = "swiglu"  # "swiglu": down(silu(gate(x)) * up(x)) | "gelu": down(gelu_tanh(up(x))) | "geglu"
    # Gemma-2-style switches (``llmpress.ir.loaders.hf_gemma``): embeddings times ``embed_scale``; "sandwich" norms
    # (a norm after attention and after the MLP too, before each residual add); attention scores scaled by
    # ``attn_scale`` (0: 1/sqrt(head_dim)) and soft-capped ``cap * tanh(s / cap)`` (0: none), and the same cap on
    # the logits with ``final_softcap``.
    embed_scale: float = 1.0
    # Gemma 3: layers with their own RoPE table (the sliding-window layers: another theta, no scaling); empty = none
    local_layers: tuple = ()
    rope_local_inv_freq: tuple = ()
    sandwich_norms: bool = False
    attn_scale: float = 0.0
    attn_softcap: float = 0.0
    final_softcap: float = 0.0

    def __post_init__(self) -> None:
        if self.head_dim == 0:
            object.__setattr__(self, "head_dim", self.dim // self.n_heads)
        for key, allowed in (("norm", ("rms", "layer")), ("positions", ("rope", "learned")),
                             ("mlp", ("swiglu", "gelu", "geglu"))):
            if getattr(self, key) not in allowed:
                raise ValueError(f"LlamaConfig.{key}={getattr(self, key)!r}: expected one of {allowed}")


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return nn.functional.gelu(x, approximate="tanh")


def _norm(cfg: "LlamaConfig", dim: int) -> nn.Module:
    return nn.LayerNorm(dim, eps=cfg.norm_eps) if cfg.norm == "layer" else RMSNorm(dim, cfg.norm_eps)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        var = x.pow(2).mean(-1, keepdim=True)
        return self.weight * (x * torch.rsqrt(var + self.eps))


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _softcapped_attention(q, k, v, mask, scale: float, cap: float, rep: int) -> torch.Tensor:
    """Gemma 2's attention: ``softmax(cap * tanh(q k^T * scale / cap), masked) v``; SDPA has no soft-capping, so the
    scores are spelled out (each KV head repeated for the query heads of its group)."""
    if rep > 1:  # [b, kv, S, d] -> [b, kv * rep, S, d], KV head j serving query heads j*rep .. j*rep + rep-1
        b, kv, s, d = k.shape
        k = k[:, :, None].expand(b, kv, rep, s, d).reshape(b, kv * rep, s, d)
        v = v[:, :, None].expand(b, kv, rep, s, d).reshape(b, kv * rep, s, d)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    scores = torch.tanh(scores / cap) * cap
    # where(mask, s, -inf), not masked_fill(~mask, ...): TVM's CUDA codegen writes a vectorized logical_not of the
    # bool mask as `!ushort2`, which nvcc rejects (the same function either way).
    scores = torch.where(mask, scores, float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1), v)


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=cfg.o_bias)
        self.qk_norm = cfg.qk_norm
        self.scale = cfg.attn_scale or 1.0 / math.sqrt(cfg.head_dim)
        self.softcap = cfg.attn_softcap
        if cfg.qk_norm:  # Qwen3: one weight of head_dim shared by every head
            self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)

    def forward(self, x, cos, sin, positions, mask, k_cache, v_cache):
        b, t, _ = x.shape
        n_kv, d = self.n_kv_heads, self.head_dim
        rep = self.n_heads // n_kv
        q = self.q_proj(x).view(b, t, self.n_heads, d)
        k = self.k_proj(x).view(b, t, n_kv, d)
        v = self.v_proj(x).view(b, t, n_kv, d)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if cos is not None:  # RoPE (absent with learned positions)
            cos, sin = cos[:, None, :], sin[:, None, :]  # [t, 1, d]: one row per token, the same for every head
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
        k = k.transpose(1, 2)  # [b, n_kv, t, d]: the cache layout
        v = v.transpose(1, 2)
        # Write the new keys/values at their positions (functional scatter: the cache is an input and an output).
        idx = positions.view(1, 1, t, 1).expand(b, n_kv, t, d)
        k_cache = torch.scatter(k_cache, 2, idx, k)
        v_cache = torch.scatter(v_cache, 2, idx, v)
        # Grouped-query attention over the whole static cache; masked (future / empty) positions get probability
        # 0. One standard op, so each backend lowers it its own way without copying the cache per query head.
        if self.softcap:
            out = _softcapped_attention(q.transpose(1, 2), k_cache, v_cache, mask, self.scale, self.softcap, rep)
        else:
            out = nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k_cache, v_cache, attn_mask=mask,
                                                             scale=self.scale, enable_gqa=rep > 1)
        out = out.transpose(1, 2).reshape(b, t, self.n_heads * d)
        return self.o_proj(out), k_cache, v_cache


class MLP(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.gated = cfg.mlp in ("swiglu", "geglu")
        self.act = nn.functional.silu if cfg.mlp == "swiglu" else _gelu_tanh
        if self.gated:
            self.gate_proj = nn.Linear(cfg.dim, cfg.hidden_dim, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(cfg.dim, cfg.hidden_dim, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.hidden_dim, cfg.dim, bias=cfg.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gated:
            return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))
        # GPT-2's gelu_new: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), PyTorch's tanh approximation
        return self.down_proj(nn.functional.gelu(self.up_proj(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.input_layernorm = _norm(cfg, cfg.dim)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = _norm(cfg, cfg.dim)
        self.sandwich = cfg.sandwich_norms
        if self.sandwich:  # Gemma 2: post_attention_layernorm normalizes the attention output instead
            self.pre_feedforward_layernorm = _norm(cfg, cfg.dim)
            self.post_feedforward_layernorm = _norm(cfg, cfg.dim)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, positions, mask, k_cache, v_cache):
        a, k_cache, v_cache = self.self_attn(self.input_layernorm(x), cos, sin, positions, mask, k_cache, v_cache)
        if self.sandwich:
            x = x + self.post_attention_layernorm(a)
            x = x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))
            return x, k_cache, v_cache
        x = x + a
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x, k_cache, v_cache


class LlamaModel(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        if cfg.positions == "learned":
            self.embed_positions = nn.Embedding(cfg.max_seq_len, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = _norm(cfg, cfg.dim)


class Llama(nn.Module):
    """Llama with an explicit static KV cache (see the module docstring for the calling convention)."""

    def __init__(self, cfg: LlamaConfig, *, cache_len: int | None = None) -> None:
        super().__init__()
        self.config = cfg
        self.cache_len = cache_len or cfg.max_seq_len
        self.model = LlamaModel(cfg)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        d = cfg.head_dim
        # Explicitly on the CPU: the loader builds the module under ``torch.device("meta")`` (no throwaway random
        # weights) and then assigns the checkpoint's tensors; these tables are not in the checkpoint.
        cpu = torch.device("cpu")
        if cfg.positions != "rope":
            return
        if cfg.rope_inv_freq:
            inv_freq = torch.tensor(cfg.rope_inv_freq, dtype=torch.float32, device=cpu)
        else:
            inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64, device=cpu).float() / d))
        positions = torch.arange(self.cache_len, dtype=torch.int64, device=cpu).float()
        for suffix, freq, factor in [("", inv_freq, cfg.rope_attention_scaling)] + (
                [("_local", torch.tensor(cfg.rope_local_inv_freq, dtype=torch.float32, device=cpu), 1.0)]
                if cfg.local_layers else []):
            emb = torch.cat((torch.outer(positions, freq),) * 2, dim=-1)
            self.register_buffer("rope_cos" + suffix, emb.cos() * factor, persistent=False)
            self.register_buffer("rope_sin" + suffix, emb.sin() * factor, persistent=False)

    # -- the calling convention -------------------------------------------------------------------
    def empty_cache(self, batch: int = 1, dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
        cfg = self.config
        shape = (batch, cfg.n_kv_heads, self.cache_len, cfg.head_dim)
        return [torch.zeros(shape, dtype=dtype) for _ in range(2 * cfg.n_layers)]

    def example_inputs(self, seq_len: int = 8, batch: int = 1) -> tuple[torch.Tensor, ...]:
        ids = torch.ones(batch, seq_len, dtype=torch.int64)
        return (ids, torch.zeros(1, dtype=torch.int64), *self.empty_cache(batch))

    def forward(self, input_ids: torch.Tensor, start_pos: torch.Tensor, *caches: torch.Tensor):
        t = input_ids.shape[1]
        positions = start_pos + torch.arange(t, dtype=torch.int64)
        rope = self.config.positions == "rope"
        cos = self.rope_cos[positions] if rope else None
        sin = self.rope_sin[positions] if rope else None
        key_pos = torch.arange(self.cache_len, dtype=torch.int64)
        mask = key_pos[None, :] <= positions[:, None]  # True where attention is allowed (SDPA's boolean mask)
        x = self.model.embed_tokens(input_ids)
        if self.config.embed_scale != 1.0:  # Gemma: times sqrt(dim), rounded to float32 first as HF does
            x = x * float(torch.tensor(self.config.embed_scale, dtype=torch.float32))
        if not rope:
            x = x + self.model.embed_positions(positions)
        new_caches = []
        local = (self.rope_cos_local[positions], self.rope_sin_local[positions]) if self.config.local_layers else None
        for i, layer in enumerate(self.model.layers):
            c, s = local if i in self.config.local_layers else (cos, sin)
            x, k, v = layer(x, c, s, positions, mask, caches[2 * i], caches[2 * i + 1])
            new_caches += [k, v]
        logits = self.lm_head(self.model.norm(x))
        if self.config.final_softcap:
            logits = torch.tanh(logits / self.config.final_softcap) * self.config.final_softcap
        return (logits, *new_caches)
