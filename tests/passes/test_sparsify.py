"""``sparsify``: the three methods on single matrices, N:M and sparsity accounting, zeros that survive a later
quantizer, the pass on a tiny Llama (stats, metadata, scoping, errors), and the real-model floors."""
from __future__ import annotations

import functools

import pytest
import torch

from llmpress.api import layer_summary, run_pipeline
from llmpress.errors import ConfigError
from llmpress.ir.capture import capture
from llmpress.ir.meta import compression, source_path
from llmpress.ir.ops.wq_linear import dequantize
from llmpress.passes.base import PassContext
from llmpress.passes.gptq import gptq_quantize
from llmpress.passes.pipeline import build, parse
from llmpress.passes.quant_common import QuantizedWeight, rtn_quantize
from llmpress.passes.registry import get_pass
from llmpress.passes.sparsify import (
    Sparsify,
    SparsifyOptions,
    magnitude_prune,
    sparsegpt_prune,
    wanda_prune,
)

from ..conftest import random_calibration
from .test_gptq import _correlated, _out_err, real_calibration
from .test_quantize import fp32_perplexity, perplexity_of, real_model

LINEAR = "aten.linear.default"
WQ = torch.ops.llmpress.wq_linear.default
CTX = PassContext(progress=False)


def _hessian(x: torch.Tensor) -> torch.Tensor:
    return 2 * x.T @ x / x.shape[0]


def _prune(method: str, w, h, **kw):
    if method == "magnitude":
        return magnitude_prune(w, **kw)
    if method == "wanda":
        return wanda_prune(w, h, **kw)
    return sparsegpt_prune(w, h, block=32, **kw)


METHODS = ["magnitude", "wanda", "sparsegpt"]


# -- the methods on one matrix ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("nm", [(2, 4), (4, 8), (1, 4)])
def test_nm_pattern_is_exact(method: str, nm) -> None:
    """Every group of M consecutive inputs of every output row keeps exactly N weights."""
    x = _correlated(d=64)
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(1))
    ws = _prune(method, w, _hessian(x), nm=nm)
    n, m = nm
    kept = (ws != 0).reshape(16, 64 // m, m).sum(-1)
    assert torch.all(kept == n), kept
    assert float((ws == 0).float().mean()) == 1 - n / m


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("sparsity", [0.5, 0.7])
def test_unstructured_sparsity_is_achieved(method: str, sparsity: float) -> None:
    x = _correlated(d=64)
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(2))
    ws = _prune(method, w, _hessian(x), sparsity=sparsity)
    zeros = (ws == 0).sum(1)
    # Rounded where the comparison happens: over the layer (magnitude), each row (wanda), each block of 32 columns
    # (sparsegpt's adaptive mask).
    want = {"magnitude": round(sparsity * 1024), "wanda": 16 * round(sparsity * 64),
            "sparsegpt": 2 * round(sparsity * 16 * 32)}[method]
    assert int(zeros.sum()) == want
    if method == "wanda":  # every row loses the same number
        assert torch.all(zeros == round(sparsity * 64))


def test_magnitude_removes_the_smallest_weights() -> None:
    w = torch.randn(8, 32, generator=torch.Generator().manual_seed(3))
    ws = magnitude_prune(w, sparsity=0.5)
    kept, pruned = w[ws != 0].abs(), w[ws == 0].abs()
    assert kept.min() > pruned.max()
    assert torch.equal(ws[ws != 0], w[ws != 0])  # magnitude never changes the weights it keeps


def test_wanda_ranks_by_weight_times_activation_norm() -> None:
    """A large weight on a quiet input goes before a small weight on a loud one: the opposite of magnitude."""
    w = torch.tensor([[1.0, 0.5, 0.9, 0.2],
                      [0.3, 1.0, 0.2, 0.8]])
    x = torch.ones(16, 4) * torch.tensor([0.1, 10.0, 1.0, 1.0])  # ||X_j|| = 0.4, 40, 4, 4
    h = _hessian(x)
    assert magnitude_prune(w, nm=(2, 4)).nonzero().tolist() == [[0, 0], [0, 2], [1, 1], [1, 3]]
    # scores |W| * ||X_j||: row 0 = 0.4, 20, 3.6, 0.8 -> keeps columns 1, 2; row 1 = 0.12, 40, 0.8, 3.2 -> 1, 3
    assert wanda_prune(w, h, nm=(2, 4)).nonzero().tolist() == [[0, 1], [0, 2], [1, 1], [1, 3]]
    ws = wanda_prune(w, h, sparsity=0.5)  # unstructured: per row, the same ranking
    assert ws.nonzero().tolist() == [[0, 1], [0, 2], [1, 1], [1, 3]]
    assert torch.equal(ws[ws != 0], w[ws != 0])


@pytest.mark.parametrize("nm", [None, (2, 4)])
def test_sparsegpt_beats_magnitude_and_wanda_on_the_output_error(nm) -> None:
    """SparseGPT minimizes ||X (W - W_s)^T|| by updating the kept weights; on correlated inputs its error is far
    below pruning without an update (measured: 0.30x magnitude's unstructured, 0.43x at 2:4)."""
    x = _correlated(n=1024, d=64)
    h = _hessian(x)
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(4))
    errs = {m: _out_err(w, _prune(m, w, h, nm=nm, sparsity=0.5), x) for m in METHODS}
    assert errs["sparsegpt"] < 0.6 * errs["magnitude"], errs
    assert errs["sparsegpt"] < errs["wanda"], errs


def test_sparsegpt_with_identity_hessian_is_magnitude() -> None:
    """With H = I no input informs another: no update, and the OBS saliency w^2 / [H^-1]_jj ranks like |w|."""
    w = torch.randn(8, 32, generator=torch.Generator().manual_seed(5))
    for nm in (None, (2, 4)):
        ws = sparsegpt_prune(w, torch.eye(32), nm=nm, block=32)
        torch.testing.assert_close(ws, magnitude_prune(w, nm=nm), rtol=0, atol=1e-6)


# -- zeros survive quantization --------------------------------------------------------------------------------------
@pytest.mark.parametrize("sym", [True, False])
def test_gptq_with_mask_keeps_zeros_and_compensates(sym: bool) -> None:
    x = _correlated(d=64)
    h = _hessian(x)
    w = sparsegpt_prune(torch.randn(16, 64, generator=torch.Generator().manual_seed(6)), h, nm=(2, 4), block=32)
    mask = w == 0
    qw = gptq_quantize(w, h, bits=4, group=16, sym=sym, clip_search=False, mask=mask)
    w_hat = qw.dequantize()
    assert torch.all(w_hat[mask] == 0)
    rtn = QuantizedWeight(*rtn_quantize(w, 4, 16, sym), 4, 16).dequantize()
    assert torch.all(rtn[mask] == 0)  # RTN: 0 rounds to the code of 0 on both grids
    assert _out_err(w, w_hat, x) < _out_err(w, rtn, x)  # the kept weights absorb the quantization error
    unmasked = gptq_quantize(w, h, bits=4, group=16, sym=sym, clip_search=False).dequantize()
    assert (unmasked[mask] != 0).any()  # without the mask GPTQ's updates fill the holes


# -- the pass --------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny():
    from tests.decoder import Llama, LlamaConfig

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64, max_seq_len=32)
    model = Llama(cfg).eval()
    return model, capture(model), random_calibration(n=8, t=32, seed=5)


def _ctx(calib=None):
    return PassContext(calibration=calib, progress=False)


def _sparsify(module, calib=None, **options):
    return Sparsify(SparsifyOptions.from_mapping(options, pass_name="sparsify")).run(module, _ctx(calib))


def _linear(module, path):
    return next(n for n in module.graph.nodes if n.op == "call_function" and source_path(n) == path
                and n.target in (torch.ops.aten.linear.default, WQ))


@pytest.mark.parametrize("method", METHODS)
def test_pass_keeps_plain_linears_records_stats_and_metadata(tiny, method: str) -> None:
    model, captured, calib = tiny
    module = captured.clone()
    dense = dict(captured.weights())
    hist = module.op_histogram()
    res = _sparsify(module, calib, method=method, pattern="2:4", exclude=("lm_head",))
    assert res.modified and module.op_histogram() == hist  # no new op: every backend runs it as before
    module.verify()
    st = res.stats
    assert st["sparsified"] == 14 and ("lm_head", "excluded by 'lm_head'") in st["skipped"]
    assert st["method"] == method and st["pattern"] == "2:4" and st["sparsity"] == 0.5
    assert all(v["sparsity"] == 0.5 and v["pattern"] == "2:4" for v in st["layers"].values())
    assert ("output_error" in st["layers"]["model.layers.0.mlp.down_proj"]) == (method != "magnitude")
    node = _linear(module, "model.layers.1.mlp.down_proj")
    assert compression(node)["pass"] == "sparsify"
    assert {k: compression(node)[k] for k in ("method", "sparsity", "pattern")} == {
        "method": method, "sparsity": 0.5, "pattern": "2:4"}
    row = next(r for r in layer_summary(module) if r["path"] == "model.layers.1.mlp.down_proj")
    assert row["compression"]["pattern"] == "2:4"  # what `llmpress inspect` prints
    w = module.weights()["model.layers.1.mlp.down_proj.weight"]
    assert float((w == 0).float().mean()) == 0.5
    # the captured module it was cloned from keeps its dense weights; lm_head is untouched
    assert torch.equal(captured.weights()["model.layers.1.mlp.down_proj.weight"],
                       dense["model.layers.1.mlp.down_proj.weight"])
    assert torch.equal(module.weights()["lm_head.weight"], dense["lm_head.weight"])
    x = (torch.randint(0, 64, (1, 12), generator=torch.Generator().manual_seed(9)), torch.zeros(1, dtype=torch.int64),
         *model.empty_cache())
    assert torch.isfinite(module.run(*x)[0]).all()
    again = _sparsify(module, calib, method=method, pattern="2:4", exclude=("lm_head",))
    assert not again.modified and again.stats["sparsified"] == 0
    assert any("already sparsified" in why for _, why in again.stats["skipped"])


def test_scope_limits_the_pass(tiny) -> None:
    _, captured, _ = tiny
    module = captured.clone()
    module, records = run_pipeline(module, "scope(include=mlp)[sparsify(pattern=4:8)]", progress=False)
    assert sorted(records[0].stats["layers"]) == [f"model.layers.{i}.mlp.{p}" for i in (0, 1)
                                                     for p in ("down_proj", "gate_proj", "up_proj")]
    assert not (module.weights()["model.layers.0.self_attn.q_proj.weight"] == 0).any()


@pytest.mark.parametrize("then", ["quantize(bits=4,group=16,exclude=lm_head)",
                                  "quantize(bits=4,group=16,sym=false,exclude=lm_head)",
                                  "gptq(bits=4,group=16,exclude=lm_head)",
                                  "gptq(bits=3,group=16,sym=false,act_order=true,exclude=lm_head)"])
def test_zeros_survive_a_following_quantizer(tiny, then: str) -> None:
    _, captured, calib = tiny
    module = captured.clone()
    pipe = f"sparsify(method=sparsegpt,pattern=2:4,exclude=lm_head),{then}"
    module, records = run_pipeline(module, pipe, calibration=calib, progress=False)
    qstats = records[1].stats
    assert "sparse_layers" in qstats and qstats["quantized"] == 14
    weights = module.weights()
    for node in module.graph.nodes:
        if node.op != "call_function" or node.target is not WQ:
            continue
        _, qn, sn, zn, _, bits, group = node.args[:7]
        w_hat = dequantize(weights[module.weight_name(qn)], weights[module.weight_name(sn)],
                           None if zn is None else weights[module.weight_name(zn)], bits, group)
        kept = (w_hat != 0).reshape(w_hat.shape[0], -1, 4).sum(-1)
        assert torch.all(kept <= 2), source_path(node)  # 2:4 still holds on what is stored
        spec = compression(node)
        assert spec["pattern"] == "2:4" and spec["sparsify_method"] == "sparsegpt" and spec["sparsity"] >= 0.5
        assert qstats["layers"][source_path(node)]["sparsity"] >= 0.5


@pytest.mark.parametrize("options,match", [
    ({"sparsity": 0.0}, r"sparsity=0.0 must be in \(0, 1\)"),
    ({"sparsity": 1.0}, r"sparsity=1.0 must be in \(0, 1\)"),
    ({"pattern": "4:2"}, "neither 'unstructured' nor N:M"),
    ({"pattern": "2-4"}, "neither 'unstructured' nor N:M"),
    ({"pattern": "0:4"}, "neither 'unstructured' nor N:M"),
    ({"pattern": "2:4", "sparsity": 0.6}, "removes 0.5 of the weights, not sparsity=0.6"),
    ({"pattern": "2:3"}, "block=128 must be a multiple of M=3"),
    ({"method": "obs"}, "is not one of"),
    ({"damp": 0.0}, "damp=0.0"),
])
def test_bad_options(options, match) -> None:
    with pytest.raises(ConfigError, match=match):
        SparsifyOptions.from_mapping(options, pass_name="sparsify")


def test_layers_that_do_not_fit_the_pattern_are_all_listed_before_any_work() -> None:
    net = torch.nn.Sequential(torch.nn.Linear(16, 12), torch.nn.ReLU(), torch.nn.Linear(12, 6), torch.nn.ReLU(),
                              torch.nn.Linear(6, 8)).eval()
    module = capture(net, (torch.randn(2, 16),))
    before = {k: v.clone() for k, v in module.weights().items()}
    with pytest.raises(ConfigError) as e:
        _sparsify(module, pattern="4:8")
    msg = str(e.value)
    assert "2 layer(s) do not fit pattern=4:8" in msg
    assert "layer '2' has 12" in msg and "layer '4' has 6" in msg and "'0'" not in msg
    assert all(torch.equal(before[k], v) for k, v in module.weights().items())  # untouched
    # through a pipeline, preflight lists them (with any quantizer's misfits) before the first pass runs
    with pytest.raises(ConfigError, match="nothing was run") as e:
        run_pipeline(module, "sparsify(pattern=4:8),quantize(bits=4,group=16)", progress=False)
    assert str(e.value).count("sparsify: pattern=4:8") == 2
    res = _sparsify(module, pattern="4:8", include=("0",))  # the layer that fits
    assert res.stats["sparsified"] == 1


def test_calibrated_methods_need_data_magnitude_does_not(tiny) -> None:
    _, captured, _ = tiny
    assert [p.needs_calibration for p in build(parse(
        "sparsify,sparsify(method=wanda),sparsify(method=sparsegpt)"))] == [False, True, True]
    with pytest.raises(ConfigError, match=r"sparsify\(method=wanda\) needs calibration data"):
        _sparsify(captured.clone(), method="wanda")
    with pytest.raises(ConfigError, match="sparsify needs calibration data"):
        run_pipeline(captured.clone(), "sparsify(method=sparsegpt)", progress=False)


def test_registered_and_prints_back() -> None:
    assert get_pass("sparsify") is Sparsify
    text = "sparsify(method=sparsegpt,pattern=2:4,exclude=lm_head),gptq(bits=4,group=128)"
    assert str(parse(text)) == text and parse(str(parse(text))) == parse(text)
    assert build(parse(text))[0].options.nm == (2, 4)


# -- the real model --------------------------------------------------------------------------------------------------
# Calibration: 32 windows of 256 tokens from calib.txt (test_gptq's real_calibration); perplexity on the 16K-token
# valid prefix test_quantize.py scores; every linear but lm_head sparsified. Measured on that prefix (fp32 24.881):
# magnitude 50% 1.0437x, 2:4 1.1306x; Wanda 50% 1.0396x, 2:4 1.1099x; SparseGPT 50% 1.0123x, 2:4 1.0260x
# (~21 s each for Wanda / SparseGPT on one thread, most of it collecting Hessians). The floors sit a little above
# the measurements (the issue asked for SparseGPT <= 1.04x / 1.07x and Wanda <= 1.13x; these are tighter).
@functools.cache
def sparse_perplexity(pipeline: str) -> float:
    module, _ = run_pipeline(capture(real_model()[0]), pipeline, calibration=real_calibration(), progress=False)
    return perplexity_of(module)


@pytest.mark.slow
def test_real_model_sparsegpt_floors_and_beats_magnitude(shared) -> None:
    base = fp32_perplexity()
    r50 = sparse_perplexity("sparsify(method=sparsegpt,exclude=lm_head)") / base
    r24 = sparse_perplexity("sparsify(method=sparsegpt,pattern=2:4,exclude=lm_head)") / base
    m24 = sparse_perplexity("sparsify(method=magnitude,pattern=2:4,exclude=lm_head)") / base
    print(f"SparseGPT 50% {r50:.4f}x  2:4 {r24:.4f}x  magnitude 2:4 {m24:.4f}x fp32")
    assert r50 <= 1.02, f"SparseGPT 50% unstructured: {r50:.5f}x fp32 (floor 1.02x)"
    assert r24 <= 1.035, f"SparseGPT 2:4: {r24:.5f}x fp32 (floor 1.035x)"
    assert r24 < m24, f"SparseGPT 2:4 {r24:.5f}x is not better than magnitude 2:4 {m24:.5f}x"


@pytest.mark.slow
def test_real_model_wanda_floor_and_beats_magnitude(shared) -> None:
    base = fp32_perplexity()
    r = sparse_perplexity("sparsify(method=wanda,exclude=lm_head)") / base
    m = sparse_perplexity("sparsify(method=magnitude,exclude=lm_head)") / base
    print(f"Wanda 50% {r:.4f}x  magnitude 50% {m:.4f}x fp32")
    assert r <= 1.05, f"Wanda 50% unstructured: {r:.5f}x fp32 (floor 1.05x)"
    assert r < m, f"Wanda 50% {r:.5f}x is not better than magnitude 50% {m:.5f}x"
