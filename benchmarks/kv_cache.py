"""KV cache: float32 vs int8 (``kv8``) on tinystories-llama, side by side in one run: memory, quality, speed.

Both rows compile the same model with int4 g128 weights (``w4a16``); the second adds ``kv8`` (``kv_quant``: the cache
stored as int8 codes + one float32 scale per (token, head)). Each is built for TVM ``cpu`` and for ONNX Runtime
(target ``onnx``), so the int8 cache is measured in both runtimes against the float cache in the same runtime.

Columns: KV-cache bytes for the model's full 512-position cache (from the artifact's LM cache layout) and its ratio
to the float cache; perplexity on ``tinystories/valid.txt`` (the pinned protocol of ``llmpress.eval.perplexity``,
``--max-tokens`` first tokens, through the compiled program); prefill of ``--prefill`` random tokens (ms) and
batch-1 decode tokens/s right after it, at a short and a long context (``llmpress.eval.latency.measure``, median
of ``--repeats`` rounds after a warm-up, the rows interleaved within each round, one thread per runtime). Ratios compare the int8 cache to the float cache
of the same runtime.

Run: ``.venv/bin/python benchmarks/kv_cache.py`` (about 3 minutes on 2 cores) -> ``benchmarks/results/kv_cache.{md,json}``.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

import torch
from machine import interleaved_timings, loadavg, machine_env

REPO = Path(__file__).resolve().parents[1]
SHARED = (REPO / ".." / "shared").resolve()
RESULTS = REPO / "benchmarks" / "results"

log = logging.getLogger("benchmarks.kv_cache")

PIPELINES = {"float32 cache": "w4a16", "int8 cache": "w4a16,kv8"}


def build_row(label: str, pipeline: str, target: str, *, stream, args) -> tuple[dict, object, object]:
    """Compile, score perplexity; returns the row, the forward function and the LM convention."""
    import llmpress
    from llmpress.eval.perplexity import perplexity

    model = SHARED / "models" / "tinystories-llama"
    t0 = time.perf_counter()
    art = llmpress.compile(model, pipeline=pipeline, target=target, progress=False)
    row = {"cache": label, "pipeline": pipeline, "target": target, "compile_seconds": round(time.perf_counter() - t0, 1),
           "kv_cache_bytes": art.lm.cache_bytes(), "cache_len": art.lm.cache_len,
           "cache_dtypes": sorted({c["dtype"] for c in art.lm.cache_specs()})}
    forward = art.compiled.forward
    if target.startswith("onnx"):  # the same file in a session pinned to the benchmark's thread count
        from llmpress.backends.onnx import OrtProgram

        forward = OrtProgram(art.compiled.path, threads=args.threads).forward
    res = perplexity(forward, art.lm, stream, context=256, progress=False)
    row.update(perplexity=res.perplexity, ppl_tokens=res.tokens)
    log.info("%s", row)
    return row, forward, art.lm


def to_markdown(rows: list[dict], env: dict) -> str:
    lines = [
        "# KV cache: float32 vs int8, tinystories-llama, int4 g128 weights",
        "",
        f"Machine: {env['cpu']} ({env['cores']} cores visible, {env['threads']} thread per runtime), load average "
        f"{env['load_before']} before / {env['load_after']} after (a shared machine: timings are indicative). "
        f"Produced by `benchmarks/kv_cache.py` on {env['date']} in {env['seconds']} s.",
        "",
        f"Perplexity: {env['ppl_tokens']:,} tokens of tinystories/valid.txt, context 256. Speed: prefill of "
        f"N random tokens, then {env['decode']} greedy decode steps, median of {env['repeats']} rounds (every row measured once per round, interleaved); 'short' is "
        f"N = {env['prefill']}, 'long' N = {env['long_prefill']} (decode then reads a cache that is mostly full). "
        "Ratios: int8 cache against the float32 cache in the same runtime.",
        "",
        "| runtime | cache | KV bytes | memory ratio | perplexity | prefill ms (short) | decode tok/s (short) "
        "| decode tok/s (long) | decode ratio (short / long) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    base = {}
    for r in rows:
        base.setdefault(r["target"], r)
        b = base[r["target"]]
        mem = b["kv_cache_bytes"] / r["kv_cache_bytes"]
        ds = r["short"]["decode_tokens_per_s"] / b["short"]["decode_tokens_per_s"]
        dl = r["long"]["decode_tokens_per_s"] / b["long"]["decode_tokens_per_s"]
        runtime = "TVM cpu" if r["target"] == "cpu" else "ONNX Runtime"
        lines.append(f"| {runtime} | {r['cache']} | {r['kv_cache_bytes']:,} | {mem:.2f}x | {r['perplexity']:.4f} "
                     f"| {r['short']['prefill_ms']:.1f} | {r['short']['decode_tokens_per_s']:.1f} "
                     f"| {r['long']['decode_tokens_per_s']:.1f} | {ds:.2f}x / {dl:.2f}x |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--prefill", type=int, default=128)
    ap.add_argument("--long-prefill", type=int, default=352)
    ap.add_argument("--decode", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--max-tokens", type=int, default=None, help="score only the first N tokens (default: all)")
    ap.add_argument("--targets", default="cpu,onnx")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    os.environ.setdefault("TVM_NUM_THREADS", str(args.threads))
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    torch.set_num_threads(args.threads)
    import llmpress
    from llmpress.eval.perplexity import token_stream

    env = machine_env(threads=args.threads, prefill=args.prefill, long_prefill=args.long_prefill,
                      decode=args.decode, repeats=args.repeats, max_tokens=args.max_tokens)
    tok = llmpress.load_model(SHARED / "models" / "tinystories-llama").tokenizer
    stream = token_stream(SHARED / "data" / "tinystories" / "valid.txt", tok, max_tokens=args.max_tokens)
    t0 = time.perf_counter()
    built = [build_row(label, pipe, target, stream=stream, args=args)
             for target in args.targets.split(",") for label, pipe in PIPELINES.items()]
    interleaved_timings(built, {"short": args.prefill, "long": args.long_prefill}, decode=args.decode,
                        repeats=args.repeats)
    rows = [row for row, _, _ in built]
    env["seconds"] = round(time.perf_counter() - t0, 1)
    env["ppl_tokens"] = rows[0]["ppl_tokens"]
    env["load_after"] = loadavg()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "kv_cache.json").write_text(json.dumps({"env": env, "rows": rows}, indent=2) + "\n")
    (out / "kv_cache.md").write_text(to_markdown(rows, env))
    sys.stdout.write(to_markdown(rows, env))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
