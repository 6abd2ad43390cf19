"""GPT-2 Hugging Face folders -> ``llmpress.models.Llama`` with GPT-2's switches.

GPT-2 is the Llama layout with LayerNorm (weight and bias) instead of RMSNorm, learned absolute positions instead of
RoPE, a plain ``gelu_new`` MLP (``c_fc`` -> gelu tanh -> ``c_proj``), biases on every linear, one KV head per query
head, and a tied classifier. Its linears are ``Conv1D`` modules whose weights are stored transposed
(``[in, out]``, ``y = x @ W + b``) and its q/k/v are one ``c_attn``: the loader transposes and splits them into
plain ``[out, in]`` linears (``sources``), so every pass finds the linears it finds in any other model. Modules
take our (Llama) names: ``model.layers.0.self_attn.q_proj``, ``model.layers.0.mlp.up_proj`` (``c_fc``),
``mlp.down_proj`` (``c_proj``), ``model.embed_positions`` (``wpe``).
"""
from __future__ import annotations

from pathlib import Path

from ...errors import LoadError
from ...models.llama import LlamaConfig

__all__ = ["gpt2_config", "gpt2_sources"]

# activation_function values computing 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), our MLP's gelu
_TANH_GELU = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")


def gpt2_config(cfg: dict, where: Path, *, cache_len: int | None, eos: list[int]) -> LlamaConfig:
    from .hf import need_key

    def need(key: str):
        return need_key(cfg, key, where)

    act = cfg.get("activation_function", "gelu_new")
    if act not in _TANH_GELU:
        raise LoadError(f"{where}: activation_function {act!r} is not supported (GPT-2's gelu_new only)")
    for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn", "add_cross_attention"):
        if cfg.get(flag):
            raise LoadError(f"{where}: {flag}=true is not supported")
    if cfg.get("scale_attn_weights", True) is False:
        raise LoadError(f"{where}: scale_attn_weights=false is not supported (attention is scaled by 1/sqrt(d))")
    dim, n_heads, positions = int(need("n_embd")), int(need("n_head")), int(need("n_positions"))
    if cache_len is not None and cache_len > positions:
        raise LoadError(f"{where}: cache_len {cache_len} is longer than the {positions} learned positions")
    bos = cfg.get("bos_token_id")
    return LlamaConfig(
        vocab_size=int(need("vocab_size")), dim=dim, n_layers=int(need("n_layer")), n_heads=n_heads,
        n_kv_heads=n_heads, hidden_dim=int(cfg.get("n_inner") or 4 * dim), max_seq_len=positions,
        norm_eps=float(cfg.get("layer_norm_epsilon", 1e-5)), tie_embeddings=bool(cfg.get("tie_word_embeddings", True)),
        bos_id=-1 if bos is None else int(bos), eos_id=eos[0] if eos else 2, eos_ids=tuple(eos),
        qkv_bias=True, o_bias=True, mlp_bias=True, arch="gpt2", norm="layer", positions="learned", mlp="gelu")


def gpt2_sources(c: LlamaConfig, names: set[str]) -> dict[str, tuple[str, int | None, int | None, bool]]:
    """Our tensor name -> (checkpoint tensor, first row, end row, transposed) for GPT-2. ``names`` are the
    checkpoint's tensor names (with or without the ``transformer.`` prefix, as old and new checkpoints differ)."""
    pre = "transformer." if any(n.startswith("transformer.") for n in names) else ""
    d = c.dim
    out: dict[str, tuple[str, int | None, int | None, bool]] = {
        "model.embed_tokens.weight": (pre + "wte.weight", None, None, False),
        "model.embed_positions.weight": (pre + "wpe.weight", None, None, False),
        "model.norm.weight": (pre + "ln_f.weight", None, None, False),
        "model.norm.bias": (pre + "ln_f.bias", None, None, False),
    }
    for i in range(c.n_layers):
        h, o = f"{pre}h.{i}.", f"model.layers.{i}."
        for ours, theirs in (("input_layernorm", "ln_1"), ("post_attention_layernorm", "ln_2")):
            out[f"{o}{ours}.weight"] = (f"{h}{theirs}.weight", None, None, False)
            out[f"{o}{ours}.bias"] = (f"{h}{theirs}.bias", None, None, False)
        for j, proj in enumerate(("q_proj", "k_proj", "v_proj")):  # c_attn's output columns: q, k, v
            out[f"{o}self_attn.{proj}.weight"] = (f"{h}attn.c_attn.weight", j * d, (j + 1) * d, True)
            out[f"{o}self_attn.{proj}.bias"] = (f"{h}attn.c_attn.bias", j * d, (j + 1) * d, False)
        out[f"{o}self_attn.o_proj.weight"] = (f"{h}attn.c_proj.weight", None, None, True)
        out[f"{o}self_attn.o_proj.bias"] = (f"{h}attn.c_proj.bias", None, None, False)
        out[f"{o}mlp.up_proj.weight"] = (f"{h}mlp.c_fc.weight", None, None, True)
        out[f"{o}mlp.up_proj.bias"] = (f"{h}mlp.c_fc.bias", None, None, False)
        out[f"{o}mlp.down_proj.weight"] = (f"{h}mlp.c_proj.weight", None, None, True)
        out[f"{o}mlp.down_proj.bias"] = (f"{h}mlp.c_proj.bias", None, None, False)
    return out
