"""Pipeline text: parsing, canonical printing, error columns, building passes, presets and scopes."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llmpress.errors import ConfigError, PipelineSyntaxError
from llmpress.passes.dce import DeadCodeElimination
from llmpress.passes.fuse_qkv import FuseQKV
from llmpress.passes.pipeline import Element, Pipeline, build, parse, pipeline_of, print_pipeline
from llmpress.passes.presets import PRESETS
from llmpress.passes.registry import PASSES


def test_parse_design_example() -> None:
    p = parse("fuse,gptq(bits=4,group=128,exclude=lm_head),sparsify(method=wanda,pattern=2:4)")
    assert [e.name for e in p] == ["fuse", "gptq", "sparsify"]
    assert p.elements[1].options == (("bits", 4), ("group", 128), ("exclude", "lm_head"))
    assert p.elements[2].options == (("method", "wanda"), ("pattern", "2:4"))


def test_value_types() -> None:
    (e,) = parse('x(a=128,b=-1,c=0.5,d=1e-2,e=true,f=false,g=model.layers.*.mlp,h=lm_head|*.down_proj,'
                 'i="a, b(c)[d]=e",j="say \\"hi\\" \\\\ bye",k="12")').elements
    vals = dict(e.options)
    assert vals["a"] == 128 and type(vals["a"]) is int
    assert vals["b"] == -1 and type(vals["b"]) is int
    assert vals["c"] == 0.5 and type(vals["c"]) is float
    assert vals["d"] == 0.01 and type(vals["d"]) is float
    assert vals["e"] is True and vals["f"] is False
    assert vals["g"] == "model.layers.*.mlp"
    assert vals["h"] == "lm_head|*.down_proj"
    assert vals["i"] == "a, b(c)[d]=e"
    assert vals["j"] == 'say "hi" \\ bye'
    assert vals["k"] == "12" and type(vals["k"]) is str  # quoted: stays a string


def test_whitespace_ignored_and_printing_canonical() -> None:
    text = ('  fold_constants , scope ( exclude = lm_head ) [ fuse_qkv ( min_group = 2 ) , dce ] ,'
            ' x(f=1e-2,s="12",t="a b")')
    p = parse(text)
    assert str(p) == 'fold_constants,scope(exclude=lm_head)[fuse_qkv(min_group=2),dce],x(f=0.01,s="12",t="a b")'
    assert print_pipeline(p) == str(p)
    assert parse(str(p)) == p
    assert str(parse(str(p))) == str(p)  # printing is a fixed point


def test_empty_text_is_the_empty_pipeline() -> None:
    assert parse("") == Pipeline(())
    assert parse("   ") == Pipeline(())
    assert build("") == []


@pytest.mark.parametrize(("text", "column", "fragment"), [
    ("gptq(bits=4", 5, "unclosed '('"),
    ("gptq(bits=4,group=128", 5, "unclosed '('"),
    ("scope[dce", 6, "unclosed '['"),
    ("scope[scope[dce]", 6, "unclosed '['"),
    ("dce)", 4, "unexpected ')'"),
    ("dce]", 4, "unexpected ']'"),
    ("gptq(bits)", 10, "expected '=' after option 'bits'"),
    ("gptq(bits 4)", 11, "expected '='"),
    ("gptq(bits=)", 11, "missing value for option 'bits'"),
    ("gptq(bits=,group=1)", 11, "missing value for option 'bits'"),
    ("gptq(bits=4,bits=8)", 13, "duplicate option 'bits'"),
    ("dce,,fuse_qkv", 5, "empty element"),
    (",dce", 1, "empty element"),
    ("dce,", 4, "trailing comma"),
    ("scope[dce,]", 10, "trailing comma"),
    ("scope[]", 7, "empty nested pipeline"),
    ("dce;fuse_qkv", 4, "unexpected character ';'"),
    ("dce fuse_qkv", 5, "unexpected character 'f'"),
    ("gptq()", 6, "expected an option name"),
    ("gptq(1=2)", 6, "expected an option name"),
    ("gptq(bits=4 group=2)", 13, "expected ',' or ')'"),
    ("gptq(bits=(4))", 11, "unexpected character '('"),
    ('x(s="abc)', 5, "unterminated string"),
    ("9lives", 1, "expected a pass name"),
])
def test_syntax_errors_point_at_the_column(text: str, column: int, fragment: str) -> None:
    with pytest.raises(PipelineSyntaxError) as info:
        parse(text)
    err = info.value
    assert err.column == column, (text, err)
    assert fragment in err.message
    assert err.text == text
    # The caret line puts '^' under that column.
    caret_line = str(err).splitlines()[-1]
    assert caret_line.index("^") - 2 == column - 1
    assert isinstance(err, ConfigError)


def test_unknown_pass_did_you_mean_at_the_name_column() -> None:
    with pytest.raises(PipelineSyntaxError) as info:
        build("dce, fuse_qvk(min_group=2)")
    assert info.value.column == 6
    assert "unknown pass 'fuse_qvk'" in info.value.message
    assert "did you mean 'fuse_qkv'" in info.value.message


def test_bad_option_points_at_the_option() -> None:
    with pytest.raises(PipelineSyntaxError) as info:
        build("dce,fuse_qkv(all_siblings=true,min_grop=2)")
    assert info.value.column == 32
    assert "unknown option 'min_grop'" in info.value.message and "did you mean 'min_group'" in info.value.message
    with pytest.raises(PipelineSyntaxError) as info:
        build("fuse_qkv(min_group=two)")
    assert info.value.column == 10
    assert "expected an integer" in info.value.message
    with pytest.raises(PipelineSyntaxError) as info:  # rejected by Options.validate()
        build("fuse_qkv(exclude=lm_head,min_group=1)")
    assert info.value.column == 26
    assert "at least 2" in info.value.message


def test_only_scope_nests() -> None:
    with pytest.raises(PipelineSyntaxError) as info:
        build("dce,fuse_qkv[dce]")
    assert info.value.column == 5
    assert "only scope takes a nested pipeline" in info.value.message
    with pytest.raises(PipelineSyntaxError) as info:
        build("scope(include=x)")
    assert "needs a nested pipeline" in info.value.message
    with pytest.raises(PipelineSyntaxError) as info:
        build("scope(inclde=x)[dce]")
    assert info.value.column == 7 and "did you mean 'include'" in info.value.message


def test_build_resolves_passes_and_options() -> None:
    passes = build("fuse_qkv(min_group=2,exclude=lm_head|*.mlp.*),dce")
    assert [type(p) for p in passes] == [FuseQKV, DeadCodeElimination]
    assert passes[0].options.min_group == 2
    assert passes[0].options.exclude == ("lm_head", "*.mlp.*")


def test_scope_applies_include_exclude_unless_the_inner_element_sets_them() -> None:
    passes = build("scope(include=model.layers.*,exclude=lm_head)[fuse_qkv,fuse_qkv(exclude=x),dce],fuse_qkv")
    assert passes[0].options.include == ("model.layers.*",) and passes[0].options.exclude == ("lm_head",)
    assert passes[1].options.include == ("model.layers.*",) and passes[1].options.exclude == ("x",)
    assert isinstance(passes[2], DeadCodeElimination)  # NoOptions: scope does not apply
    assert passes[3].options.include == () and passes[3].options.exclude == ()
    # Nested scopes: the inner one overrides what it sets and inherits the rest.
    (p,) = build("scope(include=a,exclude=b)[scope(exclude=c)[fuse_qkv]]")
    assert p.options.include == ("a",) and p.options.exclude == ("c",)


def test_presets_expand_in_place_and_take_no_options() -> None:
    assert [p.name for p in build("exact")] == ["fold_constants", "fuse_qkv", "dce"]
    assert [p.name for p in build("dce,exact")] == ["dce", "fold_constants", "fuse_qkv", "dce"]
    (scoped,) = [p for p in build("scope(exclude=lm_head)[exact]") if p.name == "fuse_qkv"]
    assert scoped.options.exclude == ("lm_head",)
    with pytest.raises(PipelineSyntaxError) as info:
        build("dce,exact(bits=4)")
    assert info.value.column == 11 and "takes no options" in info.value.message


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_parses_and_builds(name: str) -> None:
    assert name not in PASSES(), f"preset {name!r} shadows a pass of the same name"
    text = PRESETS[name]
    p = parse(text)
    assert parse(str(p)) == p
    passes = build(name)
    assert passes and [q.name for q in passes] == [q.name for q in build(text)]


def test_pipeline_of_round_trips_options() -> None:
    passes = build("fuse_qkv(min_group=2,exclude=lm_head|x.*),fold_constants(max_literal_bytes=0),dce")
    again = build(str(pipeline_of(passes)))
    assert [(p.name, p.options) for p in again] == [(p.name, p.options) for p in passes]


def test_elements_built_in_code_get_columns_when_built() -> None:
    p = Pipeline((Element("dce"), Element("fuse_qkv", (("min_group", "x"),))))
    with pytest.raises(PipelineSyntaxError) as info:
        build(p)
    assert info.value.text == "dce,fuse_qkv(min_group=x)" and info.value.column == 14


def test_non_finite_floats_cannot_be_printed() -> None:
    with pytest.raises(ConfigError):
        str(Pipeline((Element("x", (("a", float("inf")),)),)))


# -- the round-trip property ------------------------------------------------------------------------------------
_names = st.from_regex(r"[A-Za-z_][A-Za-z0-9_\-]{0,6}", fullmatch=True)
_values = st.one_of(
    st.integers(min_value=-10**12, max_value=10**12),
    st.floats(allow_nan=False, allow_infinity=False),
    st.booleans(),
    st.text(max_size=8),
    st.sampled_from(["lm_head", "model.layers.*.mlp", "lm_head|*.down_proj", "2:4", "true", "1e5", "-3", "a b",
                     'q"uote', "back\\slash", "(", "[x]", "=", ",", ""]),
)


@st.composite
def _options(draw):
    keys = draw(st.lists(_names, max_size=4, unique=True))
    return tuple((k, draw(_values)) for k in keys)


def _pipelines(depth: int):
    children = st.none() if depth == 0 else st.one_of(st.none(), _pipelines(depth - 1))
    element = st.builds(Element, _names, _options(), children)
    return st.builds(lambda els: Pipeline(tuple(els)), st.lists(element, min_size=1, max_size=4))


def _typed(p: Pipeline | None):
    """The pipeline as nested tuples with value types, so True vs 1 vs 1.0 would count as different."""
    if p is None:
        return None
    return tuple((e.name, tuple((k, type(v).__name__, v) for k, v in e.options), _typed(e.children))
                 for e in p.elements)


@settings(max_examples=150, deadline=None)
@given(_pipelines(2))
def test_print_parse_round_trip(p: Pipeline) -> None:
    text = print_pipeline(p)
    q = parse(text)
    assert q == p
    assert _typed(q) == _typed(p)
    assert print_pipeline(q) == text
    assert " " not in text.replace('" "', "") or '"' in text  # spaces only ever inside quoted strings
