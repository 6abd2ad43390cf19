"""``llmpress inspect --sensitivity PIPELINE MODEL``: each layer's sensitivity to a candidate compression, as a
table on stdout (or JSON) and, with ``--plot FILE``, a PNG bar chart.

The measurement is ``llmpress.passes.sensitivity`` (one layer compressed at a time, KL to the float model's
next-token distribution or the NLL increase, on calibration windows). Everything that can be checked without the
model (the pipeline text, the calibration file, the plot's folder and matplotlib) is checked before it loads.
matplotlib is not a runtime dependency (it comes with the ``bench`` extra): it is imported only for ``--plot``.
"""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any, Sequence

from .errors import ConfigError

__all__ = ["cmd_sensitivity", "sensitivity_table", "plot_sensitivity"]

log = logging.getLogger(__name__)


def _require_matplotlib() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise ConfigError("--plot needs matplotlib, which llmpress does not install by default: "
                          "pip install 'llmpress[bench]' (or pip install matplotlib)") from None
    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    return plt


def sensitivity_table(rows: Sequence, skipped: Sequence[tuple[str, str]]) -> str:
    """One line per layer: bytes before and after, bits per weight, score and a bar scaled to the largest score."""
    if not rows:
        return "no layer was measured"
    w = max(len(r.path) for r in rows)
    top = max(max(r.score for r in rows), 1e-30)
    metric = rows[0].metric
    lines = [f"{'layer':<{w}}  {'bytes':>10} -> {'after':>10}  {'bits/w':>6}  {metric:>11}",]
    for r in rows:
        bar = "#" * max(0, round(30 * r.score / top))
        lines.append(f"{r.path:<{w}}  {r.bytes_before:>10,} -> {r.bytes_after:>10,}  {r.bits_per_weight:>6.3f}  "
                     f"{r.score:>11.3e}  {bar}")
    lines += [f"{p:<{w}}  not measured: {why}" for p, why in skipped]
    return "\n".join(lines)


def plot_sensitivity(rows: Sequence, path: str | Path, *, title: str = "") -> None:
    """A horizontal bar per layer (graph order, first on top), log-scaled scores."""
    plt = _require_matplotlib()
    fig, ax = plt.subplots(figsize=(8, max(3.0, 0.22 * len(rows) + 1.2)))
    ys = list(range(len(rows)))[::-1]
    ax.barh(ys, [max(r.score, 1e-12) for r in rows], color="tab:blue")
    ax.set_yticks(ys, [r.path for r in rows], fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel({"kl": "KL to the float model (nats/token)", "ppl": "NLL increase (nats/token)"}.get(
        rows[0].metric, rows[0].metric) if rows else "")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def cmd_sensitivity(a: Any) -> int:
    """The ``inspect --sensitivity`` command (arguments from ``llmpress.cli``)."""
    from .preflight import check_compile

    candidate = a.sensitivity
    if not a.calib:
        raise ConfigError("--sensitivity measures on calibration text: give --calib FILE")
    if a.samples < 1 or a.seq_len < 2:
        raise ConfigError(f"--samples must be at least 1 and --seq-len at least 2, got {a.samples} and {a.seq_len}")
    if Path(a.model).is_dir() and (Path(a.model) / "manifest.json").exists() or Path(a.model).suffix == ".tar":
        raise ConfigError(f"{a.model} is a compiled artifact; --sensitivity measures a model (a Hugging Face "
                          "folder, a llama2.c .bin or an .onnx file)")
    passes = check_compile(a.model, pipeline=candidate, calibration=a.calib, tokenizer=a.tokenizer)
    if not passes:
        raise ConfigError("--sensitivity needs a candidate compression, e.g. 'quantize(bits=3,group=128)'")
    if a.plot:
        plot = Path(a.plot)
        if not plot.parent.exists():
            raise ConfigError(f"--plot {a.plot}: folder {str(plot.parent)!r} does not exist")
        if plot.suffix.lower() != ".png":
            raise ConfigError(f"--plot {a.plot}: the plot is a PNG file (name it *.png)")
        _require_matplotlib()

    from .api import prepare
    from .passes.calibration import Calibration
    from .passes.sensitivity import sensitivity

    module, tok = prepare(a.model, tokenizer=a.tokenizer)
    if tok is None:
        raise ConfigError(f"{a.model} has no tokenizer; calibration text needs one (--tokenizer FILE)")
    calib = Calibration.from_texts(a.calib, tok, samples=a.samples, seq_len=a.seq_len, seed=0)
    rows, skipped = sensitivity(module, candidate, calib, metric=a.metric, samples=a.samples, seq_len=0,
                                progress=not a.quiet)
    if a.plot:
        plot_sensitivity(rows, a.plot, title=f"{Path(a.model).name}: {candidate} ({a.metric}, "
                                              f"{a.samples}x{a.seq_len} tokens of {Path(a.calib).name})")
        print(f"wrote {a.plot}", file=sys.stderr)
    if a.json:
        print(json.dumps({"candidate": candidate, "metric": a.metric, "layers": [r.to_json() for r in rows],
                          "skipped": [list(s) for s in skipped]}))
    else:
        print(f"sensitivity to {candidate} ({a.metric}, {a.samples} windows of {a.seq_len} tokens)")
        print(sensitivity_table(rows, skipped))
    return 0
