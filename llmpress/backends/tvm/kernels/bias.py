"""The bias epilogue of the CPU linear kernels: ``y = x W^T + b`` with ``b`` added in the kernel's store.

A linear with a bias (Qwen2's q/k/v, GPT-2's every linear, Llama's ``attention_bias``/``mlp_bias``) reaches the
dispatch pass as TVM's frontend and ``wq_linear.py``'s converter write it::

    y = matmul(x, permute_dims(W))   |   y = call_tir(wq_linear, ...);     z = add(y, b)      (b: f32 [N])

a separate broadcast-add kernel: its own launch, another pass over ``y`` and one more output buffer per linear. The
CPU kernels (``fgemm.py``, ``qgemv.py``, ``qgemm.py``, ``qwide.py``) take ``b`` as one more input and store::

    y[m, n] = sum_k x[m, k] W[n, k] + b[n]

(one float32 add per output, after the dot product as in the reference: the same value, the sums themselves are
unchanged). In the K-blocked float GEMM the bias joins the first block's partial sum (``fgemm._kb_sum``).

``match_bias`` finds the pattern (and says why a near miss is not one); ``dispatch.py`` applies it. The kernels
declare ``b`` as a free buffer in their TVMScript (``bias_buffer``) and ``with_bias`` makes it a parameter, just
before the output, so one kernel body serves both forms.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["BiasMatch", "match_bias", "bias_buffer", "plus_bias", "with_bias"]


def bias_buffer(n: int, enabled: bool) -> Any:
    """The ``b f32 [n]`` buffer a kernel's store reads (None when ``enabled`` is false)."""
    if not enabled:
        return None
    from tvm import tirx

    return tirx.decl_buffer((n,), "float32", name="bias")


def plus_bias(v: Any, bias: Any, col: Any) -> Any:
    """``v + bias[col]`` (TIR), or ``v`` without a bias buffer."""
    return v if bias is None else v + bias[col]


def with_bias(func: Any, bias: Any) -> Any:
    """``func`` with ``bias`` (from ``bias_buffer``) as its parameter before the last one (the output); ``func`` as
    it is without one."""
    if bias is None:
        return func
    from tvm import tirx

    return tirx.PrimFunc(list(func.params[:-1]) + [bias, func.params[-1]], func.body, func.ret_type, func.attrs)


@dataclass(frozen=True)
class BiasMatch:
    """``out = add(linear, bias)`` (either operand order): ``linear`` its binding var (read by the add alone),
    ``bias`` a float32 vector of the linear's output width."""

    linear: Any
    bias: Any
    out: Any


def match_bias(func: Any, is_linear) -> tuple[list[BiasMatch], list[tuple[str, str]]]:
    """Every bias add over a linear in Relax function ``func`` and the near misses as ``(var name, why)``: an
    ``add`` reading a linear that is not the exact pattern. ``is_linear(value)`` as in ``epilogue.match_swiglu``."""
    from tvm import relax

    from .epilogue import _op, _uses

    binds = {b.var: b.value for block in func.body.blocks for b in block.bindings}
    uses = _uses(func)
    found, near = [], []
    for var, val in binds.items():
        if not _op(val, "relax.add"):
            continue
        a0, a1 = val.args
        for y, b in ((a0, a1), (a1, a0)):
            if not (isinstance(y, relax.Var) and y in binds and is_linear(binds[y])):
                continue
            shape = getattr(getattr(b, "ty", None), "shape", None)
            if shape is None or len(shape.values) != 1:  # a residual add, not a bias
                continue
            why = _why_not(y, b, uses)
            if why:
                near.append((var.name, why))
            else:
                found.append(BiasMatch(linear=y, bias=b, out=var))
            break
    return found, near


def _why_not(y: Any, b: Any, uses: dict) -> str | None:
    from tvm import relax

    if uses.get(y, 0) != 1:
        return f"{y.name} has other readers"
    ty = getattr(b, "ty", None)
    shape = getattr(ty, "shape", None)
    width = y.ty.shape.values[-1]
    if not isinstance(b, relax.Var) or not isinstance(ty, relax.TensorType):
        return "the bias is not a tensor variable"
    if str(ty.dtype) != "float32" or str(y.ty.dtype) != "float32":
        return f"dtype {ty.dtype} + {y.ty.dtype}, not float32"
    dims = list(shape.values)
    if not hasattr(dims[0], "value") or not hasattr(width, "value") or int(dims[0]) != int(width):
        return f"the bias width {dims[0]} is not the output width {width} (a broadcast)"
    return None
