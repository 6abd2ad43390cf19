"""llama.cpp as a peer runtime: HF folder -> GGUF (f32) -> Q8_0 / Q4_0, and a latency runner.

Set up with ``bash benchmarks/setup_peers.sh`` (llama-cpp-python 0.3.36 built from source with GGML_NATIVE=ON, and
the conversion scripts of the same llama.cpp commit extracted to ``benchmarks/.cache/llama.cpp/``).

``LlamaCppLM.measure`` follows ``llmpress/eval/latency.py::measure`` step for step: the same random prompt
(``torch.randint(3, vocab, generator=manual_seed(seed))``), an empty KV cache per round, prefill = one
``llama_decode`` of the whole prompt (``n_batch = n_ubatch = n_ctx``, logits of the last token only), then greedy
decode one token per call (argmax of the logits, no sampler), timed with ``time.perf_counter``, one warm-up round,
medians via ``llmpress.eval.latency.summarize``. It drives llama.cpp's C API through llama-cpp-python's ctypes
bindings rather than the high-level ``Llama`` class: measured side by side (README.md) the class adds no time of
its own once both use the same settings, but it changes llama.cpp's defaults (``flash_attn=False`` where the C
default is ``auto`` = on, 10-20% of prefill), so the C API keeps every setting explicit and as llama.cpp ships it.
"""
from __future__ import annotations

import ctypes
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

__all__ = ["SCRIPTS", "FTYPES", "to_gguf", "quantize", "gguf_tensor_types", "LlamaCppLM"]

SCRIPTS = Path(__file__).resolve().parents[1] / ".cache" / "llama.cpp"  # extracted by setup_peers.sh
FTYPES = {"Q8_0": 7, "Q4_0": 2}  # LLAMA_FTYPE_MOSTLY_Q8_0, LLAMA_FTYPE_MOSTLY_Q4_0


def to_gguf(hf_folder: str | Path, out_path: str | Path, outtype: str = "f32") -> Path:
    """Convert a Hugging Face folder with llama.cpp's own ``convert_hf_to_gguf.py`` (kept as is: the same
    conversion a user runs); ``out_path`` is reused when it exists. Runs in a subprocess so that the script's
    ``gguf`` (vendored gguf-py) and its memory stay out of this process."""
    out = Path(out_path)
    if out.is_file():
        return out
    script = SCRIPTS / "convert_hf_to_gguf.py"
    if not script.is_file():
        raise FileNotFoundError(f"{script}: run `bash benchmarks/setup_peers.sh` first")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    cmd = [sys.executable, str(script), str(hf_folder), "--outfile", str(tmp), "--outtype", outtype]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0 or not tmp.is_file():
        raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stderr[-3000:]}")
    os.replace(tmp, out)
    return out


def quantize(src_gguf: str | Path, dst_gguf: str | Path, ftype: str) -> dict[str, str]:
    """``llama_model_quantize`` with llama.cpp's default parameters (what ``llama-quantize src dst Q4_0`` does);
    ``dst_gguf`` is reused when it exists. Returns the type of each tensor kind (see ``gguf_tensor_types``): the
    defaults do not quantize every tensor to ``ftype`` (e.g. ``output.weight`` gets Q6_K under Q4_0)."""
    dst = Path(dst_gguf)
    if not dst.is_file():
        import llama_cpp as L

        _quiet()
        L.llama_backend_init()
        params = L.llama_model_quantize_default_params()
        params.ftype = FTYPES[ftype]
        tmp = dst.with_name(dst.name + ".tmp")
        rc = L.llama_model_quantize(str(src_gguf).encode(), str(tmp).encode(), ctypes.byref(params))
        if rc != 0:
            raise RuntimeError(f"llama_model_quantize({src_gguf}, {ftype}) returned {rc}")
        os.replace(tmp, dst)
    return gguf_tensor_types(dst)


def gguf_tensor_types(path: str | Path) -> dict[str, str]:
    """Tensor type per kind of tensor (layer index dropped: ``blk.*.attn_q.weight`` -> ``Q4_0``; several types
    are joined with ``/``), read with the gguf-py of the same llama.cpp commit."""
    sys.path.insert(0, str(SCRIPTS / "gguf-py"))
    try:
        from gguf import GGUFReader
    finally:
        sys.path.pop(0)
    kinds: dict[str, set[str]] = {}
    for t in GGUFReader(str(path)).tensors:
        parts = t.name.split(".")
        key = ".".join("*" if p.isdigit() else p for p in parts)
        kinds.setdefault(key, set()).add(t.tensor_type.name)
    return {k: "/".join(sorted(v)) for k, v in kinds.items()}


def _quiet(verbose: bool = False) -> None:
    """llama-cpp-python routes llama.cpp's log through this logger; below ERROR it prints every load step."""
    logging.getLogger("llama-cpp-python").setLevel(logging.DEBUG if verbose else logging.ERROR)


class LlamaCppLM:
    """A GGUF model in a llama.cpp context on the CPU: ``n_threads = n_threads_batch = threads``, ``n_ctx`` KV
    cells (512 = llmpress's ``cache_len`` for the benchmark shapes), one batch holding a whole ``n_ctx`` prompt.

    Everything else is llama.cpp's default, as a user gets it: f16 KV cache, weights mmapped, and flash attention
    ``auto`` (which resolves to on for the CPU). ``flash_attn=False`` turns it off, as the high-level ``Llama``
    class does by default (that costs 10-20% of prefill on the 110m shape)."""

    def __init__(self, path: str | Path, threads: int, *, n_ctx: int = 512, flash_attn: bool | None = None,
                 verbose: bool = False) -> None:
        import llama_cpp as L

        _quiet(verbose)
        L.llama_backend_init()
        self.L, self.path, self.n_ctx, self.threads = L, Path(path), n_ctx, threads
        mp = L.llama_model_default_params()
        mp.n_gpu_layers = 0
        self.model = L.llama_model_load_from_file(str(self.path).encode(), mp)
        if not self.model:
            raise RuntimeError(f"{self.path}: llama.cpp cannot load the model")
        cp = L.llama_context_default_params()
        cp.n_ctx = cp.n_batch = cp.n_ubatch = n_ctx
        cp.n_threads = cp.n_threads_batch = threads
        cp.no_perf = True
        if flash_attn is not None:
            cp.flash_attn_type = L.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash_attn else L.LLAMA_FLASH_ATTN_TYPE_DISABLED
        self.ctx = L.llama_init_from_model(self.model, cp)
        if not self.ctx:
            raise RuntimeError(f"{self.path}: llama.cpp cannot create a context")
        self.n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(self.model))
        self.batch = L.llama_batch_init(n_ctx, 0, 1)

    def _fill(self, tokens: list[int], start: int) -> None:
        """One sequence (id 0) at positions ``start..``; logits for its last token only."""
        b = self.batch
        b.n_tokens = len(tokens)
        for i, t in enumerate(tokens):
            b.token[i] = t
            b.pos[i] = start + i
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = 0
            b.logits[i] = 0
        b.logits[len(tokens) - 1] = 1

    def _run(self) -> None:
        rc = self.L.llama_decode(self.ctx, self.batch)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")
        self.L.llama_synchronize(self.ctx)  # the CPU backend is synchronous; kept so the timing never depends on it

    def _argmax(self) -> int:
        logits = np.ctypeslib.as_array(self.L.llama_get_logits_ith(self.ctx, -1), shape=(self.n_vocab,))
        return int(logits.argmax())

    def reset(self) -> None:
        """Empty the KV cache (metadata and data), as ``empty_cache(lm)`` does for llmpress."""
        self.L.llama_memory_clear(self.L.llama_get_memory(self.ctx), True)

    def measure(self, prefill_tokens: int = 128, decode_tokens: int = 32, repeats: int = 1, seed: int = 0) -> dict:
        """Median prefill time (ms) and decode throughput (tokens/s) over ``repeats`` rounds after one warm-up."""
        from llmpress.eval.latency import summarize

        prefill_tokens = min(prefill_tokens, self.n_ctx - decode_tokens - 1)
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(3, self.n_vocab, (1, prefill_tokens), generator=g)[0].tolist()
        times, rates = [], []
        for r in range(repeats + 1):
            self.reset()
            self._fill(ids, 0)  # outside the timing, like llmpress's input tensor built before t0
            t0 = time.perf_counter()
            self._run()
            t1 = time.perf_counter()
            tok = self._argmax()
            t2 = time.perf_counter()
            for i in range(decode_tokens):
                self._fill([tok], prefill_tokens + i)
                self._run()
                tok = self._argmax()
            t3 = time.perf_counter()
            if r:  # the first round warms up caches, mmapped weights and lazy initialization
                times.append(t1 - t0)
                rates.append(decode_tokens / (t3 - t2))
        self.settle()
        return summarize(prefill_tokens, times, rates)

    @staticmethod
    def settle(cap_s: float = 0.2) -> float:
        """Wait until no other thread of this process is running (at most ``cap_s``); returns the seconds waited.

        llama.cpp's CPU backend runs each graph in an OpenMP parallel region (this build: OPENMP = 1), and libgomp's
        idle workers spin for GOMP_SPINCOUNT (300k, about 7.5 ms here) after ``llama_decode`` returns before they
        sleep, which slows whatever runs next in the process (a numpy matmul loop right after: +20%). A passive
        wait policy (OMP_WAIT_POLICY=PASSIVE) would stop that but makes ggml's per-op ``omp barrier`` sleep: decode
        falls to a third. So llama.cpp keeps its defaults while timed, and the spin is waited out afterwards."""
        from machine import settle

        return settle(cap_s)

    def close(self) -> None:
        """Free the batch, context and model (their memory is not Python's: the GC does not see it)."""
        if getattr(self, "batch", None) is not None:
            self.L.llama_batch_free(self.batch)
            self.batch = None
        if getattr(self, "ctx", None):
            self.L.llama_free(self.ctx)
            self.ctx = None
        if getattr(self, "model", None):
            self.L.llama_model_free(self.model)
            self.model = None

    def __enter__(self) -> LlamaCppLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    __del__ = close
