"""In-place KV-cache writes on CPU (``llmpress/backends/tvm/kernels/cache_write.py``): used exactly where it is safe
(a cache input whose only reader is the write), and the caller's cache tensors are updated in place."""
from __future__ import annotations

import pytest
import torch

from llmpress.ir.capture import capture
from llmpress.ir.meta import LMInfo

pytestmark = pytest.mark.tvm


def _counts(mod, fn: str) -> tuple[int, int]:
    text = mod[fn].script()
    return text.count("call_tir_inplace"), text.count("scatter_elements")


def test_cache_writes_are_in_place_only_when_asked(tiny_llama) -> None:
    from llmpress.backends.tvm.lower import to_relax

    module = capture(tiny_llama)
    n = 2 * tiny_llama.config.n_layers
    for fn in ("prefill", "decode"):
        assert _counts(to_relax(module, inplace_cache=True).mod, fn) == (n, 0)
        assert _counts(to_relax(module).mod, fn) == (0, n)  # GPU targets keep the frontend's scatter


def test_int8_cache_writes_codes_and_scales_in_place(tiny_llama) -> None:
    from llmpress.backends.tvm.lower import to_relax
    from llmpress.passes.base import PassContext
    from llmpress.passes.kv_quant import KVQuant, KVQuantOptions

    module = KVQuant(KVQuantOptions()).run(capture(tiny_llama), PassContext(progress=False)).module
    prog = to_relax(module, inplace_cache=True)
    assert _counts(prog.mod, "decode") == (4 * tiny_llama.config.n_layers, 0)
    assert {gv.name_hint for gv in prog.mod.get_global_vars()} >= {"llmpress_cache_write_int8",
                                                                   "llmpress_cache_write_float32"}


def test_callers_cache_is_updated_in_place_and_matches_reference(tiny_llama) -> None:
    from llmpress.backends.tvm import TVMBackend
    from llmpress.eval.generate import empty_cache

    module = capture(tiny_llama)
    compiled = TVMBackend().lower(module, "cpu", progress=False)
    ids = torch.tensor([[1, 5, 9, 3]])
    caches = empty_cache(module.lm)
    ref = module.run(ids, torch.zeros(1, dtype=torch.int64), *empty_cache(module.lm))
    got = compiled(ids, torch.zeros(1, dtype=torch.int64), *caches)
    for passed, returned, expected in zip(caches, got[1:], ref[1:]):
        assert returned.data_ptr() == passed.data_ptr()  # the returned cache is the caller's buffer
        torch.testing.assert_close(passed, expected, rtol=0, atol=1e-5 * float(expected.abs().max()))
    # A decode step on the returned caches writes position 4 only.
    before = [c.clone() for c in got[1:]]
    step = compiled(torch.tensor([[7]]), torch.tensor([4]), *got[1:])
    for old, new in zip(before, step[1:]):
        assert torch.equal(new[:, :, :4], old[:, :, :4]) and torch.equal(new[:, :, 5:], old[:, :, 5:])
        assert not torch.equal(new[:, :, 4], old[:, :, 4])


class _Unsafe(torch.nn.Module):
    """Two scatters that must not become in-place writes: into a cache input that is read again after the write,
    and into a buffer (a weight)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("table", torch.zeros(1, 2, 8, 4))

    def forward(self, x: torch.Tensor, cache: torch.Tensor):
        idx = torch.arange(x.shape[2]).view(1, 1, -1, 1).expand(1, 2, x.shape[2], 4)
        new = torch.scatter(cache, 2, idx, x)
        tab = torch.scatter(self.table, 2, idx, x)
        return new + cache.sum(), tab


def test_unsafe_scatters_keep_the_copy() -> None:
    from llmpress.backends.tvm.lower import to_relax

    module = capture(_Unsafe().eval(), (torch.randn(1, 2, 3, 4), torch.randn(1, 2, 8, 4)), dynamic=False)
    module.lm = LMInfo(n_layers=1, n_kv_heads=2, head_dim=4, cache_len=8, vocab_size=4)  # ask for in-place writes
    mod = to_relax(module, inplace_cache=True).mod
    text = "\n".join(mod[gv].script() for gv in mod.get_global_vars() if gv.name_hint in ("prefill", "decode"))
    assert "call_tir_inplace" not in text and "scatter_elements" in text
