"""Element-wise quantized ops: Add / Mul with broadcasting, table lookups, Concat, requantize-only.

QLinearAdd follows ORT's MLAS kernel (float32, fused multiply-adds, round-half-to-even):

    r_a = s_a / s_c,  r_b = s_b / s_c,  k = zc - (r_a*za + r_b*zb)
    c = sat(rne(fma(a, r_a, fma(b, r_b, k))))                  both operands vectors
    c = sat(rne(fma(a, r_a, k + b*r_b)))                       b a scalar over the span (broadcast)

``fixed`` mode instead computes rescaled integers with one shared shift n (that of the larger ratio):
c = sat(zc + (((a-za)*m_a + (b-zb)*m_b + 2^(n-1)) >> n)), m = round(r * 2^n). Table ops (Sigmoid, Tanh, HardSwish,
HardSigmoid, LeakyRelu, standalone Relu/Clip) map each of the 256 codes through the float function
once at lowering time: table[q] = Q(f(DQ(q))).
"""
from __future__ import annotations

import numpy as np
from numba import njit

from qgraph.errors import ModelError
from qgraph.kernels import ortfloat
from qgraph.kernels.requant import quantize_linear
from qgraph.ops import INT_RANGES, fixed_multiplier, rescale


def _f32(v) -> np.float32:
    return np.float32(np.asarray(v, np.float32).reshape(-1)[0])


def _zp(v) -> int:
    return int(np.asarray(v).astype(np.int64).reshape(-1)[0])


def _scalar_side(a: np.ndarray, b: np.ndarray) -> str | None:
    """Which operand ORT's broadcaster feeds as a scalar per span ('a', 'b' or None)."""
    out_shape = np.broadcast_shapes(a.shape, b.shape)
    for name, t in (("a", a), ("b", b)):
        if t.size == 1:
            return name
        shape = (1,) * (len(out_shape) - t.ndim) + t.shape
        # t is a scalar per span when its trailing axes (where the other operand varies) are all 1
        last = max((i for i, d in enumerate(shape) if d != 1), default=-1)
        if last >= 0 and any(out_shape[i] != 1 for i in range(last + 1, len(out_shape))) and \
                t.shape != out_shape:
            return name
    return None


def _saturate(v: np.ndarray, dtype) -> np.ndarray:
    qmin, qmax = INT_RANGES[np.dtype(dtype).name]
    return np.clip(v, qmin, qmax).astype(dtype)


def _float_unit(op, step, args):
    """A unit ORT leaves DQ -> float Add | Mul -> Q (see ``ortfloat``)."""
    a, sa, za, b, sb, zb, sc, zc = args
    dtype = np.asarray(zc).dtype
    lo, hi = step.attrs.get("clamp", INT_RANGES[dtype.name])
    return [ortfloat.binary_unit(op, a, _f32(sa), _zp(za), b, _f32(sb), _zp(zb), _f32(sc), _zp(zc),
                                 lo, hi, dtype)]


def qlinear_add(step, args, mode):
    if mode == "float" and "ort_float" in step.attrs:
        return _float_unit("Add", step, args)
    a, sa, za, b, sb, zb, sc, zc = args
    dtype = np.asarray(zc).dtype
    za, zb, zc = _zp(za), _zp(zb), _zp(zc)
    r_a, r_b = _f32(sa) / _f32(sc), _f32(sb) / _f32(sc)
    lo, hi = step.attrs.get("clamp", INT_RANGES[dtype.name])
    if mode == "fixed":
        # one shift for both terms (that of the larger ratio), one rounding of the sum
        n = int(fixed_multiplier(max(r_a, r_b))[1][0])
        ma, mb = (int(round(float(r) * 2.0 ** n)) for r in (r_a, r_b))
        v = ((a.astype(np.int64) - za) * ma + (b.astype(np.int64) - zb) * mb + (1 << (n - 1))) >> n
        return [np.clip(v + zc, lo, hi).astype(dtype)]
    k = np.float32(np.float32(zc) - np.float32(r_a * np.float32(za) + r_b * np.float32(zb)))
    side = {"a": 1, "b": 2}.get(_scalar_side(a, b), 0)
    a_b, b_b = np.broadcast_arrays(a, b)
    out = np.empty(a_b.shape, dtype)
    _add_kernel(np.ascontiguousarray(a_b).reshape(-1), np.ascontiguousarray(b_b).reshape(-1),
                r_a, r_b, k, side, lo, hi, out.reshape(-1))
    return [out]


@njit(cache=True)
def _add_kernel(a, b, r_a, r_b, k, side, lo, hi, out):
    """float32 with fused multiply-adds, as MLAS (fma = exact float64 product and sum, one rounding)."""
    ra, rb, k64 = np.float64(r_a), np.float64(r_b), np.float64(k)
    for i in range(out.shape[0]):
        av, bv = np.float64(a[i]), np.float64(b[i])
        if side == 2:                       # b scalar over the span: k + b*r_b rounded separately
            t = np.float64(np.float32(k64 + np.float64(np.float32(bv * rb))))
            v = np.float32(av * ra + t)
        elif side == 1:
            t = np.float64(np.float32(k64 + np.float64(np.float32(av * ra))))
            v = np.float32(bv * rb + t)
        else:
            t = np.float64(np.float32(bv * rb + k64))
            v = np.float32(av * ra + t)
        q = np.rint(v)
        out[i] = min(max(q, lo), hi)


def qlinear_mul(step, args, mode):
    if mode == "float" and "ort_float" in step.attrs:
        return _float_unit("Mul", step, args)
    a, sa, za, b, sb, zb, sc, zc = args
    dtype = np.asarray(zc).dtype
    prod = (a.astype(np.int64) - _zp(za)) * (b.astype(np.int64) - _zp(zb))
    m = np.float32(_f32(sa) * _f32(sb) / _f32(sc))
    lo, hi = step.attrs.get("clamp", INT_RANGES[dtype.name])
    return [np.clip(rescale(prod, m, mode) + _zp(zc), lo, hi).astype(dtype)]


# ----------------------------------------------------------------------------- table lookups

def _hardsigmoid(x, alpha=0.2, beta=0.5):
    return np.clip(alpha * x + beta, 0.0, 1.0)


TABLE_FUNCS = {
    "Sigmoid": lambda x, at: 1.0 / (1.0 + np.exp(-x)),
    "Tanh": lambda x, at: np.tanh(x),
    "HardSigmoid": lambda x, at: _hardsigmoid(x, at.get("alpha", 0.2), at.get("beta", 0.5)),
    "HardSwish": lambda x, at: x * _hardsigmoid(x, 1.0 / 6.0, 0.5),
    "LeakyRelu": lambda x, at: np.where(x >= 0, x, at.get("alpha", 0.01) * x),
    "Relu": lambda x, at: np.maximum(x, 0.0),
    "Clip": lambda x, at: np.clip(x, at.get("min", -np.inf), at.get("max", np.inf)),
}


def build_table(op: str, attrs: dict, sx, zx, in_dtype, sy, zy, out_dtype) -> np.ndarray:
    """table[q - qmin_in] = Q_y(f(DQ_x(q))) for every code q of the input type (8-bit only)."""
    in_name = np.dtype(in_dtype).name
    if in_name not in ("int8", "uint8"):
        raise ModelError(f"table lookup over {in_name} inputs is not supported (8-bit only)")
    qmin, qmax = INT_RANGES[in_name]
    codes = np.arange(qmin, qmax + 1, dtype=np.int64)
    x = ((codes - _zp(zx)).astype(np.float32) * _f32(sx)).astype(np.float32)
    y = TABLE_FUNCS[op](x, attrs).astype(np.float32)
    omin, omax = INT_RANGES[np.dtype(out_dtype).name]
    return quantize_linear(y, _f32(sy), _zp(zy), omin, omax).astype(out_dtype)


def lookup(step, args, mode):
    x, table = args[0], args[1]
    qmin = INT_RANGES[x.dtype.name][0]
    return [table[x.astype(np.int64) - qmin]]


# ----------------------------------------------------------------------------- scale changes

def requantize_tensor(x, sx, zx, sy, zy, mode, dtype):
    """Same values, new (scale, zero point).

    float: as ORT computes DequantizeLinear then QuantizeLinear (a DQ -> data movement -> Q unit it
    leaves unfused, Dropout removed between them, and QLinearConcat's per-input lookup table alike):
    y = sat(rne(float32(float32(x - zx) * sx) / sy) + zy), the division by sy as MLAS's quantize
    kernel. One multiplication by float32(sx / sy) rounds differently on about 1 in 200 values.
    fixed: y = sat(zy + rescale(x - zx, sx / sy)) (integer multiplier and shift)."""
    d = x.astype(np.int64) - _zp(zx)
    if mode == "float":
        v = (d.astype(np.float32) * _f32(sx)).astype(np.float32) / _f32(sy)
        return _saturate(np.rint(v).astype(np.int64) + _zp(zy), dtype)
    m = np.float32(_f32(sx) / _f32(sy))
    return _saturate(rescale(d, m, mode) + _zp(zy), dtype)


def requant_step(step, args, mode):
    x, sx, zx, sy, zy = args
    return [requantize_tensor(x, sx, zx, sy, zy, mode, np.asarray(zy).dtype)]


def qlinear_concat(step, args, mode):
    """com.microsoft QLinearConcat: inputs Y_scale, Y_zp, then (X, X_scale, X_zp) per input."""
    sy, zy = args[0], args[1]
    dtype = np.asarray(zy).dtype
    parts = []
    for i in range(2, len(args), 3):
        x, sx, zx = args[i:i + 3]
        same = _f32(sx) == _f32(sy) and _zp(zx) == _zp(zy)
        parts.append(x if same else requantize_tensor(x, sx, zx, sy, zy, mode, dtype))
    return [np.concatenate(parts, axis=int(step.attrs.get("axis", 0)))]


KERNELS = {"QLinearAdd": qlinear_add, "QLinearMul": qlinear_mul, "Lookup": lookup,
           "Requantize": requant_step, "QLinearConcat": qlinear_concat}
