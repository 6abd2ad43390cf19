"""``params.prepare`` streams: ``transform_params`` runs chunk by chunk and its outputs wait on disk.

- chunked (one output per chunk) and unchunked runs give exactly the tensors of the single ``transform_params``
  function (built and run whole, as before streaming), same names, same order, same bytes;
- only weights passed through unchanged stay in memory (the IR's own tensors, shared); computed ones are on disk;
- ``compressed_entries`` (one tensor at a time) writes each tensor or its ``encode`` form, which expands back.
"""
from __future__ import annotations

import pytest
import torch

from llmpress.ir.capture import capture

pytestmark = pytest.mark.tvm


@pytest.fixture(scope="module")
def prog():
    from llmpress.api import run_pipeline
    from llmpress.backends.tvm.lower import to_relax
    from tests.decoder import Llama, LlamaConfig

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=128, max_seq_len=32)
    module, _ = run_pipeline(capture(Llama(cfg).eval()), "quantize(bits=4,group=32)", progress=False)
    return to_relax(module, inplace_cache=True, cpu_kernels=True)


def _whole(prog, spec):
    """The transformed weights by name, from ``transform_params`` built and run as one function."""
    import tvm
    from tvm import relax
    from tvm.target.codegen import llvm_get_system_cpu

    from llmpress.backends.tvm.build import cpu_pipeline
    from llmpress.backends.tvm.params import TRANSFORM, _lift, _only, _output_names

    mod = _lift(prog, spec)
    names = _output_names(mod[TRANSFORM], prog.params)
    target = tvm.target.Target({"kind": "llvm", "mcpu": str(llvm_get_system_cpu())})
    vm = relax.VirtualMachine(tvm.compile(_only(mod, TRANSFORM), target, relax_pipeline=cpu_pipeline(target)),
                              tvm.cpu(0))
    args = [tvm.runtime.from_dlpack(prog.weights[n].detach().contiguous().clone()) for n in prog.params]
    return {n: torch.from_dlpack(o).clone() for n, o in zip(names, vm[TRANSFORM](args))}


@pytest.mark.parametrize("chunk_bytes", [1, None])
def test_chunks_give_the_single_functions_tensors(prog, monkeypatch, chunk_bytes):
    from llmpress.backends.tvm import params
    from llmpress.backends.tvm.targets import resolve_target

    spec = resolve_target("cpu")
    whole = _whole(prog, spec)
    if chunk_bytes is not None:
        monkeypatch.setattr(params, "CHUNK_BYTES", chunk_bytes)
    prepared = params.prepare(prog, spec)
    assert list(prepared.weights) == list(whole) == prepared.params
    for name, t in whole.items():
        got = prepared.weights[name]
        assert got.dtype == t.dtype and got.shape == t.shape, name
        assert torch.equal(got.reshape(-1).view(torch.uint8), t.reshape(-1).view(torch.uint8)), name


def test_one_output_per_chunk_builds_one_function_per_output(prog):
    from llmpress.backends.tvm.params import TRANSFORM, _chunked, _lift, _only, _passed_through, _result_fields
    from llmpress.backends.tvm.targets import resolve_target

    mod = _only(_lift(prog, resolve_target("cpu")), TRANSFORM)
    fields = _result_fields(mod[TRANSFORM])
    computed = [i for i, src in enumerate(_passed_through(mod[TRANSFORM], fields)) if src is None]
    assert computed, "a quantized model has weights in kernel layouts"
    chunked = _chunked(mod, [[i] for i in computed])
    from tvm import relax

    funcs = {gv.name_hint: f for gv, f in chunked.functions_items() if isinstance(f, relax.Function)}
    assert sorted(funcs) == sorted(f"{TRANSFORM}_{k}" for k in range(len(computed)))
    assert all(len(f.ret_ty.fields) == 1 for f in funcs.values())


def test_computed_weights_wait_on_disk(prog):
    from llmpress.backends.tvm.params import TRANSFORM, _lift, _passed_through, _result_fields, prepare
    from llmpress.backends.tvm.spill import SpilledWeights
    from llmpress.backends.tvm.targets import resolve_target

    spec = resolve_target("cpu")
    transform = _lift(prog, spec)[TRANSFORM]
    passed = _passed_through(transform, _result_fields(transform))
    prepared = prepare(prog, spec)
    assert isinstance(prepared.weights, SpilledWeights)
    kept = prepared.weights.in_memory()
    assert kept == [n for n, src in zip(prepared.params, passed) if src is not None]
    assert len(kept) < len(prepared.params)  # the tiled int4 codes and scales are on disk
    for n in kept:  # passed through: the IR's tensor itself, not a copy
        assert prepared.weights[n] is prog.weights[n]
    on_disk = next(n for n in prepared.params if n not in kept)
    assert prepared.weights[on_disk] is not prepared.weights[on_disk]  # read afresh on every access
    assert prepared.weights.path.stat().st_size > 0


def test_chunks_cut_in_order_by_bytes():
    from llmpress.backends.tvm.params import _chunks

    assert _chunks([0, 1, 2, 3], [40, 40, 40, 200], 100) == [[0, 1], [2], [3]]
    assert _chunks([5, 6], [None, 1], 100) == [[5], [6]]
    assert _chunks([], [], 100) == []


def test_compressed_entries_write_each_tensor_or_its_encoding():
    from llmpress.backends.tvm.sparse_storage import compressed_entries, encode, expand_weights

    g = torch.Generator().manual_seed(0)
    sparse = torch.randn(64, 64, generator=g) * (torch.rand(64, 64, generator=g) > 0.9)
    weights = {"a": torch.randn(8, 8, generator=g), "s": sparse, "codes": torch.full((32, 16), 0x88, dtype=torch.uint8),
               "kept": sparse.clone()}
    entries, records = compressed_entries(weights, list(weights), keep={"kept"})
    assert list(entries) == ["a", "s#values", "s#mask", "codes#values", "codes#mask", "kept"]
    assert set(records) == {"s", "codes"}
    written = {}
    for name, (dtype, shape, produce) in entries.items():
        t = produce()
        assert dtype == t.dtype and shape == tuple(t.shape), name
        written[name] = t
    for name in ("s", "codes"):  # exactly what encode gives, records named after their parts
        tensors, record = encode(weights[name])
        assert records[name] == {**record, "values": f"{name}#values", "mask": f"{name}#mask"}
        assert torch.equal(written[f"{name}#values"], tensors["values"])
        assert torch.equal(written[f"{name}#mask"], tensors["mask"])
    assert torch.equal(written["a"], weights["a"]) and torch.equal(written["kept"], weights["kept"])
    back = expand_weights(written, records, "test")
    assert all(torch.equal(back[n], weights[n]) for n in weights)


def test_encode_counts_in_blocks_as_in_one(monkeypatch):
    """``encode`` counts element values a block at a time: the same records and bytes whatever the block size."""
    from llmpress.backends.tvm import sparse_storage

    g = torch.Generator().manual_seed(1)
    codes = torch.randint(0, 16, (40, 24), generator=g, dtype=torch.uint8)
    codes[torch.rand(40, 24, generator=g) < 0.8] = 0x88  # mostly the fill code: stored compressed
    floats = torch.randn(50, 30, generator=g) * (torch.rand(50, 30, generator=g) > 0.85)
    for t in (codes, floats, torch.randint(0, 256, (33, 17), generator=g, dtype=torch.uint8)):
        whole = sparse_storage.encode(t)
        monkeypatch.setattr(sparse_storage, "_COUNT_BLOCK", 7)  # blocks that split elements' bytes unevenly
        blocks = sparse_storage.encode(t)
        monkeypatch.undo()
        assert (whole is None) == (blocks is None)
        if whole is not None:
            assert whole[1] == blocks[1]
            assert all(torch.equal(whole[0][k], blocks[0][k]) for k in ("values", "mask"))


def test_int4_measure_across_row_blocks(monkeypatch):
    """``measure_int4`` reads a few rows at a time: zeros summed over every block, and a dense group in the last
    block still refuses the 2:4 kernel."""
    from llmpress.backends.tvm.kernels import sparse_plan
    from llmpress.ir.ops.wq_linear import pack_weight

    monkeypatch.setattr(sparse_plan, "_MEASURE_ROWS", 3)
    g = torch.Generator().manual_seed(2)
    q = torch.randint(-7, 8, (10, 64), generator=g)
    q.view(10, 16, 4)[..., 2:] = 0  # 2:4: two codes of every four are zero
    info = sparse_plan.measure_int4(pack_weight(q, 4, sym=True), 64, 32)
    assert isinstance(info, sparse_plan.Int4Sparse) and info.zeros == int((q == 0).sum())
    q[9, :4] = torch.tensor([1, 2, 3, 0])
    assert "not 2:4" in sparse_plan.measure_int4(pack_weight(q, 4, sym=True), 64, 32)
