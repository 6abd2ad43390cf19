"""Recipe files: a pipeline plus target and calibration settings, in TOML or YAML.

```toml
pipeline = "exact,gptq(bits=4,group=128,exclude=lm_head)"
target = "cpu"                 # optional

[calibration]                  # optional
data = "calib.txt"             # required in the table; relative to the recipe's folder
samples = 128                  # default 128
seq_len = 256                  # default 256
seed = 0                       # default 0
device = "cuda"                # optional: where calibration math runs (compile's calib_device); default cpu

[backend]                      # optional: the target backend's settings (compile's backend_options)
sparse_kernels = "auto"        # TVM: epilogues, sparse_kernels, inplace_cache, cpu_kernels
```

Unknown keys are errors (with "did you mean"), and so is pipeline text that does not parse or names an unknown
pass: a recipe is checked completely when it is loaded, not halfway through a compile.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from ..errors import ConfigError, PipelineSyntaxError
from .base import did_you_mean
from .pipeline import Pipeline, build, parse

__all__ = ["Recipe", "CalibrationSpec"]

_TOP = ("pipeline", "target", "calibration", "backend")
_CALIB = ("data", "samples", "seq_len", "seed", "device")


@dataclass(frozen=True)
class CalibrationSpec:
    data: str
    samples: int = 128
    seq_len: int = 256
    seed: int = 0
    device: str | None = None  # compile's calib_device; checked (CUDA present?) when the recipe is compiled


@dataclass(frozen=True)
class Recipe:
    pipeline: Pipeline
    target: str | None
    calibration: CalibrationSpec | None
    path: str
    backend: dict | None = None  # compile's backend_options; names and values checked against the target's backend

    @classmethod
    def load(cls, path: str | Path) -> "Recipe":
        """Read a ``.toml`` / ``.yaml`` / ``.yml`` recipe; raise ``ConfigError`` naming the file and the problem."""
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"recipe {path} does not exist")
        suffix = path.suffix.lower()
        text = path.read_text()
        try:
            if suffix == ".toml":
                import tomllib

                data = tomllib.loads(text)
            elif suffix in (".yaml", ".yml"):
                import yaml

                data = yaml.safe_load(text)
            else:
                raise ConfigError(f"recipe {path}: unknown format {suffix!r} (use .toml, .yaml or .yml)")
        except ConfigError:
            raise
        except Exception as e:  # noqa: BLE001 - the parsers' own errors, re-raised with the file name
            raise ConfigError(f"recipe {path}: cannot parse {suffix[1:].upper()}: {e}") from e
        return cls.from_dict(data, path=path)

    @classmethod
    def from_dict(cls, data: Any, *, path: str | Path = "<recipe>") -> "Recipe":
        where = str(path)
        if not isinstance(data, Mapping):
            raise ConfigError(f"{where}: a recipe is a table of keys (pipeline, target, calibration, backend), "
                              f"not {type(data).__name__}")
        _check_keys(data, _TOP, where, "")
        if "pipeline" not in data:
            raise ConfigError(f"{where}: missing required key 'pipeline'")
        text = data["pipeline"]
        if not isinstance(text, str):
            raise ConfigError(f"{where}: 'pipeline' must be pipeline text (a string), not {type(text).__name__}")
        try:
            pipeline = parse(text)
            build(pipeline)  # unknown passes / bad options fail now, with their column
        except PipelineSyntaxError as e:
            raise PipelineSyntaxError(f"{where}: {e.message}", e.text, e.column) from None
        target = data.get("target")
        if target is not None and not isinstance(target, str):
            raise ConfigError(f"{where}: 'target' must be a string, not {type(target).__name__}")
        calibration = None
        if "calibration" in data:
            calibration = _calibration(data["calibration"], where, Path(path).parent)
        backend = data.get("backend")
        if backend is not None and (not isinstance(backend, Mapping)
                                    or not all(isinstance(v, (str, bool)) for v in backend.values())):
            raise ConfigError(f"{where}: 'backend' must be a table of settings (strings or booleans), e.g. "
                              f"sparse_kernels = \"always\", not {backend!r}")
        return cls(pipeline=pipeline, target=target, calibration=calibration, path=where,
                   backend=dict(backend) if backend else None)


def _check_keys(data: Mapping, allowed: tuple[str, ...], where: str, table: str) -> None:
    for key in data:
        if key not in allowed:
            raise ConfigError(f"{where}: unknown key {table}{key!r}{did_you_mean(str(key), allowed)}"
                              f" (allowed: {', '.join(allowed)})")


def _calibration(table: Any, where: str, folder: Path) -> CalibrationSpec:
    if not isinstance(table, Mapping):
        raise ConfigError(f"{where}: 'calibration' must be a table with keys {', '.join(_CALIB)}")
    _check_keys(table, _CALIB, where, "calibration.")
    if "data" not in table:
        raise ConfigError(f"{where}: [calibration] needs 'data' (a text file of calibration samples)")
    data = table["data"]
    if not isinstance(data, str):
        raise ConfigError(f"{where}: calibration.data must be a file path, not {type(data).__name__}")
    p = Path(data).expanduser()
    if not p.is_absolute():
        p = folder / p
    if not p.is_file():
        raise ConfigError(f"{where}: calibration data file {str(p)!r} does not exist")
    values = {}
    for key, default, low in (("samples", 128, 1), ("seq_len", 256, 1), ("seed", 0, None)):
        v = table.get(key, default)
        if isinstance(v, bool) or not isinstance(v, int):
            raise ConfigError(f"{where}: calibration.{key} must be an integer, got {v!r}")
        if low is not None and v < low:
            raise ConfigError(f"{where}: calibration.{key} must be >= {low}, got {v}")
        values[key] = v
    device = table.get("device")
    if device is not None and not isinstance(device, str):
        raise ConfigError(f"{where}: calibration.device must be a device name such as 'cpu' or 'cuda', got {device!r}")
    return CalibrationSpec(data=str(p), device=device, **values)
