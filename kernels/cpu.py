"""What the CPU can do, asked once: LLVM's view of the host's features (the same LLVM that compiles
the Numba kernels, so a feature it reports is one it can emit), and the one fact about ONNX Runtime's
x86 int8 kernels that changes results.

    has("avx512vnni")      -> bool                       (the host: cpuid, what ORT's MLAS dispatches on)
    summary()              -> {"avx2": True, "avx512_vnni": ..., "amx_int8": ..., "avx512_vpopcntdq": ...}
    compile_features()     -> what Numba compiles our kernels for (the host, or NUMBA_CPU_NAME /
                              NUMBA_CPU_FEATURES, e.g. AVX2-only code on an AVX-512 machine)
    gemm_kernel()          -> our int8 GEMM micro-kernel: amx | vnni | avx2 | plain (QGRAPH_GEMM forces one)
    ort_path()             -> the u8 x s8 kernel class ORT takes here (QGRAPH_ORT_PATH names another)
    ort_softmax_kernel()   -> MLAS's float sum-exp kernel there: avx512f | fma3 | sse2 | neon (``ortsoftmax``)

Names are LLVM's (``avx2``, ``avx512vnni``, ``avx512vpopcntdq``, ``amx-int8``, ...). A kernel that
can be turned off by an environment variable (``QGRAPH_NO_VNNI``, ...) checks that itself.

ONNX Runtime on x86-64 stores every int8 activation of a fused QDQ unit as uint8
(``QDQS8ToU8Transformer``), so QLinearConv, QGemm and QLinearMatMul (and MatMulInteger / ConvInteger
on uint8 inputs) multiply u8 activations by s8 weights. MLAS picks the u8 x s8 kernel by CPU class:

    AMX-INT8                 tdpbusd tiles                 exact (int32 sums)
    AVX-512 VNNI, AVX-VNNI   vpdpbusd(s)                   exact
    AVX-512BW, AVX2          vpmaddubsw, then vpmaddwd     the two products of each pair of adjacent k
                             with ones                     are added in int16 with saturation

(verified under ``qemu-x86_64 -cpu Haswell``). Which weights can saturate, and how ``quant`` writes
weights that cannot, is ``qgraph.ops`` vocabulary (``PAIR_LIMIT``, ``pair_excess``, ``fit_pairs``):
passes need it too, and passes never import the runtime.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache


@lru_cache(maxsize=1)
def features() -> dict[str, bool]:
    """LLVM's host CPU features ({} when llvmlite cannot tell)."""
    try:
        import llvmlite.binding as ll
        return {k: bool(v) for k, v in ll.get_host_cpu_features().items()}
    except Exception:  # pragma: no cover - llvmlite without the host feature query
        return {}


def has(*names: str) -> bool:
    """Every feature in ``names`` is present."""
    feats = features()
    return all(feats.get(n, False) for n in names)


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo), else LLVM's name for its micro-architecture."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    try:
        import llvmlite.binding as ll
        return ll.get_host_cpu_name()
    except Exception:  # pragma: no cover
        return "unknown CPU"


#: The features the integer and bit-serial kernels care about, by the name benchmarks print.
REPORTED = {"avx2": ("avx2",), "avx512_vnni": ("avx512vnni", "avx512bw"), "amx_int8": ("amx-tile", "amx-int8"),
            "avx512_vpopcntdq": ("avx512vpopcntdq",)}


def summary() -> dict[str, bool]:
    return {name: has(*needs) for name, needs in REPORTED.items()}


# Haswell's feature list (LLVM names): with NUMBA_CPU_NAME=haswell Numba still passes the *host's*
# features to LLVM unless NUMBA_CPU_FEATURES says otherwise, so an AVX2-only build needs both.
HASWELL_FEATURES = ("+64bit,+avx,+avx2,+bmi,+bmi2,+cmov,+cx16,+cx8,+f16c,+fma,+fsgsbase,+fxsr,+invpcid,"
                    "+lzcnt,+mmx,+movbe,+pclmul,+popcnt,+rdrnd,+sahf,+sse,+sse2,+sse3,+sse4.1,+sse4.2,"
                    "+ssse3,+x87,+xsave,+xsaveopt")


def _parse_features(text: str) -> dict[str, bool]:
    out = {}
    for item in text.split(","):
        item = item.strip()
        if item[:1] in "+-" and len(item) > 1:
            out[item[1:]] = item[0] == "+"
    return out


def compile_features() -> dict[str, bool]:
    """The features Numba compiles for: ``NUMBA_CPU_FEATURES`` when set, else the host's (as Numba does)."""
    env = os.environ.get("NUMBA_CPU_FEATURES")
    if env is not None:
        return _parse_features(env)
    return features()


def _has(feats: dict, *names: str) -> bool:
    return all(feats.get(n) for n in names)


GEMM_KERNELS = ("amx", "vnni", "avx2", "plain")


def gemm_kernel(amx_granted: bool = True) -> str:
    """Our int8 GEMM micro-kernel: the best one the compile target has (AMX also needs the tile state
    granted, ``amx_granted``: ``kernels.amx`` asks Linux), or ``QGRAPH_GEMM`` (amx | vnni | avx2 |
    plain) when set. ``QGRAPH_NO_AMX`` / ``QGRAPH_NO_VNNI`` step down as before. A forced kernel the
    target lacks is an error (code for instructions the CPU does not have would crash it)."""
    feats = compile_features()
    have = {"amx": _has(feats, "amx-tile", "amx-int8") and amx_granted and not os.environ.get("QGRAPH_NO_AMX"),
            "vnni": _has(feats, "avx512vnni", "avx512bw") and not os.environ.get("QGRAPH_NO_VNNI"),
            "avx2": _has(feats, "avx2"), "plain": True}
    want = os.environ.get("QGRAPH_GEMM", "").strip().lower()
    if want:
        if want not in GEMM_KERNELS:
            raise ValueError(f"QGRAPH_GEMM={want}: expected one of {', '.join(GEMM_KERNELS)}")
        if not have[want]:
            raise ValueError(f"QGRAPH_GEMM={want}: the compile target has no "
                             f"{ {'amx': 'AMX-INT8', 'vnni': 'AVX-512 VNNI', 'avx2': 'AVX2'}[want] }")
        return want
    return next(k for k in GEMM_KERNELS if have[k])


# ----------------------------------------------------------------------------- ONNX Runtime's path

@dataclass(frozen=True)
class OrtPath:
    """The u8 x s8 kernel class ONNX Runtime's MLAS uses on a CPU."""
    name: str            # amx | avx512vnni | avxvnni | avx512bw | avx2 | sse41 | sse2 | other
    isa: str             # the instruction, for people
    saturates: bool      # int16 pair sums (``PAIR_LIMIT``)

    def describe(self) -> str:
        how = "int16 pair sums saturate" if self.saturates else "exact"
        return f"x86 {self.isa} u8s8 ({how})" if self.name != "other" else "not x86 (exact int32 sums)"


ORT_PATHS = {
    "amx": OrtPath("amx", "AMX-INT8 tdpbusd", False),
    "avx512vnni": OrtPath("avx512vnni", "AVX-512 VNNI vpdpbusd", False),
    "avxvnni": OrtPath("avxvnni", "AVX-VNNI vpdpbusd", False),
    "avx512bw": OrtPath("avx512bw", "AVX-512BW vpmaddubsw", True),
    "avx2": OrtPath("avx2", "AVX2 vpmaddubsw", True),
    "sse41": OrtPath("sse41", "SSE4.1 pmaddubsw", True),
    "sse2": OrtPath("sse2", "SSE2 pmaddwd", False),
    "other": OrtPath("other", "", False),
}


@lru_cache(maxsize=1)
def host_ort_path() -> OrtPath:
    """The path ORT's MLAS takes on this CPU (cpuid; once per process: every conv step asks, and
    ``platform.machine`` is a system call)."""
    import platform
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return ORT_PATHS["other"]
    f = features()
    if _has(f, "amx-tile", "amx-int8"):
        return ORT_PATHS["amx"]
    if _has(f, "avx512vnni", "avx512bw"):
        return ORT_PATHS["avx512vnni"]
    if _has(f, "avxvnni"):
        return ORT_PATHS["avxvnni"]
    if _has(f, "avx512bw", "avx512vl"):
        return ORT_PATHS["avx512bw"]
    if _has(f, "avx2"):
        return ORT_PATHS["avx2"]
    if _has(f, "sse4.1"):
        return ORT_PATHS["sse41"]
    return ORT_PATHS["sse2"]


def _named_ort_path() -> OrtPath | None:
    """The CPU class ``QGRAPH_ORT_PATH`` names, or None (unset or ``auto``: this CPU's)."""
    want = os.environ.get("QGRAPH_ORT_PATH", "").strip().lower()
    if not want or want == "auto":
        return None
    if want not in ORT_PATHS:
        raise ValueError(f"QGRAPH_ORT_PATH={want}: expected auto or one of {', '.join(ORT_PATHS)}")
    return ORT_PATHS[want]


def ort_path() -> OrtPath:
    """The path ORT takes here, or the one named by ``QGRAPH_ORT_PATH`` (to reproduce what ORT
    computes on another CPU class, e.g. ``avx2`` on a VNNI machine)."""
    return _named_ort_path() or host_ort_path()


#: MLAS's Softmax sum-exp kernel (``kernels/ortsoftmax.py``) on each u8 x s8 class: AMX, AVX-512 VNNI and
#: AVX-512BW CPUs have AVX-512F; AVX-VNNI (Alder Lake) and AVX2 CPUs take the FMA3 kernel; SSE-only x86
#: the generic C++ one (SSE2 build: no fma); other architectures the generic one with NEON's fused fma.
ORT_SOFTMAX = {"amx": "avx512f", "avx512vnni": "avx512f", "avx512bw": "avx512f", "avxvnni": "fma3",
               "avx2": "fma3", "sse41": "sse2", "sse2": "sse2", "other": "neon"}


def ort_softmax_kernel() -> str:
    """The float Softmax kernel ORT's MLAS takes here (``platform.cpp``: AVX-512F with the OS saving its
    state -> ``avx512f``; AVX2 and FMA3 -> ``fma3``; other x86 -> ``sse2``; not x86 -> ``neon``), or the
    one of the CPU class ``QGRAPH_ORT_PATH`` names (``avx2`` -> ``fma3``, ...)."""
    named = _named_ort_path()
    return ORT_SOFTMAX[named.name] if named is not None else _host_softmax_kernel()


@lru_cache(maxsize=1)
def _host_softmax_kernel() -> str:
    """``ort_softmax_kernel`` of this CPU (once per process: every Softmax step asks)."""
    import platform
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return "neon"
    if has("avx512f"):                 # LLVM reports avx512f only when the OS saves the zmm state (xgetbv)
        return "avx512f"
    if has("avx2", "fma"):
        return "fma3"
    return "sse2"


def describe_host() -> str:
    """One line: the CPU model and the int8 features that matter here."""
    f = features()
    flags = [label for label, key in (("AVX2", "avx2"), ("AVX-512BW", "avx512bw"), ("AVX-512 VNNI", "avx512vnni"),
                                      ("AVX-VNNI", "avxvnni"), ("AMX-INT8", "amx-int8"),
                                      ("VPOPCNTDQ", "avx512vpopcntdq")) if f.get(key)]
    return f"{cpu_name()} [{' '.join(flags) or 'no AVX2'}]"
