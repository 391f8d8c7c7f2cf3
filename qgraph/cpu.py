"""The CPU we run on, and the one fact about ONNX Runtime's x86 int8 kernels that changes results.

What the CPU offers is read here and nowhere else: ``host_features`` is the silicon (what ONNX
Runtime's MLAS dispatches on, through cpuid), ``compile_features`` is what Numba compiles our kernels
for (the host, or ``NUMBA_CPU_NAME`` / ``NUMBA_CPU_FEATURES`` when set, e.g. to build AVX2-only code
on an AVX-512 machine), and ``gemm_kernel`` picks our int8 GEMM micro-kernel from the latter.

ONNX Runtime on x86-64 stores every int8 activation of a fused QDQ unit as uint8
(``QDQS8ToU8Transformer``), so QLinearConv, QGemm and QLinearMatMul (and MatMulInteger / ConvInteger
on uint8 inputs) multiply u8 activations by s8 weights. MLAS picks the u8 x s8 kernel by CPU class:

    AMX-INT8                 tdpbusd tiles                 exact (int32 sums)
    AVX-512 VNNI, AVX-VNNI   vpdpbusd(s)                   exact
    AVX-512BW, AVX2          vpmaddubsw, then vpmaddwd     the two products of each pair of adjacent k
                             with ones                     (k = 2j, 2j+1 in the GEMM's K order) are
                                                           added in int16 with saturation:
                                 acc += sat16(a[2j] * w[2j] + a[2j+1] * w[2j+1])

(verified under ``qemu-x86_64 -cpu Haswell``: MatMulInteger u8 x s8 equals this pair-saturated sum
on every element; s8 x s8 and u8 x u8 are exact there, as is the depthwise kernel, which widens to
int32 first). K order: a MatMul's / Gemm's K; a convolution's im2col k = (i*KW + j)*Cin_g + c, the
channels of one kernel tap consecutive (MLAS's NHWC im2col and its symmetric-conv packing agree).

A u8 activation is anything in 0..255, so a pair can saturate exactly when its weights have the same
sign and 255 * (|w0| + |w1|) leaves int16: |w0| + |w1| > ``PAIR_LIMIT`` = 128 (255 * 128 = 32640 fits
both ways; 255 * 129 = 32895 does not). Weights with no such pair compute the same integers on every
CPU class; ``pair_excess`` finds the pairs, ``fit_pairs`` moves a weight tensor onto that set.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import numpy as np

PAIR_LIMIT = 128          # same-sign |w0| + |w1| of an adjacent pair that 255 * (.) keeps inside int16

# Haswell's feature list (LLVM names): with NUMBA_CPU_NAME=haswell Numba still passes the *host's*
# features to LLVM unless NUMBA_CPU_FEATURES says otherwise, so an AVX2-only build needs both.
HASWELL_FEATURES = ("+64bit,+avx,+avx2,+bmi,+bmi2,+cmov,+cx16,+cx8,+f16c,+fma,+fsgsbase,+fxsr,+invpcid,"
                    "+lzcnt,+mmx,+movbe,+pclmul,+popcnt,+rdrnd,+sahf,+sse,+sse2,+sse3,+sse4.1,+sse4.2,"
                    "+ssse3,+x87,+xsave,+xsaveopt")


def _llvm_host_features() -> dict[str, bool]:
    try:
        import llvmlite.binding as ll
        return dict(ll.get_host_cpu_features())
    except Exception:  # pragma: no cover - llvmlite without a host feature query (non-x86 builds)
        return {}


@functools.lru_cache(maxsize=None)
def host_features() -> dict[str, bool]:
    """LLVM's names of the features this CPU has (cpuid), e.g. {"avx2": True, "avx512vnni": False}."""
    return _llvm_host_features()


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
    return host_features()


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


def host_ort_path() -> OrtPath:
    """The path ORT's MLAS takes on this CPU (cpuid)."""
    import platform
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return ORT_PATHS["other"]
    f = host_features()
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


def ort_path() -> OrtPath:
    """The path ORT takes here, or the one named by ``QGRAPH_ORT_PATH`` (to reproduce what ORT
    computes on another CPU class, e.g. ``avx2`` on a VNNI machine)."""
    want = os.environ.get("QGRAPH_ORT_PATH", "").strip().lower()
    if want and want != "auto":
        if want not in ORT_PATHS:
            raise ValueError(f"QGRAPH_ORT_PATH={want}: expected auto or one of {', '.join(ORT_PATHS)}")
        return ORT_PATHS[want]
    return host_ort_path()


def describe_host() -> str:
    """One line: the CPU model and the int8 features that matter here."""
    model = ""
    try:
        with open("/proc/cpuinfo") as fh:
            model = next((ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")), "")
    except OSError:
        pass
    f = host_features()
    flags = [label for label, key in (("AVX2", "avx2"), ("AVX-512BW", "avx512bw"), ("AVX-512 VNNI", "avx512vnni"),
                                      ("AVX-VNNI", "avxvnni"), ("AMX-INT8", "amx-int8"),
                                      ("VPOPCNTDQ", "avx512vpopcntdq")) if f.get(key)]
    import platform
    return f"{model or platform.processor() or platform.machine()} [{' '.join(flags) or 'no AVX2'}]"


# ----------------------------------------------------------------------------- weights and pairs

def ort_k_rows(w: np.ndarray, op: str, trans_b: int = 0) -> np.ndarray:
    """The weights of a Conv (``[Cout, Cin_g, KH, KW]``, any rank >= 3), Gemm or MatMul (``[K, N]``,
    ``[N, K]`` for Gemm transB=1) as rows [N, K] in ORT's K order (a view or a copy)."""
    w = np.asarray(w)
    if op in ("Conv", "ConvInteger", "QLinearConv"):
        return np.moveaxis(w, 1, -1).reshape(w.shape[0], -1)          # k = (taps..., c)
    if op in ("Gemm", "QGemm") and trans_b:
        return w.reshape(w.shape[0], -1)
    return np.swapaxes(w, -1, -2).reshape(-1, w.shape[-2])             # [..., K, N] -> [... * N, K]


def pair_excess(rows: np.ndarray) -> np.ndarray:
    """Per row of integer weights in ORT's K order: the largest same-sign |w0| + |w1| over adjacent
    pairs (k = 2j, 2j+1), minus ``PAIR_LIMIT``; > 0 where an AVX2 / AVX-512BW CPU can saturate."""
    r = np.asarray(rows, np.int32)
    if r.shape[1] % 2:
        r = np.concatenate([r, np.zeros((r.shape[0], 1), np.int32)], axis=1)
    a, b = r[:, 0::2], r[:, 1::2]
    pos = np.maximum(a, 0) + np.maximum(b, 0)
    neg = np.maximum(-a, 0) + np.maximum(-b, 0)
    worst = np.maximum(pos, neg).max(axis=1, initial=0)
    return worst - PAIR_LIMIT


def pairs_in_int16(op: str, w_shape, group: int = 1) -> bool:
    """Whether MLAS runs this layer through a kernel with int16 pair sums on such CPUs: every u8 x s8
    GEMM and convolution except a depthwise one (one input and one output channel per group: its
    kernel widens to int32 first, exact on every class; a channel multiplier > 1 goes through GEMM)."""
    if op in ("Conv", "ConvInteger", "QLinearConv") and group > 1 and w_shape[1] == 1 and w_shape[0] == group:
        return False
    return True


def can_saturate(w: np.ndarray, op: str, trans_b: int = 0, group: int = 1) -> bool:
    """Whether u8 activations times these int8 weights can leave int16 in some pair sum."""
    if not pairs_in_int16(op, np.shape(w), group):
        return False
    return bool(np.any(pair_excess(ort_k_rows(w, op, trans_b)) > 0))


def fit_pair_rows(rows: np.ndarray, target: np.ndarray, limit: int = 127) -> tuple[np.ndarray, int]:
    """Integer rows [N, K] (ORT's K order) with every same-sign adjacent pair whose magnitudes sum past
    ``PAIR_LIMIT`` moved onto that limit, at the integer point of |q0| + |q1| = limit closest to the
    pair's unrounded values ``target`` (same shape): the least squared change that makes the pair exact
    on every CPU class. ``limit``: the largest magnitude a code may take. Returns (rows, pairs moved)."""
    rows = np.asarray(rows, np.int64)
    n, k = rows.shape
    tgt = np.asarray(target, np.float64)
    if k % 2:
        rows = np.concatenate([rows, np.zeros((n, 1), np.int64)], axis=1)
        tgt = np.concatenate([tgt, np.zeros((n, 1))], axis=1)
    a, b = rows[:, 0::2], rows[:, 1::2]
    bad = (a * b >= 0) & (np.abs(a) + np.abs(b) > PAIR_LIMIT)
    if not bad.any():
        return rows[:, :k], 0
    sign = np.where(a + b >= 0, 1, -1)
    # on |a| + |b| = L with a, b of one sign: a = sign*x, b = sign*(L - x), x nearest the targets' projection
    x = np.rint((np.abs(tgt[:, 0::2]) - np.abs(tgt[:, 1::2]) + PAIR_LIMIT) / 2)
    x = np.clip(x, PAIR_LIMIT - limit, limit)
    out = rows.copy()
    out[:, 0::2] = np.where(bad, sign * x, a)
    out[:, 1::2] = np.where(bad, sign * (PAIR_LIMIT - x), b)
    return out[:, :k], int(bad.sum())


def fit_pairs(q: np.ndarray, target: np.ndarray, op: str, trans_b: int = 0, qmin: int = -128,
              qmax: int = 127) -> tuple[np.ndarray, int]:
    """``fit_pair_rows`` on a weight tensor as the layer ``op`` reads it (``ort_k_rows``); ``q`` int8
    codes, ``target`` = w / s + z of the same shape. Returns (codes, pairs moved)."""
    q = np.asarray(q)
    rows, moved = fit_pair_rows(ort_k_rows(q, op, trans_b), ort_k_rows(np.asarray(target, np.float64), op, trans_b),
                                min(qmax, -qmin))
    if not moved:
        return q, 0
    return _from_k_rows(rows.astype(q.dtype), q.shape, op, trans_b), moved


def _from_k_rows(rows: np.ndarray, shape, op: str, trans_b: int) -> np.ndarray:
    if op in ("Conv", "ConvInteger", "QLinearConv"):
        moved = (shape[0],) + tuple(shape[2:]) + (shape[1],)
        return np.ascontiguousarray(np.moveaxis(rows.reshape(moved), -1, 1))
    if op in ("Gemm", "QGemm") and trans_b:
        return np.ascontiguousarray(rows.reshape(shape))
    return np.ascontiguousarray(np.swapaxes(rows.reshape(tuple(shape[:-2]) + (shape[-1], shape[-2])), -1, -2))
