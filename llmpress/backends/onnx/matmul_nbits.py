"""``llmpress::wq_linear`` -> ``com.microsoft.MatMulNBits`` (ORT contrib op, ``bits`` in {2, 4, 8} on CPU).

Weights. MatMulNBits computes ``Y = A @ dequant(B)^T (+ bias)`` with
``dequant(B)[n, k] = (c[n, k] - zp[n, k // bs]) * scale[n, k // bs]`` over unsigned codes ``c`` packed along K,
block by block: ``B`` is ``uint8 [N, K / bs, bs * bits / 8]``, code ``k`` of a block in bits
``(k mod 8/bits) * bits`` of byte ``k // (8/bits)`` (low bits first), ``scales`` ``[N, K / bs]``, optional zero
points (uint8 packed the same way, ``[N, ceil(K/bs * bits / 8)]``, or float ``[N, K / bs]``; absent means
``2^(bits-1)``). llmpress's layout (``llmpress/ir/ops/wq_linear.py``) maps onto it exactly:

- codes: symmetric q is stored as ``c = q + 2^(b-1)``, which is MatMulNBits's default zero point, so no zero
  point input is needed; asymmetric q is the code, and llmpress's per-group zeros become the zero points;
- blocks: ``bs`` is the largest power of two <= 256 (ORT's CPU limit for 2 bits; we use it for all widths) that
  divides ``group_size`` (or ``act_group`` in the ``integer`` form below); each group's scale and zero point are
  repeated ``group_size / bs`` times, which represents the same W exactly (per-channel int8 on K = 768 becomes
  three blocks of 256 with equal scales);
- 3-bit weights are widened to 4-bit codes (MatMulNBits has no 3-bit kernel): the same W, but the ONNX file
  stores 4 bits per weight; a warning says so;
- groups with no power-of-two divisor >= 16 (e.g. group 8 or 24) and 8-bit non-integer zero points (no CPU
  kernel) raise ``UnsupportedOpError``.

Activations (``act_bits=8``, set by the ``act_quant`` pass). The op quantizes ``x`` per token t and block b of
``act_group`` input features before the product; the export spells that out with standard ops, exactly the float32
operations of the reference kernel (``quantize_activation_blocks``), so ORT reproduces the dequantized activation
bit for bit::

    xb = Reshape(x, [..., K / act_group, act_group])
    sa = Where(s > 0, s, 1),  s = ReduceMax(Abs(xb), axis=-1, keepdims) / 127
    xa = Reshape(Clip(Round(xb / sa), -127, 127) * sa, [..., K])        Round is half to even, as torch.round
    y  = MatMulNBits(xa, B, scales, zp, bias)

Two forms, chosen at export (``export(..., wq_a8=...)``), recorded in the model's metadata as ``llmpress.wq_a8``:

- ``float`` (default): MatMulNBits with ``accuracy_level`` 0: ORT multiplies ``xa`` by the dequantized weights in
  float32, so the output differs from the reference only by float32 summation order. Any ``act_group`` dividing K.
- ``integer``: the same ``xa``, into MatMulNBits with ``accuracy_level=4`` and ``block_size = act_group``: ORT's
  int8 kernel quantizes A per block of ``block_size`` itself (MLAS: ``scale = max|a| / 127``, codes
  ``round(a * 127/max|a|)`` or ``round(a * (1/scale))`` depending on the kernel) and takes int8 dot products with
  the weight codes. Fed ``xa``, whose block maximum is ``127 * sa`` up to one rounding, it recovers the op's codes
  exactly (``|qa sa (127/max) - qa| <= 127 * 3 * 2^-24``, far from a rounding boundary) and a scale within one ulp
  of ``sa``: the same function up to float32 rounding (measured worst 2.3e-7 of ``sum |xa| |w|`` on one layer,
  like the ``float`` form), on the integer kernel (a scratch measurement on tinystories-llama ``w4a8``, one ORT
  thread on a shared AVX-512 VNNI machine: 1.5 ms per decode step vs 2.2 ms for ``float``; 128-token prefill
  was not faster, 23 vs 19 ms). It needs ``act_group`` to be a block MatMulNBits takes (a power of two in
  [16, 256] dividing the weight group); a layer whose ``act_group`` is not (per token on K = 768, say) keeps
  ``accuracy_level`` 0 and the export warns. The recovery argument holds for kernels that quantize A per block
  symmetrically with absmax / 127, as MLAS's x86 kernels do (checked here); a kernel that quantized A another way
  (per row, asymmetric) would requantize ``xa`` and lose exactness, which is why this is not the default.

Why ORT's own quantization of the *unquantized* x is not offered (MatMulNBits with ``accuracy_level=4`` on ``x``,
``block_size = act_group``): MLAS computes the codes as a product, ``round(x * 127/max|x|)`` or
``round(x * (1/scale))`` depending on the kernel it picks (bit width, block, token count; identified by matching
ORT 1.32's outputs against each candidate rounding), not as the quotient ``round(x / scale)``. The two differ by an
ulp, which moves a code by one wherever ``x / scale`` is within an ulp of a half integer: on one layer with
identical inputs (4,096 Gaussian tokens, K = 256 and 768, blocks of 128 and 256) 1e-6 to 3e-6 of the codes, and
the rows they hit are off by up to
3.3e-4 of ``sum |x| |w|`` (2e-2 absolute on outputs of magnitude 40) where everything else agrees to 2.5e-7; on
tinystories-llama's own activations (``w4a8``, four 256-token windows, 18.9M values) 4.8e-7 (one row) and 2.6e-7
(many rows) of the codes. Over a whole model that is the size of what float32 summation order already does to
any runtime's codes (an upstream 1e-7 difference crosses a rounding boundary about as often): on TinyStories valid
the reference gives perplexity 23.6382, this export 23.6376 (``float``) and 23.6374 (``integer``), the raw
``accuracy_level=4`` model 23.6377; worst logit differences in one 256-token window 7.2e-2, 7.9e-2 and 7.9e-2. So
it would cost no measurable quality, but it is not the op's function layer by layer (what the export tests
assert, bit for bit on ``xa``), and its rounding depends on the kernel ORT picks (token count, ISA); the
``integer`` form runs the same kernel on the op's codes.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.fx as fx

from ...ir.ops.wq_linear import ACT_QMAX, unpack_weight, wq_args
from .graph import MS_DOMAIN, absmax_scale, np_dtype, stored_weight, symmetric_codes, unsupported

__all__ = ["translate_wq_linear", "matmul_nbits_layout", "block_size_for", "WQ_A8_FORMS"]

MAX_BLOCK = 256  # ORT CPU: 2-bit MatMulNBits block_size must not exceed 256
MIN_BLOCK = 16
WQ_A8_FORMS = ("float", "integer")  # the first is the default
_INT8_ACCURACY = 4  # MatMulNBits accuracy_level: "int8 compute" (A quantized per block by the kernel)


def block_size_for(group_size: int) -> int | None:
    """The MatMulNBits block size used for an llmpress group: the largest power of two in [16, 256] dividing it."""
    bs = MAX_BLOCK
    while bs >= MIN_BLOCK:
        if group_size % bs == 0:
            return bs
        bs //= 2
    return None


def _is_block(n: int) -> bool:
    return MIN_BLOCK <= n <= MAX_BLOCK and n & (n - 1) == 0


def _pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack unsigned codes ``[N, K]`` along K, low bits first (``8 / bits`` codes per byte)."""
    per = 8 // bits
    n, k = codes.shape
    c = codes.astype(np.uint16).reshape(n, k // per, per)
    out = np.zeros((n, k // per), dtype=np.uint16)
    for j in range(per):
        out |= c[:, :, j] << (bits * j)
    return out.astype(np.uint8)


def matmul_nbits_layout(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, bits: int,
                        group_size: int, *, block_size: int | None = None,
                        node: fx.Node | None = None) -> dict[str, Any]:
    """Convert llmpress's ``wq_linear`` storage into MatMulNBits inputs and attributes.

    ``block_size``: the MatMulNBits block (a power of two in [16, 256] dividing ``group_size``); default
    ``block_size_for(group_size)``. Returns ``{"B": uint8 [N, nb, blob], "scales": float [N, nb],
    "zero_points": array | None, "bits": int, "block_size": int, "K": int, "N": int}``.
    """
    if bits not in (2, 3, 4, 8):
        raise unsupported(node, f"wq_linear with {bits} bits (MatMulNBits stores 2, 4 or 8)")
    sym = zeros is None
    q = unpack_weight(qweight, bits, sym=sym).numpy().astype(np.int32)  # [N, K]
    n, k = q.shape
    if group_size <= 0 or k % group_size:
        raise unsupported(node, f"group_size {group_size} does not divide in_features {k}")
    bs = block_size_for(group_size) if block_size is None else block_size
    if bs is None:
        raise unsupported(node, f"group_size {group_size}: MatMulNBits needs blocks that are a power of two "
                                f"between {MIN_BLOCK} and {MAX_BLOCK}, and none divides the group")
    if not _is_block(bs) or group_size % bs:
        raise unsupported(node, f"MatMulNBits block_size {bs} must be a power of two in [{MIN_BLOCK}, {MAX_BLOCK}] "
                                f"dividing group_size {group_size}")
    out_bits = 4 if bits == 3 else bits
    rep = group_size // bs
    if sym:
        codes = q + (1 << (out_bits - 1))  # MatMulNBits's default zero point is 2^(bits-1)
        zp = None
    else:
        codes = q
        z = zeros.detach().cpu()
        if z.is_floating_point():
            zf = z.to(torch.float32).numpy()
            if np.all(zf == np.round(zf)) and zf.min() >= 0 and zf.max() <= (1 << out_bits) - 1:
                z = torch.from_numpy(zf.astype(np.uint8))
            elif out_bits == 8:
                raise unsupported(node, "8-bit wq_linear with non-integer zero points (ORT's CPU MatMulNBits "
                                        "takes only uint8 zero points at 8 bits)")
        zr = np.repeat(z.numpy(), rep, axis=1)  # [N, K / bs]
        if zr.dtype == np.uint8 or not np.issubdtype(zr.dtype, np.floating):
            zr = zr.astype(np.uint8)
            nb = zr.shape[1]
            per = 8 // out_bits
            pad = (-nb) % per
            if pad:
                zr = np.concatenate([zr, np.zeros((n, pad), np.uint8)], axis=1)
            zp = _pack_codes(zr, out_bits)
        else:
            zp = zr.astype(np_dtype(scales.dtype if scales.is_floating_point() else torch.float32))
    if codes.min() < 0 or codes.max() > (1 << out_bits) - 1:
        raise unsupported(node, f"codes outside the {out_bits}-bit range")
    packed = _pack_codes(codes.astype(np.uint8), out_bits)  # [N, K * bits / 8]
    b_arr = packed.reshape(n, k // bs, bs * out_bits // 8)
    s = np.repeat(scales.detach().to(torch.float32).numpy(), rep, axis=1).astype(np.float32)
    return {"B": b_arr, "scales": s, "zero_points": zp, "bits": out_bits, "block_size": bs, "K": k, "N": n}


def _quantize_dequantize_blocks(b: Any, xv: str, *, k: int, act_group: int, rank: int) -> str:
    """``xa = clamp(round(x / sa), -127, 127) * sa`` per token and block of ``act_group`` features (see the module
    docstring). Reshape's 0 copies a leading dimension, so one constant shape serves every token count."""
    lead = [0] * (rank - 1)
    xb = b.op("Reshape", [xv, b.const(lead + [k // act_group, act_group], np.int64)])
    sa = absmax_scale(b, xb, ACT_QMAX)
    xa = b.op("Mul", [symmetric_codes(b, xb, sa, ACT_QMAX), sa])
    return b.op("Reshape", [xa, b.const(lead + [k], np.int64)])


def translate_wq_linear(ex: Any, node: fx.Node) -> str:
    """One ``wq_linear`` call -> (activation quantize-dequantize +) ``MatMulNBits``; ``ex.wq_a8`` picks the form."""
    b = ex.b
    a = wq_args(node.args, node.kwargs)
    x, qweight, bits, group = a["x"], a["qweight"], a["bits"], a["group_size"]
    act_bits, act_group = a["act_bits"], a["act_group"] or group
    xval = x.meta["val"]
    if xval.dtype != torch.float32:
        raise unsupported(node, f"wq_linear on {xval.dtype} activations (the export handles float32)")
    if act_bits not in (0, 8):
        raise unsupported(node, f"wq_linear with act_bits={act_bits} (0 or 8 expected)")
    k = int(xval.shape[-1])
    if act_bits and (act_group <= 0 or k % act_group):
        raise unsupported(node, f"act_group {act_group} does not divide in_features {k}")
    block, attrs = None, {}
    if act_bits and ex.wq_a8 == "integer":
        if _is_block(act_group) and group % act_group == 0:
            block, attrs = act_group, {"accuracy_level": _INT8_ACCURACY}
        else:
            ex.notes[f"wq_a8='integer': act_group not a MatMulNBits block (power of two in [{MIN_BLOCK}, "
                     f"{MAX_BLOCK}] dividing the weight group), layer kept in float (accuracy_level 0)"] += 1
    layout = matmul_nbits_layout(stored_weight(ex, qweight, "qweight", node),
                                 stored_weight(ex, a["scales"], "scales", node),
                                 stored_weight(ex, a["zeros"], "zeros", node), bits, group, block_size=block,
                                 node=node)
    if bits == 3:
        ex.notes["3-bit wq_linear widened to 4-bit MatMulNBits codes (same weights, 4 bits stored each)"] += 1
    xv = b.value(x)
    if act_bits:
        xv = _quantize_dequantize_blocks(b, xv, k=k, act_group=act_group, rank=xval.dim())
    hint = ex.module.weight_name(qweight)
    inputs = [xv, b.initializer(layout["B"], hint + ".nbits"),
              b.initializer(layout["scales"].astype(np.float32), hint + ".scales")]
    inputs.append(b.initializer(layout["zero_points"], hint + ".zp") if layout["zero_points"] is not None else "")
    bias = a["bias"]
    if bias is not None:
        inputs += ["", b.cast(b.value(bias), bias.meta["val"].dtype, torch.float32)]
    while inputs and inputs[-1] == "":
        inputs.pop()
    return b.op("MatMulNBits", inputs, domain=MS_DOMAIN, K=layout["K"], N=layout["N"], bits=layout["bits"],
                block_size=layout["block_size"], **attrs)
