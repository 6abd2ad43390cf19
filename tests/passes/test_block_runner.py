"""``BlockRunner`` (layer-by-layer calibration) against ``Calibration.collect`` (prefix re-runs), and GPTQ's use of
it: same statistics bit for bit, same quantized weights, and the structural isolation check."""
from __future__ import annotations

import pytest
import torch

from llmpress.errors import PassError
from llmpress.ir.capture import capture
from llmpress.ir.meta import source_path
from llmpress.passes import hessian as hessian_mod
from llmpress.passes.base import PassContext
from llmpress.passes.calibration import BlockRunner, BlocksNotIsolated, Calibration
from llmpress.passes.gptq import GPTQ, GPTQOptions


@pytest.fixture(scope="module")
def tiny():
    from tests.decoder import Llama, LlamaConfig

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, dim=32, n_layers=3, n_heads=4, n_kv_heads=2, hidden_dim=64, max_seq_len=32)
    g = torch.Generator().manual_seed(7)
    calib = Calibration.from_tensors([torch.randint(0, 64, (1, 24), generator=g) for _ in range(4)])
    return capture(Llama(cfg).eval()), calib


def _linears(module, key):
    return [n for n in module.graph.nodes if n.op == "call_function" and n.target is torch.ops.aten.linear.default
            and hessian_mod.numbered_block(n) == key]


def _record(store):
    def observe(node, x):
        store.setdefault(node, []).append(x.clone())
    return observe


def test_runner_sees_exactly_what_collect_sees(tiny) -> None:
    module, calib = tiny
    module = module.clone()
    runner = BlockRunner(module, calib, hessian_mod.numbered_block)
    assert runner.keys == ["model.layers.0", "model.layers.1", "model.layers.2"]
    for key in runner.keys[::2]:  # skipping block 1: the runner must pass through it on its own
        nodes = _linears(module, key)
        got, want = {}, {}
        runner.collect(key, nodes, _record(got))
        calib.collect(module, nodes, _record(want))
        assert set(got) == set(want) == set(nodes)
        for n in nodes:  # same graph, same ops, same order: equal to the bit, not approximately
            assert len(got[n]) == calib.samples and all(torch.equal(a, b) for a, b in zip(got[n], want[n])), n.name
    with pytest.raises(PassError, match="already passed"):
        runner.collect("model.layers.1", [], lambda n, x: None)


def test_gptq_layer_by_layer_equals_prefix_reruns(tiny, monkeypatch) -> None:
    module, calib = tiny
    opts = GPTQOptions(bits=3, group=16)  # lm_head included: it comes after the blocks and goes through collect()
    fast = module.clone()
    GPTQ(opts).run(fast, PassContext(calibration=calib, progress=False))
    used = []
    real = hessian_mod._block_runner
    monkeypatch.setattr(hessian_mod, "_block_runner", lambda *a: used.append(real(*a)) or None)
    slow = module.clone()
    GPTQ(opts).run(slow, PassContext(calibration=calib, progress=False))
    assert used and used[0] is not None  # the runner was available, and the second run declined it
    wf, ws = fast.weights(), slow.weights()
    assert set(wf) == set(ws) and any(v.dtype == torch.uint8 for v in wf.values())
    for k in wf:
        assert torch.equal(wf[k], ws[k]), k


def test_block_read_from_outside_every_block_is_not_isolated(tiny) -> None:
    module, calib = tiny
    # Declare block 0's first residual add outside every block: it is computed from block 0 and read by block 0
    # and block 1, so no block can run alone.
    residual = next(n for n in module.graph.nodes if n.op == "call_function" and source_path(n) == "model.layers.0")

    def block_of(n):
        return None if n is residual else hessian_mod.numbered_block(n)

    with pytest.raises(BlocksNotIsolated, match=residual.name):
        BlockRunner(module, calib, block_of)
