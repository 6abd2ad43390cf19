"""GPT-2's ``Conv1D`` layers in the IR's linear form (``llmpress.ir.linear_form``).

transformers' GPT-2 computes each projection as ``addmm(b, view(x, [-1, in]), W)`` with ``W`` stored ``[in, out]``;
capture turns that into ``aten.linear(x, W^t, b)`` (``W`` stored transposed under its own name), so the passes find
those layers as they find any ``nn.Linear``. Checked on a tiny random ``GPT2LMHeadModel`` captured generically
(``capture_hf``, as GPT-2 folders load): the graph has no addmm left, prefill and decode equal
transformers' own forward (the rewrite is exact), ``quantize`` lists every Conv1D layer and computes what
transformers computes on the same dequantized weights, and the int4 graph's logits stay above a floor against the
float model's on the reference and on the TVM ``cpu`` build. A lazily loaded GPT-2 stays lazy (its
weights are read transposed), and near misses stay addmm and are reported as skipped, with the reason.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import llmpress
from llmpress.api import run_pipeline
from llmpress.eval.generate import empty_cache
from llmpress.ir.capture_hf import capture_hf

VOCAB, CACHE, LAYERS = 256, 32, 2
# Same fp32 ops on both sides, in another order (attention over the padded static cache, linear vs addmm GEMMs):
# ~2e-7 on logits of magnitude ~1 (tests/ir/test_capture_hf.py), so 1e-5 absolute is tight.
ATOL = 1e-5
CONV1D = [f"transformer.h.{i}.{m}" for i in range(LAYERS) for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc",
                                                                     "mlp.c_proj")]


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=LAYERS, n_head=4, n_positions=CACHE,
                     bos_token_id=VOCAB - 2, eos_token_id=VOCAB - 1)
    hf = GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():  # noise on every parameter: biases (init 0) and norms (init 1) carry information
        for p in hf.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return hf


def _ids(t: int = 9) -> torch.Tensor:
    return torch.randint(0, VOCAB - 2, (1, t), generator=torch.Generator().manual_seed(3))


def _prefill_then_decode(run, lm, x: torch.Tensor, prefill: int) -> torch.Tensor:
    caches = empty_cache(lm)
    logits, *caches = run(x[:, :prefill], torch.zeros(1, dtype=torch.int64), *caches)
    steps = [torch.as_tensor(logits)]
    for p in range(prefill, x.shape[1]):
        logits, *caches = run(x[:, p:p + 1], torch.tensor([p]), *caches)
        steps.append(torch.as_tensor(logits))
    return torch.cat(steps, 1)


@pytest.fixture(scope="module")
def gpt2():
    hf = _gpt2()
    with torch.no_grad():
        want = hf(_ids()).logits
    return hf, capture_hf(hf, cache_len=CACHE), want


def test_conv1d_layers_are_linears_with_transposed_weights(gpt2) -> None:
    from llmpress.ir.meta import source_path

    hf, module, want = gpt2
    hist = module.op_histogram()
    assert "aten.addmm.default" not in hist and hist["aten.linear.default"] == len(CONV1D) + 1, hist  # + lm_head
    lin = [n for n in module.graph.nodes if n.target is torch.ops.aten.linear.default]
    assert sorted(source_path(n) for n in lin) == sorted(CONV1D + ["lm_head"])
    # the views around the addmm are folded: each linear reads [B, T, in], as in every other model
    assert all(n.args[0].meta["val"].dim() == 3 for n in lin)
    params = dict(hf.named_parameters())
    for path in CONV1D:
        w = module.weight_by_name(f"{path}.weight")
        assert torch.equal(w, params[f"{path}.weight"].detach().t())  # [out, in] now, under the checkpoint's name
    module.verify()
    got = _prefill_then_decode(module.run, module.lm, _ids(), prefill=5)
    torch.testing.assert_close(got, want, rtol=0, atol=ATOL)


def _sqnr_db(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float(10 * torch.log10(ref.pow(2).mean() / (x - ref).pow(2).mean()))


# Against the float model, int4 RTN in groups of 16 on these random weights measured 15.6 dB of logit SQNR (about
# 20 dB per weight for a 4-bit absmax grid, compounded over two blocks and the quantized head). A layer quantized in
# the wrong layout (a transposed or row-permuted weight) measured -1 to +1 dB, so 10 dB tells the lossy-but-right
# graph from a broken one with 5 dB to spare. A smaller slip (a dropped bias: 14.6 dB) hides under any such floor:
# the exact checks catch it (the float graph equals transformers; the quantized graph equals transformers running
# on the same dequantized weights; the TVM build equals the reference).
SQNR_FLOOR_DB = 10.0
BITS, GROUP = 4, 16


def _quantized(module):
    return run_pipeline(module.clone(), f"quantize(bits={BITS},group={GROUP})", progress=False)


def _dequantized_hf(hf):
    """transformers' model with every Conv1D weight and the head replaced by its RTN dequantization (groups along
    the input features of the ``[out, in]`` weight): the function the quantized graph must compute."""
    import copy

    from llmpress.passes.quant_common import QuantizedWeight, rtn_quantize

    def rtn(w):
        return QuantizedWeight(*rtn_quantize(w, BITS, GROUP, True), BITS, GROUP).dequantize()

    h = copy.deepcopy(hf)
    with torch.no_grad():
        for block in h.transformer.h:
            for conv in (block.attn.c_attn, block.attn.c_proj, block.mlp.c_fc, block.mlp.c_proj):
                conv.weight.copy_(rtn(conv.weight.t()).t())  # Conv1D stores [in, out]
        h.lm_head.weight = nn.Parameter(rtn(h.lm_head.weight.detach()))  # untied: the embedding stays float
    return h


def test_quantize_lists_every_conv1d_layer(gpt2) -> None:
    hf, module, want = gpt2
    out, results = _quantized(module)
    stats = results[0].stats
    assert stats["quantized"] == len(CONV1D) + 1 and stats["skipped"] == []
    assert sorted(stats["layers"]) == sorted(CONV1D + ["lm_head"])
    assert out.op_histogram()["llmpress.wq_linear.default"] == len(CONV1D) + 1
    got = _prefill_then_decode(out.run, out.lm, _ids(), prefill=5)
    with torch.no_grad():
        exact = _dequantized_hf(hf)(_ids()).logits
    torch.testing.assert_close(got, exact, rtol=0, atol=ATOL)
    assert _sqnr_db(got, want) > SQNR_FLOOR_DB


@pytest.mark.tvm
def test_quantized_gpt2_on_tvm_cpu(gpt2) -> None:
    """The int4 graph lowered for ``cpu`` computes what the reference computes (1e-5 of the logits' scale, as every
    TVM model check), and stays above the floor against the float model through the cache."""
    pytest.importorskip("tvm")
    from llmpress.backends.tvm import TVMBackend

    _, module, want = gpt2
    out, _ = _quantized(module)
    compiled = TVMBackend().lower(out, "cpu", progress=False)
    got = _prefill_then_decode(compiled, out.lm, _ids(), prefill=5)
    ref = _prefill_then_decode(out.run, out.lm, _ids(), prefill=5)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5 * float(ref.abs().max()) + 1e-6)
    assert _sqnr_db(got, want) > SQNR_FLOOR_DB


def test_lazy_gpt2_stays_lazy(tmp_path) -> None:
    """transformers' GPT-2 built with fake parameters (``loaders.hf_generic``, as for any generic folder): each
    Conv1D weight keeps its checkpoint source, now read transposed, and the compiled graph equals transformers."""
    from torch._subclasses.fake_tensor import FakeTensor

    from llmpress.ir.loaders.hf_generic import load_generic

    hf = _gpt2()
    hf.save_pretrained(str(tmp_path / "gpt2"))
    model = load_generic(tmp_path / "gpt2", {"model_type": "gpt2"}, cache_len=CACHE, lazy=True)
    module = llmpress.ir.capture(model)
    name = "transformer.h.1.mlp.c_fc.weight"
    assert module.is_lazy(name) and module.lazy_source(name).transposed
    assert isinstance(module.stored_weights()[name], FakeTensor)
    assert tuple(module.stored_weights()[name].shape) == (256, 64)  # [out = 4 * n_embd, in]
    assert torch.equal(module.weight_by_name(name), hf.transformer.h[1].mlp.c_fc.weight.detach().t())
    with torch.no_grad():
        want = hf(_ids()).logits
    torch.testing.assert_close(_prefill_then_decode(module.run, module.lm, _ids(), 5), want, rtol=0, atol=ATOL)


class _Near(nn.Module):
    """``x @ W + b`` twice on one weight: once as a layer, once read again (its layout must not change under it)."""

    def __init__(self, alpha: float = 1.0, shared: bool = False) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(6, 4))
        self.b = nn.Parameter(torch.randn(4))
        self.alpha, self.shared = alpha, shared

    def forward(self, x):
        y = torch.addmm(self.b, x, self.w, alpha=self.alpha)
        return y + self.w.sum() if self.shared else y


@pytest.mark.parametrize("kw, why", [(dict(shared=True), "weight w is also read by other nodes"),
                                     (dict(alpha=2.0), "addmm with alpha/beta other than 1")])
def test_near_misses_stay_addmm_and_are_reported(kw, why) -> None:
    x = torch.randn(3, 6)
    module = llmpress.ir.capture(_Near(**kw), (x,), dynamic=False)
    assert module.op_histogram()["aten.addmm.default"] == 1 and "aten.linear.default" not in module.op_histogram()
    out, results = run_pipeline(module, "quantize(bits=4,group=0)", progress=False)
    stats = results[0].stats
    assert stats["quantized"] == 0 and len(stats["skipped"]) == 1
    assert stats["skipped"][0][1] == f"addmm on a stored weight left out of the linear form: {why}"
    assert why in stats["reason"]


def test_plain_addmm_layer_is_a_linear() -> None:
    """The same layer without the extra read: a linear on ``W^t``, the same function as the addmm."""
    near = _Near()
    x = torch.randn(3, 6)
    module = llmpress.ir.capture(near, (x,), dynamic=False)
    assert "aten.addmm.default" not in module.op_histogram() and module.op_histogram()["aten.linear.default"] == 1
    assert tuple(module.weights()["w"].shape) == (4, 6)
    torch.testing.assert_close(module.run(x), near(x), rtol=1e-6, atol=1e-6)
