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

Step 3 streams: ``transform_params`` is split into functions that each compute a group of about ``CHUNK_BYTES``
of outputs (``_chunked``: the same bindings, fewer outputs, dead code removed), built together and called one after
another; each group is written to a temporary file as it comes out (``spill.SpilledWeights``) and dropped, and a
weight passed through unchanged stays the IR's tensor. Peak memory is the IR's weights + one group, where computing
every output at once held a second copy of the compressed model.

The artifact stores ``weights'`` (``safetensors``, by name) and the library reads them as they are. A weight that
is passed through keeps its name; a computed one is named after the first weight it reads, ``<name>@<k>``
(``model.layers.0.mlp.up_proj.qweight@0``: the tiled codes, ``@1``: the tiled scales).
"""
from __future__ import annotations

import logging
import time
from typing import Any

import torch

__all__ = ["prepare", "prepare_variant", "TRANSFORM", "CHUNK_BYTES"]

log = logging.getLogger(__name__)

TRANSFORM = "transform_params"
#: Bytes of transformed weights one call of a ``transform_params`` chunk computes (at least one output per call).
CHUNK_BYTES = 128 * 2 ** 20


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
    weights = _run_on_host(_only(mod, TRANSFORM), [prog.weights[n] for n in prog.params], names)
    log.info("weights transformed at compile time in %.1fs (%d -> %d tensors)", time.perf_counter() - t0,
             len(prog.params), len(names))
    return RelaxProgram(main, prog.functions, names, prog.num_inputs, weights)


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


def _run_on_host(mod: Any, weights: list[torch.Tensor], names: list[str], *,
                 chunk_bytes: int | None = None) -> Any:
    """Build ``transform_params`` for this machine's CPU, split into chunks of about ``chunk_bytes`` of outputs
    (default ``CHUNK_BYTES``), and run it chunk by chunk (every core), writing each output to a
    ``spill.SpilledWeights`` as it comes out; outputs passed through unchanged are kept as the input tensors."""
    import tvm
    from tvm import relax
    from tvm.target.codegen import llvm_get_system_cpu

    from .build import cpu_pipeline
    from .spill import SpilledWeights
    from .threads import configure

    transform = mod[TRANSFORM]
    fields = _result_fields(transform)
    out = SpilledWeights(names)
    computed = []
    for i, src in enumerate(_passed_through(transform, fields)):
        if src is None:
            computed.append(i)
        else:
            out.keep(names[i], weights[src])
    chunks = _chunks(computed, [_nbytes(fields[i]) for i in computed],
                     CHUNK_BYTES if chunk_bytes is None else chunk_bytes)
    if chunks:
        configure()  # every core, before the first parallel job sizes TVM's pool
        target = tvm.target.Target({"kind": "llvm", "mcpu": str(llvm_get_system_cpu())})
        ex = tvm.compile(_chunked(mod, chunks), target, relax_pipeline=cpu_pipeline(target))
        # naive: an output's memory goes back when it is dropped, not into a pool the next chunk may not fit
        vm = relax.VirtualMachine(ex, tvm.cpu(0), memory_cfg="naive")
        args = []
        for t in weights:
            t = t.detach().contiguous()
            if t.data_ptr() % 64:  # TVM needs 64-byte aligned data
                t = t.clone()
            args.append(tvm.runtime.from_dlpack(t))
        for k, idx in enumerate(chunks):
            outs = vm[f"{TRANSFORM}_{k}"](args)
            for i, o in zip(idx, outs):
                out.write(names[i], torch.from_dlpack(o))
            del outs, o
    return out.finish()


def _result_fields(transform: Any) -> list[Any]:
    """The output expressions of ``transform_params`` (the fields of the tuple it returns)."""
    from tvm import relax

    result = transform.body.body
    if isinstance(result, relax.Tuple):
        return list(result.fields)
    for block in transform.body.blocks:
        for b in block.bindings:
            if b.var.same_as(result) and isinstance(b.value, relax.Tuple):
                return list(b.value.fields)
    raise ValueError("transform_params does not return a tuple")


def _passed_through(transform: Any, fields: list[Any]) -> list[int | None]:
    """For every output, the index of the input it is (passed through unchanged), else None."""
    from tvm import relax

    (param,) = transform.params
    bindings = {b.var: b.value for block in transform.body.blocks for b in block.bindings}
    out = []
    for f in fields:
        v = bindings.get(f, f) if isinstance(f, relax.Var) else f
        passed = isinstance(v, relax.TupleGetItem) and v.tuple_value.same_as(param)
        out.append(int(v.index) if passed else None)
    return out


def _nbytes(expr: Any) -> int | None:
    """Bytes of a tensor expression of static shape, else None."""
    import tvm

    sinfo = expr.ty
    shape = getattr(sinfo, "shape", None)
    if shape is None or not hasattr(shape, "values"):
        return None
    n = 1
    for d in shape.values:
        if not isinstance(d, tvm.tirx.IntImm):
            return None
        n *= int(d)
    return n * ((tvm.runtime.DataType(sinfo.dtype).bits * tvm.runtime.DataType(sinfo.dtype).lanes + 7) // 8)


def _chunks(items: list[int], sizes: list[int | None], limit: int) -> list[list[int]]:
    """``items`` cut, in order, into groups of at most ``limit`` bytes (a bigger or unsized item alone)."""
    chunks: list[list[int]] = []
    size = 0
    for i, n in zip(items, sizes):
        n = limit if n is None else n
        if not chunks or size + n > limit:
            chunks.append([])
            size = 0
        chunks[-1].append(i)
        size += n
    return chunks


def _chunked(mod: Any, chunks: list[list[int]]) -> Any:
    """``mod`` (``transform_params`` and its kernels) with ``transform_params`` replaced by one function per chunk,
    ``transform_params_<k>``: the same parameters and bindings, returning the outputs of chunk ``k`` only; dead
    code elimination then drops each function's bindings that its outputs do not need."""
    import tvm
    from tvm import relax

    from tvm.relax.utils import copy_with_new_vars

    transform = mod[TRANSFORM]
    fields = _result_fields(transform)
    body = transform.body
    result = body.body
    funcs = {}
    for k, idx in enumerate(chunks):
        sub = relax.Tuple([fields[i] for i in idx])
        var = relax.Var("outputs", relax.TupleType([fields[i].ty for i in idx]))
        blocks = []
        for block in body.blocks:
            bindings = [b for b in block.bindings if not b.var.same_as(result)]
            if len(bindings) != len(block.bindings):  # the block that binds the result tuple: bind ours instead
                bindings.append(relax.VarBinding(var, sub))
            blocks.append(type(block)(bindings))
        seq = relax.SeqExpr(blocks, var if isinstance(result, relax.Var) else sub)
        name = f"{TRANSFORM}_{k}"
        func = relax.Function(transform.params, seq, var.ty, transform.is_pure, transform.attrs)
        # a Relax variable is defined in one function only: each chunk gets its own copies
        funcs[name] = copy_with_new_vars(func).with_attr("global_symbol", name)
    out = tvm.IRModule({gv: f for gv, f in mod.functions_items() if not isinstance(f, relax.Function)},
                       attrs=mod.attrs)
    for name, f in funcs.items():
        out[name] = f
    return relax.transform.DeadCodeElimination(list(funcs))(out)


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
    fields = _result_fields(transform)
    out, counts = [], {}
    for f, src in zip(fields, _passed_through(transform, fields)):
        if src is not None:
            out.append(names[src])
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
