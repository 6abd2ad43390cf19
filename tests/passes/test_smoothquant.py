"""``smoothquant``: structure and stats on a tiny Llama, exact smoothing, near misses, options, and W8A8 perplexity on
the real model."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from llmpress.errors import ConfigError
from llmpress.ir.capture import capture
from llmpress.passes.base import PassContext
from llmpress.passes.calibration import Calibration
from llmpress.passes.smoothquant import SmoothQuant, SmoothQuantOptions

from ..conftest import CALIB, TINYSTORIES, VALID, llama_inputs, random_calibration


def _run(module, calibration=None, **opts):
    p = SmoothQuant(SmoothQuantOptions.from_mapping(opts, pass_name="smoothquant"))
    return p.run(module, PassContext(calibration=calibration, progress=False))


def test_w8a8_structure_and_stats(tiny_llama) -> None:
    module = capture(tiny_llama)
    res = _run(module, random_calibration(), exclude="lm_head")
    assert res.modified
    module.verify()
    hist = module.op_histogram()
    assert hist["llmpress.w8a8_linear.default"] == 14  # 7 linears x 2 layers
    assert hist["aten.linear.default"] == 1  # lm_head, excluded
    st = res.stats
    assert st["quantized"] == 14 and st["skipped"] == [("lm_head", "excluded by 'lm_head'")]
    # Per layer: input_layernorm -> q/k/v, post_attention_layernorm -> gate/up, up_proj rows -> down_proj.
    assert st["smoothed"] == 6
    kinds = sorted(s["kind"] for s in st["sites"].values())
    assert kinds == ["gated_linear"] * 2 + ["norm"] * 4
    assert [p for p, _ in st["not_smoothed"]] == ["model.layers.0.self_attn.o_proj", "model.layers.1.self_attn.o_proj"]
    assert all(why.startswith("input is the attention output") and "KV cache" in why for _, why in st["not_smoothed"])
    assert st["bytes_after"] < st["bytes_before"] / 3.5  # int8 + one f32 scale per row, from f32
    for path, layer in st["layers"].items():
        assert layer["out_sqnr_db"] > 30.0, path  # int8 x int8 on a random model: ~40 dB per layer
    # The wq weights are int8 buffers, the scales float parameters; old float weights are gone.
    names = set(module.weights())
    assert "model.layers.0.self_attn.q_proj.qweight" in names and "model.layers.0.self_attn.q_proj.weight" not in names
    assert module.weights()["model.layers.0.self_attn.q_proj.qweight"].dtype == torch.int8


def test_smoothing_alone_is_exact(tiny_llama) -> None:
    # Plant an activation outlier channel so the scales are far from 1 (the test would be trivial otherwise).
    with torch.no_grad():
        tiny_llama.model.layers[0].input_layernorm.weight[3] = 30.0
    module = capture(tiny_llama)
    inputs = llama_inputs(tiny_llama)
    ref = module.run(*inputs)
    original = {k: v.clone() for k, v in module.weights().items()}
    smoothed = module.clone()
    res = _run(smoothed, random_calibration(), quantize=False, alpha=0.8)
    assert res.modified and res.stats["quantized"] == 0
    smoothed.verify()
    assert smoothed.op_histogram() == module.op_histogram()
    assert max(s["scale_max"] / s["scale_min"] for s in res.stats["sites"].values()) > 10.0
    out = smoothed.run(*inputs)
    # Only float rounding differs (x / s * s): a few ulps of values of size ~1, far below any quantization step.
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # The weights of the original module (shared by clone()) were not modified in place.
    for k, v in module.weights().items():
        assert torch.equal(v, original[k]), k
    assert not torch.equal(smoothed.weights()["model.layers.0.input_layernorm.weight"],
                           module.weights()["model.layers.0.input_layernorm.weight"])


class _NearMiss(nn.Module):
    """A norm whose output also feeds a relu, and one whose weight is shared by two muls."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.g1 = nn.Parameter(torch.rand(16) + 0.5)
        self.g2 = nn.Parameter(torch.rand(16) + 0.5)
        self.a = nn.Linear(16, 8, bias=False)
        self.b = nn.Linear(16, 8, bias=False)
        self.c = nn.Linear(16, 8, bias=False)

    def forward(self, x):
        n = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5)
        h1 = n * self.g1
        y1 = self.a(h1) + torch.relu(h1).sum(-1, keepdim=True)
        y2 = self.b(n * self.g2) + self.c(x * self.g2)
        return y1 + y2


def test_near_misses_are_not_smoothed_and_say_why() -> None:
    from llmpress.passes.scale_folding import find_sites
    from llmpress.passes.select import select_linears

    model = _NearMiss().eval()
    module = capture(model, (torch.randn(1, 4, 16),), dynamic=False)
    selected, _ = select_linears(module, SmoothQuantOptions())
    sites, not_scaled = find_sites(module, selected)
    assert sites == []
    why = {n.args[1].name: w for n, w in not_scaled}
    assert len(why) == 3
    assert "also feeds relu" in why["p_a_weight"]
    assert "is shared by 2 nodes" in why["p_b_weight"] and "is shared by 2 nodes" in why["p_c_weight"]


def test_bad_options_and_missing_calibration(tiny_llama) -> None:
    with pytest.raises(ConfigError, match="alpha=1.5 must be between 0 and 1"):
        SmoothQuantOptions.from_mapping({"alpha": 1.5}, pass_name="smoothquant")
    with pytest.raises(ConfigError, match="unknown option 'bits'"):
        SmoothQuantOptions.from_mapping({"bits": 8}, pass_name="smoothquant")
    module = capture(tiny_llama)
    text = module.print()
    with pytest.raises(ConfigError, match=r"smoothquant needs calibration data \(--calib FILE or calibration=...\)"):
        _run(module, None)
    assert module.print() == text


def test_second_run_changes_nothing(tiny_llama) -> None:
    module = capture(tiny_llama)
    _run(module, random_calibration(), exclude="lm_head")
    text = module.print()
    res = _run(module, random_calibration(), exclude="lm_head")
    assert not res.modified and module.print() == text


@pytest.mark.slow
def test_tinystories_w8a8_perplexity(shared) -> None:
    """W8A8 (alpha 0.5, every linear but lm_head) <= 1.005x fp32 perplexity on the first 8,192 tokens of TinyStories
    valid, calibrated on 32 x 256 tokens of calib.txt (measured: 25.324 against 25.319, 1.0002x). Why 1.005x:
    weight-only int8 costs nothing measurable on this model (README: 1.0000x) and per-token int8 activations add a
    relative error of ~1/254 of each token's absmax to every linear input; half a percent is the budget the issue
    gives int8 KV caches, and a wrong fold or a broken grid costs far more (a scale folded the wrong way round
    changes the function: the exactness test catches it at 1e-5)."""
    from llmpress.eval import perplexity, token_stream
    from llmpress.ir.loaders import load_model

    loaded = load_model(TINYSTORIES)
    stream = token_stream(VALID, loaded.tokenizer, max_tokens=8192)
    module = capture(loaded.model)
    base = perplexity(module.run, module.lm, stream, progress=False).perplexity
    cal = Calibration.from_texts(CALIB, loaded.tokenizer, samples=32, seq_len=256, seed=0)
    res = _run(module, cal, alpha=0.5, exclude="lm_head")
    assert res.stats["quantized"] == 56 and res.stats["smoothed"] == 24
    ppl = perplexity(module.run, module.lm, stream, progress=False).perplexity
    print(f"smoothquant w8a8: fp32 {base:.4f} -> {ppl:.4f} ({ppl / base:.5f}x)")
    assert ppl <= 1.005 * base
