"""The weight layout the quantized CPU kernels read (``qgemv.py``, ``qgemm.py``), and the repack into it.

``llmpress::wq_linear`` stores its codes row-major, packed along the input dimension (``ir/ops/wq_linear.py``).
The CPU kernels want something else: every 32-byte load must give 32 weights of one output row ready for a
byte-wise integer dot product, and one thread should stream its rows' weights from contiguous memory. The TVM
backend repacks at compile time (the repack is a ``call_tir`` on the weight parameters, lifted into
``transform_params`` and evaluated on the build machine, ``params.py``): an artifact stores this layout and loads
with no work.

Layout, for ``R`` output rows per tile (``ROWS``) and ``b``-bit codes:

- The codes are split into *planes* of 8, 4, 2 or 1 bits (``PLANES``): 8-bit codes are one 8-bit plane, 4-bit one
  4-bit plane, 2-bit one 2-bit plane, 3-bit a 2-bit plane (bits 0-1) plus a 1-bit plane (bit 2). A plane of ``p``
  bits holds ``P = 8 / p`` values per byte, so one 32-byte run of it covers ``32 P`` features.
- Within a run, bits ``i*p .. i*p + p - 1`` of byte ``j`` hold (those bits of) the code of feature
  ``32 i + j`` of the run: ``(run >> i*p) & (2^p - 1)`` of one 32-byte load is the plane's part of 32 consecutive
  features, one per byte, in order. The activations therefore stay in their natural order.
- ``w``: ``[out / R, in / CH, R, BYTES]``: tile ``t``, chunk ``c`` of ``CH`` features (the largest run of the
  planes: 32 for 8-bit, 64 for 4-bit, 128 for 2-bit, 256 for 3-bit), row ``r`` of the tile (output row
  ``R t + r``), then the chunk's runs of every plane, plane after plane (``BYTES`` = 32, except 96 for 3-bit: two
  runs of the 2-bit plane, then one of the 1-bit plane). A thread streams its tiles' weights from contiguous
  memory.
- 8-bit codes are stored signed (``int8``): ``q`` itself when symmetric, ``c - 128`` when asymmetric (the zero point
  then becomes ``z - 128``), so the kernels use a signed byte dot product. Codes of fewer bits are unsigned
  ``c = q + 2^(b-1)`` (symmetric) or ``c = q`` (asymmetric), as in the op's storage.
- ``sz``: ``float32 [out / R, in / group, R, 1]`` holding ``s[R t + r, g]``, or ``[..., 2]`` with the zero point
  (float32) second when asymmetric. Symmetric weights have the constant zero point ``ZERO_SYM[b]``: the kernels
  compute with the unsigned codes and subtract ``z * s * sum(activations)`` once per group.

Conditions (``why_not``): ``in`` a multiple of ``CH``, ``group`` a multiple of 32 (a 32-feature run never spans
two groups), ``out`` a multiple of ``R``. Layers that miss one keep the generic kernel (``wq_linear.py``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["Plane", "PLANES", "ROWS", "ZERO_SYM", "QLayout", "why_not", "repack_te", "codes", "codes8"]

#: Output rows per tile: one activation load serves R rows (GEMV), and R rows x 2 tokens of int32 accumulators fit
#: the 16 AVX2 registers (GEMM).
ROWS = 4


@dataclass(frozen=True)
class Plane:
    bits: int  # bits of the code this plane holds
    shift: int  # their position in the code

    @property
    def per_byte(self) -> int:
        return 8 // self.bits

    @property
    def run(self) -> int:
        """Input features one 32-byte run of this plane covers."""
        return 32 * self.per_byte


PLANES: dict[int, tuple[Plane, ...]] = {
    8: (Plane(8, 0),),
    4: (Plane(4, 0),),
    3: (Plane(2, 0), Plane(1, 2)),
    2: (Plane(2, 0),),
}

#: The zero point of symmetric codes (``c = q + 2^(b-1)``); 8-bit symmetric codes are stored signed (zero point 0).
ZERO_SYM = {8: 0, 4: 8, 3: 4, 2: 2}


@dataclass(frozen=True)
class QLayout:
    """A quantized weight ``[out, in]`` in the kernel layout: ``bits``, symmetric or not, ``group``."""

    bits: int
    sym: bool
    out_features: int
    in_features: int
    group: int
    rows: int = ROWS

    @property
    def planes(self) -> tuple[Plane, ...]:
        return PLANES[self.bits]

    @property
    def signed(self) -> bool:
        """8-bit codes are stored as signed bytes (see the module docstring)."""
        return self.bits == 8

    @property
    def dtype(self) -> str:
        return "int8" if self.signed else "uint8"

    @property
    def chunk(self) -> int:
        """``CH``: input features per chunk (the largest plane run)."""
        return max(p.run for p in self.planes)

    def plane_offset(self, index: int) -> int:
        """Byte offset of plane ``index``'s runs within a chunk row."""
        return sum(32 * self.chunk // p.run for p in self.planes[:index])

    @property
    def chunk_bytes(self) -> int:
        return self.plane_offset(len(self.planes))

    @property
    def tiles(self) -> int:
        return self.out_features // self.rows

    @property
    def groups(self) -> int:
        return self.in_features // self.group

    @property
    def w_shape(self) -> tuple[int, int, int, int]:
        return (self.tiles, self.in_features // self.chunk, self.rows, self.chunk_bytes)

    @property
    def sz_shape(self) -> tuple[int, int, int, int]:
        return (self.tiles, self.groups, self.rows, 1 if self.sym else 2)

    @property
    def zero(self) -> int | None:
        """The constant zero point of the stored codes (None: per group, in ``sz``)."""
        return ZERO_SYM[self.bits] if self.sym else None


def why_not(bits: int, out_features: int, in_features: int, group: int, rows: int = ROWS) -> str | None:
    """Why a layer cannot use the kernel layout (None when it can)."""
    if bits not in PLANES:
        return f"{bits}-bit codes have no kernel layout"
    chunk = max(p.run for p in PLANES[bits])
    if in_features % chunk:
        return f"in_features {in_features} is not a multiple of {chunk} ({bits}-bit chunks)"
    if group % 32:
        return f"group {group} is not a multiple of 32"
    if out_features % rows:
        return f"out_features {out_features} is not a multiple of {rows}"
    return None


def repack_te(layout: QLayout, qweight: Any, scales: Any, zeros: Any = None, *, swiglu: bool = False) -> list:
    """TE computes ``[w, sz]`` of the kernel layout from TE placeholders in the op's storage layout; with
    ``swiglu`` (a fused gate/up weight) tile ``t`` row ``r`` holds weight row ``epilogue.source_row(t, r)``."""
    from tvm import te, tirx

    from .epilogue import source_row
    from .wq_linear import _code

    R, bits, CH = layout.rows, layout.bits, layout.chunk
    bounds = [(layout.plane_offset(i), layout.plane_offset(i + 1), p) for i, p in enumerate(layout.planes)]

    def row(t, r):
        return source_row(t, r, R, layout.out_features // 2) if swiglu else t * R + r

    def byte(t, c, r, j):
        o = row(t, r)
        if layout.signed:  # 8-bit: the signed code (asymmetric: c - 128, the zero point moves with it)
            code = _code(qweight, o, c * CH + j, 8)
            return (code if layout.sym else code - 128).astype("int8")
        value = tirx.const(0, "int32")
        for lo, _, plane in bounds:  # byte j belongs to the last plane starting at or before it
            run = (j - lo) // 32
            word = tirx.const(0, "int32")
            for i in range(plane.per_byte):
                k = c * CH + run * plane.run + i * 32 + (j - lo) % 32
                part = (_code(qweight, o, tirx.min(k, layout.in_features - 1), bits) >> plane.shift) & (
                    (1 << plane.bits) - 1)
                word = word | (part << (i * plane.bits))
            value = word if lo == 0 else tirx.Select(j >= lo, word, value)
        return value.astype("uint8")

    w = te.compute(layout.w_shape, byte, name="w_tiled")

    def sz(t, g, r, e):
        s = scales[row(t, r), g].astype("float32")
        if layout.sym:
            return s
        z = zeros[row(t, r), g].astype("float32") - tirx.const(128.0 if layout.signed else 0.0, "float32")
        return tirx.Select(e == 0, s, z)

    return [w, te.compute(layout.sz_shape, sz, name="sz_tiled")]


def codes(layout: QLayout, w: Any, t: Any, k0: Any, r: Any) -> Any:
    """The codes of the 32 features ``k0 .. k0 + 31`` (``k0`` a multiple of 32) of row ``r`` of tile ``t``, as a
    ``uint8x32`` expression (``int8x32`` for 8-bit codes) read from the ``w`` buffer (TIR)."""
    from tvm import tirx

    CH = layout.chunk
    c, within = k0 // CH, k0 % CH
    if layout.signed:
        return w.vload([t, c, r, within], "int8x32")
    code = None
    for index, plane in enumerate(layout.planes):
        offset = layout.plane_offset(index) + 32 * (within // plane.run)
        v = w.vload([t, c, r, offset], "uint8x32")
        if plane.per_byte > 1:
            i = (within // 32) % plane.per_byte
            v = v >> tirx.Broadcast((i * plane.bits).astype("uint8"), 32)
            v = v & tirx.Broadcast(tirx.const((1 << plane.bits) - 1, "uint8"), 32)
        if plane.shift:
            v = v << tirx.Broadcast(tirx.const(plane.shift, "uint8"), 32)
        code = v if code is None else code | v
    return code


def codes8(layout: QLayout, w: Any, t: Any, k0: Any, r: Any) -> Any:
    """The codes of the 8 features ``k0 .. k0 + 7`` (``k0`` a multiple of 8) as ``int32x8`` (signed for 8-bit
    codes): each plane's 8 bytes are loaded and widened in one instruction (``vpmovzxbd``/``vpmovsxbd`` with a
    memory operand on x86, ``ushll``/``sshll`` pairs on NEON), then shifted and masked in 32-bit lanes."""
    from tvm import tirx

    CH = layout.chunk
    c, within = k0 // CH, k0 % CH
    if layout.signed:
        return tirx.Cast("int32x8", w.vload([t, c, r, within], "int8x8"))
    code = None
    for index, plane in enumerate(layout.planes):
        offset = layout.plane_offset(index) + 32 * (within // plane.run) + within % 32
        v = tirx.Cast("int32x8", w.vload([t, c, r, offset], "uint8x8"))
        if plane.per_byte > 1:
            i = (within // 32) % plane.per_byte
            v = (v >> tirx.Broadcast((i * plane.bits).astype("int32"), 8)) & tirx.Broadcast(
                tirx.const((1 << plane.bits) - 1, "int32"), 8)
        if plane.shift:
            v = v << tirx.Broadcast(tirx.const(plane.shift, "int32"), 8)
        code = v if code is None else code | v
    return code
