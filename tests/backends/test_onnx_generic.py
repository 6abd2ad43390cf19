"""ONNX export of generic Hugging Face graphs (transformers' own model through ``ir.capture_hf``).

transformers' code leaves ops in the graph that our own decoder never emits: ``.to(device=..., dtype=...)``
(``aten.to.dtype_layout``, ``aten.to.device``), ``dropout`` and ``contiguous`` (identities in inference),
``chunk`` (a ``Split``), ``new_ones`` (a filled tensor of a possibly dynamic size) and ``&`` on masks
(``aten.__and__.Tensor``). Checked: each translation on a small module built to emit it (ONNX Runtime reproduces the
reference bit for bit: identities, a split, a cast and boolean logic, no arithmetic); then the case that failed
before, ``llmpress.compile(folder, pipeline="quantize(bits=4,group=16)", target="onnx")`` on a tiny random StableLM
folder, whose logits through a prefill and two decode steps equal the reference target's at the tolerance of
``test_onnx_export.py`` (1e-5: ORT's MatMulNBits and GEMMs sum in another order; see that file's docstring); and
transformers' Phi-3, Gemma 2 and GPT-2, whose graphs carry the rest of those ops, in float32 likewise.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

import llmpress  # noqa: E402
from llmpress.backends.onnx import OrtProgram, check, export  # noqa: E402
from llmpress.eval.generate import empty_cache  # noqa: E402
from llmpress.ir.capture import capture  # noqa: E402

from ..ir.test_capture_hf import VOCAB, _save  # noqa: E402

ATOL = 1e-5  # as tests/backends/test_onnx_export.py (its docstring derives it)
RTOL = 1e-5
aten = torch.ops.aten


class _TransformersOps(nn.Module):
    """The ops transformers' graphs carry, on a dynamic token count ``T``."""

    def forward(self, x: torch.Tensor, ids: torch.Tensor):  # x [2, T, 10] float, ids [2, T] int64
        a, b, c, d = x.chunk(4, dim=-1)  # sizes 3, 3, 3, 1: the last chunk shorter
        y = torch.cat([d, c, b, a], -1).transpose(1, 2).contiguous().transpose(1, 2)  # (a no-op one is dropped)
        y = F.dropout(y, 0.5, training=False)
        y = y.to(x.device).to(device=x.device, dtype=torch.float64)
        ones = ids.new_ones(ids.shape[0], ids.shape[1])  # [2, T]: a size only known at run time
        keep = (ids > 2) & (ones > 0)
        return y * keep.unsqueeze(-1), ones, x[:, :, :5].chunk(4, dim=-1)[2]  # 5 in chunks of 2: [2, 2, 1]


def test_transformers_ops_translate_exactly(tmp_path) -> None:
    x, ids = torch.randn(2, 4, 10), torch.randint(0, 6, (2, 4))
    seq = torch.export.Dim("T", min=2, max=64)
    module = capture(_TransformersOps(), (x, ids), dynamic=({1: seq}, {1: seq}))
    hist = module.op_histogram()
    for op in ("aten.chunk.default", "aten.contiguous.default", "aten.dropout.default", "aten.to.device",
               "aten.new_ones.default", "aten.__and__.Tensor"):
        assert hist[op] >= 1, (op, hist)  # the graph really carries what this test is about
    assert "aten.to.dtype_layout" not in hist  # y.to(x.device): the identity on one device, dropped at capture
    assert check(module) == []
    program = OrtProgram(export(module, tmp_path / "ops.onnx"))
    for t in (4, 7):  # the token count is one symbolic dimension of the file
        x, ids = torch.randn(2, t, 10), torch.randint(0, 6, (2, t))
        ours, ref = program(x, ids), module.run(x, ids)
        assert [o.dtype for o in ours] == [r.dtype for r in ref] == [torch.float64, torch.int64, torch.float32]
        assert all(torch.equal(o, r) for o, r in zip(ours, ref))


def test_training_dropout_is_refused_by_name(tmp_path) -> None:
    from llmpress.errors import UnsupportedOpError

    class Drop(nn.Module):
        def forward(self, x):
            return torch.ops.aten.dropout.default(x, 0.1, True) + 1

    module = capture(Drop(), (torch.randn(2, 3),), dynamic=False)
    with pytest.raises(UnsupportedOpError, match=r"aten\.dropout\.default.*training mode \(p=0\.1\)"):
        export(module, tmp_path / "drop.onnx")


@pytest.fixture(scope="module")
def stablelm(tmp_path_factory):
    return _save(tmp_path_factory.mktemp("stablelm") / "m", "stablelm")


def test_int4_generic_folder_compiles_for_onnx(stablelm) -> None:
    """The call that failed (StableLM's graph: ``to.dtype_layout``, ``to.device``, ``contiguous``, ``dropout``
    had no translation; the other ops above come from the Llama families' transformers graphs): every projection is a MatMulNBits, and ONNX Runtime's
    logits and caches equal the reference artifact's through a prefill and two decode steps."""
    pipe = "quantize(bits=4,group=16)"
    ours = llmpress.compile(stablelm, pipeline=pipe, target="onnx", progress=False)
    ref = llmpress.compile(stablelm, pipeline=pipe, target="reference", progress=False)
    assert ours.passes[0]["stats"]["quantized"] == 2 * 7 + 1
    ops = [n.op_type for n in onnx.load(str(ours.compiled.path)).graph.node]
    assert ops.count("MatMulNBits") == 2 * 7 + 1 and "MatMul" in ops  # attention's q k^T and p v stay float

    def close(a, b, what):
        assert len(a) == len(b), what
        for i, (x, y) in enumerate(zip(a, b)):
            torch.testing.assert_close(torch.as_tensor(x), torch.as_tensor(y), atol=ATOL, rtol=RTOL,
                                       msg=lambda m: f"{what}, output {i}: {m}")

    ids = torch.randint(0, VOCAB - 2, (1, 5), generator=torch.Generator().manual_seed(3))
    got = ours(ids, torch.tensor([0]), *empty_cache(ours.lm))
    want = ref(ids, torch.tensor([0]), *empty_cache(ref.lm))
    close(got, want, "prefill T=5")
    for pos in (5, 6):
        nxt = torch.as_tensor(want[0])[:, -1:].argmax(-1)
        got = ours(nxt, torch.tensor([pos]), *got[1:])
        want = ref(nxt, torch.tensor([pos]), *want[1:])
        close(got, want, f"decode T=1 at position {pos}")


_SMALL = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=32)


@pytest.mark.parametrize("kind, kw, ops", [
    ("phi3", {**_SMALL, "pad_token_id": 0}, ["aten.chunk.default", "aten.contiguous.default"]),  # gate_up split
    ("gemma2", {**_SMALL, "head_dim": 16, "sliding_window": 8},  # sliding-window mask: & of masks
     ["aten.new_ones.default", "aten.__and__.Tensor"]),
    ("gpt2", dict(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=32),  # Conv1D: linears
     ["aten.dropout.default", "aten.linear.default"]),
])
def test_generic_families_export_in_float(tmp_path, kind, kw, ops) -> None:
    """transformers' Phi-3, Gemma 2 and GPT-2 (models llmpress's own loaders cover for folders) captured
    generically: the graphs carry the other translated ops, and ONNX Runtime equals the reference through a prefill
    of 5 and one decode step (tolerance of ``test_onnx_export.py``)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from llmpress.ir.capture_hf import capture_hf

    torch.manual_seed(0)
    module = capture_hf(AutoModelForCausalLM.from_config(AutoConfig.for_model(kind, **kw)).eval(), cache_len=16)
    hist = module.op_histogram()
    assert all(hist[op] >= 1 for op in ops) and "aten.addmm.default" not in hist, hist
    program = OrtProgram(export(module, tmp_path / f"{kind}.onnx"))
    ids = torch.randint(0, VOCAB - 2, (1, 5), generator=torch.Generator().manual_seed(3))
    ref = module.run(ids, torch.tensor([0]), *empty_cache(module.lm))
    got = program(ids, torch.tensor([0]), *empty_cache(module.lm))
    nxt = ref[0][:, -1:].argmax(-1)
    for step, (a, b) in enumerate([(got, ref), (program(nxt, torch.tensor([5]), *got[1:]),
                                                module.run(nxt, torch.tensor([5]), *ref[1:]))]):
        for o, r in zip(a, b):
            torch.testing.assert_close(torch.as_tensor(o), r, atol=ATOL, rtol=RTOL, msg=lambda m: f"step {step}: {m}")
