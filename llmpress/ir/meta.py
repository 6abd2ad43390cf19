"""Typed accessors for the metadata llmpress keeps on FX nodes.

Passes read ``source_path(node)`` and ``node_id(node)`` rather than poking at ``node.meta`` strings.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch.fx as fx

__all__ = ["source_path", "set_source_path", "node_id", "set_node_id", "source_line", "compression", "set_compression", "LMInfo"]

_ID = "llmpress_id"
_COMPRESSION = "llmpress_compression"


def source_path(node: fx.Node) -> str:
    """Dotted path of the innermost ``nn.Module`` that produced ``node`` (``model.layers.0.self_attn.q_proj``),
    or ``""`` for nodes made outside any submodule."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return node.meta.get("llmpress_source", "")
    path = list(stack.values())[-1][0]
    # torch.export spells ModuleList indices as "layers.0" but sometimes as "layers[0]" / "L['self']..." forms.
    return path.replace("[", ".").replace("]", "").replace("L['self'].", "")


def set_source_path(node: fx.Node, path: str) -> None:
    """Give ``node`` the source path ``path`` (a new child of its module, e.g. a factor or an adapter branch): as a
    module stack entry when the node has a stack, so ``source_path`` and include/exclude globs see it."""
    stack = dict(node.meta.get("nn_module_stack") or {})
    if stack:
        stack[f"L__self__{path}"] = (path, "torch.nn.modules.linear.Linear")
        node.meta["nn_module_stack"] = stack
    else:
        node.meta["llmpress_source"] = path


def node_id(node: fx.Node) -> str:
    """Stable id of a node: assigned at capture, kept through rewrites (new nodes get fresh ids)."""
    return node.meta.get(_ID, "")


def set_node_id(node: fx.Node, value: str) -> None:
    node.meta[_ID] = value


def source_line(node: fx.Node) -> str:
    """``file:line`` of the model code that produced ``node`` (last frame of its stack trace), or ``""``."""
    trace = node.meta.get("stack_trace") or ""
    lines = [ln.strip() for ln in trace.strip().splitlines() if ln.strip().startswith("File ")]
    if not lines:
        return ""
    last = lines[-1]  # File "x.py", line 12, in forward
    try:
        file_part, line_part = last.split(", line ")[:2]
        return f"{file_part[len('File '):].strip(chr(34))}:{line_part.split(',')[0]}"
    except ValueError:
        return last


def compression(node: fx.Node) -> dict[str, Any] | None:
    """What a pass did to this node (e.g. ``{"pass": "quantize", "bits": 4, ...}``), or None."""
    return node.meta.get(_COMPRESSION)


def set_compression(node: fx.Node, spec: dict[str, Any]) -> None:
    node.meta[_COMPRESSION] = dict(spec)


@dataclass(frozen=True)
class LMInfo:
    """The calling convention of a captured causal LM (see ``llmpress.ir.capture_hf``).

    ``forward(input_ids[B,T], start_pos[1], *caches) -> (logits, *caches')``.

    ``caches`` lists the cache tensors in call order, each ``{"name", "shape", "dtype"}`` with ``shape`` without the
    batch dimension; empty means the float layout ``k_0, v_0, k_1, ...`` of ``[n_kv_heads, cache_len, head_dim]``
    ``cache_dtype`` tensors. Passes that change the layout (``kv_quant(storage="int8")``: int8 codes + float32
    scales) set it, and every runner allocates its caches from :meth:`cache_specs`, zero-filled.
    """

    n_layers: int
    n_kv_heads: int
    head_dim: int
    cache_len: int
    vocab_size: int
    bos_id: int = 1
    eos_id: int = 2
    cache_dtype: str = "float32"
    caches: tuple = ()
    extra: dict = field(default_factory=dict)
    eos_ids: tuple = ()  # every end-of-sequence id (config + generation_config); () means just ``eos_id``

    def stop_ids(self) -> tuple[int, ...]:
        """Tokens that end greedy generation: every EOS id, then BOS (llama2.c's rule: BOS starts a new story);
        a negative id (a model without BOS) is none."""
        ids = [*(self.eos_ids or (self.eos_id,)), self.bos_id]
        return tuple(dict.fromkeys(int(i) for i in ids if int(i) >= 0))

    def cache_specs(self) -> list[dict]:
        """``[{"name": "k_0", "shape": [n_kv_heads, cache_len, head_dim], "dtype": "float32"}, ...]`` in call order."""
        if self.caches:
            return [dict(c) for c in self.caches]
        shape = [self.n_kv_heads, self.cache_len, self.head_dim]
        return [{"name": f"{kv}_{i}", "shape": list(shape), "dtype": self.cache_dtype}
                for i in range(self.n_layers) for kv in ("k", "v")]

    def cache_bytes(self, batch: int = 1) -> int:
        """Bytes the KV cache takes for ``batch`` sequences."""
        import torch

        return sum(batch * math.prod(c["shape"]) * getattr(torch, c["dtype"]).itemsize for c in self.cache_specs())

    def to_json(self) -> dict:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        d["caches"] = [dict(c) for c in self.caches]
        d["eos_ids"] = list(self.eos_ids)
        return d

    @classmethod
    def from_json(cls, d: dict) -> "LMInfo":
        d = dict(d)
        d["caches"] = tuple(dict(c) for c in d.get("caches") or ())
        d["eos_ids"] = tuple(int(i) for i in d.get("eos_ids") or ())
        return cls(**d)
