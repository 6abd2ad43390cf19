"""Per-layer sensitivity (llmpress.passes.sensitivity) on the tiny Llama: what it measures is what the real rewrite
of that one layer does, exact grids score zero, fewer bits score higher, and candidates that are not per-layer
weight rewrites are refused with the reason."""
from __future__ import annotations

import pytest
import torch

from llmpress.api import run_pipeline
from llmpress.errors import ConfigError
from llmpress.passes.sensitivity import SensitivityProbe, sensitivity

from ..conftest import random_calibration
from .tiny_llama import tiny_llama

CANDIDATE = "quantize(bits=2,group=16,exclude=lm_head)"


@pytest.fixture(scope="module")
def tiny():
    return tiny_llama()


def _kl_of(module, other, calib) -> float:
    """Mean KL(p || q) per token between two modules' next-token distributions, from their own runs."""
    probe = SensitivityProbe(module, calib, samples=len(calib.batches), seq_len=0)
    other_probe = SensitivityProbe(other, calib, samples=len(calib.batches), seq_len=0)
    kl = sum(float((p.exp() * (p - q)).sum()) for p, q in zip(probe.reference, other_probe.reference))
    return kl / probe.tokens


def test_scores_every_compressed_layer_and_match_the_real_rewrite(tiny) -> None:
    _, module = tiny
    calib = random_calibration()
    rows, skipped = sensitivity(module, CANDIDATE, calib, samples=4, seq_len=0, progress=False)
    assert len(rows) == 14 and skipped == [("lm_head", "not compressed by the candidate")]
    assert all(r.score > 0 and r.bits_per_weight == 4.0 for r in rows)  # 2 bits + a float32 scale per 16
    assert all(r.bytes_after * 8 == r.bytes_before for r in rows)  # 4 of 32 bits per weight
    # The weight swap computes what running the pass on that layer alone computes.
    row = next(r for r in rows if r.path == "model.layers.1.self_attn.v_proj")
    alone, _ = run_pipeline(module.clone(), f"scope(include={row.path})[{CANDIDATE}]", progress=False)
    assert row.score == pytest.approx(_kl_of(module, alone, calib), rel=1e-4, abs=1e-9)


def test_an_exact_grid_scores_zero_and_more_bits_score_less(tiny) -> None:
    _, module = tiny
    module = module.clone()
    calib = random_calibration()
    # Weights in {-c, 0, c} sit on the 2-bit symmetric grid (s = c): quantizing that layer changes nothing.
    path = "model.layers.0.mlp.up_proj"
    node = next(n for n in module.nodes_by_source(path) if n.target is torch.ops.aten.linear.default)
    w = module.weight(node.args[1])
    exact = torch.sign(torch.randn(w.shape, generator=torch.Generator().manual_seed(0))) * 0.05
    exact[:, ::3] = 0.0
    module.set_weight(node.args[1], exact)
    rows2, _ = sensitivity(module, CANDIDATE, calib, progress=False)
    rows8, _ = sensitivity(module, "quantize(bits=8,group=16,exclude=lm_head)", calib, progress=False)
    by2 = {r.path: r.score for r in rows2}
    assert by2[path] == 0.0
    assert all(r.score < by2[r.path] for r in rows8 if r.path != path)
    ppl, _ = sensitivity(module, CANDIDATE, calib, metric="ppl", progress=False)
    assert {r.path for r in ppl} == set(by2) and next(r for r in ppl if r.path == path).score == 0.0


def test_refuses_what_is_not_a_per_layer_weight_rewrite(tiny) -> None:
    _, module = tiny
    calib = random_calibration()
    with pytest.raises(ConfigError, match="changes .* weight.* outside the linears"):
        sensitivity(module, "awq(bits=4,group=16,exclude=lm_head)", calib, progress=False)
    with pytest.raises(ConfigError, match="do not fit"):  # before any layer is compressed
        sensitivity(module, "quantize(bits=4,group=48)", calib, progress=False)
    with pytest.raises(ConfigError, match="metric"):
        sensitivity(module, CANDIDATE, calib, metric="mse", progress=False)
    with pytest.raises(ConfigError, match="calibration"):
        sensitivity(module, CANDIDATE, None, progress=False)
