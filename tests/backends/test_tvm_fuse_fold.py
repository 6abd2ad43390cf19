"""``fold_norm,fuse_qkv,fuse_gate_up`` then ``quantize(bits=4,group=128)`` through TVM ``cpu``: the fused layers are
wider plain linears (quantized like any other) and a folded norm is the norm without its multiply, so the build
needs no new op.

Tolerance as test_tvm_factorize.py: fp32 kernels whose summation order differs from PyTorch's, compounded over the
layers; 1e-5 of the logits' scale (a wrong split or layout would be off by O(1))."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("tvm")

from .model_checks import cpu_build_matches_reference  # noqa: E402

pytestmark = pytest.mark.tvm


def test_fused_folded_int4_g128_llama_builds_and_matches_reference():
    from llmpress.api import run_pipeline
    from llmpress.ir.capture import capture
    from tests.decoder import Llama, LlamaConfig

    torch.manual_seed(0)
    # One layer, dim 128 and MLP 256: every linear's in_features fits group 128; gate_up_proj is [512, 128].
    cfg = LlamaConfig(vocab_size=64, dim=128, n_layers=1, n_heads=4, n_kv_heads=2, hidden_dim=256, max_seq_len=16)
    model = Llama(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(torch.rand(p.shape) + 0.5)
    module, records = run_pipeline(
        capture(model), "fold_norm,fuse_qkv,fuse_gate_up,quantize(bits=4,group=128,exclude=lm_head)", progress=False)
    assert records[0].stats["folded"] == 3 and records[2].stats["groups"] == ["model.layers.0.mlp.gate_up_proj"]
    hist = module.op_histogram()
    assert hist["llmpress.wq_linear.default"] == 4 and hist["aten.linear.default"] == 1  # qkv, o, gate_up, down
    cpu_build_matches_reference(module)
