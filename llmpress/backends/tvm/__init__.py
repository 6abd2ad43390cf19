"""The TVM backend: ``ir.Module`` -> Relax -> machine code for x86-64 / aarch64 CPUs and CUDA GPUs.

``TVMBackend().lower(module, "cpu")`` translates the graph (``lower``), builds it (``build``) and returns a
``TVMCompiled`` (``runtime``) that follows the module's calling convention and writes ``model.so`` +
``weights.safetensors`` into an artifact. Targets are resolved by ``targets.resolve_target``; converters for
llmpress custom ops are derived from the op table, ``kernels/table.py``.

Importing this package does not import TVM; the work functions do.
"""
from __future__ import annotations

from .backend import TVMBackend
from .targets import TargetSpec, resolve_target

__all__ = ["TVMBackend", "TargetSpec", "resolve_target"]
