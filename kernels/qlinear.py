"""Runtime implementations of the quantized linear ops (QOperator semantics, as ONNX defines them).

Each function takes the step (for attributes and its weight cache), the argument arrays in ONNX input
order (None for an absent optional input) and the requantization mode, and returns the outputs.
Lowered QDQ groups become these same steps (``lower.py``), so there is one implementation per op.
"""
from __future__ import annotations

import numpy as np

from qgraph.kernels import cpu
from qgraph.errors import ModelError
from qgraph.kernels import bitconv, bitplanes, bitserial, ortfloat, ortsat
from qgraph.kernels.conv import pack_conv, conv_int
from qgraph.kernels.gemm import pack_b, qgemm
from qgraph.kernels.requant import output_scale, quantize_linear, requantize_into
from qgraph.ops import INT_RANGES, can_saturate, conv_geometry, dequantize_array, fixed_multiplier


def int_dtype_name(a: np.ndarray) -> str:
    name = np.asarray(a).dtype.name
    return {"int4": "int4", "uint4": "uint4"}.get(name, name)


def _zp(z, dtype=np.int64) -> np.ndarray:
    return np.zeros(1, dtype) if z is None else np.asarray(z).astype(dtype).reshape(-1)


def _f32(v) -> np.float32:
    return np.float32(np.asarray(v, np.float32).reshape(-1)[0])


def _scalar(z) -> int:
    z = _zp(z)
    if z.size != 1:
        raise ModelError(f"expected a per-tensor zero point, got {z.size} values")
    return int(z[0])


def _cached(step, key: str, src: np.ndarray, build):
    """Pack weights once per step when they are the same array object (constants are)."""
    hit = step.cache.get(key)
    if hit is not None and hit[0] is src:
        return hit[1]
    val = build()
    step.cache[key] = (src, val)
    return val


def _ort_saturates(step, mode, act_dtype, w, op: str, group: int = 1) -> bool:
    """``float`` mode reproduces ORT: on a CPU whose u8 x s8 kernels add pairs in int16
    (``cpu.ort_path``), a step ORT runs as u8 activations x int8 weights whose weights have a pair
    that can leave int16 is computed as ORT does (``ortsat``). ``ort_act``: the type ORT stores the
    activation of a lowered QDQ group as (``lower``); a QOperator step's own dtype otherwise."""
    if mode != "float" or not cpu.ort_path().saturates or np.asarray(w).dtype != np.int8:
        return False
    if step.attrs.get("ort_act", np.dtype(act_dtype).name) != "uint8" or step.attrs.get("ort_b", "int8") != "int8":
        return False
    return _cached(step, f"sat:{op}", w, lambda: can_saturate(w, op, group=group))


def _bounds(step, zy) -> tuple[int, int]:
    qmin, qmax = INT_RANGES[int_dtype_name(zy)]
    lo, hi = step.attrs.get("clamp", (qmin, qmax))   # Relu/Clip folded into the output clamp
    return max(qmin, lo), min(qmax, hi)


def _requant_out(step, acc3, sx, sw, sy, zy, mode):
    qmin, qmax = _bounds(step, zy)
    return requantize_into(acc3, output_scale(sx, sw, sy), _scalar(zy), qmin, qmax, mode,
                           np.asarray(zy).dtype)


# ----------------------------------------------------------------------------- convolution

def _bitserial_input(step, x, zx, bits, k: int, padded: bool):
    """The activation's bit-plane encoding when this step runs bit-serially on ``x`` (the step's
    ``kernel``, set by the lowering, and ``bitserial.use_bitserial``), else None. What ran is noted
    in ``step.cache["ran"]``."""
    kernel = step.attrs.get("kernel", "int8")
    if kernel == "int8" or bits is None:
        step.cache["ran"] = "int8"
        return None
    enc = bitplanes.input_encoding(x, zx, padded)
    if bitserial.use_bitserial(kernel, bits.enc, enc, k):
        step.cache["ran"] = f"bitserial W {bits.enc.label()} x A {enc.label()}"
        return enc
    step.cache["ran"] = "int8"
    return None


def _conv_acc(step, x, zx, w, zw, mode="fixed"):
    geo = conv_geometry(step.attrs, w.shape, x.shape[2:])
    if _ort_saturates(step, mode, x.dtype, w, "Conv", geo.group):
        acc = ortsat.conv_acc(x if x.ndim == 4 else x[:, :, None, :], zx, w, _zp(zw), geo)
        return acc if x.ndim == 4 else np.ascontiguousarray(acc[:, :, 0, :])
    bits = _cached(step, "bits", w, lambda: bitconv.pack_conv(w, geo.group)) \
        if step.attrs.get("kernel", "int8") != "int8" else None
    enc = _bitserial_input(step, x, zx, bits, int(np.prod(w.shape[1:])), any(geo.pads))
    if enc is not None:
        acc = bitconv.conv(x, zx, bits, _zp(zw), geo, enc=enc)
    else:
        pc = _cached(step, "w", w, lambda: pack_conv(w, geo.group))
        acc = conv_int(x, zx, pc, _zp(zw), geo)
    return acc if x.ndim == 4 else np.ascontiguousarray(acc[:, :, 0, :])


def _conv_plan(step, args, mode, x):
    """What a QLinearConv step derives from its constant inputs (packed weights, geometry, output
    scales, bounds), built once per step, mode and input shape: the inputs after x are the Program's
    constants, so the same array objects mean nothing changed."""
    key = (mode, x.shape[1:], x.dtype.str, cpu.ort_path().name)
    hit = step.cache.get("plan")
    if hit is not None and hit[0] == key and len(hit[1]) == len(args) - 1 \
            and all(a is b for a, b in zip(hit[1], args[1:])):
        return hit[2]
    _, sx, zx, w, sw, zw, sy, zy = args[:8]
    bias = args[8] if len(args) > 8 else None
    qmin, qmax = _bounds(step, zy)
    if mode == "float" and "ort_float" in step.attrs:        # a unit ORT leaves DQ -> Conv -> Q
        w_f = ortfloat.dequantize_weights(w, sw, _zp(zw))
        plan = ("float", w_f, _f32(sx), _scalar(zx), step.attrs["ort_float"].get("bias"), _f32(sy), _scalar(zy),
                qmin, qmax, np.asarray(zy).dtype)
    elif _ort_saturates(step, mode, x.dtype, w, "Conv", int(step.attrs.get("group", 1))):   # int16 pair sums
        geo = conv_geometry(step.attrs, w.shape, x.shape[2:])
        b = np.zeros(w.shape[0], np.int32) if bias is None else np.asarray(bias, np.int32).reshape(-1)
        plan = ("sat", geo, w, _scalar(zx), _zp(zw), b, output_scale(sx, sw, sy), _scalar(zy), qmin, qmax,
                np.asarray(zy).dtype)
    else:
        geo = conv_geometry(step.attrs, w.shape, x.shape[2:])
        kernel = step.attrs.get("kernel", "int8")
        pc = pack_conv(w, geo.group) if kernel != "bitserial" else None
        bits = bitconv.pack_conv(w, geo.group) if kernel != "int8" else None
        cout = w.shape[0]
        scale = np.ascontiguousarray(np.broadcast_to(output_scale(sx, sw, sy), (cout,)))
        mult, shift = fixed_multiplier(scale) if mode == "fixed" else (np.zeros(cout, np.int64),
                                                                        np.ones(cout, np.int64))
        b = np.zeros(cout, np.int32) if bias is None else np.asarray(bias, np.int32).reshape(-1).copy()
        rq = (b, scale, mult, shift, _scalar(zy), qmin, qmax, mode == "fixed")
        plan = ("int", geo, pc, _scalar(zx), _zp(zw), rq, np.asarray(zy).dtype, bits, int(np.prod(w.shape[1:])))
    step.cache["plan"] = (key, list(args[1:]), plan)
    return plan


def qlinear_conv(step, args, mode):
    x = args[0]
    plan = _conv_plan(step, args, mode, x)
    if plan[0] == "float":
        _, w_f, sx, zx, bias_f, sy, zy, qmin, qmax, dtype = plan
        return [ortfloat.conv_unit(step, x, sx, zx, w_f, bias_f, sy, zy, qmin, qmax, dtype)]
    if plan[0] == "sat":
        _, geo, w, zx, zw, b, scale, zy, qmin, qmax, dtype = plan
        acc = ortsat.conv_acc(x if x.ndim == 4 else x[:, :, None, :], zx, w, zw, geo)
        acc3 = acc.reshape(acc.shape[0], acc.shape[1], -1) + b.reshape(1, -1, 1)
        out = requantize_into(acc3, scale, zy, qmin, qmax, "float", dtype).reshape(acc.shape)
        return [out if x.ndim == 4 else np.ascontiguousarray(out[:, :, 0, :])]
    _, geo, pc, zx, zw, rq, dtype, bits, k = plan
    if bits is not None and "bit_ran" in step.cache:     # as last time: one compiled call checks x's encoding too
        out = bitconv.conv_again(x, bits, zw, rq)
        if out is not None:
            step.cache["ran"] = step.cache["bit_ran"]
            return [out]
    enc = _bitserial_input(step, x, zx, bits, k, any(geo.pads))
    if enc is not None:     # the same int32 accumulators, the same requantization arithmetic
        out = bitconv.conv(x, zx, bits, zw, geo, rq=rq, out_dtype=dtype, enc=enc)
        step.cache["bit_ran"] = step.cache["ran"]
    else:
        out = conv_int(x, zx, pc, zw, geo, rq=rq, out_dtype=dtype)   # requantized in the conv's epilogue
    return [out if x.ndim == 4 else np.ascontiguousarray(out[:, :, 0, :])]


def conv_integer(step, args, mode):
    x, w = args[0], args[1]
    zx = args[2] if len(args) > 2 else None
    zw = args[3] if len(args) > 3 else None
    return [_conv_acc(step, x, _scalar(zx), w, zw, mode)]


# ----------------------------------------------------------------------------- matmul

def _matmul_acc(step, a, za, b, zb, mode="fixed"):
    """Batched (A - za) @ (B - zb) -> int32, numpy broadcasting over leading axes."""
    za = _zp(za)
    zb = _zp(zb)
    if b.ndim == 2 and za.size == 1 and _ort_saturates(step, mode, a.dtype, b, "MatMul"):
        return ortsat.matmul_acc(a.reshape(-1, a.shape[-1]), za, b, zb).reshape(*a.shape[:-1], b.shape[-1])
    if b.ndim == 2:
        if za.size > 1 and a.ndim > 2:
            raise ModelError(f"{step.name}: per-row a_zero_point with batched A is not supported")
        a2 = a.reshape(-1, a.shape[-1])
        bits = _cached(step, "bits", b, lambda: bitserial.pack(np.ascontiguousarray(b.T), bitserial.NR)) \
            if step.attrs.get("kernel", "int8") != "int8" else None
        enc = _bitserial_input(step, a2, za, bits, b.shape[0], False)
        if enc is not None:
            acc = bitserial.matmul(a2, za, bits, zb, enc)
            return acc.reshape(*a.shape[:-1], b.shape[-1])
        pb = _cached(step, "b", b, lambda: pack_b(b))
        return qgemm(a2, za, pb, zb).reshape(*a.shape[:-1], b.shape[-1])
    batch = np.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    a_b = np.broadcast_to(a, batch + a.shape[-2:])
    b_b = np.broadcast_to(b, batch + b.shape[-2:])
    out = np.empty(batch + (a.shape[-2], b.shape[-1]), np.int32)
    for idx in np.ndindex(*batch):
        out[idx] = qgemm(a_b[idx], za, pack_b(np.ascontiguousarray(b_b[idx])), zb)
    return out


def qlinear_matmul(step, args, mode):
    a, sa, za, b, sb, zb, sy, zy = args
    if mode == "float" and "ort_float" in step.attrs:        # a unit ORT leaves DQ -> MatMul -> Q
        qmin, qmax = _bounds(step, zy)
        return [ortfloat.matmul_unit(step, a, sa, za, b, sb, zb, sy, _scalar(zy), qmin, qmax, np.asarray(zy).dtype)]
    acc = _matmul_acc(step, a, za, b, zb, mode)
    n = acc.shape[-1]
    out = _requant_out(step, acc.reshape(-1, n, 1), sa, sb, sy, zy, mode)
    return [out.reshape(acc.shape)]


def matmul_integer(step, args, mode):
    a, b = args[0], args[1]
    za = args[2] if len(args) > 2 else None
    zb = args[3] if len(args) > 3 else None
    return [_matmul_acc(step, a, za, b, zb, mode)]


def qgemm_op(step, args, mode):
    """com.microsoft QGemm with a quantized output: Y = requant((A'-za)(B'-zb) + C)."""
    a, sa, za, b, sb, zb = args[:6]
    c = args[6] if len(args) > 6 else None
    sy = args[7] if len(args) > 7 else None
    zy = args[8] if len(args) > 8 else None
    if sy is None:
        raise ModelError(f"{step.name}: QGemm with a float output is not supported")
    if mode == "float" and "ort_float" in step.attrs:        # a unit ORT leaves DQ -> Gemm -> Q
        zy = np.zeros((), np.asarray(za).dtype) if zy is None else zy
        qmin, qmax = _bounds(step, zy)
        return [ortfloat.gemm_unit(step, a, sa, za, b, sb, zb, sy, _scalar(zy), qmin, qmax, np.asarray(zy).dtype)]
    if float(step.attrs.get("alpha", 1.0)) != 1.0:
        raise ModelError(f"{step.name}: QGemm alpha != 1 is not supported")
    if step.attrs.get("no_int_bias"):
        raise ModelError(f"{step.name}: a Gemm whose C is a full [M, N] matrix has no integer form here "
                         "(ORT runs it in float: only --mode float reproduces it)")
    if float(step.attrs.get("beta", 1.0)) != 1.0 and c is not None:
        raise ModelError(f"{step.name}: a Gemm with beta != 1 and a bias has no integer form here "
                         "(ORT runs it in float: only --mode float reproduces it)")
    if step.attrs.get("transA", 0):
        a = a.T
    if step.attrs.get("transB", 0):
        b = _cached(step, "bT", b, lambda: np.ascontiguousarray(b.T))
    acc = _matmul_acc(step, np.ascontiguousarray(a), za, b, zb, mode)
    if c is not None:
        acc = acc + np.asarray(c, np.int32)
    zy = np.zeros((), np.asarray(za).dtype) if zy is None else zy
    return [_requant_out(step, acc.reshape(-1, acc.shape[-1], 1), sa, sb, sy, zy, mode).reshape(acc.shape)]


# ----------------------------------------------------------------------------- float boundary

def _broadcast_param(p, x_shape, axis: int, block: int):
    p = np.asarray(p)
    if p.size == 1 and p.ndim <= 1:
        return p.reshape(())
    axis = axis % len(x_shape)
    if block:
        full = np.repeat(p, block, axis=axis)
        return np.take(full, np.arange(x_shape[axis]), axis=axis)
    shape = [1] * len(x_shape)
    shape[axis] = -1
    return p.reshape(shape)


_TO_NP = {"int8": np.int8, "uint8": np.uint8, "int16": np.int16, "uint16": np.uint16,
          "int4": np.int8, "uint4": np.uint8}


def quantize(step, args, mode):
    x, scale = args[0], args[1]
    zp = args[2] if len(args) > 2 else None
    axis, block = int(step.attrs.get("axis", 1)), int(step.attrs.get("block_size", 0))
    kind = int_dtype_name(zp) if zp is not None else step.attrs.get("output_dtype_name", "uint8")
    if kind not in _TO_NP:
        raise ModelError(f"{step.name}: QuantizeLinear to {kind} is not supported")
    zpv = np.zeros((), np.int64) if zp is None else np.asarray(zp).astype(np.int64)
    qmin, qmax = INT_RANGES[kind]
    return [quantize_linear(x, _broadcast_param(scale, x.shape, axis, block),
                            _broadcast_param(zpv, x.shape, axis, block), qmin, qmax, _TO_NP[kind])]


def dequantize(step, args, mode):
    x, scale = args[0], args[1]
    zp = args[2] if len(args) > 2 else None
    if int_dtype_name(x) not in _TO_NP and x.dtype != np.int32:
        raise ModelError(f"{step.name}: DequantizeLinear from {x.dtype} is not supported")
    axis, block = int(step.attrs.get("axis", 1)), int(step.attrs.get("block_size", 0))
    zpv = np.zeros((), np.int64) if zp is None else np.asarray(zp).astype(np.int64)
    y = dequantize_array(np.asarray(x).astype(np.int64), _broadcast_param(scale, x.shape, axis, block),
                          _broadcast_param(zpv, x.shape, axis, block))
    return [y.astype(np.asarray(scale).dtype)]


KERNELS = {
    "QLinearConv": qlinear_conv, "ConvInteger": conv_integer,
    "QLinearMatMul": qlinear_matmul, "MatMulInteger": matmul_integer, "QGemm": qgemm_op,
    "QuantizeLinear": quantize, "DequantizeLinear": dequantize,
}
