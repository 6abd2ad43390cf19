"""Backend options (``compile(backend_options=...)``, ``llmpress compile --backend-option KEY=VALUE``): checked before
the model loads, with errors that name the option and what the backend takes. Their effect on a build is checked
where the option matters (``test_tvm_sparse_kernels.py``'s forced build goes through them)."""
from __future__ import annotations

import pytest

import llmpress
from llmpress.backends import backend_for_target
from llmpress.backends.tvm import TVMBackend
from llmpress.cli import main
from llmpress.errors import ConfigError

MISSING = "/nonexistent/model"  # preflight fails on the options before it looks for the model


def test_tvm_options_configure_a_new_backend():
    base = backend_for_target("cpu")
    b = base.with_options({"sparse_kernels": "never", "epilogues": "decode", "inplace_cache": False})
    assert isinstance(b, TVMBackend) and b is not base
    assert (b.sparse_kernels, b.epilogues, b.inplace_cache, b.cpu_kernels) == ("never", "decode", False, True)
    assert (base.sparse_kernels, base.epilogues) == ("auto", False)  # the shared instance is untouched
    assert base.with_options({}) is base and base.with_options(None) is base


@pytest.mark.parametrize("target,options,message", [
    ("cpu", {"fast": True}, r"'fast' unknown to the tvm backend \(it takes cpu_kernels, epilogues, inplace_cache, "
                            r"sparse_kernels\)"),
    ("cpu", {"sparse_kernels": "sometimes"}, r"sparse_kernels='sometimes' must be one of auto, always, never"),
    ("cpu", {"epilogues": "prefill"}, r"epilogues=\.\.\.\) is True, False or 'decode'"),
    ("cpu", {"inplace_cache": "yes"}, r"inplace_cache='yes': true or false"),
    ("reference", {"epilogues": True}, r"'epilogues' unknown to the reference backend \(it takes none\)"),
])
def test_bad_options_fail_before_the_model_loads(target, options, message):
    with pytest.raises(ConfigError, match=message):
        llmpress.compile(MISSING, target=target, backend_options=options, progress=False)


def test_cli_parses_and_checks_backend_options(tmp_path, capsys):
    args = ["compile", MISSING, "-p", "exact", "-t", "cpu", "-o", str(tmp_path / "a")]
    assert main([*args, "--backend-option", "sparse_kernels"]) != 0
    assert "--backend-option 'sparse_kernels': expected KEY=VALUE" in capsys.readouterr().err
    assert main([*args, "--backend-option", "epilogues=true", "--backend-option", "inplace_cache=maybe"]) != 0
    assert "inplace_cache='maybe': true or false" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()


def test_a_recipes_backend_table_reaches_the_backend(tmp_path, capsys):
    from llmpress.passes.recipe import Recipe

    recipe = tmp_path / "r.toml"
    recipe.write_text('pipeline = "exact"\ntarget = "cpu"\n\n[backend]\nsparse_kernels = "always"\nturbo = true\n')
    assert Recipe.load(recipe).backend == {"sparse_kernels": "always", "turbo": True}
    args = ["compile", MISSING, "--recipe", str(recipe), "-o", str(tmp_path / "a")]
    assert main(args) != 0  # the recipe's settings are checked against the tvm backend, before the model
    assert "'turbo' unknown to the tvm backend" in capsys.readouterr().err
    recipe.write_text('pipeline = "exact"\ntarget = "cpu"\n\n[backend]\nsparse_kernels = "sometimes"\n')
    # The command line's setting wins over the recipe's bad one: the compile gets as far as the missing model
    assert main([*args, "--backend-option", "sparse_kernels=never"]) != 0
    err = capsys.readouterr().err
    assert "/nonexistent/model: no such file or folder" in err and "sometimes" not in err
    assert main(args) != 0
    assert "sparse_kernels='sometimes' must be one of" in capsys.readouterr().err
    with pytest.raises(ConfigError, match=r"'backend' must be a table of settings"):
        Recipe.from_dict({"pipeline": "exact", "backend": "fast"})
