"""ONNX import: an ``.onnx`` graph -> an ``nn.Module`` that evaluates it with torch ops -> the IR via torch.export.

``OnnxModule`` keeps the ONNX nodes as data and runs them in order in ``forward``; each op is a small torch
function. Float initializers become parameters (named after the initializer, sanitized to an identifier) so
compression passes see them as weights; small integer initializers and ``Constant`` nodes stay Python/numpy values
("static" values), and so does everything computed only from them and from ``Shape`` (the
``Shape -> Gather -> Unsqueeze -> Concat -> Reshape`` chains exporters write). Static values hold plain ints or
torch ``SymInt``s, so a symbolic input dimension flows into ``Reshape``/``Expand``/``Range`` and the captured graph
keeps that dimension dynamic instead of baking in the example size.

Ops are checked before anything runs: every node whose op has no converter (or whose domain is not the default
one) is listed in one ``UnsupportedOpError`` naming the op type, the node name and its index.

Why not onnx2torch: it imports torchvision, and torchvision's PyPI build does not import beside this CPU build of
torch (operator registration fails), so llmpress converts the ops itself.

Semantics follow the ONNX operator specs, including opset differences: ``axes`` of Reduce*/Squeeze/Unsqueeze and
``split`` of Split are attributes before opset 13 (ReduceMean/ReduceMax: 18) and inputs after; Softmax/LogSoftmax
before opset 13 coerce the input to 2-D at ``axis``; integer ``Div`` truncates toward zero.

Layout: ``values`` (static values and the conversions every converter shares), ``ops_math`` (arithmetic,
activations, reductions, norms), ``ops_shape`` (shape, layout, indexing, casts), ``importer`` (the up-front check,
``OnnxModule`` and ``import_onnx``), ``past_kv`` (decoders exported with ``past_key_values`` inputs and
``present.*`` outputs, optimum's convention, run with llmpress's static KV cache). The converter tables are plain
dicts merged by hand in ``importer.OPS``.
"""
from __future__ import annotations

from .importer import SUPPORTED_OPS, OnnxModule, check_supported, import_onnx, open_onnx
from .past_kv import PastKVDecoder

__all__ = ["OnnxModule", "PastKVDecoder", "import_onnx", "open_onnx", "check_supported", "SUPPORTED_OPS"]
