"""Where one decode step of a TVM artifact spends its time, by kind of operation.

After a prefill of ``prefill`` random tokens, the ``decode`` function is timed as a whole (median of ``repeats``
calls), then once more with the Relax VM's instrument hook: every call instruction of the step (kernels, VM
builtins such as tensor allocation) is timed with ``time.perf_counter`` before and after it and the times are
summed by kind (``KINDS``: first matching pattern of the function name). The hook itself costs a few microseconds
per instruction, reported as the difference between the instrumented and the plain step; the shares are of the
instrumented total.

``.venv/bin/python benchmarks/profile_decode.py ARTIFACT`` prints the table; ``speed.py`` calls ``profile``.
"""
from __future__ import annotations

import re
import statistics
import sys
import time
from collections import defaultdict
from typing import Any

import torch

__all__ = ["profile", "profile_markdown", "KINDS"]

#: (kind, regex on the called function's name), first match wins
KINDS = [
    ("quantized matmul (GEMV)", r"llmpress_(gemv|gemm)_"),
    ("quantized matmul, generic kernel", r"llmpress_wq_linear"),
    ("activation quantization", r"llmpress_act_quant"),
    ("attention", r"llmpress_attention"),
    ("KV-cache write", r"llmpress_cache_write"),
    ("float matmul", r"(^|_)matmul|dense"),
    ("residual add + RMSNorm, one kernel", r"llmpress_add_norm"),
    ("RMSNorm", r"mean|rsqrt|power"),
    ("RoPE", r"strided_slice|concatenate"),
    ("SwiGLU", r"silu"),
    ("residual add", r"add"),
    ("embedding", r"take"),
    ("VM: tensor allocation", r"vm\.builtin\.alloc"),
    ("VM: other builtins", r"vm\.builtin"),
]


def _kind(name: str) -> str:
    for kind, pat in KINDS:
        if re.search(pat, name):
            return kind
    return "other"


def profile(art: Any, *, prefill: int = 128, repeats: int = 9) -> dict:
    """``{"step_ms", "instrumented_ms", "calls", "kinds": [{"kind", "ms", "calls", "share"}...]}``."""
    import tvm_ffi

    from llmpress.eval.generate import empty_cache

    c = art.compiled
    c._ensure_vm()
    lm = art.lm
    ids = torch.randint(3, lm.vocab_size, (1, prefill), generator=torch.Generator().manual_seed(0))
    out = c.prefill(ids, torch.zeros(1, dtype=torch.int64), *empty_cache(lm))
    args = [c._to_tvm(torch.tensor([[5]])), c._to_tvm(torch.tensor([prefill]))]
    args += [c._to_tvm(t) for t in out[1:]] + list(c._param_tensors)
    vm = c._vm
    fn = vm["decode"]
    fn(*args)
    plain = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(*args)
        plain.append(time.perf_counter() - t0)
    times: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    started: dict[str, float] = {}

    def instrument(func, symbol, before, ret, *a):
        if before:
            started[symbol] = time.perf_counter()
        else:
            k = _kind(symbol)
            times[k] += time.perf_counter() - started.pop(symbol)
            counts[k] += 1
        return 0

    vm.set_instrument(tvm_ffi.convert(instrument))
    try:
        fn(*args)  # warm the hook
        times.clear()
        counts.clear()
        t0 = time.perf_counter()
        fn(*args)
        total = time.perf_counter() - t0
    finally:
        vm.set_instrument(tvm_ffi.convert(lambda *a: 0))
    kinds = [{"kind": k, "ms": v * 1e3, "calls": counts[k], "share": v / total}
             for k, v in sorted(times.items(), key=lambda kv: -kv[1])]
    return {"step_ms": statistics.median(plain) * 1e3, "instrumented_ms": total * 1e3,
            "calls": sum(counts.values()), "build": c.running.name, "kinds": kinds}


def profile_markdown(p: dict, title: str) -> str:
    lines = [f"{title}: one decode step after a {128}-token prefill takes {p['step_ms']:.2f} ms "
             f"({1000 / p['step_ms']:.1f} tokens/s; build {p['build']}); with every one of its {p['calls']} VM calls "
             f"timed, {p['instrumented_ms']:.2f} ms.", "",
             "| kind | ms | calls | share |", "|---|---:|---:|---:|"]
    for k in p["kinds"]:
        lines.append(f"| {k['kind']} | {k['ms']:.2f} | {k['calls']} | {100 * k['share']:.1f}% |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    import llmpress

    a = llmpress.load(sys.argv[1])
    sys.stdout.write(profile_markdown(profile(a), sys.argv[1]))
