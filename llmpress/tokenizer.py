"""Tokenizers: one small protocol over sentencepiece, Hugging Face ``tokenizers`` and llama2.c ``tok*.bin`` files.

Every tokenizer offers ``encode(text, *, bos=True) -> list[int]``, ``decode(ids) -> str``, ``bos_id``, ``eos_id``,
``vocab_size`` and ``files()`` (the files an artifact copies so that ``load_tokenizer`` can rebuild it).

Decoding follows sentencepiece: BOS/EOS are skipped, byte-fallback pieces ``<0xNN>`` become raw bytes (joined and
read as UTF-8), ``▁`` is a space, and the space that encoding prepended (the "dummy prefix") is stripped from the
first piece of the text, and from a piece that follows BOS, as llama2.c's ``decode`` does.

The llama2.c format (``Llama2cTokenizer``): ``int32 max_token_length``, then per token ``float32 score``,
``int32 byte length`` and the bytes of the piece (spaces are plain ``" "``, not ``▁``). Encoding, as llama2.c's
``encode``: prepend the piece ``" "`` (dummy prefix) unless the text is empty, map each UTF-8 character to its
piece, or to its bytes (id = byte + 3) when the vocabulary lacks it, then repeatedly merge the adjacent pair whose
concatenation is a piece with the highest score (leftmost on ties) until no pair merges.
"""
from __future__ import annotations

import heapq
import json
import logging
import re
import struct
from pathlib import Path
from typing import Protocol, Sequence, runtime_checkable

from .errors import LoadError

__all__ = [
    "Tokenizer",
    "SentencePieceTokenizer",
    "HFTokenizer",
    "Llama2cTokenizer",
    "load_tokenizer",
    "find_tokenizer",
]

log = logging.getLogger(__name__)

_BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


def _stories(ids: Sequence[int], bos: int, eos: int) -> list[list[int]]:
    """Split ids at BOS, dropping BOS/EOS, so each story is decoded on its own (its leading dummy space stripped)."""
    parts: list[list[int]] = [[]]
    for i in ids:
        i = int(i)
        if i == bos:
            parts.append([])
        elif i != eos:
            parts[-1].append(i)
    return [p for p in parts if p]


@runtime_checkable
class Tokenizer(Protocol):
    """What llmpress needs from a tokenizer."""

    bos_id: int
    eos_id: int
    vocab_size: int

    def encode(self, text: str, *, bos: bool = True) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def files(self) -> list[Path]: ...


class SentencePieceTokenizer:
    """A sentencepiece ``.model`` file (the original tokenizer of Llama-family models)."""

    def __init__(self, path: str | Path) -> None:
        import sentencepiece as spm

        self.path = Path(path)
        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(self.path))
        except Exception as e:  # sentencepiece raises OSError/RuntimeError with its own wording
            raise LoadError(f"{self.path}: not a readable sentencepiece model ({e})") from e
        self.vocab_size = int(self.sp.get_piece_size())
        self.bos_id = int(self.sp.bos_id())
        self.eos_id = int(self.sp.eos_id())

    def encode(self, text: str, *, bos: bool = True) -> list[int]:
        ids = list(self.sp.encode(text))
        return ([self.bos_id] if bos and self.bos_id >= 0 else []) + ids

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(self.sp.decode(p) for p in _stories(ids, self.bos_id, self.eos_id))

    def files(self) -> list[Path]:
        return [self.path]


class HFTokenizer:
    """A Hugging Face ``tokenizer.json`` read with the ``tokenizers`` library.

    BOS/EOS come from ``tokenizer_config.json`` beside it when present (``bos_token``/``eos_token``), else from
    the usual Llama names ``<s>``/``</s>``. ``encode`` adds BOS itself and never the library's post-processor
    specials, so ``bos=False`` really means no BOS.
    """

    def __init__(self, path: str | Path) -> None:
        from tokenizers import Tokenizer as _Tok

        self.path = Path(path)
        try:
            self.tok = _Tok.from_file(str(self.path))
        except Exception as e:
            raise LoadError(f"{self.path}: not a readable tokenizer.json ({e})") from e
        self.config_path = self.path.with_name("tokenizer_config.json")
        cfg: dict = {}
        if self.config_path.is_file():
            try:
                cfg = json.loads(self.config_path.read_text())
            except (OSError, json.JSONDecodeError) as e:
                raise LoadError(f"{self.config_path}: not valid JSON ({e})") from e
        self.bos_id = self._special_id(cfg.get("bos_token"), "<s>")
        self.eos_id = self._special_id(cfg.get("eos_token"), "</s>")
        self.vocab_size = int(self.tok.get_vocab_size(with_added_tokens=True))

    def _special_id(self, entry, default: str) -> int:
        if isinstance(entry, dict):  # older configs spell an AddedToken as a dict
            entry = entry.get("content")
        tid = self.tok.token_to_id(entry or default)
        return -1 if tid is None else int(tid)

    def encode(self, text: str, *, bos: bool = True) -> list[int]:
        ids = list(self.tok.encode(text, add_special_tokens=False).ids)
        return ([self.bos_id] if bos and self.bos_id >= 0 else []) + ids

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(self.tok.decode(p, skip_special_tokens=True) for p in _stories(ids, self.bos_id, self.eos_id))

    def files(self) -> list[Path]:
        return [self.path] + ([self.config_path] if self.config_path.is_file() else [])


class Llama2cTokenizer:
    """The llama2.c tokenizer (``tok512.bin``, ``tokenizer.bin``); see the module docstring for the format."""

    def __init__(self, path: str | Path, vocab_size: int | None = None) -> None:
        self.path = Path(path)
        try:
            data = self.path.read_bytes()
        except OSError as e:
            raise LoadError(f"{self.path}: cannot read the tokenizer ({e})") from e
        n = vocab_size if vocab_size is not None else _count_llama2c_tokens(self.path, data)
        self.pieces: list[bytes] = []
        self.scores: list[float] = []
        off = 4
        try:
            (self.max_token_length,) = struct.unpack_from("<i", data, 0)
            for i in range(n):
                score, length = struct.unpack_from("<fi", data, off)
                off += 8
                if length < 0 or off + length > len(data):
                    raise LoadError(f"{self.path}: token {i} claims {length} bytes past the end of the file")
                self.pieces.append(data[off:off + length])
                self.scores.append(score)
                off += length
        except struct.error as e:
            raise LoadError(f"{self.path}: truncated llama2.c tokenizer after {len(self.pieces)} tokens") from e
        if off != len(data):
            raise LoadError(f"{self.path}: {len(data) - off} bytes left after {n} tokens (vocab size mismatch?)")
        self.vocab_size = n
        self.bos_id, self.eos_id = 1, 2
        # First id wins for a piece listed twice (llama2.c's binary search would find either; keep it stable).
        self._lookup: dict[bytes, int] = {}
        for i, p in enumerate(self.pieces):
            self._lookup.setdefault(p, i)
        self._space = self._lookup.get(b" ")

    def encode(self, text: str, *, bos: bool = True) -> list[int]:
        ids: list[int] = [self.bos_id] if bos else []
        if not text:
            return ids
        toks: list[int] = []
        if self._space is not None:
            toks.append(self._space)
        for ch in text:
            b = ch.encode("utf-8")
            tid = self._lookup.get(b)
            if tid is not None:
                toks.append(tid)
            else:
                toks.extend(x + 3 for x in b)
        return ids + self._merge(toks)

    def _merge(self, toks: list[int]) -> list[int]:
        """llama2.c's loop (merge the best-scoring adjacent pair, leftmost on ties, until none merges) in
        O(n log n): a heap of candidate pairs ordered by (-score, position of the left symbol); entries made stale
        by an earlier merge are recognised because their pair no longer sits side by side."""
        n = len(toks)
        ids = list(toks)
        nxt = list(range(1, n + 1))
        prv = list(range(-1, n - 1))
        alive = [True] * n
        heap: list[tuple[float, int, int, int, int]] = []

        def push(i: int) -> None:
            j = nxt[i]
            if 0 <= i and j < n:
                tid = self._lookup.get(self.pieces[ids[i]] + self.pieces[ids[j]])
                if tid is not None:
                    heapq.heappush(heap, (-self.scores[tid], i, j, ids[i], ids[j]))

        for i in range(n - 1):
            push(i)
        while heap:
            _, i, j, a, b = heapq.heappop(heap)
            if not (alive[i] and alive[j] and nxt[i] == j and ids[i] == a and ids[j] == b):
                continue  # stale: one side was merged away or changed since this pair was queued
            ids[i] = self._lookup[self.pieces[a] + self.pieces[b]]
            alive[j] = False
            nxt[i] = nxt[j]
            if nxt[j] < n:
                prv[nxt[j]] = i
            if prv[i] >= 0:
                push(prv[i])
            push(i)
        return [ids[i] for i in range(n) if alive[i]]


    def decode(self, ids: Sequence[int]) -> str:
        out = bytearray()
        prev = self.bos_id  # the start of the text reads as "after BOS": its dummy space goes
        for i in ids:
            i = int(i)
            if i in (self.bos_id, self.eos_id):
                prev = i
                continue
            piece = self.pieces[i]
            if prev == self.bos_id and piece.startswith(b" "):
                piece = piece[1:]
            m = _BYTE_PIECE.match(piece.decode("latin-1"))
            out += bytes([int(m.group(1), 16)]) if m else piece
            prev = i
        return out.decode("utf-8", errors="replace")

    def files(self) -> list[Path]:
        return [self.path]


def _count_llama2c_tokens(path: Path, data: bytes) -> int:
    """Walk the records to find the vocabulary size (the format does not store it)."""
    off, n = 4, 0
    while off < len(data):
        if off + 8 > len(data):
            raise LoadError(f"{path}: truncated llama2.c tokenizer after {n} tokens")
        (length,) = struct.unpack_from("<i", data, off + 4)
        if length < 0 or off + 8 + length > len(data):
            raise LoadError(f"{path}: token {n} claims {length} bytes past the end of the file")
        off += 8 + length
        n += 1
    if n == 0:
        raise LoadError(f"{path}: empty llama2.c tokenizer")
    return n


def find_tokenizer(folder: str | Path) -> Path | None:
    """The tokenizer file of a Hugging Face folder: ``tokenizer.model`` first, else ``tokenizer.json``."""
    folder = Path(folder)
    for name in ("tokenizer.model", "tokenizer.json"):
        if (folder / name).is_file():
            return folder / name
    return None


def load_tokenizer(path: str | Path, *, vocab_size: int | None = None) -> Tokenizer:
    """Build the tokenizer a file (or a Hugging Face folder) holds.

    ``.model`` -> sentencepiece, ``.json`` -> ``tokenizers``, ``.bin`` -> llama2.c (``vocab_size`` checks the
    token count against the model's when given).
    """
    p = Path(path)
    if p.is_dir():
        found = find_tokenizer(p)
        if found is None:
            raise LoadError(f"{p}: folder has neither tokenizer.model nor tokenizer.json")
        p = found
    if not p.exists():
        raise LoadError(f"{p}: tokenizer file does not exist")
    if p.suffix == ".model":
        return SentencePieceTokenizer(p)
    if p.suffix == ".json":
        return HFTokenizer(p)
    if p.suffix == ".bin":
        return Llama2cTokenizer(p, vocab_size=vocab_size)
    raise LoadError(f"{p}: unknown tokenizer file type (expected .model, tokenizer.json or a llama2.c tok*.bin)")
