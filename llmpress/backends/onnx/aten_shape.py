"""ATen -> ONNX translations (opset 18) of shape ops, data movement, tensor creation and symbolic integers.

Dimension values that are symbolic (the sequence length T) flow as ``int64[1]`` tensors (``GraphBuilder``), so
``view``/``expand``/``slice`` with a dynamic size assemble their shape operand with one ``Concat``.

Where ATen and ONNX differ:
- ``expand`` sizes of ``-1`` become ``1`` (ONNX ``Expand`` broadcasts, so 1 keeps the input dimension);
- ``index.Tensor`` with one index tensor is ``Gather`` on that axis; several index tensors are not supported;
- ``scatter.src`` is ``ScatterElements`` (index and src must have the same shape, as in our Llama's cache writes);
- ``arange`` with static bounds is a constant; ``squeeze`` of a dimension that is not 1 is a no-op, as in ATen;
- ``contiguous`` is an ``Identity`` (ONNX values have no strides), and so is ``dropout`` in inference
  (``train=False`` or ``p=0``: what ``torch.export`` records from a model in ``eval()``); a training dropout is
  refused (it is random);
- ``split``, ``split_with_sizes`` and ``chunk`` are ``Split`` with the sizes ATen computed (``chunk``:
  ``ceil(n / chunks)`` each, the last one shorter, and fewer than ``chunks`` outputs where ``n`` runs out), read
  from the node's recorded outputs.
"""
from __future__ import annotations

import operator
from typing import Any, Callable

import numpy as np
import torch
import torch.fx as fx

from .graph import axis, np_dtype, onnx_dtype, operand, rank, unsupported, val

__all__ = ["SHAPE"]

aten = torch.ops.aten
SHAPE: dict[Any, Callable] = {}


def _register(*targets: Any) -> Callable:
    def deco(fn: Callable) -> Callable:
        for t in targets:
            SHAPE[t] = fn
        return fn

    return deco


# -- shapes and data movement ------------------------------------------------------------------------------------
@_register(aten.view.default, aten.reshape.default, aten._unsafe_view.default)
def _reshape(ex: Any, node: fx.Node) -> str:
    return ex.b.op("Reshape", [ex.b.value(node.args[0]), ex.b.int_vector(node.args[1])])


@_register(aten.contiguous.default)
def _contiguous(ex: Any, node: fx.Node) -> str:
    return ex.b.op("Identity", [ex.b.value(node.args[0])])


@_register(aten.dropout.default)
def _dropout(ex: Any, node: fx.Node) -> str:
    x, p, train = node.args[0], node.args[1], node.args[2]
    if train and p:
        raise unsupported(node, f"dropout in training mode (p={p}): export the model in eval()")
    return ex.b.op("Identity", [ex.b.value(x)])


@_register(aten.transpose.int)
def _transpose(ex: Any, node: fx.Node) -> str:
    x, d0, d1 = node.args
    r = rank(x)
    perm = list(range(r))
    a, c = axis(d0, r), axis(d1, r)
    perm[a], perm[c] = perm[c], perm[a]
    return ex.b.op("Transpose", [ex.b.value(x)], perm=perm)


@_register(aten.permute.default)
def _permute(ex: Any, node: fx.Node) -> str:
    x, dims = node.args
    return ex.b.op("Transpose", [ex.b.value(x)], perm=[axis(d, rank(x)) for d in dims])


@_register(aten.t.default)
def _t(ex: Any, node: fx.Node) -> str:
    return ex.b.op("Transpose", [ex.b.value(node.args[0])], perm=[1, 0])


@_register(aten.unsqueeze.default)
def _unsqueeze(ex: Any, node: fx.Node) -> str:
    x, d = node.args
    return ex.b.op("Unsqueeze", [ex.b.value(x), ex.b.const([axis(d, rank(x) + 1)], np.int64)])


@_register(aten.squeeze.dim, aten.squeeze.dims)
def _squeeze(ex: Any, node: fx.Node) -> str:
    x, d = node.args
    dims = [d] if isinstance(d, int) else list(d)
    shape = val(x).shape
    # ATen ignores a squeeze of a dimension that is not 1; ONNX rejects it, so keep only the real ones.
    axes = [axis(a, rank(x)) for a in dims]
    axes = [a for a in axes if isinstance(shape[a], int) and shape[a] == 1]
    if not axes:
        return ex.b.op("Identity", [ex.b.value(x)])
    return ex.b.op("Squeeze", [ex.b.value(x), ex.b.const(axes, np.int64)])


@_register(aten.expand.default)
def _expand(ex: Any, node: fx.Node) -> str:
    x, sizes = node.args[0], node.args[1]
    sizes = [1 if (isinstance(s, int) and s == -1) else s for s in sizes]
    return ex.b.op("Expand", [ex.b.value(x), ex.b.int_vector(sizes)])


@_register(aten.slice.Tensor)
def _slice(ex: Any, node: fx.Node) -> str:
    b = ex.b
    args = list(node.args) + [None] * (5 - len(node.args))
    x, dim, start, end, step = args[:5]
    dim = node.kwargs.get("dim", dim if dim is not None else 0)
    start = node.kwargs.get("start", start)
    end = node.kwargs.get("end", end)
    step = node.kwargs.get("step", step if step is not None else 1)
    start = 0 if start is None else start
    end = 2**63 - 1 if end is None else end
    ax = axis(dim, rank(x))
    return b.op("Slice", [b.value(x), b.int_1d(start), b.int_1d(end), b.const([ax], np.int64),
                          b.int_1d(step)])


@_register(aten.select.int)
def _select(ex: Any, node: fx.Node) -> str:
    x, dim, index = node.args
    return ex.b.op("Gather", [ex.b.value(x), ex.b.int_scalar(index)], axis=axis(dim, rank(x)))


@_register(aten.cat.default)
def _cat(ex: Any, node: fx.Node) -> str:
    tensors = node.args[0]
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    dt = val(node).dtype
    return ex.b.op("Concat", [operand(ex.b, t, dt) for t in tensors], axis=axis(dim, rank(node)))


@_register(aten.stack.default)
def _stack(ex: Any, node: fx.Node) -> str:
    b = ex.b
    tensors = node.args[0]
    dim = axis(node.args[1] if len(node.args) > 1 else 0, rank(node))
    parts = [b.op("Unsqueeze", [b.value(t), b.const([dim], np.int64)]) for t in tensors]
    return b.op("Concat", parts, axis=dim)


@_register(aten.split_with_sizes.default, aten.split.Tensor, aten.chunk.default)
def _split(ex: Any, node: fx.Node) -> list[str]:
    """``Split`` with the sizes ATen computed, read from the node's recorded outputs: ``split_with_sizes`` as given,
    ``split`` in pieces of ``size`` and ``chunk`` in ``ceil(n / chunks)`` (the last piece shorter in both, and
    ``chunk`` gives fewer than ``chunks`` where ``n`` runs out)."""
    x = node.args[0]
    dim = axis(node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0), rank(x))
    sizes = [v.shape[dim] for v in val(node)]
    if not all(isinstance(s, int) for s in sizes):
        raise unsupported(node, f"{node.target.__name__} of a dynamic dimension (sizes must be static)")
    return ex.b.op("Split", [ex.b.value(x), ex.b.const(sizes, np.int64)], outputs=len(sizes), axis=dim)


@_register(aten.index.Tensor)
def _index(ex: Any, node: fx.Node) -> str:
    x, indices = node.args
    real = [(i, t) for i, t in enumerate(indices) if t is not None]
    if len(real) != 1:
        raise unsupported(node, "advanced indexing with more than one index tensor")
    ax, idx = real[0]
    if val(idx).dtype == torch.bool:
        raise unsupported(node, "boolean-mask indexing (data-dependent shape)")
    return ex.b.op("Gather", [ex.b.value(x), ex.b.value(idx)], axis=ax)


@_register(aten.scatter.src)
def _scatter(ex: Any, node: fx.Node) -> str:
    x, dim, index, src = node.args
    if tuple(val(index).shape) != tuple(val(src).shape):
        raise unsupported(node, "scatter whose src and index shapes differ")
    return ex.b.op("ScatterElements", [ex.b.value(x), ex.b.value(index), ex.b.value(src)],
                   axis=axis(dim, rank(x)))


@_register(aten.index_put.default)
def _index_put(ex: Any, node: fx.Node) -> str:
    x, indices, values = node.args[:3]
    accumulate = node.args[3] if len(node.args) > 3 else node.kwargs.get("accumulate", False)
    real = [(i, t) for i, t in enumerate(indices) if t is not None]
    if accumulate or len(real) != 1 or real[0][0] != 0 or val(real[0][1]).dim() != 1:
        raise unsupported(node, "index_put beyond x[idx] = v with one 1-D index on dim 0")
    b = ex.b
    idx = b.op("Unsqueeze", [b.value(real[0][1]), b.const([1], np.int64)])
    vals = b.op("Expand", [b.value(values), b.op("Shape", [b.op("Gather", [b.value(x), b.value(real[0][1])],
                                                                 axis=0)])])
    return b.op("ScatterND", [b.value(x), idx, vals])


# -- creation ----------------------------------------------------------------------------------------------------
@_register(aten.arange.default, aten.arange.start, aten.arange.start_step)
def _arange(ex: Any, node: fx.Node) -> str:
    b = ex.b
    args = list(node.args)
    if node.target == aten.arange.default:
        start, end, step = 0, args[0], 1
    elif node.target == aten.arange.start:
        start, end, step = args[0], args[1], 1
    else:
        start, end, step = args[0], args[1], args[2]
    dt = val(node).dtype
    vals = [b.value(v) for v in (start, end, step)]
    if all(isinstance(v, (int, float)) for v in vals):
        return b.const(np.arange(*vals).astype(np_dtype(dt, node)), np_dtype(dt, node))
    if any(isinstance(v, float) for v in vals):
        raise unsupported(node, "arange with float bounds and a dynamic length")
    r = b.op("Range", [b.int_scalar(start), b.int_scalar(end), b.int_scalar(step)])
    return b.cast(r, torch.int64, dt)


@_register(aten.full.default)
def _full(ex: Any, node: fx.Node) -> str:
    return _filled(ex, node, node.args[0], node.args[1])


def _filled(ex: Any, node: fx.Node, size: Any, fill: Any) -> str:
    b = ex.b
    dt = val(node).dtype
    if all(isinstance(b.value(s), int) for s in size):
        return b.const(np.full([int(s) for s in size], fill, dtype=np_dtype(dt, node)), np_dtype(dt, node))
    from onnx import helper

    value = helper.make_tensor("v", onnx_dtype(dt, node), [1], [fill])
    return b.op("ConstantOfShape", [b.int_vector(size)], value=value)


@_register(aten.zeros.default, aten.ones.default)
def _zeros_ones(ex: Any, node: fx.Node) -> str:
    return _filled(ex, node, node.args[0], 0 if node.target == aten.zeros.default else 1)


@_register(aten.new_zeros.default, aten.new_ones.default, aten.new_full.default)
def _new_filled(ex: Any, node: fx.Node) -> str:
    """``x.new_ones(size)`` and kin: a tensor of ``size`` in the node's dtype (``x`` only lends its dtype and device,
    which the recorded output already carries)."""
    fill = {aten.new_zeros.default: 0, aten.new_ones.default: 1}.get(node.target)
    return _filled(ex, node, node.args[1], node.args[2] if fill is None else fill)


# -- symbolic integers -------------------------------------------------------------------------------------------
@_register(aten.sym_size.int)
def _sym_size(ex: Any, node: fx.Node) -> Any:
    x, dim = node.args
    v = val(node)
    if isinstance(v, int):
        return v
    d = axis(dim, rank(x))
    return ex.b.op("Shape", [ex.b.value(x)], start=d, end=d + 1)


def _sym_binary(onnx_op: str, py: Callable) -> Callable:
    def fn(ex: Any, node: fx.Node) -> Any:
        a, c = (ex.b.value(x) for x in node.args)
        if isinstance(a, int) and isinstance(c, int):
            return py(a, c)
        return ex.b.op(onnx_op, [ex.b.int_1d(a), ex.b.int_1d(c)])

    return fn


_register(operator.add)(_sym_binary("Add", operator.add))
_register(operator.sub)(_sym_binary("Sub", operator.sub))
_register(operator.mul)(_sym_binary("Mul", operator.mul))
# Sequence lengths are non-negative, where ONNX's truncating Div equals Python's floor division.
_register(operator.floordiv)(_sym_binary("Div", operator.floordiv))


@_register(operator.getitem)
def _getitem(ex: Any, node: fx.Node) -> Any:
    seq, i = node.args
    v = ex.b.value(seq)
    if not isinstance(v, (list, tuple)):
        raise unsupported(node, "getitem on a value that is not a tuple of tensors")
    return v[i]
