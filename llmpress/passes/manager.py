"""The pass manager: runs passes in order, tracks IR properties, verifies, instruments, writes crash reproducers.

IR properties are strings a pass ``requires`` / ``establishes`` / ``invalidates`` / ``forbids`` (``"qkv_fused"``).
The manager starts from ``module.info["properties"]`` and, before any pass runs (``check_order``), refuses an order
that cannot work: a pass whose requirements no earlier pass establishes (naming the passes that would), or a pass
after one that established a property it forbids (naming both: ``fuse_qkv`` after ``quantize``). It stores the
updated set back as a sorted list (so it serializes to JSON).

A pass that changed nothing may say why in ``stats["reason"]``; the manager logs that as a warning, so
``quantize(include=nothing_matches)`` does not pass in silence.

Instruments observe without editing passes: ``TimingInstrument``, ``IRDumpInstrument`` (the IR before/after each
pass), ``PrintOnChange``. After every pass the manager runs ``module.verify()`` (``verify_each``).

A pass that declares ``needs_teacher`` (``distill``) gets in ``ctx.teacher`` the module as it was before the first
pass of this pipeline that is not ``exact`` (unless the caller's context already holds a teacher). That is the
``clone()`` the manager takes before every pass anyway (for reproducers), kept: it shares the weights, so it costs
only the graph structure, and later passes put new tensors into their own module's store instead of editing shared
ones. Exact passes before it do not change what the model computes, so it is the uncompressed model.

When a pass raises, or leaves the IR inconsistent, the manager writes a reproducer folder
``<reproducer_dir or ./llmpress-crash>/<pass>-<timestamp>/`` holding ``ir_before.txt`` (the IR the pass got),
``pipeline.txt`` (the pipeline text and the index of the failing pass) and ``program.pt2`` (the exported program
before the pass, via ``torch.export.save``), then raises ``PassError`` naming the pass and those that ran before it.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, Sequence

from tqdm.auto import tqdm

from ..errors import ConfigError, PassError
from ..ir.module import Module, VerifyError
from .base import Pass, PassContext, PassResult

__all__ = ["PassManager", "PassRecord", "Instrument", "TimingInstrument", "IRDumpInstrument", "PrintOnChange",
           "properties_of", "check_order", "resolved_pipeline"]

log = logging.getLogger(__name__)


@dataclass
class PassRecord:
    """What one pass did: its options (all of them), whether it changed the IR, its stats and its run time."""

    name: str
    options: dict[str, Any]
    modified: bool
    stats: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "options": self.options, "modified": self.modified,
                "stats": _jsonable(self.stats), "seconds": round(self.seconds, 6)}


def resolved_pipeline(records: Sequence[PassRecord]) -> str:
    """Pipeline text that redoes what ``records`` did without deciding anything again: every pass with its options
    (presets expanded, scopes applied), except a pass that chose its work from data (``autobits``), which stands
    for the explicit text it ran (``stats["resolved_pipeline"]``)."""
    from .pipeline import Element, Pipeline, print_pipeline
    from .registry import get_pass

    parts = []
    for r in records:
        if "resolved_pipeline" in r.stats:
            if r.stats["resolved_pipeline"]:
                parts.append(r.stats["resolved_pipeline"])
            continue
        opts = get_pass(r.name).Options.from_mapping(r.options, pass_name=r.name).to_dict()
        items = tuple((k, "|".join(map(str, v)) if isinstance(v, tuple) else v) for k, v in opts.items())
        parts.append(print_pipeline(Pipeline((Element(r.name, items),))))
    return ",".join(parts)


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple, set, frozenset)):
        items = sorted(x) if isinstance(x, (set, frozenset)) else x
        return [_jsonable(v) for v in items]
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    return str(x)


class Instrument:
    """Hooks around every pass. Subclass and override what you need; the defaults do nothing."""

    def before_pass(self, pass_: Pass, module: Module) -> None:
        pass

    def after_pass(self, pass_: Pass, module: Module, result: PassResult) -> None:
        pass

    def on_error(self, pass_: Pass, module: Module, exc: BaseException) -> None:
        pass


class TimingInstrument(Instrument):
    """Wall-clock seconds per pass, in run order: ``timings == [("fuse_qkv", 0.01), ...]``."""

    def __init__(self) -> None:
        self.timings: list[tuple[str, float]] = []
        self._t0 = 0.0

    def before_pass(self, pass_: Pass, module: Module) -> None:
        self._t0 = time.perf_counter()

    def after_pass(self, pass_: Pass, module: Module, result: PassResult) -> None:
        self.timings.append((pass_.name, time.perf_counter() - self._t0))

    def total(self) -> float:
        return sum(t for _, t in self.timings)


class IRDumpInstrument(Instrument):
    """Writes ``NN-<pass>-before.txt`` and ``NN-<pass>-after.txt`` (``module.print()``) into ``directory``."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self._index = 0

    def _path(self, pass_: Pass, when: str) -> Path:
        return self.directory / f"{self._index:02d}-{pass_.name}-{when}.txt"

    def before_pass(self, pass_: Pass, module: Module) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self._path(pass_, "before").write_text(module.print() + "\n")

    def after_pass(self, pass_: Pass, module: Module, result: PassResult) -> None:
        self._path(pass_, "after").write_text(result.module.print() + "\n")
        self._index += 1

    def on_error(self, pass_: Pass, module: Module, exc: BaseException) -> None:
        self._index += 1


class PrintOnChange(Instrument):
    """Logs (INFO) each pass that changed the IR with its op-histogram delta; ``changed`` lists their names."""

    def __init__(self) -> None:
        self.changed: list[str] = []
        self._before: Any = None

    def before_pass(self, pass_: Pass, module: Module) -> None:
        self._before = module.op_histogram()

    def after_pass(self, pass_: Pass, module: Module, result: PassResult) -> None:
        if not result.modified:
            return
        self.changed.append(pass_.name)
        after = result.module.op_histogram()
        delta = {k: after[k] - self._before[k] for k in set(after) | set(self._before) if after[k] != self._before[k]}
        log.info("%s changed the IR: %s", pass_.name,
                 ", ".join(f"{k} {v:+d}" for k, v in sorted(delta.items())) or "same op counts")


def properties_of(module: Module) -> set[str]:
    return set(module.info.get("properties", ()))


def check_order(passes: Sequence[Pass], properties: Iterable[str] = ()) -> None:
    """Raise ``PassError`` if ``passes``, run in order from a module with ``properties``, break a declared
    ``requires`` or ``forbids``; the message names the pass and the pass it conflicts with."""
    props = set(properties)
    by: dict[str, str] = {}  # property -> the pass of this pipeline that established it
    done: list[str] = []
    for p in passes:
        missing = sorted(p.requires - props)
        if missing:
            raise PassError(f"pass {p.name!r} requires IR properties {missing} that no earlier pass established"
                            f" (passes before it: [{', '.join(done)}]); {_who_establishes(missing)}")
        for prop in sorted(p.forbids & props):
            if prop in by:
                raise PassError(f"pass {p.name!r} cannot run after {by[prop]!r}: {by[prop]!r} makes the IR {prop!r}"
                                f" and {p.name!r} only works before that; put {p.name} before {by[prop]}")
            raise PassError(f"pass {p.name!r} cannot run on this module: it is already {prop!r} (recorded by an "
                            f"earlier pipeline) and {p.name!r} only works before that")
        for prop in p.establishes:
            by[prop] = p.name
        props = (props | set(p.establishes)) - set(p.invalidates)
        done.append(p.name)


class PassManager:
    """Runs ``passes`` in order over a module; see the module docstring for what it checks and records."""

    def __init__(self, passes: Sequence[Pass], *, instruments: Iterable[Instrument] = (), verify_each: bool = True,
                 reproducer_dir: str | Path | None = None, pipeline_text: str | None = None) -> None:
        self.passes = list(passes)
        self.instruments = list(instruments)
        self.verify_each = verify_each
        self.reproducer_dir = Path(reproducer_dir) if reproducer_dir is not None else Path("llmpress-crash")
        if pipeline_text is None:
            from .pipeline import pipeline_of

            pipeline_text = str(pipeline_of(self.passes))
        self.pipeline_text = pipeline_text

    @classmethod
    def from_pipeline(cls, pipeline: Any, **kwargs: Any) -> "PassManager":
        """Build the passes of pipeline text (or a ``Pipeline``) and keep its canonical text for reproducers."""
        from .pipeline import Pipeline, build, parse

        pipe = pipeline if isinstance(pipeline, Pipeline) else parse(pipeline)
        kwargs.setdefault("pipeline_text", str(pipe))
        return cls(build(pipe), **kwargs)

    def run(self, module: Module, ctx: PassContext | None = None) -> tuple[Module, list[PassRecord]]:
        ctx = ctx if ctx is not None else PassContext()
        props = properties_of(module)
        check_order(self.passes, props)  # before any work: a wrong order should not cost a calibration run
        records: list[PassRecord] = []
        done: list[str] = []
        bar = tqdm(self.passes, desc="passes", unit="pass", disable=not ctx.progress, leave=False)
        wants_teacher = [i for i, p in enumerate(self.passes) if p.needs_teacher]
        for index, p in enumerate(bar):
            bar.set_postfix_str(p.name)
            before = module.clone()
            if ctx.teacher is None and not p.exact and wants_teacher and index < wants_teacher[-1]:
                ctx = replace(ctx, teacher=before)  # a copy: the caller's context is not edited
            for ins in self.instruments:
                ins.before_pass(p, module)
            t0 = time.perf_counter()
            try:
                result = p.run(module, ctx)
                if not isinstance(result, PassResult):
                    raise PassError(f"pass {p.name!r} returned {type(result).__name__}, not PassResult")
                if self.verify_each:
                    try:
                        result.module.verify()
                    except VerifyError as e:
                        raise PassError(f"pass {p.name!r} left the IR inconsistent: {e}") from e
            except ConfigError:
                # The user's options do not fit this model (a group that does not divide a layer, no calibration
                # data): the message already names the pass and the layer; that is not a compiler crash.
                raise
            except Exception as exc:  # noqa: BLE001 - every failure gets a reproducer and the pass's name
                for ins in self.instruments:
                    ins.on_error(p, module, exc)
                where = self._write_reproducer(before, p, index)
                raise PassError(f"pass {p.name!r} failed after [{', '.join(done)}]: {exc}"
                                f"; reproducer written to {where}") from exc
            seconds = time.perf_counter() - t0
            module = result.module
            props = (props | set(p.establishes)) - set(p.invalidates)
            module.info["properties"] = sorted(props)
            for ins in self.instruments:
                ins.after_pass(p, module, result)
            records.append(PassRecord(p.name, p.options.all_dict(), bool(result.modified), dict(result.stats),
                                      seconds))
            log.debug("%s: modified=%s in %.3fs %s", p.name, result.modified, seconds, result.stats)
            if not result.modified and result.stats.get("reason"):
                log.warning("%s changed nothing: %s", p.name, result.stats["reason"])
            done.append(p.name)
        bar.close()
        module.info["properties"] = sorted(props)
        return module, records

    def _write_reproducer(self, before: Module, p: Pass, index: int) -> Path:
        stamp = time.strftime("%Y%m%d-%H%M%S") + f"-{time.time_ns() % 1_000_000:06d}"
        where = self.reproducer_dir / f"{p.name}-{stamp}"
        where.mkdir(parents=True, exist_ok=True)
        (where / "ir_before.txt").write_text(before.print() + "\n")
        (where / "pipeline.txt").write_text(
            f"{self.pipeline_text}\n# failing pass: index {index} ({p!r}) of {len(self.passes)}\n")
        try:
            import torch

            torch.export.save(before.exported_program, str(where / "program.pt2"))
        except Exception as e:  # noqa: BLE001 - the text reproducer is still useful without the program
            log.warning("could not save the exported program for the reproducer in %s: %s", where, e)
        log.error("pass %r failed; reproducer written to %s", p.name, where)
        return where


def _who_establishes(missing: list[str]) -> str:
    from .registry import PASSES

    parts = []
    for prop in missing:
        names = sorted(cls.name for cls in PASSES().values() if prop in cls.establishes)
        parts.append(f"{prop!r} is established by {', '.join(repr(n) for n in names)}" if names
                     else f"no registered pass establishes {prop!r}")
    return "; ".join(parts)
