"""Hugging Face model folders -> an ``nn.Module``.

The Llama-layout family (``SUPPORTED_MODEL_TYPES``: llama, mistral, qwen2, qwen3, phi3, gpt2) builds our export-friendly
``llmpress.models.Llama`` (static KV cache) straight from ``config.json`` and the safetensors weights, whose names
match one to one (``model.layers.0.self_attn.q_proj.weight`` ...), or, for Phi-3's fused ``qkv_proj`` and
``gate_up_proj``, are row slices of one checkpoint tensor (``checkpoint_sources``; GPT-2: ``hf_gpt2``). Every expected tensor is checked for presence
and shape before loading, so a damaged file is reported with the tensor it lacks.

Checkpoints are read as they come: one ``model.safetensors`` or shards listed by ``model.safetensors.index.json``;
bf16/fp16 tensors are upcast to float32 one at a time (the IR is float32), read through ``safe_open``'s memory map,
and assigned into a module built on the meta device, so no second copy of the weights (random init or a full
half-precision state dict) is ever held. End-of-sequence ids come from ``config.json`` and
``generation_config.json``.

Other model types load through ``transformers.AutoModelForCausalLM`` (``hf_generic``: lazily too, where the
checkpoint names its parameters one to one); ``capture`` takes them with the same KV-cache calling convention
through transformers' ``StaticCache`` (``llmpress.ir.capture_hf``), or refuses them naming why.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from ...errors import LoadError
from ...models.llama import Llama, LlamaConfig

__all__ = ["SUPPORTED_MODEL_TYPES", "read_config", "llama_config", "load_hf", "expected_llama_shapes"]

# model_type -> what its attention adds to the Llama layout (see llmpress.models.llama).
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gpt2", "gemma2", "gemma3_text")

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


def _eos_ids(cfg: dict, folder: Path | None) -> list[int]:
    """Every EOS id of ``config.json`` and ``generation_config.json`` (an int or a list in either), config first.
    ``generate`` stops at any of them: chat checkpoints list their end-of-turn token only in the latter."""
    ids: list[int] = []
    sources = [cfg.get("eos_token_id")]
    gen = folder / "generation_config.json" if folder is not None else None
    if gen is not None and gen.is_file():
        try:
            sources.append(json.loads(gen.read_text()).get("eos_token_id"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError) as e:
            raise LoadError(f"{gen}: not a valid generation config ({e})") from e
    for v in sources:
        for i in v if isinstance(v, list) else [v]:
            if i is not None and int(i) not in ids:
                ids.append(int(i))
    return ids


def _sliding_window_check(cfg: dict, where: Path, cache_len: int) -> None:
    """Our attention spans the whole cache. A sliding window of W keys (key allowed iff ``q - k < W``) changes
    nothing while every query position is below W, i.e. ``cache_len <= W``: then it is exact; else refuse."""
    window = cfg.get("sliding_window")
    kind = cfg.get("model_type")
    layer_types = cfg.get("layer_types") or []
    if layer_types:
        sliding = "sliding_attention" in layer_types
    elif kind in ("qwen2", "qwen3"):
        sliding = bool(cfg.get("use_sliding_window"))
    else:
        sliding = window is not None
    if not sliding or window is None:
        return
    if int(window) < cache_len:
        raise LoadError(f"{where}: sliding_window={window} is smaller than the KV cache length {cache_len}; "
                        "llmpress attends over the whole cache, which equals sliding-window attention only while "
                        f"the cache is no longer than the window (load with cache_len <= {window})")


#: RoPE variants whose frequencies do not depend on the sequence length at run time, so a static table is exact.
STATIC_ROPE_TYPES = ("linear", "llama3", "yarn")


def _scaled_rope(cfg: dict, where: Path) -> tuple[tuple, float]:
    """The inverse frequencies and cos/sin factor of a scaled RoPE (``rope_scaling`` / ``rope_parameters`` with a
    ``rope_type``), computed by transformers' own ``ROPE_INIT_FUNCTIONS`` (the maintained definitions of each
    variant, rather than our copy of their formulas); ``((), 1.0)`` for the default RoPE. Variants that change
    with the sequence length at run time (dynamic NTK, longrope's short/long switch) are refused."""
    kinds = {src.get("rope_type", src.get("type", "default"))
             for src in (cfg.get("rope_parameters") or {}, cfg.get("rope_scaling") or {})}
    kinds -= {None, "default"}
    if not kinds:
        return (), 1.0
    kind = kinds.pop()
    if kinds or kind not in STATIC_ROPE_TYPES:
        raise LoadError(f"{where}: rope scaling type {kind!r} is not supported: llmpress precomputes one RoPE "
                        f"table for the static cache (supported: default, {', '.join(STATIC_ROPE_TYPES)})")
    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    try:
        hf = AutoConfig.for_model(**cfg)
        inv_freq, factor = ROPE_INIT_FUNCTIONS[kind](hf, torch.device("cpu"))
    except (KeyError, TypeError, ValueError) as e:
        raise LoadError(f"{where}: rope scaling {kind!r}: transformers could not compute it: {e}") from e
    return tuple(float(f) for f in inv_freq.float()), float(factor)


def need_key(cfg: dict, key: str, where: Path):
    """``cfg[key]``, or a LoadError naming the file and the missing key."""
    if key not in cfg:
        raise LoadError(f"{where}: missing key {key!r}")
    return cfg[key]


def llama_config(cfg: dict, where: Path, *, cache_len: int | None = None) -> LlamaConfig:
    """``config.json`` of a Llama-family model (``SUPPORTED_MODEL_TYPES``) -> ``LlamaConfig``; rejects what our
    Llama does not compute. ``cache_len`` (default ``max_position_embeddings``) decides whether a sliding window
    is exact."""
    def need(key: str):
        return need_key(cfg, key, where)

    kind = cfg.get("model_type", "llama")
    if kind not in SUPPORTED_MODEL_TYPES:
        raise LoadError(f"{where}: model_type {kind!r} is not a Llama-family model "
                        f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
    if kind == "gpt2":
        from .hf_gpt2 import gpt2_config

        return gpt2_config(cfg, where, cache_len=cache_len,
                           eos=_eos_ids(cfg, where.parent if where.name == "config.json" else None))
    rope = cfg.get("rope_parameters") or {}
    gemma = kind in ("gemma2", "gemma3_text")
    # Gemma 3's rope_parameters hold one entry per layer type: hf_gemma computes both tables
    inv_freq, attention_scaling = _scaled_rope(cfg, where) if kind != "gemma3_text" else ((), 1.0)
    if kind == "phi3":
        partial = cfg.get("partial_rotary_factor", rope.get("partial_rotary_factor", 1.0))
        if float(partial) != 1.0:
            raise LoadError(f"{where}: partial_rotary_factor={partial} is not supported (RoPE over the whole head only)")
    extra: dict = {"rope_inv_freq": inv_freq, "rope_attention_scaling": attention_scaling}
    if gemma:
        from .hf_gemma import gemma_switches

        extra.update(gemma_switches(cfg, where))
    elif cfg.get("hidden_act", "silu") != "silu":
        raise LoadError(f"{where}: hidden_act {cfg['hidden_act']!r} is not supported (Llama uses silu)")
    if kind == "mistral":
        for flag in ("attention_bias", "mlp_bias"):
            if cfg.get(flag):
                raise LoadError(f"{where}: {flag}=true is not supported for mistral")
    theta = cfg.get("rope_theta", rope.get("rope_theta", 10000.0))
    n_heads = int(need("num_attention_heads"))
    dim = int(need("hidden_size"))
    max_seq = int(cfg.get("max_position_embeddings", 2048))
    _sliding_window_check(cfg, where, cache_len or max_seq)

    def token_id(key: str, default: int) -> int:
        v = cfg.get(key, default)
        if isinstance(v, list):  # some configs list several EOS ids; the first is the canonical one
            v = v[0] if v else default
        return default if v is None else int(v)

    eos = _eos_ids(cfg, where.parent if where.name == "config.json" else None)
    attn_bias = bool(cfg.get("attention_bias", False))
    return LlamaConfig(
        vocab_size=int(need("vocab_size")), dim=dim, n_layers=int(need("num_hidden_layers")), n_heads=n_heads,
        n_kv_heads=int(cfg.get("num_key_value_heads") or n_heads), hidden_dim=int(need("intermediate_size")),
        max_seq_len=max_seq, norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=float(theta), tie_embeddings=bool(cfg.get("tie_word_embeddings", gemma)),
        # an explicit null (Qwen) means no BOS token: -1, so generation does not stop at token 1
        bos_id=-1 if "bos_token_id" in cfg and cfg["bos_token_id"] is None else token_id("bos_token_id", 1), eos_id=eos[0] if eos else 2, eos_ids=tuple(eos),
        head_dim=int(cfg.get("head_dim") or dim // n_heads),
        qkv_bias=kind == "qwen2" or attn_bias,  # Qwen2 always has q/k/v bias (no config key), never o_proj's
        o_bias=attn_bias, mlp_bias=bool(cfg.get("mlp_bias", False)), arch=kind,
        **{"qk_norm": kind == "qwen3", **extra})


def expected_llama_shapes(c: LlamaConfig) -> dict[str, tuple[int, ...]]:
    hd = c.head_dim
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (c.vocab_size, c.dim)}
    for i in range(c.n_layers):
        p = f"model.layers.{i}."
        if c.qkv_bias:
            shapes.update({p + "self_attn.q_proj.bias": (c.n_heads * hd,),
                           p + "self_attn.k_proj.bias": (c.n_kv_heads * hd,),
                           p + "self_attn.v_proj.bias": (c.n_kv_heads * hd,)})
        if c.o_bias:
            shapes[p + "self_attn.o_proj.bias"] = (c.dim,)
        if c.mlp_bias:
            shapes.update({p + "mlp.gate_proj.bias": (c.hidden_dim,), p + "mlp.up_proj.bias": (c.hidden_dim,),
                           p + "mlp.down_proj.bias": (c.dim,)})
        if c.qk_norm:
            shapes.update({p + "self_attn.q_norm.weight": (hd,), p + "self_attn.k_norm.weight": (hd,)})
        if c.sandwich_norms:
            shapes.update({p + "pre_feedforward_layernorm.weight": (c.dim,),
                           p + "post_feedforward_layernorm.weight": (c.dim,)})
        if c.norm == "layer":
            shapes.update({p + "input_layernorm.bias": (c.dim,), p + "post_attention_layernorm.bias": (c.dim,)})
        shapes.update({
            p + "input_layernorm.weight": (c.dim,),
            p + "self_attn.q_proj.weight": (c.n_heads * hd, c.dim),
            p + "self_attn.k_proj.weight": (c.n_kv_heads * hd, c.dim),
            p + "self_attn.v_proj.weight": (c.n_kv_heads * hd, c.dim),
            p + "self_attn.o_proj.weight": (c.dim, c.n_heads * hd),
            p + "post_attention_layernorm.weight": (c.dim,),
            p + "mlp.up_proj.weight": (c.hidden_dim, c.dim),
            p + "mlp.down_proj.weight": (c.dim, c.hidden_dim),
        })
        if c.mlp != "gelu":  # the gated forms
            shapes[p + "mlp.gate_proj.weight"] = (c.hidden_dim, c.dim)
        elif c.mlp_bias:
            del shapes[p + "mlp.gate_proj.bias"]
    if c.positions == "learned":
        shapes["model.embed_positions.weight"] = (c.max_seq_len, c.dim)
    shapes["model.norm.weight"] = (c.dim,)
    if c.norm == "layer":
        shapes["model.norm.bias"] = (c.dim,)
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


def checkpoint_sources(c: LlamaConfig, names: set[str]) -> dict[str, tuple[str, int | None, int | None, bool]]:
    """Our tensor name -> (checkpoint tensor, first row, end row, transposed) wherever the checkpoint does not store
    our tensor as is; names not listed are read one to one.

    - Phi-3 stores several of our linears as one: ``qkv_proj`` = q, k, v rows in that order; ``gate_up_proj`` =
      gate rows then up rows (as ``Phi3MLP`` chunks them).
    - GPT-2 stores ``Conv1D`` weights transposed and q/k/v as one ``c_attn`` (``hf_gpt2.gpt2_sources``).

    Split at load so every pass sees plain linears; ``fuse_qkv``/``fuse_gate_up`` fuse them again where a backend
    wants one matmul."""
    if c.arch == "gpt2":
        from .hf_gpt2 import gpt2_sources

        return gpt2_sources(c, names)
    if c.arch != "phi3":
        return {}
    q, kv = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
    out: dict[str, tuple[str, int | None, int | None, bool]] = {}
    for i in range(c.n_layers):
        a, m = f"model.layers.{i}.self_attn.", f"model.layers.{i}.mlp."
        out[a + "q_proj.weight"] = (a + "qkv_proj.weight", 0, q, False)
        out[a + "k_proj.weight"] = (a + "qkv_proj.weight", q, q + kv, False)
        out[a + "v_proj.weight"] = (a + "qkv_proj.weight", q + kv, q + 2 * kv, False)
        out[m + "gate_proj.weight"] = (m + "gate_up_proj.weight", 0, c.hidden_dim, False)
        out[m + "up_proj.weight"] = (m + "gate_up_proj.weight", c.hidden_dim, 2 * c.hidden_dim, False)
    return out


def _read_llama_weights(folder: Path, c: LlamaConfig) -> dict[str, torch.Tensor]:
    mapping = _weight_files(folder)
    handles: dict[Path, object] = {}
    if not mapping:
        single = folder / "model.safetensors"
        h = _open(single)
        handles[single] = h
        mapping = {k: single for k in h.keys()}
    out: dict[str, torch.Tensor] = {}
    dtypes: dict[str, int] = {}
    sources = checkpoint_sources(c, set(mapping))
    read: dict[str, torch.Tensor] = {}  # checkpoint tensors read so far (a fused one serves several of ours)

    def checkpoint_tensor(name: str) -> tuple[torch.Tensor, Path]:
        f = mapping.get(name)
        if f is None:
            fname = "model.safetensors" if (folder / "model.safetensors").is_file() else "model.safetensors.index.json"
            raise LoadError(f"{fname}: missing tensor {name} (in {folder})")
        if name in read:
            return read[name], f
        if f not in handles:
            handles[f] = _open(f)
        h = handles[f]
        if name not in h.keys():
            raise LoadError(f"{f.name}: missing tensor {name} (listed in the index, absent from {f})")
        try:
            t = h.get_tensor(name)  # copied out of the memory map; the half-precision copy dies right here
        except Exception as e:
            raise LoadError(f"{f.name}: cannot read tensor {name} from {f} ({e})") from e
        if not t.is_floating_point():
            raise LoadError(f"{f.name}: tensor {name} has dtype {t.dtype}, expected a float tensor")
        dtypes[str(t.dtype).replace("torch.", "")] = dtypes.get(str(t.dtype).replace("torch.", ""), 0) + 1
        read[name] = t.to(torch.float32)
        return read[name], f

    for name, shape in expected_llama_shapes(c).items():
        src, b, e, transposed = sources.get(name, (name, None, None, False))
        t, f = checkpoint_tensor(src)
        if transposed:
            t = t.t()
        if b is not None:
            t = t[b:e]
        if tuple(t.shape) != shape:
            how = (" transposed" if transposed else "") + (f", rows {b}:{e}" if b is not None else "")
            found = tuple(t.shape) if src == name and not how else f"{tuple(t.shape)} from {src}{how}"
            raise LoadError(f"{f.name}: tensor {name}: shape {shape} expected, found {found}")
        out[name] = t.contiguous() if (transposed or b is not None) else t
    if c.arch in ("gemma2", "gemma3_text"):
        from .hf_gemma import add_one_to_norms

        add_one_to_norms(out)
    upcast = {k: v for k, v in dtypes.items() if k != "float32"}
    if upcast:
        log.info("%s: upcast %s tensors to float32 for the IR (the checkpoint's own dtype; compression passes "
                 "and backends decide the stored precision)", folder,
                 ", ".join(f"{n} {k}" for k, n in sorted(upcast.items())))
    extra = sorted(set(mapping) - set(out) - set(read) - {"lm_head.weight"})
    extra = [k for k in extra if not k.endswith("rotary_emb.inv_freq")]  # recomputed from rope_theta
    if extra:
        log.warning("%s: ignoring %d tensors our Llama does not use: %s", folder, len(extra), ", ".join(extra[:5]))
    return out


def load_hf(folder: Path, *, cache_len: int | None = None, lazy: bool = False) -> tuple[torch.nn.Module, dict]:
    """Build the model of a Hugging Face folder; returns it and ``config.json``.

    ``lazy``: read no weight now; the parameters are shape-only fakes and the module carries where each one is
    (``hf_lazy``, ``hf_generic``, ``ir.lazy``): ``capture`` hands them to the ``ir.Module``, which reads a weight when
    a pass asks. Such a module cannot run in PyTorch itself; capture it. Other model types whose checkpoint names are
    not transformers' parameter names one to one load eagerly (``hf_generic``)."""
    cfg = read_config(folder)
    if cfg.get("model_type") in SUPPORTED_MODEL_TYPES:
        c = llama_config(cfg, folder / "config.json", cache_len=cache_len)
        if lazy:
            from ..lazy import LAZY_ATTR, fake_parameters
            from .hf_lazy import lazy_llama_sources

            sources = lazy_llama_sources(folder, c)
            with torch.device("meta"):
                model = Llama(c, cache_len=cache_len)
            if c.tie_embeddings:
                model.lm_head.weight = model.model.embed_tokens.weight
                sources["lm_head.weight"] = sources["model.embed_tokens.weight"]
            fake_parameters(model, sources)
            left = [n for n, p in model.named_parameters() if p.device.type == "meta"]
            if left:
                raise LoadError(f"{folder}: internal mapping error (no checkpoint tensor for {left[:5]})")
            setattr(model, LAZY_ATTR, sources)
            log.info("loaded Hugging Face %s %s lazily: dim %d, %d layers, vocab %d, eos %s", c.arch, folder, c.dim,
                     c.n_layers, c.vocab_size, list(c.eos_ids) or [c.eos_id])
            return model.eval(), cfg
        weights = _read_llama_weights(folder, c)
        with torch.device("meta"):  # no random init to throw away: the checkpoint's tensors are assigned below
            model = Llama(c, cache_len=cache_len)
        if c.tie_embeddings:
            weights["lm_head.weight"] = weights["model.embed_tokens.weight"]
        missing, unexpected = model.load_state_dict(weights, strict=False, assign=True)
        if missing or unexpected:
            raise LoadError(f"{folder}: internal mapping error (missing {missing}, unexpected {unexpected})")
        if c.tie_embeddings:  # assign=True wraps each entry in its own Parameter; tie them again
            model.lm_head.weight = model.model.embed_tokens.weight
        log.info("loaded Hugging Face %s %s: dim %d, %d layers, vocab %d, eos %s", c.arch, folder, c.dim,
                 c.n_layers, c.vocab_size, list(c.eos_ids) or [c.eos_id])
        return model.eval(), cfg
    from .hf_generic import load_generic

    model = load_generic(folder, cfg, cache_len=cache_len, lazy=lazy)
    log.info("%s: model_type %r is not one llmpress builds itself (%s); loaded through transformers, captured "
             "generically with its StaticCache", folder, cfg.get("model_type"), ", ".join(SUPPORTED_MODEL_TYPES))
    return model, cfg
