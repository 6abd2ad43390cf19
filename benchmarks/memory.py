"""Peak resident memory of ``llmpress compile`` against "compressed size + one float layer".

Each row runs ``python -m llmpress compile MODEL -p PIPELINE -t cpu -o OUT`` in a fresh subprocess and records the
child's peak resident set (``ru_maxrss`` from ``os.wait4``: the high-water mark of the compile process, file-backed
pages included) and its wall time. The bound a layer-by-layer compiler should meet is

    bound = compressed size (the artifact's ``weights.safetensors``) + one decoder layer in float32

(the layer's q/k/v/o, gate/up/down and norm weights at 4 bytes each); the row's ratio is ``peak / bound``.

Rows (``--rows``, default the Llama rows but 7b): ``{110m,1.1b}-{fp32,bf16}-{rtn,gptq}``, ``7b-bf16-rtn``, and
``{110m,1.1b}-stablelm-bf16-rtn`` (another architecture: StableLM; like every folder since the ``transformers``
label, transformers' model captured through its StaticCache, lazily: ``loaders.hf_generic``).

- models: the cached random-weight shapes of ``shapes.py`` (fp32); the bf16 copies are written next to them
  (``benchmarks/.cache/models/<shape>-bf16``) tensor by tensor. ``7b-bf16`` is a Llama-2-7B shape (dim 4096, 32
  layers, hidden 11008, vocab 32000) written directly in bf16, sharded (~13.5 GB, random normal(0, 0.02) weights,
  never held in memory whole). ``<shape>-stablelm-bf16``: a StableLM of the 110M / TinyLlama-1.1B shape (same
  dims, heads, vocab, tying; StableLM's LayerNorms with bias and RoPE over a quarter of each head), written the
  same way from transformers' ``StableLmConfig``.
- ``rtn``: ``quantize(bits=4,group=128,exclude=lm_head)`` (the ``w4a16`` preset without its ``fuse`` step: fusing
  q/k/v before quantizing holds every fused float matrix at once); ``gptq``: the ``w4a16-gptq`` preset with 16
  calibration samples of 128 tokens from ``calib.txt``.

Results merge into ``benchmarks/results/memory.{md,json}`` keyed by row and ``--label`` (``before``: the code before
lazy weights, run with ``--pythonpath`` pointing at that checkout; ``after``: lazy weights, lowering unchanged;
``streamed``: lowering streamed too: transformed weights in chunks spilled to disk; ``transformers``: this one,
every folder loaded as transformers' own model, the hand-written Llama retired), so rows can be
measured in separate locked runs: ``flock /work/scratch/bench.lock python benchmarks/memory.py --rows 110m-fp32-rtn``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import loadavg  # noqa: E402
from shapes import CACHE, SHAPES, llama_folder  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from llmpress.safetensors_io import read_header, read_tensor, write_streamed  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
CALIB = Path("/work/shared/data/tinystories/calib.txt")
PIPELINES = {
    "rtn": "quantize(bits=4,group=128,exclude=lm_head)",
    "gptq": "gptq(bits=4,group=128,exclude=lm_head)",
}
CALIB_SAMPLES, CALIB_SEQ = 16, 128
SHAPE_7B = dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                intermediate_size=11008, vocab_size=32000, max_position_embeddings=512, rms_norm_eps=1e-5,
                rope_theta=10000.0, tie_word_embeddings=False)
ROWS = [f"{s}-{d}-{p}" for s in ("110m", "1.1b") for d in ("fp32", "bf16") for p in ("rtn", "gptq")] + ["7b-bf16-rtn"]
GENERIC_ROWS = [f"{s}-stablelm-bf16-rtn" for s in ("110m", "1.1b")]
SHARD_BYTES = 2 * 1024 ** 3
LABELS = ("before", "after", "streamed", "transformers")


def _copy_folder_files(src: Path, dst: Path) -> None:
    for name in ("tokenizer.model",):
        if (src / name).is_file() and not (dst / name).exists():
            (dst / name).write_bytes((src / name).read_bytes())


def bf16_folder(shape: str) -> Path:
    """``<shape>-bf16``: the fp32 cached shape converted tensor by tensor (one tensor in memory at a time)."""
    src = llama_folder(shape)
    dst = CACHE / f"{shape}-bf16"
    if (dst / ".complete").is_file():
        return dst
    dst.mkdir(parents=True, exist_ok=True)
    cfg = json.loads((src / "config.json").read_text())
    cfg["dtype"] = "bfloat16"
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))
    _copy_folder_files(src, dst)
    path = src / "model.safetensors"
    entries, start = read_header(path)
    tensors = {k: (torch.bfloat16, tuple(e["shape"]),
                   (lambda e=e: read_tensor(path, e, start).to(torch.bfloat16))) for k, e in entries.items()}
    write_streamed(dst / "model.safetensors", tensors, metadata={"format": "pt"})
    (dst / ".complete").write_text("done\n")
    return dst


def folder_7b() -> Path:
    """A Llama-2-7B-shaped bf16 checkpoint, random weights, in ~2 GB shards with an index."""
    from transformers import LlamaConfig

    dst = CACHE / "7b-bf16"
    if not (dst / ".complete").is_file():
        _write_random_bf16(dst, LlamaConfig(**SHAPE_7B, hidden_act="silu", bos_token_id=1, eos_token_id=2,
                                            torch_dtype="bfloat16", architectures=["LlamaForCausalLM"]))
    return dst


def stablelm_folder(shape: str) -> Path:
    """``<shape>-stablelm-bf16``: StableLM with the dims of ``shapes.SHAPES[shape]``, random weights, bf16."""
    from transformers import StableLmConfig

    dst = CACHE / f"{shape}-stablelm-bf16"
    if not (dst / ".complete").is_file():
        dims = {k: v for k, v in SHAPES[shape].items() if k != "rms_norm_eps"}
        _write_random_bf16(dst, StableLmConfig(**dims, bos_token_id=1, eos_token_id=2, torch_dtype="bfloat16",
                                               architectures=["StableLmForCausalLM"]))
    return dst


def _write_random_bf16(dst: Path, config) -> None:
    """``config``'s causal LM as a bf16 checkpoint in ~2 GB shards with an index: normal(0, 0.02) matrices, norm
    weights 1, biases 0, generated tensor by tensor (the model is built on the meta device, never held)."""
    from shapes import write_tokenizer
    from transformers import AutoModelForCausalLM

    dst.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(dst)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    # state_dict() lists a tied lm_head too; save_pretrained drops it, and so do we
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()
              if not (config.tie_word_embeddings and k == "lm_head.weight")}
    shards: list[dict[str, tuple]] = [{}]
    size = 0
    for k, s in shapes.items():
        n = 2 * int(torch.tensor(s).prod()) if s else 2
        if size + n > SHARD_BYTES and shards[-1]:
            shards.append({})
            size = 0
        shards[-1][k] = s
        size += n
    g = torch.Generator().manual_seed(0)

    def make(k: str, s: tuple) -> torch.Tensor:
        if len(s) == 1:
            return (torch.zeros if k.endswith("bias") else torch.ones)(s, dtype=torch.bfloat16)
        return torch.empty(s).normal_(0.0, 0.02, generator=g).to(torch.bfloat16)

    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        write_streamed(dst / name, {k: (torch.bfloat16, s, (lambda k=k, s=s: make(k, s))) for k, s in shard.items()},
                       metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
    (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    write_tokenizer(dst / "tokenizer.model", config.vocab_size)
    (dst / ".complete").write_text("done\n")


def model_folder(shape: str, dtype: str, family: str = "llama") -> Path:
    if family == "stablelm":
        return stablelm_folder(shape)
    if shape == "7b":
        return folder_7b()
    return llama_folder(shape) if dtype == "fp32" else bf16_folder(shape)


def layer_float_bytes(folder: Path) -> int:
    """float32 bytes of decoder layer 0's weights (every tensor named ``model.layers.0.*``)."""
    n = 0
    files = sorted(folder.glob("*.safetensors"))
    for f in files:
        entries, _ = read_header(f)
        for k, e in entries.items():
            if k.startswith("model.layers.0."):
                n += 4 * int(torch.tensor(e["shape"]).prod())
    return n


def run_row(row: str, pythonpath: Path, keep: bool) -> dict:
    shape, family, dtype, method = _parse_row(row)
    folder = model_folder(shape, dtype, family)
    out = Path(tempfile.mkdtemp(prefix=f"llmpress-mem-{row}-"))
    cmd = [sys.executable, "-m", "llmpress", "compile", str(folder), "--target", "cpu", "-o", str(out / "art"), "--force",
           "-q"]
    if method == "gptq":  # a recipe: the only way to set the calibration size on the command line
        recipe = out / "recipe.toml"
        recipe.write_text(f'pipeline = "{PIPELINES[method]}"\n[calibration]\ndata = "{CALIB}"\n'
                          f"samples = {CALIB_SAMPLES}\nseq_len = {CALIB_SEQ}\n")
        cmd += ["--recipe", str(recipe)]
    else:
        cmd += ["--pipeline", PIPELINES[method]]
    env = dict(os.environ, PYTHONPATH=str(pythonpath))
    load = loadavg()
    t0 = time.perf_counter()
    # cwd: ``python -m`` puts the working directory first on sys.path, ahead of PYTHONPATH; run from a checkout,
    # the child would import that checkout's llmpress whatever --pythonpath says
    proc = subprocess.Popen(cmd, env=env, cwd=str(pythonpath), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    log = proc.stdout.read().decode(errors="replace")
    rc = os.waitstatus_to_exitcode(status)
    res = {"row": row, "model": str(folder), "pipeline": PIPELINES[method], "rc": rc,
           "peak_rss_bytes": usage.ru_maxrss * 1024, "wall_s": round(wall, 1), "load_before": load,
           "checkpoint_bytes": sum(f.stat().st_size for f in folder.glob("*.safetensors")),
           "layer_float_bytes": layer_float_bytes(folder)}
    if rc != 0:
        res["error"] = log[-2000:]
    else:
        w = out / "art" / "weights.safetensors"
        res["compressed_bytes"] = w.stat().st_size
        res["bound_bytes"] = res["compressed_bytes"] + res["layer_float_bytes"]
        res["ratio"] = round(res["peak_rss_bytes"] / res["bound_bytes"], 2)
    if not keep:
        subprocess.run(["rm", "-rf", str(out)], check=False)
    return res


def _parse_row(row: str) -> tuple[str, str, str, str]:
    """``shape[-family]-dtype-method`` -> (shape, family, dtype, method); the family defaults to llama."""
    parts = row.split("-")
    return (parts[0], "llama", *parts[1:]) if len(parts) == 3 else tuple(parts)


def _gb(n: int | None) -> str:
    return "-" if n is None else f"{n / 1e9:.2f}"


def to_markdown(data: dict) -> str:
    lines = ["# Peak memory of `llmpress compile` (target `cpu`)", "",
             "Peak resident memory (`ru_maxrss` of the compile subprocess) against the bound *compressed size "
             "(artifact `weights.safetensors`) + one decoder layer in float32*. `before`: weights loaded eagerly in "
             "float32; `after`: lazy weights (read one tensor at a time from the checkpoint when a pass asks); `streamed`: "
             "lazy weights and streamed lowering (weights transformed in ~128 MB chunks spilled to a temporary file, "
             "the artifact written one tensor at a time); `transformers`: as streamed, with every Hugging Face folder "
             "loaded as transformers' own model (llmpress' hand-written Llama retired). "
             "Produced by `benchmarks/memory.py`; RTN = `" + PIPELINES["rtn"] + "`, GPTQ = `" + PIPELINES["gptq"]
             + "` with 16 x 128 calibration tokens. GB = 1e9 bytes.", "",
             "| row | checkpoint GB | code | peak GB | compressed GB | + one float layer GB | peak / bound | wall s "
             "| load before |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in ROWS + GENERIC_ROWS:
        for label in LABELS:
            r = data.get(row, {}).get(label)
            if r is None:
                continue
            peak = _gb(r["peak_rss_bytes"]) if r["rc"] == 0 else f"failed (rc {r['rc']}) at {_gb(r['peak_rss_bytes'])}"
            lines.append(f"| {row} | {_gb(r['checkpoint_bytes'])} | {label} | {peak} | {_gb(r.get('compressed_bytes'))} "
                         f"| {_gb(r.get('bound_bytes'))} | {r.get('ratio', '-')} | {r['wall_s']}{' (' + r['note'] + ')' if r.get('note') else ''} "
                         f"| {r['load_before']} |")
    notes = data.get("_notes", [])
    if notes:
        lines += [""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", default=",".join(r for r in ROWS if not r.startswith("7b")),
                    help=f"comma-separated rows of {', '.join(ROWS + GENERIC_ROWS)}")
    ap.add_argument("--label", default="transformers", choices=LABELS)
    ap.add_argument("--pythonpath", type=Path, default=ROOT, help="the llmpress checkout the compiles run")
    ap.add_argument("--keep", action="store_true", help="keep the artifacts (in a temp folder)")
    ap.add_argument("--note", default="", help="recorded with the row (e.g. 'unlocked, nice 19': wall time is no "
                    "timing)")
    ap.add_argument("--prepare-only", action="store_true", help="write the models the rows need and stop")
    a = ap.parse_args(argv)
    rows = [r.strip() for r in a.rows.split(",") if r.strip()]
    bad = [r for r in rows if r not in ROWS + GENERIC_ROWS]
    if bad:
        ap.error(f"unknown rows {bad}; known: {', '.join(ROWS + GENERIC_ROWS)}")
    if a.prepare_only:
        for r in rows:
            shape, family, dtype, _ = _parse_row(r)
            print(model_folder(shape, dtype, family))
        return 0
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / "memory.json"
    for row in rows:
        res = run_row(row, a.pythonpath, a.keep)
        res["label"] = a.label
        if a.note:
            res["note"] = a.note
        data = json.loads(path.read_text()) if path.is_file() else {}
        data.setdefault(row, {})[a.label] = res
        path.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
        (RESULTS / "memory.md").write_text(to_markdown(data))
        print(f"{row} [{a.label}]: rc {res['rc']}, peak {_gb(res['peak_rss_bytes'])} GB, "
              f"bound {_gb(res.get('bound_bytes'))} GB, ratio {res.get('ratio')}, {res['wall_s']} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
