"""``lora_merge``: fold a LoRA adapter into the base weights.

For every module ``M`` of a PEFT adapter (``lora_common``) with ``A [r, in]``, ``B [out, r]`` and scale ``s``
(``alpha / r``; rsLoRA ``alpha / sqrt(r)``)::

    W' = W + s (B A)

computed as PEFT's ``merge_and_unload`` computes it (``W + (B @ A) * s`` in float32), so a merged float layer holds
PEFT's merged weight bit for bit and the graph stays the same size. On a float ``aten.linear`` the merge is exact.

On a layer a quantizer already turned into ``llmpress::wq_linear`` (bits ``b``, group ``g``, symmetric or not) the
pass dequantizes, merges and requantizes with round-to-nearest on the same bits, group and grid kind (``quantize``'s
grid, see ``quant_common``; the layout and the op's arguments do not change)::

    W_hat = dequant(q, s, z);   W' = W_hat + s_lora (B A);   q', s', z' = RTN_{b,g}(W')

That is lossy, and the loss is reported per layer in ``stats["layers"]``: ``rel_error = ||W' - dequant(q')|| /
||W'||`` (the requantization error) and ``delta_error = ||(dequant(q') - W_hat) - s_lora B A|| / ||s_lora B A||``
(how much of the adapter's update the 4-bit grid failed to keep: a LoRA update is often smaller than a 4-bit step,
and then most of it rounds away; ``lora_attach`` keeps it exactly instead). Merging before the quantizer
(``lora_merge(adapter=DIR),gptq(...)``) avoids the double rounding.

Order: before ``fuse_qkv``/``fuse_gate_up`` (``forbids``; merging first then fusing is exact, and the fused layer
no longer has a ``q_proj`` to merge into); before ``factorize`` (a factorized layer is reported as such). A layer
whose weight is also read elsewhere (tied) gets its own merged copy; the other readers keep the original. A layer
that already holds this adapter (compression metadata), merged or attached by ``lora_attach``, is skipped with the
reason, so a second run changes nothing.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.fx as fx

from ..ir.meta import compression, set_compression, source_path
from ..ir.module import Module
from ..ir.ops.wq_linear import dequantize, pack_weight, wq_args
from .base import Pass, PassContext, PassResult
from .lora_common import WQ_LINEAR, LoraLayer, LoraOptions, plan_lora
from .quant_common import SPARSITY_KEYS, QuantizedWeight, relative_error, rtn_quantize

__all__ = ["LoraMerge", "LoraMergeOptions"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoraMergeOptions(LoraOptions):
    pass_name: ClassVar[str] = "lora_merge"


def _store(module: Module, owners: list[fx.Node], wnode: fx.Node, tensor: torch.Tensor) -> None:
    """Make ``owners`` read ``tensor`` where they read the weight placeholder ``wnode``: in place when nobody else
    reads it, else through a fresh weight (a tied weight's other readers keep the original)."""
    if set(wnode.users) <= set(owners):
        module.set_weight(wnode, tensor)
        return
    name = module.weight_name(wnode)
    new = module.add_weight(module.fresh_weight_name(name.replace(".weight", "") + ".lora_merged"
                                                     + (".weight" if name.endswith(".weight") else "")), tensor)
    for n in owners:
        n.replace_input_with(wnode, new)


def _is_wq(node: fx.Node) -> bool:
    return getattr(node.target, "name", lambda: "")() == WQ_LINEAR


class LoraMerge(Pass):
    name: ClassVar[str] = "lora_merge"
    Options: ClassVar[type[LoraMergeOptions]] = LoraMergeOptions
    forbids: ClassVar[frozenset[str]] = frozenset({"qkv_fused", "gate_up_fused"})  # the q/k/v layers are gone

    def run(self, module: Module, ctx: PassContext) -> PassResult:
        o: LoraMergeOptions = self.options
        o.validate()
        plan = plan_lora(module, o.adapter, pass_name=self.name)  # every check before any edit
        adapter, pairs, tag, attached = plan.adapter, plan.pairs, plan.tag, plan.attached
        skipped: list[tuple[str, str]] = []
        # One merge per stored weight: a module called twice shares its weight placeholder.
        groups: dict[fx.Node, tuple[LoraLayer, list[fx.Node]]] = {}
        for node, layer in pairs:
            path = source_path(node) or node.name
            if tag in ((compression(node) or {}).get("lora") or {}).get("adapters", []):
                skipped.append((path, "already holds this adapter (lora_merge ran before)"))
                continue
            if tag in attached.get(path, ()):
                skipped.append((path, "already has this adapter as a lora_attach branch; merging too would apply "
                                      "it twice"))
                continue
            key = wq_args(node.args, node.kwargs)["qweight"] if _is_wq(node) else node.args[1]
            groups.setdefault(key, (layer, []))[1].append(node)
        layers: dict[str, dict] = {}
        it = list(groups.items())
        if ctx.progress and it:
            from tqdm import tqdm

            it = tqdm(it, desc="lora_merge", unit="layer", leave=False)
        with torch.no_grad():
            for key, (layer, nodes) in it:
                info = self._merge_quantized(module, nodes, layer) if _is_wq(nodes[0]) else \
                    self._merge_float(module, nodes, layer)
                info.update({"rank": layer.rank, "alpha": layer.alpha, "scale": layer.scale})
                for node in nodes:
                    spec = dict(compression(node) or {})
                    record = dict(spec.get("lora") or {})
                    record["adapters"] = [*record.get("adapters", []), tag]
                    if not _is_wq(node):
                        # A float layer is dense again: an earlier sparsify record no longer describes it.
                        earlier = spec.get("pass")
                        spec = {k: v for k, v in spec.items() if k not in ("pass", *SPARSITY_KEYS)}
                        spec.update({"pass": self.name, **({"after": earlier} if earlier else {})})
                        if earlier == "sparsify":
                            info["note"] = "was sparsified; the merged weight is dense"
                    spec["lora"] = record
                    set_compression(node, spec)
                layers[source_path(nodes[0]) or nodes[0].name] = info
        if layers:
            module.recompile()
        quantized = {p: v for p, v in layers.items() if "rel_error" in v}
        log.info("lora_merge: %d layers from %s (%d requantized), skipped %d", len(layers), adapter.folder,
                 len(quantized), len(skipped))
        stats = {"merged": len(layers), "requantized": len(quantized), "adapter": str(adapter.folder),
                 "rslora": adapter.use_rslora, "skipped": skipped, "layers": layers}
        if quantized:
            errs = [v["rel_error"] for v in quantized.values()]
            kept = [v["delta_error"] for v in quantized.values()]
            stats["requant_rel_error_max"] = max(errs)
            stats["requant_delta_error_mean"] = sum(kept) / len(kept)
            stats["requant"] = (f"{len(quantized)} quantized layer(s) dequantized, merged and requantized (RTN, same "
                                f"bits/group): weight error up to {max(errs):.4f} relative; on average "
                                f"{100 * sum(kept) / len(kept):.0f}% of the adapter's update lost to rounding")
        if not layers:
            stats = {"reason": "every adapted layer already holds this adapter", **stats}
        return PassResult(module, bool(layers), stats)

    def _merge_float(self, module: Module, nodes: list[fx.Node], layer: LoraLayer) -> dict:
        wnode = nodes[0].args[1]
        w = module.weight(wnode)
        delta = layer.delta()
        _store(module, nodes, wnode, (w.float() + delta).to(w.dtype))
        return {"base": "linear", "delta_rel": relative_error(w, w.float() + delta)}

    def _merge_quantized(self, module: Module, nodes: list[fx.Node], layer: LoraLayer) -> dict:
        a = wq_args(nodes[0].args, nodes[0].kwargs)
        bits, group = a["bits"], a["group_size"]
        qw, sc, zp = (module.weight(a[k]) if a[k] is not None else None for k in ("qweight", "scales", "zeros"))
        sym = zp is None
        w_hat = dequantize(qw, sc, zp, bits, group)
        delta = layer.delta()
        merged = w_hat + delta
        q, scales, zeros = rtn_quantize(merged, bits, group, sym)
        new_hat = QuantizedWeight(q, scales, zeros, bits, group).dequantize()
        _store(module, nodes, a["qweight"], pack_weight(q, bits, sym=sym))
        _store(module, nodes, a["scales"], scales.to(sc.dtype).contiguous())
        if not sym:
            _store(module, nodes, a["zeros"], (zeros.round().to(torch.uint8) if zp.dtype == torch.uint8
                                               else zeros.to(zp.dtype)).contiguous())
        dn = float(torch.linalg.norm(delta))
        return {"base": "wq_linear", "bits": bits, "group": group, "sym": sym, "method": "rtn",
                "rel_error": relative_error(merged, new_hat),
                "delta_error": float(torch.linalg.norm(new_hat - w_hat - delta)) / dn if dn > 0 else 0.0}
