"""Nothing a user does by mistake costs data or a wasted run.

Outputs never replace what is not an llmpress artifact (and an artifact only with --force / overwrite=True); every
mistake findable without the model is reported before the model loads; Ctrl-C prints one line and exits 130 with
nothing half-written; a loaded .tar leaves no temporary files; artifact files get the user's umask.
"""
from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

import llmpress
from llmpress.cli import main
from llmpress.errors import ConfigError, LlmpressError

from .conftest import CALIB, REPO, STORIES260K

MODEL = str(STORIES260K / "stories260K.bin")


def _snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): (p.stat().st_mode, p.read_bytes() if p.is_file() else None)
            for p in sorted(folder.rglob("*"))}


@pytest.fixture
def no_load(monkeypatch):
    """Make loading a model an error, and record whether anything tried to."""
    calls = []

    def prepare(*a, **k):
        calls.append(a)
        raise AssertionError("the model was loaded before the mistake was reported")

    monkeypatch.setattr("llmpress.api.prepare", prepare)
    return calls


@pytest.fixture
def art(tiny_llama):
    return llmpress.compile(tiny_llama, pipeline="", progress=False)


# -- outputs ----------------------------------------------------------------------------------------------------
def test_users_folder_survives(tmp_path, capsys, no_load):
    mine = tmp_path / "mine"
    (mine / "sub").mkdir(parents=True)
    (mine / "notes.txt").write_text("precious")
    (mine / "sub" / "data.bin").write_bytes(b"\x00\x01")
    before = _snapshot(mine)
    mode = mine.stat().st_mode
    for extra in ([], ["--force"]):
        assert main(["compile", MODEL, "--pipeline", "exact", "-o", str(mine), "-q", *extra]) == 2
        err = capsys.readouterr().err
        assert str(mine) in err and "not an llmpress artifact" in err
        assert _snapshot(mine) == before and mine.stat().st_mode == mode
    assert not no_load


def test_input_model_and_its_folders_survive(tmp_path, capsys, no_load):
    model = tmp_path / "m"
    model.mkdir()
    for f in ("stories260K.bin", "tok512.bin"):
        (model / f).write_bytes((STORIES260K / f).read_bytes())
    before = _snapshot(model)
    for out in (model, tmp_path, model / "stories260K.bin"):
        assert main(["compile", str(model / "stories260K.bin"), "--pipeline", "exact", "-o", str(out), "-q",
                     "--force"]) == 2
        err = capsys.readouterr().err
        assert "input" in err and str(out) in err
    assert _snapshot(model) == before and not no_load


def test_existing_file_survives(tmp_path, capsys, no_load):
    f = tmp_path / "out"
    f.write_text("mine")
    for out in (f, tmp_path / "x.tar"):
        if out.suffix == ".tar":
            with tarfile.open(out, "w") as tar:  # a tar, but not an artifact
                tar.add(f, arcname="out")
        before = out.read_bytes()
        assert main(["compile", MODEL, "--pipeline", "exact", "-o", str(out), "-q", "--force"]) == 2
        assert str(out) in capsys.readouterr().err
        assert out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "x.tar"]  # no hidden leftovers either
    assert not no_load


@pytest.mark.parametrize("out", [".", "..", "sub/..", "/"])
def test_dot_and_root_are_refused(tmp_path, monkeypatch, capsys, no_load, out):
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path)
    assert main(["compile", MODEL, "--pipeline", "exact", "-o", out, "-q"]) == 2
    assert f"output {out!r}" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["sub"] and not no_load


def test_unwritable_destination_is_refused(tmp_path, monkeypatch, capsys, no_load):
    ro = tmp_path / "ro"
    ro.mkdir()
    if os.geteuid() != 0:  # root writes anywhere; then the check is exercised through os.access
        ro.chmod(0o555)
    else:
        real = os.access
        monkeypatch.setattr("llmpress.outputs.os.access", lambda p, m: False if Path(p) == ro else real(p, m))
    try:
        assert main(["compile", MODEL, "--pipeline", "exact", "-o", str(ro / "a" / "out"), "-q"]) == 2
        assert "not writable" in capsys.readouterr().err
        assert list(ro.iterdir()) == [] and not no_load
    finally:
        ro.chmod(0o755)


def test_full_disk_is_refused(tmp_path, monkeypatch, capsys, no_load):
    import types

    full = types.SimpleNamespace(total=10, used=0, free=10)
    monkeypatch.setattr("llmpress.outputs.shutil.disk_usage", lambda p: full)
    assert main(["compile", MODEL, "--pipeline", "exact", "-o", str(tmp_path / "out"), "-q"]) == 2
    assert "MB free" in capsys.readouterr().err and not no_load


def test_force_replaces_only_an_artifact(art, tmp_path, capsys):
    out = art.save(tmp_path / "a")
    assert main(["compile", MODEL, "--pipeline", "exact", "-o", str(out), "-q"]) == 2
    assert "--force" in capsys.readouterr().err
    assert main(["compile", MODEL, "--pipeline", "exact", "-o", str(out), "-q", "--force"]) == 0
    assert llmpress.load(out).manifest["pipeline"] == "exact"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]


def test_save_overwrite_and_empty_folder(art, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    art.save(empty)  # an empty folder may be used
    with pytest.raises(ConfigError, match="overwrite=True"):
        art.save(empty)
    art.save(empty, overwrite=True)
    tar = art.save(tmp_path / "a.tar")
    with pytest.raises(ConfigError, match="overwrite=True"):
        art.save(tar)
    art.save(tar, overwrite=True)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "f").write_text("x")
    with pytest.raises(ConfigError, match="not an llmpress artifact"):
        art.save(tmp_path / "other", overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.tar", "empty", "other"]


def test_artifact_files_get_the_umask(art, tmp_path):
    old = os.umask(0o027)
    try:
        out = art.save(tmp_path / "a")
        tar = art.save(tmp_path / "a.tar")
    finally:
        os.umask(old)
    for p in [out, *out.rglob("*")]:
        want = 0o750 if p.is_dir() else 0o640
        assert p.stat().st_mode & 0o777 == want, p
    assert tar.stat().st_mode & 0o777 == 0o640


# -- errors before work -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("args, message", [
    (["--pipeline", "fuse_qkv,,dce"], "empty element"),
    (["--pipeline", "quantize(bits=5)"], "bits=5 is not supported"),
    (["--pipeline", "quantize(bts=4)"], "did you mean 'bits'"),
    (["--pipeline", "exact", "--target", "cpux"], "no backend compiles for target 'cpux'"),
    (["--pipeline", "gptq(group=32)"], "needs calibration data"),
    (["--pipeline", "gptq(group=32)", "--calib", "/nonexistent/calib.txt"], "does not exist"),
    (["--pipeline", "gptq(group=32)", "--calib", "EMPTY"], "is empty"),
    (["--pipeline", "exact", "--tokenizer", "/nonexistent/tok.bin"], "no such file"),
    (["--pipeline", "quantize(bits=4,group=32),fuse_qkv"], "put fuse_qkv before quantize"),
])
def test_mistakes_are_reported_before_loading(tmp_path, capsys, no_load, args, message):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n")
    args = [str(empty) if a == "EMPTY" else a for a in args]
    assert main(["compile", MODEL, *args, "-o", str(tmp_path / "out")]) == 2
    assert message in capsys.readouterr().err
    assert not no_load and not (tmp_path / "out").exists()


def test_api_checks_before_loading(tmp_path, no_load):
    model = tmp_path / "model.bin"
    model.write_bytes((STORIES260K / "stories260K.bin").read_bytes())
    for kwargs, message in [({"pipeline": "quantize(group=-7)"}, "group=-7"),
                            ({"pipeline": "exact", "target": "nope"}, "nope"),
                            ({"pipeline": "awq", "calibration": str(tmp_path / "none.txt")}, "none.txt"),
                            ({"pipeline": "exact", "output": str(tmp_path)}, "contains the input"),
                            ({"pipeline": "exact", "output": str(model)}, "is the input")]:
        with pytest.raises(LlmpressError, match=message):
            llmpress.compile(str(model), **kwargs)
    with pytest.raises(LlmpressError, match="missing.bin"):
        llmpress.compile(str(tmp_path / "missing.bin"), pipeline="exact")
    assert not no_load and sorted(p.name for p in tmp_path.iterdir()) == ["model.bin"]


def test_every_misfit_layer_is_listed_before_any_pass(tiny_llama, monkeypatch):
    from llmpress.api import prepare, run_pipeline
    from llmpress.passes.manager import PassManager

    ran = []
    monkeypatch.setattr(PassManager, "run", lambda self, *a, **k: ran.append(1))
    module, _ = prepare(tiny_llama)
    with pytest.raises(ConfigError) as e:
        run_pipeline(module, "fuse_qkv,quantize(group=24,exclude=lm_head)")
    msg = str(e.value)
    # every linear of both blocks has in_features 32 or 64, neither divisible by 24
    assert msg.count("does not divide") == 14 and "model.layers.1.mlp.down_proj" in msg and "lm_head" not in msg
    assert not ran


# -- interrupts -------------------------------------------------------------------------------------------------
_SLOW_GPTQ = """
import pathlib, sys, time
import llmpress.passes.gptq as g

def slow(*a, **k):  # stands for the long Hessian work; tells the test that gptq is running
    pathlib.Path(sys.argv[1]).write_text("in gptq")
    time.sleep(120)

g.GPTQ._hessians = slow
from llmpress.cli import main
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.slow  # a real process and a real SIGINT: 8-15 s, most of it importing torch and capturing the model
def test_ctrl_c_prints_one_line_and_leaves_nothing(tmp_path):
    out = tmp_path / "out"
    marker = tmp_path / "marker"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen(
        [sys.executable, "-c", _SLOW_GPTQ, str(marker), "compile", MODEL, "--pipeline",
         "gptq(group=32,exclude=down_proj)", "--calib", str(CALIB), "-o", str(out), "-q"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path,
        # A shell that starts jobs in the background ignores SIGINT in them; a terminal's Ctrl-C is not ignored.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 180
        while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert marker.exists(), proc.communicate(timeout=5)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == f"llmpress: interrupted; nothing written to {out}"
    assert len(err.strip().splitlines()) == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["marker"]


def test_ctrl_c_in_compile_says_nothing_was_written(tmp_path, monkeypatch, capsys):
    def interrupt(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr("llmpress.api.prepare", interrupt)
    out = tmp_path / "out"
    assert main(["compile", MODEL, "--pipeline", "exact", "-o", str(out), "-q"]) == 130
    assert capsys.readouterr().err == f"llmpress: interrupted; nothing written to {out}\n"
    assert list(tmp_path.iterdir()) == []


def test_ctrl_c_in_run_says_interrupted(art, tmp_path, monkeypatch, capsys):
    folder = art.save(tmp_path / "a")

    def interrupt(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr("llmpress.artifact.Artifact.generate", interrupt)
    assert main(["run", str(folder)]) == 130
    assert capsys.readouterr().err == "llmpress: interrupted\n"


# -- no leaks ---------------------------------------------------------------------------------------------------
def test_tar_artifact_leaves_no_temporary_files(art, tmp_path, monkeypatch):
    import tempfile

    tar = art.save(tmp_path / "a.tar")
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))

    def residue():
        return list(tmp.glob("llmpress-artifact-*"))

    loaded = llmpress.load(tar)
    assert len(residue()) == 1
    loaded.close()
    assert residue() == []
    with llmpress.load(tar) as loaded:
        assert len(residue()) == 1
    assert residue() == []
    loaded = llmpress.load(tar)
    del loaded
    gc.collect()
    assert residue() == []
    assert main(["inspect", str(tar), "--json"]) == 0
    gc.collect()
    assert residue() == []


def test_tar_extraction_is_removed_at_exit(art, tmp_path):
    tar = art.save(tmp_path / "a.tar")
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    code = ("import llmpress, sys, pathlib; a = llmpress.load(sys.argv[1]); "
            "print(len(list(pathlib.Path(sys.argv[2]).glob('llmpress-artifact-*'))))")
    env = dict(os.environ, PYTHONPATH=str(REPO), TMPDIR=str(tmp))
    res = subprocess.run([sys.executable, "-c", code, str(tar), str(tmp)], capture_output=True, text=True, env=env,
                         timeout=300)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "1"  # it existed while the artifact was in use
    assert list(tmp.glob("llmpress-artifact-*")) == []
