"""Named pipelines ("presets"): pipeline text under a short name, expanded in place by ``pipeline.build``.

A preset takes no options; write the pipeline out (``llmpress compile --pipeline "..."``) to change one. Presets may
name other presets. Every preset here is parsed and built by the tests.
"""
from __future__ import annotations

__all__ = ["PRESETS"]

PRESETS: dict[str, str] = {
    # Rewrites whose outputs equal the input graph's within fp32 rounding.
    "exact": "fold_constants,fuse_qkv,dce",
    # Every exact fusion (DESIGN.md's example pipeline starts with "fuse"); grows as fusion passes land.
    "fuse": "fuse_qkv",
}
