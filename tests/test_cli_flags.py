"""CLI conveniences: --version, -v/-q anywhere, --threads, generation limits said out loud."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from llmpress.cli import build_parser, main

from .conftest import REPO, STORIES260K

MODEL = str(STORIES260K / "stories260K.bin")


def test_version_names_llmpress_torch_and_tvm(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("llmpress ") and f"torch {torch.__version__}" in out and "TVM " in out


@pytest.mark.parametrize("argv", [["-v", "passes"], ["passes", "-v"], ["passes", "--verbose"]])
def test_verbose_before_or_after_the_command(argv):
    a = build_parser().parse_args(argv)
    assert a.verbose is True and a.quiet is False


def test_quiet_after_the_command_and_threads_on_compile():
    a = build_parser().parse_args(["compile", MODEL, "--pipeline", "exact", "-o", "x", "-q", "--threads", "1"])
    assert a.quiet is True and a.verbose is False and a.threads == 1
    a = build_parser().parse_args(["-q", "run", MODEL])
    assert a.quiet is True


def test_threads_set_torch_threads(capsys, tmp_path):
    before = torch.get_num_threads()
    try:
        # Set before the command runs (here it then fails: no such model).
        assert main(["run", str(tmp_path / "nope.bin"), "--threads", "1"]) == 2
        assert torch.get_num_threads() == 1
        assert main(["run", str(tmp_path / "nope.bin"), "--threads", "0"]) == 2
        assert "--threads must be at least 1" in capsys.readouterr().err
    finally:
        torch.set_num_threads(before)


def test_negative_max_new_tokens_is_refused_before_loading(capsys, tmp_path):
    # The model does not exist: the error must be about the number, found before any loading.
    assert main(["run", str(tmp_path / "nope.bin"), "--max-new-tokens", "-1"]) == 2
    err = capsys.readouterr().err
    assert "--max-new-tokens must be 0 or more, got -1" in err and "nope.bin" not in err


def test_a_full_cache_is_one_warning_line():
    # stories260K has a 512-position cache: a ~500-token prompt leaves room for a few of the 200 tokens asked.
    prompt = "Once upon a time there was a little dog. " * 45
    env = dict(os.environ, PYTHONPATH=str(REPO))
    out = subprocess.run([sys.executable, "-m", "llmpress", "run", MODEL, "--prompt", prompt, "--max-new-tokens",
                          "200"], capture_output=True, text=True, env=env)
    assert out.returncode == 0
    assert out.stdout.startswith(prompt.strip())
    (line,) = out.stderr.splitlines()
    assert line.startswith("llmpress: warning: the 512-position KV cache holds ")
    assert "of the 200 new tokens requested" in line
    room = int(line.split(" holds ")[1].split()[0])
    assert 0 < room < 200 and line.endswith(f"generated {room}")
