"""Artifacts: atomic save, hashes and sizes verified on load, tar form, clear errors naming the file."""
from __future__ import annotations

import json

import pytest
import torch

import llmpress
from llmpress.errors import ArtifactError


@pytest.fixture
def art(tiny_llama):
    return llmpress.compile(tiny_llama, pipeline="", target="reference", progress=False)


def _x(model, t=4):
    ids = torch.arange(1, t + 1).view(1, t)
    return (ids, torch.zeros(1, dtype=torch.int64), *model.empty_cache())


def test_compiled_is_callable_like_forward(art, tiny_llama):
    x = _x(tiny_llama)
    assert torch.equal(art(*x)[0], tiny_llama(*x)[0])
    assert art.manifest["lm"]["n_layers"] == 2
    assert art.manifest["parameter_bytes"]["before"] == art.manifest["parameter_bytes"]["after"]


@pytest.mark.parametrize("suffix", ["", ".tar"])
def test_save_load_roundtrip(art, tiny_llama, tmp_path, suffix):
    out = art.save(tmp_path / f"a{suffix}")
    loaded = llmpress.load(out)
    x = _x(tiny_llama)
    assert torch.equal(loaded(*x)[0], art(*x)[0])
    assert loaded.generate_ids([1], 5) == art.generate_ids([1], 5)
    m = loaded.manifest
    assert m["format_version"] == 1 and m["backend"] == "reference"
    assert {"llmpress", "torch", "tvm"} <= set(m["versions"])
    assert "program.pt2" in m["files"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary leftovers


def test_every_file_is_checked(art, tmp_path):
    out = art.save(tmp_path / "a")
    for rel in json.loads((out / "manifest.json").read_text())["files"]:
        f = out / rel
        data = f.read_bytes()
        # one flipped byte
        f.write_bytes(data[:10] + bytes([data[10] ^ 0xFF]) + data[11:])
        with pytest.raises(ArtifactError, match=rel.replace(".", r"\.")):
            llmpress.load(out)
        # truncated
        f.write_bytes(data[: len(data) // 2])
        with pytest.raises(ArtifactError, match="truncated"):
            llmpress.load(out)
        f.write_bytes(data)
    llmpress.load(out)  # restored: loads again


def test_damaged_manifest_and_missing_files(art, tmp_path):
    out = art.save(tmp_path / "a")
    manifest = out / "manifest.json"
    text = manifest.read_text()
    manifest.write_text(text[: len(text) // 2])
    with pytest.raises(ArtifactError, match="manifest.json: damaged"):
        llmpress.load(out)
    manifest.write_text(text)
    (out / "program.pt2").unlink()
    with pytest.raises(ArtifactError, match="program.pt2: missing"):
        llmpress.load(out)
    with pytest.raises(ArtifactError, match="no such artifact"):
        llmpress.load(tmp_path / "nothing")


def test_damaged_tar(art, tmp_path):
    out = art.save(tmp_path / "a.tar")
    data = out.read_bytes()
    out.write_bytes(data[: len(data) // 3])
    with pytest.raises(ArtifactError, match="a.tar"):
        llmpress.load(out)


def test_interrupted_save_leaves_nothing(art, tmp_path, monkeypatch):
    def boom(folder):
        (folder / "program.pt2").write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(art.compiled, "save_payload", boom)
    with pytest.raises(KeyboardInterrupt):
        art.save(tmp_path / "a")
    assert list(tmp_path.iterdir()) == []
