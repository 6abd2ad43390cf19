"""Residual add + RMSNorm in one CPU kernel (a Relax-level fusion of the TVM backend).

A pre-norm decoder adds each block's output to the residual stream and normalizes the sum for the next block. As
TVM's frontend writes it (``s`` the new residual, ``w`` the norm weight, absent after ``fold_norm``)::

    s = add(a, b);  p = power(s, 2);  m = mean(p, axis=-1, keepdims);  r = rsqrt(add(m, eps))
    n = multiply(s, r);  y = multiply(w, n)

TVM's ``FuseOps`` does not merge these: ``s`` has readers outside the norm (the next residual add), so the add
stays a kernel of its own, and the norm is two more (the mean of squares, a reduction, then the scaling), i.e.
three launches, three passes over the row and two intermediate buffers per norm (``benchmarks/results/speed.md``'s
decode profile: 45 residual adds and 90 RMSNorm kernels per step for 45 norms of the 1.1B shape). This pass
replaces the chain by one ``call_tir`` that, per token row, writes ``s = a + b`` while summing its squares (8 fp32
lanes), then ``y = w * (s * rsqrt(sum / D + eps))``: the same operations as the reference, the sum of squares in
another order (fp32 rounding only). Rows run in parallel when the token count is not statically 1.

This is lighter than an IR pass with its own op (which would need a reference kernel and an ONNX translation) and
changes nothing for the other backends; the price is that only the TVM CPU build benefits.
"""
from __future__ import annotations

import logging
from typing import Any

__all__ = ["fuse_add_norm", "add_norm_func", "match_add_norm"]

log = logging.getLogger(__name__)

LANES = 8


def add_norm_func(d: int, eps: float, *, tokens: int | None, weight: bool) -> Any:
    """``(a f32 [M, D], b f32 [M, D], w f32 [D]) -> (s, y f32 [M, D])`` (no ``w`` without ``weight``; ``M`` the
    token count, the rows the linear kernels read and write, so no reshape sits between them and this kernel):
    ``s = a + b``, ``y = w * (s * rsqrt(mean(s^2) + eps))``; ``tokens``: M when static (decode: 1)."""
    from tvm.script import tirx as T

    from .qgemv import hsum

    V = T.ramp(0, 1, LANES)
    f32 = "float32"

    def at(buf, i, c):
        return buf.vload([i, c * LANES], "float32x8")

    @T.macro
    def row(a, b, w, s, y, i):
        acc = T.alloc_buffer((LANES,), f32, scope="global")
        r = T.alloc_buffer((1,), f32, scope="global")
        acc[V] = T.broadcast(T.float32(0), LANES)
        for c in range(d // LANES):
            s[i, T.ramp(c * LANES, 1, LANES)] = at(a, i, c) + at(b, i, c)
            acc[V] = acc[V] + at(s, i, c) * at(s, i, c)
        r[0] = T.rsqrt(hsum(acc) / T.float32(d) + T.float32(eps))
        for c in range(d // LANES):
            if w is not None:
                y[i, T.ramp(c * LANES, 1, LANES)] = w.vload([c * LANES], "float32x8") * (
                    at(s, i, c) * T.broadcast(r[0], LANES))
            else:
                y[i, T.ramp(c * LANES, 1, LANES)] = at(s, i, c) * T.broadcast(r[0], LANES)

    @T.prim_func(private=True)
    def with_weight(var_a: T.handle, var_b: T.handle, w: T.Buffer((d,), f32), var_s: T.handle, var_y: T.handle):
        T.func_attr({"tirx.noalias": True})
        M = T.int64()
        a = T.match_buffer(var_a, (M, d), f32)
        b = T.match_buffer(var_b, (M, d), f32)
        s = T.match_buffer(var_s, (M, d), f32)
        y = T.match_buffer(var_y, (M, d), f32)
        for m in T.parallel(M) if tokens is None else T.serial(tokens):
            row(a, b, w, s, y, m)

    @T.prim_func(private=True)
    def without_weight(var_a: T.handle, var_b: T.handle, var_s: T.handle, var_y: T.handle):
        T.func_attr({"tirx.noalias": True})
        M = T.int64()
        a = T.match_buffer(var_a, (M, d), f32)
        b = T.match_buffer(var_b, (M, d), f32)
        s = T.match_buffer(var_s, (M, d), f32)
        y = T.match_buffer(var_y, (M, d), f32)
        for m in T.parallel(M) if tokens is None else T.serial(tokens):
            row(a, b, None, s, y, m)

    return with_weight if weight else without_weight


def _op(value: Any, name: str) -> bool:
    import tvm
    from tvm import relax

    return isinstance(value, relax.Call) and isinstance(value.op, tvm.ir.Op) and value.op.name == name


def _const(e: Any) -> float | None:
    import tvm

    if isinstance(e, tvm.ir.GenericConst) and hasattr(e.value, "numpy") and e.value.numpy().size == 1:
        return float(e.value.numpy().reshape(()))
    return None


def match_add_norm(func: Any) -> tuple[list[dict], list[tuple[str, str]]]:
    """Every ``add`` -> RMSNorm chain of Relax function ``func`` (dicts: ``s``, ``a``, ``b``, ``w`` or None,
    ``eps``, ``out``, ``inner``: the bindings replaced) and the near misses ``(var name, why)``: an RMSNorm whose
    input is an ``add`` but that is not the exact pattern."""
    from .epilogue import _uses

    binds = {b.var: b.value for block in func.body.blocks for b in block.bindings}
    uses = _uses(func)
    found, near = [], []
    for r_var, rv in binds.items():
        if not _op(rv, "relax.rsqrt"):
            continue
        e = rv.args[0]
        ev = binds.get(e)
        if not _op(ev, "relax.add"):
            continue
        mvar, eps = ev.args[0], _const(ev.args[1])
        mv = binds.get(mvar)
        if eps is None or not _op(mv, "relax.mean"):
            continue
        p = mv.args[0]
        pv = binds.get(p)
        if not (_op(pv, "relax.power") and _const(pv.args[1]) == 2.0):
            continue
        s = pv.args[0]
        sv = binds.get(s)
        if not _op(sv, "relax.add"):
            continue  # the first norm of the model reads the embedding, not a residual add
        readers = [(v, val) for v, val in binds.items() if _op(val, "relax.multiply") and r_var in list(val.args)]
        why = None
        shape = s.ty.shape.values
        d = shape[-1]
        axes = [int(x) for x in mv.attrs.axis] if mv.attrs.axis is not None else None
        if len(shape) < 2:
            why = "a single row without token dimensions"
        elif str(s.ty.dtype) != "float32":
            why = f"dtype {s.ty.dtype}, not float32"
        elif not hasattr(d, "value") or int(d) % LANES:
            why = f"the normalized width {d} is not a static multiple of {LANES}"
        elif axes not in ([-1], [len(shape) - 1]) or not bool(mv.attrs.keepdims):
            why = f"mean over axes {axes}, not the last with keepdims"
        elif not all([str(v) for v in x.ty.shape.values] == [str(v) for v in shape] for x in sv.args):
            why = "the add broadcasts"
        elif len(readers) != 1 or not readers[0][1].args[0].same_as(s):
            why = "rsqrt is not read by one multiply(s, rsqrt)"
        elif any(uses.get(v, 0) != 1 for v in (p, mvar, e, r_var)):
            why = "an intermediate of the norm has other readers"
        if why is None:
            n_var = readers[0][0]
            w, out, inner = None, n_var, [p, mvar, e, r_var, n_var]
            wreaders = [(v, val) for v, val in binds.items() if _op(val, "relax.multiply") and n_var in list(val.args)]
            if uses.get(n_var, 0) == 1 and len(wreaders) == 1:
                wv = wreaders[0][1]
                other = wv.args[0] if wv.args[1].same_as(n_var) else wv.args[1]
                if len(other.ty.shape.values) == 1 and str(other.ty.dtype) == "float32":
                    w, out = other, wreaders[0][0]
            found.append({"s": s, "a": sv.args[0], "b": sv.args[1], "w": w, "eps": eps, "out": out,
                          "inner": [v for v in inner if not v.same_as(out)], "d": int(d)})
        else:
            near.append((s.name, why))
    return found, near


def fuse_add_norm(functions: tuple[str, ...] | None = None) -> Any:
    """Relax module pass: every matched residual add + RMSNorm of the Relax functions named in ``functions`` (None:
    all) -> one ``add_norm_func`` kernel (module docstring);
    sets the module attribute ``llmpress.add_norm`` to ``repr({"fused": n, "near_misses": [...]})``."""
    import tvm
    from tvm import relax
    from tvm.sym.analyzer import Analyzer

    from .dispatch import DISPATCHED_ATTR

    def same_shape(e, dims) -> bool:
        shape = getattr(getattr(e, "ty", None), "shape", None)
        return shape is not None and [str(v) for v in shape.values] == [str(v) for v in dims]

    @relax.expr_functor.mutator
    class _Fuse(relax.PyExprMutator):
        """The kernel reads and writes ``[M, D]`` rows. An input that is ``reshape(v)`` of such rows (a linear's
        output, ``dispatch.py``) is read as ``v``; the outputs keep their ``[.., D]`` vars as reshapes (views, left
        to dead-code elimination when unread) and a reader ``reshape(out, [M, D])`` (the next linear's input) or
        the next norm reads the rows themselves: no VM reshape call between the kernels."""

        def __init__(self, mod):
            super().__init__(mod)
            self.by_s: dict = {}
            self.skip: set = set()
            self.funcs: dict = {}
            self.rows: dict = {}  # [.., D] var of a fused output -> its [M, D] var
            self.fused = 0

        def visit_var_binding_(self, binding):  # noqa: D102 - mutator protocol
            if binding.var in self.skip:
                return None
            val = binding.value
            if (isinstance(val, relax.Call) and isinstance(val.op, tvm.ir.Op) and val.op.name == "relax.reshape"
                    and val.args[0] in self.rows and same_shape(binding.var, self.rows[val.args[0]].ty.shape.values)):
                self.set_var_remap(binding.var, self.rows[val.args[0]])
                return None
            match = self.by_s.get(binding.var)
            if match is None:
                return super().visit_var_binding_(binding)
            bb = self.builder_
            shape = list(match["s"].ty.shape.values)
            lead, d = shape[:-1], match["d"]
            m = lead[0]
            for x in lead[1:]:
                m = m * x
            tokens = 1 if Analyzer().simplify(m) == 1 else None
            weight = match["w"] is not None
            key = (d, match["eps"], tokens, weight)
            gv = self.funcs.get(key)
            if gv is None:
                f = add_norm_func(d, match["eps"], tokens=tokens, weight=weight)
                f = f.with_attrs({DISPATCHED_ATTR: "add_norm", "op_pattern": 8, "tirx.is_scheduled": True})
                gv = self.funcs[key] = bb.add_func(f, f"llmpress_add_norm_d{d}_t{tokens}{'_w' if weight else ''}")
            rows = [m, d]

            def arg(v):
                if v in self.rows:
                    return self.rows[v]
                v = self.visit_expr(v)
                bound = self.lookup_binding(v) if isinstance(v, relax.Var) else None
                if (isinstance(bound, relax.Call) and isinstance(bound.op, tvm.ir.Op)
                        and bound.op.name == "relax.reshape" and same_shape(bound.args[0], rows)):
                    return bound.args[0]
                return v if same_shape(v, rows) else bb.emit(relax.op.reshape(v, relax.ShapeExpr(rows)))

            args = [arg(match["a"]), arg(match["b"])] + ([self.visit_expr(match["w"])] if weight else [])
            ty = relax.TensorType(rows, "float32")
            res = bb.emit(relax.call_tir(gv, args, [ty, ty]))
            for k, old in ((0, binding.var), (1, match["out"])):
                v = bb.emit(relax.TupleGetItem(res, k))
                self.rows[old] = v
                self.set_var_remap(old, bb.emit(relax.op.reshape(v, relax.ShapeExpr(shape)), name_hint=old.name))
            self.skip.update(match["inner"] + [match["out"]])
            self.fused += 1
            return None

    @tvm.transform.module_pass(opt_level=0, name="llmpress.FuseAddNorm")
    def _pass(mod, _ctx):
        f = _Fuse(mod)
        near = []
        for gv, func in mod.functions_items():
            if isinstance(func, relax.Function) and (functions is None or gv.name_hint in functions):
                found, missed = match_add_norm(func)
                f.by_s = {m["s"]: m for m in found}
                f.skip = set()
                near += [f"{gv.name_hint}: {n}: {why}" for n, why in missed]
                f.builder_.update_func(gv, f.visit_expr(func))
        out = relax.transform.DeadCodeElimination()(f.builder_.get())
        log.info("residual add + RMSNorm: %d fused, %d near misses%s", f.fused, len(near),
                 "".join(f"\n  {n}" for n in near))
        return out.with_attr("llmpress.add_norm", repr({"fused": f.fused, "near_misses": near}))

    return _pass
