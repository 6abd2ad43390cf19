"""ONNX import: an ``.onnx`` graph -> an ``nn.Module`` that evaluates it with torch ops -> the IR via torch.export.

``OnnxModule`` keeps the ONNX nodes as data and runs them in order in ``forward``; each op is a small torch
function. Float initializers become parameters (named after the initializer, sanitized to an identifier) so
compression passes see them as weights; small integer initializers and ``Constant`` nodes stay Python/numpy values
("static" values), and so does everything computed only from them and from ``Shape`` (the
``Shape -> Gather -> Unsqueeze -> Concat -> Reshape`` chains exporters write). Static values hold plain ints or
torch ``SymInt``s, so a symbolic input dimension flows into ``Reshape``/``Expand``/``Range`` and the captured graph
keeps that dimension dynamic instead of baking in the example size.

Ops are checked before anything runs: every node whose op has no converter (or whose domain is not the default
one) is listed in one ``UnsupportedOpError`` naming the op type, the node name and its index.

Why not onnx2torch: it imports torchvision, and torchvision's PyPI build does not import beside this CPU build of
torch (operator registration fails), so llmpress converts the ops itself.

Semantics follow the ONNX operator specs, including opset differences: ``axes`` of Reduce*/Squeeze/Unsqueeze and
``split`` of Split are attributes before opset 13 (ReduceMean/ReduceMax: 18) and inputs after; Softmax/LogSoftmax
before opset 13 coerce the input to 2-D at ``axis``; integer ``Div`` truncates toward zero.
"""
from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from ...errors import LoadError, UnsupportedOpError

__all__ = ["OnnxModule", "import_onnx", "check_supported", "SUPPORTED_OPS"]

log = logging.getLogger(__name__)

_STATIC_MAX = 4096  # integer constants up to this many elements stay static (shapes, axes, indices)

_DTYPES = {1: torch.float32, 2: torch.uint8, 3: torch.int8, 5: torch.int16, 6: torch.int32, 7: torch.int64,
           9: torch.bool, 10: torch.float16, 11: torch.float64, 16: torch.bfloat16}
_NP_INT = {2: np.uint8, 3: np.int8, 5: np.int16, 6: np.int32, 7: np.int64, 9: np.bool_}


class _Node:
    __slots__ = ("op", "inputs", "outputs", "attrs", "name", "index")

    def __init__(self, op: str, inputs: list[str], outputs: list[str], attrs: dict, name: str, index: int):
        self.op, self.inputs, self.outputs, self.attrs, self.name, self.index = op, inputs, outputs, attrs, name, index


# -- static values (numpy arrays of ints/SymInts) and conversions -------------------------------------------------


def _static(v: Any) -> bool:
    return isinstance(v, np.ndarray)


def _np(v: Any) -> np.ndarray:
    """Numpy turns 0-d results into scalars (a SymInt, a bool): make every static value an array again."""
    if isinstance(v, np.ndarray):
        if v.dtype == object and not any(isinstance(x, (torch.SymInt, torch.SymBool)) for x in v.reshape(-1)):
            flat = v.reshape(-1)
            if all(isinstance(x, (bool, np.bool_)) for x in flat):
                return v.astype(np.bool_)
            return v.astype(np.int64) if all(isinstance(x, (int, np.integer)) for x in flat) else v
        return v
    if isinstance(v, (torch.SymInt, torch.SymBool)):
        a = np.empty((), dtype=object)
        a[()] = v
        return a
    return np.asarray(v)


def _tensor(v: Any) -> torch.Tensor:
    if isinstance(v, torch.Tensor):
        return v
    if v.dtype == object:  # holds SymInts: torch.tensor traces them as scalar_tensor + stack
        return torch.tensor(v.tolist(), dtype=torch.int64)
    return torch.from_numpy(np.array(v))  # a copy: static arrays may be read-only views of the model proto


def _ints(v: Any, what: str) -> list:
    """A shape/axes operand as a Python list of ints (or SymInts)."""
    if v is None:
        return []
    if _static(v):
        return [x if isinstance(x, torch.SymInt) else int(x) for x in np.asarray(v).reshape(-1).tolist()]
    raise UnsupportedOpError(f"{what} must be computable from constants and shapes, but depends on tensor data",
                             op=what)


def _shape_of(x: torch.Tensor) -> np.ndarray:
    dims = list(x.shape)
    if any(isinstance(d, torch.SymInt) for d in dims):
        arr = np.empty(len(dims), dtype=object)
        arr[:] = dims
        return arr
    return np.asarray(dims, dtype=np.int64)


def _axis(a: int, rank: int) -> int:
    return a + rank if a < 0 else a


def _attr_or_input(node_attrs: dict, ins: list, key: str, index: int) -> list | None:
    if key in node_attrs:
        return list(node_attrs[key])
    if len(ins) > index and ins[index] is not None:
        return _ints(ins[index], key)
    return None


# -- converters: fn(inputs, attrs, opset) -> list of outputs ------------------------------------------------------

_OPS: dict[str, Callable[[list, dict, int], list]] = {}


def _op(*names: str):
    def deco(fn):
        for n in names:
            _OPS[n] = fn
        return fn
    return deco


def _binary(torch_fn, np_fn):
    def fn(ins, a, opset):
        x, y = ins
        if _static(x) and _static(y):
            return [np_fn(x, y)]
        return [torch_fn(_tensor(x), _tensor(y))]
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


_OPS["Add"] = _binary(torch.add, lambda x, y: x + y)
_OPS["Sub"] = _binary(torch.sub, lambda x, y: x - y)
_OPS["Mul"] = _binary(torch.mul, lambda x, y: x * y)
_OPS["Div"] = _binary(_div_t, _div_np)
_OPS["Equal"] = _binary(torch.eq, lambda x, y: x == y)
_OPS["Less"] = _binary(torch.lt, lambda x, y: x < y)
_OPS["Greater"] = _binary(torch.gt, lambda x, y: x > y)
_OPS["LessOrEqual"] = _binary(torch.le, lambda x, y: x <= y)
_OPS["GreaterOrEqual"] = _binary(torch.ge, lambda x, y: x >= y)
_OPS["And"] = _binary(torch.logical_and, lambda x, y: np.logical_and(x, y))
_OPS["Or"] = _binary(torch.logical_or, lambda x, y: np.logical_or(x, y))
_OPS["Pow"] = _binary(lambda x, y: torch.pow(x, y).to(x.dtype), lambda x, y: x ** y)
_OPS["MatMul"] = lambda ins, a, o: [torch.matmul(_tensor(ins[0]), _tensor(ins[1]))]

for _name, _fn in {"Sqrt": torch.sqrt, "Reciprocal": torch.reciprocal, "Exp": torch.exp, "Log": torch.log,
                   "Tanh": torch.tanh, "Erf": torch.erf, "Relu": torch.relu, "Sigmoid": torch.sigmoid,
                   "Sin": torch.sin, "Cos": torch.cos, "Abs": torch.abs, "Not": torch.logical_not,
                   "Floor": torch.floor, "Ceil": torch.ceil}.items():
    _OPS[_name] = (lambda f: lambda ins, a, o: [f(_tensor(ins[0]))])(_fn)


@_op("Neg")
def _neg(ins, a, o):
    return [-ins[0]] if _static(ins[0]) else [torch.neg(ins[0])]


@_op("Identity", "Dropout")
def _identity(ins, a, o):
    return [ins[0]]  # Dropout at inference is the identity (its optional mask output is not supported)


@_op("Gemm")
def _gemm(ins, a, o):
    x, w = _tensor(ins[0]), _tensor(ins[1])
    c = _tensor(ins[2]) if len(ins) > 2 and ins[2] is not None else None
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
    return [F.gelu(_tensor(ins[0]), approximate=approx.decode() if isinstance(approx, bytes) else approx)]


def _softmax(fn):
    def conv(ins, a, opset):
        x = _tensor(ins[0])
        if opset >= 13:
            return [fn(x, dim=a.get("axis", -1))]
        axis = _axis(a.get("axis", 1), x.dim())  # before opset 13: flatten to 2-D at axis
        lead = 1
        for d in x.shape[:axis]:
            lead = lead * d
        flat = x.reshape(lead, -1)
        return [fn(flat, dim=-1).reshape(x.shape)]
    return conv


_OPS["Softmax"] = _softmax(torch.softmax)
_OPS["LogSoftmax"] = _softmax(torch.log_softmax)


def _reduce(kind: str, axes_input_opset: int):
    def conv(ins, a, opset):
        x = _tensor(ins[0])
        keep = bool(a.get("keepdims", 1))
        axes = list(a["axes"]) if "axes" in a else (
            _ints(ins[1], "axes") if opset >= axes_input_opset and len(ins) > 1 and ins[1] is not None else None)
        if not axes:
            if a.get("noop_with_empty_axes", 0):
                return [x]
            axes = list(range(x.dim()))
        axes = [_axis(int(d), x.dim()) for d in axes]
        if kind == "mean":
            return [x.mean(dim=axes, keepdim=keep)]
        if kind == "sum":
            return [x.sum(dim=axes, keepdim=keep)]
        return [torch.amax(x, dim=axes, keepdim=keep)]
    return conv


_OPS["ReduceMean"] = _reduce("mean", 18)
_OPS["ReduceSum"] = _reduce("sum", 13)
_OPS["ReduceMax"] = _reduce("max", 18)


@_op("Reshape")
def _reshape(ins, a, o):
    x, shape = ins[0], _ints(ins[1], "Reshape shape")
    if not a.get("allowzero", 0):
        src = x.shape
        shape = [src[i] if isinstance(s, int) and s == 0 else s for i, s in enumerate(shape)]
    if _static(x):
        return [x.reshape([int(s) for s in shape])]
    return [x.reshape(shape)]


@_op("Flatten")
def _flatten(ins, a, o):
    x = _tensor(ins[0])
    axis = _axis(a.get("axis", 1), x.dim())
    lead = 1
    for d in x.shape[:axis]:
        lead = lead * d
    return [x.reshape(lead, -1)]


@_op("Transpose")
def _transpose(ins, a, o):
    x = ins[0]
    rank = x.ndim if _static(x) else x.dim()
    perm = list(a["perm"]) if "perm" in a else list(range(rank))[::-1]
    return [np.transpose(x, perm)] if _static(x) else [x.permute(perm)]


@_op("Concat")
def _concat(ins, a, o):
    vals = [v for v in ins if v is not None]
    if all(_static(v) for v in vals):
        dt = object if any(v.dtype == object for v in vals) else None
        return [np.concatenate([v.astype(object) if dt else v for v in vals], axis=a["axis"])]
    return [torch.cat([_tensor(v) for v in vals], dim=a["axis"])]


@_op("Split")
def _split(ins, a, opset):
    x = _tensor(ins[0])
    axis = _axis(a.get("axis", 0), x.dim())
    sizes = _attr_or_input(a, ins, "split", 1)
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
        starts, ends = _ints(ins[1], "Slice starts"), _ints(ins[2], "Slice ends")
        axes = _ints(ins[3], "Slice axes") if len(ins) > 3 and ins[3] is not None else None
        steps = _ints(ins[4], "Slice steps") if len(ins) > 4 and ins[4] is not None else None
    rank = x.ndim if _static(x) else x.dim()
    axes = [_axis(int(d), rank) for d in (axes if axes is not None else range(len(starts)))]
    steps = steps or [1] * len(starts)
    index: list[Any] = [slice(None)] * rank
    big = 2 ** 62  # ONNX writes INT64_MAX/INT64_MIN for "to the end"; Python slicing clamps anything past it
    for ax, s, e, st in zip(axes, starts, ends, steps):
        if isinstance(st, int) and st < 0 and not _static(x):
            raise UnsupportedOpError("Slice with a negative step is not supported", op="Slice")
        s = max(min(s, big), -big) if isinstance(s, int) else s
        e = max(min(e, big), -big) if isinstance(e, int) else e
        index[ax] = slice(s, e, st)
    return [x[tuple(index)]]


@_op("Gather")
def _gather(ins, a, o):
    data, idx = ins
    axis = a.get("axis", 0)
    if _static(data) and _static(idx):
        return [np.take(data, idx.astype(np.int64), axis=axis)]
    data = _tensor(data)
    axis = _axis(axis, data.dim())
    if _static(idx) and idx.ndim == 0:
        return [data.select(axis, int(idx))]
    idx = _tensor(idx).to(torch.int64)
    idx = torch.where(idx < 0, idx + data.shape[axis], idx)
    out = torch.index_select(data, axis, idx.reshape(-1))
    return [out.reshape(*data.shape[:axis], *idx.shape, *data.shape[axis + 1:])]


@_op("Unsqueeze")
def _unsqueeze(ins, a, opset):
    x = ins[0]
    axes = _attr_or_input(a, ins, "axes", 1)
    rank = (x.ndim if _static(x) else x.dim()) + len(axes)
    for ax in sorted(_axis(int(d), rank) for d in axes):
        x = np.expand_dims(x, ax) if _static(x) else x.unsqueeze(ax)
    return [x]


@_op("Squeeze")
def _squeeze(ins, a, opset):
    x = ins[0]
    axes = _attr_or_input(a, ins, "axes", 1)
    rank = x.ndim if _static(x) else x.dim()
    if not axes:
        axes = [i for i, d in enumerate(x.shape) if isinstance(d, int) and d == 1]
    axes = sorted((_axis(int(d), rank) for d in axes), reverse=True)
    if _static(x):
        return [np.squeeze(x, axis=tuple(axes))]
    for ax in axes:
        x = x.squeeze(ax)
    return [x]


@_op("Shape")
def _shape(ins, a, o):
    x = ins[0]
    shape = np.asarray(x.shape, dtype=np.int64) if _static(x) else _shape_of(x)
    return [shape[a.get("start", 0):a.get("end", None)]]


@_op("ConstantOfShape")
def _constant_of_shape(ins, a, o):
    shape = _ints(ins[0], "ConstantOfShape shape")
    value = a.get("value", np.zeros(1, dtype=np.float32))
    if np.issubdtype(value.dtype, np.integer) or value.dtype == np.bool_:
        if all(isinstance(s, int) for s in shape) and int(np.prod(shape)) <= _STATIC_MAX:
            return [np.full(shape, value.reshape(-1)[0], dtype=value.dtype)]
    return [torch.full(shape, value.reshape(-1)[0].item(), dtype=_DTYPES[_np_to_onnx(value.dtype)])]


@_op("Cast")
def _cast(ins, a, o):
    to = a["to"]
    x = ins[0]
    if _static(x) and to in _NP_INT:
        return [x if x.dtype == object and to == 7 else np.asarray(x).astype(_NP_INT[to])]
    if to not in _DTYPES:
        raise UnsupportedOpError(f"Cast to ONNX data type {to} is not supported", op="Cast")
    return [_tensor(x).to(_DTYPES[to])]


@_op("Where")
def _where(ins, a, o):
    c, x, y = ins
    if all(_static(v) for v in ins):
        return [np.where(c.astype(bool), x, y)]
    return [torch.where(_tensor(c).to(torch.bool), _tensor(x), _tensor(y))]


@_op("Expand")
def _expand(ins, a, o):
    x = _tensor(ins[0])
    shape = _ints(ins[1], "Expand shape")
    # ONNX Expand broadcasts both ways: a 1 in `shape` keeps the input's size there.
    rank = max(x.dim(), len(shape))
    xs = [1] * (rank - x.dim()) + list(x.shape)
    ts = [1] * (rank - len(shape)) + shape
    out = [xd if isinstance(td, int) and td == 1 else td for xd, td in zip(xs, ts)]
    return [x.reshape(xs).expand(out)]


@_op("Range")
def _range(ins, a, o):
    if all(_static(v) and v.dtype != object for v in ins):
        return [np.arange(ins[0].item(), ins[1].item(), ins[2].item()).astype(ins[0].dtype)]
    vals = [v.item() if _static(v) else _tensor(v).item() for v in ins]
    dtype = _tensor(ins[0]).dtype if not _static(ins[0]) or ins[0].dtype != object else torch.int64
    return [torch.arange(vals[0], vals[1], vals[2], dtype=dtype)]


@_op("LayerNormalization")
def _layer_norm(ins, a, o):
    x = _tensor(ins[0])
    axis = _axis(a.get("axis", -1), x.dim())
    eps = a.get("epsilon", 1e-5)
    w = _tensor(ins[1]) if len(ins) > 1 and ins[1] is not None else None
    b = _tensor(ins[2]) if len(ins) > 2 and ins[2] is not None else None
    dims = list(range(axis, x.dim()))
    if a["_n_outputs"] == 1:
        return [F.layer_norm(x, tuple(x.shape[axis:]), w, b, eps)]
    mean = x.mean(dim=dims, keepdim=True)
    inv = torch.rsqrt((x - mean).pow(2).mean(dim=dims, keepdim=True) + eps)
    y = (x - mean) * inv
    y = y * w if w is not None else y
    y = y + b if b is not None else y
    return [y, mean, inv]


@_op("Trilu")
def _trilu(ins, a, o):
    x = _tensor(ins[0])
    k = int(_ints(ins[1], "Trilu k")[0]) if len(ins) > 1 and ins[1] is not None else 0
    return [torch.triu(x, k) if a.get("upper", 1) else torch.tril(x, k)]


@_op("ScatterElements")
def _scatter_elements(ins, a, o):
    if a.get("reduction", b"none") not in (b"none", "none"):
        raise UnsupportedOpError(f"ScatterElements with reduction={a['reduction']!r} is not supported",
                                 op="ScatterElements")
    x, idx, upd = _tensor(ins[0]), _tensor(ins[1]).to(torch.int64), _tensor(ins[2])
    axis = _axis(a.get("axis", 0), x.dim())
    idx = torch.where(idx < 0, idx + x.shape[axis], idx)
    return [torch.scatter(x, axis, idx, upd)]


@_op("GatherElements")
def _gather_elements(ins, a, o):
    x, idx = _tensor(ins[0]), _tensor(ins[1]).to(torch.int64)
    axis = _axis(a.get("axis", 0), x.dim())
    idx = torch.where(idx < 0, idx + x.shape[axis], idx)
    return [torch.gather(x, axis, idx)]


def _variadic(fn):
    def conv(ins, a, o):
        vals = [v for v in ins if v is not None]
        out = _tensor(vals[0])
        for v in vals[1:]:
            out = fn(out, _tensor(v))
        return [out]
    return conv


_OPS["Max"] = _variadic(torch.maximum)
_OPS["Min"] = _variadic(torch.minimum)
_OPS["Sum"] = _variadic(torch.add)

SUPPORTED_OPS = frozenset(_OPS) | {"Constant"}


def _np_to_onnx(dt: np.dtype) -> int:
    from onnx import helper

    return helper.np_dtype_to_tensor_dtype(np.dtype(dt))


def _unsupported_attribute(node) -> str | None:
    """Attribute values a converter does not implement, found without running anything."""
    from onnx import helper

    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if node.op_type == "ScatterElements" and attrs.get("reduction", b"none") not in (b"none", "none"):
        return f"reduction={attrs['reduction'].decode()}"
    if node.op_type == "Cast" and attrs.get("to") not in _DTYPES:
        return f"cast to ONNX data type {attrs.get('to')}"
    if node.op_type == "Dropout" and len(node.output) > 1 and node.output[1]:
        return "mask output"
    return None


def check_supported(model, source: str = "<model>") -> None:
    """Raise ``UnsupportedOpError`` listing every node llmpress cannot import (before anything runs)."""
    bad = []
    for i, n in enumerate(model.graph.node):
        where = f"node {n.name or '<unnamed>'!r}, index {i}"
        if n.domain not in ("", "ai.onnx") or n.op_type not in SUPPORTED_OPS:
            dom = f"{n.domain}::" if n.domain not in ("", "ai.onnx") else ""
            bad.append((f"{dom}{n.op_type}", where))
            continue
        why = _unsupported_attribute(n)
        if why:
            bad.append((n.op_type, f"{where}: {why}"))
    if bad:
        listing = "; ".join(f"{op} ({where})" for op, where in bad)
        raise UnsupportedOpError(f"{source}: {len(bad)} unsupported ONNX op(s): {listing}",
                                 op=", ".join(sorted({op for op, _ in bad})), where="; ".join(w for _, w in bad))


def _sanitize(name: str, taken: set[str]) -> str:
    base = re.sub(r"\W", "_", name) or "w"
    if base[0].isdigit():
        base = "w_" + base
    out, k = base, 1
    while out in taken:
        out, k = f"{base}_{k}", k + 1
    taken.add(out)
    return out


def _attrs(node) -> dict:
    from onnx import helper, numpy_helper

    out = {}
    for at in node.attribute:
        if at.type == at.TENSOR:
            out[at.name] = numpy_helper.to_array(at.t)
        elif at.type in (at.GRAPH, at.GRAPHS):
            raise UnsupportedOpError(f"{node.op_type} with a subgraph attribute is not supported", op=node.op_type)
        else:
            out[at.name] = helper.get_attribute_value(at)
    return out


class OnnxModule(nn.Module):
    """Evaluates an ONNX graph with torch ops (see the module docstring); ``forward`` takes the graph inputs in
    order and returns its output (one) or outputs (a tuple)."""

    def __init__(self, model, *, source: str = "<model>") -> None:
        super().__init__()
        from onnx import numpy_helper

        check_supported(model, source)
        self.source = source
        graph = model.graph
        self.opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 13)
        taken: set[str] = set(dir(self))  # an initializer named "half" or "forward" must not shadow nn.Module
        self._static_values: dict[str, np.ndarray] = {}
        self._weights: dict[str, str] = {}  # ONNX value name -> attribute name

        def keep(name: str, arr: np.ndarray, *, param: bool) -> None:
            if (np.issubdtype(arr.dtype, np.integer) or arr.dtype == np.bool_) and arr.size <= _STATIC_MAX:
                self._static_values[name] = arr
                return
            attr = _sanitize(name, taken)
            t = torch.from_numpy(np.array(arr))
            if param and t.dtype.is_floating_point and t.dim() >= 1:  # 0-d floats (eps, scale) are constants
                self.register_parameter(attr, nn.Parameter(t, requires_grad=False))
            else:
                self.register_buffer(attr, t)
            self._weights[name] = attr

        for init in graph.initializer:
            keep(init.name, numpy_helper.to_array(init), param=True)
        init_names = {i.name for i in graph.initializer}
        self.input_info: list[tuple[str, torch.dtype, list[int | str]]] = []
        for k, vi in enumerate(v for v in graph.input if v.name not in init_names):
            tt = vi.type.tensor_type
            if tt.elem_type not in _DTYPES:
                raise LoadError(f"{source}: input {vi.name!r} has unsupported ONNX data type {tt.elem_type}")
            dims: list[int | str] = []
            for j, d in enumerate(tt.shape.dim):
                dims.append(d.dim_value if d.HasField("dim_value") and d.dim_value > 0
                            else (d.dim_param or f"{vi.name}_dim{j}"))
            self.input_info.append((vi.name, _DTYPES[tt.elem_type], dims))
        self.output_names = [o.name for o in graph.output]
        self._nodes: list[_Node] = []
        for i, n in enumerate(graph.node):
            attrs = _attrs(n)
            if n.op_type == "Constant":
                keep(n.output[0], _constant_value(attrs, n, source), param=False)
                continue
            attrs["_n_outputs"] = len(n.output)
            self._nodes.append(_Node(n.op_type, list(n.input), list(n.output), attrs, n.name, i))
        self.info = {"opset": self.opset, "ir_version": int(model.ir_version), "producer": model.producer_name,
                     "inputs": [[n, str(dt).replace("torch.", ""), d] for n, dt, d in self.input_info],
                     "outputs": self.output_names, "nodes": len(graph.node)}

    @classmethod
    def from_file(cls, path: str | Path) -> "OnnxModule":
        import onnx

        path = Path(path)
        try:
            model = onnx.load(str(path))
        except Exception as e:  # DecodeError, missing external data...
            raise LoadError(f"{path}: not a readable ONNX model ({type(e).__name__}: {e})") from e
        return cls(model, source=str(path))

    def forward(self, *args: torch.Tensor):
        if len(args) != len(self.input_info):
            raise LoadError(f"{self.source}: expects {len(self.input_info)} inputs "
                            f"({', '.join(n for n, _, _ in self.input_info)}), got {len(args)}")
        env: dict[str, Any] = dict(self._static_values)
        env.update({name: getattr(self, attr) for name, attr in self._weights.items()})
        env.update({name: x for (name, _, _), x in zip(self.input_info, args)})
        for node in self._nodes:
            ins = [env[name] if name else None for name in node.inputs]
            try:
                outs = _OPS[node.op](ins, node.attrs, self.opset)
            except UnsupportedOpError as e:
                raise UnsupportedOpError(f"{self.source}: {node.op} (node {node.name!r}, index {node.index}): {e}",
                                         op=node.op, where=f"node {node.name!r}, index {node.index}") from e
            for name, v in zip(node.outputs, outs):
                if name:
                    env[name] = v if isinstance(v, torch.Tensor) else _np(v)
        res = tuple(_tensor(env[n]) for n in self.output_names)
        return res[0] if len(res) == 1 else res

    # -- capture helpers ------------------------------------------------------------------------------------------
    def _sizes(self) -> dict[str, int]:
        """An example size per symbolic dim: distinct values >= 2 so torch.export neither specializes them to 0/1
        nor unifies two unrelated dims."""
        sizes: dict[str, int] = {}
        for _, _, dims in self.input_info:
            for d in dims:
                if isinstance(d, str) and d not in sizes:
                    sizes[d] = 3 + 2 * len(sizes)
        return sizes

    def example_inputs(self, seed: int = 0) -> tuple[torch.Tensor, ...]:
        g = torch.Generator().manual_seed(seed)
        sizes = self._sizes()
        out = []
        for _, dt, dims in self.input_info:
            shape = [sizes[d] if isinstance(d, str) else d for d in dims]
            if dt.is_floating_point:
                out.append(torch.randn(shape, generator=g).to(dt))
            else:  # integer inputs are usually ids or indices: 0 is always in range
                out.append(torch.zeros(shape, dtype=dt))
        return tuple(out)

    def dynamic_shapes(self) -> tuple | None:
        """``torch.export`` dynamic shapes: one ``Dim`` per symbolic name, shared by every input using it."""
        names = {d: torch.export.Dim(_sanitize(d, set()), min=1) for d in self._sizes()}
        if not names:
            return None
        # forward(*args): torch.export sees one positional tuple, so the spec is nested once more.
        return (tuple({j: names[d] for j, d in enumerate(dims) if isinstance(d, str)} or None
                      for _, _, dims in self.input_info),)


def _constant_value(attrs: dict, node, source: str) -> np.ndarray:
    if "value" in attrs:
        return np.asarray(attrs["value"])
    for key, dt in (("value_float", np.float32), ("value_floats", np.float32), ("value_int", np.int64),
                    ("value_ints", np.int64)):
        if key in attrs:
            return np.asarray(attrs[key], dtype=dt)
    raise UnsupportedOpError(f"{source}: Constant node {node.name!r} with attributes {sorted(attrs)} is not supported",
                             op="Constant", where=f"node {node.name!r}")


def import_onnx(path_or_model, *, dynamic: bool = True):
    """Import an ONNX file (or ``ModelProto``) into an ``ir.Module`` (symbolic input dims stay dynamic)."""
    from ..capture import capture

    if isinstance(path_or_model, (str, Path)):
        module = OnnxModule.from_file(path_or_model)
    else:
        module = OnnxModule(path_or_model)
    ds = module.dynamic_shapes() if dynamic else None
    info = {"source": module.source, "kind": "onnx", "onnx": module.info}
    return capture(module, module.example_inputs(), dynamic=ds if ds is not None else False, info=info)
