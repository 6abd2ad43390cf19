"""ONNX export of the int8 KV cache: ``kv_scale``/``kv_codes``/``kv_dequant`` as standard ops, int8 caches as ONNX
inputs/outputs named from ``lm.cache_specs()``, and ONNX Runtime reproducing the reference backend.

Exactness: the three ops translate to the same float32 operations as their reference kernels (one ``ReduceMax`` of
``|x|``, one division by ``qmax``, one division ``x / s``, half-to-even ``Round``, ``Clip``, one product), so on
equal inputs ONNX Runtime gives bit-identical scales, codes and dequantized values; the hand-written module test
asserts equality. In the tiny Llama the keys/values come out of float32 GEMMs whose summation order differs between
MLAS and PyTorch (~1e-7 relative), so the logits get the ONNX suite's ``atol = rtol = 1e-5`` (see
``test_onnx_export.py``) and the codes are compared exactly only where the test says why that holds.
"""
from __future__ import annotations

import pytest
import torch

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

import llmpress.ir.ops  # noqa: E402,F401 - registers the llmpress ops
from llmpress.backends.onnx import OrtProgram, export  # noqa: E402
from llmpress.errors import ArtifactError  # noqa: E402
from llmpress.ir.capture import capture  # noqa: E402

ATOL = RTOL = 1e-5  # logits: float32 summation order only (see test_onnx_export.py's docstring)

H, L, D = 2, 16, 8  # heads, cache length, head_dim of the hand-written cache


class _Int8Cache(torch.nn.Module):
    """One int8 KV cache written like ``kv_quant(storage="int8")`` rewrites the Llama: codes and scales scattered
    at positions ``start_pos + t``, then the whole cache read back through ``kv_dequant``."""

    def forward(self, x, start_pos, codes, scales):
        t = x.shape[2]
        idx = (start_pos + torch.arange(t)).view(1, 1, t, 1).expand(1, H, t, D)
        s = torch.ops.llmpress.kv_scale(x, 8)
        codes = torch.scatter(codes, 2, idx, torch.ops.llmpress.kv_codes(x, s, 8))
        scales = torch.scatter(scales, 2, idx[..., :1], s)
        return torch.ops.llmpress.kv_dequant(codes, scales) * 0.5, codes, scales


def test_int8_cache_ops_are_bit_exact(tmp_path):
    """Prefill 5 vectors per head (one all-zero: the scale-1 guard; one with exact .5 ties), then 3 decode writes,
    each fed the caches ORT returned: scales, int8 codes and dequantized values equal the reference exactly."""
    torch.manual_seed(0)
    x = torch.randn(1, H, 5, D) * 3
    codes0, scales0 = torch.zeros(1, H, L, D, dtype=torch.int8), torch.zeros(1, H, L, 1)
    example = (x, torch.tensor([0]), codes0, scales0)
    module = capture(_Int8Cache(), example, dynamic=({2: torch.export.Dim("t", min=1, max=L)}, None, None, None))
    path = export(module, tmp_path / "kv.onnx")
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert {"ReduceMax", "Round", "Clip", "Cast", "ScatterElements"} <= ops
    program = OrtProgram(path)
    in_types = [i.type for i in program.session.get_inputs()]
    assert in_types == ["tensor(float)", "tensor(int64)", "tensor(int8)", "tensor(float)"]

    x[0, 1, 2] = 0.0
    x[0, 1, 4] = torch.tensor([127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.0]) * 0.125  # s = 0.125: x / s are ties
    ref, ours = module.run(x, torch.tensor([0]), codes0, scales0), program(x, torch.tensor([0]), codes0, scales0)
    assert ours[1].dtype == torch.int8 and ours[2].dtype == torch.float32
    for o, r in zip(ours, ref):
        assert torch.equal(o, r)
    assert ours[1][0, 1, 4].tolist() == [127, 0, 2, 2, 0, -2, -2, 3]  # half to even, as torch.round
    assert float(ours[2][0, 1, 2, 0]) == 1.0 and not ours[1][0, 1, 2].any()  # zero vector: scale 1, codes 0
    for pos in range(5, 8):
        step = torch.randn(1, H, 1, D) * (pos - 3)
        ref = module.run(step, torch.tensor([pos]), *ref[1:])
        ours = program(step, torch.tensor([pos]), *ours[1:])
        for o, r in zip(ours, ref):
            assert torch.equal(o, r), f"decode at position {pos}"
    assert ours[1][0, :, 8:].abs().sum() == 0  # positions never written stay zero


def _kv_int8_llama(tiny_llama):
    from llmpress.api import run_pipeline

    module, _ = run_pipeline(capture(tiny_llama), "kv_quant", progress=False)
    return module


def test_tiny_llama_int8_cache_matches_reference(tiny_llama, tmp_path):
    """The tiny Llama after ``kv_quant`` (int8 storage): cache inputs/outputs are named and typed from
    ``lm.cache_specs()``; prefill (T=6) and 4 decode steps, each fed ORT's own int8 caches, match the reference
    backend's logits. The caches themselves: scales to the logits' tolerance; codes equal except where a key/value
    lies within float32 reordering error of a rounding boundary (then the code moves by one step): none in this
    fixed model and input, which the exact comparison checks."""
    from llmpress.eval.generate import empty_cache

    module = _kv_int8_llama(tiny_llama)
    specs = module.lm.cache_specs()
    assert [c["dtype"] for c in specs[:2]] == ["int8", "float32"]
    path = export(module, tmp_path / "kv8.onnx")
    program = OrtProgram(path)
    names = [c["name"] for c in specs]
    assert program.input_names == ["input_ids", "start_pos", *[f"past_{n}" for n in names]]
    assert program.output_names == ["logits", *[f"present_{n}" for n in names]]
    assert program.input_names[2:4] == ["past_k_0", "past_k_0_scale"]
    types = {i.name: i.type for i in program.session.get_inputs()}
    assert types["past_k_0"] == "tensor(int8)" and types["past_v_1_scale"] == "tensor(float)"
    assert program.lm == module.lm
    caches = program.empty_cache()
    assert [(c.dtype, tuple(c.shape)) for c in caches] == [(c.dtype, tuple(c.shape)) for c in empty_cache(module.lm)]

    ids = torch.randint(0, tiny_llama.config.vocab_size, (1, 6), generator=torch.Generator().manual_seed(3))
    ref = module.run(ids, torch.tensor([0]), *caches)
    ours = program(ids, torch.tensor([0]), *caches)
    pos = 6
    for step in range(5):
        what = "prefill T=6" if step == 0 else f"decode at position {pos - 1}"
        torch.testing.assert_close(ours[0], ref[0], atol=ATOL, rtol=RTOL, msg=lambda m: f"{what}: {m}")
        for name, o, r in zip(names, ours[1:], ref[1:]):
            assert o.dtype == r.dtype, name
            if o.dtype == torch.int8:
                assert torch.equal(o, r), f"{what}: codes of {name}"
            else:
                torch.testing.assert_close(o, r, atol=ATOL, rtol=RTOL, msg=lambda m: f"{what}, {name}: {m}")
        nxt = ref[0][:, -1:].argmax(-1)
        ref = module.run(nxt, torch.tensor([pos]), *ref[1:])
        ours = program(nxt, torch.tensor([pos]), *ours[1:])
        pos += 1


def test_tiny_llama_int8_cache_greedy_ids_equal_reference(tiny_llama, tmp_path):
    """Greedy generation (prompt 3 tokens + 16 new), each runner allocating its caches from the specs."""
    from llmpress.eval.generate import greedy

    module = _kv_int8_llama(tiny_llama)
    program = OrtProgram(export(module, tmp_path / "g.onnx"))
    ref = greedy(module.run, module.lm, [1, 5, 9], 16)
    assert len(ref) == 19
    assert greedy(program, program.lm, [1, 5, 9], 16) == ref


def test_wrong_cache_dtype_is_refused_by_name(tiny_llama, tmp_path):
    """Float caches fed to an int8-cache model: an ArtifactError naming the input and the dtype it takes."""
    module = _kv_int8_llama(tiny_llama)
    program = OrtProgram(export(module, tmp_path / "kv8.onnx"))
    caches = program.empty_cache()
    caches[0] = caches[0].to(torch.float32)
    with pytest.raises(ArtifactError, match=r"input 'past_k_0' must be int8, got float32"):
        program(torch.tensor([[1, 2]]), torch.tensor([0]), *caches)


def test_artifact_with_w8a8_integer_and_int8_cache(tiny_llama, tmp_path):
    """The user's path: ``llmpress.compile(..., pipeline="smoothquant,kv_quant", target="onnx:integer")``, saved and
    loaded back, records its W8A8 form and int8 cache layout and generates the reference backend's greedy ids."""
    import llmpress

    from ..conftest import random_calibration

    kw = dict(pipeline="smoothquant,kv_quant", calibration=random_calibration(), progress=False)
    ref = llmpress.compile(tiny_llama, **kw)
    art = llmpress.compile(tiny_llama, target="onnx:integer", **kw)
    loaded = llmpress.load(art.save(tmp_path / "art"))
    assert loaded.manifest["target"]["spec"]["w8a8"] == "integer"
    assert [c["dtype"] for c in loaded.lm.cache_specs()[:2]] == ["int8", "float32"]
    program = loaded.compiled.program
    assert program.metadata["llmpress.w8a8"] == "integer" and "past_v_1_scale" in program.input_names
    assert loaded.generate_ids([1, 7], 12) == ref.generate_ids([1, 7], 12)
