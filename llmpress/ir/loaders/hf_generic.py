"""Hugging Face folders: transformers' own causal LM, its weights checked from the headers before any is read.

``load_generic(folder, cfg, cache_len=..., lazy=...)`` returns ``AutoModelForCausalLM``'s model in float32, which
``capture`` takes through transformers' ``StaticCache`` (``ir.capture_hf``). Both ways build the model without
weights and match every parameter to its checkpoint tensor first (``_checked_model``), so a damaged or mismatched
checkpoint is a ``LoadError`` naming the file and tensor before anything is read:

1. ``from_config(config, dtype=float32)`` under ``meta_parameters()``: every parameter moves to the meta device as
   it is registered (its random init then runs on meta: no data), buffers stay the real CPU tensors the model's
   ``__init__`` computes (rotary ``inv_freq``, masks). A parameter already on meta is left alone, so weights tied
   inside ``__init__`` (``lm_head`` = the embedding) stay one object. accelerate's
   ``init_empty_weights(include_buffers=False)`` re-wraps every registered parameter instead, which unties them
   (seen on a tied StableLM, accelerate 1.16), and accelerate is no dependency of llmpress: hence these 15 lines.
2. Match (``_match``): each parameter, under its first name (a tied alias shares it), must be exactly one
   checkpoint tensor, named as the parameter or renamed to it by one of transformers' pure renamings (its
   ``conversion_mapping``: GPT-NeoX checkpoints store ``lm_head`` as ``embed_out``); every other checkpoint tensor
   must be a buffer of the model or one transformers ignores on load; and none may be one that transformers'
   loader converts (per-expert tensors fused into 3-D ones, fused projections split, permutations). Otherwise the
   eager load runs, after one log line naming the tensors: a lazily built model is never a guess at what
   transformers' loader would have done.
3. Each matched tensor is checked for shape and a float dtype (a ``LoadError`` naming file and tensor) and the
   checkpoint's persistent buffers are read (small). Then lazy (``capture``/``compile`` of a path): the parameters
   become ``FakeTensor``s (``ir.lazy.fake_parameters``) with their ``LazyTensor`` sources under ``LAZY_ATTR``, a
   weight read as float32 when a pass asks; eager: each is read now, as float32 (bf16/fp16 upcast).

Where step 2 finds no one-to-one match, transformers' own ``from_pretrained`` loads the model (eagerly, converting
as it does); a parameter the checkpoint lacks is then a ``LoadError`` naming it, where transformers would initialize
it at random.
"""
from __future__ import annotations

import contextlib
import logging
import re
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from ...errors import LoadError
from ...safetensors_io import read_tensor
from ..lazy import LAZY_ATTR, LazyTensor, fake_parameters, read_parameters

__all__ = ["load_generic", "meta_parameters"]

log = logging.getLogger(__name__)


@contextlib.contextmanager
def meta_parameters() -> Iterator[None]:
    """Modules built inside get their parameters on the meta device and keep real buffers (see the docstring)."""
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(module, name, param)
        p = module._parameters[name]
        if p is not None and p.device.type != "meta":
            meta = type(p)(p.detach().to("meta"), requires_grad=p.requires_grad)
            meta.__dict__.update(p.__dict__)  # transformers' flags (_is_hf_initialized ...)
            module._parameters[name] = meta

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def load_generic(folder: Path, cfg: dict, *, cache_len: int | None = None, lazy: bool = False) -> nn.Module:
    model = _checked_model(folder, lazy=lazy)
    if model is None:
        try:
            from transformers import AutoModelForCausalLM

            model, info = AutoModelForCausalLM.from_pretrained(str(folder), local_files_only=True, dtype=torch.float32,
                                                               output_loading_info=True)
        except Exception as e:
            raise LoadError(f"{folder}: transformers could not load model_type {cfg.get('model_type')!r}: "
                            f"{type(e).__name__}: {e}") from e
        # transformers initializes a parameter the checkpoint lacks at random (and only logs it): refuse instead
        params = {n for n, _ in model.named_parameters(remove_duplicate=False)}
        missing = sorted(params & (set(info.get("missing_keys", ())) | {k[0] for k in info.get("mismatched_keys", ())}))
        if missing:
            raise LoadError(f"{folder}: the checkpoint lacks {len(missing)} parameters of model_type "
                            f"{cfg.get('model_type')!r} (or stores them with another shape): "
                            f"{', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''}")
    if cache_len is not None:  # where transformers' export recipe reads the static cache length (capture_hf does)
        model.generation_config.cache_config = {"batch_size": 1, "max_cache_len": int(cache_len)}
    return model.eval()


def _checked_model(folder: Path, *, lazy: bool) -> nn.Module | None:
    """transformers' model built without weights, every parameter matched to its checkpoint tensor and checked
    from the headers; then ``lazy``: fake parameters with their lazy sources, else each tensor read into its
    parameter (float32). None (logged) where only transformers' own loader is exact."""
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    from .hf_checkpoint import CheckpointHeaders

    ckpt = CheckpointHeaders(folder)  # a missing, truncated or corrupt file is a LoadError naming it, before all else
    try:
        config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
    except Exception as e:
        raise LoadError(f"{folder / 'config.json'}: transformers cannot read it: {type(e).__name__}: {e}") from e
    try:  # what goes wrong here, transformers' own loader reports (naming the folder) or does another way
        with meta_parameters():
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    except Exception as e:
        log.info("%s: loading through transformers' loader: it could not build the model with empty weights "
                 "(%s: %s)", folder, type(e).__name__, e)
        return None
    if (folder / "generation_config.json").is_file():  # as from_pretrained reads it (end-of-turn ids live there)
        try:
            model.generation_config = GenerationConfig.from_pretrained(str(folder), local_files_only=True)
        except (OSError, ValueError) as e:
            raise LoadError(f"{folder / 'generation_config.json'}: not a valid generation config ({e})") from e
    names, problems = _match(model, set(ckpt.files))
    missing = problems.get("parameters not in the checkpoint")
    if missing and len(problems) == 1:  # nothing renamed, converted or left over: the tensors are just not there
        fname = ckpt.single.name if ckpt.single.is_file() else "model.safetensors.index.json"
        raise LoadError(f"{fname}: missing tensor{'s' if len(missing) > 1 else ''} {', '.join(missing[:5])}"
                        f"{', ...' if len(missing) > 5 else ''} (in {folder}; model_type {config.model_type!r} "
                        f"has {len(missing)} parameters the checkpoint lacks)")
    if problems:
        why = "; ".join(f"{len(v)} {k} ({', '.join(v[:4])}{', ...' if len(v) > 4 else ''})"
                        for k, v in problems.items())
        log.info("%s: loading %s eagerly through transformers' loader (every weight read now): its checkpoint does "
                 "not name the model's parameters one to one: %s", folder, config.model_type, why)
        return None
    sources: dict[str, LazyTensor] = {}
    dtypes: dict[str, int] = {}
    for aliases, p in _parameters(model):
        src = names[aliases[0]]
        f, entry, start = ckpt.entry(src)
        if tuple(entry["shape"]) != tuple(p.shape):
            renamed = f" (stored as {src})" if src != aliases[0] else ""
            raise LoadError(f"{f.name}: tensor {aliases[0]}{renamed}: shape {tuple(p.shape)} expected, found "
                            f"{tuple(entry['shape'])}")
        dtypes[entry["dtype"]] = dtypes.get(entry["dtype"], 0) + 1
        begin, end = entry["data_offsets"]
        lazy_src = LazyTensor(path=str(f), tensor=src, entry=(entry["dtype"], tuple(entry["shape"]), begin, end),
                              data_start=start, shape=tuple(p.shape))
        sources.update({n: lazy_src for n in aliases})
    _read_buffers(model, ckpt, names)
    stored = ", ".join(f"{n} {k}" for k, n in sorted(dtypes.items()))
    if lazy:
        fake_parameters(model, sources)
        setattr(model, LAZY_ATTR, sources)
        log.info("%s: model_type %r built by transformers with %d weights left in the checkpoint (%s), read one at a "
                 "time when a pass asks", folder, config.model_type, len(sources), stored)
    else:
        read_parameters(model, sources)
        log.info("%s: model_type %r built by transformers, %d weights read (%s%s)", folder, config.model_type,
                 len(sources), stored, "; upcast to float32" if set(dtypes) - {"F32"} else "")
    return model


def _parameters(model: nn.Module) -> list[tuple[list[str], nn.Parameter]]:
    """Each parameter object once, with all its names (the first one is the one the checkpoint stores)."""
    names: dict[int, tuple[list[str], nn.Parameter]] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), ([], p))[0].append(n)
    return list(names.values())


def _match(model: nn.Module, stored: set[str]) -> tuple[dict[str, str], dict[str, list[str]]]:
    """(model tensor name -> checkpoint tensor name, why they do not match one to one: each kind of mismatch with
    the tensors concerned, empty if they match).

    Names are compared after transformers' pure renamings (``WeightRenaming``: GPT-NeoX's ``embed_out`` is
    ``lm_head``), which move a tensor unchanged; a tensor one of its ``WeightConverter``s would transform (fuse,
    split, transpose, permute) is a mismatch."""
    renamed, converted = _renamed(model, stored)
    params = _parameters(model)
    aliases = {n for names, _ in params for n in names}
    buffers = {n for n, _ in model.named_buffers()}
    ignore = [re.compile(k) for k in (getattr(model, "_keys_to_ignore_on_load_unexpected", None) or [])]
    by_name: dict[str, list[str]] = {}
    for k in sorted(stored):
        by_name.setdefault(renamed[k], []).append(k)
    missing = [names[0] for names, _ in params if names[0] not in by_name]
    clashes = [f"{n} <- {len(ks)} tensors" for n, ks in by_name.items() if len(ks) > 1 and n in aliases | buffers]
    extra = [k for k in sorted(stored) if renamed[k] not in aliases | buffers
             and not any(r.search(k) or r.search(renamed[k]) for r in ignore)]
    problems = {what: names for what, names in (("parameters not in the checkpoint", missing),
                                                ("checkpoint tensors that are no parameter or buffer", extra),
                                                ("parameters made of several checkpoint tensors", clashes),
                                                ("checkpoint tensors transformers converts on load", converted))
                if names}
    return {n: ks[0] for n, ks in by_name.items()}, problems


def _renamed(model: nn.Module, stored: set[str]) -> tuple[dict[str, str], list[str]]:
    """(checkpoint name -> the model's name for it under transformers' renamings, the checkpoint tensors one of its
    converters would transform), both as ``convert_and_load_state_dict_in_model`` applies ``rename_source_key``."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key
    except ImportError as e:  # its loader changed: nothing here can tell what it does, so load eagerly
        return {k: k for k in stored}, [f"(cannot check: {e})"]
    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    others = [type(t).__name__ for t in transforms if not isinstance(t, (WeightRenaming, WeightConverter))]
    if others:
        return {k: k for k in stored}, [f"(unknown transforms {', '.join(others)})"]
    state = model.state_dict()
    renamed: dict[str, str] = {}
    converted: list[str] = []
    for key in sorted(stored):
        new, pattern = rename_source_key(key, renamings, converters, model.base_model_prefix, state)
        if new not in state and key in state:  # the loader's own retry: the key as it is, prefix fixed only
            new, pattern = rename_source_key(key, [], [], model.base_model_prefix, state)
        renamed[key] = new
        if pattern is not None:
            converted.append(key)
    return renamed, converted


def _read_buffers(model: nn.Module, ckpt, names: dict[str, str]) -> None:
    """Persistent buffers the checkpoint holds (``names``: model name -> checkpoint name), read into the model
    (eager loading assigns them too)."""
    persistent = set(model.state_dict(keep_vars=True)) - {n for n, _ in model.named_parameters(remove_duplicate=False)}
    for name in sorted(persistent & set(names)):
        buf = model.get_buffer(name)
        f = ckpt.files[names[name]]
        entries, start = ckpt.header(f)
        if names[name] not in entries:
            raise LoadError(f"{f.name}: missing tensor {names[name]} (listed in the index, absent from {f})")
        t = read_tensor(f, entries[names[name]], start)
        if tuple(t.shape) != tuple(buf.shape):
            raise LoadError(f"{f.name}: buffer {names[name]}: shape {tuple(buf.shape)} expected, found "
                            f"{tuple(t.shape)}")
        with torch.no_grad():
            buf.copy_(t.to(buf.dtype))
