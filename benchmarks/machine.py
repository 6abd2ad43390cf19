"""What every benchmark records about the machine it ran on (shared by the benchmark scripts)."""
from __future__ import annotations

import os
import time

__all__ = ["machine_env", "loadavg"]


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
