"""Compilation targets of the TVM backend: short names -> TVM target dicts (plus what an artifact needs to run).

Names (``resolve_target``):

- ``cpu``: x86-64 LLVM with ``mcpu=x86-64-v3`` (AVX2, FMA, F16C, BMI1/2). That level is the portable default
  because every x86 server and desktop CPU since Intel Haswell (2013) and AMD Zen (2017) has it, while plain
  ``x86-64`` (SSE2 only) would leave 2-4x of the matmul speed on the table. An artifact records the CPU features
  it needs and ``load`` refuses one whose features the host lacks (instead of dying on an illegal instruction).
  It also carries a second library built for ``x86-64-v4`` with AVX-512 VNNI (``variants``: Ice Lake and later
  Intel server cores, AMD Zen 4 and later), whose integer kernels use 512-bit ``vpdpbusd``; the loaders (Python
  and the C++ runner) run the most capable library the host supports. Both read the same weights. With the
  environment variable ``LLMPRESS_CPU_VARIANTS=0`` ``cpu`` builds the portable library alone (one LLVM build
  instead of two; the test suite sets it, except in the tests of the variant builds).
- ``cpu:native``: ``mcpu`` = this machine's CPU (LLVM's host detection), for the host's best code; not portable.
- ``arm64``: ``{"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]}`` cross-compiled and linked
  with ``aarch64-linux-gnu-g++``; ``arm64:dotprod``, ``arm64:i8mm`` (and ``arm64:dotprod+i8mm``) add those
  features (Armv8.2 SDOT/UDOT, Armv8.6 SMMLA for int8 kernels; ``i8mm`` implies ``dotprod``, as every such core
  has both).
- ``cuda``: CUDA for ``sm_80`` (Ampere, runs on later GPUs through its PTX); ``cuda:sm_90`` etc. pick another
  arch. The host side is x86-64 LLVM (the same ``x86-64-v3`` level as ``cpu``).
- a full TVM target as a dict or a JSON string (``{"kind": "llvm", "mtriple": "aarch64-linux-gnu"}``): the escape
  hatch; its arch and device kind are read from the dict.

Nothing here imports TVM: resolving a name is pure data, so ``backend_for_target`` stays cheap.
"""
from __future__ import annotations

import difflib
import json
import os
import platform
import re
import shutil
from dataclasses import dataclass, field
from typing import Any

from ...errors import ConfigError

__all__ = ["TargetSpec", "resolve_target", "TARGET_NAMES", "host_arch", "host_cpu_features", "missing_features"]

#: ``LLMPRESS_CPU_VARIANTS=0``: the ``cpu`` target without its AVX-512 VNNI variant (the portable library alone)
CPU_VARIANTS_ENV = "LLMPRESS_CPU_VARIANTS"
#: The mcpu of the portable ``cpu`` target (see the module docstring for why).
PORTABLE_X86_MCPU = "x86-64-v3"
#: CPU features (as Linux /proc/cpuinfo spells them) an artifact built for ``x86-64-v3`` needs.
_X86_V3_FLAGS = ("avx", "avx2", "fma", "f16c", "bmi1", "bmi2")
#: LLVM feature name -> /proc/cpuinfo flag, for the features whose absence makes code crash.
_LLVM_TO_CPUINFO = {
    "x86_64": {"sse4.2": "sse4_2", "avx": "avx", "avx2": "avx2", "fma": "fma", "f16c": "f16c", "bmi": "bmi1",
               "bmi2": "bmi2", "avx512f": "avx512f", "avx512bw": "avx512bw", "avx512vl": "avx512vl",
               "avx512dq": "avx512dq", "avx512vnni": "avx512_vnni", "avx512bf16": "avx512_bf16",
               "avxvnni": "avx_vnni", "amx-int8": "amx_int8"},
    "aarch64": {"neon": "asimd", "dotprod": "asimddp", "i8mm": "i8mm", "sve": "sve", "fullfp16": "asimdhp"},
}
_X86_V4_VNNI_FLAGS = _X86_V3_FLAGS + ("avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl", "avx512_vnni")
_ARM_FEATURES = ("dotprod", "i8mm")
_CUDA_ARCH = re.compile(r"^sm_\d{2,3}[a-z]?$")
TARGET_NAMES = ("cpu", "cpu:native", "arm64", "arm64:dotprod", "arm64:i8mm", "cuda", "cuda:sm_80", "cuda:sm_90")


@dataclass(frozen=True)
class TargetSpec:
    """A resolved target: its name, the TVM target dict, and what the artifact needs to run.

    ``arch``: machine of the host code (``x86_64``/``aarch64``), compared with ``platform.machine()`` at load.
    ``device``: ``cpu`` or ``cuda``. ``cc``: the C++ compiler ``export_library`` links with (``None``: the host
    default). ``features``: CPU features (cpuinfo spelling) the host code needs. ``cuda_arch``: e.g. ``sm_80``.
    ``variants``: more capable builds of the same program (same weights), each a ``TargetSpec`` whose features
    extend this one's; a loader runs the last one the host supports.
    """

    name: str
    tvm: dict
    arch: str
    device: str = "cpu"
    cc: str | None = None
    features: tuple[str, ...] = ()
    cuda_arch: str | None = None
    extra: dict = field(default_factory=dict)
    variants: tuple["TargetSpec", ...] = ()

    def tvm_target(self):
        """The ``tvm.target.Target`` (imports TVM)."""
        import tvm

        return tvm.target.Target(self.tvm)

    def to_json(self) -> dict:
        out = {"name": self.name, "spec": self.tvm, "arch": self.arch, "device": self.device, "cc": self.cc,
               "features": list(self.features), "cuda_arch": self.cuda_arch}
        if self.variants:
            out["variants"] = [v.to_json() for v in self.variants]
        return out

    @classmethod
    def from_json(cls, d: dict) -> "TargetSpec":
        return cls(name=d["name"], tvm=d["spec"], arch=d["arch"], device=d.get("device", "cpu"), cc=d.get("cc"),
                   features=tuple(d.get("features") or ()), cuda_arch=d.get("cuda_arch"),
                   variants=tuple(cls.from_json(v) for v in d.get("variants") or ()))

    def cross_compiler_missing(self) -> str | None:
        """Why this target cannot be linked here (its cross compiler is absent), or None."""
        if self.cc and shutil.which(self.cc) is None:
            return (f"target {self.name!r} links with {self.cc}, which is not installed "
                    "(apt-get install -y g++-aarch64-linux-gnu)")
        return None


def host_arch() -> str:
    m = platform.machine().lower()
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(m, m)


def host_cpu_features() -> set[str] | None:
    """The host's CPU feature flags from /proc/cpuinfo (``flags`` on x86, ``Features`` on Arm), or None."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            text = f.read()
    except OSError:
        return None
    for line in text.splitlines():
        key, _, val = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(val.split())
    return None


def missing_features(spec: TargetSpec) -> list[str]:
    """Features the artifact needs that this host lacks (empty when unknown: the check is best effort)."""
    have = host_cpu_features()
    if have is None or not spec.features:
        return []
    return [f for f in spec.features if f not in have]


def _x86_llvm(mcpu: str) -> dict:
    return {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": mcpu}


def _features_of_mcpu(tvm_dict: dict, arch: str) -> tuple[str, ...]:
    """The crash-relevant CPU features LLVM enables for this target (cpuinfo spelling); imports TVM."""
    import tvm
    from tvm.target import codegen

    feats = codegen.llvm_get_cpu_features(tvm.target.Target(tvm_dict))
    table = _LLVM_TO_CPUINFO.get(arch, {})
    return tuple(sorted(table[f] for f in feats if f in table))


def resolve_target(t: Any) -> TargetSpec:
    """Turn a target name, a TVM target dict, a JSON string, or a ``TargetSpec`` into a ``TargetSpec``.

    Unknown names raise ``ConfigError`` with a did-you-mean.
    """
    if isinstance(t, TargetSpec):
        return t
    if isinstance(t, dict):
        return _from_dict(t)
    if not isinstance(t, str):
        raise ConfigError(f"a target is a name ({', '.join(TARGET_NAMES)}) or a TVM target dict, not "
                          f"{type(t).__name__}")
    text = t.strip()
    if text.startswith("{"):
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"target JSON does not parse: {e} in {text!r}") from e
        return _from_dict(d)
    base, _, opt = text.partition(":")
    if base == "cpu":
        if opt == "":
            vnni = TargetSpec("cpu+avx512vnni", {**_x86_llvm("x86-64-v4"), "mattr": ["+avx512vnni"]}, "x86_64",
                              features=_X86_V4_VNNI_FLAGS)
            variants = () if os.environ.get(CPU_VARIANTS_ENV, "1").strip() == "0" else (vnni,)
            return TargetSpec("cpu", _x86_llvm(PORTABLE_X86_MCPU), "x86_64", features=_X86_V3_FLAGS, variants=variants)
        if opt == "native":
            if host_arch() != "x86_64":
                raise ConfigError(f"cpu:native means this x86-64 machine's CPU, but this machine is {host_arch()}; "
                                  "use arm64 (or arm64:dotprod / arm64:i8mm) on Arm")
            from tvm.target import codegen

            d = _x86_llvm(str(codegen.llvm_get_system_cpu()))
            return TargetSpec("cpu:native", d, "x86_64", features=_features_of_mcpu(d, "x86_64"))
        raise _unknown(text, "cpu options: native")
    if base == "arm64":
        feats = [f for f in re.split(r"[+,]", opt) if f] if opt else []
        bad = [f for f in feats if f not in _ARM_FEATURES]
        if bad:
            raise _unknown(text, f"arm64 options: {', '.join(_ARM_FEATURES)} (join with +)")
        if "i8mm" in feats and "dotprod" not in feats:
            # every core with i8mm (Armv8.6) has dotprod (Armv8.2), but LLVM's +i8mm does not imply +dotprod: without
            # it the integer kernels would fall back to widening multiplies
            feats.insert(feats.index("i8mm"), "dotprod")
        mattr = ["+neon"] + [f"+{f}" for f in feats]
        d = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": mattr}
        cpuinfo = tuple(["asimd"] + [_LLVM_TO_CPUINFO["aarch64"][f] for f in feats])
        return TargetSpec(text, d, "aarch64", cc="aarch64-linux-gnu-g++", features=cpuinfo)
    if base == "cuda":
        arch = opt or "sm_80"
        if not _CUDA_ARCH.match(arch):
            raise _unknown(text, "cuda options: an arch like sm_80, sm_86, sm_89, sm_90")
        d = {"kind": "cuda", "arch": arch, "host": _x86_llvm(PORTABLE_X86_MCPU)}
        return TargetSpec(f"cuda:{arch}" if opt else "cuda", d, "x86_64", device="cuda", features=_X86_V3_FLAGS,
                          cuda_arch=arch)
    raise _unknown(text)


def _unknown(text: str, hint: str = "") -> ConfigError:
    close = difflib.get_close_matches(text, TARGET_NAMES, n=1)
    mean = f"; did you mean {close[0]!r}?" if close else ""
    extra = f" ({hint})" if hint else ""
    return ConfigError(f"unknown target {text!r}{mean}{extra}. Targets: {', '.join(TARGET_NAMES)}, "
                       "or a TVM target dict such as {\"kind\": \"llvm\", \"mtriple\": \"aarch64-linux-gnu\"}")


def _from_dict(d: dict) -> TargetSpec:
    """A raw TVM target dict: read the arch from its (host) mtriple, the device from its kind."""
    if not isinstance(d, dict) or "kind" not in d:
        raise ConfigError(f"a TVM target dict needs a 'kind' (llvm, cuda, ...): {d!r}")
    kind = d["kind"]
    if kind not in ("llvm", "cuda"):
        raise ConfigError(f"target kind {kind!r} is not supported by llmpress (llvm or cuda)")
    host = d.get("host") if kind == "cuda" else d
    if isinstance(host, str):
        host = {"kind": host}
    triple = (host or {}).get("mtriple", "")
    arch = triple.split("-")[0] if triple else host_arch()
    arch = {"arm64": "aarch64"}.get(arch, arch)
    if arch not in ("x86_64", "aarch64"):
        raise ConfigError(f"target triple {triple!r}: llmpress builds for x86_64 or aarch64 hosts")
    cc = "aarch64-linux-gnu-g++" if arch == "aarch64" and host_arch() != "aarch64" else None
    name = json.dumps(d, sort_keys=True)
    if kind == "cuda":
        arch_cuda = d.get("arch", "sm_80")
        return TargetSpec(name, dict(d), arch, device="cuda", cc=cc, cuda_arch=arch_cuda)
    return TargetSpec(name, dict(d), arch, cc=cc)
