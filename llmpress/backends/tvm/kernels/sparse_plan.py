"""Which linears get the sparse kernels (``sparse.py``): the weight's zeros, measured at compile time, against the
crossover measured by ``benchmarks/sparse_kernels.py``.

``dispatch.py`` asks a :class:`SparsePlan` about every linear it meets whose weight is a parameter; the plan measures
the weight once (the fraction of zeros ``s``, the SELL-8 size, whether int4 codes are 2:4) and decides with
:func:`decide`: under ``sparse_kernels="auto"`` (``TVMBackend``'s default) a layer gets the sparse kernel only where
this CPU architecture has a measured crossover ``c`` (:data:`CROSSOVER`) and ``s >= c``; otherwise dense compute,
with a log line and a stats entry saying why ("sparse kernel slower than dense at s=0.50 on this target (crossover
0.70, benchmarks/results/sparse_kernels.md): dense compute"). ``"always"`` forces the sparse kernel wherever its
format applies (tests, benchmarks), ``"never"`` keeps every layer dense.

Only these layers are considered: float32 weights with at least ``MIN_SPARSITY`` zeros and at most 65536 columns,
and ``wq_linear`` weights of 4 bits, symmetric, float activations (``act_bits=0``), whose codes are 2:4. An int8-
activation layer (``act_bits=8``) stays on its dense integer kernel: the sparse int4 kernel computes with float
activations, which is another function.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch

from .sparse import R

__all__ = ["MIN_SPARSITY", "MODES", "CROSSOVER", "RESULTS", "FloatSparse", "Int4Sparse", "measure_float",
           "int4_codes", "measure_int4", "decide", "SparsePlan"]

log = logging.getLogger(__name__)

#: Below this fraction of zeros a float weight is not even measured for the sparse kernel (dense always wins).
MIN_SPARSITY = 0.3
MODES = ("auto", "always", "never")

#: Measured crossovers: (kernel form, CPU arch) -> the least sparsity at which the sparse kernel beat dense in
#: ``benchmarks/sparse_kernels.py`` (decode GEMV, 2048x5632 and 5632x2048, ``results/sparse_kernels.md``), or None
#: when it never did. A form/arch not listed has no measurement: ``auto`` keeps dense compute there.
#: From ``benchmarks/sparse_kernels.py --rounds 11``, 2026-12-03 01:33 UTC, AMD EPYC (Zen 5) 2 cores, AVX-512 build,
#: load 1.3: float32 SELL-8 against the dense fgemm GEMV 0.94x / 0.98x at s=0.5, 1.60x / 1.46x at 0.7, 2.1-2.2x at
#: 0.8, 3.3-4.1x at 0.9, 5.6-7.1x at 0.95; 2:4 float 1.06x / 0.95x (never on both); int4 2:4 0.39x / 0.35x of the
#: dense int4 GEMV (which reads 4 bits per weight with no gather). (An earlier run under load 9-11 put the float
#: crossover at 0.95 with non-monotone ratios.)
CROSSOVER: dict[tuple[str, str], float | None] = {
    ("f32", "x86_64"): 0.70,
    ("int4_2:4", "x86_64"): None,
}
RESULTS = "benchmarks/results/sparse_kernels.md"


@dataclass(frozen=True)
class FloatSparse:
    """A float32 weight ``[n, k]``'s zeros: ``nnz`` nonzeros, ``steps`` SELL-8 steps (the ``S`` of ``vals``)."""

    n: int
    k: int
    nnz: int
    steps: int
    pattern: str  # "2:4", "4:8" when every group of M holds at most N nonzeros, else "unstructured"

    @property
    def sparsity(self) -> float:
        return 1.0 - self.nnz / (self.n * self.k)

    @property
    def tiles(self) -> int:
        return (self.n + R - 1) // R

    @property
    def stored_bytes(self) -> int:
        return self.steps * R * 6 + (self.tiles + 1) * 4


@dataclass(frozen=True)
class Int4Sparse:
    """A symmetric int4 ``wq_linear`` weight ``[n, k]`` whose codes are 2:4 sparse (``zeros``: pruned codes)."""

    n: int
    k: int
    group: int
    zeros: int

    @property
    def sparsity(self) -> float:
        return self.zeros / (self.n * self.k)

    @property
    def tiles(self) -> int:
        return (self.n + R - 1) // R

    pattern = "2:4"


def _nm_pattern(nz: torch.Tensor) -> str:
    n, k = nz.shape
    for keep, m in ((2, 4), (4, 8)):
        if k % m == 0 and int(nz.reshape(n, k // m, m).sum(-1).max()) <= keep:
            return f"{keep}:{m}"
    return "unstructured"


def measure_float(w: torch.Tensor) -> FloatSparse | None:
    """The SELL-8 size of float32 ``w [n, k]`` (None when it is not 2-D float32, has K > 65536 columns or fewer
    than ``MIN_SPARSITY`` zeros)."""
    if w.dtype != torch.float32 or w.dim() != 2 or w.shape[1] > 65536 or w.numel() == 0:
        return None
    nnz = int(torch.count_nonzero(w))  # no mask yet: a dense weight (the usual case) stops here
    n, k = w.shape
    if 1.0 - nnz / w.numel() < MIN_SPARSITY:
        return None
    nz = w != 0
    rows = nz.sum(1)
    pad = (-n) % R
    per_tile = torch.cat([rows, rows.new_zeros(pad)]).reshape(-1, R).max(1).values
    return FloatSparse(n, k, nnz, int(per_tile.sum()), _nm_pattern(nz))


def int4_codes(qweight: torch.Tensor, k: int) -> torch.Tensor:
    """The unsigned 4-bit codes ``[n, k]`` of ``wq_linear``'s packed storage (low nibble: even column)."""
    q = qweight.to(torch.uint8)
    return torch.stack([q & 15, q >> 4], dim=-1).reshape(q.shape[0], -1)[:, :k]


_MEASURE_ROWS = 256


def measure_int4(qweight: torch.Tensor, k: int, group: int) -> Int4Sparse | str:
    """``Int4Sparse`` when the codes (symmetric int4, zero code 8) are 2:4 with ``k % 8 == 0`` and ``group % 8 ==
    0``; else why not (a string)."""
    if k % 8 or group % 8:
        return f"in_features {k} and group {group} must be multiples of 8 for the int4 2:4 layout"
    # a few rows at a time: the codes, their mask and the group counts of a whole 7B matrix are ~10x its packed
    # bytes, and a dense weight (the usual case) fails in its first rows
    zeros = 0
    for r in range(0, qweight.shape[0], _MEASURE_ROWS):
        codes = int4_codes(qweight[r:r + _MEASURE_ROWS], k)
        nz = codes != 8
        worst = int(nz.reshape(codes.shape[0], k // 4, 4).sum(-1, dtype=torch.uint8).max())
        if worst > 2:
            return f"not 2:4 (a group of 4 holds {worst} nonzero codes)"
        zeros += int(nz.numel() - torch.count_nonzero(nz))
    return Int4Sparse(qweight.shape[0], k, group, zeros)


def decide(form: str, arch: str, sparsity: float, mode: str) -> tuple[bool, str]:
    """Whether a layer of kernel ``form`` (``"f32"``, ``"int4_2:4"``) with ``sparsity`` gets the sparse kernel on
    ``arch``, and the sentence saying why (for logs and stats)."""
    if mode == "always":
        return True, f"sparse kernel forced (sparse_kernels='always') at s={sparsity:.2f}"
    if mode == "never":
        return False, f"sparse kernels off (sparse_kernels='never') at s={sparsity:.2f}: dense compute"
    key = (form, arch)
    if key not in CROSSOVER:
        return False, (f"no measured crossover for the {form} sparse kernel on {arch} ({RESULTS} measures x86_64 "
                       f"only): dense compute at s={sparsity:.2f}")
    cross = CROSSOVER[key]
    if cross is None:
        return False, (f"sparse kernel slower than dense at s={sparsity:.2f} on this target (no crossover: slower "
                       f"at every measured sparsity, {RESULTS}): dense compute")
    if sparsity < cross:
        return False, (f"sparse kernel slower than dense at s={sparsity:.2f} on this target (crossover {cross:.2f}, "
                       f"{RESULTS}): dense compute")
    return True, f"sparse kernel faster than dense at s={sparsity:.2f} on this target (crossover {cross:.2f})"



class SparsePlan:
    """The sparse-kernel decisions of one compile: ``weights`` by state-dict name, ``names`` the weight parameters'
    names in the Relax functions' parameter order (after the user inputs), ``mode`` (one of :data:`MODES`),
    ``arch`` (``CpuIsa.arch``: the crossover is per architecture, so every variant build of a target reads the same
    weights). Each weight is measured and decided once;
    :attr:`decisions` holds, per weight name, ``{"kernel": "sparse" | "dense", "form", "pattern", "sparsity",
    "why", "reads"}`` (``reads``: the parameters the sparse kernel's repack reads, whose transformed forms the
    artifact stores as they are)."""

    def __init__(self, weights: Mapping[str, torch.Tensor], names: Sequence[str], mode: str, arch: str) -> None:
        if mode not in MODES:
            raise ValueError(f"sparse_kernels={mode!r}: expected one of {', '.join(MODES)}")
        self.weights, self.names, self.mode, self.arch = weights, list(names), mode, arch
        self.decisions: dict[str, dict] = {}
        self._chosen: dict[str, Any] = {}

    def _record(self, name: str, form: str, info: Any, use: bool, why: str, reads: Sequence[str]) -> Any:
        self.decisions[name] = {"kernel": "sparse" if use else "dense", "form": form, "pattern": info.pattern,
                                "sparsity": round(info.sparsity, 4), "why": why, "reads": list(reads)}
        (log.info if use or self.mode != "never" else log.debug)("%s: %s", name, why)
        self._chosen[name] = info if use else None
        return self._chosen[name]

    def float_layer(self, name: str) -> FloatSparse | None:
        """The SELL-8 size of float weight ``name`` when it gets the sparse kernel, else None."""
        if name in self._chosen:
            return self._chosen[name]
        if self.mode == "never" or name not in self.weights:
            return None
        info = measure_float(self.weights[name])
        if info is None:
            self._chosen[name] = None
            return None
        use, why = decide("f32", self.arch, info.sparsity, self.mode)
        return self._record(name, "f32", info, use, why, [name])

    def int4_layer(self, qweight: str, scales: str, *, k: int, group: int, sym: bool,
                   act_bits: int) -> Int4Sparse | None:
        """The 2:4 description of int4 weight ``qweight`` when it gets the sparse kernel, else None (a 2:4 layer
        left dense says why in :attr:`decisions`)."""
        if qweight in self._chosen:
            return self._chosen[qweight]
        if self.mode == "never" or qweight not in self.weights or not sym:
            return None
        info = measure_int4(self.weights[qweight], k, group)
        if isinstance(info, str):
            self._chosen[qweight] = None
            return None
        if act_bits:
            return self._record(qweight, "int4_2:4", info, False,
                                f"int8 activations (act_bits={act_bits}): the sparse int4 kernel computes with float "
                                f"activations, so the dense integer kernel stays (s={info.sparsity:.2f})", [])
        use, why = decide("int4_2:4", self.arch, info.sparsity, self.mode)
        return self._record(qweight, "int4_2:4", info, use, why, [qweight, scales])
