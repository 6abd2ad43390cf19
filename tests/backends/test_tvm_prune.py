"""``prune(mlp=0.25,heads=0.5)`` then ``quantize(bits=4,group=128)`` through TVM ``cpu``: the pruned MLP and
attention are ordinary linears on smaller weights, so the build needs no new op or kernel; 25% of 1024 channels keeps
768, which group 128 divides; half the KV groups leave o_proj 128 inputs, and the KV caches lose half their heads.

Tolerance as test_tvm_factorize.py's (model_checks.cpu_build_matches_reference): fp32 kernels whose summation order
differs from PyTorch's, compounded over the layers; 1e-5 of the logits' scale (a wrong shape or slice would be off
by O(1) or fail to build)."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("tvm")

from .model_checks import cpu_build_matches_reference  # noqa: E402

pytestmark = pytest.mark.tvm


def test_pruned_int4_g128_llama_builds_and_matches_reference():
    from llmpress.api import run_pipeline
    from llmpress.ir.capture import capture
    from tests.decoder import Llama, LlamaConfig

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, dim=256, n_layers=1, n_heads=8, n_kv_heads=4, hidden_dim=1024, max_seq_len=16)
    model = Llama(cfg).eval()
    pipeline = "prune(mlp=0.25,heads=0.5,score=magnitude),quantize(bits=4,group=128,exclude=lm_head)"
    module, records = run_pipeline(capture(model), pipeline, progress=False)
    assert records[0].stats["layers"]["model.layers.0.mlp"]["kept"] == 768
    assert records[0].stats["layers"]["model.layers.0.self_attn"]["kept"] == 2  # of 4 KV groups: 4 of 8 heads
    assert module.lm.n_kv_heads == 2  # the caches TVM is given (model_checks: empty_cache(module.lm)) are halved
    hist = module.op_histogram()
    assert hist["llmpress.wq_linear.default"] == 7 and hist["aten.linear.default"] == 1  # lm_head stays float
    vals = {n.name: n.meta["val"].shape for n in module.graph.nodes if n.op == "call_function"
            and n.target == torch.ops.llmpress.wq_linear.default}
    assert sorted(s[-1] for s in vals.values()).count(768) == 2  # gate and up now produce 768 channels
    cpu_build_matches_reference(module)
