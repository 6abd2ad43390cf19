"""The quantized CPU kernels on aarch64 (``arm64``: NEON widening multiplies, ``arm64:dotprod``: ``sdot``), run under
``qemu-aarch64`` and compared with the x86-64 build (``cpu``: the AVX2 forms) and with exact references.

Kernel level: every kernel family (activation quantization, GEMV and GEMM in integer and float forms; bits 8/4/3/2,
symmetric and asymmetric, act_group 32 and 128, weight groups 32/128/256) is compiled into one library per target
and called on fixed inputs through ``kernel_harness.cc`` under qemu (``qemu_kernels.py`` explains the choice); the
x86 build of the same PrimFuncs runs natively on the same inputs. End to end: a random Llama sized for the presets
(every linear fits the kernel layout), compiled fp32 / ``w4a16`` / ``w4a8`` for both Arm targets and run by the C++
edge runner under qemu, greedy-generates the ids of the x86 ``cpu`` build (whichever of its libraries this host
runs) and of the reference backend.

What is asserted, and why these tolerances:

- integer dot products (``isa.dot_u8s8`` / ``dot_s8s8``) and the int8 activation codes: bit-identical to x86 and to
  the exact integers / the reference quantizer. Integer arithmetic has no rounding; the codes come from
  ``max``, one IEEE division and round-half-even, which every target computes identically.
- activation scales ``sa``: bit-identical (``max |x| / 127``: one correctly rounded division, no multiply-add to
  fuse). The block sums ``asum`` (float sums of products) follow the float rule below.
- float results (every GEMV/GEMM output, ``asum``): TVM lets LLVM fuse multiply-adds (``fmla`` on NEON, ``vfmadd``
  on x86, chosen per target), so builds may round differently. Each output is a sum of products whose exact value
  ``y`` we compute in float64 from the same inputs; for any evaluation order, with or without fused multiply-adds,
  ``|computed - y| <= gamma_n * S`` where ``S`` sums the absolute values of every product term (weights by codes:
  ``s * sa * |c * qa|``, the zero-point terms ``s * |z| * |asum|`` or ``s * |z| * |x|``) and ``n`` bounds the
  roundings on any term's path (Higham, Accuracy and Stability, 3.1; gamma_n = n u / (1 - n u), u = 2^-24). A
  term meets at most one lane chain (K/8 additions in the GEMM float form, G/8 or K/32 elsewhere), two additions
  per group (its block sum and the zero-point subtraction, 2 K/G), the 8-lane trees of the result and of
  ``xsum`` (6) and up to 4 products and 2 subtractions: at most K/8 + 2 K/G + 12 = 60 roundings for K = 256
  and G >= 32. We use ``n = K + 1`` (a 4x margin over that count; the bound is then ~1.5e-5 of ``S``). The aarch64
  output is asserted within that bound of ``y`` (plus the float64 evaluation's own error, 2^-29 times smaller)
  and within twice it of the x86 output. A wrong lane, chunk, plane or zero point is off by a sizeable fraction
  of ``S``.

Speed is not measured: qemu translates every instruction, so emulated timings say nothing about an Arm CPU.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from llmpress.backends.tvm import emulate
from llmpress.ir.ops.wq_linear import quantize_activation_blocks

from .qemu_kernels import Call, build_harness, export_aarch64, run_native, run_qemu
from .quant_reference import (U64, act_inputs, exact_float, exact_int, gamma, kernel_codes, repack,
                              weights)

tvm = pytest.importorskip("tvm")

pytestmark = pytest.mark.tvm

ARM = {"arm64": "neon", "arm64:dotprod": "neon-dotprod"}  # target -> the isa the kernels must use
X86 = "cpu"  # its base library (x86-64-v3): the AVX2 forms of the same kernels
K, N, M = 256, 8, 5  # in, out (two tiles of 4 rows), tokens for the GEMM (odd: the last token pair is partial)
N_BIG = 4096  # a GEMV past PARALLEL_MIN_MACS: its tiles run on the thread pool
P = 64  # rows of the dot-product probes

INT_CASES = [(b, sym, 128, ga) for b in (8, 4, 3, 2) for sym in (True, False) for ga in (32, 128)]
FLOAT_CASES = [(b, sym, g) for b in (8, 4, 3, 2) for sym in (True, False) for g in (32, 128)]
ACT_CASES = [(32, 128, 1), (32, 128, None), (128, 128, 1), (128, 128, None), (128, 256, None)]  # (GA, G, tokens)


# -- inputs ---------------------------------------------------------------------------------------------------------
def _activations() -> np.ndarray:
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
def _dot_probe(isa, signed: bool):
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


def _layout(bits, sym, group, out_f=N):
    from llmpress.backends.tvm.kernels.qlayout import QLayout

    return QLayout(bits, sym, out_f, K, group)


def _functions(isa) -> dict:
    """Every kernel under test for instruction set ``isa``, by name."""
    from llmpress.backends.tvm.kernels.qact import act_quant_func
    from llmpress.backends.tvm.kernels.qgemm import gemm_float_func, gemm_int_func
    from llmpress.backends.tvm.kernels.qgemv import gemv_float_func, gemv_int_func

    f = {"dot_u8s8": _dot_probe(isa, False), "dot_s8s8": _dot_probe(isa, True)}
    for ga, group, tokens in ACT_CASES:
        f[f"act_a{ga}_g{group}_t{tokens}"] = act_quant_func(K, ga, group, tokens=tokens)
    for bits, sym, group, ga in INT_CASES:
        f[f"gemv_int_b{bits}_{sym}_a{ga}"] = gemv_int_func(_layout(bits, sym, group), isa, ga)
        f[f"gemm_int_b{bits}_{sym}_a{ga}"] = gemm_int_func(_layout(bits, sym, group), isa, ga)
    for bits, sym, group in FLOAT_CASES:
        f[f"gemv_float_b{bits}_{sym}_g{group}"] = gemv_float_func(_layout(bits, sym, group))
        f[f"gemm_float_b{bits}_{sym}_g{group}"] = gemm_float_func(_layout(bits, sym, group))
    f["gemv_int_big"] = gemv_int_func(_layout(4, True, 128, N_BIG), isa, 32)
    f["gemv_float_big"] = gemv_float_func(_layout(4, False, 128, N_BIG))
    return f


def _build(target: str):
    from llmpress.backends.tvm.isa import cpu_isa
    from llmpress.backends.tvm.targets import resolve_target

    tgt = resolve_target(target).tvm_target()
    isa = cpu_isa(tgt)
    funcs = _functions(isa)
    mod = tvm.IRModule({name: func.with_attr("global_symbol", name) for name, func in funcs.items()})
    return isa, tvm.compile(mod, tgt)


# -- the calls and their expected values ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cases():
    """Inputs of every call (the same for every build) and what each one's exact result is."""
    x = _activations()
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
    tiled = dict(zip(keys, repack([(_layout(*key), *raw[key]) for key in keys])))

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


@pytest.fixture(scope="module")
def x86(cases):
    calls, _ = cases
    _, ex = _build(X86)
    names = list(calls)
    return dict(zip(names, run_native(ex.jit(), [calls[n] for n in names])))


@pytest.fixture(scope="module")
def arm_runner():
    """The aarch64 edge runner, cross-built (it also lays out ``build/tvm-aarch64``, which the harness links)."""
    if emulate.host_arch() != "x86_64":
        pytest.skip("these checks cross-run aarch64 from an x86-64 host; this host is " + emulate.host_arch())
    missing = emulate.missing_tools("aarch64")
    if missing:
        pytest.skip(f"aarch64 code cannot be run here: missing {', '.join(missing)} (.ci/install-cross.sh)")
    return emulate.build_runner("aarch64")


@pytest.fixture(scope="module")
def harness(arm_runner):
    return build_harness()


@pytest.fixture(scope="module", params=list(ARM))
def arm(request, harness, cases, tmp_path_factory):
    """``(target, isa, assembly, outputs by call name)``: the kernel library built for one Arm target, every call
    run in one qemu process."""
    calls, _ = cases
    isa, ex = _build(request.param)
    lib = export_aarch64(ex, tmp_path_factory.mktemp(request.param.replace(":", "_")))
    names = list(calls)
    outs = run_qemu(harness, lib, [calls[n] for n in names])
    return request.param, isa, ex.mod.inspect_source("asm"), dict(zip(names, outs))


# -- kernel tests ---------------------------------------------------------------------------------------------------
def _mnemonics(asm: str) -> set[str]:
    return {line.split()[0] for line in asm.splitlines() if line.startswith("\t") and line.split()}


def test_arm_targets_use_their_instruction_set(arm):
    """``arm64`` resolves to the widening-multiply forms, ``arm64:dotprod`` to ``sdot``: checked in the machine code
    that ran (so the comparisons below test the path they claim to)."""
    target, isa, asm, _ = arm
    assert (isa.name, isa.arch) == (ARM[target], "aarch64")
    ops = _mnemonics(asm)
    if isa.name == "neon-dotprod":
        assert "sdot" in ops
    else:
        assert "sdot" not in ops and {"smull", "smull2"} <= ops, sorted(ops)


def test_integer_dot_products_are_exact(arm, x86, cases):
    """The 8 int32 lanes of ``dot(acc, w, a)`` sum to ``sum(acc) + sum(w * a)`` exactly, including rows where every
    product has the largest magnitude; the lane sums equal x86's bit for bit (which lane holds which partial sum
    is each instruction set's own choice and is not compared)."""
    target, _, _, outs = arm
    _, checks = cases
    for name in ("dot_u8s8", "dot_s8s8"):
        got = torch.from_numpy(outs[name][0]).long().sum(-1)
        assert torch.equal(got, checks[name]), f"{target} {name}: rows {torch.nonzero(got != checks[name]).tolist()}"
        assert torch.equal(got, torch.from_numpy(x86[name][0]).long().sum(-1)), f"{target} {name} vs x86"


def test_activation_quantization_is_bit_identical(arm, x86, cases):
    """Codes and scales bit-identical to x86's and to the reference quantizer (round half to even on the ties of
    row 1, scale 1 on its zero block); ``asum`` within the float32 bound of its exact value (module docstring,
    ``n = BPG + 1``: one product rounding per block, ``BPG - 1`` additions)."""
    target, _, _, outs = arm
    _, checks = cases
    for ga, group, tokens in ACT_CASES:
        name = f"act_a{ga}_g{group}_t{tokens}"
        xs, _, _ = checks[name]
        qa, sa, asum = outs[name]
        ref_qa, ref_sa = quantize_activation_blocks(torch.from_numpy(xs), ga)
        assert np.array_equal(qa, ref_qa.to(torch.int8).numpy()), f"{target} {name}: codes differ from the reference"
        assert np.array_equal(qa, x86[name][0]), f"{target} {name}: codes differ from x86"
        assert np.array_equal(sa.view(np.int32), ref_sa.numpy().view(np.int32)), f"{target} {name}: scales"
        assert np.array_equal(sa.view(np.int32), x86[name][1].view(np.int32)), f"{target} {name}: scales vs x86"
        if tokens == 1:  # the input really has ties and a zero block
            assert np.any(np.abs(xs / np.repeat(sa, ga, axis=1)) % 1 == 0.5) and np.any(sa == 1.0)
        bpg = group // ga
        blocks = (qa.astype(np.float64).reshape(len(xs), -1, ga).sum(-1) * sa).reshape(len(xs), -1, bpg)
        exact = blocks.sum(-1)
        bound = (gamma(bpg + 1) + gamma(bpg + 1, U64)) * np.abs(blocks).sum(-1)
        assert np.all(np.abs(asum - exact) <= bound), f"{target} {name}: asum"
        assert np.all(np.abs(asum - x86[name][2]) <= 2 * bound), f"{target} {name}: asum vs x86"


def _check_float_output(name: str, target: str, got: np.ndarray, x86_out: np.ndarray, check) -> None:
    exact, big_s = check
    bound = (gamma(K + 1) + gamma(K + 1, U64)) * big_s
    err = np.abs(got.astype(np.float64) - exact)
    assert np.all(err <= bound), f"{target} {name}: max err {err.max():.3g} (bound {bound[err > bound].min():.3g})"
    assert np.all(np.abs(got.astype(np.float64) - x86_out) <= 2 * bound), f"{target} {name}: differs from x86"
    assert np.abs(exact).max() > 1e3 * bound.max(), f"{name}: the case computes too little to test anything"


@pytest.mark.parametrize("form", ["gemv", "gemm"])
def test_integer_kernels_match_exact_and_x86(arm, x86, cases, form):
    """GEMV (one token) and GEMM (5 tokens: two pairs and a partial one) of int8 activations with 8/4/3/2-bit
    weights, symmetric and asymmetric, act_group 32 and 128 (weight group 128), and a 4096-row GEMV whose tiles
    run on the thread pool: within gamma_{K+1} S of the exact float64 value, 2 gamma_{K+1} S of x86."""
    target, _, _, outs = arm
    _, checks = cases
    names = [f"{form}_int_b{b}_{sym}_a{ga}" for b, sym, _, ga in INT_CASES] + (["gemv_int_big"] if form == "gemv"
                                                                              else [])
    for name in names:
        _check_float_output(name, target, outs[name][0], x86[name][0], checks[name])


@pytest.mark.parametrize("form", ["gemv", "gemm"])
def test_float_kernels_match_exact_and_x86(arm, x86, cases, form):
    """GEMV and GEMM of float32 activations with 8/4/3/2-bit weights, symmetric and asymmetric, groups 32 and 128
    (both step orders of the GEMV: a group of whole chunks, and 3-bit's 256-feature chunk split by 128-groups):
    within gamma_{K+1} S of the exact float64 value, 2 gamma_{K+1} S of x86."""
    target, _, _, outs = arm
    _, checks = cases
    names = [f"{form}_float_b{b}_{sym}_g{g}" for b, sym, g in FLOAT_CASES] + (["gemv_float_big"] if form == "gemv"
                                                                             else [])
    for name in names:
        _check_float_output(name, target, outs[name][0], x86[name][0], checks[name])


# -- end to end -----------------------------------------------------------------------------------------------------
PROMPT = [1, 17, 42, 99, 5]
NEW_TOKENS = 32


@pytest.fixture(scope="module")
def llama():
    """A random Llama whose every linear fits the kernel layout under the presets' group 128 (in 128 or 256)."""
    from llmpress.ir.capture import capture
    from llmpress.models import Llama, LlamaConfig

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, dim=128, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=256, max_seq_len=64)
    return capture(Llama(cfg).eval())


# pipeline -> the dispatched kernels each Arm library must hold (the symbol prefix, isa-tagged for integer forms)
E2E = {"": (), "w4a16": ("llmpress_gemv_float_b4", "llmpress_gemm_float_b4"),
       "w4a8": ("llmpress_gemv_int_{isa}_b4", "llmpress_gemm_int_{isa}_b4", "llmpress_act_quant")}


@pytest.mark.parametrize("pipeline", list(E2E), ids=["fp32", "w4a16", "w4a8"])
def test_greedy_ids_under_qemu_equal_x86_and_reference(arm_runner, llama, tmp_path, pipeline):
    """The C++ runner under qemu-aarch64 generates, for both Arm targets, the greedy ids of the x86 ``cpu`` build
    and of the reference backend (prompt + 32 tokens); the Arm libraries hold the dispatched quantized kernels of
    their instruction set (so the quantized layers ran through them, not through the generic kernel)."""
    import llmpress

    ref = llmpress.compile(llama, pipeline=pipeline, target="reference", progress=False).generate_ids(
        PROMPT, NEW_TOKENS)
    assert len(ref) == len(PROMPT) + NEW_TOKENS
    x86_ids = llmpress.compile(llama, pipeline=pipeline, target=X86, progress=False).generate_ids(PROMPT, NEW_TOKENS)
    assert x86_ids == ref
    for target, isa in ARM.items():
        folder = tmp_path / target.replace(":", "_")
        llmpress.compile(llama, pipeline=pipeline, target=target, progress=False).save(folder)
        lib = (folder / "model.so").read_bytes()
        for prefix in E2E[pipeline]:
            assert prefix.format(isa=isa.replace("-", "")).encode() in lib, f"{target} {pipeline}: no {prefix}"
        if not pipeline:
            assert b"llmpress_gemv_" not in lib
        assert emulate.generate_ids(folder, PROMPT, max_new_tokens=NEW_TOKENS) == ref, f"{target} {pipeline}"

