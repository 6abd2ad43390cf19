"""Compressed ops of the ``llmpress`` namespace (``torch.ops.llmpress.*``).

Importing this package registers every op (a ``torch.library`` custom op with a reference kernel and a fake
kernel), which a graph containing them needs to run, export, or be loaded with ``torch.export.load``.
One op family per file; add an import line here for each.

Adding an op: register it in its family file here (reference kernel = the oracle, plus a fake kernel), then give it
one entry in each backend's op table, the only other places that name it:

- TVM: ``llmpress.backends.tvm.kernels.table.OPS`` (converter, and the kernels whose CPU schedules its module holds);
- ONNX: ``llmpress.backends.onnx.llmpress_ops.LLMPRESS_TRANSLATIONS`` (a translation, or ``NotExportable(why)``).

``tests/backends/test_op_tables.py`` walks :func:`registered_ops` and fails, naming the op, for any missing entry.
"""
from __future__ import annotations

import torch

from . import kv_quant
from . import w8a8
from . import wq_linear

__all__ = ["kv_quant", "w8a8", "wq_linear", "NAMESPACE", "registered_ops"]

NAMESPACE = "llmpress"


def registered_ops() -> list[str]:
    """Every op overload registered in the ``llmpress`` namespace, as ``"llmpress.<op>.<overload>"`` (the spelling of
    ``Module.op_histogram`` and of the backends' op tables), sorted. Read from the dispatcher, so it also lists ops
    registered outside this package (by a plugin or a test)."""
    prefix = NAMESPACE + "::"
    # dispatcher names are "llmpress::op" or "llmpress::op.overload"
    names = sorted({n[len(prefix):].partition(".")[0] for n in torch._C._dispatch_get_all_op_names()
                    if n.startswith(prefix)})
    ns = getattr(torch.ops, NAMESPACE)
    return [f"{NAMESPACE}.{name}.{overload}" for name in names for overload in sorted(getattr(ns, name).overloads())]
