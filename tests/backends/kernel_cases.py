"""The quantized CPU kernels under test, their inputs and exact expected values: shared by the native x86 checks
(``test_tvm_cpu_kernels.py``) and the aarch64 checks under qemu (``test_arm64_kernels.py``).

``functions(isa)`` is every kernel family (activation quantization, GEMV and GEMM in integer and float forms; bits
8/4/3/2, symmetric and asymmetric, act_group 32 and 128, weight groups 32/128/256) for one instruction set;
``make_cases()`` the calls (the same inputs for every build) and, per call, what ``check_float_output`` compares
against: the exact float64 value and ``S`` (``quant_reference.py``; the tolerance argument is in
``test_arm64_kernels.py``'s docstring).
"""
from __future__ import annotations

import functools

import numpy as np
import torch

from .qemu_kernels import Call
from .quant_reference import U64, act_inputs, exact_float, exact_int, gamma, kernel_codes, repack, weights

__all__ = ["K", "N", "M", "N_BIG", "P", "INT_CASES", "FLOAT_CASES", "ACT_CASES", "activations", "dot_probe",
           "layout", "functions", "build", "make_cases", "check_float_output", "mnemonics"]

K, N, M = 256, 8, 5  # in, out (two tiles of 4 rows), tokens for the GEMM (odd: the last token pair is partial)
N_BIG = 4096  # a GEMV past PARALLEL_MIN_MACS: its tiles run on the thread pool
P = 64  # rows of the dot-product probes

INT_CASES = [(b, sym, 128, ga) for b in (8, 4, 3, 2) for sym in (True, False) for ga in (32, 128)]
FLOAT_CASES = [(b, sym, g) for b in (8, 4, 3, 2) for sym in (True, False) for g in (32, 128)]
ACT_CASES = [(32, 128, 1), (32, 128, None), (128, 128, 1), (128, 128, None), (128, 256, None)]  # (GA, G, tokens)


# -- inputs ---------------------------------------------------------------------------------------------------------
def activations() -> np.ndarray:
    """``[M, K]`` float32: random rows of several magnitudes; row 1 holds an all-zero 128-feature block and a block
    whose max is 127 (scale exactly 1) filled with halves (``n + 0.5``: round-half-even ties)."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(M, K, generator=g)
    x[1, :128] = 0.0
    x[1, 128:256] = torch.randint(-126, 126, (128,), generator=g).float() + 0.5
    x[1, 130] = 127.0
    x[2] *= 1e3
    x[3] *= 1e-3
    x[4, 17] = 40.0  # an outlier
    return x.numpy()


# -- the kernel library ---------------------------------------------------------------------------------------------
def dot_probe(isa, signed: bool):
    """``out[p] = dot(acc[p], w[p], a[p])``: one isa dot product per row (``int32x8`` lanes)."""
    from tvm.script import tirx as T

    wdt = "int8" if signed else "uint8"
    dot = isa.dot_s8s8 if signed else isa.dot_u8s8

    @T.prim_func(private=True)
    def func(w: T.Buffer((P, 32), wdt), a: T.Buffer((P, 32), "int8"), acc: T.Buffer((P, 8), "int32"),
             out: T.Buffer((P, 8), "int32")):
        T.func_attr({"tirx.noalias": True})
        for p in range(P):
            out[p, T.ramp(0, 1, 8)] = dot(acc[p, T.ramp(0, 1, 8)], w.vload([p, 0], wdt + "x32"),
                                          a.vload([p, 0], "int8x32"))

    return func


def layout(bits, sym, group, out_f=N):
    from llmpress.backends.tvm.kernels.qlayout import QLayout

    return QLayout(bits, sym, out_f, K, group)


def functions(isa) -> dict:
    """Every kernel under test for instruction set ``isa``, by name."""
    from llmpress.backends.tvm.kernels.qact import act_quant_func
    from llmpress.backends.tvm.kernels.qgemm import gemm_float_func, gemm_int_func
    from llmpress.backends.tvm.kernels.qgemv import gemv_float_func, gemv_int_func

    f = {"dot_u8s8": dot_probe(isa, False), "dot_s8s8": dot_probe(isa, True)}
    for ga, group, tokens in ACT_CASES:
        f[f"act_a{ga}_g{group}_t{tokens}"] = act_quant_func(K, ga, group, tokens=tokens)
    for bits, sym, group, ga in INT_CASES:
        f[f"gemv_int_b{bits}_{sym}_a{ga}"] = gemv_int_func(layout(bits, sym, group), isa, ga)
        f[f"gemm_int_b{bits}_{sym}_a{ga}"] = gemm_int_func(layout(bits, sym, group), isa, ga)
    for bits, sym, group in FLOAT_CASES:
        f[f"gemv_float_b{bits}_{sym}_g{group}"] = gemv_float_func(layout(bits, sym, group))
        f[f"gemm_float_b{bits}_{sym}_g{group}"] = gemm_float_func(layout(bits, sym, group))
    f["gemv_int_big"] = gemv_int_func(layout(4, True, 128, N_BIG), isa, 32)
    f["gemv_float_big"] = gemv_float_func(layout(4, False, 128, N_BIG))
    return f


def build(target):
    """``(isa, executable)``: every kernel of ``functions`` compiled for ``target`` (a target name, or a
    ``TargetSpec``: e.g. one of ``cpu``'s variants). A name is compiled once per process: ``test_arm64_kernels``
    compares against the same ``cpu`` library that ``test_tvm_cpu_kernels`` checks (one xdist worker runs both: tests/conftest.py)."""
    return _build_named(target) if isinstance(target, str) else _build(target)


@functools.cache
def _build_named(name: str):
    from llmpress.backends.tvm.targets import resolve_target

    return _build(resolve_target(name))


def _build(spec):
    import tvm

    from llmpress.backends.tvm.isa import cpu_isa

    tgt = spec.tvm_target()
    isa = cpu_isa(tgt)
    funcs = functions(isa)
    mod = tvm.IRModule({name: func.with_attr("global_symbol", name) for name, func in funcs.items()})
    return isa, tvm.compile(mod, tgt)



def make_cases() -> tuple[dict, dict]:
    """Inputs of every call (the same for every build) and what each one's exact result is."""
    x = activations()
    g = torch.Generator().manual_seed(3)
    calls, checks = {}, {}
    # dot probes: extreme rows (all products at the maximum magnitude, both signs), then random
    wu = torch.randint(0, 128, (P, 32), generator=g).to(torch.uint8)
    ws = torch.randint(-128, 128, (P, 32), generator=g).to(torch.int8)
    a = torch.randint(-127, 128, (P, 32), generator=g).to(torch.int8)
    wu[:2], ws[:4] = 127, -128
    ws[4] = 127
    a[0], a[1], a[2], a[3], a[4] = 127, -127, -127, 127, -127
    acc = torch.randint(-(1 << 20), 1 << 20, (P, 8), generator=g).to(torch.int32)
    for name, w in (("dot_u8s8", wu), ("dot_s8s8", ws)):
        calls[name] = Call(name, [w.numpy(), a.numpy(), acc.numpy()], [("int32", (P, 8))])
        checks[name] = (w.long() * a.long()).sum(-1) + acc.long().sum(-1)
    for ga, group, tokens in ACT_CASES:
        name = f"act_a{ga}_g{group}_t{tokens}"
        xs = x[1:2] if tokens == 1 else x
        m = xs.shape[0]
        calls[name] = Call(name, [xs], [("int8", (m, K)), ("float32", (m, K // ga)), ("float32", (m, K // group))])
        checks[name] = (xs, ga, group)
    # every weight set, repacked in one build: key (bits, sym, group, out_f)
    keys = sorted({(b, sym, g, N) for b, sym, g, _ in INT_CASES} | {(b, sym, g, N) for b, sym, g in FLOAT_CASES}
                  | {(4, True, 128, N_BIG), (4, False, 128, N_BIG)})
    raw = {key: weights(*key[:3], key[3], K, seed=int(key[3] == N_BIG)) for key in keys}
    tiled = dict(zip(keys, repack([(layout(*key), *raw[key]) for key in keys])))

    def weight(bits, sym, group, out_f=N):
        """``(w, sz)`` for the kernel, ``(c, zc, s)`` for the exact reference."""
        q, s, z = raw[bits, sym, group, out_f]
        return tiled[bits, sym, group, out_f], (*kernel_codes(bits, sym, q, z, group), s)

    for bits, sym, group, ga in INT_CASES:
        (w, sz), (c, zc, s) = weight(bits, sym, group)
        for form, xs in (("gemv", x[1:2]), ("gemm", x)):
            qa, sa, asum = act_inputs(xs, ga, group)
            name = f"{form}_int_b{bits}_{sym}_a{ga}"
            calls[name] = Call(name, [qa, sa, asum, w, sz], [("float32", (xs.shape[0], N))])
            checks[name] = exact_int(c, zc, s, qa, sa, asum, group, ga)
    for bits, sym, group in FLOAT_CASES:
        (w, sz), (c, zc, s) = weight(bits, sym, group)
        for form, xs in (("gemv", x[1:2]), ("gemm", x)):
            name = f"{form}_float_b{bits}_{sym}_g{group}"
            calls[name] = Call(name, [xs, w, sz], [("float32", (xs.shape[0], N))])
            checks[name] = exact_float(c, zc, s, xs, group)
    # the thread-pool GEMVs
    (w, sz), (c, zc, s) = weight(4, True, 128, N_BIG)
    qa, sa, asum = act_inputs(x[0:1], 32, 128)
    calls["gemv_int_big"] = Call("gemv_int_big", [qa, sa, asum, w, sz], [("float32", (1, N_BIG))])
    checks["gemv_int_big"] = exact_int(c, zc, s, qa, sa, asum, 128, 32)
    (w, sz), (c, zc, s) = weight(4, False, 128, N_BIG)
    calls["gemv_float_big"] = Call("gemv_float_big", [x[0:1], w, sz], [("float32", (1, N_BIG))])
    checks["gemv_float_big"] = exact_float(c, zc, s, x[0:1], 128)
    return calls, checks


def check_float_output(name: str, where: str, got: np.ndarray, check, other: np.ndarray | None = None,
                       other_name: str = "x86", k: int = K, min_signal: float = 1e3) -> None:
    """``got`` within ``gamma_{k+1} S`` (+ float64's own error) of the exact value, within twice that of ``other``
    (another build's output for the same call) when given; and the case must compute enough to test anything: its
    largest exact output ``min_signal`` times the largest bound (a lost chunk or row moves an output by that much)."""
    exact, big_s = check
    bound = (gamma(k + 1) + gamma(k + 1, U64)) * big_s
    err = np.abs(got.astype(np.float64) - exact)
    assert np.all(err <= bound), f"{where} {name}: max err {err.max():.3g} (bound {bound[err > bound].min():.3g})"
    if other is not None:
        assert np.all(np.abs(got.astype(np.float64) - other) <= 2 * bound), f"{where} {name}: differs from {other_name}"
    assert np.abs(exact).max() > min_signal * bound.max(), f"{name}: the case computes too little to test anything"


def mnemonics(asm: str) -> set[str]:
    """The instruction mnemonics of an assembly listing."""
    return {line.split()[0] for line in asm.splitlines() if line.startswith("\t") and line.split()}
