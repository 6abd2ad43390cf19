"""Shared fixtures: paths to ../shared, the reference models, and a tiny random Llama."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = (REPO / ".." / "shared").resolve()
TINYSTORIES = SHARED / "models" / "tinystories-llama"
STORIES260K = SHARED / "models" / "stories260K"
VALID = SHARED / "data" / "tinystories" / "valid.txt"
CALIB = SHARED / "data" / "tinystories" / "calib.txt"
WIKITEXT = SHARED / "data" / "wikitext-2" / "valid.txt"

# One intra-op thread: TVM's runtime keeps its own worker threads spinning for a while after each call, and torch's
# OpenMP workers then wait for a core (measured 10-50x slower per step with 2 threads on the 2-core machines).
torch.set_num_threads(1)

# Under pytest-xdist (scripts/test.sh runs one worker per core) each worker's TVM pool gets its share of the cores:
# with every worker's pool spanning every core, a parallel kernel waits at its barrier for a thread the other
# worker's job has descheduled. Only the default changes: a user's TVM_NUM_THREADS wins, and the thread-pool tests
# size their pools in fresh processes without it.
if os.environ.get("PYTEST_XDIST_WORKER") and "TVM_NUM_THREADS" not in os.environ:
    _workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    _cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    os.environ["TVM_NUM_THREADS"] = str(max(1, _cpus // max(1, _workers)))

# ``cpu`` builds its portable library alone here (``LLMPRESS_CPU_VARIANTS=0``): the AVX-512 VNNI variant doubles the
# LLVM work of every ``cpu`` compile while this suite's CI machine (AVX2, no AVX-512) never runs it. The tests marked
# ``cpu_variants`` (the variant builds, their kernels and the loaders' choice of library) build it as users get it.
# Set before each test's setup, so the module-scoped builds of a marked file see it too.
@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    os.environ["LLMPRESS_CPU_VARIANTS"] = "1" if item.get_closest_marker("cpu_variants") else "0"


#: Test files that share per-process caches (``functools.cache`` of the real model's perplexities and calibration,
#: the kernel library compiled for ``cpu``): under pytest-xdist one worker runs every file of a group, so each cached
#: value is computed once, as in a one-process run.
XDIST_GROUPS = {
    **{f"tests/passes/test_{name}.py": "real-model" for name in (
        "quantize", "gptq", "sparsify", "factorize", "autobits", "distill", "prune", "act_quant")},
    "tests/backends/test_tvm_cpu_kernels.py": "x86-kernel-library",
    "tests/backends/test_arm64_kernels.py": "x86-kernel-library",
}

try:
    from xdist.scheduler import LoadScopeScheduling
except ImportError:  # pytest without pytest-xdist: one process, nothing to schedule
    LoadScopeScheduling = None

if LoadScopeScheduling is not None:

    class FileGroupScheduling(LoadScopeScheduling):
        """``--dist loadfile`` (a test file is a unit of work: its module-scoped builds happen once), with the files
        of each ``XDIST_GROUPS`` group as one unit. Units are handed out largest (most tests) first."""

        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::", 1)[0]
            return XDIST_GROUPS.get(path, path)

    @pytest.hookimpl(optionalhook=True)
    def pytest_xdist_make_scheduler(config, log):
        return FileGroupScheduling(config, log) if config.getvalue("dist") == "loadfile" else None


@pytest.fixture(scope="session")
def shared() -> Path:
    if not SHARED.exists():
        pytest.fail(f"the shared data folder {SHARED} is missing (tests read models and text from ../shared)")
    return SHARED


@pytest.fixture
def tiny_llama():
    """A tiny random Llama (2 layers, GQA) following the KV-cache calling convention."""
    from tests.decoder import Llama, LlamaConfig

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64, max_seq_len=32)
    return Llama(cfg).eval()


def llama_inputs(model, t: int = 12, seed: int = 5) -> tuple:
    """Random token ids at position 0 with an empty cache: the LM calling convention's prefill inputs."""
    ids = torch.randint(0, model.config.vocab_size, (1, t), generator=torch.Generator().manual_seed(seed))
    return (ids, torch.zeros(1, dtype=torch.int64), *model.empty_cache())


def random_calibration(vocab: int = 64, n: int = 4, t: int = 16, seed: int = 123):
    """``n`` deterministic random windows of ``t`` token ids, for calibration passes on the tiny Llama."""
    from llmpress.passes.calibration import Calibration

    g = torch.Generator().manual_seed(seed)
    return Calibration.from_tensors([torch.randint(0, vocab, (1, t), generator=g) for _ in range(n)])
