"""Declared pass order: the manager refuses an order that cannot work, naming both passes, before any pass runs;
a pass that changes nothing says why."""
from __future__ import annotations

import logging
import tomllib
from pathlib import Path

import pytest
import torch
from torch import nn

from llmpress.errors import PassError
from llmpress.ir.capture import capture
from llmpress.passes.base import PassContext
from llmpress.passes.fuse_qkv import FuseQKV
from llmpress.passes.manager import PassManager, check_order
from llmpress.passes.pipeline import build
from llmpress.passes.presets import PRESETS
from llmpress.passes.quantize import Quantize

from ..conftest import REPO

CTX = PassContext(progress=False)


class _Attn(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q_proj = nn.Linear(32, 32, bias=False)
        self.k_proj = nn.Linear(32, 32, bias=False)
        self.v_proj = nn.Linear(32, 32, bias=False)

    def forward(self, x):
        return self.q_proj(x) * self.k_proj(x) + self.v_proj(x)


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.self_attn = _Attn()

    def forward(self, x):
        return self.self_attn(x)


@pytest.fixture
def module():
    torch.manual_seed(0)
    return capture(_Tiny(), (torch.randn(2, 32),), dynamic=False)


def _recipe_pipelines() -> list[str]:
    return [tomllib.loads(p.read_text())["pipeline"] for p in sorted((REPO / "recipes").glob("*.toml"))]


@pytest.mark.parametrize("text", [*PRESETS.values(), *_recipe_pipelines(),
                                  "fuse_qkv,gptq(bits=4,group=128)", "smoothquant,kv_quant",
                                  "w4a8,kv_quant,kv_quant", "exact,fuse_qkv",
                                  "fold_norm,fuse_qkv,fuse_gate_up,gptq(bits=4,group=128)"])
def test_shipped_orders_are_accepted(text):
    check_order(build(text))


@pytest.mark.parametrize("text, first, then", [
    ("quantize,fuse_qkv", "quantize", "fuse_qkv"),
    ("w4a16,fuse", "quantize", "fuse_qkv"),
    ("quantize(bits=8),gptq", "quantize", "gptq"),
    ("gptq,awq", "gptq", "awq"),
    ("quantize,smoothquant", "quantize", "smoothquant"),
    ("quantize,fuse_gate_up", "quantize", "fuse_gate_up"),
    ("quantize,fold_norm", "quantize", "fold_norm"),
    ("fold_norm,awq", "fold_norm", "awq"),
])
def test_an_order_that_cannot_work_is_refused_naming_both(module, text, first, then):
    before = module.print()
    with pytest.raises(PassError) as info:
        PassManager.from_pipeline(text).run(module, CTX)
    msg = str(info.value)
    assert f"pass {then!r} cannot run after {first!r}" in msg and f"put {then} before {first}" in msg
    assert module.print() == before  # refused before any pass ran


def test_act_quant_needs_quantized_weights():
    with pytest.raises(PassError, match=r"'act_quant' requires IR properties \['weights_quantized'\].*'quantize'"):
        check_order(build("fuse_qkv,act_quant"))


def test_a_module_quantized_by_an_earlier_pipeline_is_refused_too(module):
    out, _ = PassManager.from_pipeline("quantize(group=0)").run(module, CTX)
    with pytest.raises(PassError, match="'fuse_qkv' cannot run on this module: it is already 'weights_quantized'"):
        PassManager.from_pipeline("fuse_qkv").run(out, CTX)


def test_fuse_qkv_says_why_it_fused_nothing(module):
    # Run directly (no manager, no properties): the pass itself finds the projections quantized.
    q = Quantize(Quantize.Options(group=0)).run(module, CTX).module
    res = FuseQKV().run(q, CTX)
    assert not res.modified
    assert res.stats["reason"] == ("the q/k/v projections are already quantized (by quantize); "
                                   "put fuse_qkv before quantize")
    again = FuseQKV().run(FuseQKV().run(capture(_Tiny(), (torch.randn(2, 32),), dynamic=False), CTX).module, CTX)
    assert again.stats["reason"] == "the q/k/v projections are already fused"


def test_a_pass_that_changes_nothing_is_a_warning(module, caplog):
    with caplog.at_level(logging.WARNING, logger="llmpress.passes.manager"):
        _, records = PassManager.from_pipeline("quantize(include=no_such_layer)").run(module, CTX)
    assert not records[0].modified
    assert "every linear was left out (3: not included by 'no_such_layer')" in records[0].stats["reason"]
    assert "quantize changed nothing: every linear was left out" in caplog.text


def test_cli_names_both_passes(capsys, tmp_path):
    from llmpress.cli import main

    from ..conftest import STORIES260K

    argv = ["compile", str(STORIES260K / "stories260K.bin"), "--pipeline", "quantize,fuse_qkv", "-o",
            str(tmp_path / "x"), "-q"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "'fuse_qkv' cannot run after 'quantize'" in err and "put fuse_qkv before quantize" in err
    assert not Path(tmp_path / "x").exists()
