"""Hugging Face model folders -> an ``nn.Module``.

``model_type == "llama"`` builds our export-friendly ``llmpress.models.Llama`` (static KV cache) straight from
``config.json`` and the safetensors weights, whose names match one to one (``model.layers.0.self_attn.q_proj.weight``
...). Every expected tensor is checked for presence and shape before loading, so a damaged file is reported with
the tensor it lacks. Other model types go through ``transformers.AutoModelForCausalLM`` (captured as
``input_ids -> logits``).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from ...errors import LoadError
from ...models.llama import Llama, LlamaConfig

__all__ = ["read_config", "llama_config", "load_hf", "expected_llama_shapes"]

log = logging.getLogger(__name__)


def read_config(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.is_file():
        raise LoadError(f"{folder}: no config.json (not a Hugging Face model folder)")
    try:
        cfg = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LoadError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(cfg, dict):
        raise LoadError(f"{path}: expected a JSON object, found {type(cfg).__name__}")
    return cfg


def llama_config(cfg: dict, where: Path) -> LlamaConfig:
    """``config.json`` of a ``LlamaForCausalLM`` -> ``LlamaConfig``; rejects what our Llama does not compute."""
    def need(key: str):
        if key not in cfg:
            raise LoadError(f"{where}: missing key {key!r}")
        return cfg[key]

    rope = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling") or {}
    for src in (rope, scaling):
        kind = src.get("rope_type", src.get("type", "default"))
        if kind not in (None, "default"):
            raise LoadError(f"{where}: rope scaling type {kind!r} is not supported (only the default RoPE)")
    if cfg.get("hidden_act", "silu") != "silu":
        raise LoadError(f"{where}: hidden_act {cfg['hidden_act']!r} is not supported (Llama uses silu)")
    for flag in ("attention_bias", "mlp_bias"):
        if cfg.get(flag):
            raise LoadError(f"{where}: {flag}=true is not supported by llmpress' Llama")
    theta = cfg.get("rope_theta", rope.get("rope_theta", 10000.0))
    n_heads = int(need("num_attention_heads"))
    dim = int(need("hidden_size"))

    def token_id(key: str, default: int) -> int:
        v = cfg.get(key, default)
        if isinstance(v, list):  # some configs list several EOS ids; the first is the canonical one
            v = v[0] if v else default
        return default if v is None else int(v)

    return LlamaConfig(
        vocab_size=int(need("vocab_size")), dim=dim, n_layers=int(need("num_hidden_layers")), n_heads=n_heads,
        n_kv_heads=int(cfg.get("num_key_value_heads") or n_heads), hidden_dim=int(need("intermediate_size")),
        max_seq_len=int(cfg.get("max_position_embeddings", 2048)), norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=float(theta), tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        bos_id=token_id("bos_token_id", 1), eos_id=token_id("eos_token_id", 2),
        head_dim=int(cfg.get("head_dim") or dim // n_heads))


def expected_llama_shapes(c: LlamaConfig) -> dict[str, tuple[int, ...]]:
    hd = c.head_dim
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (c.vocab_size, c.dim)}
    for i in range(c.n_layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (c.dim,),
            p + "self_attn.q_proj.weight": (c.n_heads * hd, c.dim),
            p + "self_attn.k_proj.weight": (c.n_kv_heads * hd, c.dim),
            p + "self_attn.v_proj.weight": (c.n_kv_heads * hd, c.dim),
            p + "self_attn.o_proj.weight": (c.dim, c.n_heads * hd),
            p + "post_attention_layernorm.weight": (c.dim,),
            p + "mlp.gate_proj.weight": (c.hidden_dim, c.dim),
            p + "mlp.up_proj.weight": (c.hidden_dim, c.dim),
            p + "mlp.down_proj.weight": (c.dim, c.hidden_dim),
        })
    shapes["model.norm.weight"] = (c.dim,)
    if not c.tie_embeddings:
        shapes["lm_head.weight"] = (c.vocab_size, c.dim)
    return shapes


def _weight_files(folder: Path) -> dict[str, Path]:
    """tensor name -> safetensors file (single file or a sharded index)."""
    single = folder / "model.safetensors"
    index = folder / "model.safetensors.index.json"
    if single.is_file():
        return {}  # filled from the file's own header
    if index.is_file():
        try:
            wm = json.loads(index.read_text())["weight_map"]
        except (OSError, KeyError, TypeError, json.JSONDecodeError) as e:
            raise LoadError(f"{index}: not a safetensors index (no weight_map: {e})") from e
        return {k: folder / v for k, v in wm.items()}
    if (folder / "pytorch_model.bin").exists() or list(folder.glob("pytorch_model*.bin")):
        raise LoadError(f"{folder}: only pytorch_model.bin found; llmpress reads safetensors weights "
                        "(convert with transformers: model.save_pretrained(dir, safe_serialization=True))")
    raise LoadError(f"{folder}: no model.safetensors or model.safetensors.index.json")


def _open(path: Path):
    from safetensors import safe_open

    if not path.is_file():
        raise LoadError(f"{path.name}: missing weight file {path}")
    try:
        return safe_open(str(path), framework="pt")
    except Exception as e:  # SafetensorError on a truncated/corrupt header or a short data section
        raise LoadError(f"{path.name}: unreadable safetensors file {path} (truncated or corrupt: {e})") from e


def _read_llama_weights(folder: Path, c: LlamaConfig) -> dict[str, torch.Tensor]:
    mapping = _weight_files(folder)
    handles: dict[Path, object] = {}
    if not mapping:
        single = folder / "model.safetensors"
        h = _open(single)
        handles[single] = h
        mapping = {k: single for k in h.keys()}
    out: dict[str, torch.Tensor] = {}
    for name, shape in expected_llama_shapes(c).items():
        f = mapping.get(name)
        if f is None:
            fname = "model.safetensors" if (folder / "model.safetensors").is_file() else "model.safetensors.index.json"
            raise LoadError(f"{fname}: missing tensor {name} (in {folder})")
        if f not in handles:
            handles[f] = _open(f)
        h = handles[f]
        if name not in h.keys():
            raise LoadError(f"{f.name}: missing tensor {name} (listed in the index, absent from {f})")
        found = tuple(h.get_slice(name).get_shape())
        if found != shape:
            raise LoadError(f"{f.name}: tensor {name}: shape {shape} expected, found {found}")
        try:
            out[name] = h.get_tensor(name).to(torch.float32)
        except Exception as e:
            raise LoadError(f"{f.name}: cannot read tensor {name} from {f} ({e})") from e
    extra = sorted(set(mapping) - set(out) - {"lm_head.weight"})
    if extra:
        log.warning("%s: ignoring %d tensors our Llama does not use: %s", folder, len(extra), ", ".join(extra[:5]))
    return out


def load_hf(folder: Path, *, cache_len: int | None = None) -> tuple[torch.nn.Module, dict]:
    """Build the model of a Hugging Face folder; returns it and ``config.json``."""
    cfg = read_config(folder)
    if cfg.get("model_type") == "llama":
        c = llama_config(cfg, folder / "config.json")
        weights = _read_llama_weights(folder, c)
        model = Llama(c, cache_len=cache_len)
        if c.tie_embeddings:
            weights["lm_head.weight"] = weights["model.embed_tokens.weight"]
        missing, unexpected = model.load_state_dict(weights, strict=False)
        if missing or unexpected:
            raise LoadError(f"{folder}: internal mapping error (missing {missing}, unexpected {unexpected})")
        log.info("loaded Hugging Face llama %s: dim %d, %d layers, vocab %d", folder, c.dim, c.n_layers,
                 c.vocab_size)
        return model.eval(), cfg
    try:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(folder), local_files_only=True, dtype=torch.float32)
    except Exception as e:
        raise LoadError(f"{folder}: transformers could not load model_type {cfg.get('model_type')!r}: "
                        f"{type(e).__name__}: {e}") from e
    return model.eval(), cfg
