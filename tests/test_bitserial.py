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
