"""``build.take_clip``: embedding lookups lower without TOPI's "Fast mode segfaults" warning, same values."""
from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.tvm


def test_take_in_clip_mode_lowers_quietly_with_the_same_values(capfd):
    tvm = pytest.importorskip("tvm")
    from tvm import relax

    from llmpress.backends.tvm.build import take_clip

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((16, 4), "float32"))
    i = relax.Var("i", relax.TensorType((3,), "int64"))
    with bb.function("main", [x, i]):
        with bb.dataflow():
            out = bb.emit_output(bb.emit(relax.op.take(x, i, axis=0)))
        bb.emit_func_output(out)
    mod = bb.get()
    relax.transform.LegalizeOps()(mod)
    assert "Fast mode segfaults" in capfd.readouterr().err  # what every CPU compile printed before
    clipped = relax.transform.LegalizeOps()(take_clip()(mod))
    assert "Fast mode segfaults" not in capfd.readouterr().err
    vm = relax.VirtualMachine(tvm.compile(clipped, "llvm"), tvm.cpu())
    table = np.arange(64, dtype="float32").reshape(16, 4)
    got = vm["main"](tvm.runtime.tensor(table), tvm.runtime.tensor(np.array([0, 15, 7], dtype="int64"))).numpy()
    np.testing.assert_array_equal(got, table[[0, 15, 7]])  # a gather: exact
