"""LoRA adapters: reading a Hugging Face PEFT adapter folder and matching it to the linears of a graph.

An adapter folder holds ``adapter_config.json`` (``peft_type: LORA``, ``r``, ``lora_alpha``, ``use_rslora``,
``rank_pattern``, ``alpha_pattern``, ``target_modules``, ...) and ``adapter_model.safetensors`` with, per adapted
module ``M`` (``model.layers.0.self_attn.q_proj``), the keys ``base_model.model.M.lora_A.weight`` (``A [r, in]``)
and ``base_model.model.M.lora_B.weight`` (``B [out, r]``). The adapted layer computes::

    y = x W^T + b + s (x A^T) B^T,      s = alpha / r          (use_rslora: s = alpha / sqrt(r))

with ``r``/``alpha`` of the module taken from ``rank_pattern``/``alpha_pattern`` when a pattern matches it (PEFT's
rule: pattern ``k`` matches module ``M`` when ``M`` matches the regex ``(.*\\.)?(k)$``), else ``r``/``lora_alpha``.
``peft`` itself is not needed: both files are read here with ``json`` and ``safetensors``.

Everything is validated before any pass does work, each problem a ``ConfigError`` naming the file and the key or
module: missing files, an unsupported adapter type or feature (DoRA, ``modules_to_save``, trained biases, embedding
LoRA, ...: they change more than ``B A``), ranks that disagree between ``A``, ``B`` and the config, shapes that do
not fit the layer, and modules (or ``target_modules`` entries) that match no linear of the graph. Adapter modules are
matched to graph nodes by the source-module path the IR keeps per node; llmpress's Llama uses Hugging Face's module
names, so a PEFT adapter trained on the ``transformers`` model maps one to one.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.fx as fx

from ..errors import ConfigError
from ..ir.meta import compression, source_path
from ..ir.module import Module
from ..ir.ops.wq_linear import packed_in_features, wq_args
from .base import PassOptions
from .select import linear_nodes

__all__ = ["LoraPlan", "plan_lora", "LoraOptions", "LoraLayer", "LoraAdapter", "read_adapter", "match_layers", "layer_shape", "WQ_LINEAR",
           "adapter_tag", "attached_adapters"]

_LINEAR = torch.ops.aten.linear.default
WQ_LINEAR = "llmpress::wq_linear"
CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
_PREFIX = "base_model.model."

# Config fields that change the layer beyond ``y += s (x A^T) B^T``: refused when set (truthy / not the default).
_UNSUPPORTED = {
    "use_dora": "DoRA (weight-decomposed LoRA: a magnitude vector rescales the merged weight)",
    "modules_to_save": "modules_to_save (whole modules trained and saved beside the adapter)",
    "trainable_token_indices": "trainable_token_indices (trained embedding rows)",
    "lora_bias": "lora_bias (a trained bias on lora_B)",
    "layer_replication": "layer_replication (duplicated layers)",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens: the branch depends on the tokens)",
    "use_qalora": "QA-LoRA (pooled inputs to lora_A)",
    "target_parameters": "target_parameters (LoRA on raw parameters)",
    "megatron_config": "megatron_config (Megatron parallel linears)",
    "use_bdlora": "block-diagonal LoRA (use_bdlora)",
    "arrow_config": "Arrow routing over several adapters (arrow_config)",
}


@dataclass(frozen=True)
class LoraOptions(PassOptions):
    """``adapter``: a Hugging Face PEFT LoRA adapter folder (``adapter_config.json``, ``adapter_model.safetensors``)."""

    pass_name: ClassVar[str] = "lora"
    adapter: str = ""

    def validate(self) -> None:
        if not self.adapter:
            raise ConfigError(f"pass {self.pass_name!r}: give adapter=DIR, a PEFT LoRA adapter folder "
                              f"({CONFIG} + {WEIGHTS})")


@dataclass
class LoraLayer:
    """One adapted module: ``A [r, in]``, ``B [out, r]``, the scale ``s`` and where they came from."""

    path: str
    A: torch.Tensor
    B: torch.Tensor
    rank: int
    alpha: float
    scale: float

    def delta(self) -> torch.Tensor:
        """``s (B A)`` as float32 ``[out, in]``, in PEFT's order (``(B @ A) * s``), so a merged weight is bit for
        bit PEFT's ``merge_and_unload``."""
        return (self.B.float() @ self.A.float()) * self.scale


@dataclass
class LoraAdapter:
    folder: Path
    config: dict[str, Any]
    layers: dict[str, LoraLayer] = field(default_factory=dict)

    @property
    def use_rslora(self) -> bool:
        return bool(self.config.get("use_rslora", False))


def adapter_tag(adapter: LoraAdapter) -> str:
    """How the passes record an adapter in compression metadata: its folder, resolved."""
    return str(adapter.folder.resolve())


def attached_adapters(module: Module) -> dict[str, set[str]]:
    """Layer path -> the adapters (``adapter_tag``) ``lora_attach`` gave it a branch of."""
    out: dict[str, set[str]] = {}
    for n in module.graph.nodes:
        spec = compression(n) or {}
        if spec.get("pass") == "lora_attach" and spec.get("branch") == "A":
            out.setdefault(spec["layer"], set()).add(spec.get("adapter", ""))
    return out


def _pattern_value(patterns: dict, path: str, default: Any) -> Any:
    for key, value in patterns.items():  # PEFT's get_pattern_key: the first pattern that matches, in order
        if re.match(rf"(.*\.)?({key})$", path):
            return value
    return default


def _fail(folder: Path, what: str) -> ConfigError:
    return ConfigError(f"LoRA adapter {folder}: {what}")


def read_adapter(folder: str | Path, *, pass_name: str = "lora") -> LoraAdapter:
    """Read and check a PEFT LoRA adapter folder (see the module docstring); tensors come back as float32."""
    folder = Path(folder)
    where = f"pass {pass_name!r}: "
    if not folder.is_dir():
        raise ConfigError(f"{where}LoRA adapter folder {folder} does not exist")
    cfg_path, w_path = folder / CONFIG, folder / WEIGHTS
    if not cfg_path.is_file():
        raise ConfigError(f"{where}{_fail(folder, f'no {CONFIG} (not a PEFT adapter folder)')}")
    if not w_path.is_file():
        hint = (" (only adapter_model.bin found: save it with safe_serialization=True)"
                if (folder / "adapter_model.bin").is_file() else "")
        raise ConfigError(f"{where}{_fail(folder, f'no {WEIGHTS}{hint}')}")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{where}{cfg_path}: not valid JSON ({e})") from e
    if not isinstance(cfg, dict):
        raise ConfigError(f"{where}{cfg_path}: expected a JSON object")
    kind = cfg.get("peft_type", "LORA")
    if str(kind).upper() != "LORA":
        raise ConfigError(f"{where}{cfg_path}: peft_type {kind!r} is not supported (only LORA adapters)")
    for key, what in _UNSUPPORTED.items():
        if cfg.get(key):
            raise ConfigError(f"{where}{cfg_path}: {key}={cfg[key]!r}: {what} is not supported")
    if cfg.get("bias", "none") != "none":
        raise ConfigError(f"{where}{cfg_path}: bias={cfg['bias']!r}: trained biases are not supported "
                          "(only bias='none')")
    for key in ("r", "lora_alpha"):
        if not isinstance(cfg.get(key), (int, float)) or isinstance(cfg.get(key), bool) or cfg[key] <= 0:
            raise ConfigError(f"{where}{cfg_path}: {key} must be a positive number, got {cfg.get(key)!r}")
    rank_pattern = cfg.get("rank_pattern") or {}
    alpha_pattern = cfg.get("alpha_pattern") or {}

    from safetensors import safe_open

    try:
        handle = safe_open(str(w_path), framework="pt")
        keys = list(handle.keys())
    except Exception as e:  # SafetensorError on a truncated or corrupt file
        raise ConfigError(f"{where}{w_path}: unreadable safetensors file ({e})") from e
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key in keys:
        m = re.fullmatch(r"(.+)\.lora_([AB])(?:\.[A-Za-z0-9_]+)?\.weight", key)
        if m is None:
            raise ConfigError(f"{where}{w_path}: tensor {key!r} is not a lora_A/lora_B weight (DoRA magnitudes, "
                              "embedding LoRA, biases and saved modules are not supported)")
        path = m.group(1)[len(_PREFIX):] if m.group(1).startswith(_PREFIX) else m.group(1)
        if m.group(2) in parts.setdefault(path, {}):
            raise ConfigError(f"{where}{w_path}: module {path!r} has two lora_{m.group(2)} tensors (several "
                              "adapters in one file are not supported)")
        parts[path][m.group(2)] = handle.get_tensor(key)
    if not parts:
        raise ConfigError(f"{where}{w_path}: holds no lora_A/lora_B tensors")
    adapter = LoraAdapter(folder, cfg)
    for path, ab in parts.items():
        if set(ab) != {"A", "B"}:
            missing = ({"A", "B"} - set(ab)).pop()
            raise ConfigError(f"{where}{w_path}: module {path!r} has lora_{set(ab).pop()} but no lora_{missing}")
        A, B = ab["A"], ab["B"]
        if A.dim() != 2 or B.dim() != 2:
            raise ConfigError(f"{where}{w_path}: module {path!r}: lora_A/lora_B must be 2-D, got "
                              f"{list(A.shape)} / {list(B.shape)} (convolution LoRA is not supported)")
        r = int(_pattern_value(rank_pattern, path, cfg["r"]))
        alpha = float(_pattern_value(alpha_pattern, path, cfg["lora_alpha"]))
        if A.shape[0] != B.shape[1]:
            raise ConfigError(f"{where}{w_path}: module {path!r}: rank mismatch, lora_A {list(A.shape)} has rank "
                              f"{A.shape[0]} but lora_B {list(B.shape)} has rank {B.shape[1]}")
        if A.shape[0] != r:
            src = "rank_pattern" if r != cfg["r"] else "r"
            raise ConfigError(f"{where}{w_path}: module {path!r}: rank mismatch, the tensors have rank {A.shape[0]} "
                              f"but {CONFIG} says {src}={r}")
        scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
        adapter.layers[path] = LoraLayer(path, A.float(), B.float(), r, alpha, scale)
    return adapter


def layer_shape(module: Module, node: fx.Node) -> tuple[int, int]:
    """(out_features, in_features) of an ``aten.linear`` or ``llmpress::wq_linear`` node."""
    if node.target is _LINEAR:
        w = module.weight(node.args[1])
        return int(w.shape[0]), int(w.shape[1])
    a = wq_args(node.args, node.kwargs)
    q = module.weight(a["qweight"])
    return int(q.shape[0]), packed_in_features(q, a["bits"])


def _candidates(module: Module) -> dict[str, list[fx.Node]]:
    """Source path -> the weight linears (float or ``wq_linear``) the graph computes under it, in graph order."""
    plain = set(linear_nodes(module))
    out: dict[str, list[fx.Node]] = {}
    for n in module.graph.nodes:
        if n.op != "call_function":
            continue
        if n in plain or getattr(n.target, "name", lambda: "")() == WQ_LINEAR:
            out.setdefault(source_path(n), []).append(n)
    return out


def _fused_into(path: str, paths) -> str | None:
    """The fused layer (``fuse_qkv``/``fuse_gate_up``: ``<parent>.qkv_proj``, ``gate_up_proj``) that took in the
    module ``path``, or None."""
    parent, _, leaf = path.rpartition(".")
    stem = leaf[:-len("_proj")] if leaf.endswith("_proj") else leaf
    for p in paths:
        pp, _, pl = p.rpartition(".")
        if pp != parent or pl == leaf or not pl.endswith("_proj"):
            continue
        body = pl[:-len("_proj")]
        stems = body.split("_") if "_" in body else list(body)
        if stem in stems:
            return p
    return None


def match_layers(module: Module, adapter: LoraAdapter, *, pass_name: str) -> list[tuple[fx.Node, LoraLayer]]:
    """(graph node, adapter layer) for every call of every adapted module; a ``ConfigError`` listing every module
    that matches no linear of the graph, every shape that does not fit and every ``target_modules`` entry that
    matches nothing, before any work."""
    cands = _candidates(module)
    problems: list[str] = []
    pairs: list[tuple[fx.Node, LoraLayer]] = []
    for path, layer in adapter.layers.items():
        nodes = cands.get(path)
        if not nodes:
            fused = _fused_into(path, cands)
            if fused:
                problems.append(f"{path}: fused into {fused} by an earlier pass; run {pass_name} before "
                                "fuse_qkv / fuse_gate_up")
            elif any(p.startswith(path + ".") for p in cands):
                problems.append(f"{path}: rewritten into {', '.join(p for p in cands if p.startswith(path + '.'))}"
                                f" by an earlier pass (factorize?); run {pass_name} before it")
            else:
                problems.append(f"{path}: no linear layer of the graph has this source path")
            continue
        for node in nodes:
            out_f, in_f = layer_shape(module, node)
            if layer.A.shape[1] != in_f or layer.B.shape[0] != out_f:
                problems.append(f"{path}: lora_A {list(layer.A.shape)} / lora_B {list(layer.B.shape)} do not fit the "
                                f"layer's {out_f}x{in_f} weight")
            else:
                pairs.append((node, layer))
    targets = adapter.config.get("target_modules")
    if isinstance(targets, list):
        for t in targets:
            if not any(p == t or p.endswith("." + t) for p in cands):
                problems.append(f"target_modules entry {t!r} matches no linear layer of the graph")
    if problems:
        sample = ", ".join(sorted(p for p in cands if p)[:4])
        raise ConfigError(f"pass {pass_name!r}: LoRA adapter {adapter.folder} does not fit this model "
                          f"({len(problems)} problem(s)):\n  " + "\n  ".join(problems)
                          + f"\n(the graph's linears are named like {sample}, ...)")
    return pairs


@dataclass
class LoraPlan:
    """What both LoRA passes start from, every check done before any edit: the adapter, the (linear node, layer)
    pairs it matches, its tag, and the adapters already attached per layer path."""

    adapter: LoraAdapter
    pairs: list[tuple[fx.Node, LoraLayer]]
    tag: str
    attached: dict[str, set[str]]


def plan_lora(module: Module, folder: str | Path, *, pass_name: str) -> LoraPlan:
    adapter = read_adapter(folder, pass_name=pass_name)
    pairs = match_layers(module, adapter, pass_name=pass_name)
    return LoraPlan(adapter, pairs, adapter_tag(adapter), attached_adapters(module))
