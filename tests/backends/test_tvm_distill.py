"""``quantize(bits=2)`` then ``distill`` through TVM ``cpu``: the adapters are plain ``aten.linear`` / ``aten.add``
nodes beside the int2 ``wq_linear``, so the build needs no new op. Tolerance as test_tvm_factorize.py's (fp32
kernels summing in another order than PyTorch, compounded over the layers: 1e-5 of the logits' scale)."""
from __future__ import annotations

import pytest

pytest.importorskip("tvm")

from ..conftest import random_calibration  # noqa: E402
from ..passes.tiny_llama import tiny_llama  # noqa: E402
from .model_checks import cpu_build_matches_reference  # noqa: E402

pytestmark = pytest.mark.tvm


def test_distilled_int2_llama_builds_and_matches_reference():
    from llmpress.api import run_pipeline

    module, records = run_pipeline(
        tiny_llama()[1], "quantize(bits=2,group=16,exclude=lm_head),distill(steps=2,batch=1,seq_len=8,lr=0.01)",
        calibration=random_calibration(n=2, t=16, seed=3), progress=False)
    assert records[-1].stats["adapters"] == 14
    hist = module.op_histogram()
    assert hist["llmpress.wq_linear.default"] == 14 and hist["aten.linear.default"] == 28 + 1
    cpu_build_matches_reference(module)
