"""Decode and prefill speed of compressed builds beside the dense one: pruned, factorized and 2:4-sparse.

    .venv/bin/python benchmarks/compressed_speed.py                     # 110m shape, 5 rounds
    .venv/bin/python benchmarks/compressed_speed.py --shape 1.1b --rounds 7
    .venv/bin/python benchmarks/compressed_speed.py --rounds 1 --prefill 16 --decode 4   # a smoke run

One model shape (``shapes.py``: random weights at a trained model's scale, ``--shape``, default 110m), compiled for
``cpu`` by ``llmpress compile`` (``runtimes.llmpress_compile``) as w4a8 builds (int4 g128 weights, dynamic int8
activations, every linear quantized as ``speed.py``'s rows):

- ``dense``: ``fuse,quantize(bits=4,group=128),act_quant(bits=8)``;
- ``pruned``: ``prune(mlp=0.25)`` first (25% of every MLP's channels removed: the gate/up/down weights shrink,
  about 1/6 of the 110m model's block weights). ``score=magnitude``: the weights are random, so which channels go
  does not change the speed, and a build needs no calibration data;
- ``factorized``: ``factorize(ratio=0.5,multiple=128)`` first (every linear but the tied ``lm_head`` as two
  linears holding about half its parameters, ranks multiples of 128 so group 128 fits);
- ``sparse 2:4``: ``sparsify(pattern=2:4)`` first. Its int8-activation layers have no sparse kernel (zeros in the
  int4 weights, computed dense), so the same speed as ``dense`` is expected: the row shows whether that holds;
- ``sparse 2:4 + w4a16``, twice over the same weights (int4 g128, float activations): ``--backend-option
  sparse_kernels=never`` (dense compute, what ``auto`` picks for int4 2:4) and ``sparse_kernels=always`` (the int4
  2:4 kernel of ``kernels/sparse.py``).

Timed interleaved, round by round (``speed.time_group``: every build once per round after one warm-up round, the
spinning worker threads of the previous build waited out before each), medians over ``--rounds``: prefill of a
``--prefill``-token prompt (ms) and greedy decode of ``--decode`` tokens after it (tokens/s), with the weight bytes
each build reads per token. Writes ``results/compressed_speed.json`` and ``results/compressed_speed.md``.
``--reuse`` keeps an artifact already compiled from the same pipeline (``benchmarks/.cache/artifacts``).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from machine import loadavg, machine_env  # noqa: E402

RESULTS = HERE / "results"
log = logging.getLogger("benchmarks.compressed_speed")

W4A8 = "fuse,quantize(bits=4,group=128),act_quant(bits=8)"
W4A16_24 = "sparsify(pattern=2:4,exclude=lm_head),fuse,quantize(bits=4,group=128)"
#: (label, pipeline, backend options): the dense build first, the ratios are against it
BUILDS = [
    ("dense w4a8", W4A8, {}),
    ("pruned mlp 25% + w4a8", f"prune(mlp=0.25,score=magnitude),{W4A8}", {}),
    ("factorized 50% + w4a8", f"factorize(ratio=0.5,multiple=128,exclude=lm_head),{W4A8}", {}),
    ("sparse 2:4 + w4a8", f"sparsify(pattern=2:4,exclude=lm_head),{W4A8}", {}),
    ("sparse 2:4 + w4a16, dense compute", W4A16_24, {"sparse_kernels": "never"}),
    ("sparse 2:4 + w4a16, sparse kernel", W4A16_24, {"sparse_kernels": "always"}),
]


def _slug(label: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in label).strip("-")


def _compiled_from(out: Path, pipeline: str, options: dict) -> bool:
    try:
        manifest = json.loads((out / "manifest.json").read_text())
    except (OSError, ValueError):
        return False
    return manifest.get("pipeline") == pipeline and manifest.get("backend_options", {}) == options


def run(shape: str, rounds: int, prefill: int, decode: int, threads: int, reuse: bool) -> tuple[list[dict], dict]:
    from runtimes import llmpress_compile, llmpress_runtime
    from shapes import llama_folder
    from speed import time_group

    env = machine_env(shape=shape, rounds=rounds, prefill=prefill, decode=decode, threads=threads)
    folder = llama_folder(shape)
    art_dir = HERE / ".cache" / "artifacts"
    art_dir.mkdir(parents=True, exist_ok=True)
    built, rows = [], []
    for label, pipeline, options in BUILDS:
        out = art_dir / f"{shape}-compressed-{_slug(label)}"
        try:
            compile_s = (None if reuse and _compiled_from(out, pipeline, options)
                         else llmpress_compile(folder, pipeline, out, options))
            built.append(llmpress_runtime(label, pipeline, "w4a16" if "w4a16" in label else "w4a8", threads, out,
                                          compile_s))
        except Exception as e:  # noqa: BLE001 - a build that fails here: a row saying why
            log.warning("%s %s: %s", shape, label, e)
            rows.append({"model": shape, "runtime": f"llmpress {label}", "pipeline": pipeline,
                         "error": f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"})
    log.info("%s: timing %s", shape, ", ".join(r.name for r in built))
    timed = time_group(built, rounds, prefill, decode) if built else {}
    for r in built:
        rows.append({"model": shape, "runtime": r.name, **timed[r.name], "weight_bytes": r.weight_bytes,
                     "compile_s": r.compile_s, **r.info})
        r.close()
    dense = next((x for x in rows if x["runtime"] == f"llmpress {BUILDS[0][0]}" and "error" not in x), None)
    for x in rows:
        if dense is not None and "error" not in x:
            x["decode_vs_dense"] = x["decode_tokens_per_s"] / dense["decode_tokens_per_s"]
            x["prefill_vs_dense"] = dense["prefill_ms"] / x["prefill_ms"]
            x["bytes_vs_dense"] = x["weight_bytes"] / dense["weight_bytes"]
    env["load_after"] = loadavg()
    return rows, env


def markdown(rows: list[dict], env: dict) -> str:
    lines = [f"# Compressed builds beside dense ({env['shape']}, w4a8, cpu)", "",
             f"{env['cpu']}, {env['threads']} threads, {env['date']}, load {env['load_before']} -> "
             f"{env['load_after']}. Batch 1, {env['prefill']}-token prompt, {env['decode']} greedy decode steps, "
             f"median of {env['rounds']} interleaved rounds; ratios against dense w4a8 (> 1: faster / "
             "more bytes). Written by `benchmarks/compressed_speed.py`.", "",
             "| build | weights MB/token | bytes vs dense | prefill ms | prefill ratio | decode tok/s | decode ratio "
             "| decode samples | compile s |", "|---|---:|---:|---:|---:|---:|---:|---|---:|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['runtime']} | | | | | | | {r['error']} | |")
            continue
        comp = f"{r['compile_s']:.0f}" if r.get("compile_s") is not None else "reused"
        lines.append(f"| {r['runtime'].removeprefix('llmpress ')} | {r['weight_bytes'] / 1e6:.1f} | "
                     f"{r.get('bytes_vs_dense', float('nan')):.3f} | {r['prefill_ms']:.1f} | "
                     f"{r.get('prefill_vs_dense', float('nan')):.3f} | {r['decode_tokens_per_s']:.1f} | "
                     f"{r.get('decode_vs_dense', float('nan')):.3f} | "
                     f"{' '.join(f'{s:g}' for s in r['decode_samples'])} | {comp} |")
    lines += ["", "Pipelines:", ""] + [f"- {label}: `{pipe}`" + "".join(f" `--backend-option {k}={v}`"
                                                                        for k, v in opts.items())
                                         for label, pipe, opts in BUILDS]
    lines += ["", "Pruning and factorization change shapes, so they read fewer bytes and need no special kernel. The "
              "2:4 w4a8 build computes dense (its int8-activation layers have no sparse kernel; the artifact stores "
              "the weights compressed, expanded at load): it reads as many bytes per token as dense, so any speed "
              "difference from dense is noise. The two w4a16 2:4 rows hold the same weights: dense compute (what "
              "`sparse_kernels=auto` picks, `results/sparse_kernels.md`) against the int4 2:4 kernel "
              "(`kernels/sparse.py`: two codes per group of four plus their positions, 3 bits per weight).", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from shapes import SHAPES

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="110m", choices=sorted(SHAPES))
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--prefill", type=int, default=128)
    ap.add_argument("--decode", type=int, default=32)
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--reuse", action="store_true", help="keep artifacts compiled from the same pipeline")
    ap.add_argument("--out", type=Path, default=RESULTS)
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    rows, env = run(a.shape, a.rounds, a.prefill, a.decode, a.threads, a.reuse)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "compressed_speed.json").write_text(json.dumps({"env": env, "rows": rows}, indent=1) + "\n")
    (a.out / "compressed_speed.md").write_text(markdown(rows, env))
    print(markdown(rows, env))
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
