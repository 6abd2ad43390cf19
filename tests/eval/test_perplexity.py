"""The pinned perplexity protocol, and the spine's headline exactness check on the real reference model."""
from __future__ import annotations

import math

import pytest
import torch

from llmpress.eval import paragraphs, perplexity, token_stream
from llmpress.ir.capture import capture, lm_info

from ..conftest import TINYSTORIES, VALID


class _Bytes:
    """A byte-level tokenizer, so the protocol can be checked on a tiny model without model files."""

    bos_id = 1

    def encode(self, text, *, bos=True):
        return ([1] if bos else []) + [3 + (b % 61) for b in text.encode()]


def test_paragraphs_split_on_blank_lines_with_spaces():
    text = "a b\n\nc\n \nd\ne\n\n\n"
    assert paragraphs(text) == ["a b", "c", "d\ne"]


def test_stream_has_bos_per_paragraph_and_max_tokens():
    s = token_stream("ab\n\ncd\n", _Bytes())
    assert s[0] == 1 and s[3] == 1 and len(s) == 6
    assert token_stream("ab\n\ncd\n", _Bytes(), max_tokens=4) == s[:4]


def test_windows_score_every_token_but_the_first(tiny_llama):
    stream = [1] + list(range(3, 40)) + [1] + list(range(5, 30))
    lm = lm_info(tiny_llama)
    res = perplexity(tiny_llama, lm, stream, context=16, progress=False)
    assert res.tokens == len(stream) - 1
    assert res.windows == math.ceil((len(stream) - 1) / 16)
    # Direct computation of the same protocol: window k feeds s[16k:16k+16], targets shifted by one.
    nll, n = 0.0, 0
    for s in range(0, len(stream) - 1, 16):
        w = stream[s : s + 17]
        with torch.no_grad():
            logits = tiny_llama(torch.tensor([w[:-1]]), torch.zeros(1, dtype=torch.int64),
                                *tiny_llama.empty_cache())[0]
        nll += float(torch.nn.functional.cross_entropy(logits[0], torch.tensor(w[1:]), reduction="sum"))
        n += len(w) - 1
    assert res.perplexity == pytest.approx(math.exp(nll / n), rel=1e-6)


def test_context_longer_than_cache_is_refused(tiny_llama):
    from llmpress.errors import ConfigError

    with pytest.raises(ConfigError, match="KV cache"):
        perplexity(tiny_llama, lm_info(tiny_llama), [1, 2, 3], context=64, progress=False)


@pytest.mark.slow
def test_tinystories_perplexity_matches_transformers_before_and_after_exact_passes(shared):
    """Equal to 4 significant digits (|a - b| <= 0.005 at 23.55) to the eager transformers model."""
    from transformers import AutoModelForCausalLM

    from llmpress.api import run_pipeline
    from llmpress.ir.loaders import load_model

    loaded = load_model(TINYSTORIES)
    stream = token_stream(VALID, loaded.tokenizer)
    hf = AutoModelForCausalLM.from_pretrained(TINYSTORIES, local_files_only=True).eval()
    ref = perplexity(lambda ids: hf(input_ids=ids).logits, None, stream, progress=False)
    assert ref.tokens == 54668 and ref.perplexity == pytest.approx(23.55, abs=0.005)

    module = capture(loaded.model)
    ours = perplexity(module.run, module.lm, stream, progress=False)
    assert abs(ours.perplexity - ref.perplexity) <= 0.005, (ours.perplexity, ref.perplexity)

    module, records = run_pipeline(module, "exact", progress=False)
    assert any(r.modified for r in records)
    fused = perplexity(module.run, module.lm, stream, progress=False)
    assert abs(fused.perplexity - ref.perplexity) <= 0.005, (fused.perplexity, ref.perplexity)
