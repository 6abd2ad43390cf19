"""Backends: ``reference`` (PyTorch, the oracle), ``tvm`` (x86/ARM/CUDA code), ``onnx`` (export).

Dispatch is a dict of backend objects; each backend imports its heavy dependencies lazily.
"""
from __future__ import annotations

from typing import Any

from ..errors import ConfigError
from .base import Backend, Compiled, Unsupported

__all__ = ["Backend", "Compiled", "Unsupported", "get_backend", "backend_for_target", "BACKENDS"]


def BACKENDS() -> dict[str, Backend]:  # noqa: N802
    from .reference import ReferenceBackend

    from .onnx.backend import OnnxBackend

    out: dict[str, Backend] = {"reference": ReferenceBackend(), "onnx": OnnxBackend()}
    try:
        from .tvm import TVMBackend
    except ImportError:  # the TVM backend module is optional at import time; its absence is reported on use
        pass
    else:
        out["tvm"] = TVMBackend()
    return out


def get_backend(name: str) -> Backend:
    b = BACKENDS()
    if name not in b:
        raise ConfigError(f"unknown backend {name!r} (available: {', '.join(b)})")
    return b[name]


def backend_for_target(target: Any) -> Backend:
    """``"reference"`` -> PyTorch; ``"onnx"``/``"onnx:qdq"``/``"onnx:integer"`` -> ONNX Runtime;
    ``cpu``/``arm64``/``cuda``/a TVM target dict -> TVM."""
    for b in BACKENDS().values():
        if b.supports(target):
            return b
    raise ConfigError(f"no backend compiles for target {target!r} (targets: reference, onnx, onnx:qdq, onnx:integer, "
                      "cpu, arm64, cuda, "
                      "or a TVM target dict such as {\"kind\": \"llvm\", \"mtriple\": \"aarch64-linux-gnu\"})")
