"""``kv_quant``: int8 keys and values in the KV cache (fake-quantized before they are written).

Matched structurally: every ``aten.scatter.src(cache, dim, index, src)`` whose ``cache`` operand is a user input of
the graph -- the write of the new keys/values into the cache in the KV-cache calling convention of
``llmpress.models.llama`` -- gets ``src`` replaced by ``llmpress::kv_fake_quant(src, bits)``::

    src'[b, h, t, :] = clamp(round(src[b, h, t, :] / s), -127, 127) * s,   s = max_d |src[b, h, t, d]| / 127

so every later read of the cache (this call's attention and every later decode step) sees exactly the values an
int8 cache would hold. The cache itself stays float32 in the calling convention for now (see
``llmpress.ir.ops.kv_quant``); the stats report what storing it as int8 codes + one float32 scale per
(token, head) would save: ``4 * head_dim`` bytes per (token, head) become ``head_dim + 4``.

Only ``bits=8`` is offered: per-token absmax at 4 bits loses too much on keys, whose outliers sit in fixed
channels (KIVI quantizes keys per channel in groups); that needs grouped scales and a different layout.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.fx as fx

from ..errors import ConfigError
from ..ir.meta import set_compression, source_path
from ..ir.ops import kv_quant as _kv_ops  # noqa: F401 - registers torch.ops.llmpress.kv_fake_quant
from ..ir.module import Module
from .base import Pass, PassContext, PassOptions, PassResult

__all__ = ["KVQuant", "KVQuantOptions"]

log = logging.getLogger(__name__)

_SCATTER = torch.ops.aten.scatter.src
_KV_FAKE_QUANT = torch.ops.llmpress.kv_fake_quant.default


@dataclass(frozen=True)
class KVQuantOptions(PassOptions):
    """``bits``: width of the cached keys/values (8 only, see the module docstring)."""

    bits: int = 8

    def validate(self) -> None:
        if self.bits != 8:
            raise ConfigError(
                f"pass 'kv_quant': bits={self.bits} is not supported; only bits=8 is. Per-token absmax "
                "quantization below 8 bits loses too much on keys, whose outliers sit in fixed channels: it needs "
                "per-channel grouped key scales (KIVI), which this pass does not implement yet")


class KVQuant(Pass):
    name: ClassVar[str] = "kv_quant"
    Options: ClassVar[type[KVQuantOptions]] = KVQuantOptions
    establishes: ClassVar[frozenset[str]] = frozenset({"kv_quantized"})

    def run(self, module: Module, ctx: PassContext) -> PassResult:
        o: KVQuantOptions = self.options
        o.validate()
        op = _KV_FAKE_QUANT
        cache_inputs = set(module.user_inputs())
        writes: list[fx.Node] = []
        skipped: list[tuple[str, str]] = []
        for n in module.graph.nodes:
            if n.op != "call_function" or n.target is not _SCATTER:
                continue
            path = source_path(n) or n.name
            cache = n.args[0]
            if cache not in cache_inputs:
                skipped.append((path, f"scatter into {getattr(cache, 'name', cache)}, not into a cache input"))
                continue
            src = n.args[3]
            if isinstance(src, fx.Node) and src.target is op:
                skipped.append((path, f"{cache.name}: already quantized"))
                continue
            writes.append(n)
        caches: dict[str, dict] = {}
        bytes_f32 = bytes_int8 = 0
        for n in writes:
            cache, src = n.args[0], n.args[3]
            q = module.call(op, (src, o.bits), like=n)
            n.replace_input_with(src, q)
            shape = tuple(int(d) for d in cache.meta["val"].shape)  # [B, H, cache_len, head_dim]
            elem = int(torch.tensor(shape).prod())
            vectors = elem // shape[-1]
            f32 = elem * cache.meta["val"].element_size()
            int8 = elem + 4 * vectors  # int8 codes + one float32 scale per (batch, head, token)
            bytes_f32 += f32
            bytes_int8 += int8
            caches[cache.name] = {"bits": o.bits, "shape": list(shape), "bytes_f32": f32, "bytes_int8": int8,
                                  "source": source_path(n)}
            set_compression(q, {"pass": self.name, "bits": o.bits, "method": "per-token-head absmax",
                                "cache": cache.name, "cache_bytes_before": f32, "cache_bytes_after": int8})
        if writes:
            module.recompile()
        log.info("kv_quant: %d caches to int%d, skipped %d scatters", len(writes), o.bits, len(skipped))
        stats = {"quantized": len(writes), "skipped": skipped, "caches": caches,
                 "cache_bytes_f32": bytes_f32, "cache_bytes_int8": bytes_int8,
                 "cache_bytes_saved": bytes_f32 - bytes_int8,
                 "note": "caches stay float32 in the calling convention; bytes_int8 is what int8 storage would take"}
        return PassResult(module, bool(writes), stats)
