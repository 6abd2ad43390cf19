"""A Hugging Face encoder (BERT-style ``AutoModel``, random weights from a transformers config) keeps its own
signature: captured on ``(input_ids, attention_mask)``, compiled for ``cpu``, it returns what eager returns."""
from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.tvm


def _bert():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=128, max_position_embeddings=64)
    return BertModel(cfg).eval()


def _inputs(t: int, pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, 128, (2, t), generator=torch.Generator().manual_seed(t))
    mask = torch.ones(2, t, dtype=torch.int64)
    mask[1, t - pad:] = 0  # a padded second sentence: the mask must reach attention
    return ids, mask


def test_bert_encoder_compiles_for_cpu_with_its_own_signature() -> None:
    pytest.importorskip("tvm")
    import llmpress

    model = _bert()
    art = llmpress.compile(model, _inputs(12, 4), target="cpu", progress=False)
    assert art.lm is None
    for t, pad in ((12, 4), (7, 2)):  # the sequence length stays dynamic
        ids, mask = _inputs(t, pad)
        with torch.no_grad():
            want = model(ids, mask)
        got = art(ids, mask)
        # Both outputs of the model, in its field order; fp32 on both sides, TVM reorders the sums of matmuls and
        # softmax/layer-norm reductions (|values| ~1), so 1e-4 absolute.
        hidden, pooled = got[0], got[1]
        torch.testing.assert_close(torch.as_tensor(hidden), want.last_hidden_state, rtol=0, atol=1e-4)
        torch.testing.assert_close(torch.as_tensor(pooled), want.pooler_output, rtol=0, atol=1e-4)
    with torch.no_grad():  # the mask matters to the check: without it the padded sentence's states differ
        unmasked = model(ids, torch.ones_like(mask)).last_hidden_state
    assert (unmasked[1] - want.last_hidden_state[1]).abs().max() > 1e-3


class _OnesAnd(torch.nn.Module):
    """transformers' mask start (``masking_utils.and_masks``): ``q_idx.new_ones((), dtype=bool) & mask``."""

    def forward(self, idx: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return idx.new_ones((), dtype=torch.bool) & (mask > 0)


def test_new_ones_keeps_its_dtype() -> None:
    """TVM 0.27's ``new_ones`` converter made ``idx``'s dtype (int64), which turned BERT's boolean attention mask into
    int64 (``converters._new_ones``)."""
    pytest.importorskip("tvm")
    import llmpress

    idx, mask = torch.arange(6).view(2, 3), torch.tensor([[1, 0, 1], [0, 1, 1]])
    art = llmpress.compile(_OnesAnd(), (idx, mask), target="cpu", progress=False)
    got = torch.as_tensor(art(idx, mask))
    assert got.dtype == torch.bool, got.dtype
    assert torch.equal(got, _OnesAnd()(idx, mask))
