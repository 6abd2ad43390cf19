"""How many threads TVM's CPU runtime uses: every core this process may run on, unless told otherwise.

TVM's thread pool sizes itself, on first use in each calling thread, from ``TVM_NUM_THREADS`` (or
``OMP_NUM_THREADS``), else from half of ``std::thread::hardware_concurrency()`` on x86 ("ignore
hyper-threading"): one thread on a 2-vCPU machine, however many cores the process may use. ``configure`` sets the
pool from the process's CPU affinity mask (``os.sched_getaffinity``: what ``taskset``, cgroups' cpusets and
container limits leave), with the workers free to run on any of those cores. It must run before the pool's first
parallel job in the calling thread (the pool cannot grow afterwards, only shrink): ``TVMCompiled`` calls it before
its VM runs anything, and so does the compile-time weight transform.

Precedence: an explicit ``threads`` argument (``llmpress run/eval --threads N``, ``load(path, threads=N)``), then
``TVM_NUM_THREADS``, then the affinity mask.
"""
from __future__ import annotations

import logging
import os
import threading

__all__ = ["configure", "default_threads", "available_cpus"]

log = logging.getLogger(__name__)

_configured: dict[int, int] = {}  # OS thread id -> threads its pool was given
_lock = threading.Lock()

# ThreadGroup::AffinityMode::kSpecifyThreadShareAllCore: every worker may run on every listed core (no pinning:
# on a shared machine a pinned worker waits for its one core while another is idle).
_SHARE_ALL_CORES = -3


def available_cpus() -> list[int]:
    """The CPU ids this process may run on."""
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return list(range(os.cpu_count() or 1))


def default_threads() -> int:
    """``TVM_NUM_THREADS`` if set, else the number of CPUs in the affinity mask."""
    env = os.environ.get("TVM_NUM_THREADS")
    if env and env.strip().isdigit() and int(env) > 0:
        return int(env)
    return len(available_cpus())


def configure(threads: int | None = None) -> int:
    """Give TVM's thread pool of the calling thread ``threads`` workers (default: ``default_threads()``); returns
    the number set. Idempotent for the same number."""
    import tvm

    n = int(threads) if threads else default_threads()
    if n < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    key = threading.get_ident()
    with _lock:
        if _configured.get(key) == n:
            return n
        cpus = available_cpus()
        # the listed cores bound the pool's size: list n of them (cycling when n > cores, oversubscribed on purpose)
        listed = [str(cpus[i % len(cpus)]) for i in range(max(n, len(cpus)))]
        tvm.get_global_func("runtime.config_threadpool")(_SHARE_ALL_CORES, n, listed)
        _configured[key] = n
    log.debug("TVM thread pool: %d threads over CPUs %s", n, ",".join(map(str, cpus)))
    return n
