"""llama.cpp in a child process: another build of llama-cpp-python (e.g. AVX2 only) beside the one installed.

Two builds of the ``llama_cpp`` module cannot live in one process, so ``ChildLlamaCpp`` starts this file with
``PYTHONPATH`` naming the other build's folder (``setup_peers.sh --avx2`` installs one to
``benchmarks/.cache/llamacpp-avx2``); the child loads the model once (``LlamaCppLM``) and answers one JSON line per
request on stdin: ``{"prefill": 128, "decode": 32}`` -> ``LlamaCppLM.measure``'s result. Between requests it blocks
on a read (no spinning thread pool: its OpenMP workers are waited out after each measurement, as in-process).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

__all__ = ["ChildLlamaCpp"]


class ChildLlamaCpp:
    """``LlamaCppLM(path, threads)`` in a child process importing ``llama_cpp`` from ``build_dir`` first."""

    def __init__(self, path: str | Path, threads: int, build_dir: str | Path) -> None:
        build_dir = Path(build_dir)
        if not (build_dir / "llama_cpp").is_dir():
            raise FileNotFoundError(f"{build_dir}: no llama_cpp build there (bash benchmarks/setup_peers.sh --avx2)")
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(build_dir), str(HERE.parent)]))
        self.proc = subprocess.Popen([sys.executable, __file__, str(path), str(threads)], env=env, text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        hello = self._read()
        self.system_info = hello["system_info"]

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the llama.cpp child exited ({self.proc.wait()})")
        return json.loads(line)

    def measure(self, prefill_tokens: int = 128, decode_tokens: int = 32, repeats: int = 1) -> dict:
        self.proc.stdin.write(json.dumps({"prefill": prefill_tokens, "decode": decode_tokens,
                                          "repeats": repeats}) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(timeout=60)


def _serve(path: str, threads: int) -> None:
    import llama_cpp
    from peers.llamacpp import LlamaCppLM

    out = sys.stdout
    sys.stdout = sys.stderr  # the protocol owns the real stdout
    lm = LlamaCppLM(path, threads)
    out.write(json.dumps({"system_info": llama_cpp.llama_print_system_info().decode()}) + "\n")
    out.flush()
    for line in sys.stdin:
        req = json.loads(line)
        res = lm.measure(prefill_tokens=req["prefill"], decode_tokens=req["decode"], repeats=req["repeats"])
        out.write(json.dumps(res) + "\n")
        out.flush()
    lm.close()


if __name__ == "__main__":
    _serve(sys.argv[1], int(sys.argv[2]))
