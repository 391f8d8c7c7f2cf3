"""Data movement on quantized tensors: the stored integers move, their (scale, zero point) do not.

Reshape, Flatten, Transpose, Squeeze, Unsqueeze, Slice, Gather, Pad, Resize (nearest), Identity,
Expand, MaxPool (order-preserving) and pooling steps that need no arithmetic. A lowered group whose
output scale differs from its input's appends a requantization (``eltwise.requantize_tensor``).
"""
from __future__ import annotations

import numpy as np

from qgraph.errors import ModelError
from qgraph.kernels import pool
from qgraph.kernels.eltwise import requantize_tensor
from qgraph.ops import INT_RANGES


def _ints(v) -> list[int]:
    return [int(i) for i in np.asarray(v).reshape(-1)]


def _reshape(x, shape, attrs):
    shape = _ints(shape)
    if not attrs.get("allowzero", 0):
        shape = [x.shape[i] if d == 0 else d for i, d in enumerate(shape)]
    return x.reshape(shape)


def _flatten(x, attrs):
    axis = int(attrs.get("axis", 1))
    axis = axis + x.ndim if axis < 0 else axis        # 0..rank: axis == rank gives (prod, 1)
    return x.reshape(int(np.prod(x.shape[:axis])), -1)


def _slice(x, starts, ends, axes=None, steps=None):
    starts, ends = _ints(starts), _ints(ends)
    axes = _ints(axes) if axes is not None else list(range(len(starts)))
    steps = _ints(steps) if steps is not None else [1] * len(starts)
    idx = [slice(None)] * x.ndim
    for s, e, a, st in zip(starts, ends, axes, steps):
        idx[a % x.ndim] = slice(s, e, st)
    return x[tuple(idx)]


def _pad(x, pads, value, axes, attrs):
    pads = _ints(pads)
    mode = attrs.get("mode", "constant")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    axes = _ints(axes) if axes is not None else list(range(x.ndim))
    width = [(0, 0)] * x.ndim
    half = len(pads) // 2
    for i, a in enumerate(axes):
        width[a % x.ndim] = (pads[i], pads[i + half])
    if mode == "constant":
        fill = 0 if value is None else np.asarray(value).reshape(-1)[0]
        if min(min(w) for w in width) < 0:
            return np.pad(x, width, mode="constant", constant_values=fill)
        out = np.full([d + a + b for d, (a, b) in zip(x.shape, width)], fill, x.dtype)   # np.pad is slow
        out[tuple(slice(a, a + d) for d, (a, _) in zip(x.shape, width))] = x
        return out
    return np.pad(x, width, mode={"reflect": "reflect", "edge": "edge", "wrap": "wrap"}[mode])


def resize_shape(shape, scales, sizes) -> tuple[list[int], list[float]]:
    """Resize's output shape and per-axis scale: from ``sizes`` when given, else floor(d * scale)."""
    if sizes is not None and np.asarray(sizes).size:
        out_shape = _ints(sizes)
        return out_shape, [o / i for o, i in zip(out_shape, shape)]
    scl = [float(s) for s in np.asarray(scales).reshape(-1)]
    return [int(np.floor(d * s)) for d, s in zip(shape, scl)], scl


def source_coords(ctm: str, n_in: int, n_out: int, s: float, dtype, name: str) -> np.ndarray:
    """The input coordinate of each output position of one resized axis, in ``dtype`` arithmetic
    (ONNX Resize's coordinate_transformation_mode)."""
    f = np.dtype(dtype).type
    o = np.arange(n_out, dtype=dtype)
    if ctm == "asymmetric":
        return o / f(s)
    if ctm == "align_corners":
        return o * f(n_in - 1) / f(max(n_out - 1, 1))
    if ctm == "half_pixel" or (ctm == "pytorch_half_pixel" and n_out > 1):
        return (o + f(0.5)) / f(s) - f(0.5)
    if ctm == "pytorch_half_pixel":
        return np.zeros(n_out, dtype)
    raise ModelError(f"cannot lower node {name} (Resize): coordinate mode {ctm!r}")


def _resize_nearest(x, scales, sizes, attrs, name):
    mode = attrs.get("mode", "nearest")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    if mode != "nearest":
        raise ModelError(f"cannot lower node {name} (Resize): mode {mode!r}, only 'nearest' is integer-exact")
    ctm = attrs.get("coordinate_transformation_mode", "half_pixel")
    ctm = ctm.decode() if isinstance(ctm, bytes) else ctm
    nmode = attrs.get("nearest_mode", "round_prefer_floor")
    nmode = nmode.decode() if isinstance(nmode, bytes) else nmode
    out_shape, scl = resize_shape(x.shape, scales, sizes)
    y = x
    for ax, (n_in, n_out, s) in enumerate(zip(x.shape, out_shape, scl)):
        if n_in == n_out:
            continue
        # pytorch_half_pixel as half_pixel here, as before (a one-pixel output reads pixel 0 either way)
        src = source_coords("half_pixel" if ctm == "pytorch_half_pixel" else ctm, n_in, n_out, s, np.float64, name)
        rounders = {"floor": np.floor, "ceil": np.ceil,
                    "round_prefer_floor": lambda v: np.ceil(v - 0.5), "round_prefer_ceil": lambda v: np.floor(v + 0.5)}
        idx = np.clip(rounders[nmode](src).astype(np.int64), 0, n_in - 1)
        y = np.take(y, idx, axis=ax)
    return y


def move(step, args, mode):
    """Step attrs: 'op' (the ONNX op), 'attrs' (its attributes), 'nq' (number of leading integer
    inputs: the rest are shape/index operands) and optionally 'requant' = (sx, zx, sy, zy) names
    resolved into the trailing four args."""
    op, at = step.attrs["op"], step.attrs.get("attrs", {})
    rq = step.attrs.get("requant")
    if rq:
        args, (sx, zx, sy, zy) = args[:-4], args[-4:]
    x = args[0]
    rest = list(args[1:]) + [None] * 4
    if op in ("Identity", "Dropout"):
        y = x
    elif op == "Reshape":
        y = _reshape(x, rest[0], at)
    elif op == "Flatten":
        y = _flatten(x, at)
    elif op == "Transpose":
        y = np.transpose(x, at.get("perm"))
    elif op == "Squeeze":
        axes = rest[0] if rest[0] is not None else at.get("axes")
        y = np.squeeze(x, axis=tuple(a % x.ndim for a in _ints(axes))) if axes is not None else np.squeeze(x)
    elif op == "Unsqueeze":
        axes = rest[0] if rest[0] is not None else at.get("axes")
        y = x
        for a in sorted(a % (x.ndim + len(_ints(axes))) for a in _ints(axes)):
            y = np.expand_dims(y, a)
    elif op == "Slice":
        y = _slice(x, rest[0], rest[1], rest[2], rest[3])
    elif op == "Gather":
        y = np.take(x, np.asarray(rest[0], np.int64), axis=int(at.get("axis", 0)))
    elif op == "Pad":
        y = _pad(x, rest[0], rest[1], rest[2], at)
    elif op == "Resize":
        y = _resize_nearest(x, rest[1], rest[2], at, step.name)
    elif op == "Expand":
        y = x * np.ones(_ints(rest[0]), x.dtype)
    elif op == "MaxPool":
        y = pool.max_pool(x, at)
    else:
        raise ModelError(f"cannot run node {step.name} ({op}): not a data-movement op")
    y = np.ascontiguousarray(y)
    if rq:
        y = requantize_tensor(y, sx, zx, sy, zy, mode, np.asarray(zy).dtype)
    return [y]


def global_average_pool(step, args, mode):
    x, sx, zx, sy, zy = args
    if mode == "float" and "ort_float" in step.attrs:       # a unit ORT leaves DQ -> float GAP -> Q
        from qgraph.kernels import ortfloat
        dtype = np.asarray(zy).dtype
        lo, hi = INT_RANGES[dtype.name]
        return [ortfloat.global_average_pool_unit(x, _scalar0(sx), _scalar0(zx), _scalar0(sy), _scalar0(zy),
                                                  lo, hi, dtype)]
    return [pool.global_average_pool(x, sx, int(np.asarray(zx).reshape(-1)[0]), sy, zy, mode)]


def _scalar0(v):
    return np.asarray(v).reshape(-1)[0]


def average_pool(step, args, mode):
    x, sx, zx, sy, zy = args
    return [pool.average_pool(x, sx, int(np.asarray(zx).reshape(-1)[0]), sy, zy, step.attrs, mode)]


def shape_of(step, args, mode):
    shape = np.array(args[0].shape, np.int64)
    start, end = int(step.attrs.get("start", 0)), step.attrs.get("end")
    return [shape[start:None if end is None else int(end)]]


def eval_shape(step, args, mode):
    """Integer arithmetic on shape tensors, by ONNX's reference implementation of the node."""
    from onnx.reference import ReferenceEvaluator
    ev = step.cache.get("ev")
    if ev is None:
        ev = step.cache["ev"] = ReferenceEvaluator(step.attrs["proto"])
    names = [n for n in step.attrs["proto"].input]
    return ev.run(None, {n: a for n, a in zip(names, args) if n and a is not None})


KERNELS = {"Shape": shape_of, "EvalShape": eval_shape, "Move": move, "QLinearGlobalAveragePool": global_average_pool,
           "QLinearAveragePool": average_pool}
