"""The backend contract.

A backend lowers an ``ir.Module`` for a target and gives back a ``Compiled`` program that follows the module's
calling convention (for LMs, ``forward(input_ids, start_pos, *caches) -> (logits, *caches)``; see
``llmpress.ir.capture_hf``), can write its payload files into an artifact folder, and can be loaded back from one.

Backends are picked through a dict (``llmpress.backends.get_backend``), never an ``if target == ...`` chain.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Mapping

from ..errors import ConfigError
from ..ir.module import Module

__all__ = ["Backend", "Compiled", "Unsupported"]


@dataclass(frozen=True)
class Unsupported:
    """One node a backend cannot lower: the op, the node, and the model source line that produced it."""

    op: str
    node: str
    source_line: str
    reason: str = ""

    def __str__(self) -> str:
        where = f" at {self.source_line}" if self.source_line else ""
        why = f": {self.reason}" if self.reason else ""
        return f"{self.op} (node {self.node}){where}{why}"


class Compiled:
    """A lowered program. Subclasses implement ``forward``, ``save_payload`` and ``target_json``."""

    backend: ClassVar[str] = ""

    def forward(self, *inputs: Any) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    def __call__(self, *inputs: Any) -> Any:
        return self.forward(*inputs)

    def forward_last(self, *inputs: Any) -> Any:
        """``forward`` for generation: an LM may return the logits of the last position only (``[B, 1, V]``),
        all that greedy decoding reads (``TVMCompiled`` runs its ``prefill_last`` function)."""
        return self.forward(*inputs)

    def target_json(self) -> dict:
        """The target as recorded in the manifest (``{"name": "cpu", "spec": {...}, "arch": "x86_64"}``)."""
        raise NotImplementedError

    def save_payload(self, folder: Path) -> dict:
        """Write this program's files into ``folder`` (a temporary folder the artifact renames when complete);
        return the JSON-able ``payload`` section of the manifest (which files, what roles)."""
        raise NotImplementedError

    def tokenizer_payload(self, tokenizer: Any, folder: Path) -> dict:
        """Extra tokenizer files a non-Python runner needs, written into ``folder``; returns manifest entries."""
        return {}

    def set_threads(self, threads: int | None) -> None:
        """Run on ``threads`` CPU threads (None: the backend's default, every core the process may use for TVM).
        Backends without a thread setting of their own ignore it."""

    @property
    def runnable_here(self) -> bool:
        return True


class Backend:
    name: ClassVar[str] = ""
    #: The options ``with_options`` takes (``compile(backend_options=...)``, ``llmpress compile --backend-option``)
    #: -> what each does; empty: none.
    OPTIONS: ClassVar[dict[str, str]] = {}

    def with_options(self, options: Mapping[str, Any] | None) -> "Backend":
        """This backend configured by ``options`` (a new instance; ``self`` when there are none). An unknown name or
        a bad value is a ``ConfigError`` naming it and what is accepted."""
        if not options:
            return self
        unknown = [k for k in options if k not in self.OPTIONS]
        if unknown:
            takes = (f"it takes {', '.join(sorted(self.OPTIONS))}" if self.OPTIONS else "it takes none")
            raise ConfigError(f"backend option(s) {', '.join(map(repr, unknown))} unknown to the {self.name} backend "
                              f"({takes})")
        return self._configured(dict(options))

    def _configured(self, options: dict[str, Any]) -> "Backend":  # pragma: no cover - only backends with OPTIONS
        raise NotImplementedError

    def supports(self, target: Any) -> bool:  # pragma: no cover - abstract
        raise NotImplementedError

    def check(self, module: Module, target: Any) -> list[Unsupported]:
        """Every node this backend cannot lower for ``target``, found before any work starts."""
        return []

    def lower(self, module: Module, target: Any, *, progress: bool = True) -> Compiled:  # pragma: no cover
        raise NotImplementedError

    def load(self, folder: Path, manifest: dict) -> Compiled:  # pragma: no cover - abstract
        """Rebuild the program from an artifact folder whose hashes were already verified. Raise
        ``ArtifactError`` if it cannot run on this machine (wrong architecture, no GPU)."""
        raise NotImplementedError
