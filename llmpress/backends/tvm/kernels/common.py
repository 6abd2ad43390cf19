"""Shared plumbing of the llmpress TVM kernels: tagging, target families, the scheduling pass, fusion checks.

Every converter in this package emits its op as one ``relax.call_tir`` to a TE-built ``PrimFunc`` tagged with the
function attribute ``llmpress.kernel`` (the kernel family, e.g. ``"wq_linear"``) plus the parameters its schedule
needs. The PrimFunc is deliberately left *unscheduled* and in the shape TVM's own rules understand (a dequantize
prologue block feeding a matmul block), so that:

- on GPU targets the default Relax pipeline's dlight rules (``Matmul``/``GEMV``/``Fallback``) schedule it and
  compute the dequantize prologue per tile in shared memory (no full-precision weight is ever stored);
- on CPU targets (x86 and aarch64 LLVM) our own hand schedules apply (each kernel file's ``CPU_SCHEDULES``, found
  through the op table ``table.py``: e.g. wq_linear's GEMV form decodes weights in registers, its GEMM form one
  column tile per thread), either as the dlight rule
  :func:`kernel_rule` (first in the backend's CPU ``ApplyDefaultSchedule`` list, ``schedules.cpu_rules``) or as
  the module pass :func:`schedule_kernels` (anywhere before TIR lowering).

:func:`specialize_decode` (run by ``lower.to_relax``) points call sites whose token count is statically 1 (the
``decode`` function) at a copy of the kernel tagged ``llmpress.decode``, so decode and prefill get different
schedules of the same computation.

Kernels are emitted with ``op_pattern`` = 8 (opaque) so ``FuseOps``/``FuseTIR`` never merge them into a new,
unscheduled function that would lose the tag. Untagged functions are untouched, so the pass and the rule are always
safe; without either, CPU builds are still correct, only serial and slow.
"""
from __future__ import annotations

import logging
from typing import Any, Callable

import tvm
from tvm import tirx

from .table import cpu_schedules

__all__ = [
    "KERNEL_ATTR",
    "CpuSchedule",
    "new_schedule",
    "cpu_kernel_schedule",
    "kernel_rule",
    "schedule_kernels",
    "specialize_decode",
    "DECODE_ATTR",
    "is_gpu_target",
    "cpu_vector_lanes",
    "lowered_float_allocations",
    "as_target",
]

log = logging.getLogger(__name__)

KERNEL_ATTR = "llmpress.kernel"

def as_target(target) -> tvm.target.Target:
    return target if isinstance(target, tvm.target.Target) else tvm.target.Target(target)


def is_gpu_target(target) -> bool:
    return "gpu" in [str(k) for k in as_target(target).keys]


def cpu_vector_lanes(target) -> int:
    """How many float32 lanes a vectorized reduction should use on an LLVM target: two SIMD registers' worth, to
    keep two FMA chains in flight (AVX-512: 32, AVX2: 16, SSE/NEON: 8). LLVM splits wider vectors into registers,
    so an over-estimate only costs a little register pressure."""
    t = as_target(target)
    attrs = {str(k): v for k, v in t.attrs.items()}
    mcpu = str(attrs.get("mcpu", ""))
    mattr = " ".join(str(a) for a in attrs.get("mattr", []) or [])
    if "aarch64" in str(attrs.get("mtriple", "")) or "arm_cpu" in [str(k) for k in t.keys]:
        return 8
    if "avx512" in mattr or mcpu in ("x86-64-v4", "skylake-avx512", "cascadelake", "icelake-server",
                                     "sapphirerapids", "znver4", "znver5"):
        return 32
    if "avx2" in mattr or mcpu in ("x86-64-v3", "haswell", "skylake", "znver2", "znver3", "native"):
        return 16
    return 8


def _func_attr(func: tirx.PrimFunc, key: str, default=None):
    attrs = func.attrs
    if attrs is None or key not in attrs:
        return default
    return attrs[key]


#: The signature of a CPU schedule, ``fn(func, target) -> tvm.s_tir.Schedule``: the CPU version of a tagged kernel.
#: It may rebuild the function from another TE formulation as long as the parameters (order, shapes, dtypes) stay the
#: same; build the schedule with :func:`new_schedule` so the function keeps its attributes. Each kernel file lists
#: its schedules in a module-level ``CPU_SCHEDULES = {tag: fn}``, found through the op table (``table.py``).
CpuSchedule = Callable[[tirx.PrimFunc, Any], tvm.s_tir.Schedule]


def new_schedule(new: tirx.PrimFunc, like: tirx.PrimFunc) -> tvm.s_tir.Schedule:
    """A schedule of ``new`` carrying the attributes of ``like`` (``te.create_prim_func`` names every function
    "main"; an emitted kernel is private, and two functions with one global symbol break the Relax module)."""
    # renew_defs: a deep copy. The schedule rewrites the function's statements in place, and ``new`` may be the very
    # function a caller's module still holds (a module compiled for two target variants).
    new = tvm.s_tir.renew_defs(new).without_attr("global_symbol")
    for key, value in (like.attrs or {}).items():
        new = new.with_attr(str(key), value)
    return tvm.s_tir.Schedule(new)


def cpu_kernel_schedule(func: tirx.PrimFunc, target) -> tvm.s_tir.Schedule | None:
    """The hand schedule of an ``llmpress.kernel`` function for an LLVM target, or None if ``func`` is not one of
    ours, is already scheduled, or ``target`` is a GPU."""
    if not isinstance(func, tirx.PrimFunc) or is_gpu_target(target):
        return None
    kind = _func_attr(func, KERNEL_ATTR)
    if kind is None or _func_attr(func, "tirx.is_scheduled", False):
        return None
    fn = cpu_schedules().get(str(kind))
    if fn is None:
        log.warning("no CPU schedule for llmpress kernel %s; it builds unscheduled (serial)", kind)
        return None
    return fn(func, target)


def kernel_rule():
    """A dlight ``ScheduleRule`` giving llmpress kernels their CPU schedules ("not applicable" for anything else):
    put it first in a CPU ``ApplyDefaultSchedule`` list."""
    from tvm.s_tir.dlight.base import ScheduleRule

    class LlmpressKernels(ScheduleRule):
        def apply(self, func, target, tunable):  # noqa: D102 - dlight protocol
            return cpu_kernel_schedule(func, target)

    return LlmpressKernels()


def schedule_kernels(target) -> tvm.transform.Pass:
    """Module pass: give every ``llmpress.kernel`` PrimFunc its hand schedule for ``target`` (LLVM targets; GPU
    functions are left to dlight in the default pipeline). Safe to run on any module, at any point before the TIR
    is lowered; the kernels are emitted opaque (``op_pattern`` = 8) so fusion never rewrites them first."""
    target = as_target(target)

    @tvm.transform.module_pass(opt_level=0, name="llmpress.ScheduleKernels")
    def _pass(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        updates = {}
        for gv, func in mod.functions_items():
            sch = cpu_kernel_schedule(func, target) if isinstance(func, tirx.PrimFunc) else None
            if sch is not None:
                updates[gv] = sch.mod["main"].with_attr("tirx.is_scheduled", True)
        if updates:
            mod = tvm.IRModule(dict(mod.functions_items()), attrs=mod.attrs)
            for gv, func in updates.items():
                mod[gv] = func
        return mod

    return _pass


DECODE_ATTR = "llmpress.decode"


def specialize_decode() -> tvm.transform.Pass:
    """Relax module pass: call sites of a token-shaped llmpress kernel (``llmpress.token_dims`` = leading dims of its
    first argument) whose leading dims are statically 1 -- the ``decode`` function, where the sequence length is
    bound to 1 -- are pointed at a copy of the kernel tagged ``llmpress.decode``, for which the CPU schedules pick
    their GEMV form (weights decoded in registers) instead of the GEMM form (a decoded tile reused by every token).
    Both forms compute the same thing for any shape; only speed depends on the choice. Idempotent."""
    from tvm import relax

    @relax.expr_functor.mutator
    class _Specialize(relax.PyExprMutator):
        def __init__(self, mod: tvm.IRModule) -> None:
            super().__init__(mod)
            self.mod_ = mod
            self.variants: dict[str, relax.GlobalVar] = {}
            self.redirected: set[str] = set()
            self.called: set[str] = set()  # every call_tir target after the rewrite

        def visit_call_(self, call):  # noqa: D102 - mutator protocol
            call = self.visit_expr_post_order(call)
            if not (isinstance(call.op, tvm.ir.Op) and call.op.name == "relax.call_tir"):
                return call
            gv = call.args[0]
            call = self._rewrite(call, gv)
            self.called.add(call.args[0].name_hint)
            return call

        def _rewrite(self, call, gv):
            func = self.mod_[gv] if gv in self.mod_.get_global_vars() else None
            if not isinstance(func, tirx.PrimFunc) or _func_attr(func, KERNEL_ATTR) is None:
                return call
            if _func_attr(func, "llmpress.token_dims") is None or _func_attr(func, DECODE_ATTR, False):
                return call
            x_ty = call.args[1].fields[0].ty
            shape = getattr(x_ty, "shape", None)
            dims = list(shape.values) if shape is not None and hasattr(shape, "values") else None
            lead = dims[:-1] if dims else None
            if not lead or not all(isinstance(d, tirx.IntImm) and int(d) == 1 for d in lead):
                return call
            key = gv.name_hint
            if key not in self.variants:
                self.variants[key] = self.builder_.add_func(func.with_attr(DECODE_ATTR, True), key + "_decode")
                self.redirected.add(key)
            return relax.Call(call.op, [self.variants[key], *call.args[1:]], call.attrs, call.ty_args)

    @tvm.transform.module_pass(opt_level=0, name="llmpress.SpecializeDecode")
    def _pass(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        m = _Specialize(mod)
        for gv, func in mod.functions_items():
            if isinstance(func, relax.Function):
                m.builder_.update_func(gv, m.visit_expr(func))
        out = m.builder_.get()
        # a kernel whose every call site was redirected is dead now: drop it instead of compiling it
        for gv in list(out.get_global_vars()):
            if gv.name_hint in m.redirected and gv.name_hint not in m.called:
                del out[gv]
        return out

    return _pass


def lowered_float_allocations(func: tirx.PrimFunc, target) -> list[tuple[str, str]]:
    """Every float buffer ``func`` allocates once lowered, as ``(name, shape)``: the function is run through TVM's
    block lowering up to buffer flattening (init blocks lowered, allocations planned and compacted to the region
    each one really covers, blocks removed), the state the code generator sees. The fusion tests read this to show
    that no dequantized weight (nor any tile of one) is ever stored."""
    from tvm import s_tir

    mod = tvm.IRModule({"main": func.with_attr("target", as_target(target))})
    seq = tvm.transform.Sequential([
        s_tir.transform.LowerInitBlock(),
        s_tir.transform.PlanAndUpdateBufferAllocationLocation(),
        s_tir.transform.ConvertBlocksToOpaque(),
        s_tir.transform.CompactBufferAllocation(),
        s_tir.transform.LowerOpaqueBlock(),
        tirx.transform.FlattenBuffer(),
    ])
    found: list[tuple[str, str]] = []

    def record(buf) -> None:
        if str(buf.dtype).startswith(("float", "bfloat")):
            found.append((str(buf.name), "[" + ", ".join(str(d) for d in buf.shape) + "]"))

    def visit(node) -> None:
        if node is None:
            return
        if isinstance(node, tirx.stmt.AllocBuffer):
            record(node.buffer)
        for buf in getattr(node, "alloc_buffers", None) or []:
            record(buf)
        for attr in ("body", "then_case", "else_case", "block", "init"):
            child = getattr(node, attr, None)
            if isinstance(child, (tirx.stmt.Stmt, tvm.s_tir.SBlock, tvm.s_tir.SBlockRealize)):
                visit(child)
        for child in getattr(node, "seq", None) or []:
            visit(child)

    visit(seq(mod)["main"].body)
    return found
