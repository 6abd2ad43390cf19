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

__all__ = ["machine_env", "loadavg", "interleaved_timings", "settle", "others_running"]


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
