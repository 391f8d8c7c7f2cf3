"""ONNX Runtime 1.32's float Softmax, operation for operation, in the kernel order MLAS picks on the CPU.

ORT's ``Softmax<float>`` (axis moved last, rows of length D) calls ``MlasComputeSoftmax``
(``mlas/lib/compute.cpp``), which per row takes the maximum (``ReduceMaximumF32Kernel``: exact in any
order), ``-max``, then ``ComputeSumExpF32Kernel`` (each e_i and their sum) and ``y_i = e_i * (1.0f / sum)``
(``ComputeSoftmaxOutputF32Kernel``: a multiply by the reciprocal on every path). MLAS's platform table
(``platform.cpp``) picks the sum-exp kernel by cpuid, and the kernels differ in the exp's lower clamp,
its 2^m reconstruction and the order of the sum:

``avx512f`` (AVX-512F and the OS saving zmm state: Skylake-SP and later, Zen 4/5):
    ``MlasComputeSumExpF32KernelAvx512F`` (``TransKernelAvx512F.S``): x = max(x_i + (-max), -103.97...)
    (``LowerRange``); m = fma(x, 1/ln2, 1.5*2^23) - 1.5*2^23 (round to nearest); r = fma(m, -ln2_hi, x);
    r = fma(m, -ln2_lo, r); p = poly_0, then p = fma(p, r, c) for poly_1 .. poly_4, poly_56, poly_56;
    e = vscalefps(p, m) = p * 2^m (one rounding, subnormals kept).
    Sum: 16 float32 lanes, lane j adding e_j, e_{j+16}, ... in order (the 48-wide loop adds its three
    vectors in turn, the masked 16-wide tail likewise); then lanes j and j + 8 added, two vhaddps and
    a scalar add: ((a0 + a1) + (a2 + a3)) + ((a4 + a5) + (a6 + a7)).
``fma3`` (AVX2 and FMA3 without AVX-512F: Haswell .. Coffee Lake, Alder Lake, AMD Zen 1-3):
    ``MlasComputeSumExpF32KernelFma3`` (``TransKernelFma3.S``): x = max(x_i + (-max), -88.376...)
    (``LowerRangeSumExp``); m, r and p as above; the scale is built in the integer unit,
    bits((biased << 23) + 0x3F800000) = 2^m for m >= -126 (m = -127 at the clamp gives the bit pattern
    0: e = 0), e = p * scale (one rounding). Sum: 8 float32 lanes, lane j adding e_j, e_{j+8}, ... in
    order (24-wide loop, 8-wide loop, masked tail with zeros); two vhaddps, vextractf128 and vaddss:
    ((a0 + a1) + (a2 + a3)) + ((a4 + a5) + (a6 + a7)).
``sse2`` (x86-64 without AVX2/FMA3: ORT's generic C++ kernel, built for SSE2):
    ``MlasComputeSumExpF32Kernel`` with ``MlasMultiplyAddFloat32x4`` = mulps then addps (two roundings
    wherever the above has an fma), the same clamp and integer scale as ``fma3``; 4 lanes over the
    first 4 * (D // 4) elements, reduced (a0 + a2) + (a1 + a3) (shuffle 2,3,2,3 then 1,1,1,1), then
    the D % 4 tail added one by one to that scalar. Measured bit for bit against ORT under
    ``qemu-x86_64 -cpu SandyBridge`` (AVX without AVX2/FMA3: MLAS keeps the generic sum-exp kernel) and
    ``-cpu Nehalem`` (SSE4.2).
``neon`` (not x86: the same generic kernel, its fma fused: ``vfmaq_f32`` on aarch64; lanes reduced by
    two ``vpaddq``: (a0 + a1) + (a2 + a3)). Not measured either (no ARM machine here).

``kernels.cpu.ort_softmax_kernel()`` says which one ORT takes here (``QGRAPH_ORT_PATH`` names another
CPU class); ``softmax(x, axis, opset, kernel=None)`` uses it. ``softmax_reference`` is the same arithmetic
vectorized with numpy over whole rows (the tests hold the two equal per kernel, and the kernel MLAS runs
equal to ORT: natively on AVX-512F, under ``qemu-x86_64 -cpu Haswell`` for ``fma3``, ``-cpu SandyBridge``
and ``-cpu Nehalem`` for ``sse2``).
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit

from qgraph.kernels.ortfloat import fma, fma32

F32 = np.float32
#: ``MlasExpConstants`` (compute.cpp), as float32
LOWER_RANGE = F32(-103.9720840454)
LOWER_RANGE_SUMEXP = F32(-88.3762626647949)
ROUNDING_BIAS = F32(12582912.0)
LOG2_RECIPROCAL = F32(1.44269504088896341)
LOG2_HIGH = F32(-6.93145752e-1)
LOG2_LOW = F32(-1.42860677e-6)
POLY = np.array([float.fromhex(h) for h in ("0x1.694000p-10", "0x1.125edcp-7", "0x1.555b5ap-5",
                                             "0x1.555450p-3", "0x1.fffff6p-2", "0x1.000000p+0",
                                             "0x1.000000p+0")], F32)
#: MLAS's sum-exp kernels, by the name ``kernels.cpu.ort_softmax_kernel`` returns
KERNELS = ("avx512f", "fma3", "sse2", "neon")
_CODE = {k: i for i, k in enumerate(KERNELS)}
LANES = {"avx512f": 16, "fma3": 8, "sse2": 4, "neon": 4}


@njit(cache=True)
def _madd(a, b, c, fused):
    """``MlasMultiplyAddFloat32x4``: fma (FMA3 / AVX-512F / NEON) or mulps then addps (SSE2)."""
    if fused:
        return fma32(a, b, c)
    return F32(F32(a * b) + c)


@njit(cache=True)
def _exp_mlas(v, poly, code):
    fused = code != 2
    x = max(LOWER_RANGE if code == 0 else LOWER_RANGE_SUMEXP, v)
    m = F32(_madd(x, LOG2_RECIPROCAL, ROUNDING_BIAS, fused) - ROUNDING_BIAS)
    r = _madd(m, LOG2_HIGH, x, fused)
    r = _madd(m, LOG2_LOW, r, fused)
    p = poly[0]
    for j in range(1, poly.shape[0]):
        p = _madd(p, r, poly[j], fused)
    k = int(m)
    if code == 0 or k >= -126:                  # vscalefps, or the integer scale 2^m exactly: one rounding
        return F32(math.ldexp(np.float64(p), k))
    if k == -127:                               # exponent field 0: the scale is +0.0
        return F32(0.0)
    return F32(-np.inf)                         # bit pattern 0xFF800000 (not reached: the clamp keeps m >= -127)


@njit(cache=True)
def _softmax_rows(x, poly, code, out):
    rows, d = x.shape
    lanes = 16 if code == 0 else (8 if code == 1 else 4)
    acc = np.empty(lanes, np.float32)
    for r in range(rows):
        mx = x[r, 0]
        for i in range(1, d):
            if x[r, i] > mx:
                mx = x[r, i]
        neg = F32(-mx)
        acc[:] = F32(0.0)
        vec = d if code < 2 else (d // 4) * 4   # the generic kernel: 4-lane vectors, then a scalar tail
        for i in range(vec):
            e = _exp_mlas(F32(x[r, i] + neg), poly, code)
            out[r, i] = e
            acc[i % lanes] = F32(acc[i % lanes] + e)
        if code == 0:
            h0 = F32(acc[8] + acc[0])
            h1 = F32(acc[9] + acc[1])
            h2 = F32(acc[10] + acc[2])
            h3 = F32(acc[11] + acc[3])
            h4 = F32(acc[12] + acc[4])
            h5 = F32(acc[13] + acc[5])
            h6 = F32(acc[14] + acc[6])
            h7 = F32(acc[15] + acc[7])
            s = F32(F32(F32(h0 + h1) + F32(h2 + h3)) + F32(F32(h4 + h5) + F32(h6 + h7)))
        elif code == 1:
            s = F32(F32(F32(acc[0] + acc[1]) + F32(acc[2] + acc[3]))
                    + F32(F32(acc[4] + acc[5]) + F32(acc[6] + acc[7])))
        else:
            s = F32(0.0)
            if d >= 4:
                if code == 2:
                    s = F32(F32(acc[0] + acc[2]) + F32(acc[1] + acc[3]))
                else:
                    s = F32(F32(acc[0] + acc[1]) + F32(acc[2] + acc[3]))
            for i in range(vec, d):
                e = _exp_mlas(F32(x[r, i] + neg), poly, code)
                out[r, i] = e
                s = F32(s + e)
        scale = F32(F32(1.0) / s)
        for i in range(d):
            out[r, i] = F32(out[r, i] * scale)


def _rows(x: np.ndarray, axis: int, opset: int) -> tuple[np.ndarray, callable]:
    """x as contiguous (rows, D) float32 and the function that puts rows back in x's layout."""
    x = np.asarray(x, F32)
    axis %= x.ndim
    if opset < 13:                                   # coerced to 2-D at the axis
        return np.ascontiguousarray(x.reshape(int(np.prod(x.shape[:axis], dtype=np.int64)), -1)), \
            lambda y: y.reshape(x.shape)
    moved = np.moveaxis(x, axis, -1)
    return np.ascontiguousarray(moved.reshape(-1, x.shape[axis])), \
        lambda y: np.moveaxis(y.reshape(moved.shape), -1, axis)


def _kernel(kernel: str | None) -> str:
    if kernel is None:
        from qgraph.kernels.cpu import ort_softmax_kernel
        kernel = ort_softmax_kernel()
    if kernel not in _CODE:
        raise ValueError(f"softmax kernel {kernel!r}: expected one of {', '.join(KERNELS)}")
    return kernel


def softmax(x: np.ndarray, axis: int = -1, opset: int = 13, kernel: str | None = None) -> np.ndarray:
    """Softmax of float32 ``x`` along ``axis`` as ORT 1.32's CPU kernel computes it with MLAS's
    ``kernel`` (default: the one ORT takes on this CPU, ``kernels.cpu.ort_softmax_kernel()``)."""
    code = _CODE[_kernel(kernel)]
    rows, back = _rows(x, axis, opset)
    out = np.empty_like(rows)
    if rows.size:
        _softmax_rows(rows, POLY, code, out)
    return back(out)


def _madd_ref(a, b, c, fused):
    if fused:
        return fma(a, b, c).reshape(np.broadcast_shapes(np.shape(a), np.shape(b), np.shape(c)))
    return ((np.asarray(a, F32) * b).astype(F32) + c).astype(F32)


def _exp_reference(v: np.ndarray, kernel: str) -> np.ndarray:
    fused = kernel != "sse2"
    v = np.maximum(LOWER_RANGE if kernel == "avx512f" else LOWER_RANGE_SUMEXP, v).astype(F32)
    m = (_madd_ref(v, LOG2_RECIPROCAL, ROUNDING_BIAS, fused) - ROUNDING_BIAS).astype(F32)
    r = _madd_ref(m, LOG2_LOW, _madd_ref(m, LOG2_HIGH, v, fused), fused)
    p = np.full(v.shape, POLY[0], F32)
    for c in POLY[1:]:
        p = _madd_ref(p, r, c, fused)
    k = m.astype(np.int64)
    e = np.ldexp(p.astype(np.float64), k).astype(F32)
    if kernel != "avx512f":                          # the integer scale: bit pattern 0 at m = -127
        e = np.where(k >= -126, e, np.where(k == -127, F32(0.0), F32(-np.inf))).astype(F32)
    return e


def softmax_reference(x: np.ndarray, axis: int = -1, opset: int = 13, kernel: str | None = None) -> np.ndarray:
    """The arithmetic of ``softmax`` with numpy over whole rows (fma: ``ortfloat.fma``, one rounding)."""
    kernel = _kernel(kernel)
    rows, back = _rows(x, axis, opset)
    n, d = rows.shape
    e = _exp_reference((rows + (-rows.max(axis=1, keepdims=True))).astype(F32), kernel)
    lanes = LANES[kernel]
    vec = d if kernel in ("avx512f", "fma3") else (d // 4) * 4
    acc = np.zeros((n, lanes), F32)
    for k in range(0, vec, lanes):                   # a masked tail adds nothing in its unused lanes
        w = min(lanes, vec - k)
        acc[:, :w] = (acc[:, :w] + e[:, k:k + w]).astype(F32)
    add = lambda a, b: (a + b).astype(F32)           # noqa: E731
    if kernel == "avx512f":
        h = add(acc[:, 8:], acc[:, :8])
        s = add(add(add(h[:, 0], h[:, 1]), add(h[:, 2], h[:, 3])), add(add(h[:, 4], h[:, 5]), add(h[:, 6], h[:, 7])))
    elif kernel == "fma3":
        a = acc
        s = add(add(add(a[:, 0], a[:, 1]), add(a[:, 2], a[:, 3])), add(add(a[:, 4], a[:, 5]), add(a[:, 6], a[:, 7])))
    else:
        a = acc
        s = np.zeros(n, F32)
        if d >= 4:
            s = add(add(a[:, 0], a[:, 2]), add(a[:, 1], a[:, 3])) if kernel == "sse2" else \
                add(add(a[:, 0], a[:, 1]), add(a[:, 2], a[:, 3]))
        for i in range(vec, d):
            s = add(s, e[:, i])
    scale = (F32(1.0) / s).astype(F32)
    return back((e * scale[:, None]).astype(F32))
