"""The TVM program at run time: a Relax VM over the built (or loaded) library, with torch tensors at the boundary.

Calling convention (shared by every backend, see ``llmpress.ir.capture_hf``): for language models
``forward(input_ids[B,T], start_pos[1], *caches) -> (logits, *caches)``; T > 1 runs the ``prefill`` function
(dynamic T), T == 1 runs ``decode`` (compiled for T = 1). Weights are VM function parameters: they are converted
to TVM tensors once, passed through the library's ``transform_params`` (layout changes lifted out of the
functions at build time), and appended to every call.

Tensors cross the boundary through DLPack on the CPU (no copy) and through host memory for CUDA. On CPU targets
the KV caches are written in place (``kernels/cache_write.py``): the cache tensors passed in are updated and
returned, so use the returned caches (as ``greedy``/``perplexity`` do) and do not expect the inputs unchanged.

Payload files (``save_payload``): ``model.so`` (the library), ``weights.safetensors`` (the weights by state-dict
name; ``params`` lists them in VM parameter order; sparse ones stored compressed and expanded at load,
``sparse_storage.py``), and for CUDA ``model.fatbin`` / ``model.ptx`` (device code
compiled at build time for the target arch).
"""
from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from ...errors import ArtifactError, LlmpressError
from ...ir.meta import LMInfo
from ..base import Compiled
from .build import TRANSFORM_PARAMS
from .sparse_storage import compressed_entries, expand_weights
from .targets import TargetSpec, host_arch, missing_features

__all__ = ["TVMCompiled", "load_compiled", "LIB", "WEIGHTS"]

log = logging.getLogger(__name__)

LIB = "model.so"
WEIGHTS = "weights.safetensors"
FATBIN = "model.fatbin"
PTX = "model.ptx"

#: sha256 of CUDA source -> precompiled device binary, answered by our ``tvm_callback_cuda_compile``.
_PRECOMPILED: dict[str, bytes] = {}


class TVMCompiled(Compiled):
    """A program built by the TVM backend (fresh from ``lower`` or loaded from an artifact).

    ``spec``/``executable``/``lib_path`` are the base build; ``variants`` are ``(spec, executable or None,
    lib_path or None)`` of more capable builds of the same program (``TargetSpec.variants``: same functions, same
    weights). The last build this machine supports is the one that runs (``running``)."""

    backend = "tvm"

    def __init__(self, *, spec: TargetSpec, executable: Any, params: Sequence[str], weights: Mapping[str, torch.Tensor],
                 functions: Sequence[str], num_inputs: int, lm: LMInfo | None,
                 device_code: dict[str, bytes] | None = None, lib_path: Path | None = None,
                 variants: Sequence[tuple[TargetSpec, Any, Path | None]] = (),
                 sparse_kernels: dict | None = None) -> None:
        self.spec = spec
        self.executable = executable
        self.params = list(params)
        self.weights = weights
        self.functions = tuple(functions)
        self.num_inputs = num_inputs
        self.lm = lm
        self.device_code = dict(device_code or {})
        self.lib_path = lib_path
        self.variants = list(variants)
        #: weight name -> the sparse-kernel decision (``kernels/sparse_plan.py``), sparse and dense alike
        self.sparse_kernels = dict(sparse_kernels or {})
        self._vm = None
        self._dev = None
        self._param_tensors: list | None = None
        self._fns: dict[str, Any] = {}  # VM functions by name
        self._last: dict[int, tuple] = {}  # id -> (torch tensor, TVM tensor) of the last call's outputs (CPU)
        self.threads: int | None = None  # None: every core this process may run on (threads.configure)
        self._forced: str | None = None  # use_build's choice

    # -- where it can run ------------------------------------------------------------------------
    def why_not_runnable(self) -> str | None:
        """Why this program cannot run on this machine (other arch, missing CPU features, no GPU), or None."""
        return _why_not_runnable(self.spec, self.lib_path or LIB)

    @property
    def runnable_here(self) -> bool:
        return self.why_not_runnable() is None

    @property
    def running(self) -> TargetSpec:
        """The build that runs here: the last variant this machine supports, else the base."""
        return self._pick()[0]

    @property
    def builds(self) -> list[str]:
        """Names of the builds this program carries: the base, then its variants."""
        return [self.spec.name] + [spec.name for spec, _, _ in self.variants]

    def use_build(self, name: str) -> None:
        """Run build ``name`` (one of ``builds``) instead of the most capable one, e.g. the portable ``cpu`` build
        on a host that also runs its AVX-512 VNNI variant (to compare them, or to see what an AVX2 machine runs)."""
        entries = [(self.spec, self.executable, self.lib_path), *self.variants]
        i = next((i for i, (spec, _, _) in enumerate(entries) if spec.name == name), None)
        if i is None:
            raise LlmpressError(f"no build {name!r} in this program; it has {', '.join(self.builds)}")
        spec, ex, lib = entries[i]
        why = _why_not_runnable(spec, lib or LIB)
        if why:
            raise LlmpressError(f"build {name!r} cannot run here: {why}")
        if ex is None:  # loaded from an artifact, where only the most capable library was opened
            import tvm

            ex = tvm.runtime.load_module(str(lib))
            if i == 0:
                self.executable = ex
            else:
                self.variants[i - 1] = (spec, ex, lib)
        self._forced = name
        self._vm, self._param_tensors, self._fns, self._last = None, None, {}, {}

    def _pick(self) -> tuple[TargetSpec, Any, Path | None]:
        if self._forced is not None:
            entries = [(self.spec, self.executable, self.lib_path), *self.variants]
            return next(e for e in entries if e[0].name == self._forced)
        for spec, ex, lib in reversed(self.variants):
            if ex is not None and _why_not_runnable(spec, lib or LIB) is None:
                return spec, ex, lib
        return self.spec, self.executable, self.lib_path

    def _ensure_vm(self) -> None:
        if self._vm is not None:
            return
        why = self.why_not_runnable()
        if why:
            raise LlmpressError(why)
        import tvm
        from tvm import relax

        from .threads import configure

        configure(self.threads)  # before the VM's first parallel job: TVM sizes its pool then
        spec, executable, _ = self._pick()
        log.debug("running the %s build", spec.name)
        self._dev = tvm.cuda(0) if self.spec.device == "cuda" else tvm.cpu(0)
        self._vm = relax.VirtualMachine(executable, self._dev)
        params = [self._to_tvm(self.weights[name]) for name in self.params]
        if self._vm.module.implements_function(TRANSFORM_PARAMS):
            # libraries built before params.prepare existed: weights -> kernel layouts at load
            params = list(self._vm[TRANSFORM_PARAMS](params))
        self._param_tensors = params

    def set_threads(self, threads: int | None) -> None:
        """CPU threads for this program's kernels (None: ``TVM_NUM_THREADS``, else every core in the affinity
        mask). A later call may lower the count of a running program, not raise it above the first."""
        if threads is not None and int(threads) < 1:
            raise LlmpressError(f"threads must be >= 1, got {threads}")
        self.threads = None if threads is None else int(threads)
        if self._vm is not None:
            from .threads import configure

            configure(self.threads)

    # -- conversions -----------------------------------------------------------------------------
    def _to_tvm(self, t: Any):
        import tvm

        t = torch.as_tensor(t).detach().contiguous()
        if self.spec.device == "cpu":
            if t.data_ptr() % 64:  # TVM needs 64-byte aligned data (mmapped safetensors may not be): copy once
                t = t.clone()
            return tvm.runtime.from_dlpack(t)
        return tvm.runtime.tensor(t.contiguous().numpy(), device=self._dev)

    def _to_torch(self, x: Any) -> torch.Tensor:
        if self.spec.device == "cpu":
            return torch.from_dlpack(x)
        return torch.from_numpy(x.numpy())

    # -- running ---------------------------------------------------------------------------------
    def run(self, function: str, *inputs: Any) -> tuple[torch.Tensor, ...]:
        """Call VM function ``function`` on the user inputs (weights are appended); returns torch tensors."""
        self._ensure_vm()
        if function not in self.functions:
            raise LlmpressError(f"this program has functions {self.functions}, not {function!r}")
        if len(inputs) != self.num_inputs:
            raise LlmpressError(f"{function} takes {self.num_inputs} inputs, got {len(inputs)}")
        fn = self._fns.get(function)
        if fn is None:
            fn = self._fns[function] = self._vm[function]
        # A tensor this program returned last call (the KV caches, updated in place and passed straight back) goes
        # back as the TVM tensor it came from, and an output that is an input buffer (a cache written in place)
        # comes back as the caller's tensor: no conversion of the caches per decode step.
        last = self._last
        args = [last[id(x)][1] if id(x) in last and last[id(x)][0] is x else self._to_tvm(x) for x in inputs]
        out = fn(*args, *self._param_tensors)
        outs = (out,) if hasattr(out, "shape") and type(out).__name__ != "Array" else tuple(out)
        if self.spec.device != "cpu":
            return tuple(self._to_torch(o) for o in outs)
        given = {a.data_ptr(): x for a, x in zip(args, inputs) if isinstance(x, torch.Tensor)}
        result = tuple(given[p] if (p := o.data_ptr()) in given else self._to_torch(o) for o in outs)
        self._last = {id(t): (t, o) for t, o in zip(result, outs)}
        return result

    def prefill(self, input_ids: torch.Tensor, start_pos: torch.Tensor, *caches: torch.Tensor):
        return self.run("prefill", input_ids, start_pos, *caches)

    def decode(self, input_ids: torch.Tensor, start_pos: torch.Tensor, *caches: torch.Tensor):
        return self.run("decode", input_ids, start_pos, *caches)

    def forward_last(self, *inputs: Any) -> Any:
        if self.lm is not None and "prefill_last" in self.functions and torch.as_tensor(inputs[0]).shape[1] > 1:
            return self.run("prefill_last", *inputs)
        return self.forward(*inputs)

    def forward(self, *inputs: Any) -> Any:
        if self.lm is not None:
            fn = "decode" if torch.as_tensor(inputs[0]).shape[1] == 1 else "prefill"
            return self.run(fn, *inputs)
        out = self.run("main", *inputs)
        return out[0] if len(out) == 1 else out

    # -- artifact --------------------------------------------------------------------------------
    def target_json(self) -> dict:
        return self.spec.to_json()

    def tokenizer_payload(self, tokenizer: Any, folder: Path) -> dict:
        """The C++ edge runner reads one tokenizer format (llama2.c's): write it beside the original."""
        from .edge_tokenizer import edge_tokenizer_manifest

        return edge_tokenizer_manifest(tokenizer, folder)

    def save_payload(self, folder: Path) -> dict:
        from ...safetensors_io import write_streamed
        from .build import export_library

        folder = Path(folder)
        libs = []
        for spec, ex, lib in [(self.spec, self.executable, self.lib_path), *self.variants]:
            name = LIB if spec is self.spec else _variant_lib(spec)
            if lib is not None:  # loaded from an artifact: the library is already built
                shutil.copy2(lib, folder / name)
            else:
                export_library(ex, folder / name, spec)
            libs.append(name)
        names = list(dict.fromkeys(self.params))
        # the compressed forms the sparse kernels read are stored as they are: no expansion at load
        reads = {r for d in self.sparse_kernels.values() if d["kernel"] == "sparse" for r in d["reads"]}
        direct = {n for n in names if "@" in n and n.split("@")[0] in reads}
        # streamed: one tensor at a time read (weights computed at compile time wait on disk, spill.py), encoded
        # and written, never a serialized copy of them all (save_file's way) nor all the encoded forms at once
        entries, sparse = compressed_entries(self.weights, names, keep=direct)
        write_streamed(folder / WEIGHTS, entries, metadata={"format": "pt"})
        payload = {"lib": LIB, "weights": WEIGHTS, "params": self.params, "functions": list(self.functions),
                   "num_inputs": self.num_inputs, "arch": self.spec.arch, "device": self.spec.device,
                   "target": self.spec.to_json(), "device_code": None,
                   "variants": [{"name": spec.name, "lib": lib, "target": spec.to_json()}
                                for (spec, _, _), lib in zip(self.variants, libs[1:])]}
        if sparse:  # only then: artifacts of dense models keep the manifest they had
            payload["sparse_weights"] = sparse
        if self.sparse_kernels:
            payload["sparse_kernels"] = self.sparse_kernels
        if self.device_code:
            (folder / FATBIN).write_bytes(self.device_code["fatbin"])
            (folder / PTX).write_bytes(self.device_code["ptx"])
            payload["device_code"] = {"fatbin": FATBIN, "ptx": PTX, "source_sha256": self.device_code["source_sha256"],
                                      "arch": self.spec.cuda_arch}
        return payload


def _variant_lib(spec: TargetSpec) -> str:
    """``model-<variant>.so`` for a variant named ``<base>+<variant>`` (``cpu+avx512vnni``)."""
    return f"model-{spec.name.rpartition('+')[2]}.so"


def _why_not_runnable(spec: TargetSpec, lib: Any) -> str | None:
    here = host_arch()
    if spec.arch != here:
        return (f"{lib}: built for {spec.arch} (target {spec.name!r}) but this machine is {here}; "
                f"run it on an {spec.arch} machine with the TVM runtime")
    miss = missing_features(spec)
    if miss:
        return (f"{lib}: built for target {spec.name!r}, which needs CPU features {', '.join(miss)} that this "
                "machine lacks; rebuild with a more portable target")
    if spec.device == "cuda":
        import tvm

        if not tvm.cuda(0).exist:
            return f"{lib}: built for CUDA {spec.cuda_arch} but no CUDA GPU is visible on this machine"
    return None


def _install_cuda_hook() -> None:
    """Answer TVM's compile-at-load hook with device code precompiled at build time (else TVM's own compiler)."""
    import tvm_ffi
    from tvm.support import nvcc

    fallback = nvcc.tvm_callback_cuda_compile

    def compile_hook(code):
        from .build import source_key

        pre = _PRECOMPILED.get(source_key(str(code)))
        if pre is not None:
            return bytearray(pre)
        return fallback(code)

    tvm_ffi.register_global_func("tvm_callback_cuda_compile", compile_hook, override=True)


def load_compiled(folder: Path, manifest: dict) -> TVMCompiled:
    """Rebuild a ``TVMCompiled`` from an artifact folder (hashes already verified by the artifact loader)."""
    from safetensors.torch import load_file

    payload = manifest.get("payload") or {}
    for key in ("lib", "weights", "params", "functions", "num_inputs", "target"):
        if key not in payload:
            raise ArtifactError(f"{folder / 'manifest.json'}: the tvm payload lacks {key!r}")
    spec = TargetSpec.from_json(payload["target"])
    lib = folder / payload["lib"]
    why = _why_not_runnable(spec, lib)
    if why:
        raise ArtifactError(why)
    dc = payload.get("device_code")
    device_code = None
    if dc:
        device_code = {"fatbin": (folder / dc["fatbin"]).read_bytes(), "ptx": (folder / dc["ptx"]).read_bytes(),
                       "source_sha256": dc["source_sha256"]}
        _PRECOMPILED[dc["source_sha256"]] = device_code["fatbin"]
        _install_cuda_hook()
    import tvm

    def load_lib(path: Path):
        try:
            return tvm.runtime.load_module(str(path))
        except Exception as e:  # noqa: BLE001 - any failure means the library is unusable here
            raise ArtifactError(f"{path}: cannot load the compiled library: {e}") from e

    variants = []
    for v in payload.get("variants") or []:
        vspec, vlib = TargetSpec.from_json(v["target"]), folder / v["lib"]
        variants.append((vspec, None, vlib))
    # load only the library that will run: the most capable one this machine supports
    best = next((i for i in range(len(variants) - 1, -1, -1)
                 if _why_not_runnable(variants[i][0], variants[i][2]) is None), None)
    module = None
    if best is not None:
        vspec, _, vlib = variants[best]
        variants[best] = (vspec, load_lib(vlib), vlib)
    else:
        module = load_lib(lib)
    try:
        weights = load_file(str(folder / payload["weights"]))
    except Exception as e:  # noqa: BLE001
        raise ArtifactError(f"{folder / payload['weights']}: cannot read the weights: {e}") from e
    weights = expand_weights(weights, payload.get("sparse_weights"), str(folder / payload["weights"]))
    missing = [p for p in payload["params"] if p not in weights]
    if missing:
        raise ArtifactError(f"{folder / payload['weights']}: lacks weights {missing[:5]}")
    lm = LMInfo.from_json(manifest["lm"]) if manifest.get("lm") else None
    return TVMCompiled(spec=spec, executable=module, params=payload["params"], weights=weights,
                       functions=payload["functions"], num_inputs=int(payload["num_inputs"]), lm=lm,
                       device_code=device_code, lib_path=lib, variants=variants,
                       sparse_kernels=payload.get("sparse_kernels"))
