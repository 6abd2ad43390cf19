"""``llmpress::wq_linear``: layout round-trips, the reference kernel against plain math, fake kernel, export."""
from __future__ import annotations

import pytest
import torch

import llmpress.ir.ops  # noqa: F401 - registers torch.ops.llmpress.*
from llmpress.ir.capture import capture
from llmpress.ir.ops.wq_linear import (
    dequantize,
    pack_weight,
    packed_in_features,
    qrange,
    unpack_weight,
)

BITS = (2, 3, 4, 8)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("sym", [True, False])
def test_pack_unpack_round_trip(bits: int, sym: bool) -> None:
    lo, hi = qrange(bits, sym)
    g = torch.Generator().manual_seed(bits)
    q = torch.randint(lo, hi + 1, (7, 64), generator=g)
    q[0, :2] = torch.tensor([lo, hi])  # the extremes must survive
    packed = pack_weight(q, bits, sym=sym)
    expected_cols = {8: 64, 4: 32, 3: 24, 2: 16}[bits]
    assert packed.shape == (7, expected_cols)
    assert packed.dtype == (torch.int8 if bits == 8 and sym else torch.uint8)
    assert packed_in_features(packed, bits) == 64
    assert torch.equal(unpack_weight(packed, bits, sym=sym), q.to(torch.int32))


def test_documented_nibble_and_bit_layout() -> None:
    # 4-bit symmetric: element 2j low nibble, 2j+1 high nibble, stored offset binary (q + 8).
    q = torch.tensor([[-8, 7, 0, -1]])
    assert pack_weight(q, 4, sym=True).tolist() == [[0 | (15 << 4), 8 | (7 << 4)]]
    # 2-bit asymmetric: element 4j+k in bits 2k..2k+1.
    q2 = torch.tensor([[1, 2, 3, 0]])
    assert pack_weight(q2, 2, sym=False).tolist() == [[1 | (2 << 2) | (3 << 4)]]
    # 3-bit: 8 codes in a little-endian 24-bit word, element k at bit 3k.
    q3 = torch.arange(8).view(1, 8)
    word = sum(k << (3 * k) for k in range(8))
    assert pack_weight(q3, 3, sym=False).tolist() == [[word & 0xFF, (word >> 8) & 0xFF, word >> 16]]


def test_pack_rejects_out_of_range_and_bad_width() -> None:
    with pytest.raises(ValueError, match="outside"):
        pack_weight(torch.tensor([[8, 0]]), 4, sym=True)
    with pytest.raises(ValueError, match="divisible by 8"):
        pack_weight(torch.zeros(2, 12, dtype=torch.int32), 3, sym=True)
    with pytest.raises(ValueError, match="bits"):
        pack_weight(torch.zeros(2, 8, dtype=torch.int32), 5, sym=True)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("sym", [True, False])
def test_reference_kernel_equals_x_times_dequantized_weight(bits: int, sym: bool) -> None:
    g = torch.Generator().manual_seed(10 + bits)
    out_f, in_f, group = 12, 64, 16
    lo, hi = qrange(bits, sym)
    q = torch.randint(lo, hi + 1, (out_f, in_f), generator=g)
    s = torch.rand(out_f, in_f // group, generator=g) + 0.1
    z = None if sym else torch.randint(0, hi + 1, (out_f, in_f // group), generator=g).to(torch.uint8)
    bias = torch.randn(out_f, generator=g)
    x = torch.randn(3, 5, in_f, generator=g)
    qw = pack_weight(q, bits, sym=sym)
    y = torch.ops.llmpress.wq_linear(x, qw, s, z, bias, bits, group)
    # The math written out element by element, independent of dequantize().
    gi = torch.arange(in_f) // group
    zf = torch.zeros(out_f, in_f) if z is None else z.float()[:, gi]
    w = (q.float() - zf) * s[:, gi]
    expected = x @ w.T + bias
    # Both compute the same float32 products; only the summation order may differ (64 terms of size ~1e1).
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(dequantize(qw, s, z, bits, group), w, rtol=0, atol=0)


def test_per_channel_is_group_equal_in_features() -> None:
    q = torch.randint(-128, 128, (4, 32))
    s = torch.rand(4, 1)
    x = torch.randn(2, 32)
    y = torch.ops.llmpress.wq_linear(x, pack_weight(q, 8, sym=True), s, None, None, 8, 32)
    torch.testing.assert_close(y, x @ (q.float() * s).T, rtol=1e-5, atol=1e-4)


def test_fake_kernel_shapes() -> None:
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(2, 7, 64)
        qw = torch.empty(10, 24, dtype=torch.uint8)  # 3-bit, in = 64
        s = torch.empty(10, 2)
        y = torch.ops.llmpress.wq_linear(x, qw, s, None, None, 3, 32)
        assert y.shape == (2, 7, 10) and y.dtype == torch.float32


class _Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.register_buffer("qw", pack_weight(torch.randint(-8, 8, (16, 32), generator=g), 4, sym=True))
        self.scales = torch.nn.Parameter(torch.rand(16, 4, generator=g))
        self.bias = torch.nn.Parameter(torch.randn(16, generator=g))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(torch.ops.llmpress.wq_linear(x, self.qw, self.scales, None, self.bias, 4, 8))


def test_capture_run_save_load_round_trip(tmp_path) -> None:
    m = _Tiny()
    x = torch.randn(2, 3, 32)
    mod = capture(m, (x,), dynamic=False)
    assert mod.op_histogram()["llmpress.wq_linear.default"] == 1
    mod.verify()
    y = mod.run(x)
    torch.testing.assert_close(y, m(x), rtol=0, atol=0)
    path = tmp_path / "prog.pt2"
    torch.export.save(mod.exported_program, path)
    loaded = torch.export.load(path)
    torch.testing.assert_close(loaded.module()(x), y, rtol=0, atol=0)
