"""``ir.Module``: the one IR every pass rewrites.

It wraps (never subclasses) a ``torch.export.ExportedProgram`` and is the single place that keeps the FX graph, the
export signature (which placeholder is a parameter, a buffer, a constant, a user input) and the weight store
coherent while passes add, replace and drop nodes and weights. Passes never touch ``ExportedProgram`` internals.

Lazy weights (``ir.lazy``): a module captured from a checkpoint path keeps, for every weight not yet read, where it
is (``LazyTensor``) and a shape-only ``FakeTensor`` in the store. ``weight(node)`` reads that one weight (float32,
not kept: a pass that replaces it never holds two copies), ``set_weight`` and ``remove_unused_weights`` end its
lazy state, ``stored_weights()`` gives the store without reading anything (names, shapes, dtypes). What needs every
weight at once (``weights()``, ``run``, ``exported_program``: saving, lowering) calls ``materialize()`` first,
which reads them all into the store and says so in one log line.
"""
from __future__ import annotations

import itertools
import logging
from collections import Counter
from typing import Any, Callable, Iterable, Mapping

import torch
import torch.fx as fx
from torch.export import ExportedProgram
from torch.export.graph_signature import (
    ExportGraphSignature,
    InputKind,
    InputSpec,
    OutputKind,
    OutputSpec,
    TensorArgument,
)

from ..errors import LlmpressError
from .meta import LMInfo, node_id, set_node_id, source_path
from .printing import arg_str, op_name, type_str

__all__ = ["Module", "VerifyError"]

log = logging.getLogger(__name__)


class VerifyError(LlmpressError):
    """The IR is inconsistent (graph and signature disagree, a weight is missing, a node has no shape)."""


_WEIGHT_KINDS = (InputKind.PARAMETER, InputKind.BUFFER, InputKind.CONSTANT_TENSOR)


class Module:
    """A captured model: exported program + weight store + typed metadata.

    ``lm`` is set when the graph follows the KV-cache calling convention of a causal LM.
    ``info`` is free-form provenance (source path, tokenizer, pipeline history) that artifacts record.
    """

    def __init__(self, ep: ExportedProgram, *, lm: LMInfo | None = None, info: dict | None = None,
                 lazy: Mapping[str, Any] | None = None) -> None:
        self._ep = ep
        stored = self.stored_weights()
        self._lazy: dict[str, Any] = {k: v for k, v in (lazy or {}).items() if k in stored}
        self.lm = lm
        self.info: dict[str, Any] = dict(info or {})
        self._ids = itertools.count()
        self._runner: torch.nn.Module | None = None  # ep.module(), built once; dropped on every edit
        for node in self.graph.nodes:
            if not node_id(node):
                set_node_id(node, f"n{next(self._ids)}")
            else:
                self._bump(node_id(node))

    def _bump(self, nid: str) -> None:
        if nid.startswith("n") and nid[1:].isdigit():
            n = int(nid[1:])
            cur = next(self._ids)
            self._ids = itertools.count(max(cur, n + 1))

    # -- views -------------------------------------------------------------------------------
    @property
    def exported_program(self) -> ExportedProgram:
        """The program with every weight in memory (lazy ones are read first: ``materialize``)."""
        self.materialize("the exported program")
        return self._ep

    @property
    def graph_module(self) -> fx.GraphModule:
        return self._ep.graph_module

    @property
    def graph(self) -> fx.Graph:
        return self._ep.graph_module.graph

    @property
    def signature(self) -> ExportGraphSignature:
        return self._ep.graph_signature

    def weights(self) -> dict[str, torch.Tensor]:
        """Every weight the graph reads (parameters, buffers, constants) by its state-dict name, in memory (lazy
        weights are read first: ``materialize``; ``stored_weights`` when names, shapes and dtypes suffice)."""
        self.materialize("weights()")
        return self.stored_weights()

    def stored_weights(self) -> dict[str, torch.Tensor]:
        """The weight store as it is: a lazy weight is a ``FakeTensor`` of its shape and dtype (no data)."""
        out = dict(self._ep.state_dict)
        out.update({k: v for k, v in self._ep.constants.items() if isinstance(v, torch.Tensor)})
        return out

    def _spec_by_placeholder(self) -> dict[str, InputSpec]:
        return {s.arg.name: s for s in self.signature.input_specs if isinstance(s.arg, TensorArgument)}

    def weight_name(self, node: fx.Node) -> str | None:
        """State-dict name of the weight a placeholder stands for, or None for user inputs and non-placeholders."""
        if node.op != "placeholder":
            return None
        spec = self._spec_by_placeholder().get(node.name)
        if spec is None or spec.kind not in _WEIGHT_KINDS:
            return None
        return spec.target

    def weight(self, node: fx.Node) -> torch.Tensor | None:
        """The tensor behind a weight placeholder, or None if ``node`` is not one. A lazy weight is read from its
        checkpoint now and not kept (each call reads it again)."""
        name = self.weight_name(node)
        if name is None:
            return None
        return self.weight_by_name(name)

    def weight_by_name(self, name: str) -> torch.Tensor:
        """The stored weight ``name`` (a lazy one read now, not kept)."""
        src = self._lazy.get(name)
        if src is not None:
            return src.load()
        return self.stored_weights()[name]

    def is_lazy(self, name: str) -> bool:
        """Whether weight ``name`` is still in its checkpoint (not read into the store)."""
        return name in self._lazy

    def lazy_source(self, name: str) -> Any:
        """The ``LazyTensor`` of a lazy weight, or None."""
        return self._lazy.get(name)

    def materialize(self, why: str = "") -> int:
        """Read every lazy weight into the store (tied names share one tensor); returns how many were read."""
        if not self._lazy:
            return 0
        loaded: dict[int, torch.Tensor] = {}
        nbytes = 0
        for name, src in list(self._lazy.items()):
            if id(src) not in loaded:
                loaded[id(src)] = src.load()
                nbytes += loaded[id(src)].numel() * 4
            self._store(name, loaded[id(src)])
        log.info("materialized %d lazy weights (%.2f GB float32)%s", len(loaded), nbytes / 1e9,
                 f" for {why}" if why else "")
        self._lazy.clear()
        self._runner = None
        return len(loaded)

    def _store(self, name: str, tensor: torch.Tensor) -> None:
        old = self._ep.state_dict.get(name)
        if name in self._ep.state_dict:
            if isinstance(old, torch.nn.Parameter):
                tensor = torch.nn.Parameter(tensor, requires_grad=False)
            self._ep.state_dict[name] = tensor
        else:
            self._ep.constants[name] = tensor
        self._lazy.pop(name, None)

    def user_inputs(self) -> list[fx.Node]:
        specs = self._spec_by_placeholder()
        return [n for n in self.graph.nodes if n.op == "placeholder" and specs[n.name].kind == InputKind.USER_INPUT]

    def output_node(self) -> fx.Node:
        return next(n for n in reversed(self.graph.nodes) if n.op == "output")

    # -- editing -----------------------------------------------------------------------------
    def fake_mode(self):
        from torch._guards import detect_fake_mode

        vals = [n.meta.get("val") for n in self.graph.nodes if n.op == "placeholder"]
        return detect_fake_mode([v for v in vals if isinstance(v, torch.Tensor)])

    def fresh_weight_name(self, base: str) -> str:
        """``base``, or ``base_1``, ``base_2``, ... : the first that names no stored weight."""
        names, name, i = self.stored_weights(), base, 0
        while name in names:
            i += 1
            name = f"{base}_{i}"
        return name

    def add_weight(self, name: str, tensor: torch.Tensor, *, kind: str = "auto") -> fx.Node:
        """Add a weight (a new placeholder + signature entry + stored tensor) and return its placeholder.

        ``kind``: "parameter" (floating point, trainable), "buffer", or "auto" (parameter for floating point
        tensors, buffer for integer ones: packed weights cannot be ``nn.Parameter``).
        """
        if name in self.stored_weights():
            raise VerifyError(f"weight {name!r} already exists")
        if kind == "auto":
            kind = "parameter" if tensor.is_floating_point() else "buffer"
        in_kind = InputKind.PARAMETER if kind == "parameter" else InputKind.BUFFER
        tensor = tensor.detach()
        if in_kind == InputKind.PARAMETER:
            tensor = torch.nn.Parameter(tensor, requires_grad=False)
        placeholders = [n for n in self.graph.nodes if n.op == "placeholder"]
        specs = list(self.signature.input_specs)
        # Weights come before user inputs in both the placeholder order and the signature.
        first_user = next((i for i, s in enumerate(specs) if s.kind == InputKind.USER_INPUT), len(specs))
        anchor = placeholders[first_user] if first_user < len(placeholders) else None
        pname = "p_" + name.replace(".", "_")
        if anchor is not None:
            with self.graph.inserting_before(anchor):
                node = self.graph.placeholder(pname)
        else:
            node = self.graph.placeholder(pname)
        fm = self.fake_mode()
        # static_shapes: a weight's shape is fixed; without it the fake mode invents a symbol per dim (s93...),
        # which leaks into every shape computed from the weight and into the guards of saved programs.
        node.meta["val"] = fm.from_tensor(tensor, static_shapes=True) if fm is not None else tensor.to("meta")
        set_node_id(node, f"n{next(self._ids)}")
        specs.insert(first_user, InputSpec(kind=in_kind, arg=TensorArgument(name=node.name), target=name,
                                           persistent=True if in_kind == InputKind.BUFFER else None))
        self._ep.state_dict[name] = tensor
        self._set_signature(specs, list(self.signature.output_specs))
        return node

    def set_weight(self, node: fx.Node, tensor: torch.Tensor) -> None:
        """Replace the tensor behind the weight placeholder ``node`` by ``tensor`` (same shape and dtype) in this
        module only: a ``clone`` shares the tensors but not the store, so the module it was cloned from keeps its
        own. Every reader of the placeholder (and of a tied weight's other placeholders) sees the new tensor."""
        name = self.weight_name(node)
        if name is None:
            raise VerifyError(f"set_weight: {node.name} is not a weight placeholder")
        old = self.stored_weights()[name]
        if old.shape != tensor.shape or old.dtype != tensor.dtype:
            raise VerifyError(f"set_weight: {name} is {old.dtype} {list(old.shape)}, the new tensor "
                              f"{tensor.dtype} {list(tensor.shape)}")
        self._store(name, tensor.detach())  # another name tied to a lazy one keeps reading the old tensor
        self._runner = None

    def transpose_weight(self, node: fx.Node) -> None:
        """Store the 2-D weight behind placeholder ``node`` transposed, under its name (a layout change made at
        capture: a ``Conv1D``'s ``[in, out]`` becomes a linear's ``[out, in]``, ``ir.linear_form``). A lazy weight
        stays lazy where its source can read it transposed; the placeholder's shape follows. The caller rewrites
        every reader of ``node``; refused for a weight that backs another placeholder (whose readers would see
        the new layout unannounced)."""
        name = self.weight_name(node)
        if name is None:
            raise VerifyError(f"transpose_weight: {node.name} is not a weight placeholder")
        if sum(1 for s in self.signature.input_specs if s.target == name) > 1:
            raise VerifyError(f"transpose_weight: {name} backs several placeholders (a tied weight)")
        old = self.stored_weights()[name]
        if old.dim() != 2:
            raise VerifyError(f"transpose_weight: {name} has {old.dim()} dims, not 2")
        src = self._lazy.get(name)
        flipped = src.transposed_view() if src is not None else None
        if src is not None and flipped is None:
            old = src.load()  # read now: its source cannot give the transpose
        self._store(name, old.detach().t().contiguous())  # a fake (lazy) weight gives a fake of the new shape
        if flipped is not None:
            self._lazy[name] = flipped
        fm = self.fake_mode()
        shape = (old.shape[1], old.shape[0])
        if fm is None:
            node.meta["val"] = torch.empty(shape, dtype=old.dtype, device="meta")
        else:
            with fm:
                node.meta["val"] = torch.empty(shape, dtype=old.dtype)
        self._runner = None

    def add_input(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, *, after: fx.Node) -> fx.Node:
        """Add a user input (a placeholder right after the placeholder ``after``) of a static ``shape``/``dtype``.

        The calling convention changes with it: the pytree spec of the program's inputs is rebuilt, so
        ``run``/``torch.export.save`` take one more positional argument at that position."""
        if after.op != "placeholder":
            raise VerifyError(f"add_input: {after.name} is not a placeholder")
        fm = self.fake_mode()
        example = torch.zeros(shape, dtype=dtype)
        with self.graph.inserting_after(after):
            node = self.graph.placeholder(name)
        node.meta["val"] = fm.from_tensor(example, static_shapes=True) if fm is not None else example.to("meta")
        set_node_id(node, f"n{next(self._ids)}")
        specs = list(self.signature.input_specs)
        at = next(i for i, sp in enumerate(specs) if isinstance(sp.arg, TensorArgument) and sp.arg.name == after.name)
        specs.insert(at + 1, InputSpec(kind=InputKind.USER_INPUT, arg=TensorArgument(name=node.name), target=None))
        self._set_signature(specs, list(self.signature.output_specs))
        self._sync_call_spec()
        return node

    def remove_input(self, node: fx.Node) -> None:
        """Drop a user input nothing reads any more (its placeholder and signature entry)."""
        if node.users:
            raise VerifyError(f"remove_input: {node.name} still has users {list(node.users)}")
        specs = [sp for sp in self.signature.input_specs
                 if not (isinstance(sp.arg, TensorArgument) and sp.arg.name == node.name)]
        self.graph.erase_node(node)
        self._set_signature(specs, list(self.signature.output_specs))
        self._sync_call_spec()

    def set_outputs(self, outputs: list[fx.Node]) -> None:
        """Make ``outputs`` the program's user outputs, in order (the output node and its specs follow)."""
        out = self.output_node()
        out.args = (tuple(outputs),)
        specs = [OutputSpec(kind=OutputKind.USER_OUTPUT, arg=TensorArgument(name=n.name), target=None)
                 for n in outputs]
        self._set_signature(list(self.signature.input_specs), specs)
        self._sync_call_spec()

    def _sync_call_spec(self) -> None:
        """Rebuild the pytree specs of the call (``forward(*user_inputs) -> tuple(user_outputs)``) after the user
        inputs or outputs changed; the example inputs no longer match, so they are dropped."""
        import torch.utils._pytree as pytree

        entry = self._ep.module_call_graph[0]
        users = self.user_inputs()
        n_out = len(self.output_node().args[0])
        sig = entry.signature
        sig.in_spec = pytree.tree_flatten((tuple(range(len(users))), {}))[1]
        if sig.out_spec is None or sig.out_spec.type in (tuple, list):
            sig.out_spec = pytree.tree_flatten(tuple(range(n_out)))[1]
        if sig.forward_arg_names is not None:
            sig.forward_arg_names = [n.name for n in users]
        self._ep._example_inputs = None

    def call(self, target: Callable, args: tuple, kwargs: dict | None = None, *, like: fx.Node | None = None,
             before: fx.Node | None = None) -> fx.Node:
        """Insert ``target(*args, **kwargs)`` before ``before`` (default: before ``like``), with its shape metadata
        computed on fake tensors and the source path / stack trace copied from ``like``."""
        kwargs = kwargs or {}
        where = before if before is not None else like
        if where is None:
            raise VerifyError("Module.call needs `like` or `before` to place the node")
        with self.graph.inserting_before(where):
            node = self.graph.call_function(target, args, kwargs)
        self.infer_meta(node)
        if like is not None:
            for key in ("nn_module_stack", "stack_trace", "source_fn_stack", "from_node"):
                if key in like.meta:
                    node.meta[key] = like.meta[key]
        set_node_id(node, f"n{next(self._ids)}")
        return node

    def infer_meta(self, node: fx.Node) -> None:
        """Compute ``node.meta['val']`` by running its target on the fake values of its inputs."""
        def val(a):
            return a.meta["val"] if isinstance(a, fx.Node) else a

        fake_args = fx.node.map_aggregate(node.args, val)
        fake_kwargs = fx.node.map_aggregate(node.kwargs, val)
        fm = self.fake_mode()
        if fm is None:
            node.meta["val"] = node.target(*fake_args, **fake_kwargs)
        else:
            with fm:
                node.meta["val"] = node.target(*fake_args, **fake_kwargs)

    def erase(self, nodes: Iterable[fx.Node]) -> None:
        for n in nodes:
            self.graph.erase_node(n)

    def remove_unused_weights(self, only: Iterable[fx.Node] | None = None) -> list[str]:
        """Drop weight placeholders nothing reads, with their signature entries and stored tensors.

        ``only``: consider just these placeholders (a pass dropping the weights it made dead, and no others)."""
        specs = self._spec_by_placeholder()
        allowed = None if only is None else set(only)
        removed = []
        gone = set()  # placeholder names: a tied weight's other placeholder keeps its spec
        for node in list(self.graph.nodes):
            if node.op == "placeholder" and not node.users and (allowed is None or node in allowed):
                spec = specs[node.name]
                if spec.kind in _WEIGHT_KINDS:
                    gone.add(node.name)
                    self.graph.erase_node(node)
                    removed.append(spec.target)
        if removed:
            keep = [s for s in self.signature.input_specs
                    if not (isinstance(s.arg, TensorArgument) and s.arg.name in gone)]
            for name in removed:
                # A tied weight can back two placeholders; keep it while any spec still names it.
                if not any(s.target == name for s in keep):
                    self._ep.state_dict.pop(name, None)
                    self._ep.constants.pop(name, None)
                    self._lazy.pop(name, None)
            self._set_signature(keep, list(self.signature.output_specs))
        return removed

    def _set_signature(self, input_specs: list[InputSpec], output_specs: list[OutputSpec]) -> None:
        self._runner = None
        self._ep._graph_signature = ExportGraphSignature(input_specs=input_specs, output_specs=output_specs)

    def recompile(self) -> None:
        """Call after editing the graph: re-syncs the signature's names with the graph, lints, regenerates code."""
        sig = _synced_signature(self.graph, self.signature)
        self._set_signature(list(sig.input_specs), list(sig.output_specs))
        self.graph.lint()
        self.graph_module.recompile()
        self._runner = None

    # -- checks and views --------------------------------------------------------------------
    def verify(self) -> None:
        """Raise ``VerifyError`` unless graph, signature and weights agree and every value node has a shape."""
        try:
            self.graph.lint()
        except Exception as e:  # noqa: BLE001 - re-raised with context
            raise VerifyError(f"graph lint failed: {e}") from e
        placeholders = [n for n in self.graph.nodes if n.op == "placeholder"]
        specs = self.signature.input_specs
        if [p.name for p in placeholders] != [s.arg.name for s in specs]:
            raise VerifyError("placeholders and signature input specs disagree in names or order")
        weights = self.stored_weights()
        for s in specs:
            if s.kind in _WEIGHT_KINDS and s.target not in weights:
                raise VerifyError(f"signature names weight {s.target!r} that is not stored")
        outs = self.output_node().args[0]
        if len(outs) != len(self.signature.output_specs):
            raise VerifyError("output node and signature output specs disagree in count")
        for node in self.graph.nodes:
            if node.op == "call_function":
                if "val" not in node.meta:
                    raise VerifyError(f"node {node.name} ({node.target}) has no shape metadata")
                if not isinstance(node.target, (torch._ops.OpOverload, torch._ops.HigherOrderOperator)) and \
                        node.target.__module__ != "_operator":
                    raise VerifyError(f"node {node.name} calls {node.target!r}, which is not an ATen/llmpress op")

    def op_histogram(self) -> Counter:
        """How many times each op occurs (``aten.linear.default``: 57, ...)."""
        return Counter(op_name(n.target) for n in self.graph.nodes if n.op == "call_function")

    def print(self) -> str:
        """A short canonical text form: one line per node, weights with shape and dtype."""
        lines = []
        for node in self.graph.nodes:
            v = node.meta.get("val")
            ty = type_str(v)
            if node.op == "placeholder":
                w = self.weight_name(node)
                lines.append(f"%{node.name}: {ty} = {'weight ' + repr(w) if w else 'input'}")
            elif node.op == "call_function":
                args = ", ".join(arg_str(a) for a in node.args)
                kw = ", ".join(f"{k}={arg_str(v)}" for k, v in node.kwargs.items())
                lines.append(f"%{node.name}: {ty} = {op_name(node.target)}({args}{', ' + kw if kw else ''})")
            elif node.op == "output":
                lines.append(f"return {arg_str(node.args[0])}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.print()

    def clone(self) -> "Module":
        """A structural copy: new graph and signature, the same weight tensors (no weight is copied)."""
        import copy

        import warnings

        ep = self._ep
        gm = fx.GraphModule(ep.graph_module, copy.deepcopy(ep.graph))
        with warnings.catch_warnings():
            # torch 2.13's pytree warns about its own LeafSpec when a call graph's specs are copied
            warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
            call_graph = copy.deepcopy(ep.module_call_graph)
        new = ExportedProgram(
            root=gm,
            graph=gm.graph,
            # Copying a graph may rename nodes (a placeholder called ``input`` becomes ``input_1``).
            graph_signature=_synced_signature(gm.graph, ep.graph_signature),
            state_dict=dict(ep.state_dict),
            range_constraints=dict(ep.range_constraints),
            module_call_graph=call_graph,
            example_inputs=ep.example_inputs,
            constants=dict(ep.constants),
            verifiers=list(ep.verifiers) if hasattr(ep, "verifiers") else None,
        )
        return Module(new, lm=self.lm, info=dict(self.info), lazy=self._lazy)

    def run(self, *inputs: Any) -> Any:
        """Run the graph in PyTorch (the reference interpreter; the oracle of every numerical test)."""
        # Unlifting the program costs ~0.25 s, so the runner is built once and rebuilt only after an edit
        # (``recompile`` and every weight/signature change drop it).
        if self._runner is None:
            self.materialize("the reference interpreter")
            self._runner = self._ep.module()
        with torch.no_grad():
            return self._runner(*inputs)

    def nodes_by_source(self, pattern: str) -> list[fx.Node]:
        import fnmatch

        return [n for n in self.graph.nodes if n.op == "call_function" and fnmatch.fnmatchcase(source_path(n), pattern)]


def _synced_signature(graph: fx.Graph, sig: ExportGraphSignature) -> ExportGraphSignature:
    """``sig`` with its input/output names taken, position by position, from ``graph``'s placeholders and outputs."""
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    specs = sig.input_specs
    if len(placeholders) != len(specs):
        raise VerifyError(f"{len(placeholders)} placeholders but {len(specs)} input specs")
    new_in = [InputSpec(kind=s.kind, arg=TensorArgument(name=p.name) if isinstance(s.arg, TensorArgument) else s.arg,
                        target=s.target, persistent=s.persistent) for s, p in zip(specs, placeholders)]
    outs = next(n for n in reversed(graph.nodes) if n.op == "output").args[0]
    new_out = []
    for s, a in zip(sig.output_specs, outs):
        arg = TensorArgument(name=a.name) if isinstance(a, fx.Node) and isinstance(s.arg, TensorArgument) else s.arg
        new_out.append(OutputSpec(kind=s.kind, arg=arg, target=s.target))
    return ExportGraphSignature(input_specs=new_in, output_specs=new_out)
