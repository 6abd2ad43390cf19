"""Hugging Face folders of the common decoder families as transformers writes them (tiny random models built here,
nothing downloaded): Qwen2 (q/k/v bias, tied embeddings), Qwen3 (q_norm/k_norm), Mistral (sliding window), Phi-3
(fused qkv_proj / gate_up_proj), GPT-2 (Conv1D), Gemma 2/3; a sharded bf16 checkpoint with a generation_config.
Each loads as transformers' own model, lazily, and its captured graph is checked against transformers' eager
logits, cached decode against a full forward, and through the CLI."""
from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch

import llmpress
from llmpress.ir.capture import capture
from llmpress.errors import LoadError
from llmpress.eval.generate import empty_cache
from llmpress.ir.loaders import load_model

from ..conftest import TINYSTORIES

VOCAB = 2048  # the tinystories tokenizer's, so its files can sit beside the weights
TINY = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64)


def _config(kind: str, **kw):
    from transformers import (Gemma2Config, Gemma3TextConfig, GPT2Config, LlamaConfig, MistralConfig, Phi3Config,
                              Qwen2Config, Qwen3Config)

    if kind == "gpt2":  # its own key names; GPT-2 has one KV head per query head
        return GPT2Config(**{"vocab_size": VOCAB, "n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 64,
                             "bos_token_id": 1, "eos_token_id": 2, **kw})
    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config, "mistral": MistralConfig,
           "phi3": Phi3Config, "gemma2": Gemma2Config, "gemma3_text": Gemma3TextConfig}[kind]
    return cls(**{**TINY, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, **kw})


def _save(folder, kind: str, *, dtype=torch.float32, shard: str | None = None, tokenizer: bool = False, **kw):
    """A random ``kind`` model saved by transformers into ``folder``. Every parameter gets noise on top of the init,
    so biases (initialised to 0) and norm weights (to 1) carry information the comparison can see."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_config(kind, **kw))
    with torch.no_grad():
        for p in model.parameters():  # tied weights are one Parameter, perturbed once
            p.add_(0.05 * torch.randn_like(p))
    model.to(dtype).save_pretrained(str(folder), **({"max_shard_size": shard} if shard else {}))
    if tokenizer:
        for name in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json"):
            shutil.copy(TINYSTORIES / name, folder / name)
            (folder / name).chmod(0o644)
    return folder


def _hf_fp32(folder):
    """transformers' own model from the same files, in float32 (bf16 weights upcast exactly, as llmpress does)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, attn_implementation="eager").eval()


def _ids(t: int = 10, seed: int = 3) -> torch.Tensor:
    return torch.randint(0, VOCAB, (1, t), generator=torch.Generator().manual_seed(seed))


def _check_against_transformers(folder, **load) -> llmpress.ir.Module:
    """The graph captured from the folder (lazily, as ``compile`` does: no weight read until used) gives transformers'
    eager fp32 logits; prefill + one-token decode steps through the cache equal the full forward. Same fp32 ops on
    both sides; only reduction order differs (attention over the padded static cache), measured ~3e-7 on logits of
    magnitude ~1, so 1e-5 absolute is tight."""
    loaded = load_model(folder, lazy=True, **load)
    assert hasattr(loaded.model, "_llmpress_lazy_sources")  # named one to one: nothing read yet
    module = llmpress.ir.capture(loaded.model)
    x = _ids()
    zero = torch.zeros(1, dtype=torch.int64)
    caches = empty_cache(module.lm)
    with torch.no_grad():
        want = _hf_fp32(folder)(x).logits
        full, *_ = module.run(x, zero, *caches)
        torch.testing.assert_close(full, want, rtol=0, atol=1e-5)
        # Prefill 6 tokens, then decode 4 one at a time.
        logits, *caches = module.run(x[:, :6], zero, *caches)
        steps = [logits]
        for p in range(6, 10):
            logits, *caches = module.run(x[:, p:p + 1], torch.tensor([p]), *caches)
            steps.append(logits)
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=0, atol=1e-5)
    return module


@pytest.mark.parametrize("kind,kw", [("qwen2", {"tie_word_embeddings": True}), ("qwen3", {"head_dim": 32}),
                                     ("mistral", {"sliding_window": 64}), ("phi3", {}), ("gpt2", {}),
                                     ("gemma2", {"sliding_window": 64, "head_dim": 32, "query_pre_attn_scalar": 24,
                                                 # caps small enough to bend these random models' scores
                                                 "attn_logit_softcapping": 0.5, "final_logit_softcapping": 0.2}),
                                     # a sliding layer (RoPE theta 1e4) and a global one (theta 1e6, linear x8)
                                     ("gemma3_text", {"sliding_window": 64, "head_dim": 32,
                                                      "layer_types": ["sliding_attention", "full_attention"],
                                                      "rope_scaling": {"rope_type": "linear", "factor": 8.0}})])
def test_family_matches_transformers(tmp_path, kind, kw) -> None:
    folder = _save(tmp_path / kind, kind, **kw)
    module = _check_against_transformers(folder)
    assert module.lm.extra["model_type"] == kind
    hist = module.op_histogram()
    if kind == "qwen2":  # q/k/v bias, tied classifier (transformers writes no lm_head.weight)
        from safetensors import safe_open

        assert "lm_head.weight" not in safe_open(str(folder / "model.safetensors"), "pt").keys()
        assert module.lazy_source("lm_head.weight") == module.lazy_source("model.embed_tokens.weight")
        assert "model.layers.0.self_attn.q_proj.bias" in module.stored_weights()
    if kind == "phi3":  # fused qkv_proj / gate_up_proj stay one linear each (the passes see them as such)
        assert hist["aten.linear.default"] == 2 * 4 + 1
        assert {"model.layers.0.self_attn.qkv_proj", "model.layers.0.mlp.gate_up_proj"} <= set(_linear_paths(module))
    if kind == "gemma2":  # soft-capped attention and logits
        assert hist["aten.tanh.default"] == 2 + 1  # one cap per layer, one on the logits
    if kind == "gpt2":  # Conv1D weights in the IR's linear form; LayerNorm
        assert hist["aten.linear.default"] == 2 * 4 + 1 and hist["aten.layer_norm.default"] == 2 * 2 + 1
        assert "aten.addmm.default" not in hist


def _linear_paths(module) -> list[str]:
    from llmpress.ir.meta import source_path

    return [source_path(n) for n in module.graph.nodes if n.target == torch.ops.aten.linear.default]


def test_phi3_partial_rotary_matches_transformers(tmp_path) -> None:
    """RoPE over half of each head (Phi-3's partial_rotary_factor): transformers' own code computes it."""
    _check_against_transformers(_save(tmp_path / "phi3", "phi3", partial_rotary_factor=0.5))


@pytest.mark.parametrize("kind,scaling", [
    ("llama", {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}),
    ("qwen2", {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}),
    ("mistral", {"rope_type": "linear", "factor": 2.0}),
])
def test_scaled_rope_matches_transformers(tmp_path, kind, scaling) -> None:
    """Scaled RoPE (Llama 3.x's llama3, Qwen's yarn with its cos/sin factor, linear): logits equal transformers',
    and differ from the default RoPE's (so the check sees it)."""
    folder = _save(tmp_path / kind, kind, rope_scaling=scaling, rope_theta=10000.0)
    scaled = _check_against_transformers(folder)
    plain = json.loads((folder / "config.json").read_text())
    plain.pop("rope_scaling", None)
    plain["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0}
    (folder / "config.json").write_text(json.dumps(plain))
    default = llmpress.ir.capture(folder)
    x, zero = _ids(), torch.zeros(1, dtype=torch.int64)
    with torch.no_grad():
        a = scaled.run(x, zero, *empty_cache(scaled.lm))[0]
        b = default.run(x, zero, *empty_cache(default.lm))[0]
    assert (a - b).abs().max() > 1e-3


@pytest.mark.parametrize("kind", ["dynamic", "longrope"])
def test_dynamic_rope_is_refused(tmp_path, kind) -> None:
    """RoPE whose frequencies change with the sequence length at run time: refused by name before any weight is read
    (torch.export would fail on it deep inside transformers' code)."""
    folder = _save(tmp_path / "llama", "llama")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["rope_scaling"] = {"rope_type": kind, "factor": 2.0}
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(LoadError, match=rf"config\.json: rope scaling type '{kind}' is not supported: its frequencies"):
        load_model(folder)


def test_sharded_bf16_checkpoint_with_generation_config(tmp_path, caplog) -> None:
    """bf16 weights in several shards (index.json), EOS ids [2, 5] in generation_config.json: loaded as fp32
    (the log says so), logits equal transformers fp32 from the same bf16 files, generate stops at 5 too."""
    folder = _save(tmp_path / "q2bf16", "qwen2", dtype=torch.bfloat16, shard="200KB")
    assert (folder / "model.safetensors.index.json").is_file() and len(list(folder.glob("model-*.safetensors"))) > 1
    (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": [2, 5]}))
    with caplog.at_level(logging.INFO, logger="llmpress.ir.loaders.hf_generic"):
        loaded = load_model(folder)
    assert "upcast to float32" in caplog.text and "BF16" in caplog.text
    assert all(p.dtype == torch.float32 for p in loaded.model.parameters())
    module = _check_against_transformers(folder)
    assert module.lm.eos_ids == (2, 5) and module.lm.stop_ids() == (2, 5, 1)
    assert llmpress.ir.meta.LMInfo.from_json(module.lm.to_json()) == module.lm


def test_sliding_window_shorter_than_the_cache_matches_transformers(tmp_path) -> None:
    """Mistral with a 4-token window over a 64-slot cache and 10 tokens: the window applies (transformers' own mask
    over the static cache), so prefill and decode past the window equal transformers'."""
    _check_against_transformers(_save(tmp_path / "mistral", "mistral", sliding_window=4))


def test_other_model_types_take_the_generic_capture(tmp_path) -> None:
    """Any model type transformers runs with a static cache (GPT-NeoX here): capture() of its folder goes
    through transformers' StaticCache (``llmpress.ir.capture_hf``), with the same KV-cache calling convention."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=64, max_position_embeddings=32, hidden_size=16, num_hidden_layers=1,
                                     num_attention_heads=2, intermediate_size=32)).save_pretrained(
        str(tmp_path / "neox"))
    module = llmpress.ir.capture(tmp_path / "neox")
    lm = module.lm
    assert lm.extra == {"capture": "hf_static_cache", "model_type": "gpt_neox"}
    assert (lm.n_layers, lm.n_kv_heads, lm.head_dim, lm.vocab_size) == (1, 2, 8, 64)
    assert len(module.user_inputs()) == 2 + 2 * lm.n_layers


def test_cli_compiles_a_qwen2_folder(tmp_path) -> None:
    from llmpress.cli import main

    folder = _save(tmp_path / "qwen2", "qwen2", tokenizer=True)
    out = tmp_path / "art"
    assert main(["compile", str(folder), "--pipeline", "quantize(bits=4,group=32)", "-o", str(out), "-q"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["lm"]["eos_ids"] == [2]
    assert {r["path"] for r in manifest["layers"] if r["compression"]} >= {"model.layers.0.self_attn.q_proj"}
    art = llmpress.load(out)
    ids = art.generate_ids([1, 5, 9], 4)
    assert 3 < len(ids) <= 7


def test_null_bos_is_no_stop_token(tmp_path) -> None:
    """Qwen configs say ``bos_token_id: null``: no BOS, so generation must not stop at token 1."""
    folder = _save(tmp_path / "q2nobos", "qwen2")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["bos_token_id"] = None
    (folder / "config.json").write_text(json.dumps(cfg))
    lm = capture(folder).lm
    assert lm.bos_id == -1
    stops = lm.stop_ids()
    assert 1 not in stops and 2 in stops


GEMMA2 = {"sliding_window": 64, "head_dim": 32, "attn_logit_softcapping": 0.5, "final_logit_softcapping": 0.2}


@pytest.mark.tvm
@pytest.mark.parametrize("kind,kw", [("qwen2", {}), ("gpt2", {}), ("gemma2", GEMMA2)])
def test_int4_through_tvm_cpu_and_onnx(tmp_path, kind, kw) -> None:
    """Qwen2 (q/k/v bias), GPT-2 (LayerNorm, learned positions, Conv1D weights in the IR's linear form) and
    Gemma 2 (soft-capped attention, sandwich norms) through every backend: ``quantize(bits=4)`` for TVM
    ``cpu`` equals the reference graph; the int4 ONNX artifact equals it in ONNX Runtime; greedy ids through the
    cache agree. (Their ``exact`` cpu builds: tests/test_cli_families.py, greedy text and perplexity against
    transformers.)"""
    pytest.importorskip("tvm")
    from llmpress.api import run_pipeline

    from ..backends.model_checks import cpu_build_matches_reference

    quantized, _ = run_pipeline(llmpress.ir.capture(_save(tmp_path / kind, kind, **kw)), "quantize(bits=4,group=32)",
                                progress=False)
    cpu_build_matches_reference(quantized)
    x, zero = _ids(), torch.zeros(1, dtype=torch.int64)
    ref = llmpress.compile(quantized, target="reference", progress=False)
    onnx = llmpress.compile(quantized, target="onnx", progress=False)
    # ORT's MatMulNBits dequantizes and sums in its own order: 1e-5 of the logits' scale, as for the TVM build.
    want = ref(x, zero, *empty_cache(quantized.lm))[0]
    got = torch.as_tensor(onnx(x, zero, *empty_cache(quantized.lm))[0])
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5 * float(want.abs().max()) + 1e-6)
    assert onnx.generate_ids([1, 5, 9], 6) == ref.generate_ids([1, 5, 9], 6)
