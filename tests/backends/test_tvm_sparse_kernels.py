"""Sparse CPU kernels (``backends/tvm/kernels/sparse.py``) and their dispatch (``sparse_plan.py``, ``dispatch.py``).

- kernel level: the compile-time repacks and the GEMV/GEMM kernels equal a float64 dense reference for float32
  unstructured, 2:4 and 4:8 weights and int4 2:4 codes, on odd shapes (rows not a multiple of the 8-row tile, a row
  with no nonzero, int4 groups of 4 with one or no nonzero code);
- the same PrimFuncs build for ``arm64`` and, under qemu, give x86's results;
- a tiny Llama, sparsified (attention 60% unstructured float, MLP 2:4 then int4), compiled with
  ``sparse_kernels="always"``, matches the reference backend at prefill and decode; its artifact stores the
  kernels' compressed tensors as they are (no ``sparse_weights`` record, no expansion at load), loads with the same
  logits, and the C++ edge runner generates the same ids from it;
- ``auto`` picks dense compute below the measured crossover and says so (log line and stats).

Tolerance of the float comparisons: each output is a sum of ``K`` products; in any summation order, with or
without fused multiply-adds, ``|computed - exact| <= gamma_K * sum_k |w_k x_k|`` (Higham 3.1, ``gamma_K ~ K u``,
``u = 2^-24``; the int4 form adds one rounding per group scale, far inside that margin). A wrong index, lane or
position is off by a whole product.
"""
from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from llmpress.backends.tvm.kernels import sparse_plan

tvm = pytest.importorskip("tvm")

pytestmark = pytest.mark.tvm

K, GROUP, M = 64, 32, 5
U = 2.0 ** -24


def _float_weights() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(20, K, generator=g)  # 20 rows: the last 8-row tile is partial
    unstructured = w.masked_fill(torch.rand(20, K, generator=g) < 0.7, 0.0)
    unstructured[3] = 0.0  # a row with no nonzero
    unstructured[4, :-1] = 0.0  # one with a single one, in the last column
    order = torch.rand(16, K // 4, 4, generator=g).argsort(-1)
    nm24 = torch.randn(16, K // 4, 4, generator=g).masked_fill(order < 2, 0.0).reshape(16, K)
    order = torch.rand(24, K // 8, 8, generator=g).argsort(-1)
    nm48 = torch.randn(24, K // 8, 8, generator=g).masked_fill(order < 4, 0.0).reshape(24, K)
    return {"unstructured": unstructured, "2:4": nm24, "4:8": nm48}


def _int4() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(signed codes [20, K] in -8..7 that are 2:4, packed storage, scales [20, K/GROUP])."""
    from llmpress.ir.ops.wq_linear import pack_weight

    g = torch.Generator().manual_seed(1)
    q = torch.randint(-8, 8, (20, K), generator=g)
    order = torch.rand(20, K // 4, 4, generator=g).argsort(-1)
    q = q.reshape(20, K // 4, 4).masked_fill(order < 2, 0).reshape(20, K)
    q[2, :4] = torch.tensor([0, 0, 0, 5])  # one nonzero, in the last slot
    q[2, 4:8] = 0  # none
    q[7] = 0
    return q, pack_weight(q, 4, sym=True), torch.rand(20, K // GROUP, generator=g) + 0.1


def _functions() -> dict:
    from llmpress.backends.tvm.kernels import sparse

    funcs = {}
    for name, w in _float_weights().items():
        info = sparse_plan.measure_float(w)
        key = name.replace(":", "")
        funcs[f"ell_repack_{key}"] = sparse.ell_repack_func(info.n, K, info.steps)
        funcs[f"ell_gemv_{key}"] = sparse.ell_gemv_func(info.n, K, info.steps)
        funcs[f"ell_gemm_{key}"] = sparse.ell_gemm_func(info.n, K, info.steps)
    funcs["nm24_repack"] = sparse.nm24_repack_func(20, K, GROUP)
    funcs["nm24_gemv"] = sparse.nm24_gemv_func(20, K, GROUP)
    funcs["nm24_gemm"] = sparse.nm24_gemm_func(20, K, GROUP)
    return funcs


def _build(target: dict) -> object:
    mod = tvm.IRModule({n: f.with_attr("global_symbol", n) for n, f in _functions().items()})
    return tvm.compile(mod, tvm.target.Target(target))


def _bound(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return K * U / (1 - K * U) * (x.double().abs() @ w.double().abs().T)


@pytest.fixture(scope="module")
def x86():
    from llmpress.backends.tvm.targets import resolve_target

    return _build(resolve_target("cpu").tvm_target())


def _packed(ex, names: list[str], inputs: list[np.ndarray], outs: list[tuple[tuple, str]]) -> list[np.ndarray]:
    arrays = [tvm.runtime.empty(s, d) for s, d in outs]
    ex[names[0]](*[tvm.runtime.tensor(a) for a in inputs], *arrays)
    return [a.numpy() for a in arrays]


def _run(ex, fn: str, x: torch.Tensor, weights: list[np.ndarray], n: int) -> np.ndarray:
    y = tvm.runtime.empty((x.shape[0], n), "float32")
    ex[fn](tvm.runtime.tensor(x.numpy()), *[tvm.runtime.tensor(w) for w in weights], y)
    return y.numpy()


def _ell(ex, key: str, w: torch.Tensor) -> list[np.ndarray]:
    info = sparse_plan.measure_float(w)
    return _packed(ex, [f"ell_repack_{key}"], [w.numpy()],
                   [((info.steps, 8), "float32"), ((info.steps, 8), "uint16"), ((info.tiles + 1,), "int32")])


def _nm24(ex, qweight: torch.Tensor, scales: torch.Tensor) -> list[np.ndarray]:
    return _packed(ex, ["nm24_repack"], [qweight.numpy(), scales.numpy()],
                   [((3, K // 8, 3, 8), "uint8"), ((3, K // GROUP, 8), "float32")])


def _dequant(q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return (q.double().reshape(20, K // GROUP, GROUP) * scales.double()[..., None]).reshape(20, K)


@pytest.mark.parametrize("pattern", ["unstructured", "2:4", "4:8"])
def test_float_sell_kernels_equal_dense(x86, pattern):
    w = _float_weights()[pattern]
    info = sparse_plan.measure_float(w)
    assert info.pattern == pattern and info.nnz == int((w != 0).sum())
    key = pattern.replace(":", "")
    packed = _ell(x86, key, w)
    assert packed[2][-1] == info.steps  # ptr ends at the step count measured in torch
    g = torch.Generator().manual_seed(2)
    for fn, x in ((f"ell_gemv_{key}", torch.randn(1, K, generator=g)), (f"ell_gemm_{key}", torch.randn(M, K,
                                                                                                        generator=g))):
        got = torch.from_numpy(_run(x86, fn, x, packed, w.shape[0])).double()
        exact = x.double() @ w.double().T
        assert ((got - exact).abs() <= _bound(w, x)).all(), (fn, (got - exact).abs().max())


def test_int4_24_kernels_equal_dense(x86):
    q, qweight, scales = _int4()
    info = sparse_plan.measure_int4(qweight, K, GROUP)
    assert isinstance(info, sparse_plan.Int4Sparse) and info.zeros == int((q == 0).sum())
    packed = _nm24(x86, qweight, scales)
    w = _dequant(q, scales)
    g = torch.Generator().manual_seed(3)
    for fn, x in (("nm24_gemv", torch.randn(1, K, generator=g)), ("nm24_gemm", torch.randn(M, K, generator=g))):
        got = torch.from_numpy(_run(x86, fn, x, packed, 20)).double()
        exact = x.double() @ w.T
        assert ((got - exact).abs() <= 2 * _bound(w, x)).all(), (fn, (got - exact).abs().max())
    dense = q.clone()
    dense[0, :4] = torch.tensor([1, 2, 3, 0])
    from llmpress.ir.ops.wq_linear import pack_weight

    assert "not 2:4" in sparse_plan.measure_int4(pack_weight(dense, 4, sym=True), K, GROUP)


def test_arm64_build_under_qemu_matches_x86(x86, tmp_path):
    """The same PrimFuncs compile for ``arm64`` (no x86 intrinsic on their path) and, run under qemu through the
    kernel harness, give x86's outputs (within twice the float bound: both are within it of the exact sum)."""
    from llmpress.backends.tvm import emulate
    from llmpress.backends.tvm.targets import resolve_target

    ex = _build(resolve_target("arm64").tvm_target())
    missing = emulate.missing_tools("aarch64") if emulate.host_arch() == "x86_64" else ["an x86-64 host"]
    if missing:
        pytest.skip(f"built for arm64; cannot run it here: missing {', '.join(missing)}")
    from .qemu_kernels import Call, build_harness, export_aarch64, run_qemu

    emulate.build_runner("aarch64")  # lays out build/tvm-aarch64, which the harness links
    w = _float_weights()["unstructured"]
    q, qweight, scales = _int4()
    ell, nm = _ell(x86, "unstructured", w), _nm24(x86, qweight, scales)
    x = torch.randn(1, K, generator=torch.Generator().manual_seed(4))
    calls = [Call("ell_gemv_unstructured", [x.numpy(), *ell], [("float32", (1, 20))]),
             Call("nm24_gemv", [x.numpy(), *nm], [("float32", (1, 20))])]
    arm = run_qemu(build_harness(), export_aarch64(ex, tmp_path), calls)
    for (got,), fn, packed, wd in zip(arm, ["ell_gemv_unstructured", "nm24_gemv"], [ell, nm],
                                      [w.double(), _dequant(q, scales)]):
        want = _run(x86, fn, x, packed, 20)
        assert (np.abs(got - want) <= 2 * _bound(wd, x).numpy()).all(), fn


# -- end to end ------------------------------------------------------------------------------------------------------
PIPELINE = ("sparsify(method=magnitude,pattern=2:4,include=*.mlp.*),sparsify(method=magnitude,sparsity=0.6,"
            "include=*.self_attn.*),quantize(bits=4,group=32,include=*.mlp.*)")
#: one library (the ``cpu`` target adds an AVX-512 variant build, which would double the build time)
TARGET = {"kind": "llvm", "mcpu": "x86-64-v3"}


@pytest.fixture(scope="module")
def forced():
    """(model, sparsified module, program compiled with every sparse-eligible layer on the sparse kernels)."""
    import llmpress
    from tests.decoder import Llama, LlamaConfig

    from llmpress.ir.capture import capture

    from ..passes.tiny_llama import run_text

    torch.manual_seed(0)
    model = Llama(LlamaConfig(vocab_size=64, dim=64, n_layers=1, n_heads=4, n_kv_heads=2, hidden_dim=128,
                              max_seq_len=32)).eval()
    module = capture(model)
    run_text(module, PIPELINE)
    # Through compile()'s backend options, as a user forces them (``--backend-option sparse_kernels=always``)
    art = llmpress.compile(module, target=TARGET, backend_options={"sparse_kernels": "always"}, progress=False)
    assert art.manifest["backend_options"] == {"sparse_kernels": "always"}
    return model, module, art.compiled


def test_forced_sparse_kernels_match_the_reference(forced):
    from ..conftest import llama_inputs

    model, module, compiled = forced
    d = compiled.sparse_kernels
    assert sorted(v["form"] for v in d.values() if v["kernel"] == "sparse") == ["f32"] * 4 + ["int4_2:4"] * 3
    assert all(abs(v["sparsity"] - 0.6) < 0.01 for v in d.values() if v["form"] == "f32")
    assert any(n.endswith("@1") and compiled.weights[n].dtype == torch.uint16 for n in compiled.params)
    prefill = llama_inputs(model, t=7)
    ref, got = module.run(*prefill), compiled(*prefill)
    torch.testing.assert_close(got[0], ref[0], rtol=1e-4, atol=1e-5)
    decode = (torch.tensor([[3]]), torch.tensor([7]), *ref[1:])
    torch.testing.assert_close(compiled(*decode)[0], module.run(*decode)[0], rtol=1e-4, atol=1e-5)


def test_artifact_stores_the_compressed_form_and_the_runner_reads_it(forced, tmp_path):
    import json

    import llmpress
    from llmpress.artifact import Artifact
    from llmpress.backends.tvm import emulate

    from ..conftest import llama_inputs
    from .test_tvm_sparse_storage import _runner_ids

    model, module, compiled = forced
    folder = Artifact(compiled, {"backend": "tvm", "lm": module.lm.to_json()}).save(tmp_path / "a")
    payload = json.loads((folder / "manifest.json").read_text())["payload"]
    assert payload["sparse_kernels"] == compiled.sparse_kernels
    direct = [n for n in payload["params"] if "@" in n and n.split("@")[0] in
              {r for v in compiled.sparse_kernels.values() for r in v["reads"]}]
    assert len(direct) == 4 * 3 + 3 * 2  # SELL-8: values, columns, tile starts; int4 2:4: codes+positions, scales
    assert not set(direct) & set(payload.get("sparse_weights", {}))  # stored as the kernels read them
    loaded = llmpress.load(folder)
    inputs = llama_inputs(model, t=6)
    assert torch.equal(loaded(*inputs)[0], compiled(*inputs)[0])
    if emulate.missing_tools("x86_64"):
        pytest.skip("the x86_64 edge runner cannot be built here")
    prompt = [1, 5, 9, 2]
    assert _runner_ids("x86_64", folder, prompt) == list(loaded.generate_ids(prompt, 8))


def test_auto_keeps_dense_below_the_crossover_and_says_so(caplog):
    g = torch.Generator().manual_seed(5)
    w = torch.randn(64, 128, generator=g)
    half = w.masked_fill(torch.rand(64, 128, generator=g) < 0.5, 0.0)
    plan = sparse_plan.SparsePlan({"a": half}, ["a"], "auto", "x86_64")
    cross = sparse_plan.CROSSOVER[("f32", "x86_64")]
    with caplog.at_level(logging.INFO, logger=sparse_plan.__name__):
        assert plan.float_layer("a") is None
    why = plan.decisions["a"]["why"]
    assert plan.decisions["a"]["kernel"] == "dense" and why in caplog.text
    assert why.startswith(f"sparse kernel slower than dense at s={plan.decisions['a']['sparsity']:.2f} on this "
                          "target") and why.endswith(": dense compute") and sparse_plan.RESULTS in why
    if cross is not None:  # above the measured crossover auto takes the sparse kernel
        dense = w.masked_fill(torch.rand(64, 128, generator=g) < max(cross, 0.5) + 0.04, 0.0)
        assert sparse_plan.SparsePlan({"b": dense}, ["b"], "auto", "x86_64").float_layer("b") is not None
    arm = sparse_plan.SparsePlan({"a": half}, ["a"], "auto", "aarch64")
    assert arm.float_layer("a") is None and "no measured crossover" in arm.decisions["a"]["why"]
    assert sparse_plan.SparsePlan({"a": w}, ["a"], "always", "x86_64").float_layer("a") is None  # dense: not eligible


def test_bad_mode_is_a_config_error():
    from llmpress.backends.tvm import TVMBackend
    from llmpress.errors import ConfigError

    with pytest.raises(ConfigError, match="sparse_kernels='sometimes' must be one of auto, always, never"):
        TVMBackend(sparse_kernels="sometimes")


def test_dispatched_kernel_files_are_declared_and_hand_scheduled():
    """``table.DISPATCHED`` names real kernel files (``sparse`` among them), none of which holds CPU schedules."""
    import importlib

    from llmpress.backends.tvm.kernels import table

    assert "sparse" in table.DISPATCHED
    for name in table.DISPATCHED:
        mod = importlib.import_module(f"llmpress.backends.tvm.kernels.{name}")
        assert not getattr(mod, "CPU_SCHEDULES", {}), name
