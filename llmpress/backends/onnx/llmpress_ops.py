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

``llmpress::w8a8_linear`` has two forms, chosen at export (``export(..., w8a8=...)``, target ``onnx:qdq`` /
``onnx:integer``; the default is ``qdq``), recorded in the model's metadata as ``llmpress.w8a8``:

- ``qdq`` (default): QuantizeLinear/DequantizeLinear around a float ``MatMul``, the form ONNX tools read as
  "int8 here" (ORT's QDQ transformers, TensorRT, other runtimes)::

      x2d = Reshape(x, [M, K]);  sx = ReduceMax(|x2d|, axis=-1) / 127 (1 where 0)            [M]
      xq  = DequantizeLinear(QuantizeLinear(x2d, sx, zp=int8 0, axis=0), sx, 0, axis=0)      per-token, runtime scale
      wq  = DequantizeLinear(qw^T int8 [K, N], wscale [N], zp=int8 0, axis=1)                per-output-channel
      y   = Reshape(MatMul(xq, wq) (+ bias), [..., N])

  QuantizeLinear rounds half to even and saturates to [-128, 127] (ONNX spec; ORT 1.32's CPU kernel divides
  ``x / scale`` as the reference does): the codes are identical to ``quantize_activation``'s (checked on ties and
  zero rows in the tests), and -128 is never reached because ``|x / sx| <= 127``. What differs from the reference
  is float32 arithmetic only: the reference sums the integer products exactly and scales once
  (``acc * sx * ws``), the QDQ graph multiplies the dequantized values and sums them in float32 (MLAS order), a
  relative error of about ``K`` float32 ulps of ``sum_k |xq[m, k] wq[k, n]|`` at worst.
- ``integer``: explicit dynamic per-token quantization + ``MatMulInteger`` (int8 x int8 -> int32)::

      sx = ReduceMax(|x|, axis=-1) / 127 (1 where 0);  qx = Cast<int8>(Clip(Round(x / sx), -127, 127))
      y  = Cast<float>(MatMulInteger(qx, qw^T)) * sx * wscale (+ bias)

  ONNX's ``DynamicQuantizeLinear`` is per-tensor asymmetric uint8, which is not the op's semantics (per-token
  symmetric int8), so the quantization is spelled out with standard ops; the integer product is exact in int32,
  so this form equals the reference up to the rounding of the two final products.

KV-cache ops (``llmpress/ir/ops/kv_quant.py``; per-vector absmax scale ``s = max_d |x| / qmax``, 1 where 0), all
standard ops and bit-exact against the reference kernels (the same float32 division, half-to-even rounding and
product):

- ``kv_scale(x, bits)``     -> ``Where(s > 0, s, 1)`` with ``s = ReduceMax(Abs(x), -1, keepdims) / qmax``;
- ``kv_codes(x, s, bits)``  -> ``Cast<int8>(Clip(Round(x / s), -qmax, qmax))``;
- ``kv_dequant(codes, s)``  -> ``Cast<float>(codes) * s``;
- ``kv_fake_quant(x, bits)`` -> ``Clip(Round(x / s), -qmax, qmax) * s`` (the float-storage form).

The int8 cache itself is written with ``ScatterElements`` on int8 (codes) and float32 (scales) tensors, which ORT's
CPU kernel supports for every element type.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.fx as fx

from .graph import MS_DOMAIN, np_dtype, unsupported

__all__ = ["LLMPRESS_TRANSLATIONS", "W8A8_FORMS", "matmul_nbits_layout", "block_size_for"]

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


W8A8_FORMS = ("qdq", "integer")  # the first is the default


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
    qw_t = b.initializer(qw.numpy().T.copy(), hint + ".T")  # int8 [K, N]: MatMul(x, W^T) without a Transpose
    ws_v = b.initializer(ws.detach().to(torch.float32).numpy(), hint + ".wscale")
    if ex.w8a8 == "integer":
        y = _w8a8_integer(b, b.value(x), qw_t, ws_v)
    else:
        y = _w8a8_qdq(b, b.value(x), qw_t, ws_v, k=qw.shape[1], n=qw.shape[0], hint=hint)
    if bias is not None:
        y = b.op("Add", [y, b.cast(b.value(bias), bias.meta["val"].dtype, torch.float32)])
    if ex.w8a8 != "integer":
        y = b.op("Reshape", [y, b.op("Concat", [b.op("Shape", [b.value(x)], end=-1), b.const([qw.shape[0]], np.int64)],
                                     axis=0)])
    return y


def _w8a8_integer(b: Any, xv: str, qw_t: str, ws_v: str) -> str:
    """Per-token int8 codes by hand, ``MatMulInteger`` (exact int32), then ``* sx * wscale``."""
    f32 = np.float32
    sx = _absmax_scale(b, xv, 127)
    qx = b.op("Cast", [b.op("Clip", [b.op("Round", [b.op("Div", [xv, sx])]), b.const(-127.0, f32),
                                     b.const(127.0, f32)])], to=3)  # 3 = INT8
    acc = b.op("MatMulInteger", [qx, qw_t])
    y = b.op("Mul", [b.op("Cast", [acc], to=1), sx])  # 1 = FLOAT
    return b.op("Mul", [y, ws_v])


def _w8a8_qdq(b: Any, xv: str, qw_t: str, ws_v: str, *, k: int, n: int, hint: str) -> str:
    """``MatMul(DQ(Q(x2d, sx, axis=0)), DQ(qw^T, wscale, axis=1))`` on the ``[M, K]`` view of ``x``; the caller
    adds the bias and reshapes back."""
    x2d = b.op("Reshape", [xv, b.const([-1, k], np.int64)])
    sx = b.op("Squeeze", [_absmax_scale(b, x2d, 127), b.const([1], np.int64)])  # [M]: per-axis Q wants 1-D
    # Per-axis zero points must have the scale's shape; an int8 zero point also makes the codes int8 (not uint8).
    zx = b.op("ConstantOfShape", [b.op("Shape", [sx])], value=_int8_zero())
    xq = b.op("DequantizeLinear", [b.op("QuantizeLinear", [x2d, sx, zx], axis=0), sx, zx], axis=0)
    zw = b.initializer(np.zeros(n, np.int8), hint + ".wzp")
    wq = b.op("DequantizeLinear", [qw_t, ws_v, zw], axis=1)
    return b.op("MatMul", [xq, wq])


def _int8_zero():
    from onnx import TensorProto, helper

    return helper.make_tensor("zero", TensorProto.INT8, [1], [0])


def _absmax_scale(b: Any, x: str, qmax: int) -> str:
    """``s = max(|x|, last axis, keepdims) / qmax``, and 1 where that is 0 (the reference kernels' guard)."""
    f32 = np.float32
    s = b.op("Div", [b.op("ReduceMax", [b.op("Abs", [x]), b.const([-1], np.int64)], keepdims=1),
                     b.const(float(qmax), f32)])
    return b.op("Where", [b.op("Greater", [s, b.const(0.0, f32)]), s, b.const(1.0, f32)])


def _kv_float(b: Any, node: fx.Node, what: str) -> str:
    """The float32 value of an FX tensor argument (the kv ops compute in float32, as their reference kernels)."""
    v = node.meta["val"]
    if not v.is_floating_point():
        raise unsupported(b.current, f"{what} of dtype {v.dtype} (a float tensor expected)")
    return b.cast(b.value(node), v.dtype, torch.float32)


def _kv_qmax(node: fx.Node, bits: Any) -> int:
    if not isinstance(bits, int) or not 2 <= bits <= 8:
        raise unsupported(node, f"KV-cache quantization with bits={bits!r} (2..8 expected)")
    return (1 << (bits - 1)) - 1


def _kv_codes_of(b: Any, xv: str, s: str, qmax: int) -> str:
    """``clamp(round(x / s), -qmax, qmax)`` as float32 integers (ONNX Round is half to even, like torch.round)."""
    f32 = np.float32
    return b.op("Clip", [b.op("Round", [b.op("Div", [xv, s])]), b.const(-float(qmax), f32),
                         b.const(float(qmax), f32)])


def _kv_fake_quant(ex: Any, node: fx.Node) -> str:
    """``q * s`` with ``s`` the per-vector absmax scale and ``q = clamp(round(x / s), -qmax, qmax)``."""
    b = ex.b
    x, bits = node.args[:2]
    if node.args[0].meta["val"].dtype != torch.float32:
        raise unsupported(node, "kv_fake_quant on non-float32 tensors")
    qmax = _kv_qmax(node, bits)
    xv = b.value(x)
    s = _absmax_scale(b, xv, qmax)
    return b.op("Mul", [_kv_codes_of(b, xv, s, qmax), s])


def _kv_scale(ex: Any, node: fx.Node) -> str:
    """``float32 [..., 1]``: ``max_d |x| / qmax``, 1 where that is 0."""
    x, bits = node.args[:2]
    return _absmax_scale(ex.b, _kv_float(ex.b, x, "kv_scale input"), _kv_qmax(node, bits))


def _kv_codes(ex: Any, node: fx.Node) -> str:
    """``int8 [...]``: ``clamp(round(x / scale), -qmax, qmax)``."""
    b = ex.b
    x, scale, bits = node.args[:3]
    q = _kv_codes_of(b, _kv_float(b, x, "kv_codes input"), _kv_float(b, scale, "kv_codes scale"),
                     _kv_qmax(node, bits))
    return b.op("Cast", [q], to=3)  # 3 = INT8; exact: q is an integer in [-127, 127]


def _kv_dequant(ex: Any, node: fx.Node) -> str:
    """``float32``: ``codes * scale`` (scale ``[..., 1]`` broadcasts over the last axis)."""
    b = ex.b
    codes, scale = node.args[:2]
    return b.op("Mul", [b.op("Cast", [b.value(codes)], to=1), _kv_float(b, scale, "kv_dequant scale")])


LLMPRESS_TRANSLATIONS = {
    "llmpress.wq_linear.default": _wq_linear,
    "llmpress.w8a8_linear.default": _w8a8_linear,
    "llmpress.kv_fake_quant.default": _kv_fake_quant,
    "llmpress.kv_scale.default": _kv_scale,
    "llmpress.kv_codes.default": _kv_codes,
    "llmpress.kv_dequant.default": _kv_dequant,
}
