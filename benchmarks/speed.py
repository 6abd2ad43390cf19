"""Speed, side by side in one run on this machine: memory bandwidth, kernels, end to end, where decode time goes.

    .venv/bin/python benchmarks/speed.py                  # everything (~40 minutes on 2 cores), writes results/
    .venv/bin/python benchmarks/speed.py --quick           # 110m shape only, fewer rounds (a smoke run)

Peers (optional, not installed by CI): llama.cpp through llama-cpp-python built from source
(``bash benchmarks/setup_peers.sh``, ~5-15 minutes once, cached). Without it the llama.cpp rows say so.

Sections, all with the same thread count per runtime (``--threads``, default: every CPU of the affinity mask):

1. bandwidth: STREAM-style copy and read (``bandwidth.py``), at the start and again in every timed round (this
   machine's bandwidth moves with its neighbours' load); the decode bound of a runtime is ``copy bandwidth (median
   of its group's rounds) / bytes of weights it reads per token`` (every weight but the token-embedding table);
2. kernels: one 4096 x 4096 linear, GEMV and 128-token GEMM, fp32 / int8 / int4 g128 / int4 g32, llmpress vs
   PyTorch vs ONNX Runtime (``kernels.py``);
3. end to end on Llama shapes with random weights (``shapes.py``: 110M = stories110M, 1.1B = TinyLlama), batch 1,
   a ``--prefill``-token prompt (128), ``--decode`` greedy tokens (32): PyTorch eager fp32 (transformers), ONNX
   Runtime fp32 and int4 (its own quantizer), llama.cpp f32 / Q8_0 / Q4_0, llmpress fp32 / w8a8 / w4a16 / w4a8
   (``runtimes.py``). Runtimes are timed interleaved, round by round (a burst of load hits all alike), in two groups
   that fit in memory together (fp32; quantized), medians over ``--rounds`` rounds after one warm-up round; the
   spinning worker threads of the previous runtime are waited out before each (``machine.settle``);
4. profile: one decode step of llmpress w4a8 on the largest shape, by kind of operation (``profile_decode.py``).

Output: ``results/speed.json`` (everything, with per-round samples), ``speed.md``, ``speed.png``, and the
README's speed section (between ``<!-- speed:begin -->`` and ``<!-- speed:end -->``) regenerated from them.
"""
from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from machine import loadavg, machine_env, settle  # noqa: E402

REPO = HERE.parent
RESULTS = HERE / "results"
log = logging.getLogger("benchmarks.speed")

#: llmpress pipelines of the end-to-end rows (every linear quantized, lm_head included, as llama.cpp does)
LLMPRESS = [
    ("fp32", "", "fp32"),
    ("w8a8", "fuse,quantize(bits=8,group=128),act_quant(bits=8)", "quantized"),
    ("w4a16", "fuse,quantize(bits=4,group=128)", "quantized"),
    ("w4a8", "fuse,quantize(bits=4,group=128),act_quant(bits=8)", "quantized"),
]
REFERENCE = {"fp32": "PyTorch eager fp32", "quantized": "llama.cpp Q4_0"}


def cpu_flags() -> list[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags = next((ln.split(":", 1)[1].split() for ln in text.splitlines() if ln.startswith("flags")), [])
    return [f for f in ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni") if f in flags]


def prepare(shape: str, folder: Path, out: Path, skip: set[str]) -> tuple[dict, list[dict]]:
    """Every file the runtimes need (compiles, exports, conversions), before any runtime is loaded; returns the
    seconds each took, and rows for the peers that cannot be prepared (with the reason)."""
    from runtimes import llamacpp_prepare, llmpress_compile, ort_prepare

    times: dict = {}
    failed: list[dict] = []

    def attempt(key: str, group: str, fn) -> None:
        if any(s in key.lower() for s in skip):
            return
        try:
            times[key] = fn()
        except Exception as e:  # noqa: BLE001 - a peer that cannot run here: a row saying why
            log.warning("%s %s: %s", shape, key, e)
            failed.append({"model": shape, "runtime": key, "group": group,
                           "error": f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"})

    for label, pipeline, g in LLMPRESS:
        attempt(f"llmpress {label}", g, lambda label=label, pipeline=pipeline: llmpress_compile(
            folder, pipeline, out / f"{shape}-{label}"))
    attempt("ONNX Runtime", "quantized", lambda: ort_prepare(folder, shape))
    attempt("llama.cpp", "quantized", lambda: llamacpp_prepare(folder, shape))
    return times, failed


def build_group(shape: str, folder: Path, group: str, threads: int, out: Path, times: dict,
                skip: set[str]) -> tuple[list, list]:
    """The runtimes of one group, loaded now, and rows for those that could not be loaded (with the reason)."""
    from runtimes import llamacpp_runtimes, llmpress_runtime, ort_runtimes, torch_eager

    built, failed = [], []

    def attempt(name: str, fn) -> None:
        try:
            r = fn()
            built.extend(r if isinstance(r, list) else [r])
        except Exception as e:  # noqa: BLE001
            log.warning("%s %s: %s", shape, name, e)
            failed.append({"model": shape, "runtime": name, "group": group,
                           "error": f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"})

    if group == "fp32" and not any(s in "pytorch eager fp32" for s in skip):
        attempt("PyTorch eager fp32", lambda: torch_eager(folder, threads))
    if "ONNX Runtime" in times:
        attempt("ONNX Runtime", lambda: ort_runtimes(shape, threads, group, times["ONNX Runtime"]))
    if "llama.cpp" in times:
        attempt("llama.cpp", lambda: llamacpp_runtimes(shape, threads, group, times["llama.cpp"]))
    for label, pipeline, g in LLMPRESS:
        if g == group and f"llmpress {label}" in times:
            attempt(f"llmpress {label}", lambda label=label, pipeline=pipeline, g=g: llmpress_runtime(
                label, pipeline, g, threads, out / f"{shape}-{label}", times[f"llmpress {label}"]))
    return built, failed


def time_group(runtimes: list, rounds: int, prefill: int, decode: int, probe=None) -> dict[str, dict]:
    """Medians over ``rounds`` rounds (after a warm-up round) of every runtime, interleaved; with ``probe``
    (``bandwidth.BandwidthProbe``) the memory bandwidth is measured in every round too, under key ``"bandwidth"``
    (this machine's moves with its neighbours' load, so each group's bound uses the bandwidth of its own rounds)."""
    samples = {r.name: ([], []) for r in runtimes}
    bws: list[dict] = []
    for rnd in range(rounds + 1):
        for r in runtimes:
            settle()
            m = r.measure(prefill, decode)
            if rnd:  # round 0 warms up
                samples[r.name][0].append(m["prefill_ms"])
                samples[r.name][1].append(m["decode_tokens_per_s"])
        if probe is not None and rnd:
            settle()
            bws.append(probe.measure(repeats=3))
        log.info("round %d/%d: %s%s", rnd, rounds, ", ".join(f"{k} {v[1][-1]:.1f}" for k, v in samples.items() if v[1]),
                 f"; copy {bws[-1]['copy_gbs']:.1f} GB/s" if bws and rnd else "")
    out = {k: {"prefill_ms": statistics.median(p), "decode_tokens_per_s": statistics.median(d),
               "prefill_samples": [round(x, 1) for x in p], "decode_samples": [round(x, 2) for x in d]}
           for k, (p, d) in samples.items()}
    if bws:
        out["bandwidth"] = {key: statistics.median(b[key] for b in bws) for key in ("copy_gbs", "read_gbs")}
        out["bandwidth"]["copy_samples"] = [round(b["copy_gbs"], 1) for b in bws]
    return out


def end_to_end(shapes: list[str], threads: int, rounds: int, prefill: int, decode: int, bw: dict,
               skip: set[str], art_dir: Path, probe=None) -> tuple[list[dict], dict | None]:
    from shapes import llama_folder

    rows, profile = [], None
    for shape in shapes:
        folder = llama_folder(shape)
        times, failed_prep = prepare(shape, folder, art_dir, skip)
        rows += failed_prep
        for group in ("quantized", "fp32"):
            runtimes, failed = build_group(shape, folder, group, threads, art_dir, times, skip)
            log.info("%s %s: timing %s", shape, group, ", ".join(r.name for r in runtimes))
            timed = time_group(runtimes, rounds, prefill, decode, probe) if runtimes else {}
            gbw = timed.get("bandwidth", bw)
            for r in runtimes:
                t = timed[r.name]
                bound = gbw["copy_gbs"] * 1e9 / r.weight_bytes
                rows.append({"model": shape, "runtime": r.name, "group": group, **t, "weight_bytes": r.weight_bytes,
                             "copy_gbs": gbw["copy_gbs"], "bound_tokens_per_s": bound,
                             "fraction_of_bound": t["decode_tokens_per_s"] / bound, "compile_s": r.compile_s, **r.info})
            rows += failed
            if group == "quantized" and shape == shapes[-1] and "llmpress w4a8" in timed:
                from profile_decode import profile as prof

                import llmpress

                profile = prof(llmpress.load(art_dir / f"{shape}-w4a8", threads=threads), prefill=prefill)
                profile["model"] = shape
            for r in runtimes:
                r.close()
            del runtimes
            gc.collect()
        ref = {g: next((x for x in rows if x["model"] == shape and x["runtime"] == n and "error" not in x), None)
               for g, n in REFERENCE.items()}
        for x in rows:
            base = ref.get(x["group"])
            if x["model"] == shape and "error" not in x and base is not None:
                x["decode_vs_ref"] = x["decode_tokens_per_s"] / base["decode_tokens_per_s"]
                x["prefill_vs_ref"] = base["prefill_ms"] / x["prefill_ms"]
                x["ref"] = base["runtime"]
    return rows, profile


def e2e_markdown(rows: list[dict], env: dict) -> str:
    lines = [f"Batch 1, {env['prefill']}-token prompt (prefill: one call), {env['decode']} greedy decode steps, "
             f"{env['threads']} threads per runtime, median of {env['rounds']} interleaved rounds. Ratios: against "
             "llama.cpp Q4_0 for the quantized rows, PyTorch eager for fp32 (> 1: faster). Bound: copy bandwidth / "
             "weight bytes read per token, the copy bandwidth measured in every round of the row's group (median; "
             "it moves with the load of this machine's neighbours).", "",
             "| model | runtime | weights MB/token | prefill ms | prefill ratio | decode tok/s | decode ratio | "
             "% of bound (copy GB/s) | compile s | build |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['runtime']} | | | | | | | | {r['error']} |")
            continue
        comp = f"{r['compile_s']:.0f}" if r.get("compile_s") is not None else ""
        lines.append(f"| {r['model']} | {r['runtime']} | {r['weight_bytes'] / 1e6:.0f} | {r['prefill_ms']:.1f} | "
                     f"{r.get('prefill_vs_ref', float('nan')):.2f}x | {r['decode_tokens_per_s']:.1f} | "
                     f"{r.get('decode_vs_ref', float('nan')):.2f}x | {100 * r['fraction_of_bound']:.0f}% ({r.get('copy_gbs', float('nan')):.0f}) | {comp} | "
                     f"{r.get('build', '')} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    try:
        import matplotlib
    except ImportError:  # results and README still written; the plot needs the bench extra
        log.warning("matplotlib is not installed (pip install -e '.[bench]'): no plot")
        return

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if "error" not in r]
    shapes = sorted({r["model"] for r in ok}, key=lambda s: [r["model"] for r in ok].index(s))
    fig, axes = plt.subplots(len(shapes), 2, figsize=(13, 3.2 * len(shapes) + 0.6), squeeze=False)
    for i, shape in enumerate(shapes):
        rs = [r for r in ok if r["model"] == shape]
        names = [r["runtime"] for r in rs]
        colors = ["tab:blue" if n.startswith("llmpress") else "tab:gray" for n in names]
        ax = axes[i][0]
        ax.barh(names, [r["decode_tokens_per_s"] for r in rs], color=colors)
        for y, r in enumerate(rs):
            ax.plot([r["bound_tokens_per_s"]] * 2, [y - 0.4, y + 0.4], color="tab:red", lw=1)
        ax.set_title(f"{shape}: decode tokens/s (red: bandwidth bound)")
        ax.invert_yaxis()
        ax = axes[i][1]
        ax.barh(names, [r["prefill_ms"] for r in rs], color=colors)
        ax.set_title(f"{shape}: prefill ms (lower is better)")
        ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def update_readme(text: str) -> None:
    readme = REPO / "README.md"
    s = readme.read_text()
    begin, end = "<!-- speed:begin -->", "<!-- speed:end -->"
    if begin not in s or end not in s:
        log.warning("README.md has no %s ... %s block: not updated", begin, end)
        return
    head, rest = s.split(begin, 1)
    _, tail = rest.split(end, 1)
    readme.write_text(head + begin + "\n" + text + end + tail)


def readme_block(rows: list[dict], env: dict, bw: dict) -> str:
    keep = ("llmpress w4a8", "llmpress w4a16", "llmpress w8a8", "llmpress fp32", "llama.cpp Q4_0", "llama.cpp Q8_0",
            "ONNX Runtime int4 acc4", "ONNX Runtime fp32", "PyTorch eager fp32")
    sel = [r for r in rows if r["runtime"] in keep]
    return ("Generated by `benchmarks/speed.py` ([speed.md](benchmarks/results/speed.md), [plot]"
            f"(benchmarks/results/speed.png)) on {env['cpu']} ({env['cores']} cores: {', '.join(env['flags'])}), "
            f"{env['date']}, load {env['load_before']} before / {env['load_after']} after; copy bandwidth at the start "
            f"{bw['copy_gbs']:.1f} GB/s, read {bw['read_gbs']:.1f} GB/s.\n\n" + e2e_markdown(sel, env))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--models", default="110m,1.1b")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--prefill", type=int, default=128)
    ap.add_argument("--decode", type=int, default=32)
    ap.add_argument("--skip", default="", help="comma list of runtimes to leave out (substrings: llama.cpp, onnx, ...)")
    ap.add_argument("--no-kernels", action="store_true")
    ap.add_argument("--quick", action="store_true", help="110m only, 2 rounds, fewer kernel rows")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--no-readme", action="store_true", help="do not rewrite README.md's speed section")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if a.quick:
        a.models, a.rounds = "110m", min(a.rounds, 2)
    import torch

    from bandwidth import BandwidthProbe
    from kernels import kernels_markdown, run_kernels

    from llmpress.backends.tvm.threads import configure

    configure(a.threads)
    torch.set_num_threads(a.threads)
    env = machine_env(threads=a.threads, rounds=a.rounds, prefill=a.prefill, decode=a.decode, flags=cpu_flags(),
                      kernel_rounds=7)
    t0 = time.perf_counter()
    probe = BandwidthProbe(a.threads)
    bw = probe.measure()
    log.info("bandwidth: copy %.1f GB/s, read %.1f GB/s", bw["copy_gbs"], bw["read_gbs"])
    kernels = [] if a.no_kernels else run_kernels(a.threads, quick=a.quick)
    art_dir = HERE / ".cache" / "artifacts"
    art_dir.mkdir(parents=True, exist_ok=True)
    skip = {s.strip().lower() for s in a.skip.split(",") if s.strip()}
    rows, profile = end_to_end(a.models.split(","), a.threads, a.rounds, a.prefill, a.decode, bw, skip, art_dir,
                               probe)
    env["load_after"], env["seconds"] = loadavg(), round(time.perf_counter() - t0)
    from profile_decode import profile_markdown

    md = ["# Speed: llmpress and its peers, side by side", "",
          f"{env['cpu']}, {env['cores']} cores ({', '.join(env['flags'])}), {env['threads']} threads per runtime; "
          f"{env['date']}; load average {env['load_before']} before, {env['load_after']} after; "
          f"{env['seconds']} s. Generated by `benchmarks/speed.py`.", "",
          f"## Memory bandwidth\n\nSTREAM-style, 512 MiB: copy {bw['copy_gbs']:.1f} GB/s, read {bw['read_gbs']:.1f} "
          "GB/s (`bandwidth.py`).", ""]
    if kernels:
        md += ["## Kernels", "", kernels_markdown(kernels, env)]
    md += ["## End to end", "", e2e_markdown(rows, env)]
    if profile:
        md += ["## One decode step, by kind of operation", "",
               profile_markdown(profile, f"llmpress w4a8, {profile['model']}")]
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "speed.json").write_text(json.dumps({"env": env, "bandwidth": bw, "kernels": kernels, "rows": rows,
                                                  "profile": profile}, indent=2) + "\n")
    (a.out / "speed.md").write_text("\n".join(md))
    if rows:
        plot(rows, a.out / "speed.png")
    if not a.no_readme and not a.quick:
        update_readme(readme_block(rows, env, bw))
    sys.stdout.write("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
