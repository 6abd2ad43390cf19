"""``llmpress::kv_fake_quant``: symmetric per-(batch, head, token) fake quantization of keys/values.

Semantics (the reference kernel below is the oracle)::

    kv_fake_quant(x, bits)[b, h, t, :] = q * s
    s = max_d |x[b, h, t, d]| / qmax                 qmax = 2^(bits-1) - 1  (127 for int8); s = 1 where the row is 0
    q = clamp(round(x[b, h, t, :] / s), -qmax, qmax)   (round half to even, as torch.round)

``x`` is ``[..., head_dim]`` (in the Llama graph: ``[B, n_kv_heads, T, head_dim]``, the new keys after RoPE or the
new values); every vector along the last axis gets its own scale. The result has the dtype and shape of ``x``.

Why "fake": the KV-cache calling convention (``llmpress.models.llama``) keeps the cache ``float32`` for now, so the
op returns the dequantized values ``q * s`` and the graph writes those into the float cache; attention then reads
exactly what an int8 cache would hold. Storing the cache as int8 would change the convention to two tensors per
cache -- ``int8 [B, H, cache_len, head_dim]`` codes plus ``float32 [B, H, cache_len]`` scales (or one fused tensor)
-- cutting cache memory from ``4 * head_dim`` to ``head_dim + 4`` bytes per (token, head): 3.6x for head_dim 32,
3.9x for 128. The numbers the model computes would not change: the same codes and scales, dequantized on read.
"""
from __future__ import annotations

import torch

__all__ = ["kv_fake_quant", "quantize_kv", "SUPPORTED_BITS"]

SUPPORTED_BITS = (2, 3, 4, 5, 6, 7, 8)


def quantize_kv(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(codes int8 [..., head_dim], scales float32 [...])`` such that ``codes * scales[..., None]`` is the
    fake-quantized ``x`` (what an int8 cache would store)."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"kv_fake_quant supports bits in 2..8, got {bits}")
    qmax = (1 << (bits - 1)) - 1
    xf = x.to(torch.float32)
    s = xf.abs().amax(dim=-1) / qmax
    s = torch.where(s > 0, s, torch.ones_like(s))
    q = torch.round(xf / s[..., None]).clamp(-qmax, qmax)
    return q.to(torch.int8), s


@torch.library.custom_op("llmpress::kv_fake_quant", mutates_args=(), schema="(Tensor x, int bits) -> Tensor")
def kv_fake_quant(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Reference kernel: quantize each last-axis vector with its own absmax scale, then dequantize."""
    q, s = quantize_kv(x, bits)
    return (q.to(torch.float32) * s[..., None]).to(x.dtype)


@kv_fake_quant.register_fake
def _(x, bits):
    return torch.empty_like(x)
