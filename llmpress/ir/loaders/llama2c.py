"""llama2.c checkpoints (legacy "v0" ``.bin``) -> transformers' ``LlamaForCausalLM``.

Format: a header of 7 little-endian int32 ``(dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len)``
(a negative ``vocab_size`` means an unshared classifier follows), then float32 arrays: token_embedding [V, D],
rms_att [L, D], wq [L, D, D], wk [L, KV, D], wv [L, KV, D], wo [L, D, D], rms_ffn [L, D], w1 [L, H, D],
w2 [L, D, H], w3 [L, H, D], rms_final [D], freq_cis_real [S, hd/2], freq_cis_imag [S, hd/2], [wcls [V, D]], with
``KV = D * n_kv_heads / n_heads`` and ``hd = D / n_heads``.

RoPE layout: llama2.c rotates interleaved pairs ``(x[2j], x[2j+1])`` of each head by ``p * theta^(-2j/hd)``;
Hugging Face's Llama rotates ``(x[j], x[j + hd/2])`` by the same angle. Reordering the rows of wq/wk inside
each head, ``new[j] = old[2j]``, ``new[j + hd/2] = old[2j + 1]``, makes the two computations identical, since q·k
is invariant to applying the same permutation to both (v and wo are untouched).
"""
from __future__ import annotations

import logging
import struct
from pathlib import Path

import numpy as np
import torch

from ...errors import LoadError

__all__ = ["read_header", "load_llama2c", "interleaved_to_half", "find_llama2c_tokenizer"]

log = logging.getLogger(__name__)

_HEADER = struct.Struct("<7i")
_FIELDS = ("dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "seq_len")


def read_header(path: Path) -> dict:
    """Read and validate the header and the file size; returns the header fields plus ``shared_classifier``."""
    size = path.stat().st_size
    if size < _HEADER.size:
        raise LoadError(f"{path}: truncated: expected a {_HEADER.size}-byte llama2.c header, file has {size} bytes")
    with open(path, "rb") as f:
        values = _HEADER.unpack(f.read(_HEADER.size))
    h = dict(zip(_FIELDS, values))
    shared = h["vocab_size"] > 0
    h["vocab_size"] = abs(h["vocab_size"])
    bad = [k for k in _FIELDS if h[k] <= 0]
    if bad:
        raise LoadError(f"{path}: bad llama2.c header: {', '.join(f'{k}={h[k]}' for k in bad)} "
                        f"(must be positive; header {values})")
    if h["dim"] % h["n_heads"]:
        raise LoadError(f"{path}: bad llama2.c header: n_heads={h['n_heads']} does not divide dim={h['dim']}")
    if h["n_heads"] % h["n_kv_heads"]:
        raise LoadError(f"{path}: bad llama2.c header: n_kv_heads={h['n_kv_heads']} does not divide "
                        f"n_heads={h['n_heads']}")
    if (h["dim"] // h["n_heads"]) % 2:
        raise LoadError(f"{path}: bad llama2.c header: head size {h['dim'] // h['n_heads']} is odd (RoPE needs pairs)")
    n_shared = _n_floats(h, shared=True)
    expected = _HEADER.size + 4 * (n_shared if shared else _n_floats(h, shared=False))
    if size != expected:
        what = "truncated" if size < expected else "too long"
        raise LoadError(f"{path}: {what}: expected {expected} bytes, file has {size} "
                        f"({'shared' if shared else 'unshared'} classifier, header {values})")
    h["shared_classifier"] = shared
    return h


def _shapes(h: dict) -> list[tuple[str, tuple[int, ...]]]:
    d, hid, n_l, v, s = h["dim"], h["hidden_dim"], h["n_layers"], h["vocab_size"], h["seq_len"]
    hd = d // h["n_heads"]
    kv = hd * h["n_kv_heads"]
    return [("token_embedding", (v, d)), ("rms_att", (n_l, d)), ("wq", (n_l, d, d)), ("wk", (n_l, kv, d)),
            ("wv", (n_l, kv, d)), ("wo", (n_l, d, d)), ("rms_ffn", (n_l, d)), ("w1", (n_l, hid, d)),
            ("w2", (n_l, d, hid)), ("w3", (n_l, hid, d)), ("rms_final", (d,)), ("freq_cis_real", (s, hd // 2)),
            ("freq_cis_imag", (s, hd // 2))]


def _n_floats(h: dict, *, shared: bool) -> int:
    n = sum(int(np.prod(shape)) for _, shape in _shapes(h))
    return n if shared else n + h["vocab_size"] * h["dim"]


def interleaved_to_half(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder the output rows of a q/k projection from interleaved RoPE pairs to rotate-half (see docstring)."""
    rows, cols = w.shape
    hd = rows // n_heads
    return w.view(n_heads, hd // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def load_llama2c(path: Path, *, cache_len: int | None = None) -> tuple[torch.nn.Module, dict]:
    """transformers' ``LlamaForCausalLM`` with a llama2.c checkpoint's weights; returns it and the header."""
    h = read_header(path)
    data = np.fromfile(path, dtype="<f4", offset=_HEADER.size)
    arrays: dict[str, torch.Tensor] = {}
    off = 0
    for name, shape in _shapes(h):
        n = int(np.prod(shape))
        arrays[name] = torch.from_numpy(data[off:off + n].reshape(shape).copy())
        off += n
    if not h["shared_classifier"]:
        arrays["wcls"] = torch.from_numpy(data[off:off + h["vocab_size"] * h["dim"]].reshape(h["vocab_size"], h["dim"]).copy())
    if not all(torch.isfinite(a).all() for a in arrays.values()):
        bad = [k for k, a in arrays.items() if not torch.isfinite(a).all()]
        raise LoadError(f"{path}: non-finite weights in {', '.join(bad)} (corrupt checkpoint?)")
    from transformers import LlamaConfig, LlamaForCausalLM

    n_heads, n_kv = h["n_heads"], h["n_kv_heads"]
    cfg = LlamaConfig(vocab_size=h["vocab_size"], hidden_size=h["dim"], intermediate_size=h["hidden_dim"],
                      num_hidden_layers=h["n_layers"], num_attention_heads=n_heads, num_key_value_heads=n_kv,
                      max_position_embeddings=h["seq_len"], rms_norm_eps=1e-5, rope_theta=10000.0,
                      tie_word_embeddings=h["shared_classifier"], bos_token_id=1, eos_token_id=2)
    from .hf_generic import meta_parameters

    with meta_parameters():  # every weight is assigned below: no random init to throw away (buffers stay real)
        model = LlamaForCausalLM(cfg)
    if cache_len is not None:  # the static cache's length, where capture_hf reads it
        model.generation_config.cache_config = {"batch_size": 1, "max_cache_len": int(cache_len)}
    sd: dict[str, torch.Tensor] = {"model.embed_tokens.weight": arrays["token_embedding"],
                                   "model.norm.weight": arrays["rms_final"]}
    for i in range(h["n_layers"]):
        p = f"model.layers.{i}."
        sd[p + "input_layernorm.weight"] = arrays["rms_att"][i]
        sd[p + "post_attention_layernorm.weight"] = arrays["rms_ffn"][i]
        sd[p + "self_attn.q_proj.weight"] = interleaved_to_half(arrays["wq"][i], n_heads)
        sd[p + "self_attn.k_proj.weight"] = interleaved_to_half(arrays["wk"][i], n_kv)
        sd[p + "self_attn.v_proj.weight"] = arrays["wv"][i]
        sd[p + "self_attn.o_proj.weight"] = arrays["wo"][i]
        sd[p + "mlp.gate_proj.weight"] = arrays["w1"][i]
        sd[p + "mlp.down_proj.weight"] = arrays["w2"][i]
        sd[p + "mlp.up_proj.weight"] = arrays["w3"][i]
    if not h["shared_classifier"]:
        sd["lm_head.weight"] = arrays["wcls"]
    missing, unexpected = model.load_state_dict(sd, strict=False, assign=True)
    missing = [k for k in missing if not (h["shared_classifier"] and k == "lm_head.weight")]
    if missing or unexpected:  # a bug here, not in the file: every name is built above
        raise LoadError(f"{path}: internal mapping error (missing {missing}, unexpected {unexpected})")
    if h["shared_classifier"]:  # assign=True gave the embedding its own Parameter: tie the classifier to it again
        model.tie_weights()
    log.info("loaded llama2.c %s: dim %d, %d layers, %d heads (%d kv), vocab %d, seq %d", path.name, h["dim"],
             h["n_layers"], n_heads, n_kv, h["vocab_size"], h["seq_len"])
    return model.eval(), {k: h[k] for k in (*_FIELDS, "shared_classifier")}


def find_llama2c_tokenizer(path: Path, vocab_size: int) -> Path | None:
    """``tok{vocab}.bin`` or ``tokenizer.bin`` beside the checkpoint."""
    for name in (f"tok{vocab_size}.bin", "tokenizer.bin"):
        if (path.parent / name).is_file():
            return path.parent / name
    return None
