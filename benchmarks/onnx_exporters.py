"""ONNX out: llmpress' own FX -> ONNX translator (``llmpress/backends/onnx``) against PyTorch's maintained exporter
(``torch.onnx.export(exported_program, dynamo=True)``, onnxscript), on the same captured graphs.

Issue 11 asks to weigh the two and keep the smaller, more complete one. For each model this records, per exporter:
whether the export succeeds, its time, the ONNX node count, and the largest logit difference from the reference
graph (prefill of 8 tokens from an empty cache, run in ONNX Runtime's CPU provider); for tinystories-llama also the
decode/prefill speed of both files in ONNX Runtime (rows interleaved, ``machine.interleaved_timings``).

Models: the reference tinystories-llama (fp32 and ``quantize(bits=4,group=32)``, whose ``llmpress.wq_linear`` ops
the maintained exporter meets as custom ops), and small random models of each architecture llmpress loads (made
here from transformers' configs; nothing downloaded).

Run: ``.venv/bin/python benchmarks/onnx_exporters.py`` -> ``benchmarks/results/onnx_exporters.{md,json}``.
"""
from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
import warnings
from pathlib import Path

import torch
from machine import interleaved_timings, loadavg, machine_env

REPO = Path(__file__).resolve().parents[1]
SHARED = (REPO / ".." / "shared").resolve()
RESULTS = REPO / "benchmarks" / "results"

log = logging.getLogger("benchmarks.onnx_exporters")

TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def _random_folder(kind: str, folder: Path) -> Path:
    """A random ``kind`` model saved by transformers (the configs the tests use)."""
    import transformers as tf

    if kind == "gpt2":
        cfg = tf.GPT2Config(vocab_size=512, n_embd=64, n_layer=2, n_head=4, n_positions=64, bos_token_id=1,
                            eos_token_id=2)
    else:
        cls = {"qwen2": tf.Qwen2Config, "phi3": tf.Phi3Config, "gemma2": tf.Gemma2Config,
               "gemma3_text": tf.Gemma3TextConfig}[kind]
        extra = {"sliding_window": 64, "head_dim": 32} if kind.startswith("gemma") else {}
        cfg = cls(**TINY, **extra)
    torch.manual_seed(0)
    tf.AutoModelForCausalLM.from_config(cfg).save_pretrained(str(folder))
    return folder


def _nodes(path: Path) -> int:
    import onnx

    return len(onnx.load(str(path), load_external_data=False).graph.node)


def _ours(module, folder: Path) -> Path:
    import llmpress

    llmpress.compile(module.clone(), target="onnx", progress=False).save(folder)
    return next(folder.glob("*.onnx"))


def _dynamo(module, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prog = torch.onnx.export(module.exported_program, dynamo=True, optimize=True, verbose=False)
    path = folder / "model.onnx"
    prog.save(str(path))
    return path


def _reason(e: BaseException) -> str:
    """The root cause of an exporter failure, one line: the innermost exception (torch.onnx wraps it twice)."""
    import re

    while e.__cause__ is not None:
        e = e.__cause__
    lines = [ln for ln in re.sub(r"\x1b\[[0-9;]*m", "", str(e)).splitlines() if ln.strip()]
    return f"{type(e).__name__}: {(lines[0] if lines else '')[:200]}"


def _row(name: str, module, work: Path) -> dict:
    from llmpress.backends.onnx.runtime import OrtProgram
    from llmpress.eval.generate import empty_cache

    ids = torch.randint(1, module.lm.vocab_size, (1, 8), generator=torch.Generator().manual_seed(0))
    inputs = (ids, torch.zeros(1, dtype=torch.int64), *empty_cache(module.lm))
    ref = module.run(*inputs)[0]
    row: dict = {"model": name}
    for exporter, fn in (("llmpress", _ours), ("torch.onnx dynamo", _dynamo)):
        t0 = time.perf_counter()
        try:
            path = fn(module, work / f"{name}-{exporter.split()[0]}")
            seconds = time.perf_counter() - t0
            prog = OrtProgram(path)
            got = prog(*inputs)[0]
            row[exporter] = {"ok": True, "export_s": seconds, "nodes": _nodes(path),
                             "max_logit_diff": float((got - ref).abs().max()), "path": str(path)}
        except Exception as e:  # noqa: BLE001 - the failure is the measurement
            row[exporter] = {"ok": False, "export_s": time.perf_counter() - t0, "error": _reason(e)}
        log.info("%s %s: %s", name, exporter, {k: v for k, v in row[exporter].items() if k != "path"})
    return row


def _speed(rows: list[dict], repeats: int) -> dict:
    from llmpress.backends.onnx.runtime import OrtProgram

    row = next(r for r in rows if r["model"] == "tinystories-llama fp32")
    built = []
    for exporter in ("llmpress", "torch.onnx dynamo"):
        if row[exporter]["ok"]:
            prog = OrtProgram(row[exporter]["path"])
            built.append(({"exporter": exporter}, prog.forward, LM))
    interleaved_timings(built, {"t": 128}, decode=32, repeats=repeats)
    return {r["exporter"]: r["t"] for r, _, _ in built}


def to_markdown(rows: list[dict], speed: dict, env: dict) -> str:
    lines = [
        "# ONNX export: llmpress' translator vs torch.onnx.export(dynamo=True)",
        "",
        f"Machine: {env['cpu']} ({env['cores']} cores), load {env['load_before']} before / {env['load_after']} after. "
        f"`benchmarks/onnx_exporters.py`, {env['date']}, {env['seconds']} s. torch {torch.__version__}, onnxscript "
        f"{env['onnxscript']}, onnxruntime {env['onnxruntime']}. Logit difference: ONNX Runtime vs the reference graph, "
        "prefill of 8 tokens.",
        "",
        "| model | exporter | ok | export s | ONNX nodes | max logit diff | error |",
        "|---|---|---|---:|---:|---:|---|",
    ]
    for r in rows:
        for exporter in ("llmpress", "torch.onnx dynamo"):
            e = r[exporter]
            if e["ok"]:
                lines.append(f"| {r['model']} | {exporter} | yes | {e['export_s']:.1f} | {e['nodes']} "
                             f"| {e['max_logit_diff']:.1e} | |")
            else:
                lines.append(f"| {r['model']} | {exporter} | **no** | {e['export_s']:.1f} | | | {e['error']} |")
    if speed:
        lines += ["", "tinystories-llama fp32 in ONNX Runtime (2 threads), rows interleaved:", "",
                  "| exporter | prefill 128 ms | decode tok/s |", "|---|---:|---:|"]
        for exporter, t in speed.items():
            lines.append(f"| {exporter} | {t['prefill_ms']:.1f} | {t['decode_tokens_per_s']:.1f} |")
    return "\n".join(lines) + "\n"


LM = None


def main() -> None:
    global LM
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=str(RESULTS / "onnx_exporters"))
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    import onnxruntime
    import onnxscript

    import llmpress
    from llmpress.api import run_pipeline
    from llmpress.ir.loaders import load_model

    t0 = time.perf_counter()
    env = machine_env(onnxscript=onnxscript.__version__, onnxruntime=onnxruntime.__version__)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        ts = llmpress.capture(load_model(SHARED / "models" / "tinystories-llama", cache_len=256).model)
        LM = ts.lm
        rows.append(_row("tinystories-llama fp32", ts, work))
        q, _ = run_pipeline(ts.clone(), "quantize(bits=4,group=32,exclude=lm_head)", progress=False)
        rows.append(_row("tinystories-llama int4 g32", q, work))
        for kind in ("qwen2", "phi3", "gpt2", "gemma2", "gemma3_text"):
            module = llmpress.capture(load_model(_random_folder(kind, work / f"hf-{kind}")).model)
            rows.append(_row(f"random {kind}", module, work))
        speed = _speed(rows, args.repeats)
    env.update(load_after=loadavg(), seconds=round(time.perf_counter() - t0))
    for r in rows:
        for exporter in ("llmpress", "torch.onnx dynamo"):
            r[exporter].pop("path", None)
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps({"env": env, "rows": rows, "speed": speed}, indent=1))
    out.with_suffix(".md").write_text(to_markdown(rows, speed, env))
    print(out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
