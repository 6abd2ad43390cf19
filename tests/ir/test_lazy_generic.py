"""Lazy weights for Hugging Face folders (``loaders.hf_generic``): transformers' own model with fake parameters, each
weight read from the checkpoint when a pass asks.

Tiny random models saved by transformers in bfloat16 and sharded (nothing downloaded): StableLM, a tied-embedding StableLM whose checkpoint omits ``lm_head``, GPT-NeoX (whose checkpoint
names ``lm_head`` ``embed_out``: one of transformers' pure renamings), and Mixtral, whose per-expert checkpoint
tensors transformers fuses on load (no one-to-one match: loaded eagerly, said in the log).
"""
from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensor

import llmpress
from llmpress.errors import LoadError
from llmpress.eval.generate import empty_cache
from llmpress.ir.lazy import LAZY_ATTR, LazyTensor
from llmpress.ir.loaders import load_model
from llmpress.safetensors_io import read_header, read_tensor, write_streamed

VOCAB = 256
TINY = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=32, bos_token_id=VOCAB - 2, eos_token_id=VOCAB - 1)
# Attention over the padded static cache vs transformers' exact prefix: same fp32 ops, another reduction order
# (measured ~2e-7 on logits of magnitude ~1 in tests/ir/test_capture_hf.py), so 1e-5 absolute is tight.
ATOL = 1e-5


def _save(folder, kind: str, **kw):
    """A random ``kind`` model saved by transformers in bfloat16, in shards of at most 100 KB (each tensor of this
    size is 4-32 KB in bf16: several shards); noise on every parameter so biases and norms carry information."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(kind, **{**TINY, **kw}))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.to(torch.bfloat16).save_pretrained(str(folder), max_shard_size="100KB")
    return folder


def _transformers_logits(folder, x: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    with torch.no_grad():
        return hf(x).logits


def _ids(t: int = 9) -> torch.Tensor:
    return torch.randint(0, VOCAB - 2, (1, t), generator=torch.Generator().manual_seed(3))


def _logits(art, x: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(art(x, torch.zeros(1, dtype=torch.int64), *empty_cache(art.lm))[0])


@pytest.fixture(scope="module")
def stablelm(tmp_path_factory):
    return _save(tmp_path_factory.mktemp("stablelm") / "m", "stablelm", num_key_value_heads=2)


def _assert_lazy(model) -> dict[str, LazyTensor]:
    """Every parameter is a shape-only fake and has a checkpoint source: nothing was read."""
    sources = getattr(model, LAZY_ATTR)
    params = dict(model.named_parameters(remove_duplicate=False))
    assert params and set(params) == set(sources)
    assert all(isinstance(p, FakeTensor) for p in params.values())
    assert all(isinstance(s, LazyTensor) and s.stored_dtype == torch.bfloat16 for s in sources.values())
    assert all(b.device.type == "cpu" and not isinstance(b, FakeTensor) for b in model.buffers())  # rotary inv_freq
    return sources


def test_lazy_load_reads_no_weight(stablelm) -> None:
    assert len(json.loads((stablelm / "model.safetensors.index.json").read_text())["weight_map"]) == 26
    model = load_model(stablelm, lazy=True).model
    sources = _assert_lazy(model)
    assert len({s.path for s in sources.values()}) > 1  # read from the shards the index names
    assert sources["model.layers.1.self_attn.q_proj.weight"].tensor == "model.layers.1.self_attn.q_proj.weight"
    module = llmpress.ir.capture(model)
    stored = module.stored_weights()
    assert set(sources) <= set(stored) and all(module.is_lazy(k) and isinstance(stored[k], FakeTensor) for k in sources)


def test_exact_compile_equals_transformers(stablelm) -> None:
    x = _ids()
    art = llmpress.compile(stablelm, pipeline="", target="reference", progress=False)
    torch.testing.assert_close(_logits(art, x), _transformers_logits(stablelm, x), rtol=0, atol=ATOL)


def test_quantized_compile_equals_the_eager_path(stablelm) -> None:
    """The lazy path reads each weight as the eager load does (bf16 -> float32) and rewrites it to the same bits."""
    pipe = "quantize(bits=4,group=16)"
    lazy = llmpress.compile(stablelm, pipeline=pipe, target="reference", progress=False)
    eager_model = load_model(stablelm).model
    assert not hasattr(eager_model, LAZY_ATTR) and not any(isinstance(p, FakeTensor) for p in eager_model.parameters())
    eager = llmpress.compile(llmpress.ir.capture(eager_model), pipeline=pipe, target="reference", progress=False)
    assert lazy.passes[0]["stats"]["quantized"] == eager.passes[0]["stats"]["quantized"] == 2 * 7 + 1
    x = _ids()
    assert torch.equal(_logits(lazy, x), _logits(eager, x))


@pytest.mark.parametrize("kind, kw, head_source", [
    ("stablelm", dict(num_key_value_heads=2, tie_word_embeddings=True), "model.embed_tokens.weight"),
    ("gpt_neox", {}, "embed_out.weight"),
], ids=["tied", "renamed"])
def test_tied_and_renamed_heads_load_lazily(tmp_path, kind, kw, head_source) -> None:
    """A tied ``lm_head`` (absent from the checkpoint) shares the embedding's parameter and source; GPT-NeoX's
    ``embed_out`` is read as ``lm_head``. Both compile to transformers' logits."""
    folder = _save(tmp_path / kind, kind, **kw)
    names = set(json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"])
    assert "lm_head.weight" not in names and head_source in names
    model = load_model(folder, lazy=True).model
    sources = _assert_lazy(model)
    assert sources["lm_head.weight"].tensor == head_source
    if kw.get("tie_word_embeddings"):
        assert model.lm_head.weight is model.model.embed_tokens.weight
    x = _ids()
    art = llmpress.compile(folder, pipeline="", target="reference", progress=False)
    torch.testing.assert_close(_logits(art, x), _transformers_logits(folder, x), rtol=0, atol=ATOL)


def test_checkpoint_transformers_converts_loads_eagerly_and_says_why(tmp_path, caplog) -> None:
    folder = _save(tmp_path / "mixtral", "mixtral", num_key_value_heads=2, num_local_experts=2, num_experts_per_tok=1)
    with caplog.at_level(logging.INFO, logger="llmpress.ir.loaders.hf_generic"):
        model = load_model(folder, lazy=True).model
    assert not hasattr(model, LAZY_ATTR) and not any(isinstance(p, FakeTensor) for p in model.parameters())
    said = [r.getMessage() for r in caplog.records if "eagerly" in r.getMessage()]
    assert len(said) == 1 and "model.layers.0.mlp.experts.gate_up_proj <- 4 tensors" in said[0]
    assert "transformers converts on load (model.layers.0.block_sparse_moe.experts.0.w1.weight" in said[0]


def _rewrite(src, dst, change) -> None:
    """``dst``: ``src``'s folder with its shards merged into one ``model.safetensors`` and ``change(name, tensor)``
    applied (None drops the tensor)."""
    shutil.copy(src / "config.json", dst / "config.json")
    weight_map = json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]
    out = {}
    for name, f in weight_map.items():
        entries, start = read_header(src / f)
        t = change(name, read_tensor(src / f, entries[name], start))
        if t is not None:
            out[name] = (t.dtype, tuple(t.shape), (lambda t=t: t))
    write_streamed(dst / "model.safetensors", out, metadata={"format": "pt"})


def test_damaged_checkpoints_are_refused_by_name(stablelm, tmp_path) -> None:
    """A tensor of the wrong shape: the load names file and tensor. A missing one: named too, by the lazy and the
    eager load (where transformers would initialize it at random)."""
    (tmp_path / "shape").mkdir()
    _rewrite(stablelm, tmp_path / "shape", lambda n, t: t[:-1] if n == "model.layers.1.mlp.up_proj.weight" else t)
    with pytest.raises(LoadError, match=r"model.safetensors: tensor model.layers.1.mlp.up_proj.weight: shape "
                                        r"\(128, 64\) expected, found \(127, 64\)"):
        load_model(tmp_path / "shape", lazy=True)
    with pytest.raises(LoadError, match=r"tensor model.layers.1.mlp.up_proj.weight: shape"):
        load_model(tmp_path / "shape")
    (tmp_path / "missing").mkdir()
    _rewrite(stablelm, tmp_path / "missing", lambda n, t: None if n == "model.layers.1.mlp.up_proj.weight" else t)
    for lazy in (True, False):
        with pytest.raises(LoadError, match=r"model.safetensors: missing tensor model.layers.1.mlp.up_proj.weight "
                                            r"\(in .*; model_type 'stablelm' has 1 parameters the checkpoint lacks\)"):
            load_model(tmp_path / "missing", lazy=lazy)
