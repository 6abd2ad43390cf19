"""Quality benchmark: every compression method side by side on the reference model, in one run, one table.

    .venv/bin/python benchmarks/quality.py                      # full run, writes benchmarks/results/quality.*
    .venv/bin/python benchmarks/quality.py --quick --out /tmp/q  # a smoke run on short prefixes

Model: ``../shared/models/tinystories-llama`` (7.3M parameters). For every row it reports

- perplexity on ``../shared/data/tinystories/valid.txt`` (all of it) and on a stated prefix of
  ``../shared/data/wikitext-2/valid.txt``, with ``llmpress.eval.perplexity``'s pinned protocol (paragraphs split on
  blank lines, BOS before each, non-overlapping 256-token windows each scored from its own start, token level);
- weight bytes (``llmpress.eval.size.parameter_bytes`` for llmpress modules; the initializer bytes of the file for
  ONNX Runtime rows), and the ratio of both numbers to fp32;
- the compile time (the pass pipeline, including calibration) and the evaluation time of the row.

Rows: fp32; the exact pipeline (fold_constants,fuse_qkv,dce); RTN (``quantize``), GPTQ and AWQ at int8 per channel,
int4 g128, int3 g128, int2 g64 (every linear but ``lm_head``, symmetric); SmoothQuant W8A8; weight-only rows with
dynamic int8 activations added (``act_quant``: per token and block, ``ACT_QUANT_ROWS``), which measure what
activation quantization costs on top of the same weights; and the ONNX Runtime peers: the fp32 ONNX export run by
ORT, ORT's own 4-bit quantizer (``MatMulNBitsQuantizer``, block 128, symmetric, ``lm_head`` excluded like ours) on
that export, and llmpress's RTN int4 g128 exported as ``MatMulNBits``; low-rank factorization (``factorize``:
plain SVD, ASVD, SVD-LLM at 50% and 70% of each linear's parameters, and SVD-LLM 70% then RTN int4 g32,
``FACTORIZE_ROWS``); mixed precision (``autobits`` at 3.5 bits per weight beside hand-made int3/int4 mixes of the
same size, ``AUTOBITS_ROWS``); distillation recovery (``distill``: the fp32 model as teacher, KL on calib.txt) after
magnitude 2:4 and after RTN int2 g64, ``DISTILL_ROWS``. Every llmpress row also records each pass's own time
(``pass_s``, shown after its pipeline). Methods whose pass is not registered are absent. Calibration (GPTQ, AWQ, SmoothQuant, ASVD,
SVD-LLM) comes only from ``../shared/data/tinystories/calib.txt``. Perplexity of llmpress rows is computed by the reference interpreter (the IR run in PyTorch), of ORT rows by an ONNX Runtime
session over the same windows.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import platform
import subprocess
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = (REPO / ".." / "shared").resolve()
MODEL = SHARED / "models" / "tinystories-llama"
TS_VALID = SHARED / "data" / "tinystories" / "valid.txt"
WIKI_VALID = SHARED / "data" / "wikitext-2" / "valid.txt"
CALIB = SHARED / "data" / "tinystories" / "calib.txt"

log = logging.getLogger("quality")

# (row label, pass options) for the weight-only methods; lm_head stays float like the model README's RTN numbers.
WEIGHT_CONFIGS = [
    ("int8 per-channel", "bits=8,group=0"),
    ("int4 g128", "bits=4,group=128"),
    ("int3 g128", "bits=3,group=128"),
    ("int2 g64", "bits=2,group=64"),
]
WEIGHT_METHODS = [("RTN", "quantize"), ("GPTQ", "gptq"), ("AWQ", "awq")]

# (weight method, weight config, act_quant options, activation block label): a weight-only row above plus dynamic
# int8 activations per token and block. act_quant's group 0 is the layer's weight group (128 for int4 g128, the
# integer kernels' fastest form); it must divide the weight group, and for int8 per channel the weight group is all
# of in_features, where group 0 would mean per token, so that row names 128 (the int4 rows' block) instead.
ACT_QUANT_ROWS = [
    ("RTN", "int4 g128", "", "128"),
    ("RTN", "int4 g128", "group=32", "32"),
    ("GPTQ", "int4 g128", "", "128"),
    ("RTN", "int8 per-channel", "group=128", "128"),
]

# (method, config, pipeline) for weight pruning (``sparsify``, issue 13): every linear but lm_head, zeros kept in dense
# float weights (dense-equivalent: same bytes and speed as fp32 until sparse kernels exist), then one row quantized
# on top of the sparse weights, whose zeros the quantizer keeps. Wanda and SparseGPT calibrate on calib.txt too.
SPARSIFY_ROWS = [
    ("magnitude", "50%", "sparsify(method=magnitude,exclude=lm_head)"),
    ("magnitude", "2:4", "sparsify(method=magnitude,pattern=2:4,exclude=lm_head)"),
    ("Wanda", "50%", "sparsify(method=wanda,exclude=lm_head)"),
    ("Wanda", "2:4", "sparsify(method=wanda,pattern=2:4,exclude=lm_head)"),
    ("SparseGPT", "50%", "sparsify(method=sparsegpt,exclude=lm_head)"),
    ("SparseGPT", "2:4", "sparsify(method=sparsegpt,pattern=2:4,exclude=lm_head)"),
    ("SparseGPT + GPTQ", "2:4, int4 g128",
     "sparsify(method=sparsegpt,pattern=2:4,exclude=lm_head),gptq(bits=4,group=128,exclude=lm_head)"),
]

# (method label, config label, pipeline, needs calibration): low-rank factorization (``factorize``) of every linear
# but lm_head; ratio = fraction of each layer's parameters kept, ranks rounded to multiples of 32 (the default), so the
# factors take int4 with group 32 (group 128 would need multiple=128).
FACTORIZE_ROWS = [
    *[(f"factorize {m}", f"ratio {r}", f"factorize(method={m},ratio={r},exclude=lm_head)", m != "svd")
      for r in (0.5, 0.7) for m in ("svd", "asvd", "svd_llm")],
    ("factorize svd_llm + RTN", "ratio 0.7, int4 g32",
     "factorize(method=svd_llm,ratio=0.7,exclude=lm_head),quantize(bits=4,group=32,exclude=lm_head)", True),
]

# (method, config, pipeline): distillation recovery (``distill``, issue 14) after the two lossiest cheap rows above, the
# teacher being the fp32 model (the pass manager keeps it). Sparse: the surviving weights train under their 2:4 mask;
# int2: rank-8 adapters beside the frozen int2 layers. 50 Adam steps of 2 windows of 128 tokens (the calibration
# windows' first halves). Measured with these rows on all of valid.txt (2026-12-02, load 11): 2:4 1.1344x -> 1.0417x,
# int2 g64 1.6541x -> 1.1475x, distill 62 s / 96 s.
DISTILL_ROWS = [
    ("sparsify magnitude + distill", "2:4",
     "sparsify(method=magnitude,pattern=2:4,exclude=lm_head),distill(steps=50,batch=2,seq_len=128)"),
    ("RTN + distill", "int2 g64, rank 8",
     "quantize(bits=2,group=64,exclude=lm_head),distill(steps=50,lr=0.002,batch=2,seq_len=128)"),
]


# (method, config, pipeline): mixed precision (``autobits``, issue 14) at 3.5 bits per weight, scales included, over
# every linear but lm_head, against hand-made mixes of the same two widths (RTN int3/int4 g128: 3.25 and 4.25 bits
# per weight) at the same 3.5: a quarter of the parameters at int4, as two of the eight blocks or as every attention
# layer (a quarter of each block). autobits calibrates on calib.txt (its first 4 windows, 128 tokens each).
def _blocks(*blocks: int) -> str:
    return "|".join(f"model.layers.{b}" for b in blocks)


AUTOBITS_ROWS = [
    ("autobits", "3.5 b/w of int3|int4 g128", "autobits(budget=3.5,candidates=3g128|4g128,exclude=lm_head)"),
    ("autobits", "3.5 b/w of int2 g64..int8", "autobits(budget=3.5,exclude=lm_head)"),
    *[(f"mix: {what} int4, rest int3", "3.5 b/w, g128",
       f"scope(include={inc})[quantize(bits=4,group=128)],quantize(bits=3,group=128,exclude=lm_head)")
      for what, inc in [("blocks 0-1", _blocks(0, 1)), ("blocks 6-7", _blocks(6, 7)), ("blocks 0, 4", _blocks(0, 4)),
                        ("attention", "self_attn")]],
]


# (method, config, pipeline): structured pruning (``prune``, issue 13): 25% of every MLP's channels removed (the
# weights shrink), ranked by Wanda-style output impact, by weight magnitude, or at random; then int4 on the smaller
# model (group 64: 576 channels left). Whole KV-head groups: a quarter of the heads.
PRUNE_ROWS = [
    *[(f"prune {score}", "MLP 25%", f"prune(mlp=0.25,score={score})") for score in ("wanda", "magnitude", "random")],
    ("prune wanda", "KV heads 25%", "prune(mlp=0,heads=0.25)"),
    ("prune wanda + RTN", "MLP 25%, int4 g64", "prune(mlp=0.25),quantize(bits=4,group=64,exclude=lm_head)"),
]

#: --only: row groups that can be refreshed alone (the fp32 row, every ratio's base, always runs).
GROUPS = ("weights", "smoothquant", "act_quant", "sparsify", "factorize", "autobits", "distill", "prune", "ort")


@dataclass
class Row:
    method: str
    config: str
    runtime: str  # "llmpress (PyTorch reference)" or "ONNX Runtime"
    pipeline: str = ""
    weight_bytes: int = 0
    compile_s: float = 0.0
    eval_s: float = 0.0
    ppl: dict[str, float] = field(default_factory=dict)
    tokens: dict[str, int] = field(default_factory=dict)
    error: str = ""
    notes: str = ""
    pass_s: dict[str, float] = field(default_factory=dict)  # each pass's own seconds (llmpress rows)


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _registered() -> set[str]:
    from llmpress.passes.registry import pass_names

    return set(pass_names())


def _onnx_bytes(path: Path) -> int:
    import onnx

    m = onnx.load(str(path))
    total = 0
    for t in m.graph.initializer:
        total += len(t.raw_data) if t.raw_data else onnx.numpy_helper.to_array(t).nbytes
    return total


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        from llmpress.eval.perplexity import token_stream
        from llmpress.ir.capture import capture
        from llmpress.ir.loaders import load_model

        self.args = args
        self.out = Path(args.out)
        self.work = Path(tempfile.mkdtemp(prefix="llmpress-quality-"))  # ONNX files: not results, not committed
        # A 256-position KV cache holds exactly one 256-token window; the model's default (512) would only add
        # masked positions, whose attention weights are exactly zero, at twice the attention cost.
        loaded = load_model(MODEL, cache_len=256)
        self.tokenizer = loaded.tokenizer
        self.base = capture(loaded.model, info={"source": str(MODEL)})
        self.streams = {
            "tinystories": token_stream(TS_VALID, self.tokenizer, max_tokens=args.ts_tokens),
            "wikitext2": token_stream(WIKI_VALID, self.tokenizer, max_tokens=args.wiki_tokens),
        }
        self._calibration = None
        self.rows: list[Row] = []

    # -- helpers -------------------------------------------------------------------------------------------------
    def calibration(self):
        if self._calibration is None:
            from llmpress.passes.calibration import Calibration

            t0 = time.perf_counter()
            self._calibration = Calibration.from_texts(CALIB, self.tokenizer, samples=self.args.calib_samples,
                                                       seq_len=256, seed=0)
            log.info("calibration set: %d samples of 256 tokens (%.1fs)", self.args.calib_samples,
                     time.perf_counter() - t0)
        return self._calibration

    def evaluate(self, row: Row, forward: Callable, lm: Any) -> None:
        from llmpress.eval.perplexity import perplexity

        t0 = time.perf_counter()
        for name, stream in self.streams.items():
            res = perplexity(forward, lm, stream, context=256, progress=True)
            row.ppl[name] = res.perplexity
            row.tokens[name] = res.tokens
        row.eval_s = time.perf_counter() - t0

    def add(self, row: Row, fn: Callable[[Row], None]) -> None:
        log.info("== %s %s (%s)", row.method, row.config, row.runtime)
        try:
            fn(row)
        except Exception as e:  # noqa: BLE001 - a failing method is reported in the table, not fatal
            log.exception("%s %s failed", row.method, row.config)
            row.error = f"{type(e).__name__}: {e}"[:300]
        self.rows.append(row)
        if not row.error:
            log.info("   ppl %s  bytes %d  compile %.1fs  eval %.1fs",
                     {k: round(v, 3) for k, v in row.ppl.items()}, row.weight_bytes, row.compile_s, row.eval_s)
        self.write()  # partial results survive an interrupted run

    # -- llmpress rows -------------------------------------------------------------------------------------------
    def llmpress_row(self, method: str, config: str, pipeline: str, *, needs_calib: bool = False,
                     keep: dict | None = None) -> None:
        from llmpress.api import run_pipeline
        from llmpress.eval.size import parameter_bytes

        def run(row: Row) -> None:
            t0 = time.perf_counter()
            calib = self.calibration() if needs_calib else None
            module, records = run_pipeline(self.base.clone(), pipeline, calibration=calib, progress=True)
            row.compile_s = time.perf_counter() - t0
            for rec in records:
                row.pass_s[rec.name] = row.pass_s.get(rec.name, 0.0) + round(rec.seconds, 3)
            row.weight_bytes = parameter_bytes(module)
            fn = module.exported_program.module()  # built once: Module.run rebuilds it on every call
            self.evaluate(row, fn, module.lm)
            if keep is not None:
                keep["module"] = module

        self.add(Row(method, config, "llmpress (PyTorch reference)", pipeline=pipeline), run)

    def act_quant_rows(self, names: set[str]) -> None:
        from llmpress.passes.registry import get_pass

        methods, configs = dict(WEIGHT_METHODS), dict(WEIGHT_CONFIGS)
        for label, config, act_opts, block in ACT_QUANT_ROWS:
            pass_name = methods[label]
            if pass_name not in names:
                continue
            calib = bool(getattr(get_pass(pass_name), "needs_calibration", False))
            act = f"act_quant({act_opts})" if act_opts else "act_quant"
            pipe = f"{pass_name}({configs[config]},exclude=lm_head),{act}"
            self.llmpress_row(f"{label} + act_quant", f"{config}, int8 act g{block}", pipe, needs_calib=calib)

    def sparsify_rows(self) -> None:
        for label, config, pipe in SPARSIFY_ROWS:
            self.llmpress_row(f"sparsify {label}", config, pipe, needs_calib="method=magnitude" not in pipe)

    # -- ONNX Runtime rows ---------------------------------------------------------------------------------------
    def ort_rows(self, int4_module: Any) -> None:
        from llmpress.backends.onnx import OrtProgram, export

        fp32_path = self.work / "fp32.onnx"

        def fp32(row: Row) -> None:
            t0 = time.perf_counter()
            export(self.base, fp32_path)
            row.compile_s = time.perf_counter() - t0
            row.weight_bytes = _onnx_bytes(fp32_path)
            self.evaluate(row, OrtProgram(fp32_path, threads=self.args.threads), self.base.lm)

        self.add(Row("fp32", "-", "ONNX Runtime", pipeline="llmpress ONNX export"), fp32)

        def ort_int4(row: Row) -> None:
            import onnx
            from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

            if not fp32_path.exists():
                export(self.base, fp32_path)
            path = self.work / "ort_int4.onnx"
            t0 = time.perf_counter()
            q = MatMulNBitsQuantizer(onnx.load(str(fp32_path)), bits=4, block_size=128, is_symmetric=True,
                                     nodes_to_exclude=["lm_head/MatMul"])
            q.process()
            q.model.save_model_to_file(str(path))
            row.compile_s = time.perf_counter() - t0
            n = sum(node.op_type == "MatMulNBits" for node in onnx.load(str(path)).graph.node)
            row.notes = f"{n} MatMuls quantized"
            row.weight_bytes = _onnx_bytes(path)
            self.evaluate(row, OrtProgram(path, threads=self.args.threads), self.base.lm)

        self.add(Row("ORT MatMulNBitsQuantizer", "int4 g128", "ONNX Runtime",
                     pipeline="MatMulNBitsQuantizer(bits=4,block_size=128,is_symmetric=True)"), ort_int4)

        if int4_module is not None:
            def ours_int4(row: Row) -> None:
                path = self.work / "llmpress_int4.onnx"
                t0 = time.perf_counter()
                export(int4_module, path)
                row.compile_s = time.perf_counter() - t0
                row.weight_bytes = _onnx_bytes(path)
                self.evaluate(row, OrtProgram(path, threads=self.args.threads), int4_module.lm)

            self.add(Row("RTN -> ONNX MatMulNBits", "int4 g128", "ONNX Runtime",
                         pipeline="quantize(bits=4,group=128,exclude=lm_head) + llmpress ONNX export"), ours_int4)

    # -- the run -------------------------------------------------------------------------------------------------
    def run(self) -> None:
        names = _registered()
        only = set(self.args.only or GROUPS)
        if not only <= {*GROUPS}:
            raise SystemExit(f"--only: unknown group(s) {sorted(only - set(GROUPS))}; groups: {', '.join(GROUPS)}")
        names = {n for n in names if n not in {"smoothquant", "act_quant", "sparsify", "factorize", "autobits",
                                               "distill", "prune"} or n in only}
        self.t_start = time.perf_counter()
        self.load_start = os.getloadavg()
        self.llmpress_row("fp32", "-", "")
        if "weights" in only:
            self.llmpress_row("exact", "-", "exact")
        keep: dict = {}
        for label, pass_name in WEIGHT_METHODS if "weights" in only else ():
            if pass_name not in names:
                log.info("%s (%s) is not registered: no rows", label, pass_name)
                continue
            from llmpress.passes.registry import get_pass

            calib = bool(getattr(get_pass(pass_name), "needs_calibration", False))
            for config, opts in WEIGHT_CONFIGS:
                pipe = f"{pass_name}({opts},exclude=lm_head)"
                self.llmpress_row(label, config, pipe, needs_calib=calib,
                                  keep=keep if (pass_name, config) == ("quantize", "int4 g128") else None)
        if "smoothquant" in names:
            self.llmpress_row("SmoothQuant", "W8A8", "smoothquant(exclude=lm_head)", needs_calib=True)
        if "act_quant" in names:
            self.act_quant_rows(names)
        if "sparsify" in names:
            self.sparsify_rows()
        if "factorize" in names:
            for label, config, pipe, calib in FACTORIZE_ROWS:
                self.llmpress_row(label, config, pipe, needs_calib=calib)
        for label, config, pipe in AUTOBITS_ROWS if "autobits" in names else ():
            self.llmpress_row(label, config, pipe, needs_calib=pipe.startswith("autobits"))
        if "distill" in names:
            for label, config, pipe in DISTILL_ROWS:
                self.llmpress_row(label, config, pipe, needs_calib=True)
        if "prune" in names:
            for label, config, pipe in PRUNE_ROWS:
                self.llmpress_row(label, config, pipe, needs_calib="score=magnitude" not in pipe
                                  and "score=random" not in pipe)
        if "ort" in only:
            self.ort_rows(keep.get("module"))
        self.total_s = time.perf_counter() - self.t_start
        self.write(final=True)

    # -- output --------------------------------------------------------------------------------------------------
    def meta(self, final: bool) -> dict:
        import onnxruntime

        return {
            "model": "tinystories-llama (../shared/models/tinystories-llama)",
            "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
            "git_commit": _git_commit(),
            "complete": final,
            "total_s": getattr(self, "total_s", time.perf_counter() - getattr(self, "t_start", time.perf_counter())),
            "context": 256,
            "data": {
                "tinystories": {"file": "../shared/data/tinystories/valid.txt",
                                "prefix_tokens": self.args.ts_tokens, "scored_tokens": len(self.streams[
                                    "tinystories"]) - 1},
                "wikitext2": {"file": "../shared/data/wikitext-2/valid.txt",
                              "prefix_tokens": self.args.wiki_tokens,
                              "scored_tokens": len(self.streams["wikitext2"]) - 1},
            },
            "calibration": {"file": "../shared/data/tinystories/calib.txt", "samples": self.args.calib_samples,
                            "seq_len": 256, "seed": 0},
            "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                        "torch_threads": torch.get_num_threads(), "ort_threads": self.args.threads,
                        "loadavg_start": list(getattr(self, "load_start", ())), "loadavg_end": list(os.getloadavg())},
            "versions": {"python": sys.version.split()[0], "torch": torch.__version__,
                         "onnxruntime": onnxruntime.__version__},
        }

    def write(self, final: bool = False) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        meta = self.meta(final)
        rows = self.rows
        if self.args.only:  # refresh those groups' rows in the last run's table, keep the others as they were
            if not hasattr(self, "earlier"):  # read once: the partial writes below replace the file
                path = self.out / "quality.json"
                self.earlier = json.loads(path.read_text()) if path.is_file() else {"rows": [], "meta": {}}
            meta["refreshed"] = sorted(self.args.only)
            rows = _merged(self.earlier, self.rows, meta)
        data = {"meta": meta, "rows": [r.__dict__ for r in rows]}
        (self.out / "quality.json").write_text(json.dumps(data, indent=1) + "\n")
        (self.out / "quality.md").write_text(markdown(rows, meta))
        if final:
            plot(rows, self.out / "quality.png")


def _merged(old: dict, new: list[Row], meta: dict) -> list[Row]:
    """The rows of an earlier run (its quality.json data) with each row of ``new`` in place of the one with its
    method, config and runtime (appended when new); ``meta`` records which run the kept rows came from."""
    key = lambda r: (r.method, r.config, r.runtime)  # noqa: E731
    fresh = {key(r): r for r in new}
    rows = [fresh.pop(key(r), r) for r in (Row(**d) for d in old["rows"])]
    meta["kept_rows_from"] = {k: old["meta"].get(k) for k in ("date_utc", "git_commit", "total_s")}
    return rows + list(fresh.values())


def _fmt_ratio(x: float | None, base: float | None, digits: int = 4) -> str:
    if x is None or base is None or not base:
        return ""
    return f"{x / base:.{digits}f}x"


def markdown(rows: list[Row], meta: dict) -> str:
    base = next((r for r in rows if r.method == "fp32" and r.runtime.startswith("llmpress") and not r.error), None)
    d = meta["data"]
    lines = [
        "# Quality: perplexity and size of every compression method on tinystories-llama",
        "",
        f"Generated by `benchmarks/quality.py` at {meta['date_utc']} UTC (commit {meta['git_commit']}), "
        f"{'complete run' if meta['complete'] else 'PARTIAL run'}, total {meta['total_s']:.0f} s on "
        f"{meta['machine']['cpus']} CPUs ({meta['machine']['torch_threads']} torch / "
        f"{meta['machine']['ort_threads']} ORT threads, load average at start "
        f"{', '.join(f'{x:.1f}' for x in meta['machine']['loadavg_start'])}"
        + ("; other work shared the machine, so times are indicative)." if meta["machine"]["loadavg_start"]
           and meta["machine"]["loadavg_start"][0] > 1.0 else ")."),
        *([f"This run refreshed the {', '.join(meta['refreshed'])} rows (and fp32); the other rows are from the run "
           f"of {meta['kept_rows_from']['date_utc']} UTC (commit {meta['kept_rows_from']['git_commit']})."]
          if meta.get("refreshed") else []),
        "",
        f"Perplexity protocol: paragraphs split on blank lines, BOS before each, non-overlapping {meta['context']}-"
        "token windows scored from their start, token level (KV cache of 256 positions, one window). "
        "TinyStories valid: "
        f"{d['tinystories']['scored_tokens']:,} tokens scored"
        + ("" if d["tinystories"]["prefix_tokens"] is None else f" (prefix of {d['tinystories']['prefix_tokens']:,})")
        + f"; WikiText-2 valid: the first {d['wikitext2']['scored_tokens'] + 1:,} tokens "
        f"({d['wikitext2']['scored_tokens']:,} scored). Calibration: {meta['calibration']['samples']} windows of "
        "256 tokens from tinystories/calib.txt (seed 0). Weight-only methods quantize every linear but `lm_head`, "
        "symmetric; `+ act_quant` rows also quantize those layers' inputs to int8 at run time, per token and block "
        "of the stated length (`int8 act g128`), on the same weights as the row without it. Weight bytes: the "
        "module's stored weights (llmpress rows) or the ONNX file's initializers (ONNX Runtime rows), embeddings and "
        "RoPE tables included.",
        "",
        "| method | config | runs on | weight MB | size vs fp32 | PPL TinyStories | vs fp32 | PPL WikiText-2 | "
        "vs fp32 | compile s | eval s |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        runs = "PyTorch ref" if r.runtime.startswith("llmpress") else "ORT"
        r = dataclasses.replace(r, method=r.method.replace("|", "\\|"), config=r.config.replace("|", "\\|"))
        if r.error:
            lines.append(f"| {r.method} | {r.config} | {runs} | failed: {r.error.splitlines()[0][:120]} "
                         "| | | | | | | |")
            continue
        ts, wk = r.ppl.get("tinystories"), r.ppl.get("wikitext2")
        lines.append(
            f"| {r.method} | {r.config} | {runs} | {r.weight_bytes / 1e6:.2f} | "
            f"{_fmt_ratio(r.weight_bytes, base.weight_bytes if base else None, 3)} | "
            f"{ts:.3f} | {_fmt_ratio(ts, base.ppl.get('tinystories') if base else None)} | "
            f"{wk:.2f} | {_fmt_ratio(wk, base.ppl.get('wikitext2') if base else None)} | "
            f"{r.compile_s:.1f} | {r.eval_s:.1f} |")
    notes = [f"- {r.method} {r.config}: {r.notes}" for r in rows if r.notes]
    lines += ["", "Pipelines:", ""]
    lines += [f"- {r.method} {r.config} ({'ORT' if r.runtime == 'ONNX Runtime' else 'ref'}): "
              f"`{r.pipeline or '(none)'}`"
              + (f" ({', '.join(f'{k} {v:.1f} s' for k, v in r.pass_s.items())})" if r.pass_s else "")
              for r in rows]
    if notes:
        lines += ["", "Notes:", ""] + notes
    return "\n".join(lines) + "\n"


def plot(rows: list[Row], path: Path) -> None:
    """Perplexity (relative to fp32) against weight bytes: one line per weight-only method across bit widths,
    single points for the other rows."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed (pip install -e '.[bench]'): no plot")
        return
    ok = [r for r in rows if not r.error and "tinystories" in r.ppl]
    base = next((r for r in ok if r.method == "fp32" and r.runtime.startswith("llmpress")), None)
    if base is None:
        return
    ref = base.ppl["tinystories"]
    fig, ax = plt.subplots(figsize=(8, 5.5))
    for label, _ in WEIGHT_METHODS:
        pts = sorted((r.weight_bytes / 1e6, r.ppl["tinystories"] / ref) for r in ok
                     if r.method == label and r.runtime.startswith("llmpress"))
        if pts:
            ax.plot(*zip(*pts), marker="o", label=label)
    singles = [r for r in ok if r.method not in {m for m, _ in WEIGHT_METHODS} or not r.runtime.startswith("llmpress")]
    markers = iter("sDv^P*Xhd<>p")
    for r in singles:
        where = "ORT" if r.runtime == "ONNX Runtime" else "ref"
        ax.scatter(r.weight_bytes / 1e6, r.ppl["tinystories"] / ref, marker=next(markers, "o"), s=50, zorder=3,
                   label=f"{r.method} {r.config} ({where})".replace(" - ", " "))
    for config, _ in WEIGHT_CONFIGS:  # name the bit widths once, at the top of their column
        xs = [r.weight_bytes / 1e6 for r in ok if r.config == config and r.method == "RTN"]
        if xs:
            ax.axvline(xs[0], color="grey", lw=0.5, alpha=0.5)
            ax.annotate(config, (xs[0], 1.0), xycoords=("data", "axes fraction"), textcoords="offset points",
                        xytext=(2, -4), ha="left", va="top", rotation=90, fontsize=7, color="grey")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("weight bytes (MB, log scale)")
    ax.set_ylabel("perplexity / fp32 perplexity (TinyStories valid, context 256)")
    ax.set_title(f"tinystories-llama: size vs quality (fp32 perplexity {ref:.2f})", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="upper right")
    ax.set_ylim(top=max(1.02, max(r.ppl["tinystories"] / ref for r in ok)) * 1.15)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def replot(out: Path) -> None:
    """Rewrite quality.md and quality.png from an existing quality.json (same numbers, new presentation)."""
    data = json.loads((out / "quality.json").read_text())
    rows = [Row(**r) for r in data["rows"]]
    (out / "quality.md").write_text(markdown(rows, data["meta"]))
    plot(rows, out / "quality.png")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    p.add_argument("--ts-tokens", type=int, default=None, help="TinyStories prefix (default: all of valid.txt)")
    p.add_argument("--wiki-tokens", type=int, default=16384, help="WikiText-2 prefix in tokens (default 16384)")
    p.add_argument("--calib-samples", type=int, default=128)
    p.add_argument("--threads", type=int, default=None,
                   help="torch and ONNX Runtime intra-op threads (default: 2, or 1 when the machine is already "
                        "loaded: oversubscribed OpenMP threads made PyTorch 10x slower in our measurements)")
    p.add_argument("--quick", action="store_true", help="smoke run: 2,048-token prefixes, 8 calibration samples")
    p.add_argument("--replot", action="store_true", help="only rewrite quality.md/png from quality.json")
    p.add_argument("--only", type=lambda v: v.split(","), default=None,
                   help=f"comma-separated row groups to rerun ({', '.join(GROUPS)}); the other rows of "
                        "results/quality.json are kept as they were (the header says from which run)")
    args = p.parse_args(argv)
    if args.replot:
        replot(Path(args.out))
        return 0
    if args.quick:
        args.ts_tokens, args.wiki_tokens, args.calib_samples = 2048, 2048, 8
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("onnxruntime").setLevel(logging.WARNING)  # the quantizer logs every node it skips
    if args.threads is None:
        cpus = os.cpu_count() or 1
        args.threads = 1 if os.getloadavg()[0] > cpus - 1 else min(2, cpus)
    torch.set_num_threads(args.threads)
    bench = Bench(args)
    try:
        bench.run()
    finally:
        shutil.rmtree(bench.work, ignore_errors=True)
    print((Path(args.out) / "quality.md").read_text())
    return 0 if all(not r.error for r in bench.rows) else 1


if __name__ == "__main__":
    sys.exit(main())
