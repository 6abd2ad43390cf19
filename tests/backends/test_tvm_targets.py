"""Target resolution of the TVM backend: names -> TVM target dicts, arch, device, cross compiler; bad names."""
from __future__ import annotations

import json

import pytest

from llmpress.backends.tvm.targets import TargetSpec, resolve_target
from llmpress.errors import ConfigError


def test_cpu_is_portable_x86_64_v3():
    s = resolve_target("cpu")
    assert s.tvm == {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "x86-64-v3"}
    assert (s.arch, s.device, s.cc) == ("x86_64", "cpu", None)
    assert "avx2" in s.features and "fma" in s.features


def test_cpu_carries_the_vnni_variant_unless_told(monkeypatch):
    monkeypatch.setenv("LLMPRESS_CPU_VARIANTS", "1")
    assert [v.name for v in resolve_target("cpu").variants] == ["cpu+avx512vnni"]
    monkeypatch.delenv("LLMPRESS_CPU_VARIANTS")
    assert [v.name for v in resolve_target("cpu").variants] == ["cpu+avx512vnni"]  # the default: users get both
    monkeypatch.setenv("LLMPRESS_CPU_VARIANTS", "0")
    assert resolve_target("cpu").variants == ()


def test_arm64_variants_add_features():
    base = resolve_target("arm64")
    assert base.tvm == {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]}
    assert (base.arch, base.cc) == ("aarch64", "aarch64-linux-gnu-g++")
    assert resolve_target("arm64:dotprod").tvm["mattr"] == ["+neon", "+dotprod"]
    assert resolve_target("arm64:i8mm").tvm["mattr"] == ["+neon", "+dotprod", "+i8mm"]  # i8mm cores have dotprod
    assert resolve_target("arm64:dotprod+i8mm").tvm["mattr"] == ["+neon", "+dotprod", "+i8mm"]


def test_cuda_default_and_arch():
    s = resolve_target("cuda")
    assert s.tvm["kind"] == "cuda" and s.tvm["arch"] == "sm_80" and s.tvm["host"]["kind"] == "llvm"
    assert (s.device, s.cuda_arch, s.arch) == ("cuda", "sm_80", "x86_64")
    assert resolve_target("cuda:sm_90").cuda_arch == "sm_90"


def test_escape_hatch_dict_and_json():
    d = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a76"}
    s = resolve_target(d)
    assert s.tvm == d and s.arch == "aarch64" and s.device == "cpu"
    assert resolve_target(json.dumps(d)).tvm == d
    c = resolve_target('{"kind": "cuda", "arch": "sm_86"}')
    assert c.device == "cuda" and c.cuda_arch == "sm_86"


def test_spec_json_round_trip():
    s = resolve_target("arm64:dotprod")
    assert TargetSpec.from_json(json.loads(json.dumps(s.to_json()))) == s


@pytest.mark.parametrize("name, suggestion", [("cpux", "cpu"), ("arm65", "arm64"), ("cdua", "cuda")])
def test_unknown_target_did_you_mean(name, suggestion):
    with pytest.raises(ConfigError, match=f"did you mean '{suggestion}'"):
        resolve_target(name)


@pytest.mark.parametrize("bad", ["arm64:sve9", "cuda:ampere", "cpu:fast", '{"kind": "vulkan"}', "{not json", 42])
def test_bad_targets_raise_config_error(bad):
    with pytest.raises(ConfigError):
        resolve_target(bad)


@pytest.mark.tvm
@pytest.mark.parametrize("name", ["cpu", "cpu:native", "arm64:dotprod+i8mm", "cuda:sm_90"])
def test_tvm_accepts_every_resolved_target(name):
    t = resolve_target(name).tvm_target()
    assert t.kind.name == ("cuda" if name.startswith("cuda") else "llvm")


def test_backend_dispatch_picks_tvm_for_cpu():
    from llmpress.backends import backend_for_target

    assert backend_for_target("cpu").name == "tvm"
    assert backend_for_target("reference").name == "reference"
