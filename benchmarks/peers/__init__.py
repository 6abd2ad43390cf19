"""Peer runtimes measured side by side with llmpress (optional; see README.md here and ../setup_peers.sh).

- ``llamacpp``: llama.cpp through llama-cpp-python (GGUF f32 / Q8_0 / Q4_0), built from source for this CPU;
- ``ort_int4``: ONNX Runtime's own 4-bit weight quantizer (``MatMulNBitsQuantizer``) on llmpress's fp32 ONNX export.

Importing this package imports neither runtime: each module imports its runtime when used.
"""
