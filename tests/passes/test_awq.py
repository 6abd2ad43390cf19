"""``awq``: structure and stats on a tiny Llama, the search never loses to RTN on its objective, salient channels are
protected, options, and int3 perplexity against RTN on the real model."""
from __future__ import annotations

import pytest
import torch

from llmpress.errors import ConfigError
from llmpress.ir.capture import capture
from llmpress.passes.awq import AWQ, AWQOptions, output_error, search_scale
from llmpress.passes.base import PassContext
from llmpress.passes.calibration import Calibration
from llmpress.passes.quantize import Quantize, QuantizeOptions

from ..conftest import CALIB, TINYSTORIES, VALID, llama_inputs, random_calibration


def _awq(module, calibration=None, **opts):
    p = AWQ(AWQOptions.from_mapping(opts, pass_name="awq"))
    return p.run(module, PassContext(calibration=calibration, progress=False))


def _sqnr(ref: torch.Tensor, out: torch.Tensor) -> float:
    return float(10 * torch.log10(ref.pow(2).sum() / (ref - out).pow(2).sum()))


def test_structure_and_stats(tiny_llama) -> None:
    module = capture(tiny_llama)
    res = _awq(module, random_calibration(), bits=4, group=16, exclude="lm_head")
    assert res.modified
    module.verify()
    hist = module.op_histogram()
    assert hist["llmpress.wq_linear.default"] == 14 and hist["aten.linear.default"] == 1
    st = res.stats
    assert st["quantized"] == 14 and st["skipped"] == [("lm_head", "excluded by 'lm_head'")]
    # Scales go into the two norms and up_proj's rows (for down_proj) of each layer; o_proj stays unscaled.
    assert st["scaled"] == 6
    assert sorted(s["kind"] for s in st["sites"].values()) == ["gated_linear"] * 2 + ["norm"] * 4
    assert [p for p, _ in st["not_scaled"]] == ["model.layers.0.self_attn.o_proj", "model.layers.1.self_attn.o_proj"]
    assert st["weights_rescaled"] == 4  # the 4 norm weights; up_proj's rows went into its quantized weight
    # q/k/v share one scale (one norm), so one exponent.
    layer = st["layers"]
    assert layer["model.layers.0.self_attn.q_proj"]["alpha"] == layer["model.layers.0.self_attn.v_proj"]["alpha"]
    for site in st["sites"].values():
        assert site["loss_awq"] <= site["loss_rtn"]  # a = 0 is RTN, so the search never loses on its objective
    for path, ly in layer.items():
        # Scaling + clipping are chosen on this very objective: never worse than RTN (float rounding aside).
        assert ly["out_error"] <= ly["rtn_out_error"] * (1 + 1e-4), path
    # Same storage as RTN: the layout and bytes of quantize(bits=4, group=16).
    rtn = capture(tiny_llama)
    rst = Quantize(QuantizeOptions(bits=4, group=16, exclude=("lm_head",))).run(rtn, PassContext(progress=False))
    assert st["bytes_after"] == rst.stats["bytes_after"] and st["bytes_before"] == rst.stats["bytes_before"]


def test_second_run_changes_nothing(tiny_llama) -> None:
    module = capture(tiny_llama)
    _awq(module, random_calibration(), bits=4, group=16, exclude="lm_head")
    text = module.print()
    res = _awq(module, random_calibration(), bits=4, group=16, exclude="lm_head")
    assert not res.modified and res.stats["quantized"] == 0 and module.print() == text


def test_search_scale_a0_is_rtn_and_picks_the_minimum() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 32, generator=g)
    x[:, 5] *= 20.0  # one salient channel
    w = torch.randn(16, 32, generator=g)
    h = x.T @ x / x.shape[0]
    s, a, losses = search_scale([w], [16], h, x.abs().mean(0), bits=3, sym=True, n_grid=20)
    from llmpress.passes.quant_common import QuantizedWeight, rtn_quantize

    assert len(losses) == 20
    rtn = QuantizedWeight(*rtn_quantize(w, 3, 16, True), 3, 16).dequantize()  # what `quantize` stores
    # a = 0 is exactly RTN: same grid; the two losses differ only in float summation order.
    assert losses[0] == pytest.approx(output_error(w - rtn, h), rel=1e-5)
    assert min(losses) == losses[int(round(a * 20))]
    assert a > 0 and min(losses) < 0.8 * losses[0]  # the outlier channel makes scaling clearly worth it
    assert int(s.argmax()) == 5


def test_protects_salient_channels_better_than_rtn(tiny_llama) -> None:
    # Make a few input channels of every norm salient (large activations); AWQ should beat RTN on the logits of
    # held-out tokens at 3 bits. Without such channels the random tiny model gives AWQ nothing to find.
    with torch.no_grad():
        for layer in tiny_llama.model.layers:
            layer.input_layernorm.weight[[1, 7]] = 8.0
            layer.post_attention_layernorm.weight[[2, 11]] = 8.0
    inputs = llama_inputs(tiny_llama, t=16, seed=9)
    ref = capture(tiny_llama).run(*inputs)[0]
    rtn = capture(tiny_llama)
    Quantize(QuantizeOptions(bits=3, group=16, exclude=("lm_head",))).run(rtn, PassContext(progress=False))
    awq = capture(tiny_llama)
    _awq(awq, random_calibration(n=8), bits=3, group=16, exclude="lm_head")
    s_rtn, s_awq = _sqnr(ref, rtn.run(*inputs)[0]), _sqnr(ref, awq.run(*inputs)[0])
    assert s_awq > s_rtn + 1.0, (s_awq, s_rtn)  # at least 1 dB better


def test_unselected_readers_of_a_scaled_norm_stay_exact(tiny_llama) -> None:
    # k_proj is excluded but reads the same norm as q/v: it must get W diag(s) in float, keeping k exact.
    with torch.no_grad():
        tiny_llama.model.layers[0].input_layernorm.weight[4] = 10.0
    module = capture(tiny_llama)
    inputs = llama_inputs(tiny_llama)
    ref = module.run(*inputs)
    res = _awq(module, random_calibration(), bits=8, group=-1, include="q_proj|v_proj", clip=False)
    module.verify()
    assert res.stats["quantized"] == 4 and res.stats["scaled"] == 2
    assert module.op_histogram()["aten.linear.default"] == 15 - 4
    out = module.run(*inputs)
    # Layer 0's key cache holds k = RoPE(norm(x) W_k^T), which reads no quantized weight: only float rounding.
    torch.testing.assert_close(out[1][:, :, :12], ref[1][:, :, :12], rtol=1e-5, atol=1e-5)
    # int8 per channel elsewhere: logits close (SQNR well above 30 dB).
    assert _sqnr(ref[0], out[0]) > 30.0


def test_bad_options_fail_before_any_work(tiny_llama) -> None:
    with pytest.raises(ConfigError, match="bits=5 is not supported"):
        AWQOptions.from_mapping({"bits": 5}, pass_name="awq")
    with pytest.raises(ConfigError, match="n_grid=0 must be at least 1"):
        AWQOptions.from_mapping({"n_grid": 0}, pass_name="awq")
    module = capture(tiny_llama)
    text = module.print()
    with pytest.raises(ConfigError, match=r"group=24 does not divide in_features=32 of layer "
                                          r"'model.layers.0.self_attn.q_proj'"):
        _awq(module, random_calibration(), bits=4, group=24)
    with pytest.raises(ConfigError, match=r"awq needs calibration data \(--calib FILE or calibration=...\)"):
        _awq(module, None, bits=4, group=16)
    assert module.print() == text


@pytest.mark.slow
def test_tinystories_int3_g128_beats_rtn(shared) -> None:
    """AWQ int3 g128 (symmetric, every linear but lm_head, 32 x 256 calibration tokens of calib.txt) has a lower
    perplexity than RTN int3 g128 on the first 8,192 tokens of TinyStories valid (the issue's floor)."""
    from llmpress.eval import perplexity, token_stream
    from llmpress.ir.loaders import load_model

    loaded = load_model(TINYSTORIES)
    stream = token_stream(VALID, loaded.tokenizer, max_tokens=8192)
    base = capture(loaded.model)
    rtn = base.clone()
    Quantize(QuantizeOptions(bits=3, group=128, exclude=("lm_head",))).run(rtn, PassContext(progress=False))
    p_rtn = perplexity(rtn.run, rtn.lm, stream, progress=False).perplexity
    awq = base.clone()
    cal = Calibration.from_texts(CALIB, loaded.tokenizer, samples=32, seq_len=256, seed=0)
    res = _awq(awq, cal, bits=3, group=128, exclude="lm_head")
    assert res.stats["quantized"] == 56
    p_awq = perplexity(awq.run, awq.lm, stream, progress=False).perplexity
    print(f"int3 g128: RTN {p_rtn:.4f}, AWQ {p_awq:.4f}")
    assert p_awq < p_rtn
