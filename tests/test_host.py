"""Shared-machine defaults (llmpress/host.py): passive OpenMP waiting, torch threads from the affinity mask."""
from __future__ import annotations

import os
import subprocess
import sys

from .conftest import REPO


def _python(code: str, **env: str) -> str:
    full = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
    full.update(env, PYTHONPATH=str(REPO))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full, check=True)
    return out.stdout.strip()


def test_import_sets_passive_openmp_unless_the_user_chose():
    code = "import os, llmpress; print(os.environ.get('OMP_WAIT_POLICY'))"
    assert _python(code) == "PASSIVE"
    assert _python(code, OMP_WAIT_POLICY="ACTIVE") == "ACTIVE"


def test_openmp_default_undoes_only_our_own_setting():
    code = "import os, llmpress.host as h; h.openmp_default(); print(os.environ.get('OMP_WAIT_POLICY'))"
    assert _python(code) == "None"  # the benchmarks' peers get libgomp's default
    assert _python(code, OMP_WAIT_POLICY="PASSIVE") == "PASSIVE"  # the user's own choice stays


def test_torch_threads_follow_the_affinity_mask():
    # The pool is capped at the CPUs this process may run on, even when the mask shrinks after torch chose its
    # count; an explicit count wins, and so does the user's OMP_NUM_THREADS.
    code = ("import os, torch, llmpress.host as h\n"
            "fresh = h.torch_threads() <= len(os.sched_getaffinity(0))\n"  # what a CLI process gets by default
            "torch.set_num_threads(4)\n"
            "os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:1])\n"
            "a = h.torch_threads()\n"
            "b = h.torch_threads(3)\n"
            "print(fresh, a, b, len(os.sched_getaffinity(0)))")
    assert _python(code) == "True 1 3 1"
    assert _python("import torch, llmpress.host as h; torch.set_num_threads(4); print(h.torch_threads())",
                   OMP_NUM_THREADS="4") == "4"
