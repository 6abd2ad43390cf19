"""What a ``cpu`` artifact holds and how it runs: its two builds (x86-64-v3, and the AVX-512 VNNI variant over the
same weights), which one runs on this host, and the size of TVM's thread pool (every core of the affinity mask by
default, ``threads=`` / ``TVM_NUM_THREADS`` to override).

Tolerance between the two builds: the integer products are exact in both, the float steps (scales, block sums,
attention, norms) are fp32 in another order: logits within 1e-4 relative of each other, and the same greedy ids.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from llmpress.errors import LlmpressError

pytestmark = [pytest.mark.tvm, pytest.mark.cpu_variants]

VNNI = "cpu+avx512vnni"
PROMPT = [1, 17, 42, 99, 5]


@pytest.fixture(scope="module")
def llama():
    """A random Llama whose every linear fits the kernel layouts under the presets' group 128."""
    from tests.decoder import Llama, LlamaConfig

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, dim=128, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=256, max_seq_len=64)
    return Llama(cfg).eval()


@pytest.fixture(scope="module")
def w4a8(llama, tmp_path_factory):
    import llmpress

    art = llmpress.compile(llama, pipeline="w4a8", target="cpu", progress=False)
    folder = tmp_path_factory.mktemp("w4a8")
    art.save(folder)
    return art, folder


def _host_has_vnni() -> bool:
    from llmpress.backends.tvm.targets import missing_features, resolve_target

    spec = next(v for v in resolve_target("cpu").variants if v.name == VNNI)
    return not missing_features(spec)


def _base_only(c):
    """The same program with its base build only (as on a host without AVX-512 VNNI)."""
    from llmpress.backends.tvm.runtime import TVMCompiled

    return TVMCompiled(spec=c.spec, executable=c.executable, params=c.params, weights=c.weights,
                       functions=c.functions, num_inputs=c.num_inputs, lm=c.lm)


def test_artifact_holds_both_builds_and_runs_the_most_capable(w4a8):
    art, folder = w4a8
    import llmpress

    payload = json.loads((folder / "manifest.json").read_text())["payload"]
    assert payload["lib"] == "model.so"
    assert [v["name"] for v in payload["variants"]] == [VNNI]
    vlib = folder / payload["variants"][0]["lib"]
    assert vlib.is_file() and (folder / "model.so").is_file()
    assert b"llmpress_gemv_wide" in vlib.read_bytes()  # the 512-bit kernels live in the variant only
    assert b"llmpress_gemv_wide" not in (folder / "model.so").read_bytes()
    expect = VNNI if _host_has_vnni() else "cpu"
    assert art.compiled.running.name == expect
    loaded = llmpress.load(folder)
    assert loaded.compiled.running.name == expect and loaded.compiled.builds == ["cpu", VNNI]
    # build= picks one; the portable build runs anywhere this artifact loads
    assert llmpress.load(folder, build="cpu").generate_ids(PROMPT, 8) == loaded.generate_ids(PROMPT, 8)
    with pytest.raises(LlmpressError, match="no build 'cpu:native'.*cpu, cpu\\+avx512vnni"):
        llmpress.load(folder, build="cpu:native")
    if expect == "cpu":
        with pytest.raises(LlmpressError, match="cannot run here"):
            llmpress.load(folder, build=VNNI)


def test_both_builds_compute_the_same_model(w4a8, llama):
    """The base build (what an AVX2-only machine runs) and the one this host picks: same logits within 1e-4
    relative, and the greedy ids of the reference backend."""
    art, _ = w4a8
    import llmpress
    from llmpress.eval.generate import greedy

    base = _base_only(art.compiled)
    assert base.running.name == "cpu"
    ids, start = torch.tensor([PROMPT]), torch.zeros(1, dtype=torch.int64)
    got = art.compiled.prefill(ids, start, *llama.empty_cache())
    want = base.prefill(ids, start, *llama.empty_cache())
    scale = want[0].abs().max()
    assert scale > 0.1
    torch.testing.assert_close(got[0], want[0], atol=1e-4 * scale, rtol=0)
    ref = llmpress.compile(llama, pipeline="w4a8", target="reference", progress=False).generate_ids(PROMPT, 24)
    assert art.generate_ids(PROMPT, 24) == ref
    assert greedy(base, art.compiled.lm, PROMPT, 24) == ref


_POOL = """
import os, sys, json
import llmpress, tvm
art = llmpress.load(sys.argv[1], **json.loads(sys.argv[2]))
art.generate_ids([1, 2, 3], 2)
print(tvm.get_global_func("runtime.NumThreads")())
"""


def _pool_size(folder, kwargs: dict, env: dict | None = None, cpus: set[int] | None = None) -> int:
    e = {k: v for k, v in os.environ.items() if k not in ("TVM_NUM_THREADS", "OMP_NUM_THREADS")}
    e.update(env or {})
    pre = None if cpus is None else (lambda: os.sched_setaffinity(0, cpus))
    out = subprocess.run([sys.executable, "-c", _POOL, str(folder), json.dumps(kwargs)], env=e, preexec_fn=pre,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return int(out.stdout.strip().splitlines()[-1])


def test_thread_pool_uses_the_affinity_mask_unless_told(w4a8):
    """TVM alone would use half the logical cores on x86; a loaded artifact uses every CPU it may run on, and
    ``threads=`` / ``TVM_NUM_THREADS`` override that (in a fresh process each: the pool is sized once)."""
    _, folder = w4a8
    cpus = sorted(os.sched_getaffinity(0))
    assert _pool_size(folder, {}) == len(cpus)
    assert _pool_size(folder, {"threads": 1}) == 1
    assert _pool_size(folder, {}, env={"TVM_NUM_THREADS": "1"}) == 1
    assert _pool_size(folder, {"threads": 3}) == 3  # more than the cores: oversubscribed on purpose
    if len(cpus) > 1:
        assert _pool_size(folder, {}, cpus={cpus[0]}) == 1
