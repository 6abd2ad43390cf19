"""``TVMBackend``: check -> translate to Relax -> build -> ``TVMCompiled``."""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Mapping

from ...errors import ConfigError
from ...ir.module import Module
from ..base import Backend, Unsupported
from .converters import Converter
from .targets import resolve_target

__all__ = ["TVMBackend"]

log = logging.getLogger(__name__)


class TVMBackend(Backend):
    """Lowers through Apache TVM for ``cpu``, ``cpu:native``, ``arm64[:dotprod|:i8mm]``, ``cuda[:sm_XX]`` or a
    TVM target dict.

    ``inplace_cache`` (default True): on CPU targets, KV caches passed in are updated in place
    (``kernels/cache_write.py``); False keeps the functional form (a new cache per call, inputs untouched).
    ``cpu_kernels`` (default True): on CPU targets, llmpress's kernels replace TVM's lowering of ops it runs slowly
    (``kernels/softmax.py``); False keeps TVM's own (for comparison).
    ``epilogues`` (default False): on CPU targets, the SwiGLU of a fused gate/up projection is computed in its linear
    kernel's output stage (``kernels/epilogue.py``), a linear's bias is added in its store (``kernels/bias.py``) and
    each residual add + RMSNorm is one kernel (``kernels/add_norm.py``); ``"decode"``: in the decode function only
    (prefill keeps the separate kernels, reading the same weights). Off by default because no gain is measured yet
    (``benchmarks/epilogue.py``; README).
    ``sparse_kernels`` (default ``"auto"``): on CPU targets, a linear whose weight is sparse (measured from its zeros)
    runs ``kernels/sparse.py``'s kernel over a compressed weight where the measured crossover says it is faster
    (``kernels/sparse_plan.py``), else dense compute with a log line saying why; ``"always"`` forces the sparse
    kernel wherever its format applies, ``"never"`` keeps all dense. The decisions are ``sparse_kernels`` of the
    compiled program and of the artifact's payload."""

    name = "tvm"
    OPTIONS = {
        "epilogues": "true | false | decode: fused SwiGLU/bias/add+norm epilogues (default false)",
        "sparse_kernels": "auto | always | never: sparse CPU kernels for sparse weights (default auto)",
        "inplace_cache": "true | false: KV caches updated in place on CPU targets (default true)",
        "cpu_kernels": "true | false: llmpress's CPU kernels where TVM's lowering is slow (default true)",
    }

    def __init__(self, *, converters: Mapping[str, Converter] | None = None, inplace_cache: bool = True,
                 cpu_kernels: bool = True, epilogues: bool | str = False, sparse_kernels: str = "auto") -> None:
        from .kernels.sparse_plan import MODES

        if epilogues not in (True, False, "decode"):
            raise ConfigError(f"TVMBackend(epilogues=...) is True, False or 'decode' (the decode function only), "
                              f"not {epilogues!r}")
        if sparse_kernels not in MODES:
            raise ConfigError(f"TVMBackend: sparse_kernels={sparse_kernels!r} must be one of {', '.join(MODES)}")
        self.sparse_kernels = sparse_kernels
        # None: the shared ``converters.CONVERTERS`` (read at lowering time, so entries added later count)
        self.converters = converters
        self.inplace_cache = inplace_cache
        self.cpu_kernels = cpu_kernels
        self.epilogues = epilogues

    def _configured(self, options: dict[str, Any]) -> "TVMBackend":
        kw = {"converters": self.converters, "inplace_cache": self.inplace_cache, "cpu_kernels": self.cpu_kernels,
              "epilogues": self.epilogues, "sparse_kernels": self.sparse_kernels}
        for key in ("inplace_cache", "cpu_kernels"):
            if key in options and not isinstance(options[key], bool):
                raise ConfigError(f"backend option {key}={options[key]!r}: true or false")
        return TVMBackend(**{**kw, **options})

    def supports(self, target: Any) -> bool:
        if target in (None, "reference"):
            return False
        try:
            resolve_target(target)
        except ConfigError:
            return False
        return True

    def check(self, module: Module, target: Any = "cpu") -> list[Unsupported]:
        from .lower import check

        resolve_target(target)  # an unknown target fails here, before the graph walk
        return check(module, converters=self.converters)

    def lower(self, module: Module, target: Any = "cpu", *, progress: bool = True):
        from tqdm import tqdm

        from .build import build, compile_fatbin, compile_ptx, cuda_sources, source_key
        from .lower import to_relax
        from .params import prepare, prepare_variant
        from .runtime import TVMCompiled

        spec = resolve_target(target)
        why = spec.cross_compiler_missing()
        if why:  # fail before the (long) build rather than at export
            raise ConfigError(why)
        steps = ["translate to Relax", "transform weights", f"build for {spec.name}"]
        steps += [f"build for {v.name}" for v in spec.variants]
        steps += ["compile CUDA device code"] if spec.device == "cuda" else []
        bar = tqdm(total=len(steps), desc="tvm", disable=not progress, leave=False)
        t0 = time.perf_counter()
        bar.set_postfix_str(steps[0])
        prog = to_relax(module, converters=self.converters, inplace_cache=self.inplace_cache and spec.device == "cpu",
                        cpu_kernels=self.cpu_kernels and spec.device == "cpu")
        bar.update(1)
        bar.set_postfix_str(steps[1])
        prepared = prepare(prog, spec, epilogues=self.epilogues, sparse_kernels=self.sparse_kernels)
        bar.update(1)
        bar.set_postfix_str(steps[2])
        t1 = time.perf_counter()
        ex = build(prepared.mod, spec)
        bar.update(1)
        variants = []
        for v in spec.variants:  # more capable builds reading the same weights (e.g. AVX-512 VNNI)
            bar.set_postfix_str(f"build for {v.name}")
            mod = prepare_variant(prog, prepared, v, epilogues=self.epilogues, sparse_kernels=self.sparse_kernels)
            if mod is not None:
                variants.append((v, build(mod, v), None))
            bar.update(1)
        t2 = time.perf_counter()
        device_code = None
        if spec.device == "cuda":
            bar.set_postfix_str(steps[-1])
            srcs = cuda_sources(ex)
            if len(srcs) == 1:
                device_code = {"ptx": compile_ptx(srcs[0], spec.cuda_arch),
                               "fatbin": compile_fatbin(srcs[0], spec.cuda_arch),
                               "source_sha256": source_key(srcs[0])}
            else:
                log.warning("expected one CUDA module, found %d: device code is compiled at load", len(srcs))
            bar.update(1)
        bar.close()
        log.info("tvm %s: translate and transform weights %.1fs, build %.1fs (%d libraries), device code %.1fs",
                 spec.name, t1 - t0, t2 - t1, 1 + len(variants), time.perf_counter() - t2)
        return TVMCompiled(spec=spec, executable=ex, params=prepared.params, weights=prepared.weights,
                           functions=prepared.functions, num_inputs=prepared.num_inputs, lm=module.lm,
                           device_code=device_code, variants=variants, sparse_kernels=_sparse_stats(prepared.mod))

    def load(self, folder: Path, manifest: dict):
        from .runtime import load_compiled

        return load_compiled(Path(folder), manifest)


def _sparse_stats(mod: Any) -> dict:
    """The sparse-kernel decisions ``dispatch.py`` left on the module (empty when it did not run: GPU targets)."""
    import ast

    from .kernels.dispatch import SPARSE_STATS_ATTR

    attrs = mod.attrs or {}
    return ast.literal_eval(str(attrs[SPARSE_STATS_ATTR])) if SPARSE_STATS_ATTR in attrs else {}
