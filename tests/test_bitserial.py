"""The bit-serial kernels (``kernels/bitserial.py``, ``kernels/bitplanes.py``) equal the int8 kernels.

Exactness is the whole contract: for every shape and bit width the bit-serial int32 accumulators,
and the requantized outputs through the shared epilogue, are those of the int8 GEMM / convolution
(``gemm.qgemm``, ``conv.conv_int``) and of the plain definitions (``qgemm_reference``,
``conv_reference``). The fuzz draws weights of 1..4 bits (+-1 too) and activations of 1..8 bits,
signed and unsigned, with zero points, K that does not fill a 64-bit word, and M / N that do not fill
a tile. A failure prints its seed and the command that reruns only that case
(``QGRAPH_FUZZ_ONLY=seed``); ``QGRAPH_FUZZ_SCALE=10`` draws ten times as many.
"""
from __future__ import annotations

import os
import re

import numpy as np
import pytest

from qgraph.kernels import bitconv, bitplanes, bitserial
from qgraph.kernels.bitplanes import encoding_for, encoding_of
from qgraph.kernels.conv import conv_int, conv_reference, pack_conv
from qgraph.kernels.gemm import pack_b, qgemm, qgemm_reference
from qgraph.ops import ConvGeometry

SCALE = int(os.environ.get("QGRAPH_FUZZ_SCALE", "1"))
ONLY = os.environ.get("QGRAPH_FUZZ_ONLY")
GEMM_CASES, CONV_CASES = 160 * SCALE, 80 * SCALE


def _seeds(n: int, base: int) -> list[int]:
    return [int(ONLY)] if ONLY else [base + i for i in range(n)]


def _operand(rng, shape, bits: int, signed: bool, pm1: bool = False) -> np.ndarray:
    """Integers of ``bits`` bits (two's complement when signed), or +-1."""
    if pm1:
        return rng.choice(np.array([-1, 1], np.int8), shape)
    if signed:
        return rng.integers(-(1 << (bits - 1)), 1 << (bits - 1), shape).astype(np.int8)
    return rng.integers(0, 1 << bits, shape).astype(np.uint8)


def _zero_point(rng, bits: int, signed: bool, size: int = 1) -> np.ndarray:
    lo, hi = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
    return rng.integers(lo, hi + 1, size).astype(np.int64)


def _reproduce(name: str, seed: int) -> str:
    return f"seed {seed}; rerun: QGRAPH_FUZZ_ONLY={seed} python -m pytest tests/test_bitserial.py -k {name}"


# ----------------------------------------------------------------------------- encodings

def test_encoding_takes_the_fewest_planes():
    assert encoding_for(-1, 1, True, zero_free=True).kind == "pm1"
    assert (encoding_for(-1, 1, True).kind, encoding_for(-1, 1, True).bits) == ("twos", 2)   # ternary
    assert encoding_for(-1, 0, True).bits == 1
    assert encoding_for(-8, 7, True).bits == 4
    assert encoding_for(-9, 7, True).bits == 5
    assert (encoding_for(0, 3, False).kind, encoding_for(0, 3, False).bits) == ("unsigned", 2)
    assert encoding_for(0, 0, False).bits == 1


@pytest.mark.parametrize("values", [[-8, -1, 0, 3, 7], [0, 1, 2, 255], [-1, 1, 1, -1], [-2, 1, 0]])
def test_planes_give_back_the_values(values):
    v = np.array(values, np.int8 if min(values) < 0 else np.uint8)
    enc = encoding_of(v)
    assert np.array_equal(bitplanes.value_of_planes(bitplanes.planes_reference(v, enc), enc), v.astype(np.int64))


def test_packed_words_are_the_planes_and_padding_is_zero(rng):
    # 70 values: one full word and one of 6 values; rows past R are zero words
    a = rng.integers(-4, 4, (3, 70)).astype(np.int8)
    enc = encoding_of(a)
    p = bitserial.pack(a, tile=4, enc=enc)
    words = p.panels.reshape(1, enc.bits, 2, 4)
    planes = bitplanes.planes_reference(a, enc)                   # [bits, 3, 70]
    for b in range(enc.bits):
        for r in range(3):
            bits = np.zeros(128, np.uint64)
            bits[:70] = planes[b, r]
            want = [int(sum(int(bits[64 * w + j]) << j for j in range(64))) for w in range(2)]
            assert [int(words[0, b, w, r]) for w in range(2)] == want
        assert not words[0, b, :, 3].any()
    assert np.array_equal(p.sums, a.astype(np.int64).sum(axis=1))


# ----------------------------------------------------------------------------- GEMM fuzz

def _gemm_case(seed: int):
    rng = np.random.default_rng(seed)
    m, n = (int(v) for v in rng.integers(1, 3 * bitserial.NR, 2))
    k = int(rng.choice([1, 7, 63, 64, 65, 130, int(rng.integers(1, 300))]))
    wb, ab = int(rng.integers(1, 5)), int(rng.integers(1, 9))
    w_pm1, x_pm1 = wb == 1 and rng.random() < 0.5, ab == 1 and rng.random() < 0.5
    w_signed, x_signed = bool(w_pm1 or rng.random() < 0.8), bool(x_pm1 or rng.random() < 0.5)
    a = _operand(rng, (m, k), ab, x_signed, x_pm1)
    b = _operand(rng, (k, n), wb, w_signed, w_pm1)
    za = _zero_point(rng, ab, x_signed, m if rng.random() < 0.2 else 1)
    zb = _zero_point(rng, wb, w_signed, n if rng.random() < 0.5 else 1)
    return a, za, b, zb


@pytest.mark.parametrize("block", range(4))
def test_fuzz_gemm_equals_the_int8_kernel(block):
    failures = []
    seeds = _seeds(GEMM_CASES // 4, 1000 + block * 10000)
    for seed in seeds if not ONLY or block == 0 else []:
        a, za, b, zb = _gemm_case(seed)
        ref = qgemm_reference(a, za, b, zb)
        ours = bitserial.matmul(a, za, bitserial.pack(np.ascontiguousarray(b.T), bitserial.NR), zb)
        int8 = qgemm(a, za, pack_b(b), zb)
        if not (np.array_equal(ours, ref) and np.array_equal(int8, ref)
                and np.array_equal(bitserial.gemm_reference(a, za, b, zb), ref)):
            failures.append(f"{a.shape}x{b.shape[1]} W {encoding_of(b).label()} A {encoding_of(a).label()}: "
                            + _reproduce("fuzz_gemm", seed))
    assert not failures, "\n".join(failures)


def test_xnor_form_is_taken_for_pm1_times_pm1(rng):
    a = _operand(rng, (5, 100), 1, True, pm1=True)
    b = _operand(rng, (100, 9), 1, True, pm1=True)
    assert bitserial.pair_table(encoding_of(a), encoding_of(b))[3]
    got = bitserial.matmul(a, 0, bitserial.pack(np.ascontiguousarray(b.T), bitserial.NR), 0)
    assert np.array_equal(got, a.astype(np.int32) @ b.astype(np.int32))
    # the same values with one 0 among them are no longer +-1: two's complement, AND form
    a[0, 0] = 0
    assert not bitserial.pair_table(encoding_of(a), encoding_of(b))[3]
    got = bitserial.matmul(a, 0, bitserial.pack(np.ascontiguousarray(b.T), bitserial.NR), 0)
    assert np.array_equal(got, a.astype(np.int32) @ b.astype(np.int32))


# ----------------------------------------------------------------------------- convolution fuzz

def _conv_case(seed: int):
    rng = np.random.default_rng(seed)
    kind = rng.choice(["dense", "grouped", "depthwise"])
    g = {"dense": 1, "grouped": int(rng.integers(2, 4)), "depthwise": int(rng.integers(1, 7))}[kind]
    cin_g = 1 if kind == "depthwise" else int(rng.integers(1, 9))
    cout = g * int(rng.integers(1, 9))
    kh, kw = (int(v) for v in rng.integers(1, 4, 2))
    dh, dw = (int(v) for v in rng.integers(1, 3, 2))
    pads = tuple(int(v) for v in rng.integers(0, 3, 4))
    geo = ConvGeometry((kh, kw), tuple(int(v) for v in rng.integers(1, 3, 2)), (dh, dw), pads, g)
    h, w = int(rng.integers(dh * (kh - 1) + 1, 12)), int(rng.integers(dw * (kw - 1) + 1, 12))
    wb, ab = int(rng.integers(1, 5)), int(rng.integers(1, 9))
    w_pm1, x_pm1 = wb == 1 and rng.random() < 0.5, ab == 1 and rng.random() < 0.5
    x_signed = bool(x_pm1 or rng.random() < 0.5)
    weights = _operand(rng, (cout, cin_g, kh, kw), wb, True, w_pm1)
    x = _operand(rng, (int(rng.integers(1, 3)), cin_g * g, h, w), ab, x_signed, x_pm1)
    zx = int(_zero_point(rng, ab, x_signed)[0])
    zw = _zero_point(rng, wb, True, cout if rng.random() < 0.5 else 1)
    scale = rng.uniform(0.001, 0.05, cout).astype(np.float32)
    bias = rng.integers(-300, 300, cout).astype(np.int32)
    fixed = bool(rng.random() < 0.5)
    zy = int(rng.integers(-20, 20))
    from qgraph.ops import fixed_multiplier
    mult, shift = fixed_multiplier(scale) if fixed else (np.zeros(cout, np.int64), np.ones(cout, np.int64))
    rq = (bias, scale, mult, shift, zy, -128, 127, fixed)
    return x, zx, weights, zw, geo, rq


@pytest.mark.parametrize("block", range(2))
def test_fuzz_conv_equals_the_int8_kernel(block):
    failures = []
    for seed in _seeds(CONV_CASES // 2, 50000 + block * 10000) if not ONLY or block == 0 else []:
        x, zx, w, zw, geo, rq = _conv_case(seed)
        ref = conv_reference(x, zx, w, zw, geo)
        bits = bitconv.pack_conv(w, geo.group)
        acc = bitconv.conv(x, zx, bits, zw, geo)
        out = bitconv.conv(x, zx, bits, zw, geo, rq=rq, out_dtype=np.int8)
        int8 = conv_int(x, zx, pack_conv(w, geo.group), zw, geo, rq=rq, out_dtype=np.int8)
        if not (np.array_equal(acc, ref) and np.array_equal(out, int8)):
            failures.append(f"{x.shape} * {w.shape} group {geo.group} W {bits.enc.label()} "
                            f"A {encoding_of(x).label()}: " + _reproduce("fuzz_conv", seed))
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("cin", [1, 63, 64, 65, 130, 192])
@pytest.mark.parametrize("pads", [(0, 0, 0, 0), (1, 0, 2, 1)])
def test_pointwise_conv_equals_the_int8_kernel(rng, cin, pads):
    # a 1x1 stride-1 single-group conv: unpadded, its planes straight from NCHW (blocks of 64 pixels x 64
    # channels; 2 x 72 pixels: an image's last block of 8 read in place and masked, the last image's copied;
    # 3 x 64: whole blocks straight into the panels; 3 x 49: no block starts a panel); padded, through im2col
    for (wb, ab, pm1), hw in zip([(1, 1, True), (2, 2, False), (1, 8, False), (4, 3, False)] * 3,
                                 [(2, 9, 8)] * 4 + [(3, 8, 8)] * 4 + [(3, 7, 7)] * 4):
        w = _operand(rng, (5, cin, 1, 1), wb, True, pm1)
        x = _operand(rng, (hw[0], cin) + hw[1:], ab, pm1 or ab == 8, pm1)
        zx = -1 if pm1 else 0
        geo = ConvGeometry((1, 1), (1, 1), (1, 1), pads, 1)
        rq = (rng.integers(-300, 300, 5).astype(np.int32), rng.uniform(0.001, 0.05, 5).astype(np.float32),
              np.zeros(5, np.int64), np.ones(5, np.int64), 3, -128, 127, False)
        bits = bitconv.pack_conv(w, 1)
        assert np.array_equal(bitconv.conv(x, zx, bits, 0, geo), conv_reference(x, zx, w, 0, geo)), (wb, ab)
        assert np.array_equal(bitconv.conv(x, zx, bits, 0, geo, rq=rq, out_dtype=np.int8),
                              conv_int(x, zx, pack_conv(w, 1), 0, geo, rq=rq, out_dtype=np.int8)), (wb, ab)


@pytest.mark.parametrize("seed", range(12))
def test_conv_with_whole_words_of_channels_equals_the_int8_kernel(seed):
    # 64 or 128 channels (one group, not pointwise): each tap is whole words, packed once per input pixel into a
    # padded frame of words (``TAP_WORDS``); kernels, strides, dilations, padding (the zero point's planes),
    # images whose pixels are not a multiple of 64 (an image's last block), +-1 and 1-4-bit activations
    rng = np.random.default_rng(7000 + seed)
    c = int(rng.choice([64, 128]))
    kh, kw = (int(v) for v in rng.integers(1, 4, 2))
    dh, dw = (int(v) for v in rng.integers(1, 3, 2))
    pads = tuple(int(v) for v in rng.integers(0, 3, 4))
    if (kh, kw) == (1, 1) and not any(pads):
        pads = (1, 0, 0, 1)
    geo = ConvGeometry((kh, kw), tuple(int(v) for v in rng.integers(1, 3, 2)), (dh, dw), pads, 1)
    h, w = int(rng.integers(dh * (kh - 1) + 1, 13)), int(rng.integers(dw * (kw - 1) + 1, 13))
    wb, ab = int(rng.integers(1, 5)), int(rng.integers(1, 5))
    w_pm1, x_pm1 = wb == 1 and seed % 2 == 0, ab == 1 and seed % 3 != 2
    x_signed = bool(x_pm1 or rng.random() < 0.5)
    weights = _operand(rng, (int(rng.integers(1, 20)), c, kh, kw), wb, True, w_pm1)
    x = _operand(rng, (int(rng.integers(1, 4)), c, h, w), ab, x_signed, x_pm1)
    zx = -1 if x_pm1 else int(_zero_point(rng, ab, x_signed)[0])
    zw = _zero_point(rng, wb, True, weights.shape[0] if rng.random() < 0.5 else 1)
    cout = weights.shape[0]
    rq = (rng.integers(-300, 300, cout).astype(np.int32), rng.uniform(0.001, 0.05, cout).astype(np.float32),
          np.zeros(cout, np.int64), np.ones(cout, np.int64), 3, -128, 127, False)
    bits = bitconv.pack_conv(weights, 1)
    assert np.array_equal(bitconv.conv(x, zx, bits, zw, geo), conv_reference(x, zx, weights, zw, geo)), \
        _reproduce("whole_words", seed)
    assert np.array_equal(bitconv.conv(x, zx, bits, zw, geo, rq=rq, out_dtype=np.int8),
                          conv_int(x, zx, pack_conv(weights, 1), zw, geo, rq=rq, out_dtype=np.int8)), \
        _reproduce("whole_words", seed)


@pytest.mark.parametrize("seed", range(8))
def test_requantizing_tiles_equal_the_int8_kernel(seed):
    # the requantization in the tile's epilogue (``bitserial._gemm_rq_into``): images whose pixels fill whole
    # 16-pixel tiles (8x8, 4x8: the tile stores bytes itself) and ones that do not (7x7, 5x3: tiles straddling
    # two images and the last, partial one go through scratch and requant_run); Cout that leaves a partial row
    # tile; fixed and float; int8 and uint8 outputs, narrow clamps (a folded Relu: qmin = zp) and accumulators
    # far outside them; per-channel and per-tensor scales; the three packings (pointwise, 64 channels, im2col)
    rng = np.random.default_rng(9100 + seed)
    cin, (kh, kw), pads = [(96, (1, 1), (0, 0, 0, 0)), (64, (3, 3), (1, 1, 1, 1)), (16, (3, 3), (1, 1, 1, 1)),
                           (5, (2, 3), (0, 1, 1, 0))][seed % 4]
    h, w = [(8, 8), (7, 7), (4, 8), (5, 3)][seed // 2 % 4]
    geo = ConvGeometry((kh, kw), (1, 1), (1, 1), pads, 1)
    pm1 = seed % 3 == 0
    wb, ab = (1, 1) if pm1 else (int(rng.integers(1, 5)), int(rng.integers(1, 5)))
    cout = int(rng.choice([5, 13, 16, 24]))
    weights = _operand(rng, (cout, cin, kh, kw), wb, True, pm1)
    x = _operand(rng, (int(rng.integers(1, 4)), cin, h, w), ab, pm1, pm1)
    zx = -1 if pm1 else int(_zero_point(rng, ab, False)[0])
    bits, pc = bitconv.pack_conv(weights, 1), pack_conv(weights, 1)
    from qgraph.ops import fixed_multiplier
    for fixed in (True, False):
        for dtype, (zy, qmin, qmax) in ((np.int8, (-3, -128, 127)), (np.uint8, (10, 10, 255)), (np.int8, (0, 0, 6))):
            scale = rng.uniform(0.0005, 0.3, cout if rng.random() < 0.5 else 1).astype(np.float32)
            mult, shift = fixed_multiplier(scale) if fixed else (np.zeros(scale.size, np.int64),
                                                                  np.ones(scale.size, np.int64))
            rq = (rng.integers(-3000, 3000, cout).astype(np.int32), scale, mult, shift, zy, qmin, qmax, fixed)
            got = bitconv.conv(x, zx, bits, 0, geo, rq=rq, out_dtype=dtype)
            want = conv_int(x, zx, pc, 0, geo, rq=rq, out_dtype=dtype)
            assert got.dtype == want.dtype and np.array_equal(got, want), \
                f"{x.shape} * {weights.shape} fixed={fixed} {np.dtype(dtype).name} {zy, qmin, qmax}: " + \
                _reproduce("requantizing_tiles", seed)


def test_compiled_encoding_choice_equals_input_encoding():
    # ``bitconv.encoding_code`` (the range check inside the compiled call) picks what ``input_encoding`` picks
    rng = np.random.default_rng(5)
    for _ in range(400):
        signed = bool(rng.random() < 0.5)
        lo, hi = sorted(int(v) for v in (rng.integers(-128, 128, 2) if signed else rng.integers(0, 256, 2)))
        if rng.random() < 0.3 and signed:
            lo, hi = -1, 1
        vals = np.array([lo, hi] + ([0] if rng.random() < 0.5 and lo <= 0 <= hi else []), np.int8 if signed else np.uint8)
        if signed and lo == -1 and hi == 1 and 0 not in vals:
            vals = np.array([-1, 1, 1], np.int8)
        for padded, zx in ((False, 0), (True, int(rng.integers(lo, hi + 1))), (True, -1 if signed else 0)):
            enc = bitplanes.input_encoding(vals, zx, padded)
            lo_, hi_, z = bitplanes._value_range(vals)
            assert bitconv.encoding_code(lo_, hi_, z, signed, padded, zx) == (bitconv.ENC_KIND[enc.kind], enc.bits), \
                (vals, zx, padded, enc)


def test_a_step_called_again_rechecks_the_encoding():
    # ``conv_again`` (the runtime's repeated call) runs only while x keeps the encoding its setup was made for:
    # +-1 input, then one with a 0 (2-bit two's complement), then +-1 again, each equal to the int8 kernel
    rng = np.random.default_rng(11)
    w = _operand(rng, (24, 64, 1, 1), 1, True, True)
    geo = ConvGeometry((1, 1), (1, 1), (1, 1), (0, 0, 0, 0), 1)
    rq = (np.zeros(24, np.int32), np.full(24, 0.05, np.float32), np.zeros(24, np.int64), np.ones(24, np.int64), 0,
          -128, 127, False)
    bits, pc = bitconv.pack_conv(w, 1), pack_conv(w, 1)
    x = _operand(rng, (1, 64, 4, 8), 1, True, True)
    x2 = x.copy()
    x2[0, 3, 1, 1] = 0
    for xi, again in ((x, None), (x, True), (x2, False), (x, False), (x, True)):
        got = bitconv.conv_again(xi, bits, 0, rq) if again is not None else None
        assert (got is not None) == bool(again)
        if got is None:
            got = bitconv.conv(xi, -1, bits, 0, geo, rq=rq, out_dtype=np.int8)
        assert np.array_equal(got, conv_int(xi, -1, pc, 0, geo, rq=rq, out_dtype=np.int8))


@pytest.mark.parametrize("seed", range(6))
def test_planes_handed_between_layers_equal_the_int8_kernel(seed):
    # a producer writes its requantized output as the planes of a pointwise consumer (``planes_out``), which
    # reads them as they are (``Planes`` in): both outputs equal the int8 kernel's two layers; the producer a
    # pointwise or a padded 3x3 conv, 1 or 2 images, channels across a 64-bit word (70, 24), narrow clamps
    # (ReLU-like [zp, 3]: 2 planes) and full int8 / uint8 ranges (8 planes), fixed and float
    rng = np.random.default_rng(9300 + seed)
    from qgraph.ops import fixed_multiplier
    cin, mid, cout = (48, 70, 24) if seed % 2 else (144, 24, 64)
    k = 3 if seed % 3 == 1 else 1
    geo1 = ConvGeometry((k, k), (1, 1), (1, 1), (k // 2,) * 4, 1)
    geo2 = ConvGeometry((1, 1), (1, 1), (1, 1), (0, 0, 0, 0), 1)
    x = _operand(rng, (1 + seed % 2, cin, 7, 9 if seed < 3 else 8), 2, False)
    w1 = _operand(rng, (mid, cin, k, k), 1, True, seed % 2 == 0)
    w2 = _operand(rng, (cout, mid, 1, 1), 2, True)
    fixed = seed % 2 == 0
    def rq(n, zy, lo, hi):
        scale = rng.uniform(0.001, 0.2, n).astype(np.float32)
        mult, shift = fixed_multiplier(scale) if fixed else (np.zeros(n, np.int64), np.ones(n, np.int64))
        return (rng.integers(-500, 500, n).astype(np.int32), scale, mult, shift, zy, lo, hi, fixed)
    mid_t, (zy1, lo1, hi1) = [(np.uint8, (0, 0, 3)), (np.int8, (-2, -128, 127)), (np.uint8, (5, 0, 255))][seed % 3]
    rq1, rq2 = rq(mid, zy1, lo1, hi1), rq(cout, 1, -128, 127)
    b1, b2 = bitconv.pack_conv(w1, 1), bitconv.pack_conv(w2, 1)
    y1 = conv_int(x, 0, pack_conv(w1, 1), 0, geo1, rq=rq1, out_dtype=mid_t)
    want = conv_int(y1, zy1, pack_conv(w2, 1), 0, geo2, rq=rq2, out_dtype=np.int8)
    for _ in range(2):                          # the second time through the layers' kept setups
        planes = bitconv.conv(x, 0, b1, 0, geo1, rq=rq1, out_dtype=mid_t, planes_out=True)
        assert planes.enc == bitconv.planes_encoding(lo1, hi1, mid_t)
        assert np.array_equal(planes.values(), y1), _reproduce("planes_handed", seed)
        got = bitconv.conv(planes, zy1, b2, 0, geo2, rq=rq2, out_dtype=np.int8)
        assert np.array_equal(got, want), _reproduce("planes_handed", seed)
    packed = bitconv.pack_planes(y1, planes.enc)                # the same planes from the int8 tensor
    assert np.array_equal(packed.panels, planes.panels) and np.array_equal(packed.sums, planes.sums)


def test_conv_padding_reads_the_zero_point_in_the_encoding():
    # +-1 activations with zero point 0 and padding: the padded 0s are values too (2 planes, not XOR)
    x = np.array([[[[1, -1], [-1, 1]]]], np.int8)
    w = np.ones((1, 1, 3, 3), np.int8)
    geo = ConvGeometry((3, 3), (1, 1), (1, 1), (1, 1, 1, 1), 1)
    assert bitplanes.input_encoding(x, 0, padded=True).kind == "twos"
    assert bitplanes.input_encoding(x, 0, padded=False).kind == "pm1"
    got = bitconv.conv(x, 0, bitconv.pack_conv(w, 1), np.zeros(1, np.int64), geo)
    assert np.array_equal(got, conv_reference(x, 0, w, np.zeros(1), geo))


# ----------------------------------------------------------------------------- the kernel choice

def test_auto_runs_bitserial_only_for_few_plane_pairs():
    w1, w2, w8 = encoding_for(-1, 1, True, True), encoding_for(-2, 1, True), encoding_for(-128, 127, True)
    a1, a2, a8 = encoding_for(-1, 1, True, True), encoding_for(0, 3, False), encoding_for(0, 255, False)
    assert bitserial.use_bitserial("auto", w1, a1, 64)
    assert bitserial.use_bitserial("auto", w2, a2, 64) == (bitserial.AUTO_MAX_PAIRS >= 4)
    assert not bitserial.use_bitserial("auto", w1, a8, 64)           # 8 pairs
    assert not bitserial.use_bitserial("auto", w1, a1, 9)            # depthwise 3x3: a word 9/64 full
    assert bitserial.use_bitserial("bitserial", w8, a8, 9)
    assert not bitserial.use_bitserial("int8", w1, a1, 64)


# ----------------------------------------------------------------------------- generated code

def _asm(dispatcher) -> str:
    """Assembly of a freshly compiled copy (a cached dispatcher has no assembly to show)."""
    from numba import njit
    fresh = njit(dispatcher.py_func)
    rng = np.random.default_rng(0)
    a = rng.integers(-2, 2, (12, 128)).astype(np.int8)
    b = rng.integers(-2, 2, (32, 128)).astype(np.int8)
    pa, pb = bitserial.pack(a, bitserial.MR), bitserial.pack(b, bitserial.NR)
    qa, qb, coef, xor = bitserial.pair_table(pa.enc, pb.enc)
    rowt, colt = bitserial._terms(pa, 0, pb, 0, xor)
    out = np.empty((12, 32), np.int32)
    fresh(pa.panels, pa.enc.bits * pa.words * bitserial.MR, pb.panels, pb.enc.bits * pb.words * bitserial.NR,
          qa, qb, coef, xor, pa.words, rowt, colt, out)
    assert np.array_equal(out, a.astype(np.int32) @ b.astype(np.int32).T)
    return fresh.inspect_asm(fresh.signatures[0])


def test_micro_kernel_uses_the_cpus_popcount_instruction():
    from qgraph.kernels import cpu
    asm = _asm(bitserial._gemm_into)
    if cpu.has("avx512vpopcntdq"):
        assert re.search(r"\bvpopcntq\b", asm), "AVX-512 VPOPCNTDQ present but no vpopcntq in the micro-kernel"
    # without VPOPCNTDQ, LLVM writes the vector popcount as a byte-table sequence (vpshufb)
    assert re.search(r"\bvpopcntq\b|\bvpshufb\b|\bpopcnt", asm)


def test_scalar_popcount_is_the_popcnt_instruction():
    from numba import njit
    from qgraph.kernels import cpu

    @njit
    def count(x):
        return bitplanes.popcount64(x)
    assert count(np.uint64(0xF0F0_0000_0000_0001)) == 9
    asm = count.inspect_asm(count.signatures[0])
    if cpu.has("popcnt"):
        assert re.search(r"\bpopcnt[q]?\b", asm), "the CPU has popcnt but the kernel does not use it"
