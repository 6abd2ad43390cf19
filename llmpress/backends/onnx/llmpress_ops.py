"""Translations of llmpress's compressed ops into ONNX Runtime ops.

``llmpress::wq_linear`` -> ``com.microsoft.MatMulNBits`` (ORT contrib op, ``bits`` in {2, 4, 8} on CPU)
    MatMulNBits computes ``Y = A @ dequant(B)^T (+ bias)`` with
    ``dequant(B)[n, k] = (c[n, k] - zp[n, k // bs]) * scale[n, k // bs]`` over unsigned codes ``c`` packed along K,
    block by block: ``B`` is ``uint8 [N, K / bs, bs * bits / 8]``, code ``k`` of a block in bits
    ``(k mod 8/bits) * bits`` of byte ``k // (8/bits)`` (low bits first), ``scales`` ``[N, K / bs]``, optional zero
    points (uint8 packed the same way, ``[N, ceil(K/bs * bits / 8)]``, or float ``[N, K / bs]``; absent means
    ``2^(bits-1)``).
    llmpress's layout (``llmpress/ir/ops/wq_linear.py``) maps onto it exactly:
    - codes: symmetric q is stored as ``c = q + 2^(b-1)``, which is MatMulNBits's default zero point, so no zero
      point input is needed; asymmetric q is the code, and llmpress's per-group zeros become the zero points;
    - blocks: ``bs`` is the largest power of two <= 256 (ORT's CPU limit for 2 bits; we use it for all widths) that
      divides ``group_size``; each group's scale and zero point are repeated ``group_size / bs`` times, which
      represents the same W exactly (per-channel int8 on K = 768 becomes three blocks of 256 with equal scales);
    - 3-bit weights are widened to 4-bit codes (MatMulNBits has no 3-bit kernel): the same W, but the ONNX file
      stores 4 bits per weight; a warning says so;
    - groups with no power-of-two divisor >= 16 (e.g. group 8 or 24) and 8-bit non-integer zero points (no CPU
      kernel) raise ``UnsupportedOpError``.

``llmpress::w8a8_linear`` -> explicit dynamic per-token quantization + ``MatMulInteger`` (int8 x int8 -> int32)::

    sx = ReduceMax(|x|, axis=-1) / 127 (1 where 0);  qx = Cast<int8>(Clip(Round(x / sx), -127, 127))
    y  = Cast<float>(MatMulInteger(qx, qw^T)) * sx * wscale (+ bias)

  ONNX's ``DynamicQuantizeLinear`` is per-tensor asymmetric uint8, which is not the op's semantics (per-token
  symmetric int8), so the quantization is spelled out with standard ops; the integer product is exact in int32.

``llmpress::kv_fake_quant`` -> the same per-vector absmax quantize/dequantize with standard ops
(``Clip(Round(x / s), -qmax, qmax) * s``), so an exported model reads the values an int8 cache would hold.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.fx as fx

from .graph import MS_DOMAIN, np_dtype, unsupported

__all__ = ["LLMPRESS_TRANSLATIONS", "matmul_nbits_layout", "block_size_for"]

MAX_BLOCK = 256  # ORT CPU: 2-bit MatMulNBits block_size must not exceed 256
MIN_BLOCK = 16


def block_size_for(group_size: int) -> int | None:
    """The MatMulNBits block size used for an llmpress group: the largest power of two in [16, 256] dividing it."""
    bs = MAX_BLOCK
    while bs >= MIN_BLOCK:
        if group_size % bs == 0:
            return bs
        bs //= 2
    return None


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
                        group_size: int, *, node: fx.Node | None = None) -> dict[str, Any]:
    """Convert llmpress's ``wq_linear`` storage into MatMulNBits inputs and attributes.

    Returns ``{"B": uint8 [N, nb, blob], "scales": float [N, nb], "zero_points": array | None, "bits": int,
    "block_size": int, "K": int, "N": int}``.
    """
    from ...ir.ops.wq_linear import unpack_weight

    if bits not in (2, 3, 4, 8):
        raise unsupported(node, f"wq_linear with {bits} bits (MatMulNBits stores 2, 4 or 8)")
    sym = zeros is None
    q = unpack_weight(qweight, bits, sym=sym).numpy().astype(np.int32)  # [N, K]
    n, k = q.shape
    if group_size <= 0 or k % group_size:
        raise unsupported(node, f"group_size {group_size} does not divide in_features {k}")
    bs = block_size_for(group_size)
    if bs is None:
        raise unsupported(node, f"group_size {group_size}: MatMulNBits needs blocks that are a power of two "
                                f"between {MIN_BLOCK} and {MAX_BLOCK}, and none divides the group")
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


def _weight(ex: Any, arg: Any, what: str, node: fx.Node) -> torch.Tensor | None:
    if arg is None:
        return None
    t = ex.module.weight(arg) if isinstance(arg, fx.Node) else None
    if t is None:
        raise unsupported(node, f"its {what} must be a stored weight, not a computed tensor")
    return t


def _wq_linear(ex: Any, node: fx.Node) -> str:
    b = ex.b
    x, qweight, scales, zeros, bias, bits, group = node.args[:7]
    layout = matmul_nbits_layout(_weight(ex, qweight, "qweight", node), _weight(ex, scales, "scales", node),
                                 _weight(ex, zeros, "zeros", node), bits, group, node=node)
    xdt = node.args[0].meta["val"].dtype
    if xdt != torch.float32:
        raise unsupported(node, f"wq_linear on {xdt} activations (the export handles float32)")
    if bits == 3:
        ex.notes["3-bit wq_linear widened to 4-bit MatMulNBits codes (same weights, 4 bits stored each)"] += 1
    hint = ex.module.weight_name(qweight)
    inputs = [b.value(x), b.initializer(layout["B"], hint + ".nbits"),
              b.initializer(layout["scales"].astype(np.float32), hint + ".scales")]
    inputs.append(b.initializer(layout["zero_points"], hint + ".zp") if layout["zero_points"] is not None else "")
    if bias is not None:
        inputs += ["", b.cast(b.value(bias), bias.meta["val"].dtype, torch.float32)]
    while inputs and inputs[-1] == "":
        inputs.pop()
    return b.op("MatMulNBits", inputs, domain=MS_DOMAIN, K=layout["K"], N=layout["N"], bits=layout["bits"],
                block_size=layout["block_size"])


def _w8a8_linear(ex: Any, node: fx.Node) -> str:
    b = ex.b
    x, qweight, wscale = node.args[:3]
    bias = node.args[3] if len(node.args) > 3 else node.kwargs.get("bias")
    qw = _weight(ex, qweight, "qweight", node)
    ws = _weight(ex, wscale, "wscale", node)
    if qw.dtype != torch.int8:
        raise unsupported(node, f"w8a8_linear weight of dtype {qw.dtype} (int8 expected)")
    if node.args[0].meta["val"].dtype != torch.float32:
        raise unsupported(node, "w8a8_linear on non-float32 activations")
    hint = ex.module.weight_name(qweight)
    f32 = np.float32
    xv = b.value(x)
    sx = _absmax_scale(b, xv, 127)
    qx = b.op("Cast", [b.op("Clip", [b.op("Round", [b.op("Div", [xv, sx])]), b.const(-127.0, f32),
                                     b.const(127.0, f32)])], to=3)  # 3 = INT8
    acc = b.op("MatMulInteger", [qx, b.initializer(qw.numpy().T.copy(), hint + ".T")])
    y = b.op("Mul", [b.op("Cast", [acc], to=1), sx])  # 1 = FLOAT
    y = b.op("Mul", [y, b.initializer(ws.detach().to(torch.float32).numpy(), hint + ".wscale")])
    if bias is not None:
        y = b.op("Add", [y, b.cast(b.value(bias), bias.meta["val"].dtype, torch.float32)])
    return y


def _absmax_scale(b: Any, x: str, qmax: int) -> str:
    """``s = max(|x|, last axis, keepdims) / qmax``, and 1 where that is 0 (the reference kernels' guard)."""
    f32 = np.float32
    s = b.op("Div", [b.op("ReduceMax", [b.op("Abs", [x]), b.const([-1], np.int64)], keepdims=1),
                     b.const(float(qmax), f32)])
    return b.op("Where", [b.op("Greater", [s, b.const(0.0, f32)]), s, b.const(1.0, f32)])


def _kv_fake_quant(ex: Any, node: fx.Node) -> str:
    """``q * s`` with ``s`` the per-vector absmax scale and ``q = clamp(round(x / s), -qmax, qmax)``."""
    b = ex.b
    x, bits = node.args[:2]
    if node.args[0].meta["val"].dtype != torch.float32:
        raise unsupported(node, "kv_fake_quant on non-float32 tensors")
    qmax = (1 << (bits - 1)) - 1
    xv = b.value(x)
    s = _absmax_scale(b, xv, qmax)
    q = b.op("Clip", [b.op("Round", [b.op("Div", [xv, s])]), b.const(-float(qmax), np.float32),
                      b.const(float(qmax), np.float32)])
    return b.op("Mul", [q, s])


LLMPRESS_TRANSLATIONS = {
    "llmpress.wq_linear.default": _wq_linear,
    "llmpress.w8a8_linear.default": _w8a8_linear,
    "llmpress.kv_fake_quant.default": _kv_fake_quant,
}
