"""Sparse weights stored compressed in a TVM ``cpu`` artifact: sizes, load times and perplexity, int4 vs 2:4 + int4.

    .venv/bin/python benchmarks/sparse_storage.py            # writes benchmarks/results/sparse_storage.{md,json}

Model: ``../shared/models/tinystories-llama`` (256-position cache). Rows, compiled for ``cpu``:

- ``gptq(bits=4,group=128)``;
- ``sparsify(method=sparsegpt,pattern=2:4),gptq(bits=4,group=128)`` (the issue's check).

Both calibrate on ``../shared/data/tinystories/calib.txt`` (32 samples of 256 tokens, as ``tests/passes/test_gptq.py``)
and are saved; the table gives the artifact's bytes (all files, and ``weights.safetensors``), the bytes the sparse
tensors would take dense and take stored (``payload.sparse_weights``), the load time (``llmpress.load``, median of
3, which includes expanding the compressed tensors), the expansion alone, and the perplexity of the *loaded* artifact
on a 16K-token prefix of ``../shared/data/tinystories/valid.txt`` (pinned protocol, 256-token windows), after a check
that its logits equal the in-memory program's bit-for-bit. Compute is dense in both (no sparse kernel yet).
"""
from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = (REPO / ".." / "shared").resolve()
MODEL = SHARED / "models" / "tinystories-llama"
VALID = SHARED / "data" / "tinystories" / "valid.txt"
CALIB = SHARED / "data" / "tinystories" / "calib.txt"
RESULTS = REPO / "benchmarks" / "results"

ROWS = {"int4": "gptq(bits=4,group=128)",
        "2:4 + int4": "sparsify(method=sparsegpt,pattern=2:4),gptq(bits=4,group=128)"}
PREFIX_TOKENS = 16384

log = logging.getLogger("sparse_storage")


def _dir_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def _row(name: str, pipeline: str, model, tok, calib, stream, work: Path) -> dict:
    import llmpress
    from llmpress.backends.tvm.sparse_storage import expand_weights
    from llmpress.eval.generate import empty_cache
    from llmpress.eval.perplexity import perplexity
    from safetensors.torch import load_file

    t0 = time.perf_counter()
    art = llmpress.compile(model, pipeline=pipeline, target="cpu", calibration=calib, tokenizer=tok, progress=True)
    compile_s = time.perf_counter() - t0
    folder = art.save(work / name.replace(" ", "").replace(":", "-").replace("+", "_"))
    manifest = json.loads((folder / "manifest.json").read_text())
    records = manifest["payload"].get("sparse_weights") or {}
    loads = []
    for _ in range(3):
        t0 = time.perf_counter()
        loaded = llmpress.load(folder)
        loads.append(time.perf_counter() - t0)
        loaded.close()
    raw = load_file(str(folder / "weights.safetensors"))
    t0 = time.perf_counter()
    expand_weights(raw, records, str(folder))
    expand_s = time.perf_counter() - t0
    window = torch.tensor([stream[:256]])
    want = art(window, torch.zeros(1, dtype=torch.int64), *empty_cache(art.lm))[0]
    with llmpress.load(folder) as loaded:
        got = loaded(window, torch.zeros(1, dtype=torch.int64), *empty_cache(loaded.lm))[0]
        identical = bool(torch.equal(got, want))
        ppl = perplexity(loaded, loaded.lm, stream, context=256, progress=True)
    row = {"name": name, "pipeline": pipeline, "artifact_bytes": _dir_bytes(folder),
           "weights_bytes": (folder / "weights.safetensors").stat().st_size, "compressed_tensors": len(records),
           "sparse_dense_bytes": sum(r["dense_bytes"] for r in records.values()),
           "sparse_stored_bytes": sum(r["stored_bytes"] for r in records.values()),
           "load_s": statistics.median(loads), "expand_s": expand_s, "compile_s": compile_s,
           "loaded_equals_in_memory": identical, "perplexity": ppl.perplexity, "tokens": ppl.tokens}
    log.info("%s", row)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(1)
    from llmpress.eval.perplexity import token_stream
    from llmpress.ir.loaders import load_model
    from llmpress.passes.calibration import Calibration

    loaded = load_model(MODEL, cache_len=256)
    tok = loaded.tokenizer
    calib = Calibration.from_texts(CALIB, tok, samples=32, seq_len=256, seed=0)
    stream = list(token_stream(VALID, tok, max_tokens=PREFIX_TOKENS + 1))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, pipeline in ROWS.items():
            rows.append(_row(name, pipeline, load_model(MODEL, cache_len=256).model.eval(), tok, calib, stream,
                             Path(tmp)))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "sparse_storage.json").write_text(json.dumps(rows, indent=1))
    base = rows[0]["artifact_bytes"]
    lines = ["# Sparse weights stored compressed in the TVM `cpu` artifact", "",
             f"tinystories-llama, target `cpu`, perplexity of the loaded artifact on {rows[0]['tokens']} tokens of "
             "tinystories valid (256-token windows); compute is dense in both rows (weights expanded at load).", "",
             "| row | pipeline | artifact bytes | vs int4 | weights.safetensors | compressed tensors | their bytes "
             "dense -> stored | load s (median of 3) | of which expand s | loaded == in-memory | perplexity |",
             "|---|---|---:|---:|---:|---:|---|---:|---:|---|---:|"]
    for r in rows:
        lines.append(f"| {r['name']} | `{r['pipeline']}` | {r['artifact_bytes']:,} | "
                     f"{r['artifact_bytes'] / base:.3f}x | {r['weights_bytes']:,} | {r['compressed_tensors']} | "
                     f"{r['sparse_dense_bytes']:,} -> {r['sparse_stored_bytes']:,} | {r['load_s']:.2f} | "
                     f"{r['expand_s']:.2f} | {'yes' if r['loaded_equals_in_memory'] else 'NO'} | "
                     f"{r['perplexity']:.3f} |")
    lines += ["", "Written by `benchmarks/sparse_storage.py` (see its docstring for the protocol)."]
    (args.out / "sparse_storage.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
