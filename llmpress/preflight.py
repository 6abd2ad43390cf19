"""Checks that run before the expensive part of a compile, so a typo costs seconds, not a wasted run.

``check_compile`` needs no model: the pipeline text (parsed, every option validated against its pass's options),
calibration data for the passes that need it, the target name, the model / tokenizer / calibration files, and the
output location (``llmpress.outputs.check_output``). ``check_layers`` needs the captured model but runs before any
pass: every quantizing pass's ``group``/``bits`` against every layer it selects (and any pass's own
``layer_problems(module)``, such as sparsify's N:M fit), with all offending layers listed at once.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .errors import ConfigError, LoadError

__all__ = ["check_compile", "check_layers", "calibration_path"]


def _passes(pipeline: Any) -> list:
    from .passes.pipeline import Pipeline, build, parse

    if pipeline is None or pipeline == "":
        return []
    return build(pipeline if isinstance(pipeline, Pipeline) else parse(pipeline))


def calibration_path(calibration: Any) -> Path | None:
    """The file a calibration argument names (a path, a one-line string, or a recipe's ``CalibrationSpec``)."""
    data = calibration.data if hasattr(calibration, "data") and hasattr(calibration, "samples") else calibration
    if isinstance(data, Path) or (isinstance(data, str) and "\n" not in data):
        return Path(data)
    return None


def _check_calibration_file(path: Path) -> None:
    if not path.exists():
        raise ConfigError(f"calibration file {str(path)!r} does not exist")
    if not path.is_file():
        raise ConfigError(f"calibration file {str(path)!r} is not a file")
    try:
        with open(path, "rb") as f:
            head = f.read(1 << 16)
    except OSError as e:
        raise ConfigError(f"calibration file {str(path)!r} cannot be read: {e.strerror or e}") from e
    if not head.strip():
        raise ConfigError(f"calibration file {str(path)!r} is empty; it should hold text to calibrate on")
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as e:
        if e.start < len(head) - 4:  # not just a character cut at the end of the sample
            raise ConfigError(f"calibration file {str(path)!r} is not UTF-8 text (byte {e.start})") from e


def _quantizes(pipeline_passes: list) -> bool:
    return any("weights_quantized" in getattr(p, "establishes", ()) for p in pipeline_passes)


def check_compile(model: Any, *, pipeline: Any = "", target: Any = "reference", calibration: Any = None,
                  tokenizer: Any = None, output: str | os.PathLike | None = None, overwrite: bool = False,
                  overwrite_flag: str = "overwrite=True", calib_device: Any = None,
                  backend_options: Any = None) -> list:
    """Everything about a compile that can be checked without loading the model; raises ``ConfigError`` (or
    ``LoadError`` for a missing model file). Returns the built passes."""
    from .backends import backend_for_target
    from .outputs import check_output, input_bytes

    passes = _passes(pipeline)
    if isinstance(model, (str, Path)):  # a model from a file starts with no IR properties: the order is known now
        from .passes.manager import check_order

        check_order(passes)
    backend_for_target(target).with_options(backend_options)  # unknown names, bad values
    from .passes.calib_device import resolve

    resolve(calib_device)  # an unknown device, or CUDA where there is none, before the model loads
    needing = [p.name for p in passes if getattr(p, "needs_calibration", False)]
    if needing and calibration is None:
        raise ConfigError(f"{', '.join(dict.fromkeys(needing))} needs calibration data "
                          "(--calib FILE or calibration=...)")
    calib_file = calibration_path(calibration) if calibration is not None else None
    if calib_file is not None:
        _check_calibration_file(calib_file)
    model_path = Path(model) if isinstance(model, (str, Path)) else None
    if model_path is not None and not model_path.exists():
        raise LoadError(f"{model}: no such file or folder")
    tok_path = Path(tokenizer) if isinstance(tokenizer, (str, Path)) else None
    if tok_path is not None and not tok_path.exists():
        raise LoadError(f"tokenizer {str(tok_path)!r}: no such file")
    if output is not None:
        size = input_bytes(model_path)
        estimate = size // 2 if _quantizes(passes) else size  # rough: 4-bit of fp16 and up is well under half
        check_output(output, overwrite=overwrite, inputs=[p for p in (model_path, tok_path, calib_file) if p],
                     estimate_bytes=estimate, flag=overwrite_flag)
    return passes


def check_layers(passes: list, module: Any) -> None:
    """Every weight-quantizing pass's group and bits against the layers it selects, before any pass runs.

    Passes that come earlier may already have quantized a layer; such layers are not checked again for later passes
    (those will not select them). A pass whose include patterns only match after an earlier rewrite (``qkv_proj``
    before ``fuse_qkv``) is still checked by the pass itself when it runs.
    """
    from .passes.base import SelectOptions
    from .passes.quant_common import group_problems
    from .passes.select import select_linears

    claimed: set = set()
    lines: list[str] = []
    for p in passes:
        o = p.options
        layer_problems = getattr(p, "layer_problems", None)  # a pass's own per-layer check (sparsify's N:M fit)
        if layer_problems is not None:
            lines += [f"{p.name}: {msg}" for msg in layer_problems(module)]
        if "weights_quantized" not in getattr(p, "establishes", ()) or not isinstance(o, SelectOptions):
            continue
        if not hasattr(o, "group") or not hasattr(o, "bits"):
            continue
        nodes, _ = select_linears(module, o)
        nodes = [n for n in nodes if n not in claimed]
        claimed.update(nodes)
        lines += [f"{p.name}: {msg}" for msg in group_problems(module, nodes, o.group, o.bits)]
    if lines:
        raise ConfigError(f"{len(lines)} layer(s) do not fit the pipeline's group/bits/pattern (choose a group or "
                          "pattern that divides them, or exclude them); nothing was run:\n  " + "\n  ".join(lines))
