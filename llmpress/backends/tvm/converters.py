"""Relax converters for llmpress custom ops (``torch.ops.llmpress.*``), used by the PyTorch frontend of TVM.

``CONVERTERS`` maps the full op name, ``"<namespace>.<op>.<overload>"`` (e.g. ``"llmpress.wq_linear.default"``,
the spelling of ``ir.Module.op_histogram``), to a converter::

    def convert(node: torch.fx.Node, importer) -> tvm.relax.Expr

``importer`` is TVM's ``ExportedProgramImporter`` in the middle of translating the graph:

- ``importer.env[arg_node]`` is the Relax value already computed for an input node (tensors are ``relax.Var``);
  non-node arguments (ints, floats, None) are read from ``node.args`` / ``node.kwargs`` directly;
- ``importer.block_builder.emit(expr)`` adds a binding and returns its var; a converter returns the Relax value of
  ``node`` (emitted through the block builder);
- ``tvm.relax.op`` has the building blocks (``matmul``, ``permute_dims``, ``astype``, ``right_shift``,
  ``bitwise_and``, ``reshape``, ``multiply``...), and ``importer.block_builder.call_te`` / ``emit_te`` take a TE
  compute when a fused kernel is wanted.

TVM's frontend keys its own map by ``OpOverload.__name__`` (``"wq_linear.default"``: the namespace is dropped);
``custom_convert_map`` below builds that map and dispatches on the namespace where a name collides with an ATen op,
so an llmpress op can never shadow ATen's converter of the same name.

The llmpress entries come from the op table, ``kernels/table.py`` (``OPS``: one entry per op, naming its
converter and the file holding its CPU schedules); add an op there, not here.

``ATEN_OVERRIDES`` (same signature) replaces the frontend's converter for a few ATen ops whose TVM 0.27 lowering
is broken or wasteful; each entry says why.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import torch

__all__ = ["CONVERTERS", "ATEN_OVERRIDES", "Converter", "op_full_name", "custom_convert_map"]

Converter = Callable[[Any, Any], Any]  # (torch.fx.Node, ExportedProgramImporter) -> tvm.relax.Expr

#: full op name -> converter (see the module docstring for the signature).
CONVERTERS: dict[str, Converter] = {}

from .kernels import CONVERTERS as _QUANT_KERNELS  # noqa: E402 - every op of kernels/table.py's OPS (lazy)

CONVERTERS.update(_QUANT_KERNELS)


def _masked_fill_scalar(node, importer):
    """``masked_fill(x, mask, v) = where(mask, v, x)`` with ``v`` a scalar constant.

    TVM's converter materialises ``full_like(x, v)`` whose legalization fails in 0.27 (``topi.full`` receives a
    ``PrimType`` dtype); a broadcast scalar in ``where`` is also one kernel instead of two.
    """
    from tvm import relax

    x = importer.env[node.args[0]]
    mask = importer.env[node.args[1]]
    value = node.args[2]
    dtype = str(x.ty.dtype)
    if not isinstance(value, (int, float, bool)) or not ("float" in dtype or "int" in dtype or "bool" in dtype):
        return importer._masked_fill(node)  # the frontend's general path (tensor values, other dtypes)
    return importer.block_builder.emit(relax.op.where(mask, relax.const(value, dtype), x))


def _slice_tensor(node, importer):
    """``x[:, :s]`` with a symbolic end ``s`` along a static dimension ``N``: TVM types the result ``min(s, N)``,
    which no later op unifies with ``s`` (an encoder's position-id slice, added to ``[.., s, ..]`` embeddings, leaves
    an add of unknown shape that layer norm then cannot legalize). torch.export already proved the result's extent
    (``node.meta["val"]``): where it is the plain symbol, the result is reshaped to ``s`` (a reshape, not a
    ``match_cast``: parameter lifting refuses match_cast, and a same-size reshape costs nothing)."""
    from tvm import relax, tirx

    out = importer._slice(node)
    val = node.meta.get("val")
    shape = importer.shape_of(out)
    if val is None or shape is None or len(shape) != val.dim():
        return out
    dims, changed = [], False
    for have, want in zip(shape, val.shape):
        plain_symbol = isinstance(want, torch.SymInt) and want.node.expr.is_Symbol
        if plain_symbol and isinstance(have, tirx.Min):
            pick = [e for e in (have.a, have.b) if isinstance(e, tirx.Var) and e.name == str(want.node.expr)]
            if pick:
                dims.append(pick[0])
                changed = True
                continue
        dims.append(have)
    if not changed:
        return out
    return importer.block_builder.emit(relax.op.reshape(out, relax.ShapeExpr(dims)))


def _to_device(node, importer):
    """``x.to(device, dtype)``: one program runs on one device, so only the dtype can change. TVM 0.27's frontend
    has no converter for it; transformers' rotary embeddings call it (``inv_freq.float().to(x.device)``), and
    without one the whole graph took the decomposition path (``lower._prepare``), which also breaks
    ``scaled_dot_product_attention`` into its math: no fused attention kernel, and a generic capture of
    tinystories-llama (``ir/capture_hf.py``) decoded 114 tok/s exact, 922 with it (``results/capture_paths.md``
    before and after)."""
    from tvm import relax

    x = importer.env[node.args[0]]
    dtype = node.args[2] if len(node.args) > 2 else node.kwargs.get("dtype")
    if dtype is None or str(dtype).removeprefix("torch.") == str(x.ty.dtype):
        return x
    return importer.block_builder.emit(relax.op.astype(x, str(dtype).removeprefix("torch.")))


def _new_ones(node, importer):
    """``x.new_ones(size, dtype=d)``: ones of ``dtype`` (``x``'s when not given). TVM 0.27's converter ignores the
    ``dtype`` keyword and makes ``x``'s: transformers' mask functions start from ``q_idx.new_ones((), dtype=bool)``
    (``masking_utils.and_masks``) and ``&`` the padding mask into it, so a BERT-style encoder's boolean attention mask
    arrived in the attention converter as int64 (the fused kernel takes bool only)."""
    from tvm import relax

    args = importer.retrieve_args(node)
    x = args[0]
    size = args[1] if isinstance(args[1], (list, tuple)) else args[1:]
    dtype = node.kwargs.get("dtype")
    dt = str(x.ty.dtype) if dtype is None else importer._convert_data_type(dtype, importer.env)
    return importer.block_builder.emit(relax.op.full(relax.ShapeExpr(list(size)), relax.const(1, dt), dt))


#: ATen op (full name) -> a converter that replaces the frontend's own (same signature as CONVERTERS).
ATEN_OVERRIDES: dict[str, Converter] = {
    "aten.masked_fill.Scalar": _masked_fill_scalar,
    "aten.slice.Tensor": _slice_tensor,
    "aten.to.device": _to_device,
    "aten.new_ones.default": _new_ones,
}


def op_full_name(target: Any) -> str:
    """``"aten.linear.default"`` / ``"llmpress.wq_linear.default"`` for an OpOverload; ``__name__`` otherwise."""
    if isinstance(target, torch._ops.OpOverload):
        return f"{target.namespace}.{target._opname}.{target._overloadname}"
    return getattr(target, "__name__", str(target))


def custom_convert_map(converters: Mapping[str, Converter], importer: Any) -> dict[str, Callable]:
    """The ``custom_convert_map`` for ``importer.from_exported_program``: keyed by ``OpOverload.__name__``.

    ``importer`` is the ``ExportedProgramImporter`` that will translate the graph; its own map (entries bound to it,
    taking only the node) is snapshotted here, so when an llmpress op's short name collides with a built-in one the
    installed converter hands nodes of the other namespace back to the built-in converter.
    """
    builtin = dict(importer.convert_map)
    out: dict[str, Callable] = {}
    for full, fn in converters.items():
        ns, _, short = full.partition(".")
        if short in out:
            raise ValueError(f"two custom converters share the frontend key {short!r} ({full})")
        if short in builtin:
            out[short] = _dispatch(ns, fn, builtin[short])
        else:
            out[short] = fn
    return out


def _dispatch(ns: str, fn: Converter, builtin_fn: Callable) -> Callable:
    def convert(node, importer):
        target = node.target
        if isinstance(target, torch._ops.OpOverload) and target.namespace == ns:
            return fn(node, importer)
        return builtin_fn(node)

    return convert
