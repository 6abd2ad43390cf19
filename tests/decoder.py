"""A small Llama decoder written by hand with the KV-cache calling convention: the tests' model for "any
``nn.Module`` a user writes" (``llmpress.ir.capture`` takes a module that has ``lm_info()`` and
``example_inputs()`` with a dynamic token count, ``ir.capture`` docstring). Real checkpoints load as transformers'
own models instead (``llmpress.ir.loaders.hf``); this one is small, fast to capture and has the parameter names of
transformers' ``LlamaForCausalLM`` (``model.layers.0.self_attn.q_proj``...), so the passes' globs read the same.

Signature of ``forward`` (the calling convention every backend and runner shares)::

    forward(input_ids: int64[B, T], start_pos: int64[1], k_0, v_0, ..., k_{L-1}, v_{L-1})
        -> (logits: float[B, T, V], k_0', v_0', ..., k_{L-1}', v_{L-1}')

Each cache is ``float[B, n_kv_heads, cache_len, head_dim]``; tokens ``input_ids[:, t]`` sit at position
``start_pos + t`` and are written into the cache there. Attention spans the whole cache with a causal mask
``key_pos <= query_pos`` (one ``scaled_dot_product_attention`` with ``enable_gqa``). RoPE in the rotate-half layout
with precomputed cos/sin tables.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from llmpress.ir.meta import LMInfo

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

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads


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


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)

    def forward(self, x, cos, sin, positions, mask, k_cache, v_cache):
        b, t, _ = x.shape
        n_kv, d = self.n_kv_heads, self.head_dim
        q = self.q_proj(x).view(b, t, self.n_heads, d)
        k = self.k_proj(x).view(b, t, n_kv, d)
        v = self.v_proj(x).view(b, t, n_kv, d)
        cos, sin = cos[:, None, :], sin[:, None, :]  # [t, 1, d]: one row per token, the same for every head
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        k, v = k.transpose(1, 2), v.transpose(1, 2)  # [b, n_kv, t, d]: the cache layout
        idx = positions.view(1, 1, t, 1).expand(b, n_kv, t, d)  # functional scatter: the cache is input and output
        k_cache = torch.scatter(k_cache, 2, idx, k)
        v_cache = torch.scatter(v_cache, 2, idx, v)
        out = nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k_cache, v_cache, attn_mask=mask,
                                                         scale=1.0 / math.sqrt(d), enable_gqa=self.n_heads > n_kv)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, self.n_heads * d)), k_cache, v_cache


class MLP(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)
        self.up_proj = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)
        self.down_proj = nn.Linear(cfg.hidden_dim, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, positions, mask, k_cache, v_cache):
        a, k_cache, v_cache = self.self_attn(self.input_layernorm(x), cos, sin, positions, mask, k_cache, v_cache)
        x = x + a
        return x + self.mlp(self.post_attention_layernorm(x)), k_cache, v_cache


class LlamaModel(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)


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
        inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
        emb = torch.cat((torch.outer(torch.arange(self.cache_len, dtype=torch.int64).float(), inv_freq),) * 2, dim=-1)
        self.register_buffer("rope_cos", emb.cos(), persistent=False)
        self.register_buffer("rope_sin", emb.sin(), persistent=False)

    # -- the calling convention -------------------------------------------------------------------
    def lm_info(self) -> LMInfo:
        c = self.config
        return LMInfo(n_layers=c.n_layers, n_kv_heads=c.n_kv_heads, head_dim=c.head_dim, cache_len=self.cache_len,
                      vocab_size=c.vocab_size, bos_id=c.bos_id, eos_id=c.eos_id)

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
        cos, sin = self.rope_cos[positions], self.rope_sin[positions]
        mask = torch.arange(self.cache_len, dtype=torch.int64)[None, :] <= positions[:, None]  # True: may attend
        x = self.model.embed_tokens(input_ids)
        new_caches = []
        for i, layer in enumerate(self.model.layers):
            x, k, v = layer(x, cos, sin, positions, mask, caches[2 * i], caches[2 * i + 1])
            new_caches += [k, v]
        return (self.lm_head(self.model.norm(x)), *new_caches)

    @classmethod
    def from_transformers(cls, hf: nn.Module, *, cache_len: int | None = None) -> "Llama":
        """This decoder with the weights of transformers' ``LlamaForCausalLM`` ``hf`` (the same parameter names)."""
        c = hf.config
        cfg = LlamaConfig(vocab_size=c.vocab_size, dim=c.hidden_size, n_layers=c.num_hidden_layers,
                          n_heads=c.num_attention_heads, n_kv_heads=c.num_key_value_heads,
                          hidden_dim=c.intermediate_size, max_seq_len=c.max_position_embeddings, norm_eps=c.rms_norm_eps,
                          rope_theta=float(c.rope_parameters["rope_theta"]), tie_embeddings=c.tie_word_embeddings)
        model = cls(cfg, cache_len=cache_len)
        model.load_state_dict(hf.state_dict())
        return model.eval()


def hf_tiny(kind: str = "llama", *, seed: int = 0, **config) -> nn.Module:
    """A small random transformers causal LM of ``kind`` (``AutoConfig.for_model(kind, **config)``) with noise on every
    parameter, so biases (initialized to 0) and norms (to 1) carry information a check can see."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(kind, **config))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()
