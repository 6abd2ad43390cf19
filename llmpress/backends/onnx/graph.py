"""The ONNX graph builder the translators write into.

``GraphBuilder`` holds the ONNX nodes and initializers being built, hands out fresh value names, interns scalar
and small constants, and maps every FX node to its ONNX value(s):

- a tensor -> one ONNX value name;
- a tuple/list of tensors (``split_with_sizes``, ``wq_linear``... never, but multi-output ATen ops) -> a list of names;
- a symbolic integer (``sym_size``) -> the name of an ``int64 [1]`` tensor, so shapes are assembled with one
  ``Concat`` and no ``Unsqueeze``; a static integer stays a Python ``int``.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
import torch.fx as fx
from onnx import NodeProto, TensorProto, helper, numpy_helper

from ...errors import UnsupportedOpError
from ...ir.meta import source_line, source_path

__all__ = ["GraphBuilder", "onnx_dtype", "np_dtype", "unsupported", "op_name", "val", "rank", "axis", "operand",
           "common_dtype", "weight_name", "stored_weight", "absmax_scale", "symmetric_codes", "OPSET", "MS_DOMAIN"]

OPSET = 18
MS_DOMAIN = "com.microsoft"

_TORCH_TO_ONNX = {
    torch.float32: TensorProto.FLOAT,
    torch.float16: TensorProto.FLOAT16,
    torch.bfloat16: TensorProto.BFLOAT16,
    torch.float64: TensorProto.DOUBLE,
    torch.int64: TensorProto.INT64,
    torch.int32: TensorProto.INT32,
    torch.int16: TensorProto.INT16,
    torch.int8: TensorProto.INT8,
    torch.uint8: TensorProto.UINT8,
    torch.bool: TensorProto.BOOL,
}
_TORCH_TO_NP = {
    torch.float32: np.float32, torch.float16: np.float16, torch.float64: np.float64, torch.int64: np.int64,
    torch.int32: np.int32, torch.int16: np.int16, torch.int8: np.int8, torch.uint8: np.uint8, torch.bool: np.bool_,
}


def onnx_dtype(dtype: torch.dtype, node: fx.Node | None = None) -> int:
    try:
        return _TORCH_TO_ONNX[dtype]
    except KeyError:
        raise unsupported(node, f"dtype {dtype}") from None


def np_dtype(dtype: torch.dtype, node: fx.Node | None = None) -> Any:
    try:
        return _TORCH_TO_NP[dtype]
    except KeyError:
        raise unsupported(node, f"dtype {dtype}") from None


def op_name(node: fx.Node) -> str:
    t = node.target
    if isinstance(t, torch._ops.OpOverload):
        return f"{t.namespace}.{t._opname}.{t._overloadname}"
    return getattr(t, "__name__", str(t))


def unsupported(node: fx.Node | None, what: str = "") -> UnsupportedOpError:
    """An ``UnsupportedOpError`` naming the op, the node and the model source line that produced it."""
    if node is None:
        return UnsupportedOpError(f"ONNX export: {what}", op=what)
    op = op_name(node)
    line = source_line(node)
    where = f"node {node.name}" + (f" at {line}" if line else "")
    why = f": {what}" if what else ": no ONNX translation for this op"
    return UnsupportedOpError(f"ONNX export cannot lower {op} ({where}){why}", op=op, where=where)


class GraphBuilder:
    """Collects ONNX nodes/initializers while the FX graph is walked in order."""

    def __init__(self) -> None:
        self.nodes: list[NodeProto] = []
        self.initializers: list[TensorProto] = []
        self.env: dict[fx.Node, Any] = {}
        self._names: set[str] = set()
        self._next: dict[str, int] = {}  # next suffix to try per base name (keeps fresh() O(1) amortized)
        self._consts: dict[tuple, str] = {}
        self.ms_domain_used = False
        self.current: fx.Node | None = None  # the FX node being translated (names ONNX nodes, error messages)

    # -- names ---------------------------------------------------------------------------------
    def fresh(self, hint: str) -> str:
        base = "".join(c if c.isalnum() or c in "_./:" else "_" for c in hint) or "v"
        name, i = base, self._next.get(base, 1)
        while name in self._names:
            name = f"{base}_{i}"
            i += 1
        self._next[base] = i
        self._names.add(name)
        return name

    def reserve(self, name: str) -> str:
        if name in self._names:
            raise ValueError(f"ONNX value name {name!r} used twice")
        self._names.add(name)
        return name

    # -- values --------------------------------------------------------------------------------
    def initializer(self, array: np.ndarray, hint: str) -> str:
        name = self.fresh(hint)
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def const(self, value: Any, dtype: Any) -> str:
        """An interned small constant (scalar or short list) of numpy ``dtype``."""
        arr = np.asarray(value, dtype=dtype)
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        if key not in self._consts:
            self._consts[key] = self.initializer(arr, f"const_{arr.dtype.name}")
        return self._consts[key]

    def op(self, op_type: str, inputs: Sequence[str], *, outputs: int | Sequence[str] = 1, domain: str = "",
           **attrs: Any) -> Any:
        """Append one ONNX node; returns its output name (or the list of names when ``outputs`` > 1)."""
        hint = self.current.name if self.current is not None else op_type.lower()
        # Node names follow the model's modules ("lm_head/MatMul", "model.layers.0.mlp.up_proj/MatMulNBits"), so
        # ORT tools (profiles, MatMulNBitsQuantizer's nodes_to_exclude) can name layers as users know them.
        where = source_path(self.current) if self.current is not None else ""
        if not where or where.startswith("_"):  # no module, or torch.export's placeholder for "none"
            where = hint
        if isinstance(outputs, int):
            outs = [self.fresh(f"{hint}_{op_type}" if outputs == 1 else f"{hint}_{op_type}_{i}")
                    for i in range(outputs)]
        else:
            outs = list(outputs)
        if domain == MS_DOMAIN:
            self.ms_domain_used = True
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, name=self.fresh(f"{where}/{op_type}"),
                                           domain=domain or None, **attrs))
        return outs[0] if isinstance(outputs, int) and outputs == 1 else outs

    def value(self, arg: Any) -> Any:
        """The ONNX value of an FX argument (a node -> its name(s); anything else unchanged)."""
        if isinstance(arg, fx.Node):
            if arg not in self.env:
                raise unsupported(arg, "its value was never produced (translation order)")
            v = self.env[arg]
            if hasattr(v, "materialize"):  # a weight placeholder read as a plain tensor: now it is an initializer
                v = self.env[arg] = v.materialize()
            return v
        return arg

    def int_vector(self, items: Sequence[Any]) -> str:
        """An ``int64 [n]`` tensor from a list of static ints and symbolic ints (FX nodes or ``int64[1]`` names)."""
        vals = [self.value(x) for x in items]
        if all(isinstance(v, (int, np.integer)) for v in vals):
            return self.const([int(v) for v in vals], np.int64)
        parts: list[str] = []
        run: list[int] = []
        for v in vals:
            if isinstance(v, (int, np.integer)):
                run.append(int(v))
                continue
            if run:
                parts.append(self.const(run, np.int64))
                run = []
            parts.append(v)
        if run:
            parts.append(self.const(run, np.int64))
        return parts[0] if len(parts) == 1 else self.op("Concat", parts, axis=0)

    def int_scalar(self, v: Any) -> str:
        """An ``int64`` scalar tensor from a static int or a symbolic ``int64[1]`` value."""
        v = self.value(v)
        if isinstance(v, (int, np.integer)):
            return self.const(int(v), np.int64)
        return self.op("Squeeze", [v, self.const([0], np.int64)])

    def int_1d(self, v: Any) -> str:
        """An ``int64 [1]`` tensor from a static int or a symbolic ``int64[1]`` value."""
        v = self.value(v)
        if isinstance(v, (int, np.integer)):
            return self.const([int(v)], np.int64)
        return v

    def cast(self, name: str, from_dtype: torch.dtype, to_dtype: torch.dtype) -> str:
        if from_dtype == to_dtype:
            return name
        return self.op("Cast", [name], to=onnx_dtype(to_dtype, self.current))


# -- helpers shared by the translators ---------------------------------------------------------------------------
def val(node: fx.Node) -> Any:
    return node.meta["val"]


def rank(node: fx.Node) -> int:
    return val(node).dim()


def axis(dim: int, rank: int) -> int:
    return dim + rank if dim < 0 else dim


def operand(b: GraphBuilder, arg: Any, dtype: torch.dtype) -> str:
    """An FX tensor (cast to ``dtype`` if needed) or a Python scalar (a constant of ``dtype``)."""
    if isinstance(arg, fx.Node):
        v = val(arg)
        name = b.value(arg)
        if isinstance(v, torch.Tensor):
            return b.cast(name, v.dtype, dtype)
        # a symbolic int used as a tensor operand
        return b.cast(b.int_scalar(arg), torch.int64, dtype)
    return b.const(arg, np_dtype(dtype, b.current))


def common_dtype(args: list[Any]) -> torch.dtype:
    """ATen's result type of the tensor/scalar operands of a comparison."""
    probes = []
    for a in args:
        if isinstance(a, fx.Node):
            v = val(a)
            if isinstance(v, torch.Tensor):
                probes.append(torch.empty(max(v.dim(), 1) * [1] if v.dim() else [], dtype=v.dtype))
            else:
                probes.append(1)
        else:
            probes.append(a)
    out = probes[0]
    for p in probes[1:]:
        dt = torch.result_type(out, p)
        out = torch.empty([1], dtype=dt)
    return out.dtype if isinstance(out, torch.Tensor) else torch.int64


def weight_name(ex: Any, arg: Any) -> str | None:
    return ex.module.weight_name(arg) if isinstance(arg, fx.Node) else None


def stored_weight(ex: Any, arg: Any, what: str, node: fx.Node) -> torch.Tensor | None:
    """The tensor of a weight argument of a compressed op (``None`` stays ``None``); ``UnsupportedOpError`` when the
    argument is computed in the graph (the translations convert stored weights into the ONNX op's layout)."""
    if arg is None:
        return None
    t = ex.module.weight(arg) if isinstance(arg, fx.Node) else None
    if t is None:
        raise unsupported(node, f"its {what} must be a stored weight, not a computed tensor")
    return t


# Symmetric absmax quantization with standard ops. Every llmpress reference kernel of this kind (per-token W8A8,
# per-block wq_linear activations, per-vector KV cache) computes exactly these float32 operations: one ReduceMax of
# |x|, one division by qmax, one division x / s, half-to-even rounding (ONNX Round, torch.round), a clamp; so on
# equal inputs ONNX Runtime reproduces the scales and codes bit for bit.
def absmax_scale(b: GraphBuilder, x: str, qmax: int) -> str:
    """``s = max(|x|, last axis, keepdims) / qmax``, and 1 where that is 0 (the reference kernels' guard)."""
    f32 = np.float32
    s = b.op("Div", [b.op("ReduceMax", [b.op("Abs", [x]), b.const([-1], np.int64)], keepdims=1),
                     b.const(float(qmax), f32)])
    return b.op("Where", [b.op("Greater", [s, b.const(0.0, f32)]), s, b.const(1.0, f32)])


def symmetric_codes(b: GraphBuilder, x: str, s: str, qmax: int) -> str:
    """``clamp(round(x / s), -qmax, qmax)`` as float32 integers (ONNX Round is half to even, like torch.round)."""
    f32 = np.float32
    return b.op("Clip", [b.op("Round", [b.op("Div", [x, s])]), b.const(-float(qmax), f32),
                         b.const(float(qmax), f32)])
