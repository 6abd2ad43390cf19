"""ONNX converters that move data rather than compute it: shape, layout, indexing, casts and masks.

These carry the ``Shape -> Gather -> Unsqueeze -> Concat -> Reshape`` chains exporters write, so most of them
work on static values (numpy) as well as on tensors: a chain computed only from constants and ``Shape`` stays
static and keeps symbolic sizes as ``SymInt``s. Opset differences follow the ONNX specs: ``axes`` of
Squeeze/Unsqueeze and ``split`` of Split are attributes before opset 13 and inputs after; Slice takes
``starts``/``ends``/``axes`` as attributes before opset 10.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ....errors import UnsupportedOpError
from .values import (
    DTYPES,
    NP_INT,
    STATIC_MAX,
    Converter,
    as_tensor,
    attr_or_input,
    is_static,
    norm_axis,
    np_to_onnx,
    registrar,
    shape_of,
    static_ints,
)

__all__ = ["CONVERTERS"]

CONVERTERS: dict[str, Converter] = {}
_op = registrar(CONVERTERS)


@_op("Identity")
def _identity(ins, a, o):
    return [ins[0]]


@_op("Dropout")
def _dropout(ins, a, o):
    """Dropout at inference is the identity (its optional mask output is refused up front). ``training_mode``
    (input 2, opset 12+) must be a constant false: training-mode dropout is random, and one read from tensor data
    cannot be known when the graph is captured."""
    mode = ins[2] if len(ins) > 2 else None
    if mode is not None and (not is_static(mode) or bool(np.asarray(mode).reshape(-1)[0])):
        raise UnsupportedOpError("Dropout with training_mode true (or computed from tensor data) is not supported: "
                                 "only inference (identity) dropout imports", op="Dropout")
    return [ins[0]]


@_op("Reshape")
def _reshape(ins, a, o):
    x, shape = ins[0], static_ints(ins[1], "Reshape shape")
    if not a.get("allowzero", 0):
        src = x.shape
        shape = [src[i] if isinstance(s, int) and s == 0 else s for i, s in enumerate(shape)]
    if is_static(x):
        return [x.reshape([int(s) for s in shape])]
    if any(isinstance(st, int) and st == 0 for st in x.stride()):
        # An Expand output (the GQA head repeat): reshape copies it anyway. Going through 1-D spares torch.export
        # a stride computation it cannot decide when a dim is ``past + seq`` (a Min(...) guard on seq).
        x = x.reshape(-1)
    return [x.reshape(shape)]


@_op("Flatten")
def _flatten(ins, a, o):
    x = as_tensor(ins[0])
    axis = norm_axis(a.get("axis", 1), x.dim())
    lead = 1
    for d in x.shape[:axis]:
        lead = lead * d
    return [x.reshape(lead, -1)]


@_op("Transpose")
def _transpose(ins, a, o):
    x = ins[0]
    rank = x.ndim if is_static(x) else x.dim()
    perm = list(a["perm"]) if "perm" in a else list(range(rank))[::-1]
    return [np.transpose(x, perm)] if is_static(x) else [x.permute(perm)]


@_op("Concat")
def _concat(ins, a, o):
    vals = [v for v in ins if v is not None]
    if all(is_static(v) for v in vals):
        dt = object if any(v.dtype == object for v in vals) else None
        return [np.concatenate([v.astype(object) if dt else v for v in vals], axis=a["axis"])]
    return [torch.cat([as_tensor(v) for v in vals], dim=a["axis"])]


@_op("Split")
def _split(ins, a, opset):
    x = as_tensor(ins[0])
    axis = norm_axis(a.get("axis", 0), x.dim())
    sizes = attr_or_input(a, ins, "split", 1)
    n_out = a["_n_outputs"]
    if sizes is None:
        n = a.get("num_outputs", n_out)
        total = x.shape[axis]
        chunk = -(-total // n)  # ceil: the last chunk is smaller (opset 18 num_outputs rule)
        return list(torch.split(x, chunk, dim=axis))
    return list(torch.split(x, sizes, dim=axis))


@_op("Slice")
def _slice(ins, a, opset):
    x = ins[0]
    if opset < 10:
        starts, ends, axes, steps = list(a["starts"]), list(a["ends"]), a.get("axes"), None
    else:
        starts, ends = static_ints(ins[1], "Slice starts"), static_ints(ins[2], "Slice ends")
        axes = static_ints(ins[3], "Slice axes") if len(ins) > 3 and ins[3] is not None else None
        steps = static_ints(ins[4], "Slice steps") if len(ins) > 4 and ins[4] is not None else None
    rank = x.ndim if is_static(x) else x.dim()
    axes = [norm_axis(int(d), rank) for d in (axes if axes is not None else range(len(starts)))]
    steps = steps or [1] * len(starts)
    index: list[Any] = [slice(None)] * rank
    big = 2 ** 62  # ONNX writes INT64_MAX/INT64_MIN for "to the end"; Python slicing clamps anything past it
    flips = []
    for ax, s, e, st in zip(axes, starts, ends, steps):
        s = max(min(s, big), -big) if isinstance(s, int) else s
        e = max(min(e, big), -big) if isinstance(e, int) else e
        if isinstance(st, int) and st < 0 and not is_static(x):
            # torch slices only forward: take the positions Python's (= ONNX's) backward slice picks, in order.
            n = x.shape[ax]
            if not isinstance(n, int) or not all(isinstance(v, int) for v in (s, e)):
                raise UnsupportedOpError("Slice with a negative step over a symbolic size is not supported",
                                         op="Slice")
            flips.append((ax, torch.tensor(list(range(n))[s:e:st], dtype=torch.int64)))
            continue
        index[ax] = slice(s, e, st)
    out = x[tuple(index)]
    for ax, pick in flips:
        out = out.index_select(ax, pick)
    return [out]


@_op("Gather")
def _gather(ins, a, o):
    data, idx = ins
    axis = a.get("axis", 0)
    if is_static(data) and is_static(idx):
        return [np.take(data, idx.astype(np.int64), axis=axis)]
    data = as_tensor(data)
    axis = norm_axis(axis, data.dim())
    if is_static(idx) and idx.ndim == 0:
        return [data.select(axis, int(idx))]
    idx = as_tensor(idx).to(torch.int64)
    idx = torch.where(idx < 0, idx + data.shape[axis], idx)
    out = torch.index_select(data, axis, idx.reshape(-1))
    return [out.reshape(*data.shape[:axis], *idx.shape, *data.shape[axis + 1:])]


@_op("GatherND")
def _gather_nd(ins, a, o):
    """GatherND: with ``b = batch_dims`` and ``k = indices.shape[-1]``,
    ``out[i_1..i_b, j..] = data[i_1..i_b, *indices[i_1..i_b, j.., :]]``, shape ``indices.shape[:-1] +
    data.shape[b + k:]``; negative indices count from the end. One advanced-indexing ``aten.index``: the batch
    dims are indexed by ``arange``s that broadcast against the index columns."""
    data, idx = ins
    static = is_static(data) and is_static(idx) and data.dtype != object and idx.dtype != object
    lib = np if static else torch  # static data stays numpy: torch.export must not see it as a tensor
    x = data if static else as_tensor(data)
    ind = idx.astype(np.int64) if static else as_tensor(idx).to(torch.int64)
    b, k = a.get("batch_dims", 0), ind.shape[-1]
    if not isinstance(k, int):
        raise UnsupportedOpError("GatherND with a symbolic index depth (indices.shape[-1]) is not supported",
                                 op="GatherND")
    rest = ind.ndim - 1 - b  # index dims after the batch dims, before the last (depth) dim
    key = [lib.arange(x.shape[j]).reshape([1] * j + [-1] + [1] * (b - 1 - j + rest)) for j in range(b)]
    key += [ind[..., i] for i in range(k)]
    if not key:  # k = 0 and no batch dims: every index row selects the whole of data
        return [lib.broadcast_to(x, (*ind.shape[:-1], *x.shape)) if static else x.expand(*ind.shape[:-1], *x.shape)]
    return [x[tuple(key)]]


@_op("Unsqueeze")
def _unsqueeze(ins, a, opset):
    x = ins[0]
    axes = attr_or_input(a, ins, "axes", 1)
    rank = (x.ndim if is_static(x) else x.dim()) + len(axes)
    for ax in sorted(norm_axis(int(d), rank) for d in axes):
        x = np.expand_dims(x, ax) if is_static(x) else x.unsqueeze(ax)
    return [x]


@_op("Squeeze")
def _squeeze(ins, a, opset):
    x = ins[0]
    axes = attr_or_input(a, ins, "axes", 1)
    rank = x.ndim if is_static(x) else x.dim()
    if not axes:
        axes = [i for i, d in enumerate(x.shape) if isinstance(d, int) and d == 1]
    axes = sorted((norm_axis(int(d), rank) for d in axes), reverse=True)
    if is_static(x):
        return [np.squeeze(x, axis=tuple(axes))]
    for ax in axes:
        x = x.squeeze(ax)
    return [x]


@_op("Shape")
def _shape(ins, a, o):
    x = ins[0]
    shape = np.asarray(x.shape, dtype=np.int64) if is_static(x) else shape_of(x)
    return [shape[a.get("start", 0):a.get("end", None)]]


@_op("ConstantOfShape")
def _constant_of_shape(ins, a, o):
    shape = static_ints(ins[0], "ConstantOfShape shape")
    value = a.get("value", np.zeros(1, dtype=np.float32))
    if np.issubdtype(value.dtype, np.integer) or value.dtype == np.bool_:
        if all(isinstance(s, int) for s in shape) and int(np.prod(shape)) <= STATIC_MAX:
            return [np.full(shape, value.reshape(-1)[0], dtype=value.dtype)]
    return [torch.full(shape, value.reshape(-1)[0].item(), dtype=DTYPES[np_to_onnx(value.dtype)])]


@_op("Cast")
def _cast(ins, a, o):
    to = a["to"]
    x = ins[0]
    if is_static(x) and to in NP_INT:
        return [x if x.dtype == object and to == 7 else np.asarray(x).astype(NP_INT[to])]
    if to not in DTYPES:
        raise UnsupportedOpError(f"Cast to ONNX data type {to} is not supported", op="Cast")
    return [as_tensor(x).to(DTYPES[to])]


@_op("CastLike")
def _cast_like(ins, a, o):
    """Cast ``x`` to the dtype of ``target`` (what unoptimized dynamo exports write instead of Cast)."""
    x, target = ins[0], ins[1]
    if is_static(x) and is_static(target) and target.dtype != object:
        return [x if x.dtype == object and target.dtype == np.int64 else np.asarray(x).astype(target.dtype)]
    return [as_tensor(x).to(as_tensor(target).dtype)]


@_op("Where")
def _where(ins, a, o):
    c, x, y = ins
    if all(is_static(v) for v in ins):
        return [np.where(c.astype(bool), x, y)]
    return [torch.where(as_tensor(c).to(torch.bool), as_tensor(x), as_tensor(y))]


@_op("Expand")
def _expand(ins, a, o):
    x = as_tensor(ins[0])
    shape = static_ints(ins[1], "Expand shape")
    # ONNX Expand broadcasts both ways: a 1 in `shape` keeps the input's size there.
    rank = max(x.dim(), len(shape))
    xs = [1] * (rank - x.dim()) + list(x.shape)
    ts = [1] * (rank - len(shape)) + shape
    out = [xd if isinstance(td, int) and td == 1 else td for xd, td in zip(xs, ts)]
    return [x.reshape(xs).expand(out)]


@_op("Range")
def _range(ins, a, o):
    if all(is_static(v) and v.dtype != object for v in ins):
        return [np.arange(ins[0].item(), ins[1].item(), ins[2].item()).astype(ins[0].dtype)]
    vals = [v.item() if is_static(v) else as_tensor(v).item() for v in ins]
    dtype = as_tensor(ins[0]).dtype if not is_static(ins[0]) or ins[0].dtype != object else torch.int64
    return [torch.arange(vals[0], vals[1], vals[2], dtype=dtype)]


@_op("Trilu")
def _trilu(ins, a, o):
    x = as_tensor(ins[0])
    k = int(static_ints(ins[1], "Trilu k")[0]) if len(ins) > 1 and ins[1] is not None else 0
    return [torch.triu(x, k) if a.get("upper", 1) else torch.tril(x, k)]


@_op("ScatterElements")
def _scatter_elements(ins, a, o):
    if a.get("reduction", b"none") not in (b"none", "none"):
        raise UnsupportedOpError(f"ScatterElements with reduction={a['reduction']!r} is not supported",
                                 op="ScatterElements")
    x, idx, upd = as_tensor(ins[0]), as_tensor(ins[1]).to(torch.int64), as_tensor(ins[2])
    axis = norm_axis(a.get("axis", 0), x.dim())
    idx = torch.where(idx < 0, idx + x.shape[axis], idx)
    return [torch.scatter(x, axis, idx, upd)]


@_op("GatherElements")
def _gather_elements(ins, a, o):
    x, idx = as_tensor(ins[0]), as_tensor(ins[1]).to(torch.int64)
    axis = norm_axis(a.get("axis", 0), x.dim())
    idx = torch.where(idx < 0, idx + x.shape[axis], idx)
    return [torch.gather(x, axis, idx)]
