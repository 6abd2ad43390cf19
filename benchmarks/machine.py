"""Shared by the benchmark scripts: what they record about the machine, and interleaved LM timings."""
from __future__ import annotations

import os
import time

__all__ = ["machine_env", "loadavg", "interleaved_timings"]


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
                m = measure(forward, lm, prefill_tokens=prefill, decode_tokens=decode, repeats=1)
                if r:
                    times.append(m["prefill_ms"] / 1000)
                    rates.append(m["decode_tokens_per_s"])
        for (row, _, _), (times, rates) in zip(built, samples):
            row[name] = summarize(prefill, times, rates)
            row[name]["decode_samples"] = [round(x, 1) for x in rates]
