"""Fused epilogues of the CPU linear kernels: the SwiGLU of a fused ``gate_up`` projection in its output stage.

After ``fuse_gate_up`` a gated MLP computes ``y = x [W_g; W_u]^T`` (``[.., 2I]``), then, as TVM's frontend writes
it::

    g, u = split(y, [I], axis=-1);   h = multiply(silu(g), u)          (h: [.., I], read by the down projection)

a separate elementwise kernel (its own launch, its own pass over ``y``, its own output buffer). Here the linear's
kernel writes ``h`` directly. The weight rows are permuted at compile time (the repack, ``qlayout.repack_te`` /
``fgemm.repack_te``) so that each tile of ``R`` rows holds ``R/2`` gate rows and the ``R/2`` up rows of the *same*
outputs::

    tiled row (t, r)  <-  W row  (r // H) * I + t * H + r % H,      H = R / 2
    h[m, t H + r] = silu(acc[t, r]) * acc[t, r + H]       r < H,    silu(g) = g * sigmoid(g)

so the epilogue needs nothing but the accumulators the tile already holds; the dot products themselves are the same
(same per-row arithmetic, same summation order as the unfused kernel), only their store changes.

``match_swiglu`` finds the pattern (and says why a near miss is not one); ``dispatch.py`` applies it. A kernel
without an epilogue form for its shape (the float32 GEMM when ``K`` spans several cache blocks, ``fgemm.py``) reads
the same permuted weights and its output is put back in order (``unpermute``) before the unchanged
split/silu/multiply.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["SWIGLU", "SwigluMatch", "match_swiglu", "source_row", "silu_mul", "unpermute", "swiglu_tiles",
           "swiglu_flush"]

SWIGLU = "swiglu"


def source_row(t: Any, r: Any, rows: int, inter: int) -> Any:
    """The row of the fused ``[2 inter, K]`` weight that row ``r`` of tile ``t`` holds in the SwiGLU layout."""
    half = rows // 2
    return (r // half) * inter + t * half + r % half


def silu_mul(g: Any, u: Any) -> Any:
    """``silu(g) * u = g u / (1 + exp(-g))`` (TIR float32 scalar or vector expressions).

    ``exp`` is ``attention.fast_exp`` (range reduction + degree-7 polynomial, inline arithmetic), not
    ``tirx.sigmoid``: LLVM lowers that to a call of libm's scalar ``expf`` through the PLT (``callq expf@PLT``,
    two per tile in the GEMV's parallel loop). Measured at kernel level (GEMV + VM call, weights cycled cold, 2
    threads, medians of 15 interleaved rounds, bench lock, load 1.7): w4a8 110M gate/up 52.5 -> 49.3 us (plain GEMV
    + separate silu kernel: 71.8), 1.1B 451.2 -> 424.6 us (separate: 442.1); int4 with float activations
    (``gemv_float``) 110M 97.6 -> 96.2 (separate 90.5), 1.1B 656.5 -> 664.8 (separate 641.0). Polynomial vs
    ``expf``: within a few float32 ulps; at ``g < -88.4`` the clamp gives ``g * 6e-39 * u`` instead of
    ``g * exp(g) * u``, both ~0."""
    from tvm import tirx

    from .attention import fast_exp

    one = tirx.const(1.0, "float32")
    lanes = int(g.ty.dtype.lanes)
    if lanes > 1:
        one = tirx.Broadcast(one, lanes)
    return g * u / (one + fast_exp(-g))


#: SwiGLU outputs a GEMV computes together: ``silu_mul`` of 16 float32 lanes (two AVX2 registers)
SWIGLU_LANES = 16


def swiglu_tiles(tiles: int, per_tile: int, swiglu: bool) -> int:
    """How many tiles of ``per_tile`` SwiGLU outputs a decode GEMV runs in one step of its parallel loop (``C``), so
    that their ``C * per_tile`` gate and up sums, staged in a stack buffer, go through one vector ``silu_mul``
    (``swiglu_flush``) instead of one scalar ``exp`` and division each; 1 without ``swiglu``. A power of two
    dividing ``tiles``. Scalar per output, the epilogue cost a decode step more than the separate SwiGLU kernel
    it replaces when ``K`` is small (tinystories-llama, K = 256: two dozen float operations per output against
    a dot product of 256 codes)."""
    if not swiglu:
        return 1
    c = max(1, SWIGLU_LANES // per_tile)
    while tiles % c:
        c //= 2
    return c


def swiglu_flush() -> Any:
    """TIR macro ``flush(y, m, tc, gu, n)``: ``y[m, tc n : (tc + 1) n] = silu_mul(gu[0, :n], gu[1, :n])`` in one
    ``float32 x n`` vector expression (``gu``: the staged gate and up sums of one step of ``swiglu_tiles``)."""
    from tvm.script import tirx as T

    @T.macro
    def flush(y, m, tc, gu, n):
        y[m, T.ramp(tc * n, 1, n)] = silu_mul(gu[0, T.ramp(0, 1, n)], gu[1, T.ramp(0, 1, n)])

    return flush


@dataclass(frozen=True)
class SwigluMatch:
    """A ``multiply(silu(split(y)[0]), split(y)[1])`` over the output ``y`` of a linear (``linear``: its binding
    var). ``inner``: the bindings the fused kernel replaces (split, both halves, silu); ``out``: the multiply's var."""

    linear: Any
    inter: int
    inner: tuple
    out: Any


def _op(value: Any, name: str) -> bool:
    import tvm
    from tvm import relax

    return isinstance(value, relax.Call) and isinstance(value.op, tvm.ir.Op) and value.op.name == name


def _uses(func: Any) -> dict:
    """How many times each var is read in ``func`` (bindings and the function's result)."""
    from tvm import relax

    counts: dict = {}

    def visit(e):
        if isinstance(e, relax.Var):
            counts[e] = counts.get(e, 0) + 1

    relax.analysis.post_order_visit(func.body, visit)
    return counts


def match_swiglu(func: Any, is_linear) -> tuple[list[SwigluMatch], list[tuple[str, str]]]:
    """Every SwiGLU over a linear in Relax function ``func``, and the near misses as ``(var name, why)``: a
    ``multiply`` of an activation of one half of a split with the other half that is not the exact pattern.

    ``is_linear(value)`` says whether a bound value is a linear the dispatch pass can fuse (a ``wq_linear`` kernel
    call or ``matmul(x, permute_dims(W))``); the pattern is ``multiply(silu(g), u)`` in either operand order,
    ``g, u = split(y, [I], axis=-1)`` (or two sections) and ``y`` nothing else reads."""
    from tvm import relax

    binds = {b.var: b.value for block in func.body.blocks for b in block.bindings}
    uses = _uses(func)
    found, near = [], []
    for var, val in binds.items():
        if not _op(val, "relax.multiply"):
            continue
        a, b = val.args
        for act, other in ((a, b), (b, a)):
            av = binds.get(act)
            if not (_op(av, "relax.nn.silu") or _op(av, "relax.nn.gelu") or _op(av, "relax.nn.gelu_tanh")):
                continue
            g, u = av.args[0], other
            gv, uv = binds.get(g), binds.get(u)
            if not (isinstance(gv, relax.TupleGetItem) and isinstance(uv, relax.TupleGetItem)
                    and gv.tuple_value.same_as(uv.tuple_value)):
                continue
            split = gv.tuple_value
            sv = binds.get(split)
            if not _op(sv, "relax.split"):
                continue
            why = _why_not(av, gv, uv, sv, binds, uses, act, g, u, split, is_linear)
            if why:
                near.append((var.name, why))
            else:
                y = sv.args[0]
                inter = int(y.ty.shape.values[-1]) // 2
                found.append(SwigluMatch(linear=y, inter=inter, inner=(split, g, u, act), out=var))
            break
    return found, near


def _why_not(av, gv, uv, sv, binds, uses, act, g, u, split, is_linear) -> str | None:
    if not _op(av, "relax.nn.silu"):
        return f"activation {av.op.name} is not silu"
    if int(gv.index) != 0 or int(uv.index) != 1:
        return "silu reads the second half of the split, not the first"
    y = sv.args[0]
    ndim = len(y.ty.shape.values)
    axis = int(sv.attrs.axis)
    if axis not in (-1, ndim - 1):
        return f"split on axis {axis}, not the last"
    width = y.ty.shape.values[-1]
    if not hasattr(width, "value") or int(width) % 2:
        return "the split dimension is not a static even width"
    sections = sv.attrs.indices_or_sections
    halves = (int(sections) == 2) if isinstance(sections, (int,)) or hasattr(sections, "value") else (
        len(sections) == 1 and int(sections[0]) * 2 == int(width))
    if not halves:
        return f"split {sections} is not two equal halves of {int(width)}"
    for v, n in ((y, 1), (split, 2), (g, 1), (u, 1), (act, 1)):
        if uses.get(v, 0) != n:
            return f"{v.name} has other readers"
    if y not in binds or not is_linear(binds[y]):
        return "the split input is not a linear the CPU kernels fuse"
    if (int(width) // 2) % 2:
        return f"the intermediate width {int(width) // 2} is odd"
    return None


def unpermute(bb: Any, y: Any, lead: list, inter: int, rows: int) -> Any:
    """``y [M, 2 inter]`` in the SwiGLU row order (``source_row``) back in the weight's row order, ``[*lead, 2I]``:
    position ``t R + s H + r`` holds row ``s I + t H + r``."""
    from tvm import relax

    half = rows // 2
    m = y.ty.shape.values[0]
    y4 = bb.emit(relax.op.reshape(y, relax.ShapeExpr([m, inter // half, 2, half])))
    yt = bb.emit(relax.op.permute_dims(y4, [0, 2, 1, 3]))
    return relax.op.reshape(yt, relax.ShapeExpr([*lead, 2 * inter]))
