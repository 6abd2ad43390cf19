"""Memory bandwidth of this machine, STREAM-style, measured with the same threads as the runtimes.

Two TVM kernels over 512 MiB (far beyond any cache), built for this CPU: ``copy`` (``b[i] = a[i]``, STREAM's Copy: bytes read plus
bytes written) and ``read`` (a vectorized sum: bytes read). Each splits the array into 64 contiguous blocks run on
TVM's thread pool, 256-bit vectors, best of 5 calls after a warm-up (STREAM reports the best too).

The decode bound of a runtime is ``bandwidth / bytes of weights read per token``: every weight matrix is read once
per decoded token, the token-embedding table only one row. The issue's definition uses the copy bandwidth
(``benchmarks/speed.py`` reports both and uses copy for the bound).
"""
from __future__ import annotations

import time

__all__ = ["stream_bandwidth", "BandwidthProbe"]

_N = 1 << 27  # int32 elements: 512 MiB
_BLOCKS = 64


def _kernels():
    import tvm
    from tvm.script import tirx as T

    N, P = _N, _BLOCKS
    V = T.ramp(0, 1, 8)

    @T.prim_func
    def read(a: T.Buffer((N,), "int32"), y: T.Buffer((P, 8), "int32")):
        T.func_attr({"tirx.noalias": True})
        for p in T.parallel(P):
            acc = T.alloc_buffer((2, 8), "int32", scope="global")
            acc[0, V] = T.broadcast(0, 8)
            acc[1, V] = T.broadcast(0, 8)
            for i in range(N // P // 16):
                acc[0, V] = acc[0, V] + a.vload([p * (N // P) + i * 16], "int32x8")
                acc[1, V] = acc[1, V] + a.vload([p * (N // P) + i * 16 + 8], "int32x8")
            y[p, V] = acc[0, V] + acc[1, V]

    @T.prim_func
    def copy(a: T.Buffer((N,), "int32"), b: T.Buffer((N,), "int32")):
        T.func_attr({"tirx.noalias": True})
        for p in T.parallel(P):
            for i in range(N // P // 8):
                b[T.ramp(p * (N // P) + i * 8, 1, 8)] = a.vload([p * (N // P) + i * 8], "int32x8")

    from tvm.target.codegen import llvm_get_system_cpu

    return tvm.compile(tvm.IRModule({"read": read, "copy": copy}),
                       target={"kind": "llvm", "mcpu": str(llvm_get_system_cpu())})


class BandwidthProbe:
    """The two kernels and their 1 GiB of arrays, kept for repeated measurements (``speed.py`` measures once per
    round, between the runtimes: this machine's bandwidth moves with its neighbours' load)."""

    def __init__(self, threads: int | None = None) -> None:
        import numpy as np
        import tvm

        from llmpress.backends.tvm.threads import configure

        configure(threads)
        self.mod = _kernels()
        self.a = tvm.runtime.tensor(np.ones(_N, "int32"))
        self.b = tvm.runtime.tensor(np.zeros(_N, "int32"))
        self.y = tvm.runtime.tensor(np.zeros((_BLOCKS, 8), "int32"))

    def measure(self, repeats: int = 5) -> dict[str, float]:
        """``{"copy_gbs": ..., "read_gbs": ...}``: GB/s (10^9 bytes), best of ``repeats`` after a warm-up call."""
        out = {}
        for name, fn, args, nbytes in (("copy_gbs", self.mod["copy"], (self.a, self.b), 8 * _N),
                                       ("read_gbs", self.mod["read"], (self.a, self.y), 4 * _N)):
            fn(*args)
            best = float("inf")
            for _ in range(repeats):
                t0 = time.perf_counter()
                fn(*args)
                best = min(best, time.perf_counter() - t0)
            out[name] = nbytes / best / 1e9
        return out


def stream_bandwidth(threads: int | None = None, *, repeats: int = 5) -> dict[str, float]:
    """``{"copy_gbs": ..., "read_gbs": ...}`` in GB/s (10^9 bytes) on ``threads`` TVM threads (default: all)."""
    return BandwidthProbe(threads).measure(repeats)
