"""``calib_device`` / ``--calib-device``: validated before any work, plumbed through compile, the CLI and recipes,
and on ``cpu`` bit-identical to a compile without it (the device is a parameter of one code path)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import llmpress
from llmpress.cli import main
from llmpress.errors import ConfigError
from llmpress.ir.capture import capture
from llmpress.passes.calib_device import resolve
from llmpress.passes.recipe import Recipe

from ..conftest import CALIB, STORIES260K, random_calibration

NO_CUDA = not torch.cuda.is_available()


def test_resolve_accepts_cpu_and_names_the_option_for_bad_values() -> None:
    assert resolve(None) == resolve("cpu") == resolve(torch.device("cpu")) == torch.device("cpu")
    for bad, fragment in (("gpu0", "is not a device"), ("meta", "not supported"), (3, "expected a device name")):
        with pytest.raises(ConfigError, match="calib_device") as e:
            resolve(bad)
        assert fragment in str(e.value) and "--calib-device" in str(e.value)


@pytest.mark.skipif(not NO_CUDA, reason="this machine has CUDA")
def test_cuda_without_cuda_is_a_config_error_before_the_model_loads(tmp_path: Path, capsys) -> None:
    # The model path does not exist: the device error coming first shows nothing was loaded before it.
    with pytest.raises(ConfigError, match=r"calib_device \(--calib-device\): cuda .*CUDA is not available"):
        llmpress.compile(tmp_path / "no-model", pipeline="gptq", calibration=str(CALIB), calib_device="cuda")
    out = tmp_path / "out"
    assert main(["compile", str(STORIES260K / "stories260K.bin"), "--pipeline", "gptq", "--calib", str(CALIB),
                 "--calib-device", "cuda:0", "-o", str(out), "-q"]) == 2
    assert "--calib-device" in capsys.readouterr().err and not out.exists()


@pytest.fixture(scope="module")
def tiny_module():
    from tests.decoder import Llama, LlamaConfig

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64, max_seq_len=32)
    return capture(Llama(cfg).eval())


@pytest.mark.parametrize("pipeline", ["gptq(bits=4,group=16,exclude=lm_head)",
                                      "sparsify(method=sparsegpt,exclude=lm_head)",
                                      "factorize(method=svd_llm,ratio=0.5,multiple=8,exclude=lm_head)"])
def test_cpu_device_is_bit_identical_to_the_default(tiny_module, pipeline: str) -> None:
    calib = random_calibration(n=4, t=16)
    arts = [llmpress.compile(tiny_module, pipeline=pipeline, calibration=calib, progress=False, **kw)
            for kw in ({}, {"calib_device": "cpu"})]
    assert all(a.passes[0]["modified"] for a in arts)
    default, cpu = (a.module.weights() for a in arts)
    assert default.keys() == cpu.keys()
    assert all(torch.equal(default[k], cpu[k]) for k in default)


def test_recipe_carries_the_device(tmp_path: Path) -> None:
    (tmp_path / "c.txt").write_text("Once upon a time.\n")
    r = Recipe.from_dict({"pipeline": "gptq", "calibration": {"data": "c.txt", "device": "cpu"}},
                         path=tmp_path / "r.toml")
    assert r.calibration.device == "cpu"
    with pytest.raises(ConfigError, match="calibration.device"):
        Recipe.from_dict({"pipeline": "gptq", "calibration": {"data": "c.txt", "device": 0}},
                         path=tmp_path / "r.toml")


@pytest.mark.skipif(NO_CUDA, reason="needs CUDA")
def test_gptq_on_cuda_matches_cpu_within_rounding(tiny_module) -> None:
    """Where a GPU exists: the same compile with statistics and GPTQ math on CUDA. Float sums in another order
    move a few codes by one step at most; the output error stays the CPU's within 1%."""
    calib = random_calibration(n=4, t=16)
    pipe = "gptq(bits=4,group=16,exclude=lm_head)"
    cpu, cuda = (llmpress.compile(tiny_module, pipeline=pipe, calibration=calib, progress=False, calib_device=d)
                 for d in ("cpu", "cuda"))
    a, b = cpu.passes[0]["stats"]["layers"], cuda.passes[0]["stats"]["layers"]
    assert cuda.passes[0]["stats"]["calib_device"].startswith("cuda")
    for path in a:
        assert b[path]["output_error"] == pytest.approx(a[path]["output_error"], rel=0.01)
