"""Generic capture of transformers decoder LMs through their StaticCache (``llmpress.ir.capture_hf``).

StableLM (LayerNorm with bias, RoPE over a quarter of each head: ``partial_rotary_factor=0.25``), saved here as a tiny random folder (nothing downloaded). Checked: the calling
convention and ``LMInfo``; prefill + one-token decodes through the captured cache equal transformers' own full
forward; the TVM ``cpu`` build generates transformers' greedy tokens; a Llama captured with the caller's eager
attention computes what its folder's load (sdpa) does; a model without a key/value cache (Mamba) is refused by name.
"""
from __future__ import annotations

import pytest
import torch

import llmpress
from llmpress.errors import UnsupportedOpError
from llmpress.ir.loaders import load_model

VOCAB = 256
TINY = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, bos_token_id=VOCAB - 2, eos_token_id=VOCAB - 1)
CACHE = 32
# Same fp32 ops on both sides; only reduction order differs (attention over the padded static cache vs the exact
# prefix): measured ~2e-7 on logits of magnitude ~1, so 1e-5 absolute is tight.
ATOL = 1e-5


def _save(folder, kind: str, **kw):
    """A random ``kind`` model saved by transformers; noise on every parameter so biases (init 0) and norm weights
    (init 1) carry information the comparison can see."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(kind, **{**TINY, **kw}))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(str(folder))
    return folder


def _hf(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, attn_implementation="eager").eval()


def _ids(t: int = 10, seed: int = 3) -> torch.Tensor:
    return torch.randint(0, VOCAB - 2, (1, t), generator=torch.Generator().manual_seed(seed))


def _prefill_then_decode(module, x: torch.Tensor, prefill: int) -> torch.Tensor:
    """Logits of ``x``: ``prefill`` tokens in one call, then one call per token through the returned caches."""
    caches = [torch.zeros((1, *c["shape"]), dtype=getattr(torch, c["dtype"])) for c in module.lm.cache_specs()]
    with torch.no_grad():
        logits, *caches = module.run(x[:, :prefill], torch.zeros(1, dtype=torch.int64), *caches)
        steps = [logits]
        for p in range(prefill, x.shape[1]):
            logits, *caches = module.run(x[:, p:p + 1], torch.tensor([p]), *caches)
            steps.append(logits)
    return torch.cat(steps, 1)


@pytest.fixture(scope="module")
def stablelm(tmp_path_factory):
    folder = _save(tmp_path_factory.mktemp("stablelm") / "m", "stablelm")
    loaded = load_model(folder, cache_len=CACHE)
    return folder, llmpress.ir.capture(loaded.model)


def test_generic_capture_follows_the_kv_cache_convention(stablelm) -> None:
    folder, module = stablelm
    lm = module.lm
    assert lm is not None and lm.extra == {"capture": "hf_static_cache", "model_type": "stablelm"}
    assert (lm.n_layers, lm.n_kv_heads, lm.head_dim, lm.cache_len, lm.vocab_size) == (2, 2, 16, CACHE, VOCAB)
    assert lm.eos_ids == (VOCAB - 1,) and lm.bos_id == VOCAB - 2
    inputs = module.user_inputs()
    assert len(inputs) == 2 + 2 * 2 and len(module.output_node().args[0]) == 1 + 2 * 2
    assert [tuple(n.meta["val"].shape[1:]) for n in inputs[2:]] == [(2, CACHE, 16)] * 4
    seq = inputs[0].meta["val"].shape[1]
    assert not isinstance(seq, int), "the token count must stay dynamic (prefill and decode are one graph)"
    # Checkpoint names, not the wrapper's: globs and weight names read as on the Hugging Face model.
    names = {n for n, _ in module.exported_program.named_parameters()}
    assert "model.layers.0.self_attn.q_proj.weight" in names and "lm_head.weight" in names
    # Attention over the unrepeated cache with a [T, S] mask (the form the fused CPU kernel takes), not
    # transformers' repeat_kv + [B, 1, T, S] mask
    sdpa = [n for n in module.graph.nodes if n.target == torch.ops.aten.scaled_dot_product_attention.default]
    assert len(sdpa) == 2 and all(n.kwargs.get("enable_gqa") for n in sdpa)
    assert all(n.args[1].meta["val"].shape[1] == 2 and n.args[3].meta["val"].dim() == 2 for n in sdpa)
    module.verify()


@pytest.mark.tvm
def test_generic_graph_lowers_whole_with_the_fused_attention_kernel(stablelm) -> None:
    """transformers' ``.to(device)`` calls have a converter, so the captured graph is translated as it is (no
    decomposition to core ATen, which would break the attention into its math) and every attention of prefill and
    decode is the fused CPU kernel."""
    from llmpress.backends.tvm.converters import CONVERTERS
    from llmpress.backends.tvm.lower import _unsupported, to_relax

    _, module = stablelm
    assert _unsupported(module.exported_program, dict(CONVERTERS)) == []
    prog = to_relax(module, inplace_cache=True, cpu_kernels=True)
    for func in ("prefill", "decode"):
        assert str(prog.mod[func]).count("llmpress_attention_h4_kv2_s32_d16") == 2, func


def test_prefill_and_decode_equal_transformers(stablelm) -> None:
    folder, module = stablelm
    x = _ids()
    with torch.no_grad():
        want = _hf(folder)(x).logits
    torch.testing.assert_close(_prefill_then_decode(module, x, prefill=6), want, rtol=0, atol=ATOL)


def test_quantize_finds_the_generic_graphs_linears(stablelm) -> None:
    """The passes match structure, not our decoder's code: every projection of the transformers graph quantizes."""
    _, module = stablelm
    from llmpress.api import run_pipeline

    out, _ = run_pipeline(module.clone(), "quantize(bits=4,group=16)", progress=False)
    hist = out.op_histogram()
    # 7 projections per layer (q, k, v, o, gate, up, down) and lm_head, none left in float
    assert hist["llmpress.wq_linear.default"] == 2 * 7 + 1 and "aten.linear.default" not in hist, hist


@pytest.mark.tvm
def test_cpu_build_generates_transformers_greedy_tokens(stablelm) -> None:
    folder, module = stablelm
    art = llmpress.compile(module, target="cpu", progress=False)
    prompt = _ids(5, seed=11)
    with torch.no_grad():
        want = _hf(folder).generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12,
                                    do_sample=False)[0].tolist()
    assert art.generate_ids(prompt[0].tolist(), 12) == want


def test_capture_keeps_the_callers_attention_implementation(tmp_path) -> None:
    """capture() exports with its GQA attention and puts the model's own implementation back; the folder's load
    (sdpa) and the caller's eager model capture the same computation and cache layout."""
    folder = _save(tmp_path / "llama", "llama")
    loaded = llmpress.ir.capture(load_model(folder, cache_len=CACHE).model)
    hf = _hf(folder)
    hf.generation_config.cache_config = {"max_cache_len": CACHE}
    generic = llmpress.ir.capture(hf)
    assert hf.config._attn_implementation == "eager"  # the caller's choice, untouched
    assert loaded.lm.cache_specs() == generic.lm.cache_specs()
    x = _ids(9)
    torch.testing.assert_close(_prefill_then_decode(generic, x, 5), _prefill_then_decode(loaded, x, 5),
                               rtol=0, atol=ATOL)


def test_model_without_a_kv_cache_is_refused_by_name() -> None:
    from transformers import MambaConfig, MambaForCausalLM

    hf = MambaForCausalLM(MambaConfig(vocab_size=64, hidden_size=16, state_size=4, num_hidden_layers=1)).eval()
    with pytest.raises(UnsupportedOpError, match=r"model_type 'mamba'.*_can_compile_fullgraph=False"):
        llmpress.ir.capture(hf)
    ids = torch.randint(0, 64, (1, 5))
    assert llmpress.ir.capture(hf, (ids,)).lm is None  # with example inputs: input_ids -> logits, no cache
