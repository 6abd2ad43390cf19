"""Selectors: structure first (weight linears), globs over source paths only filter."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from llmpress.ir.capture import capture
from llmpress.ir.meta import source_path
from tests.decoder import Llama, LlamaConfig
from llmpress.passes.base import SelectOptions
from llmpress.passes.select import Selector, linear_nodes, pattern_matches, select_linears


@pytest.fixture(scope="module")
def module():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64, max_seq_len=32)
    return capture(Llama(cfg).eval())


LAYER = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
         "mlp.up_proj", "mlp.down_proj"]


def test_linear_nodes_in_graph_order(module) -> None:
    paths = [source_path(n) for n in linear_nodes(module)]
    assert paths == [f"model.layers.{i}.{p}" for i in range(2) for p in LAYER] + ["lm_head"]
    assert all(module.weight(n.args[1]).dim() == 2 for n in linear_nodes(module))


@pytest.mark.parametrize(("pattern", "path", "expected"), [
    ("lm_head", "lm_head", True),
    ("down_proj", "model.layers.0.mlp.down_proj", True),          # dotted suffix
    ("mlp.down_proj", "model.layers.0.mlp.down_proj", True),
    ("model.layers.*.mlp", "model.layers.0.mlp.down_proj", True),  # an enclosing module
    ("mlp", "model.layers.3.mlp.up_proj", True),
    ("model.layers.1", "model.layers.10.mlp.up_proj", False),      # segments, not string prefixes
    ("*.down_proj", "model.layers.0.mlp.down_proj", True),
    ("*proj", "lm_head", False),
    ("head", "lm_head", False),
    ("q_proj", "model.layers.0.self_attn.k_proj", False),
])
def test_pattern_matches(pattern: str, path: str, expected: bool) -> None:
    assert pattern_matches(pattern, path) is expected


def test_selector_reasons() -> None:
    s = Selector(include=("model.layers.*",), exclude=("lm_head", "*.down_proj"))
    assert s.match("lm_head") == (False, "excluded by 'lm_head'")
    assert s.match("model.layers.0.mlp.down_proj") == (False, "excluded by '*.down_proj'")
    assert s.match("model.layers.0.mlp.up_proj") == (True, "included by 'model.layers.*'")
    assert s.match("model.norm") == (False, "not included by 'model.layers.*'")
    assert Selector().match("anything") == (True, "selected")
    assert Selector(include=("a", "b")).match("c") == (False, "not included by 'a|b'")


def test_select_linears(module) -> None:
    opts = SelectOptions.from_mapping({"exclude": "lm_head|*.down_proj", "include": "model.layers.1|lm_head"})
    selected, skipped = select_linears(module, opts)
    assert [source_path(n) for n in selected] == [f"model.layers.1.{p}" for p in LAYER if "down" not in p]
    reasons = dict(skipped)
    assert reasons["lm_head"] == "excluded by 'lm_head'"
    assert reasons["model.layers.1.mlp.down_proj"] == "excluded by '*.down_proj'"
    assert reasons["model.layers.0.self_attn.q_proj"] == "not included by 'model.layers.1|lm_head'"
    assert len(selected) + len(skipped) == 15


class _Computed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 4, bias=False)
        self.w = nn.Parameter(torch.randn(4, 4))

    def forward(self, x):
        return self.proj(x) + nn.functional.linear(x, self.w * 2)


def test_structural_skip_for_a_computed_weight() -> None:
    m = capture(_Computed(), (torch.randn(2, 4),), dynamic=False)
    assert [source_path(n) for n in linear_nodes(m)] == ["proj"]
    selected, skipped = select_linears(m, SelectOptions())
    assert len(selected) == 1
    assert [why for _, why in skipped] == ["weight is computed in the graph, not a stored weight"]
