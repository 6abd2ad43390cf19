"""Weights in the layouts the kernels read, computed once at compile time: an artifact loads with no work.

The Relax program takes its weights as function parameters. Some kernels want them in another layout: every
float linear reads ``W^T`` (the frontend transposes on each call), the quantized CPU kernels read the tiled layout
of ``kernels/qlayout.py`` (``kernels/dispatch.py`` inserts the repack calls). ``prepare`` turns those weight-only
computations into data:

1. on CPU targets, dispatch the quantized linears to their CPU kernels (which adds the repacks);
2. ``LiftTransformParams(shared_transform=True)`` moves every computation that depends on weights alone into one
   function, ``transform_params(weights) -> weights'``, and rewrites ``prefill``/``decode``/``main`` to take
   ``weights'``;
3. that function is built for *this* machine (whatever the target: a repack is a permutation of bytes, the same
   on every machine) and run once on the weights; the target library is built without it.

The artifact stores ``weights'`` (``safetensors``, by name) and the library reads them as they are. A weight that
is passed through keeps its name; a computed one is named after the first weight it reads, ``<name>@<k>``
(``model.layers.0.mlp.up_proj.qweight@0``: the tiled codes, ``@1``: the tiled scales).
"""
from __future__ import annotations

import logging
import time
from typing import Any

import torch

__all__ = ["prepare", "prepare_variant", "TRANSFORM"]

log = logging.getLogger(__name__)

TRANSFORM = "transform_params"


def prepare(prog: Any, spec: Any, *, epilogues: bool | str = False, sparse_kernels: str = "auto") -> Any:
    """``RelaxProgram`` -> ``RelaxProgram`` whose weights are in the kernels' layouts (see the module docstring);
    ``epilogues``: the CPU kernels' fused epilogues (``kernels/epilogue.py``, ``bias.py``, ``add_norm.py``): True in
    every function, ``"decode"`` in the decode function only; ``sparse_kernels``: ``"auto"`` | ``"always"`` |
    ``"never"`` (``kernels/sparse_plan.py``; the decisions are in the module attribute
    ``kernels.dispatch.SPARSE_STATS_ATTR``)."""
    from .lower import RelaxProgram

    mod = _lift(prog, spec, epilogues, sparse_kernels)
    if TRANSFORM not in [gv.name_hint for gv in mod.get_global_vars()]:
        return RelaxProgram(mod, prog.functions, prog.params, prog.num_inputs, prog.weights)
    transform = mod[TRANSFORM]
    names = _output_names(transform, prog.params)
    main = _without(mod, TRANSFORM)
    if not _computes(transform):  # a selection of the weights (all passed through): nothing to run
        return RelaxProgram(main, prog.functions, names, prog.num_inputs, {n: prog.weights[n] for n in names})
    t0 = time.perf_counter()
    outputs = _run_on_host(_only(mod, TRANSFORM), [prog.weights[n] for n in prog.params])
    log.info("weights transformed at compile time in %.1fs (%d -> %d tensors)", time.perf_counter() - t0,
             len(prog.params), len(names))
    return RelaxProgram(main, prog.functions, names, prog.num_inputs, dict(zip(names, outputs)))


def prepare_variant(prog: Any, prepared: Any, spec: Any, *, epilogues: bool | str = False,
                    sparse_kernels: str = "auto") -> Any | None:
    """The Relax module of ``prog`` for variant target ``spec``, taking ``prepared``'s transformed weights; None
    (with a warning) when this target's kernels would want other weights (the variant is then left out)."""
    mod = _lift(prog, spec, epilogues, sparse_kernels)
    names = (_output_names(mod[TRANSFORM], prog.params)
             if TRANSFORM in [gv.name_hint for gv in mod.get_global_vars()] else list(prog.params))
    main = _without(mod, TRANSFORM)
    ours = [(n, _shape(p)) for f in prepared.functions for n, p in zip(names, main[f].params[prog.num_inputs:])]
    theirs = [(n, _shape(p)) for f in prepared.functions
              for n, p in zip(prepared.params, prepared.mod[f].params[prepared.num_inputs:])]
    if names != prepared.params or ours != theirs:
        log.warning("target %s wants its weights in another layout than the base target: left out", spec.name)
        return None
    return main


def _computes(transform: Any) -> bool:
    from tvm import relax

    return any(isinstance(b.value, relax.Call) for block in transform.body.blocks for b in block.bindings)


def _shape(var: Any) -> tuple:
    return (tuple(str(d) for d in var.ty.shape.values), str(var.ty.dtype))


def _lift(prog: Any, spec: Any, epilogues: bool | str = False, sparse_kernels: str = "auto") -> Any:
    """Dispatch the quantized (and sparse) kernels (CPU targets), then lift every weight-only computation into one
    function."""
    from tvm import relax

    mod = prog.mod
    if spec.device == "cpu":
        from .isa import cpu_isa
        from .kernels.dispatch import dispatch_quant_kernels
        from .kernels.sparse_plan import SparsePlan

        isa = cpu_isa(spec.tvm)
        plan = SparsePlan(prog.weights, prog.params, sparse_kernels, isa.arch)
        functions = ("decode",) if epilogues == "decode" else None
        mod = dispatch_quant_kernels(isa, epilogues=bool(epilogues), functions=functions, sparse=plan)(mod)
        if epilogues:  # residual add + RMSNorm in one kernel (kernels/add_norm.py)
            from .kernels.add_norm import fuse_add_norm

            mod = fuse_add_norm(functions)(mod)
    return relax.transform.LiftTransformParams(shared_transform=True)(mod)


def _only(mod: Any, name: str) -> Any:
    """``mod`` reduced to function ``name`` and the PrimFuncs it calls."""
    import tvm
    from tvm import relax

    out = tvm.IRModule({gv: f for gv, f in mod.functions_items()
                        if gv.name_hint == name or not isinstance(f, relax.Function)})
    return relax.transform.DeadCodeElimination([name])(out)


def _without(mod: Any, name: str) -> Any:
    import tvm
    from tvm import relax

    out = tvm.IRModule({gv: f for gv, f in mod.functions_items() if gv.name_hint != name}, attrs=mod.attrs)
    entries = [gv.name_hint for gv, f in out.functions_items() if isinstance(f, relax.Function)]
    return relax.transform.DeadCodeElimination(entries)(out)


def _run_on_host(mod: Any, weights: list[torch.Tensor]) -> list[torch.Tensor]:
    """Build ``transform_params`` for this machine's CPU and run it (every core), returning torch tensors."""
    import tvm
    from tvm import relax
    from tvm.target.codegen import llvm_get_system_cpu

    from .build import cpu_pipeline
    from .threads import configure

    configure()  # every core, before the first parallel job sizes TVM's pool
    target = tvm.target.Target({"kind": "llvm", "mcpu": str(llvm_get_system_cpu())})
    ex = tvm.compile(mod, target, relax_pipeline=cpu_pipeline(target))
    vm = relax.VirtualMachine(ex, tvm.cpu(0))
    args = []
    for t in weights:
        t = t.detach().contiguous()
        if t.data_ptr() % 64:  # TVM needs 64-byte aligned data
            t = t.clone()
        args.append(tvm.runtime.from_dlpack(t))
    outs = vm[TRANSFORM](args)
    return [torch.from_dlpack(o) for o in outs]


def _output_names(transform: Any, names: list[str]) -> list[str]:
    """A name for every output of ``transform_params`` (see the module docstring)."""
    from tvm import relax

    (param,) = transform.params
    bindings = {}
    for block in transform.body.blocks:
        for b in block.bindings:
            bindings[b.var] = b.value
    memo: dict[Any, frozenset[int]] = {}

    def deps(e: Any) -> frozenset[int]:
        if isinstance(e, relax.TupleGetItem) and e.tuple_value.same_as(param):
            return frozenset([int(e.index)])
        if isinstance(e, relax.Var):
            if e not in memo:
                memo[e] = deps(bindings[e]) if e in bindings else frozenset()
            return memo[e]
        if isinstance(e, relax.TupleGetItem):
            return deps(e.tuple_value)
        if isinstance(e, relax.Tuple):
            return frozenset().union(*(deps(f) for f in e.fields))
        if isinstance(e, relax.Call):
            return frozenset().union(*(deps(a) for a in e.args))
        return frozenset()

    result = transform.body.body
    if result.same_as(param):  # nothing transformed: the weights as they are
        return list(names)
    fields = bindings[result].fields if isinstance(result, relax.Var) else result.fields
    out, counts = [], {}
    for f in fields:
        v = bindings.get(f, f) if isinstance(f, relax.Var) else f
        if isinstance(v, relax.TupleGetItem) and v.tuple_value.same_as(param):
            out.append(names[int(v.index)])
            continue
        d = sorted(deps(f))
        base = names[d[0]] if d else "const"
        k = counts.get(base, 0)
        counts[base] = k + 1
        out.append(f"{base}@{k}")
    if len(set(out)) != len(out):  # a weight passed through twice: keep the names unique
        seen: dict[str, int] = {}
        for i, n in enumerate(out):
            if n in seen:
                seen[n] += 1
                out[i] = f"{n}@dup{seen[n]}"
            else:
                seen[n] = 0
    return out
