"""Whole-model check shared by the TVM tests: a module lowered for ``cpu`` computes what the reference computes."""
from __future__ import annotations

import torch


def cpu_build_matches_reference(module, ids=((1, 5, 9, 3, 7, 2),)):
    """Lower ``module`` for ``cpu``, run one prefill of ``ids`` from an empty cache in TVM and in the reference, and
    compare logits and caches at 1e-5 of their scale: fp32 kernels sum in another order than PyTorch, compounded
    over the layers; a wrong layout, split or unpacking would be off by O(1). Returns (compiled, ids, ref, got)."""
    from llmpress.backends.tvm import TVMBackend
    from llmpress.eval.generate import empty_cache

    compiled = TVMBackend().lower(module, "cpu", progress=False)
    ids = torch.tensor(ids)
    ref = module.run(ids, torch.zeros(1, dtype=torch.int64), *empty_cache(module.lm))
    got = compiled(ids, torch.zeros(1, dtype=torch.int64), *empty_cache(module.lm))
    for a, b in zip(got, ref):
        torch.testing.assert_close(torch.as_tensor(a), b, rtol=0, atol=1e-5 * float(b.abs().max()) + 1e-6)
    return compiled, ids, ref, got
