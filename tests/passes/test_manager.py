"""PassManager: IR properties, verification, instruments, crash reproducers."""
from __future__ import annotations

import json
from typing import ClassVar

import pytest
import torch
from torch import nn

from llmpress.errors import PassError
from llmpress.ir.capture import capture
from llmpress.ir.module import Module
from llmpress.passes.base import Pass, PassContext, PassResult
from llmpress.passes.dce import DeadCodeElimination
from llmpress.passes.fuse_qkv import FuseQKV
from llmpress.passes.manager import (
    Instrument,
    IRDumpInstrument,
    PassManager,
    PrintOnChange,
    TimingInstrument,
)

CTX = PassContext(progress=False)


class _Attn(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q_proj = nn.Linear(8, 8, bias=False)
        self.k_proj = nn.Linear(8, 4, bias=False)
        self.v_proj = nn.Linear(8, 4, bias=False)

    def forward(self, x):
        return self.q_proj(x)[..., :4] * self.k_proj(x) + self.v_proj(x)


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.self_attn = _Attn()

    def forward(self, x):
        return self.self_attn(x)


@pytest.fixture(scope="module")
def captured() -> Module:
    torch.manual_seed(0)
    return capture(_Tiny(), (torch.randn(2, 8),), dynamic=False)


@pytest.fixture
def module(captured: Module) -> Module:
    return captured.clone()


class _Noop(Pass):
    name: ClassVar[str] = "noop"

    def run(self, module: Module, ctx: PassContext) -> PassResult:
        return PassResult(module, False, {"looked": 1})


class _NeedsFused(Pass):
    name: ClassVar[str] = "needs_fused"
    requires: ClassVar[frozenset[str]] = frozenset({"qkv_fused"})
    invalidates: ClassVar[frozenset[str]] = frozenset({"qkv_fused"})

    def run(self, module: Module, ctx: PassContext) -> PassResult:
        return PassResult(module, False)


class _Boom(Pass):
    """A deliberately broken pass: edits the graph half-way, then raises."""

    name: ClassVar[str] = "boom"

    def run(self, module: Module, ctx: PassContext) -> PassResult:
        out = module.output_node()
        module.graph.erase_node(out)  # leave the module broken, as a crashing pass would
        raise RuntimeError("kaboom")


class _Corrupts(Pass):
    """Returns normally but leaves a node without shape metadata: verification must catch it."""

    name: ClassVar[str] = "corrupts"

    def run(self, module: Module, ctx: PassContext) -> PassResult:
        x = module.user_inputs()[0]
        with module.graph.inserting_after(x):
            module.graph.call_function(torch.ops.aten.neg.default, (x,))
        return PassResult(module, True)


class _ReturnsNone(Pass):
    name: ClassVar[str] = "returns_none"

    def run(self, module: Module, ctx: PassContext):
        return None


def test_records_and_properties(module: Module) -> None:
    pm = PassManager([_Noop(), FuseQKV(), _NeedsFused(), DeadCodeElimination()])
    out, records = pm.run(module, CTX)
    assert [r.name for r in records] == ["noop", "fuse_qkv", "needs_fused", "dce"]
    assert [r.modified for r in records] == [False, True, False, False]
    assert records[0].stats == {"looked": 1}
    assert records[1].options == {"include": [], "exclude": [], "min_group": 3, "all_siblings": False}
    assert records[1].stats["fused"] == 1
    assert all(r.seconds >= 0 for r in records)
    json.dumps([r.to_json() for r in records])  # records serialize for the manifest
    # fuse_qkv established qkv_fused, needs_fused invalidated it again.
    assert out.info["properties"] == []
    out2, _ = PassManager([FuseQKV()]).run(module.clone(), CTX)
    assert out2.info["properties"] == ["qkv_fused"]


def test_missing_property_names_the_pass_and_who_establishes_it(module: Module) -> None:
    with pytest.raises(PassError) as info:
        PassManager([DeadCodeElimination(), _NeedsFused()]).run(module, CTX)
    msg = str(info.value)
    assert "'needs_fused'" in msg and "qkv_fused" in msg and "'fuse_qkv'" in msg and "[dce]" in msg


def test_properties_start_from_module_info(module: Module) -> None:
    module.info["properties"] = ["qkv_fused"]
    out, records = PassManager([_NeedsFused()]).run(module, CTX)
    assert [r.name for r in records] == ["needs_fused"]
    assert out.info["properties"] == []


def test_crash_writes_a_reproducer(module: Module, tmp_path) -> None:
    before_text = module.print()
    pm = PassManager([_Noop(), DeadCodeElimination(), _Boom()], reproducer_dir=tmp_path,
                     pipeline_text="noop,dce,boom")
    with pytest.raises(PassError) as info:
        pm.run(module, CTX)
    msg = str(info.value)
    assert "pass 'boom' failed after [noop, dce]: kaboom" in msg
    assert isinstance(info.value.__cause__, RuntimeError)
    (folder,) = list(tmp_path.iterdir())
    assert folder.name.startswith("boom-") and str(folder) in msg
    assert {p.name for p in folder.iterdir()} == {"ir_before.txt", "pipeline.txt", "program.pt2"}
    assert (folder / "ir_before.txt").read_text().strip() == before_text  # the IR as the failing pass got it
    pipeline = (folder / "pipeline.txt").read_text()
    assert pipeline.splitlines()[0] == "noop,dce,boom" and "index 2" in pipeline
    # The saved program is the one before the pass, and it loads and runs.
    ep = torch.export.load(str(folder / "program.pt2"))
    x = torch.randn(2, 8)
    torch.testing.assert_close(ep.module()(x), Module(ep).run(x), rtol=0, atol=0)


def test_verification_failure_is_a_pass_error_naming_the_pass(module: Module, tmp_path) -> None:
    with pytest.raises(PassError) as info:
        PassManager([_Noop(), _Corrupts()], reproducer_dir=tmp_path).run(module, CTX)
    msg = str(info.value)
    assert "pass 'corrupts' failed after [noop]" in msg and "left the IR inconsistent" in msg
    assert "no shape metadata" in msg
    assert len(list(tmp_path.iterdir())) == 1


def test_without_verify_each_a_corrupt_ir_passes_through(module: Module) -> None:
    _, records = PassManager([_Corrupts()], verify_each=False).run(module, CTX)
    assert records[0].modified


def test_pass_must_return_a_result(module: Module, tmp_path) -> None:
    with pytest.raises(PassError, match="returned NoneType, not PassResult"):
        PassManager([_ReturnsNone()], reproducer_dir=tmp_path).run(module, CTX)


def test_default_pipeline_text_comes_from_the_passes(module: Module) -> None:
    pm = PassManager([FuseQKV(FuseQKV.Options(min_group=2)), DeadCodeElimination()])
    assert pm.pipeline_text == "fuse_qkv(min_group=2),dce"
    assert PassManager.from_pipeline(" exact ").pipeline_text == "exact"


def test_instruments(module: Module, tmp_path, caplog) -> None:
    class Calls(Instrument):
        def __init__(self) -> None:
            self.calls: list[str] = []

        def before_pass(self, pass_, module):
            self.calls.append(f"before:{pass_.name}")

        def after_pass(self, pass_, module, result):
            self.calls.append(f"after:{pass_.name}:{result.modified}")

        def on_error(self, pass_, module, exc):
            self.calls.append(f"error:{pass_.name}:{exc}")

    timing, dump, change, calls = TimingInstrument(), IRDumpInstrument(tmp_path / "ir"), PrintOnChange(), Calls()
    with caplog.at_level("INFO", logger="llmpress.passes.manager"):
        out, _ = PassManager([_Noop(), FuseQKV()], instruments=[timing, dump, change, calls]).run(module, CTX)
    assert [n for n, _ in timing.timings] == ["noop", "fuse_qkv"] and timing.total() >= 0
    files = sorted(p.name for p in (tmp_path / "ir").iterdir())
    assert files == ["00-noop-after.txt", "00-noop-before.txt", "01-fuse_qkv-after.txt", "01-fuse_qkv-before.txt"]
    assert "split_with_sizes" not in (tmp_path / "ir" / "01-fuse_qkv-before.txt").read_text()
    assert "split_with_sizes" in (tmp_path / "ir" / "01-fuse_qkv-after.txt").read_text()
    assert change.changed == ["fuse_qkv"]
    assert "fuse_qkv changed the IR" in caplog.text and "aten.linear.default -2" in caplog.text
    assert calls.calls == ["before:noop", "after:noop:False", "before:fuse_qkv", "after:fuse_qkv:True"]
    calls.calls.clear()
    with pytest.raises(PassError):
        PassManager([_Boom()], instruments=[calls], reproducer_dir=tmp_path / "crash").run(out, CTX)
    assert calls.calls == ["before:boom", "error:boom:kaboom"]


def test_reproducer_after_rewrites_loads_and_runs(tmp_path) -> None:
    """The program saved before a crash includes earlier rewrites (new weights, dynamic sequence length).

    Regression: weights added with symbolic fake shapes made saved programs fail their own guards."""
    from tests.decoder import Llama, LlamaConfig
    from llmpress.passes.pipeline import build

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64, max_seq_len=32)
    model = Llama(cfg).eval()
    with pytest.raises(PassError, match=r"failed after \[fold_constants, fuse_qkv, dce\]"):
        PassManager(build("exact") + [_Boom()], reproducer_dir=tmp_path).run(capture(model), CTX)
    (folder,) = list(tmp_path.iterdir())
    assert "qkv_proj" in (folder / "ir_before.txt").read_text()
    ep = torch.export.load(str(folder / "program.pt2"))
    for t in (5, 1):  # two sequence lengths: the dynamic dimension survived
        inputs = (torch.randint(0, 64, (1, t)), torch.zeros(1, dtype=torch.int64), *model.empty_cache())
        with torch.no_grad():
            # fp32 tolerance: the fused q/k/v GEMM may sum in another order than three separate ones (~1e-6).
            torch.testing.assert_close(ep.module()(*inputs)[0], model(*inputs)[0], rtol=1e-5, atol=1e-5)
