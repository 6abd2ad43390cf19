"""Calibration data and activation statistics for calibration-driven passes (GPTQ, AWQ, SmoothQuant, ...).

``Calibration`` holds a fixed list of token batches ``int64 [1, T]``. ``from_texts`` builds them with the
perplexity protocol's tokenization (paragraphs split at blank lines, BOS before each, concatenated into one
stream, see ``llmpress.eval.perplexity``) and cuts ``samples`` windows of ``seq_len`` tokens at random offsets
drawn from a ``torch.Generator`` seeded with ``seed`` — the same text, tokenizer and seed always give the same
batches.

``collect(module, nodes, observer)`` runs the module's current graph (an FX ``Interpreter`` over
``module.graph_module``, so earlier rewrites such as quantized layers are what later statistics see) on every batch,
following the module's calling convention (for LMs: ``start_pos = 0`` and fresh zero KV caches), and calls
``observer(node, x)`` with the float32 input activation of each listed node, reshaped to ``[tokens, in_features]``
(the node's first argument: ``x`` of ``aten.linear`` / ``llmpress::wq_linear``). Observers accumulate statistics
(``H += x^T x``, per-channel absmax, ...) so memory is bounded by the statistics, never by the activations of the
whole model. The interpreter stops each batch as soon as every listed node has been observed, so a caller that goes
block by block pays only for the prefix of the graph up to that block.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.fx as fx
from torch.export.graph_signature import InputKind

from ..errors import ConfigError, PassError
from ..ir.module import Module

__all__ = ["BlockRunner", "BlocksNotIsolated", "Calibration", "Observer", "collect"]

log = logging.getLogger(__name__)

Observer = Callable[[fx.Node, torch.Tensor], None]


def _wq_linear_op():
    import llmpress.ir.ops  # noqa: F401 - registers torch.ops.llmpress.*

    return torch.ops.llmpress.wq_linear.default


_WQ_LINEAR = _wq_linear_op()


class _Done(Exception):
    """Raised inside the interpreter once every listed node has been observed."""


class _Collector(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, nodes: Iterable[fx.Node], observer: Observer) -> None:
        super().__init__(gm, garbage_collect_values=True)
        self.extra_traceback = False
        self.wanted = set(nodes)
        self.pending: set[fx.Node] = set()
        self.observer = observer
        self.nodes_run = 0
        # Dequantized weights of llmpress::wq_linear nodes, kept across the batches of one collect() call: the
        # prefix that sequential passes re-run is mostly quantized layers, and unpacking them once per batch
        # would cost as much as the matmuls. Memory: at most the float weights the layers had before.
        self.dequantized: dict[fx.Node, torch.Tensor] = {}

    def run(self, *args):  # noqa: D102
        self.pending = set(self.wanted)
        self.nodes_run = 0
        try:
            return super().run(*args)
        except _Done:
            return None

    def run_node(self, n: fx.Node):
        if n in self.pending:
            args, _ = self.fetch_args_kwargs_from_env(n)
            x = args[0]
            self.observer(n, x.detach().reshape(-1, x.shape[-1]).to(torch.float32))
            self.pending.discard(n)
            if not self.pending:
                raise _Done
        if n.op == "call_function":
            self.nodes_run += 1
            if n.target is _WQ_LINEAR:
                return self._wq_linear(n)
        return super().run_node(n)

    def _wq_linear(self, n: fx.Node) -> torch.Tensor:
        from ..ir.ops.wq_linear import dequantize, linear_dequantized

        args, kwargs = self.fetch_args_kwargs_from_env(n)
        x, qweight, scales, zeros, bias, bits, group_size, *act = args
        w = self.dequantized.get(n)
        if w is None:
            w = self.dequantized[n] = dequantize(qweight, scales, zeros, bits, group_size)
        # The same math as the op's reference kernel (dequantize, then linear), without re-unpacking.
        return linear_dequantized(x, w, bias, group_size, *act, **kwargs)


class _LazyEnv(dict):
    """An interpreter's environment whose lazy weight placeholders are read on first use (``Module.weight``) and
    kept in ``cache`` (shared by the batches of one run): a block run reads its own layer's weights only."""

    def __init__(self, lazy: dict[fx.Node, str], module: Any, cache: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.lazy, self.module, self.cache = lazy, module, cache

    def __contains__(self, node: object) -> bool:
        return super().__contains__(node) or node in self.lazy

    def __missing__(self, node: fx.Node) -> torch.Tensor:
        name = self.lazy[node]
        if name not in self.cache:
            self.cache[name] = self.module.weight_by_name(name)
        self[node] = self.cache[name]
        return self[node]


class Calibration:
    """A deterministic set of calibration batches, each ``int64 [1, T]``."""

    def __init__(self, batches: Sequence[torch.Tensor], *, source: str = "tensors") -> None:
        if not batches:
            raise ConfigError("calibration needs at least one batch of token ids")
        out = []
        for i, b in enumerate(batches):
            b = torch.as_tensor(b)
            if b.dim() == 1:
                b = b.unsqueeze(0)
            if b.dim() != 2 or b.shape[0] != 1 or b.dtype != torch.int64 or b.shape[1] < 1:
                raise ConfigError(f"calibration batch {i} must be int64 [1, T], got {b.dtype} {list(b.shape)}")
            out.append(b)
        self.batches: list[torch.Tensor] = out
        self.source = source
        self.last_run_nodes = 0  # call_function nodes the last collect() ran per batch (early stop shows here)

    # -- construction -----------------------------------------------------------------------------
    @classmethod
    def from_tensors(cls, tensors: Sequence[torch.Tensor]) -> "Calibration":
        return cls(list(tensors), source="tensors")

    @classmethod
    def from_texts(cls, texts_or_path: str | Path | Sequence[str], tokenizer, *, samples: int = 128,
                   seq_len: int = 256, seed: int = 0) -> "Calibration":
        """``samples`` random windows of ``seq_len`` tokens from the text (a file path, a string, or a list of
        strings joined as paragraphs). ``tokenizer.encode(text, bos=True)`` gives the ids of one paragraph."""
        from ..eval.perplexity import token_stream

        if samples < 1 or seq_len < 2:
            raise ConfigError(f"calibration needs samples >= 1 and seq_len >= 2, got samples={samples}, "
                              f"seq_len={seq_len}")
        if isinstance(texts_or_path, (list, tuple)):
            source = f"{len(texts_or_path)} texts"
            text: str | Path = "\n\n".join(texts_or_path) + "\n"
        else:
            text = texts_or_path
            source = str(texts_or_path) if isinstance(texts_or_path, Path) or "\n" not in str(texts_or_path) \
                else "text"
        if isinstance(text, str) and "\n" not in text:
            text = Path(text)
            if not text.exists():
                raise ConfigError(f"calibration file {str(text)!r} does not exist")
        stream = token_stream(text, tokenizer)
        if len(stream) < seq_len:
            raise ConfigError(f"calibration text {source!r} has {len(stream)} tokens, fewer than seq_len={seq_len}")
        gen = torch.Generator().manual_seed(seed)
        ids = torch.tensor(stream, dtype=torch.int64)
        starts = torch.randint(0, len(stream) - seq_len + 1, (samples,), generator=gen)
        batches = [ids[s: s + seq_len].unsqueeze(0) for s in starts.tolist()]
        log.info("calibration: %d windows of %d tokens from %s (%d tokens, seed %d)", samples, seq_len, source,
                 len(stream), seed)
        return cls(batches, source=source)

    # -- views ------------------------------------------------------------------------------------
    @property
    def samples(self) -> int:
        return len(self.batches)

    @property
    def seq_len(self) -> int:
        return max(int(b.shape[1]) for b in self.batches)

    @property
    def tokens(self) -> int:
        return sum(int(b.shape[1]) for b in self.batches)

    def __repr__(self) -> str:
        return f"Calibration({self.samples} x {self.seq_len} tokens from {self.source})"

    # -- running ----------------------------------------------------------------------------------
    def _inputs(self, module: Module, batch: torch.Tensor) -> list[torch.Tensor]:
        if module.lm is None:
            return [batch]
        from ..eval.generate import empty_cache

        if batch.shape[1] > module.lm.cache_len:
            raise ConfigError(f"calibration seq_len {batch.shape[1]} exceeds the model's KV cache of "
                              f"{module.lm.cache_len} positions")
        return [batch, torch.zeros(1, dtype=torch.int64), *empty_cache(module.lm)]

    def collect(self, module: Module, nodes: Sequence[fx.Node], observer: Observer, *,
                progress: bool = False, desc: str = "calibrate") -> None:
        """Run every batch through ``module`` and call ``observer(node, x[tokens, in])`` for each listed node."""
        nodes = list(nodes)
        if not nodes:
            return
        in_graph = set(module.graph.nodes)
        for n in nodes:
            if n not in in_graph:
                raise PassError(f"collect: node {n.name} is not in the module's graph")
        weights = module.weights()
        specs = module.signature.input_specs
        collector = _Collector(module.graph_module, nodes, observer)
        batches = self.batches
        if progress:
            from tqdm import tqdm

            batches = tqdm(batches, desc=desc, unit="batch", leave=False)
        with torch.no_grad():
            for batch in batches:
                user = iter(self._inputs(module, batch))
                args = []
                for s in specs:
                    if s.kind == InputKind.USER_INPUT:
                        args.append(next(user))
                    else:
                        args.append(weights[s.target])
                collector.run(*args)
                self.last_run_nodes = collector.nodes_run
                if collector.pending:
                    missing = ", ".join(sorted(n.name for n in collector.pending))
                    raise PassError(f"collect: the graph finished without reaching {missing}")


def collect(module: Module, nodes: Sequence[fx.Node], observer: Observer, calibration: Calibration, *,
            progress: bool = False) -> None:
    """Function form of ``Calibration.collect`` (``calibration`` last, as passes call it with
    ``ctx.calibration``)."""
    if calibration is None:
        raise ConfigError("calibration data is needed (--calib FILE or calibration=...)")
    calibration.collect(module, nodes, observer, progress=progress)


class BlocksNotIsolated(PassError):
    """The graph's blocks cannot be run one at a time (a value flows from a block into something outside every
    block that later blocks read, or from a later block into an earlier one)."""


class BlockRunner:
    """Layer-by-layer calibration: the calibration set flows through the graph one block at a time.

    ``block_of(node)`` names the block of a ``call_function`` node (``None``: outside every block). Blocks are
    ordered by their first node in the graph. At construction the part of the graph outside every block that the
    blocks read (embedding, RoPE tables, mask, ...) runs once per batch; its values are kept. ``collect(key,
    nodes, observer)`` then moves to block ``key`` — every earlier block not yet passed runs, on the module's
    *current* graph (so blocks quantized since show their quantized outputs), on the kept values, which are
    replaced by that block's outputs — and runs block ``key``'s nodes alone on every batch, calling ``observer``
    exactly as ``Calibration.collect`` does (float32 ``[tokens, in_features]``, stopping each batch once every
    listed node is seen). The math per node is the graph's own, so the statistics equal ``collect``'s on the same
    graph; the cost is one pass over the blocks instead of a prefix re-run per block.

    A block's external inputs are found structurally: nodes outside its node set with users inside it. They must
    be placeholders (weights and the calling convention's user inputs, which are re-bound per batch: token ids,
    ``start_pos = 0``, fresh zero caches), nodes outside every block that depend on no block, or nodes of earlier
    blocks; otherwise the constructor raises ``BlocksNotIsolated`` and the caller falls back to ``collect``.
    Memory: the kept values for every batch (for a Llama block, the residual stream ``[T, dim]`` plus the RoPE
    rows and the mask), never more than one block boundary's.
    """

    def __init__(self, module: Module, calibration: Calibration,
                 block_of: Callable[[fx.Node], str | None]) -> None:
        self.module = module
        self.calibration = calibration
        self.block_of = block_of
        self.keys: list[str] = []
        tainted: set[fx.Node] = set()  # nodes in a block or depending on one
        for n in module.graph.nodes:
            key = block_of(n) if n.op == "call_function" else None
            if key is not None:
                if key not in self.keys:
                    self.keys.append(key)
                idx = self.keys.index(key)
                for u in n.all_input_nodes:
                    ukey = block_of(u) if u.op == "call_function" else None
                    if ukey is not None and self.keys.index(ukey) > idx:
                        raise BlocksNotIsolated(f"node {n.name} of block {key} reads {u.name} of the later block "
                                                f"{ukey}")
                    if ukey is None and u in tainted:
                        raise BlocksNotIsolated(f"node {n.name} of block {key} reads {u.name}, which is outside "
                                                f"every block but computed from a block")
                tainted.add(n)
            elif n.op != "placeholder" and any(u in tainted for u in n.all_input_nodes):
                tainted.add(n)
        if not self.keys:
            raise BlocksNotIsolated("the graph has no blocks")
        self.position = 0  # index of the block whose inputs self.values holds
        self.values: list[dict[fx.Node, object]] = []
        needed = self._needed_from(0)
        prefix = [n for n in module.graph.nodes if n.op not in ("placeholder", "output") and n not in tainted]
        with torch.no_grad():
            bind = self._binder()
            for batch in calibration.batches:
                interp = bind(batch, {})
                for n in prefix:
                    interp.env[n] = interp.run_node(n)
                self.values.append({n: interp.env[n] for n in needed})

    # -- helpers ----------------------------------------------------------------------------------
    def _members(self, key: str) -> list[fx.Node]:
        return [n for n in self.module.graph.nodes if n.op == "call_function" and self.block_of(n) == key]

    def _needed_from(self, position: int) -> set[fx.Node]:
        """Non-placeholder values that blocks ``position..`` read from before them (the part outside every block
        and blocks ``< position``)."""
        later = set(self.keys[position:])
        out: set[fx.Node] = set()
        for n in self.module.graph.nodes:
            if n.op != "call_function" or self.block_of(n) not in later:
                continue
            for u in n.all_input_nodes:
                if u.op != "placeholder" and (u.op != "call_function" or self.block_of(u) not in later):
                    out.add(u)
        return out

    def _binder(self) -> Callable[[torch.Tensor, dict], "_Collector"]:
        """``bind(batch, dequantized)``: an interpreter over the current graph with every placeholder bound for
        ``batch`` (weights as they are now, user inputs per the calling convention)."""
        module = self.module
        weights = module.stored_weights()
        bound = list(zip([n for n in module.graph.nodes if n.op == "placeholder"], module.signature.input_specs))
        lazy = {node: spec.target for node, spec in bound
                if spec.kind != InputKind.USER_INPUT and module.is_lazy(spec.target)}
        cache: dict[str, torch.Tensor] = {}  # lazy weights read by this run (one block's), for every batch

        def bind(batch: torch.Tensor, dequantized: dict) -> _Collector:
            interp = _Collector(module.graph_module, (), lambda node, x: None)
            interp.dequantized = dequantized
            interp.env = _LazyEnv(lazy, module, cache)
            user = iter(self.calibration._inputs(module, batch))
            for node, spec in bound:
                if spec.kind == InputKind.USER_INPUT:
                    interp.env[node] = next(user)
                elif node not in lazy:
                    interp.env[node] = weights[spec.target]
            return interp

        return bind

    def _run_block(self, key: str, *, observe: Sequence[fx.Node] = (), observer: Observer | None = None,
                   keep: set[fx.Node] | None = None) -> None:
        """Run block ``key`` on every batch's kept values: observe ``observe`` (stopping each batch once all are
        seen) or, with ``keep``, replace the kept values by ``keep``'s values (inputs of the blocks after it)."""
        members = self._members(key)
        missing = set(observe) - set(members)
        if missing:
            raise PassError(f"BlockRunner: {', '.join(sorted(n.name for n in missing))} not in block {key}")
        dequantized: dict = {}  # wq_linear weights unpacked once for all batches, as in collect()
        with torch.no_grad():
            bind = self._binder()
            for b, (batch, values) in enumerate(zip(self.calibration.batches, self.values)):
                interp = bind(batch, dequantized)
                interp.env.update(values)
                pending = set(observe)
                for n in members:
                    if n in pending:
                        x = interp.fetch_args_kwargs_from_env(n)[0][0]
                        observer(n, x.detach().reshape(-1, x.shape[-1]).to(torch.float32))
                        pending.discard(n)
                        if not pending and keep is None:
                            break
                    interp.env[n] = interp.run_node(n)
                if keep is not None:
                    self.values[b] = {n: interp.env[n] for n in keep}

    def collect(self, key: str, nodes: Sequence[fx.Node], observer: Observer) -> None:
        """Move to block ``key`` (running the blocks before it that are not yet passed) and observe ``nodes`` of
        it on every batch."""
        if key not in self.keys:
            raise PassError(f"BlockRunner: no block {key!r} (blocks: {', '.join(self.keys)})")
        target = self.keys.index(key)
        if target < self.position:
            raise PassError(f"BlockRunner: block {key!r} was already passed")
        while self.position < target:
            keep = self._needed_from(self.position + 1)
            self._run_block(self.keys[self.position], keep=keep)
            self.position += 1
        nodes = list(nodes)
        if nodes:
            self._run_block(key, observe=nodes, observer=observer)
