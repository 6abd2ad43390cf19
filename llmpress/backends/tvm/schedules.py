"""CPU schedule rules applied after legalization and fusion (dlight style: ordered, most specific first; a rule that
does not apply returns None and the next one is tried; a function no rule claims keeps TVM's default loop nest).

``Matmul``: ``C[*b, i, j] = sum_k A[*b, i, k] * B[*b, k, j]`` with ``B`` contiguous in ``j`` (after
``LiftTransformParams`` every linear reads ``W^T[in, out]``, and the attention matmuls read materialised
transposes). Register-blocked outer-product kernel: for a tile of ``it = 6`` rows and ``jt = 2 * lanes`` columns
the ``it x jt`` accumulators live in registers (``cache_write`` to ``local``) while ``k`` runs; each ``k`` step
broadcasts ``it`` values of ``A`` and loads ``jt`` contiguous values of ``B``: ``it * jt`` multiply-adds. Column
tiles are outside row tiles, so a ``K x jt`` panel of ``B`` stays in L2 while all rows use it; the outer loops are
fused and run in parallel. A dynamic row count (prefill) is padded to a multiple of ``it`` (``pad_einsum``)
rather than guarded per row inside the ``k`` loop. When there is one row (decode) it is a GEMV with wide column
tiles (up to 256), so each ``k`` step streams a long contiguous run of a ``W^T`` row.

``Elementwise``: chains of spatial blocks are inlined into one pass (expand -> broadcast -> reshape of the GQA
keys); every remaining purely spatial block gets its outer loops fused and parallelised (when it is large or of
dynamic size: ``PARALLEL_MIN_ELEMS``) and its innermost loop
vectorised, except transposing copies (a read whose innermost index ignores the innermost loop), which are tiled
8-wide instead so their source lines stay in L1 (vector lanes there would be gathers). Softmax / RMSNorm style reductions use dlight's CPU ``Reduction`` rule, guarded
(``Reduction``) against a one-row case it mis-schedules.
"""
from __future__ import annotations

import logging
from typing import Any

__all__ = ["cpu_rules"]  # the rule classes are built on first use, so importing this needs no TVM

log = logging.getLogger(__name__)


def _lanes(target: Any, bits: int = 32) -> int:
    """SIMD lanes for ``bits``-bit values: 512-bit with AVX-512, 256-bit with AVX/AVX2, else 128-bit (SSE, NEON).

    (``llvm_get_vector_width`` reports 512 for ``x86-64-v3`` in TVM 0.27, so the width is read from the features.)
    """
    from tvm.target.codegen import llvm_get_cpu_features

    try:
        feats = llvm_get_cpu_features(target)
    except Exception:  # noqa: BLE001 - unknown CPU: assume 128-bit SIMD
        feats = set()
    width = 512 if "avx512f" in feats else 256 if "avx" in feats else 128
    return width // bits


#: Spatial blocks with fewer (static) elements run on the calling thread: waking the pool for a decode step's
#: 768-element add or SiLU costs more than the add (dynamic extents, as in prefill, stay parallel).
PARALLEL_MIN_ELEMS = 1 << 15


def _prod(xs: list[int]) -> int:
    out = 1
    for x in xs:
        out *= x
    return out


def _static(extent: Any) -> int | None:
    return extent if isinstance(extent, int) else None


def _make_rules():
    from tvm import s_tir, tirx
    from tvm.s_tir.dlight.analysis import normalize_prim_func
    from tvm.s_tir.dlight.base import ScheduleRule, try_inline
    from tvm.s_tir.dlight.base.utils import get_extent

    def strided_read(sch, block) -> bool:
        """Whether some read's innermost index is not the block's innermost iterator (a transposing copy: vector
        lanes would become a gather, slower on x86 than scalar loads)."""
        stmt = sch.get(block)
        if not stmt.iter_vars:
            return False
        from tvm.tirx.analysis import undefined_vars

        last = stmt.iter_vars[-1].var
        for r in stmt.reads:
            if not len(r.region):
                continue
            used = undefined_vars(r.region[-1].min)
            if used and not any(v.same_as(last) for v in used):
                return True
        return False

    def vectorize_inner(sch, block, lanes: int, *, parallel: bool) -> None:
        loops = sch.get_loops(block)
        if not loops:
            return
        extents = [_static(get_extent(sch, lp)) for lp in loops]
        if None not in extents and _prod(extents) < PARALLEL_MIN_ELEMS:
            parallel = False  # a decode step's [1, hidden] op: the pool's fork/join costs more than the work
        inner = loops[-1]
        n = _static(get_extent(sch, inner))
        outer = list(loops[:-1])
        if n is not None and len(loops) >= 2 and n % 8 == 0 and n > 8 and strided_read(sch, block):
            # transposing copy: 8-wide tiles of the output's inner axis with the second-innermost axis inside,
            # so the 8 source lines a tile reads stay in L1 while that axis walks along them
            o, i = sch.split(inner, factors=[None, 8])
            sch.reorder(o, loops[-2], i)
            outer = list(loops[:-2]) + [o]
            if parallel and outer:
                sch.parallel(sch.fuse(*outer) if len(outer) > 1 else outer[0])
            return
        if n is not None and n >= 2 and not strided_read(sch, block):
            if n > lanes and n % lanes == 0:
                o, v = sch.split(inner, factors=[None, lanes])
                outer.append(o)
                sch.vectorize(v)
            elif n <= lanes:
                sch.vectorize(inner)
        if parallel and outer:
            sch.parallel(sch.fuse(*outer) if len(outer) > 1 else outer[0])

    class Matmul(ScheduleRule):
        """Register-blocked matmul / GEMV for ``B`` contiguous in the output column (see the module docstring)."""

        def apply(self, func, target, _tunable):
            if not isinstance(func, tirx.PrimFunc) or target.kind.name != "llvm":
                return None
            try:
                return self._apply(func, target)
            except Exception as e:  # noqa: BLE001 - "not applicable": keep the default loop nest
                log.debug("Matmul rule not applied: %s", e)
                return None

        def _apply(self, func, target):
            sch = s_tir.Schedule(func)
            infos = normalize_prim_func(sch)
            if infos is None:
                return None
            reductions = [b for b in infos if not b.is_injective()]
            if len(reductions) != 1:
                return None
            main = reductions[0]
            kinds = main.dom_kind()
            if len(kinds) < 2 or kinds[-1] != "R" or set(kinds[:-1]) != {"S"}:
                return None
            block = main.block_rv
            stmt = sch.get(block)
            if len(stmt.reads) != 2 or len(stmt.writes) != 1:
                return None
            j_var, k_var = stmt.iter_vars[-2].var, stmt.iter_vars[-1].var

            def last(region):
                return region.region[-1].min

            # B: the read whose innermost index is j (contiguous columns); A: the one whose innermost index is k
            if not any(last(r).same_as(j_var) for r in stmt.reads):
                return None
            if not any(last(r).same_as(k_var) for r in stmt.reads):
                return None
            if stmt.writes[0].source.dtype != "float32":
                return None
            lanes = _lanes(target)
            loops = sch.get_loops(block)
            if len(loops) == 2:  # unit row loops were normalised away: a GEMV
                (j, k), batch, i = loops, [], None
            else:
                *batch, i, j, k = loops
            n = _static(get_extent(sch, j))
            if n is None:
                return None
            jt = 2 * lanes if n % (2 * lanes) == 0 else lanes
            m = 1 if i is None else _static(get_extent(sch, i))
            vec = jt  # the vectorised inner width
            if m == 1:
                # GEMV (decode): wide column tiles, so each k step reads a long contiguous run of a W^T row
                # (hardware prefetch, few pages per byte); the accumulators then live in L1, not registers.
                jt = next((t for t in (256, 128, 64) if n % t == 0 and t >= vec), vec)
            it = 1 if m == 1 else 6  # 6 x 2 vectors = 12 accumulators of the 16 AVX2 registers
            pad_rows = it > 1 and m is None
            if pad_rows or n % jt:
                # pad a dynamic row count to the row tile, and odd column counts (hidden 172) to the vector
                # width (A/B/C get padded copies): no tail predicate inside the k loop
                rows = [it if pad_rows else 1] if i is not None else []
                sch.pad_einsum(block, [1] * len(batch) + rows + [jt if n % jt else 1, 1])
                loops = sch.get_loops(block)
                if i is None:
                    j, k = loops
                else:
                    *batch, i, j, k = loops
            acc = sch.cache_write(block, 0, "local")
            jo, ji = sch.split(j, factors=[None, jt])
            if it > 1:
                io, ii = sch.split(i, factors=[None, it])
                # column tile outside the row tile: a K x jt panel of B stays in L2 while every row tile uses it
                sch.reorder(*batch, jo, io, k, ii, ji)
                first, second = jo, io
            else:
                ii = None
                jm, ji = sch.split(ji, factors=[None, vec])
                sch.reorder(*batch, *([i] if i is not None else []), jo, k, jm, ji)
                first, second = i, jo
            outer_loops = [lp for lp in (*batch, first, second) if lp is not None]
            outer = sch.fuse(*outer_loops) if len(outer_loops) > 1 else outer_loops[0]
            sch.parallel(outer)
            sch.reverse_compute_at(acc, outer, preserve_unit_loops=True)
            # vectorise while the block still has its init (a "local reduction block"); then split off the init
            sch.vectorize(ji)
            if ii is not None:
                sch.unroll(ii)
            init = sch.decompose_reduction(block, k)
            for b in (init, acc):  # zeroing and writing back the accumulators: one vector per row
                bl = sch.get_loops(b)
                n_inner = _static(get_extent(sch, bl[-1])) if len(bl) > 1 else None
                if n_inner is not None and n_inner % vec == 0:
                    if n_inner > vec:
                        sch.vectorize(sch.split(bl[-1], factors=[None, vec])[1])
                    else:
                        sch.vectorize(bl[-1])
            # the fused epilogue (SiLU, residual add, ...) and any other spatial block
            for b in infos:
                if b is not main and b.is_injective():
                    vectorize_inner(sch, b.block_rv, lanes, parallel=True)
            return sch

    class Elementwise(ScheduleRule):
        """Parallel outer loops + vectorised inner loop for functions made only of spatial blocks."""

        def apply(self, func, target, _tunable):
            if not isinstance(func, tirx.PrimFunc) or target.kind.name != "llvm":
                return None
            try:
                sch = s_tir.Schedule(func)
                infos = normalize_prim_func(sch)
                if not infos or not all(b.is_injective() for b in infos):
                    return None
                infos = try_inline(sch, infos)  # expand_dims -> broadcast -> reshape chains: one pass, not three
                lanes = _lanes(target)
                for b in infos:
                    vectorize_inner(sch, b.block_rv, lanes, parallel=True)
                return sch
            except Exception as e:  # noqa: BLE001 - "not applicable"
                log.debug("Elementwise rule not applied: %s", e)
                return None

    class Reduction(ScheduleRule):
        """dlight's CPU ``Reduction`` (softmax, RMSNorm: parallel rows, vectorised elementwise parts), applied only
        when every block shares the same leading spatial (row) extents.

        In TVM 0.27 that rule mis-schedules a one-row norm (decode): the reduction block's row axis has extent 1
        while the last block's leading axis is the 768 features, and it recomputes the whole reduction once per
        feature (768x the work; 2 ms per RMSNorm at hidden 768). Such functions keep their plain loop nest.
        """

        def __init__(self):
            from tvm.s_tir import dlight as dl

            self._inner = dl.cpu.Reduction()

        def apply(self, func, target, tunable):
            if not isinstance(func, tirx.PrimFunc) or target.kind.name != "llvm":
                return None
            try:
                infos = normalize_prim_func(s_tir.Schedule(func))
                if not infos:
                    return None
                leads = []
                for b in infos:
                    kinds = b.dom_kind()
                    n = len(kinds) - len(kinds.lstrip("S"))
                    leads.append([str(d) for d in b.dom()[:n]])
                n = min(len(x) for x in leads)
                if n == 0 or any(x[:n] != leads[-1][:n] for x in leads):
                    return None
                return self._inner.apply(func, target, tunable)
            except Exception as e:  # noqa: BLE001 - "not applicable"
                log.debug("Reduction rule not applied: %s", e)
                return None

    return Matmul, Elementwise, Reduction


_RULES: tuple | None = None


def cpu_rules(target: Any) -> list:
    """The schedule rules for an LLVM CPU target, most specific first."""
    global _RULES
    if _RULES is None:
        _RULES = _make_rules()
    matmul, elementwise, reduction = _RULES

    from .kernels import kernel_rule  # llmpress compressed-op kernels (fused dequant-matmul, w8a8, kv quant) first

    return [kernel_rule(), matmul(), reduction(), elementwise()]


def __getattr__(name: str):  # Matmul / Elementwise are built lazily (they subclass TVM classes)
    names = ("Matmul", "Elementwise", "Reduction")
    if name in names:
        global _RULES
        if _RULES is None:
            _RULES = _make_rules()
        return _RULES[names.index(name)]
    raise AttributeError(name)
