"""``factorize`` then ``quantize(bits=4,group=128)`` through TVM ``cpu``: the factors are plain linears, so the build
needs no new op, and with ``multiple=128`` every factor's in_features (the rank for the second one) fits group 128.

Tolerance as test_tvm_quant_kernels.py's tiny-Llama test: fp32 kernels whose summation order differs from
PyTorch's, compounded over the layers; 1e-5 of the logits' scale (a wrong layout would be off by O(1))."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("tvm")

from .model_checks import cpu_build_matches_reference  # noqa: E402

pytestmark = pytest.mark.tvm


def test_factorized_int4_g128_llama_builds_and_matches_reference():
    from llmpress.api import run_pipeline
    from llmpress.ir.capture import capture
    from tests.decoder import Llama, LlamaConfig

    torch.manual_seed(0)
    # One layer, dim 256, MLP 1024: rank 128 shrinks the MLP layers (128 * 1280 < 1024 * 256) but not the 256x256
    # attention projections (128 * 512 = 256 * 256), which are skipped and quantized dense.
    cfg = LlamaConfig(vocab_size=64, dim=256, n_layers=1, n_heads=8, n_kv_heads=4, hidden_dim=1024, max_seq_len=16)
    model = Llama(cfg).eval()
    module, records = run_pipeline(
        capture(model), "factorize(ratio=0.6,multiple=128,exclude=lm_head),quantize(bits=4,group=128,exclude=lm_head)",
        progress=False)
    assert records[0].stats["factorized"] == 3
    hist = module.op_histogram()
    assert hist["llmpress.wq_linear.default"] == 4 + 6 and hist["aten.linear.default"] == 1
    cpu_build_matches_reference(module)
