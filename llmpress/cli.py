"""The ``llmpress`` command line.

These forms are a contract other tools rely on:

    llmpress compile MODEL (-p/--pipeline TEXT | --recipe FILE) [-t/--target T] [--calib FILE] [--calib-device D]
                     [--backend-option KEY=VALUE ...] -o DIR
    llmpress run MODEL_OR_DIR [--prompt TEXT] [--max-new-tokens N] [--emulate]
    llmpress eval MODEL_OR_DIR --data FILE [--context 256] [--pipeline TEXT] [--json]
    llmpress inspect MODEL_OR_DIR [--json]
    llmpress inspect --sensitivity PIPELINE MODEL --calib FILE [--metric kl|ppl] [--plot FILE.png] [--json]
    llmpress passes
    llmpress --version

``-v`` (log at INFO, show third-party warnings) and ``-q`` (no progress bars) go anywhere on the line. Before any
command, torch's intra-op threads are capped at the CPUs this process may run on (``--threads`` sets them; see
``llmpress/host.py``).

``run`` prints the decoded text (prompt included) on stdout and nothing else there; ``eval --json`` prints one JSON
object. Progress bars and logs go to stderr.

Nothing a user does by mistake costs data or a wasted run:
- ``-o`` may be a new path, an empty folder, or an existing llmpress artifact together with ``--force``; anything
  else (a folder with other files, a plain file, ``.``, ``..``, the input model or a folder holding it, a read-only
  place) is refused before any work, naming the path. Artifacts are written beside ``-o`` and renamed into place.
- ``compile`` checks the pipeline text and options, the target, the files named (model, calibration, tokenizer)
  and the output location before loading the model, and every layer's fit before the first pass.
- Errors print one ``llmpress: error: ...`` line and exit 2; Ctrl-C prints one ``llmpress: interrupted...`` line
  and exits 130 (a traceback only with ``-v``), leaving nothing half-written.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Sequence

from .errors import ConfigError, LlmpressError

__all__ = ["main"]

log = logging.getLogger("llmpress")


def _is_artifact(path: str) -> bool:
    p = Path(path)
    return (p.is_dir() and (p / "manifest.json").exists()) or (p.is_file() and p.suffix == ".tar")


def _open(model: str, *, pipeline: str | None = None, tokenizer: str | None = None, calib: str | None = None,
          progress: bool = True, threads: int | None = None):
    """A model path or an artifact -> Artifact (run on ``threads`` CPU threads; None: every core)."""
    import llmpress

    if threads is not None and threads < 1:
        raise LlmpressError(f"--threads must be at least 1, got {threads}")
    if _is_artifact(model):
        if pipeline:
            raise LlmpressError(f"{model} is an artifact, already compiled; --pipeline applies to model paths")
        return llmpress.load(model, threads=threads)
    art = llmpress.compile(model, pipeline=pipeline or "", target="reference", tokenizer=tokenizer,
                           calibration=calib, progress=progress)
    art.compiled.set_threads(threads)
    return art


def _backend_options(items: list[str]) -> dict:
    """``--backend-option KEY=VALUE`` (repeatable) -> ``{KEY: VALUE}``; ``true``/``false`` become booleans."""
    out = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not key.strip() or not value.strip():
            raise ConfigError(f"--backend-option {item!r}: expected KEY=VALUE, e.g. sparse_kernels=always")
        v = value.strip()
        out[key.strip()] = {"true": True, "false": False}.get(v.lower(), v)
    return out


def cmd_compile(a: argparse.Namespace) -> int:
    import llmpress

    from .host import mmap_large_allocations

    mmap_large_allocations()  # freed tensors go back to the system at once: the peak is what is held (host.py)

    pipeline, target, calib, calib_device = a.pipeline, a.target, a.calib, a.calib_device
    options = _backend_options(a.backend_option or [])
    if a.recipe:
        from .passes.recipe import Recipe

        recipe = Recipe.load(a.recipe)
        pipeline = recipe.pipeline
        target = a.target if a.target_given else (recipe.target or a.target)
        calib = calib or recipe.calibration
        if calib_device is None and recipe.calibration is not None:
            calib_device = recipe.calibration.device
        options = {**(recipe.backend or {}), **options}  # the command line's settings win
    from .preflight import check_compile

    t0 = time.perf_counter()
    # Every mistake that can be found without the model is reported now, not after loading and capturing it.
    check_compile(a.model, pipeline=pipeline, target=target, calibration=calib, tokenizer=a.tokenizer,
                  output=a.output, overwrite=a.force, overwrite_flag="--force", calib_device=calib_device,
                  backend_options=options)
    art = llmpress.compile(a.model, pipeline=pipeline, target=target, calibration=calib, tokenizer=a.tokenizer,
                           progress=not a.quiet, reproducer_dir=a.reproducer_dir, output=a.output,
                           overwrite=a.force, calib_device=calib_device, backend_options=options)
    out = a.written = art.folder
    pb = art.manifest["parameter_bytes"]
    print(f"wrote {out} (target {art.manifest['target']['name']}, parameters {pb['before']:,} -> {pb['after']:,} bytes, "
          f"{time.perf_counter() - t0:.1f}s)", file=sys.stderr)
    for rec in art.passes:
        print(f"  {rec['name']}: {'modified' if rec['modified'] else 'unchanged'} {_short(rec.get('stats'))}",
              file=sys.stderr)
    return 0


def _short(stats: Any, limit: int = 160) -> str:
    s = json.dumps(stats, default=str) if stats else ""
    return s if len(s) <= limit else s[: limit - 3] + "..."


def cmd_run(a: argparse.Namespace) -> int:
    if a.max_new_tokens < 0:  # before the model loads: a wrong number should not cost a compile
        raise ConfigError(f"--max-new-tokens must be 0 or more, got {a.max_new_tokens}")
    if a.emulate:
        from .backends.tvm.emulate import run_emulated

        text = run_emulated(a.model, prompt=a.prompt, max_new_tokens=a.max_new_tokens)
        print(text)
        return 0
    art = _open(a.model, tokenizer=a.tokenizer, progress=False, threads=a.threads)
    print(art.generate(a.prompt, a.max_new_tokens))
    return 0


def cmd_eval(a: argparse.Namespace) -> int:
    from .eval.perplexity import perplexity, token_stream

    art = _open(a.model, pipeline=a.pipeline, tokenizer=a.tokenizer, calib=a.calib, progress=not a.quiet,
                threads=a.threads)
    if art.tokenizer is None:
        raise LlmpressError(f"{a.model} has no tokenizer; perplexity needs one (--tokenizer FILE)")
    stream = token_stream(a.data, art.tokenizer, max_tokens=a.max_tokens)
    res = perplexity(art.compiled.forward, art.lm, stream, context=a.context, progress=not a.quiet)
    pb = art.manifest.get("parameter_bytes", {}).get("after")
    out = {"perplexity": res.perplexity, "nll": res.nll, "tokens": res.tokens, "context": res.context,
           "parameter_bytes": pb, "kv_cache_bytes": art.lm.cache_bytes() if art.lm is not None else None,
           "target": art.manifest["target"]["name"], "data": str(a.data), "eval_seconds": res.seconds}
    if art.lm is not None and getattr(art.compiled, "runnable_here", True):
        from .eval.latency import measure

        out.update(measure(art.compiled.forward_last, art.lm, prefill_tokens=128, decode_tokens=a.decode_tokens))
    if a.json:
        print(json.dumps(out))
    else:
        for k, v in out.items():
            print(f"{k:>22}: {v:,.4f}" if isinstance(v, float) else f"{k:>22}: {v}")
    return 0


def cmd_inspect(a: argparse.Namespace) -> int:
    if a.sensitivity is not None:
        from .report import cmd_sensitivity

        return cmd_sensitivity(a)
    art = _open(a.model, progress=False)
    rows = art.manifest.get("layers", [])
    info = {"target": art.manifest["target"], "pipeline": art.manifest.get("pipeline", ""),
            "resolved_pipeline": art.manifest.get("resolved_pipeline"),
            "parameter_bytes": art.manifest.get("parameter_bytes"), "passes": art.passes, "layers": rows}
    if art.lm is not None:
        specs = art.lm.cache_specs()
        info["kv_cache"] = {"bytes": art.lm.cache_bytes(), "tensors": len(specs),
                            "dtypes": sorted({c["dtype"] for c in specs}), "cache_len": art.lm.cache_len}
    sparse = (art.manifest.get("payload") or {}).get("sparse_weights") or {}
    if sparse:  # TVM artifacts: sparse weights stored compressed (backends/tvm/sparse_storage.py)
        info["sparse_weights"] = {"tensors": len(sparse), "formats": sorted({r["format"] for r in sparse.values()}),
                                  "dense_bytes": sum(r["dense_bytes"] for r in sparse.values()),
                                  "stored_bytes": sum(r["stored_bytes"] for r in sparse.values())}
    if a.json:
        print(json.dumps(info, default=str))
        return 0
    print(f"target {info['target']['name']}   pipeline {info['pipeline'] or '(none)'}   "
          f"parameter bytes {info['parameter_bytes']}")
    resolved = art.manifest.get("resolved_pipeline")
    if resolved and any("resolved_pipeline" in (r.get("stats") or {}) for r in art.passes):  # autobits's plan
        print(f"resolved pipeline {resolved}")
    if "kv_cache" in info:
        kv = info["kv_cache"]
        print(f"KV cache: {kv['bytes']:,} bytes for {kv['cache_len']} positions, {kv['tensors']} tensors "
              f"({', '.join(kv['dtypes'])})")
    if "sparse_weights" in info:
        sw = info["sparse_weights"]
        print(f"sparse weights: {sw['tensors']} tensors stored compressed ({', '.join(sw['formats'])}), "
              f"{sw['dense_bytes']:,} -> {sw['stored_bytes']:,} bytes; expanded at load, dense compute")
    w = max([len(r["path"]) for r in rows] + [5])
    print(f"{'layer':<{w}}  {'op':<28} {'weights':<34} {'bytes':>10}  compression")
    for r in rows:
        shapes = ", ".join("x".join(map(str, s)) for s in r["weights"].values())
        comp = r.get("compression") or {}
        desc = " ".join(f"{k}={v}" for k, v in comp.items() if k not in ("error",)) if comp else "-"
        print(f"{r['path']:<{w}}  {r['op']:<28} {shapes:<34} {r['bytes']:>10,}  {desc}")
    return 0


def cmd_passes(a: argparse.Namespace) -> int:
    from .passes.presets import PRESETS
    from .passes.registry import PASSES

    import dataclasses

    for name, cls in sorted(PASSES().items()):
        doc = cls.__doc__ or sys.modules[cls.__module__].__doc__ or ""
        first = doc.strip().splitlines()[0] if doc.strip() else ""
        first = first.removeprefix(f"``{name}``:").strip()
        opts = ",".join(f"{f.name}={_fmt(f)}" for f in dataclasses.fields(cls.Options))
        print(f"{name:<16} {first}")
        if opts:
            print(f"{'':<16}   options: {opts}")
    print("\npresets:")
    for name, text in sorted(PRESETS.items()):
        print(f"{name:<16} {text}")
    return 0


def _fmt(field) -> str:
    import dataclasses

    if field.default is not dataclasses.MISSING:
        v = field.default
    elif field.default_factory is not dataclasses.MISSING:
        v = field.default_factory()
    else:
        return "?"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, tuple):
        return "|".join(map(str, v)) or "''"
    return str(v)


def version_text() -> str:
    """``llmpress X (torch Y, TVM Z)``, read from the installed packages' metadata (imports neither)."""
    from importlib.metadata import PackageNotFoundError, version

    from . import __version__

    def v(dist: str) -> str:
        try:
            return version(dist)
        except PackageNotFoundError:
            return "not installed"

    return f"llmpress {__version__} (torch {v('torch')}, TVM {v('apache-tvm')})"


class _Version(argparse.Action):
    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest, nargs=0, default=default, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        print(version_text())
        parser.exit()


def _common(top: bool) -> argparse.ArgumentParser:
    """-v/-q, accepted before and after the command. The subcommands' copies default to SUPPRESS so that leaving
    them out after the command keeps what was given before it."""
    p = argparse.ArgumentParser(add_help=False)
    d: dict = {} if top else {"default": argparse.SUPPRESS}
    p.add_argument("-v", "--verbose", action="store_true", help="log at INFO level, show third-party warnings", **d)
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars", **d)
    return p


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llmpress", description="Compress LLMs with composable passes and compile them "
                                "through Apache TVM.", parents=[_common(True)])
    p.add_argument("--version", action=_Version, help="print the llmpress, torch and TVM versions and exit")
    sub = p.add_subparsers(dest="command", required=True)
    common = [_common(False)]

    c = sub.add_parser("compile", help="compile a model into an artifact folder", parents=common)
    c.add_argument("model", help="Hugging Face folder, llama2.c .bin, or .onnx file")
    g = c.add_mutually_exclusive_group(required=True)
    g.add_argument("-p", "--pipeline", help="pipeline text or preset name, e.g. 'fuse_qkv,quantize(bits=4,group=128)'")
    g.add_argument("--recipe", help="recipe file (TOML or YAML) with the pipeline and calibration settings")
    c.add_argument("-t", "--target", default="reference",
                   help="reference | cpu | arm64 | cuda | onnx (= onnx:qdq) | onnx:integer | TVM target JSON")
    c.add_argument("--calib", help="calibration text file (gptq, awq, smoothquant, autobits, distill; sparsify wanda/sparsegpt; factorize asvd/svd_llm; prune wanda)")
    c.add_argument("--calib-device", help="where calibration-driven passes run their heavy math: cpu (default) | "
                   "cuda | cuda:N; results come back to the CPU")
    c.add_argument("--backend-option", action="append", metavar="KEY=VALUE",
                   help="a setting of the target's backend (repeatable); TVM: epilogues=true|false|decode, "
                   "sparse_kernels=auto|always|never, inplace_cache=true|false, cpu_kernels=true|false")
    c.add_argument("--tokenizer", help="tokenizer file (llama2.c models: found beside the .bin by default)")
    c.add_argument("--reproducer-dir", help="where a failing pass writes its crash reproducer")
    c.add_argument("-o", "--output", required=True, help="artifact folder (or .tar) to write")
    c.add_argument("--force", action="store_true", help="replace an existing llmpress artifact at -o (never anything "
                   "else; -o may otherwise be a new path or an empty folder)")
    c.add_argument("--threads", type=int, help="torch threads for the passes (default: every core this process "
                   "may run on)")
    c.set_defaults(func=cmd_compile)

    r = sub.add_parser("run", help="generate text greedily", parents=common)
    r.add_argument("model", help="artifact folder/.tar or model path")
    r.add_argument("--prompt", default="", help="prompt text (default: start from BOS)")
    r.add_argument("--max-new-tokens", type=int, default=64, help="at most this many tokens (0 or more; fewer "
                   "when the KV cache fills, with a warning)")
    r.add_argument("--tokenizer")
    r.add_argument("--threads", type=int, help="CPU threads (default: every core this process may run on)")
    r.add_argument("--emulate", action="store_true",
                   help="run an arm64 artifact through the C++ runner under qemu-aarch64")
    r.set_defaults(func=cmd_run)

    e = sub.add_parser("eval", help="perplexity, size and speed", parents=common)
    e.add_argument("model", help="artifact folder/.tar or model path")
    e.add_argument("--data", required=True, help="text file (paragraphs separated by blank lines)")
    e.add_argument("--context", type=int, default=256)
    e.add_argument("--pipeline", help="pipeline to apply first (model paths only)")
    e.add_argument("--calib", help="calibration text for --pipeline")
    e.add_argument("--tokenizer")
    e.add_argument("--max-tokens", type=int, help="score only the first N tokens of the data")
    e.add_argument("--decode-tokens", type=int, default=32, help="tokens decoded for the tokens/s figure")
    e.add_argument("--threads", type=int, help="CPU threads (default: every core this process may run on)")
    e.add_argument("--json", action="store_true", help="one JSON object on stdout")
    e.set_defaults(func=cmd_eval)

    i = sub.add_parser("inspect", help="per-layer shapes, bytes and what the pipeline did", parents=common)
    i.add_argument("model")
    i.add_argument("--json", action="store_true")
    i.add_argument("--sensitivity", metavar="PIPELINE", help="measure each layer's effect on the output when this "
                   "candidate compression (e.g. 'quantize(bits=3,group=128)') is applied to it alone (needs --calib)")
    i.add_argument("--calib", help="calibration text for --sensitivity")
    i.add_argument("--metric", choices=["kl", "ppl"], default="kl", help="--sensitivity score: KL to the float "
                   "model's next-token distribution, or the NLL increase (default kl)")
    i.add_argument("--samples", type=int, default=4, help="--sensitivity calibration windows (default 4)")
    i.add_argument("--seq-len", type=int, default=128, help="--sensitivity tokens per window (default 128)")
    i.add_argument("--plot", help="write the --sensitivity scores as a PNG bar chart (needs matplotlib)")
    i.add_argument("--tokenizer")
    i.set_defaults(func=cmd_inspect)

    ps = sub.add_parser("passes", help="list registered passes and presets", parents=common)
    ps.set_defaults(func=cmd_passes)
    return p


class _Formatter(logging.Formatter):
    """``llmpress: warning: message``, one line like argparse's errors; -v adds the logger's name."""

    def __init__(self, verbose: bool) -> None:
        super().__init__()
        self.verbose = verbose

    def format(self, record: logging.LogRecord) -> str:
        where = f"[{record.name}] " if self.verbose else ""
        text = f"llmpress: {record.levelname.lower()}: {where}{record.getMessage()}"
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


def _configure_output(verbose: bool) -> None:
    """Logs as one line each on stderr (INFO with -v, else WARNING). Python warnings raised outside llmpress say
    nothing a user can act on (deprecations inside torch or TVM): shown only with -v."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter(verbose))
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, handlers=[handler])
    if not verbose:
        warnings.filterwarnings("ignore")
        warnings.filterwarnings("default", module=r"llmpress(\.|$)")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    if a.command == "compile":
        a.target_given = any(x == "--target" or x.startswith(("--target=", "-t")) for x in (argv or sys.argv[1:]))
    _configure_output(a.verbose)
    try:
        from .host import torch_threads

        torch_threads(getattr(a, "threads", None))
        return a.func(a)
    except LlmpressError as e:
        print(f"llmpress: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: one line, no traceback (unless -v); temporary outputs are already gone
        if getattr(a, "verbose", False):
            import traceback

            traceback.print_exc()
        if a.command == "compile":
            done = getattr(a, "written", None)
            msg = f"interrupted; {done} was written" if done else f"interrupted; nothing written to {a.output}"
        else:
            msg = "interrupted"
        print(f"llmpress: {msg}", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `llmpress passes | head`: the reader left; not an error of ours
        sys.stderr.close()
        return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
