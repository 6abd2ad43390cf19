"""Sizes: bytes of the weights a module stores, total and per layer."""
from __future__ import annotations

from ..ir.module import Module

__all__ = ["parameter_bytes", "weight_bytes_by_name"]


def weight_bytes_by_name(module: Module) -> dict[str, int]:
    """Bytes of every stored weight (parameters, buffers, constants), by state-dict name. Tied weights count once."""
    seen: set = set()
    out: dict[str, int] = {}
    for name, t in module.stored_weights().items():  # no weight is read: sizes come from shapes and dtypes
        src = module.lazy_source(name)
        key = ("lazy", id(src)) if src is not None else t.untyped_storage().data_ptr() if t.numel() else id(t)
        if key in seen:
            continue
        seen.add(key)
        out[name] = t.numel() * t.element_size()
    return out


def parameter_bytes(module: Module) -> int:
    """Total bytes of stored weights: what a compressed artifact must ship."""
    return sum(weight_bytes_by_name(module).values())
