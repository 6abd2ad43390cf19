"""The pass contract.

A pass is a small class with
- ``name``: its registry name (``fuse_qkv``), the word used in pipeline text;
- ``Options``: a frozen dataclass of typed options, validated with ``ConfigError`` (never ``assert``);
- ``requires`` / ``establishes`` / ``invalidates`` / ``forbids``: IR properties (strings) the pass manager checks
  and tracks, so ordering rules are declared instead of written in prose. The manager refuses a pipeline whose
  order breaks them before any pass runs, naming the pass and the one it conflicts with. The properties in use:
  ``qkv_fused`` (``fuse_qkv``); ``gate_up_fused`` (``fuse_gate_up``); ``norms_folded`` (``fold_norm``; forbidden
  afterwards to ``awq`` and ``smoothquant``, which fold their scales into the norm weights it removed);
  ``weights_quantized`` (``quantize``, ``gptq``, ``awq``, ``smoothquant``; required by ``act_quant``; forbidden
  afterwards to ``fuse_qkv``, ``fuse_gate_up`` and ``fold_norm``, which edit float linears only, and to ``gptq``,
  ``awq`` and ``smoothquant``, which would find those layers quantized already or fold scales into norms that quantized
  layers also read); ``activations_quantized``; ``kv_quantized``; ``pruned`` (``prune``, which slices float
  linears and cache writes, so it forbids ``weights_quantized``, ``gate_up_fused``, ``qkv_fused``, ``kv_quantized``);
- ``run(module, ctx) -> PassResult(module, modified, stats)``: ``stats`` says what matched, what was skipped
  and why.
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Mapping

from ..errors import ConfigError
from ..ir.module import Module

__all__ = ["Pass", "PassOptions", "PassResult", "PassContext", "NoOptions", "SelectOptions", "did_you_mean"]


def did_you_mean(word: str, choices) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.5)
    return f"; did you mean {close[0]!r}?" if close else ""


@dataclass(frozen=True)
class PassOptions:
    """Base of every pass's options. Subclasses are frozen dataclasses with defaults for every field.

    ``from_mapping`` converts the loosely typed values of pipeline text / recipes into the declared types and
    rejects unknown keys, wrong types, and values ``validate()`` refuses.
    """

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], *, pass_name: str = "") -> "PassOptions":
        where = f"pass {pass_name!r}: " if pass_name else ""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        hints = typing.get_type_hints(cls)
        kwargs = {}
        for key, value in values.items():
            if key not in fields:
                raise ConfigError(f"{where}unknown option {key!r}{did_you_mean(key, fields)}"
                                  f" (options: {', '.join(fields) or 'none'})")
            kwargs[key] = _coerce(value, hints[key], f"{where}option {key!r}")
        try:
            opts = cls(**kwargs)
        except TypeError as e:
            raise ConfigError(f"{where}{e}") from e
        opts.validate()
        return opts

    def validate(self) -> None:
        """Raise ``ConfigError`` for invalid combinations. Override in subclasses."""

    def to_dict(self) -> dict[str, Any]:
        """Only the options that differ from their defaults (what pipeline text prints)."""
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            default = f.default if f.default is not dataclasses.MISSING else (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else dataclasses.MISSING)
            if v != default:
                out[f.name] = v
        return out

    def all_dict(self) -> dict[str, Any]:
        """Every option with its value (what the artifact manifest records)."""
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v)
                for f in dataclasses.fields(self)}


def _coerce(value: Any, hint: Any, what: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, what)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{what}: {value!r} is none of {hint}")
    if origin is Literal:
        if value in args:
            return value
        raise ConfigError(f"{what}: {value!r} is not one of {', '.join(map(repr, args))}"
                          f"{did_you_mean(str(value), map(str, args))}")
    if origin is tuple:
        items = value.split("|") if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)):
            raise ConfigError(f"{what}: expected a list (a|b|c), got {value!r}")
        return tuple(_coerce(v, args[0], what) for v in items)
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{what}: expected true or false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{what}: expected an integer, got {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{what}: expected a number, got {value!r}")
    if hint is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{what}: expected a string, got {value!r}")
    return value


@dataclass(frozen=True)
class NoOptions(PassOptions):
    pass


@dataclass(frozen=True)
class SelectOptions(PassOptions):
    """Include/exclude globs over source-module paths (``exclude=lm_head|*.down_proj``). Structure is matched
    first; these only filter."""

    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()


@dataclass
class PassResult:
    module: Module
    modified: bool
    stats: dict[str, Any] = field(default_factory=dict)


@dataclass
class PassContext:
    """What a pass may use besides the module: calibration data, a seed, the target (when known), the teacher, and
    ``calib_device``: the device calibration-driven passes run their heavy math on (``cpu`` by default).

    ``teacher``: the module as it was before the pipeline's first lossy (not ``exact``) pass, for passes that
    declare ``needs_teacher`` (``distill``). The pass manager sets it (a ``Module.clone()``, sharing the weights,
    which the passes replace in their own module's store and never edit in place); a caller may also give one."""

    calibration: Any = None  # llmpress.passes.calibration.Calibration, or None
    seed: int = 0
    target: str | None = None
    progress: bool = True
    teacher: Module | None = None
    calib_device: str = "cpu"  # where calibration statistics and per-layer math run (passes/calib_device.py)


class Pass:
    """Base of every pass. Subclasses set ``name``, ``Options`` and implement ``run``."""

    name: ClassVar[str] = ""
    Options: ClassVar[type[PassOptions]] = NoOptions
    requires: ClassVar[frozenset[str]] = frozenset()
    establishes: ClassVar[frozenset[str]] = frozenset()
    invalidates: ClassVar[frozenset[str]] = frozenset()
    forbids: ClassVar[frozenset[str]] = frozenset()  # properties after which this pass cannot do its work
    needs_calibration: ClassVar[bool] = False
    exact: ClassVar[bool] = False  # True when outputs equal the input graph's within fp32 rounding
    needs_teacher: ClassVar[bool] = False  # True: reads ctx.teacher, the module before the first lossy pass

    def __init__(self, options: PassOptions | None = None) -> None:
        self.options = options if options is not None else self.Options()

    def run(self, module: Module, ctx: PassContext) -> PassResult:  # pragma: no cover - abstract
        raise NotImplementedError

    def __repr__(self) -> str:
        opts = ",".join(f"{k}={v}" for k, v in self.options.to_dict().items())
        return f"{self.name}({opts})" if opts else self.name
