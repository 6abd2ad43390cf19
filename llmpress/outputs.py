"""Where an artifact may be written, decided before any work.

An output path may be
- new (its nearest existing parent folder writable, with room for the artifact);
- an empty folder (used as it is; a ``.tar`` cannot go there);
- an llmpress artifact (a folder or ``.tar`` whose manifest says so), replaced only when ``overwrite`` is given.

Anything else that exists (a folder with other files, a plain file) is refused, and so are ``.``, ``..``, a file
system root, the input model itself and any folder that contains it: a mistyped ``-o`` must never cost data.
Every refusal is a ``ConfigError`` naming the path.
"""
from __future__ import annotations

import json
import os
import shutil
import tarfile
from pathlib import Path
from typing import Iterable

from .errors import ConfigError

__all__ = ["is_artifact", "check_output", "input_bytes", "umask", "apply_umask"]

_MANIFEST = "manifest.json"


def _manifest_ok(text: bytes | str) -> bool:
    try:
        m = json.loads(text)
    except (ValueError, UnicodeDecodeError):
        return False
    return isinstance(m, dict) and "format_version" in m


def is_artifact(path: str | os.PathLike) -> bool:
    """True for a folder or ``.tar`` holding an llmpress ``manifest.json`` (one with a ``format_version``)."""
    p = Path(path)
    try:
        if p.is_dir():
            f = p / _MANIFEST
            return f.is_file() and f.stat().st_size < (64 << 20) and _manifest_ok(f.read_bytes())
        if p.is_file() and tarfile.is_tarfile(p):
            with tarfile.open(p, "r") as tar:
                member = tar.getmember(_MANIFEST)
                fh = tar.extractfile(member) if member.isfile() and member.size < (64 << 20) else None
                return fh is not None and _manifest_ok(fh.read())
    except (OSError, KeyError, tarfile.TarError, EOFError):
        return False
    return False


def input_bytes(path: str | os.PathLike | None) -> int:
    """Bytes of a model file, or of the files of a model folder (0 when unknown): a rough artifact size."""
    if path is None:
        return 0
    p = Path(path)
    try:
        if p.is_file():
            return p.stat().st_size
        if p.is_dir():
            return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
    except OSError:
        pass
    return 0


def _existing_parent(p: Path) -> Path:
    q = p.parent
    while not q.exists() and q != q.parent:
        q = q.parent
    return q


def check_output(path: str | os.PathLike, *, overwrite: bool = False, inputs: Iterable[str | os.PathLike] = (),
                 estimate_bytes: int = 0, flag: str = "overwrite=True") -> Path:
    """Refuse an output location that would destroy something not ours or cannot be written; return the path.

    ``inputs``: paths that must survive (the model, its tokenizer, the calibration file). ``estimate_bytes``: a
    rough size of the artifact, checked against the free space. ``flag``: how to ask for replacement, for messages.
    """
    raw = os.fspath(path)
    if raw.strip() == "":
        raise ConfigError("the output path is empty")
    if "\x00" in raw:
        raise ConfigError(f"output {raw!r} contains a NUL character, which no file name may hold")
    dest = Path(raw)
    full = Path(os.path.abspath(dest))
    if full == Path(full.anchor):
        raise ConfigError(f"output {raw!r} is the root of a file system; give the artifact its own folder")
    if os.path.basename(os.path.normpath(raw)) in (".", ".."):
        raise ConfigError(f"output {raw!r} names a folder by '.' or '..'; give the artifact its own name, "
                          f"e.g. {os.path.join(raw, 'artifact')!r}")
    real = Path(os.path.realpath(full))
    for inp in inputs:
        if inp is None:
            continue
        src = Path(os.path.realpath(os.fspath(inp)))
        if real == src or real in src.parents:
            what = "is" if real == src else "contains"
            raise ConfigError(f"output {raw!r} {what} the input {os.fspath(inp)!r}; writing there would delete it. "
                              "Choose another output path")
    tar = dest.suffix == ".tar"
    if dest.is_symlink() or dest.exists():
        if dest.is_dir() and not dest.is_symlink() and not any(dest.iterdir()):
            if tar:
                raise ConfigError(f"output {raw!r} is an existing folder; a .tar artifact cannot replace it")
        elif is_artifact(dest) and not dest.is_symlink():
            if not overwrite:
                raise ConfigError(f"output {raw!r} is an existing llmpress artifact; pass {flag} to replace it")
        else:
            kind = "folder with other files" if dest.is_dir() else "file"
            raise ConfigError(f"output {raw!r} is an existing {kind}, not an llmpress artifact; refusing to replace "
                              "it (nothing was written). Choose a new path or an empty folder")
    parent = _existing_parent(full)
    if not parent.is_dir():
        raise ConfigError(f"output {raw!r}: {str(parent)!r} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"output {raw!r}: the folder {str(parent)!r} is not writable")
    try:
        st = os.statvfs(parent)
    except OSError:
        st = None
    if st is not None and st.f_flag & os.ST_RDONLY:
        raise ConfigError(f"output {raw!r}: {str(parent)!r} is on a read-only file system")
    if estimate_bytes > 0:
        free = shutil.disk_usage(parent).free
        need = estimate_bytes * (2 if tar else 1)  # a .tar is built from a folder written beside it
        if free < need:
            raise ConfigError(f"output {raw!r}: {free / 1e6:,.0f} MB free in {str(parent)!r}, the artifact needs "
                              f"about {need / 1e6:,.0f} MB")
    return dest


def umask() -> int:
    """This process's umask, read without changing it where /proc allows."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def apply_umask(root: Path) -> None:
    """Give ``root`` and everything under it the modes a plain ``open``/``mkdir`` would have (temporary folders
    and some writers create 0700 folders and 0600 files); executables keep their execute bits."""
    mask = umask()
    paths = [root, *root.rglob("*")]
    for p in paths:
        if p.is_symlink():
            continue
        if p.is_dir():
            p.chmod(0o777 & ~mask)
        else:
            x = p.stat().st_mode & 0o111
            p.chmod((0o777 if x else 0o666) & ~mask)
