"""Pooling in the integer domain.

- MaxPool: max over the window of the stored integers (order is preserved by an affine map with a
  positive scale); padding never wins. A scale change afterwards is a separate requantization.
- GlobalAveragePool: integer sum of (x - zx), then one requantization with M = s_x / (s_y * count),
  as ORT's QLinearGlobalAveragePool: y = clamp(rne(float32(sum) * M) + zy), in both modes.
- AveragePool: ``fixed`` mode is the same integer scheme per window size; ``float`` mode follows
  ORT's QLinearAveragePool, which averages dequantized float32 values (so that it is bit-exact with
  it), except for a window covering the whole unpadded image, which ORT (and so this module) runs
  as GlobalAveragePool. ``count_include_pad`` follows ONNX (default 0: only elements inside the
  image count). Not exact everywhere: with a window of 16 elements (4x4: the division is exact, so
  sub-ulp differences in the sum land on ties) 4 of 82,944 random outputs differ from ORT 1.32, and
  MLAS's vectorized float pooling order (column sums, then across) does no better (9); the order ORT
  uses there is not identified. Every zoo model's pools are exact.
"""
from __future__ import annotations

import numpy as np
from numba import njit

from qgraph.errors import ModelError
from qgraph.kernels.requant import requantize_into
from qgraph.ops import INT_RANGES


def pool_geometry(attrs: dict, spatial) -> tuple:
    """(kernel, strides, dilations, pads[top,left,bottom,right], out_hw) for 2-D pooling."""
    kernel = list(attrs["kernel_shape"])
    if len(kernel) != 2:
        raise ModelError(f"only 2-D pooling is supported, got kernel {kernel}")
    strides = list(attrs.get("strides") or [1, 1])
    dil = list(attrs.get("dilations") or [1, 1])
    pads = list(attrs.get("pads") or [0, 0, 0, 0])
    auto = attrs.get("auto_pad", "NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        for d in range(2):
            out = -(-spatial[d] // strides[d])
            total = max(0, (out - 1) * strides[d] + dil[d] * (kernel[d] - 1) + 1 - spatial[d])
            small, big = total // 2, total - total // 2
            pads[d], pads[d + 2] = (small, big) if auto == "SAME_UPPER" else (big, small)
    ceil = bool(attrs.get("ceil_mode", 0))
    out = []
    for d in range(2):
        span = spatial[d] + pads[d] + pads[d + 2] - dil[d] * (kernel[d] - 1) - 1
        o = (-(-span // strides[d]) if ceil else span // strides[d]) + 1
        if ceil and (o - 1) * strides[d] >= spatial[d] + pads[d]:
            o -= 1                       # ONNX: the last window must start inside the image or left pad
        out.append(o)
    return tuple(kernel), tuple(strides), tuple(dil), tuple(pads), tuple(out)


@njit(cache=True)
def _window_reduce(x, kh, kw, sh, sw, dh, dw, pt, pl, is_max, zx, out, counts):
    n_b, c_n, h, w = x.shape
    _, _, oh, ow = out.shape
    for n in range(n_b):
        for c in range(c_n):
            for y in range(oh):
                for xo in range(ow):
                    best = np.int64(-(1 << 40))
                    acc = np.int64(0)
                    cnt = 0
                    for i in range(kh):
                        iy = y * sh - pt + i * dh
                        if iy < 0 or iy >= h:
                            continue
                        for j in range(kw):
                            ix = xo * sw - pl + j * dw
                            if ix < 0 or ix >= w:
                                continue
                            v = np.int64(x[n, c, iy, ix])
                            best = max(best, v)
                            acc += v - zx
                            cnt += 1
                    out[n, c, y, xo] = best if is_max else acc
                    counts[y, xo] = cnt


def _window_max_float(x, kh, kw, sh, sw, dh, dw, pads, oh, ow) -> np.ndarray:
    """MaxPool of float values (a float unit between DQ and Q): exact, the order does not matter;
    padding reads as -inf."""
    pt, pl, pb, pr = pads
    h, w = x.shape[2:]
    span_h, span_w = (kh - 1) * dh + 1, (kw - 1) * dw + 1
    xp = np.full(x.shape[:2] + (max(h + pt + pb, (oh - 1) * sh + span_h), max(w + pl + pr, (ow - 1) * sw + span_w)),
                 -np.inf, x.dtype)
    xp[:, :, pt:pt + h, pl:pl + w] = x
    win = np.lib.stride_tricks.sliding_window_view(xp, (span_h, span_w), axis=(2, 3))
    win = win[:, :, ::sh, ::sw, ::dh, ::dw][:, :, :oh, :ow]
    return win.max(axis=(4, 5))


def max_pool(x: np.ndarray, attrs: dict) -> np.ndarray:
    (kh, kw), (sh, sw), (dh, dw), pads, (oh, ow) = pool_geometry(attrs, x.shape[2:])
    if x.dtype.kind == "f":
        return _window_max_float(x, kh, kw, sh, sw, dh, dw, pads, oh, ow)
    out = np.empty((x.shape[0], x.shape[1], oh, ow), x.dtype)
    counts = np.empty((oh, ow), np.int64)
    _window_reduce(np.ascontiguousarray(x), kh, kw, sh, sw, dh, dw, pads[0], pads[1], True, 0, out, counts)
    return out


@njit(cache=True)
def _average_pool_ort(x, sx, zx, sy, zy, kh, kw, sh, sw, pt, pl, include_pad, qmin, qmax, out):
    """ORT's QLinearAveragePool arithmetic, operation for operation: dequantize each element to
    float32, add them in window order, divide by the count, then rne(y / sy + zy) and saturate."""
    n_b, c_n, h, w = x.shape
    _, _, oh, ow = out.shape
    for n in range(n_b):
        for c in range(c_n):
            for y in range(oh):
                h0 = y * sh - pt
                h1 = min(h0 + kh, h)
                h0 = max(h0, 0)
                for xo in range(ow):
                    w0 = xo * sw - pl
                    w1 = min(w0 + kw, w)
                    w0 = max(w0, 0)
                    acc = np.float32(0.0)
                    for i in range(h0, h1):
                        for j in range(w0, w1):
                            acc = np.float32(acc + np.float32(sx * np.float32(np.int32(x[n, c, i, j]) - zx)))
                    cnt = kh * kw if include_pad else (h1 - h0) * (w1 - w0)
                    acc = np.float32(acc / np.float32(cnt))
                    q = np.int64(np.rint(np.float32(np.float32(acc / sy) + np.float32(zy))))
                    out[n, c, y, xo] = qmin if q < qmin else (qmax if q > qmax else q)


def average_pool(x, sx, zx: int, sy, zy, attrs: dict, mode: str) -> np.ndarray:
    """``float`` mode reproduces ORT's QLinearAveragePool (float sums); ``fixed`` mode is the
    integer version: window sum of (x - zx), one fixed-point requantization per window size.

    A window that is the whole image without padding is ORT's global-average fallback
    (``fallback_to_global`` in qlinear_pool.cc: MLAS's QLinearGlobalAveragePool, an integer sum and
    one float32 requantization, not the float average): ``global_average_pool``, in both modes."""
    (kh, kw), (sh, sw), (dh, dw), pads, (oh, ow) = pool_geometry(attrs, x.shape[2:])
    if (kh, kw) == tuple(x.shape[2:]) and not any(pads):
        return global_average_pool(x, sx, zx, sy, zy, mode)
    if mode == "float":
        if (dh, dw) != (1, 1):
            raise ModelError("AveragePool with dilations: no float-mode kernel (ORT has none to match)")
        zy_arr = np.asarray(zy)
        qmin, qmax = INT_RANGES[zy_arr.dtype.name]
        out = np.empty((x.shape[0], x.shape[1], oh, ow), zy_arr.dtype)
        _average_pool_ort(np.ascontiguousarray(x), np.float32(sx), np.int32(zx), np.float32(sy),
                          np.int32(zy_arr.reshape(-1)[0]), kh, kw, sh, sw, pads[0], pads[1],
                          bool(attrs.get("count_include_pad", 0)), qmin, qmax, out)
        return out
    acc = np.empty((x.shape[0], x.shape[1], oh, ow), np.int32)
    counts = np.empty((oh, ow), np.int64)
    _window_reduce(np.ascontiguousarray(x), kh, kw, sh, sw, dh, dw, pads[0], pads[1], False, zx, acc, counts)
    if attrs.get("count_include_pad", 0):
        counts[:] = kh * kw
    zy_arr = np.asarray(zy)
    qmin, qmax = INT_RANGES[zy_arr.dtype.name]
    out = np.empty(acc.shape, zy_arr.dtype)
    for cnt in np.unique(counts):        # one requantization per distinct window size
        where = counts == cnt
        m = np.float32(np.float32(sx) / (np.float32(sy) * np.float32(cnt)))
        part = acc[:, :, where].reshape(acc.shape[0] * acc.shape[1], 1, -1)
        out[:, :, where] = requantize_into(part, [m], int(zy_arr.reshape(-1)[0]), qmin, qmax, mode,
                                           zy_arr.dtype).reshape(acc.shape[0], acc.shape[1], -1)
    return out


@njit(cache=True)
def _plane_sums(x):
    """int64 sum of each row (numpy's reduction over a short last axis is slow)."""
    out = np.empty(x.shape[0], np.int64)
    for i in range(x.shape[0]):
        s = np.int64(0)
        for v in x[i]:
            s += v
        out[i] = s
    return out


def global_average_pool(x, sx, zx: int, sy, zy, mode: str) -> np.ndarray:
    n_b, c_n = x.shape[:2]
    size = int(np.prod(x.shape[2:]))
    acc = (_plane_sums(np.ascontiguousarray(x).reshape(n_b * c_n, -1)) - zx * size).astype(np.int32)
    m = np.float32(np.float32(sx) / (np.float32(sy) * np.float32(size)))
    zy_arr = np.asarray(zy)
    qmin, qmax = INT_RANGES[zy_arr.dtype.name]
    out = requantize_into(acc.reshape(n_b, c_n, 1), [m], int(zy_arr.reshape(-1)[0]), qmin, qmax, mode,
                          zy_arr.dtype)
    return out.reshape((n_b, c_n) + (1,) * (x.ndim - 2))


def pool_reference(x, attrs, is_max: bool, zx: int = 0):
    """Plain numpy window max / window sum of (x - zx), for tests."""
    (kh, kw), (sh, sw), (dh, dw), (pt, pl, pb, pr), (oh, ow) = pool_geometry(attrs, x.shape[2:])
    fill = np.iinfo(np.int64).min if is_max else zx
    xp = np.full(x.shape[:2] + (x.shape[2] + pt + pb + sh * kh, x.shape[3] + pl + pr + sw * kw), fill, np.int64)
    xp[:, :, pt:pt + x.shape[2], pl:pl + x.shape[3]] = x
    out = np.empty(x.shape[:2] + (oh, ow), np.int64)
    for y in range(oh):
        for xo in range(ow):
            win = xp[:, :, y * sh:y * sh + dh * (kh - 1) + 1:dh, xo * sw:xo * sw + dw * (kw - 1) + 1:dw]
            out[:, :, y, xo] = win.max(axis=(2, 3)) if is_max else (win - zx).sum(axis=(2, 3))
    return out
