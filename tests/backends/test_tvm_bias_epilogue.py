"""The bias epilogue of the CPU linear kernels (``kernels/bias.py``): which adds the dispatch pass folds into a
linear's store and why a near miss is not one (Relax only, no build), and the kernels the tiny models do not reach
(the quantized float-activation GEMV/GEMM, the K-blocked float GEMM) with and without a bias, against each other.

The numerics of whole models with biased q/k/v/o (fp32 and w4a8, every build of ``cpu`` this host runs, prefill and
decode) are ``test_tvm_epilogue.py``'s model tests, which build with the epilogues on."""
from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("tvm")

from ..passes.tiny_llama import capture_block  # noqa: E402
from .test_tvm_epilogue import _dispatched  # noqa: E402

pytestmark = [pytest.mark.tvm, pytest.mark.cpu_variants]


def _biased_llama():
    from llmpress.api import run_pipeline
    from llmpress.ir.capture import capture
    from tests.decoder import hf_tiny

    hf = hf_tiny("llama", vocab_size=64, hidden_size=128, num_hidden_layers=1, num_attention_heads=4,
                 num_key_value_heads=2, intermediate_size=256, max_position_embeddings=16, attention_bias=True,
                 mlp_bias=True)
    module, _ = run_pipeline(capture(hf), "fuse_gate_up", progress=False)
    return module


def test_every_bias_add_over_a_linear_is_folded():
    """q, k, v, o, gate_up (fused: its SwiGLU now reads the add, so it gets no SwiGLU epilogue) and down, in each of
    prefill, decode and prefill_last; nothing is folded with the epilogues off."""
    module = _biased_llama()
    stats, mod = _dispatched(module)
    assert stats["bias_fused"] == 3 * 6 and stats["bias_near_misses"] == [], stats
    assert stats["swiglu_fused"] == 0
    decode = str(mod["decode"])
    assert "R.add(" not in decode.split("R.call_tir(llmpress_fgemv_avx512vnni_128_128_bias")[1].split("\n")[1]
    assert decode.count("_bias,") >= 6 and "p_model_layers_0_self_attn_q_proj_bias" in decode
    off, mod_off = _dispatched(module, epilogues=False)
    assert off["bias_fused"] == 0 and "_bias," not in str(mod_off["decode"])


class _Shared(torch.nn.Module):
    """``q(x) + b`` where ``q(x)`` has another reader: the add must stay (``q(x)`` itself is needed)."""

    def __init__(self) -> None:
        super().__init__()
        self.q = torch.nn.Linear(8, 64, bias=False)
        self.b = torch.nn.Parameter(torch.randn(64))

    def forward(self, x, y):
        h = self.q(x)
        return h + self.b, h * 2


def test_near_miss_is_reported_with_its_reason():
    module, _ = capture_block("attn", _Shared())
    stats, _ = _dispatched(module)
    assert stats["bias_fused"] == 0
    assert len(stats["bias_near_misses"]) == 1 and "has other readers" in stats["bias_near_misses"][0], stats


def _run(func, args, out_shape):
    import tvm

    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}),
                      target=tvm.target.Target({"kind": "llvm", "mcpu": "x86-64-v3"}))
    out = tvm.runtime.tensor(np.zeros(out_shape, "float32"))
    lib["main"](*[tvm.runtime.tensor(a) for a in args], out)
    return out.numpy()


@pytest.mark.parametrize("form", ["gemv_float", "gemm_float", "fgemm_kblocked"])
def test_kernel_with_bias_is_kernel_plus_bias(form):
    """``y_bias = y + b`` for random codes/weights: exactly where the bias is added to the final sum, to fp32
    rounding in the K-blocked GEMM (added to the first block's sum, then the others)."""
    from llmpress.backends.tvm.isa import cpu_isa
    from llmpress.backends.tvm.kernels import fgemm
    from llmpress.backends.tvm.kernels.qgemm import gemm_float_func
    from llmpress.backends.tvm.kernels.qgemv import gemv_float_func
    from llmpress.backends.tvm.kernels.qlayout import QLayout

    import tvm

    rng = np.random.default_rng(0)
    if form == "fgemm_kblocked":
        n, k, m = 32, 1056, 5  # K over one 1024-feature block
        isa = cpu_isa(tvm.target.Target({"kind": "llvm", "mcpu": "x86-64-v3"}))
        make = lambda bias: fgemm.gemm_func(n, k, isa, bias=bias)  # noqa: E731
        ins = [rng.standard_normal((m, k)).astype("float32"),
               rng.standard_normal((n // fgemm.ROWS, k // fgemm.CHUNK, fgemm.ROWS, fgemm.CHUNK)).astype("float32")]
    else:
        n, k = 64, 256
        m = 1 if form == "gemv_float" else 5
        lay = QLayout(4, True, n, k, 128)
        make = (lambda bias: gemv_float_func(lay, bias=bias)) if m == 1 else (  # noqa: E731
            lambda bias: gemm_float_func(lay, bias=bias))
        ins = [rng.standard_normal((m, k)).astype("float32"), rng.integers(0, 255, lay.w_shape).astype(lay.dtype),
               (rng.random(lay.sz_shape) * 0.05).astype("float32")]
    b = rng.standard_normal(n).astype("float32")
    plain = _run(make(False), ins, (m, n))
    biased = _run(make(True), ins + [b], (m, n))
    scale = float(np.abs(plain).max())
    tol = 0.0 if form != "fgemm_kblocked" else 1e-6 * scale
    np.testing.assert_allclose(biased, plain + b, rtol=0, atol=tol)
    assert np.abs(b).min() > 0 and not np.allclose(biased, plain)  # the bias is there
