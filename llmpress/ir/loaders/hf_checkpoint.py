"""Lazy sources of a Hugging Face Llama-family checkpoint: every weight named and checked, none read.

``lazy_llama_sources(folder, c)`` reads only the safetensors headers (single file or shards) and returns our tensor
name -> ``ir.lazy.LazyTensor``, after the same checks as the eager loader (``hf._read_llama_weights``): every
expected tensor present, a floating-point dtype, the shape ours needs after the checkpoint's transposes and row
slices (Phi-3's fused projections, GPT-2's ``Conv1D``). ``load_hf(folder, lazy=True)`` builds the model around them
(``ir.lazy.fake_parameters``); the data is read when a pass asks for a weight, one tensor at a time.

``CheckpointHeaders`` is that header reading (each file's header once, a missing tensor or a non-float one named
with its file), shared with ``hf_lazy_generic`` (the other transformers models).
"""
from __future__ import annotations

import logging
from pathlib import Path

from ...errors import LoadError
from ...models.llama import LlamaConfig
from ...safetensors_io import DTYPES, read_header
from ..lazy import LazyTensor

__all__ = ["CheckpointHeaders", "lazy_llama_sources"]

log = logging.getLogger(__name__)

_FLOAT_CODES = {k for k, v in DTYPES.items() if v.is_floating_point}


class CheckpointHeaders:
    """The tensors of a folder's checkpoint (``model.safetensors`` or the shards its index lists), by name, from
    the headers alone."""

    def __init__(self, folder: Path) -> None:
        from .hf import _weight_files

        self.folder = folder
        self.single = folder / "model.safetensors"
        self._headers: dict[Path, tuple[dict, int]] = {}
        self.files: dict[str, Path] = _weight_files(folder) or {k: self.single for k in self.header(self.single)[0]}

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


def lazy_llama_sources(folder: Path, c: LlamaConfig) -> dict[str, LazyTensor]:
    from .hf import checkpoint_sources, expected_llama_shapes

    ckpt = CheckpointHeaders(folder)
    sources = checkpoint_sources(c, set(ckpt.files))
    out: dict[str, LazyTensor] = {}
    dtypes: dict[str, int] = {}
    for name, shape in expected_llama_shapes(c).items():
        src, b, e, transposed = sources.get(name, (name, None, None, False))
        f, entry, start = ckpt.entry(src)
        dtypes[entry["dtype"]] = dtypes.get(entry["dtype"], 0) + 1
        got = tuple(int(d) for d in entry["shape"])
        if transposed:
            got = got[::-1]
        if b is not None:
            got = (min(e, got[0]) - min(b, got[0]),) + got[1:]
        if got != shape:
            how = (" transposed" if transposed else "") + (f", rows {b}:{e}" if b is not None else "")
            found = got if src == name and not how else f"{got} from {src}{how}"
            raise LoadError(f"{f.name}: tensor {name}: shape {shape} expected, found {found}")
        begin, end = entry["data_offsets"]
        out[name] = LazyTensor(path=str(f), tensor=src, entry=(entry["dtype"], tuple(entry["shape"]), begin, end),
                               data_start=start, shape=shape, rows=None if b is None else (b, e),
                               transposed=transposed,
                               add_one=c.arch in ("gemma2", "gemma3_text") and name.endswith("norm.weight"))
    log.info("%s: %d weights left in the checkpoint (%s), read one at a time when a pass asks", folder, len(out),
             ", ".join(f"{n} {k}" for k, n in sorted(dtypes.items())))
    return out
