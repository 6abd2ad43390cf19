"""The runtimes ``speed.py`` times end to end, each built the way its users build it.

Every runtime is a ``Runtime``: a name, the bytes of weights it reads per decoded token (every weight but the
token-embedding table, of which one row is read, unless the output layer reads that same table: tied embeddings;
a tied table the output layer reads through a copy of its own, repacked, transposed or quantized, counts as an
embedding table),
its compile / conversion time, and ``measure(prefill, decode)``
doing one round of ``llmpress.eval.latency.measure``'s protocol (a random prompt of ``prefill`` ids from a fixed
seed, an empty KV cache, one prefill call, then ``decode`` greedy one-token steps).

- ``PyTorch eager``: Hugging Face ``transformers`` ``LlamaForCausalLM``, fp32, its own dynamic KV cache;
- ``llmpress <pipeline>``: ``llmpress compile MODEL --pipeline P --target cpu`` run as a command (timed: that is
  the compile time a user waits), then ``llmpress.load`` of the artifact; the build that runs is the most capable
  one the CPU supports (the ``build`` field);
- ``ONNX Runtime fp32``: llmpress's ONNX export of the captured model (written by a child process, timed);
  ``ONNX Runtime int4``: ORT's own ``MatMulNBitsQuantizer`` on that file (``peers/ort_int4.py``);
- ``llama.cpp f32 / Q8_0 / Q4_0``: llama.cpp's ``convert_hf_to_gguf.py`` + ``llama_model_quantize`` defaults
  (``peers/llamacpp.py``), when llama-cpp-python is installed (``benchmarks/setup_peers.sh``).

Files are made first (``*_prepare``, ``llmpress_compile``: the compiles and conversions, in child processes where
they hold a model in memory), then loaded (``*_runtimes``): a 1.1B run never holds a converter's memory beside
four loaded runtimes. Conversions are cached under ``benchmarks/.cache`` (GGUF, ONNX) and timed only when they
ran in this process.
"""
from __future__ import annotations

import gc
import json
import logging
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

__all__ = ["Runtime", "torch_eager", "llmpress_compile", "llmpress_runtime", "ort_prepare", "ort_runtimes",
           "llamacpp_prepare", "llamacpp_runtimes", "CACHE"]

log = logging.getLogger("benchmarks.runtimes")

ROOT = Path(__file__).resolve().parent
CACHE = ROOT / ".cache"
PYTHON = sys.executable


@dataclass
class Runtime:
    name: str
    group: str  # rows timed together: "fp32" or "quantized"
    weight_bytes: int  # read per decoded token
    measure: Callable[[int, int], dict]
    compile_s: float | None = None
    info: dict = field(default_factory=dict)
    close: Callable[[], None] = lambda: None


def _cmd(args: list[str], what: str) -> float:
    t0 = time.perf_counter()
    r = subprocess.run(args, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{what} failed ({r.returncode}): {r.stderr.strip()[-1500:]}")
    return time.perf_counter() - t0


def _is_embedding(name: str) -> bool:
    return "embed_tokens" in name or name.startswith("token_embd")


def torch_eager(folder: Path, threads: int) -> Runtime:
    from transformers import AutoModelForCausalLM

    from llmpress.eval.latency import summarize

    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    vocab = model.config.vocab_size
    tied = bool(getattr(model.config, "tie_word_embeddings", False))  # then the lm_head reads the whole table
    nbytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if tied or not _is_embedding(n))

    def measure(prefill: int, decode: int) -> dict:
        ids = torch.randint(3, vocab, (1, prefill), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            t0 = time.perf_counter()
            out = model(input_ids=ids, use_cache=True)
            t1 = time.perf_counter()
            past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
            t2 = time.perf_counter()
            for _ in range(decode):
                out = model(input_ids=tok, past_key_values=past, use_cache=True)
                past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
            t3 = time.perf_counter()
        return summarize(prefill, [t1 - t0], [decode / (t3 - t2)])

    def close() -> None:
        nonlocal model
        model = None
        gc.collect()

    return Runtime("PyTorch eager fp32", "fp32", nbytes, measure, info={"threads": threads}, close=close)


def llmpress_compile(folder: Path, pipeline: str, out: Path, options: dict | None = None) -> float:
    """``llmpress compile`` as a command (the compile time a user waits); returns its wall seconds. ``options``:
    ``--backend-option KEY=VALUE`` settings."""
    exe = str(Path(PYTHON).with_name("llmpress"))
    args = [exe, "compile", str(folder), "--target", "cpu", "-o", str(out), "-q", "--force",  # reruns replace it
            "--pipeline", pipeline or "dce"]
    for k, v in (options or {}).items():
        args += ["--backend-option", f"{k}={str(v).lower() if isinstance(v, bool) else v}"]
    return _cmd(args, f"llmpress compile {pipeline!r}")


def llmpress_runtime(label: str, pipeline: str, group: str, threads: int, out: Path,
                     compile_s: float | None) -> Runtime:
    """The artifact ``out`` (compiled by ``llmpress_compile``) loaded with ``llmpress.load``."""
    import llmpress
    from llmpress.eval.latency import measure as lm_measure
    from safetensors import safe_open

    art = llmpress.load(out, threads=threads)
    nbytes = 0
    # Weights stored compressed (sparse_storage: ``W#values`` + ``W#mask``) are expanded at load: the kernels read
    # their dense bytes every token.
    sparse = art.manifest["payload"].get("sparse_weights") or {}
    with safe_open(str(out / art.manifest["payload"]["weights"]), "pt") as f:
        names = list(dict.fromkeys(n.split("#")[0] if n.split("#")[0] in sparse else n for n in f.keys()))
        for name in names:
            if name in sparse:
                nbytes += 0 if _is_embedding(name) else int(sparse[name]["dense_bytes"])
                continue
            # a float table with a kernel copy (``W@k``, or ``qweight`` tiles of a quantized head) is read by the
            # copy; the table itself serves the embedding lookup only (a tied ``lm_head.weight``): one row a token
            copied = any(o != name and (o.startswith(name + "@") or o.startswith(name.replace(".weight", ".qweight")))
                         for o in names)
            if not _is_embedding(name) and not copied:
                t = f.get_slice(name)
                nbytes += torch.Size(t.get_shape()).numel() * torch.empty(0, dtype=_dtype(t.get_dtype())).element_size()
    lm = art.lm

    def measure(prefill: int, decode: int) -> dict:
        return lm_measure(art.compiled.forward_last, lm, prefill_tokens=prefill, decode_tokens=decode, repeats=1)

    info = {"pipeline": pipeline, "build": art.compiled.running.name, "threads": threads}
    return Runtime(f"llmpress {label}", group, nbytes, measure, compile_s, info)


def _dtype(st: str) -> torch.dtype:
    return {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I8": torch.int8, "U8": torch.uint8,
            "I32": torch.int32, "I64": torch.int64}[st]


def _onnx_bytes(path: Path) -> int:
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    names = {t.name for t in m.graph.initializer}
    total = 0
    for t in m.graph.initializer:
        # a tied table whose transposed (and maybe quantized) copy the head reads: ``lm_head.weight.T[_Q4]``
        if _is_embedding(t.name) or any(o.startswith(t.name + ".T") for o in names):
            continue
        n = 1
        for d in t.dims:
            n *= d
        total += n * {1: 4, 2: 1, 3: 1, 10: 2, 6: 4, 7: 8}.get(t.data_type, 4)
    return total


def ort_prepare(folder: Path, name: str, levels: tuple[int, ...] = (4,)) -> dict[str, float | None]:
    """Write llmpress's fp32 ONNX export (a child process) and ORT's int4 quantizations of it, unless cached;
    returns the seconds each took (None: cached)."""
    from peers.ort_int4 import quantize_int4

    fp32 = CACHE / "onnx" / name / "model.onnx"
    times: dict[str, float | None] = {"fp32": None}
    if not fp32.is_file():
        fp32.parent.mkdir(parents=True, exist_ok=True)
        code = ("import llmpress; from llmpress.ir.capture import capture; from llmpress.backends.onnx import export;"
                f"m = capture(llmpress.load_model({str(folder)!r}).model); export(m, {str(fp32)!r})")
        times["fp32"] = _cmd([PYTHON, "-c", code], "ONNX export")
    for level in levels:
        path = CACHE / "onnx" / name / f"int4-acc{level}.onnx"
        t0 = time.perf_counter()
        existed = path.is_file()
        if not existed:
            quantize_int4(fp32, path, block_size=128, accuracy_level=level)
        times[f"int4-acc{level}"] = None if existed else time.perf_counter() - t0
    return times


def ort_runtimes(name: str, threads: int, group: str, times: dict[str, float | None]) -> list[Runtime]:
    """ONNX Runtime on the files of ``ort_prepare``: fp32 (group ``fp32``) or int4 (``quantized``)."""
    from llmpress.backends.onnx import OrtProgram
    from llmpress.eval.latency import measure as lm_measure

    base = CACHE / "onnx" / name
    if group == "fp32":
        prog = OrtProgram(base / "model.onnx", threads=threads)
        return [_ort(prog, "ONNX Runtime fp32", "fp32", _onnx_bytes(base / "model.onnx"), times.get("fp32"),
                     lm_measure)]
    out = []
    for key, t in times.items():
        if key.startswith("int4"):
            path = base / f"{key}.onnx"
            out.append(_ort(OrtProgram(path, threads=threads), f"ONNX Runtime int4 {key.split('-')[1]}",
                            "quantized", _onnx_bytes(path), t, lm_measure))
    return out


def _ort(prog: Any, label: str, group: str, nbytes: int, compile_s: float | None, lm_measure) -> Runtime:
    def measure(prefill: int, decode: int) -> dict:
        return lm_measure(prog.forward, prog.lm, prefill_tokens=prefill, decode_tokens=decode, repeats=1)

    return Runtime(label, group, nbytes, measure, compile_s, {"file": str(prog.path)})


def llamacpp_prepare(folder: Path, name: str) -> dict[str, float | None]:
    """GGUF f32 (llama.cpp's converter, a child process) and its Q8_0 / Q4_0 quantizations, unless cached; raises
    ImportError when llama-cpp-python is not installed. Returns the seconds each took (None: cached)."""
    import llama_cpp  # noqa: F401 - fail early, with the import error, when the peer is not installed
    from peers.llamacpp import quantize, to_gguf

    f32 = CACHE / "gguf" / f"{name}-f32.gguf"
    times: dict[str, float | None] = {}
    for ftype in ("f32", "Q8_0", "Q4_0"):
        path = CACHE / "gguf" / f"{name}-{ftype}.gguf"
        existed = path.is_file()
        t0 = time.perf_counter()
        to_gguf(folder, f32, "f32") if ftype == "f32" else quantize(f32, path, ftype)
        times[ftype] = None if existed else time.perf_counter() - t0
    return times


def llamacpp_runtimes(name: str, threads: int, group: str, times: dict[str, float | None]) -> list[Runtime]:
    """llama.cpp f32 (group ``fp32``) or Q8_0 / Q4_0 (``quantized``) on the files of ``llamacpp_prepare``."""
    from peers.llamacpp import LlamaCppLM, gguf_tensor_types

    out = []
    for ftype in ("f32",) if group == "fp32" else ("Q8_0", "Q4_0"):
        path = CACHE / "gguf" / f"{name}-{ftype}.gguf"
        lm = LlamaCppLM(path, threads)

        def measure(prefill: int, decode: int, lm=lm) -> dict:
            return lm.measure(prefill_tokens=prefill, decode_tokens=decode, repeats=1)

        out.append(Runtime(f"llama.cpp {ftype}", group, _gguf_bytes(path), measure, times.get(ftype),
                           {"types": gguf_tensor_types(path)}, close=lm.close))
    return out


def _gguf_bytes(path: Path) -> int:
    from peers.llamacpp import SCRIPTS

    sys.path.insert(0, str(SCRIPTS / "gguf-py"))
    try:
        from gguf import GGUFReader
    finally:
        sys.path.pop(0)
    tensors = GGUFReader(str(path)).tensors
    tied = not any(t.name == "output.weight" for t in tensors)  # the output layer reads token_embd itself
    return sum(int(t.n_bytes) for t in tensors if tied or not _is_embedding(t.name))


def dump(rows: list[dict], path: Path) -> None:
    path.write_text(json.dumps(rows, indent=2) + "\n")
