"""Benchmark model shapes: Hugging Face Llama folders with random weights, built locally and cached.

Speed does not depend on weight values, but it does depend on shapes, and a model whose activations blow up or
vanish can take different paths (denormals, NaN checks), so the weights follow a trained model's scale:
normal(0, 0.02) for every matrix, 1 for every RMSNorm weight, from ``torch.Generator().manual_seed(0)`` in the order
of ``LlamaForCausalLM.state_dict()``.

``llama_folder(name)`` writes ``benchmarks/.cache/models/<name>/`` once and returns it:

- ``config.json`` from ``transformers.LlamaConfig`` (``LlamaForCausalLM``, fp32);
- ``model.safetensors`` (fp32), streamed tensor by tensor with the tensor names and shapes of a ``LlamaForCausalLM``
  built on the meta device: the 1.1B model (4.4 GB) is never held in memory, not even once (``save_pretrained``
  would hold the model plus a serialized copy of it);
- ``tokenizer.model``: a synthetic sentencepiece BPE model of exactly ``vocab_size`` pieces (``<unk>`` ``<s>``
  ``</s>``, the 256 byte pieces ``<0x00>``..``<0xFF>`` as in Llama, then made-up letter strings). llama.cpp's
  ``convert_hf_to_gguf.py`` needs a tokenizer to write the GGUF vocabulary, and ``llmpress.load_model`` picks it up
  too. It is valid (sentencepiece loads it, encodes and decodes) but meaningless: benchmarks feed random token ids.

Shapes (``SHAPES``): ``"110m"`` is llama2.c's stories110M (dim 768, 12 layers, 12 heads, tied embeddings: the
110M parameters of its name count the embedding once); ``"1.1b"`` is TinyLlama-1.1B (dim 2048, 22 layers, 32 query
and 4 KV heads, untied embeddings). Both have ``max_position_embeddings`` 512, which is llmpress's static KV-cache
length (``cache_len``), matched by ``n_ctx=512`` in the llama.cpp peer.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import struct
from pathlib import Path
from typing import Any

import torch

__all__ = ["SHAPES", "CACHE", "llama_folder", "write_tokenizer"]

CACHE = Path(__file__).resolve().parent / ".cache" / "models"

SHAPES: dict[str, dict[str, Any]] = {
    "110m": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=12,
                 intermediate_size=2048, vocab_size=32000, max_position_embeddings=512, rms_norm_eps=1e-5,
                 rope_theta=10000.0, tie_word_embeddings=True),
    "1.1b": dict(hidden_size=2048, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4,
                 intermediate_size=5632, vocab_size=32000, max_position_embeddings=512, rms_norm_eps=1e-5,
                 rope_theta=10000.0, tie_word_embeddings=False),
}
_DONE = ".complete"  # written last: a folder without it is a build that was interrupted


def llama_folder(name: str) -> Path:
    """The cached Hugging Face Llama folder of shape ``name`` (one of ``SHAPES``), built on first use."""
    if name not in SHAPES:
        raise KeyError(f"unknown shape {name!r}; known: {', '.join(SHAPES)}")
    folder = CACHE / name
    if (folder / _DONE).is_file():
        return folder
    tmp = folder.with_name(name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    config = _config(name)
    config.save_pretrained(tmp)
    _write_weights(config, tmp / "model.safetensors")
    write_tokenizer(tmp / "tokenizer.model", config.vocab_size)
    (tmp / _DONE).write_text(json.dumps({"shape": name, "seed": 0, "std": 0.02}) + "\n")
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    return folder


def _config(name: str):
    from transformers import LlamaConfig

    return LlamaConfig(**SHAPES[name], hidden_act="silu", bos_token_id=1, eos_token_id=2, torch_dtype="float32",
                       architectures=["LlamaForCausalLM"])


def _write_weights(config, path: Path) -> None:
    """Stream a safetensors file of random weights; peak memory is one tensor (the 262 MB embedding at most)."""
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    # state_dict() lists a tied lm_head too; save_pretrained drops it, and so do we
    tensors = {k: tuple(v.shape) for k, v in model.state_dict().items()
               if not (config.tie_word_embeddings and k == "lm_head.weight")}
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for k, shape in tensors.items():
        n = 4 * math.prod(shape)
        header[k] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # safetensors pads the header so that the data is 8-byte aligned
    g = torch.Generator().manual_seed(0)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for k, shape in tensors.items():
            if len(shape) == 1:  # RMSNorm weights
                t = torch.ones(shape)
            else:
                t = torch.empty(shape).normal_(0.0, 0.02, generator=g)
            f.write(t.numpy().data)


def write_tokenizer(path: Path, vocab_size: int) -> None:
    """A valid sentencepiece BPE model with ``vocab_size`` pieces laid out like Llama's (ids 0-2 special, 3-258
    bytes), the rest distinct made-up strings; written from the protobuf directly, no training or download."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    sp = pb.ModelProto.SentencePiece
    m = pb.ModelProto()
    for piece, kind in (("<unk>", sp.UNKNOWN), ("<s>", sp.CONTROL), ("</s>", sp.CONTROL)):
        m.pieces.add(piece=piece, score=0.0, type=kind)
    for b in range(256):
        m.pieces.add(piece=f"<0x{b:02X}>", score=0.0, type=sp.BYTE)
    letters = "abcdefghijklmnopqrstuvwxyz"
    n_normal = vocab_size - len(m.pieces)
    words: list[str] = []
    width = 1
    while len(words) < n_normal:  # "▁a".."▁z", "a".."z", then two letters, ... until the vocabulary is full
        for i in range(len(letters) ** width):
            s = "".join(letters[(i // len(letters) ** j) % len(letters)] for j in reversed(range(width)))
            words += ["\u2581" + s, s]
        width += 1
    for i, w in enumerate(words[:n_normal]):
        m.pieces.add(piece=w, score=-float(i), type=sp.NORMAL)
    t = m.trainer_spec
    t.model_type = pb.TrainerSpec.BPE
    t.vocab_size = vocab_size
    t.byte_fallback = True
    t.unk_id, t.bos_id, t.eos_id, t.pad_id = 0, 1, 2, -1
    n = m.normalizer_spec
    n.name = "identity"
    n.add_dummy_prefix = True
    n.remove_extra_whitespaces = False
    n.escape_whitespaces = True
    path.write_bytes(m.SerializeToString())


if __name__ == "__main__":
    import sys

    for arg in sys.argv[1:] or list(SHAPES):
        print(llama_folder(arg))
