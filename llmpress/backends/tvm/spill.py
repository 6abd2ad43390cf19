"""Transformed weights kept out of memory: written to a temporary file as they are computed, read back on demand.

``params.prepare`` computes the weights in the kernels' layouts (tiled int4 codes, transposed float matrices) at
compile time. Held in memory, they sit beside the IR's own weights (which ``Artifact.module`` keeps for evaluation
and inspection): two copies of the compressed model. ``SpilledWeights`` holds one instead:

- ``keep(name, t)``: a weight passed through unchanged stays the IR's tensor (shared, no copy);
- ``write(name, t)``: a computed one is appended to ``weights.bin`` in a temporary folder and dropped;
- ``w[name]`` returns the kept tensor, or reads the written one into a fresh tensor (``safetensors_io.read_tensor``:
  plain file I/O, so nothing stays resident once the caller drops it: the bytes stay in the page cache only).

It is a read-only ``Mapping`` in the order of the names given, so ``TVMCompiled`` uses it like the dict it had. The
folder is removed when the mapping is garbage-collected or the process exits (``weakref.finalize``).
"""
from __future__ import annotations

import shutil
import tempfile
import weakref
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import torch

from ...safetensors_io import DTYPES, read_tensor

__all__ = ["SpilledWeights"]

_CODES = {v: k for k, v in DTYPES.items()}


class SpilledWeights(Mapping[str, torch.Tensor]):
    """Weights named ``names`` (in that order), each either kept in memory or written to a temporary file (see
    the module docstring). Every name must be given exactly once, by ``keep`` or ``write``, before ``finish()``."""

    def __init__(self, names: Sequence[str]) -> None:
        self._names = list(names)
        self._kept: dict[str, torch.Tensor] = {}
        self._entries: dict[str, dict] = {}
        folder = Path(tempfile.mkdtemp(prefix="llmpress-weights-"))
        self._finalize = weakref.finalize(self, shutil.rmtree, str(folder), ignore_errors=True)
        self.path = folder / "weights.bin"
        self._file = open(self.path, "wb")  # noqa: SIM115 - open until finish()
        self._offset = 0

    def keep(self, name: str, t: torch.Tensor) -> None:
        self._kept[name] = t

    def write(self, name: str, t: torch.Tensor) -> None:
        """Append ``t``'s bytes to the file; the caller may drop ``t`` afterwards."""
        if t.dtype not in _CODES:
            raise ValueError(f"{name}: dtype {t.dtype} cannot be spilled")
        t = t.detach().contiguous().cpu()
        n = t.numel() * t.element_size()
        if n:
            self._file.write(memoryview(t.view(-1).view(torch.uint8).numpy()))
        self._entries[name] = {"dtype": _CODES[t.dtype], "shape": list(t.shape),
                               "data_offsets": [self._offset, self._offset + n]}
        self._offset += n

    def finish(self) -> "SpilledWeights":
        """Close the file for writing; every name must have been given."""
        self._file.close()
        missing = [n for n in self._names if n not in self._kept and n not in self._entries]
        if missing:
            raise ValueError(f"transformed weights {missing[:5]} were never produced")
        return self

    def in_memory(self) -> list[str]:
        """The names held in memory (passed through), the others being on disk."""
        return [n for n in self._names if n in self._kept]

    def __getitem__(self, name: str) -> torch.Tensor:
        if name in self._kept:
            return self._kept[name]
        if name not in self._entries:
            raise KeyError(name)
        if not self._file.closed:
            self._file.flush()
        return read_tensor(self.path, self._entries[name], 0)

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def __contains__(self, name: object) -> bool:
        return name in self._kept or name in self._entries
