"""Passes: one rewrite per file, the pass contract (``base``), pipeline text (``pipeline``), the registry, presets,
recipes, selectors and the pass manager.

Import what you need from the submodules (``llmpress.passes.pipeline.parse``...); this package imports nothing
heavy on its own.
"""
from __future__ import annotations

__all__ = ["base", "pipeline", "registry", "presets", "recipe", "select", "manager"]
