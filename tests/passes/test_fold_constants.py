"""fold_constants: folds what does not depend on inputs, never grows the weights, leaves random/symbolic alone."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from llmpress.ir.capture import capture
from tests.decoder import Llama, LlamaConfig
from llmpress.passes.base import PassContext
from llmpress.passes.fold_constants import FoldConstants
from llmpress.passes.pipeline import build

CTX = PassContext(progress=False)


def _fold(module, text: str = "fold_constants"):
    (p,) = build(text)
    return p.run(module, CTX)


class _TransposedWeight(nn.Module):
    """y = x @ (W^T * 2): the constant subgraph reads W only, so W^T*2 replaces W (same bytes)."""

    def __init__(self, also_linear: bool = False) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(6, 4))
        self.also_linear = also_linear

    def forward(self, x):
        y = x @ (self.w.t() * 2)
        if self.also_linear:  # W has another user: folding W^T*2 would store W twice
            y = y + nn.functional.linear(x, self.w)
        return y


def test_folds_transposed_weight_without_growing() -> None:
    torch.manual_seed(0)
    m = capture(_TransposedWeight(), (torch.randn(3, 4),), dynamic=False)
    x = torch.randn(3, 4)
    ref = m.run(x)
    before = m.op_histogram()
    res = _fold(m)
    assert res.modified
    assert res.stats["folded"] == 2 and res.stats["removed_weights"] == ["w"]
    (name,) = res.stats["new_weights"]
    assert m.weights()[name].shape == (4, 6) and "w" not in m.weights()
    assert before - m.op_histogram() == {"aten.t.default": 1, "aten.mul.Tensor": 1}
    m.verify()
    # The folded buffer holds bit-identical values, but it is stored contiguous where the run-time value was a
    # transposed view, so matmul may take another BLAS path and sum the length-4 dot products in another order:
    # a few fp32 ulps (measured 1.1e-7 relative). 1e-6 allows that and nothing more.
    torch.testing.assert_close(m.run(x), ref, rtol=1e-6, atol=1e-6)
    again = _fold(m)
    assert not again.modified and again.stats["folded"] == 0


def test_does_not_duplicate_a_weight_with_other_users() -> None:
    torch.manual_seed(0)
    m = capture(_TransposedWeight(also_linear=True), (torch.randn(3, 4),), dynamic=False)
    text = m.print()
    res = _fold(m)
    assert not res.modified and m.print() == text
    assert res.stats["skipped"]["grows_weights"] == 2


class _Random(nn.Module):
    def forward(self, x):
        return x + torch.rand(4) * 0 + torch.arange(4, dtype=torch.float32)


def test_random_ops_are_not_folded_but_literals_are() -> None:
    m = capture(_Random(), (torch.randn(2, 4),), dynamic=False)
    res = _fold(m)
    assert res.stats["skipped"]["random_op"] == 1
    hist = m.op_histogram()
    assert hist["aten.rand.default"] == 1  # still drawn at run time
    assert hist["aten.arange.default"] == 0 and res.modified  # arange(4) became a buffer
    m.verify()


def test_max_literal_bytes_limits_literal_folding() -> None:
    m = capture(_Random(), (torch.randn(2, 4),), dynamic=False)
    text = m.print()
    res = _fold(m, "fold_constants(max_literal_bytes=8)")  # arange(4) in fp32 is 16 bytes
    assert not res.modified and m.print() == text
    assert res.stats["skipped"]["literal_too_big"] >= 1


@pytest.fixture(scope="module")
def llama():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64, max_seq_len=32)
    model = Llama(cfg).eval()
    return model, capture(model)


def test_llama_folds_the_mask_positions_and_stays_exact(llama) -> None:
    model, captured = llama
    m = captured.clone()
    g = torch.Generator().manual_seed(1)
    prefill = (torch.randint(0, 64, (1, 6), generator=g), torch.tensor([0]), *model.empty_cache())
    decode = (torch.randint(0, 64, (1, 1), generator=g), torch.tensor([6]),
              *[torch.randn(c.shape, generator=g) for c in model.empty_cache()])
    refs = [m.run(*prefill), m.run(*decode)]
    before = m.op_histogram()
    res = _fold(m)
    # arange(cache_len)[None, :] is the only input-independent computation; arange(T) depends on the input length.
    assert res.modified and res.stats["new_weights"] == ["folded_unsqueeze"]
    assert before - m.op_histogram() == {"aten.arange.default": 1, "aten.unsqueeze.default": 1}
    assert m.op_histogram()["aten.arange.default"] == 1  # the symbolic one stays
    m.verify()
    for ref, inputs in zip(refs, (prefill, decode)):
        for a, b in zip(ref, m.run(*inputs)):
            torch.testing.assert_close(b, a, rtol=0, atol=0)
    assert not _fold(m).modified


def test_options_validated() -> None:
    from llmpress.errors import ConfigError

    with pytest.raises(ConfigError, match="max_literal_bytes"):
        FoldConstants.Options.from_mapping({"max_literal_bytes": -1})
