"""ONNX export: the exported file passes ``onnx.checker`` and ONNX Runtime reproduces ``module.run``.

Tolerance (``ATOL``/``RTOL`` below): the exported graph computes the same float32 math as the FX graph, op for op;
what differs is the summation order inside GEMMs and reductions (ORT's MLAS kernels vs PyTorch's), plus
``rsqrt`` spelled ``1/sqrt``. Each such op contributes a relative error of a few float32 ulps (~1e-7); through two
layers the measured worst difference on logits of magnitude ~2 is 6e-7. ``atol=1e-5, rtol=1e-5`` keeps a >10x
margin and is still 100x below the effect of any real mistake (a wrong RoPE half, mask, packing nibble or scale
changes logits by >1e-2). Quantized models get the same tolerance: MatMulNBits dequantizes ``(c - zp) * s`` in
float32 exactly like the reference kernel, so only the GEMM order differs there too.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from llmpress.backends.onnx import OrtProgram, check, export  # noqa: E402
from llmpress.errors import UnsupportedOpError  # noqa: E402
from llmpress.ir.capture import capture  # noqa: E402

ATOL = 1e-5
RTOL = 1e-5


def _assert_close(ours, ref, what: str) -> None:
    assert len(ours) == len(ref), what
    for i, (o, r) in enumerate(zip(ours, ref)):
        assert o.shape == r.shape, (what, i, o.shape, r.shape)
        torch.testing.assert_close(o, r, atol=ATOL, rtol=RTOL, msg=lambda m: f"{what}, output {i}: {m}")


def _prefill_then_decode(module, program, vocab: int, steps: int = 2) -> None:
    """Prefill T=5 from empty caches, then ``steps`` decode calls (T=1), each fed the caches it returned."""
    torch.manual_seed(1)
    from llmpress.eval.generate import empty_cache

    caches = empty_cache(module.lm)
    ids = torch.randint(0, vocab, (1, 5))
    ref = module.run(ids, torch.tensor([0]), *caches)
    ours = program(ids, torch.tensor([0]), *caches)
    _assert_close(ours, ref, "prefill T=5")
    pos = 5
    for _ in range(steps):
        nxt = ref[0][:, -1:].argmax(-1)
        ref = module.run(nxt, torch.tensor([pos]), *ref[1:])
        ours = program(nxt, torch.tensor([pos]), *ours[1:])
        _assert_close(ours, ref, f"decode T=1 at position {pos}")
        pos += 1


def _ops(path) -> dict[str, int]:
    m = onnx.load(str(path))
    out: dict[str, int] = {}
    for n in m.graph.node:
        out[n.op_type] = out.get(n.op_type, 0) + 1
    return out


def _run_pipeline(module, text: str):
    from llmpress.api import run_pipeline

    module, _ = run_pipeline(module, text, progress=False)
    return module


def test_fp32_prefill_and_decode_match_reference(tiny_llama, tmp_path):
    module = capture(tiny_llama)
    path = export(module, tmp_path / "tiny.onnx")
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    # T is one symbolic dimension named in the file, so one model serves prefill and decode.
    ids_type = model.graph.input[0].type.tensor_type
    assert model.graph.input[0].name == "input_ids"
    assert [d.dim_param or d.dim_value for d in ids_type.shape.dim] == [1, "T"]
    assert [i.name for i in model.graph.input[1:4]] == ["start_pos", "past_k_0", "past_v_0"]
    assert [o.name for o in model.graph.output[:2]] == ["logits", "present_k_0"]
    # ONNX node names follow the model's modules (what ORT's quantizer takes in nodes_to_exclude).
    assert "lm_head/MatMul" in {n.name for n in model.graph.node}
    program = OrtProgram(path)
    assert program.lm == module.lm
    _prefill_then_decode(module, program, tiny_llama.config.vocab_size)


def test_exact_pipeline_with_fused_qkv_exports(tiny_llama, tmp_path):
    module = _run_pipeline(capture(tiny_llama), "exact")
    assert module.op_histogram()["aten.split_with_sizes.default"] > 0  # fuse_qkv's split is exercised
    path = export(module, tmp_path / "exact.onnx")
    assert _ops(path)["Split"] == tiny_llama.config.n_layers
    _prefill_then_decode(module, OrtProgram(path), tiny_llama.config.vocab_size)


def test_greedy_generation_through_ort_equals_reference(tiny_llama, tmp_path):
    from llmpress.eval.generate import greedy

    module = capture(tiny_llama)
    program = OrtProgram(export(module, tmp_path / "g.onnx"))
    ref = greedy(module.run, module.lm, [1, 5, 9], 12)
    assert greedy(program, module.lm, [1, 5, 9], 12) == ref


# bits, group (0: per channel), sym, the MatMulNBits bits/block_size expected in the file
_WQ_CASES = [
    (4, 32, True, 4, 32),
    (4, 32, False, 4, 32),
    (8, 0, True, 8, 32),  # per channel on K=32 (q/k/v/o, gate/up) and K=64 (down): blocks of 32/64
    (2, 16, True, 2, 16),
    (3, 32, True, 4, 32),  # no 3-bit kernel: widened to 4-bit codes, same weights
]


@pytest.mark.parametrize("bits,group,sym,nbits,block", _WQ_CASES)
def test_quantized_model_exports_to_matmulnbits(tiny_llama, tmp_path, bits, group, sym, nbits, block):
    from llmpress.passes.base import PassContext
    from llmpress.passes.quantize import Quantize, QuantizeOptions

    opts = QuantizeOptions(bits=bits, group=group, sym=sym)
    module = Quantize(opts).run(capture(tiny_llama), PassContext(progress=False)).module
    n_wq = module.op_histogram()["llmpress.wq_linear.default"]
    assert n_wq > 0
    path = export(module, tmp_path / "q.onnx")
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    nbits_nodes = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    assert len(nbits_nodes) == n_wq
    attrs = {a.name: a.i for a in nbits_nodes[0].attribute}
    assert attrs["bits"] == nbits
    assert attrs["block_size"] == (block if group else min(block, attrs["K"]))
    has_zp = any(len(n.input) > 3 and n.input[3] for n in nbits_nodes)
    assert has_zp == (not sym)
    _prefill_then_decode(module, OrtProgram(path), tiny_llama.config.vocab_size)


@pytest.mark.parametrize("pipeline,w8a8,op,absent", [
    ("smoothquant", "qdq", "QuantizeLinear", "MatMulInteger"),  # the default W8A8 form
    ("smoothquant", "integer", "MatMulInteger", "QuantizeLinear"),
    ("gptq(bits=4,group=32)", "qdq", "MatMulNBits", "QuantizeLinear"),
    ("kv_quant", "qdq", "Round", "MatMulInteger")])
def test_calibrated_pipelines_export(tiny_llama, tmp_path, pipeline, w8a8, op, absent):
    """What the calibration passes produce exports too. SmoothQuant's W8A8 layers quantize activations per token
    inside the graph: the codes are reproduced exactly in both forms (the integer product too, in ``integer``), but
    an upstream float32 difference (~1e-7) could in principle move one activation across a rounding boundary; for
    this fixed model and input none does (measured worst logit difference 5e-7 for ``integer``, 6e-7 for ``qdq``,
    whose float32 MatMul over dequantized values adds only summation-order error), so the common tolerance holds."""
    from llmpress.api import run_pipeline
    from llmpress.passes.calibration import Calibration

    g = torch.Generator().manual_seed(0)
    cal = Calibration.from_tensors([torch.randint(0, 64, (1, 16), generator=g) for _ in range(4)])
    module, _ = run_pipeline(capture(tiny_llama), pipeline, calibration=cal, progress=False)
    path = export(module, tmp_path / "cal.onnx") if w8a8 == "qdq" else export(module, tmp_path / "cal.onnx",
                                                                              w8a8=w8a8)
    ops = _ops(path)
    assert ops.get(op, 0) > 0 and ops.get(absent, 0) == 0, ops
    if pipeline == "smoothquant":
        n = module.op_histogram()["llmpress.w8a8_linear.default"]
        assert ops[op] == n
        assert OrtProgram(path).metadata["llmpress.w8a8"] == w8a8
    _prefill_then_decode(module, OrtProgram(path), tiny_llama.config.vocab_size)


def test_group_without_power_of_two_block_is_refused(tmp_path):
    """Group 8 has no MatMulNBits block (powers of two from 16): refused before anything is written."""
    from llmpress.ir.ops.wq_linear import pack_weight

    class One(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("qw", pack_weight(torch.randint(-8, 8, (4, 16)), 4, sym=True))
            self.register_buffer("s", torch.rand(4, 2))

        def forward(self, x):
            return torch.ops.llmpress.wq_linear(x, self.qw, self.s, None, None, 4, 8)

    module = capture(One(), (torch.randn(2, 16),), dynamic=False)
    with pytest.raises(UnsupportedOpError, match=r"llmpress\.wq_linear.*group_size 8"):
        export(module, tmp_path / "bad.onnx")
    assert not (tmp_path / "bad.onnx").exists()


def _one_w8a8_layer():
    """A captured single ``w8a8_linear`` (in 48, out 24, with bias) with a dynamic token axis, and an input whose
    token ``[0, 3]`` is all zero (the scale-1 guard)."""
    from llmpress.ir.ops.w8a8 import quantize_weight

    torch.manual_seed(0)
    qw, ws = quantize_weight(torch.randn(24, 48))

    class One(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("qw", qw)
            self.register_buffer("ws", ws)
            self.bias = torch.nn.Parameter(torch.randn(24))

        def forward(self, x):
            return torch.ops.llmpress.w8a8_linear(x, self.qw, self.ws, self.bias)

    x = torch.randn(2, 7, 48)
    x[0, 3] = 0.0
    return capture(One(), (x,), dynamic=({1: torch.export.Dim("t", min=1, max=64)},)), x  # float input: say it


def test_w8a8_linear_exports_to_matmulinteger(tmp_path):
    """One w8a8 layer, ``w8a8="integer"``: per-token int8 quantization and the int32 product are reproduced exactly,
    so the only difference left is float32 rounding of the two final scale multiplications (identical order):
    1e-6 relative."""
    module, x = _one_w8a8_layer()
    path = export(module, tmp_path / "w8a8.onnx", w8a8="integer")
    ops = _ops(path)
    assert ops.get("MatMulInteger") == 1 and "QuantizeLinear" not in ops
    x2 = torch.randn(2, 11, 48)  # another sequence length through the same file
    for inp in (x, x2):
        (ours,) = OrtProgram(path)(inp)
        torch.testing.assert_close(ours, module.run(inp), atol=1e-6, rtol=1e-6)


def test_w8a8_linear_exports_to_qdq(tmp_path):
    """One w8a8 layer in the default QDQ form. The activation codes ORT's QuantizeLinear produces are identical to
    ``quantize_activation``'s (half-to-even ties included: some inputs sit exactly on k + 0.5 scales). The output
    then differs only by float32 arithmetic: the reference sums integer products exactly and scales once, the QDQ
    graph rounds each dequantized value, product and partial sum. The standard bound for a K-term float sum gives,
    per output, ``|ours - ref| <= (K + 6) * 2^-24 * S`` with ``S = sum_k |xq[k] wq[k]| + |bias|`` (K - 1 sums, 2
    dequantizations, 1 product, 1 bias add on our side, 3 roundings on the reference's); asserted element-wise."""
    import onnx.helper as oh
    from onnx import TensorProto

    from llmpress.ir.ops.w8a8 import dequantize_weight, quantize_activation

    module, x = _one_w8a8_layer()
    path = export(module, tmp_path / "w8a8.onnx")  # the default form
    model = onnx.load(str(path))
    ops = _ops(path)
    assert ops.get("QuantizeLinear") == 1 and ops.get("DequantizeLinear") == 2 and "MatMulInteger" not in ops, ops
    assert {p.key: p.value for p in model.metadata_props}["llmpress.w8a8"] == "qdq"
    # Expose the activation codes as a second output, to compare them with the reference's.
    (q_node,) = [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
    model.graph.output.append(oh.make_tensor_value_info(q_node.output[0], TensorProto.INT8, ["M", 48]))
    onnx.save_model(model, str(tmp_path / "codes.onnx"))
    program = OrtProgram(tmp_path / "codes.onnx")

    qw, ws = module.weights()["qw"], module.weights()["ws"]
    bias = module.weights()["bias"].detach()
    eps = 2.0 ** -24
    # Ties: with a power-of-two scale s0 = 2^-3 (absmax 127 * s0), x = (k + 0.5) * s0 and x / s0 are exact.
    s0 = 2.0 ** -3
    x_ties = (torch.randn(2, 5, 48) * 30 * s0).clamp(-100 * s0, 100 * s0)
    x_ties[..., :8] = (torch.randint(-120, 120, (2, 5, 8)) + 0.5) * s0
    x_ties[..., -1] = 127 * s0
    for inp in (x, torch.randn(2, 11, 48) * 30, x_ties):
        ours, codes = program(inp)
        qx, sx = quantize_activation(inp.reshape(-1, 48))
        assert torch.equal(codes.to(torch.float32), qx), "QuantizeLinear codes differ from the reference"
        ref = module.run(inp)
        xq = (qx * sx[:, None]).reshape(*inp.shape)
        s = xq.abs() @ dequantize_weight(qw, ws).abs().t() + bias.abs()
        err = (ours - ref).abs()
        bound = (48 + 6) * eps * s
        assert bool((err <= bound).all()), f"worst error / bound: {float((err / bound).max())}"
    assert bool((sx == s0).all()) and bool((qx[:, :8] % 2 == 0).all())  # every tie went to the even code


def test_qdq_weights_folded_once_on_request(tmp_path):
    """``OrtProgram(fold_qdq_weights=True)``: ORT's constant folding turns the int8 weight's DequantizeLinear into a
    float initializer at load (only the activation's Q/DQ pair is left in the optimized graph), and the outputs stay
    those of the unfolded session up to float32 GEMM order (same 1e-6 as the integer form's test: one K=48 layer)."""
    module, x = _one_w8a8_layer()
    path = export(module, tmp_path / "w8a8.onnx")
    folded = OrtProgram(path, fold_qdq_weights=True)
    assert folded.session.get_session_options().get_session_config_entry("session.disable_quant_qdq") == "1"
    so = ort.SessionOptions()
    so.add_session_config_entry("session.disable_quant_qdq", "1")
    so.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    opt = _ops(tmp_path / "opt.onnx")
    assert opt.get("DequantizeLinear") == 1 and opt.get("QuantizeLinear") == 1, opt
    (ours,) = folded(x)
    (plain,) = OrtProgram(path)(x)
    torch.testing.assert_close(ours, plain, atol=1e-6, rtol=1e-6)


def test_w8a8_form_is_validated_and_recorded(tmp_path):
    """A typo in the form fails with the choices listed, for the export keyword and for the target string; the
    target's form reaches the file's metadata and the manifest's target spec."""
    from llmpress.backends import backend_for_target
    from llmpress.backends.onnx.backend import OnnxBackend
    from llmpress.errors import ConfigError

    module, _ = _one_w8a8_layer()
    with pytest.raises(ConfigError, match=r"'int'.*'qdq' \(default\), 'integer'"):
        export(module, tmp_path / "bad.onnx", w8a8="int")
    assert not (tmp_path / "bad.onnx").exists()
    with pytest.raises(ConfigError, match=r"'onnx:int8'.*onnx, onnx:qdq, onnx:integer"):
        backend_for_target("onnx:int8")
    assert isinstance(backend_for_target("onnx:integer"), OnnxBackend)
    for target, form, op in (("onnx", "qdq", "QuantizeLinear"), ("onnx:integer", "integer", "MatMulInteger")):
        compiled = OnnxBackend().lower(module, target, progress=False)
        assert compiled.target_json()["spec"]["w8a8"] == form
        assert _ops(compiled.path).get(op) == 1


def test_kv_fake_quant_exports(tmp_path):
    """Per-vector absmax fake quantization with standard ops: same division, rounding and product as the reference
    kernel, so the result is equal to float32 rounding (1e-6)."""

    class KV(torch.nn.Module):
        def forward(self, x):
            return torch.ops.llmpress.kv_fake_quant(x, 8) * 2.0

    import llmpress.ir.ops  # noqa: F401 - registers the op

    x = torch.randn(1, 2, 5, 8)
    x[0, 1, 2] = 0.0
    module = capture(KV(), (x,), dynamic=False)
    (ours,) = OrtProgram(export(module, tmp_path / "kv.onnx"))(x)
    torch.testing.assert_close(ours, module.run(x), atol=1e-6, rtol=1e-6)


def test_unsupported_op_names_op_and_source_line(tmp_path):
    class Sorts(torch.nn.Module):
        def forward(self, x):
            return torch.sort(x, dim=-1).values + 1  # aten.sort has no translation

    module = capture(Sorts(), (torch.randn(3, 4),), dynamic=False)
    problems = check(module)
    assert [p.op for p in problems] == ["aten.sort.default"]
    with pytest.raises(UnsupportedOpError) as e:
        export(module, tmp_path / "sort.onnx")
    msg = str(e.value)
    assert "aten.sort.default" in msg and "test_onnx_export.py:" in msg, msg
    assert e.value.op == "aten.sort.default"


def test_ort_quantizer_finds_the_exported_matmuls(tiny_llama, tmp_path):
    """The fp32 export stores linear weights as MatMul initializers, which ONNX Runtime's own 4-bit quantizer
    (the benchmark's peer) recognises: every linear becomes a MatMulNBits. (ORT's quantizer imports ``onnx_ir``,
    part of the ``bench`` extra.)"""
    pytest.importorskip("onnx_ir")
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    module = capture(tiny_llama)
    path = export(module, tmp_path / "fp32.onnx")
    q = MatMulNBitsQuantizer(onnx.load(str(path)), block_size=32, is_symmetric=True)
    q.process()
    n_linear = module.op_histogram()["aten.linear.default"]
    assert sum(n.op_type == "MatMulNBits" for n in q.model.model.graph.node) == n_linear


@pytest.mark.slow
def test_tinystories_window_matches_reference(shared, tmp_path):
    """The real model (8 layers, 256-token window): logits of the exported fp32 model, and of RTN int4 g128 as
    MatMulNBits, equal ``module.run``. Deeper and wider than the tiny model, so float32 reordering error grows:
    atol/rtol 1e-4 on logits up to ~15 (measured worst 1.4e-5 for both), far below what moves a perplexity digit."""
    from llmpress.eval.generate import empty_cache
    from llmpress.eval.perplexity import token_stream
    from llmpress.ir.loaders import load_model

    from ..conftest import TINYSTORIES, VALID

    loaded = load_model(TINYSTORIES)
    module = capture(loaded.model)
    program = OrtProgram(export(module, tmp_path / "ts.onnx"))
    ids = torch.tensor([token_stream(VALID, loaded.tokenizer, max_tokens=256)])
    ref = module.run(ids, torch.tensor([0]), *empty_cache(module.lm))
    ours = program(ids, torch.tensor([0]), *empty_cache(module.lm))
    torch.testing.assert_close(ours[0], ref[0], atol=1e-4, rtol=1e-4)
    assert np.array_equal(ours[0][0].argmax(-1).numpy(), ref[0][0].argmax(-1).numpy())

    from llmpress.passes.base import PassContext
    from llmpress.passes.quantize import Quantize, QuantizeOptions

    q = Quantize(QuantizeOptions(bits=4, group=128, exclude=("lm_head",))).run(module, PassContext(progress=False))
    path = export(q.module, tmp_path / "ts_int4.onnx")
    assert _ops(path)["MatMulNBits"] == q.stats["quantized"]
    ref = q.module.run(ids, torch.tensor([0]), *empty_cache(module.lm))
    ours = OrtProgram(path)(ids, torch.tensor([0]), *empty_cache(module.lm))
    torch.testing.assert_close(ours[0], ref[0], atol=1e-4, rtol=1e-4)
