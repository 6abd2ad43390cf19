"""dce: removes dead pure nodes and the weights only they read; keeps side effects and the calling convention."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from llmpress.ir.capture import capture
from llmpress.ir.module import Module
from llmpress.passes.base import PassContext
from llmpress.passes.dce import DeadCodeElimination

CTX = PassContext(progress=False)
aten = torch.ops.aten


class _Two(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4, bias=False)

    def forward(self, x):
        return torch.relu(self.a(x)) + self.b(x)


@pytest.fixture
def module() -> Module:
    torch.manual_seed(0)
    return capture(_Two(), (torch.randn(2, 4),), dynamic=False)


def _add_dead_chain(module: Module) -> None:
    """A dead chain reading b's weight, and make b's linear itself dead: out = relu(a(x)) + relu(a(x))."""
    lin_b = next(n for n in module.graph.nodes if n.target is aten.linear.default and len(n.args) == 2)
    w_b = lin_b.args[1]
    neg = module.call(aten.neg.default, (w_b,), like=lin_b)
    module.call(aten.mul.Tensor, (neg, 2.0), like=lin_b)
    add = next(iter(lin_b.users))
    add.replace_input_with(lin_b, add.args[0])
    module.recompile()


def test_removes_dead_nodes_and_their_weights(module: Module) -> None:
    x = torch.randn(2, 4)
    _add_dead_chain(module)
    ref = module.run(x)
    before = module.op_histogram()
    res = DeadCodeElimination().run(module, CTX)
    assert res.modified
    assert res.stats == {"removed_nodes": 3, "removed_weights": ["b.weight"]}
    after = module.op_histogram()
    assert before - after == {"aten.linear.default": 1, "aten.neg.default": 1, "aten.mul.Tensor": 1}
    assert "b.weight" not in module.weights() and "a.weight" in module.weights()
    module.verify()
    torch.testing.assert_close(module.run(x), ref, rtol=0, atol=0)  # nothing computed changed
    again = DeadCodeElimination().run(module, CTX)
    assert not again.modified and again.stats == {"removed_nodes": 0, "removed_weights": []}


def test_clean_graph_is_unchanged(module: Module) -> None:
    text = module.print()
    res = DeadCodeElimination().run(module, CTX)
    assert not res.modified and module.print() == text


def test_keeps_mutating_ops_and_user_inputs(module: Module) -> None:
    x = module.user_inputs()[0]
    out = module.output_node()
    clone = module.call(aten.clone.default, (x,), before=out)
    module.call(aten.add_.Tensor, (clone, 1.0), before=out)  # in-place: a side effect, never dead
    module.recompile()
    res = DeadCodeElimination().run(module, CTX)
    assert not res.modified
    hist = module.op_histogram()
    assert hist["aten.add_.Tensor"] == 1 and hist["aten.clone.default"] == 1
    assert [n.name for n in module.user_inputs()] == ["x"]
