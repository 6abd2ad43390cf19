"""Two capture paths for the same Llama checkpoint: our decoder (``llmpress.models.Llama``) vs transformers' own model
through its StaticCache (``llmpress.ir.capture_hf``), compared on graph size, logits and TVM ``cpu`` speed.

For each model (the tinystories reference model; ``--shapes 110m`` adds the stories110M shape from ``shapes.py``):

- capture both ways with the same cache length; count graph nodes (``call_function``) and the op histogram
  difference;
- the largest logit difference between the two graphs (reference interpreter, fp32) on held-out text
  (``valid.txt``, never calibration text): one prefill of ``--prompt`` tokens, then 8 one-token decode steps;
- for each pipeline of ``--pipelines`` (``""`` = exact fp32; ``w4a8`` = fuse, 4-bit weights, int8 activations):
  what the passes matched on each graph (their stats), then a TVM ``cpu`` build of each, its logits against that
  graph's reference run, and ``machine.interleaved_timings`` (one prefill of ``--prefill`` random tokens, then
  ``--decode`` greedy steps; each round measures every row; medians over ``--repeats`` rounds). The timing rounds
  hold ``/work/scratch/bench.lock`` when it exists (builds do not), so other measurements do not overlap them.

Run: ``.venv/bin/python benchmarks/capture_paths.py [--shapes 110m] [--repeats 5]`` ->
``benchmarks/results/capture_paths.{md,json}``; the verdict at the top of the ``.md`` is written from the numbers.
"""
from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import logging
import sys
import time
from collections import Counter
from pathlib import Path

import torch
from machine import interleaved_timings, loadavg, machine_env

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
SHARED = Path("/work/shared")
LOCK = Path("/work/scratch/bench.lock")
PATHS = ("ours", "generic")

log = logging.getLogger("benchmarks.capture_paths")


def capture_both(folder: Path, cache_len: int):
    """``{"ours": Module, "generic": Module}`` for one Hugging Face Llama folder, same cache length."""
    from transformers import AutoModelForCausalLM

    import llmpress
    from llmpress.ir.capture_hf import capture_hf
    from llmpress.ir.loaders import load_model

    t0 = time.perf_counter()
    ours = llmpress.ir.capture(load_model(folder, cache_len=cache_len).model)
    t1 = time.perf_counter()
    hf = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, local_files_only=True).eval()
    generic = capture_hf(hf, cache_len=cache_len)
    t2 = time.perf_counter()
    return {"ours": ours, "generic": generic}, {"ours": round(t1 - t0, 1), "generic": round(t2 - t1, 1)}


def graph_stats(modules: dict) -> dict:
    hists = {k: Counter({op: n for op, n in m.op_histogram().items()}) for k, m in modules.items()}
    nodes = {k: sum(1 for n in m.graph.nodes if n.op == "call_function") for k, m in modules.items()}
    ops = sorted(set(hists["ours"]) | set(hists["generic"]))
    diff = {op: [hists["ours"][op], hists["generic"][op]] for op in ops if hists["ours"][op] != hists["generic"][op]}
    return {"nodes": nodes, "op_diff": diff}


def prompt_ids(tokenizer, n: int) -> list[int]:
    text = (SHARED / "data/tinystories/valid.txt").read_text()[:20000]
    ids = tokenizer.encode(text)
    return ids[:n]


def run_steps(forward, lm, ids: torch.Tensor, prefill: int) -> torch.Tensor:
    """Logits of ``ids``: one prefill call of ``prefill`` tokens, then one call per remaining token."""
    from llmpress.eval.generate import empty_cache

    caches = empty_cache(lm)
    with torch.no_grad():
        logits, *caches = forward(ids[:, :prefill], torch.zeros(1, dtype=torch.int64), *caches)
        steps = [torch.as_tensor(logits)]
        for p in range(prefill, ids.shape[1]):
            logits, *caches = forward(ids[:, p:p + 1], torch.tensor([p]), *caches)
            steps.append(torch.as_tensor(logits))
    return torch.cat(steps, 1)


def pass_summary(records) -> list[str]:
    out = []
    for r in records:
        d = r.to_json() if hasattr(r, "to_json") else dict(r)
        stats = d.get("stats") or {}
        keep = {k: v for k, v in stats.items() if isinstance(v, (int, float, str)) and len(str(v)) < 120}
        out.append(f"{d.get('name', '?')}: {keep}")
    return out


def build_model(name: str, folder: Path, tokenizer, args) -> tuple[dict, list]:
    """Capture, compare and build every row of one model; returns (model report, timing rows)."""
    from llmpress.api import run_pipeline
    from llmpress.backends.tvm import TVMBackend
    from llmpress.passes.presets import PRESETS

    modules, capture_s = capture_both(folder, args.cache_len)
    report: dict = {"model": name, "folder": str(folder), "capture_s": capture_s, **graph_stats(modules)}
    ids = torch.tensor([prompt_ids(tokenizer, args.prompt + 8)])
    logits = {k: run_steps(m.run, m.lm, ids, args.prompt) for k, m in modules.items()}
    report["max_logit_diff"] = float((logits["ours"] - logits["generic"]).abs().max())
    report["logit_scale"] = float(logits["ours"].abs().max())
    report["same_argmax"] = float((logits["ours"].argmax(-1) == logits["generic"].argmax(-1)).float().mean())
    built, report["pipelines"] = [], {}
    for pipe in args.pipelines.split(";"):
        label = pipe or "exact"
        report["pipelines"][label] = {}
        for path in PATHS:
            module, records = run_pipeline(modules[path].clone(), PRESETS.get(pipe, pipe), progress=False)
            ref = run_steps(module.run, module.lm, ids, args.prompt)
            t0 = time.perf_counter()
            compiled = TVMBackend().lower(module, "cpu", progress=True)
            compiled.threads = args.threads
            got = run_steps(compiled, module.lm, ids, args.prompt)
            hist = module.op_histogram()
            row = {"model": name, "path": path, "pipeline": label, "compile_s": round(time.perf_counter() - t0, 1),
                   "build": compiled.running.name, "nodes": sum(hist.values()),
                   "float_linears_left": hist.get("aten.linear.default", 0),
                   "tvm_vs_reference": float((got - ref).abs().max()),
                   "passes": pass_summary(records)}
            if label != "exact":
                base = logits[path]
                row["vs_exact_graph"] = float((ref - base).abs().max())
            report["pipelines"][label][path] = {k: v for k, v in row.items() if k not in ("model", "path")}
            log.info("%s %s %s: built in %.1fs, TVM vs reference %.3g", name, path, label, row["compile_s"],
                     row["tvm_vs_reference"])
            built.append((row, compiled, module.lm))
    return report, built


@contextlib.contextmanager
def bench_lock():
    """Hold the shared benchmark lock (``flock``) while timing, if this machine has one."""
    if not LOCK.parent.is_dir():
        yield
        return
    with open(LOCK, "a") as f:
        log.info("waiting for %s", LOCK)
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default="", help="comma-separated shapes.py names to add (110m)")
    ap.add_argument("--pipelines", default=";w4a8", help="';'-separated pipelines/presets ('' = exact fp32)")
    ap.add_argument("--cache-len", type=int, default=512)
    ap.add_argument("--prompt", type=int, default=32, help="prefill tokens of the logit comparison")
    ap.add_argument("--prefill", type=int, default=128)
    ap.add_argument("--decode", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-timing", action="store_true",
                    help="graphs, logits, pass matches and TVM builds only (no timing rounds, no lock)")
    ap.add_argument("--out", default=str(RESULTS / "capture_paths"), help="output path without extension")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    sys.path.insert(0, str(REPO / "benchmarks"))
    from llmpress.tokenizer import find_tokenizer, load_tokenizer

    tiny = SHARED / "models/tinystories-llama"
    tok = load_tokenizer(find_tokenizer(tiny))
    models = [("tinystories", tiny)]
    if args.shapes:
        from shapes import llama_folder

        models += [(s, llama_folder(s)) for s in args.shapes.split(",")]
    env = machine_env(threads=args.threads, prefill=args.prefill, decode=args.decode, repeats=args.repeats,
                      cache_len=args.cache_len)
    reports, rows = [], []
    for name, folder in models:
        report, built = build_model(name, folder, tok, args)
        if not args.no_timing:
            with bench_lock():
                report["load_timing"] = loadavg()
                interleaved_timings(built, {"prefill": args.prefill}, decode=args.decode, repeats=args.repeats)
        reports.append(report)
        rows += [row for row, _, _ in built]
        env["load_after"] = loadavg()
        data = {"env": env, "models": reports, "rows": rows}
        # after each model, so a long run that stops later still leaves its finished models
        Path(args.out + ".json").write_text(json.dumps(data, indent=1))
        Path(args.out + ".md").write_text(markdown(data))
    sys.stdout.write(markdown(data))


def verdict(data: dict) -> list[str]:
    """The decision, from the numbers: speed of ours relative to generic (> 1: our decoder faster) per model and
    pipeline, and whether the two graphs compute the same logits."""
    lines, ratios = [], []
    for rep in data["models"]:
        by = {(r["pipeline"], r["path"]): r.get("prefill") for r in data["rows"] if r["model"] == rep["model"]}
        parts = []
        for pipe in rep["pipelines"] if all(by.values()) else []:
            o, g = by[(pipe, "ours")], by[(pipe, "generic")]
            dec = o["decode_tokens_per_s"] / g["decode_tokens_per_s"]
            pre = g["prefill_ms"] / o["prefill_ms"]
            ratios += [dec, pre]
            parts.append(f"{pipe}: decode {o['decode_tokens_per_s']:.1f} (ours) vs {g['decode_tokens_per_s']:.1f} "
                         f"(generic) tok/s = {dec:.2f}x, prefill {o['prefill_ms']:.1f} vs {g['prefill_ms']:.1f} ms = "
                         f"{pre:.2f}x")
        lines.append(f"- {rep['model']}: graph {rep['nodes']['ours']} (ours) vs {rep['nodes']['generic']} (generic) "
                     f"nodes; max logit difference of the fp32 graphs {rep['max_logit_diff']:.2g} (logit scale "
                     f"{rep['logit_scale']:.2g}); speed of ours relative to generic: " + "; ".join(parts))
    if not ratios:
        head = "**Speed not measured in this run** (`--no-timing`)"
    elif min(ratios) > 1.05:
        head = ("**Keep `llmpress.models.Llama` for the families it covers**: it is faster on every row (ours / "
                f"generic speed {min(ratios):.2f}x to {max(ratios):.2f}x)")
    elif ratios and max(ratios) < 0.95:
        head = (f"**The generic path is faster on every row** (ours / generic speed {min(ratios):.2f}x to "
                f"{max(ratios):.2f}x): `llmpress.models.Llama` is not worth keeping for speed")
    else:
        head = (f"**Mixed or within noise** (ours / generic speed {min(ratios or [0]):.2f}x to "
                f"{max(ratios or [0]):.2f}x): no measurable reason of speed either way")
    same = all(rep["max_logit_diff"] <= 1e-4 * max(rep["logit_scale"], 1.0) for rep in data["models"])
    head += ("; the two captures give the same logits." if same else
             "; the two captures' logits differ beyond fp32 rounding (see below).")
    return [head, "", *lines]


def markdown(data: dict) -> str:
    env = data["env"]
    lines = ["# Capture paths: our Llama decoder vs transformers' model through its StaticCache (TVM cpu)", "",
             "## Verdict", "", *verdict(data), "",
             f"{env['cpu']}, {env['threads']} threads, {env['date']}, load {env['load_before']} -> "
             f"{env.get('load_after', '?')} (timing rounds started at load "
             f"{', '.join(r.get('load_timing', '?') for r in data['models'])}). Cache length {env['cache_len']}; "
             f"prefill of {env['prefill']} random tokens, then {env['decode']} greedy decode steps; medians of "
             f"{env['repeats']} interleaved rounds (every row once per round). Speed ratio: ours / generic decode "
             "rate and generic / ours prefill time (> 1: our decoder faster).", "",
             "| model | pipeline | path | graph nodes | build | prefill ms | decode tok/s | TVM vs its reference | "
             "compile s |", "|---|---|---|---:|---|---:|---:|---:|---:|"]
    for r in data["rows"]:
        p = r.get("prefill") or {"prefill_ms": float("nan"), "decode_tokens_per_s": float("nan")}
        lines.append(f"| {r['model']} | {r['pipeline']} | {r['path']} | {r['nodes']} | {r['build']} | "
                     f"{p['prefill_ms']:.1f} | {p['decode_tokens_per_s']:.1f} | {r['tvm_vs_reference']:.2g} | "
                     f"{r['compile_s']} |")
    for rep in data["models"]:
        lines += ["", f"## {rep['model']}: graphs", "",
                  f"Captured in {rep['capture_s']['ours']} s (ours) and {rep['capture_s']['generic']} s (generic). "
                  f"`call_function` nodes: ours {rep['nodes']['ours']}, generic {rep['nodes']['generic']}. Logits "
                  f"of the two fp32 graphs on held-out text (prefill + 8 decode steps): max difference "
                  f"{rep['max_logit_diff']:.3g} (logit scale {rep['logit_scale']:.3g}), same argmax at "
                  f"{100 * rep['same_argmax']:.0f}% of positions.", "",
                  "| op | ours | generic |", "|---|---:|---:|"]
        lines += [f"| `{op}` | {a} | {b} |" for op, (a, b) in rep["op_diff"].items()]
        for pipe, by_path in rep["pipelines"].items():
            if pipe == "exact":
                continue
            lines += ["", f"What `{pipe}` matched:", ""]
            for path, row in by_path.items():
                lines += [f"- {path} ({row['float_linears_left']} float linears left; logits "
                          f"{row.get('vs_exact_graph', 0):.3g} from its exact graph):"]
                lines += [f"  - {s}" for s in row["passes"]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
