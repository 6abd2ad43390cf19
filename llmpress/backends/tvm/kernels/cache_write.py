"""In-place KV-cache writes: ``aten.scatter.src(cache, 2, index, src)`` on a cache *input* becomes a
``call_tir_inplace`` that stores the T new rows into the caller's cache buffer and returns that buffer.

The captured graph writes the cache functionally (``torch.scatter`` returns a new tensor), which TVM's frontend
lowers to ``scatter_elements``: a copy of the whole ``[B, H, cache_len, D]`` cache on every call, plus a second
buffer of that size alive during the call. The kernel here writes only ``B * H * T * D`` elements::

    cache[b, h, index[b, h, t, d], d] = src[b, h, t, d]          for every (b, h, t, d) of src

It is used only when that is safe: the cache is a user input of the function (never a weight) and the scatter is
its only reader, so nothing observes the old contents. The calling convention is unchanged (the updated cache is
still returned), but the cache tensors passed in are updated in place: callers must use the returned caches, which
every llmpress caller (``greedy``, ``perplexity``, the C++ runner) does. CPU targets only (the loop nest is plain
serial TIR; GPU targets keep the frontend's scatter).
"""
from __future__ import annotations

from functools import lru_cache
from typing import Any

from tvm import relax, tirx
from tvm.script import tirx as T

__all__ = ["cache_write_func", "scatter_converter"]


@lru_cache(maxsize=None)
def cache_write_func(dtype: str) -> tirx.PrimFunc:
    """``cache[b, h, index[b, h, t, d], d] = src[b, h, t, d]`` for 4-D tensors of ``dtype`` (any shapes)."""

    @T.prim_func(private=True)
    def cache_write(var_cache: T.handle, var_index: T.handle, var_src: T.handle):
        T.func_attr({"tirx.noalias": True})
        b, h, s, d, n = T.int64(), T.int64(), T.int64(), T.int64(), T.int64()
        cache = T.match_buffer(var_cache, (b, h, s, d), dtype)
        index = T.match_buffer(var_index, (b, h, n, d), "int64")
        src = T.match_buffer(var_src, (b, h, n, d), dtype)
        for i, j, t, k in T.grid(b, h, n, d):
            cache[i, j, index[i, j, t, k], k] = src[i, j, t, k]

    # opaque (op_pattern 8): FuseOps must not merge the in-place write with the kernels that produce its rows
    return cache_write.with_attrs({"tirx.is_scheduled": True, "op_pattern": 8})


def scatter_converter(cache_inputs: frozenset[str]):
    """An ``aten.scatter.src`` converter that writes in place into the user inputs named in ``cache_inputs`` and
    hands every other scatter to TVM's own converter."""

    def convert(node: Any, importer: Any) -> relax.Expr:
        cache, dim, index, src = (list(node.args) + [None] * 4)[:4]
        val = getattr(cache, "meta", {}).get("val")
        if (getattr(cache, "op", None) != "placeholder" or cache.name not in cache_inputs or len(cache.users) != 1
                or val is None or val.dim() != 4 or dim not in (2, -2) or node.kwargs
                or src.meta["val"].dtype != val.dtype or index.meta["val"].dtype.is_floating_point):
            return importer._scatter(node)
        bb = importer.block_builder
        dtype = str(val.dtype).replace("torch.", "")
        gv = bb.add_func(cache_write_func(dtype), f"llmpress_cache_write_{dtype}")
        c = importer.env[cache]
        idx = importer.env[index]
        if idx.ty.dtype != "int64":
            idx = bb.emit(relax.op.astype(idx, "int64"))
        return bb.emit(relax.call_tir_inplace(gv, [c, idx, importer.env[src]], [0], c.ty))

    return convert


