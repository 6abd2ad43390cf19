"""Generic capture of Hugging Face decoder-only LMs with the KV-cache calling convention.

Any ``PreTrainedModel`` causal LM that transformers can run with its ``StaticCache`` (what
``transformers.integrations.executorch`` exports for ExecuTorch) is captured with the signature every llmpress
backend and runner shares (``LMInfo``)::

    forward(input_ids: int64[B, T], start_pos: int64[1], k_0, v_0, ..., k_{L-1}, v_{L-1})
        -> (logits: float[B, T, V], k_0', v_0', ..., k_{L-1}', v_{L-1}')

with ``T`` dynamic (1..cache_len: prefill and one-token decode are one graph) and each cache
``float[B, n_kv_heads_i, cache_len, head_dim_i]``, the layout of transformers' ``StaticLayer``.

How (and why this way). transformers' ``TorchExportableModuleWithStaticCache`` keeps the cache as module *buffers*
mutated in place (``index_copy_``); exporting that gives a graph whose caches are hidden state (``BUFFER_MUTATION``
outputs), one program per cache, not our inputs/outputs. Lifting those buffers into user inputs afterwards means
rewriting the export signature and trusting the order of mutated buffers. Instead ``HFStaticCacheLM`` builds a
``StaticCache`` per call whose layers *are* the given tensors and whose ``update`` is functional: the new keys at
positions ``p = start_pos + arange(T)`` are scattered along the position axis (``cache'[:, :, p_t] = k[:, :, t]``,
every other slot unchanged), and the returned tensors become graph outputs. Everything else is the model's own code:
transformers computes positions from ``cache.get_seq_length()`` (= ``start_pos``), and its mask over the whole
static cache from ``get_mask_sizes`` (``key_pos <= query_pos``, plus the model's own sliding-window / chunk rule on
absolute positions), so no per-architecture code is written here. Sliding-window layers get full-length caches
(as the ExecuTorch path does); their mask still applies the window, so attention is exact at any length.

Attention: transformers' SDPA path repeats each KV head for its query group (``repeat_kv``, a copy of the whole
cache per call) and passes a ``[B, 1, T, S]`` mask, a form the backends' fused attention kernels do not take. While
exporting a model that runs with ``sdpa``, ``GQA_ATTENTION`` (registered with transformers' ``AttentionInterface``)
computes the same ``softmax(scale q k^T, masked) v`` as one ``scaled_dot_product_attention(q, k, v, mask[0, 0],
enable_gqa=True)`` over the unrepeated cache, the form the backends' attention kernels take; anything else (dropout,
soft-capping, attention sinks, a per-batch mask) goes to transformers' own SDPA function unchanged. The TVM ``cpu``
build then runs it through the fused attention kernel (with a converter for transformers' ``.to(device)`` calls,
``backends/tvm/converters._to_device``; ``benchmarks/results/capture_paths.md``).

``Conv1D`` layers (GPT-2, OpenAI GPT: ``addmm`` on an ``[in, out]`` weight in transformers' graph) are put in the
IR's linear form (``ir.linear_form``), so the passes find them as they find any ``nn.Linear``.

The model's submodules sit directly under the wrapper (``model.layers.0.self_attn.q_proj``, ``lm_head``): node
source paths and weight names are the checkpoint's.

Refused with ``UnsupportedOpError`` naming the model type and the reason: models transformers does not mark as
static-cache compileable (``_can_compile_fullgraph``: recurrent state, custom caches), cache layers that are not
plain key/value tensors (linear attention, shared-KV, indexer layers), and models whose ``torch.export`` fails.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Any

import torch
from torch import nn

from ..errors import UnsupportedOpError
from .meta import LMInfo

__all__ = ["HFStaticCacheLM", "capture_hf", "static_cache_len", "GQA_ATTENTION"]

log = logging.getLogger(__name__)

# StaticCache layer types whose state is exactly one key and one value tensor [B, H_kv, cache_len, D]
_KV_LAYER_TYPES = ("full_attention", "sliding_attention", "chunked_attention")


def _model_type(hf: nn.Module) -> str:
    return str(getattr(getattr(hf, "config", None), "model_type", type(hf).__name__))


def static_cache_len(hf: nn.Module) -> int:
    """The cache length transformers' export recipe would use: ``generation_config.cache_config["max_cache_len"]``
    (where ``llmpress.ir.loaders`` records ``load_model(cache_len=...)``), else ``max_position_embeddings``."""
    gen = getattr(hf, "generation_config", None)
    cache_config = getattr(gen, "cache_config", None) or {}
    n = cache_config.get("max_cache_len") if isinstance(cache_config, dict) else getattr(cache_config, "max_cache_len", None)
    if n is None:
        n = getattr(hf.config.get_text_config(), "max_position_embeddings", None)
    if n is None:
        raise UnsupportedOpError(f"model_type {_model_type(hf)!r}: no cache length (no max_position_embeddings in "
                                 "its config); load it with cache_len=N")
    return int(n)


def _check_exportable(hf: nn.Module) -> list[str]:
    """Refuse what the static-cache calling convention cannot express, before any tracing; returns the layer types."""
    from transformers.cache_utils import get_layer_types_and_kwargs

    kind = _model_type(hf)
    if not getattr(hf, "_can_compile_fullgraph", False):
        raise UnsupportedOpError(
            f"model_type {kind!r} ({type(hf).__name__}) cannot be captured with a static KV cache: transformers does "
            "not support a static cache for it (_can_compile_fullgraph=False: its state is not a key/value cache, or "
            "its forward is not traceable). Capture it without a cache: llmpress.ir.capture(model, (input_ids,))")
    config = hf.config.get_text_config(decoder=True)
    if not getattr(config, "use_cache", True):
        raise UnsupportedOpError(f"model_type {kind!r}: config.use_cache is False; the KV-cache capture needs it")
    layer_types, _ = get_layer_types_and_kwargs(config)
    other = sorted({t for t in layer_types if t not in _KV_LAYER_TYPES})
    if other:
        raise UnsupportedOpError(
            f"model_type {kind!r}: cache layer types {', '.join(other)} are not one key and one value tensor per "
            f"layer (supported: {', '.join(_KV_LAYER_TYPES)}); capture it without a cache: "
            "llmpress.ir.capture(model, (input_ids,))")
    return list(layer_types)


GQA_ATTENTION = "llmpress_gqa_sdpa"


def _gqa_sdpa(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
              attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
              is_causal: bool | None = None, **kwargs: Any):
    """transformers' attention-function signature; ``q [B, H, T, D]``, ``k, v [B, H_kv, S, D]``, a boolean mask
    ``[1, 1, T, S]`` -> ``out [B, T, H, D]``."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    plain = (not dropout and attention_mask is not None and attention_mask.dtype == torch.bool
             and attention_mask.dim() == 4 and tuple(attention_mask.shape[:2]) == (1, 1)
             and query.shape[1] % key.shape[1] == 0 and key.shape[-1] == value.shape[-1]
             and all(kwargs.get(k) is None for k in ("softcap", "s_aux", "sinks", "position_bias")))
    if not plain:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    out = nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask[0, 0], scale=scaling,
                                                     enable_gqa=query.shape[1] != key.shape[1])
    return out.transpose(1, 2).contiguous(), None


@contextlib.contextmanager
def _gqa_attention(hf: nn.Module):
    """Run ``hf`` with ``GQA_ATTENTION`` while exporting, if it runs with ``sdpa`` (its masks: transformers'
    ``sdpa_mask``); its own implementation is restored after."""
    before = getattr(hf.config, "_attn_implementation", None)
    if before != "sdpa":
        yield
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(GQA_ATTENTION, _gqa_sdpa)
    AttentionMaskInterface.register(GQA_ATTENTION, sdpa_mask)
    hf.set_attn_implementation(GQA_ATTENTION)
    try:
        yield
    finally:
        hf.set_attn_implementation(before)


def _static_layer_class():
    from transformers.cache_utils import StaticLayer

    class _FunctionalLayer(StaticLayer):
        """A ``StaticLayer`` over given tensors whose ``update`` returns new tensors instead of writing in place."""

        def __init__(self, keys: torch.Tensor, values: torch.Tensor, start: torch.Tensor) -> None:
            super().__init__(max_cache_len=keys.shape[2])
            self.keys, self.values = keys, values
            self.batch_size, self.num_heads = keys.shape[:2]
            self.k_head_dim, self.v_head_dim = keys.shape[-1], values.shape[-1]
            self.device, self.dtype = keys.device, keys.dtype
            self.cumulative_length = start  # what get_seq_length() reports: the first position of this call
            self.is_initialized = True

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
            b, h, t, _ = key_states.shape
            pos = (self.cumulative_length + torch.arange(t, device=key_states.device)).view(1, 1, t, 1)
            # scatter along the position axis: every backend lowers it,
            # where index_copy decomposes into an index_put over a partial index that TVM's importer refuses
            self.keys = torch.scatter(self.keys, 2, pos.expand(b, h, t, self.k_head_dim),
                                      key_states.to(self.keys.dtype))
            self.values = torch.scatter(self.values, 2, pos.expand(b, h, t, self.v_head_dim),
                                        value_states.to(self.values.dtype))
            return self.keys, self.values

    return _FunctionalLayer


class HFStaticCacheLM(nn.Module):
    """A transformers causal LM with explicit static-cache tensors (the calling convention in the module docstring).

    The model's children are registered on this module (the model object itself is held aside), so parameter
    names and source paths are the checkpoint's own."""

    def __init__(self, hf: nn.Module, *, cache_len: int | None = None) -> None:
        super().__init__()
        self.layer_types = _check_exportable(hf)
        object.__setattr__(self, "hf", hf.eval())  # not a submodule: its children are, under their own names
        for name, child in hf.named_children():
            self.add_module(name, child)
        self.cache_len = int(cache_len) if cache_len is not None else static_cache_len(hf)
        if self.cache_len < 1:
            raise UnsupportedOpError(f"model_type {_model_type(hf)!r}: cache_len must be >= 1, got {self.cache_len}")
        from transformers.configuration_utils import get_head_shapes

        config = hf.config.get_text_config(decoder=True)
        heads, dims = get_head_shapes(config)
        n = len(self.layer_types)
        self.kv_heads = list(heads) if isinstance(heads, (list, tuple)) else [int(heads)] * n
        self.head_dims = list(dims) if isinstance(dims, (list, tuple)) else [int(dims)] * n
        self.dtype = next(hf.parameters()).dtype
        self._layer_cls = _static_layer_class()

    # -- the calling convention -------------------------------------------------------------------
    def cache_shapes(self) -> list[tuple[int, int, int]]:
        """``(n_kv_heads, cache_len, head_dim)`` per cache tensor, in call order ``k_0, v_0, k_1, ...``."""
        return [(h, self.cache_len, d) for h, d in zip(self.kv_heads, self.head_dims) for _ in ("k", "v")]

    def empty_cache(self, batch: int = 1) -> list[torch.Tensor]:
        return [torch.zeros((batch, *s), dtype=self.dtype) for s in self.cache_shapes()]

    def example_inputs(self, seq_len: int = 8, batch: int = 1) -> tuple[torch.Tensor, ...]:
        ids = torch.ones(batch, min(seq_len, self.cache_len), dtype=torch.int64)
        return (ids, torch.zeros(1, dtype=torch.int64), *self.empty_cache(batch))

    def lm_info(self) -> LMInfo:
        config = self.hf.config.get_text_config(decoder=True)
        gen = getattr(self.hf, "generation_config", None)
        eos: list[int] = []
        for v in (getattr(config, "eos_token_id", None), getattr(gen, "eos_token_id", None)):
            for i in v if isinstance(v, (list, tuple)) else [v]:
                if i is not None and int(i) not in eos:
                    eos.append(int(i))
        bos = getattr(config, "bos_token_id", None)
        dtype = str(self.dtype).replace("torch.", "")
        uniform = len(set(self.kv_heads)) == 1 and len(set(self.head_dims)) == 1
        caches = () if uniform else tuple(
            {"name": f"{kv}_{i // 2}", "shape": list(s), "dtype": dtype}
            for i, (s, kv) in enumerate(zip(self.cache_shapes(), ["k", "v"] * len(self.layer_types))))
        return LMInfo(n_layers=len(self.layer_types), n_kv_heads=self.kv_heads[0], head_dim=self.head_dims[0],
                      cache_len=self.cache_len, vocab_size=int(config.vocab_size),
                      bos_id=-1 if bos is None else int(bos), eos_id=eos[0] if eos else -1, eos_ids=tuple(eos),
                      cache_dtype=dtype, caches=caches,
                      extra={"capture": "hf_static_cache", "model_type": _model_type(self.hf)})

    def forward(self, input_ids: torch.Tensor, start_pos: torch.Tensor, *caches: torch.Tensor):
        from transformers import StaticCache

        n = len(self.layer_types)
        if len(caches) != 2 * n:
            raise ValueError(f"expected {2 * n} cache tensors (k, v per layer), got {len(caches)}")
        start = start_pos.reshape(())
        cache = StaticCache(config=self.hf.config.get_text_config(decoder=True), max_cache_len=self.cache_len)
        cache.layers = [self._layer_cls(caches[2 * i], caches[2 * i + 1], start) for i in range(n)]
        out = self.hf(input_ids=input_ids, cache=cache, use_cache=True, attention_mask=None)
        return (out.logits, *(t for layer in cache.layers for t in (layer.keys, layer.values)))


def capture_hf(model: nn.Module, *, cache_len: int | None = None, info: dict | None = None,
               dynamic: bool = True):
    """Capture a transformers causal LM (or an ``HFStaticCacheLM``) into an ``ir.Module`` with the KV-cache
    calling convention and ``LMInfo``; ``dynamic`` makes the token count dynamic (1..cache_len)."""
    wrapper = model if isinstance(model, HFStaticCacheLM) else HFStaticCacheLM(model, cache_len=cache_len)
    kind = _model_type(wrapper.hf)
    example = wrapper.example_inputs(seq_len=8)
    ds = None
    if dynamic:
        seq = torch.export.Dim("seq", min=1, max=wrapper.cache_len)
        ds = ({1: seq}, None, tuple(None for _ in example[2:]))
    try:
        with torch.no_grad(), _gqa_attention(wrapper.hf):
            ep = torch.export.export(wrapper, example, dynamic_shapes=ds, strict=False)
    except Exception as e:
        raise UnsupportedOpError(f"model_type {kind!r} ({type(wrapper.hf).__name__}): torch.export could not capture "
                                 f"it with a static KV cache: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                                 ". Capture it without a cache: llmpress.ir.capture(model, (input_ids,))") from e
    info = {**(info or {}), "model_class": type(wrapper.hf).__name__, "capture": "hf_static_cache"}
    log.info("captured %s (%s) through transformers' StaticCache: %d layers, cache_len %d", kind,
             type(wrapper.hf).__name__, len(wrapper.layer_types), wrapper.cache_len)
    from .capture import exported_module

    return exported_module(ep, wrapper.hf, lm=wrapper.lm_info(), info=info)
