"""The CPU instruction set a build targets, resolved once from the TVM target, and the integer dot products the
quantized kernels are written with.

Every quantized CPU kernel (``kernels/qgemv.py``, ``kernels/qgemm.py``) works on *chunks* of 32 weights of one
output row: a ``uint8x32`` / ``int8x32`` vector of weight codes against an ``int8x32`` vector of activation codes,
accumulated into an ``int32x8`` vector whose 8 lanes are summed at the end (which lane holds which partial sum
differs between instruction sets and does not matter). The chunk is one AVX2 register; on NEON it is two, and LLVM
splits the wider vector types. What differs per instruction set is only the dot product:

=================  =========================================================  ==================================
isa                ``dot_u8s8(acc, w, a)``: w in [0, 127], a in [-127, 127]     features (LLVM names)
=================  =========================================================  ==================================
``avx2``           ``vpmaddwd(vpmaddubsw(w, a), 1)`` + acc (no saturation:      avx2
                   two products <= 2 * 127 * 127 < 2^15)
``avxvnni``        ``vpdpbusd(acc, w, a)`` (VEX-256)                           avxvnni
``avx512vnni``     ``vpdpbusd`` (EVEX-256 here; ``qwide.py`` uses 512 bits)    avx512vnni + avx512vl + avx512bw
``neon-dotprod``   ``sdot`` on each 16-byte half (w is non-negative, so it is   neon + dotprod
                   a valid signed byte)
``neon`` / other   widening multiply, pairwise adds (LLVM: ``smull``/``saddl``   neon, or anything else LLVM targets
                   on NEON, ``vpmovsx``/``vpmullw`` on x86)
=================  =========================================================  ==================================

``dot_s8s8`` (8-bit weights, any sign): ``vpmaddubsw(|w|, sign(a, w))`` on AVX2/VNNI (|w| <= 128 as an unsigned
byte, ``sign(a, w)`` in [-127, 127], so again no saturation), ``sdot`` directly on NEON, widening elsewhere.

On AVX-512 VNNI machines the single-plane integer kernels use 512-bit registers (``kernels/qwide.py``: two rows
per register); the other kernels keep these 256-bit forms.

The NEON forms are checked for correctness under ``qemu-aarch64`` (``tests/backends/test_arm64_kernels.py``: exact
integer dot products and activation codes, float outputs within their fp32 bound of x86's). Their speed has not
been measured: emulation says nothing about it; it needs a real Arm CPU.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["CpuIsa", "cpu_isa"]


@dataclass(frozen=True)
class CpuIsa:
    """One CPU instruction-set choice for the quantized kernels (see the module docstring)."""

    name: str  # "avx2" | "avxvnni" | "avx512vnni" | "neon-dotprod" | "neon" | "generic"
    arch: str  # "x86_64" | "aarch64" | other

    def i16_run(self, max_code: int) -> int:
        """How many ``vpmaddubsw`` results (weight codes <= ``max_code``, activations in [-127, 127]) may be summed in
        int16 lanes before widening to int32 (each is at most ``2 * max_code * 127``): 8 for 4-bit codes, 0 where
        the instruction set accumulates in int32 directly (VNNI, NEON) or codes are 8-bit."""
        if self.name != "avx2" or max_code > 127:
            return 0
        return 32767 // (2 * max_code * 127)

    def madd_u8s8_i16(self, acc16: Any, w: Any, a: Any) -> Any:
        """``acc16 (int16x16) + vpmaddubsw(w, a)``: pairs of products in int16 (AVX2; see ``i16_run``)."""
        from tvm import tirx

        return acc16 + tirx.call_llvm_pure_intrin("int16x16", "llvm.x86.avx2.pmadd.ub.sw", w, a)

    @staticmethod
    def widen_i16(acc16: Any) -> Any:
        """int16x16 partial sums -> int32x8 (``vpmaddwd`` by 1)."""
        return _pmaddwd1(acc16)

    @property
    def has_int8_dot(self) -> bool:
        """Whether int8 dot products are native (not emulated by widening): what makes ``act_bits=8`` fast."""
        return self.name in ("avx2", "avxvnni", "avx512vnni", "neon-dotprod")

    def dot_u8s8(self, acc: Any, w: Any, a: Any) -> Any:
        """``acc (int32x8) + partial sums of w (uint8x32, values <= 127) * a (int8x32)``."""
        from tvm import tirx

        if self.name in ("avxvnni", "avx512vnni"):
            return tirx.call_llvm_pure_intrin("int32x8", "llvm.x86.avx512.vpdpbusd.256", acc, w, a)
        if self.name == "avx2":
            return acc + _pmaddwd1(tirx.call_llvm_pure_intrin("int16x16", "llvm.x86.avx2.pmadd.ub.sw", w, a))
        if self.name == "neon-dotprod":
            return _sdot(acc, tirx.reinterpret("int8x32", w), a)
        return _widening_dot(acc, w, a)

    def dot_s8s8(self, acc: Any, w: Any, a: Any) -> Any:
        """``acc (int32x8) + partial sums of w (int8x32, any value) * a (int8x32, in [-127, 127])``."""
        from tvm import tirx

        if self.name in ("avx2", "avxvnni", "avx512vnni"):
            absw = tirx.reinterpret("uint8x32", tirx.call_llvm_pure_intrin("int8x32", "llvm.abs", w,
                                                                           tirx.const(0, "bool")))
            signed_a = tirx.call_llvm_pure_intrin("int8x32", "llvm.x86.avx2.psign.b", a, w)
            return self.dot_u8s8(acc, absw, signed_a)
        if self.name == "neon-dotprod":
            return _sdot(acc, w, a)
        return _widening_dot(acc, w, a)


def _pmaddwd1(p16: Any) -> Any:
    from tvm import tirx

    ones = tirx.Broadcast(tirx.const(1, "int16"), 16)
    return tirx.call_llvm_pure_intrin("int32x8", "llvm.x86.avx2.pmadd.wd", p16, ones)


def _sdot(acc: Any, w: Any, a: Any) -> Any:
    """``acc (int32x8) + sdot`` of ``w``, ``a`` (``int8x32``): one ``sdot`` per 16-byte half; lane ``i`` of the
    result adds bytes ``4i .. 4i + 3`` (the lanes ``vpmaddubsw`` + ``vpmaddwd`` fill on AVX2)."""
    from tvm import tirx

    # The halves' types are spelled out: TVM 0.27 buffer loads (``TensorLoad``) have no ``.dtype`` to read.
    def sdot(part):
        return tirx.call_llvm_pure_intrin("int32x4", "llvm.aarch64.neon.sdot", part("int32x4", acc),
                                          part("int8x16", w), part("int8x16", a))

    return tirx.vectorcombine("int32x8", sdot(tirx.vectorlow), sdot(tirx.vectorhigh))


def _widening_dot(acc: Any, w: Any, a: Any) -> Any:
    """Portable form: int16 products (|w * a| <= 128 * 127 fits), then 32 -> 16 -> 8 lanes in int32."""
    from tvm import tirx

    p = tirx.Cast("int16x32", w) * tirx.Cast("int16x32", a)
    s = tirx.Cast("int32x16", tirx.vectorlow("int16x16", p)) + tirx.Cast("int32x16", tirx.vectorhigh("int16x16", p))
    return acc + tirx.vectorlow("int32x8", s) + tirx.vectorhigh("int32x8", s)


def cpu_isa(target: Any) -> CpuIsa:
    """The instruction set the quantized kernels use for an LLVM ``target`` (a ``tvm.target.Target`` or dict)."""
    import tvm
    from tvm.target.codegen import llvm_get_cpu_features

    t = target if isinstance(target, tvm.target.Target) else tvm.target.Target(target)
    feats = {str(f) for f in llvm_get_cpu_features(t)}
    triple = str(t.attrs.get("mtriple", "") or "")
    if "neon" in feats or triple.startswith("aarch64"):
        return CpuIsa("neon-dotprod" if "dotprod" in feats else "neon", "aarch64")
    if {"avx512vnni", "avx512vl", "avx512bw"} <= feats:
        return CpuIsa("avx512vnni", "x86_64")
    if "avxvnni" in feats:
        return CpuIsa("avxvnni", "x86_64")
    if "avx2" in feats:
        return CpuIsa("avx2", "x86_64")
    return CpuIsa("generic", "x86_64" if "sse2" in feats else "other")
