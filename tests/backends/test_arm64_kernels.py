"""The quantized CPU kernels on aarch64 (``arm64``: NEON widening multiplies, ``arm64:dotprod``: ``sdot``), run under
``qemu-aarch64`` and compared with the x86-64 build (``cpu``: the AVX2 forms) and with exact references.

Kernel level: every kernel family (activation quantization, GEMV and GEMM in integer and float forms; bits 8/4/3/2,
symmetric and asymmetric, act_group 32 and 128, weight groups 32/128/256) is compiled into one library per target
and called on fixed inputs through ``kernel_harness.cc`` under qemu (``qemu_kernels.py`` explains the choice); the
x86 build of the same PrimFuncs runs natively on the same inputs. End to end: a random Llama sized for the presets
(every linear fits the kernel layout), compiled ``w4a16`` / ``w4a8`` for both Arm targets and run by the C++
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

from .kernel_cases import ACT_CASES, FLOAT_CASES, INT_CASES, build, check_float_output, make_cases, mnemonics
from .qemu_kernels import build_harness, export_aarch64, run_native, run_qemu
from .quant_reference import U64, gamma

tvm = pytest.importorskip("tvm")

pytestmark = pytest.mark.tvm

ARM = {"arm64": "neon", "arm64:dotprod": "neon-dotprod"}  # target -> the isa the kernels must use
X86 = "cpu"  # its base library (x86-64-v3): the AVX2 forms of the same kernels


@pytest.fixture(scope="module")
def cases():
    """Inputs of every call (the same for every build) and what each one's exact result is."""
    return make_cases()


@pytest.fixture(scope="module")
def x86(cases):
    calls, _ = cases
    _, ex = build(X86)
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
    isa, ex = build(request.param)
    lib = export_aarch64(ex, tmp_path_factory.mktemp(request.param.replace(":", "_")))
    names = list(calls)
    outs = run_qemu(harness, lib, [calls[n] for n in names])
    return request.param, isa, ex.mod.inspect_source("asm"), dict(zip(names, outs))


# -- kernel tests ---------------------------------------------------------------------------------------------------
def test_arm_targets_use_their_instruction_set(arm):
    """``arm64`` resolves to the widening-multiply forms, ``arm64:dotprod`` to ``sdot``: checked in the machine code
    that ran (so the comparisons below test the path they claim to)."""
    target, isa, asm, _ = arm
    assert (isa.name, isa.arch) == (ARM[target], "aarch64")
    ops = mnemonics(asm)
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
        check_float_output(name, target, outs[name][0], checks[name], x86[name][0])


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
        check_float_output(name, target, outs[name][0], checks[name], x86[name][0])


# -- end to end -----------------------------------------------------------------------------------------------------
PROMPT = [1, 17, 42, 99, 5]
NEW_TOKENS = 32


@pytest.fixture(scope="module")
def llama():
    """A random Llama whose every linear fits the kernel layout under the presets' group 128 (in 128 or 256)."""
    from llmpress.ir.capture import capture
    from tests.decoder import Llama, LlamaConfig

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, dim=128, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=256, max_seq_len=64)
    return capture(Llama(cfg).eval())


# pipeline -> the dispatched kernels each Arm library must hold (the symbol prefix, isa-tagged for integer forms).
# fp32 end to end under qemu is test_edge_runner.py's arm64 check (stories260K, 256 tokens); its kernels are checked
# here at kernel level, so this module spends its compile time on the quantized pipelines only.
E2E = {"w4a16": ("llmpress_gemv_float_b4", "llmpress_gemm_float_b4"),
       "w4a8": ("llmpress_gemv_int_{isa}_b4", "llmpress_gemm_int_{isa}_b4", "llmpress_act_quant")}


@pytest.mark.parametrize("pipeline", list(E2E))
def test_greedy_ids_under_qemu_equal_x86_and_reference(arm_runner, llama, tmp_path, pipeline):
    """The C++ runner under qemu-aarch64 generates, for both Arm targets, the greedy ids of the x86 ``cpu`` build
    and of the reference backend (prompt + 32 tokens); the Arm libraries hold the dispatched quantized kernels of
    their instruction set (so the quantized layers ran through them, not through the generic kernel)."""
    import llmpress

    ref = llmpress.compile(llama.clone(), pipeline=pipeline, target="reference", progress=False).generate_ids(
        PROMPT, NEW_TOKENS)
    assert len(ref) == len(PROMPT) + NEW_TOKENS
    x86_ids = llmpress.compile(llama.clone(), pipeline=pipeline, target=X86, progress=False).generate_ids(PROMPT, NEW_TOKENS)
    assert x86_ids == ref
    for target, isa in ARM.items():
        folder = tmp_path / target.replace(":", "_")
        llmpress.compile(llama.clone(), pipeline=pipeline, target=target, progress=False).save(folder)
        lib = (folder / "model.so").read_bytes()
        for prefix in E2E[pipeline]:
            assert prefix.format(isa=isa.replace("-", "")).encode() in lib, f"{target} {pipeline}: no {prefix}"
        assert emulate.generate_ids(folder, PROMPT, max_new_tokens=NEW_TOKENS) == ref, f"{target} {pipeline}"

