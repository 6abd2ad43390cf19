"""The grouped-query attention lowering (``llmpress/backends/tvm/kernels/attention.py``) against PyTorch's
``scaled_dot_product_attention``.

Tolerance: the CPU kernel's ``exp`` is a polynomial with relative error ~1e-7 and it sums probabilities and values
in another order (online softmax over blocks of 8 keys, 8-lane partial dot products): differences are a few
float32 ulps of the output's scale, asserted at 2e-6 absolute on outputs of magnitude ~1 (a wrong head mapping,
mask or rescaling is off by O(0.1)).
"""
from __future__ import annotations

import math

import pytest
import torch

from llmpress.ir.capture import capture

pytestmark = pytest.mark.tvm


class _Attention(torch.nn.Module):
    def __init__(self, gqa: bool) -> None:
        super().__init__()
        self.gqa = gqa

    def forward(self, q, k, v, mask):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=self.gqa,
                                                                scale=1 / math.sqrt(q.shape[-1]))


def _inputs(heads, kv_heads, tokens, cache, dim, start, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, heads, tokens, dim, generator=g)
    k = torch.randn(1, kv_heads, cache, dim, generator=g)
    v = torch.randn(1, kv_heads, cache, dim, generator=g)
    mask = torch.arange(cache)[None, :] <= (start + torch.arange(tokens))[:, None]  # causal over a static cache
    return q, k, v, mask


def _kernel_names(mod) -> set[str]:
    return {gv.name_hint for gv in mod.get_global_vars()}


@pytest.mark.parametrize("heads,kv_heads,tokens,start", [(8, 2, 1, 21), (8, 2, 6, 0), (4, 4, 3, 9), (8, 1, 1, 63)])
@pytest.mark.parametrize("cpu_kernels", [True, False])
def test_attention_matches_sdpa(heads, kv_heads, tokens, start, cpu_kernels):
    from llmpress.backends.tvm import TVMBackend

    cache, dim = 64, 16
    args = _inputs(heads, kv_heads, tokens, cache, dim, start)
    module = capture(_Attention(kv_heads != heads).eval(), args, dynamic=False)
    module.lm = None
    compiled = TVMBackend(cpu_kernels=cpu_kernels).lower(module, "cpu", progress=False)
    got = torch.as_tensor(compiled(*args))
    ref = module.run(*args)
    torch.testing.assert_close(got, ref, rtol=0, atol=2e-6)


def test_cpu_kernel_only_on_cpu_and_skips_masked_blocks():
    """The fused kernel is used for CPU targets only; masked keys are never read: NaN keys and values there do not
    reach the output."""
    from llmpress.backends.tvm import TVMBackend
    from llmpress.backends.tvm.lower import to_relax

    q, k, v, mask = _inputs(8, 2, 1, 64, 16, start=10)
    module = capture(_Attention(True).eval(), (q, k, v, mask), dynamic=False)
    module.lm = None
    assert any(n.startswith("llmpress_attention") for n in _kernel_names(to_relax(module, cpu_kernels=True).mod))
    assert not any(n.startswith("llmpress_attention") for n in _kernel_names(to_relax(module).mod))
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 11:] = float("nan")  # positions 11.. are masked (start 10)
    v2[:, :, 11:] = float("nan")
    compiled = TVMBackend().lower(module, "cpu", progress=False)
    got = torch.as_tensor(compiled(q, k2, v2, mask))
    assert not torch.isnan(got).any()
    torch.testing.assert_close(got, module.run(q, k, v, mask), rtol=0, atol=2e-6)


def test_tiny_llama_attention_is_one_kernel_per_layer(tiny_llama):
    from llmpress.backends.tvm.lower import to_relax

    prog = to_relax(capture(tiny_llama), cpu_kernels=True)
    calls = str(prog.mod["prefill"]).count("llmpress_attention")
    assert calls == tiny_llama.config.n_layers
