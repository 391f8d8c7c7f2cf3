"""The float ops ONNX Runtime runs between DequantizeLinear and QuantizeLinear, as it computes them.

A QDQ model that ``quant`` writes leaves some ops in float: ORT has no integer kernel for them (Div,
Pow, Sqrt, Erf, ReduceMean, LayerNormalization, an Add of a float constant, HardSwish written as
Mul/Add/Clip/Div, a per-channel Min, ...), so it runs ``DQ -> float op(s) -> Q``. The lowering emits
those as ``Float`` steps between the DQ and Q steps: integer tensors at the borders, the float op in
between computed with ORT's float32 arithmetic. ``fixed`` mode runs them the same way (integer-only
hardware would need a table or an integer approximation per op; qgraph-run says how many there are).

Exactness against ORT, by op:

  exact (IEEE float32, one rounding per operation, as ORT's Eigen / MLAS element loops):
      Add Sub Mul Div Min Max Neg Abs Reciprocal Sqrt Floor Ceil Round Relu Clip LeakyRelu PRelu
      LayerNormalization (``_layernorm``; a norm size a multiple of 8, or under 8),
      HardSigmoid HardSwish (alpha*x + beta, clamped; x * that), Erf (MLAS's polynomial and its
      own exp, fma for fma: ``ortfloat.erf_mlas``), ReduceSum ReduceMean ReduceSumSquare ReduceL2
      (ORT's summation order per axis layout: Eigen's SSE 4-lane redux, MLAS's M = 1 SGEMM,
      element-wise row adds or its sequential loop: ``ortreduce``), Pow with exponent 2 or 3 (ORT
      squares / cubes: x*x, x*x*x) or 0.5 (sqrt), comparisons and Where, and data movement
      (Reshape Flatten Transpose Squeeze Unsqueeze Concat Split Slice Gather Pad Expand Identity
      Cast MaxPool, Resize nearest), GlobalAveragePool (MLAS's global kernel: 4 float lanes in
      order, reduced (l0 + l2) + (l1 + l3), the tail added one by one, / size:
      ``ortfloat.global_average_pool_mlas``)
  close, not bit-reproduced (ORT uses its own approximations or summation order; the integer after
  Q differs only when the float lands within an ulp of a rounding boundary, and qgraph-run
  --compare-ort reports the share):
      Exp Log Tanh Sigmoid (MLAS polynomial kernels), Pow with another exponent (powf),
      Softmax off x86 (``ortsoftmax`` reproduces MLAS's AVX-512F, FMA3 and SSE2 kernels, by cpuid),
      LayerNormalization with a norm size that is not a multiple of 8 and over 8
      (``_layernorm``: ORT's order reproduced otherwise),
      Resize linear, LRN (ORT's scale bit for bit, Eigen's pow not: ``_lrn``)
  ConvTranspose (``quant`` quantizes it, ORT has no s8 kernel and runs DQ -> float -> Q): MLAS's
      SGEMM order per output, then col2im and the bias as ORT's CPU kernel; exact where the kernel
      taps do not overlap (stride >= kernel, the usual 2x2/2 upsampling)

  MatMul left in float (a weight ``quant`` could not see as a constant, an excluded node): MLAS's
      SGEMM order per output (``ortfloat.sgemm_mlas``; a single row, M = 1: MLAS's M = 1 kernel,
      ``ortfloat.sgemm_m1_mlas``)

Anything else between DQ and Q (a float Conv or Gemm that ``quant`` excluded, for one) is a
``ModelError`` naming the node and the op.
"""
from __future__ import annotations

import numpy as np

from qgraph.errors import ModelError
from qgraph.kernels import ortreduce
from qgraph.kernels.movement import resize_shape, source_coords

F32 = np.float32


def _f(x) -> np.ndarray:
    return np.asarray(x, F32) if np.asarray(x).dtype.kind == "f" else np.asarray(x)


def _attr(at: dict, name: str, default):
    v = at.get(name, default)
    return v.decode() if isinstance(v, bytes) else v


def _axes(args, at, i: int = 1):
    """Reduction axes: the input ``i`` (opset >= 18 / 13 for ReduceSum) or the ``axes`` attribute."""
    if len(args) > i and args[i] is not None and np.asarray(args[i]).size:
        return tuple(int(a) for a in np.asarray(args[i]).reshape(-1))
    ax = at.get("axes")
    return tuple(int(a) for a in ax) if ax is not None else None


def _reduce(fn, args, at):
    x = _f(args[0])
    axes = _axes(args, at)
    if axes is None and int(at.get("noop_with_empty_axes", 0)):
        return [x]
    axes = tuple(range(x.ndim)) if axes is None else tuple(a % x.ndim for a in axes)
    keep = bool(at.get("keepdims", 1))
    return [np.asarray(fn(x, axes, keep), F32)]


def _mean(x, axes, keep):
    n = int(np.prod([x.shape[a] for a in axes]))
    return (np.sum(x, axis=axes, keepdims=keep, dtype=F32) / F32(n)).astype(F32)


def _pow(args, at):
    x, e = _f(args[0]), np.asarray(args[1])
    if e.size == 1:
        v = float(e.reshape(-1)[0])
        if v == 2.0:
            return [(x * x).astype(F32)]
        if v == 3.0:
            return [(x * x * x).astype(F32)]
        if v == 0.5:
            return [np.sqrt(x).astype(F32)]
    return [np.power(x, e.astype(F32)).astype(F32)]


def _erf(x):
    from qgraph.kernels import ortfloat
    return ortfloat.erf(_f(x))


def _hardsigmoid(x, alpha, beta):
    return np.minimum(np.maximum(F32(alpha) * x + F32(beta), F32(0)), F32(1)).astype(F32)


def _softmax(args, at, opset):
    """MLAS's softmax in the order of its kernel for this CPU (``ortsoftmax``: polynomial exp, lane sums, x 1/sum)."""
    from qgraph.kernels.ortsoftmax import softmax
    x = _f(args[0])
    return [softmax(x, int(at.get("axis", -1 if opset >= 13 else 1)), opset)]


def _fma(a, b, c):
    """float32 fma of broadcastable arrays, in the shape they broadcast to (``ortfloat.fma``)."""
    from qgraph.kernels import ortfloat
    return ortfloat.fma(a, b, c).reshape(np.broadcast_shapes(np.shape(a), np.shape(b), np.shape(c)))


def _layernorm(args, at):
    """LayerNormalization as ORT 1.32's CPU kernel computes float32, found by measurement against it
    (its mean and InvStdDev outputs, then Y; tests/test_kernels_floatops.py, seeded shapes):

      norm size n >= 8: mean = the float64 sum / n, rounded to float32; the variance is a second pass
      over d = x - mean (float32), accumulated with fma in 8 float32 lanes (AVX2 width), the lanes
      added as a tree ((l0+l4)+(l2+l6)) + ((l1+l5)+(l3+l7)), the n % 8 tail added after it with
      scalar fma; inv = 1 / sqrt(var / n + epsilon) in float32; y = fma(d * inv, scale, bias).
      n < 8: Welford's running mean and M2 in float32, y = d / sqrt(M2 / n + epsilon) * scale + bias.

    Exact for n a multiple of 8 (all-MiniLM's 384) and measured exact for a scalar tail of 3; with
    a 4-7 element tail 94-99% of rows agree (MLAS handles those with narrower vectors whose order
    this does not reproduce); the difference is an ulp."""
    x = _f(args[0])
    axis = int(at.get("axis", -1)) % x.ndim
    eps = F32(at.get("epsilon", 1e-5))
    shape = x.shape
    rows = int(np.prod(shape[:axis], dtype=np.int64))
    n = int(np.prod(shape[axis:], dtype=np.int64))
    x2 = x.reshape(rows, n)
    scale = np.broadcast_to(_f(args[1]), shape[axis:]).reshape(n)
    bias = (np.broadcast_to(_f(args[2]), shape[axis:]).reshape(n)
            if len(args) > 2 and args[2] is not None else None)
    if n >= 8:
        mean = (x2.astype(np.float64).sum(axis=1) / n).astype(F32)
        d = x2 - mean[:, None]
        full = n // 8 * 8
        acc = np.zeros((rows, 8), F32)
        for j in range(0, full, 8):
            acc = _fma(d[:, j:j + 8], d[:, j:j + 8], acc)
        acc = acc[:, :4] + acc[:, 4:]
        acc = acc[:, :2] + acc[:, 2:]
        s = acc[:, 0] + acc[:, 1]
        for j in range(full, n):
            s = _fma(d[:, j], d[:, j], s)
        inv = F32(1) / np.sqrt(s / F32(n) + eps)
        t = d * inv[:, None]
        y = _fma(t, scale, bias) if bias is not None else t * scale
    else:
        mean = np.zeros(rows, F32)
        m2 = np.zeros(rows, F32)
        for k in range(n):
            d0 = x2[:, k] - mean
            mean = mean + d0 / F32(k + 1)
            m2 = m2 + d0 * (x2[:, k] - mean)
        sd = np.sqrt(m2 / F32(n) + eps)
        y = (x2 - mean[:, None]) / sd[:, None] * scale
        if bias is not None:
            y = y + bias
    return [y.astype(F32).reshape(shape)]


def _split(args, at, n_out):
    x = args[0]
    axis = int(at.get("axis", 0)) % x.ndim
    split = args[1] if len(args) > 1 and args[1] is not None else at.get("split")
    if split is None:
        parts = n_out
        size = -(-x.shape[axis] // parts)
        split = [size] * (parts - 1) + [x.shape[axis] - size * (parts - 1)]
    idx = np.cumsum([int(s) for s in np.asarray(split).reshape(-1)])[:-1]
    return [np.ascontiguousarray(p) for p in np.split(x, idx, axis=axis)]


def _resize(args, at, name):
    from qgraph.kernels.movement import _resize_nearest
    mode = _attr(at, "mode", "nearest")
    scales = args[2] if len(args) > 2 else None
    sizes = args[3] if len(args) > 3 else None
    if mode == "nearest":
        return [_resize_nearest(args[0], scales, sizes, at, name)]
    if mode != "linear":
        raise ModelError(f"cannot lower node {name} (Resize): float mode {mode!r} is not supported")
    return [_resize_linear(_f(args[0]), scales, sizes, at, name)]


def _resize_linear(x, scales, sizes, at, name):
    """Separable linear interpolation over each resized axis (coordinates as ONNX defines them)."""
    ctm = _attr(at, "coordinate_transformation_mode", "half_pixel")
    out_shape, scl = resize_shape(x.shape, scales, sizes)
    y = x
    for ax, (n_in, n_out, s) in enumerate(zip(x.shape, out_shape, scl)):
        if n_in == n_out:
            continue
        src = np.clip(source_coords(ctm, n_in, n_out, s, np.float32, name), 0, n_in - 1).astype(F32)
        i0 = np.floor(src).astype(np.int64)
        i1 = np.minimum(i0 + 1, n_in - 1)
        w1 = (src - i0.astype(F32)).astype(F32)
        w0 = (F32(1) - w1).astype(F32)
        shape = [1] * y.ndim
        shape[ax] = n_out
        y = (np.take(y, i0, axis=ax) * w0.reshape(shape) + np.take(y, i1, axis=ax) * w1.reshape(shape)).astype(F32)
    return y


def _pool(op, args, at):
    from qgraph.kernels import pool
    x = _f(args[0])
    if op == "GlobalAveragePool":
        from qgraph.kernels import ortfloat
        return [ortfloat.global_average_pool_mlas(x)]
    if op == "MaxPool":
        return [pool.max_pool(x, at)]
    raise ModelError(f"{op} in float is not supported")


def _lrn(args, at):
    """ORT's CPU LRN (``lrn.cc``), in its order: padded squares x*x; per image, the first channel's
    scale = bias + sum over the first ``size`` padded squares of (alpha/size) * sq (one axpy each,
    product then sum: ORT's Eigen loops are compiled without FMA), each next channel's = the previous
    one + (alpha/size) * head, then + (-(alpha/size)) * tail; then y = x * scale^-beta. The scale is
    ORT's bit for bit (checked with beta = 1, where the power is an exact reciprocal); the power is
    Eigen's vectorized ``pow``, not reproduced: the correctly rounded power used here equals it on
    about 3 of 4 elements, and the output is within 2 ulp elsewhere (so "close", not exact)."""
    x = _f(args[0])
    size = int(at["size"])
    alpha, beta, bias = F32(at.get("alpha", 1e-4)), F32(at.get("beta", 0.75)), F32(at.get("bias", 1.0))
    n_b, c_n = x.shape[:2]
    pre = (size - 1) // 2
    a_s = F32(alpha / F32(size))
    sq = np.zeros((n_b, c_n + size - 1) + x.shape[2:], F32)
    sq[:, pre:pre + c_n] = x * x
    scale = np.empty_like(x)
    first = np.full((n_b,) + x.shape[2:], bias, F32)
    for c in range(size):
        first = (first + (sq[:, c] * a_s).astype(F32)).astype(F32)
    scale[:, 0] = first
    for c in range(1, c_n):
        cur = (scale[:, c - 1] + (sq[:, c + size - 1] * a_s).astype(F32)).astype(F32)
        scale[:, c] = (cur + (sq[:, c - 1] * F32(-a_s)).astype(F32)).astype(F32)
    power = np.power(scale.astype(np.float64), -float(beta)).astype(F32)
    return [(x * power).astype(F32)]


def conv_transpose(args, at, name):
    """ORT's float ConvTranspose (2-D, NCHW): per image and group, col = Wᵀ·X by MLAS's SGEMM
    (``ortfloat.sgemm_mlas``: the fma chain per k-block, blocks added in order), then col2im adding
    each column into a zeroed image in (c, i, j, y, x) order, then + bias per channel."""
    from qgraph.kernels import ortfloat
    x, w = _f(args[0]), _f(args[1])
    b = _f(args[2]) if len(args) > 2 and args[2] is not None else None
    if x.ndim != 4:
        raise ModelError(f"cannot lower node {name} (ConvTranspose): only 2-D is supported in float")
    n_b, cin, h, wd = x.shape
    group = int(at.get("group", 1))
    cout_g, kh, kw = w.shape[1], w.shape[2], w.shape[3]
    sh, sw = (list(at.get("strides") or [1, 1]) + [1])[:2]
    dh, dw = (list(at.get("dilations") or [1, 1]) + [1])[:2]
    pads = list(at.get("pads") or [0, 0, 0, 0])
    opad = list(at.get("output_padding") or [0, 0])
    if at.get("output_shape") is not None or _attr(at, "auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
        raise ModelError(f"cannot lower node {name} (ConvTranspose): output_shape / auto_pad are not supported")
    oh = sh * (h - 1) + opad[0] + ((kh - 1) * dh + 1) - pads[0] - pads[2]
    ow = sw * (wd - 1) + opad[1] + ((kw - 1) * dw + 1) - pads[1] - pads[3]
    cin_g = cin // group
    k = cin_g
    rows = cout_g * kh * kw
    kc = ortfloat.sgemm_block_k(k, h * wd)
    gemm = ortfloat.sgemm_mlas
    if rows == 1:              # MLAS's M = 1 kernel over the whole K
        gemm, kc = ortfloat.sgemm_m1_mlas, k
    y = np.zeros((n_b, cout_g * group, oh, ow), F32)
    col = np.empty((rows, h * wd), F32)
    for gi in range(group):
        wt = np.ascontiguousarray(w[gi * cin_g:(gi + 1) * cin_g].reshape(cin_g, rows).T)
        for n in range(n_b):
            xs = np.ascontiguousarray(x[n, gi * cin_g:(gi + 1) * cin_g].reshape(cin_g, h * wd))
            gemm(wt, xs, np.zeros(rows, F32), kc, col)
            _col2im(col.reshape(cout_g, kh, kw, h, wd), y[n, gi * cout_g:(gi + 1) * cout_g], sh, sw, dh, dw,
                    pads[0], pads[1])
    if b is not None:
        y = (y + b.reshape(1, -1, 1, 1)).astype(F32)
    return [y]


def matmul(args, packed: bool = False):
    """ORT's float MatMul: per matrix of the broadcast batch, MLAS's SGEMM order (``sgemm_mlas``).
    ``packed``: B is a constant ORT prepacks (``MlasSgemmPackedOperation``: k-blocks of 256, no M = 1
    kernel); otherwise k-blocks as ``sgemm_block_k`` and a single row through the M = 1 kernel."""
    from qgraph.kernels import ortfloat
    a, b = _f(args[0]), _f(args[1])
    a2 = a[None, :] if a.ndim == 1 else a
    b2 = b[:, None] if b.ndim == 1 else b
    batch = np.broadcast_shapes(a2.shape[:-2], b2.shape[:-2])
    m, k, n = a2.shape[-2], a2.shape[-1], b2.shape[-1]
    a_b = np.broadcast_to(a2, batch + (m, k))
    b_b = np.broadcast_to(b2, batch + (k, n))
    out = np.empty(batch + (m, n), F32)
    kc = ortfloat.sgemm_block_k(k, n)
    gemm = ortfloat.sgemm_mlas
    if packed and b2.ndim == 2:
        kc = ortfloat.SGEMM_PACKED_STRIDE_K
    elif m == 1:               # MLAS's M = 1 kernel, over the whole K (no k-blocks outside a Conv)
        gemm, kc = ortfloat.sgemm_m1_mlas, k
    zeros = np.zeros(m, F32)
    for idx in np.ndindex(*batch):
        gemm(np.ascontiguousarray(a_b[idx]), np.ascontiguousarray(b_b[idx]), zeros, kc, out[idx])
    if a.ndim == 1:
        out = out[..., 0, :]
    if b.ndim == 1:
        out = out[..., 0]
    return [out]


def _col2im(col, out, sh, sw, dh, dw, pt, pl):
    c_n, kh, kw, h, wd = col.shape
    oh, ow = out.shape[1:]
    for i in range(kh):
        for j in range(kw):
            ys = np.arange(h) * sh - pt + i * dh
            xs = np.arange(wd) * sw - pl + j * dw
            my, mx = (ys >= 0) & (ys < oh), (xs >= 0) & (xs < ow)
            # one (i, j) tap never writes the same output twice (stride >= 1), so a vectorized add
            # per tap keeps the per-output order of ORT's loop over (c, i, j)
            out[:, ys[my][:, None], xs[mx][None, :]] += col[:, i, j][:, my][:, :, mx]


_UNARY = {
    "Neg": np.negative, "Abs": np.abs, "Sqrt": np.sqrt, "Floor": np.floor, "Ceil": np.ceil, "Round": np.rint,
    "Exp": np.exp, "Log": np.log, "Tanh": np.tanh, "Erf": _erf, "Relu": lambda x: np.maximum(x, F32(0)),
    "Reciprocal": lambda x: F32(1) / x, "Sigmoid": lambda x: F32(1) / (F32(1) + np.exp(-x)),
    "Identity": lambda x: x, "Not": np.logical_not,
}
_BINARY = {
    "Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Div": np.divide, "Min": np.minimum, "Max": np.maximum,
    "Equal": np.equal, "Less": np.less, "Greater": np.greater, "LessOrEqual": np.less_equal,
    "GreaterOrEqual": np.greater_equal, "And": np.logical_and, "Or": np.logical_or,
}
#: Ops a ``Float`` step computes (besides data movement, which ``movement.move`` does on any dtype).
FLOAT_OPS = frozenset(_UNARY) | frozenset(_BINARY) | {
    "Pow", "Clip", "LeakyRelu", "PRelu", "HardSigmoid", "HardSwish", "Where", "Cast", "ReduceMean", "ReduceSum", "ReduceL2", "ReduceSumSquare",
    "ReduceMax", "ReduceMin", "Softmax", "LayerNormalization", "Split", "Resize", "GlobalAveragePool", "MaxPool",
    "Sum", "Concat", "ConvTranspose", "MatMul", "LRN"}


def float_op(step, args, mode):
    """One float op on float inputs (integer ones where the op takes indices or shapes)."""
    op, at = step.attrs["op"], step.attrs.get("attrs", {})
    opset = int(step.attrs.get("opset", 17))
    if op in _UNARY:
        return [np.asarray(_UNARY[op](_f(args[0])))]
    if op in _BINARY:
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            return [np.asarray(_BINARY[op](_f(args[0]), _f(args[1])))]
    if op == "Sum":
        acc = _f(args[0])
        for a in args[1:]:
            acc = (acc + _f(a)).astype(F32)
        return [acc]
    if op == "Pow":
        return _pow(args, at)
    if op == "ConvTranspose":
        return conv_transpose(args, at, step.name)
    if op == "MatMul":
        return matmul(args, bool(step.attrs.get("b_packed", False)))
    if op == "Concat":
        return [np.concatenate([np.asarray(a) for a in args], axis=int(at.get("axis", 0)))]
    if op == "Clip":
        lo = args[1] if len(args) > 1 and args[1] is not None else at.get("min")
        hi = args[2] if len(args) > 2 and args[2] is not None else at.get("max")
        y = _f(args[0])
        if lo is not None:
            y = np.maximum(y, F32(np.asarray(lo).reshape(-1)[0]))
        if hi is not None:
            y = np.minimum(y, F32(np.asarray(hi).reshape(-1)[0]))
        return [y.astype(F32)]
    if op == "LeakyRelu":
        x = _f(args[0])
        return [np.where(x >= 0, x, x * F32(at.get("alpha", 0.01))).astype(F32)]
    if op == "PRelu":
        x, s = _f(args[0]), _f(args[1])
        return [np.where(x >= 0, x, x * s).astype(F32)]
    if op == "HardSigmoid":
        return [_hardsigmoid(_f(args[0]), at.get("alpha", 0.2), at.get("beta", 0.5))]
    if op == "HardSwish":
        x = _f(args[0])
        return [(x * _hardsigmoid(x, 1.0 / 6.0, 0.5)).astype(F32)]
    if op == "Where":
        return [np.where(np.asarray(args[0], bool), args[1], args[2])]
    if op == "Cast":
        import onnx
        return [np.asarray(args[0]).astype(onnx.helper.tensor_dtype_to_np_dtype(int(at["to"])))]
    if op in ortreduce.OPS:     # ReduceSum / Mean / SumSquare / L2 in ORT's summation order
        return [ortreduce.reduce(op, _f(args[0]), _axes(args, at), bool(at.get("keepdims", 1)),
                                 bool(int(at.get("noop_with_empty_axes", 0))))]
    if op in ("ReduceMax", "ReduceMin"):
        fn = np.max if op == "ReduceMax" else np.min
        return _reduce(lambda x, a, k: fn(x, axis=a, keepdims=k), args, at)
    if op == "Softmax":
        return _softmax(args, at, opset)
    if op == "LRN":
        return _lrn(args, at)
    if op == "LayerNormalization":
        return _layernorm(args, at)
    if op == "Split":
        return _split(args, at, int(step.attrs.get("n_out", 1)))
    if op == "Resize":
        return _resize(args, at, step.name)
    if op in ("GlobalAveragePool", "MaxPool"):
        return _pool(op, args, at)
    raise ModelError(f"cannot run node {step.name} ({op}): not a float op qgraph-run knows")


KERNELS = {"Float": float_op}
