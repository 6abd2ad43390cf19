"""Every ``llmpress`` op has an entry in every backend's op table, and every entry is real.

The walk starts from the dispatcher (``llmpress.ir.ops.registered_ops``: every op and overload registered in the
``llmpress`` namespace), never from a table, so an op added to ``llmpress/ir/ops`` without its backend entries fails
here, named, instead of lowering to a serial kernel or failing at export:

- reference: the op runs on its example call, and its fake kernel gives the reference output's shape and dtype;
- TVM (``backends/tvm/kernels/table.py``): an ``OPS`` entry whose converter exists; every kernel tag it declares is
  in its file's ``CPU_SCHEDULES``, every schedule a kernel file holds is declared; and, converting the example call,
  the tagged kernels the converter really emits are exactly the declared ones, each of which gets its CPU schedule;
- ONNX (``backends/onnx/llmpress_ops.py``): a ``LLMPRESS_TRANSLATIONS`` entry, a translation or
  ``NotExportable(why)``, whose reason ``export.check`` reports.

``EXAMPLES`` holds one small call per op (the arguments its converter and kernels need to make sense); a new op needs
one here too, and the first test says so.
"""
from __future__ import annotations

import importlib
import pkgutil
from typing import Any, Callable

import pytest
import torch

import llmpress.ir.ops  # noqa: F401 - registers torch.ops.llmpress.*
from llmpress.ir.ops import registered_ops
from llmpress.ir.ops.w8a8 import quantize_weight
from llmpress.ir.ops.wq_linear import pack_weight

OPS = registered_ops()
CPU = {"kind": "llvm", "mcpu": "x86-64-v3"}


def _wq_linear() -> tuple:
    g = torch.Generator().manual_seed(0)
    q = torch.randint(-8, 8, (16, 64), generator=g)
    scales = torch.rand(16, 2, generator=g) + 0.1
    # act_bits=8 so the converter emits both of its kernels (the activation fake-quant and the fused matmul)
    return torch.randn(2, 3, 64, generator=g), pack_weight(q, 4, sym=True), scales, None, None, 4, 32, 8, 32


def _w8a8_linear() -> tuple:
    g = torch.Generator().manual_seed(1)
    qw, ws = quantize_weight(torch.randn(16, 64, generator=g))
    return torch.randn(2, 3, 64, generator=g), qw, ws, torch.randn(16, generator=g)


def _kv(seed: int) -> torch.Tensor:
    return torch.randn(1, 2, 4, 8, generator=torch.Generator().manual_seed(seed))


def _kv_codes() -> tuple:
    x = _kv(3)
    return x, torch.ops.llmpress.kv_scale(x, 8), 8


def _kv_dequant() -> tuple:
    x, s, _ = _kv_codes()
    return torch.ops.llmpress.kv_codes(x, s, 8), s


#: op -> its example arguments (tensors and constants, in schema order).
EXAMPLES: dict[str, Callable[[], tuple]] = {
    "llmpress.wq_linear.default": _wq_linear,
    "llmpress.w8a8_linear.default": _w8a8_linear,
    "llmpress.kv_fake_quant.default": lambda: (_kv(2), 8),
    "llmpress.kv_scale.default": lambda: (_kv(2), 8),
    "llmpress.kv_codes.default": _kv_codes,
    "llmpress.kv_dequant.default": _kv_dequant,
}


def _op(name: str) -> torch._ops.OpOverload:
    ns, op, overload = name.split(".")
    return getattr(getattr(getattr(torch.ops, ns), op), overload)


def test_the_walk_finds_the_ops_and_each_has_an_example():
    assert {"llmpress.wq_linear.default", "llmpress.w8a8_linear.default", "llmpress.kv_codes.default"} <= set(OPS)
    missing = [op for op in OPS if op not in EXAMPLES]
    assert not missing, f"no example call in tests/backends/test_op_tables.py EXAMPLES for: {missing}"
    stale = sorted(set(EXAMPLES) - set(OPS))
    assert not stale, f"EXAMPLES names ops that are not registered: {stale}"


@pytest.mark.parametrize("op", OPS)
def test_reference_and_fake_kernels_agree_on_shape(op):
    from torch._subclasses.fake_tensor import FakeTensorMode

    args = EXAMPLES[op]()
    ref = _op(op)(*args)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fake = _op(op)(*[mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args])
    assert (tuple(fake.shape), fake.dtype) == (tuple(ref.shape), ref.dtype), op


# -- TVM -------------------------------------------------------------------------------------------------------------


def test_every_op_has_a_tvm_table_entry():
    from llmpress.backends.tvm.converters import CONVERTERS
    from llmpress.backends.tvm.kernels import table

    missing = [op for op in OPS if op not in table.OPS]
    assert not missing, f"no entry in llmpress/backends/tvm/kernels/table.py OPS for: {missing}"
    stale = sorted(set(table.OPS) - set(OPS))
    assert not stale, f"table.OPS names ops that are not registered: {stale}"
    assert set(OPS) <= set(CONVERTERS)  # derived from the table, nothing else to keep in step


def _kernel_modules() -> dict[str, Any]:
    import llmpress.backends.tvm.kernels as pkg

    return {m.name: importlib.import_module(f"{pkg.__name__}.{m.name}") for m in pkgutil.iter_modules(pkg.__path__)}


@pytest.mark.tvm
def test_declared_schedules_exist_and_every_schedule_is_declared():
    from llmpress.backends.tvm.kernels import table

    modules = _kernel_modules()
    for op, low in table.OPS.items():
        assert low.module in modules, f"{op}: table names kernels/{low.module}.py, which does not exist"
        assert callable(getattr(modules[low.module], low.converter, None)), \
            f"{op}: kernels/{low.module}.py has no converter {low.converter}"
    declared = table.schedule_modules()
    for module, tags in declared.items():
        provided = getattr(modules[module], "CPU_SCHEDULES", {})
        lacking = [t for t in tags if t not in provided]
        assert not lacking, f"kernels/{module}.py CPU_SCHEDULES lacks {lacking}, declared in table.py"
    for name, mod in modules.items():
        orphans = sorted(set(getattr(mod, "CPU_SCHEDULES", {})) - set(declared.get(name, ())))
        assert not orphans, f"kernels/{name}.py schedules {orphans}, which no table.py entry declares (never loaded)"
    assert set(table.cpu_schedules()) == {t for tags in declared.values() for t in tags}


class _Call(torch.nn.Module):
    """``forward(*tensors)`` calls ``op`` with the tensors in the example's tensor slots, its constants fixed."""

    def __init__(self, op: torch._ops.OpOverload, args: tuple) -> None:
        super().__init__()
        self.op, self.args = op, args

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        it = iter(tensors)
        return self.op(*[next(it) if isinstance(a, torch.Tensor) else a for a in self.args])


@pytest.mark.tvm
@pytest.mark.parametrize("op", OPS)
def test_converter_emits_the_declared_kernels_and_each_gets_its_cpu_schedule(op):
    """Convert the example call; the ``llmpress.kernel`` tags in the Relax module must be the entry's declared ones
    (a converter emitting an undeclared tag would build it serial), and the hand schedule must apply to each."""
    from llmpress.backends.tvm.kernels import common, table
    from llmpress.backends.tvm.lower import to_relax
    from llmpress.ir.capture import capture

    args = EXAMPLES[op]()
    module = capture(_Call(_op(op), args).eval(), tuple(a for a in args if isinstance(a, torch.Tensor)),
                     dynamic=False)
    tagged = {gv.name_hint: f for gv, f in to_relax(module).mod.functions_items()
              if common.KERNEL_ATTR in (getattr(f, "attrs", None) or {})}
    emitted = {str(f.attrs[common.KERNEL_ATTR]) for f in tagged.values()}
    declared = set(table.OPS[op].scheduled)
    assert emitted == declared, f"{op}: the converter emits kernels {sorted(emitted)}, table.py declares " \
                                f"{sorted(declared)}"
    for name, func in tagged.items():
        assert common.cpu_kernel_schedule(func, CPU) is not None, f"{op}: kernel {name} gets no CPU schedule"


# -- ONNX ------------------------------------------------------------------------------------------------------------


def test_every_op_has_an_onnx_table_entry():
    from llmpress.backends.onnx.llmpress_ops import LLMPRESS_TRANSLATIONS, NotExportable

    missing = [op for op in OPS if op not in LLMPRESS_TRANSLATIONS]
    assert not missing, (f"no entry in llmpress/backends/onnx/llmpress_ops.py LLMPRESS_TRANSLATIONS for: {missing} "
                         "(a translation, or NotExportable('why'))")
    stale = sorted(set(LLMPRESS_TRANSLATIONS) - set(OPS))
    assert not stale, f"LLMPRESS_TRANSLATIONS names ops that are not registered: {stale}"
    for op, entry in LLMPRESS_TRANSLATIONS.items():
        assert callable(entry) or (isinstance(entry, NotExportable) and entry.why.strip()), op


def test_not_exportable_entry_is_reported_with_its_reason(monkeypatch):
    """An op marked ``NotExportable`` is refused by ``check`` (before any work) with the entry's reason."""
    from llmpress.backends.onnx import llmpress_ops
    from llmpress.backends.onnx.export import check
    from llmpress.ir.capture import capture

    op = "llmpress.kv_fake_quant.default"
    args = EXAMPLES[op]()
    module = capture(_Call(_op(op), args).eval(), (args[0],), dynamic=False)
    assert check(module) == []
    monkeypatch.setitem(llmpress_ops.LLMPRESS_TRANSLATIONS, op, llmpress_ops.NotExportable("no ONNX form yet"))
    (problem,) = check(module)
    assert (problem.op, problem.reason) == (op, "not exportable: no ONNX form yet")
