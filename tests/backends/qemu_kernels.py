"""Run single TIR kernels compiled for aarch64 under ``qemu-aarch64``, and the same kernels natively on x86-64.

Why a harness: a model artifact runs through the C++ edge runner, but a kernel is one PrimFunc with no Relax VM
around it. The simplest robust way to call it on aarch64 is a library of PrimFuncs (``tvm.compile`` of a TIR
module, ``export_library`` with ``aarch64-linux-gnu-g++``) loaded by a short C++ program
(``kernel_harness.cc``) linked against the aarch64 TVM runtime in ``build/tvm-aarch64`` and run by qemu. Inputs
and outputs are raw little-endian files; one qemu process runs every call of a batch (a script lists them), so a
test pays the emulator's start-up once. (TVM's RPC would need a ``tvm_rpc`` server built for aarch64 and a socket
to it; a Relax VM library would need a Relax wrapper per kernel: both are more moving parts for the same calls.)

Nothing here measures speed: qemu translates every instruction, so timings mean nothing.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from llmpress.backends.tvm import emulate

HARNESS_SRC = Path(__file__).with_name("kernel_harness.cc")
CXX = "aarch64-linux-gnu-g++"


@dataclass
class Call:
    """One kernel call: ``func(*inputs, *outputs)``; ``outputs`` are ``(dtype, shape)`` to allocate."""

    func: str
    inputs: Sequence[np.ndarray]
    outputs: Sequence[tuple[str, tuple[int, ...]]]


def build_harness() -> Path:
    """``build/kernel-harness-aarch64/kernel-harness-<hash>``: rebuilt when the source or the runtime changes.

    Needs the aarch64 TVM runtime laid out in ``build/tvm-aarch64`` (``emulate.build_runner`` does that)."""
    runtime = emulate.build_dir() / "tvm-aarch64"
    lib = runtime / "lib"
    cmd = [CXX, "-std=c++17", "-O1", "-Wall", "-I", str(runtime / "include"), str(HARNESS_SRC), "-o", "{out}",
           # libtvm_runtime.so registers the library loader and the TVMBackend* symbols kernels call (parallel
           # loops); nothing in the harness names it, so keep it linked. RPATH (not RUNPATH) so that the kernel
           # library, loaded with dlopen, resolves against it too.
           "-Wl,--no-as-needed", str(lib / "libtvm_runtime.so"), "-Wl,--as-needed", str(lib / "libtvm_ffi.so"),
           "-ldl", "-lpthread", "-Wl,--disable-new-dtags", f"-Wl,-rpath,{lib}"]
    key = hashlib.sha256(HARNESS_SRC.read_bytes() + " ".join(cmd).encode()
                         + (runtime / "VERSION").read_bytes()).hexdigest()[:16]
    out = emulate.build_dir() / "kernel-harness-aarch64"
    binary = out / f"kernel-harness-{key}"
    if binary.is_file():
        return binary
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".tmp-{os.getpid()}"
    proc = subprocess.run([c.replace("{out}", str(tmp)) for c in cmd], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"building the kernel harness failed:\n{proc.stderr[-3000:]}")
    os.replace(tmp, binary)  # atomic: a concurrent run sees the old binary or the whole new one
    return binary


def export_aarch64(ex: Any, folder: Path, name: str = "kernels.so") -> Path:
    """Write a ``tvm.compile`` result for an aarch64 target as a shared library (cross-linked)."""
    path = folder / name
    ex.export_library(str(path), cc=CXX)
    return path


def run_qemu(harness: Path, lib: Path, calls: Sequence[Call], *, timeout: float = 300) -> list[list[np.ndarray]]:
    """Every call of ``calls`` in one ``qemu-aarch64`` run of the harness; the outputs of each call."""
    with tempfile.TemporaryDirectory(prefix="llmpress-qemu-kernels-") as tmp:
        d = Path(tmp)
        lines, outs = [], []
        for i, call in enumerate(calls):
            lines.append(f"call {call.func}")
            for j, a in enumerate(call.inputs):
                a = np.ascontiguousarray(a)
                path = d / f"{i}_in{j}.bin"
                path.write_bytes(a.tobytes())
                lines.append(f"in {a.dtype} {','.join(map(str, a.shape))} {path}")
            mine = []
            for j, (dtype, shape) in enumerate(call.outputs):
                path = d / f"{i}_out{j}.bin"
                lines.append(f"out {dtype} {','.join(map(str, shape))} {path}")
                mine.append((path, dtype, shape))
            lines.append("end")
            outs.append(mine)
        script = d / "calls.txt"
        script.write_text("\n".join(lines) + "\n")
        cmd = emulate.runner_command("aarch64", build=False)[:-1] + [str(harness), str(lib), str(script)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
        return [[np.fromfile(p, dtype=dt).reshape(shape) for p, dt, shape in mine] for mine in outs]


def run_native(module: Any, calls: Sequence[Call]) -> list[list[np.ndarray]]:
    """The same calls on this machine, through a jitted ``tvm.compile`` result (``module = ex.jit()``)."""
    import tvm

    results = []
    for call in calls:
        args = [tvm.runtime.tensor(np.ascontiguousarray(a)) for a in call.inputs]
        outs = [tvm.runtime.tensor(np.zeros(shape, dtype)) for dtype, shape in call.outputs]
        module[call.func](*args, *outs)
        results.append([o.numpy() for o in outs])
    return results
