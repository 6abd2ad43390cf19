"""The graph side of ONNX import: check every node up front, then ``OnnxModule`` runs the nodes in order.

``OnnxModule`` keeps the ONNX nodes as data and runs them in ``forward``, looking each op up in ``OPS`` (the
converters of ``ops_math`` and ``ops_shape``). Float initializers become parameters (named after the initializer,
sanitized to an identifier) so compression passes see them as weights; small integer initializers and ``Constant``
nodes stay static values (``values``). ``import_onnx`` captures the module into the IR with one ``torch.export``
``Dim`` per symbolic input dimension.

Ops are checked before anything runs: every node whose op has no converter (or whose domain is not the default
one), or whose attributes ask for something a converter does not implement, is listed in one
``UnsupportedOpError`` naming the op type, the node name and its index.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ....errors import LoadError, UnsupportedOpError
from . import ops_math, ops_shape
from .values import DTYPES, STATIC_MAX, Converter, as_static, as_tensor

__all__ = ["OnnxModule", "import_onnx", "open_onnx", "check_supported", "SUPPORTED_OPS", "OPS"]

# The two converter tables cover disjoint op types; "Constant" nodes are folded into static values at load time.
OPS: dict[str, Converter] = {**ops_math.CONVERTERS, **ops_shape.CONVERTERS}
SUPPORTED_OPS = frozenset(OPS) | {"Constant"}


class _Node:
    __slots__ = ("op", "inputs", "outputs", "attrs", "name", "index")

    def __init__(self, op: str, inputs: list[str], outputs: list[str], attrs: dict, name: str, index: int):
        self.op, self.inputs, self.outputs, self.attrs, self.name, self.index = op, inputs, outputs, attrs, name, index


def _unsupported_attribute(node) -> str | None:
    """Attribute values a converter does not implement, found without running anything."""
    from onnx import helper

    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if node.op_type == "ScatterElements" and attrs.get("reduction", b"none") not in (b"none", "none"):
        return f"reduction={attrs['reduction'].decode()}"
    if node.op_type == "Cast" and attrs.get("to") not in DTYPES:
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
            if (np.issubdtype(arr.dtype, np.integer) or arr.dtype == np.bool_) and arr.size <= STATIC_MAX:
                self._static_values[name] = arr
                return
            attr = _sanitize(name, taken)
            t = torch.from_numpy(np.array(arr))
            if param and t.dtype.is_floating_point and t.dim() >= 1:  # 0-d floats (eps, scale) are constants
                self.register_parameter(attr, nn.Parameter(t, requires_grad=False))
            else:
                self.register_buffer(attr, t)
            self._weights[name] = attr

        linear_w = _matmul_weights(graph)
        for init in graph.initializer:
            if init.name in linear_w:  # stored [out, in] like a torch Linear's weight; MatMul runs as F.linear
                self._weights[init.name] = attr = _sanitize(init.name, taken)
                w = np.ascontiguousarray(numpy_helper.to_array(init).T)
                self.register_parameter(attr, nn.Parameter(torch.from_numpy(w), requires_grad=False))
                continue
            if init.data_type not in DTYPES:  # uint16/32/64, float8, strings: torch cannot compute with them
                raise LoadError(f"{source}: initializer {init.name!r} has unsupported ONNX data type {init.data_type}")
            keep(init.name, numpy_helper.to_array(init), param=True)
        init_names = {i.name for i in graph.initializer}
        self.input_info: list[tuple[str, torch.dtype, list[int | str]]] = []
        for k, vi in enumerate(v for v in graph.input if v.name not in init_names):
            tt = vi.type.tensor_type
            if tt.elem_type not in DTYPES:
                raise LoadError(f"{source}: input {vi.name!r} has unsupported ONNX data type {tt.elem_type}")
            dims: list[int | str] = []
            for j, d in enumerate(tt.shape.dim):
                dims.append(d.dim_value if d.HasField("dim_value") and d.dim_value > 0
                            else (d.dim_param or f"{vi.name}_dim{j}"))
            self.input_info.append((vi.name, DTYPES[tt.elem_type], dims))
        self.output_names = [o.name for o in graph.output]
        self.output_dims: list[tuple[str, list[int | str]]] = [
            (o.name, [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else (d.dim_param or "?")
                      for d in o.type.tensor_type.shape.dim]) for o in graph.output]
        self._nodes: list[_Node] = []
        for i, n in enumerate(graph.node):
            attrs = _attrs(n)
            if n.op_type == "Constant":
                keep(n.output[0], _constant_value(attrs, n, source), param=False)
                continue
            attrs["_n_outputs"] = len(n.output)
            if n.op_type == "MatMul" and n.input[1] in linear_w:
                attrs["_weight_transposed"] = True
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
                outs = OPS[node.op](ins, node.attrs, self.opset)
            except UnsupportedOpError as e:
                raise UnsupportedOpError(f"{self.source}: {node.op} (node {node.name!r}, index {node.index}): {e}",
                                         op=node.op, where=f"node {node.name!r}, index {node.index}") from e
            for name, v in zip(node.outputs, outs):
                if name:
                    env[name] = v if isinstance(v, torch.Tensor) else as_static(v)
        res = tuple(as_tensor(env[n]) for n in self.output_names)
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


def _matmul_weights(graph) -> set[str]:
    """2-D float initializers used only as the right operand of ``MatMul`` (what dynamo exports write for a torch
    Linear: ``x @ W.T`` with ``W.T`` folded into the file). They are kept transposed, ``[out, in]``, and the
    ``MatMul`` becomes ``F.linear``, so compression passes see linear layers with stored weights."""
    from onnx import TensorProto

    floats = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE}
    cand = {i.name for i in graph.initializer if len(i.dims) == 2 and i.data_type in floats}
    cand -= {o.name for o in graph.output}
    for n in graph.node:
        for k, name in enumerate(n.input):
            if name in cand and not (n.op_type == "MatMul" and k == 1 and n.domain in ("", "ai.onnx")):
                cand.discard(name)
    return cand


def _constant_value(attrs: dict, node, source: str) -> np.ndarray:
    if "value" in attrs:
        return np.asarray(attrs["value"])
    for key, dt in (("value_float", np.float32), ("value_floats", np.float32), ("value_int", np.int64),
                    ("value_ints", np.int64)):
        if key in attrs:
            return np.asarray(attrs[key], dtype=dt)
    raise UnsupportedOpError(f"{source}: Constant node {node.name!r} with attributes {sorted(attrs)} is not supported",
                             op="Constant", where=f"node {node.name!r}")


def open_onnx(path_or_model, *, cache_len: int | None = None) -> nn.Module:
    """The module an ONNX file (or ``ModelProto``) becomes: an ``OnnxModule``, or, for a decoder exported with
    ``past_key_values`` inputs, that module behind a ``PastKVDecoder`` (llmpress's static-cache calling
    convention with a cache of ``cache_len`` positions)."""
    from .past_kv import PastKVDecoder, detect_past_kv

    module = OnnxModule.from_file(path_or_model) if isinstance(path_or_model, (str, Path)) else \
        OnnxModule(path_or_model)
    layout = detect_past_kv(module)
    if layout is None:  # no KV cache: cache_len has nothing to size
        return module
    return PastKVDecoder(module, layout, cache_len=cache_len)


def import_onnx(path_or_model, *, dynamic: bool = True, cache_len: int | None = None):
    """Import an ONNX file (or ``ModelProto``) into an ``ir.Module`` (symbolic input dims stay dynamic). A decoder
    with ``past_key_values`` inputs imports with its KV cache (``LMInfo``, ``cache_len`` positions)."""
    from ...capture import capture

    module = open_onnx(path_or_model, cache_len=cache_len)
    ds = module.dynamic_shapes() if dynamic else None
    info = {"source": module.source, "kind": "onnx", "onnx": module.info}
    return capture(module, module.example_inputs(), dynamic=ds if ds is not None else False, info=info)
