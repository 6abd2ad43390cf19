"""Text forms of FX nodes for ``Module.print`` and ``Module.op_histogram``: op names, types, arguments."""
from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

__all__ = ["op_name", "type_str", "arg_str"]


def op_name(target: Any) -> str:
    if isinstance(target, torch._ops.OpOverload):
        return f"{target.namespace}.{target._opname}.{target._overloadname}"
    return getattr(target, "__name__", str(target))


def type_str(v: Any) -> str:
    if isinstance(v, torch.Tensor):
        dims = ",".join(str(d) for d in v.shape)
        return f"{str(v.dtype).replace('torch.', '')}[{dims}]"
    if isinstance(v, (list, tuple)):
        return "(" + ", ".join(type_str(x) for x in v) + ")"
    return type(v).__name__ if v is not None else "?"


def arg_str(a: Any) -> str:
    if isinstance(a, fx.Node):
        return f"%{a.name}"
    if isinstance(a, (list, tuple)):
        return "[" + ", ".join(arg_str(x) for x in a) + "]"
    return repr(a)
