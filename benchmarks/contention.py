"""Two compiles at once on one machine: does a second job cost about a factor of two, not ten?

Compiles tinystories-llama with GPTQ (``llmpress compile ... --pipeline PIPELINE --calib calib.txt``, the README's
example) as a child process, first alone, then two identical jobs started together, and records each job's wall
time and CPU time (user + system, from ``wait4``). The ratio is the pair's slower wall time over the lone job's:
about 2 on a machine whose cores the two jobs must share, about 1 when there are cores for both.

Before llmpress set ``OMP_WAIT_POLICY=PASSIVE`` on import (``llmpress/host.py``), two such jobs on a 2-core
machine took over 13 minutes each against 53 s alone: their OpenMP workers spun waiting for cores the other job
held. ``--policies passive,active`` also measures the lone job with ``OMP_WAIT_POLICY=ACTIVE`` (the cost of passive
waiting when alone); ``--active-pair`` adds the active pair itself (slow: the regression being guarded against).

Run: ``.venv/bin/python benchmarks/contention.py`` (about 3 minutes on 2 cores: 1 + 2 jobs of ~55 s)
-> ``benchmarks/results/contention.{md,json}``. Nothing else should run meanwhile: the load average is recorded.
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

from machine import loadavg, machine_env

REPO = Path(__file__).resolve().parents[1]
SHARED = (REPO / ".." / "shared").resolve()
RESULTS = REPO / "benchmarks" / "results"

PIPELINE = "fuse_qkv,gptq(bits=4,group=128,exclude=lm_head)"


def _jobs(n: int, args, policy: str, scratch: Path) -> list[dict]:
    """Start ``n`` identical compiles together; wall and CPU seconds of each."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("OMP_WAIT_POLICY", None)
    if policy == "active":
        env["OMP_WAIT_POLICY"] = "ACTIVE"  # what llmpress would see without its passive default
    procs = []
    for i in range(n):
        out = scratch / f"{policy}-{n}-{i}"
        cmd = [sys.executable, "-m", "llmpress", "compile", str(args.model), "--pipeline", args.pipeline,
               "--calib", str(args.calib), "--target", args.target, "-o", str(out), "-q"]
        log = open(scratch / f"{policy}-{n}-{i}.log", "w")
        procs.append((subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT), time.perf_counter(),
                      log, out))
    rows: dict[int, dict] = {}
    while len(rows) < n:
        pid, status, usage = os.wait4(-1, 0)
        for i, (p, t0, log, out) in enumerate(procs):
            if p.pid == pid:
                log.close()
                p.returncode = os.waitstatus_to_exitcode(status)
                rows[i] = {"job": i, "wall_s": round(time.perf_counter() - t0, 1),
                           "cpu_s": round(usage.ru_utime + usage.ru_stime, 1), "exit": p.returncode}
                if p.returncode != 0:
                    for q, *_ in procs:
                        if q.poll() is None:
                            q.kill()
                    tail = Path(log.name).read_text()[-2000:]
                    raise SystemExit(f"job {i} ({policy}, {n} at once) failed with exit {p.returncode}:\n{tail}")
    return [rows[i] for i in range(n)]


def run(args) -> dict:
    env = machine_env(pipeline=args.pipeline, target=args.target, model=str(args.model), calib=str(args.calib),
                      affinity=len(os.sched_getaffinity(0)))
    results = []
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="llmpress-contention-") as tmp:
        for policy in args.policies.split(","):
            pairs = policy == "passive" or args.active_pair
            for n in (1, 2) if pairs else (1,):
                load = loadavg()
                jobs = _jobs(n, args, policy, Path(tmp))
                results.append({"policy": policy, "jobs_at_once": n, "load_before": load, "load_after": loadavg(),
                                "jobs": jobs})
                print(f"{policy}: {n} at once: " + ", ".join(f"{j['wall_s']} s" for j in jobs), file=sys.stderr)
    for r in results:
        alone = next(x for x in results if x["policy"] == r["policy"] and x["jobs_at_once"] == 1)
        r["ratio_to_alone"] = round(max(j["wall_s"] for j in r["jobs"]) / alone["jobs"][0]["wall_s"], 2)
    env["seconds"] = round(time.perf_counter() - t0, 1)
    env["load_after"] = loadavg()
    return {"env": env, "runs": results}


def to_markdown(res: dict) -> str:
    env = res["env"]
    lines = [
        "# Two compiles at once: the cost of sharing the machine",
        "",
        f"Machine: {env['cpu']} ({env['cores']} cores visible, {env['affinity']} in this process's affinity mask), "
        f"load average {env['load_before']} before / {env['load_after']} after. Produced by "
        f"`benchmarks/contention.py` on {env['date']} in {env['seconds']} s.",
        "",
        f"Each job: `llmpress compile tinystories-llama --pipeline \"{env['pipeline']}\" --calib calib.txt "
        f"--target {env['target']}` in its own process. 'passive' is llmpress's default (`OMP_WAIT_POLICY=PASSIVE`"
        " set on import), 'active' sets `OMP_WAIT_POLICY=ACTIVE`. Ratio: the slowest job's wall time over the lone "
        "job's (2.0 = the cores shared fairly).",
        "",
        "| OMP wait policy | jobs at once | wall s (each) | CPU s (each) | ratio to alone | load before / after |",
        "|---|---:|---|---|---:|---|",
    ]
    for r in res["runs"]:
        walls = ", ".join(f"{j['wall_s']:.1f}" for j in r["jobs"])
        cpus = ", ".join(f"{j['cpu_s']:.1f}" for j in r["jobs"])
        lines.append(f"| {r['policy']} | {r['jobs_at_once']} | {walls} | {cpus} | {r['ratio_to_alone']:.2f}x "
                     f"| {r['load_before']} / {r['load_after']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, default=SHARED / "models" / "tinystories-llama")
    ap.add_argument("--calib", type=Path, default=SHARED / "data" / "tinystories" / "calib.txt")
    ap.add_argument("--pipeline", default=PIPELINE)
    ap.add_argument("--target", default="reference")
    ap.add_argument("--policies", default="passive", help="comma-separated: passive (llmpress's default), active")
    ap.add_argument("--active-pair", action="store_true",
                    help="with 'active' in --policies, also run two active jobs at once (over 13 min on 2 cores)")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)
    bad = set(args.policies.split(",")) - {"passive", "active"}
    if bad:
        ap.error(f"unknown --policies {', '.join(sorted(bad))} (passive, active)")
    res = run(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "contention.json").write_text(json.dumps(res, indent=2) + "\n")
    (out / "contention.md").write_text(to_markdown(res))
    sys.stdout.write(to_markdown(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
