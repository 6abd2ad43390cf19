"""ONNX converters for arithmetic: elementwise and variadic ops, MatMul/Gemm, activations, reductions, norms.

Binary ops, ``Neg`` and comparisons stay static (numpy) when both operands are static, so shape arithmetic keeps
symbolic sizes; everything else runs on tensors. Opset differences follow the ONNX specs: ``axes`` of
ReduceSum is an attribute before opset 13 and an input after (ReduceMean/ReduceMax: 18); Softmax/LogSoftmax before
opset 13 coerce the input to 2-D at ``axis``; integer ``Div`` truncates toward zero.
"""
from __future__ import annotations

import numpy as np
import torch
from torch.nn import functional as F

from .values import Converter, as_tensor, is_static, norm_axis, registrar, static_ints

__all__ = ["CONVERTERS"]

CONVERTERS: dict[str, Converter] = {}
_op = registrar(CONVERTERS)


def _binary(torch_fn, np_fn):
    def fn(ins, a, opset):
        x, y = ins
        if is_static(x) and is_static(y):
            return [np_fn(x, y)]
        return [torch_fn(as_tensor(x), as_tensor(y))]
    return fn


def _div_np(x, y):
    if x.dtype == object or y.dtype == object:
        return x // y  # symbolic shape arithmetic: sizes are non-negative, so truncation == floor
    if np.issubdtype(x.dtype, np.integer):
        return (np.abs(x) // np.abs(y) * np.sign(x) * np.sign(y)).astype(x.dtype)  # ONNX: truncate toward zero
    return x / y


def _div_t(x, y):
    if not x.dtype.is_floating_point:
        return torch.div(x, y, rounding_mode="trunc")
    return x / y


CONVERTERS["Add"] = _binary(torch.add, lambda x, y: x + y)
CONVERTERS["Sub"] = _binary(torch.sub, lambda x, y: x - y)
CONVERTERS["Mul"] = _binary(torch.mul, lambda x, y: x * y)
CONVERTERS["Div"] = _binary(_div_t, _div_np)
CONVERTERS["Equal"] = _binary(torch.eq, lambda x, y: x == y)
CONVERTERS["Less"] = _binary(torch.lt, lambda x, y: x < y)
CONVERTERS["Greater"] = _binary(torch.gt, lambda x, y: x > y)
CONVERTERS["LessOrEqual"] = _binary(torch.le, lambda x, y: x <= y)
CONVERTERS["GreaterOrEqual"] = _binary(torch.ge, lambda x, y: x >= y)
CONVERTERS["And"] = _binary(torch.logical_and, lambda x, y: np.logical_and(x, y))
CONVERTERS["Or"] = _binary(torch.logical_or, lambda x, y: np.logical_or(x, y))
CONVERTERS["Pow"] = _binary(lambda x, y: torch.pow(x, y).to(x.dtype), lambda x, y: x ** y)
@_op("MatMul")
def _matmul(ins, a, o):
    if a.get("_weight_transposed"):  # a weight initializer the importer stored as [out, in]: x @ W = linear(x, W^T)
        return [F.linear(as_tensor(ins[0]), ins[1])]
    return [torch.matmul(as_tensor(ins[0]), as_tensor(ins[1]))]

for _name, _fn in {"Sqrt": torch.sqrt, "Reciprocal": torch.reciprocal, "Exp": torch.exp, "Log": torch.log,
                   "Tanh": torch.tanh, "Erf": torch.erf, "Relu": torch.relu, "Sigmoid": torch.sigmoid,
                   "Sin": torch.sin, "Cos": torch.cos, "Abs": torch.abs, "Not": torch.logical_not,
                   "Floor": torch.floor, "Ceil": torch.ceil}.items():
    CONVERTERS[_name] = (lambda f: lambda ins, a, o: [f(as_tensor(ins[0]))])(_fn)


@_op("Neg")
def _neg(ins, a, o):
    return [-ins[0]] if is_static(ins[0]) else [torch.neg(ins[0])]


@_op("Gemm")
def _gemm(ins, a, o):
    x, w = as_tensor(ins[0]), as_tensor(ins[1])
    c = as_tensor(ins[2]) if len(ins) > 2 and ins[2] is not None else None
    alpha, beta = a.get("alpha", 1.0), a.get("beta", 1.0)
    if a.get("transA", 0):
        x = x.t()
    if a.get("transB", 0) and alpha == 1.0 and (c is None or beta == 1.0):
        return [F.linear(x, w, c)]  # the common Linear export: keeps aten.linear in the IR for the passes
    y = torch.matmul(x, w.t() if a.get("transB", 0) else w)
    if alpha != 1.0:
        y = y * alpha
    if c is not None:
        y = y + (c * beta if beta != 1.0 else c)
    return [y]


@_op("Gelu")
def _gelu(ins, a, o):
    approx = a.get("approximate", b"none")
    return [F.gelu(as_tensor(ins[0]), approximate=approx.decode() if isinstance(approx, bytes) else approx)]


def _softmax(fn):
    def conv(ins, a, opset):
        x = as_tensor(ins[0])
        if opset >= 13:
            return [fn(x, dim=a.get("axis", -1))]
        axis = norm_axis(a.get("axis", 1), x.dim())  # before opset 13: flatten to 2-D at axis
        lead = 1
        for d in x.shape[:axis]:
            lead = lead * d
        flat = x.reshape(lead, -1)
        return [fn(flat, dim=-1).reshape(x.shape)]
    return conv


CONVERTERS["Softmax"] = _softmax(torch.softmax)
CONVERTERS["LogSoftmax"] = _softmax(torch.log_softmax)


def _reduce(kind: str, axes_input_opset: int):
    def conv(ins, a, opset):
        x = as_tensor(ins[0])
        keep = bool(a.get("keepdims", 1))
        axes = list(a["axes"]) if "axes" in a else (
            static_ints(ins[1], "axes") if opset >= axes_input_opset and len(ins) > 1 and ins[1] is not None
            else None)
        if not axes:
            if a.get("noop_with_empty_axes", 0):
                return [x]
            axes = list(range(x.dim()))
        axes = [norm_axis(int(d), x.dim()) for d in axes]
        if kind == "mean":
            return [x.mean(dim=axes, keepdim=keep)]
        if kind == "sum":
            return [x.sum(dim=axes, keepdim=keep)]
        if any(x.shape[d] == 0 for d in axes if isinstance(x.shape[d], int)):  # max of nothing: the lowest value
            shape = [1 if d in axes else n for d, n in enumerate(x.shape) if keep or d not in axes]
            low = False if x.dtype == torch.bool else (
                -float("inf") if x.dtype.is_floating_point else torch.iinfo(x.dtype).min)
            return [torch.full(shape, low, dtype=x.dtype)]
        return [torch.amax(x, dim=axes, keepdim=keep)]
    return conv


CONVERTERS["ReduceMean"] = _reduce("mean", 18)
CONVERTERS["ReduceSum"] = _reduce("sum", 13)
CONVERTERS["ReduceMax"] = _reduce("max", 18)


@_op("LayerNormalization")
def _layer_norm(ins, a, o):
    x = as_tensor(ins[0])
    axis = norm_axis(a.get("axis", -1), x.dim())
    eps = a.get("epsilon", 1e-5)
    w = as_tensor(ins[1]) if len(ins) > 1 and ins[1] is not None else None
    b = as_tensor(ins[2]) if len(ins) > 2 and ins[2] is not None else None
    dims = list(range(axis, x.dim()))
    if a["_n_outputs"] == 1:
        return [F.layer_norm(x, tuple(x.shape[axis:]), w, b, eps)]
    mean = x.mean(dim=dims, keepdim=True)
    inv = torch.rsqrt((x - mean).pow(2).mean(dim=dims, keepdim=True) + eps)
    y = (x - mean) * inv
    y = y * w if w is not None else y
    y = y + b if b is not None else y
    return [y, mean, inv]


def _variadic(fn):
    def conv(ins, a, o):
        vals = [v for v in ins if v is not None]
        out = as_tensor(vals[0])
        for v in vals[1:]:
            out = fn(out, as_tensor(v))
        return [out]
    return conv


CONVERTERS["Max"] = _variadic(torch.maximum)
CONVERTERS["Min"] = _variadic(torch.minimum)
CONVERTERS["Sum"] = _variadic(torch.add)


@_op("CumSum")
def _cumsum(ins, a, o):
    """y[..., i, ...] = sum_{j <= i} x[..., j, ...] along ``axis`` (``exclusive``: j < i; ``reverse``: j >= i / j > i),
    in the input's dtype. Static (numpy) when ``x`` is static, so position ids computed from constants stay shape
    arithmetic; the exclusive sum shifts by one instead of subtracting x (exact for floats too)."""
    x = ins[0]
    static = is_static(x) and x.dtype != object
    rank = x.ndim if static else as_tensor(x).dim()
    axis = norm_axis(int(static_ints(ins[1], "CumSum axis")[0]), rank)
    rev, excl = a.get("reverse", 0), a.get("exclusive", 0)
    if static:
        t = np.flip(x, axis) if rev else x
        y = np.cumsum(t, axis=axis, dtype=t.dtype)
        if excl:
            y = np.concatenate([np.zeros_like(np.take(t, [0], axis=axis)), np.delete(y, -1, axis=axis)], axis=axis)
        return [np.ascontiguousarray(np.flip(y, axis) if rev else y)]
    t = as_tensor(x)
    t = t.flip(axis) if rev else t
    y = torch.cumsum(t, axis, dtype=t.dtype)
    if excl:
        y = torch.cat([torch.zeros_like(t.narrow(axis, 0, 1)), y.narrow(axis, 0, t.shape[axis] - 1)], dim=axis)
    return [y.flip(axis) if rev else y]


@_op("IsNaN")
def _isnan(ins, a, o):
    x = ins[0]
    if is_static(x) and x.dtype != object:
        return [np.isnan(x) if np.issubdtype(x.dtype, np.floating) else np.zeros(x.shape, dtype=np.bool_)]
    return [torch.isnan(as_tensor(x))]


@_op("IsInf")
def _isinf(ins, a, o):
    """IsInf(x) = (x == +inf and detect_positive) or (x == -inf and detect_negative)."""
    x = as_tensor(ins[0])
    pos, neg = a.get("detect_positive", 1), a.get("detect_negative", 1)
    if pos and neg:
        return [torch.isinf(x)]
    if pos:
        return [torch.isposinf(x)]
    if neg:
        return [torch.isneginf(x)]
    return [torch.zeros_like(x, dtype=torch.bool)]
