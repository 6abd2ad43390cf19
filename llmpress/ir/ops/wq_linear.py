"""``llmpress::wq_linear``: the weight-only quantized linear layer, its reference kernel and its storage layout.

Semantics (the reference kernel below is the oracle every backend is tested against)::

    wq_linear(x, qweight, scales, zeros, bias, bits, group_size, act_bits, act_group) = xa @ W^T + bias
    W[o, i] = (q[o, i] - z[o, g]) * s[o, g],        g = i // group_size
    xa = x                                           act_bits = 0 (float activations: "w4a16")
    xa[t, i] = qa[t, i] * sa[t, b]                   act_bits = 8 ("w4a8"), b = i // act_group, per token t:
        sa[t, b] = max_{i in b} |x[t, i]| / 127   (1 where the block is all zero)
        qa[t, i] = clamp(round(x[t, i] / sa[t, b]), -127, 127)      round half to even, as torch.round

``x`` is float ``[..., in]``; the output is ``[..., out]`` in the dtype of ``x``. ``group_size == in`` means one
group per output channel ("per channel").

Activation quantization is part of the op (set by the ``act_quant`` pass), so every backend computes the same
function: the reference kernel below quantizes and dequantizes ``x`` block by block, the CPU kernels of the TVM
backend quantize the activation row once per call and multiply int8 activations with the integer weight codes
(integer dot products, scales applied once per block); the two differ only in float summation order.
``act_group`` must divide ``in`` (0 is accepted for "the weight group": ``act_group = group_size``).

Two flavours, told apart by ``zeros``:

- symmetric (``zeros is None``, z = 0): q is signed, ``-2^(b-1) <= q <= 2^(b-1) - 1``;
- asymmetric (``zeros`` given): q is unsigned, ``0 <= q <= 2^b - 1``; ``zeros`` is ``uint8 [out, in/group]``
  holding the integer zero point of each group (a float tensor of the same shape is accepted too: it is used as is).

Storage of ``qweight`` (backends depend on this exact layout; ``pack_weight``/``unpack_weight`` implement it):

- the stored *code* of a value is ``c = q + 2^(b-1)`` for symmetric 2/3/4-bit weights (offset binary) and ``c = q``
  otherwise, so packed codes are always unsigned in ``[0, 2^b - 1]``;
- ``bits=8``: ``int8 [out, in]`` holding q directly when symmetric, ``uint8 [out, in]`` holding q when asymmetric;
- ``bits=4``: ``uint8 [out, in/2]``, two codes per byte: element ``2j`` in the low nibble (bits 0-3) of byte ``j``,
  element ``2j+1`` in the high nibble (bits 4-7);
- ``bits=2``: ``uint8 [out, in/4]``, four codes per byte: element ``4j+k`` in bits ``2k..2k+1`` of byte ``j``;
- ``bits=3``: ``uint8 [out, 3*in/8]``, eight codes in three bytes (truly 3 bits per weight): bytes ``3j, 3j+1,
  3j+2`` form the little-endian 24-bit word ``w = b[3j] | b[3j+1] << 8 | b[3j+2] << 16`` and element ``8j+k`` is
  ``(w >> 3k) & 7``;
- ``in`` must therefore be a multiple of 1, 2, 8, 4 for bits 8, 4, 3, 2; the number of input features is recovered
  from the packed shape (``packed_in_features``);
- ``scales``: ``float32 [out, in/group]`` (float16 accepted; the reference kernel computes in float32).

The fake kernel (``register_fake``) gives the output shape ``x.shape[:-1] + (out,)`` so graphs containing the op
still export with ``torch.export`` and serialize (``torch.export.save``/``load`` after importing ``llmpress.ir.ops``).
"""
from __future__ import annotations

import torch

__all__ = [
    "SUPPORTED_BITS",
    "ACT_QMAX",
    "wq_linear",
    "quantize_activation_blocks",
    "WQ_ARGS",
    "wq_args",
    "linear_dequantized",
    "pack_weight",
    "unpack_weight",
    "dequantize",
    "packed_in_features",
    "values_per_unit",
    "qrange",
]

SUPPORTED_BITS = (2, 3, 4, 8)
#: Largest activation code with ``act_bits=8``: symmetric, -128 never produced (so negation never overflows).
ACT_QMAX = 127

# (values, bytes) of one packing unit: in_features must be a multiple of `values`.
_UNIT = {8: (1, 1), 4: (2, 1), 3: (8, 3), 2: (4, 1)}


#: The arguments of ``llmpress::wq_linear``, in schema order.
WQ_ARGS = ("x", "qweight", "scales", "zeros", "bias", "bits", "group_size", "act_bits", "act_group")


def wq_args(args: tuple, kwargs: dict | None = None) -> dict:
    """A call's arguments by name (an FX node's ``args``/``kwargs``), defaults filled in."""
    out = {"act_bits": 0, "act_group": 0}
    out.update(zip(WQ_ARGS, args))
    out.update(kwargs or {})
    return out


def _check_bits(bits: int) -> None:
    if bits not in _UNIT:
        raise ValueError(f"wq_linear supports bits in {SUPPORTED_BITS}, got {bits}")


def values_per_unit(bits: int) -> int:
    """How many input features one packing unit holds (``in_features`` must be a multiple of it)."""
    _check_bits(bits)
    return _UNIT[bits][0]


def qrange(bits: int, sym: bool) -> tuple[int, int]:
    """The integer range of q: ``[-2^(b-1), 2^(b-1)-1]`` symmetric, ``[0, 2^b-1]`` asymmetric."""
    if sym:
        return -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    return 0, (1 << bits) - 1


def packed_in_features(qweight: torch.Tensor, bits: int) -> int:
    """Number of input features ``in`` encoded by a packed ``qweight [out, packed]``."""
    vals, nbytes = _UNIT[bits]
    return qweight.shape[-1] * vals // nbytes


def pack_weight(q: torch.Tensor, bits: int, *, sym: bool) -> torch.Tensor:
    """Pack integer weights ``q [out, in]`` (signed when ``sym``, unsigned otherwise) into the storage layout."""
    _check_bits(bits)
    lo, hi = qrange(bits, sym)
    q = q.to(torch.int32)
    if q.numel() and (int(q.min()) < lo or int(q.max()) > hi):
        raise ValueError(f"pack_weight: values outside [{lo}, {hi}] for {bits}-bit {'sym' if sym else 'asym'}")
    out_f, in_f = q.shape
    vals, nbytes = _UNIT[bits]
    if in_f % vals:
        raise ValueError(f"pack_weight: {bits}-bit packing needs in_features divisible by {vals}, got {in_f}")
    if bits == 8:
        return q.to(torch.int8 if sym else torch.uint8).contiguous()
    code = q + (1 << (bits - 1)) if sym else q
    code = code.view(out_f, in_f // vals, vals)
    shifts = torch.arange(vals, dtype=torch.int32) * bits
    word = (code << shifts).sum(-1)  # disjoint bit fields: the sum is the bitwise or
    if bits == 3:
        parts = [(word >> (8 * k)) & 0xFF for k in range(3)]
        word = torch.stack(parts, dim=-1).view(out_f, in_f // vals * 3)
    return word.to(torch.uint8).contiguous()


def unpack_weight(qweight: torch.Tensor, bits: int, *, sym: bool) -> torch.Tensor:
    """Inverse of ``pack_weight``: the integer weights ``q [out, in]`` as int32 (signed when ``sym``)."""
    _check_bits(bits)
    if bits == 8:
        return qweight.to(torch.int32)
    vals, nbytes = _UNIT[bits]
    out_f = qweight.shape[0]
    b = qweight.to(torch.int32)
    if bits == 3:
        b = b.view(out_f, -1, 3)
        word = b[..., 0] | (b[..., 1] << 8) | (b[..., 2] << 16)
    else:
        word = b
    shifts = torch.arange(vals, dtype=torch.int32) * bits
    code = (word.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    code = code.reshape(out_f, -1)
    return code - (1 << (bits - 1)) if sym else code


def dequantize(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, bits: int,
               group_size: int) -> torch.Tensor:
    """``W[o, i] = (q[o, i] - z[o, i // group_size]) * s[o, i // group_size]`` as float32 ``[out, in]``."""
    q = unpack_weight(qweight, bits, sym=zeros is None).to(torch.float32)
    in_f = q.shape[1]
    if group_size <= 0 or in_f % group_size:
        raise ValueError(f"wq_linear: group_size {group_size} does not divide in_features {in_f}")
    n_groups = in_f // group_size
    if scales.shape != (q.shape[0], n_groups):
        raise ValueError(f"wq_linear: scales must be [{q.shape[0]}, {n_groups}], got {list(scales.shape)}")
    s = scales.to(torch.float32).repeat_interleave(group_size, dim=1)
    if zeros is not None:
        q = q - zeros.to(torch.float32).repeat_interleave(group_size, dim=1)
    return q * s


def quantize_activation_blocks(x: torch.Tensor, act_group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token, per-block symmetric int8 of ``x [..., in]``: ``(qa, sa)`` with ``qa`` the integer codes as float32
    ``[..., in]`` and ``sa`` float32 ``[..., in / act_group]`` (see the module docstring)."""
    in_f = x.shape[-1]
    if act_group <= 0 or in_f % act_group:
        raise ValueError(f"wq_linear: act_group {act_group} does not divide in_features {in_f}")
    xb = x.to(torch.float32).reshape(*x.shape[:-1], in_f // act_group, act_group)
    sa = xb.abs().amax(dim=-1) / ACT_QMAX
    sa = torch.where(sa > 0, sa, torch.ones_like(sa))
    qa = torch.round(xb / sa.unsqueeze(-1)).clamp(-ACT_QMAX, ACT_QMAX)
    return qa.reshape(x.shape), sa


def _act_group(act_group: int, group_size: int) -> int:
    return group_size if act_group == 0 else act_group


@torch.library.custom_op(
    "llmpress::wq_linear",
    mutates_args=(),
    schema="(Tensor x, Tensor qweight, Tensor scales, Tensor? zeros, Tensor? bias, int bits, int group_size,"
           " int act_bits=0, int act_group=0) -> Tensor",
)
def wq_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
              bias: torch.Tensor | None, bits: int, group_size: int, act_bits: int = 0,
              act_group: int = 0) -> torch.Tensor:
    """Reference kernel: (with ``act_bits=8``, quantize and dequantize ``x`` block by block,) dequantize the
    weight to float32, then an ordinary linear layer."""
    w = dequantize(qweight, scales, zeros, bits, group_size)
    return linear_dequantized(x, w, bias, group_size, act_bits, act_group)


def linear_dequantized(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, group_size: int,
                       act_bits: int = 0, act_group: int = 0) -> torch.Tensor:
    """The rest of the reference kernel once the weight ``w`` is dequantized (float32 ``[out, in]``): callers
    that keep dequantized weights across calls (calibration) compute the op's exact function with it."""
    if act_bits not in (0, 8):
        raise ValueError(f"wq_linear: act_bits must be 0 (float activations) or 8, got {act_bits}")
    if act_bits:
        ag = _act_group(act_group, group_size)
        qa, sa = quantize_activation_blocks(x, ag)
        xa = (qa.reshape(*x.shape[:-1], -1, ag) * sa.unsqueeze(-1)).reshape(x.shape)
        return torch.nn.functional.linear(xa, w, None if bias is None else bias.to(torch.float32)).to(x.dtype)
    return torch.nn.functional.linear(x, w.to(x.dtype), bias)


@wq_linear.register_fake
def _(x, qweight, scales, zeros, bias, bits, group_size, act_bits=0, act_group=0):
    return x.new_empty((*x.shape[:-1], qweight.shape[0]))


# -- autograd: gradients flow to the activations (and a float bias), never to the packed weight ----------------------
# Training around a compressed layer (``distill``'s adapters, layers before it) needs dL/dx through the op:
#     grad_x = grad_y @ W          W = dequantize(qweight, scales, zeros), float32 [out, in]
#     grad_bias = sum of grad_y over every leading dimension
#     grad_s[o, g] = sum_{i in g} G[o, i] (q[o, i] - z[o, g]),   G = grad_y^T x   (float scales being trained)
# With act_bits=8 the rounding of x is treated as the identity (straight-through estimator), the usual rule for
# quantization-aware training. qweight and zeros get no gradient: the integer codes are frozen.
def _setup_context(ctx, inputs, output) -> None:
    x, qweight, scales, zeros, bias, bits, group_size, *_ = inputs
    ctx.save_for_backward(qweight, scales, zeros, x if scales.requires_grad else None)  # x only when needed
    ctx.bits, ctx.group_size, ctx.has_bias = bits, group_size, bias is not None
    ctx.x_dtype = x.dtype


def _backward(ctx, grad_y: torch.Tensor):
    qweight, scales, zeros, x = ctx.saved_tensors
    grad_x = grad_s = grad_bias = None
    if ctx.needs_input_grad[0]:
        w = dequantize(qweight, scales, zeros, ctx.bits, ctx.group_size)
        grad_x = (grad_y.to(torch.float32) @ w).to(ctx.x_dtype)
    if ctx.needs_input_grad[2]:
        g = grad_y.reshape(-1, grad_y.shape[-1]).to(torch.float32).T @ x.reshape(-1, x.shape[-1]).to(torch.float32)
        codes = dequantize(qweight, torch.ones_like(scales, dtype=torch.float32), zeros, ctx.bits, ctx.group_size)
        grad_s = (g * codes).reshape(g.shape[0], scales.shape[1], -1).sum(-1).to(scales.dtype)
    if ctx.has_bias and ctx.needs_input_grad[4]:
        grad_bias = grad_y.reshape(-1, grad_y.shape[-1]).sum(0)
    return grad_x, None, grad_s, None, grad_bias, None, None, None, None


wq_linear.register_autograd(_backward, setup_context=_setup_context)
