"""Translations of llmpress's compressed ops into ONNX Runtime ops.

``llmpress::wq_linear`` -> ``com.microsoft.MatMulNBits``, with its activation quantization spelled out in standard
ops when ``act_bits=8``: see ``matmul_nbits.py``.

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

:data:`LLMPRESS_TRANSLATIONS` is this backend's op table: every op of ``torch.ops.llmpress`` has an entry, a
translation ``fn(exporter, fx_node) -> onnx value name`` or ``NotExportable(why)`` for an op refused on purpose
(``export.check`` reports the reason before anything is written). ``tests/backends/test_op_tables.py`` fails,
naming the op, for any registered op without one.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
import torch.fx as fx

from .graph import absmax_scale, stored_weight, symmetric_codes, unsupported
from .matmul_nbits import translate_wq_linear

__all__ = ["LLMPRESS_TRANSLATIONS", "W8A8_FORMS", "NotExportable", "Translation"]

W8A8_FORMS = ("qdq", "integer")  # the first is the default


@dataclass(frozen=True)
class NotExportable:
    """An op table entry for an op the ONNX export refuses on purpose; ``why`` is what ``export.check`` reports."""

    why: str


#: ``fn(exporter, fx_node) -> name of the ONNX value computed``.
Translation = Callable[[Any, fx.Node], str]


def _w8a8_linear(ex: Any, node: fx.Node) -> str:
    b = ex.b
    x, qweight, wscale = node.args[:3]
    bias = node.args[3] if len(node.args) > 3 else node.kwargs.get("bias")
    qw = stored_weight(ex, qweight, "qweight", node)
    ws = stored_weight(ex, wscale, "wscale", node)
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
    sx = absmax_scale(b, xv, 127)
    qx = b.op("Cast", [b.op("Clip", [b.op("Round", [b.op("Div", [xv, sx])]), b.const(-127.0, f32),
                                     b.const(127.0, f32)])], to=3)  # 3 = INT8
    acc = b.op("MatMulInteger", [qx, qw_t])
    y = b.op("Mul", [b.op("Cast", [acc], to=1), sx])  # 1 = FLOAT
    return b.op("Mul", [y, ws_v])


def _w8a8_qdq(b: Any, xv: str, qw_t: str, ws_v: str, *, k: int, n: int, hint: str) -> str:
    """``MatMul(DQ(Q(x2d, sx, axis=0)), DQ(qw^T, wscale, axis=1))`` on the ``[M, K]`` view of ``x``; the caller
    adds the bias and reshapes back."""
    x2d = b.op("Reshape", [xv, b.const([-1, k], np.int64)])
    sx = b.op("Squeeze", [absmax_scale(b, x2d, 127), b.const([1], np.int64)])  # [M]: per-axis Q wants 1-D
    # Per-axis zero points must have the scale's shape; an int8 zero point also makes the codes int8 (not uint8).
    zx = b.op("ConstantOfShape", [b.op("Shape", [sx])], value=_int8_zero())
    xq = b.op("DequantizeLinear", [b.op("QuantizeLinear", [x2d, sx, zx], axis=0), sx, zx], axis=0)
    zw = b.initializer(np.zeros(n, np.int8), hint + ".wzp")
    wq = b.op("DequantizeLinear", [qw_t, ws_v, zw], axis=1)
    return b.op("MatMul", [xq, wq])


def _int8_zero():
    from onnx import TensorProto, helper

    return helper.make_tensor("zero", TensorProto.INT8, [1], [0])


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


def _kv_fake_quant(ex: Any, node: fx.Node) -> str:
    """``q * s`` with ``s`` the per-vector absmax scale and ``q = clamp(round(x / s), -qmax, qmax)``."""
    b = ex.b
    x, bits = node.args[:2]
    if node.args[0].meta["val"].dtype != torch.float32:
        raise unsupported(node, "kv_fake_quant on non-float32 tensors")
    qmax = _kv_qmax(node, bits)
    xv = b.value(x)
    s = absmax_scale(b, xv, qmax)
    return b.op("Mul", [symmetric_codes(b, xv, s, qmax), s])


def _kv_scale(ex: Any, node: fx.Node) -> str:
    """``float32 [..., 1]``: ``max_d |x| / qmax``, 1 where that is 0."""
    x, bits = node.args[:2]
    return absmax_scale(ex.b, _kv_float(ex.b, x, "kv_scale input"), _kv_qmax(node, bits))


def _kv_codes(ex: Any, node: fx.Node) -> str:
    """``int8 [...]``: ``clamp(round(x / scale), -qmax, qmax)``."""
    b = ex.b
    x, scale, bits = node.args[:3]
    q = symmetric_codes(b, _kv_float(b, x, "kv_codes input"), _kv_float(b, scale, "kv_codes scale"),
                     _kv_qmax(node, bits))
    return b.op("Cast", [q], to=3)  # 3 = INT8; exact: q is an integer in [-127, 127]


def _kv_dequant(ex: Any, node: fx.Node) -> str:
    """``float32``: ``codes * scale`` (scale ``[..., 1]`` broadcasts over the last axis)."""
    b = ex.b
    codes, scale = node.args[:2]
    return b.op("Mul", [b.op("Cast", [b.value(codes)], to=1), _kv_float(b, scale, "kv_dequant scale")])


#: full op name (``Module.op_histogram`` spelling) -> its translation or ``NotExportable(why)``; one block per family.
LLMPRESS_TRANSLATIONS: dict[str, Translation | NotExportable] = {
    "llmpress.wq_linear.default": translate_wq_linear,
    "llmpress.w8a8_linear.default": _w8a8_linear,
    "llmpress.kv_fake_quant.default": _kv_fake_quant,
    "llmpress.kv_scale.default": _kv_scale,
    "llmpress.kv_codes.default": _kv_codes,
    "llmpress.kv_dequant.default": _kv_dequant,
}
