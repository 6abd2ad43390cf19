"""Sparse weights stored compressed in a TVM artifact, expanded at load into exactly the tensors the kernels read.

This is the storage of weights whose kernels compute dense (the "dense compute" fallback). Layers that run a sparse
kernel (``kernels/sparse.py``, chosen by ``kernels/sparse_plan.py``) already hold their weight in that kernel's
compressed form (SELL-8 values + column indices, int4 2:4 codes + positions): those tensors are written as they
are and read as they are (``compressed_entries(keep=...)``). The decision is made at save time per weight tensor from its actual bytes, which makes it exact whatever
pass produced the tensor and needs no trust in pass metadata:

- a tensor is read as ``n`` *elements* of ``e`` bits: its dtype's width, and for 1-byte dtypes also 4-bit and
  2-bit elements (the packed int4/int2 codes of ``wq_linear`` and the CPU kernels' planes, ``kernels/qlayout.py``:
  each nibble of those layouts is one weight's code, little-endian bit order inside a byte);
- the *fill* value ``f`` is ``0`` for elements of 16 bits or more (a float ``+0.0``: what ``sparsify`` leaves)
  and the most frequent value for narrower ones (symmetric int4 stores a pruned weight as code 8, int8 as 0);
- ``bitmask`` format: ``mask`` holds bit ``i`` (byte ``i // 8``, bit ``i % 8``) = element ``i != f``, and
  ``values`` the ``k`` elements that differ from ``f``, in order, packed at ``e`` bits (the same bit order);
  stored bytes ``ceil(k e / 8) + ceil(n / 8)`` against ``n e / 8`` dense;
- a tensor is compressed when that saves at least ``MIN_SAVING`` of its bytes and ``OVERHEAD`` bytes (two more
  safetensors entries and a manifest record), with the element width that stores least.

Why a bitmask and not N:M indices: for 2:4 the two cost the same (4 bits per group of 4: a 4-bit mask or two 2-bit
indices), for 4:8 the mask is smaller (8 bits against four 3-bit indices), and the mask also covers unstructured
sparsity and kept weights whose code happens to be the fill. Expansion is ``out = f; out[mask] = values``:
bit-identical by construction (tests check it).

In the artifact, tensor ``name`` becomes ``name#values`` and ``name#mask`` (``uint8``) in ``weights.safetensors``,
and ``payload.sparse_weights[name]`` records ``format``, ``elem_bits``, ``fill``, ``dtype``, ``shape``,
``nonfill``, ``dense_bytes`` and ``stored_bytes``. The C++ runner (``runner/src/safetensors.cc``) expands the same.
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Mapping, Sequence

import torch

from ...errors import ArtifactError

__all__ = ["FORMAT", "MIN_SAVING", "OVERHEAD", "encode", "decode", "compressed_entries", "expand_weights"]

log = logging.getLogger(__name__)

FORMAT = "bitmask"
#: Least fraction of a tensor's bytes compression must save to be used.
MIN_SAVING = 0.10
#: Bytes one compressed tensor costs beyond its data (two safetensors header entries, a manifest record).
OVERHEAD = 384

_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _elements(raw: torch.Tensor, bits: int) -> torch.Tensor:
    """``raw`` (flat uint8) as elements of ``bits`` bits: uint8 for sub-byte widths, an int view otherwise."""
    if bits >= 8:
        return raw.view(_INT_VIEW[bits // 8])
    per = 8 // bits
    shifts = torch.arange(per, dtype=torch.uint8) * bits
    return ((raw.unsqueeze(1) >> shifts) & ((1 << bits) - 1)).reshape(-1)


def _pack(elems: torch.Tensor, bits: int) -> torch.Tensor:
    """Elements of ``bits`` bits -> flat uint8 bytes (inverse of ``_elements``; zero padding at the end)."""
    if bits >= 8:
        return elems.contiguous().view(torch.uint8).reshape(-1)
    per = 8 // bits
    pad = (-elems.numel()) % per
    e = torch.cat([elems.to(torch.uint8), torch.zeros(pad, dtype=torch.uint8)]).reshape(-1, per)
    shifts = torch.arange(per, dtype=torch.uint8) * bits
    return (e << shifts).sum(dim=1, dtype=torch.uint8)  # disjoint bits: the sum is their OR


def _pack_mask(mask: torch.Tensor) -> torch.Tensor:
    pad = (-mask.numel()) % 8
    m = torch.cat([mask.to(torch.uint8), torch.zeros(pad, dtype=torch.uint8)]).reshape(-1, 8)
    return (m << torch.arange(8, dtype=torch.uint8)).sum(dim=1, dtype=torch.uint8)


def _unpack_mask(packed: torch.Tensor, n: int) -> torch.Tensor:
    return ((packed.unsqueeze(1) >> torch.arange(8, dtype=torch.uint8)) & 1).reshape(-1)[:n].bool()


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


_COUNT_BLOCK = 1 << 22  # bytes of a tensor counted at once


def _counts(raw: torch.Tensor, bits: int) -> torch.Tensor:
    """How often each ``bits``-bit element value occurs in ``raw`` (flat uint8), a block at a time."""
    counts = torch.zeros(1 << bits, dtype=torch.int64)
    for i in range(0, raw.numel(), _COUNT_BLOCK):
        counts += torch.bincount(_elements(raw[i:i + _COUNT_BLOCK], bits), minlength=1 << bits)
    return counts


def encode(t: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict] | None:
    """``({"values", "mask"}, record)`` for tensor ``t`` when the bitmask format pays (module docstring), else None."""
    t = t.detach().contiguous()
    size = t.element_size()
    if t.numel() == 0 or t.is_complex() or size not in _INT_VIEW:
        return None
    raw = t.reshape(-1).view(torch.uint8)
    dense = raw.numel()
    best = None
    for bits in ([8, 4, 2] if size == 1 else [8 * size]):
        n = dense * 8 // bits
        if bits <= 8:  # counted a block at a time: bincount widens every element to int64
            counts = _counts(raw, bits)
            fill = int(counts.argmax())
            k = n - int(counts[fill])
        else:
            fill, k = 0, int(torch.count_nonzero(_elements(raw, bits)))
        stored = (k * bits + 7) // 8 + (n + 7) // 8
        if best is None or stored < best[0]:
            best = (stored, bits, fill, k)
    stored, bits, fill, k = best
    if stored + OVERHEAD > dense * (1 - MIN_SAVING):
        return None
    el = _elements(raw, bits)  # only now, for a tensor that is stored compressed
    keep = el != fill
    tensors = {"values": _pack(el[keep], bits), "mask": _pack_mask(keep)}
    record = {"format": FORMAT, "elem_bits": bits, "fill": fill, "dtype": _dtype_name(t.dtype),
              "shape": list(t.shape), "nonfill": k, "dense_bytes": dense, "stored_bytes": stored}
    return tensors, record


def decode(record: dict, values: torch.Tensor, mask: torch.Tensor, where: str = "") -> torch.Tensor:
    """The dense tensor of ``record`` from its ``values``/``mask`` bytes (exact inverse of ``encode``)."""
    if record.get("format") != FORMAT:
        raise ArtifactError(f"{where}: unknown sparse weight format {record.get('format')!r} (this llmpress reads "
                            f"{FORMAT!r})")
    dtype = getattr(torch, record["dtype"], None)
    bits, fill, shape = int(record["elem_bits"]), int(record["fill"]), [int(s) for s in record["shape"]]
    if not isinstance(dtype, torch.dtype) or bits not in (2, 4, 8, 16, 32, 64):
        raise ArtifactError(f"{where}: bad sparse weight record (dtype {record['dtype']!r}, {bits} bits)")
    numel = 1
    for s in shape:
        numel *= s
    dense = numel * dtype.itemsize
    n = dense * 8 // bits
    keep = _unpack_mask(mask.reshape(-1), n) if mask.numel() * 8 >= n else None
    k = int(keep.sum()) if keep is not None else -1
    vals = _elements(values.reshape(-1).view(torch.uint8), bits)[:k] if k >= 0 else values
    if keep is None or vals.numel() != k or k != int(record["nonfill"]):
        raise ArtifactError(f"{where}: sparse weight data does not match its record (mask of {mask.numel()} "
                            f"bytes for {n} elements, {vals.numel()} values for {k} set bits)")
    el = torch.full((n,), fill, dtype=torch.uint8 if bits < 8 else _INT_VIEW[bits // 8])
    el[keep] = vals.to(el.dtype)
    return _pack(el, bits).view(dtype).reshape(shape)


def compressed_entries(weights: Mapping[str, torch.Tensor], names: Sequence[str],
                       keep: set[str] | frozenset = frozenset()
                       ) -> tuple[dict[str, tuple[torch.dtype, tuple[int, ...], Callable[[], torch.Tensor]]],
                                  dict[str, dict]]:
    """The tensors to write, as ``safetensors_io.write_streamed`` entries (``name -> (dtype, shape, produce)``, in
    the order of ``names``; a compressed tensor replaced by ``name#values``/``name#mask``), and the records of the
    compressed ones; the tensors named in ``keep`` are written as they are (the compressed forms sparse kernels
    read directly). One tensor of ``weights`` is in memory at a time: each is
    read (``weights[name]``: a ``spill.SpilledWeights`` reads it from disk) and encoded now to learn its stored
    sizes, then dropped; ``produce`` reads and encodes it again when the writer reaches it."""
    entries: dict[str, tuple] = {}
    records: dict[str, dict] = {}
    for name in names:
        t = weights[name]
        enc = encode(t) if name not in keep else None
        if enc is None:
            entries[name] = (t.dtype, tuple(t.shape), lambda name=name: weights[name])
            continue
        tensors, record = enc
        record["values"], record["mask"] = f"{name}#values", f"{name}#mask"
        for part in ("values", "mask"):
            def produce(name=name, part=part) -> torch.Tensor:
                return encode(weights[name])[0][part]

            entries[record[part]] = (tensors[part].dtype, tuple(tensors[part].shape), produce)
        records[name] = record
        del t, tensors, enc
    if records:
        dense = sum(r["dense_bytes"] for r in records.values())
        stored = sum(r["stored_bytes"] for r in records.values())
        log.info("%d sparse weight tensor(s) stored compressed: %s -> %s bytes", len(records), f"{dense:,}",
                 f"{stored:,}")
    return entries, records


def expand_weights(weights: dict[str, torch.Tensor], records: Any, where: str) -> dict[str, torch.Tensor]:
    """``weights`` (as read from the file) with every compressed tensor of ``records`` expanded back to dense."""
    if not records:
        return weights
    if not isinstance(records, dict):
        raise ArtifactError(f"{where}: payload.sparse_weights must be an object, got {type(records).__name__}")
    out = dict(weights)
    for name, rec in records.items():
        vname, mname = rec.get("values"), rec.get("mask")
        if vname not in out or mname not in out:
            raise ArtifactError(f"{where}: lacks the compressed data of {name!r} ({vname}, {mname})")
        out[name] = decode(rec, out.pop(vname), out.pop(mname), f"{where}: {name}")
    return out
