"""The shared vocabulary below passes and kernels: what an op *is*, in one place.

Passes (``qgraph.passes``) and the integer runtime (``qgraph.kernels``) both speak these words, so
that a fact about ONNX is written once:

    op families       LAYER_OPS (a dot product with a weight operand), QOPERATOR_DOT_OPS, JOIN_OPS, ...
    node inputs       ``input_at`` (an optional input that is present), ``const_at``, ``layer_weight``,
                      ``out_channels`` / ``in_channels`` of a layer, ``clip_bounds`` of Relu / Clip
    convolution       ``ConvGeometry`` from ONNX attributes (auto_pad included)
    integer types     INT_RANGES: one table of storage type -> (qmin, qmax); ``storage_np_dtype``
    quantization      ``QParams`` (scale, zero point, storage, axis), ``quantize`` / ``dequantize`` with
                      ONNX QuantizeLinear / DequantizeLinear semantics, ``fixed_multiplier`` and
                      ``requantize`` (float RNE as ONNX Runtime, or fixed-point multiplier + shift)
    QDQ groups        ``find_groups``: DQ(x), DQ(w), [DQ(b)] -> layer -> Q(y), used by ``quant``,
                      ``biascorr`` and the lowering
    rule outcomes     ``Skip(reason, detail)``: why a rewrite rule did not apply
    ONNX Runtime      ``ort_session``: one CPU session for a ModelProto

It imports only ``qgraph.ir`` and ``qgraph.errors`` (see ARCHITECTURE.md, "Module map"). The
Numba kernels keep their own compiled copies of the arithmetic where Numba needs them; each is
tested equal to the function here.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, field

import numpy as np

from qgraph import ir
from qgraph.errors import ModelError, QGraphError

# ----------------------------------------------------------------------------- op families

#: Ops whose output is a dot product of an activation with a weight operand (input 1).
LAYER_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
#: The same in ONNX's QOperator form (integer inputs, as ORT's quantizer writes them).
QOPERATOR_DOT_OPS = ("QLinearConv", "QLinearMatMul", "ConvInteger", "MatMulInteger", "QGemm", "MatMulNBits")
#: Layers whose weight is a matrix W[out, in·kernel] over input channels (ConvTranspose is not:
#: its weight is laid out input-first and it scatters rather than gathers).
MATRIX_LAYER_OPS = ("Conv", "Gemm", "MatMul")
#: Convolutions (their weights carry a kernel window after the two channel axes).
CONV_OPS = ("Conv", "ConvTranspose")
#: Layers with a bias input and an explicit per-output-channel weight layout (no batched MatMul).
BIASED_LAYER_OPS = ("Conv", "ConvTranspose", "Gemm")
#: Ops that join several activations; a per-channel affine map after one has no single layer to go into.
JOIN_OPS = ("Add", "Sum", "Concat", "Mul", "Sub", "Max", "Min")
#: Activations that clamp to constant bounds.
CLIP_OPS = ("Relu", "Clip")


def is_layer(node, ops: tuple[str, ...] = LAYER_OPS) -> bool:
    return node is not None and node.op in ops


# ----------------------------------------------------------------------------- node inputs

def input_at(node, i: int):
    """Input ``i`` of ``node`` when it is present (optional inputs may be missing or have no name)."""
    if i < len(node.inputs) and node.inputs[i] is not None and node.inputs[i].name:
        return node.inputs[i]
    return None


def const_at(node, i: int) -> np.ndarray | None:
    """The constant value of input ``i`` (None when absent or computed at run time)."""
    t = input_at(node, i)
    return ir.const(t) if t is not None else None


def layer_weight(node) -> np.ndarray | None:
    """The constant weight (input 1) of a Conv / ConvTranspose / Gemm / MatMul, else None.
    A Gemm with ``transA`` has no per-channel weight layout here: None."""
    if not is_layer(node) or (node.op == "Gemm" and node.attrs.get("transA", 0)):
        return None
    return const_at(node, 1)


def out_channels(node, w_shape: tuple | None = None) -> int:
    """Output channels (features) of a layer, from its weight's shape."""
    w_shape = tuple(w_shape if w_shape is not None else ir.const(node.inputs[1]).shape)
    if node.op == "Conv":
        return w_shape[0]
    if node.op == "ConvTranspose":
        return w_shape[1] * int(node.attrs.get("group", 1))
    if node.op == "Gemm":
        return w_shape[0] if node.attrs.get("transB", 0) else w_shape[1]
    return w_shape[-1]                                   # MatMul: x[..., K] @ W[K, N]


def in_channels(node, w_shape: tuple | None = None) -> int:
    """Input channels (features) a layer reads, from its weight's shape."""
    w_shape = tuple(w_shape if w_shape is not None else ir.const(node.inputs[1]).shape)
    if node.op == "Conv":
        return w_shape[1] * int(node.attrs.get("group", 1))
    if node.op == "ConvTranspose":
        return w_shape[0]
    if node.op == "Gemm":
        return w_shape[1] if node.attrs.get("transB", 0) else w_shape[0]
    return w_shape[-2]


def out_axis(node, rank: int = 2) -> int | None:
    """The axis of a layer's weight (of ``rank`` dims) that indexes output channels when it is one
    axis (None for a grouped ConvTranspose, whose output channel spreads over two axes)."""
    if node.op == "Conv":
        return 0
    if node.op == "ConvTranspose":
        return 1 if int(node.attrs.get("group", 1)) == 1 else None
    if node.op == "Gemm":
        return 0 if node.attrs.get("transB", 0) else 1
    return rank - 1                                      # MatMul: W[..., K, N]


def channel_index(node, w_shape, side: str) -> np.ndarray:
    """For every entry of a layer's weight, the output (``side="out"``) or input (``"in"``) channel it
    belongs to, as an integer array that broadcasts against ``w_shape``. Grouped convolutions
    included: Conv W[o, j] reads input channel (o // (Cout/g))·(Cin/g) + j; ConvTranspose
    W[c, j] writes output channel (c // (Cin/g))·(Cout/g) + j.

    With it, per-channel vectors act on weights the same way for every layer:
    ``w * a[channel_index(node, w.shape, "out")]`` scales output channels."""
    w_shape = tuple(w_shape)
    tail = (1,) * (len(w_shape) - 2)
    op = node.op
    if op in CONV_OPS:
        groups = int(node.attrs.get("group", 1))
        rows, cols = w_shape[0], w_shape[1]
        grouped = (np.arange(rows) // (rows // groups))[:, None] * cols + np.arange(cols)[None, :]
        plain = np.arange(rows).reshape((-1, 1) + tail)
        spread = grouped.reshape((rows, cols) + tail)
        if (op == "Conv") == (side == "out"):
            return plain                                 # Conv outputs, ConvTranspose inputs: axis 0
        return spread
    if op == "Gemm" and node.attrs.get("transB", 0):     # B[N, K]
        return np.arange(w_shape[0]).reshape(-1, 1) if side == "out" else np.arange(w_shape[1]).reshape(1, -1)
    if op in ("Gemm", "MatMul") and len(w_shape) == 2:   # B[K, N]
        return np.arange(w_shape[1]).reshape(1, -1) if side == "out" else np.arange(w_shape[0]).reshape(-1, 1)
    raise ValueError(f"{op} with a weight of shape {w_shape} has no per-channel layout here")


def per_channel_weight(node, a: np.ndarray, w_shape, side: str) -> np.ndarray:
    """``a`` (one value per output or input channel) spread to multiply the layer's weight."""
    return np.asarray(a)[channel_index(node, w_shape, side)]


def channel_matrix(node, w: np.ndarray, side: str) -> np.ndarray:
    """The weight's entries grouped by output or input channel: a [channels, entries] array (row c
    holds every entry ``channel_index`` maps to c), for per-channel reductions."""
    w = np.asarray(w)
    op = node.op
    if op in CONV_OPS and (op == "Conv") != (side == "out"):
        groups = int(node.attrs.get("group", 1))
        rows, cols = w.shape[0], w.shape[1]
        blocks = w.reshape(groups, rows // groups, cols, -1).transpose(0, 2, 1, 3)    # [g, cols, rows/g, k]
        return blocks.reshape(groups * cols, -1)
    if op in CONV_OPS:
        return w.reshape(w.shape[0], -1)
    transb = op == "Gemm" and node.attrs.get("transB", 0)
    axis = (0 if transb else 1) if side == "out" else (1 if transb else 0)
    return np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)


def weight_times_input(node, w: np.ndarray, c: np.ndarray) -> np.ndarray:
    """What the layer adds to each output channel when its input is the constant ``c`` per input
    channel (the kernel window summed, borders ignored): Σ_{entries e of output o} W[e] · c[in(e)]."""
    w = np.asarray(w, np.float64)
    full = w * per_channel_weight(node, np.asarray(c, np.float64), w.shape, "in")
    return channel_matrix(node, full, "out").sum(axis=1)


def channel_ranges(node, w: np.ndarray, side: str) -> np.ndarray:
    """max |W| over the entries of each output or input channel (float64)."""
    w = np.asarray(w)
    if w.dtype.kind != "f":
        w = w.astype(np.float64)
    if node.op in ("Gemm", "MatMul") and w.ndim == 2 and w.size:
        # max |w| = max(max w, -min w) reduced along the other axis: no weight-sized temporary (a
        # 25088 x 4096 FC's input channels were a transposed float64 copy, then its abs); + 0.0: no -0
        transb = node.op == "Gemm" and node.attrs.get("transB", 0)
        other = (1 if transb else 0) if side == "out" else (0 if transb else 1)   # channel_matrix's axis's other
        return np.maximum(w.max(axis=other), -w.min(axis=other)).astype(np.float64) + 0.0
    return np.abs(channel_matrix(node, w, side)).max(axis=1).astype(np.float64)


def clip_bounds(node) -> tuple[float, float] | None:
    """[lo, hi] of a Relu or Clip (attributes before opset 11, optional inputs after; an absent
    bound is -inf / +inf), or None when a bound is not a constant or the node is neither."""
    if node.op == "Relu":
        return 0.0, float("inf")
    if node.op != "Clip":
        return None
    bounds = []
    for i, key, absent in ((1, "min", -np.inf), (2, "max", np.inf)):
        if key in node.attrs:
            bounds.append(float(node.attrs[key]))
            continue
        t = input_at(node, i)
        if t is None:
            bounds.append(float(absent))
            continue
        v = ir.const(t)
        if v is None:
            return None
        bounds.append(float(np.asarray(v).reshape(-1)[0]))
    return bounds[0], bounds[1]


def pads_with_zero(node) -> bool:
    """A Pad that adds only zeros (constant mode, value 0 or absent) or copies of its input (edge,
    reflect): it commutes with a positive per-channel scale, and its output values lie in the input's
    range plus 0."""
    if node.op != "Pad":
        return False
    mode = node.attrs.get("mode", "constant")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    if mode != "constant":
        return mode in ("edge", "reflect")
    value = input_at(node, 2)
    if value is None:
        return True
    v = ir.const(value)
    return v is not None and v.size <= 1 and float(np.asarray(v).reshape(-1)[0] if v.size else 0.0) == 0.0


# ----------------------------------------------------------------------------- convolution geometry

@dataclass
class ConvGeometry:
    """A 2-D convolution's window (1-D convolutions as height 1)."""
    kernel: tuple[int, int]
    strides: tuple[int, int] = (1, 1)
    dilations: tuple[int, int] = (1, 1)
    pads: tuple[int, int, int, int] = (0, 0, 0, 0)   # top, left, bottom, right
    group: int = 1

    def out_hw(self, h: int, w: int) -> tuple[int, int]:
        (kh, kw), (sh, sw), (dh, dw) = self.kernel, self.strides, self.dilations
        pt, pl, pb, pr = self.pads
        return ((h + pt + pb - dh * (kh - 1) - 1) // sh + 1, (w + pl + pr - dw * (kw - 1) - 1) // sw + 1)


def conv_geometry(attrs: dict, w_shape, x_spatial) -> ConvGeometry:
    """ONNX Conv attributes (1-D or 2-D, auto_pad included) -> ConvGeometry in 2-D form."""
    rank = len(w_shape) - 2
    if rank not in (1, 2):
        raise ModelError(f"only 1-D and 2-D convolutions are supported, got {rank}-D")
    kernel = list(attrs.get("kernel_shape") or w_shape[2:])
    strides = list(attrs.get("strides") or [1] * rank)
    dil = list(attrs.get("dilations") or [1] * rank)
    pads = list(attrs.get("pads") or [0] * (2 * rank))
    auto = attrs.get("auto_pad", "NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        pads = [0] * (2 * rank)
        for d in range(rank):
            out = -(-x_spatial[d] // strides[d])
            total = max(0, (out - 1) * strides[d] + dil[d] * (kernel[d] - 1) + 1 - x_spatial[d])
            small, big = total // 2, total - total // 2
            pads[d], pads[d + rank] = (small, big) if auto == "SAME_UPPER" else (big, small)
    elif auto == "VALID":
        pads = [0] * (2 * rank)
    if rank == 1:
        return ConvGeometry((1, kernel[0]), (1, strides[0]), (1, dil[0]), (0, pads[0], 0, pads[1]),
                            int(attrs.get("group", 1)))
    return ConvGeometry(tuple(kernel), tuple(strides), tuple(dil), (pads[0], pads[1], pads[2], pads[3]),
                        int(attrs.get("group", 1)))


# ----------------------------------------------------------------------------- integer types

#: Saturation bounds of every integer storage type (int4/uint4 are held in int8/uint8 arrays).
INT_RANGES = {"int8": (-128, 127), "uint8": (0, 255), "int16": (-32768, 32767), "uint16": (0, 65535),
              "int4": (-8, 7), "uint4": (0, 15), "int32": (-2**31, 2**31 - 1)}
INT32 = INT_RANGES["int32"]


def is_signed(storage: str) -> bool:
    return INT_RANGES[storage][0] < 0


def storage_bits(storage: str) -> int:
    lo, hi = INT_RANGES[storage]
    return int(hi - lo).bit_length()


def storage_np_dtype(storage: str):
    """The numpy dtype of a storage type (ONNX's int4/uint4 numpy types for 4-bit)."""
    if storage in ("int4", "uint4"):
        import onnx
        return onnx.helper.tensor_dtype_to_np_dtype(
            onnx.TensorProto.INT4 if storage == "int4" else onnx.TensorProto.UINT4)
    return np.dtype(storage)


def storage_name(dtype) -> str:
    """The storage type name of a numpy integer dtype (4-bit types included)."""
    return np.dtype(dtype).name


# ----------------------------------------------------------------------------- quantization parameters

@dataclass
class QParams:
    """How one tensor is quantized. ``scale``/``zero_point`` are scalars (per tensor) or 1-D (per axis).

    ``storage`` is the ONNX element type the integers are stored in; ``bits`` the bit width actually
    used (4-bit weights may be stored as int8 with the narrow range [-7, 7]). ``levels``: the integers
    a non-uniform grid allows (sorted; binary [-1, 1], power-of-two [-4, -2, -1, 0, 1, 2, 4], ...),
    None for every integer in [qmin, qmax].
    """
    scale: np.ndarray
    zero_point: np.ndarray
    storage: str = "int8"
    bits: int = 8
    qmin: int = -128
    qmax: int = 127
    axis: int | None = None
    symmetric: bool = False
    method: str = "minmax"
    rmin: np.ndarray | float = 0.0   # the decided real range, before widening to contain 0
    rmax: np.ndarray | float = 0.0
    meta: dict = field(default_factory=dict)
    levels: np.ndarray | None = None

    @property
    def per_channel(self) -> bool:
        return self.axis is not None

    @property
    def np_dtype(self):
        return storage_np_dtype(self.storage)

    def real_range(self) -> tuple[np.ndarray, np.ndarray]:
        """The real values of qmin and qmax: what QuantizeLinear saturates to."""
        s = self.scale.astype(np.float64)
        z = self.zero_point.astype(np.float64)
        return s * (self.qmin - z), s * (self.qmax - z)

    def to_dict(self) -> dict:
        def val(v):
            a = np.asarray(v)
            return a.item() if a.ndim == 0 else a.tolist()
        out = {"scale": val(self.scale), "zero_point": val(self.zero_point), "storage": self.storage,
               "bits": self.bits, "axis": self.axis, "symmetric": self.symmetric, "method": self.method}
        if self.levels is not None:
            out["levels"] = val(self.levels)
        return out


def bias_qparams(scale) -> QParams:
    """int32 bias with scale s_x·s_w (per channel when ``scale`` is a vector), zero point 0."""
    scale = np.asarray(scale, np.float32)
    return QParams(scale=scale, zero_point=np.zeros(np.shape(scale), np.int32), storage="int32", bits=32,
                   qmin=INT32[0], qmax=INT32[1], axis=0 if scale.ndim == 1 else None, symmetric=True,
                   method="bias")


def quantize(x: np.ndarray, qp: QParams) -> np.ndarray:
    """QuantizeLinear on an array (round half to even, saturate), as int64 values; on a grid with
    ``levels``, the nearest allowed level (``nearest_level``)."""
    s, z = _broadcast(qp, np.ndim(x))
    if qp.levels is not None:
        return nearest_level(x / s, qp.levels) + z.astype(np.int64)
    return np.clip(np.rint(x / s) + z, qp.qmin, qp.qmax).astype(np.int64)


def nearest_level(v: np.ndarray, levels: np.ndarray) -> np.ndarray:
    """Each value of ``v`` (in units of the scale) projected on the nearest of the sorted integer
    ``levels`` (a value half-way between two levels takes the upper one), as int64."""
    levels = np.asarray(levels, np.int64)
    mids = (levels[1:] + levels[:-1]) / 2.0
    return levels[np.searchsorted(mids, np.asarray(v, np.float64), side="right")]


def dequantize(q: np.ndarray, qp: QParams) -> np.ndarray:
    """DequantizeLinear: (q - z) * s in float32 (exact for integers of up to 24 bits)."""
    s, z = _broadcast(qp, np.ndim(q))
    return dequantize_array(q, s, z)


def dequantize_array(q: np.ndarray, scale, zero_point) -> np.ndarray:
    """(q - zero_point) * scale in float32, with scale and zero point already broadcast against q."""
    d = (np.asarray(q, np.int64) - np.asarray(zero_point).astype(np.int64)).astype(np.float32)
    return (d * np.asarray(scale, np.float32)).astype(np.float32)


def fake_quant(x: np.ndarray, qp: QParams) -> np.ndarray:
    return dequantize(quantize(x, qp), qp)


def _broadcast(qp: QParams, ndim: int):
    s = np.asarray(qp.scale, np.float32)
    z = np.asarray(qp.zero_point).astype(np.float32)
    if qp.axis is not None and s.ndim == 1:
        shape = [1] * ndim
        shape[qp.axis] = -1
        s, z = s.reshape(shape), z.reshape(shape)
    return s, z


# ----------------------------------------------------------------------------- requantization

REQUANT_MODES = ("float", "fixed")


def fixed_multiplier(scale) -> tuple[np.ndarray, np.ndarray]:
    """Split each positive scale M into an int32 multiplier m in [2^30, 2^31) and a right shift n,
    M = m · 2^-n (gemmlowp / TFLite). Tiny scales drop low multiplier bits to keep n <= 62."""
    scale = np.asarray(scale, np.float64).reshape(-1)
    mult = np.zeros(scale.shape, np.int64)
    shift = np.zeros(scale.shape, np.int64)
    for i, s in enumerate(scale):
        if not s > 0:
            mult[i], shift[i] = 0, 1
            continue
        m, e = np.frexp(s)                       # s = m * 2^e, m in [0.5, 1)
        q = int(round(m * (1 << 31)))
        if q == 1 << 31:
            q //= 2
            e += 1
        n = 31 - int(e)
        if n < 1:
            raise ValueError(f"requantization scale {s} >= 2^30 cannot be a fixed-point multiplier")
        if n > 62:
            q >>= min(n - 62, 31)
            n = 62
        mult[i], shift[i] = q, n
    return mult, shift


def rescale(v: np.ndarray, m, mode: str) -> np.ndarray:
    """Integers ``v`` times a real multiplier ``m`` (scalar or broadcasting), rounded to integers:

        float:  rne(float32(v) · float32(m))                  (ONNX Runtime's MLAS)
        fixed:  (v · mult + 2^(n-1)) >> n,  M = mult · 2^-n    (integer-only hardware, round half up)
    """
    if mode == "float":
        return np.rint(np.asarray(v).astype(np.float32) * np.asarray(m, np.float32)).astype(np.int64)
    if mode != "fixed":
        raise ValueError(f"mode must be one of {REQUANT_MODES}, got {mode!r}")
    m = np.asarray(m, np.float32)
    mult, shift = fixed_multiplier(m.reshape(-1))
    mult, shift = mult.reshape(m.shape), shift.reshape(m.shape)
    return (np.asarray(v, np.int64) * mult + (np.int64(1) << (shift - 1))) >> shift


def requantize(acc, scale, zp: int, qmin: int, qmax: int, mode: str = "float") -> np.ndarray:
    """int32 accumulators (outer, C, inner) -> clamp(rescale(acc, scale_c) + zp, qmin, qmax),
    scale per channel (length C) or one for all. The plain definition the kernels are tested against."""
    acc = np.asarray(acc)
    scale = np.asarray(scale, np.float32).reshape(1, -1, 1)
    return np.clip(rescale(acc, scale, mode) + int(zp), qmin, qmax)


# ----------------------------------------------------------------------------- QDQ groups

def is_dq(node) -> bool:
    return node is not None and node.op == "DequantizeLinear"


def is_q(node) -> bool:
    return node is not None and node.op == "QuantizeLinear"


def qparams_of(node) -> QParams:
    """The QParams of a Q or DQ node (scale and zero point must be constants)."""
    scale = ir.const(node.inputs[1])
    zp_t = input_at(node, 2)
    zp = ir.const(zp_t) if zp_t is not None else None
    if is_dq(node):
        stored = ir.const(node.inputs[0])
        dtype = stored.dtype if stored is not None else (zp.dtype if zp is not None else np.dtype(np.uint8))
    else:
        dtype = zp.dtype if zp is not None else np.dtype(np.uint8)
    storage = storage_name(dtype)
    zp = np.zeros(np.shape(scale), dtype=np.int64) if zp is None else zp
    lo, hi = INT_RANGES.get(storage, INT32)
    axis = node.attrs.get("axis", 1) if np.ndim(scale) == 1 and np.size(scale) > 1 else None
    return QParams(scale=np.asarray(scale, np.float32), zero_point=np.asarray(zp), storage=storage,
                   bits=storage_bits(storage) if storage in INT_RANGES else 32, qmin=lo, qmax=hi, axis=axis)


@dataclass
class QGroup:
    """One quantized layer: DQ(x) [, DQ(w)] [, DQ(b)] -> node -> Q(y).

    ``inputs_dq`` holds a DQ (or None) for every input of ``node`` in order; ``y_q`` the one
    QuantizeLinear reading the output (None when absent or not alone). For MatMul/Gemm with the
    weight on the left, ``w_index`` says so.
    """
    node: object
    inputs_dq: list = field(default_factory=list)
    y_q: object = None
    w_index: int | None = None

    @property
    def x_dq(self):
        i = 0 if self.w_index != 0 else 1
        return self.inputs_dq[i] if i < len(self.inputs_dq) else None

    @property
    def w_dq(self):
        return self.inputs_dq[self.w_index] if self.w_index is not None else None

    @property
    def b_dq(self):
        if self.node.op in BIASED_LAYER_OPS and len(self.inputs_dq) > 2:
            return self.inputs_dq[2]
        return None

    @property
    def weight_int(self) -> np.ndarray | None:
        return ir.const(self.w_dq.inputs[0]) if self.w_dq is not None else None

    @property
    def weight_qparams(self) -> QParams | None:
        return qparams_of(self.w_dq) if self.w_dq is not None else None

    def weight_float(self) -> np.ndarray | None:
        """The weight as the model computes with it (dequantized)."""
        w = self.weight_int
        return None if w is None else dequantize(w.astype(np.int64), self.weight_qparams)

    @property
    def complete(self) -> bool:
        """Every float input comes from DQ and the output goes to Q: the group ORT fuses."""
        return self.y_q is not None and self.x_dq is not None and \
            (self.w_index is None or self.w_dq is not None)


def find_groups(g, ops: tuple[str, ...] = LAYER_OPS) -> list[QGroup]:
    """Every node of ``ops`` with at least one input from DequantizeLinear, as a QGroup."""
    groups = []
    for node in g.nodes:
        if node.op not in ops:
            continue
        group = match_group(node)
        if group is not None:
            groups.append(group)
    return groups


def match_group(node) -> QGroup | None:
    """``node`` as a QGroup when at least one of its inputs comes from DequantizeLinear, else None."""
    dqs = [ir.producer(t) if t is not None and is_dq(ir.producer(t)) else None for t in node.inputs]
    if not any(dqs):
        return None
    w_index = None
    if node.op in LAYER_OPS:
        for i, dq in enumerate(dqs[:2]):
            if dq is not None and ir.const(dq.inputs[0]) is not None:
                w_index = i
                break
    readers = ir.consumers(node.outputs[0]) if node.outputs else []
    y_q = readers[0] if len(readers) == 1 and is_q(readers[0]) else None
    return QGroup(node=node, inputs_dq=dqs, y_q=y_q, w_index=w_index)


def output_quantizer(g, node, through: tuple[str, ...] = ()) -> tuple | Skip:
    """The QuantizeLinear that quantizes ``node``'s output, following a chain of ``through`` ops
    (Relu / Clip: the integer op's output clamp): (Q, [clamp nodes], [twin Qs]), or a Skip.

    Several Q readers with equal scale, zero point and attributes (one per consumer, as quantizers
    write dedicated Q/DQ pairs) are one quantizer: the first, and the others as twins."""
    out = node.outputs[0]
    chain = []
    while True:
        users = ir.consumers(out)
        if len(users) > 1 and all(is_q(u) for u in users) and not ir.is_graph_output(g, out) \
                and all(_same_quantizer(users[0], u) for u in users):
            return users[0], chain, users[1:]
        if ir.is_graph_output(g, out) or len(users) != 1:
            return Skip("output_not_quantized", "its output is not quantized by exactly one QuantizeLinear")
        nxt = users[0]
        if is_q(nxt):
            return nxt, chain, []
        if nxt.op in through:
            chain.append(nxt)
            out = nxt.outputs[0]
            continue
        return Skip("output_not_quantized", f"its output goes to {nxt.op}, not to QuantizeLinear")


def _same_quantizer(a, b) -> bool:
    pa = [ir.const(t) for t in a.inputs[1:]]
    pb = [ir.const(t) for t in b.inputs[1:]]
    return (len(pa) == len(pb) and all(x is not None and y is not None and x.dtype == y.dtype
                                       and np.array_equal(x, y) for x, y in zip(pa, pb))
            and a.attrs == b.attrs)


def float_source(dq):
    """For an activation DQ: the float tensor its Q quantizes (None for constants)."""
    q = ir.producer(dq.inputs[0])
    return q.inputs[0] if is_q(q) else None


# ----------------------------------------------------------------------------- rule outcomes

class Skip(Exception):
    """Why a rewrite rule did not apply: a short ``reason`` key (what reports count and tests assert)
    and a ``detail`` for people. Raised inside a rule, or returned as a value (``Skip`` is both)."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(reason)
        self.reason = reason
        self.detail = detail

    def __str__(self) -> str:
        return self.reason + (f" ({self.detail})" if self.detail else "")

    def __eq__(self, other) -> bool:
        return isinstance(other, Skip) and (self.reason, self.detail) == (other.reason, other.detail)

    def __hash__(self) -> int:
        return hash((self.reason, self.detail))


# ----------------------------------------------------------------------------- ONNX Runtime

class OrtLoadError(QGraphError):
    """ONNX Runtime refused to load a model (``ort_session``)."""


def ort_session(model, *, threads: int = 0, optimize: bool | str = True, lean: bool = False, arena: bool = True):
    """One ONNX Runtime CPU session for a ModelProto, an ``ir.Graph``, a serialized model (bytes) or an
    .onnx file. A model over protobuf's 2 GB
    limit goes through a temporary folder (a graph's weights streamed into it, never copied into a
    ModelProto) that is removed as soon as the session holds its weights.
    ``optimize=False`` turns ONNX Runtime's graph optimizations (and so its QDQ fusions) off; a
    string names the level (``"ORT_ENABLE_BASIC"``, ...). ``lean=True`` trades speed for memory,
    for short runs: no memory arena, and no CPU-specific layout (NCHWc: reordered weight copies and
    buffers); the QDQ fusions stay. ``arena=False``: no memory arena only (the same kernels and
    numbers; each tensor is allocated and freed as it is used instead of from a pool that keeps its
    high-water mark: EfficientNet-Lite0 calibration 30 MB less at batch 4, as fast here)."""
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.log_severity_level = 4   # fatal only: ORT logs a failing run to stderr; the error we raise says it in one line
    if threads:
        so.intra_op_num_threads = threads
    if not arena:
        so.enable_cpu_mem_arena = False
    if lean:
        so.enable_cpu_mem_arena = False
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    if isinstance(optimize, str):
        so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, optimize)
    elif not optimize:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        if isinstance(model, (str, os.PathLike, bytes)):
            return ort.InferenceSession(model if isinstance(model, bytes) else os.fspath(model), so, providers=["CPUExecutionProvider"])
        if not ir.is_large(model):
            if isinstance(model, ir.Graph):
                model = ir.to_model(model)
            return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
        tmp = tempfile.mkdtemp(prefix="qgraph-ort-")
        try:
            path = os.path.join(tmp, "model.onnx")
            ir.save(model, path)
            return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    except QGraphError:
        raise
    except Exception as exc:
        raise OrtLoadError(f"ONNX Runtime cannot load the model: {ir.first_line(exc)}") from None


# ----------------------------------------------------------------------------- ORT's u8 x s8 pair sums
#
# On x86 CPUs without VNNI (AVX2, AVX-512BW) ONNX Runtime's u8 x s8 GEMMs (every 8-bit QDQ Conv /
# Gemm / MatMul, s8s8 included: it stores int8 activations as uint8) multiply with vpmaddubsw, which
# adds the two products of each pair of adjacent k (k = 2j, 2j+1 in the GEMM's K order) in int16 with
# saturation: acc += sat16(a[2j] * w[2j] + a[2j+1] * w[2j+1]). K order: a MatMul's / Gemm's K; a
# convolution's im2col k = (i*KW + j)*Cin_g + c. A u8 activation is anything in 0..255, so a pair can
# saturate exactly when its weights have one sign and |w0| + |w1| > PAIR_LIMIT (255 * 128 = 32640 fits
# int16; 255 * 129 does not). Weights with no such pair compute the same integers on every CPU class.
# Which class ORT runs on is ``qgraph.kernels.cpu.ort_path`` (the runtime's business).

PAIR_LIMIT = 128          # same-sign |w0| + |w1| of an adjacent pair that 255 * (.) keeps inside int16


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
