"""The CPU softmax kernel (``llmpress/backends/tvm/kernels/softmax.py``) against TVM's own softmax and PyTorch, and
what it does to a whole prefill.

1. Kernel: masked attention scores ``[1, 8, T, 512]`` (tinystories-llama's 8 heads over its 512-position cache), T =
   128 (prefill) and 1 (decode), through ``softmax(masked_fill(scores, mask, -inf))`` built by the TVM backend for
   ``cpu`` with ``cpu_kernels`` on (llmpress's kernel) and off (TVM's legalized softmax), and ``torch.softmax``.
2. Model: tinystories-llama fp32 through TVM ``cpu`` with and without the kernel: prefill of 128 tokens and decode
   (``machine.interleaved_timings``), with the perplexity of both on the first ``--max-tokens`` of valid.txt.

All rows interleaved per round (a load burst hits all alike), one thread, medians of ``--repeats`` rounds.
Run: ``.venv/bin/python benchmarks/softmax.py`` -> ``benchmarks/results/softmax.{md,json}`` (about 2 minutes).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from machine import interleaved_timings, loadavg, machine_env

REPO = Path(__file__).resolve().parents[1]
SHARED = (REPO / ".." / "shared").resolve()
RESULTS = REPO / "benchmarks" / "results"


class _Softmax(torch.nn.Module):
    def forward(self, scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return torch.softmax(scores.masked_fill(mask, float("-inf")), dim=-1)


def kernel_rows(args) -> list[dict]:
    import llmpress
    from llmpress.backends.tvm import TVMBackend

    rows = []
    for t in (128, 1):
        g = torch.Generator().manual_seed(0)
        scores = torch.randn(1, 8, t, 512, generator=g)
        mask = (torch.arange(512)[None, :] > torch.arange(t)[:, None] + (200 - t)).expand(1, 8, t, 512).contiguous()
        module = llmpress.capture(_Softmax().eval(), (scores, mask), dynamic=False)
        fns = {"llmpress softmax kernel (TVM cpu)": TVMBackend().lower(module, "cpu", progress=False),
               "TVM's own softmax (cpu)": TVMBackend(cpu_kernels=False).lower(module, "cpu", progress=False),
               "torch.softmax": _Softmax().eval()}
        samples = {k: [] for k in fns}
        with torch.no_grad():
            for r in range(args.repeats + 1):
                for name, fn in fns.items():
                    t0 = time.perf_counter()
                    for _ in range(args.number):
                        fn(scores, mask)
                    if r:
                        samples[name].append((time.perf_counter() - t0) / args.number * 1000)
        base = statistics.median(samples["torch.softmax"])
        for name, ms in samples.items():
            med = statistics.median(ms)
            rows.append({"shape": f"1x8x{t}x512", "kernel": name, "ms": med, "vs_torch": base / med})
    return rows


def model_rows(args) -> list[dict]:
    import llmpress
    from llmpress.backends.tvm import TVMBackend
    from llmpress.eval.perplexity import perplexity, token_stream

    loaded = llmpress.load_model(SHARED / "models" / "tinystories-llama")
    module = llmpress.capture(loaded.model)
    stream = token_stream(SHARED / "data" / "tinystories" / "valid.txt", loaded.tokenizer, max_tokens=args.max_tokens)
    built = []
    for label, backend in (("with the softmax kernel", TVMBackend()),
                           ("TVM's own softmax", TVMBackend(cpu_kernels=False))):
        compiled = backend.lower(module, "cpu", progress=False)
        ppl = perplexity(compiled, module.lm, stream, context=256, progress=False)
        built.append(({"model": "tinystories-llama fp32, TVM cpu", "softmax": label, "perplexity": ppl.perplexity,
                       "ppl_tokens": ppl.tokens}, compiled, module.lm))
    interleaved_timings(built, {"t": args.prefill}, decode=args.decode, repeats=args.repeats)
    rows = [row for row, _, _ in built]
    for row in rows:
        row.update(row.pop("t"))
    return rows


def to_markdown(kernels: list[dict], models: list[dict], env: dict) -> str:
    lines = ["# Softmax on CPU: llmpress's kernel vs TVM's own vs PyTorch", "",
             f"Machine: {env['cpu']} ({env['cores']} cores visible, 1 thread), load average {env['load_before']} "
             f"before / {env['load_after']} after. Produced by `benchmarks/softmax.py` on {env['date']} in "
             f"{env['seconds']} s. Rows interleaved per round, medians of {env['repeats']} rounds.", "",
             f"Kernel: every row computes softmax(masked_fill(scores, mask, -inf)), {env['number']} calls per round "
             "(TVM times include the torch <-> TVM boundary).", "",
             "| scores | kernel | ms per call | speed vs torch |", "|---|---|---:|---:|"]
    lines += [f"| {r['shape']} | {r['kernel']} | {r['ms']:.3f} | {r['vs_torch']:.2f}x |" for r in kernels]
    base = models[1]
    lines += ["", f"Model: prefill of {env['prefill']} random tokens, then {env['decode']} decode steps; perplexity on "
              f"{models[0]['ppl_tokens']:,} tokens of tinystories/valid.txt (context 256).", "",
              "| model | softmax | perplexity | prefill ms | prefill vs TVM's softmax | decode tok/s |",
              "|---|---|---:|---:|---:|---:|"]
    lines += [f"| {r['model']} | {r['softmax']} | {r['perplexity']:.4f} | {r['prefill_ms']:.1f} "
              f"| {base['prefill_ms'] / r['prefill_ms']:.2f}x | {r['decode_tokens_per_s']:.1f} |" for r in models]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--number", type=int, default=20)
    ap.add_argument("--prefill", type=int, default=128)
    ap.add_argument("--decode", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=8192)
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)
    os.environ.setdefault("TVM_NUM_THREADS", "1")
    torch.set_num_threads(1)
    env = machine_env(repeats=args.repeats, number=args.number, prefill=args.prefill, decode=args.decode)
    t0 = time.perf_counter()
    kernels, models = kernel_rows(args), model_rows(args)
    env.update(seconds=round(time.perf_counter() - t0, 1), load_after=loadavg())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "softmax.json").write_text(json.dumps({"env": env, "kernels": kernels, "models": models}, indent=2) + "\n")
    (out / "softmax.md").write_text(to_markdown(kernels, models, env))
    sys.stdout.write(to_markdown(kernels, models, env))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
