"""The one small error hierarchy of llmpress.

Every error a user can cause (bad pipeline text, an unsupported op, a damaged artifact) is an
``LlmpressError`` subclass whose message says what is wrong and where.
"""
from __future__ import annotations

__all__ = [
    "LlmpressError",
    "ConfigError",
    "PipelineSyntaxError",
    "UnsupportedOpError",
    "PassError",
    "ArtifactError",
    "LoadError",
]


class LlmpressError(Exception):
    """Base class of every error llmpress raises on purpose."""


class ConfigError(LlmpressError, ValueError):
    """An option, recipe or argument is invalid (wrong type, out of range, unknown name)."""


class PipelineSyntaxError(ConfigError):
    """Pipeline text that does not parse; points at the column with a caret.

    ``column`` is 1-based, as editors count.
    """

    def __init__(self, message: str, text: str, column: int) -> None:
        self.message = message
        self.text = text
        self.column = column
        caret = " " * max(column - 1, 0) + "^"
        super().__init__(f"{message} (column {column})\n  {text}\n  {caret}")


class UnsupportedOpError(LlmpressError):
    """A model contains an op that a frontend or backend cannot handle.

    ``op`` names the operator, ``where`` the node and/or the source line of the model.
    """

    def __init__(self, message: str, *, op: str = "", where: str = "") -> None:
        self.op = op
        self.where = where
        super().__init__(message)


class PassError(LlmpressError):
    """A pass failed; the message names the pass and those that ran before it."""


class ArtifactError(LlmpressError):
    """An artifact on disk is damaged, truncated, or built for another target."""


class LoadError(LlmpressError):
    """A model file or folder cannot be loaded; the message names the file and the problem."""
