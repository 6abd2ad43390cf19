"""A Hugging Face checkpoint's tensors from the safetensors headers alone: every tensor named and checked, none read.

``CheckpointHeaders(folder)`` reads each file's header once (``model.safetensors`` or the shards its index lists)
and answers where a tensor is (``entry``), with a ``LoadError`` naming the file for a missing, truncated or corrupt
file, a tensor the index lists but its shard lacks, or a non-float tensor. ``hf_generic`` builds the lazy (and the
eager) model from it.
"""
from __future__ import annotations

import json
from pathlib import Path

from ...errors import LoadError
from ...safetensors_io import DTYPES, read_header

__all__ = ["CheckpointHeaders", "weight_files"]

_FLOAT_CODES = {k for k, v in DTYPES.items() if v.is_floating_point}


def weight_files(folder: Path) -> dict[str, Path]:
    """tensor name -> safetensors file for a sharded checkpoint; {} for a single ``model.safetensors``."""
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


class CheckpointHeaders:
    """The tensors of a folder's checkpoint (``model.safetensors`` or the shards its index lists), by name, from
    the headers alone."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.single = folder / "model.safetensors"
        self._headers: dict[Path, tuple[dict, int]] = {}
        self.files: dict[str, Path] = weight_files(folder) or {k: self.single for k in self.header(self.single)[0]}

    def header(self, f: Path) -> tuple[dict, int]:
        if f not in self._headers:
            if not f.is_file():
                raise LoadError(f"{f.name}: missing weight file {f}")
            try:
                self._headers[f] = read_header(f)
            except (OSError, ValueError) as e:
                raise LoadError(f"{f.name}: unreadable safetensors file {f} (truncated or corrupt: {e})") from e
        return self._headers[f]

    def entry(self, src: str) -> tuple[Path, dict, int]:
        """``(file, header entry, data start)`` of float tensor ``src``; a LoadError naming the file otherwise."""
        f = self.files.get(src)
        if f is None:
            fname = self.single.name if self.single.is_file() else "model.safetensors.index.json"
            raise LoadError(f"{fname}: missing tensor {src} (in {self.folder})")
        entries, start = self.header(f)
        entry = entries.get(src)
        if entry is None:
            raise LoadError(f"{f.name}: missing tensor {src} (listed in the index, absent from {f})")
        if entry.get("dtype") not in _FLOAT_CODES:
            raise LoadError(f"{f.name}: tensor {src} has dtype {entry.get('dtype')}, expected a float tensor")
        return f, entry, start
