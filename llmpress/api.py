"""``llmpress.compile`` and ``llmpress.load``: capture -> pass pipeline -> backend -> artifact."""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from .artifact import Artifact
from .artifact import load as _load_artifact
from .errors import ConfigError, UnsupportedOpError
from .ir.meta import compression, source_path
from .ir.module import Module

__all__ = ["compile", "load", "run_pipeline", "layer_summary", "prepare"]

log = logging.getLogger(__name__)


def prepare(model: Any, example_inputs: tuple | None = None, *, tokenizer: Any = None) -> tuple[Module, Any]:
    """Turn a path / nn.Module / ir.Module into an ``ir.Module`` (+ its tokenizer when one is known)."""
    from .ir.capture import capture

    if isinstance(model, Module):
        # Passes rewrite the graph in place: work on a structural copy (weights shared, never copied), so the
        # caller's module is left as it was and can be compiled again (for another target or pipeline).
        return model.clone(), tokenizer
    if isinstance(model, (str, Path)):
        from .ir.loaders import load_model

        # lazy: the weights stay in the checkpoint until a pass reads them, one layer at a time (ir.lazy)
        loaded = load_model(model, tokenizer=tokenizer if isinstance(tokenizer, (str, Path)) else None, lazy=True)
        tok = loaded.tokenizer if tokenizer is None or isinstance(tokenizer, (str, Path)) else tokenizer
        module = capture(loaded.model, example_inputs, info={"source": str(loaded.source), "kind": loaded.kind})
        return module, tok
    if isinstance(model, torch.nn.Module):
        return capture(model, example_inputs), tokenizer
    raise ConfigError(f"cannot compile a {type(model).__name__}: give a model path, an nn.Module or an ir.Module")


def _calibration(calibration: Any, tokenizer: Any):
    """None | Calibration | file path | list of strings | list of token tensors -> Calibration (or None)."""
    if calibration is None:
        return None
    from .passes.calibration import Calibration

    if isinstance(calibration, Calibration):
        return calibration
    spec_kwargs: dict = {}
    data = calibration
    if hasattr(calibration, "data") and hasattr(calibration, "samples"):  # a recipe's CalibrationSpec
        data = calibration.data
        spec_kwargs = {"samples": calibration.samples, "seq_len": calibration.seq_len, "seed": calibration.seed}
    if isinstance(data, (list, tuple)) and data and isinstance(data[0], torch.Tensor):
        return Calibration.from_tensors(list(data))
    if tokenizer is None:
        raise ConfigError("calibration text needs a tokenizer: compile a model folder/file, or pass tokenizer=")
    return Calibration.from_texts(data, tokenizer, **spec_kwargs)


def run_pipeline(module: Module, pipeline: Any, *, calibration: Any = None, target: Any = None,
                 progress: bool = True, instruments: Sequence = (), reproducer_dir: str | None = None,
                 seed: int = 0, calib_device: Any = None) -> tuple[Module, list]:
    """Parse/build ``pipeline`` and run it on ``module``; returns (module, per-pass records). ``calib_device``:
    where calibration-driven passes run their heavy math (``passes/calib_device.py``; ``None``: ``cpu``)."""
    from .passes.calib_device import resolve

    from .passes.base import PassContext
    from .passes.manager import PassManager
    from .passes.pipeline import Pipeline, build, parse
    from .preflight import check_layers

    if pipeline is None or pipeline == "":
        return module, []
    device = resolve(calib_device)  # before any pass
    pipe = pipeline if isinstance(pipeline, Pipeline) else parse(str(pipeline))
    passes = build(pipe)
    missing = [p.name for p in passes if getattr(p, "needs_calibration", False)]
    if missing and calibration is None:
        raise ConfigError(f"{', '.join(missing)} needs calibration data (--calib FILE or calibration=...)")
    ctx = PassContext(calibration=calibration, seed=seed, target=None if target is None else str(target),
                      progress=progress, calib_device=str(device))
    check_layers(passes, module)  # every layer's fit, before any pass changes anything
    pm = PassManager(passes, instruments=instruments, reproducer_dir=reproducer_dir, pipeline_text=str(pipe))
    return pm.run(module, ctx)


def layer_summary(module: Module) -> list[dict]:
    """One row per weight-bearing op: source path, op, weight shapes and bytes, what the pipeline did."""
    from .eval.size import weight_bytes_by_name

    sizes = weight_bytes_by_name(module)
    rows = []
    for node in module.graph.nodes:
        if node.op != "call_function":
            continue
        weights = [(module.weight_name(a), a) for a in node.all_input_nodes if module.weight_name(a)]
        if not weights:
            continue
        op = getattr(node.target, "name", lambda: str(node.target))()
        rows.append({
            "path": source_path(node),
            "op": op,
            "weights": {w: list(a.meta["val"].shape) for w, a in weights},
            "bytes": sum(sizes.get(w, 0) for w, _ in weights),
            "compression": compression(node),
        })
    return rows


def compile(model: Any, example_inputs: tuple | None = None, *, pipeline: Any = "", target: Any = "reference",  # noqa: A001
            calibration: Any = None, tokenizer: Any = None, progress: bool = True, instruments: Sequence = (),
            reproducer_dir: str | None = None, seed: int = 0, output: str | Path | None = None,
            overwrite: bool = False, calib_device: str | None = None,
            backend_options: dict[str, Any] | None = None) -> Artifact:
    """Capture ``model``, run ``pipeline`` over it, lower it for ``target``; return the Artifact (saved to
    ``output`` when given, replacing an existing artifact there only with ``overwrite=True``).

    ``model``: a Hugging Face folder, a llama2.c ``.bin``, an ``.onnx`` file, an ``nn.Module`` (with
    ``example_inputs``), or an ``ir.Module``. ``pipeline``: pipeline text, a preset name, or a parsed ``Pipeline``.
    ``target``: ``"reference"`` (PyTorch), ``"cpu"``, ``"arm64"``, ``"cuda"``, or a TVM target dict.
    ``calibration``: a text file path, a list of strings, a list of token tensors, or a ``Calibration``.
    ``calib_device``: where calibration-driven passes (gptq, sparsify wanda/sparsegpt, factorize asvd/svd_llm)
    accumulate their statistics and run their per-layer math, e.g. ``"cuda"``; results come back to the CPU.
    ``None``: a recipe calibration's ``device``, else ``"cpu"``.
    ``backend_options``: settings of the target's backend (``Backend.OPTIONS``; for TVM e.g.
    ``{"sparse_kernels": "always", "epilogues": "decode"}``), recorded in the manifest.
    The returned artifact is callable like the model's forward and reports what each pass did (``.passes``).

    Everything that can be checked without the model is checked first (``llmpress.preflight``): the pipeline text
    and its options, the target, the files named, calibration data for passes that need it, and ``output``.
    """
    from .backends import backend_for_target
    from .eval.size import parameter_bytes
    from .passes.manager import resolved_pipeline
    from .preflight import check_compile

    t0 = time.perf_counter()
    if calib_device is None:
        calib_device = getattr(calibration, "device", None)  # a recipe's [calibration] device
    check_compile(model, pipeline=pipeline, target=target, calibration=calibration, tokenizer=tokenizer,
                  output=output, overwrite=overwrite, calib_device=calib_device, backend_options=backend_options)
    backend = backend_for_target(target).with_options(backend_options)
    module, tok = prepare(model, example_inputs, tokenizer=tokenizer)
    calib = _calibration(calibration, tok)
    bytes_before = parameter_bytes(module)
    module, records = run_pipeline(module, pipeline, calibration=calib, target=target, progress=progress,
                                   instruments=instruments, reproducer_dir=reproducer_dir, seed=seed,
                                   calib_device=calib_device)
    problems = backend.check(module, target)
    if problems:
        raise UnsupportedOpError(f"the {backend.name} backend cannot lower {len(problems)} op(s):\n  "
                                 + "\n  ".join(str(p) for p in problems),
                                 op=problems[0].op, where=problems[0].source_line)
    t1 = time.perf_counter()
    compiled = backend.lower(module, target, progress=progress)
    t2 = time.perf_counter()
    manifest = {
        "backend": backend.name,
        "target": compiled.target_json(),
        "pipeline": str(pipeline) if pipeline is not None else "",
        **({"backend_options": dict(backend_options)} if backend_options else {}),
        "resolved_pipeline": resolved_pipeline(records),  # what ran, with data-driven choices (autobits) explicit
        "passes": [r.to_json() if hasattr(r, "to_json") else r for r in records],
        "lm": module.lm.to_json() if module.lm else None,
        "signature": _signature(module),
        "source": module.info.get("source"),
        "parameter_bytes": {"before": bytes_before, "after": parameter_bytes(module)},
        "layers": layer_summary(module),
        "compile_seconds": {"passes": t1 - t0, "lower": t2 - t1},
    }
    art = Artifact(compiled, manifest, tok)
    art.module = module  # the rewritten IR, for evaluation and inspection in this process
    if output is not None:
        art.save(output, overwrite=overwrite)
    return art


def _signature(module: Module) -> dict:
    def desc(n):
        v = n.meta.get("val")
        if isinstance(v, torch.Tensor):
            return {"name": n.name, "dtype": str(v.dtype).replace("torch.", ""), "shape": [str(d) for d in v.shape]}
        return {"name": n.name}

    outs = module.output_node().args[0]
    return {"inputs": [desc(n) for n in module.user_inputs()],
            "outputs": [desc(n) for n in outs if hasattr(n, "meta")]}


def load(path: str | Path, *, threads: int | None = None, build: str | None = None) -> Artifact:
    """Load an artifact folder or ``.tar``: verifies hashes and target first (``ArtifactError`` if damaged).
    ``threads``: CPU threads to run on (default: every core in the process's affinity mask). ``build``: which build
    of a ``cpu`` artifact runs (default: the most capable one the CPU supports; ``"cpu"``: the portable one)."""
    return _load_artifact(path, threads=threads, build=build)
