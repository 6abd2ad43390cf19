"""The CPU kernels on this x86-64 machine, against exact references: every build of target ``cpu`` the host can
run (the base library, x86-64-v3: AVX2 ``vpmaddubsw``/``vpmaddwd``; its AVX-512 VNNI variant: 512-bit
``vpdpbusd``) and an AVX-VNNI build (256-bit ``vpdpbusd``, VEX-encoded), each where the host has the features.

Kernel families (``kernel_cases.py``): activation quantization, integer and float GEMV/GEMM over 8/4/3/2-bit
layouts, and here also the 512-bit integer kernels of ``qwide.py``, the float32 linears of ``fgemm.py`` and layers
whose input width holds an odd number of chunks (a loop unrolled by two must not drop the last one). Tolerances:
integer dot products and activation codes/scales are exact; every float output is within ``gamma_{K+1} S`` of its
exact float64 value (the argument is in ``test_arm64_kernels.py``'s docstring: a sum of products whose terms meet
far fewer than K + 1 roundings, in any order, with or without fused multiply-adds).
"""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from llmpress.ir.ops.wq_linear import quantize_activation_blocks

from .kernel_cases import (ACT_CASES, FLOAT_CASES, INT_CASES, K, N_BIG, activations, build, check_float_output,
                           layout, make_cases)
from .qemu_kernels import Call, run_native
from .quant_reference import act_inputs, exact_float, exact_int, kernel_codes, repack, weights

tvm = pytest.importorskip("tvm")

pytestmark = [pytest.mark.tvm, pytest.mark.cpu_variants]


def _spec(name: str):
    from llmpress.backends.tvm.targets import resolve_target

    if name == "cpu+avx512vnni":
        return next(v for v in resolve_target("cpu").variants if v.name == name)
    if name == "avxvnni":
        return resolve_target({"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "x86-64-v3",
                               "mattr": ["+avxvnni"]})
    return resolve_target(name)


#: build -> (the isa its kernels must use, a regular expression its machine code must match)
BUILDS = {"cpu": ("avx2", r"\bvpmaddubsw\b"),
          "avxvnni": ("avxvnni", r"\bvpdpbusd\s+%ymm"),
          "cpu+avx512vnni": ("avx512vnni", r"\bvpdpbusd\s+%ymm")}  # the 512-bit forms: test_wide_kernels_match_exact


@pytest.fixture(scope="module")
def cases():
    return make_cases()


@pytest.fixture(scope="module", params=list(BUILDS))
def built(request, cases):
    """``(name, isa, asm, outputs by call name)`` of one build, run natively on every call."""
    from llmpress.backends.tvm.emulate import host_arch
    from llmpress.backends.tvm.targets import missing_features

    if host_arch() != "x86_64":
        pytest.skip("x86-64 kernels; this host is " + host_arch())
    spec = _spec(request.param)
    missing = missing_features(spec)
    if missing:
        pytest.skip(f"{request.param}: this CPU lacks {', '.join(missing)}")
    calls, _ = cases
    isa, ex = build(request.param if request.param == "cpu" else spec)  # by name: test_arm64_kernels reuses "cpu"
    names = list(calls)
    return request.param, isa, ex.mod.inspect_source("asm"), dict(zip(names, run_native(ex.jit(),
                                                                                         [calls[n] for n in names])))


def test_each_build_uses_its_instruction_set(built):
    name, isa, asm, _ = built
    want_isa, pattern = BUILDS[name]
    assert isa.name == want_isa
    assert re.search(pattern, asm), f"{name}: no {pattern} in the machine code"
    if want_isa == "avx2":
        assert "vpdpbusd" not in asm  # runs on AVX2 machines without VNNI


def test_integer_dot_products_are_exact(built, cases):
    name, _, _, outs = built
    _, checks = cases
    for probe in ("dot_u8s8", "dot_s8s8"):
        got = torch.from_numpy(outs[probe][0]).long().sum(-1)
        assert torch.equal(got, checks[probe]), f"{name} {probe}: rows {torch.nonzero(got != checks[probe]).tolist()}"


def test_activation_codes_and_scales_equal_the_reference(built, cases):
    """The codes and scales the reference kernel of ``wq_linear(act_bits=8)`` computes, bit for bit (round half to
    even on the ties of row 1, scale 1 on its zero block)."""
    name, _, _, outs = built
    _, checks = cases
    for ga, group, tokens in ACT_CASES:
        call = f"act_a{ga}_g{group}_t{tokens}"
        xs, _, _ = checks[call]
        qa, sa, _ = outs[call]
        ref_qa, ref_sa = quantize_activation_blocks(torch.from_numpy(xs), ga)
        assert np.array_equal(qa, ref_qa.to(torch.int8).numpy()), f"{name} {call}: codes"
        assert np.array_equal(sa.view(np.int32), ref_sa.numpy().view(np.int32)), f"{name} {call}: scales"


@pytest.mark.parametrize("form", ["gemv", "gemm"])
def test_integer_kernels_match_exact(built, cases, form):
    name, _, _, outs = built
    _, checks = cases
    calls = [f"{form}_int_b{b}_{sym}_a{ga}" for b, sym, _, ga in INT_CASES] + (["gemv_int_big"] if form == "gemv"
                                                                              else [])
    for call in calls:
        check_float_output(call, name, outs[call][0], checks[call])


@pytest.mark.parametrize("form", ["gemv", "gemm"])
def test_float_kernels_match_exact(built, cases, form):
    name, _, _, outs = built
    _, checks = cases
    calls = [f"{form}_float_b{b}_{sym}_g{g}" for b, sym, g in FLOAT_CASES] + (["gemv_float_big"] if form == "gemv"
                                                                             else [])
    for call in calls:
        check_float_output(call, name, outs[call][0], checks[call])


# -- layers the shared cases do not cover: odd chunk counts, the 512-bit kernels, float32 linears -----------------
#: (bits, sym, group, in_features) with 3 chunks of the layout (8-bit chunks are 32 features, 4-bit 64, 2-bit 128,
#: 3-bit 256)
ODD = [(8, True, 32, 96), (4, False, 64, 192), (2, True, 128, 384), (3, False, 128, 768)]
WIDE = [(b, sym, 128, ga) for b in (8, 4, 2) for sym in (True, False) for ga in (32, 128)]  # single-plane layouts
ROWS_ODD = 12  # three 4-row tiles


def _extra_functions(isa) -> dict:
    from llmpress.backends.tvm.kernels import fgemm
    from llmpress.backends.tvm.kernels.qgemm import gemm_float_func, gemm_int_func
    from llmpress.backends.tvm.kernels.qgemv import gemv_float_func, gemv_int_func
    from llmpress.backends.tvm.kernels.qlayout import QLayout
    from llmpress.backends.tvm.kernels.qwide import gemm_wide_func, gemv_wide_func, wide_applies

    f = {}
    for bits, sym, group, k in ODD:
        lay = QLayout(bits, sym, ROWS_ODD, k, group)
        f[f"odd_gemv_int_b{bits}"] = gemv_int_func(lay, isa, 32)
        f[f"odd_gemm_int_b{bits}"] = gemm_int_func(lay, isa, 32)
        f[f"odd_gemv_float_b{bits}"] = gemv_float_func(lay)
        f[f"odd_gemm_float_b{bits}"] = gemm_float_func(lay)
    if isa.name == "avx512vnni":
        for bits, sym, group, ga in WIDE:
            assert wide_applies(layout(bits, sym, group), isa)
            f[f"wide_gemv_b{bits}_{sym}_a{ga}"] = gemv_wide_func(layout(bits, sym, group), ga)
            f[f"wide_gemm_b{bits}_{sym}_a{ga}"] = gemm_wide_func(layout(bits, sym, group), ga)
        f["wide_gemv_big"] = gemv_wide_func(layout(4, True, 128, N_BIG), 32)
    for n, k in FLOAT32:
        f[f"f32_gemv_{n}x{k}"] = fgemm.gemv_func(n, k, isa)
        f[f"f32_gemm_{n}x{k}"] = fgemm.gemm_func(n, k, isa)
    return f


#: float32 linears (out, in): two tiles, a thread-pool GEMV, an odd chunk count, and a GEMM of 3 K blocks (the last
#: one chunk) over 100 tiles in blocks of 3 (the last block partial)
FLOAT32 = [(8, K), (N_BIG, K), (12, 40), (400, 2056)]


def _fgemm_repack(w: np.ndarray) -> np.ndarray:
    from tvm import te

    from llmpress.backends.tvm.kernels import fgemm

    ph = te.placeholder(w.shape, "float32", name="w")
    out = fgemm.repack_te(ph)
    lib = tvm.compile(tvm.IRModule({"main": te.create_prim_func([ph, out])}), tvm.target.Target("llvm"))
    dst = tvm.runtime.tensor(np.zeros([int(d) for d in out.shape], "float32"))
    lib["main"](tvm.runtime.tensor(w), dst)
    return dst.numpy()


@pytest.fixture(scope="module")
def extra_cases():
    x = activations()
    calls, checks = {}, {}
    g = torch.Generator().manual_seed(11)
    for bits, sym, group, k in ODD:
        from llmpress.backends.tvm.kernels.qlayout import QLayout

        lay = QLayout(bits, sym, ROWS_ODD, k, group)
        q, s, z = weights(bits, sym, group, ROWS_ODD, k)
        (w, sz), = repack([(lay, q, s, z)])
        c, zc = kernel_codes(bits, sym, q, z, group)
        xk = torch.randn(len(x), k, generator=g).numpy()
        for form, xs in (("gemv", xk[:1]), ("gemm", xk)):
            qa, sa, asum = act_inputs(xs, 32, group)
            calls[f"odd_{form}_int_b{bits}"] = Call(f"odd_{form}_int_b{bits}", [qa, sa, asum, w, sz],
                                                   [("float32", (len(xs), ROWS_ODD))])
            checks[f"odd_{form}_int_b{bits}"] = (k, exact_int(c, zc, s, qa, sa, asum, group, 32))
            calls[f"odd_{form}_float_b{bits}"] = Call(f"odd_{form}_float_b{bits}", [xs, w, sz],
                                                     [("float32", (len(xs), ROWS_ODD))])
            checks[f"odd_{form}_float_b{bits}"] = (k, exact_float(c, zc, s, xs, group))
    keys = [(b, sym, grp, 8) for b, sym, grp, _ in WIDE] + [(4, True, 128, N_BIG)]
    raw = {key: weights(*key[:3], key[3], K, seed=int(key[3] == N_BIG)) for key in keys}
    tiled = dict(zip(keys, repack([(layout(*key), *raw[key]) for key in keys])))
    for bits, sym, group, ga in WIDE:
        q, s, z = raw[bits, sym, group, 8]
        (w, sz), (c, zc) = tiled[bits, sym, group, 8], kernel_codes(bits, sym, q, z, group)
        for form, xs in (("gemv", x[1:2]), ("gemm", x)):
            qa, sa, asum = act_inputs(xs, ga, group)
            name = f"wide_{form}_b{bits}_{sym}_a{ga}"
            calls[name] = Call(name, [qa, sa, asum, w, sz], [("float32", (len(xs), 8))])
            checks[name] = (K, exact_int(c, zc, s, qa, sa, asum, group, ga))
    q, s, z = raw[4, True, 128, N_BIG]
    (w, sz), (c, zc) = tiled[4, True, 128, N_BIG], kernel_codes(4, True, q, z, 128)
    qa, sa, asum = act_inputs(x[:1], 32, 128)
    calls["wide_gemv_big"] = Call("wide_gemv_big", [qa, sa, asum, w, sz], [("float32", (1, N_BIG))])
    checks["wide_gemv_big"] = (K, exact_int(c, zc, s, qa, sa, asum, 128, 32))
    for n, k in FLOAT32:
        wf = torch.randn(n, k, generator=g).numpy()
        xk = torch.randn(len(x), k, generator=g).numpy() * np.float32(3.0)
        wt = _fgemm_repack(wf)
        for form, xs in (("gemv", xk[:1]), ("gemm", xk)):
            name = f"f32_{form}_{n}x{k}"
            calls[name] = Call(name, [xs, wt], [("float32", (len(xs), n))])
            x64, w64 = xs.astype(np.float64), wf.astype(np.float64)
            checks[name] = (k, (x64 @ w64.T, np.abs(x64) @ np.abs(w64).T))
    return calls, checks


@pytest.fixture(scope="module")
def extra_built(built, extra_cases):
    name, isa, _, _ = built
    calls, _ = extra_cases
    funcs = _extra_functions(isa)
    mod = tvm.IRModule({n: f.with_attr("global_symbol", n) for n, f in funcs.items()})
    ex = tvm.compile(mod, _spec(name).tvm_target())
    names = [n for n in calls if n in funcs]
    return name, isa, ex.mod.inspect_source("asm"), dict(zip(names, run_native(ex.jit(), [calls[n] for n in names])))


def test_odd_chunk_counts_match_exact(extra_built, extra_cases):
    """Layers of 3 chunks and 3 tiles: every chunk and every row counted once (integer and float forms). With up to
    768 random-signed terms an output is ~sqrt(k) terms while the bound grows as k * k terms: the signal guard asks
    100x the bound here (a dropped chunk moves an output by about a third of it)."""
    name, _, _, outs = extra_built
    _, checks = extra_cases
    for call in [c for c in outs if c.startswith("odd_")]:
        k, check = checks[call]
        check_float_output(call, name, outs[call][0], check, k=k, min_signal=1e2)


def test_wide_kernels_match_exact(extra_built, extra_cases):
    """The 512-bit VNNI GEMV and GEMM (5 tokens: a step of 4 and a partial one), row pairs in one register."""
    name, isa, asm, outs = extra_built
    if isa.name != "avx512vnni":
        pytest.skip(f"{name}: the 512-bit kernels are AVX-512 VNNI builds' own")
    assert re.search(r"\bvpdpbusd\s+%zmm", asm)
    _, checks = extra_cases
    calls = [c for c in outs if c.startswith("wide_")]
    assert len(calls) == 2 * len(WIDE) + 1
    for call in calls:
        k, check = checks[call]
        check_float_output(call, name, outs[call][0], check, k=k)


def test_float32_linears_match_exact(extra_built, extra_cases):
    """``fgemm.py``'s GEMV/GEMM over the 4-row tiles (its 512-bit row-pair GEMV on AVX-512) within
    ``gamma_{K+1} sum |x w|`` of ``x W^T`` (signal guard as in ``test_odd_chunk_counts_match_exact`` past 1,024
    features: a lost K block of 1,024 moves an output ~100x the bound there)."""
    name, _, _, outs = extra_built
    _, checks = extra_cases
    calls = [c for c in outs if c.startswith("f32_")]
    assert len(calls) == 2 * len(FLOAT32)
    for call in calls:
        k, check = checks[call]
        check_float_output(call, name, outs[call][0], check, k=k, min_signal=1e2 if k > 1024 else 1e3)
