"""Export an ``ir.Module`` to an ONNX model that runs in ONNX Runtime.

Why our own FX -> ONNX translator rather than ``torch.onnx.export``: the official exporter for ``torch.export``
programs (the "dynamo" exporter) needs ``onnxscript`` and ``onnx-ir``, which are not dependencies of llmpress
(checked with torch 2.13: ``torch.onnx.export(..., dynamo=True)`` fails with ``No module named 'onnxscript'``; the
legacy TorchScript exporter re-traces an ``nn.Module`` and cannot take our captured, rewritten graph), and
it would still need custom translations for every llmpress op (whose packing into ``MatMulNBits`` is the point of
this backend). The ATen subset our captured models use is small (about 30 ops, see ``aten_math.py`` and
``aten_shape.py``), every translation is a few lines over ``onnx.helper``, and owning it means an unsupported op
fails with our ``UnsupportedOpError`` naming the node and the model's source line, before anything is written.

What comes out:
- opset 18 (+ ``com.microsoft`` 1 when compressed ops are present);
- W8A8 layers in the form ``w8a8`` names (``"qdq"``, the default: QuantizeLinear/DequantizeLinear + MatMul;
  ``"integer"``: MatMulInteger; see ``llmpress_ops``), recorded in the metadata as ``llmpress.w8a8``;
- weight-only layers with int8 activations (``act_quant``) in the form ``wq_a8`` names (``"float"``, the default:
  the activation quantized and dequantized with standard ops, then a float MatMulNBits; ``"integer"``: the same,
  then MatMulNBits's int8 kernel; see ``matmul_nbits``), recorded in the metadata as ``llmpress.wq_a8``;
- weights as initializers (linear weights stored transposed, ``[in, out]``, so ``MatMul`` needs no Transpose; ORT's
  own ``MatMulNBitsQuantizer`` recognises those MatMuls); files over 1.5 GiB keep weights as external data;
- for LMs (``module.lm`` set) the calling convention of ``llmpress.ir.capture_hf`` with ONNX names:
  inputs ``input_ids [B, T]``, ``start_pos [1]``, then one ``past_<name>`` per cache tensor of
  ``lm.cache_specs()`` (``past_k_0``, ``past_v_0``, ... for a float cache ``[B, H_kv, cache_len, D]``; ``past_k_0``
  int8 codes and ``past_k_0_scale`` float32 ``[B, H_kv, cache_len, 1]`` scales, ... after
  ``kv_quant(storage="int8")``); outputs ``logits [B, T, V]`` and ``present_<name>`` likewise; ``T`` is a symbolic
  dimension, so one model serves prefill and decode; the ``LMInfo`` (with its cache specs) is stored in the
  model's metadata (``llmpress.lm``);
- for other modules the placeholder names of the graph and ``output_<i>``.

Unused nodes (``torch.export``'s shape assertions) are not translated.
"""
from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.fx as fx

from ...errors import ConfigError, UnsupportedOpError
from ...ir.module import Module
from ..base import Unsupported
from .graph import MS_DOMAIN, OPSET, GraphBuilder, onnx_dtype, op_name, unsupported

__all__ = ["export", "to_onnx", "check", "io_names", "check_w8a8_form", "check_wq_a8_form"]

log = logging.getLogger(__name__)

_EXTERNAL_DATA_BYTES = 3 << 29  # 1.5 GiB: protobuf's hard limit is 2 GiB


def _translation(node: fx.Node):
    """The translation of ``node``'s op, or a ``NotExportable`` op table entry, or None (no entry at all)."""
    from .aten_math import MATH
    from .aten_shape import SHAPE
    from .llmpress_ops import LLMPRESS_TRANSLATIONS

    return MATH.get(node.target) or SHAPE.get(node.target) or LLMPRESS_TRANSLATIONS.get(op_name(node))


def _live_nodes(module: Module) -> list[fx.Node]:
    """call_function nodes that the outputs depend on, in graph order."""
    live: set[fx.Node] = set()
    stack = [module.output_node()]
    while stack:
        n = stack.pop()
        for a in n.all_input_nodes:
            if a not in live:
                live.add(a)
                stack.append(a)
    return [n for n in module.graph.nodes if n in live and n.op == "call_function"]


def check(module: Module) -> list[Unsupported]:
    """Every live node whose op has no ONNX translation (found before any work starts)."""
    from ...ir.meta import source_line

    from .llmpress_ops import NotExportable

    out = []
    for n in _live_nodes(module):
        t = _translation(n)
        if t is None or isinstance(t, NotExportable):
            out.append(Unsupported(op=op_name(n), node=n.name, source_line=source_line(n),
                                   reason="no ONNX translation" if t is None else f"not exportable: {t.why}"))
    return out


def check_w8a8_form(w8a8: Any) -> str:
    """``w8a8`` if it names a W8A8 export form, else ``ConfigError`` listing the forms."""
    from .llmpress_ops import W8A8_FORMS

    if w8a8 not in W8A8_FORMS:
        raise ConfigError(f"ONNX export: unknown W8A8 form {w8a8!r}; choose one of "
                          + ", ".join(f"{f!r}" + (" (default)" if i == 0 else "") for i, f in enumerate(W8A8_FORMS))
                          + ": 'qdq' is QuantizeLinear/DequantizeLinear around MatMul, 'integer' is MatMulInteger")
    return w8a8


def check_wq_a8_form(wq_a8: Any) -> str:
    """``wq_a8`` if it names an export form of weight-only layers with int8 activations, else ``ConfigError``."""
    from .matmul_nbits import WQ_A8_FORMS

    if wq_a8 not in WQ_A8_FORMS:
        raise ConfigError(f"ONNX export: unknown wq_a8 form {wq_a8!r}; choose one of "
                          + ", ".join(f"{f!r}" + (" (default)" if i == 0 else "") for i, f in enumerate(WQ_A8_FORMS))
                          + ": 'float' is MatMulNBits in float32 on the quantized activations, 'integer' is "
                          "MatMulNBits's int8 kernel (accuracy_level=4)")
    return wq_a8


def io_names(module: Module) -> tuple[list[str], list[str]]:
    """ONNX input and output names for ``module``: for an LM (``module.lm`` set) ``input_ids``, ``start_pos``,
    ``past_<name>`` per cache tensor of ``lm.cache_specs()`` in call order, and ``logits``, ``present_<name>``;
    otherwise the placeholder names of the graph and ``output_<i>``."""
    users = module.user_inputs()
    outs = module.output_node().args[0]
    if module.lm is not None:
        names = [c["name"] for c in module.lm.cache_specs()]
        if len(users) == 2 + len(names) and len(outs) == 1 + len(names):
            return (["input_ids", "start_pos", *[f"past_{n}" for n in names]],
                    ["logits", *[f"present_{n}" for n in names]])
        log.warning("ONNX export: the graph has %d inputs and %d outputs, but its LM calling convention lists %d "
                    "cache tensors (%s); using the graph's own names", len(users), len(outs), len(names),
                    ", ".join(names))
    return [n.name for n in users], [f"output_{i}" for i in range(len(outs))]


class _Exporter:
    def __init__(self, module: Module, *, w8a8: str = "qdq", wq_a8: str = "float") -> None:
        self.module = module
        self.w8a8 = check_w8a8_form(w8a8)
        self.wq_a8 = check_wq_a8_form(wq_a8)
        self.b = GraphBuilder()
        self.derived: dict[Any, str] = {}  # (kind, weight name) -> initializer of a transformed weight
        self._weights = module.weights()
        self._dim_names: dict[str, str] = {}
        self.notes: Counter = Counter()  # things worth one warning per export, with how often they happened

    def weight_array(self, node: fx.Node) -> np.ndarray:
        t = self._weights[self.module.weight_name(node)]
        return t.detach().cpu().contiguous().numpy()

    # -- shapes ------------------------------------------------------------------------------------------------
    def _dim(self, d: Any) -> Any:
        if isinstance(d, int):
            return d
        key = str(d)
        if key not in self._dim_names:
            self._dim_names[key] = key if key.isidentifier() else None
        return self._dim_names[key]

    def _value_info(self, name: str, val: Any, node: fx.Node):
        from onnx import helper

        if not isinstance(val, torch.Tensor):
            raise unsupported(node, f"graph inputs/outputs must be tensors, got {type(val).__name__}")
        return helper.make_tensor_value_info(name, onnx_dtype(val.dtype, node), [self._dim(d) for d in val.shape])

    # -- the walk ----------------------------------------------------------------------------------------------
    def run(self, *, progress: bool = False):
        from onnx import helper

        problems = check(self.module)
        if problems:
            first = problems[0]
            more = f" (and {len(problems) - 1} more: {', '.join(sorted({p.op for p in problems[1:]}))})" \
                if len(problems) > 1 else ""
            raise UnsupportedOpError(f"ONNX export cannot lower {first}{more}", op=first.op,
                                     where=f"node {first.node}" + (f" at {first.source_line}"
                                                                   if first.source_line else ""))
        mod, b = self.module, self.b
        in_names, out_names = io_names(mod)
        if mod.lm is not None and in_names[0] == "input_ids":
            seq = mod.user_inputs()[0].meta["val"].shape[1]
            if not isinstance(seq, int):
                self._dim_names[str(seq)] = "T"
        graph_inputs = []
        for node, name in zip(mod.user_inputs(), in_names):
            b.reserve(name)
            b.env[node] = name
            graph_inputs.append(self._value_info(name, node.meta["val"], node))
        for node in mod.graph.nodes:
            if node.op == "placeholder" and node not in b.env and mod.weight_name(node) is not None:
                b.env[node] = _LazyWeight(self, node)
        live = _live_nodes(mod)
        it = live
        if progress:
            from tqdm import tqdm

            it = tqdm(live, desc="onnx export", unit="node", leave=False)
        for node in it:
            b.current = node
            b.env[node] = _translation(node)(self, node)
        b.current = None
        for note, count in self.notes.items():
            log.warning("ONNX export: %s (%d nodes)", note, count)
        outputs = []
        for arg, name in zip(mod.output_node().args[0], out_names):
            src = b.value(arg)
            b.reserve(name)
            b.nodes.append(helper.make_node("Identity", [src], [name], name=f"output/{name}"))
            outputs.append(self._value_info(name, arg.meta["val"], arg))
        graph = helper.make_graph(b.nodes, "llmpress", graph_inputs, outputs, initializer=b.initializers)
        opsets = [helper.make_opsetid("", OPSET)]
        if b.ms_domain_used:
            opsets.append(helper.make_opsetid(MS_DOMAIN, 1))
        model = helper.make_model(graph, opset_imports=opsets, producer_name="llmpress")
        model.ir_version = min(model.ir_version, 10)  # readable by onnxruntime releases of the last two years
        meta = {"llmpress.inputs": json.dumps(in_names), "llmpress.outputs": json.dumps(out_names),
                "llmpress.w8a8": self.w8a8, "llmpress.wq_a8": self.wq_a8}
        if mod.lm is not None:
            meta["llmpress.lm"] = json.dumps(mod.lm.to_json())
        helper.set_model_props(model, meta)
        return model


class _LazyWeight:
    """A weight placeholder turned into an initializer only when a translation reads it as a plain tensor
    (a linear's weight is read through ``transposed_weight`` instead, a packed weight through its op)."""

    def __init__(self, ex: _Exporter, node: fx.Node) -> None:
        self.ex, self.node = ex, node

    def materialize(self) -> str:
        key = ("W", self.ex.module.weight_name(self.node))
        if key not in self.ex.derived:
            self.ex.derived[key] = self.ex.b.initializer(self.ex.weight_array(self.node), key[1])
        return self.ex.derived[key]


def to_onnx(module: Module, *, w8a8: str = "qdq", wq_a8: str = "float", progress: bool = False):
    """The ``onnx.ModelProto`` of ``module`` (raises ``UnsupportedOpError`` before any work if an op has no
    translation, ``ConfigError`` for an unknown ``w8a8`` form (``"qdq"`` or ``"integer"``) or ``wq_a8`` form
    (``"float"`` or ``"integer"``))."""
    return _Exporter(module, w8a8=w8a8, wq_a8=wq_a8).run(progress=progress)


def export(module: Module, path: str | Path, *, w8a8: str = "qdq", wq_a8: str = "float", check_model: bool = True,
           progress: bool = False) -> Path:
    """Write ``module`` as an ONNX file at ``path`` (see the module docstring for what the file holds;
    ``w8a8`` picks the form of W8A8 layers: ``"qdq"`` (default) or ``"integer"``; ``wq_a8`` the form of
    weight-only layers with int8 activations: ``"float"`` (default) or ``"integer"``)."""
    import onnx

    check_w8a8_form(w8a8)
    check_wq_a8_form(wq_a8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = to_onnx(module, w8a8=w8a8, wq_a8=wq_a8, progress=progress)
    size = sum(len(t.raw_data) for t in model.graph.initializer)
    if size > _EXTERNAL_DATA_BYTES:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=path.name + ".data")
        if check_model:
            onnx.checker.check_model(str(path))
    else:
        if check_model:
            onnx.checker.check_model(model)
        onnx.save_model(model, str(path))
    log.info("wrote %s (%d nodes, %.1f MB of initializers)", path, len(model.graph.node), size / 1e6)
    return path
