"""``llmpress::w8a8_linear`` and ``llmpress::kv_fake_quant``: reference kernels against integer math, fake kernels,
capture / run / save / load."""
from __future__ import annotations

import pytest
import torch

import llmpress.ir.ops  # noqa: F401 - registers torch.ops.llmpress.*
from llmpress.ir.capture import capture
from llmpress.ir.ops.kv_quant import quantize_kv
from llmpress.ir.ops.w8a8 import dequantize_weight, quantize_activation, quantize_weight


def test_quantize_weight_is_symmetric_per_channel() -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 40, generator=g)
    w[2] = 0.0  # an all-zero row must not divide by zero
    qw, ws = quantize_weight(w)
    assert qw.dtype == torch.int8 and qw.shape == (6, 40) and ws.shape == (6,)
    assert int(qw.abs().max()) == 127 and int(qw.min()) >= -127
    assert torch.equal(qw[2], torch.zeros(40, dtype=torch.int8))
    # Round to nearest: the error of each element is at most half a step of its row.
    err = (dequantize_weight(qw, ws) - w).abs()
    assert bool((err <= ws[:, None] / 2 + 1e-7).all())


@pytest.mark.parametrize("in_f", [48, 2048])  # float32-exact accumulation, and the float64 path (2048*127^2 > 2^24)
def test_reference_kernel_equals_integer_math(in_f: int) -> None:
    g = torch.Generator().manual_seed(in_f)
    out_f = 9
    x = torch.randn(2, 5, in_f, generator=g) * 3
    x[0, 1] = 0.0  # a zero token
    w = torch.randn(out_f, in_f, generator=g)
    bias = torch.randn(out_f, generator=g)
    qw, ws = quantize_weight(w)
    y = torch.ops.llmpress.w8a8_linear(x, qw, ws, bias)
    assert y.shape == (2, 5, out_f)
    # Written out with int64 integer arithmetic, independent of the kernel's float accumulation.
    x2 = x.reshape(-1, in_f)
    sx = x2.abs().amax(1) / 127
    sx = torch.where(sx > 0, sx, torch.ones_like(sx))
    qx = torch.round(x2 / sx[:, None]).clamp(-127, 127).to(torch.int64)
    acc = qx @ qw.to(torch.int64).T
    expected = (acc.to(torch.float32) * sx[:, None] * ws[None, :] + bias).reshape(2, 5, out_f)
    # Exact integer accumulation on both sides: only the final float products may round differently (1 ulp).
    torch.testing.assert_close(y, expected, rtol=1e-6, atol=1e-6)
    assert torch.equal(y[0, 1], bias)  # a zero token gives exactly the bias


def test_w8a8_error_is_small_against_float_linear() -> None:
    # Lossy by design: per-token and per-channel int8 on Gaussian data keep SQNR well above 30 dB
    # (each factor alone is ~40 dB: step/sqrt(12) against a signal of ~absmax/3).
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 128, generator=g)
    w = torch.randn(32, 128, generator=g)
    qw, ws = quantize_weight(w)
    y = torch.ops.llmpress.w8a8_linear(x, qw, ws, None)
    ref = x @ w.T
    sqnr = 10 * torch.log10(ref.pow(2).sum() / (y - ref).pow(2).sum())
    assert float(sqnr) > 30.0
    qx, sx = quantize_activation(x)
    assert float(qx.abs().max()) == 127.0


def test_kv_fake_quant_per_token_head() -> None:
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, 2, 5, 8, generator=g)
    x[0, 1, 3] = 0.0
    y = torch.ops.llmpress.kv_fake_quant(x, 8)
    assert y.shape == x.shape and y.dtype == x.dtype
    s = x.abs().amax(-1, keepdim=True) / 127
    expected = torch.where(s > 0, torch.round(x / torch.where(s > 0, s, 1)).clamp(-127, 127) * s, 0.0)
    # Same float ops in the same order: bit-identical.
    torch.testing.assert_close(y, expected, rtol=0, atol=0)
    assert torch.equal(y[0, 1, 3], torch.zeros(8))
    # The absmax element of each vector is reproduced exactly up to one rounding of s*127.
    torch.testing.assert_close(y.abs().amax(-1), x.abs().amax(-1), rtol=1e-6, atol=0)
    codes, scales = quantize_kv(x, 8)
    assert codes.dtype == torch.int8 and scales.shape == (1, 2, 5)
    torch.testing.assert_close(codes.float() * scales[..., None], y, rtol=0, atol=0)
    with pytest.raises(ValueError, match="bits"):
        quantize_kv(x, 9)


def test_fake_kernel_shapes() -> None:
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        y = torch.ops.llmpress.w8a8_linear(torch.empty(2, 7, 64), torch.empty(10, 64, dtype=torch.int8),
                                           torch.empty(10), None)
        assert y.shape == (2, 7, 10) and y.dtype == torch.float32
        k = torch.ops.llmpress.kv_fake_quant(torch.empty(1, 2, 7, 8), 8)
        assert k.shape == (1, 2, 7, 8)


class _Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        qw, ws = quantize_weight(torch.randn(16, 32, generator=g))
        self.register_buffer("qw", qw)
        self.ws = torch.nn.Parameter(ws)
        self.bias = torch.nn.Parameter(torch.randn(16, generator=g))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.llmpress.w8a8_linear(x, self.qw, self.ws, self.bias)
        return torch.ops.llmpress.kv_fake_quant(y.view(2, 3, 4, 4), 8)


def test_capture_run_save_load_round_trip(tmp_path) -> None:
    m = _Tiny()
    x = torch.randn(2, 3, 32)
    mod = capture(m, (x,), dynamic=False)
    hist = mod.op_histogram()
    assert hist["llmpress.w8a8_linear.default"] == 1 and hist["llmpress.kv_fake_quant.default"] == 1
    mod.verify()
    y = mod.run(x)
    torch.testing.assert_close(y, m(x), rtol=0, atol=0)
    path = tmp_path / "prog.pt2"
    torch.export.save(mod.exported_program, path)
    loaded = torch.export.load(path)
    torch.testing.assert_close(loaded.module()(x), y, rtol=0, atol=0)
