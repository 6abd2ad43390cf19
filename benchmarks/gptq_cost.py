"""What GPTQ costs on the CPU for the 1.1B shape (TinyLlama: dim 2048, 32/4 heads, SwiGLU 5632), before and after
the loop changes of ``llmpress/passes/gptq.py`` / ``quant_common.find_params``, and where the time goes.

The model: one decoder block of the 1.1B shape (transformers' ``LlamaForCausalLM``, weights normal(0, 0.02), norms 1,
from ``torch.manual_seed(0)``), captured, calibrated on ``--windows`` windows of 256 random token ids. (The committed
results were measured on llmpress' former hand-written decoder of the same shape and weights.)

1. The pass (after): ``gptq(bits=4,group=128,exclude=lm_head)`` on that block under ``cProfile``: total seconds and
   the split into block replay (``BlockRunner._run_block`` less the observer), Hessian accumulation
   (``GramStats.update``), the Cholesky factors (``factor_hessian``), the clipping search (``find_params``) and the
   column loop (the rest of ``gptq_quantize``). The Hessians of the block's four inputs are kept for step 2.
2. The per-linear math, before (``benchmarks/gptq_before.py``: the loop as of 9ec27c8, verbatim) and after
   (``factor_hessian`` once per shared input, then ``gptq_quantize``), interleaved rounds on the same weights and
   Hessians; the after codes and scales are checked equal to the before ones, bit for bit.
3. The projection for the full model (22 blocks, ``lm_head`` excluded, the default calibration of 128 windows):
   22 x (replay + Hessian accumulation, scaled from ``--windows`` to 128 windows, + the per-block math).

Run under the bench lock: ``flock /work/scratch/bench.lock .venv/bin/python benchmarks/gptq_cost.py``
-> ``benchmarks/results/gptq_cost.{md,json}``.
"""
from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import gptq_before as before  # noqa: E402
from machine import loadavg, machine_env  # noqa: E402

from llmpress.ir.capture import capture  # noqa: E402
from llmpress.passes.base import PassContext  # noqa: E402
from llmpress.passes.calibration import Calibration  # noqa: E402
from llmpress.passes.gptq import GPTQ, GPTQOptions, factor_hessian, gptq_quantize  # noqa: E402
from llmpress.passes.hessian import collect_stats  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
LAYERS_1_1B = 22
DEFAULT_WINDOWS = 128  # Calibration.from_texts' default samples
OPTS = dict(bits=4, group=128, sym=True)


class _Recording(GPTQ):
    """The real pass; its Hessian seam also keeps what it collected, for step 2."""

    kept: list = []

    @staticmethod
    def _hessians(module, calib, members, **where):
        stats = collect_stats(module, calib, members, **where)
        _Recording.kept.append(stats)
        return stats


def _block(windows: int) -> tuple:
    torch.manual_seed(0)
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=32000, hidden_size=2048, num_hidden_layers=1, num_attention_heads=32,
                      num_key_value_heads=4, intermediate_size=5632, max_position_embeddings=512)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.ones_like(p) if name.endswith("norm.weight") else torch.randn(p.shape) * 0.02)
    g = torch.Generator().manual_seed(1)
    calib = Calibration.from_tensors([torch.randint(0, 32000, (1, 256), generator=g) for _ in range(windows)])
    return model, capture(model), calib


def _split(prof: cProfile.Profile) -> tuple[dict, list]:
    st = pstats.Stats(prof)
    cum = {}
    for (file, _, fn), (_, _, tt, ct, _) in st.stats.items():  # type: ignore[attr-defined]
        key = f"{Path(file).name}:{fn}"
        cum[key] = cum.get(key, 0.0) + ct
    get = lambda k: cum.get(k, 0.0)  # noqa: E731
    hess = get("hessian.py:update")
    parts = {"block replay": get("calibration.py:_run_block") - hess,
             "Hessian accumulation (X^T X)": hess,
             "Cholesky factors": get("gptq.py:factor_hessian"),
             "clipping search (find_params)": get("quant_common.py:find_params"),
             "column loop": get("gptq.py:gptq_quantize") - get("quant_common.py:find_params"),
             "output-error metric (stats)": get("hessian.py:output_error")}
    top = sorted(((v[2], f"{Path(k[0]).name}:{k[2]}") for k, v in st.stats.items()),  # type: ignore[attr-defined]
                 reverse=True)[:12]
    return parts, [{"function": name, "self_s": round(t, 2)} for t, name in top]


def _math_before(weights: list, hs: list) -> tuple[float, list]:
    t = time.perf_counter()
    out = [before.gptq_quantize(w, h, **OPTS) for w, h in zip(weights, hs)]
    return time.perf_counter() - t, out


def _math_after(weights: list, hs: list) -> tuple[float, list]:
    t = time.perf_counter()
    out, last = [], (None, None)
    for w, h in zip(weights, hs):
        if last[0] is not h:  # the pass factors each shared input once
            last = (h, factor_hessian(h, damp=0.01))
        out.append(gptq_quantize(w, h, factor=last[1], **OPTS))
    return time.perf_counter() - t, out


def _pass(model, module, calib) -> dict:
    """Step 1: the pass under cProfile; keeps the block's Hessians in ``_Recording.kept``."""
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    res = _Recording(GPTQOptions(exclude=("lm_head",), **OPTS)).run(module, PassContext(calibration=calib,
                                                                                          progress=False))
    prof.disable()
    pass_s = time.perf_counter() - t0
    parts, top = _split(prof)
    print(f"pass {pass_s:.1f}s ({res.stats['quantized']} linears): {parts}", flush=True)
    return {"pass_seconds_one_block": round(pass_s, 1), "pass_parts_s": {k: round(v, 2) for k, v in parts.items()},
            "top_self_time": top, "pass_load": loadavg()}


def _math(model, module, calib, rounds: int) -> dict:
    """Step 2: before/after per-linear math, interleaved, on the block's Hessians (collected here when step 1 did
    not run in this process)."""
    if not _Recording.kept:
        from llmpress.passes.calibration import BlockRunner
        from llmpress.passes.hessian import numbered_block

        members = [n for n in module.graph.nodes if n.op == "call_function" and "linear" in str(n.target)
                   and numbered_block(n) == "model.layers.0"]
        runner = BlockRunner(module, calib, numbered_block)
        _Recording.kept.append(collect_stats(module, calib, members, runner=runner, key="model.layers.0"))
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    # The inputs in graph order: q/k/v, o, gate/up, down (layers reading one input share one H object).
    inputs = dict(zip(("qkv", "o", "gate_up", "down"), (s.hessian() for s in _Recording.kept[0].values())))
    layers = [("self_attn", "q_proj", "qkv"), ("self_attn", "k_proj", "qkv"), ("self_attn", "v_proj", "qkv"),
              ("self_attn", "o_proj", "o"), ("mlp", "gate_proj", "gate_up"), ("mlp", "up_proj", "gate_up"),
              ("mlp", "down_proj", "down")]
    weights = [sd[f"model.layers.0.{sub}.{name}.weight"] for sub, name, _ in layers]
    hs = [inputs[key] for *_, key in layers]
    rows, identical = [], True
    for r in range(rounds):
        order = ("before", "after") if r % 2 == 0 else ("after", "before")
        row: dict = {"round": r, "load": loadavg()}
        outs = {}
        for which in order:
            secs, outs[which] = (_math_before if which == "before" else _math_after)(weights, hs)
            row[f"{which}_s"] = round(secs, 1)
            print(f"round {r} {which}: {secs:.1f}s (load {loadavg()})", flush=True)
        identical &= all(torch.equal(a.q, b.q) and torch.equal(a.scales, b.scales)
                         for a, b in zip(outs["before"], outs["after"]))
        rows.append(row)
    return {"rounds": rows, "bit_identical": identical}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--windows", type=int, default=16, help="calibration windows of 256 tokens (scaled to 128)")
    ap.add_argument("--rounds", type=int, default=1, help="interleaved before/after rounds of the per-linear math")
    ap.add_argument("--part", choices=["pass", "math", "all"], default="all",
                    help="run step 1, step 2 or both (separate runs merge into the results; each holds the lock "
                    "for less time)")
    args = ap.parse_args()
    path = RESULTS / "gptq_cost.json"
    out = json.loads(path.read_text()) if args.part != "all" and path.exists() else {}
    if out.get("windows", args.windows) != args.windows:
        out = {}
    out.update(machine=machine_env(threads=torch.get_num_threads()), windows=args.windows)
    model, module, calib = _block(args.windows)
    print(f"block built; load {loadavg()}", flush=True)
    if args.part in ("pass", "all"):
        out.update(_pass(model, module, calib))
    if args.part in ("math", "all"):
        out.update(_math(model, module, calib, args.rounds))
    out["load_after"] = loadavg()
    RESULTS.mkdir(exist_ok=True)
    path.write_text(json.dumps(out, indent=1) + "\n")
    if "rounds" in out and "pass_parts_s" in out:
        _report(out)


def _report(out: dict) -> None:
    """Step 3 and the markdown, from the merged results."""
    parts, rounds, windows = out["pass_parts_s"], out["rounds"], out["windows"]
    med = lambda xs: round(statistics.median(xs), 1)  # noqa: E731
    math_before, math_after = med([r["before_s"] for r in rounds]), med([r["after_s"] for r in rounds])
    scale = DEFAULT_WINDOWS / windows
    # The pass replays each block twice (observed, then again quantized as the next block's input): the one-block
    # model shows the first; the second costs about the same.
    data = parts["block replay"] * scale * 2 + parts["Hessian accumulation (X^T X)"] * scale
    # The rest of the pass (the output-error metric, graph rewrites, packing) is the same code before and after.
    measured = ("block replay", "Hessian accumulation (X^T X)", "Cholesky factors", "clipping search (find_params)",
                "column loop")
    rest = out["pass_seconds_one_block"] - sum(parts[k] for k in measured)
    proj = {w: LAYERS_1_1B * (data + rest + m) for w, m in (("before", math_before), ("after", math_after))}
    n = 7 * LAYERS_1_1B
    out.update({
        "math_per_block_s": {"before": math_before, "after": math_after},
        "math_per_linear_s": {"before": round(math_before / 7, 2), "after": round(math_after / 7, 2)},
        "speedup_math": round(math_before / math_after, 2),
        "replay_and_hessian_per_block_at_128_windows_s": round(data, 1),
        "rest_of_pass_per_block_s": round(rest, 1),
        "projected_full_model_s": {k: round(v) for k, v in proj.items()},
        "projected_per_linear_s": {k: round(v / n, 1) for k, v in proj.items()},
    })
    (RESULTS / "gptq_cost.json").write_text(json.dumps(out, indent=1) + "\n")
    env = out["machine"]
    lines = [
        "# GPTQ cost on the CPU, 1.1B shape",
        "",
        f"Machine: {env.get('cpu')}, {env.get('cores')} cores, torch threads {env['threads']}; load "
        f"{env['load_before']} at the start of the last run, {out['load_after']} at its end (a shared machine: "
        f"other jobs ran). One decoder block of TinyLlama-1.1B's shape (random weights), gptq(bits=4, group=128), "
        f"calibration {windows} x 256 tokens; replay and Hessian times scaled x{scale:g} to the default 128 windows "
        "and doubled for the second replay of each block; the rest of the pass (output-error metric, rewrites) "
        "counted alike before and after.",
        "",
        "| | before (9ec27c8) | after |",
        "|---|---|---|",
        f"| GPTQ math per block (7 linears), s | {math_before} | {math_after} |",
        f"| GPTQ math per linear, s | {math_before / 7:.2f} | {math_after / 7:.2f} |",
        f"| projected per linear incl. replay, Hessians and the rest of the pass, s | {proj['before'] / n:.1f} | {proj['after'] / n:.1f} |",
        f"| projected full model (22 blocks, 128 windows), min | {proj['before'] / 60:.1f} | "
        f"{proj['after'] / 60:.1f} |",
        "",
        f"Math speedup {out['speedup_math']}x; codes and scales bit-identical before/after: {out['bit_identical']}. "
        "Rounds (before / after, interleaved; the table has their medians): "
        + "; ".join(f"{r['before_s']} / {r['after_s']} s (load {r['load']})" for r in rounds),
        "",
        f"## Where the time goes (the pass after, one block, {windows} windows, {out['pass_seconds_one_block']} s, "
        f"load {out['pass_load']})",
        "",
        "| part | s |",
        "|---|---|",
        *[f"| {k} | {v:.2f} |" for k, v in parts.items()],
        f"| other (the output-error metric unless listed above, prefix run, graph rewrites, packing) | {out['pass_seconds_one_block'] - sum(parts.values()):.2f} |",
        "",
        "Top self time (cProfile; a Python function's self time includes the tensor operators it applies):",
        "",
        "| function | self s |",
        "|---|---|",
        *[f"| `{t['function']}` | {t['self_s']} |" for t in out["top_self_time"]],
        "",
    ]
    (RESULTS / "gptq_cost.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
