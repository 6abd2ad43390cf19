"""Lazy weights: a checkpoint captured for compile keeps its weights unread until a pass asks, and rewrites to the
same bits as the eager path."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensor

from llmpress.api import run_pipeline
from llmpress.ir.capture import capture
from llmpress.ir.loaders import load_model
from llmpress.passes.calibration import Calibration
from llmpress.safetensors_io import read_header, read_tensor, write_streamed


@pytest.fixture(scope="module")
def bf16_folder(tmp_path_factory) -> Path:
    """The reference tinystories-llama's first two layers with their weights stored in bfloat16."""
    src = Path(__file__).resolve().parents[3] / "shared" / "models" / "tinystories-llama"
    if not src.is_dir():
        src = Path("/work/shared/models/tinystories-llama")
    dst = tmp_path_factory.mktemp("bf16")
    for f in ("generation_config.json", "tokenizer.model"):
        shutil.copy(src / f, dst / f)
    cfg = json.loads((src / "config.json").read_text())
    cfg["num_hidden_layers"] = 2  # two of its eight layers: enough for block-by-block, four times faster
    (dst / "config.json").write_text(json.dumps(cfg))
    entries, start = read_header(src / "model.safetensors")
    entries = {k: e for k, e in entries.items() if not k.startswith("model.layers.") or int(k.split(".")[2]) < 2}
    write_streamed(dst / "model.safetensors",
                   {k: (torch.bfloat16, tuple(e["shape"]),
                        (lambda e=e: read_tensor(src / "model.safetensors", e, start).to(torch.bfloat16)))
                    for k, e in entries.items()})
    return dst


@pytest.fixture(scope="module")
def captured(bf16_folder):
    """(lazily captured, eagerly captured) once per module; tests rewrite clones (weights shared, lazy state too)."""
    return capture(bf16_folder), capture(load_model(bf16_folder).model)


def test_streamed_safetensors_read_by_the_safetensors_library(tmp_path):
    from safetensors import safe_open

    g = torch.Generator().manual_seed(0)
    ts = {"a": torch.randn(3, 5, generator=g), "b": torch.arange(7, dtype=torch.int32),
          "c": torch.randn(4, generator=g).to(torch.bfloat16)}
    write_streamed(tmp_path / "x.safetensors", {k: (v.dtype, tuple(v.shape), (lambda v=v: v)) for k, v in ts.items()},
                   metadata={"format": "pt"})
    with safe_open(str(tmp_path / "x.safetensors"), "pt") as h:
        for k, v in ts.items():
            assert torch.equal(h.get_tensor(k), v)
    entries, start = read_header(tmp_path / "x.safetensors")
    assert torch.equal(read_tensor(tmp_path / "x.safetensors", entries["c"], start), ts["c"])
    with pytest.raises(ValueError, match="produced"):
        write_streamed(tmp_path / "y.safetensors", {"a": (torch.float32, (2,), lambda: torch.zeros(3))})


def test_capture_reads_no_weight_and_quantize_matches_eager(captured):
    lazy, eager = (m.clone() for m in captured)
    stored = lazy.stored_weights()
    floats = {k for k, v in stored.items() if v.is_floating_point() and "rotary_emb" not in k}
    assert floats and all(lazy.is_lazy(k) for k in floats)
    assert all(isinstance(stored[k], FakeTensor) for k in floats)  # no float32 data held after load + capture
    assert not any(eager.is_lazy(k) for k in eager.stored_weights())

    pipe = "quantize(bits=4,group=64,exclude=lm_head)"
    q_lazy, rec_lazy = run_pipeline(lazy, pipe, progress=False)
    q_eager, rec_eager = run_pipeline(eager, pipe, progress=False)
    assert rec_lazy[0].stats["quantized"] == rec_eager[0].stats["quantized"] > 0
    # the rewritten linears' floats were read one at a time and dropped; what no pass touched is still lazy
    assert q_lazy.is_lazy("model.embed_tokens.weight")
    assert not any(k.endswith("q_proj.weight") for k in q_lazy.stored_weights())
    a, b = q_lazy.weights(), q_eager.weights()  # weights() reads the rest
    assert not any(q_lazy.is_lazy(k) for k in a)
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    ids = torch.tensor([[1, 45, 300, 7, 99]])
    inputs = (ids, torch.zeros(1, dtype=torch.int64), *_cache(q_eager))
    assert torch.equal(q_lazy.run(*inputs)[0], q_eager.run(*inputs)[0])


def test_gptq_block_runner_reads_lazily_and_matches_eager(captured):
    lazy, eager = (m.clone() for m in captured)
    g = torch.Generator().manual_seed(3)
    calib = Calibration.from_tensors([torch.randint(3, 2048, (1, 24), generator=g) for _ in range(2)])
    pipe = "gptq(bits=4,group=64,exclude=lm_head)"
    q_lazy, _ = run_pipeline(lazy, pipe, calibration=calib, progress=False)
    assert q_lazy.is_lazy("model.norm.weight")  # the block runner read the norms it ran, and kept none
    q_eager, _ = run_pipeline(eager, pipe, calibration=calib, progress=False)
    a, b = q_lazy.weights(), q_eager.weights()
    assert sorted(a) == sorted(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_lazy_load_checks_the_checkpoint_first(bf16_folder, tmp_path):
    from llmpress.errors import LoadError

    for f in ("config.json", "tokenizer.model"):
        shutil.copy(bf16_folder / f, tmp_path / f)
    entries, start = read_header(bf16_folder / "model.safetensors")
    src = bf16_folder / "model.safetensors"
    keep = {k: e for k, e in entries.items() if k != "model.layers.1.mlp.up_proj.weight"}
    write_streamed(tmp_path / "model.safetensors",
                   {k: (torch.bfloat16, tuple(e["shape"]), (lambda e=e: read_tensor(src, e, start))) for k, e in keep.items()})
    with pytest.raises(LoadError, match="missing tensor model.layers.1.mlp.up_proj.weight"):
        load_model(tmp_path, lazy=True)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["model_type"] == "llama"


def _cache(module):
    from llmpress.eval.generate import empty_cache

    return empty_cache(module.lm)
