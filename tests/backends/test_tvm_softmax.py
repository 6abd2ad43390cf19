"""The CPU softmax kernel (``llmpress/backends/tvm/kernels/softmax.py``) against ``torch.softmax``, and where the
TVM backend uses it."""
from __future__ import annotations

import pytest
import torch

from llmpress.ir.capture import capture

pytestmark = pytest.mark.tvm


class _Softmax(torch.nn.Module):
    def forward(self, scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return torch.softmax(scores.masked_fill(mask, float("-inf")), dim=-1)


def _kernels(mod) -> set[str]:
    return {gv.name_hint for gv in mod.get_global_vars()}


@pytest.mark.parametrize("rows", [1, 7])
def test_softmax_kernel_matches_torch(rows: int) -> None:
    """Masked attention-style rows (causal -inf tails, one row masked but for one entry): every probability agrees
    with PyTorch's within 2e-6 relative + 1e-12 absolute. ``fast_exp``'s relative error is ~1e-7 and the 16-way
    partial sums reorder float32 additions (relative ~D * 2^-24 = 3e-5 worst case, ~1e-7 in practice); masked
    entries come out ~1e-39 instead of 0, hence the tiny absolute term."""
    from llmpress.backends.tvm import TVMBackend

    g = torch.Generator().manual_seed(0)
    scores = 4 * torch.randn(1, 4, rows, 64, generator=g)
    mask = torch.arange(64)[None, None, None, :] > (torch.arange(rows) * 9 + 20)[None, None, :, None]
    mask = mask.expand(1, 4, rows, 64).clone()
    mask[0, 0, 0, 1:] = True  # a row with a single allowed entry: probability 1 there
    module = capture(_Softmax().eval(), (scores, mask), dynamic=False)
    compiled = TVMBackend().lower(module, "cpu", progress=False)
    got = torch.as_tensor(compiled(scores, mask))
    ref = torch.softmax(scores.masked_fill(mask, float("-inf")), dim=-1)
    torch.testing.assert_close(got, ref, rtol=2e-6, atol=1e-12)
    assert float(got[0, 0, 0, 0]) == pytest.approx(1.0, abs=1e-7)


def test_backend_uses_it_on_cpu_only() -> None:
    from llmpress.backends.tvm.lower import to_relax

    scores, mask = torch.randn(1, 2, 3, 32), torch.zeros(1, 2, 3, 32, dtype=torch.bool)
    module = capture(_Softmax().eval(), (scores, mask), dynamic=False)
    module.lm = None
    assert "llmpress_softmax" in _kernels(to_relax(module, cpu_kernels=True).mod)
    assert "llmpress_softmax" not in _kernels(to_relax(module).mod)  # GPU targets: TVM's softmax + dlight


def test_other_widths_keep_tvms_softmax() -> None:
    from llmpress.backends.tvm.lower import to_relax

    scores, mask = torch.randn(1, 2, 3, 20), torch.zeros(1, 2, 3, 20, dtype=torch.bool)
    module = capture(_Softmax().eval(), (scores, mask), dynamic=False)
    module.lm = None
    assert "llmpress_softmax" not in _kernels(to_relax(module, cpu_kernels=True).mod)
