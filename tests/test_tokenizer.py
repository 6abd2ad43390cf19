"""Tokenizers: llama2.c BPE against sentencepiece on real text, decoding rules, the HF tokenizers, dispatch, errors."""
from __future__ import annotations

import struct
from pathlib import Path

import pytest

from llmpress.errors import LoadError
from llmpress.tokenizer import (
    HFTokenizer,
    Llama2cTokenizer,
    SentencePieceTokenizer,
    Tokenizer,
    load_tokenizer,
)

from .conftest import STORIES260K, TINYSTORIES, VALID


def _write_llama2c(path: Path, pieces: list[bytes], scores: list[float]) -> Path:
    """Write the llama2.c tokenizer format: int32 max length, then (float32 score, int32 length, bytes) per token."""
    with open(path, "wb") as f:
        f.write(struct.pack("<i", max(len(p) for p in pieces)))
        for p, s in zip(pieces, scores):
            f.write(struct.pack("<fi", s, len(p)))
            f.write(p)
    return path


def _paragraphs(n: int) -> list[str]:
    paras = [p.strip() for p in VALID.read_text().split("\n\n") if p.strip()]
    return paras[:n]


@pytest.fixture(scope="module")
def sp_as_llama2c(tmp_path_factory) -> tuple[Llama2cTokenizer, SentencePieceTokenizer]:
    """tinystories-llama's sentencepiece model rewritten in llama2.c's format, the way llama2.c's tokenizer.py
    exports one (``▁`` -> space, BOS/EOS spelled ``\\n<s>\\n``/``\\n</s>\\n``, the sentencepiece scores)."""
    sp = SentencePieceTokenizer(TINYSTORIES / "tokenizer.model")
    pieces, scores = [], []
    for i in range(sp.vocab_size):
        piece = sp.sp.id_to_piece(i)
        if i == sp.bos_id:
            piece = "\n<s>\n"
        elif i == sp.eos_id:
            piece = "\n</s>\n"
        pieces.append(piece.replace("\u2581", " ").encode("utf-8"))
        scores.append(sp.sp.get_score(i))
    path = _write_llama2c(tmp_path_factory.mktemp("tok") / "tok2048.bin", pieces, scores)
    return Llama2cTokenizer(path), sp


def test_llama2c_bpe_matches_sentencepiece_on_tinystories(sp_as_llama2c) -> None:
    """Same vocabulary and scores -> llama2.c's merge loop gives sentencepiece's ids, and both decode alike.

    sentencepiece first collapses whitespace runs and newlines into single spaces (its normalizer); llama2.c does
    not normalize, so the text is given in that normalized form."""
    l2c, sp = sp_as_llama2c
    for para in _paragraphs(100):
        text = " ".join(para.split())
        ids = l2c.encode(text)
        assert ids == sp.encode(text), text[:80]
        assert l2c.decode(ids) == sp.decode(ids) == text
    assert l2c.encode("hi", bos=False) == sp.encode("hi", bos=False)
    assert l2c.encode("") == [1] and l2c.encode("", bos=False) == []


def test_llama2c_merges_the_best_scoring_pair_first(tmp_path) -> None:
    # ids: 0 <unk>, 1 BOS, 2 EOS, 3..258 bytes, then pieces with scores chosen so the merge order is visible.
    pieces = [b"<unk>", b"\n<s>\n", b"\n</s>\n"] + [f"<0x{b:02X}>".encode() for b in range(256)]
    extra = [(b" ", 0.0), (b"a", 0.0), (b"b", 0.0), (b"c", 0.0), (b"ab", -5.0), (b"bc", -1.0), (b" a", -3.0),
             (b"abc", -2.0)]
    pieces += [p for p, _ in extra]
    scores = [0.0] * 259 + [s for _, s in extra]
    tok = Llama2cTokenizer(_write_llama2c(tmp_path / "tok.bin", pieces, scores))
    pid = {p: i for i, p in enumerate(pieces)}
    # "abc" -> [" ", a, b, c]: the best pair is "bc" (-1), not the leftmost " a" (-3) -> [" ", a, bc]; then
    # "abc" (-2) beats " a" (-3) -> [" ", abc]. A leftmost-first merge would end at [" a", bc].
    assert tok.encode("abc", bos=False) == [pid[b" "], pid[b"abc"]]
    # "ab" -> [" ", a, b]: " a" (-3) beats "ab" (-5); " ab" is no piece, so it stops at [" a", b].
    assert tok.encode("ab", bos=False) == [pid[b" a"], pid[b"b"]]
    # Unknown characters fall back to their UTF-8 bytes, id = byte + 3.
    assert tok.encode("é", bos=True) == [1, pid[b" "], 0xC3 + 3, 0xA9 + 3]
    assert tok.decode([1, pid[b" "], 0xC3 + 3, 0xA9 + 3, 2]) == "é"
    assert tok.vocab_size == len(pieces) and (tok.bos_id, tok.eos_id) == (1, 2)


def test_llama2c_decode_follows_llama2c(tmp_path) -> None:
    tok = load_tokenizer(STORIES260K / "tok512.bin")
    assert isinstance(tok, Llama2cTokenizer) and tok.vocab_size == 512
    ids = tok.encode("Once upon a time.\nThe end.")
    assert ids[0] == 1 and 13 in ids  # <0x0A>: the newline has no piece of its own, so it is a byte token
    # BOS/EOS vanish, <0x0A> is a newline byte, the dummy-prefix space after BOS is stripped.
    assert tok.decode(ids + [2]) == "Once upon a time.\nThe end."
    # A piece after a mid-text BOS loses its leading space too (llama2.c: prev_token == BOS).
    assert tok.decode(ids + ids) == "Once upon a time.\nThe end.Once upon a time.\nThe end."
    assert tok.files() == [STORIES260K / "tok512.bin"]


def test_hf_tokenizers_match_autotokenizer_on_tinystories() -> None:
    from transformers import AutoTokenizer

    auto = AutoTokenizer.from_pretrained(str(TINYSTORIES))
    sp = load_tokenizer(TINYSTORIES / "tokenizer.model")
    hf = load_tokenizer(TINYSTORIES / "tokenizer.json")
    assert isinstance(sp, SentencePieceTokenizer) and isinstance(hf, HFTokenizer)
    for t in (sp, hf):
        assert isinstance(t, Tokenizer)
        assert (t.bos_id, t.eos_id, t.vocab_size) == (1, 2, 2048)
    for para in _paragraphs(60):
        want = auto(para)["input_ids"]
        assert sp.encode(para) == want == hf.encode(para)
        assert sp.decode(want) == hf.decode(want) == auto.decode(want, skip_special_tokens=True)
    assert hf.encode("the dog", bos=False)[0] != hf.bos_id
    assert [p.name for p in hf.files()] == ["tokenizer.json", "tokenizer_config.json"]
    assert [p.name for p in load_tokenizer(TINYSTORIES).files()] == ["tokenizer.model"]


def test_load_tokenizer_errors(tmp_path) -> None:
    with pytest.raises(LoadError, match="nope.model"):
        load_tokenizer(tmp_path / "nope.model")
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(LoadError, match="x.txt: unknown tokenizer file type"):
        load_tokenizer(tmp_path / "x.txt")
    data = (STORIES260K / "tok512.bin").read_bytes()
    (tmp_path / "tok512.bin").write_bytes(data[: len(data) // 2])
    with pytest.raises(LoadError, match="tok512.bin"):
        load_tokenizer(tmp_path / "tok512.bin")
    (tmp_path / "bad.model").write_bytes(b"\x00garbage")
    with pytest.raises(LoadError, match="bad.model"):
        load_tokenizer(tmp_path / "bad.model")
    with pytest.raises(LoadError, match="neither tokenizer.model nor tokenizer.json"):
        load_tokenizer(tmp_path)


def _naive_merge(tok: Llama2cTokenizer, text: str) -> list[int]:
    """llama2.c's encode loop written out literally (rescan all pairs, strict '>' keeps the leftmost best)."""
    toks = [tok._lookup[b" "]] + [t for ch in text for t in ([tok._lookup[ch.encode()]] if ch.encode() in tok._lookup
                                                              else [x + 3 for x in ch.encode()])]
    while True:
        best, at = float("-inf"), -1
        for i in range(len(toks) - 1):
            tid = tok._lookup.get(tok.pieces[toks[i]] + tok.pieces[toks[i + 1]])
            if tid is not None and tok.scores[tid] > best:
                best, at, bid = tok.scores[tid], i, tid
        if at < 0:
            return toks
        toks[at:at + 2] = [bid]


def test_llama2c_heap_merge_equals_the_literal_loop(tmp_path) -> None:
    """The O(n log n) merge must pick exactly what llama2.c's rescanning loop picks, ties included: a vocabulary
    where many merges share one score, on random strings."""
    import random

    pieces = [b"<unk>", b"\n<s>\n", b"\n</s>\n"] + [f"<0x{b:02X}>".encode() for b in range(256)]
    extra = [b" ", b"a", b"b", b"c", b"aa", b"ab", b"ba", b"bb", b"aaa", b"aba", b" a", b" b", b"bab", b"abab",
             b"cc", b"ccc", b" c", b"bc"]
    scores = [0.0] * 259 + [0.0, 0.0, 0.0, 0.0, -1.0, -1.0, -1.0, -2.0, -1.0, -2.0, -2.0, -1.0, -3.0, -1.0,
                            -1.0, -1.0, -4.0, -2.0]
    tok = Llama2cTokenizer(_write_llama2c(tmp_path / "tok.bin", pieces + extra, scores))
    rng = random.Random(0)
    for _ in range(300):
        text = "".join(rng.choice("aabbc ") for _ in range(rng.randint(1, 40)))
        assert tok.encode(text, bos=False) == _naive_merge(tok, text), text
    real = load_tokenizer(STORIES260K / "tok512.bin")
    for para in _paragraphs(20):
        assert real.encode(para, bos=False) == _naive_merge(real, para)
