"""Sharing the machine: how llmpress sets up torch's OpenMP threads.

Two ``llmpress compile ... gptq(...)`` jobs at once on a 2-core machine took over 13 minutes each instead of 53 s
alone: 90% of the cycles were spent in libgomp's spin-wait, each job's OpenMP workers busy-waiting for a core the
other job held. With ``OMP_WAIT_POLICY=PASSIVE`` (a worker with no work sleeps at once instead of spinning ~300,000
iterations first) both finished in 82 s. libgomp reads the variable once, when torch loads it, so ``import llmpress``
sets it (``passive_openmp``) before anything imports torch; a value the user set wins.

Torch sizes its intra-op pool from the machine's physical cores, not from the cores this process may run on (the
CPU affinity mask that ``taskset``, cpusets and container limits leave). ``torch_threads`` caps the pool at the
affinity mask; the CLI calls it for every command (a library leaves ``torch.set_num_threads`` to its caller). An
explicit count (``--threads``) or the user's ``OMP_NUM_THREADS`` wins. It only ever lowers an automatic count, so a
caller that chose fewer threads (``torch.set_num_threads(1)``) keeps them.

TVM's own pool (``backends/tvm/threads.py``) also takes the affinity mask. Its workers spin too, but by yielding
(``sched_yield``, ``TVM_THREAD_POOL_SPIN_COUNT`` times, default 300,000) so they give their core to a runnable thread
of another job; llmpress leaves that count alone because a decode step wakes the pool for every kernel, and a
sleeping worker costs a futex wake-up each time.

``release_freed_memory`` hands the C heap's free pages back to the system (glibc ``malloc_trim``): a compile that
reads and drops one float layer at a time (lazy weights) otherwise keeps the freed pages of tensors under glibc's
dynamic mmap threshold in its heap, and its resident memory grows as if it held them (RTN on the 1.1B shape: 2.8 GB
resident after quantizing, 0.9 GB after a trim). ``mmap_large_allocations`` goes further for ``compile``: glibc
serves an allocation from its own memory map only above a threshold that it raises (up to 32 MB) each time such a
map is freed, so most of a compile's tensors (a 7B int4 matrix is 22 MB) end up in the heap, where a freed one's
pages stay resident until a trim, and the peak counts them; a fixed 1 MB threshold (``mallopt(M_MMAP_THRESHOLD)``,
which also turns the raising off) gives each tensor its own map, returned to the system when it is freed (1.1B RTN
compile: 2.5 -> 2.2 GB peak, same artifact).
"""
from __future__ import annotations

import os

__all__ = ["passive_openmp", "openmp_default", "available_cpus", "torch_threads", "release_freed_memory",
           "mmap_large_allocations"]

_SET_HERE = False  # passive_openmp set the variable (the user had not)


def passive_openmp() -> None:
    """``OMP_WAIT_POLICY=PASSIVE`` unless already set. Takes effect only before torch (libgomp) is loaded."""
    global _SET_HERE
    if "OMP_WAIT_POLICY" not in os.environ:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
        _SET_HERE = True


def openmp_default() -> None:
    """Undo ``passive_openmp`` (a value the user set stays): libgomp's default wait policy for whatever loads it
    next, in this process and its children. The benchmarks call it so that PyTorch and llama.cpp run beside
    llmpress as their users run them (passive waiting cost llama.cpp's Q4_0 decode about a third here)."""
    global _SET_HERE
    if _SET_HERE:
        os.environ.pop("OMP_WAIT_POLICY", None)
        _SET_HERE = False


def available_cpus() -> int:
    """How many CPUs this process may run on (its affinity mask)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def _user_omp_threads() -> int | None:
    env = os.environ.get("OMP_NUM_THREADS", "").split(",")[0].strip()
    return int(env) if env.isdigit() and int(env) > 0 else None


def torch_threads(threads: int | None = None) -> int:
    """Set torch's intra-op threads: ``threads`` when given; else, unless ``OMP_NUM_THREADS`` is set (torch read it
    already), at most the affinity mask's CPU count. Returns the count torch now uses."""
    import torch

    if threads is not None:
        from .errors import ConfigError

        if int(threads) < 1:
            raise ConfigError(f"--threads must be at least 1, got {threads}")
        torch.set_num_threads(int(threads))
    elif _user_omp_threads() is None:
        cpus = available_cpus()
        if torch.get_num_threads() > cpus:
            torch.set_num_threads(cpus)
    return torch.get_num_threads()


_LIBC: object = None
_M_MMAP_THRESHOLD = -3  # glibc's malloc.h


def _libc():
    """glibc through ctypes, or False elsewhere (musl, macOS: no ``malloc_trim``)."""
    global _LIBC
    if _LIBC is None:
        import ctypes
        import ctypes.util

        try:
            lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _LIBC = lib if hasattr(lib, "malloc_trim") and hasattr(lib, "mallopt") else False
        except OSError:
            _LIBC = False
    return _LIBC


def release_freed_memory() -> None:
    """``malloc_trim(0)`` on glibc (see the module docstring); nothing elsewhere."""
    lib = _libc()
    if lib:
        lib.malloc_trim(0)


def mmap_large_allocations(threshold: int = 1 << 20) -> None:
    """On glibc, serve every allocation of ``threshold`` bytes or more from its own memory map, returned to the system
    when freed (see the module docstring); nothing elsewhere. Process-wide: the CLI's ``compile`` calls it."""
    lib = _libc()
    if lib:
        lib.mallopt(_M_MMAP_THRESHOLD, int(threshold))
