"""Shared by the benchmark scripts: what they record about the machine, and interleaved LM timings."""
from __future__ import annotations

import os
import threading
import time

import llmpress.host

# Every runtime runs as its users run it: `import llmpress` sets OMP_WAIT_POLICY=PASSIVE (for the CLI on shared
# machines, llmpress/host.py), which would also make PyTorch's and llama.cpp's OpenMP workers (in this process and in
# child processes) sleep between parallel regions. Before anything loads libgomp, take it back.
llmpress.host.openmp_default()

__all__ = ["machine_env", "loadavg", "interleaved_timings", "step_timings", "settle", "others_running"]


def loadavg() -> str:
    """The 1/5/15-minute load averages, e.g. ``"1.2 0.9 0.8"`` (other jobs on a shared machine skew timings)."""
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def machine_env(**extra) -> dict:
    """CPU model, visible cores, load average now, and the UTC date, plus ``extra``."""
    env = {"cpu": "unknown", "cores": os.cpu_count(), **extra, "load_before": loadavg(),
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    try:
        with open("/proc/cpuinfo") as f:
            env["cpu"] = next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return env


def interleaved_timings(built: list, prefills: dict[str, int], *, decode: int, repeats: int) -> None:
    """Prefill/decode timings of ``built`` = ``[(row dict, forward, LMInfo), ...]``, stored in ``row[name]`` for each
    ``name -> prefill tokens`` of ``prefills``. Interleaved: each round measures every row once (after one warm-up
    round), so a burst of load on a shared machine hits all rows alike; medians over ``repeats`` rounds, and the
    per-round decode rates in ``decode_samples``."""
    from llmpress.eval.latency import measure, summarize

    for name, prefill in prefills.items():
        samples: list[tuple[list, list]] = [([], []) for _ in built]
        for r in range(repeats + 1):
            for (row, forward, lm), (times, rates) in zip(built, samples):
                settle()
                m = measure(forward, lm, prefill_tokens=prefill, decode_tokens=decode, repeats=1)
                if r:
                    times.append(m["prefill_ms"] / 1000)
                    rates.append(m["decode_tokens_per_s"])
        for (row, _, _), (times, rates) in zip(built, samples):
            row[name] = summarize(prefill, times, rates)
            row[name]["decode_samples"] = [round(x, 1) for x in rates]


def step_timings(built: list, *, prefill: int, steps: int, blocks: int) -> None:
    """Latency of single decode steps of ``built`` = ``[(row dict, forward, LMInfo), ...]``, into ``row["step"]``.

    Every row is prefilled once with ``prefill`` random tokens; then ``blocks`` blocks (after one warm-up block)
    each run ``steps`` decode steps of every row at positions ``prefill .. prefill + steps - 1`` (the same work in
    every block), each step timed alone. The rows take turns within a block and the row that starts rotates from
    block to block: a burst of a neighbour's load hits all rows alike, and no row always runs first (in a fixed
    order the first row of each block measured a few percent slower here, whichever it was). Reported: the median
    and the 25th percentile of the step times (the percentile is what the machine gives with the least
    interference), in ms. Whole-run tokens/s medians (``interleaved_timings``) moved by +-5% between runs of the
    same build here, more than the differences this is meant to show."""
    import statistics

    import torch

    from llmpress.eval.generate import empty_cache

    state = []
    with torch.no_grad():
        for row, forward, lm in built:
            ids = torch.randint(3, lm.vocab_size, (1, prefill), generator=torch.Generator().manual_seed(0))
            _, *caches = forward(ids, torch.zeros(1, dtype=torch.int64), *empty_cache(lm))
            state.append(caches)
        tok = torch.tensor([[5]])
        times: list[list[float]] = [[] for _ in built]
        n = len(built)
        for b in range(blocks + 1):
            for j in [(b + k) % n for k in range(n)]:
                forward, caches = built[j][1], state[j]
                for i in range(steps):
                    t0 = time.perf_counter()
                    _, *caches = forward(tok, torch.tensor([prefill + i]), *caches)
                    t1 = time.perf_counter()
                    if b:
                        times[j].append(t1 - t0)
                state[j] = caches
    for (row, _, _), t in zip(built, times):
        t = sorted(t)
        row["step"] = {"median_ms": 1000 * statistics.median(t), "p25_ms": 1000 * t[len(t) // 4], "steps": len(t)}


def others_running() -> bool:
    """Whether a thread of this process other than the caller is running (state R in /proc; False off Linux)."""
    me = str(threading.get_native_id())
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return False
    for t in tasks:
        if t == me:
            continue
        try:
            with open(f"/proc/self/task/{t}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "R":
                    return True
        except (OSError, IndexError):  # the thread exited meanwhile
            continue
    return False


def settle(cap_s: float = 0.5) -> float:
    """Wait until no other thread of this process is running (at most ``cap_s``); returns the seconds waited.

    Every runtime measured here keeps its worker threads spinning for a while after a call returns (libgomp for
    torch and llama.cpp: GOMP_SPINCOUNT; ONNX Runtime's intra-op pool; TVM's pool: 300,000 yields), which slows
    whatever runs next in the process on a 2-core machine. Between two runtimes' timings the spin is waited out;
    each runtime keeps its own defaults while it is timed."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < cap_s and others_running():
        time.sleep(0.001)
    return time.perf_counter() - t0
