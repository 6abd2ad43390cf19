"""Where the peak of ``llmpress compile`` is: the resident high-water mark of each phase, in one process.

Runs ``llmpress compile ARGS...`` in this process with the compile's phases wrapped (capture, passes, check,
translate to Relax, lift, transform weights, build, save): at every phase boundary it reads ``VmHWM`` (the peak
resident set since the last reset) and ``VmRSS`` from ``/proc/self/status``, charges the peak to the phase that
just ran, and resets the mark (``echo 5 > /proc/self/clear_refs``, Linux >= 4.0), so each phase's line is that
phase's own peak. Usage::

    python benchmarks/memory_phases.py MODEL -p 'quantize(bits=4,group=128,exclude=lm_head)' -t cpu -o OUT --force -q

``MEMORY_PHASES_TRIM=1`` also prints the resident set after ``malloc_trim`` at each boundary: what the C heap held
freed. A diagnostic, not a benchmark: ``benchmarks/memory.py`` measures the whole compile in a subprocess.
"""
from __future__ import annotations

import functools
import importlib
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

_stack: list[str] = ["start"]
_rows: list[tuple[str, str, float, float, float]] = []  # (event, phase, hwm GB, rss GB, t)
_t0 = time.perf_counter()
_TRIM = os.environ.get("MEMORY_PHASES_TRIM") == "1"


def _status() -> tuple[float, float]:
    vals = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmHWM:", "VmRSS:")):
                k, v = line.split(":")
                vals[k] = int(v.split()[0]) * 1024 / 1e9
    return vals["VmHWM"], vals["VmRSS"]


def _mark(event: str) -> None:
    hwm, rss = _status()
    _rows.append((event, _stack[-1], hwm, rss, time.perf_counter() - _t0))
    print(f"[mem] {time.perf_counter() - _t0:7.1f}s {event:<28} peak of '{_stack[-1]}' {hwm:6.2f} GB, "
          f"now {rss:6.2f} GB", file=sys.stderr, flush=True)
    if _TRIM:  # what the C heap holds freed but not returned (glibc keeps freed small-block memory)
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
        print(f"[mem]          after malloc_trim: now {_status()[1]:6.2f} GB", file=sys.stderr, flush=True)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _wrap(module: str, attr: str, label: str) -> None:
    mod = importlib.import_module(module)
    owner, _, name = attr.rpartition(".")
    obj = getattr(mod, owner) if owner else mod
    fn = getattr(obj, name)

    @functools.wraps(fn)
    def wrapped(*a, **k):
        _mark(f"enter {label}")
        _stack.append(label)
        try:
            return fn(*a, **k)
        finally:
            _mark(f"exit {label}")
            _stack.pop()

    setattr(obj, name, wrapped)


def main(argv: list[str]) -> int:
    from llmpress import cli

    for module, attr, label in [
        ("llmpress.api", "prepare", "capture"),
        ("llmpress.api", "run_pipeline", "passes"),
        ("llmpress.backends.tvm.backend", "TVMBackend.check", "check"),
        ("llmpress.backends.tvm.lower", "to_relax", "to_relax"),
        ("llmpress.backends.tvm.params", "_lift", "lift"),
        ("llmpress.backends.tvm.params", "_run_on_host", "transform"),
        ("llmpress.backends.tvm.build", "build", "build"),
        ("llmpress.backends.tvm.runtime", "TVMCompiled.save_payload", "save_payload"),
        ("llmpress.artifact", "Artifact._write_folder", "write artifact"),
    ]:
        _wrap(module, attr, label)
    rc = cli.main(["compile", *argv])
    _mark("end")
    return rc


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
