"""Sparse CPU kernels against dense ones: where the sparse GEMV (decode) starts to pay, and by how much.

For two 1.1B-shaped linears (``2048 x 5632``: up/gate, ``5632 x 2048``: down; ``N x K`` = outputs x inputs) at one
token (decode), side by side and interleaved round by round, on every core:

- ``dense fp32``: ``kernels/fgemm.py``'s GEMV over the 4-row tiled weight (what a dense float linear runs);
- ``sparse fp32 s=...``: ``kernels/sparse.py``'s SELL-8 GEMV at sparsity 0.5, 0.7, 0.8, 0.9, 0.95 (each row keeps
  the same number of weights at random columns, as Wanda leaves them) and 2:4 (two of every four, random);
- ``dense int4``: ``kernels/qgemv.py``'s float-activation GEMV (``w4a16``, symmetric, group 128) on a 2:4 weight
  (the dense kernel reads the zero codes);
- ``sparse int4 2:4``: ``kernels/sparse.py``'s int4 2:4 GEMV on the same codes.

Each kernel is built for this machine's CPU (``llvm -mcpu=<host>``: the build a ``cpu`` artifact runs here) and called
on weights cycled through copies totalling at least ``COLD_BYTES`` (4x the L3 here): a decode step reads its weights
from memory. Per row: median time per call over the rounds, GB/s of the bytes that kernel reads (its stored weight
form), and the speed-up over the dense kernel of the same precision. The crossover is the least measured sparsity
from which the sparse kernel is faster on both shapes (None: never); ``kernels/sparse_plan.py`` ``CROSSOVER``
holds it.

Run: ``flock /work/scratch/bench.lock .venv/bin/python benchmarks/sparse_kernels.py`` (writes
``results/sparse_kernels.{md,json}``).
"""
from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

log = logging.getLogger("benchmarks.sparse_kernels")

SHAPES = [(2048, 5632), (5632, 2048)]
SPARSITIES = [0.5, 0.7, 0.8, 0.9, 0.95]
GROUP = 128
COLD_BYTES = 128 << 20


def _host_target() -> Any:
    import tvm
    from tvm.target.codegen import llvm_get_system_cpu

    return tvm.target.Target({"kind": "llvm", "mcpu": str(llvm_get_system_cpu())})


def _build(func: Any) -> Any:
    import tvm

    return tvm.compile(tvm.IRModule({"f": func.with_attr("global_symbol", "f")}), _host_target())["f"]


def _cold(arrays: list[np.ndarray]) -> list[list[Any]]:
    """Copies of the kernel's weight tensors totalling at least ``COLD_BYTES``."""
    import tvm

    nbytes = sum(a.nbytes for a in arrays)
    copies = max(2, -(-COLD_BYTES // nbytes))
    return [[tvm.runtime.tensor(a) for a in arrays] for _ in range(copies)]


def _call(fn: Any, x: Any, weights: list[list[Any]], y: Any) -> Callable[[int], None]:
    return lambda i: fn(x, *weights[i % len(weights)], y)


def _prune_rows(w: torch.Tensor, s: float, g: torch.Generator) -> torch.Tensor:
    n, k = w.shape
    drop = torch.rand(n, k, generator=g).argsort(1)[:, : round(s * k)]
    return w.scatter(1, drop, 0.0)


def _prune_24(w: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    n, k = w.shape
    order = torch.rand(n, k // 4, 4, generator=g).argsort(-1)
    return w.reshape(n, k // 4, 4).masked_fill(order < 2, 0.0).reshape(n, k)


def _dense_f32(w: torch.Tensor, isa: Any) -> tuple[Callable, list[np.ndarray]]:
    from llmpress.backends.tvm.kernels import fgemm

    n, k = w.shape
    tiled = w.reshape(n // fgemm.ROWS, fgemm.ROWS, k // fgemm.CHUNK, fgemm.CHUNK).permute(0, 2, 1, 3).contiguous()
    return _build(fgemm.gemv_func(n, k, isa)), [tiled.numpy()]


def _sparse_f32(w: torch.Tensor) -> tuple[Callable, list[np.ndarray], str]:
    import tvm

    from llmpress.backends.tvm.kernels import sparse, sparse_plan

    n, k = w.shape
    info = sparse_plan.measure_float(w)
    rep = _build(sparse.ell_repack_func(n, k, info.steps))
    out = [tvm.runtime.empty((info.steps, sparse.R), "float32"), tvm.runtime.empty((info.steps, sparse.R), "uint16"),
           tvm.runtime.empty((info.tiles + 1,), "int32")]
    rep(tvm.runtime.tensor(w.numpy()), *out)
    return _build(sparse.ell_gemv_func(n, k, info.steps)), [o.numpy() for o in out], info.pattern


def _int4(w: torch.Tensor, isa: Any) -> tuple[tuple, tuple]:
    """(dense (fn, arrays), sparse (fn, arrays)) for the symmetric int4 g128 codes of 2:4 ``w``."""
    import tvm
    from tvm import te

    from llmpress.backends.tvm.kernels import qgemv, qlayout, sparse
    from llmpress.ir.ops.wq_linear import pack_weight

    n, k = w.shape
    scales = (w.reshape(n, k // GROUP, GROUP).abs().amax(-1) / 7).clamp_min(1e-8)
    q = torch.round(w / scales.repeat_interleave(GROUP, 1)).clamp(-8, 7)
    qw = pack_weight(q, 4, sym=True)
    layout = qlayout.QLayout(4, True, n, k, GROUP)
    ph = [te.placeholder(tuple(qw.shape), "uint8", name="qweight"), te.placeholder((n, k // GROUP), "float32",
                                                                                    name="scales")]
    rep = _build(te.create_prim_func(ph + qlayout.repack_te(layout, *ph)))
    dense_out = [tvm.runtime.empty(layout.w_shape, layout.dtype), tvm.runtime.empty(layout.sz_shape, "float32")]
    rep(tvm.runtime.tensor(qw.numpy()), tvm.runtime.tensor(scales.numpy()), *dense_out)
    srep = _build(sparse.nm24_repack_func(n, k, GROUP))
    nt = (n + sparse.R - 1) // sparse.R
    sparse_out = [tvm.runtime.empty((nt, k // 8, 3, sparse.R), "uint8"),
                  tvm.runtime.empty((nt, k // GROUP, sparse.R), "float32")]
    srep(tvm.runtime.tensor(qw.numpy()), tvm.runtime.tensor(scales.numpy()), *sparse_out)
    return ((_build(qgemv.gemv_float_func(layout)), [o.numpy() for o in dense_out]),
            (_build(sparse.nm24_gemv_func(n, k, GROUP)), [o.numpy() for o in sparse_out]))


def run(rounds: int) -> list[dict]:
    import tvm

    from llmpress.backends.tvm.isa import cpu_isa

    isa = cpu_isa(_host_target())
    rows: list[dict] = []
    for n, k in SHAPES:
        g = torch.Generator().manual_seed(n)
        w = torch.randn(n, k, generator=g) * k ** -0.5
        x = tvm.runtime.tensor(torch.randn(1, k, generator=g).numpy())
        cases: list[tuple[dict, Callable, list[np.ndarray]]] = []
        fn, arrays = _dense_f32(w, isa)
        cases.append(({"kernel": "dense fp32", "precision": "fp32", "sparsity": 0.0}, fn, arrays))
        for s in SPARSITIES + ["2:4"]:
            ws = _prune_24(w, g) if s == "2:4" else _prune_rows(w, s, g)
            fn, arrays, pattern = _sparse_f32(ws)
            sv = 0.5 if s == "2:4" else s
            cases.append(({"kernel": f"sparse fp32 {'2:4' if s == '2:4' else f's={s}'}", "precision": "fp32",
                           "sparsity": sv, "pattern": "2:4" if s == "2:4" else "unstructured",
                           "measured_pattern": pattern}, fn, arrays))
        (dfn, darr), (sfn, sarr) = _int4(_prune_24(w, g), isa)
        cases.append(({"kernel": "dense int4 (2:4 codes)", "precision": "int4", "sparsity": 0.0}, dfn, darr))
        cases.append(({"kernel": "sparse int4 2:4", "precision": "int4", "sparsity": 0.5, "pattern": "2:4"}, sfn,
                       sarr))
        calls = []
        for row, fn, arrays in cases:
            row.update(shape=f"{n}x{k}", weight_bytes=sum(a.nbytes for a in arrays), isa=isa.name)
            y = tvm.runtime.empty((1, n), "float32")
            calls.append((row, _call(fn, x, _cold(arrays), y)))
        samples: dict[int, list[float]] = {id(r): [] for r, _ in calls}
        number = 10
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from machine import settle

        for r in range(rounds + 1):
            for row, fn in calls:
                settle()
                t0 = time.perf_counter()
                for i in range(number):
                    fn(i)
                if r:  # round 0 warms up
                    samples[id(row)].append((time.perf_counter() - t0) / number)
        for row, _ in calls:
            t = statistics.median(samples[id(row)])
            row["us"] = t * 1e6
            row["gbs"] = row["weight_bytes"] / t / 1e9
        for row, _ in calls:
            base = next(r["us"] for r, _ in calls if r["precision"] == row["precision"] and r["sparsity"] == 0.0)
            row["speedup_vs_dense"] = base / row["us"]
        rows += [r for r, _ in calls]
        log.info("%dx%d done", n, k)
        del calls, cases
    return rows


def crossover(rows: list[dict], precision: str, kernels: Callable[[dict], bool]) -> float | None:
    """The least measured sparsity from which (it and every higher one) the sparse kernel beats dense on every
    shape; None when it never does."""
    best = None
    for s in sorted({r["sparsity"] for r in rows if r["precision"] == precision and kernels(r)}, reverse=True):
        at = [r for r in rows if r["precision"] == precision and kernels(r) and r["sparsity"] == s]
        if all(r["speedup_vs_dense"] > 1.0 for r in at):
            best = s
        else:
            break
    return best


def markdown(rows: list[dict], env: dict, cross: dict) -> str:
    lines = ["# Sparse CPU kernels: crossover against dense (decode GEMV)", "",
             f"{env['cpu']}, {env['threads']} threads, build for the host CPU (isa {rows[0]['isa']}), load "
             f"{env['load_before']} -> {env['load_after']}, {env['date']}. Median of {env['rounds']} interleaved "
             f"rounds, 10 calls each, weights cold (cycled through >= {COLD_BYTES >> 20} MiB of copies).", "",
             "| shape N x K | kernel | sparsity | stored MB | us / call | GB/s | vs dense |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['shape']} | {r['kernel']} | {r['sparsity']:.2f} | {r['weight_bytes'] / 1e6:.1f} | "
                     f"{r['us']:.1f} | {r['gbs']:.1f} | {r['speedup_vs_dense']:.2f}x |")
    lines += ["", "Crossover (least measured sparsity from which sparse beats dense on both shapes): "
              + ", ".join(f"{k}: {'never (slower at every measured sparsity)' if v is None else f'{v:.2f}'}"
                          for k, v in cross.items()) + ".",
              "These are the constants `llmpress/backends/tvm/kernels/sparse_plan.py` `CROSSOVER` holds for x86_64."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    import os

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from machine import loadavg, machine_env

    from llmpress.backends.tvm.threads import configure

    configure(a.threads)
    env = machine_env(threads=a.threads, rounds=a.rounds)
    rows = run(a.rounds)
    env["load_after"] = loadavg()
    cross = {"fp32 unstructured": crossover(rows, "fp32", lambda r: r.get("pattern") == "unstructured"),
             "fp32 2:4": crossover(rows, "fp32", lambda r: r.get("pattern") == "2:4"),
             "int4 2:4": crossover(rows, "int4", lambda r: r.get("pattern") == "2:4")}
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "sparse_kernels.json").write_text(json.dumps({"env": env, "rows": rows, "crossover": cross},
                                                          indent=2) + "\n")
    (a.out / "sparse_kernels.md").write_text(markdown(rows, env, cross))
    print(markdown(rows, env, cross))
    return 0


if __name__ == "__main__":
    sys.exit(main())
