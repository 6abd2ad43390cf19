"""The layer-rewrite driver on its own: a tiny Llama, a trivial rewrite callback (each weight moved to a new
placeholder, optionally scaled), and what the driver promises: records, skip reasons, byte totals, dead weights
dropped and only those, one recompile per block, and statistics of block i taken after blocks < i were rewritten."""
from __future__ import annotations

import pytest
import torch

from llmpress.ir.capture import capture
from llmpress.ir.meta import source_path
from llmpress.passes.base import PassContext, SelectOptions
from llmpress.passes.hessian import GramStats, collect_stats, numbered_block
from llmpress.passes.layer_rewrite import Layer, Rewritten, rewrite_linears
from llmpress.passes.select import select_linears

from ..conftest import llama_inputs, random_calibration

CTX = PassContext(progress=False)
SKIP = "down_proj: left alone by this test"


def _moving_rewrite(module, factor: float, seen: list[Layer]):
    """Move each weight to a new placeholder holding ``factor * W``; decline every down_proj."""

    def rewrite(layer: Layer) -> Rewritten | str:
        seen.append(layer)
        if layer.path.endswith("down_proj"):
            return SKIP
        old = layer.node.args[1]
        new = module.add_weight(module.fresh_weight_name(module.weight_name(old) + ".moved"), layer.weight * factor)
        layer.node.replace_input_with(old, new)
        return Rewritten({"factor": factor}, bytes_before=layer.weight.numel() * 4, bytes_after=1, dead=old)

    return rewrite


def test_uncalibrated_rewrite_records_skips_and_drops_dead_weights(tiny_llama) -> None:
    module = capture(tiny_llama)
    inputs = llama_inputs(tiny_llama)
    want = module.run(*inputs)[0]
    before = module.weights()
    nodes, skipped = select_linears(module, SelectOptions(exclude=("lm_head",)))
    assert len(nodes) == 14 and skipped == [("lm_head", "excluded by 'lm_head'")]
    old_names = {n: module.weight_name(n.args[1]) for n in nodes}
    seen: list[Layer] = []
    done = rewrite_linears(module, CTX, nodes, _moving_rewrite(module, 1.0, seen), skipped=skipped, who="test")

    assert [layer.node for layer in seen] == nodes and all(layer.stats is None for layer in seen)
    rewritten = [n for n in nodes if not old_names[n].endswith("down_proj.weight")]
    assert len(done.layers) == 12 and set(done.layers) == {f"model.layers.{i}.{m}" for i in range(2) for m in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
        "mlp.up_proj")}
    assert done.skipped == [("lm_head", "excluded by 'lm_head'"),
                            ("model.layers.0.mlp.down_proj", SKIP), ("model.layers.1.mlp.down_proj", SKIP)]
    assert done.bytes_before == sum(before[old_names[n]].numel() * 4 for n in rewritten)
    assert done.bytes_after == 12
    after = module.weights()
    # the rewritten layers' old weights are gone, the declined and excluded ones stay, the new ones are read
    assert not {old_names[n] for n in rewritten} & set(after)
    assert {old_names[n] for n in nodes if n not in rewritten} <= set(after) and "lm_head.weight" in after
    assert sum(k.endswith(".moved") for k in after) == 12
    module.verify()
    assert torch.equal(module.run(*inputs)[0], want)  # W moved unchanged: the function is the same

    stats = done.stats(module, "moved", "test")
    assert stats["moved"] == 12 and stats["skipped"] is done.skipped and "reason" not in stats


def test_nothing_rewritten_gives_the_reason_and_leaves_the_module(tiny_llama) -> None:
    module = capture(tiny_llama)
    nodes, skipped = select_linears(module, SelectOptions(include=("no_such_layer",)))
    assert nodes == []
    names = list(module.weights())
    done = rewrite_linears(module, CTX, nodes, _moving_rewrite(module, 1.0, []), skipped=skipped, who="test")
    assert done.layers == {} and list(module.weights()) == names
    stats = done.stats(module, "moved", "test", byte_counts=False)
    assert stats["reason"].startswith("every linear was left out (15: not included by 'no_such_layer')")
    assert "bytes_before" not in stats
    with pytest.raises(ValueError, match="finish"):  # finish belongs to the single batch of an uncalibrated run
        rewrite_linears(module, CTX, nodes, lambda layer: "x", skipped=[], who="test", collect=collect_stats,
                        finish=lambda: None)


def test_block_statistics_see_the_earlier_blocks_rewritten(tiny_llama) -> None:
    """Block 1's q_proj statistics are those of the graph whose block 0 is already scaled by 0.5, not of the
    original graph; every layer of a block shares its input's accumulator with the layers reading the same input."""
    module = capture(tiny_llama)
    original = module.clone()
    calib = random_calibration()
    nodes, skipped = select_linears(module, SelectOptions(exclude=("lm_head",)))
    seen: list[Layer] = []
    rewrite_linears(module, PassContext(calibration=calib, progress=False), nodes,
                    _moving_rewrite(module, 0.5, seen), skipped=skipped, who="test", collect=collect_stats)

    by_path = {layer.path: layer for layer in seen}
    q, k = by_path["model.layers.1.self_attn.q_proj"], by_path["model.layers.1.self_attn.k_proj"]
    assert isinstance(q.stats, GramStats) and q.stats is k.stats and q.stats.tokens == calib.tokens
    assert [numbered_block(layer.node) for layer in seen] == sorted(numbered_block(n) for n in nodes)

    def gram_of(m):
        q1 = next(n for n in select_linears(m, SelectOptions())[0]
                  if source_path(n) == "model.layers.1.self_attn.q_proj")
        return collect_stats(m, calib, [q1])[q1.args[0]].gram

    # the final graph's block-1 input depends only on block 0 (scaled) and the prelude: what block 1 was given
    assert torch.equal(q.stats.gram, gram_of(module))
    assert not torch.allclose(q.stats.gram, gram_of(original), rtol=1e-3)
