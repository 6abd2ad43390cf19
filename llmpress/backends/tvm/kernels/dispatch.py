"""CPU dispatch of the quantized linears: each generic ``wq_linear`` kernel call becomes the fast CPU form.

``wq_linear.py``'s converter emits a target-independent ``call_tir`` (dequantize + matmul in TE, what dlight's GPU
rules schedule), preceded by ``act_fake_quant`` when ``act_bits=8``. On an LLVM CPU target this Relax pass (run
first in the CPU pipeline, ``build.py``) rewrites every such call whose layer fits the tiled layout
(``qlayout.why_not``)::

    w, sz = call_tir(repack, [qweight, scales(, zeros)])         weights only: lifted into transform_params and
                                                                 evaluated at compile time (params.py)
    x2d   = reshape(x, [M, K])                                   M = the token count (1 in decode)
    act_bits = 8:  qa, sa, asum = call_tir(act_quant, [x2d])     qact.py (shared by q/k/v after CSE)
                   y2d = call_tir(gemv_int | gemm_int, [qa, sa, asum, w, sz])
    act_bits = 0:  y2d = call_tir(gemv_float | gemm_float, [x2d, w, sz])
    y     = reshape(y2d, [..., N])

With ``epilogues``, a fused gate/up linear whose output only feeds ``multiply(silu(g), u)`` (``g, u``
its two halves) gets the SwiGLU epilogue (``epilogue.py``): its weights are repacked in the SwiGLU row order and
its kernel writes ``silu(g) * u`` (``[.., I]``) directly, replacing the split, silu and multiply; a linear whose
output only feeds ``add(y, b)`` (``b`` a float32 vector of its width: a bias) gets the bias epilogue (``bias.py``):
``b`` is one more input of its kernel, added in the store, replacing the add. The pass logs every match and every
near miss with its reason.

GEMV when the token count is statically 1 (the ``decode`` function), GEMM otherwise; on AVX-512 VNNI the integer
forms of single-plane layouts use the 512-bit kernels of ``qwide.py``.

Float32 linears (``matmul(x, permute_dims(W))`` as TVM's frontend writes ``aten.linear``, ``W`` a weight parameter)
become ``fgemm.py``'s GEMV/GEMM over ``W`` repacked into 4-row tiles (also lifted and computed at compile time). Layers the layout does not
cover keep the generic call (and its CPU schedule, ``wq_linear.schedule_cpu``); the pass logs each with the reason.
With a ``SparsePlan`` (``sparse_plan.py``), a linear whose weight it assigns a sparse kernel becomes ``sparse.py``'s
SELL-8 (float32) or int4 2:4 GEMV/GEMM instead, over the compressed form its repack computes (lifted into
``transform_params`` like the others); every decision, sparse or dense and why, is in the module attribute
``SPARSE_STATS_ATTR``. A sparse linear gets no SwiGLU epilogue (its output is the plain linear's).

Identical kernels (same shapes and options) are one PrimFunc, so Relax's common-subexpression elimination can
merge equal calls (one ``act_quant`` for ``q``/``k``/``v``).
"""
from __future__ import annotations

import logging
from typing import Any

import tvm
from tvm import relax, tirx
from tvm.sym.analyzer import Analyzer

from ..isa import CpuIsa
from .common import KERNEL_ATTR
from .bias import BiasMatch, match_bias
from .epilogue import SwigluMatch, match_swiglu, unpermute
from .qlayout import QLayout, why_not

__all__ = ["dispatch_quant_kernels", "DISPATCHED_ATTR", "EPILOGUE_STATS_ATTR", "SPARSE_STATS_ATTR"]

log = logging.getLogger(__name__)

#: Module attribute this pass sets: ``repr`` of ``{"swiglu_fused": n, "swiglu_unpermuted": n, "bias_fused": n,
#: "swiglu_near_misses": ["<function>: <var>: <why>", ...], "bias_near_misses": [...]}`` (linear call sites, every
#: function counted).
EPILOGUE_STATS_ATTR = "llmpress.epilogues"

#: Module attribute this pass sets when given a ``SparsePlan``: ``repr`` of its ``decisions`` (weight name -> kernel,
#: form, pattern, sparsity, why, reads).
SPARSE_STATS_ATTR = "llmpress.sparse_kernels"

#: Attribute of every PrimFunc this pass creates (``"repack"``, ``"act_quant"``, ``"gemv_int"``, ...).
DISPATCHED_ATTR = "llmpress.quant_kernel"


def _static(e: Any) -> int | None:
    return int(e) if isinstance(e, tirx.IntImm) else None


def dispatch_quant_kernels(isa: CpuIsa, *, epilogues: bool = True, functions: tuple[str, ...] | None = None,
                           sparse: Any = None) -> tvm.transform.Pass:
    """The Relax module pass described in the module docstring, for CPU instruction set ``isa``; ``epilogues``:
    fuse the SwiGLU of fused gate/up linears and the bias adds into their kernels (False: the separate elementwise
    kernels); ``functions``: the Relax functions whose kernels get them (None: every one). A SwiGLU linear in
    another function reads the same SwiGLU-layout weights (they are shared) with a plain kernel and puts its output
    back in weight order (``epilogue.unpermute``; TVM fuses that gather into the separate silu kernel);
    ``sparse``: a ``sparse_plan.SparsePlan`` (None: no sparse kernels)."""

    @relax.expr_functor.mutator
    class _Dispatch(relax.PyExprMutator):
        def __init__(self, mod: tvm.IRModule) -> None:
            super().__init__(mod)
            self.mod_ = mod
            self.funcs: dict[tuple, relax.GlobalVar] = {}
            self.kept: dict[str, str] = {}  # generic kernels left in place -> why
            self.weights: set[str] = set()  # names of the weight parameters of the function being visited
            self.pnames: dict = {}  # weight parameter var -> its state-dict name (SparsePlan.names)
            self.fused: dict = {}  # linear's binding var -> SwigluMatch, in the function being visited
            self.skip: set = set()  # bindings a fused epilogue replaced
            self.swiglu: SwigluMatch | None = None  # the match of the linear being rewritten
            self.applied = ""  # what the rewrite of that linear did: "fused", "unpermuted" or ""
            self.biased: dict = {}  # bias add's binding var -> (BiasMatch, the linear's value)
            self.deferred: set = set()  # linears emitted at their bias add (after the bias's own binding)
            self.bias: BiasMatch | None = None  # the bias match of the linear being rewritten
            self.bias_applied = False
            self.store_epilogue = True  # whether the kernels of the function being visited take the epilogues
            self.stats: dict[str, int] = {"swiglu_fused": 0, "swiglu_unpermuted": 0, "bias_fused": 0}

        def visit_var_binding_(self, binding):  # noqa: D102 - mutator protocol
            if binding.var in self.skip or binding.var in self.deferred:
                return None
            if binding.var in self.biased:
                return self._biased(binding)
            match = self.fused.get(binding.var)
            if match is None:
                return super().visit_var_binding_(binding)
            self.swiglu, self.applied = match, ""
            new = self.visit_expr(binding.value)
            self.swiglu = None
            if self.applied == "fused":  # the kernel wrote silu(g) * u: the multiply's value
                self.set_var_remap(match.out, self.builder_.emit(new, name_hint=match.out.name))
                self.skip.update(match.inner + (match.out,))
            else:
                self.set_var_remap(binding.var, self.builder_.emit(new, name_hint=binding.var.name))
            if self.applied:
                self.stats["swiglu_" + self.applied] += 1
            return None

        def _biased(self, binding) -> None:
            """``out = add(linear, b)``: the linear's kernel with the bias epilogue, bound to ``out``; the linear
            then the add as they were when its kernel has no such form (a generic kernel)."""
            match, value = self.biased[binding.var]
            self.bias, self.bias_applied = match, False
            new = self.visit_expr(value)
            self.bias = None
            if self.bias_applied:
                self.set_var_remap(match.out, self.builder_.emit(new, name_hint=match.out.name))
                self.stats["bias_fused"] += 1
                return None
            self.set_var_remap(match.linear, self.builder_.emit(new, name_hint=match.linear.name))
            return super().visit_var_binding_(binding)

        def _rows(self, x, m, k):
            """``x`` as ``[m, k]`` rows: the input of its reshape when that is already such rows (the output of
            another kernel: the SwiGLU epilogue's ``[M, I]`` read by the down projection), so no VM reshape call
            sits between the kernels; otherwise ``reshape(x, [m, k])`` (a view)."""
            bound = self.lookup_binding(x) if isinstance(x, relax.Var) else None
            if (isinstance(bound, relax.Call) and isinstance(bound.op, tvm.ir.Op) and bound.op.name == "relax.reshape"
                    and getattr(bound.args[0].ty, "shape", None) is not None):
                dims = list(bound.args[0].ty.shape.values)
                an = Analyzer()
                if len(dims) == 2 and an.can_prove_equal(dims[0], m) and an.can_prove_equal(dims[1], k):
                    return bound.args[0]
            return self.builder_.emit(relax.op.reshape(x, relax.ShapeExpr([m, k])))

        def _func(self, key: tuple, make) -> relax.GlobalVar:
            gv = self.funcs.get(key)
            if gv is None:
                name = "llmpress_" + "_".join(str(k).replace("-", "") for k in key)
                func = make().with_attr(DISPATCHED_ATTR, key[0])
                if key[0] not in ("repack", "frepack"):
                    # hand-written loop nests (no blocks): opaque to fusion, nothing left to schedule
                    func = func.with_attrs({"op_pattern": 8, "tirx.is_scheduled": True})
                gv = self.funcs[key] = self.builder_.add_func(func, name)
            return gv

        def visit_call_(self, call):  # noqa: D102 - mutator protocol
            call = self.visit_expr_post_order(call)
            if isinstance(call.op, tvm.ir.Op) and call.op.name == "relax.matmul":
                return self._float_linear(call)
            if not (isinstance(call.op, tvm.ir.Op) and call.op.name == "relax.call_tir"):
                return call
            gv = call.args[0]
            func = self.mod_[gv] if gv in self.mod_.get_global_vars() else None
            if not isinstance(func, tirx.PrimFunc) or (func.attrs or {}).get(KERNEL_ATTR) != "wq_linear":
                return call
            return self._rewrite(call, func)

        def _float_linear(self, call):
            """``matmul(x, permute_dims(W))`` with ``W`` a float32 weight parameter -> ``fgemm`` kernels."""
            from . import fgemm

            x, wt = call.args
            bound = self.lookup_binding(wt) if isinstance(wt, relax.Var) else None
            if not (isinstance(bound, relax.Call) and isinstance(bound.op, tvm.ir.Op)
                    and bound.op.name == "relax.permute_dims"):
                return call
            w = bound.args[0]
            axes = bound.attrs.axes
            if not (isinstance(w, relax.Var) and w.name in self.weights) or (axes is not None and
                                                                               [int(a) for a in axes] != [1, 0]):
                return call
            if str(w.ty.dtype) != "float32" or str(x.ty.dtype) != "float32" or len(w.ty.shape.values) != 2:
                return call
            if getattr(x.ty, "shape", None) is None:  # an input of unknown shape (e.g. behind a data-dependent op)
                return call
            n, k = (_static(d) for d in w.ty.shape.values)
            if n is None or k is None or len(x.ty.shape.values) < 2:
                return call
            info = sparse.float_layer(self.pnames.get(w, "")) if sparse is not None else None
            if info is not None:
                return self._sparse_float(x, w, info)
            if not fgemm.fits(n, k):
                return call
            bb = self.builder_
            from tvm import te

            sw = self.swiglu is not None

            def make_repack():
                ph = te.placeholder((n, k), "float32", name="w")
                return te.create_prim_func([ph, fgemm.repack_te(ph, swiglu=sw)]).without_attr("global_symbol")

            wr = bb.emit(relax.call_tir(self._func(("frepack", n, k) + (("swiglu",) if sw else ()), make_repack), [w],
                                        relax.TensorType((n // fgemm.ROWS, k // fgemm.CHUNK, fgemm.ROWS, fgemm.CHUNK),
                                                         "float32")))
            lead = list(x.ty.shape.values)[:-1]
            m = lead[0]
            for d in lead[1:]:
                m = m * d
            x2d = self._rows(x, m, k)
            decode = _static(Analyzer().simplify(m)) == 1
            fuse = sw and self.store_epilogue and (decode or fgemm.gemm_swiglu_fits(k))
            bias = self.bias is not None
            ep = ("swiglu",) if fuse else ("bias",) if bias else ()
            if decode:
                gv = self._func(("fgemv", isa.name, n, k) + ep,
                                lambda: fgemm.gemv_func(n, k, isa, swiglu=fuse, bias=bias))
            else:
                gv = self._func(("fgemm", isa.name, n, k) + ep,
                                lambda: fgemm.gemm_func(n, k, isa, swiglu=fuse, bias=bias))
            return self._output(x2d, (wr,), gv, m, n, lead, fuse, fgemm.ROWS)

        def _tokens(self, x, k):
            """(lead dims, M, x as [M, k], whether M is statically 1)."""
            lead = list(x.ty.shape.values)[:-1]
            m = lead[0]
            for d in lead[1:]:
                m = m * d
            x2d = self.builder_.emit(relax.op.reshape(x, relax.ShapeExpr([m, k])))
            return lead, m, x2d, _static(Analyzer().simplify(m)) == 1

        def _sparse_float(self, x, w, info):
            """``x W^T`` by the SELL-8 kernels over ``W``'s compressed form (computed at compile time)."""
            from . import sparse as sp

            n, k, s = info.n, info.k, info.steps
            bb = self.builder_
            rep = bb.emit(relax.call_tir(
                self._func(("ell_repack", n, k, s), lambda: sp.ell_repack_func(n, k, s)), [w],
                [relax.TensorType((s, sp.R), "float32"), relax.TensorType((s, sp.R), "uint16"),
                 relax.TensorType((info.tiles + 1,), "int32")]))
            wr = tuple(bb.emit(relax.TupleGetItem(rep, i)) for i in range(3))
            lead, m, x2d, decode = self._tokens(x, k)
            form, make = ("ell_gemv", sp.ell_gemv_func) if decode else ("ell_gemm", sp.ell_gemm_func)
            gv = self._func((form, n, k, s), lambda: make(n, k, s))
            y = bb.emit(relax.call_tir(gv, [x2d, *wr], relax.TensorType([m, n], "float32")))
            return relax.op.reshape(y, relax.ShapeExpr([*lead, n]))

        def _sparse_int4(self, x, qweight, scales, info):
            """``wq_linear`` (int4, symmetric, float activations) by the int4 2:4 kernels."""
            from . import sparse as sp

            n, k, g = info.n, info.k, info.group
            bb = self.builder_
            sd = str(scales.ty.dtype)
            rep = bb.emit(relax.call_tir(
                self._func(("nm24_repack", n, k, f"g{g}", sd), lambda: sp.nm24_repack_func(n, k, g, sd)),
                [qweight, scales], [relax.TensorType((info.tiles, k // 8, 3, sp.R), "uint8"),
                                    relax.TensorType((info.tiles, k // g, sp.R), "float32")]))
            wr = tuple(bb.emit(relax.TupleGetItem(rep, i)) for i in range(2))
            lead, m, x2d, decode = self._tokens(x, k)
            form, make = ("nm24_gemv", sp.nm24_gemv_func) if decode else ("nm24_gemm", sp.nm24_gemm_func)
            gv = self._func((form, n, k, f"g{g}"), lambda: make(n, k, g))
            y = bb.emit(relax.call_tir(gv, [x2d, *wr], relax.TensorType([m, n], "float32")))
            return relax.op.reshape(y, relax.ShapeExpr([*lead, n]))

        def _output(self, x2d, wr, gv, m, n, lead, fuse, rows, extra=()):
            """Emit the kernel call ``gv(*extra or x2d, *wr(, bias))``; its output as the linear's (SwiGLU layout:
            in weight row order again), when ``fuse`` as the multiply's (``[*lead, n/2]``), with a bias as the
            add's."""
            bb = self.builder_
            ins = list(extra) if extra else [x2d]
            width = n // 2 if fuse else n
            if self.bias is not None:
                ins_b = [self.visit_expr(self.bias.bias)]
                self.bias_applied = True
            else:
                ins_b = []
            y = bb.emit(relax.call_tir(gv, ins + list(wr) + ins_b, relax.TensorType([m, width], "float32")))
            if self.swiglu is None:
                return relax.op.reshape(y, relax.ShapeExpr([*lead, n]))
            self.applied = "fused" if fuse else "unpermuted"
            if fuse:
                return relax.op.reshape(y, relax.ShapeExpr([*lead, width]))
            return unpermute(bb, y, lead, n // 2, rows)

        def _rewrite(self, call, func):
            attrs = func.attrs
            bits, group = int(attrs["llmpress.bits"]), int(attrs["llmpress.group_size"])
            act_bits = int(attrs.get("llmpress.act_bits", 0))
            act_group = int(attrs.get("llmpress.act_group", 0))
            args = list(call.args[1].fields)
            x, qweight, scales = args[:3]
            zeros = args[3] if len(args) > 3 else None
            in_f = int(attrs["llmpress.in_features"])
            out_f = int(qweight.ty.shape[0])
            if sparse is not None and bits == 4 and isinstance(qweight, relax.Var) and qweight in self.pnames:
                info = sparse.int4_layer(self.pnames[qweight], self.pnames.get(scales, ""), k=in_f, group=group,
                                         sym=zeros is None, act_bits=act_bits)
                if info is not None:
                    return self._sparse_int4(x, qweight, scales, info)
            why = why_not(bits, out_f, in_f, group)
            if why is None and act_bits and (act_group % 32 or group % act_group):
                why = f"activation group {act_group} is not a multiple of 32 dividing the group {group}"
            if why is not None:
                self.kept[gv_name(call)] = why
                return call
            if act_bits:  # look through the generic activation fake-quant: the integer kernels quantize x
                bound = self.lookup_binding(x)
                x = bound.args[1].fields[0]
            layout = QLayout(bits, zeros is None, out_f, in_f, group)
            bb = self.builder_
            from .qlayout import repack_te

            from tvm import te

            sw = self.swiglu is not None
            fuse = sw and self.store_epilogue  # else: SwiGLU layout, plain kernel, output unpermuted
            bias = self.bias is not None
            ep = ("swiglu",) if sw else ()

            def make_repack():
                ph = [te.placeholder([int(d) for d in a.ty.shape], a.ty.dtype, name=n)
                      for a, n in zip([qweight, scales] + ([zeros] if zeros is not None else []),
                                      ("qweight", "scales", "zeros"))]
                return te.create_prim_func(ph + repack_te(layout, *ph, swiglu=sw)).without_attr("global_symbol")

            key = ("repack", f"b{bits}", "sym" if layout.sym else "asym", out_f, in_f, f"g{group}",
                   str(qweight.ty.dtype), str(scales.ty.dtype), str(zeros.ty.dtype) if zeros is not None else "") + ep
            rep = bb.emit(relax.call_tir(self._func(key, make_repack),
                                         [qweight, scales] + ([zeros] if zeros is not None else []),
                                         [relax.TensorType(layout.w_shape, layout.dtype),
                                          relax.TensorType(layout.sz_shape, "float32")]))
            w, sz = bb.emit(relax.TupleGetItem(rep, 0)), bb.emit(relax.TupleGetItem(rep, 1))
            lead = list(x.ty.shape.values)[:-1]
            m = lead[0]
            for d in lead[1:]:
                m = m * d
            m_static = _static(Analyzer().simplify(m))
            x2d = self._rows(x, m, in_f)
            tag = ("sym" if layout.sym else "asym", out_f, in_f, f"g{group}") + (("swiglu",) if fuse else ()) + (
                ("bias",) if bias else ())
            if act_bits:
                from .qact import act_quant_func

                tokens = 1 if m_static == 1 else None
                aq = bb.emit(relax.call_tir(
                    self._func(("act_quant", in_f, f"a{act_group}", f"g{group}", f"t{tokens}"),
                               lambda: act_quant_func(in_f, act_group, group, tokens=tokens)),
                    [x2d], [relax.TensorType([m, in_f], "int8"), relax.TensorType([m, in_f // act_group], "float32"),
                            relax.TensorType([m, layout.groups], "float32")]))
                qa, sa, asum = (bb.emit(relax.TupleGetItem(aq, i)) for i in range(3))
                from .qwide import gemm_wide_func, gemv_wide_func, wide_applies

                if wide_applies(layout, isa):  # AVX-512 VNNI: two rows per 512-bit register
                    form, make = (("gemv_wide", gemv_wide_func) if m_static == 1 else ("gemm_wide", gemm_wide_func))
                    gv = self._func((form, f"b{bits}", *tag, f"a{act_group}"),
                                    lambda: make(layout, act_group, swiglu=fuse, bias=bias))
                elif m_static == 1:
                    from .qgemv import gemv_int_func

                    gv = self._func(("gemv_int", isa.name, f"b{bits}", *tag, f"a{act_group}"),
                                    lambda: gemv_int_func(layout, isa, act_group, swiglu=fuse, bias=bias))
                else:
                    from .qgemm import gemm_int_func

                    gv = self._func(("gemm_int", isa.name, f"b{bits}", *tag, f"a{act_group}"),
                                    lambda: gemm_int_func(layout, isa, act_group, swiglu=fuse, bias=bias))
                return self._output(None, (w, sz), gv, m, out_f, lead, fuse, layout.rows, extra=(qa, sa, asum))
            else:
                if m_static == 1:
                    from .qgemv import gemv_float_func

                    gv = self._func(("gemv_float", f"b{bits}", *tag),
                                    lambda: gemv_float_func(layout, swiglu=fuse, bias=bias))
                else:
                    from .qgemm import gemm_float_func

                    gv = self._func(("gemm_float", f"b{bits}", *tag),
                                    lambda: gemm_float_func(layout, swiglu=fuse, bias=bias))
            return self._output(x2d, (w, sz), gv, m, out_f, lead, fuse, layout.rows)

    def gv_name(call) -> str:
        return call.args[0].name_hint

    def is_linear(mod: tvm.IRModule, value) -> bool:
        if not isinstance(value, relax.Call) or not isinstance(value.op, tvm.ir.Op):
            return False
        if value.op.name == "relax.matmul":
            return True
        if value.op.name != "relax.call_tir" or value.args[0] not in mod.get_global_vars():
            return False
        return (mod[value.args[0]].attrs or {}).get(KERNEL_ATTR) == "wq_linear"

    @tvm.transform.module_pass(opt_level=0, name="llmpress.DispatchQuantKernels")
    def _pass(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        m = _Dispatch(mod)
        near: list[tuple[str, str, str]] = []
        bias_near: list[str] = []
        for gv, func in mod.functions_items():
            if isinstance(func, relax.Function):
                n_in = int((func.attrs or {}).get("num_input", len(func.params)))
                m.weights = {p.name for p in func.params[n_in:]}
                m.pnames = dict(zip(func.params[n_in:], sparse.names)) if sparse is not None else {}
                found, missed = match_swiglu(func, lambda v: is_linear(mod, v))
                m.fused = {f.linear: f for f in found} if epilogues else {}
                here = epilogues and (functions is None or gv.name_hint in functions)
                m.store_epilogue = here
                m.skip = set()
                near += [(gv.name_hint, name, why) for name, why in missed]
                biases, bias_missed = match_bias(func, lambda v: is_linear(mod, v))
                values = {b.var: b.value for block in func.body.blocks for b in block.bindings}
                m.biased = {b.out: (b, values[b.linear]) for b in biases} if here else {}
                m.deferred = set(b.linear for b in biases) if here else set()
                bias_near += [f"{gv.name_hint}: {name}: {why}" for name, why in bias_missed]
                m.builder_.update_func(gv, m.visit_expr(func))
        out = m.builder_.get()
        for name, why in sorted(m.kept.items()):
            log.info("%s keeps the generic CPU kernel: %s", name, why)
        log.info("SwiGLU epilogue%s: %d linear(s) write silu(gate) * up, %d read the SwiGLU layout and re-order their "
                 "output", "" if epilogues else " (off)", m.stats["swiglu_fused"], m.stats["swiglu_unpermuted"])
        log.info("bias epilogue%s: %d linear(s) add their bias in the store", "" if epilogues else " (off)",
                 m.stats["bias_fused"])
        for fn, name, why in near:
            log.info("%s: %s is no SwiGLU epilogue: %s", fn, name, why)
        for line in bias_near:
            log.info("%s is no bias epilogue", line)
        stats = dict(m.stats, swiglu_near_misses=[f"{fn}: {name}: {why}" for fn, name, why in near],
                     bias_near_misses=bias_near)
        # the generic kernels (and activation fake-quant stages) no longer called are dropped
        out = relax.transform.DeadCodeElimination()(relax.transform.EliminateCommonSubexpr()(out))
        out = out.with_attr(EPILOGUE_STATS_ATTR, repr(stats))
        return out.with_attr(SPARSE_STATS_ATTR, repr(sparse.decisions)) if sparse is not None else out

    return _pass
