"""Fused epilogues on/off: TVM ``cpu`` decode tok/s and prefill ms of the w4a8 models, interleaved.

Each shape (``shapes.py``: random weights with a trained model's scale, or a model folder, ``--model``) goes through
the ``w4a8`` preset (which fuses gate/up) and is lowered three times for TVM ``cpu``: with the fusions (``TVMBackend(epilogues=True)``:
the SwiGLU epilogue in the gate/up kernel, ``kernels/epilogue.py``, and residual add + RMSNorm as one
kernel, ``kernels/add_norm.py``) and without them (``epilogues=False``: the separate split/silu/multiply kernel, the
add and the two norm kernels), and with them in the decode function only (``epilogues="decode"``: prefill reads the
same SwiGLU-layout weights with the plain GEMM and the separate kernels). The programs read the same weights and compute
the same logits up to rounding: fp32 summation order, which w4a8's int8 activation quantization can amplify (an
input one rounding away lands on the other side of a rounding boundary and its code moves a whole step; see
``test_tinystories_w4a8_perplexity_tvm_equals_reference``). Each row's largest logit difference from the reference
interpreter on one 16-token prompt is reported, and a row more than 10% of the logits' scale away (a wrong layout,
O(1)) stops the run. Timings: ``machine.step_timings`` (single decode steps, each timed alone, in blocks whose
starting row rotates: the decode comparison), then ``machine.interleaved_timings`` (one prefill of ``--prefill`` random tokens, then ``--decode`` greedy steps; each
round measures both rows, medians over ``--repeats`` rounds), plus a ``profile_decode`` table per row (where one
decode step spends its time, and how many VM calls it makes).

Run: ``.venv/bin/python benchmarks/epilogue.py [--shapes 110m,1.1b] [--model FOLDER] [--repeats 7]`` ->
``benchmarks/results/epilogue.{md,json}``. The 110M shape builds in about a minute per row on an idle 2-core
machine; on a loaded one, compare the ratio, not the absolute rates.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch
from machine import interleaved_timings, loadavg, machine_env, step_timings

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"

log = logging.getLogger("benchmarks.epilogue")

ROWS = {"fused": True, "fused in decode only": "decode", "separate kernels": False}


def build(shape: str, threads: int) -> list[tuple[dict, object, object]]:
    """Both rows of ``shape`` (a ``shapes.py`` name or a model folder): ``[(row, compiled, lm), ...]``, each checked
    against the reference on one prompt."""
    from shapes import llama_folder

    from llmpress.api import prepare, run_pipeline
    from llmpress.backends.tvm import TVMBackend
    from llmpress.eval.generate import empty_cache
    from llmpress.passes.presets import PRESETS

    folder = Path(shape) if Path(shape).is_dir() else llama_folder(shape)
    module, _ = prepare(str(folder), None)
    shape = folder.name if Path(shape).is_dir() else shape
    module, _ = run_pipeline(module, PRESETS["w4a8"], progress=False)
    out = []
    ids = torch.randint(3, module.lm.vocab_size, (1, 16), generator=torch.Generator().manual_seed(1))
    zero = torch.zeros(1, dtype=torch.int64)
    with torch.no_grad():
        ref = module.run(ids, zero, *empty_cache(module.lm))[0]
    scale = float(ref.abs().max())
    for label, fused in ROWS.items():
        t0 = time.perf_counter()
        compiled = TVMBackend(epilogues=fused).lower(module, "cpu", progress=True)
        compiled.threads = threads
        row = {"shape": shape, "row": label, "epilogues": fused, "compile_s": round(time.perf_counter() - t0, 1),
               "build": compiled.running.name}
        got = torch.as_tensor(compiled(ids, zero, *empty_cache(module.lm))[0])
        row["max_logit_diff"] = float((got - ref).abs().max())
        row["logit_scale"] = scale
        if row["max_logit_diff"] > 0.1 * scale:
            raise SystemExit(f"{shape} {label}: logits {row['max_logit_diff']:.3g} from the reference (scale "
                             f"{scale:.3g})")
        out.append((row, compiled, module.lm))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default="110m", help="comma-separated shapes.py names (110m, 1.1b)")
    ap.add_argument("--model", action="append", default=[], help="a model folder measured after the shapes (e.g. "
                    "/work/shared/models/tinystories-llama: at its size kernel and VM-call counts matter most)")
    ap.add_argument("--prefill", type=int, default=128)
    ap.add_argument("--decode", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=16, help="decode steps per row in each block of the step timing")
    ap.add_argument("--blocks", type=int, default=40, help="blocks of the step timing (rows rotate each block)")
    ap.add_argument("--no-profile", action="store_true", help="skip the per-row decode-step profile")
    ap.add_argument("--out", default=str(RESULTS / "epilogue"), help="output path without extension")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    sys.path.insert(0, str(REPO / "benchmarks"))
    env = machine_env(threads=args.threads, prefill=args.prefill, decode=args.decode, repeats=args.repeats,
                      steps=args.steps, blocks=args.blocks)
    rows, profiles = [], {}
    for shape in [s for s in args.shapes.split(",") if s] + args.model:
        built = build(shape, args.threads)
        step_timings(built, prefill=args.prefill, steps=args.steps, blocks=args.blocks)
        interleaved_timings(built, {"prefill": args.prefill}, decode=args.decode, repeats=args.repeats)
        if not args.no_profile:
            from profile_decode import profile

            for row, compiled, _ in built:
                profiles[f"{row['shape']} {row['row']}"] = profile(_Art(compiled), prefill=args.prefill)
        rows += [row for row, _, _ in built]
    env["load_after"] = loadavg()
    Path(args.out + ".json").write_text(json.dumps({"env": env, "rows": rows, "profiles": profiles}, indent=1))
    Path(args.out + ".md").write_text(markdown(env, rows, profiles))
    sys.stdout.write(markdown(env, rows, profiles))


class _Art:
    """What ``profile_decode.profile`` reads of an artifact: the compiled program and its LM convention."""

    def __init__(self, compiled) -> None:
        self.compiled, self.lm = compiled, compiled.lm


def markdown(env: dict, rows: list[dict], profiles: dict) -> str:
    lines = ["# Fused epilogues (SwiGLU in gate/up, residual add + RMSNorm): TVM cpu, w4a8", "",
             f"{env['cpu']}, {env['threads']} threads, {env['date']}, load {env['load_before']} -> "
             f"{env.get('load_after', '?')}.", "",
             f"Decode step: {env['blocks']} blocks of {env['steps']} single decode steps per row after a "
             f"{env['prefill']}-token prefill, each step timed alone, rows taking turns and the starting row rotating "
             "every block (`machine.step_timings`); median and 25th percentile of the step times. Step ratio: "
             "separate / this row (> 1: this row decodes faster). Whole runs: prefill of "
             f"{env['prefill']} random tokens then {env['decode']} greedy decode steps, medians of {env['repeats']} "
             "interleaved rounds (ratios this row / separate: > 1 faster decode, < 1 faster prefill); these move by "
             "a few percent between runs of the same build.", "",
             "| shape | row | build | decode step ms (median / p25) | step ratio (median / p25) | prefill ms | "
             "decode tok/s | whole-run ratio | max logit diff from reference | compile s |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    base = {r["shape"]: r for r in rows if not r["epilogues"]}
    for r in rows:
        p = r["prefill"]
        b = base[r["shape"]]["prefill"]
        ratio = (f"decode {p['decode_tokens_per_s'] / b['decode_tokens_per_s']:.3f}x, "
                 f"prefill {p['prefill_ms'] / b['prefill_ms']:.3f}x")
        diff = f"{r['max_logit_diff']:.2g} (scale {r['logit_scale']:.2g})"
        st, sb = r["step"], base[r["shape"]]["step"]
        step = f"{st['median_ms']:.3f} / {st['p25_ms']:.3f}"
        sratio = f"{sb['median_ms'] / st['median_ms']:.3f}x / {sb['p25_ms'] / st['p25_ms']:.3f}x"
        lines.append(f"| {r['shape']} | {r['row']} | {r['build']} | {step} | {sratio} | {p['prefill_ms']:.1f} | "
                     f"{p['decode_tokens_per_s']:.1f} | {ratio} | {diff} | {r['compile_s']} |")
    if profiles:
        from profile_decode import profile_markdown

        lines += ["", "## One decode step, by kind of operation", ""]
        for title, p in profiles.items():
            lines += [profile_markdown(p, title)]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
