"""The TVM backend on a tiny random Llama: prefill/decode against the reference, greedy tokens, the artifact
payload round trip, refusals at load, unsupported ops with their source lines, llmpress-op converters.

Tolerance: fp32 both sides; TVM sums in another order than PyTorch, so each output differs by rounding only:
about sqrt(K) * 2^-24 * |x| for reductions of K <= 64 terms on O(1) values (~1e-6). atol = rtol = 1e-5 leaves a
~10x margin and still fails on any real bug (a wrong mask, position or cache slot changes logits by >1e-2).
"""
from __future__ import annotations

import inspect
import json

import pytest
import torch

from llmpress.errors import ArtifactError, UnsupportedOpError
from llmpress.eval.generate import greedy
from llmpress.ir.capture import capture

pytestmark = pytest.mark.tvm
ATOL = RTOL = 1e-5


@pytest.fixture(scope="module")
def llama():
    from tests.decoder import Llama, LlamaConfig

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64, max_seq_len=32)
    return Llama(cfg).eval()


@pytest.fixture(scope="module")
def module(llama):
    return capture(llama)


@pytest.fixture(scope="module")
def compiled(module):
    from llmpress.backends.tvm import TVMBackend

    return TVMBackend().lower(module, "cpu", progress=False)


def _reference(module):
    """The reference backend's program (PyTorch eager over the exported graph, unlifted once)."""
    from llmpress.backends import get_backend

    return get_backend("reference").lower(module, "reference")


def _close(outs, refs):
    assert len(outs) == len(refs)
    for o, r in zip(outs, refs):
        assert o.shape == r.shape and o.dtype == r.dtype
        torch.testing.assert_close(o, r, atol=ATOL, rtol=RTOL)


def test_functions_and_weights_are_parameters(compiled, module):
    assert compiled.functions == ("prefill", "decode", "prefill_last")
    assert compiled.num_inputs == 2 + 2 * module.lm.n_layers
    # every weight, buffers (RoPE tables) included, is a VM parameter: nothing is baked into the library. Weights
    # a kernel reads in another layout (the linears' 4-row tiles) were transformed at compile time: "<name>@<k>"
    bases = {p.split("@")[0] for p in compiled.params}
    assert bases == set(module.weights())
    assert any("@" in p for p in compiled.params)
    assert set(compiled.params) == set(compiled.weights)


def test_prefill_then_decode_match_reference(compiled, module, llama):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 64, (1, 7), generator=g)
    ins = (ids, torch.zeros(1, dtype=torch.int64), *llama.empty_cache())
    ref = module.run(*ins)
    out = compiled.prefill(*ins)
    _close(out, ref)
    # decode continues from the reference caches at position 7, then from its own output
    nxt = torch.tensor([[5]])
    ref2 = module.run(nxt, torch.tensor([7]), *ref[1:])
    out2 = compiled.decode(nxt, torch.tensor([7]), *out[1:])
    _close(out2, ref2)
    assert compiled(nxt, torch.tensor([7]), *out[1:])[0].shape == (1, 1, 64)  # forward dispatches T=1 to decode


def test_prefill_last_is_the_last_row_of_prefill(compiled, module, llama):
    """``forward_last`` (generation) runs ``prefill_last``: the LM head on the last position only, caches alike."""
    ids = torch.randint(0, 64, (1, 9), generator=torch.Generator().manual_seed(3))
    full = compiled.prefill(ids, torch.zeros(1, dtype=torch.int64), *llama.empty_cache())
    last = compiled.forward_last(ids, torch.zeros(1, dtype=torch.int64), *llama.empty_cache())
    assert last[0].shape == (1, 1, 64)
    torch.testing.assert_close(last[0], full[0][:, -1:], atol=ATOL, rtol=RTOL)
    for a, b in zip(last[1:], full[1:]):
        assert torch.equal(a, b)


def test_greedy_matches_reference_token_for_token(compiled, module):
    ref = greedy(_reference(module), module.lm, [1, 7, 3], 24)
    got = greedy(compiled, module.lm, [1, 7, 3], 24)
    assert got == ref


def test_payload_round_trip_and_refusals(compiled, module, tmp_path):
    from llmpress.backends.tvm import TVMBackend

    payload = compiled.save_payload(tmp_path)
    assert payload["lib"] == "model.so" and (tmp_path / "model.so").is_file()
    assert payload["weights"] == "weights.safetensors" and payload["params"] == compiled.params
    assert payload["functions"] == ["prefill", "decode", "prefill_last"] and payload["arch"] == "x86_64"
    from safetensors.torch import load_file

    assert set(load_file(str(tmp_path / "weights.safetensors"))) == set(compiled.params)
    # the weights live only in the safetensors file: the library holds no copy of any weight's bytes
    lib = (tmp_path / "model.so").read_bytes()
    for name in ("model.embed_tokens.weight", "lm_head.weight@0", "rope_cos"):  # lm_head stored as W^T
        assert compiled.weights[name].numpy().tobytes()[:256] not in lib
    manifest = {"payload": json.loads(json.dumps(payload)), "lm": module.lm.to_json()}
    loaded = TVMBackend().load(tmp_path, manifest)
    ids = torch.tensor([[1, 4, 9, 16]])
    ins = (ids, torch.zeros(1, dtype=torch.int64), *[torch.zeros(1, 2, 32, 8) for _ in range(4)])
    _close(loaded(*ins), compiled(*ins))

    other = json.loads(json.dumps(manifest))
    other["payload"]["target"]["arch"] = "aarch64"
    with pytest.raises(ArtifactError, match="model.so.*aarch64"):
        TVMBackend().load(tmp_path, other)
    gpu = json.loads(json.dumps(manifest))
    gpu["payload"]["target"].update(device="cuda", cuda_arch="sm_80")
    import tvm

    if not tvm.cuda(0).exist:
        with pytest.raises(ArtifactError, match="model.so.*no CUDA GPU"):
            TVMBackend().load(tmp_path, gpu)
    feat = json.loads(json.dumps(manifest))
    feat["payload"]["target"]["features"] = ["avx2", "no_such_cpu_feature"]
    with pytest.raises(ArtifactError, match="no_such_cpu_feature"):
        TVMBackend().load(tmp_path, feat)


class _Special(torch.nn.Module):
    def forward(self, x):
        y = torch.special.bessel_j0(x)  # no TVM converter, no decomposition
        return torch.relu(y) + torch.special.erfcx(x)


def test_unsupported_ops_reported_with_source_line():
    from llmpress.backends.tvm import TVMBackend

    mod = capture(_Special(), (torch.randn(3, 4),), dynamic=False)
    problems = TVMBackend().check(mod, "cpu")
    ops = sorted(p.op for p in problems)
    assert ops == ["aten.special_bessel_j0.default", "aten.special_erfcx.default"]
    line = inspect.getsourcelines(_Special.forward)[1] + 1
    bessel = next(p for p in problems if "bessel" in p.op)
    assert bessel.source_line.endswith(f"test_tvm_lower.py:{line}")
    with pytest.raises(UnsupportedOpError) as e:
        TVMBackend().lower(mod, "cpu", progress=False)
    assert "special_bessel_j0" in str(e.value) and "special_erfcx" in str(e.value)
    assert e.value.where.endswith(f":{line}") or e.value.where.endswith(f":{line + 1}")


class _Quantized(torch.nn.Module):
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.register_buffer("q", torch.randint(-127, 128, (6, 8), generator=g, dtype=torch.int8))
        self.register_buffer("s", torch.rand(6, 1, generator=g) * 0.01)

    def forward(self, x):
        return torch.ops.llmpress.wq_linear(x, self.q, self.s, None, None, 8, 8)


def _convert_wq8(node, importer):
    """Test converter for 8-bit symmetric per-channel wq_linear: y = x @ (q * s)^T."""
    from tvm import relax

    x, q, s = (importer.env[a] for a in node.args[:3])
    w = importer.block_builder.emit(relax.op.multiply(relax.op.astype(q, "float32"), s))
    return importer.block_builder.emit(relax.op.matmul(x, relax.op.permute_dims(w)))


def test_llmpress_op_needs_a_converter_and_uses_it():
    import llmpress.ir.ops  # noqa: F401 - registers torch.ops.llmpress.*
    from llmpress.backends.tvm import TVMBackend

    mod = capture(_Quantized(), (torch.randn(3, 8),), dynamic=False)
    problems = TVMBackend(converters={}).check(mod, "cpu")
    assert [p.op for p in problems] == ["llmpress.wq_linear.default"]
    assert "CONVERTERS" in problems[0].reason
    compiled = TVMBackend(converters={"llmpress.wq_linear.default": _convert_wq8}).lower(mod, "cpu", progress=False)
    x = torch.randn(3, 8)
    torch.testing.assert_close(compiled(x), mod.run(x), atol=ATOL, rtol=RTOL)
    # this converter's dequantization reads weights only, so it is computed once at compile time (params.py):
    # the payload holds its result as a parameter, never a constant in the library
    assert compiled.params == ["q@0"] and compiled.weights["q@0"].dtype == torch.float32


def test_compile_save_load_through_the_api(llama, module, tmp_path):
    """``llmpress.compile(..., target="cpu")`` -> artifact folder -> ``llmpress.load``: same greedy tokens."""
    import llmpress

    art = llmpress.compile(llama, target="cpu", progress=False)
    assert art.manifest["backend"] == "tvm" and art.manifest["target"]["name"] == "cpu"
    path = art.save(tmp_path / "tiny-cpu")
    loaded = llmpress.load(path)
    assert loaded.manifest["payload"]["functions"] == ["prefill", "decode", "prefill_last"]
    ref = greedy(_reference(module), module.lm, [1, 2, 3], 12)
    got = loaded.generate_ids([1, 2, 3], 12)  # stops early only at EOS
    assert len(got) > 3 and got == ref[: len(got)]
