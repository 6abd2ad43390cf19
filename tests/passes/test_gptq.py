"""``gptq``: the algorithm on single matrices, the pass on a tiny Llama, option errors, and the real-model floors."""
from __future__ import annotations

import functools
import logging
import time

import pytest
import torch

from llmpress.errors import ConfigError
from llmpress.ir.capture import capture
from llmpress.ir.meta import compression, source_path
from llmpress.passes.base import PassContext
from llmpress.passes.calibration import Calibration
from llmpress.passes.gptq import GPTQ, GPTQOptions, gptq_quantize
from llmpress.passes.quant_common import QuantizedWeight, rtn_quantize, sqnr_db
from llmpress.passes.registry import get_pass

from ..conftest import CALIB
from .test_quantize import fp32_perplexity, perplexity_of, real_model, rtn_perplexity

WQ = "llmpress.wq_linear.default"
LINEAR = "aten.linear.default"


def _correlated(n=512, d=64, seed=0):
    """Activations with strongly correlated channels and a few large ones, as LLM inputs have."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, 8, generator=g) @ torch.randn(8, d, generator=g)
    x = base + 0.1 * torch.randn(n, d, generator=g)
    x[:, :4] *= 8
    return x


def _out_err(w, w_hat, x):
    return float(torch.linalg.norm(x @ (w - w_hat).T))


# -- the algorithm ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("sym", [True, False])
def test_gptq_beats_rtn_on_the_output_error(act_order: bool, sym: bool) -> None:
    x = _correlated()
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(1))
    h = 2 * x.T @ x / x.shape[0]
    qw = gptq_quantize(w, h, bits=3, group=16, sym=sym, act_order=act_order, clip_search=False)
    q, s, z = rtn_quantize(w, 3, 16, sym)
    rtn = QuantizedWeight(q, s, z, 3, 16).dequantize()
    e_gptq, e_rtn = _out_err(w, qw.dequantize(), x), _out_err(w, rtn, x)
    # GPTQ minimizes exactly this error; on correlated inputs it is several times below RTN's (measured 2-4x).
    assert e_gptq < 0.7 * e_rtn, (e_gptq, e_rtn)
    lo, hi = (-4, 3) if sym else (0, 7)
    assert int(qw.q.min()) >= lo and int(qw.q.max()) <= hi


def test_identity_hessian_reduces_to_rtn() -> None:
    """With H = I no column informs another (the inverse's Cholesky factor is diagonal): GPTQ is exactly RTN."""
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(2))
    for clip in (False, True):
        qw = gptq_quantize(w, torch.eye(64), bits=4, group=32, sym=True, clip_search=clip)
        q, s, z = rtn_quantize(w, 4, 32, True, clip_search=clip)
        assert torch.equal(qw.q, q) and torch.equal(qw.scales, s)


def test_dead_inputs_are_zeroed() -> None:
    x = _correlated(d=32)
    x[:, 5] = 0  # an input channel that never fires
    h = 2 * x.T @ x / x.shape[0]
    w = torch.randn(8, 32, generator=torch.Generator().manual_seed(3))
    qw = gptq_quantize(w, h, bits=4, group=32, sym=True)
    assert torch.all(qw.dequantize()[:, 5] == 0)


def test_failed_cholesky_retries_with_more_dampening(caplog) -> None:
    # Eigenvalues -2 and 4 with a positive diagonal: H + lambda I is positive definite only for lambda > 2, so
    # 0.01, 0.1 and 1 (x mean(diag) = 1) fail and the third 10x increase (10) succeeds.
    h = torch.tensor([[1.0, 3.0], [3.0, 1.0]])
    w = torch.tensor([[0.5, -0.25], [1.0, 0.75]])
    with caplog.at_level(logging.WARNING, logger="llmpress.passes.gptq"):
        qw = gptq_quantize(w, h, bits=8, group=2, sym=True, layer="toy")
    assert sum("Cholesky failed" in r.message for r in caplog.records) == 3
    torch.testing.assert_close(qw.dequantize(), w, rtol=0, atol=0.01)  # 8 bits: within one step of 1/127


@pytest.mark.parametrize("group", [8, 32, 64])
def test_groups_align_with_blocks(group: int) -> None:
    """Groups smaller and larger than the block: every column is quantized with its own group's grid."""
    x = _correlated(d=64)
    h = 2 * x.T @ x / x.shape[0]
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(4))
    qw = gptq_quantize(w, h, bits=4, group=group, sym=True, block=16)
    assert qw.scales.shape == (8, 64 // group)
    assert _out_err(w, qw.dequantize(), x) < _out_err(w, QuantizedWeight(*rtn_quantize(w, 4, group, True), 4,
                                                                           group).dequantize(), x)


# -- the pass --------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny():
    from tests.decoder import Llama, LlamaConfig

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64, max_seq_len=32)
    model = Llama(cfg).eval()
    g = torch.Generator().manual_seed(5)
    calib = Calibration.from_tensors([torch.randint(0, 64, (1, 32), generator=g) for _ in range(8)])
    return model, capture(model), calib


def _ctx(calib):
    return PassContext(calibration=calib, progress=False)


def test_pass_structure_stats_and_second_run(tiny) -> None:
    model, captured, calib = tiny
    module = captured.clone()
    res = GPTQ(GPTQOptions(bits=4, group=16, exclude=("lm_head",))).run(module, _ctx(calib))
    assert res.modified
    hist = module.op_histogram()
    assert hist[LINEAR] == 1 and hist[WQ] == 14
    module.verify()
    st = res.stats
    assert st["quantized"] == 14 and ("lm_head", "excluded by 'lm_head'") in st["skipped"]
    assert st["bytes_after"] * 16 == st["bytes_before"] * 3
    for path, layer in st["layers"].items():
        assert 0 < layer["output_error"] < 0.3 and 0 < layer["rel_error"] < 0.3, path
    node = next(n for n in module.graph.nodes if n.op == "call_function" and n.target is
                torch.ops.llmpress.wq_linear.default and source_path(n) == "model.layers.0.self_attn.k_proj")
    assert compression(node)["method"] == "gptq"
    again = GPTQ(GPTQOptions(bits=4, group=16, exclude=("lm_head",))).run(module, _ctx(calib))
    assert not again.modified and again.stats["quantized"] == 0


@pytest.mark.parametrize("bits", [4, 3])
def test_pass_beats_rtn_sqnr_on_held_out_tokens(tiny, bits: int) -> None:
    """SQNR (dB) of the logits on tokens not in the calibration set. GPTQ measured 24.8 / 17.5 dB for 4 / 3 bits
    (RTN 23.6 / 16.1): it must beat RTN, and stay above a floor ~3.5 dB under the measurement."""
    from llmpress.passes.quantize import Quantize, QuantizeOptions

    model, captured, calib = tiny
    g = torch.Generator().manual_seed(9)
    x = (torch.randint(0, 64, (1, 24), generator=g), torch.zeros(1, dtype=torch.int64), *model.empty_cache())
    ref = captured.run(*x)[0]
    gm = captured.clone()
    GPTQ(GPTQOptions(bits=bits, group=16)).run(gm, _ctx(calib))
    rm = captured.clone()
    Quantize(QuantizeOptions(bits=bits, group=16)).run(rm, PassContext(progress=False))
    s_gptq, s_rtn = sqnr_db(ref, gm.run(*x)[0]), sqnr_db(ref, rm.run(*x)[0])
    assert s_gptq > s_rtn, (s_gptq, s_rtn)
    assert s_gptq > {4: 21.0, 3: 14.0}[bits]


def test_no_calibration_is_a_config_error_before_any_work(tiny) -> None:
    _, captured, _ = tiny
    module = captured.clone()
    hist = module.op_histogram()
    with pytest.raises(ConfigError, match=r"gptq needs calibration data \(--calib FILE or calibration=...\)"):
        GPTQ(GPTQOptions(bits=4, group=16)).run(module, PassContext(progress=False))
    assert module.op_histogram() == hist


@pytest.mark.parametrize("options,match", [
    ({"bits": 5}, "bits=5 is not supported"),
    ({"damp": 0.0}, "damp=0.0"),
    ({"block": 0}, "block=0"),
])
def test_bad_options(options, match) -> None:
    with pytest.raises(ConfigError, match=match):
        GPTQOptions.from_mapping(options, pass_name="gptq")


def test_group_not_dividing_fails_before_any_work(tiny) -> None:
    _, captured, calib = tiny
    module = captured.clone()
    hist = module.op_histogram()
    with pytest.raises(ConfigError, match="group=48 does not divide in_features=32 of layer 'model.layers.0"):
        GPTQ(GPTQOptions(bits=4, group=48)).run(module, _ctx(calib))
    assert module.op_histogram() == hist


def test_registered_under_its_name() -> None:
    assert get_pass("gptq") is GPTQ
    assert GPTQ.needs_calibration


# -- the real model --------------------------------------------------------------------------------------------------
# 32 windows of 256 tokens from calib.txt (seed 0): 8,192 calibration tokens. Measured on the 16K-token valid prefix
# that test_quantize.py scores: GPTQ int3 g128 1.0043x (64 windows: 1.0041x), int2 g64 asymmetric 1.0207x
# (symmetric 1.0299x); RTN int3 g128 is 1.031x.
CALIB_SAMPLES = 32


@functools.cache
def real_calibration() -> Calibration:
    return Calibration.from_texts(CALIB, real_model()[1], samples=CALIB_SAMPLES, seq_len=256, seed=0)


def _gptq_real(**options) -> tuple[float, float]:
    module = capture(real_model()[0])
    t0 = time.perf_counter()
    res = GPTQ(GPTQOptions(exclude=("lm_head",), **options)).run(module, _ctx(real_calibration()))
    seconds = time.perf_counter() - t0
    assert res.stats["quantized"] == 56 and [p for p, _ in res.stats["skipped"]] == ["lm_head"]
    return perplexity_of(module), seconds


@pytest.mark.slow
def test_real_model_gptq_int3_g128_floor_and_beats_rtn(shared) -> None:
    base = fp32_perplexity()
    ppl, seconds = _gptq_real(bits=3, group=128)
    rtn = rtn_perplexity(3, 128)
    print(f"fp32 {base:.4f}  RTN int3 g128 {rtn / base:.4f}x  GPTQ int3 g128 {ppl / base:.4f}x  ({seconds:.1f}s)")
    assert ppl / base <= 1.006, f"GPTQ int3 g128: {ppl / base:.5f}x fp32 (floor 1.006x)"
    assert ppl < rtn, f"GPTQ int3 g128 {ppl:.4f} is not better than RTN int3 g128 {rtn:.4f}"


@pytest.mark.slow
def test_real_model_gptq_int2_g64_floor(shared) -> None:
    base = fp32_perplexity()
    ppl, seconds = _gptq_real(bits=2, group=64, sym=False)  # a zero point: 4 usable levels per group, not 3.5
    print(f"GPTQ int2 g64 asym {ppl / base:.4f}x fp32 ({seconds:.1f}s)")
    assert ppl / base <= 1.035, f"GPTQ int2 g64: {ppl / base:.5f}x fp32 (floor 1.035x)"
