"""ONNX export of the IR, for ONNX Runtime users (``llmpress.backends.onnx.export(module, path)``).

Weight-only int2/3/4/8 (``llmpress::wq_linear``) becomes ``com.microsoft.MatMulNBits``, W8A8
(``llmpress::w8a8_linear``) becomes dynamic int8 quantization + ``MatMulInteger``; everything else is standard
ONNX (opset 18). ``OrtProgram`` runs an exported file with the LM calling convention. Importing this package
imports ``onnx``; ``onnxruntime`` is imported only when an ``OrtProgram`` is built.
"""
from __future__ import annotations

from .export import check, export, io_names, to_onnx
from .runtime import OrtProgram

__all__ = ["export", "to_onnx", "check", "io_names", "OrtProgram"]
