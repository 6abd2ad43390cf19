"""Recipes: TOML/YAML files holding pipeline text, target and calibration settings."""
from __future__ import annotations

from pathlib import Path

import pytest

from llmpress.errors import ConfigError, PipelineSyntaxError
from llmpress.passes.pipeline import parse
from llmpress.passes.recipe import CalibrationSpec, Recipe

REPO = Path(__file__).resolve().parents[2]


def _write(folder: Path, name: str, text: str) -> Path:
    p = folder / name
    p.write_text(text)
    return p


def test_toml_with_calibration_defaults_and_relative_data(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "calib.txt").write_text("Once upon a time\n")
    p = _write(tmp_path, "r.toml", 'pipeline = "fold_constants, fuse_qkv(exclude=lm_head)"\ntarget = "cpu"\n'
                                   '[calibration]\ndata = "data/calib.txt"\nsamples = 16\n')
    r = Recipe.load(p)
    assert r.pipeline == parse("fold_constants,fuse_qkv(exclude=lm_head)")
    assert str(r.pipeline) == "fold_constants,fuse_qkv(exclude=lm_head)"
    assert r.target == "cpu" and r.path == str(p)
    assert r.calibration == CalibrationSpec(data=str(tmp_path / "data" / "calib.txt"), samples=16, seq_len=256,
                                            seed=0)


def test_yaml_is_the_same_recipe(tmp_path: Path) -> None:
    calib = _write(tmp_path, "c.txt", "text\n")
    y = _write(tmp_path, "r.yaml", f"pipeline: exact\ncalibration:\n  data: {calib}\n  seq_len: 64\n  seed: 3\n")
    r = Recipe.load(y)
    assert str(r.pipeline) == "exact" and r.target is None
    assert r.calibration == CalibrationSpec(data=str(calib), samples=128, seq_len=64, seed=3)


def test_repo_exact_recipe_loads() -> None:
    r = Recipe.load(REPO / "recipes" / "exact.toml")
    assert str(r.pipeline) == "exact" and r.calibration is None


@pytest.mark.parametrize(("text", "fragment"), [
    ('pipline = "exact"\n', "unknown key 'pipline'; did you mean 'pipeline'?"),
    ('target = "cpu"\n', "missing required key 'pipeline'"),
    ('pipeline = 3\n', "'pipeline' must be pipeline text"),
    ('pipeline = "exact"\ntarget = 1\n', "'target' must be a string"),
    ('pipeline = "exact"\n[calibration]\ndata = "c.txt"\nsample = 3\n',
     "unknown key calibration.'sample'; did you mean 'samples'?"),
    ('pipeline = "exact"\n[calibration]\nsamples = 3\n', "needs 'data'"),
    ('pipeline = "exact"\n[calibration]\ndata = "missing.txt"\n', "does not exist"),
    ('pipeline = "exact"\n[calibration]\ndata = "c.txt"\nsamples = "many"\n', "calibration.samples must be an integer"),
    ('pipeline = "exact"\n[calibration]\ndata = "c.txt"\nseq_len = 0\n', "calibration.seq_len must be >= 1"),
    ('pipeline = "exact"\ncalibration = 5\n', "'calibration' must be a table"),
    ('pipeline = \n', "cannot parse TOML"),
])
def test_bad_recipes_name_the_file_and_the_key(tmp_path: Path, text: str, fragment: str) -> None:
    _write(tmp_path, "c.txt", "x\n")
    p = _write(tmp_path, "bad.toml", text)
    with pytest.raises(ConfigError) as info:
        Recipe.load(p)
    assert str(p) in str(info.value) and fragment in str(info.value)


def test_pipeline_errors_keep_their_column_and_gain_the_file_name(tmp_path: Path) -> None:
    p = _write(tmp_path, "r.toml", 'pipeline = "dce,fuse_qvk"\n')
    with pytest.raises(PipelineSyntaxError) as info:
        Recipe.load(p)
    assert info.value.message.startswith(f"{p}: unknown pass 'fuse_qvk'")
    assert "did you mean 'fuse_qkv'" in info.value.message and info.value.column == 5
    p = _write(tmp_path, "r2.yaml", 'pipeline: "fuse_qkv(min_group=2"\n')
    with pytest.raises(PipelineSyntaxError) as info:
        Recipe.load(p)
    assert info.value.message == f"{p}: unclosed '('" and info.value.column == 9


def test_unknown_format_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        Recipe.load(tmp_path / "nope.toml")
    with pytest.raises(ConfigError, match="unknown format '.json'"):
        Recipe.load(_write(tmp_path, "r.json", "{}"))
    with pytest.raises(ConfigError, match="a recipe is a table"):
        Recipe.load(_write(tmp_path, "r.yaml", "- a\n- b\n"))
