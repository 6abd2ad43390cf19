"""``quantize(bits=2)`` then ``distill`` through TVM ``cpu``: the adapters are plain ``aten.linear`` / ``aten.add``
nodes beside the int2 ``wq_linear``, so the build needs no new op. Tolerance as test_tvm_factorize.py's (fp32
kernels summing in another order than PyTorch, compounded over the layers: 1e-5 of the logits' scale)."""
from __future__ import annotations

import pytest

pytest.importorskip("tvm")

from ..conftest import random_calibration  # noqa: E402
from .model_checks import cpu_build_matches_reference  # noqa: E402

pytestmark = pytest.mark.tvm


def test_distilled_int2_llama_builds_and_matches_reference():
    import torch

    from llmpress.api import run_pipeline
    from llmpress.ir.capture import capture
    from tests.decoder import Llama, LlamaConfig

    torch.manual_seed(0)
    # One layer of the tiny Llama (the build time grows with the layers, the coverage does not).
    cfg = LlamaConfig(vocab_size=64, dim=32, n_layers=1, n_heads=4, n_kv_heads=2, hidden_dim=64, max_seq_len=16)
    module, records = run_pipeline(
        capture(Llama(cfg).eval()), "quantize(bits=2,group=16,exclude=lm_head),distill(steps=2,batch=1,seq_len=8,"
        "lr=0.01)", calibration=random_calibration(n=2, t=16, seed=3), progress=False)
    assert records[-1].stats["adapters"] == 7
    hist = module.op_histogram()
    assert hist["llmpress.wq_linear.default"] == 7 and hist["aten.linear.default"] == 14 + 1
    cpu_build_matches_reference(module)
