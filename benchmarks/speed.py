"""Speed, side by side in one process: prefill latency (128 tokens) and batch-1 decode tokens/s.

Models: (a) tinystories-llama (/work/shared/models/tinystories-llama, ~7M parameters, trained) and (b) a Llama with
the shape of a 110M model (hidden 768, 12 layers, 12 heads, 12 KV heads, intermediate 2048, vocab 32000) and
random weights. Runtimes, all fp32 on the CPU:

- PyTorch eager, our ``llmpress.models.Llama`` with its static KV cache (the baseline every ratio refers to);
- PyTorch eager, the Hugging Face ``transformers`` model with its own dynamic cache (model (a) only);
- llmpress TVM ``cpu`` (x86-64-v3 LLVM code, weights as VM parameters);
- ONNX Runtime on the graph exported by ``llmpress.backends.onnx`` (the same captured graph; CPU provider,
  graph optimizations on).

Protocol (``llmpress.eval.latency.measure``): random prompt of 128 tokens from a fixed seed, fresh cache; prefill
time is one call; decode is N greedy steps right after it; one warm-up round, then ``--repeats`` rounds, median;
within a round every runtime is measured once, interleaved, so a burst of load hits all alike (HF transformers,
with its own cache, is measured on its own before them).
Every runtime gets the same number of threads (``--threads``, default 1: on this shared 2-core machine, with other
jobs running, 2 OpenMP threads made PyTorch eager 15x slower than 1 thread -- spinning workers waiting for a core
-- so 1 thread per runtime is the comparison that measures the code rather than the scheduler). Output: ``benchmarks/results/speed.json``
and ``speed.md``.

Run: ``.venv/bin/python benchmarks/speed.py`` (about 10 minutes on 2 cores).
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

log = logging.getLogger("benchmarks.speed")


def _hf_measure(model, *, vocab: int, prefill_tokens: int, decode_tokens: int, repeats: int) -> dict:
    """``latency.measure`` for a Hugging Face causal LM driven through its own KV cache."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (1, prefill_tokens), generator=g)
    times, rates = [], []
    with torch.no_grad():
        for r in range(repeats + 1):
            t0 = time.perf_counter()
            out = model(input_ids=ids, use_cache=True)
            t1 = time.perf_counter()
            past = out.past_key_values
            tok = out.logits[:, -1:].argmax(-1)
            t2 = time.perf_counter()
            for _ in range(decode_tokens):
                out = model(input_ids=tok, past_key_values=past, use_cache=True)
                past = out.past_key_values
                tok = out.logits[:, -1:].argmax(-1)
            t3 = time.perf_counter()
            if r:
                times.append(t1 - t0)
                rates.append(decode_tokens / (t3 - t2))
    from llmpress.eval.latency import summarize

    return summarize(prefill_tokens, times, rates)


def _eager(model):
    def forward(*inputs):
        with torch.no_grad():
            return model(*inputs)

    return forward


def bench_model(name: str, model, *, hf=None, threads: int, prefill: int, decode: int, repeats: int,
                skip: set[str]) -> list[dict]:
    import llmpress

    module = llmpress.capture(model)
    lm = module.lm
    entries: list[tuple[dict, object, object]] = []  # (row, forward, lm), timed together below

    def add(runtime: str, forward, extra: dict | None = None) -> None:
        entries.append(({"model": name, "runtime": runtime, **(extra or {})}, forward, lm))

    hf_row = None
    if hf is not None:
        log.info("%s / HF transformers: measuring", name)
        r = _hf_measure(hf, vocab=lm.vocab_size, prefill_tokens=prefill, decode_tokens=decode, repeats=repeats)
        hf_row = {"model": name, "runtime": "PyTorch eager (HF transformers)", **r}
    with tempfile.TemporaryDirectory() as tmp:
        add("PyTorch eager (llmpress Llama)", _eager(model))
        if "tvm" not in skip:
            from llmpress.backends.tvm import TVMBackend

            t0 = time.perf_counter()
            compiled = TVMBackend().lower(module, "cpu", progress=False)
            add("llmpress TVM cpu", compiled, {"compile_seconds": round(time.perf_counter() - t0, 1)})
            # the same build with the functional cache (a copy of the whole KV cache per call): what in-place
            # cache writes save
            add("llmpress TVM cpu, cache copied per call",
                TVMBackend(inplace_cache=False).lower(module, "cpu", progress=False))
        if "onnx" not in skip:
            try:
                from llmpress.backends.onnx import OrtProgram, export
            except ImportError as e:  # the exporter is part of llmpress; report instead of faking a number
                entries.append(({"model": name, "runtime": "ONNX Runtime fp32",
                                 "error": f"exporter unavailable: {e}"}, None, lm))
            else:
                t0 = time.perf_counter()
                path = export(module, Path(tmp) / "model.onnx")
                ort = OrtProgram(path, threads=threads)
                add("ONNX Runtime fp32", ort, {"compile_seconds": round(time.perf_counter() - t0, 1)})
        timed = [e for e in entries if e[1] is not None]
        log.info("%s: timing %d runtimes interleaved", name, len(timed))
        interleaved_timings(timed, {"t": prefill}, decode=decode, repeats=repeats)
    rows = []
    for row, _, _ in entries:
        row.update(row.pop("t", {}))
        rows.append(row)
    if hf_row is not None:
        rows.insert(1, hf_row)
    base = rows[0]
    for r in rows:
        if "prefill_ms" in r:
            r["prefill_speedup_vs_eager"] = base["prefill_ms"] / r["prefill_ms"]
            r["decode_ratio_vs_eager"] = r["decode_tokens_per_s"] / base["decode_tokens_per_s"]
    return rows


def to_markdown(rows: list[dict], env: dict) -> str:
    lines = [
        "# Speed: prefill and decode, fp32 CPU, batch 1",
        "",
        f"Machine: {env['cpu']} ({env['cores']} cores visible, {env['threads']} threads per runtime), load average "
        f"{env['load_before']} before / {env['load_after']} after the run (other jobs share this machine: numbers "
        "are noisy). Produced by `benchmarks/speed.py` on " + env["date"] + ".",
        "",
        f"Prefill: one call on {env['prefill']} random tokens (fresh cache). Decode: {env['decode']} greedy steps "
        f"right after it. Median of {env['repeats']} round(s) after one warm-up round, runtimes interleaved within "
        "each round. Ratios are against PyTorch eager running our Llama (higher is better for both). All runtimes run the same graph except HF "
        "transformers (its own model and dynamic cache); ONNX Runtime runs the file written by "
        "`llmpress.backends.onnx.export` from the captured graph (CPU provider, graph optimizations on). TVM: "
        "target `cpu` (x86-64-v3), untuned, llmpress's own CPU schedules.",
        "",
        "| model | runtime | prefill ms | prefill speedup | decode tok/s | decode ratio | compile s |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['runtime']} | n/a | n/a | n/a | n/a | {r['error']} |")
            continue
        comp = r.get("compile_seconds", "")
        lines.append(f"| {r['model']} | {r['runtime']} | {r['prefill_ms']:.1f} | {r['prefill_speedup_vs_eager']:.2f}x"
                     f" | {r['decode_tokens_per_s']:.1f} | {r['decode_ratio_vs_eager']:.2f}x | {comp} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--prefill", type=int, default=128)
    ap.add_argument("--decode", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--models", default="tinystories,110m")
    ap.add_argument("--skip", default="", help="comma list of runtimes to skip: tvm, onnx")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    os.environ.setdefault("TVM_NUM_THREADS", str(args.threads))  # TVM's thread pool reads it at first use
    torch.set_num_threads(args.threads)
    import llmpress
    from llmpress.models import Llama, LlamaConfig

    env = machine_env(threads=args.threads, prefill=args.prefill, decode=args.decode, repeats=args.repeats,
                      versions={"torch": torch.__version__, "python": sys.version.split()[0]})
    for mod in ("tvm", "onnxruntime", "transformers"):
        try:
            from importlib.metadata import version

            env["versions"][mod] = version({"tvm": "apache-tvm"}.get(mod, mod))
        except Exception:  # noqa: BLE001
            env["versions"][mod] = None
    skip = {s for s in args.skip.split(",") if s}
    rows: list[dict] = []
    t0 = time.perf_counter()
    for which in args.models.split(","):
        if which == "tinystories":
            folder = SHARED / "models" / "tinystories-llama"
            loaded = llmpress.load_model(folder)
            from transformers import AutoModelForCausalLM

            hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
            rows += bench_model("tinystories-llama (7M)", loaded.model.eval(), hf=hf, threads=args.threads,
                                prefill=args.prefill, decode=args.decode, repeats=args.repeats, skip=skip)
        elif which == "110m":
            torch.manual_seed(0)
            cfg = LlamaConfig(vocab_size=32000, dim=768, n_layers=12, n_heads=12, n_kv_heads=12, hidden_dim=2048,
                              max_seq_len=256)
            model = Llama(cfg).eval()
            with torch.no_grad():  # keep activations O(1) like a trained model: small random weights
                for p in model.parameters():
                    p.normal_(0.0, 0.02) if p.dim() > 1 else p.fill_(1.0)
            rows += bench_model("llama-110M shape (random)", model, threads=args.threads, prefill=args.prefill,
                                decode=args.decode, repeats=args.repeats, skip=skip)
        else:
            ap.error(f"unknown model {which!r} (tinystories, 110m)")
    env["load_after"] = loadavg()
    env["seconds"] = round(time.perf_counter() - t0, 1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "speed.json").write_text(json.dumps({"env": env, "rows": rows}, indent=2) + "\n")
    (out / "speed.md").write_text(to_markdown(rows, env))
    sys.stdout.write(to_markdown(rows, env))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
