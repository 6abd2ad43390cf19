"""ATen -> ONNX translations (opset 18) of arithmetic, reductions and linear algebra; one function per op.

Each translator gets the exporter (``ex.b`` is the ``GraphBuilder``, ``ex.weight_array`` reads stored weights) and
the FX node, and returns the node's ONNX value(s). Shapes and dtypes come from ``node.meta["val"]`` (the fake
tensors ``torch.export`` recorded), so every translation knows its output rank and dtype statically.

Where ATen and ONNX differ:
- arithmetic follows ATen type promotion: operands are cast to the node's output dtype (ONNX has no implicit
  promotion); Python scalars become constants of that dtype (as ATen computes ``x + 1e-5`` in x's dtype);
- ``rsqrt(x)`` is ``Reciprocal(Sqrt(x))``, ``silu(x)`` is ``x * Sigmoid(x)``, ``pow(x, 2)`` is ``x * x``;
- ``linear(x, W)`` is ``MatMul(x, W^T)`` with ``W^T`` stored once as an initializer;
- ``to`` (any overload: dtype, device, layout) is a ``Cast`` or an ``Identity``: an ONNX model has one device.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np
import torch
import torch.fx as fx

from .graph import (GraphBuilder, axis, common_dtype, np_dtype, operand, rank, unsupported, val,  # noqa: F401
                    weight_name)

__all__ = ["MATH", "transposed_weight"]

aten = torch.ops.aten
MATH: dict[Any, Callable] = {}


def _register(*targets: Any) -> Callable:
    def deco(fn: Callable) -> Callable:
        for t in targets:
            MATH[t] = fn
        return fn

    return deco


# -- elementwise -------------------------------------------------------------------------------------------------
def _binary(onnx_op: str) -> Callable:
    def fn(ex: Any, node: fx.Node) -> str:
        b = ex.b
        dt = val(node).dtype
        a, c = node.args[0], node.args[1]
        alpha = node.kwargs.get("alpha", 1)
        x, y = operand(b, a, dt), operand(b, c, dt)
        if alpha != 1:
            y = b.op("Mul", [y, b.const(alpha, np_dtype(dt, node))])
        return b.op(onnx_op, [x, y])

    return fn


for _t, _o in [(aten.add.Tensor, "Add"), (aten.add.Scalar, "Add"), (aten.sub.Tensor, "Sub"),
               (aten.sub.Scalar, "Sub"), (aten.mul.Tensor, "Mul"), (aten.mul.Scalar, "Mul"),
               (aten.div.Tensor, "Div"), (aten.div.Scalar, "Div"), (aten.maximum.default, "Max"),
               (aten.minimum.default, "Min")]:
    _register(_t)(_binary(_o))


@_register(aten.rsub.Scalar, aten.rsub.Tensor)
def _rsub(ex: Any, node: fx.Node) -> str:
    b, dt = ex.b, val(node).dtype
    alpha = node.kwargs.get("alpha", 1)
    x, y = operand(b, node.args[0], dt), operand(b, node.args[1], dt)
    if alpha != 1:
        x = b.op("Mul", [x, b.const(alpha, np_dtype(dt, node))])
    return b.op("Sub", [y, x])


def _compare(onnx_op: str, negate: bool = False) -> Callable:
    def fn(ex: Any, node: fx.Node) -> str:
        b = ex.b
        dt = common_dtype(list(node.args[:2]))
        out = b.op(onnx_op, [operand(b, node.args[0], dt), operand(b, node.args[1], dt)])
        return b.op("Not", [out]) if negate else out

    return fn


for _ts, _o, _n in [((aten.gt.Tensor, aten.gt.Scalar), "Greater", False),
                    ((aten.lt.Tensor, aten.lt.Scalar), "Less", False),
                    ((aten.ge.Tensor, aten.ge.Scalar), "GreaterOrEqual", False),
                    ((aten.le.Tensor, aten.le.Scalar), "LessOrEqual", False),
                    ((aten.eq.Tensor, aten.eq.Scalar), "Equal", False),
                    ((aten.ne.Tensor, aten.ne.Scalar), "Equal", True)]:
    _register(*_ts)(_compare(_o, _n))


def _unary(*onnx_ops: str) -> Callable:
    def fn(ex: Any, node: fx.Node) -> str:
        x = ex.b.value(node.args[0])
        for o in onnx_ops:
            x = ex.b.op(o, [x])
        return x

    return fn


for _t, _os in [(aten.neg.default, ("Neg",)), (aten.rsqrt.default, ("Sqrt", "Reciprocal")),
                (aten.sqrt.default, ("Sqrt",)), (aten.exp.default, ("Exp",)), (aten.log.default, ("Log",)),
                (aten.abs.default, ("Abs",)), (aten.sigmoid.default, ("Sigmoid",)), (aten.tanh.default, ("Tanh",)),
                (aten.relu.default, ("Relu",)), (aten.reciprocal.default, ("Reciprocal",)),
                (aten.sin.default, ("Sin",)), (aten.cos.default, ("Cos",)), (aten.logical_not.default, ("Not",)),
                (aten.clone.default, ("Identity",)), (aten.alias.default, ("Identity",)),
                (aten.detach.default, ("Identity",)), (aten.lift_fresh_copy.default, ("Identity",))]:
    _register(_t)(_unary(*_os))


@_register(aten.silu.default)
def _silu(ex: Any, node: fx.Node) -> str:
    x = ex.b.value(node.args[0])
    return ex.b.op("Mul", [x, ex.b.op("Sigmoid", [x])])


@_register(aten.gelu.default)
def _gelu(ex: Any, node: fx.Node) -> str:
    b = ex.b
    x = b.value(node.args[0])
    dt = np_dtype(val(node).dtype, node)
    if node.kwargs.get("approximate", "none") == "tanh":
        # 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
        x3 = b.op("Mul", [b.op("Mul", [x, x]), x])
        inner = b.op("Mul", [b.op("Add", [x, b.op("Mul", [x3, b.const(0.044715, dt)])]),
                             b.const(math.sqrt(2 / math.pi), dt)])
        t = b.op("Add", [b.op("Tanh", [inner]), b.const(1.0, dt)])
    else:
        # 0.5 x (1 + erf(x / sqrt(2)))
        t = b.op("Add", [b.op("Erf", [b.op("Mul", [x, b.const(1 / math.sqrt(2), dt)])]), b.const(1.0, dt)])
    return b.op("Mul", [b.op("Mul", [x, t]), b.const(0.5, dt)])


@_register(aten.pow.Tensor_Scalar)
def _pow(ex: Any, node: fx.Node) -> str:
    b = ex.b
    x, e = b.value(node.args[0]), node.args[1]
    if e == 2:
        return b.op("Mul", [x, x])
    if e == 0.5:
        return b.op("Sqrt", [x])
    if e == 1:
        return b.op("Identity", [x])
    return b.op("Pow", [x, b.const(e, np_dtype(val(node).dtype, node))])


@_register(aten.pow.Tensor_Tensor)
def _pow_tt(ex: Any, node: fx.Node) -> str:
    dt = val(node).dtype
    return ex.b.op("Pow", [operand(ex.b, node.args[0], dt), operand(ex.b, node.args[1], dt)])


@_register(aten.where.self, aten.where.ScalarOther, aten.where.ScalarSelf, aten.where.Scalar)
def _where(ex: Any, node: fx.Node) -> str:
    b, dt = ex.b, val(node).dtype
    return b.op("Where", [b.value(node.args[0]), operand(b, node.args[1], dt), operand(b, node.args[2], dt)])


@_register(aten.masked_fill.Scalar, aten.masked_fill.Tensor)
def _masked_fill(ex: Any, node: fx.Node) -> str:
    b, dt = ex.b, val(node).dtype
    x, mask, v = node.args[:3]
    return b.op("Where", [b.value(mask), operand(b, v, dt), b.value(x)])


@_register(aten.logical_and.default, aten.bitwise_and.Tensor, aten.__and__.Tensor)
def _and(ex: Any, node: fx.Node) -> str:
    if val(node).dtype != torch.bool:
        raise unsupported(node, "bitwise and on non-boolean tensors")
    return ex.b.op("And", [ex.b.value(node.args[0]), ex.b.value(node.args[1])])


@_register(aten.logical_or.default, aten.bitwise_or.Tensor, aten.__or__.Tensor)
def _or(ex: Any, node: fx.Node) -> str:
    if val(node).dtype != torch.bool:
        raise unsupported(node, "bitwise or on non-boolean tensors")
    return ex.b.op("Or", [ex.b.value(node.args[0]), ex.b.value(node.args[1])])


@_register(aten._to_copy.default, aten.to.dtype, aten.to.dtype_layout, aten.to.device, aten.type_as.default)
def _to(ex: Any, node: fx.Node) -> str:
    """A cast to the node's dtype, else Identity: ONNX has one device, so ``to(device=...)`` (transformers moves
    positions and masks to the model's device) and ``layout``/``memory_format`` change nothing."""
    src = val(node.args[0])
    return ex.b.cast(ex.b.value(node.args[0]), src.dtype, val(node).dtype) if src.dtype != val(node).dtype \
        else ex.b.op("Identity", [ex.b.value(node.args[0])])


# -- reductions and normalisation --------------------------------------------------------------------------------
def _reduce(onnx_op: str) -> Callable:
    def fn(ex: Any, node: fx.Node) -> str:
        b = ex.b
        x = node.args[0]
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        keep = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
        if node.kwargs.get("dtype") is not None:
            raise unsupported(node, "reduction with a dtype argument")
        if dims is None or (isinstance(dims, (list, tuple)) and len(dims) == 0):
            dims = list(range(rank(x)))
        if isinstance(dims, int):
            dims = [dims]
        axes = b.const([axis(d, rank(x)) for d in dims], np.int64)
        return b.op(onnx_op, [b.value(x), axes], keepdims=int(bool(keep)))

    return fn


_register(aten.mean.dim)(_reduce("ReduceMean"))
_register(aten.sum.dim_IntList)(_reduce("ReduceSum"))
_register(aten.amax.default)(_reduce("ReduceMax"))
_register(aten.amin.default)(_reduce("ReduceMin"))


@_register(aten.softmax.int, aten._softmax.default)
def _softmax(ex: Any, node: fx.Node) -> str:
    x = node.args[0]
    return ex.b.op("Softmax", [ex.b.value(x)], axis=axis(node.args[1], rank(x)))


@_register(aten.log_softmax.int, aten._log_softmax.default)
def _log_softmax(ex: Any, node: fx.Node) -> str:
    x = node.args[0]
    return ex.b.op("LogSoftmax", [ex.b.value(x)], axis=axis(node.args[1], rank(x)))


@_register(aten.layer_norm.default)
def _layer_norm(ex: Any, node: fx.Node) -> str:
    """``layer_norm(x, shape, w, b, eps)`` -> ``LayerNormalization`` (opset 17+) over the last ``len(shape)`` axes;
    a missing weight/bias is ones/zeros (what ATen computes without them)."""
    b = ex.b
    x, shape = node.args[0], list(node.args[1])
    w = node.args[2] if len(node.args) > 2 else node.kwargs.get("weight")
    bias = node.args[3] if len(node.args) > 3 else node.kwargs.get("bias")
    eps = node.args[4] if len(node.args) > 4 else node.kwargs.get("eps", 1e-5)
    dt = np_dtype(val(node).dtype, node)
    scale = b.value(w) if w is not None else b.initializer(np.ones(shape, dt), f"{node.name}.ones")
    inputs = [b.value(x), scale] + ([b.value(bias)] if bias is not None else [])
    return b.op("LayerNormalization", inputs, axis=-len(shape), epsilon=float(eps))


# -- linear algebra ----------------------------------------------------------------------------------------------
def transposed_weight(ex: Any, w: fx.Node) -> str:
    """``W^T`` as an initializer (stored weights are transposed once at export), else a Transpose node."""
    name = weight_name(ex, w)
    if name is not None:
        key = ("T", name)
        if key not in ex.derived:
            ex.derived[key] = ex.b.initializer(ex.weight_array(w).T, name + ".T")
        return ex.derived[key]
    return ex.b.op("Transpose", [ex.b.value(w)], perm=[1, 0])


@_register(aten.linear.default)
def _linear(ex: Any, node: fx.Node) -> str:
    b = ex.b
    x, w = node.args[0], node.args[1]
    bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    if rank(w) != 2:
        raise unsupported(node, f"linear with a {rank(w)}-D weight")
    y = b.op("MatMul", [b.value(x), transposed_weight(ex, w)])
    if bias is not None:
        y = b.op("Add", [y, b.value(bias)])
    return y


@_register(aten.matmul.default, aten.mm.default, aten.bmm.default)
def _matmul(ex: Any, node: fx.Node) -> str:
    return ex.b.op("MatMul", [ex.b.value(node.args[0]), ex.b.value(node.args[1])])


@_register(aten.addmm.default)
def _addmm(ex: Any, node: fx.Node) -> str:
    b = ex.b
    if node.kwargs.get("beta", 1) != 1 or node.kwargs.get("alpha", 1) != 1:
        raise unsupported(node, "addmm with alpha/beta other than 1")
    return b.op("Add", [b.op("MatMul", [b.value(node.args[1]), b.value(node.args[2])]), b.value(node.args[0])])


@_register(aten.embedding.default)
def _embedding(ex: Any, node: fx.Node) -> str:
    return ex.b.op("Gather", [ex.b.value(node.args[0]), ex.b.value(node.args[1])], axis=0)


@_register(aten.scaled_dot_product_attention.default)
def _sdpa(ex: Any, node: fx.Node) -> str:
    """``softmax(scale * q k^T + mask) v`` with standard ops; grouped-query attention (``enable_gqa``) reshapes
    ``q [B, H, T, D]`` to ``[B, KVH, rep, T, D]`` against keys/values unsqueezed to ``[B, KVH, 1, S, D]``
    (``MatMul`` broadcasts): the KV cache is never repeated."""
    b = ex.b

    def arg(i: int, name: str, default: Any) -> Any:
        return node.args[i] if len(node.args) > i else node.kwargs.get(name, default)

    q, k, v = node.args[:3]
    mask, dropout, causal = arg(3, "attn_mask", None), arg(4, "dropout_p", 0.0), arg(5, "is_causal", False)
    scale, gqa = arg(6, "scale", None), arg(7, "enable_gqa", False)
    if dropout or causal:
        raise unsupported(node, "scaled_dot_product_attention with dropout or is_causal (pass an explicit mask)")
    qs, ks = list(val(q).shape), list(val(k).shape)
    if len(qs) != 4 or not all(isinstance(d, int) for d in (qs[0], qs[1], qs[3], ks[1])):
        raise unsupported(node, "scaled_dot_product_attention needs 4-D inputs with static batch, heads, head_dim")
    bsz, heads, dim, kv_heads = qs[0], qs[1], qs[3], ks[1]
    if heads != kv_heads and (not gqa or heads % kv_heads):
        raise unsupported(node, f"{heads} query heads on {kv_heads} KV heads without enable_gqa")
    rep = heads // kv_heads
    qv, kv, vv = b.value(q), b.value(k), b.value(v)
    if rep > 1:
        qv = b.op("Reshape", [qv, b.const([bsz, kv_heads, rep, -1, dim], np.int64)])
        kv = b.op("Unsqueeze", [kv, b.const([2], np.int64)])
        vv = b.op("Unsqueeze", [vv, b.const([2], np.int64)])
    r = 5 if rep > 1 else 4
    kt = b.op("Transpose", [kv], perm=list(range(r - 2)) + [r - 1, r - 2])
    scores = b.op("Mul", [b.op("MatMul", [qv, kt]), b.const(scale if scale is not None else 1.0 / math.sqrt(dim),
                                                            np.float32)])
    if mask is not None:
        if val(mask).dtype == torch.bool:
            scores = b.op("Where", [b.value(mask), scores, b.const(float("-inf"), np.float32)])
        else:
            scores = b.op("Add", [scores, b.value(mask)])
    out = b.op("MatMul", [b.op("Softmax", [scores], axis=-1), vv])
    if rep > 1:
        out = b.op("Reshape", [out, b.const([bsz, heads, -1, dim], np.int64)])
    return out
