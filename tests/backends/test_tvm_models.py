"""The TVM backend on the real reference models: stories260K greedy tokens and tinystories-llama perplexity
through TVM ``cpu`` equal the reference backend's."""
from __future__ import annotations

import pytest

from tests.conftest import STORIES260K, TINYSTORIES, VALID

pytestmark = pytest.mark.tvm


def _reference(module):
    """The reference backend's program (PyTorch eager over the exported graph, unlifted once)."""
    from llmpress.backends import get_backend

    return get_backend("reference").lower(module, "reference")


def _lower(path):
    import llmpress
    from llmpress.backends.tvm import TVMBackend

    loaded = llmpress.load_model(path)
    module = llmpress.capture(loaded.model)
    return module, loaded.tokenizer, TVMBackend().lower(module, "cpu", progress=False)


def test_stories260k_greedy_256_tokens_equal_reference(shared):
    from llmpress.eval.generate import greedy

    module, _, compiled = _lower(STORIES260K / "stories260K.bin")
    bos = module.lm.bos_id
    ref = greedy(_reference(module), module.lm, [bos], 256)
    got = greedy(compiled, module.lm, [bos], 256)
    assert len(ref) == 257
    assert got == ref


@pytest.mark.slow
def test_tinystories_perplexity_equals_reference(shared):
    """fp32 perplexity over the first 2,048 tokens of TinyStories valid (8 windows of 256, fresh cache each)."""
    from llmpress.eval.perplexity import perplexity, token_stream

    module, tok, compiled = _lower(TINYSTORIES)
    stream = token_stream(VALID, tok, max_tokens=2048)
    ref = perplexity(_reference(module), module.lm, stream, context=256, progress=False)
    got = perplexity(compiled, module.lm, stream, context=256, progress=False)
    assert got.tokens == ref.tokens == 2047
    assert f"{got.perplexity:.4g}" == f"{ref.perplexity:.4g}", (got.perplexity, ref.perplexity)
