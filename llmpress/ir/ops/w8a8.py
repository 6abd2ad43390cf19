"""``llmpress::w8a8_linear``: int8 weights and dynamically quantized int8 activations (SmoothQuant's W8A8).

Semantics (the reference kernel below is the oracle every backend is tested against)::

    w8a8_linear(x, qweight, wscale, bias) = (qx @ qw^T) * sx * ws + bias

    sx[t]   = max_i |x[t, i]| / 127          per token t (every row of x viewed as [tokens, in]); 1 where the row is 0
    qx[t,i] = clamp(round(x[t, i] / sx[t]), -127, 127)         (round half to even, as torch.round)
    qw[o,i] = qweight[o, i]                  int8 [out, in], symmetric, in [-127, 127]
    ws[o]   = wscale[o]                      float32 [out]: W[o, i] ~= qw[o, i] * ws[o]

``qx @ qw^T`` has int32 accumulation semantics. The reference computes it in float32 when that is exact
(every partial sum is an integer below 2^24, i.e. ``in * 127 * 127 < 2^24``, ``in <= 1040``) and in float64
otherwise (exact up to 2^53), so it equals the integer result bit for bit before the final float scaling.
``x`` is float ``[..., in]``; the output is ``[..., out]`` in the dtype of ``x``.

Weights are stored as they are used: ``int8 [out, in]`` plus one float32 scale per output channel
(``quantize_weight`` below makes them: ``ws[o] = max_i |W[o, i]| / 127``, ``qw = clamp(round(W / ws), -127, 127)``).
-128 is never produced, so negating a weight or an activation never overflows.

The fake kernel (``register_fake``) gives the output shape ``x.shape[:-1] + (out,)`` so graphs containing the op
still export with ``torch.export`` and serialize.
"""
from __future__ import annotations

import torch

__all__ = ["QMAX", "w8a8_linear", "quantize_weight", "quantize_activation", "dequantize_weight"]

QMAX = 127
_EXACT_F32 = 1 << 24  # float32 represents every integer below this exactly


def quantize_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: ``(qweight int8 [out, in], wscale float32 [out])``.

    ``ws[o] = max_i |W[o, i]| / 127`` (1 for an all-zero row, whose codes are then all 0)."""
    if w.dim() != 2:
        raise ValueError(f"w8a8 quantize_weight expects a 2-D weight [out, in], got shape {list(w.shape)}")
    w = w.detach().to(torch.float32)
    ws = w.abs().amax(dim=1) / QMAX
    ws = torch.where(ws > 0, ws, torch.ones_like(ws))
    q = torch.round(w / ws[:, None]).clamp(-QMAX, QMAX).to(torch.int8)
    return q.contiguous(), ws.contiguous()


def dequantize_weight(qweight: torch.Tensor, wscale: torch.Tensor) -> torch.Tensor:
    """``W[o, i] = qw[o, i] * ws[o]`` as float32."""
    return qweight.to(torch.float32) * wscale.to(torch.float32)[:, None]


def quantize_activation(x2d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-token symmetric int8 of ``x2d [tokens, in]``: ``(qx as float32 integers, sx float32 [tokens])``."""
    x2d = x2d.to(torch.float32)
    sx = x2d.abs().amax(dim=1) / QMAX
    sx = torch.where(sx > 0, sx, torch.ones_like(sx))
    qx = torch.round(x2d / sx[:, None]).clamp(-QMAX, QMAX)
    return qx, sx


@torch.library.custom_op(
    "llmpress::w8a8_linear",
    mutates_args=(),
    schema="(Tensor x, Tensor qweight, Tensor wscale, Tensor? bias) -> Tensor",
)
def w8a8_linear(x: torch.Tensor, qweight: torch.Tensor, wscale: torch.Tensor,
                bias: torch.Tensor | None) -> torch.Tensor:
    """Reference kernel: per-token int8 activations times int8 weights, integer-exact accumulation, then scales."""
    in_f = qweight.shape[1]
    if x.shape[-1] != in_f:
        raise ValueError(f"w8a8_linear: x has {x.shape[-1]} features, qweight expects {in_f}")
    lead = x.shape[:-1]
    qx, sx = quantize_activation(x.reshape(-1, in_f))
    acc_dtype = torch.float32 if in_f * QMAX * QMAX < _EXACT_F32 else torch.float64
    acc = qx.to(acc_dtype) @ qweight.to(acc_dtype).t()
    y = acc.to(torch.float32) * sx[:, None] * wscale.to(torch.float32)[None, :]
    if bias is not None:
        y = y + bias.to(torch.float32)
    return y.to(x.dtype).reshape(*lead, qweight.shape[0])


@w8a8_linear.register_fake
def _(x, qweight, wscale, bias):
    return x.new_empty((*x.shape[:-1], qweight.shape[0]))
