"""Capture: turn a model into an ``ir.Module`` with ``torch.export``.

Accepted models:
- a Hugging Face ``PreTrainedModel`` causal LM (what the loaders build from Hugging Face folders and llama2.c
  checkpoints): captured through transformers' own ``StaticCache`` (``llmpress.ir.capture_hf``) with the KV-cache
  calling convention and a dynamic token count, so one graph serves prefill and decode; or refused with an error
  naming the model type and why transformers cannot export it. Given ``example_inputs``, it is captured as
  ``input_ids -> logits`` without a cache (``use_cache=False``) instead.
- a module of one's own that follows the calling convention (``forward(input_ids, start_pos, *caches) -> (logits,
  *caches)``, see ``capture_hf``) and says so with ``lm_info() -> LMInfo`` and ``example_inputs(seq_len)``:
  captured with a dynamic token count (1..``cache_len``) and its ``LMInfo``, like a transformers model.
- any other ``nn.Module``, including Hugging Face models that are not causal LMs (a BERT-style encoder called with
  ``(input_ids, attention_mask)``): its own ``forward`` on ``example_inputs``, returning what it returns (a
  ``ModelOutput`` flattened to its tensors, in field order).
- a path (Hugging Face folder, llama2.c ``.bin``, ``.onnx`` file): loaded with ``llmpress.ir.load_model`` first.

Every path ends in the IR's linear form (``ir.linear_form``): an ``addmm(b, x, W)`` on a stored ``[in, out]``
weight (GPT-2's ``Conv1D``) becomes ``aten.linear`` with ``W`` stored transposed under its own name.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import LlmpressError, UnsupportedOpError
from .meta import LMInfo
from .module import Module

__all__ = ["capture", "lm_info"]

log = logging.getLogger(__name__)


class _LogitsOnly(nn.Module):
    """Hugging Face causal LM seen as ``input_ids -> logits`` (no cache objects cross the export boundary)."""

    def __init__(self, hf: nn.Module) -> None:
        super().__init__()
        self.hf = hf

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.hf(input_ids=input_ids, use_cache=False).logits


def lm_info(model: nn.Module) -> LMInfo | None:
    """The ``LMInfo`` a module following the calling convention reports (a module of one's own, an imported ONNX
    decoder with a static cache, ``PastKVDecoder``, or a transformers LM, ``HFStaticCacheLM``); None otherwise."""
    if callable(getattr(model, "lm_info", None)):
        return model.lm_info()
    return None


def capture(model: Any, example_inputs: tuple | None = None, *, dynamic: bool | Any = True,
            info: dict | None = None) -> Module:
    """Export ``model`` into an ``ir.Module``.

    ``dynamic``: True makes the sequence dimension (dim 1 of the first input) dynamic for language models; False
    exports static shapes; anything else is passed to ``torch.export`` as ``dynamic_shapes``.
    """
    info = dict(info or {})
    if isinstance(model, (str, Path)):
        from .loaders import load_model

        loaded = load_model(model, lazy=True)  # weights read one at a time, when a pass asks (ir.lazy)
        info.setdefault("source", str(model))
        return capture(loaded.model, example_inputs, dynamic=dynamic, info=info)
    if not isinstance(model, nn.Module):
        raise LlmpressError(f"capture() takes an nn.Module or a model path, not {type(model).__name__}")
    model = model.eval()
    from .capture_hf import HFStaticCacheLM, capture_hf

    if isinstance(model, HFStaticCacheLM) or (example_inputs is None and _is_hf_causal_lm(model)):
        if dynamic not in (True, False):
            raise LlmpressError("capture(): a transformers causal LM takes dynamic=True or False (its token count)")
        return capture_hf(model, info=info, dynamic=dynamic)
    lm = lm_info(model)
    if lm is not None and not hasattr(model, "dynamic_shapes"):  # the calling convention, a module of one's own
        if example_inputs is None:
            example_inputs = model.example_inputs(seq_len=8)
        ds = None
        if dynamic is True:
            seq = torch.export.Dim("seq", min=1, max=lm.cache_len)
            ds = ({1: seq}, None, tuple(None for _ in example_inputs[2:]))
        elif dynamic is not False:
            ds = dynamic
        return _export(model, tuple(example_inputs), ds, lm=lm, info=info)
    if example_inputs is None and hasattr(model, "dynamic_shapes") and hasattr(model, "example_inputs"):
        # An imported ONNX graph knows its own example inputs and which dims are symbolic.
        example_inputs = model.example_inputs()
        dynamic = (model.dynamic_shapes() or False) if dynamic is True else dynamic
    if _is_hf_causal_lm(model):  # with example_inputs: input_ids -> logits, no cache
        model = _LogitsOnly(model)
    if example_inputs is None:
        raise LlmpressError(f"capture() needs example_inputs for a {type(model).__name__}")
    example_inputs = tuple(example_inputs)
    ds = None
    if dynamic is True:
        first = example_inputs[0]
        # Token ids ([batch, seq] integers) get a dynamic sequence length, and so does every other integer input of
        # the same shape (an attention mask, token type ids); Dim.AUTO lets export keep it static where the model's
        # code needs that, instead of failing. Float inputs keep their shapes.
        if isinstance(first, torch.Tensor) and not first.is_floating_point() and first.dim() >= 2:
            def seq_dim(x: Any) -> Any:
                same = (isinstance(x, torch.Tensor) and not x.is_floating_point() and x.shape == first.shape)
                return {1: torch.export.Dim.AUTO} if same else None

            ds = tuple(seq_dim(x) for x in example_inputs)
    elif dynamic is not False:
        ds = dynamic
    return _export(model, example_inputs, ds, lm=lm, info=info)


def _is_hf_causal_lm(model: nn.Module) -> bool:
    """A Hugging Face model of one of transformers' causal-LM classes (its own table, so new architectures count);
    encoders and other heads keep their own forward."""
    try:
        from transformers import PreTrainedModel
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    except ImportError:  # transformers is a dependency, but keep capture usable without it
        return False
    return isinstance(model, PreTrainedModel) and type(model).__name__ in set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())


def _export(model: nn.Module, example_inputs: tuple, dynamic_shapes: Any, *, lm: LMInfo | None, info: dict) -> Module:
    try:
        with torch.no_grad():
            ep = torch.export.export(model, example_inputs, dynamic_shapes=dynamic_shapes, strict=False)
    except torch._dynamo.exc.Unsupported as e:  # pragma: no cover - depends on the user's model
        raise UnsupportedOpError(f"torch.export could not capture {type(model).__name__}: {e}") from e
    except Exception as e:
        raise LlmpressError(f"torch.export failed on {type(model).__name__}: {type(e).__name__}: {e}") from e
    info.setdefault("model_class", type(model).__name__)
    return exported_module(ep, model, lm=lm, info=info)


def exported_module(ep: Any, model: nn.Module, *, lm: LMInfo | None, info: dict) -> Module:
    """The ``ir.Module`` of ``ep`` (exported from ``model``), as every capture path ends: the lazy sources a loader
    left on ``model`` (its fake parameters are read when a pass asks, ``ir.lazy``), identity casts dropped
    (``ir.canonical``), and ``Conv1D``-style layers (``x @ W + b``, ``W`` stored ``[in, out]``) in the IR's linear
    form (``ir.linear_form``)."""
    from .canonical import drop_identity_ops
    from .lazy import LAZY_ATTR
    from .linear_form import addmm_to_linear

    module = Module(ep, lm=lm, info=info, lazy=getattr(model, LAZY_ATTR, None))
    drop_identity_ops(module)
    addmm_to_linear(module)
    return module
