"""Safetensors read and written one tensor at a time, so no file is ever held in memory whole.

The format: an 8-byte little-endian header length ``N``, ``N`` bytes of JSON (``{name: {"dtype", "shape",
"data_offsets": [begin, end]}, "__metadata__": {...}}``, offsets relative to the end of the header), then the data.

- ``read_header(path)`` parses the header only; ``read_tensor(path, entry)`` reads one tensor's bytes with plain
  file I/O (``readinto`` a fresh tensor), not through a memory map: a map's touched pages count in the process's
  resident memory until it is unmapped, a plain read leaves them in the page cache only.
- ``write_streamed(path, tensors)`` takes ``name -> (dtype, shape, produce)`` and writes the header first (every
  size is known from dtype and shape), then calls each ``produce()`` in turn and writes its bytes: peak memory is the
  largest single tensor, where ``safetensors.torch.save_file`` copies every tensor into bytes first. Tensors are
  stored widest dtype first, so each starts at a multiple of its element size.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Callable, Mapping

import torch

__all__ = ["DTYPES", "read_header", "read_tensor", "write_streamed", "tensor_bytes"]

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64, "BOOL": torch.bool,
}
_CODES = {v: k for k, v in DTYPES.items()}


def read_header(path: Path) -> tuple[dict[str, dict], int]:
    """``(entries, data_start)``: every tensor's header entry by name and the file offset of the data section.
    Raises ``ValueError`` on a file whose header is truncated or not JSON."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise ValueError(f"{path}: shorter than a safetensors header")
        (n,) = struct.unpack("<Q", head)
        raw = f.read(n)
    if len(raw) != n:
        raise ValueError(f"{path}: header of {n} bytes is truncated")
    try:
        entries = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: header is not JSON ({e})") from e
    if isinstance(entries, dict):
        entries.pop("__metadata__", None)
    if not isinstance(entries, dict) or not all(isinstance(e, dict) and "data_offsets" in e for e in entries.values()):
        raise ValueError(f"{path}: header is not a safetensors header (tensor entries with data_offsets)")
    end = max((int(e["data_offsets"][1]) for e in entries.values()), default=0)
    size = path.stat().st_size
    if 8 + n + end > size:
        raise ValueError(f"{path}: truncated: the header describes {8 + n + end} bytes, the file has {size}")
    return entries, 8 + n


def read_tensor(path: Path, entry: dict, data_start: int) -> torch.Tensor:
    """One tensor of ``path`` (its header ``entry``), read into a fresh CPU tensor of the stored dtype."""
    dtype = DTYPES.get(entry["dtype"])
    if dtype is None:
        raise ValueError(f"{path}: unsupported safetensors dtype {entry['dtype']}")
    begin, end = entry["data_offsets"]
    shape = [int(d) for d in entry["shape"]]
    out = torch.empty(shape, dtype=dtype)
    nbytes = out.numel() * out.element_size()
    if end - begin != nbytes:
        raise ValueError(f"{path}: tensor of shape {shape} {entry['dtype']} spans {end - begin} bytes, "
                         f"expected {nbytes}")
    if nbytes:
        buf = out.view(-1).view(torch.uint8).numpy()
        with open(path, "rb") as f:
            f.seek(data_start + begin)
            got = f.readinto(buf)
        if got != nbytes:
            raise ValueError(f"{path}: truncated data ({got} of {nbytes} bytes read)")
    return out


def tensor_bytes(dtype: torch.dtype, shape: tuple[int, ...] | list[int]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n * torch.empty((), dtype=dtype).element_size()


def write_streamed(path: Path, tensors: Mapping[str, tuple[torch.dtype, tuple[int, ...], Callable[[], torch.Tensor]]],
                   *, metadata: dict[str, str] | None = None) -> int:
    """Write ``tensors`` (``name -> (dtype, shape, produce)``) to ``path``, producing and writing one at a time
    (see the module docstring); returns the bytes written. ``produce()`` must return exactly that dtype and shape."""
    # widest elements first (as safetensors orders them): every tensor starts at a multiple of its element size
    order = sorted(tensors, key=lambda k: -torch.empty((), dtype=tensors[k][0]).element_size())
    tensors = {k: tensors[k] for k in order}
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name, (dtype, shape, _) in tensors.items():
        if dtype not in _CODES:
            raise ValueError(f"{name}: dtype {dtype} cannot be stored in safetensors")
        size = tensor_bytes(dtype, shape)
        header[name] = {"dtype": _CODES[dtype], "shape": [int(d) for d in shape], "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned, as safetensors writes it
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name, (dtype, shape, produce) in tensors.items():
            t = produce()
            if t.dtype != dtype or tuple(t.shape) != tuple(int(d) for d in shape):
                raise ValueError(f"{name}: produced {t.dtype} {list(t.shape)}, declared {dtype} {list(shape)}")
            t = t.detach().contiguous().cpu()
            if t.numel():
                f.write(memoryview(t.view(-1).view(torch.uint8).numpy()))
            del t
    return 8 + len(raw) + offset
