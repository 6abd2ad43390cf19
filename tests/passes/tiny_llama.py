"""The tiny Llama the fusion-pass tests share: the model, its captured module, and prefill/decode inputs."""
from __future__ import annotations

import pytest
import torch

from llmpress.ir.capture import capture
from llmpress.ir.module import Module
from tests.decoder import Llama, LlamaConfig


def tiny_llama(*, tie: bool = False, random_norms: bool = False) -> tuple[Llama, Module]:
    """2 layers, dim 32, GQA 4/2 heads, SwiGLU 64, vocab 64, 32 positions. ``random_norms``: norm weights away from
    their initial ones (so a fold that did nothing would show)."""
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64, max_seq_len=32,
                      tie_embeddings=tie)
    model = Llama(cfg).eval()
    if random_norms:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("norm.weight"):
                    p.copy_(torch.rand(p.shape) + 0.5)
    return model, capture(model)


def run_text(module: Module, text: str):
    """Run every pass of pipeline ``text`` on ``module`` (no progress bars); the last pass's result."""
    from llmpress.passes.base import PassContext
    from llmpress.passes.pipeline import build

    res = None
    for p in build(text):
        res = p.run(module, PassContext(progress=False))
    return res


@pytest.fixture(scope="module")
def llama_and_module():
    """The tiny Llama and its captured module, once per test file (import this fixture and ``llama``)."""
    return tiny_llama()


@pytest.fixture
def llama(llama_and_module):
    """(model, a fresh clone of its module): each test rewrites its own copy."""
    model, module = llama_and_module
    return model, module.clone()


def lm_inputs(model: Llama, t: int, start: int = 0) -> tuple:
    """``t`` random token ids at position ``start`` with random caches: a prefill (t > 1) or decode (t = 1) call."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (1, t), generator=g)
    caches = [torch.randn(c.shape, generator=g) for c in model.empty_cache()]
    return (ids, torch.tensor([start]), *caches)


def assert_exact_rewrite(model: Llama, module: Module, rewrite, *, rtol: float, atol: float) -> None:
    """``rewrite(module)`` (a pass run, returning its result) modifies ``module`` without changing what it computes:
    a prefill and a decode call give the same outputs before and after, and the same logits as the eager model."""
    prefill, decode = lm_inputs(model, 7), lm_inputs(model, 1, start=7)
    ref = [module.run(*prefill), module.run(*decode)]
    assert rewrite(module).modified
    got = [module.run(*prefill), module.run(*decode)]
    for r, g in zip(ref, got):
        for a, b in zip(r, g):
            torch.testing.assert_close(b, a, rtol=rtol, atol=atol)
    with torch.no_grad():
        eager = model(*prefill)
    torch.testing.assert_close(got[0][0], eager[0], rtol=rtol, atol=atol)


def capture_block(attr: str, block: torch.nn.Module) -> tuple[Module, tuple]:
    """Capture ``block(x, y)`` as the submodule ``attr`` of a wrapper (so its layers are named ``attr.*``, like a
    decoder layer's ``self_attn``/``mlp``), with two random [3, 8] inputs; returns the module and the inputs."""

    class _Wrap(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            setattr(self, attr, block)

        def forward(self, x, y):
            return getattr(self, attr)(x, y)

    torch.manual_seed(0)
    inputs = (torch.randn(3, 8), torch.randn(3, 8))
    return capture(_Wrap(), inputs, dynamic=False), inputs
