"""What the CPU can do, asked once: LLVM's view of the host's features (the same LLVM that compiles
the Numba kernels, so a feature it reports is one it can emit).

    has("avx512vnni")      -> bool
    summary()              -> {"avx2": True, "avx512_vnni": ..., "amx_int8": ..., "avx512_vpopcntdq": ...}

Names are LLVM's (``avx2``, ``avx512vnni``, ``avx512vpopcntdq``, ``amx-int8``, ...). A kernel that
can be turned off by an environment variable (``QGRAPH_NO_VNNI``, ...) checks that itself.
"""
from __future__ import annotations

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
