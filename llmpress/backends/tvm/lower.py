"""Lowering: ``ir.Module`` -> Relax ``IRModule`` through TVM's PyTorch frontend.

Steps:

1. if the frontend cannot convert some op of the captured graph, decompose the exported program to core ATen
   (``run_decompositions`` with PyTorch's default table minus every ``llmpress`` op, so compressed ops reach their
   converters intact) and look again; graphs the frontend reads as they are skip this slow retrace;
2. turn every weight (parameters, buffers such as packed integer weights or RoPE tables, lifted constants) into a
   *parameter*, so the frontend keeps all of them as function parameters instead of baking buffers into the
   library: the artifact stores weights in safetensors and the runtime passes them in;
3. translate with ``ExportedProgramImporter`` (``keep_params_as_input=True``) plus the llmpress converters;
4. for language models (``module.lm`` set), expose functions with the calling convention
   ``(input_ids, start_pos, *caches, *weights) -> (logits, *caches)``: ``prefill`` (dynamic sequence length),
   ``decode`` (the same function with the sequence length bound to 1, so every kernel is specialised for T = 1)
   and ``prefill_last`` (``prefill`` with the LM head applied to the last position only: the logits generation
   needs, ``[B, 1, V]``); other modules get one ``main``.

``check`` finds, before any build work, every node the frontend cannot translate, with its model source line.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch.export import ExportedProgram
from torch.export.graph_signature import ExportGraphSignature, InputKind, InputSpec

from ...errors import UnsupportedOpError
from ...ir.meta import source_line
from ...ir.module import Module
from ..base import Unsupported
from .converters import ATEN_OVERRIDES, CONVERTERS, Converter, custom_convert_map, op_full_name

__all__ = ["RelaxProgram", "check", "to_relax", "decompose"]

log = logging.getLogger(__name__)

_WEIGHT_KINDS = (InputKind.PARAMETER, InputKind.BUFFER, InputKind.CONSTANT_TENSOR)


@dataclass
class RelaxProgram:
    """A Relax module ready to build, and how to call it.

    ``functions``: the VM functions (``("prefill", "decode")`` or ``("main",)``); each takes ``num_inputs`` user
    inputs followed by the weights named ``params`` (state-dict names), in that order. ``weights``: the IR's
    tensors by name; after ``params.prepare``, a ``spill.SpilledWeights`` (computed ones read from disk on access).
    """

    mod: Any  # tvm.IRModule
    functions: tuple[str, ...]
    params: list[str]
    num_inputs: int
    weights: Mapping[str, torch.Tensor]


def _decomp_table() -> dict:
    table = torch.export.default_decompositions()
    for op in list(table):
        if getattr(op, "namespace", "") == "llmpress":
            del table[op]
    return table


def decompose(ep: ExportedProgram) -> ExportedProgram:
    """Core-ATen decomposition that leaves llmpress ops alone."""
    try:
        import llmpress.ir.ops  # noqa: F401 - registers the compressed ops a graph may hold
    except ImportError:  # pragma: no cover - the ops package is part of llmpress
        pass
    return ep.run_decompositions(_decomp_table())


def _frontend_keys() -> set[str]:
    from tvm.relax.frontend.torch.exported_program_translator import ExportedProgramImporter

    return set(ExportedProgramImporter().convert_map)


def check(module: Module, *, converters: Mapping[str, Converter] | None = None) -> list[Unsupported]:
    """Every ``call_function`` node that neither TVM's frontend nor a llmpress converter translates, with its op,
    node and model source line (empty when the module lowers)."""
    return _prepare(module, dict(CONVERTERS if converters is None else converters))[1]


def _prepare(module: Module, conv: Mapping[str, Converter]) -> tuple[ExportedProgram, list[Unsupported]]:
    """The program to translate and what in it cannot be translated.

    The graph as captured is used when the frontend converts every op in it (fast, and keeps ``linear`` /
    ``softmax`` whole); otherwise it is decomposed to core ATen first (slow: a retrace) and checked again.
    """
    ep = module.exported_program  # lazy weights still in the checkpoint (those no pass rewrote) are read here
    problems = _unsupported(ep, conv)
    if problems:
        ep = decompose(ep)
        problems = _unsupported(ep, conv)
    return ep, problems


def _unsupported(ep: ExportedProgram, conv: Mapping[str, Converter]) -> list[Unsupported]:
    keys = _frontend_keys()
    out = []
    for node in ep.graph.nodes:
        if node.op != "call_function":
            continue
        full = op_full_name(node.target)
        if full in conv or full in ATEN_OVERRIDES:
            continue
        ns = getattr(node.target, "namespace", None)
        short = getattr(node.target, "__name__", str(node.target))
        if ns in (None, "aten") and short in keys:
            continue
        if ns == "llmpress":
            reason = ("no converter for this llmpress op in llmpress.backends.tvm.converters.CONVERTERS "
                      "(derived from the op table: add its entry to kernels/table.py OPS)")
        else:
            reason = "TVM's PyTorch frontend has no converter for it"
        out.append(Unsupported(op=full, node=node.name, source_line=source_line(node), reason=reason))
    return out


def _weights_as_params(ep: ExportedProgram) -> tuple[ExportedProgram, dict[str, torch.Tensor]]:
    """A shallow copy of ``ep`` whose buffers and lifted constants are parameters (same graph, same tensors)."""
    specs, state = [], {}
    all_w = dict(ep.state_dict)
    all_w.update({k: v for k, v in ep.constants.items() if isinstance(v, torch.Tensor)})
    weights: dict[str, torch.Tensor] = {}
    for s in ep.graph_signature.input_specs:
        if s.kind in _WEIGHT_KINDS:
            t = all_w[s.target].detach()
            weights[s.target] = t
            state[s.target] = torch.nn.Parameter(t, requires_grad=False)
            specs.append(InputSpec(kind=InputKind.PARAMETER, arg=s.arg, target=s.target, persistent=None))
        else:
            specs.append(s)
    sig = ExportGraphSignature(input_specs=specs, output_specs=list(ep.graph_signature.output_specs))
    new = ExportedProgram(
        root=ep.graph_module, graph=ep.graph, graph_signature=sig, state_dict=state,
        range_constraints=dict(ep.range_constraints), module_call_graph=ep.module_call_graph,
        example_inputs=ep.example_inputs, constants={}, verifiers=list(ep.verifiers),
    )
    return new, weights


def to_relax(module: Module, *, converters: Mapping[str, Converter] | None = None,
             inplace_cache: bool = False, cpu_kernels: bool = False) -> RelaxProgram:
    """Translate ``module`` to Relax (see the module docstring); raises ``UnsupportedOpError`` listing every node
    that cannot be translated, before translating anything.

    ``inplace_cache``: write KV caches in place (``kernels/cache_write.py``; CPU targets) instead of copying the
    whole cache on every call; the cache tensors a caller passes are then updated in place.
    ``cpu_kernels``: use llmpress's CPU-only kernels for ATen ops TVM lowers slowly on CPU (``kernels/softmax.py``,
    ``kernels/attention.py``)."""
    from tvm.relax.frontend.torch.exported_program_translator import ExportedProgramImporter

    conv = dict(CONVERTERS if converters is None else converters)
    ep, problems = _prepare(module, conv)
    if problems:
        raise UnsupportedOpError(
            f"the tvm backend cannot lower {len(problems)} op(s):\n  " + "\n  ".join(str(p) for p in problems),
            op=problems[0].op, where=problems[0].source_line)
    ep, weights = _weights_as_params(ep)
    importer = ExportedProgramImporter()
    overrides = dict(ATEN_OVERRIDES)
    if inplace_cache and module.lm is not None:
        from .kernels.cache_write import scatter_converter

        users = frozenset(s.arg.name for s in ep.graph_signature.input_specs if s.kind == InputKind.USER_INPUT)
        overrides["aten.scatter.src"] = scatter_converter(users)
    from .kernels.attention import sdpa_converter  # TVM's own has no grouped-query attention, no boolean mask

    overrides["aten.scaled_dot_product_attention.default"] = sdpa_converter(cpu_kernel=cpu_kernels)
    if cpu_kernels:
        from .kernels.softmax import softmax_converter

        overrides["aten.softmax.int"] = overrides["aten._softmax.default"] = softmax_converter
    custom = custom_convert_map({**overrides, **conv}, importer)
    mod = importer.from_exported_program(ep, True, False, False, custom or None)
    main = mod["main"].without_attr("params")  # the frontend copies every weight into this attribute
    params = [s.target for s in ep.graph_signature.input_specs if s.kind == InputKind.PARAMETER]
    num_inputs = int(main.attrs["num_input"])
    if len(main.params) != num_inputs + len(params):
        raise UnsupportedOpError(f"the TVM frontend produced {len(main.params)} parameters for {num_inputs} inputs "
                                 f"and {len(params)} weights")
    if module.lm is None:
        mod["main"] = main
        from .kernels import specialize_decode  # statically one-token call sites -> GEMV-scheduled kernel copies

        return RelaxProgram(specialize_decode()(mod), ("main",), params, num_inputs, weights)
    import tvm
    from tvm.relax.utils import copy_with_new_vars

    out = tvm.IRModule()
    out["prefill"] = main.with_attr("global_symbol", "prefill")
    # decode gets fresh variables: a Relax var (and symbolic var) may be defined in one function only
    decode = copy_with_new_vars(main).with_attr("global_symbol", "decode")
    seq = _seq_var(decode)
    if seq is not None:
        decode = decode.bind_symbolic_vars({seq: 1})
        for attr in ("tir_var_lower_bound", "tir_var_upper_bound"):
            if decode.attrs is not None and attr in decode.attrs:
                decode = decode.without_attr(attr)
    out["decode"] = decode
    for gv in mod.get_global_vars():  # helper functions the frontend may have added (cond branches)
        if gv.name_hint != "main":
            out[gv] = mod[gv]  # the same GlobalVar: call sites (e.g. emitted call_tir kernels) refer to it
    functions = ("prefill", "decode")
    last = _last_logits_only(copy_with_new_vars(main), mod)
    if last is not None:
        out["prefill_last"] = last.with_attr("global_symbol", "prefill_last")
        functions += ("prefill_last",)
    from .kernels import specialize_decode  # decode call sites of llmpress kernels -> their GEMV-scheduled copies

    return RelaxProgram(specialize_decode()(out), functions, params, num_inputs, weights)


def _last_logits_only(func: Any, mod: Any) -> Any:
    """``prefill`` computing the logits of the last position only (``[B, 1, V]``): what generation needs. The op
    producing the logits (the LM head: a matmul or a quantized-linear kernel, possibly followed by a bias add or a
    dtype cast) gets the last row of its input; every other output is unchanged. None when the logits are not made
    that way (the function is then not offered)."""
    import tvm
    from tvm import relax

    seq = _seq_var(func)
    body = func.body
    if seq is None or not isinstance(body, relax.SeqExpr) or len(body.blocks) != 1:
        return None
    bindings = {b.var: b for b in body.blocks[0].bindings}
    result = body.body
    tup = bindings[result].value if isinstance(result, relax.Var) and result in bindings else result
    if not isinstance(tup, relax.Tuple) or not tup.fields:
        return None
    var = tup.fields[0]
    # walk back through ops that keep the row structure and carry no shape of their own
    while var in bindings and isinstance(bindings[var].value, relax.Call) and isinstance(
            bindings[var].value.op, tvm.ir.Op) and bindings[var].value.op.name in ("relax.astype", "relax.add"):
        var = bindings[var].value.args[0]
    head = bindings.get(var)
    if head is None or not isinstance(head.value, relax.Call):
        return None
    call = head.value
    if isinstance(call.op, tvm.ir.Op) and call.op.name == "relax.matmul":
        x, pos = call.args[0], 0
    elif isinstance(call.op, tvm.ir.Op) and call.op.name == "relax.call_tir":
        x, pos = call.args[1].fields[0], None
    else:
        return None
    # a quantized LM head with act_bits=8 reads the output of its activation fake-quant kernel: slice that kernel's
    # input and quantize the last row only (the dispatch pass looks through the fake-quant to the float rows)
    fake_quant = None
    xb = bindings.get(x)
    if xb is not None and isinstance(xb.value, relax.Call) and isinstance(xb.value.op, tvm.ir.Op) \
            and xb.value.op.name == "relax.call_tir":
        callee = mod[xb.value.args[0]] if xb.value.args[0] in mod.get_global_vars() else None
        if callee is not None and (callee.attrs or {}).get("llmpress.kernel") == "act_fake_quant":
            fake_quant, x = xb.value, xb.value.args[1].fields[0]
    shape = getattr(x.ty, "shape", None)
    if shape is None or len(shape.values) != 3:
        return None

    @relax.expr_functor.mutator
    class _Slice(relax.PyExprMutator):
        def visit_var_binding_(self, binding):  # noqa: D102 - mutator protocol
            if not binding.var.same_as(head.var):
                return super().visit_var_binding_(binding)
            xs = self.builder_.emit(relax.op.strided_slice(self.visit_expr(x), axes=[1], begin=[seq - 1], end=[seq],
                                                           assume_inbound=True))
            if fake_quant is not None:
                xs = self.builder_.emit(relax.call_tir(fake_quant.args[0], [xs], xs.ty))
            if pos == 0:
                new = relax.op.matmul(xs, *[self.visit_expr(a) for a in call.args[1:]], out_dtype=call.attrs.out_dtype)
            else:
                args = [xs, *[self.visit_expr(a) for a in call.args[1].fields[1:]]]
                b, _, v = call.ty.shape.values
                new = relax.call_tir(call.args[0], args, relax.TensorType([b, 1, v], call.ty.dtype))
            self.set_var_remap(binding.var, self.builder_.emit(new, name_hint=binding.var.name))

    try:
        return _Slice().visit_expr(func)
    except Exception as e:  # noqa: BLE001 - a graph this rewrite does not understand: no prefill_last
        log.debug("no prefill_last: %s", e)
        return None


def _seq_var(func: Any):
    """The symbolic sequence length: dim 1 of the first parameter (``input_ids[B, T]``), if symbolic."""
    import tvm

    shape = func.params[0].ty.shape
    dims = list(shape.values) if hasattr(shape, "values") else list(shape)
    if len(dims) >= 2 and isinstance(dims[1], tvm.tirx.Var):
        return dims[1]
    return None
