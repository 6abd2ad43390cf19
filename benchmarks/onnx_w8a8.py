"""W8A8 (SmoothQuant) in ONNX Runtime: the two export forms side by side with fp32, on tinystories-llama.

Rows (one calibrated SmoothQuant module, exported three ways; all run in ONNX Runtime's CPU provider, one thread):

- fp32: the captured model without compression;
- ``onnx`` (= ``onnx:qdq``): W8A8 as QuantizeLinear/DequantizeLinear around MatMul (per-token activation scales
  computed at run time, per-channel int8 weights);
- the same QDQ file with ``OrtProgram(fold_qdq_weights=True)`` (ORT's ``session.disable_quant_qdq``: weights are
  dequantized once at load, so float32 weights sit in memory);
- ``onnx:integer``: per-token int8 quantization + ``MatMulInteger``.

Columns: file size, perplexity on ``tinystories/valid.txt`` (first ``--max-tokens`` tokens, context 256), prefill of
``--prefill`` random tokens and batch-1 decode tokens/s (``benchmarks/machine.interleaved_timings``: rows
interleaved per round, medians of ``--repeats`` rounds). Ratios against the fp32 row.

Run: ``.venv/bin/python benchmarks/onnx_w8a8.py`` -> ``benchmarks/results/onnx_w8a8.{md,json}``.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from machine import interleaved_timings, loadavg, machine_env

REPO = Path(__file__).resolve().parents[1]
SHARED = (REPO / ".." / "shared").resolve()
RESULTS = REPO / "benchmarks" / "results"

log = logging.getLogger("benchmarks.onnx_w8a8")


def to_markdown(rows: list[dict], env: dict) -> str:
    lines = [
        "# W8A8 (SmoothQuant) in ONNX Runtime: QDQ vs MatMulInteger vs fp32, tinystories-llama",
        "",
        f"Machine: {env['cpu']} ({env['cores']} cores visible, 1 ORT thread), load average {env['load_before']} "
        f"before / {env['load_after']} after (a shared machine: timings are indicative). Produced by "
        f"`benchmarks/onnx_w8a8.py` on {env['date']} in {env['seconds']} s. SmoothQuant alpha 0.5, calibration "
        f"{env['calib_samples']} x {env['calib_len']} tokens of calib.txt.",
        "",
        f"Perplexity: {env['ppl_tokens']:,} tokens of tinystories/valid.txt, context 256. Speed: prefill of "
        f"{env['prefill']} random tokens, then {env['decode']} greedy decode steps, median of {env['repeats']} "
        "rounds (rows interleaved). Ratios against fp32 in the same runtime.",
        "",
        "| form | file MB | perplexity | prefill ms | prefill ratio | decode tok/s | decode ratio |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    base = rows[0]["t"]
    for r in rows:
        t = r["t"]
        lines.append(f"| {r['form']} | {r['file_bytes'] / 1e6:.2f} | {r['perplexity']:.4f} | {t['prefill_ms']:.1f} "
                     f"| {base['prefill_ms'] / t['prefill_ms']:.2f}x | {t['decode_tokens_per_s']:.1f} "
                     f"| {t['decode_tokens_per_s'] / base['decode_tokens_per_s']:.2f}x |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prefill", type=int, default=128)
    ap.add_argument("--decode", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--max-tokens", type=int, default=8192)
    ap.add_argument("--calib-samples", type=int, default=64)
    ap.add_argument("--calib-len", type=int, default=256)
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    import llmpress
    from llmpress.api import run_pipeline
    from llmpress.backends.onnx import OrtProgram, export
    from llmpress.eval.perplexity import perplexity, token_stream
    from llmpress.passes.calibration import Calibration

    env = machine_env(prefill=args.prefill, decode=args.decode, repeats=args.repeats,
                      calib_samples=args.calib_samples, calib_len=args.calib_len)
    t0 = time.perf_counter()
    loaded = llmpress.load_model(SHARED / "models" / "tinystories-llama")
    stream = token_stream(SHARED / "data" / "tinystories" / "valid.txt", loaded.tokenizer, max_tokens=args.max_tokens)
    fp32 = llmpress.capture(loaded.model)
    cal = Calibration.from_texts(SHARED / "data" / "tinystories" / "calib.txt", loaded.tokenizer,
                                samples=args.calib_samples, seq_len=args.calib_len, seed=0)
    w8a8, _ = run_pipeline(fp32.clone(), "smoothquant", calibration=cal, progress=False)
    built = []
    with tempfile.TemporaryDirectory() as tmp:
        files = {"fp32": export(fp32, Path(tmp) / "fp32.onnx"),
                 "qdq": export(w8a8, Path(tmp) / "qdq.onnx", w8a8="qdq"),
                 "integer": export(w8a8, Path(tmp) / "integer.onnx", w8a8="integer")}
        forms = [("fp32", "fp32", {}), ("`onnx` (QDQ)", "qdq", {}),
                 ("`onnx` (QDQ), fold_qdq_weights=True", "qdq", {"fold_qdq_weights": True}),
                 ("`onnx:integer` (MatMulInteger)", "integer", {})]
        for label, key, opts in forms:
            prog = OrtProgram(files[key], threads=1, **opts)
            ppl = perplexity(prog.forward, fp32.lm, stream, context=256, progress=False)
            row = {"form": label, "file_bytes": sum(f.stat().st_size for f in Path(files[key]).parent.glob(
                Path(files[key]).stem + "*")), "perplexity": ppl.perplexity, "ppl_tokens": ppl.tokens}
            log.info("%s", row)
            built.append((row, prog.forward, fp32.lm))
        interleaved_timings(built, {"t": args.prefill}, decode=args.decode, repeats=args.repeats)
    rows = [row for row, _, _ in built]
    env.update(seconds=round(time.perf_counter() - t0, 1), load_after=loadavg(), ppl_tokens=rows[0]["ppl_tokens"])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "onnx_w8a8.json").write_text(json.dumps({"env": env, "rows": rows}, indent=2) + "\n")
    (out / "onnx_w8a8.md").write_text(to_markdown(rows, env))
    sys.stdout.write(to_markdown(rows, env))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
