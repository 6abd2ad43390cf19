"""Build the C++ edge runner (``runner/``) and run artifacts through it, natively or under qemu.

The runner (``llmpress-runner``) loads an artifact with nothing but the TVM runtime: no Python, no PyTorch. This
module builds it per architecture into ``build/runner-<arch>/`` (CMake; ``runner/cmake/aarch64-linux-gnu.cmake``
cross-compiles for aarch64), after laying out the runtime libraries and headers of the apache-tvm wheels in
``build/tvm-<arch>/`` with ``scripts/fetch_tvm_runtime.sh``. A build is reused until a runner source changes.

Running an artifact picks the runner of the artifact's architecture (``payload.arch``); when that is not the
host's, it runs under ``qemu-<arch> -L /usr/<arch>-linux-gnu`` (``QEMU_LD_PREFIX`` overrides the sysroot). This is
what ``llmpress run DIR --emulate`` uses, and how the tests prove an ``arm64`` artifact runs on an aarch64 machine.

The build folder is ``$LLMPRESS_BUILD`` or ``<repo>/build``. Nothing is downloaded here: the foreign runtime must
have been fetched (``scripts/fetch_tvm_runtime.sh aarch64``, which ``.ci/install-cross.sh`` runs); the host's comes
from the installed wheels.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

from ...errors import ArtifactError, ConfigError, LlmpressError

__all__ = ["RunnerResult", "repo_root", "build_dir", "host_arch", "artifact_arch", "missing_tools",
           "build_runner", "runner_command", "run_artifact", "run_emulated", "generate_ids", "ARCHES"]

log = logging.getLogger(__name__)

ARCHES = ("x86_64", "aarch64")
_CROSS_CXX = {"aarch64": "aarch64-linux-gnu-g++", "x86_64": "x86_64-linux-gnu-g++"}
_SOURCES = ("CMakeLists.txt", "cmake", "src")


@dataclass
class RunnerResult:
    """One run of the edge runner: the command, its output, and the ids when ``--print-ids`` was given."""

    command: list[str]
    stdout: str
    stderr: str
    ids: list[int] | None = field(default=None)


def _norm_arch(arch: str) -> str:
    a = arch.lower()
    return {"arm64": "aarch64", "amd64": "x86_64", "x86-64": "x86_64"}.get(a, a)


def host_arch() -> str:
    return _norm_arch(platform.machine())


def repo_root() -> Path:
    """The source checkout that holds ``runner/`` (llmpress installed editable, or run from the repo)."""
    root = Path(__file__).resolve().parents[3]
    if not (root / "runner" / "CMakeLists.txt").is_file():
        raise LlmpressError(f"{root / 'runner'}: the edge runner sources are not here; build from an llmpress "
                            "source checkout (pip install -e .)")
    return root


def build_dir() -> Path:
    env = os.environ.get("LLMPRESS_BUILD")
    return Path(env) if env else repo_root() / "build"


def _check_arch(arch: str) -> str:
    a = _norm_arch(arch)
    if a not in ARCHES:
        raise ConfigError(f"the edge runner builds for {', '.join(ARCHES)}, not {arch!r}")
    return a


def _qemu(arch: str) -> str:
    return f"qemu-{arch}"


def _sysroot(arch: str) -> str:
    return os.environ.get("QEMU_LD_PREFIX") or f"/usr/{arch}-linux-gnu"


def missing_tools(arch: str) -> list[str]:
    """What this machine lacks to build and run the ``arch`` runner (empty when nothing is missing)."""
    arch = _check_arch(arch)
    need = ["cmake"]
    if arch != host_arch():
        need += [_CROSS_CXX[arch], _qemu(arch)]
    else:
        need += ["c++"]
    missing = [t for t in need if shutil.which(t) is None]
    if arch != host_arch() and not Path(_sysroot(arch)).is_dir():
        missing.append(f"{_sysroot(arch)} (the {arch} C library for qemu)")
    if arch != host_arch() and not _have_runtime(arch):
        # Never downloaded implicitly: scripts/fetch_tvm_runtime.sh (run by .ci/install-cross.sh) fetches it.
        missing.append(f"the {arch} TVM runtime in {build_dir() / f'tvm-{arch}'} (scripts/fetch_tvm_runtime.sh {arch})")
    return missing


def _have_runtime(arch: str) -> bool:
    """The ``arch`` runtime is laid out, or its wheels are downloaded (laying out needs no network then)."""
    build = build_dir()
    if (build / f"tvm-{arch}" / "lib" / "libtvm_runtime.so").is_file():
        return True
    wheels = build / "wheels"
    return any(wheels.glob(f"apache_tvm-*{arch}*.whl")) and any(wheels.glob(f"apache_tvm_ffi-*{arch}*.whl"))


def artifact_arch(folder: str | Path) -> str:
    """The architecture an artifact's library is built for (``payload.arch``, else ``target.arch``)."""
    path = Path(folder) / "manifest.json"
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{path}: cannot read the manifest ({e})") from e
    payload = manifest.get("payload") or {}
    arch = payload.get("arch") or (manifest.get("target") or {}).get("arch")
    if not arch or "lib" not in payload:
        raise ArtifactError(f"{path}: not a TVM artifact (no payload.lib / payload.arch); the edge runner runs "
                            "artifacts compiled with --target cpu or arm64")
    return _check_arch(arch)


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _newest_source(runner: Path) -> float:
    stamps = []
    for name in _SOURCES:
        p = runner / name
        files = [p] if p.is_file() else [f for f in p.rglob("*") if f.is_file()]
        stamps += [f.stat().st_mtime for f in files]
    return max(stamps)


def _run(cmd: Sequence[str], what: str, timeout: float) -> None:
    log.info("%s: %s", what, " ".join(map(str, cmd)))
    env = dict(os.environ)
    env.setdefault("PYTHON", sys.executable)  # the fetch script reads the TVM version of this environment
    try:
        proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired as e:
        raise LlmpressError(f"{what} took longer than {timeout:.0f} s: {' '.join(map(str, cmd))}") from e
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr).strip()[-3000:]
        raise LlmpressError(f"{what} failed (exit {proc.returncode}): {' '.join(map(str, cmd))}\n{tail}")


def build_runner(arch: str | None = None, *, force: bool = False, timeout: float = 600) -> Path:
    """Build (or reuse) ``build/runner-<arch>/llmpress-runner``; returns the binary's path."""
    arch = _check_arch(arch or host_arch())
    missing = missing_tools(arch)
    if missing:
        raise LlmpressError(f"cannot build the {arch} edge runner: missing {', '.join(missing)} "
                            "(install them with .ci/install-cross.sh)")
    root, build = repo_root(), build_dir()
    out = build / f"runner-{arch}"
    binary = out / "llmpress-runner"
    with _lock(build / f".runner-{arch}.lock"):
        runtime = build / f"tvm-{arch}"
        if force or not (runtime / "lib" / "libtvm_runtime.so").is_file():
            env_script = root / "scripts" / "fetch_tvm_runtime.sh"
            _run(["bash", env_script, arch], f"laying out the {arch} TVM runtime", timeout)
        if not force and binary.is_file() and binary.stat().st_mtime >= _newest_source(root / "runner"):
            return binary
        configure = ["cmake", "-S", root / "runner", "-B", out, "-DCMAKE_BUILD_TYPE=Release",
                     f"-DTVM_RUNTIME_DIR={runtime}"]
        if shutil.which("ninja"):
            configure += ["-G", "Ninja"] if not (out / "CMakeCache.txt").is_file() else []
        if arch != host_arch():
            configure.append(f"-DCMAKE_TOOLCHAIN_FILE={root / 'runner' / 'cmake' / f'{arch}-linux-gnu.cmake'}")
        _run(configure, f"configuring the {arch} edge runner", timeout)
        _run(["cmake", "--build", out, "--parallel", str(min(2, os.cpu_count() or 1))],
             f"building the {arch} edge runner", timeout)
        binary.touch()  # a no-op rebuild leaves the old mtime; mark the binary current with its sources
    return binary


def runner_command(arch: str | None = None, *, build: bool = True) -> list[str]:
    """The command prefix that runs the ``arch`` runner here: the binary, under qemu when ``arch`` is foreign."""
    arch = _check_arch(arch or host_arch())
    binary = build_runner(arch) if build else build_dir() / f"runner-{arch}" / "llmpress-runner"
    if arch == host_arch():
        return [str(binary)]
    return [_qemu(arch), "-L", _sysroot(arch), str(binary)]


def run_artifact(folder: str | Path, *, prompt: str | None = None, prompt_ids: Sequence[int] | None = None,
                 max_new_tokens: int = 256, print_ids: bool = False, verify: bool = True,
                 threads: int | None = None, timeout: float = 600) -> RunnerResult:
    """Run the artifact in ``folder`` through the edge runner of its architecture (qemu when foreign).

    Greedy decoding; stdout is the text, or with ``print_ids`` the ids (then parsed into ``.ids``).
    ``threads`` sets ``TVM_NUM_THREADS`` for the run.
    """
    folder = Path(folder)
    if prompt is not None and prompt_ids is not None:
        raise ConfigError("give prompt or prompt_ids, not both")
    cmd = runner_command(artifact_arch(folder)) + [str(folder), "--max-new-tokens", str(int(max_new_tokens))]
    if prompt is not None:
        cmd += ["--prompt", prompt]
    if prompt_ids is not None:
        cmd += ["--prompt-ids", ",".join(str(int(i)) for i in prompt_ids)]
    if print_ids:
        cmd.append("--print-ids")
    if not verify:
        cmd.append("--no-verify")
    env = dict(os.environ)
    if threads is not None:
        env["TVM_NUM_THREADS"] = str(int(threads))
    log.info("edge runner: %s", " ".join(cmd))
    try:
        raw = subprocess.run(cmd, capture_output=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired as e:
        raise LlmpressError(f"the edge runner took longer than {timeout:.0f} s on {folder}") from e
    # The runner prints the bytes of the decoded pieces; a byte-fallback piece of an incomplete UTF-8 sequence (a
    # random model's output) is read as U+FFFD, as llmpress.tokenizer's decode reads it.
    proc = subprocess.CompletedProcess(raw.args, raw.returncode, raw.stdout.decode("utf-8", "replace"),
                                       raw.stderr.decode("utf-8", "replace"))
    if proc.returncode != 0:
        msg = proc.stderr.strip().splitlines()
        raise ArtifactError(f"the edge runner failed on {folder} (exit {proc.returncode}): "
                            f"{msg[-1] if msg else '(no message)'}")
    ids = None
    if print_ids:
        try:
            ids = [int(x) for x in proc.stdout.split()]
        except ValueError as e:
            raise LlmpressError(f"the edge runner printed no id list: {proc.stdout[:200]!r}") from e
    for line in proc.stderr.strip().splitlines():
        log.info("%s", line)
    return RunnerResult(cmd, proc.stdout, proc.stderr, ids)


def run_emulated(path: str | Path, *, prompt: str | None = None, max_new_tokens: int = 256, **kw) -> str:
    """``llmpress run PATH --emulate``: the greedy text of the artifact folder (or ``.tar``) at ``path``, produced
    by the edge runner of the artifact's architecture (under qemu when it is not this machine's)."""
    import tarfile
    import tempfile

    path = Path(path)
    if path.is_file() and path.suffix == ".tar":
        with tempfile.TemporaryDirectory(prefix="llmpress-edge-") as tmp:
            try:
                with tarfile.open(path, "r") as tar:
                    tar.extractall(tmp, filter="data")
            except (tarfile.TarError, OSError, EOFError) as e:
                raise ArtifactError(f"{path}: damaged tar ({e})") from e
            return run_emulated(tmp, prompt=prompt, max_new_tokens=max_new_tokens, **kw)
    if not (path / "manifest.json").is_file():
        raise ArtifactError(f"{path}: not an artifact folder or .tar (no manifest.json); --emulate runs compiled "
                            "artifacts (llmpress compile ... --target arm64 -o DIR)")
    res = run_artifact(path, prompt=prompt or None, max_new_tokens=max_new_tokens, **kw)
    return res.stdout.rstrip("\n")


def generate_ids(folder: str | Path, prompt_ids: Sequence[int], max_new_tokens: int = 32, **kw) -> list[int]:
    """Prompt + greedy ids from the edge runner (stops at EOS or BOS, or after ``max_new_tokens``)."""
    res = run_artifact(folder, prompt_ids=prompt_ids, max_new_tokens=max_new_tokens, print_ids=True, **kw)
    return res.ids or []
