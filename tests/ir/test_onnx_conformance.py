"""ONNX operator conformance: the ``onnx`` package's own node test cases (``onnx.backend.test.case.node``: one
single-op model per case with inputs and expected outputs computed by numpy) run through the importer.

Only the case modules of ops the importer supports are imported (importing one runs its generators: ~1 s for all
of them, against ~45 s for the whole suite). Each case runs twice: as written (every input a graph input) and with
its integer/bool inputs folded into initializers, the way exporters write shapes, axes and indices (a ``Reshape``
shape fed as graph data is refused: the captured graph needs it static). Every run either matches the expected
outputs (dtype, shape and values) or is refused with ``UnsupportedOpError`` / ``LoadError`` (unsupported data
types); a wrong result fails. Every supported op must pass at least one case, and the cases refused in both
variants are listed below with their reason, so a converter that starts refusing more fails too.

Tolerances are per op (``_TOL``, float outputs; integer and bool outputs are always exact): 0 for ops that move,
select or compare data; elementwise arithmetic and transcendentals differ from numpy (which often computes in
float64 and rounds once, and uses another libm) by a few ulps: rtol 4e-6 (~32 float32 ulps), atol 1e-6 for
results near 0; sums (MatMul, Gemm, reductions, norms, softmax, CumSum) add in another order: rtol = atol = 1e-5.
Observed maxima: |diff| <= 1e-6 everywhere except Pow (1.2e-4 on a result of 1536: 1.1e-7 relative).
"""
from __future__ import annotations

import functools
import importlib
import pkgutil
import warnings

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from llmpress.errors import LoadError, UnsupportedOpError
from llmpress.ir.loaders.onnx_import import SUPPORTED_OPS, OnnxModule, import_onnx

_EXACT = (0.0, 0.0)
_ULPS = (4e-6, 1e-6)
_SUMS = (1e-5, 1e-5)
_TOL = {op: _ULPS for op in ("Add", "Sub", "Mul", "Div", "Sqrt", "Reciprocal", "Exp", "Log", "Tanh", "Erf",
                              "Sigmoid", "Sin", "Cos", "Pow", "Gelu")}
_TOL.update({op: _SUMS for op in ("MatMul", "Gemm", "ReduceMean", "ReduceSum", "Sum", "CumSum",
                                  "LayerNormalization", "Softmax", "LogSoftmax")})

# Cases refused in both variants (a substring of the case name -> why): types torch cannot compute with, and what
# the converters refuse on purpose.
_REFUSED = {
    "FLOAT8": "float8 types", "FLOAT4": "float4 types", "INT4": "4-bit integer types", "INT2": "2-bit integer types",
    "uint16": "unsigned 16-bit type", "uint32": "unsigned 32-bit type", "uint64": "unsigned 64-bit type",
    "string": "string type", "identity_sequence": "sequence type", "identity_opt": "optional type",
    "dropout_default_mask": "Dropout mask output", "training_dropout": "training-mode Dropout",
    "scatter_elements_with_duplicate_indices": "ScatterElements reduction=add",
    "scatter_elements_with_reduction": "ScatterElements reductions",
}


@functools.cache
def _cases() -> dict[str, list]:
    """op type -> the node test cases of that op whose graph uses only supported ops."""
    import onnx.backend.test.case.node as node_cases

    wanted = {op.lower() for op in SUPPORTED_OPS} | {"rangeop"}  # and_.py, greater_or_equal.py, rangeop.py
    with warnings.catch_warnings():  # the generators compute 1/0, log(0), ... on purpose
        warnings.simplefilter("ignore")
        for info in pkgutil.iter_modules(node_cases.__path__):
            if info.name.replace("_", "") in wanted:
                importlib.import_module(f"{node_cases.__name__}.{info.name}")
    by_op: dict[str, list] = {}
    for case in node_cases._NodeTestCases:
        ops = {n.op_type for n in case.model.graph.node}
        if ops <= SUPPORTED_OPS:
            by_op.setdefault(case.model.graph.node[-1].op_type, []).append(case)
    return by_op


def _array(x) -> np.ndarray:
    return numpy_helper.to_array(x) if isinstance(x, onnx.TensorProto) else np.asarray(x)


def _torch(x: np.ndarray) -> torch.Tensor:
    if x.dtype.name == "bfloat16":  # ml_dtypes: torch.from_numpy does not know it
        return torch.from_numpy(x.astype(np.float32)).to(torch.bfloat16)
    return torch.from_numpy(np.array(x))


def _fold_integer_inputs(model: onnx.ModelProto, inputs: list[np.ndarray]):
    """The model with its integer/bool inputs turned into initializers, and the inputs left to feed."""
    folded = onnx.ModelProto()
    folded.CopyFrom(model)
    keep_vi, keep_x = [], []
    for vi, x in zip(model.graph.input, inputs):
        if np.issubdtype(x.dtype, np.integer) or x.dtype == np.bool_:
            folded.graph.initializer.append(numpy_helper.from_array(x, vi.name))
        else:
            keep_vi.append(vi)
            keep_x.append(x)
    del folded.graph.input[:]
    folded.graph.input.extend(keep_vi)
    return folded, keep_x


def _run(model: onnx.ModelProto, inputs: list[np.ndarray]) -> tuple | str:
    """Outputs of the imported graph, or the refusal message."""
    try:
        out = OnnxModule(model)(*[_torch(x) for x in inputs])
    except (UnsupportedOpError, LoadError) as e:
        return f"{type(e).__name__}: {e}"
    return out if isinstance(out, tuple) else (out,)


def _check(case, op: str, got: tuple, want: list[np.ndarray]) -> None:
    assert len(got) == len(want), case.name
    for g, w in zip(got, want):
        w = _torch(w)
        assert g.dtype == w.dtype and tuple(g.shape) == tuple(w.shape), (case.name, g.dtype, w.dtype, g.shape,
                                                                          w.shape)
        rtol, atol = _TOL.get(op, _EXACT) if w.is_floating_point() else _EXACT
        torch.testing.assert_close(g, w, rtol=rtol, atol=atol, equal_nan=True, msg=lambda m: f"{case.name}: {m}")


def _variants(case) -> list[tuple[onnx.ModelProto, list[np.ndarray]]]:
    inputs = [_array(x) for x in case.data_sets[0][0]]
    out = [(case.model, inputs)]
    if any(np.issubdtype(x.dtype, np.integer) or x.dtype == np.bool_ for x in inputs):
        out.append(_fold_integer_inputs(case.model, inputs))
    return out


@pytest.mark.parametrize("op", sorted(SUPPORTED_OPS))
def test_onnx_node_cases(op: str) -> None:
    cases = _cases().get(op, [])
    assert cases, f"no onnx node test case for {op}"
    passed, refused = [], {}
    for case in cases:
        want = [_array(w) for w in case.data_sets[0][1]]
        reasons = []
        for model, inputs in _variants(case):
            got = _run(model, inputs)
            if isinstance(got, str):
                reasons.append(got)
                continue
            _check(case, op, got, want)
            passed.append(case.name)
        if not any(case.name == p for p in passed):
            refused[case.name] = reasons
    assert passed, f"{op}: every case refused: {refused}"
    for name, reasons in refused.items():
        assert any(key in name for key in _REFUSED), f"{name} refused: {reasons}"


# One case per op through torch.export (about a second each): the hardest variant the generators write.
_EXPORTED = ["test_cumsum_1d_reverse_exclusive", "test_cumsum_2d_negative_axis",
             "test_gathernd_example_int32_batch_dim1", "test_gathernd_example_float32", "test_isnan",
             "test_isinf_negative"]


@pytest.mark.parametrize("name", _EXPORTED)
def test_node_cases_through_torch_export(name: str) -> None:
    """The ops torch.onnx's dynamo exports brought in, captured into the IR (torch.export), not only run eagerly."""
    case = next(c for cases in _cases().values() for c in cases if c.name == name)
    op = case.model.graph.node[-1].op_type
    want = [_array(w) for w in case.data_sets[0][1]]
    # The first variant the importer takes (CumSum's axis fed as graph data is refused: then the folded one).
    model, inputs = next((m, x) for m, x in _variants(case) if not isinstance(_run(m, x), str))
    module = import_onnx(model, dynamic=False)
    got = module.run(*[_torch(x) for x in inputs])
    _check(case, op, got if isinstance(got, tuple) else (got,), want)
