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
from functools import lru_cache

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
        """c_p per plane (int64; one array per encoding, shared: do not write to it)."""
        return _coefs(self.kind, self.bits)

    @property
    def fill(self) -> int:
        """The stored value whose planes are all 0 (pads rows to whole words)."""
        return -self.add

    def label(self) -> str:
        return "±1" if self.kind == "pm1" else f"{self.bits}-bit {'signed' if self.kind == 'twos' else 'unsigned'}"


@lru_cache(maxsize=64)
def _coefs(kind: str, bits: int) -> np.ndarray:
    if kind == "pm1":
        c = np.array([2], np.int64)
    else:
        c = np.array([1 << p for p in range(bits)], np.int64)
        if kind == "twos":
            c[-1] = -c[-1]
    return c


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


# ----------------------------------------------------------------------------- packing straight from NCHW

def _interleave(builder, a, b, n: int):
    """<2n> elements a0 b0 a1 b1 ... of two <n> vectors."""
    mask = ir.Constant(ir.VectorType(ir.IntType(32), 2 * n), [i // 2 + (i % 2) * n for i in range(2 * n)])
    return builder.shuffle_vector(a, b, mask)


@intrinsic
def _channel_words(typingctx, src, s_off, hw, nch, cnt, add, sh, dst, d_off, tstride, sums, p_off, coef):
    """64 uint64 plane words, one per pixel, from channel-major bytes: word i (pixels i < ``cnt``; the
    others 0), stored in ``dst`` at uint64 ``d_off + (i // 16) * tstride + i % 16`` (16 pixels' words are
    a panel's lanes), has bit j = bit ``sh`` of the byte (src[s_off + j*hw + i] + add), for channels
    j < ``nch`` (<= 64; higher bits 0), pixels i = 0..63. The 64 pixels of a channel are one 64-byte
    load; eight channels' bits are gathered into one byte per pixel with vector shifts and ors (one
    <64 x i8> per 8 channels, groups past ``nch`` skipped), and the eight byte vectors are interleaved
    into 64-bit words by three rounds of shuffles (bytes, then 16-bit, then 32-bit pairs). A group's
    channels past ``nch`` read the last channel again (in bounds) and are masked off. Each pixel's
    sums[p_off + i] += coef * popcount(word i) (sums holds 64 values from p_off)."""
    sig = types.void(src, types.intp, types.intp, types.intp, types.intp, types.uint8, types.uint8, dst, types.intp,
                     types.intp, sums, types.intp, types.int64)

    def codegen(context, builder, signature, args):
        _, s_off_v, hw_v, nch_v, cnt_v, add_v, sh_v, _, d_off_v, ts_v, _, p_off_v, coef_v = args
        i8, i32, i64 = ir.IntType(8), ir.IntType(32), ir.IntType(64)
        v64 = ir.VectorType(i8, WORD)
        src_p = builder.bitcast(context.make_array(signature.args[0])(context, builder, args[0]).data, i8.as_pointer())
        dst_p = builder.bitcast(context.make_array(signature.args[7])(context, builder, args[7]).data, i64.as_pointer())
        base = builder.gep(src_p, [s_off_v])
        zero = ir.Constant(v64, None)
        splat = ir.Constant(ir.VectorType(i32, WORD), None)

        def bcast(val):
            return builder.shuffle_vector(builder.insert_element(zero, val, ir.Constant(i32, 0)), zero, splat)

        addv, shv, one = bcast(add_v), bcast(sh_v), ir.Constant(v64, [1] * WORD)
        last = builder.sub(nch_v, ir.Constant(i64, 1))
        accs = []
        for g in range(8):
            start = builder.block
            body = builder.append_basic_block(f"group{g}")
            done = builder.append_basic_block(f"group{g}_done")
            builder.cbranch(builder.icmp_signed("<", ir.Constant(i64, 8 * g), nch_v), body, done)
            builder.position_at_end(body)
            acc = zero
            for c in range(8):
                ch = ir.Constant(i64, 8 * g + c)
                ok = builder.icmp_signed("<", ch, nch_v)
                p = builder.gep(base, [builder.mul(builder.select(ok, ch, last), hw_v)])
                v = builder.load(builder.bitcast(p, v64.as_pointer()), align=1)
                t = builder.and_(builder.lshr(builder.add(v, addv), shv), one)
                t = builder.select(ok, t, zero)
                acc = builder.or_(acc, builder.shl(t, ir.Constant(v64, [c] * WORD)) if c else t)
            body_end = builder.block
            builder.branch(done)
            builder.position_at_end(done)
            phi = builder.phi(v64)
            phi.add_incoming(zero, start)
            phi.add_incoming(acc, body_end)
            accs.append(phi)
        v16 = [builder.bitcast(_interleave(builder, accs[2 * i], accs[2 * i + 1], WORD),
                               ir.VectorType(ir.IntType(16), WORD)) for i in range(4)]
        v32 = [builder.bitcast(_interleave(builder, v16[2 * i], v16[2 * i + 1], WORD), ir.VectorType(i32, WORD))
               for i in range(2)]
        vw = ir.VectorType(i64, WORD)
        words = builder.bitcast(_interleave(builder, v32[0], v32[1], WORD), vw)
        iota = ir.Constant(vw, list(range(WORD)))
        cnt_splat = builder.shuffle_vector(builder.insert_element(ir.Constant(vw, None), cnt_v, ir.Constant(i32, 0)),
                                           ir.Constant(vw, None), splat)
        words = builder.select(builder.icmp_signed("<", iota, cnt_splat), words, ir.Constant(vw, None))
        v16t = ir.VectorType(i64, 16)
        for j in range(WORD // 16):
            lanes = ir.Constant(ir.VectorType(i32, 16), list(range(16 * j, 16 * j + 16)))
            part = builder.shuffle_vector(words, words, lanes)
            at = builder.add(d_off_v, builder.mul(ir.Constant(i64, j), ts_v))
            builder.store(part, builder.bitcast(builder.gep(dst_p, [at]), v16t.as_pointer()), align=8)
        name = f"llvm.ctpop.v{WORD}i64"
        ctpop = builder.module.globals.get(name) or ir.Function(builder.module, ir.FunctionType(vw, [vw]), name)
        sums_arr = context.make_array(signature.args[10])(context, builder, args[10])
        sums_p = builder.bitcast(sums_arr.data, i64.as_pointer())
        sp = builder.bitcast(builder.gep(sums_p, [p_off_v]), vw.as_pointer())
        cv = builder.shuffle_vector(builder.insert_element(ir.Constant(vw, None), coef_v, ir.Constant(i32, 0)),
                                    ir.Constant(vw, None), splat)
        counts = builder.mul(builder.call(ctpop, [words]), cv)
        builder.store(builder.add(builder.load(sp, align=8), counts), sp, align=8)
        return context.get_dummy_value()

    return sig, codegen


@njit(cache=True)
def _pack_nchw(x, n_img, c, hw, tile, planes, add, shift, coefs, fill, out, sums, blk, tmp):
    """The planes of a 1x1 convolution's pixels straight from NCHW bytes: x (flat uint8) holds ``n_img``
    images of [c, hw]; pixel p = n*hw + i is a row of c values, written as ``_pack`` writes rows (tile
    must be 16): out [ceil(P / 16)][planes][words][16] uint64 (rows past P are 0) and sums[p] =
    sum_k (v - offset) (sums holds P + 64 values). Blocks of 64 pixels x 64 channels per plane go
    through ``_channel_words`` (no NHWC copy) straight into the panels when the block is whole and starts
    a panel; else through ``blk`` (uint64 [64]) word by word. An image's last block of fewer than 64
    pixels is read in place with the pixels past it masked off, unless a word's reads would pass the end
    of x (the last image's last channels): then that word's channels are copied into ``tmp`` [64, 64]
    first."""
    words = -(-c // WORD)
    ts = planes * words * tile
    p_all = n_img * hw
    sums[:] = 0
    last_t = p_all // tile
    for j in range((-(-p_all // tile) - last_t) * ts):          # the last panel's lanes past P stay 0
        out[last_t * ts + j] = 0
    for n in range(n_img):
        for i0 in range(0, hw, WORD):
            cnt = min(WORD, hw - i0)
            p0 = n * hw + i0
            direct = cnt == WORD and p0 % tile == 0
            for w in range(words):
                nch = min(WORD, c - w * WORD)
                copied = cnt < WORD and (n * c + w * WORD + nch - 1) * hw + i0 + WORD > x.shape[0]
                if copied:
                    tmp[:] = fill
                    for ch in range(nch):
                        for i in range(cnt):
                            tmp[ch * WORD + i] = x[(n * c + w * WORD + ch) * hw + i0 + i]
                for q in range(planes):
                    sh = np.uint8(q + shift)
                    d0 = (p0 // tile) * ts + (q * words + w) * tile
                    if copied:
                        _channel_words(tmp, 0, WORD, nch, cnt, add, sh, blk, 0, 16, sums, p0, coefs[q])
                    elif direct:
                        _channel_words(x, (n * c + w * WORD) * hw + i0, hw, nch, cnt, add, sh, out, d0, ts, sums, p0,
                                       coefs[q])
                    else:
                        _channel_words(x, (n * c + w * WORD) * hw + i0, hw, nch, cnt, add, sh, blk, 0, 16, sums, p0,
                                       coefs[q])
                    if not direct:
                        for i in range(cnt):
                            p = p0 + i
                            out[(p // tile) * ts + (q * words + w) * tile + p % tile] = blk[i]
