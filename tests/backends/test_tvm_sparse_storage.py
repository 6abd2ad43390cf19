"""Sparse weights stored compressed in TVM artifacts (``backends/tvm/sparse_storage.py``).

- the bitmask format round-trips bit-for-bit (float32, bfloat16, int4 codes with 2:4 zeros, int8) and refuses data
  that does not match its record;
- one ``cpu`` build of a small Llama whose MLPs are sparsified 2:4 then quantized to int4 and whose attention is 50%
  unstructured float: exactly the sparsified weights are stored compressed (int4 codes as 4-bit elements with fill
  code 8, floats with fill +0.0), the weights file is smaller than the same weights stored dense by what the records
  say, and the loaded artifact's weights and logits equal the in-memory program's bit-for-bit;
- the C++ edge runner expands them too: natively (``cpu``) and under qemu (``arm64``), same greedy ids;
- ``llmpress inspect`` reports them;
- dense float weights and dense int4 codes store nothing compressed (it would not pay).
"""
from __future__ import annotations

import json

import pytest
import torch

import llmpress
from llmpress.backends.tvm.sparse_storage import decode, encode
from llmpress.errors import ArtifactError

from ..conftest import llama_inputs


def _roundtrip(t: torch.Tensor) -> dict:
    enc = encode(t)
    assert enc is not None, "a half-sparse tensor should be stored compressed"
    tensors, rec = enc
    back = decode(rec, tensors["values"], tensors["mask"])
    assert back.dtype == t.dtype and back.shape == t.shape
    assert torch.equal(back.reshape(-1).view(torch.uint8), t.reshape(-1).view(torch.uint8))  # bit-identical
    assert rec["stored_bytes"] == tensors["values"].numel() + tensors["mask"].numel()
    return rec


def test_bitmask_roundtrip_is_bit_identical() -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(96, 128, generator=g)
    w[torch.rand(w.shape, generator=g) < 0.5] = 0.0
    w[0, 0] = -0.0  # not the fill (+0.0): must come back as -0.0
    rec = _roundtrip(w)
    assert rec["elem_bits"] == 32 and rec["fill"] == 0 and rec["stored_bytes"] < 0.6 * rec["dense_bytes"]
    assert _roundtrip(w.to(torch.bfloat16))["elem_bits"] == 16
    # int4 codes (symmetric: 0 is code 8), 2 of every 4 consecutive inputs pruned at random positions, packed 2/byte
    codes = torch.randint(0, 16, (64, 128), generator=g)
    drop = torch.rand(64, 32, 4, generator=g).argsort(dim=-1)[..., :2]
    codes.view(64, 32, 4).scatter_(-1, drop, 8)
    packed = (codes[:, 0::2] | (codes[:, 1::2] << 4)).to(torch.uint8)
    rec = _roundtrip(packed)
    assert (rec["elem_bits"], rec["fill"]) == (4, 8)
    assert rec["stored_bytes"] <= 0.76 * rec["dense_bytes"]  # 2 + 1 bits per weight instead of 4
    q8 = torch.randint(-127, 128, (64, 128), generator=g, dtype=torch.int8)
    q8[torch.rand(q8.shape, generator=g) < 0.5] = 0
    assert _roundtrip(q8)["elem_bits"] == 8


def test_dense_tensors_stay_dense_and_bad_records_are_refused() -> None:
    g = torch.Generator().manual_seed(1)
    assert encode(torch.randn(64, 128, generator=g)) is None
    assert encode(torch.randint(0, 256, (64, 64), generator=g, dtype=torch.uint8)) is None
    w = torch.randn(64, 128, generator=g)
    w[:, ::2] = 0
    tensors, rec = encode(w)
    with pytest.raises(ArtifactError, match="does not match"):
        decode(rec, tensors["values"][:-4], tensors["mask"], "w")
    with pytest.raises(ArtifactError, match="unknown sparse weight format"):
        decode({**rec, "format": "csr"}, tensors["values"], tensors["mask"], "w")


# -- compiled for cpu ------------------------------------------------------------------------------------------------

def _llama():
    """A small Llama whose int4 linears take the CPU kernels' tiled layout (in % 64 == 0, out % 4 == 0) and are big
    enough for compression to pay (the smallest, 128 x 64 int4 codes, is 4 KiB)."""
    from tests.decoder import Llama, LlamaConfig

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, dim=128, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=256, max_seq_len=32)
    return Llama(cfg).eval()


MIXED = ("sparsify(method=magnitude,pattern=2:4,include=*.mlp.*),sparsify(method=magnitude,sparsity=0.5,"
         "include=*.self_attn.*),quantize(bits=4,group=32,include=*.mlp.*)")


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """One cpu build covering the three cases (a TVM build per case would triple the time): MLPs 2:4 + int4,
    attention 50% unstructured float, lm_head and embeddings dense. (model, in-memory artifact, saved folder)."""
    model = _llama()
    art = llmpress.compile(model, pipeline=MIXED, target="cpu", progress=False)
    return model, art, art.save(tmp_path_factory.mktemp("sparse") / "a")


@pytest.mark.tvm
def test_sparse_artifact_is_smaller_and_loads_bit_identical(mixed, tmp_path) -> None:
    from safetensors.torch import save_file

    model, art, folder = mixed
    manifest = json.loads((folder / "manifest.json").read_text())
    records = manifest["payload"]["sparse_weights"]
    sparse_layers = {path for p in art.passes if p["name"] == "sparsify" for path in p["stats"]["layers"]}
    assert len(sparse_layers) == 14, sparse_layers  # 2 layers x (q, k, v, o, gate, up, down)
    # exactly the tensors of the sparsified linears are compressed: each one's weight (in its kernel layout), not
    # its scales, nor lm_head, the embeddings, the norms
    owner = {name: next((p for p in sparse_layers if name.startswith(p + ".")), None) for name in records}
    assert None not in owner.values(), owner
    assert set(owner.values()) == sparse_layers
    for name, r in records.items():
        if ".mlp." in name:  # the CPU kernels' tiled int4 codes; a pruned weight is code 8 (symmetric)
            assert name.endswith(".qweight@0") and (r["elem_bits"], r["fill"], r["dtype"]) == (4, 8, "uint8"), r
            assert r["stored_bytes"] <= 0.76 * r["dense_bytes"], r
        else:  # float weights: +0.0 bit patterns
            assert (r["elem_bits"], r["fill"], r["dtype"]) == (32, 0, "float32"), r
            assert r["stored_bytes"] <= 0.56 * r["dense_bytes"], r
    # the file is smaller than the same weights stored dense (what the artifact held before), by what records say
    prog = art.compiled
    dense = {n: prog.weights[n].contiguous().clone() for n in dict.fromkeys(prog.params)}
    save_file(dense, str(tmp_path / "dense.safetensors"))
    size, dsize = (folder / "weights.safetensors").stat().st_size, (tmp_path / "dense.safetensors").stat().st_size
    saved = sum(r["dense_bytes"] - r["stored_bytes"] for r in records.values())
    assert size < dsize - 0.9 * saved, (size, dsize, saved)
    want = art(*llama_inputs(model, t=12))[0]  # fresh inputs per call: the CPU program writes the caches in place
    with llmpress.load(folder) as loaded:
        for name in dense:
            assert torch.equal(loaded.compiled.weights[name].reshape(-1).view(torch.uint8),
                               dense[name].reshape(-1).view(torch.uint8)), name
        got = loaded(*llama_inputs(model, t=12))[0]
    assert torch.equal(got, want)


def _runner_ids(arch: str, folder, prompt: list[int]) -> list[int]:
    import subprocess

    from llmpress.backends.tvm import emulate

    cmd = [*emulate.runner_command(arch), str(folder), "--prompt-ids", ",".join(map(str, prompt)),
           "--max-new-tokens", "8", "--print-ids", "--threads", "1"]  # 1 thread: TVM's pool spins on a busy host
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return [int(i) for i in out.stdout.split()]


@pytest.mark.tvm
@pytest.mark.parametrize("arch", ["x86_64", "aarch64"])
def test_edge_runner_expands_them(mixed, arch, tmp_path) -> None:
    """The C++ runner reads the same format: natively on the ``cpu`` artifact, under qemu on the ``arm64`` build of
    the same pipeline; its greedy ids equal the Python ``cpu`` program's."""
    from llmpress.backends.tvm import emulate

    missing = emulate.missing_tools(arch)
    if missing:
        pytest.skip(f"the {arch} edge runner cannot be built/run here: missing {', '.join(missing)}")
    model, art, folder = mixed
    if arch != emulate.artifact_arch(folder):
        target = {"x86_64": "cpu", "aarch64": "arm64"}[arch]
        folder = llmpress.compile(model, pipeline=MIXED, target=target, progress=False).save(tmp_path / target)
        assert len(json.loads((folder / "manifest.json").read_text())["payload"]["sparse_weights"]) == 14
    prompt = [1, 5, 9, 2]
    assert _runner_ids(arch, folder, prompt) == list(art.generate_ids(prompt, 8))


@pytest.mark.tvm
def test_inspect_reports_them(mixed, capsys) -> None:
    from llmpress.cli import main

    _, _, folder = mixed
    records = json.loads((folder / "manifest.json").read_text())["payload"]["sparse_weights"]
    assert main(["inspect", str(folder), "--json"]) == 0
    sw = json.loads(capsys.readouterr().out)["sparse_weights"]
    assert sw == {"tensors": 14, "formats": ["bitmask"], "dense_bytes": sum(r["dense_bytes"] for r in records.values()),
                  "stored_bytes": sum(r["stored_bytes"] for r in records.values())}
    assert main(["inspect", str(folder)]) == 0
    assert "sparse weights: 14 tensors stored compressed (bitmask)" in capsys.readouterr().out


def test_dense_int4_codes_stay_dense() -> None:
    """RTN int4 codes of a dense Gaussian weight, packed as the op stores them: no value is frequent enough."""
    from llmpress.ir.ops.wq_linear import pack_weight
    from llmpress.passes.quant_common import rtn_quantize

    w = torch.randn(128, 256, generator=torch.Generator().manual_seed(2))
    q, _, _ = rtn_quantize(w, 4, 32, True)
    assert encode(pack_weight(q, 4, sym=True)) is None
