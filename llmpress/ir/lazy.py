"""Lazy weights: a checkpoint tensor named, not read, until a pass asks for it.

A ``LazyTensor`` says where one of our float32 weights comes from: a safetensors file, the checkpoint tensor's
header entry, and whether ours is its transpose (``ir.linear_form`` stores a ``Conv1D`` weight transposed).
``load()`` reads that one tensor (``safetensors_io.read_tensor``: plain file I/O, no memory map left behind) and
returns

    W = float32(T^t if transposed else T)

exactly what the eager loader computes, so a lazily loaded model rewrites to the same bits.

``fake_parameters(model, sources)`` replaces the named parameters of a module built on the meta device by CPU
``FakeTensor`` parameters (shape and dtype, no storage): ``torch.export`` captures them like real ones (a meta
parameter would not mix with the model's CPU buffers), and ``ir.Module`` keeps ``sources`` beside its store
(``Module.weight`` loads one on demand; ``Module.materialize`` all of them, when something needs every weight).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Mapping

import torch

from ..safetensors_io import DTYPES, read_tensor

__all__ = ["LazyTensor", "fake_parameters", "read_parameters", "LAZY_ATTR"]

#: The attribute under which a loader leaves its lazy sources on the module it built (``capture`` reads it).
LAZY_ATTR = "_llmpress_lazy_sources"


@dataclass(frozen=True)
class LazyTensor:
    """Where one float32 weight of ``shape`` is read from (see the module docstring)."""

    path: str
    tensor: str          # the checkpoint's name for it
    entry: tuple         # (dtype code, shape, begin, end) of the safetensors header entry
    data_start: int
    shape: tuple[int, ...]
    transposed: bool = False

    @property
    def stored_dtype(self) -> torch.dtype:
        return DTYPES[self.entry[0]]

    def transposed_view(self) -> "LazyTensor | None":
        """The source of this 2-D weight transposed (``load()`` then gives ``W^t``), or None if it is not 2-D."""
        if len(self.shape) != 2:
            return None
        return replace(self, transposed=not self.transposed, shape=(self.shape[1], self.shape[0]))

    def load(self) -> torch.Tensor:
        code, shape, begin, end = self.entry
        t = read_tensor(Path(self.path), {"dtype": code, "shape": list(shape), "data_offsets": [begin, end]},
                        self.data_start)
        t = t.to(torch.float32)
        if self.transposed:
            t = t.t()
        t = t.contiguous()
        if tuple(t.shape) != tuple(self.shape):  # the loader checked the header; a changed file shows here
            raise ValueError(f"{self.path}: tensor {self.tensor} now gives shape {tuple(t.shape)}, expected "
                             f"{tuple(self.shape)} (the file changed since it was loaded)")
        return t


def fake_parameters(model: torch.nn.Module, sources: Mapping[str, LazyTensor]) -> None:
    """Give every parameter of ``model`` named in ``sources`` a float32 CPU ``FakeTensor`` of its shape, in place
    (a parameter object shared by two names, a tied embedding, stays shared)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = FakeTensorMode(allow_non_fake_inputs=True)

    def fake(src: LazyTensor, p: torch.nn.Parameter) -> torch.nn.Parameter:
        with mode:
            t = torch.empty(src.shape, dtype=torch.float32, device="cpu")
        return torch.nn.Parameter(t, requires_grad=False)

    _replace_parameters(model, sources, fake)


def read_parameters(model: torch.nn.Module, sources: Mapping[str, LazyTensor]) -> None:
    """Read every parameter of ``model`` named in ``sources`` from its checkpoint tensor (float32), in place: the
    eager counterpart of ``fake_parameters`` (each tensor read once; tied names stay one parameter)."""
    _replace_parameters(model, sources,
                        lambda src, p: torch.nn.Parameter(src.load(), requires_grad=p.requires_grad))


def _replace_parameters(model: torch.nn.Module, sources: Mapping[str, LazyTensor], make) -> None:
    """Set each parameter named in ``sources`` to ``make(source, old parameter)``, once per parameter object."""
    done: dict[int, torch.nn.Parameter] = {}
    for name, p in list(model.named_parameters(remove_duplicate=False)):
        if name not in sources:
            continue
        if id(p) not in done:
            done[id(p)] = make(sources[name], p)
        owner, _, attr = name.rpartition(".")
        setattr(model.get_submodule(owner), attr, done[id(p)])
