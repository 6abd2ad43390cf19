"""ONNX export of the IR, for ONNX Runtime users (``llmpress.backends.onnx.export(module, path)``).

Weight-only int2/3/4/8 (``llmpress::wq_linear``) becomes ``com.microsoft.MatMulNBits``; W8A8
(``llmpress::w8a8_linear``) becomes QuantizeLinear/DequantizeLinear around ``MatMul`` (``w8a8="qdq"``, the default,
target ``onnx``/``onnx:qdq``) or per-token int8 quantization + ``MatMulInteger`` (``w8a8="integer"``, target
``onnx:integer``); weight-only layers with int8 activations (``act_quant``) quantize and dequantize the activation
with standard ops before MatMulNBits (``wq_a8="float"``, the default) or also use MatMulNBits's int8 kernel
(``wq_a8="integer"``); the int8 KV cache ops (``kv_scale``/``kv_codes``/``kv_dequant``) and everything else are
standard ONNX (opset 18), and the caches are the inputs/outputs ``past_<name>``/``present_<name>`` of
``lm.cache_specs()``. ``OrtProgram`` runs an exported file with the LM calling convention. Importing this package
imports ``onnx``; ``onnxruntime`` is imported only when an ``OrtProgram`` is built.
"""
from __future__ import annotations

from .export import check, check_w8a8_form, check_wq_a8_form, export, io_names, to_onnx
from .runtime import OrtProgram

__all__ = ["export", "to_onnx", "check", "check_w8a8_form", "check_wq_a8_form", "io_names", "OrtProgram"]
