"""Cross builds: an arm64 library is an aarch64 ELF; a cuda build carries device code for the requested arch;
on a machine with an NVIDIA GPU, greedy generation through CUDA equals the reference."""
from __future__ import annotations

import shutil
import struct

import pytest
import torch

from llmpress.ir.capture import capture

pytestmark = pytest.mark.tvm

EM_AARCH64 = 183  # ELF e_machine of AArch64
FATBIN_MAGIC = 0xBA55ED50  # first word of an NVIDIA fatbin container


@pytest.fixture(scope="module")
def module():
    from tests.decoder import Llama, LlamaConfig

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, dim=32, n_layers=1, n_heads=4, n_kv_heads=2, hidden_dim=64, max_seq_len=32)
    return capture(Llama(cfg).eval())


def _reference(module):
    """The reference backend's program (PyTorch eager over the exported graph, unlifted once)."""
    from llmpress.backends import get_backend

    return get_backend("reference").lower(module, "reference")


def _elf_machine(path) -> int:
    head = path.read_bytes()[:20]
    assert head[:4] == b"\x7fELF", f"{path} is not an ELF file"
    endian = "<" if head[5] == 1 else ">"
    return struct.unpack(endian + "H", head[18:20])[0]


@pytest.mark.skipif(shutil.which("aarch64-linux-gnu-g++") is None,
                    reason="aarch64-linux-gnu-g++ is not installed (apt-get install -y g++-aarch64-linux-gnu)")
def test_arm64_build_is_aarch64_elf(module, tmp_path):
    from llmpress.backends.tvm import TVMBackend

    compiled = TVMBackend().lower(module, "arm64", progress=False)
    assert not compiled.runnable_here or compiled.spec.arch == "aarch64"
    payload = compiled.save_payload(tmp_path)
    assert payload["arch"] == "aarch64"
    assert _elf_machine(tmp_path / "model.so") == EM_AARCH64


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed: CUDA device code cannot be built")
def test_cuda_build_holds_sm80_device_code(module, tmp_path):
    from llmpress.backends.tvm import TVMBackend
    from llmpress.backends.tvm.build import cuda_sources, source_key

    compiled = TVMBackend().lower(module, "cuda", progress=False)
    srcs = cuda_sources(compiled.executable)
    assert len(srcs) == 1 and "__global__" in srcs[0]  # the kernels, as CUDA C in the library
    ptx = compiled.device_code["ptx"].decode()
    assert ".target sm_80" in ptx and ".entry" in ptx
    assert compiled.device_code["source_sha256"] == source_key(srcs[0])
    payload = compiled.save_payload(tmp_path)
    assert payload["device"] == "cuda" and payload["device_code"]["arch"] == "sm_80"
    fatbin = (tmp_path / payload["device_code"]["fatbin"]).read_bytes()
    assert struct.unpack("<I", fatbin[:4])[0] == FATBIN_MAGIC
    assert _elf_machine(tmp_path / "model.so") == 62  # the host side is x86-64


def test_cuda_compile_hook_answers_with_precompiled_code():
    """At load on a GPU machine TVM asks ``tvm_callback_cuda_compile`` to compile the library's CUDA source; the
    hook answers with the fatbin built at compile time for that exact source, and defers to TVM otherwise."""
    import tvm_ffi

    from llmpress.backends.tvm import runtime
    from llmpress.backends.tvm.build import source_key

    src = "extern \"C\" __global__ void llmpress_probe() {}\n"
    runtime._PRECOMPILED[source_key(src)] = b"FATBIN-BYTES"
    runtime._install_cuda_hook()
    hook = tvm_ffi.get_global_func("tvm_callback_cuda_compile")
    assert bytes(hook(src)) == b"FATBIN-BYTES"
    del runtime._PRECOMPILED[source_key(src)]


def _gpu() -> bool:
    try:
        import tvm

        return bool(tvm.cuda(0).exist)
    except Exception:  # noqa: BLE001
        return False


@pytest.mark.cuda
@pytest.mark.skipif(not _gpu(), reason="no CUDA GPU visible to TVM")
def test_cuda_greedy_matches_reference(module, tmp_path):
    from llmpress.backends.tvm import TVMBackend
    from llmpress.eval.generate import greedy

    compiled = TVMBackend().lower(module, "cuda", progress=False)
    ref = greedy(_reference(module), module.lm, [1, 5], 20)
    assert greedy(compiled, module.lm, [1, 5], 20) == ref
    payload = compiled.save_payload(tmp_path)
    loaded = TVMBackend().load(tmp_path, {"payload": payload, "lm": module.lm.to_json()})
    assert greedy(loaded, module.lm, [1, 5], 20) == ref


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed: CUDA device code cannot be built")
def test_cuda_build_of_a_gemma2_model(tmp_path):
    """A non-Llama family builds for ``cuda`` with its device code: Gemma 2 (soft-capped scores masked with the
    boolean causal mask, sandwich norms, soft-capped logits), 1 layer. Its masking once reached nvcc as a vectorized
    ``!`` of a ``ushort2`` and failed to compile. Compile only: no GPU here."""
    from llmpress.backends.tvm import TVMBackend
    from llmpress.ir.loaders import load_model

    from ..ir.test_hf_families import GEMMA2, _save

    model = load_model(_save(tmp_path / "gemma2", "gemma2", num_hidden_layers=1, **GEMMA2)).model
    compiled = TVMBackend().lower(capture(model), "cuda", progress=False)
    assert ".target sm_80" in compiled.device_code["ptx"].decode()
    (tmp_path / "art").mkdir()
    payload = compiled.save_payload(tmp_path / "art")
    assert payload["device"] == "cuda" and payload["device_code"]["arch"] == "sm_80"
    assert struct.unpack("<I", (tmp_path / "art" / payload["device_code"]["fatbin"]).read_bytes()[:4])[0] == FATBIN_MAGIC
