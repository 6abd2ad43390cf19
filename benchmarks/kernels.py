"""Kernel benchmark: one linear layer, 4096 x 4096, batch 1 (GEMV, decode) and 128 tokens (GEMM, prefill).

Side by side, interleaved round by round, the same threads for every runtime:

- ``torch fp32``: ``torch.nn.functional.linear`` (oneDNN/MKL);
- ``ORT fp32``: ONNX Runtime, one ``MatMul`` against the weight as an initializer;
- ``ORT int8/int4 acc0|acc4``: ONNX Runtime's own weight quantizer (``MatMulNBitsQuantizer``, symmetric, block 128
  or 32) on that model: ``MatMulNBits`` with ``accuracy_level`` 0 (float compute) or 4 (int8 activations);
- ``llmpress fp32``: ``aten.linear`` through the TVM backend, target ``cpu``;
- ``llmpress int8/int4 a16|a8``: ``llmpress::wq_linear`` (RTN, symmetric, group 128 or 32) through the TVM
  backend, target ``cpu``, float activations (``a16``) or ``act_quant`` int8 activations (``a8``). The build that
  runs is the most capable one this CPU supports (``build`` column: ``cpu`` = x86-64-v3 AVX2, ``cpu+avx512vnni``).

A GEMV reads its weight once per call, so a warm cache would measure the cache, not the memory: each GEMV row cycles
through copies of its weights totalling at least 256 MiB (more than any L3 here), the state of a decode step. A
GEMM reuses each weight 128 times: one copy. Per row: median time per call over the rounds, GB/s of weight bytes
read (GEMV), GMAC/s (GEMM), and the ratio to torch fp32.

Run alone: ``.venv/bin/python benchmarks/kernels.py [--threads N] [--quick]`` (writes ``results/kernels.*``);
``speed.py`` runs it as its first section.
"""
from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

__all__ = ["run_kernels", "kernels_markdown"]

log = logging.getLogger("benchmarks.kernels")

DIM = 4096
GEMM_TOKENS = 128
COLD_BYTES = 256 << 20


def _weight(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(DIM, DIM, generator=g) * DIM ** -0.5


def _llmpress(w: torch.Tensor, tokens: int, bits: int | None, group: int, act: bool):
    """(call(i), weight bytes, build name) for the TVM build of one linear on ``x [1, tokens, DIM]``."""
    import llmpress.ir.ops  # noqa: F401
    from llmpress.backends.tvm import TVMBackend
    from llmpress.ir.capture import capture
    from llmpress.passes.act_quant import ActQuant, ActQuantOptions
    from llmpress.passes.base import PassContext
    from llmpress.passes.quantize import Quantize, QuantizeOptions

    lin = torch.nn.Linear(DIM, DIM, bias=False)
    lin.weight.data.copy_(w)
    x = torch.randn(1, tokens, DIM)
    module = capture(lin.eval(), (x,), dynamic=False)
    ctx = PassContext(progress=False)
    if bits:
        module = Quantize(QuantizeOptions(bits=bits, group=group)).run(module, ctx).module
        if act:
            module = ActQuant(ActQuantOptions(bits=8)).run(module, ctx).module
    compiled = TVMBackend().lower(module, "cpu", progress=False)
    compiled._ensure_vm()
    fn = compiled._vm["main"]
    params = compiled._param_tensors
    nbytes = sum(int(np.prod(p.shape)) * p.dtype.itemsize for p in params)
    copies = [params]
    if tokens == 1:  # cold weights: enough copies to overflow the caches
        import tvm

        copies += [[tvm.runtime.tensor(p.numpy()) for p in params] for _ in range(COLD_BYTES // nbytes)]
    xt = compiled._to_tvm(x)
    return (lambda i: fn(xt, *copies[i % len(copies)])), nbytes, compiled.running.name


def _onnx_matmul(w: torch.Tensor, path: Path) -> Path:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "T", DIM])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, "T", DIM])
    wt = numpy_helper.from_array(w.t().contiguous().numpy(), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "linear", [x], [y], [wt])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    return path


def _ort(w: torch.Tensor, tokens: int, bits: int | None, block: int, acc: int, threads: int, tmp: Path):
    """(call(i), weight bytes, "") for ONNX Runtime on the fp32 MatMul model, or its MatMulNBits quantization."""
    import onnx
    import onnxruntime as ort

    x = torch.randn(1, tokens, DIM).numpy()
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    sessions, nbytes = [], 0
    n = 1 if tokens > 1 else max(1, COLD_BYTES // (DIM * DIM * (bits or 32) // 8))
    for i in range(n):
        path = _onnx_matmul(_weight(i), tmp / f"mm{i}.onnx")
        if bits:
            from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

            q = MatMulNBitsQuantizer(onnx.load(str(path)), bits=bits, block_size=block, is_symmetric=True,
                                     accuracy_level=acc or None)
            logging.getLogger(q.__module__).setLevel(logging.WARNING)
            q.process()
            model = q.model.model
            nbytes = sum(len(t.raw_data) for t in model.graph.initializer)
            path = tmp / f"q{i}.onnx"
            onnx.save(model, str(path))
        else:
            nbytes = DIM * DIM * 4
        sessions.append(ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"]))
    return (lambda i: sessions[i % len(sessions)].run(None, {"x": x})), nbytes, ""


def _torch(w: torch.Tensor, tokens: int):
    x = torch.randn(1, tokens, DIM)
    ws = [w] if tokens > 1 else [_weight(i) for i in range(COLD_BYTES // (DIM * DIM * 4))]
    return (lambda i: torch.nn.functional.linear(x, ws[i % len(ws)])), DIM * DIM * 4, ""


# (row label, format, builder key): what each kernel row runs
ROWS = [
    ("torch fp32", "fp32", ("torch",)),
    ("ORT fp32", "fp32", ("ort", None, 0, 0)),
    ("llmpress fp32", "fp32", ("llmpress", None, 0, False)),
    ("ORT int8 acc0", "int8 g128", ("ort", 8, 128, 0)),
    ("ORT int8 acc4", "int8 g128", ("ort", 8, 128, 4)),
    ("llmpress int8 a16", "int8 g128", ("llmpress", 8, 128, False)),
    ("llmpress int8 a8", "int8 g128", ("llmpress", 8, 128, True)),
    ("ORT int4 acc0", "int4 g128", ("ort", 4, 128, 0)),
    ("ORT int4 acc4", "int4 g128", ("ort", 4, 128, 4)),
    ("llmpress int4 a16", "int4 g128", ("llmpress", 4, 128, False)),
    ("llmpress int4 a8", "int4 g128", ("llmpress", 4, 128, True)),
    ("ORT int4 g32 acc4", "int4 g32", ("ort", 4, 32, 4)),
    ("llmpress int4 g32 a16", "int4 g32", ("llmpress", 4, 32, False)),
    ("llmpress int4 g32 a8", "int4 g32", ("llmpress", 4, 32, True)),
]


def run_kernels(threads: int, *, rounds: int = 7, quick: bool = False) -> list[dict]:
    """Every row of ``ROWS`` at GEMV and GEMM; returns one dict per (kind, row)."""
    torch.set_num_threads(threads)
    out = []
    w = _weight()
    with tempfile.TemporaryDirectory(prefix="llmpress-kernels-") as tmp:
        for kind, tokens in (("GEMV", 1), ("GEMM", GEMM_TOKENS)):
            calls: list[tuple[dict, Callable[[int], Any]]] = []
            for label, fmt, key in ROWS:
                if quick and "g32" in fmt:
                    continue
                row = {"kind": kind, "tokens": tokens, "runtime": label, "format": fmt}
                try:
                    if key[0] == "torch":
                        fn, nbytes, build = _torch(w, tokens)
                    elif key[0] == "ort":
                        fn, nbytes, build = _ort(w, tokens, key[1], key[2], key[3], threads, Path(tmp))
                    else:
                        fn, nbytes, build = _llmpress(w, tokens, key[1], key[2], key[3])
                except Exception as e:  # noqa: BLE001 - a peer that cannot run this format: say why in the row
                    log.warning("%s %s: %s", kind, label, e)
                    row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
                    out.append(row)
                    continue
                row.update(weight_bytes=nbytes, build=build)
                calls.append((row, fn))
                out.append(row)
            number = 20 if tokens == 1 else 2
            samples = {id(r): [] for r, _ in calls}
            from machine import settle

            for r in range(rounds + 1):
                for row, fn in calls:
                    settle()
                    t0 = time.perf_counter()
                    for i in range(number):
                        fn(i)
                    if r:  # round 0 warms up (and touches every cold copy once)
                        samples[id(row)].append((time.perf_counter() - t0) / number)
            for row, _ in calls:
                t = statistics.median(samples[id(row)])
                row["us"] = t * 1e6
                row["gbs"] = row["weight_bytes"] / t / 1e9
                row["gmacs"] = tokens * DIM * DIM / t / 1e9
            base = next((r["us"] for r in out if r["kind"] == kind and r["runtime"] == "torch fp32" and "us" in r),
                        None)
            for row in out:
                if row["kind"] == kind and "us" in row and base:
                    row["speedup_vs_torch_fp32"] = base / row["us"]
            log.info("%s done", kind)
    return out


def kernels_markdown(rows: list[dict], env: dict) -> str:
    lines = [f"One linear layer {DIM} x {DIM}: GEMV = 1 token (weights cold: cycled through 256 MiB of copies), "
             f"GEMM = {GEMM_TOKENS} tokens. {env['threads']} threads per runtime, median of {env['kernel_rounds']} "
             "interleaved rounds.", "",
             "| kind | runtime | format | build | us / call | weight GB/s | GMAC/s | vs torch fp32 |",
             "|---|---|---|---|---:|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['kind']} | {r['runtime']} | {r['format']} | | n/a | | | {r['error']} |")
            continue
        lines.append(f"| {r['kind']} | {r['runtime']} | {r['format']} | {r.get('build', '')} | {r['us']:.1f} | "
                     f"{r['gbs']:.1f} | {r['gmacs']:.1f} | {r.get('speedup_vs_torch_fp32', float('nan')):.2f}x |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    import os

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--quick", action="store_true", help="fewer rows (no group 32)")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from machine import loadavg, machine_env

    from llmpress.backends.tvm.threads import configure

    configure(a.threads)
    env = machine_env(threads=a.threads, kernel_rounds=a.rounds)
    rows = run_kernels(a.threads, rounds=a.rounds, quick=a.quick)
    env["load_after"] = loadavg()
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "kernels.json").write_text(json.dumps({"env": env, "rows": rows}, indent=2) + "\n")
    text = "# Kernel benchmark\n\n" + f"{env['cpu']}, load {env['load_before']} -> {env['load_after']}, " \
        f"{env['date']}.\n\n" + kernels_markdown(rows, env)
    (a.out / "kernels.md").write_text(text)
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
