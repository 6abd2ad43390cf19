"""Build: Relax module -> VM executable -> ``model.so`` for a target.

Pipelines (phases as in TVM's ``relax/backend/<target>/pipeline.py``: dispatch, legalize, schedule, lower,
finalize):

Weight-only work (the transposes of linear weights, the repacks of quantized ones) is lifted out and computed at
compile time before this (``params.prepare``): the library takes the transformed weights.

- ``llvm`` (x86-64 / aarch64 CPUs): legalize every Relax op into TIR, fuse, then our CPU schedule rules
  (``schedules.cpu_rules``: parallel + vectorised matmul / GEMV / reductions; a function no rule claims keeps TVM's
  default loop nest), then the standard lowering and memory planning;
- ``cuda``: TVM's CUDA pipeline (legalize, fuse, dlight default GPU schedules: matmul, GEMV, reductions, fallback),
  which needs no GPU to run.

CUDA device code: TVM 0.27 stores CUDA C source in the library and compiles it when the library is loaded (via
the ``tvm_callback_cuda_compile`` hook: NVRTC or nvcc on the GPU machine). We compile that source here, at build
time, with ``nvcc`` into PTX for the requested arch (``.target sm_80``), and the artifact ships it
(``model.ptx``); the loader answers the compile hook with it, so the device needs only the CUDA driver. Without
``nvcc`` on the build machine the artifact falls back to compile-at-load.
"""
from __future__ import annotations

import hashlib
import logging
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from ...errors import LlmpressError
from .targets import TargetSpec

__all__ = ["build", "cpu_pipeline", "export_library", "cuda_sources", "compile_ptx", "compile_fatbin", "source_key",
           "BuildError", "TRANSFORM_PARAMS"]

log = logging.getLogger(__name__)


class BuildError(LlmpressError):
    """TVM or the C/CUDA toolchain failed to build the program; the message names the step."""


#: The function ``LiftTransformParams`` creates: weights -> the layouts the kernels read. Libraries built now never
#: contain it (``params.prepare`` runs it at compile time); the runtimes still call it when an older one does.
TRANSFORM_PARAMS = "transform_params"


def take_clip():
    """Relax module pass: ``relax.take`` (embedding lookups, gathers) in ``"fast"`` mode -> ``"clip"``.

    TOPI's ``take`` logs "Fast mode segfaults when there are out-of-bounds indices" from C++ for every ``"fast"``
    take it lowers (six lines per CPU compile, even with ``-q``): the importer leaves every take in that mode.
    ``"clip"`` clamps each index into range: the same values for every valid index, one min/max per gathered row
    instead of reading out of bounds for a bad token id, and nothing printed."""
    import tvm
    from tvm import relax

    @relax.expr_functor.mutator
    class _Clip(relax.PyExprMutator):
        def visit_call_(self, call):  # noqa: D102 - mutator protocol
            call = self.visit_expr_post_order(call)
            if isinstance(call.op, tvm.ir.Op) and call.op.name == "relax.take" and call.attrs.mode == "fast":
                return relax.op.take(call.args[0], call.args[1], axis=call.attrs.axis, mode="clip")
            return call

    @tvm.transform.module_pass(opt_level=0, name="llmpress.TakeClip")
    def _pass(mod, _ctx):
        m = _Clip(mod)
        for gv, func in mod.functions_items():
            if isinstance(func, relax.Function):
                m.builder_.update_func(gv, m.visit_expr(func))
        return m.builder_.get()

    return _pass


def drop_unused_tuples():
    """Relax module pass, after ``CallTIRRewrite``: a kernel with several outputs is called on preallocated
    tensors and its result bound to ``(out0, out1, ..)``; every ``TupleGetItem`` of such a tuple becomes the output
    itself and a tuple nothing reads any more is dropped. Without this the VM builds each one
    (``vm.builtin.make_tuple``) and nothing reads it: 61 calls per decode step of the 110M w4a8 model (every
    ``act_quant``, ``split``, residual add + RMSNorm), 5% of its VM calls."""
    import tvm
    from tvm import relax

    @relax.expr_functor.mutator
    class _Drop(relax.PyExprMutator):
        def __init__(self, mod, tuples, unused):
            super().__init__(mod)
            self.tuples, self.unused = tuples, unused

        def visit_tuple_getitem_(self, op):  # noqa: D102 - mutator protocol
            tup = op.tuple_value
            if isinstance(tup, relax.Var) and tup in self.tuples:
                return self.visit_expr(self.tuples[tup].fields[int(op.index)])
            return super().visit_tuple_getitem_(op)

        def visit_var_binding_(self, binding):  # noqa: D102 - mutator protocol
            if binding.var in self.unused:
                return None
            return super().visit_var_binding_(binding)

    def tuples_of(func):
        return {b.var: b.value for block in func.body.blocks for b in block.bindings
                if isinstance(b.value, relax.Tuple) and not isinstance(block, relax.DataflowBlock)}

    def reads(func, tuples):
        """How often each tuple var is read other than through a ``TupleGetItem`` (which is rewritten)."""
        counts: dict = {}

        def visit(e):
            if isinstance(e, relax.TupleGetItem) and isinstance(e.tuple_value, relax.Var):
                counts[e.tuple_value] = counts.get(e.tuple_value, 0) - 1  # its own visit of the var follows
            elif isinstance(e, relax.Var) and e in tuples:
                counts[e] = counts.get(e, 0) + 1

        relax.analysis.post_order_visit(func.body, visit)
        return counts

    @tvm.transform.module_pass(opt_level=0, name="llmpress.DropUnusedTuples")
    def _pass(mod, _ctx):
        updates = {}
        for gv, func in mod.functions_items():
            if not isinstance(func, relax.Function):
                continue
            tuples = tuples_of(func)
            if not tuples:
                continue
            counts = reads(func, tuples)
            unused = {v for v in tuples if counts.get(v, 0) <= 0}
            m = _Drop(mod, tuples, unused)
            updates[gv] = m.visit_expr(func)
        for gv, func in updates.items():
            mod[gv] = func
        return mod

    return _pass


def cpu_pipeline(target: Any):
    """The Relax pipeline for an LLVM CPU target: legalize every op into TIR, fuse, schedule with our CPU rules
    (``schedules.cpu_rules``; a function no rule claims keeps TVM's default loop nest), lower."""
    import tvm
    from tvm.relax.backend.cpu_generic import pipeline as cpu

    from .schedules import cpu_rules

    @tvm.transform.module_pass(opt_level=0, name="llmpress_cpu_pipeline")
    def _cpu(mod, _ctx):
        with target:
            passes = [take_clip()] + cpu.library_dispatch_passes(target) + cpu.legalize_passes(target)
            rules = cpu_rules(target)
            if rules:
                from tvm.s_tir import dlight as dl

                passes.append(dl.ApplyDefaultSchedule(*rules))
            passes += cpu.dataflow_lower_passes(target) + [drop_unused_tuples()] + cpu.finalize_passes(target)
            return tvm.transform.Sequential(passes)(mod)

    return _cpu


def _pipeline(spec: TargetSpec, target: Any):
    import tvm

    # Weight-only work (transposes, repacks) was lifted out and computed at compile time (params.prepare).
    if spec.device == "cuda":
        from tvm import relax

        return tvm.transform.Sequential([take_clip(), relax.get_default_pipeline(target)])
    return cpu_pipeline(target)


def build(mod: Any, spec: TargetSpec) -> Any:
    """``tvm.compile`` the Relax module for ``spec``; returns the ``VMExecutable``."""
    import tvm

    target = spec.tvm_target()
    try:
        return tvm.compile(mod, target, relax_pipeline=_pipeline(spec, target))
    except Exception as e:  # noqa: BLE001 - TVM raises many types; re-raise with the target named
        raise BuildError(f"TVM failed to build for target {spec.name!r}: {type(e).__name__}: {e}") from e


def export_library(executable: Any, path: Path, spec: TargetSpec) -> None:
    """Write the executable as a shared library, linked with the target's compiler (cross for arm64)."""
    why = spec.cross_compiler_missing()
    if why:
        raise BuildError(why)
    kwargs = {"cc": spec.cc} if spec.cc else {}
    try:
        executable.export_library(str(path), **kwargs)
    except Exception as e:  # noqa: BLE001
        raise BuildError(f"export_library({path}) failed for target {spec.name!r}: {type(e).__name__}: {e}") from e


def cuda_sources(executable: Any) -> list[str]:
    """CUDA C source of every CUDA module imported by the executable's library."""
    out: list[str] = []

    def walk(m):
        if m.kind == "cuda":
            out.append(str(m.inspect_source("")))
        for c in m.imports:
            walk(c)

    walk(executable.mod)
    return out


def source_key(source: str) -> str:
    return hashlib.sha256(source.encode()).hexdigest()


def compile_ptx(source: str, arch: str) -> bytes:
    """Compile CUDA C ``source`` to PTX for ``arch`` (``sm_80``) with nvcc (no GPU needed)."""
    return _nvcc(source, ["--ptx", f"-arch={arch}"], "ptx", arch)


def compile_fatbin(source: str, arch: str) -> bytes:
    """Compile CUDA C ``source`` to a fatbin holding SASS for ``arch`` and its PTX (so later GPUs JIT it): the
    format TVM's own nvcc path hands to the CUDA runtime."""
    num = arch.split("_", 1)[1]
    return _nvcc(source, ["--fatbin", f"-gencode=arch=compute_{num},code=[sm_{num},compute_{num}]"], "fatbin", arch)


def _nvcc(source: str, flags: list[str], ext: str, arch: str) -> bytes:
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        raise BuildError("nvcc is not on PATH: cannot precompile CUDA device code")
    with tempfile.TemporaryDirectory(prefix="llmpress-nvcc-") as tmp:
        src, out = Path(tmp) / "kernels.cu", Path(tmp) / f"kernels.{ext}"
        src.write_text(source)
        cmd = [nvcc, *flags, "-O3", "-std=c++17", "-o", str(out), str(src)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            # nvcc prints a warning per unused TVM temporary; its errors would drown in them: errors first.
            lines = proc.stderr.strip().splitlines()
            errors = "\n".join(ln for ln in lines if ": error" in ln or "errors detected" in ln)
            raise BuildError(f"nvcc failed for {arch} (exit {proc.returncode}): {errors[-2000:] or lines[-1:]}"
                             f"\n{proc.stderr.strip()[-1000:]}")
        return out.read_bytes()
