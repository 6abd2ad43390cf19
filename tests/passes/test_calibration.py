"""Calibration: deterministic windows from text, and ``collect`` delivering the exact input activations."""
from __future__ import annotations

import pytest
import torch

from llmpress.errors import ConfigError, PassError
from llmpress.eval.perplexity import token_stream
from llmpress.ir.capture import capture
from llmpress.ir.meta import source_path
from llmpress.passes.calibration import Calibration, collect
from llmpress.passes.select import linear_nodes


class _Bytes:
    """A byte-level tokenizer (ids 3..63), enough to check windowing without model files."""

    bos_id = 1

    def encode(self, text, *, bos=True):
        return ([1] if bos else []) + [3 + (b % 61) for b in text.encode()]


TEXT = "\n\n".join(f"story {i}: the cat sat on mat number {i * 7}." for i in range(40)) + "\n"


def test_from_texts_is_deterministic_and_windows_come_from_the_stream(tmp_path) -> None:
    path = tmp_path / "calib.txt"
    path.write_text(TEXT)
    a = Calibration.from_texts(path, _Bytes(), samples=6, seq_len=16, seed=3)
    b = Calibration.from_texts(str(path), _Bytes(), samples=6, seq_len=16, seed=3)
    c = Calibration.from_texts(path, _Bytes(), samples=6, seq_len=16, seed=4)
    assert a.samples == 6 and a.seq_len == 16 and a.tokens == 96
    assert all(torch.equal(x, y) for x, y in zip(a.batches, b.batches))
    assert not all(torch.equal(x, y) for x, y in zip(a.batches, c.batches))
    stream = token_stream(path, _Bytes())
    text_of = ",".join(map(str, stream))
    for batch in a.batches:
        assert batch.dtype == torch.int64 and batch.shape == (1, 16)
        assert ",".join(map(str, batch[0].tolist())) in text_of  # a contiguous slice of the BOS-joined stream
    # A list of strings is read as paragraphs of one text: the same stream, so the same windows.
    d = Calibration.from_texts(TEXT.strip().split("\n\n"), _Bytes(), samples=6, seq_len=16, seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a.batches, d.batches))


def test_bad_calibration_inputs_are_config_errors(tmp_path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        Calibration.from_texts(tmp_path / "missing.txt", _Bytes())
    with pytest.raises(ConfigError, match="fewer than seq_len"):
        Calibration.from_texts(["tiny"], _Bytes(), samples=2, seq_len=64)
    with pytest.raises(ConfigError, match=r"int64 \[1, T\]"):
        Calibration.from_tensors([torch.zeros(2, 4, dtype=torch.int64)])
    with pytest.raises(ConfigError, match="at least one"):
        Calibration.from_tensors([])


def _inputs_by_hook(model, batches):
    """The inputs every nn.Linear of the eager model sees, keyed by module path (the independent oracle)."""
    seen: dict[str, list[torch.Tensor]] = {}
    hooks = []
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear):
            hooks.append(mod.register_forward_pre_hook(
                lambda m, args, name=name: seen.setdefault(name, []).append(args[0].reshape(-1, args[0].shape[-1]))))
    with torch.no_grad():
        for b in batches:
            model(b, torch.zeros(1, dtype=torch.int64), *model.empty_cache())
    for h in hooks:
        h.remove()
    return seen


def test_collect_gives_each_listed_node_its_exact_input(tiny_llama) -> None:
    module = capture(tiny_llama)
    g = torch.Generator().manual_seed(0)
    calib = Calibration.from_tensors([torch.randint(0, 64, (1, n), generator=g) for n in (5, 9, 16)])
    nodes = linear_nodes(module)
    got: dict[str, list[torch.Tensor]] = {}
    calib.collect(module, nodes, lambda n, x: got.setdefault(source_path(n), []).append(x.clone()))
    expected = _inputs_by_hook(tiny_llama, calib.batches)
    assert set(got) == set(expected) and len(got) == 15
    for path, xs in expected.items():
        assert [x.shape for x in got[path]] == [x.shape for x in xs]  # [tokens, in_features] per batch
        for a, b in zip(got[path], xs):
            # The interpreter runs the same ATen ops as eager PyTorch; only op decomposition may reorder float sums.
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_collect_stops_after_the_last_listed_node(tiny_llama) -> None:
    module = capture(tiny_llama)
    calib = Calibration.from_tensors([torch.randint(0, 64, (1, 8))])
    layer0 = [n for n in linear_nodes(module) if source_path(n).startswith("model.layers.0.")]
    seen = []
    calib.collect(module, layer0, lambda n, x: seen.append(source_path(n)))
    assert len(seen) == 7
    # The interpreter stopped at the last listed node (layer 0's down_proj, observed before it runs): it ran exactly
    # the call_function nodes before it, none of layer 1's.
    calls = [n for n in module.graph.nodes if n.op == "call_function"]
    assert calib.last_run_nodes == calls.index(layer0[-1]) < len(calls) - 20


def test_collect_function_form_and_errors(tiny_llama) -> None:
    module = capture(tiny_llama)
    calib = Calibration.from_tensors([torch.randint(0, 64, (1, 4))])
    nodes = linear_nodes(module)[:1]
    count = []
    collect(module, nodes, lambda n, x: count.append(x.shape), calib)
    assert count == [(4, 32)]
    with pytest.raises(ConfigError, match="calibration"):
        collect(module, nodes, lambda n, x: None, None)
    other = capture(tiny_llama)
    with pytest.raises(PassError, match="not in the module's graph"):
        calib.collect(module, linear_nodes(other)[:1], lambda n, x: None)
    long = Calibration.from_tensors([torch.randint(0, 64, (1, 40))])
    with pytest.raises(ConfigError, match="KV cache"):
        long.collect(module, nodes, lambda n, x: None)
