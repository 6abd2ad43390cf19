"""Kernel micro-benchmark: the fused int4 dequant-GEMV of the TVM backend against fp32 matmuls.

Shapes are ``in x out`` (features in, features out) of one linear layer, batch 1:

- 256 x 768, 768 x 2048 (an MLP up projection of a 110M-class model), 2048 x 768 (its down projection);
- GEMV = one token (decode); GEMM = 128 tokens (prefill), for context.

Kernels, each given the same input and the same number of threads (``--threads``, default 1):

- ``tvm int4 g128``: ``llmpress::wq_linear`` (symmetric int4, group 128) built by the llmpress TVM backend for
  ``cpu`` (x86-64-v3): packed weights unpacked, offset and scaled inside the vectorized reduction;
- ``tvm fp32``: ``aten.linear`` on the fp32 weight, built by the same backend (TVM's default legalized matmul plus
  whatever CPU schedule rules the backend has; today none claim a plain matmul);
- ``torch fp32``: ``torch.nn.functional.linear`` (oneDNN/MKL);
- ``torch int4 ref``: the op's reference kernel (dequantize to fp32, then linear), what ``module.run`` does.

Timing: the TVM VM function is called on device tensors (weights included as arguments; no torch <-> TVM
conversion), torch directly; after a warm-up, ``--repeat`` rounds of ``--number`` calls, the four kernels interleaved
round by round so that they share the machine's changing load. Each round records wall time and the calling
thread's CPU time (``time.thread_time``). With one thread every kernel runs in the calling thread, so its CPU time
is what the kernel costs, unaffected by the time the OS gives to other jobs on a shared machine: that is the
headline number for ``--threads 1`` (median round, fastest in parentheses). Wall time is reported too (and is the
headline for more threads). Weights stay hot in cache between calls (as in a decode loop over a small model);
a cold-cache, memory-bound GEMV would favour the 8x smaller int4 weights more.
Output: ``benchmarks/results/kernels.json`` and ``kernels.md``.

Run: ``.venv/bin/python benchmarks/kernels.py [--threads N]`` (about 3 minutes on 2 cores).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
SHAPES = [(256, 768), (768, 2048), (2048, 768)]

log = logging.getLogger("benchmarks.kernels")


class _Int4(torch.nn.Module):
    def __init__(self, w: torch.Tensor) -> None:
        super().__init__()
        from llmpress.ir.ops.wq_linear import pack_weight

        out_f, in_f = w.shape
        g = w.view(out_f, in_f // 128, 128)
        s = g.abs().amax(-1) / 7
        q = torch.round(g / s[..., None]).clamp(-8, 7).view(out_f, in_f).to(torch.int32)
        self.register_buffer("q", pack_weight(q, 4, sym=True))
        self.register_buffer("s", s.contiguous())

    def forward(self, x):
        return torch.ops.llmpress.wq_linear(x, self.q, self.s, None, None, 4, 128)


class _Fp32(torch.nn.Module):
    def __init__(self, w: torch.Tensor) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
        self.lin.weight.data.copy_(w)

    def forward(self, x):
        return self.lin(x)


def _round_timer(fn, number: int):
    """One round = ``number`` calls of ``fn``; returns (wall seconds, thread CPU seconds) per call."""
    def one_round() -> tuple[float, float]:
        w0, c0 = time.perf_counter(), time.thread_time()
        for _ in range(number):
            fn()
        return (time.perf_counter() - w0) / number, (time.thread_time() - c0) / number

    return one_round


def _tvm_timer(model: torch.nn.Module, x: torch.Tensor, number: int):
    """(round timer, output) for the TVM build of ``model`` on ``x``: the VM function itself is called on device
    tensors (weights included as arguments), not the torch <-> TVM conversions around it."""
    from llmpress.backends.tvm import TVMBackend
    from llmpress.ir.capture import capture

    compiled = TVMBackend().lower(capture(model, (x,), dynamic=False), "cpu", progress=False)
    out = torch.as_tensor(compiled(x))
    compiled._ensure_vm()
    fn = compiled._vm["main"]
    vm_args = [compiled._to_tvm(x), *compiled._param_tensors]
    return _round_timer(lambda: fn(*vm_args), number), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1,
                    help="threads for every runtime (default 1: on a shared, oversubscribed machine a parallel region "
                         "waits for its slowest thread's time slice; results of other counts go to kernels-tN.*)")
    ap.add_argument("--number", type=int, default=50)
    ap.add_argument("--repeat", type=int, default=15)
    ap.add_argument("--gemm-tokens", type=int, default=128)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    os.environ["TVM_NUM_THREADS"] = str(args.threads)
    torch.set_num_threads(args.threads)
    import llmpress.ir.ops  # noqa: F401 - registers the ops

    load_start = os.getloadavg()[0]
    rows = []
    for in_f, out_f in SHAPES:
        torch.manual_seed(0)
        w = torch.randn(out_f, in_f) * in_f ** -0.5
        int4, fp32 = _Int4(w).eval(), _Fp32(w).eval()
        for kind, tokens in (("GEMV", 1), ("GEMM", args.gemm_tokens)):
            x = torch.randn(1, tokens, in_f)
            number = args.number if tokens == 1 else max(2, args.number // 10)
            timers = {}
            timers["tvm_int4_g128"], y_int4 = _tvm_timer(int4, x, number)
            timers["tvm_fp32"], y_fp32 = _tvm_timer(fp32, x, number)
            with torch.no_grad():
                ref_int4 = int4(x)
                timers["torch_fp32"] = _round_timer(lambda: torch.nn.functional.linear(x, w), number)
                timers["torch_int4_ref"] = _round_timer(lambda: int4(x), max(1, number // 10))
                # rounds interleave the kernels so that they share the machine's (changing) load
                times = {k: [] for k in timers}
                for k, t in timers.items():
                    t()  # warm-up
                for _ in range(args.repeat):
                    for k, t in timers.items():
                        times[k].append(t())
            err4 = float((y_int4 - ref_int4).abs().max() / ref_int4.abs().max())
            err32 = float((y_fp32 - x @ w.t()).abs().max() / (x @ w.t()).abs().max())
            row = {"shape": f"{in_f}x{out_f}", "in": in_f, "out": out_f, "kind": kind, "tokens": tokens,
                   "weight_bytes_int4": int(int4.q.numel() + int4.s.numel() * 4), "weight_bytes_fp32": w.numel() * 4,
                   "max_rel_err_tvm_int4_vs_ref": err4, "max_rel_err_tvm_fp32_vs_torch": err32}
            for name, t in times.items():
                wall, cpu = [r[0] for r in t], [r[1] for r in t]
                row[name + "_us"] = statistics.median(wall) * 1e6
                row[name + "_min_us"] = min(wall) * 1e6
                row[name + "_cpu_us"] = statistics.median(cpu) * 1e6
                row[name + "_cpu_min_us"] = min(cpu) * 1e6
            rows.append(row)
            key = "_cpu_us" if args.threads == 1 else "_us"
            log.info("%s %-9s tvm int4 %8.1f us | tvm fp32 %9.1f us | torch fp32 %8.1f us | torch int4 ref %8.1f us",
                     kind, row["shape"], row["tvm_int4_g128" + key], row["tvm_fp32" + key], row["torch_fp32" + key],
                     row["torch_int4_ref" + key])
    meta = {"threads": args.threads, "number": args.number, "repeat": args.repeat, "cpu": _cpu_name(),
            "machine": platform.machine(), "torch": torch.__version__, "target": "cpu (llvm, mcpu=x86-64-v3)",
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "loadavg_1m_at_start": load_start,
            "loadavg_1m_at_end": os.getloadavg()[0]}
    try:
        import tvm

        meta["tvm"] = tvm.__version__
    except ImportError:  # pragma: no cover
        pass
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "kernels" if args.threads == 1 else f"kernels-t{args.threads}"
    (args.out / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    (args.out / f"{stem}.md").write_text(_markdown(meta, rows))
    log.info("wrote %s and %s", args.out / f"{stem}.json", args.out / f"{stem}.md")


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _markdown(meta: dict, rows: list[dict]) -> str:
    key = "_cpu" if meta["threads"] == 1 else ""
    what = "thread CPU time" if key else "wall time"
    lines = [
        "# Kernel micro-benchmark: fused int4 dequant-matmul (TVM) vs fp32",
        "",
        f"{meta['cpu']}, {meta['threads']} thread(s), TVM {meta.get('tvm', '?')} target {meta['target']}, "
        f"torch {meta['torch']}; {meta['date']}. Microseconds per call of {what}: median of {meta['repeat']} "
        "interleaved rounds (fastest round in parentheses). Shapes are in x out; GEMV = 1 token, GEMM = "
        f"{next((r['tokens'] for r in rows if r['kind'] == 'GEMM'), '?')} tokens. Generated by "
        "`benchmarks/kernels.py` (its docstring has the protocol). The machine is shared with other jobs: 1-minute "
        f"load average {meta['loadavg_1m_at_start']:.1f} at start, {meta['loadavg_1m_at_end']:.1f} at end "
        "(2 cores).",
        "",
        "| kind | in x out | tvm int4 g128 | tvm fp32 | torch fp32 | torch int4 ref | int4 speed-up vs tvm fp32 / torch fp32 | weight bytes int4 / fp32 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        cell = lambda k: f"{r[k + key + '_us']:.1f} ({r[k + key + '_min_us']:.1f})"  # noqa: E731
        lines.append(
            f"| {r['kind']} | {r['shape']} | {cell('tvm_int4_g128')} | {cell('tvm_fp32')} | {cell('torch_fp32')} "
            f"| {cell('torch_int4_ref')} | {r['tvm_fp32' + key + '_us'] / r['tvm_int4_g128' + key + '_us']:.2f}x / "
            f"{r['torch_fp32' + key + '_us'] / r['tvm_int4_g128' + key + '_us']:.2f}x "
            f"| {r['weight_bytes_int4']} / {r['weight_bytes_fp32']} |")
    lines += ["", "Speed-ups compare medians; > 1 means the fused int4 kernel is faster. Max relative error of the TVM "
              "int4 output vs the op's reference kernel: "
              f"{max(r['max_rel_err_tvm_int4_vs_ref'] for r in rows):.2e}.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
