"""Tiny random models of every supported Hugging Face family, compiled once per test session through the CLI.

Shared by ``tests/test_cli_families.py`` (the command line against transformers) and
``tests/backends/test_edge_runner.py`` (the C++ runner against Python): a TVM ``cpu`` build of a tiny model costs
~15 s on the 2-core CI machines, so each (family, pipeline, target) is built once and both read the same folder.

The models are ``tests/ir/test_hf_families.py``'s ``_save`` (2 layers, hidden 64, vocab 2048) with the reference
model's tokenizer files beside the weights, so ``llmpress`` and transformers tokenize the same text.
"""
from __future__ import annotations

import contextlib
import io
from pathlib import Path

import pytest

from .ir.test_hf_families import GEMMA2, _save

__all__ = ["FAMILIES", "hf_folder", "built", "cli"]

#: family -> transformers config overrides (as in test_family_matches_transformers: the switch each family adds).
FAMILIES: dict[str, dict] = {
    "llama": {},
    "qwen2": {"tie_word_embeddings": True},  # q/k/v bias, tied classifier
    "qwen3": {"head_dim": 32},  # q/k norms, head_dim != hidden / heads
    "mistral": {"sliding_window": 64},  # a window as long as the cache: exact
    "phi3": {},  # fused qkv_proj / gate_up_proj in the checkpoint
    "gemma2": GEMMA2,  # soft caps, sandwich norms, sliding window, scaled embeddings
    "gpt2": {},  # LayerNorm, learned positions, Conv1D weights, MHA
}

_FOLDERS: dict[str, Path] = {}
_BUILT: dict[tuple[str, str, str], Path] = {}


def _root(factory: pytest.TempPathFactory) -> Path:
    root = factory.getbasetemp() / "families"
    root.mkdir(exist_ok=True)
    return root


def cli(*args: str) -> str:
    """``llmpress ARGS`` in this process (``llmpress.cli.main``, what the console script runs); its stdout."""
    from llmpress.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = main(list(args))
    assert rc == 0, f"llmpress {' '.join(args)} exited {rc}"
    return out.getvalue()


def hf_folder(factory: pytest.TempPathFactory, kind: str) -> Path:
    """The ``kind`` model as transformers saves it, with the tinystories tokenizer files (made once a session)."""
    if kind not in _FOLDERS:
        _FOLDERS[kind] = _save(_root(factory) / f"hf-{kind}", kind, tokenizer=True, **FAMILIES[kind])
    return _FOLDERS[kind]


def built(factory: pytest.TempPathFactory, kind: str, pipeline: str, target: str) -> Path:
    """``llmpress compile HF -p PIPELINE -t TARGET -o DIR -q`` for the ``kind`` model (once a session): DIR."""
    key = (kind, pipeline, target)
    if key not in _BUILT:
        out = _root(factory) / f"{kind}-{len(_BUILT)}-{target.replace(':', '-')}"
        cli("compile", str(hf_folder(factory, kind)), "-p", pipeline, "-t", target, "-o", str(out), "-q")
        _BUILT[key] = out
    return _BUILT[key]
