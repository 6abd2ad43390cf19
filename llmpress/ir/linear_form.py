"""The IR's one form of a weight linear: ``aten.linear(x, W, b)`` with ``W`` a stored ``[out, in]`` weight.

GPT-2-style ``Conv1D`` modules (transformers' ``pytorch_utils.Conv1D``: GPT-2, OpenAI GPT) store ``W`` as
``[in, out]`` and compute ``y = b + x @ W`` as

    x2 = view(x, [-1, in]);  y2 = addmm(b, x2, W);  y = view(y2, [*x.shape[:-1], out])

Every pass that rewrites linears (quantize, gptq, sparsify, factorize...) and every backend pattern matches
``aten.linear``, so ``addmm_to_linear`` puts those layers in linear form once, at capture, instead of teaching each
of them a second form: ``W`` is stored transposed under its own name (``Module.transpose_weight``; a lazy weight
stays lazy, read transposed) and the addmm becomes ``linear(x, W^t, b)``, which is the same function
(``x @ W + b = x @ (W^t)^t + b``, exact in float32: the same products, summed by whichever GEMM the backend picks).
Where the two views around it only flatten and restore ``x``'s leading dimensions, they are folded away too, so
the linear sees ``[B, T, in]`` as in every other model; otherwise the linear takes the 2-D ``x2``.

Left as addmm (and reported by ``passes.select`` as skipped, with this reason): an addmm with ``alpha``/``beta``,
or one whose weight is read by anything else, is tied to another name, or is not a stored 2-D weight.
"""
from __future__ import annotations

import logging

import torch
import torch.fx as fx

from .module import Module

__all__ = ["addmm_to_linear", "addmm_problem"]

log = logging.getLogger(__name__)

aten = torch.ops.aten
_ADDMM = aten.addmm.default
_VIEWS = (aten.view.default, aten.reshape.default, aten._unsafe_view.default)


def _val(a: object) -> object:
    return a.meta.get("val") if isinstance(a, fx.Node) else None


def addmm_problem(module: Module, node: fx.Node) -> str | None:
    """Why an ``aten.addmm`` node cannot be put in linear form, or None if it can."""
    if node.kwargs.get("beta", 1) != 1 or node.kwargs.get("alpha", 1) != 1:
        return "addmm with alpha/beta other than 1"
    bias, x, w = node.args[:3]
    name = module.weight_name(w) if isinstance(w, fx.Node) else None
    if name is None:
        return "its weight (the second matrix) is computed in the graph, not a stored weight"
    wv, bv, xv = _val(w), _val(bias), _val(x)
    if not all(isinstance(v, torch.Tensor) for v in (wv, bv, xv)) or wv.dim() != 2 or xv.dim() != 2:
        return "not a 2-D input times a stored 2-D weight"
    if bv.dim() != 1 or bv.shape[0] != wv.shape[1]:
        return f"its bias has shape {list(bv.shape)}, not [{wv.shape[1]}] (one per output)"
    if any(u.target is not _ADDMM or u.args[2] is not w or u.args[1] is w for u in w.users):
        return f"weight {name} is also read by other nodes"
    if sum(1 for s in module.signature.input_specs if s.target == name) > 1:
        return f"weight {name} is tied to another placeholder"
    return None


def addmm_to_linear(module: Module) -> list[str]:
    """Rewrite every addmm on a stored ``[in, out]`` weight into ``aten.linear`` (see the module docstring);
    returns the source paths of the rewritten layers (the graph is recompiled when there are any)."""
    by_weight: dict[fx.Node, list[fx.Node]] = {}
    for n in module.graph.nodes:
        if n.op == "call_function" and n.target is _ADDMM and addmm_problem(module, n) is None:
            by_weight.setdefault(n.args[2], []).append(n)
    done: list[str] = []
    for w, nodes in by_weight.items():
        module.transpose_weight(w)
        for n in nodes:
            done.append(_rewrite(module, n, w))
    if done:
        module.recompile()
        log.info("put %d Conv1D-style addmm layers in linear form (weights stored [out, in])", len(done))
    return done


def _rewrite(module: Module, node: fx.Node, w: fx.Node) -> str:
    from .meta import source_path

    bias, x2 = node.args[0], node.args[1]
    users = list(node.users)
    # fold view(x, [-1, in]) ... view(y2, [*lead, out]) when the linear of x itself has the second view's shape
    if isinstance(x2, fx.Node) and x2.target in _VIEWS and isinstance(x2.args[0], fx.Node) and len(users) == 1 \
            and users[0].target in _VIEWS and isinstance(_val(x2.args[0]), torch.Tensor):
        out_view = users[0]
        lin = module.call(aten.linear.default, (x2.args[0], w, bias), like=node)
        if [str(d) for d in _val(lin).shape] == [str(d) for d in _val(out_view).shape]:
            out_view.replace_all_uses_with(lin)
            dead = [out_view, node] + ([x2] if len(x2.users) == 1 else [])
            _erase_with_dead_inputs(module, dead)
            return source_path(lin) or lin.name
        module.erase([lin])
    lin = module.call(aten.linear.default, (x2, w, bias), like=node)
    node.replace_all_uses_with(lin)
    _erase_with_dead_inputs(module, [node])
    return source_path(lin) or lin.name


def _erase_with_dead_inputs(module: Module, nodes: list[fx.Node]) -> None:
    """Erase ``nodes`` (in order: each is unused once those before it are gone), then the shape computations
    (``sym_size``, arithmetic on sizes) that only they read."""
    gone = set(nodes)
    inputs: list[fx.Node] = []
    for n in nodes:
        inputs.extend(a for a in n.all_input_nodes if a not in gone)
        module.erase([n])
    while inputs:
        a = inputs.pop()
        if a not in gone and a.op == "call_function" and not a.users and not isinstance(_val(a), torch.Tensor):
            gone.add(a)
            inputs.extend(a.all_input_nodes)
            module.erase([a])
