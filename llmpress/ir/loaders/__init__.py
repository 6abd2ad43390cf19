"""Model loaders: a path (Hugging Face folder, llama2.c ``.bin``, ``.onnx`` file) -> an ``nn.Module`` + tokenizer.

``load_model`` only builds the PyTorch module; ``llmpress.ir.capture`` turns it into the IR. Every problem with the
files is a ``LoadError`` whose message names the file and what is wrong with it.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from torch import nn

from ...errors import LoadError
from ...tokenizer import Tokenizer, find_tokenizer, load_tokenizer

__all__ = ["LoadedModel", "load_model"]

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    """What ``load_model`` read: the module, its tokenizer (if one was found), the kind of source and its config."""

    model: nn.Module
    tokenizer: Tokenizer | None
    kind: Literal["hf", "llama2c", "onnx"]
    source: str
    config: dict = field(default_factory=dict)


def load_model(path: str | Path, *, tokenizer: str | Path | None = None, cache_len: int | None = None,
               lazy: bool = False) -> LoadedModel:
    """Load a model from ``path``.

    - a folder with ``config.json``: Hugging Face, transformers' own model (``hf``), captured through its static
      cache; tokenizer ``tokenizer.model`` or ``tokenizer.json`` from the folder.
    - a ``.bin`` file: llama2.c checkpoint, as transformers' ``LlamaForCausalLM``; tokenizer ``tok{vocab}.bin`` or
      ``tokenizer.bin`` beside it.
    - a ``.onnx`` file: imported op by op into a torch module (``onnx_import``); no tokenizer unless given.

    ``tokenizer`` overrides the tokenizer file; ``cache_len`` sets the KV-cache length of transformers models (their
    ``StaticCache``) and of ONNX decoders exported with ``past_key_values`` (default: the model's context length).
    ``lazy``: Hugging Face folders leave their weights in the checkpoint until a pass reads them (``hf_generic``:
    where the checkpoint names the model's parameters one to one), for ``capture``/``compile``, which read them one
    at a time; other formats load as usual.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise LoadError(f"{p}: no such file or folder")
    p = p.resolve()
    tok_path = Path(tokenizer).expanduser() if tokenizer is not None else None
    if tok_path is not None and not tok_path.exists():
        raise LoadError(f"{tok_path}: tokenizer file does not exist")
    if p.is_dir():
        from .hf import load_hf

        model, cfg = load_hf(p, cache_len=cache_len, lazy=lazy)
        tok_file = tok_path or find_tokenizer(p)
        tok = load_tokenizer(tok_file) if tok_file is not None else None
        if tok is None:
            log.warning("%s: no tokenizer.model or tokenizer.json; text generation needs --tokenizer", p)
        return LoadedModel(model, tok, "hf", str(p), cfg)
    if p.suffix == ".bin":
        from .llama2c import find_llama2c_tokenizer, load_llama2c

        model, header = load_llama2c(p, cache_len=cache_len)
        tok_file = tok_path or find_llama2c_tokenizer(p, header["vocab_size"])
        tok = None
        if tok_file is not None:
            tok = load_tokenizer(tok_file, vocab_size=header["vocab_size"] if tok_file.suffix == ".bin" else None)
        else:
            log.warning("%s: no tok%d.bin or tokenizer.bin beside it; text generation needs --tokenizer", p,
                        header["vocab_size"])
        return LoadedModel(model, tok, "llama2c", str(p), header)
    if p.suffix == ".onnx":
        from .onnx_import import open_onnx

        model = open_onnx(p, cache_len=cache_len)
        tok = load_tokenizer(tok_path) if tok_path is not None else None
        return LoadedModel(model, tok, "onnx", str(p), model.info)
    raise LoadError(f"{p}: unknown model file type {p.suffix!r} (expected a Hugging Face folder with config.json, "
                    "a llama2.c .bin or an .onnx file)")
