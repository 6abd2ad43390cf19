"""Write a tokenizer in the llama2.c ``tok*.bin`` layout, the one format the C++ edge runner reads.

Layout (little-endian): ``int32 max_token_length``, then for every id ``0 .. vocab-1`` a ``float32 score``, an
``int32 byte length`` and the UTF-8 bytes of the piece. From a sentencepiece BPE model the piece text has ``▁``
(U+2581) turned into a plain space, byte-fallback pieces keep their ``<0xAB>`` spelling, BOS/EOS are written as
``"\\n<s>\\n"`` / ``"\\n</s>\\n"`` (as llama2.c's own ``tokenizer.py`` export does) and the score is sentencepiece's
piece score (for BPE: the merge priority). With these, llama2.c's greedy "merge the best-scoring adjacent pair"
encoding reproduces sentencepiece BPE encoding, and decoding is plain concatenation.

A llama2.c tokenizer is copied as it is.

Sentencepiece also normalizes the text before encoding; for models whose normalizer has
``remove_extra_whitespaces`` (Llama's do) runs of spaces collapse to one and leading/trailing spaces go. The runner
does the same when the manifest says ``"edge_tokenizer_normalize": true`` (``edge_tokenizer_manifest`` returns it).
"""
from __future__ import annotations

import logging
import shutil
import struct
from pathlib import Path
from typing import Any

from ...errors import ConfigError

__all__ = ["write_llama2c_tokenizer", "edge_tokenizer_manifest", "EDGE_TOKENIZER"]

log = logging.getLogger(__name__)

#: The name the edge tokenizer gets inside an artifact folder (``manifest["edge_tokenizer"]`` points at it).
EDGE_TOKENIZER = "tokenizer/edge_tok.bin"


def _sentencepiece_processor(tokenizer: Any):
    """The ``SentencePieceProcessor`` behind ``tokenizer`` (a llmpress tokenizer, a processor, or a .model path)."""
    import sentencepiece as spm

    if isinstance(tokenizer, spm.SentencePieceProcessor):
        return tokenizer
    if hasattr(tokenizer, "sp") and isinstance(tokenizer.sp, spm.SentencePieceProcessor):
        return tokenizer.sp
    if isinstance(tokenizer, (str, Path)) and Path(tokenizer).suffix == ".model":
        return spm.SentencePieceProcessor(model_file=str(tokenizer))
    # A Hugging Face tokenizer.json whose folder also holds the sentencepiece model it was made from.
    path = getattr(tokenizer, "path", None)
    if path is not None and (Path(path).parent / "tokenizer.model").is_file():
        return spm.SentencePieceProcessor(model_file=str(Path(path).parent / "tokenizer.model"))
    return None


def write_llama2c_tokenizer(tokenizer: Any, path: str | Path) -> Path:
    """Write ``tokenizer`` to ``path`` in the llama2.c layout; returns ``path``.

    ``tokenizer``: a ``SentencePieceTokenizer`` (or a ``SentencePieceProcessor``, or a ``.model`` path), a
    ``Llama2cTokenizer`` (copied), or an ``HFTokenizer`` whose folder holds ``tokenizer.model``.
    """
    from ...tokenizer import Llama2cTokenizer

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(tokenizer, Llama2cTokenizer):
        shutil.copyfile(tokenizer.path, path)
        return path
    sp = _sentencepiece_processor(tokenizer)
    if sp is None:
        raise ConfigError(f"cannot write a {type(tokenizer).__name__} as a llama2.c tokenizer for the edge runner: "
                          "it needs a sentencepiece model (tokenizer.model) or a llama2.c tok*.bin")
    records: list[tuple[float, bytes]] = []
    for i in range(sp.get_piece_size()):
        if i == sp.bos_id():
            text = "\n<s>\n"
        elif i == sp.eos_id():
            text = "\n</s>\n"
        else:
            text = sp.id_to_piece(i).replace("\u2581", " ")
        records.append((float(sp.get_score(i)), text.encode("utf-8")))
    max_len = max(len(b) for _, b in records)
    with open(path, "wb") as f:
        f.write(struct.pack("<i", max_len))
        for score, b in records:
            f.write(struct.pack("<fi", score, len(b)))
            f.write(b)
    log.info("wrote the %d-piece edge tokenizer to %s", len(records), path)
    return path


def _removes_extra_whitespaces(sp) -> bool:
    try:
        from sentencepiece import sentencepiece_model_pb2 as pb

        proto = pb.ModelProto()
        proto.ParseFromString(sp.serialized_model_proto())
        return bool(proto.normalizer_spec.remove_extra_whitespaces)
    except Exception:  # noqa: BLE001 - older sentencepiece without the proto module: assume the default (True)
        return True


def edge_tokenizer_manifest(tokenizer: Any, folder: str | Path) -> dict:
    """Write ``folder/EDGE_TOKENIZER`` and return the manifest entries that point the runner at it:
    ``{"edge_tokenizer": "tokenizer/edge_tok.bin", "edge_tokenizer_normalize": bool}``.

    A tokenizer with no llama2.c form (a byte-level BPE ``tokenizer.json`` alone: GPT-2, Qwen) gets none: ``{}``
    and a warning. The artifact still saves and runs everywhere; the C++ runner then takes ``--prompt-ids`` and
    ``--print-ids`` (it says so when asked for text)."""
    from ...tokenizer import Llama2cTokenizer

    if not isinstance(tokenizer, Llama2cTokenizer) and _sentencepiece_processor(tokenizer) is None:
        log.warning("the %s tokenizer (%s) has no llama2.c form: the C++ edge runner will read and print token ids "
                    "only (--prompt-ids, --print-ids)", type(tokenizer).__name__, getattr(tokenizer, "path", "?"))
        return {}
    write_llama2c_tokenizer(tokenizer, Path(folder) / EDGE_TOKENIZER)
    normalize = False
    if not isinstance(tokenizer, Llama2cTokenizer):
        normalize = _removes_extra_whitespaces(_sentencepiece_processor(tokenizer))
    return {"edge_tokenizer": EDGE_TOKENIZER, "edge_tokenizer_normalize": normalize}
