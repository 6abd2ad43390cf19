"""Pipeline text: parse, print, and build a list of passes.

Grammar (``[...]`` nests, so parentheses only ever mean options)::

    pipeline := element ("," element)*
    element  := NAME [ "(" key "=" value ("," key "=" value)* ")" ] [ "[" pipeline "]" ]

``NAME`` and ``key`` are identifiers ``[A-Za-z_][A-Za-z0-9_-]*``. A value is an integer (``128``, ``-1``), a float
(``0.5``, ``1e-2``), a bool (``true``/``false``), a bare word (any run of characters other than whitespace and
``,()[]="\\``: ``lm_head``, ``model.layers.*.mlp``, ``lm_head|*.down_proj``, ``2:4``) or a double-quoted string with
backslash escapes. Whitespace between tokens is ignored. An empty text is the empty pipeline (no passes).

Printing is canonical: no spaces, options in the order written, floats via ``repr``, strings quoted only when a bare
word would not read back as the same string. ``parse(print(p)) == p`` for every pipeline.

Names resolve (in ``build``) to a registered pass, a preset (``presets.PRESETS``, expanded in place, no options),
or the built-in ``scope(include=...,exclude=...)[...]``, which applies its include/exclude to every inner pass that
takes ``SelectOptions`` unless the inner element sets them itself.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Mapping, Union

from ..errors import ConfigError, PipelineSyntaxError
from .base import Pass, SelectOptions, did_you_mean

__all__ = ["Value", "Element", "Pipeline", "parse", "print_pipeline", "build", "pipeline_of", "SCOPE"]

Value = Union[bool, int, float, str]

SCOPE = "scope"  # the one built-in element that takes a nested pipeline

_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_\-]*")
_INT = re.compile(r"[+-]?[0-9]+")
_FLOAT = re.compile(r"[+-]?(?:[0-9]+\.[0-9]*|\.[0-9]+|[0-9]+)(?:[eE][+-]?[0-9]+)?")
_SPECIAL = set(',()[]="\\')


@dataclass(frozen=True)
class Element:
    """One pipeline element: a name, its options in written order, and an optional nested pipeline.

    ``name_column`` / ``option_columns`` remember where the parser found them (1-based, 0 when built in code);
    they take no part in equality, so a printed and re-parsed pipeline equals the original.
    """

    name: str
    options: tuple[tuple[str, Value], ...] = ()
    children: "Pipeline | None" = None
    name_column: int = field(default=0, compare=False, repr=False)
    option_columns: tuple[int, ...] = field(default=(), compare=False, repr=False)

    def options_dict(self) -> dict[str, Value]:
        return dict(self.options)

    def __str__(self) -> str:
        return _print_element(self)


@dataclass(frozen=True)
class Pipeline:
    """A sequence of elements. ``text`` is the source the columns refer to (not part of equality)."""

    elements: tuple[Element, ...] = ()
    text: str | None = field(default=None, compare=False, repr=False)

    def __str__(self) -> str:
        return print_pipeline(self)

    def __len__(self) -> int:
        return len(self.elements)

    def __iter__(self):
        return iter(self.elements)


# -- parsing ---------------------------------------------------------------------------------------------------
class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def error(self, message: str, pos: int | None = None) -> PipelineSyntaxError:
        return PipelineSyntaxError(message, self.text, (self.pos if pos is None else pos) + 1)

    def skip_ws(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos].isspace():
            self.pos += 1

    def peek(self) -> str:
        self.skip_ws()
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def ident(self, what: str) -> tuple[str, int]:
        self.skip_ws()
        m = _IDENT.match(self.text, self.pos)
        if not m:
            ch = self.peek()
            if ch == "":
                raise self.error(f"expected {what}, found the end of the text")
            raise self.error(f"expected {what}, found {ch!r}")
        start = self.pos
        self.pos = m.end()
        return m.group(0), start

    def pipeline(self, closing: str) -> Pipeline:
        """Elements separated by commas, up to ``closing`` ("" for the end of the text, "]" when nested)."""
        elements = []
        while True:
            ch = self.peek()
            if ch == "," or ch == closing:
                if not elements and ch == closing:
                    raise self.error("empty nested pipeline" if closing else "empty pipeline")
                raise self.error("empty element (two commas in a row, or a comma first)")
            elements.append(self.element(closing))
            ch = self.peek()
            if ch == ",":
                comma = self.pos
                self.pos += 1
                nxt = self.peek()
                if nxt == closing:
                    raise self.error("trailing comma", comma)
                continue
            if ch == closing:
                return Pipeline(tuple(elements), text=self.text)
            if ch == "":
                raise self.error("unexpected end of text")  # only reachable when closing == "]"
            if ch in ")]":
                raise self.error(f"unexpected {ch!r} without a matching {'(' if ch == ')' else '['!r}")
            raise self.error(f"unexpected character {ch!r}; expected ',' between elements")

    def element(self, closing: str) -> Element:
        ch = self.peek()
        if ch in ")]":
            raise self.error(f"unexpected {ch!r} without a matching {'(' if ch == ')' else '['!r}")
        name, name_pos = self.ident("a pass name")
        options: list[tuple[str, Value]] = []
        columns: list[int] = []
        if self.peek() == "(":
            open_pos = self.pos
            self.pos += 1
            seen: set[str] = set()
            while True:
                ch = self.peek()
                if ch == "":
                    raise self.error("unclosed '('", open_pos)
                if ch == ")":
                    raise self.error("expected an option name (key=value)")
                key, key_pos = self.ident("an option name (key=value)")
                if key in seen:
                    raise self.error(f"duplicate option {key!r} for {name!r}", key_pos)
                seen.add(key)
                ch = self.peek()
                if ch != "=":
                    if ch == "":
                        raise self.error("unclosed '('", open_pos)
                    raise self.error(f"expected '=' after option {key!r}")
                self.pos += 1
                options.append((key, self.value(key, open_pos)))
                columns.append(key_pos + 1)
                ch = self.peek()
                if ch == ",":
                    self.pos += 1
                    continue
                if ch == ")":
                    self.pos += 1
                    break
                if ch == "":
                    raise self.error("unclosed '('", open_pos)
                raise self.error(f"unexpected character {ch!r}; expected ',' or ')' after the value of {key!r}")
        children = None
        if self.peek() == "[":
            open_pos = self.pos
            self.pos += 1
            if self.peek() == "":
                raise self.error("unclosed '['", open_pos)
            try:
                children = self.pipeline("]")
            except PipelineSyntaxError as e:
                if e.message == "unexpected end of text":
                    raise self.error("unclosed '['", open_pos) from None
                raise
            self.pos += 1  # the ']'
        return Element(name, tuple(options), children, name_column=name_pos + 1, option_columns=tuple(columns))

    def value(self, key: str, open_pos: int) -> Value:
        ch = self.peek()
        if ch == "" or ch in ",)":
            if ch == "":
                raise self.error("unclosed '('", open_pos)
            raise self.error(f"missing value for option {key!r}")
        if ch == '"':
            start = self.pos
            self.pos += 1
            out = []
            while True:
                if self.pos >= len(self.text):
                    raise self.error("unterminated string", start)
                c = self.text[self.pos]
                if c == "\\":
                    if self.pos + 1 >= len(self.text):
                        raise self.error("unterminated string", start)
                    out.append(self.text[self.pos + 1])
                    self.pos += 2
                    continue
                self.pos += 1
                if c == '"':
                    return "".join(out)
                out.append(c)
        start = self.pos
        while self.pos < len(self.text) and not self.text[self.pos].isspace() and self.text[self.pos] not in _SPECIAL:
            self.pos += 1
        if self.pos == start:
            raise self.error(f"unexpected character {ch!r} in the value of {key!r} (quote it: \"...\")")
        return _classify(self.text[start:self.pos])


def _classify(word: str) -> Value:
    """What a bare word means: int, float, bool, or the string itself."""
    if _INT.fullmatch(word):
        return int(word)
    if _FLOAT.fullmatch(word):
        return float(word)
    if word == "true":
        return True
    if word == "false":
        return False
    return word


def parse(text: str) -> Pipeline:
    """Parse pipeline text; raise ``PipelineSyntaxError`` pointing at the column of the first problem."""
    if not isinstance(text, str):
        raise ConfigError(f"pipeline text must be a string, not {type(text).__name__}")
    p = _Parser(text)
    if p.peek() == "":
        return Pipeline((), text=text)
    return p.pipeline("")


# -- printing --------------------------------------------------------------------------------------------------
def _print_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if not math.isfinite(v):
            raise ConfigError(f"pipeline values must be finite numbers, not {v!r}")
        return repr(v)
    if isinstance(v, (tuple, list)):
        return _print_value("|".join(str(x) for x in v))
    if isinstance(v, str):
        # Bare only when it reads back as this same string (not a number, bool, or split by special chars).
        bare = v != "" and not any(c.isspace() or c in _SPECIAL for c in v) and isinstance(_classify(v), str)
        if bare:
            return v
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    raise ConfigError(f"a pipeline value must be a bool, int, float or string, not {type(v).__name__} ({v!r})")


def _print_element(e: Element) -> str:
    out = e.name
    if e.options:
        out += "(" + ",".join(f"{k}={_print_value(v)}" for k, v in e.options) + ")"
    if e.children is not None:
        out += "[" + print_pipeline(e.children) + "]"
    return out


def print_pipeline(p: Pipeline) -> str:
    """Canonical text of ``p`` (no spaces, options in order, floats via repr, strings quoted only when needed)."""
    return ",".join(_print_element(e) for e in p.elements)


def pipeline_of(passes: list[Pass]) -> Pipeline:
    """The pipeline that would build ``passes`` (their non-default options), for records and reproducers."""
    elements = []
    for p in passes:
        opts = tuple((k, "|".join(map(str, v)) if isinstance(v, tuple) else v) for k, v in p.options.to_dict().items())
        elements.append(Element(p.name, opts))
    return Pipeline(tuple(elements))


# -- building --------------------------------------------------------------------------------------------------
def build(pipeline: Pipeline | str) -> list[Pass]:
    """Resolve every element to a configured pass (presets expanded, scopes applied).

    Unknown names and bad options raise ``PipelineSyntaxError`` at the name's / option's column.
    """
    if isinstance(pipeline, str):
        pipeline = parse(pipeline)
    if pipeline.text is None:
        # Built in code: print and re-parse so every error can point at a column.
        pipeline = parse(print_pipeline(pipeline))
    out: list[Pass] = []
    _build_into(pipeline, pipeline.text or "", {}, out, depth=0)
    return out


def _build_into(pipeline: Pipeline, text: str, scope: Mapping[str, tuple[Value, int, str]], out: list[Pass],
                depth: int) -> None:
    from .presets import PRESETS
    from .registry import PASSES

    if depth > 16:
        raise PipelineSyntaxError("presets/scopes nest more than 16 deep (a preset that names itself?)", text, 1)
    registry = PASSES()
    for e in pipeline.elements:
        col = e.name_column or 1
        if e.name == SCOPE:
            if e.children is None:
                raise PipelineSyntaxError("scope needs a nested pipeline: scope(include=...)[passes]", text, col)
            inner = dict(scope)
            for (k, v), kcol in zip(e.options, _columns(e)):
                if k not in ("include", "exclude"):
                    raise PipelineSyntaxError(f"scope takes include= and exclude=, not {k!r}"
                                              f"{did_you_mean(k, ['include', 'exclude'])}", text, kcol)
                try:
                    SelectOptions.from_mapping({k: v}, pass_name=SCOPE)
                except ConfigError as err:
                    raise PipelineSyntaxError(str(err), text, kcol) from None
                inner[k] = (v, kcol, text)
            _build_into(e.children, text, inner, out, depth + 1)
            continue
        if e.children is not None:
            raise PipelineSyntaxError(f"only scope takes a nested pipeline, not {e.name!r}", text, col)
        if e.name in registry:
            out.append(_make_pass(registry[e.name], e, text, scope))
            continue
        if e.name in PRESETS:
            if e.options:
                raise PipelineSyntaxError(f"preset {e.name!r} takes no options (it stands for "
                                          f"{PRESETS[e.name]!r})", text, _columns(e)[0])
            try:
                preset = parse(PRESETS[e.name])
                _build_into(preset, preset.text or "", scope, out, depth + 1)
            except PipelineSyntaxError as err:
                raise PipelineSyntaxError(f"in preset {e.name!r}: {err.message}", err.text, err.column) from None
            continue
        choices = list(registry) + list(PRESETS) + [SCOPE]
        raise PipelineSyntaxError(f"unknown pass {e.name!r}{did_you_mean(e.name, choices)}", text, col)


def _columns(e: Element) -> list[int]:
    cols = list(e.option_columns)
    return cols + [e.name_column or 1] * (len(e.options) - len(cols))


_OPTION_IN_MESSAGE = re.compile(r"option '([^']+)'")


def _make_pass(cls: type[Pass], e: Element, text: str, scope: Mapping[str, tuple[Value, int, str]]) -> Pass:
    values = dict(e.options)
    where = {k: (c, text) for (k, _), c in zip(e.options, _columns(e))}
    if issubclass(cls.Options, SelectOptions):
        for k, (v, c, t) in scope.items():
            if k not in values:
                values[k] = v
                where[k] = (c, t)
    try:
        opts = cls.Options.from_mapping(values, pass_name=e.name)
    except ConfigError as err:
        m = _OPTION_IN_MESSAGE.search(str(err))
        col, t = where.get(m.group(1), (e.name_column or 1, text)) if m else (e.name_column or 1, text)
        raise PipelineSyntaxError(str(err), t, col) from None
    return cls(opts)
