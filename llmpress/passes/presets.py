"""Named pipelines ("presets"): pipeline text under a short name, expanded in place by ``pipeline.build``.

A preset takes no options; write the pipeline out (``llmpress compile --pipeline "..."``) to change one. Presets may
name other presets. Every preset here is parsed and built by the tests.
"""
from __future__ import annotations

__all__ = ["PRESETS"]

PRESETS: dict[str, str] = {
    # Rewrites whose outputs equal the input graph's within fp32 rounding.
    "exact": "fold_constants,fuse_qkv,dce",
    # Every exact fusion (DESIGN.md's example pipeline starts with "fuse"): each group of sibling linears reading one
    # input becomes one linear (q/k/v -> qkv_proj, gate/up -> gate_up_proj): one kernel call instead of two or three.
    "fuse": "fuse_qkv(all_siblings=true,min_group=2)",
    # SmoothQuant W8A8: int8 weights per output channel, dynamic per-token int8 activations; lm_head stays float.
    "w8a8": "smoothquant(alpha=0.5,exclude=lm_head)",
    # AWQ weight-only int4, group 128 (activation-aware scales folded into the norms); lm_head stays float.
    "w4a16-awq": "awq(bits=4,group=128,exclude=lm_head)",
    # The RTN presets fuse first: quantization is per output row and group, so fused or not the weights are the same.
    # Weight-only int8 per output channel, round to nearest: no calibration, ~1.0000x fp32 perplexity.
    "w8a16": "fuse,quantize(bits=8,group=0,exclude=lm_head)",
    # Weight-only int4 group 128, round to nearest (no calibration).
    "w4a16": "fuse,quantize(bits=4,group=128,exclude=lm_head)",
    # int4 g128 weights (RTN) and dynamic int8 activations per weight group: integer dot products on CPU.
    "w4a8": "fuse,quantize(bits=4,group=128,exclude=lm_head),act_quant(bits=8)",
    # GPTQ weight-only int4 / int3, group 128 (needs calibration data).
    "w4a16-gptq": "gptq(bits=4,group=128,exclude=lm_head)",
    "w3a16-gptq": "gptq(bits=3,group=128,exclude=lm_head)",
    # int8 keys/values in the KV cache (fake-quantized before the write; the cache stays float32 for now).
    "kv8": "kv_quant(bits=8)",
}
