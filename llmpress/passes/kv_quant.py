"""``kv_quant``: int8 keys and values in the KV cache, stored as int8 codes + one float32 scale per vector.

Matched structurally: every ``aten.scatter.src(cache, dim, index, src)`` whose ``cache`` operand is a user input of
the graph -- the write of the new keys/values into the cache in the KV-cache calling convention of
``llmpress.ir.capture_hf``. Symmetric absmax quantization per (batch, head, token) vector (``llmpress.ir.ops.kv_quant``)::

    s[b, h, t] = max_d |src[b, h, t, d]| / 127          codes[b, h, t, :] = clamp(round(src[b, h, t, :] / s), -127, 127)

``storage="int8"`` (default) changes the calling convention: the cache input ``k_i`` (float ``[B, H, L, D]``)
becomes two inputs, ``k_i`` int8 codes ``[B, H, L, D]`` and ``k_i_scale`` float32 ``[B, H, L, 1]``, and so do the
outputs; the rewrite is::

    s       = kv_scale(src)              codes' = scatter(codes, dim, index, kv_codes(src, s))
    scales' = scatter(scales, dim, index[..., :1], s)                  reads of the cache -> kv_dequant(codes', scales')

so the cache memory drops from ``4 D`` to ``D + 4`` bytes per (token, head) (3.6x for D = 32), every backend and
runner allocates it from ``module.lm.cache_specs()``, and attention reads ``codes * s``.
``storage="float"`` keeps the float cache and writes ``kv_fake_quant(src)`` into it: the same numbers without the
memory saving (for a runtime that cannot take int8 caches).

This is the KV-cache part of the int8 KV schemes of LLM.int8-era serving stacks (e.g. FlexGen, Sheng et al. 2023;
KIVI, Liu et al. 2024, for what lower widths need). Only ``bits=8`` is offered: per-token absmax at 4 bits loses too
much on keys, whose outliers sit in fixed channels (KIVI quantizes keys per channel in groups), which needs grouped
scales and another layout.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.fx as fx

from ..errors import ConfigError
from ..ir.meta import set_compression, source_path
from ..ir.module import Module, VerifyError
from ..ir.ops import kv_quant as _kv_ops  # noqa: F401 - registers torch.ops.llmpress.kv_*
from .base import Pass, PassContext, PassOptions, PassResult

__all__ = ["KVQuant", "KVQuantOptions"]

log = logging.getLogger(__name__)

_SCATTER = torch.ops.aten.scatter.src
_SLICE = torch.ops.aten.slice.Tensor
_OPS = torch.ops.llmpress
_STORAGES = ("int8", "float")
# what a quantized cache write stores: fake-quantized values, int8 codes, or their scales
_QUANTIZED = (_OPS.kv_fake_quant.default, _OPS.kv_codes.default, _OPS.kv_scale.default)


@dataclass(frozen=True)
class KVQuantOptions(PassOptions):
    """``bits``: width of the cached keys/values (8 only, see the module docstring).
    ``storage``: "int8" (codes + scales in the calling convention) or "float" (fake-quantized float cache)."""

    bits: int = 8
    storage: str = "int8"

    def validate(self) -> None:
        if self.bits != 8:
            raise ConfigError(
                f"pass 'kv_quant': bits={self.bits} is not supported; only bits=8 is. Per-token absmax "
                "quantization below 8 bits loses too much on keys, whose outliers sit in fixed channels: it needs "
                "per-channel grouped key scales (KIVI), which this pass does not implement yet")
        if self.storage not in _STORAGES:
            raise ConfigError(f"pass 'kv_quant': storage={self.storage!r} is not one of {', '.join(_STORAGES)}")


class KVQuant(Pass):
    name: ClassVar[str] = "kv_quant"
    Options: ClassVar[type[KVQuantOptions]] = KVQuantOptions
    establishes: ClassVar[frozenset[str]] = frozenset({"kv_quantized"})

    def run(self, module: Module, ctx: PassContext) -> PassResult:
        o: KVQuantOptions = self.options
        o.validate()
        writes, skipped = _cache_writes(module)
        caches: dict[str, dict] = {}
        specs = module.lm.cache_specs() if module.lm is not None else None
        users = module.user_inputs()
        for n in writes:
            cache = n.args[0]
            shape = tuple(int(d) for d in cache.meta["val"].shape)  # [B, H, cache_len, head_dim]
            f32 = math.prod(shape) * cache.meta["val"].element_size()
            int8 = math.prod(shape) + 4 * math.prod(shape[:-1])  # codes + one float32 scale per vector
            name = cache.name
            if specs is not None:
                i = users.index(cache) - 2
                name = specs[i]["name"]
            caches[name] = {"bits": o.bits, "shape": list(shape), "bytes_f32": f32, "bytes_int8": int8,
                            "source": source_path(n)}
            meta = {"pass": self.name, "bits": o.bits, "method": "per-token-head absmax", "cache": name,
                    "storage": o.storage, "cache_bytes_before": f32,
                    "cache_bytes_after": int8 if o.storage == "int8" else f32}
            if o.storage == "float":
                q = module.call(_OPS.kv_fake_quant.default, (n.args[3], o.bits), like=n)
                n.replace_input_with(n.args[3], q)
                set_compression(q, meta)
            else:
                _store_int8(module, n, o.bits, meta)
        if writes and o.storage == "int8" and module.lm is not None:
            module.lm = dataclasses.replace(module.lm, caches=tuple(_int8_specs(module, specs, caches)))
        if writes:
            module.recompile()
        log.info("kv_quant: %d caches to int%d (%s storage), skipped %d scatters", len(writes), o.bits, o.storage,
                 len(skipped))
        before = sum(c["bytes_f32"] for c in caches.values())
        after = sum(c["bytes_int8"] for c in caches.values()) if o.storage == "int8" else before
        stats = {"quantized": len(writes), "skipped": skipped, "storage": o.storage, "caches": caches,
                 "cache_bytes_before": before, "cache_bytes_after": after, "cache_bytes_saved": before - after}
        return PassResult(module, bool(writes), stats)


def _cache_writes(module: Module) -> tuple[list[fx.Node], list[tuple[str, str]]]:
    """The float cache writes to quantize, and the scatters left alone with why."""
    cache_inputs = set(module.user_inputs())
    writes, skipped = [], []
    for n in module.graph.nodes:
        if n.op != "call_function" or n.target is not _SCATTER:
            continue
        path = source_path(n) or n.name
        cache, dim, src = n.args[0], n.args[1], n.args[3]
        if cache not in cache_inputs:
            skipped.append((path, f"scatter into {getattr(cache, 'name', cache)}, not into a cache input"))
        elif isinstance(src, fx.Node) and src.target in _QUANTIZED:
            skipped.append((path, f"{cache.name}: already quantized"))
        elif not cache.meta["val"].is_floating_point():
            skipped.append((path, f"{cache.name}: a {cache.meta['val'].dtype} cache, not a float one"))
        elif dim % cache.meta["val"].dim() == cache.meta["val"].dim() - 1:
            skipped.append((path, f"{cache.name}: written along its last axis, which the scales are taken over"))
        else:
            writes.append(n)
    return writes, skipped


def _store_int8(module: Module, write: fx.Node, bits: int, meta: dict) -> None:
    """Replace the float cache written by ``write`` with an int8 codes input + a float32 scales input (and the
    matching outputs); every read of the written cache reads ``kv_dequant(codes, scales)`` instead."""
    cache, dim, index, src = write.args[:4]
    shape = tuple(cache.meta["val"].shape)
    codes_in = module.add_input(f"{cache.name}_codes", shape, torch.int8, after=cache)
    scales_in = module.add_input(f"{cache.name}_scales", (*shape[:-1], 1), torch.float32, after=codes_in)
    s = module.call(_OPS.kv_scale.default, (src, bits), like=write)
    q = module.call(_OPS.kv_codes.default, (src, s, bits), like=write)
    codes = module.call(_SCATTER, (codes_in, dim, index, q), like=write)
    index_s = module.call(_SLICE, (index, len(shape) - 1, 0, 1), like=write)
    scales = module.call(_SCATTER, (scales_in, dim, index_s, s), like=write)
    deq = module.call(_OPS.kv_dequant.default, (codes, scales), like=write)
    for node in (s, q, codes, scales, deq):
        set_compression(node, meta)
    outputs = list(module.output_node().args[0])
    for user in list(write.users):
        if user.op != "output":
            user.replace_input_with(write, deq)
    if write in outputs:
        at = outputs.index(write)
        outputs[at:at + 1] = [codes, scales]
    module.set_outputs(outputs)
    module.erase([write])
    module.remove_input(cache)


def _int8_specs(module: Module, old: list[dict], quantized: dict[str, dict]) -> list[dict]:
    """The new cache layout: each quantized float cache becomes its codes and its scales."""
    out = []
    for c in old:
        if c["name"] in quantized:
            out.append({"name": c["name"], "shape": list(c["shape"]), "dtype": "int8"})
            out.append({"name": c["name"] + "_scale", "shape": [*c["shape"][:-1], 1], "dtype": "float32"})
        else:
            out.append(dict(c))
    n_users = len(module.user_inputs()) - 2
    if n_users != len(out):
        raise VerifyError(f"pass 'kv_quant': the graph has {n_users} cache inputs after the rewrite but the LM "
                          f"layout lists {len(out)}")
    return out
