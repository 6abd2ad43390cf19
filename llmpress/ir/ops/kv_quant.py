"""KV-cache quantization ops: symmetric per-(batch, head, token) int8 keys and values.

One scale per vector along the last axis (``head_dim``)::

    s[b, h, t]       = max_d |x[b, h, t, d]| / qmax      qmax = 2^(bits-1) - 1 (127 for int8); s = 1 where the row is 0
    q[b, h, t, :]    = clamp(round(x[b, h, t, :] / s), -qmax, qmax)     (round half to even, as torch.round)

Four ops, each with a reference kernel (the oracle) and a fake kernel:

- ``kv_scale(x, bits) -> float32[..., 1]``: the scales ``s`` (kept with a trailing 1 so they broadcast and scatter
  like the cache);
- ``kv_codes(x, scale, bits) -> int8[...]``: the codes ``q``;
- ``kv_dequant(codes, scale) -> float32[...]``: ``codes * scale``, what attention reads from an int8 cache;
- ``kv_fake_quant(x, bits) -> x.dtype[...]``: ``kv_dequant(kv_codes(x, s), s)`` in one op, for a cache that stays
  float (``kv_quant(storage="float")``: the numbers of an int8 cache without its memory saving).

With ``kv_quant(storage="int8")`` each cache of the calling convention (``llmpress.ir.capture_hf``) becomes two
tensors, ``int8 [B, H, cache_len, head_dim]`` codes and ``float32 [B, H, cache_len, 1]`` scales: ``4 * head_dim``
bytes per (token, head) become ``head_dim + 4`` (3.6x less for head_dim 32, 3.9x for 128). Both storages give the
same logits: the same codes and scales, dequantized on read.
"""
from __future__ import annotations

import torch

__all__ = ["kv_fake_quant", "kv_scale", "kv_codes", "kv_dequant", "quantize_kv", "SUPPORTED_BITS"]

SUPPORTED_BITS = (2, 3, 4, 5, 6, 7, 8)


def _qmax(bits: int) -> int:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"KV-cache quantization supports bits in 2..8, got {bits}")
    return (1 << (bits - 1)) - 1


def quantize_kv(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(codes int8 [..., head_dim], scales float32 [...])`` such that ``codes * scales[..., None]`` is the
    fake-quantized ``x`` (what an int8 cache would store)."""
    qmax = _qmax(bits)
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


@torch.library.custom_op("llmpress::kv_scale", mutates_args=(), schema="(Tensor x, int bits) -> Tensor")
def kv_scale(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Reference kernel: ``float32[..., 1]`` absmax scale of each last-axis vector (1 for an all-zero vector)."""
    return quantize_kv(x, bits)[1][..., None]


@kv_scale.register_fake
def _(x, bits):
    return x.new_empty((*x.shape[:-1], 1), dtype=torch.float32)


@torch.library.custom_op("llmpress::kv_codes", mutates_args=(), schema="(Tensor x, Tensor scale, int bits) -> Tensor")
def kv_codes(x: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """Reference kernel: ``int8`` codes ``clamp(round(x / scale), -qmax, qmax)``; ``scale`` is ``[..., 1]``."""
    qmax = _qmax(bits)
    return torch.round(x.to(torch.float32) / scale).clamp(-qmax, qmax).to(torch.int8)


@kv_codes.register_fake
def _(x, scale, bits):
    return torch.empty_like(x, dtype=torch.int8)


@torch.library.custom_op("llmpress::kv_dequant", mutates_args=(), schema="(Tensor codes, Tensor scale) -> Tensor")
def kv_dequant(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Reference kernel: ``float32`` values ``codes * scale`` (``scale`` broadcasts over the last axis)."""
    return codes.to(torch.float32) * scale


@kv_dequant.register_fake
def _(codes, scale):
    return torch.empty_like(codes, dtype=torch.float32)
