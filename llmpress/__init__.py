"""llmpress: a compiler that makes large language models small and fast.

``import llmpress`` stays light: TVM and ONNX Runtime are imported only by the backends that need them.
"""
from __future__ import annotations

from .host import passive_openmp

passive_openmp()  # before anything loads torch (and its libgomp): see llmpress/host.py

from .errors import (  # noqa: E402 - after the OpenMP setting on purpose
    ArtifactError,
    ConfigError,
    LlmpressError,
    LoadError,
    PassError,
    PipelineSyntaxError,
    UnsupportedOpError,
)

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "compile",
    "load",
    "capture",
    "load_model",
    "LlmpressError",
    "ConfigError",
    "PipelineSyntaxError",
    "UnsupportedOpError",
    "PassError",
    "ArtifactError",
    "LoadError",
]


def compile(*args, **kwargs):  # noqa: A001 - the product's verb
    """Capture, rewrite and lower a model; see ``llmpress.api.compile``."""
    from .api import compile as _compile

    return _compile(*args, **kwargs)


def load(*args, **kwargs):
    """Load a saved artifact; see ``llmpress.api.load``."""
    from .api import load as _load

    return _load(*args, **kwargs)


def capture(*args, **kwargs):
    """Capture a model into the IR; see ``llmpress.ir.capture``."""
    from .ir.capture import capture as _capture

    return _capture(*args, **kwargs)


def load_model(*args, **kwargs):
    """Load a model folder/file (Hugging Face, llama2.c, ONNX); see ``llmpress.ir.loaders.load_model``."""
    from .ir.loaders import load_model as _load_model

    return _load_model(*args, **kwargs)
