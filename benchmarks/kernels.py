"""Kernel micro-benchmark: the fused int4 dequant-GEMV of the TVM backend against fp32 matmuls.

Shapes are ``in x out`` (features in, features out) of one linear layer, batch 1:

- 256 x 768, 768 x 2048 (an MLP up projection of a 110M-class model), 2048 x 768 (its down projection);
- GEMV = one token (decode); GEMM = 128 tokens (prefill), for context.

Kernels, each given the same input and the same number of threads (``--threads``, default 2):

- ``tvm int4 g128``: ``llmpress::wq_linear`` (symmetric int4, group 128) built by the llmpress TVM backend for
  ``cpu`` (x86-64-v3): packed weights unpacked, offset and scaled inside the vectorized reduction;
- ``tvm fp32``: ``aten.linear`` on the fp32 weight, built by the same backend (TVM's default legalized matmul plus
  whatever CPU schedule rules the backend has; today none claim a plain matmul);
- ``torch fp32``: ``torch.nn.functional.linear`` (oneDNN/MKL);
- ``torch int4 ref``: the op's reference kernel (dequantize to fp32, then linear), what ``module.run`` does.

Timing: TVM functions with TVM's ``time_evaluator`` (the VM function called on device tensors, weights included as
arguments), torch with ``time.perf_counter`` around the same number of calls; ``--repeat`` rounds of ``--number``
calls each after a warm-up; the median round is reported (and the minimum, to show the noise of a shared machine).
Output: ``benchmarks/results/kernels.json`` and ``kernels.md``.

Run: ``.venv/bin/python benchmarks/kernels.py`` (about 2 minutes on 2 cores).
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


def _tvm_time(model: torch.nn.Module, x: torch.Tensor, number: int, repeat: int) -> tuple[list[float], torch.Tensor]:
    """Per-call seconds of each round for the TVM build of ``model`` on ``x`` (static shape), and its output."""
    from llmpress.backends.tvm import TVMBackend
    from llmpress.ir.capture import capture

    compiled = TVMBackend().lower(capture(model, (x,), dynamic=False), "cpu", progress=False)
    out = torch.as_tensor(compiled(x))
    # time the VM function itself (inputs already on the device), not the torch <-> TVM conversions around it
    compiled._ensure_vm()
    vm_args = [compiled._to_tvm(x), *compiled._param_tensors]
    res = compiled._vm.time_evaluator("main", compiled._dev, number=number, repeat=repeat, min_repeat_ms=0)(*vm_args)
    return list(res.results), out


def _torch_time(fn, number: int, repeat: int) -> list[float]:
    fn()
    rounds = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        for _ in range(number):
            fn()
        rounds.append((time.perf_counter() - t0) / number)
    return rounds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
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
            t_int4, y_int4 = _tvm_time(int4, x, number, args.repeat)
            t_fp32, y_fp32 = _tvm_time(fp32, x, number, args.repeat)
            with torch.no_grad():
                ref_int4 = int4(x)
                t_torch = _torch_time(lambda: torch.nn.functional.linear(x, w), number, args.repeat)
                t_ref = _torch_time(lambda: int4(x), number, args.repeat)
            err4 = float((y_int4 - ref_int4).abs().max() / ref_int4.abs().max())
            err32 = float((y_fp32 - x @ w.t()).abs().max() / (x @ w.t()).abs().max())
            row = {"shape": f"{in_f}x{out_f}", "in": in_f, "out": out_f, "kind": kind, "tokens": tokens,
                   "weight_bytes_int4": int(int4.q.numel() + int4.s.numel() * 4), "weight_bytes_fp32": w.numel() * 4,
                   "max_rel_err_tvm_int4_vs_ref": err4, "max_rel_err_tvm_fp32_vs_torch": err32}
            for name, t in (("tvm_int4_g128", t_int4), ("tvm_fp32", t_fp32), ("torch_fp32", t_torch),
                            ("torch_int4_ref", t_ref)):
                row[name + "_us"] = statistics.median(t) * 1e6
                row[name + "_min_us"] = min(t) * 1e6
            rows.append(row)
            log.info("%s %-9s tvm int4 %8.1f us | tvm fp32 %9.1f us | torch fp32 %8.1f us | torch int4 ref %8.1f us",
                     kind, row["shape"], row["tvm_int4_g128_us"], row["tvm_fp32_us"], row["torch_fp32_us"],
                     row["torch_int4_ref_us"])
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
    (args.out / "kernels.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    (args.out / "kernels.md").write_text(_markdown(meta, rows))
    log.info("wrote %s and %s", args.out / "kernels.json", args.out / "kernels.md")


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _markdown(meta: dict, rows: list[dict]) -> str:
    lines = [
        "# Kernel micro-benchmark: fused int4 dequant-matmul (TVM) vs fp32",
        "",
        f"{meta['cpu']}, {meta['threads']} threads, TVM {meta.get('tvm', '?')} target {meta['target']}, "
        f"torch {meta['torch']}; {meta['date']}. Median of {meta['repeat']} rounds (min in parentheses), "
        "microseconds per call. Shapes are in x out; GEMV = 1 token, GEMM = "
        f"{next((r['tokens'] for r in rows if r['kind'] == 'GEMM'), '?')} tokens. Generated by "
        "`benchmarks/kernels.py`. The machine is shared with other jobs: 1-minute load average "
        f"{meta['loadavg_1m_at_start']:.1f} at start, {meta['loadavg_1m_at_end']:.1f} at end (2 cores), so absolute "
        "numbers are inflated and noisy; ratios within one row are more telling.",
        "",
        "| kind | in x out | tvm int4 g128 | tvm fp32 | torch fp32 | torch int4 ref | int4 vs torch fp32 | weight bytes int4 / fp32 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['kind']} | {r['shape']} | {r['tvm_int4_g128_us']:.1f} ({r['tvm_int4_g128_min_us']:.1f}) "
            f"| {r['tvm_fp32_us']:.1f} ({r['tvm_fp32_min_us']:.1f}) | {r['torch_fp32_us']:.1f} "
            f"({r['torch_fp32_min_us']:.1f}) | {r['torch_int4_ref_us']:.1f} ({r['torch_int4_ref_min_us']:.1f}) "
            f"| {r['torch_fp32_us'] / r['tvm_int4_g128_us']:.2f}x | {r['weight_bytes_int4']} / {r['weight_bytes_fp32']} |")
    lines += ["", "`int4 vs torch fp32` > 1 means the fused int4 kernel is faster. Max relative error of the TVM int4 "
              "output vs the op's reference kernel: "
              f"{max(r['max_rel_err_tvm_int4_vs_ref'] for r in rows):.2e}.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
