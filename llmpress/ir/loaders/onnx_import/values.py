"""Values flowing through an imported ONNX graph, and what every op converter shares (conversions, the table type).

A value is either a ``torch.Tensor`` (computed from graph inputs or float weights) or a *static* value: a numpy
array of plain ints/bools or of torch ``SymInt``s (object dtype), computed only from integer constants and
``Shape``. Keeping shape arithmetic static lets a symbolic input dimension flow into ``Reshape``/``Expand``/``Range``
so the captured graph keeps that dimension dynamic instead of baking in the example size.
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch

from ....errors import UnsupportedOpError

__all__ = ["Converter", "registrar", "STATIC_MAX", "DTYPES", "NP_INT", "is_static", "as_static", "as_tensor",
           "static_ints", "shape_of", "norm_axis", "attr_or_input", "np_to_onnx"]

STATIC_MAX = 4096  # integer constants up to this many elements stay static (shapes, axes, indices)

DTYPES = {1: torch.float32, 2: torch.uint8, 3: torch.int8, 5: torch.int16, 6: torch.int32, 7: torch.int64,
          9: torch.bool, 10: torch.float16, 11: torch.float64, 16: torch.bfloat16}
NP_INT = {2: np.uint8, 3: np.int8, 5: np.int16, 6: np.int32, 7: np.int64, 9: np.bool_}


# A converter: fn(inputs, attrs, opset) -> list of outputs. Inputs are values (above) or None for an omitted
# optional input; attrs hold the node's attributes plus "_n_outputs".
Converter = Callable[[list, dict, int], list]


def registrar(table: dict[str, Converter]) -> Callable[..., Callable[[Converter], Converter]]:
    """A decorator factory: ``@op("A", "B")`` puts the decorated converter into ``table`` under each op type."""
    def op(*names: str) -> Callable[[Converter], Converter]:
        def deco(fn: Converter) -> Converter:
            for n in names:
                table[n] = fn
            return fn
        return deco
    return op


def is_static(v: Any) -> bool:
    return isinstance(v, np.ndarray)


def as_static(v: Any) -> np.ndarray:
    """Numpy turns 0-d results into scalars (a SymInt, a bool): make every static value an array again."""
    if isinstance(v, np.ndarray):
        if v.dtype == object and not any(isinstance(x, (torch.SymInt, torch.SymBool)) for x in v.reshape(-1)):
            flat = v.reshape(-1)
            if all(isinstance(x, (bool, np.bool_)) for x in flat):
                return v.astype(np.bool_)
            return v.astype(np.int64) if all(isinstance(x, (int, np.integer)) for x in flat) else v
        return v
    if isinstance(v, (torch.SymInt, torch.SymBool)):
        a = np.empty((), dtype=object)
        a[()] = v
        return a
    return np.asarray(v)


def as_tensor(v: Any) -> torch.Tensor:
    if isinstance(v, torch.Tensor):
        return v
    if v.dtype == object:  # holds SymInts: torch.tensor traces them as scalar_tensor + stack
        return torch.tensor(v.tolist(), dtype=torch.int64)
    return torch.from_numpy(np.array(v))  # a copy: static arrays may be read-only views of the model proto


def static_ints(v: Any, what: str) -> list:
    """A shape/axes operand as a Python list of ints (or SymInts)."""
    if v is None:
        return []
    if is_static(v):
        return [x if isinstance(x, torch.SymInt) else int(x) for x in np.asarray(v).reshape(-1).tolist()]
    raise UnsupportedOpError(f"{what} must be computable from constants and shapes, but depends on tensor data",
                             op=what)


def shape_of(x: torch.Tensor) -> np.ndarray:
    dims = list(x.shape)
    if any(isinstance(d, torch.SymInt) for d in dims):
        arr = np.empty(len(dims), dtype=object)
        arr[:] = dims
        return arr
    return np.asarray(dims, dtype=np.int64)


def norm_axis(a: int, rank: int) -> int:
    return a + rank if a < 0 else a


def attr_or_input(node_attrs: dict, ins: list, key: str, index: int) -> list | None:
    if key in node_attrs:
        return list(node_attrs[key])
    if len(ins) > index and ins[index] is not None:
        return static_ints(ins[index], key)
    return None


def np_to_onnx(dt: np.dtype) -> int:
    from onnx import helper

    return helper.np_dtype_to_tensor_dtype(np.dtype(dt))
