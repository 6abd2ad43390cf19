"""Where calibration-driven passes do their heavy math: ``compile(..., calib_device=...)`` / ``--calib-device``.

The passes that collect second-order statistics (``gptq``, ``sparsify`` wanda/sparsegpt, ``factorize``
asvd/svd_llm) accumulate ``G = X^T X`` on this device (each calibration activation is copied there as it is
observed) and run their per-layer math there (GPTQ's Cholesky factors and column loop, SparseGPT's, the SVDs);
the rewritten weights come back to the CPU, where the module lives. The block-by-block replay of the calibration
set (``calibration.BlockRunner``) stays on the CPU.

The device is a parameter of the same code path, never a branch: with ``cpu`` (the default) every ``.to(device)``
is a no-op and the results are bit-identical to a compile without the option.

``resolve(value)`` checks the value before any work: an unknown string, a device type torch does not know, or a
CUDA device where CUDA is not available (or an index past the devices present) is a ``ConfigError`` naming the
option.
"""
from __future__ import annotations

import torch

from ..errors import ConfigError

__all__ = ["DEFAULT", "OPTION", "resolve"]

DEFAULT = "cpu"
OPTION = "calib_device (--calib-device)"
_KNOWN = ("cpu", "cuda", "cuda:N")


def resolve(value: str | torch.device | None) -> torch.device:
    """``value`` (``None``: ``cpu``) as a ``torch.device`` that exists here, or a ``ConfigError``."""
    if value is None:
        return torch.device(DEFAULT)
    if isinstance(value, torch.device):
        dev = value
    elif isinstance(value, str):
        try:
            dev = torch.device(value.strip())
        except RuntimeError as e:
            raise ConfigError(f"{OPTION}: {value!r} is not a device (use one of {', '.join(_KNOWN)})") from e
    else:
        raise ConfigError(f"{OPTION}: expected a device name such as 'cpu' or 'cuda', got {type(value).__name__}")
    if dev.type == "cpu":
        return torch.device("cpu")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"{OPTION}: {value!s} was asked for but CUDA is not available here "
                              "(torch.cuda.is_available() is False); use cpu")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise ConfigError(f"{OPTION}: {value!s} does not exist (this machine has {count} CUDA device(s))")
        return dev
    raise ConfigError(f"{OPTION}: device type {dev.type!r} is not supported for calibration "
                      f"(use one of {', '.join(_KNOWN)})")
