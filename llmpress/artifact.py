"""The on-disk artifact and its runner.

An artifact is a folder (or one ``.tar`` of that folder) holding:

- ``manifest.json``: format version; llmpress / torch / TVM versions; the target; the exact pipeline text, the
  resolved text that redoes it without data-driven choices (``autobits``'s per-layer plan written out), and
  every pass's options and stats; the LM calling convention and input/output signature; the tokenizer file;
  a per-layer summary (for ``llmpress inspect``); and the sha256 and size of every other file;
- the backend's payload (``program.pt2`` for ``reference``; ``model.so`` + ``weights.safetensors`` for TVM);
- ``tokenizer/``: the tokenizer files.

Saving writes everything into a temporary folder beside the destination and renames it into place only when
complete, so an interrupted build never leaves a half-written artifact. Loading verifies every hash and size, and
the target, before anything runs; a damaged, truncated or mismatched artifact raises ``ArtifactError`` naming the file.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tarfile
import tempfile
import weakref
from pathlib import Path
from typing import Any, Sequence

import torch

from .errors import ArtifactError, ConfigError
from .ir.meta import LMInfo
from .outputs import apply_umask, check_output

__all__ = ["Artifact", "load", "FORMAT_VERSION", "MANIFEST"]

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST = "manifest.json"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _versions() -> dict[str, str]:
    from . import __version__

    out = {"llmpress": __version__, "torch": torch.__version__}
    try:
        from importlib.metadata import version

        out["tvm"] = version("apache-tvm")
    except Exception:  # noqa: BLE001 - TVM is optional for reference artifacts
        out["tvm"] = None
    return out


class Artifact:
    """A compiled model: callable, can generate text, can be saved and loaded.

    ``manifest`` holds everything recorded about how it was made; ``compiled`` is the backend program.
    """

    def __init__(self, compiled, manifest: dict, tokenizer=None, folder: Path | None = None) -> None:
        self.compiled = compiled
        self.manifest = manifest
        self.tokenizer = tokenizer
        self.folder = folder
        self._cleanup: weakref.finalize | None = None  # set by load() for an extracted .tar

    def close(self) -> None:
        """Remove the temporary copy a ``.tar`` was extracted to (nothing to do for a folder or a new artifact)."""
        if self._cleanup is not None:
            self._cleanup()

    def __enter__(self) -> "Artifact":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- running -----------------------------------------------------------------------------
    @property
    def lm(self) -> LMInfo | None:
        return LMInfo.from_json(self.manifest["lm"]) if self.manifest.get("lm") else None

    @property
    def passes(self) -> list[dict]:
        """What each pass did: name, options, modified, stats, seconds."""
        return self.manifest.get("passes", [])

    def __call__(self, *inputs: Any) -> Any:
        """Same inputs and outputs as the captured model's forward."""
        return self.compiled.forward(*inputs)

    forward = __call__

    def generate_ids(self, prompt_ids: Sequence[int], max_new_tokens: int = 32, *, progress: bool = False) -> list[int]:
        """``prompt_ids`` and up to ``max_new_tokens`` greedy tokens (``ConfigError`` if negative). Logs a warning
        (``llmpress.artifact``) when the KV cache fills before ``max_new_tokens`` are generated."""
        from .eval.generate import greedy

        lm = self.lm
        if lm is None:
            raise ArtifactError("this artifact is not a causal LM with a KV cache; it cannot generate")
        # Any EOS id (config.json and generation_config.json) ends a sequence, and so does BOS (llama2.c's rule; the
        # C++ edge runner stops at eos_id and bos_id).
        ids = greedy(self.compiled.forward_last, lm, prompt_ids, max_new_tokens, stop_ids=lm.stop_ids(),
                     progress=progress)
        room, made = lm.cache_len - len(prompt_ids), len(ids) - len(prompt_ids)
        if room < max_new_tokens and made == room:  # stopped by the cache, not by an end-of-sequence token
            log.warning("the %d-position KV cache holds %d of the %d new tokens requested after a %d-token prompt; "
                        "generated %d", lm.cache_len, room, max_new_tokens, len(prompt_ids), made)
        return ids

    def generate(self, prompt: str = "", max_new_tokens: int = 32, *, progress: bool = False) -> str:
        """Greedy continuation of ``prompt`` (prompt included in the returned text)."""
        if self.tokenizer is None:
            raise ArtifactError("this artifact has no tokenizer; use generate_ids()")
        ids = self.tokenizer.encode(prompt, bos=True)
        return self.tokenizer.decode(self.generate_ids(ids, max_new_tokens, progress=progress))

    # -- saving ------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Write the artifact to ``path`` (a folder, or a ``.tar`` file), atomically.

        ``path`` may be new, an empty folder, or (with ``overwrite=True``) an existing llmpress artifact; anything
        else there is refused with ``ConfigError`` before a byte is written (see ``llmpress.outputs``). Files get
        the modes of this process's umask, like any other file it writes."""
        dest = check_output(path, overwrite=overwrite)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
        tmp_tar = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
        try:
            self._write_folder(tmp)
            apply_umask(tmp)
            # Checked again: the destination may have changed while the payload was written.
            check_output(dest, overwrite=overwrite)
            if dest.suffix == ".tar":
                with tarfile.open(tmp_tar, "w") as tar:
                    for f in sorted(tmp.rglob("*")):
                        tar.add(f, arcname=str(f.relative_to(tmp)), recursive=False)
                _replace(tmp_tar, dest)
                shutil.rmtree(tmp)
            else:
                _replace(tmp, dest)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp_tar.unlink(missing_ok=True)
            raise
        self.folder = dest
        log.info("artifact written to %s", dest)
        return dest

    def _write_folder(self, folder: Path) -> None:
        manifest = dict(self.manifest)
        manifest["payload"] = self.compiled.save_payload(folder)
        manifest["tokenizer"] = None
        if self.tokenizer is not None:
            tdir = folder / "tokenizer"
            tdir.mkdir()
            names = []
            for f in self.tokenizer.files():
                shutil.copy2(f, tdir / Path(f).name)
                names.append(f"tokenizer/{Path(f).name}")
            manifest["tokenizer"] = names[0] if names else None
            manifest["tokenizer_files"] = names
            # Backends whose runners read tokenizers without Python add what they need (hashed below).
            manifest.update(self.compiled.tokenizer_payload(self.tokenizer, folder))
        files = {}
        for f in sorted(folder.rglob("*")):
            if f.is_file():
                rel = str(f.relative_to(folder))
                files[rel] = {"sha256": _sha256(f), "bytes": f.stat().st_size}
        manifest["files"] = files
        manifest["format_version"] = FORMAT_VERSION
        manifest["versions"] = _versions()
        (folder / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str))
        self.manifest = manifest


def _replace(new: Path, dest: Path) -> None:
    """Rename ``new`` to ``dest``; an existing ``dest`` (an empty folder, or an artifact the caller may replace)
    is moved aside first and removed only once ``new`` is in place."""
    if dest.exists() and (dest.is_dir() != new.is_dir() or dest.is_dir() and any(dest.iterdir())):
        old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
        os.replace(dest, old)
        os.replace(new, dest)
        if old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)
    else:
        os.replace(new, dest)  # over a file, an empty folder (folder -> folder), or nothing


def read_manifest(folder: Path) -> dict:
    path = folder / MANIFEST
    if not path.is_file():
        raise ArtifactError(f"{path}: missing; {folder} is not an llmpress artifact")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{path}: damaged ({e})") from e
    if not isinstance(manifest, dict) or "format_version" not in manifest:
        raise ArtifactError(f"{path}: not an llmpress manifest (no format_version)")
    if manifest["format_version"] != FORMAT_VERSION:
        raise ArtifactError(f"{path}: format version {manifest['format_version']} is not supported "
                            f"(this llmpress reads version {FORMAT_VERSION})")
    return manifest


def verify(folder: Path, manifest: dict) -> None:
    """Check every listed file exists with its recorded size and sha256."""
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise ArtifactError(f"{folder / MANIFEST}: lists no files")
    for rel, rec in files.items():
        f = folder / rel
        if not f.is_file():
            raise ArtifactError(f"{f}: missing from the artifact")
        size = f.stat().st_size
        if size != rec["bytes"]:
            raise ArtifactError(f"{f}: truncated or altered ({size} bytes, manifest records {rec['bytes']})")
        if _sha256(f) != rec["sha256"]:
            raise ArtifactError(f"{f}: damaged (sha256 differs from the manifest)")


def _extract_tar(path: Path) -> Path:
    out = Path(tempfile.mkdtemp(prefix="llmpress-artifact-"))
    try:
        with tarfile.open(path, "r") as tar:
            tar.extractall(out, filter="data")
    except BaseException as e:
        shutil.rmtree(out, ignore_errors=True)
        if isinstance(e, (tarfile.TarError, OSError, EOFError)):
            raise ArtifactError(f"{path}: damaged tar ({e})") from e
        raise
    return out


def load(path: str | os.PathLike, *, threads: int | None = None, build: str | None = None) -> Artifact:
    """Load an artifact folder or ``.tar``: verify hashes and target, then build its runner (on ``threads`` CPU
    threads; default: every core this process may run on). ``build``: which of a TVM artifact's builds to run
    (default: the most capable one this machine supports; ``"cpu"`` is the portable x86-64-v3 one).

    A ``.tar`` is extracted into a temporary folder that is removed by ``Artifact.close()`` (or ``with``), when the
    artifact is garbage-collected, or when the process exits."""
    src = Path(path)
    if not src.exists():
        raise ArtifactError(f"{src}: no such artifact")
    if not src.is_file():
        return _load_folder(src, src, threads=threads, build=build)
    folder = _extract_tar(src)
    try:
        art = _load_folder(src, folder, threads=threads, build=build)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    # The extracted copy lives as long as the artifact (a TVM build may load another library from it later),
    # and goes with close(), garbage collection, or the end of the process, whichever comes first.
    art._cleanup = weakref.finalize(art, shutil.rmtree, str(folder), ignore_errors=True)
    return art


def _load_folder(src: Path, folder: Path, *, threads: int | None, build: str | None) -> Artifact:
    from .backends import get_backend

    manifest = read_manifest(folder)
    verify(folder, manifest)
    backend = get_backend(manifest.get("backend", "reference"))
    compiled = backend.load(folder, manifest)
    if build is not None:
        if not hasattr(compiled, "use_build"):
            raise ConfigError(f"{src}: build= chooses among a TVM artifact's builds; this is a "
                              f"{manifest.get('backend')} artifact")
        compiled.use_build(build)
    if threads is not None:
        compiled.set_threads(threads)
    tok = None
    if manifest.get("tokenizer"):
        from .tokenizer import load_tokenizer

        tok = load_tokenizer(folder / manifest["tokenizer"])
    return Artifact(compiled, manifest, tok, folder)
