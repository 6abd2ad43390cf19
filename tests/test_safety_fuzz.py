"""Malformed pipeline texts, recipes and output paths: only llmpress's own errors come out, and nothing is written.

Parse-only (no model is loaded), so hundreds of examples run in seconds.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmpress.errors import LlmpressError
from llmpress.passes.pipeline import parse, print_pipeline
from llmpress.passes.recipe import Recipe
from llmpress.preflight import check_compile

from .conftest import STORIES260K

MODEL = str(STORIES260K / "stories260K.bin")
FUZZ = settings(max_examples=500, deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

# Pieces of real pipeline text, so mutations reach deep into the parser and the option checks, not only the first
# character; plus arbitrary text.
_PIECES = ["quantize", "gptq", "awq", "fuse_qkv", "dce", "exact", "scope", "smoothquant", "kv_quant", "act_quant",
           "w4a8", "(", ")", "[", "]", ",", "=", '"', "\\", " ", "bits", "group", "sym", "include", "exclude",
           "alpha", "4", "-1", "0", "128", "1e-2", "0.5", "true", "false", "lm_head", "*.down_proj", "|", "nan",
           "inf", "\n", "\x00", "é"]
pipeline_texts = st.one_of(st.lists(st.sampled_from(_PIECES), max_size=14).map("".join), st.text(max_size=40))


@pytest.fixture
def cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _only_ours(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except LlmpressError:
        return None


@FUZZ
@given(text=pipeline_texts)
def test_pipeline_text_fails_only_with_llmpress_errors(cwd, text):
    p = _only_ours(parse, text)
    if p is not None:
        assert parse(print_pipeline(p)) == p
    # parse + build + every option + the output check, as compile runs them before loading the model
    _only_ours(check_compile, MODEL, pipeline=text, output=str(cwd / "out"))
    assert list(cwd.iterdir()) == []


_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12)
                       | st.sampled_from(["calib.txt", "quantize(bits=4)", "cpu", "exact"]),
                       lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                                    max_size=3), max_leaves=8)
_keys = st.sampled_from(["pipeline", "target", "calibration", "data", "samples", "seq_len", "seed", "pipe"])
recipes = st.dictionaries(_keys, _values | pipeline_texts | st.dictionaries(_keys, _values, max_size=4), max_size=4)


@FUZZ
@given(data=st.one_of(recipes, _values))
def test_recipe_tables_fail_only_with_llmpress_errors(cwd, data):
    (cwd / "calib.txt").write_text("Once upon a time.\n")
    _only_ours(Recipe.from_dict, data, path=cwd / "r.toml")
    assert sorted(p.name for p in cwd.iterdir()) == ["calib.txt"]


_toml_pieces = ["pipeline", "target", "[calibration]", "data", "samples", " = ", '"', "'", "\n", "[", "]", "{", "}",
                "quantize(bits=4)", "exact", "128", "-", ":", "#", ",", "calib.txt", "true", "1979-05-27"]


@FUZZ
@given(text=st.one_of(st.lists(st.sampled_from(_toml_pieces), max_size=16).map("".join), st.text(max_size=60)),
       suffix=st.sampled_from([".toml", ".yaml", ".yml", ".json"]))
def test_recipe_files_fail_only_with_llmpress_errors(cwd, text, suffix):
    f = cwd / f"recipe{suffix}"
    f.write_text(text)
    _only_ours(Recipe.load, f)
    assert [p.name for p in cwd.iterdir()] == [f.name]
    f.unlink()


@FUZZ
@given(out=st.one_of(st.text(max_size=20), st.lists(st.sampled_from([".", "..", "/", "a", "b.tar", "\x00", " ", "~"]),
                                                     max_size=6).map("".join)))
def test_output_paths_fail_only_with_llmpress_errors(cwd, out):
    (cwd / "held").mkdir(exist_ok=True)
    (cwd / "held" / "f").write_text("x")
    _only_ours(check_compile, MODEL, pipeline="exact", output=out)
    assert sorted(str(p.relative_to(cwd)) for p in cwd.rglob("*")) == ["held", os.path.join("held", "f")]
    assert Path(MODEL).is_file()
