"""Model loaders: llama2.c checkpoints and Hugging Face folders into transformers' models, checked against
llama2.c's own greedy text and against transformers' own loader; every damaged-file case is a LoadError naming the
file."""
from __future__ import annotations

import json
import re
import shutil
import struct

import pytest
import torch

import llmpress
from llmpress.errors import LoadError
from llmpress.eval.generate import empty_cache, greedy
from llmpress.ir.loaders import LoadedModel, load_model
from llmpress.ir.loaders.llama2c import interleaved_to_half

from ..conftest import STORIES260K, TINYSTORIES, VALID

S260K = STORIES260K / "stories260K.bin"


def _readme_text() -> str:
    """The text of the README's fenced block: what llama2.c printed, minus the newline it prints after the loop."""
    readme = (STORIES260K / "README.md").read_text()
    m = re.search(r"Known greedy output.*?```\n(.*?)\n```", readme, re.S)
    assert m, "README block not found"
    return m.group(1)


@pytest.mark.slow
def test_stories260k_greedy_text_matches_llama2c_exactly() -> None:
    """llama2.c ``run stories260K.bin -t 0 -n 256``: prompt "" -> tokens [BOS]; for pos in 0..255 it runs
    forward(token, pos), takes the argmax, stops *before printing* if that is BOS (1), else prints it. So: 256
    forward positions, up to 256 new tokens, BOS ends the story; decoding drops the space after BOS."""
    loaded = load_model(S260K)
    assert loaded.kind == "llama2c" and loaded.config["shared_classifier"]
    module = llmpress.ir.capture(loaded.model)
    ids = greedy(module.run, module.lm, [loaded.tokenizer.bos_id], 256, stop_ids=[1])
    assert len(ids) == 257 or ids[-1] == 1  # BOS + 256 new tokens (positions 0..255), or a story-ending BOS
    new = ids[1:]
    if new and new[-1] == 1:
        new = new[:-1]
    assert loaded.tokenizer.decode([1] + new) == _readme_text()


def test_stories260k_loads_as_tied_llama() -> None:
    from transformers import LlamaForCausalLM

    loaded = load_model(S260K)
    assert isinstance(loaded, LoadedModel) and isinstance(loaded.model, LlamaForCausalLM)
    c = loaded.model.config
    assert (c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads,
            c.vocab_size, c.max_position_embeddings) == (64, 172, 5, 8, 4, 512, 512)
    assert c.tie_word_embeddings and c.rms_norm_eps == 1e-5 and c.rope_parameters["rope_theta"] == 10000.0
    assert loaded.model.lm_head.weight is loaded.model.model.embed_tokens.weight
    assert sum(p.numel() for p in loaded.model.parameters()) == 260_032  # the README count; the tied classifier counts once
    assert loaded.tokenizer.files()[0].name == "tok512.bin"
    assert loaded.source == str(S260K.resolve())
    assert llmpress.ir.capture(load_model(S260K, cache_len=64).model).lm.cache_len == 64


def test_interleaved_to_half_makes_rope_agree() -> None:
    """Interleaved RoPE on (x[2j], x[2j+1]) with the original rows == rotate-half RoPE on the permuted rows."""
    torch.manual_seed(0)
    n_heads, hd, dim, pos, theta = 2, 8, 16, 5, 10000.0
    w = torch.randn(n_heads * hd, dim)
    x = torch.randn(dim)
    freqs = pos * theta ** (-torch.arange(0, hd, 2).float() / hd)
    # llama2.c: rotate each interleaved pair.
    q = (w @ x).view(n_heads, hd // 2, 2)
    re_, im = q[..., 0], q[..., 1]
    inter = torch.stack((re_ * freqs.cos() - im * freqs.sin(), re_ * freqs.sin() + im * freqs.cos()), -1)
    # HF: rotate-half on the permuted projection.
    qh = (interleaved_to_half(w, n_heads) @ x).view(n_heads, hd)
    cos, sin = torch.cat((freqs, freqs)).cos(), torch.cat((freqs, freqs)).sin()
    rot = torch.cat((-qh[:, hd // 2:], qh[:, :hd // 2]), -1)
    half = qh * cos + rot * sin
    # Same values, laid out differently: half[:, j] = inter[:, j, 0], half[:, j + hd/2] = inter[:, j, 1].
    torch.testing.assert_close(half, inter.transpose(1, 2).reshape(n_heads, hd), rtol=0, atol=1e-6)


@pytest.mark.slow
def test_tinystories_llama_matches_transformers() -> None:
    """The graph captured from the HF folder (weights read lazily) vs ``AutoModelForCausalLM.from_pretrained``
    eager, fp32, on real sentences. The same transformers code on both sides; only the reduction order of attention
    over the padded static cache differs, so agreement to 1e-4 absolute on logits of magnitude ~10 (about 1e-5
    relative) is expected."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    loaded = load_model(TINYSTORIES, lazy=True)
    assert loaded.kind == "hf" and loaded.config["model_type"] == "llama"
    module = llmpress.ir.capture(loaded.model)
    assert (module.lm.head_dim, module.lm.n_kv_heads, module.lm.n_layers) == (32, 4, 8)
    hf = AutoModelForCausalLM.from_pretrained(str(TINYSTORIES), attn_implementation="eager").eval()
    auto = AutoTokenizer.from_pretrained(str(TINYSTORIES))
    sentences = ["once upon a time, there was a little dog named max.",
                 "lily wanted to play in the park with her red ball, but it started to rain.",
                 "the sun was warm and the birds sang in the tall green trees."]
    for s in sentences:
        ids = loaded.tokenizer.encode(s)
        assert ids == auto(s)["input_ids"]
        x = torch.tensor([ids])
        with torch.no_grad():
            want = hf(x).logits
            got = module.run(x, torch.zeros(1, dtype=torch.int64), *empty_cache(module.lm))[0]
        torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
    # The tokenizer agrees with AutoTokenizer on real paragraphs (sentencepiece tokenizer.model is the one used).
    paras = [p.strip() for p in VALID.read_text().split("\n\n") if p.strip()][:100]
    for p in paras:
        assert loaded.tokenizer.encode(p) == auto(p)["input_ids"]


# -- errors: each names the file -----------------------------------------------------------------------------


def _copy_hf(tmp_path, skip=()):
    dst = tmp_path / "model"
    dst.mkdir()
    for f in TINYSTORIES.iterdir():
        if f.name not in skip:
            shutil.copy(f, dst / f.name)
            (dst / f.name).chmod(0o644)
    return dst


def test_missing_config_json(tmp_path) -> None:
    dst = _copy_hf(tmp_path, skip=("config.json", "model.safetensors"))
    with pytest.raises(LoadError, match=r"model: no config\.json"):
        load_model(dst)


def test_truncated_safetensors(tmp_path) -> None:
    dst = _copy_hf(tmp_path)
    with open(dst / "model.safetensors", "r+b") as f:
        f.truncate((dst / "model.safetensors").stat().st_size - 1000)
    with pytest.raises(LoadError, match=r"model\.safetensors.*truncated or corrupt"):
        load_model(dst)
    (dst / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00not json")
    with pytest.raises(LoadError, match=r"model\.safetensors"):
        load_model(dst)


def test_safetensors_missing_or_misshapen_tensor(tmp_path) -> None:
    from safetensors.torch import load_file, save_file

    dst = _copy_hf(tmp_path, skip=("model.safetensors",))
    weights = load_file(str(TINYSTORIES / "model.safetensors"))
    up = weights.pop("model.layers.3.mlp.up_proj.weight")
    save_file(weights, str(dst / "model.safetensors"))
    with pytest.raises(LoadError, match=r"model\.safetensors: missing tensor model\.layers\.3\.mlp\.up_proj\.weight"):
        load_model(dst)
    weights["model.layers.3.mlp.up_proj.weight"] = up[:, :128].contiguous()
    save_file(weights, str(dst / "model.safetensors"))
    with pytest.raises(LoadError, match=r"shape \(768, 256\) expected, found \(768, 128\)"):
        load_model(dst)


def test_sharded_safetensors_and_rejections(tmp_path) -> None:
    from safetensors.torch import load_file, save_file

    dst = _copy_hf(tmp_path, skip=("model.safetensors",))
    weights = load_file(str(TINYSTORIES / "model.safetensors"))
    names = sorted(weights)
    half = len(names) // 2
    shards = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
    for fname, keys in shards.items():
        save_file({k: weights[k] for k in keys}, str(dst / fname))
    index = {"metadata": {}, "weight_map": {k: f for f, ks in shards.items() for k in ks}}
    (dst / "model.safetensors.index.json").write_text(json.dumps(index))
    loaded = load_model(dst)
    torch.testing.assert_close(loaded.model.lm_head.weight, weights["lm_head.weight"], rtol=0, atol=0)
    (dst / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(LoadError, match="model-00002-of-00002.safetensors"):
        load_model(dst)
    shutil.copy(TINYSTORIES / "model.safetensors", dst / "model-00002-of-00002.safetensors")
    # rope scaling that changes with the sequence length; a scaled RoPE missing its parameters.
    cfg = json.loads((TINYSTORIES / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_theta": 10000.0, "rope_type": "dynamic", "factor": 8.0}
    (dst / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(LoadError, match=r"config\.json: rope scaling type 'dynamic' is not supported"):
        load_model(dst)
    cfg["rope_parameters"] = {"rope_theta": 10000.0, "rope_type": "llama3", "factor": 8.0}
    (dst / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(LoadError, match=r"config\.json: transformers cannot read it: .*low_freq_factor"):
        load_model(dst)
    # pytorch_model.bin only.
    for f in list(dst.glob("model*")):
        f.unlink()
    (dst / "config.json").write_text((TINYSTORIES / "config.json").read_text())
    (dst / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(LoadError, match="pytorch_model.bin"):
        load_model(dst)


def _header(path, values):
    data = bytearray(S260K.read_bytes())
    data[:28] = struct.pack("<7i", *values)
    path.write_bytes(bytes(data))
    return path


def test_bad_llama2c_header(tmp_path) -> None:
    good = (64, 172, 5, 8, 4, 512, 512)
    cases = {"zero.bin": ((64, 172, 0, 8, 4, 512, 512), r"n_layers=0"),
             "heads.bin": ((64, 172, 5, 7, 4, 512, 512), r"n_heads=7 does not divide dim=64"),
             "kv.bin": ((64, 172, 5, 8, 3, 512, 512), r"n_kv_heads=3 does not divide n_heads=8"),
             "size.bin": ((64, 172, 5, 8, 4, 512, 1024), r"expected 1072924 bytes, file has 1056540"),
             "unshared.bin": ((64, 172, 5, 8, 4, -512, 512), r"expected 1187612 bytes")}
    for name, (values, why) in cases.items():
        with pytest.raises(LoadError, match=rf"{name}: .*{why}"):
            load_model(_header(tmp_path / name, values))
    assert load_model(_header(tmp_path / "ok.bin", good)).model.config.num_hidden_layers == 5


def test_truncated_llama2c(tmp_path) -> None:
    data = S260K.read_bytes()
    (tmp_path / "short.bin").write_bytes(data[:-4])
    with pytest.raises(LoadError, match=r"short\.bin: truncated: expected 1056540 bytes, file has 1056536"):
        load_model(tmp_path / "short.bin")
    (tmp_path / "tiny.bin").write_bytes(data[:10])
    with pytest.raises(LoadError, match=r"tiny\.bin: truncated"):
        load_model(tmp_path / "tiny.bin")


def test_paths_that_are_no_model(tmp_path) -> None:
    with pytest.raises(LoadError, match="nothing-here: no such file or folder"):
        load_model(tmp_path / "nothing-here")
    (tmp_path / "weights.pt").write_bytes(b"x")
    with pytest.raises(LoadError, match=r"weights\.pt: unknown model file type"):
        load_model(tmp_path / "weights.pt")
    with pytest.raises(LoadError, match="no-tok.bin: tokenizer file does not exist"):
        load_model(S260K, tokenizer=tmp_path / "no-tok.bin")


def test_unshared_llama2c_classifier(tmp_path) -> None:
    """vocab < 0 in the header: a separate classifier follows the RoPE tables and becomes an untied lm_head."""
    data = bytearray(S260K.read_bytes())
    data[20:24] = struct.pack("<i", -512)
    wcls = torch.randn(512, 64, generator=torch.Generator().manual_seed(0))
    (tmp_path / "unshared.bin").write_bytes(bytes(data) + wcls.numpy().astype("<f4").tobytes())
    shutil.copy(STORIES260K / "tok512.bin", tmp_path / "tok512.bin")
    loaded = load_model(tmp_path / "unshared.bin")
    assert not loaded.model.config.tie_word_embeddings and not loaded.config["shared_classifier"]
    assert loaded.model.lm_head.weight is not loaded.model.model.embed_tokens.weight
    torch.testing.assert_close(loaded.model.lm_head.weight, wcls, rtol=0, atol=0)
    assert loaded.tokenizer is not None and loaded.tokenizer.files() == [tmp_path / "tok512.bin"]


def test_hf_config_variants(tmp_path) -> None:
    """tie_word_embeddings without lm_head.weight, a top-level rope_theta, a list of EOS ids."""
    from safetensors.torch import load_file, save_file

    dst = _copy_hf(tmp_path, skip=("model.safetensors",))
    weights = load_file(str(TINYSTORIES / "model.safetensors"))
    del weights["lm_head.weight"]
    save_file(weights, str(dst / "model.safetensors"))
    cfg = json.loads((TINYSTORIES / "config.json").read_text())
    cfg.pop("rope_parameters")
    cfg.update(tie_word_embeddings=True, rope_theta=500000.0, eos_token_id=[2, 7])
    (dst / "config.json").write_text(json.dumps(cfg))
    loaded = load_model(dst, cache_len=32)
    assert loaded.model.lm_head.weight is loaded.model.model.embed_tokens.weight
    # theta reaches the RoPE: inv_freq[1] = theta^(-2/hd)
    torch.testing.assert_close(loaded.model.model.rotary_emb.inv_freq[1], torch.tensor(500000.0 ** (-2 / 32)))
    lm = llmpress.ir.capture(loaded.model).lm
    assert lm.cache_len == 32 and lm.eos_ids == (2, 7) and lm.eos_id == 2


def test_other_hf_architectures_go_through_transformers(tmp_path) -> None:
    """A folder of another architecture (a tiny random GPT-NeoX written here, nothing downloaded) loads with
    AutoModelForCausalLM and, given example inputs, captures as input_ids -> logits."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(0)
    ref = GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=64, max_position_embeddings=32, hidden_size=16,
                                           num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)).eval()
    ref.save_pretrained(str(tmp_path / "neox"))
    loaded = load_model(tmp_path / "neox")
    assert loaded.kind == "hf" and loaded.config["model_type"] == "gpt_neox" and loaded.tokenizer is None
    ids = torch.randint(0, 64, (1, 6))
    module = llmpress.ir.capture(loaded.model, (ids,))
    with torch.no_grad():
        want = ref(ids).logits
    # Same weights, same eager ops traced: identical up to fp32 reassociation in the traced graph.
    torch.testing.assert_close(module.run(ids), want, rtol=1e-5, atol=1e-5)
