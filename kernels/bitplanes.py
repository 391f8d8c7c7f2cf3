"""Bit planes: low-bit integers as a few uint64 words per 64 values, one word per bit.

An integer operand of a dot product is written as a weighted sum of 0/1 planes plus an offset,

    v = sum_p c_p * bit_p(v) + o

in one of three encodings, chosen from the values' range:

    twos       b-bit two's complement (signed storage): c_p = 2^p for p < b-1, c_(b-1) = -2^(b-1)
               (the sign plane), o = 0; b = the fewest bits holding [min, max] (ternary: 2)
    unsigned   b-bit unsigned (uint8 storage): c_p = 2^p, o = 0; b = bit length of max
    pm1        values in {-1, +1} only: one plane bit = (v + 1) / 2, c_0 = 2, o = -1 (binary
               weights; with pm1 activations too the dot product is an XNOR-popcount)

Bit p of value v is bit (p + shift) of the byte (v + add) (twos / unsigned: add 0, shift 0; pm1:
add 1, shift 1), so a plane word is one vector compare over 64 bytes: ``_plane_word`` loads 64
bytes, adds ``add``, tests the plane's bit and turns the 64 results into one uint64 (``vptestmb``
+ ``kmovq`` on AVX-512BW, two ``vpmovmskb`` on AVX2). Value k of a row is bit k % 64 of word
k // 64; a row's last word is padded with the byte whose planes are all 0 (``fill`` = -add), so
padding adds nothing to any plane sum.

Panels: ``pack_panels`` writes rows tile by tile as ``[rows / T][planes][words][T]`` uint64, the
layout the bit-serial micro-kernel reads (T = its rows for the broadcast operand, its columns for
the vector operand), and each row's plane sum ``sum_k (v_k - o)`` for the zero-point terms.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

WORD = 64


@dataclass(frozen=True)
class Encoding:
    """How one operand's integers are split into planes (see the module docstring)."""
    kind: str            # "twos" | "unsigned" | "pm1"
    bits: int            # number of planes
    add: int             # bit p of v is bit (p + shift) of the byte (v + add)
    shift: int
    offset: int          # o: v = sum_p c_p bit_p + o

    @property
    def coefs(self) -> np.ndarray:
        """c_p per plane (int64)."""
        if self.kind == "pm1":
            return np.array([2], np.int64)
        c = np.array([1 << p for p in range(self.bits)], np.int64)
        if self.kind == "twos":
            c[-1] = -c[-1]
        return c

    @property
    def fill(self) -> int:
        """The stored value whose planes are all 0 (pads rows to whole words)."""
        return -self.add

    def label(self) -> str:
        return "±1" if self.kind == "pm1" else f"{self.bits}-bit {'signed' if self.kind == 'twos' else 'unsigned'}"


def encoding_for(lo: int, hi: int, signed: bool, zero_free: bool = False) -> Encoding:
    """The encoding with the fewest planes for integers in [lo, hi] of a signed or unsigned storage
    type; ``zero_free``: no value is 0 (then [-1, 1] is pm1, one plane)."""
    lo, hi = int(lo), int(hi)
    if signed:
        if lo == -1 and hi == 1 and zero_free:
            return Encoding("pm1", 1, 1, 1, -1)
        b = 1
        while not (-(1 << (b - 1)) <= lo and hi <= (1 << (b - 1)) - 1):
            b += 1
        return Encoding("twos", b, 0, 0, 0)
    if lo < 0:
        raise ValueError(f"unsigned values below 0: {lo}")
    return Encoding("unsigned", max(1, int(hi).bit_length()), 0, 0, 0)


def encoding_of(values: np.ndarray) -> Encoding:
    """The encoding of an integer array (int8 / uint8 storage) from its actual values."""
    v = np.asarray(values)
    signed = np.issubdtype(v.dtype, np.signedinteger)
    if v.size == 0:
        return encoding_for(0, 0, signed)
    lo, hi = int(v.min()), int(v.max())
    return encoding_for(lo, hi, signed, zero_free=signed and lo == -1 and hi == 1 and not (v == 0).any())


def input_encoding(x: np.ndarray, zx: int, padded: bool) -> Encoding:
    """The planes an activation needs: from its values, and the zero point when padding reads it."""
    x = np.asarray(x)
    signed = x.dtype == np.int8
    if x.size == 0:
        return encoding_of(np.array([zx], x.dtype))
    lo, hi, has_zero = _value_range(x.reshape(-1))
    zero_free = signed and lo == -1 and hi == 1 and not has_zero
    if padded:
        lo, hi = min(lo, int(zx)), max(hi, int(zx))
        zero_free = zero_free and int(zx) != 0
    return encoding_for(lo, hi, signed, zero_free)


@njit(cache=True)
def _min_max_zero(v):
    """(min, max, whether some value is 0) of an int8/uint8 vector in one pass, min and max kept in
    its byte type (written as selects: ``min()`` of two int8 promotes to int64 in Numba and the loop
    would not vectorize on bytes)."""
    lo = v[0]
    hi = v[0]
    z = False
    for i in range(v.shape[0]):
        x = v[i]
        lo = x if x < lo else lo
        hi = x if x > hi else hi
        z |= x == 0
    return lo, hi, z


def _value_range(v):
    """(min, max, whether some value is 0) of an int8/uint8 vector (the zeros decide +-1 or not)."""
    lo, hi, z = _min_max_zero(v)
    return int(lo), int(hi), bool(z)


# ----------------------------------------------------------------------------- packing

@intrinsic
def _plane_word(typingctx, arr, byte_off, add, mask):
    """uint64 whose bit j is ((arr.bytes[byte_off + j] + add) & mask) != 0, j = 0..63."""
    sig = types.uint64(arr, types.intp, types.uint8, types.uint8)

    def codegen(context, builder, signature, args):
        data = context.make_array(signature.args[0])(context, builder, args[0]).data
        i8 = ir.IntType(8)
        v64 = ir.VectorType(i8, WORD)
        p = builder.gep(builder.bitcast(data, i8.as_pointer()), [args[1]])
        v = builder.load(builder.bitcast(p, v64.as_pointer()), align=1)
        zero = ir.Constant(v64, None)
        add = builder.insert_element(zero, args[2], ir.Constant(ir.IntType(32), 0))
        mask = builder.insert_element(zero, args[3], ir.Constant(ir.IntType(32), 0))
        splat = ir.Constant(ir.VectorType(ir.IntType(32), WORD), None)
        add = builder.shuffle_vector(add, zero, splat)
        mask = builder.shuffle_vector(mask, zero, splat)
        bits = builder.icmp_unsigned("!=", builder.and_(builder.add(v, add), mask), zero)
        return builder.bitcast(bits, ir.IntType(64))

    return sig, codegen


@intrinsic
def popcount64(typingctx, x):
    """The number of set bits of a uint64 (``llvm.ctpop.i64``: ``popcnt`` where the CPU has it)."""
    sig = types.int64(types.uint64)

    def codegen(context, builder, signature, args):
        return builder.ctpop(args[0])

    return sig, codegen


@njit(cache=True)
def _pack(src, rows, k, tile, planes, add, shift, coefs, fill, out, sums):
    """src: [rows, >= k] bytes of the stored integers (rows at any stride, bytes contiguous) -> out
    [ceil(rows / tile)][planes][words][tile] uint64 (rows past ``rows`` are 0) and sums[r] =
    sum_k (v - offset) = sum_p c_p popcount(plane p). The output is written in order (tile by tile,
    plane, word, then the tile's rows), every word one 64-byte load in place; a row's last, partial
    word is masked to its k % 64 low bits (the bits of values past K are 0: the padding of ``fill``),
    reading past the row into the next rows' bytes. Only where such a read would run past the last
    row's K (the end of what ``src`` is known to hold) is the tail copied into a 64-byte buffer
    padded with ``fill`` first."""
    words = -(-k // WORD)
    full = k // WORD
    rem = k - full * WORD
    low = (np.uint64(1) << np.uint64(rem)) - np.uint64(1) if rem else np.uint64(0)
    rb = src.strides[0]
    end = (rows - 1) * rb + k                      # bytes of src known to exist
    tail = np.empty(WORD, np.uint8)
    cnt = np.zeros(tile, np.int64)
    o = 0
    for t in range(-(-rows // tile)):
        r0 = t * tile
        nr = min(tile, rows - r0)
        cnt[:] = 0
        for p in range(planes):
            m = np.uint8(1 << (p + shift))
            c = coefs[p]
            for w in range(words):
                for lane in range(tile):
                    if lane >= nr:
                        out[o] = 0
                        o += 1
                        continue
                    off = (r0 + lane) * rb + w * WORD
                    if w < full:
                        word = _plane_word(src, off, add, m)
                    elif off + WORD <= end:
                        word = _plane_word(src, off, add, m) & low
                    else:
                        tail[:] = fill
                        for j in range(rem):
                            tail[j] = src[r0 + lane, full * WORD + j]
                        word = _plane_word(tail, 0, add, m)
                    out[o] = word
                    o += 1
                    cnt[lane] += popcount64(word) * c
        for lane in range(nr):
            sums[r0 + lane] = cnt[lane]


def pack_panels(src: np.ndarray, enc: Encoding, tile: int, rows: int | None = None,
                k: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The first ``rows`` rows (default all) of ``src`` (int8/uint8 [R, >= K], bytes contiguous),
    K = ``k`` values each (default all columns), as panels of ``ceil(K / 64)`` words; returns
    (panels uint64, plane sums int64 [rows])."""
    rows = src.shape[0] if rows is None else rows
    k = src.shape[1] if k is None else k
    words = max(1, -(-k // WORD))
    tiles = -(-rows // tile)
    out = (np.empty if rows and k else np.zeros)(tiles * enc.bits * words * tile, np.uint64)   # _pack writes all
    sums = np.zeros(rows, np.int64)
    if src.shape[1] > 1 and src.strides[1] != src.itemsize:
        src = np.ascontiguousarray(src)
    if rows and k:
        _pack(src.view(np.uint8), rows, k, tile, enc.bits, np.uint8(enc.add & 0xFF), enc.shift, enc.coefs,
              np.uint8(enc.fill & 0xFF), out, sums)
    return out, sums


# ----------------------------------------------------------------------------- reference

def planes_reference(values: np.ndarray, enc: Encoding) -> np.ndarray:
    """Plain numpy: the 0/1 planes [planes, *values.shape] of ``values`` under ``enc``."""
    u = (np.asarray(values, np.int64) + enc.add) & 0xFF
    return np.stack([(u >> (p + enc.shift)) & 1 for p in range(enc.bits)])


def value_of_planes(planes: np.ndarray, enc: Encoding) -> np.ndarray:
    """Inverse of ``planes_reference``: sum_p c_p * plane_p + o."""
    c = enc.coefs.reshape((-1,) + (1,) * (planes.ndim - 1))
    return (planes.astype(np.int64) * c).sum(axis=0) + enc.offset
