"""Bit-serial convolution: the pixels' rows as bit planes, times the weights' planes (``bitserial``).

    C[Cout_g, pixels] = W_g[Cout_g, K] @ im2col_g[K, pixels]        per group, K in (kh, kw, c) order

The weights are packed once (``pack_conv``: rows = output channels, the broadcast operand of the tile);
on each call the pixels' rows become the vector operand (pixels in the lanes, so the result is NCHW
with no transpose), in one of three ways (``_conv_setup``): a 1x1, stride-1, unpadded single-group
conv packs its planes straight from NCHW (``FROM_NCHW``, ``bitplanes._pack_nchw``); a single-group conv
whose channels are a multiple of 64 packs its input once per pixel into a padded frame of words and
gathers each output pixel's taps (``TAP_WORDS``: ``_frame_words``, ``_tap_panels``); any other copies the
input to NHWC padded with the zero point, moves im2col rows out of it 64 bytes at a time (``_im2col``:
the kw taps of one kernel row are one contiguous run when dilation is 1) and packs them (``IM2COL``).
The tile GEMM finishes the accumulators with their zero-point terms (``bitserial._gemm_into``) and each
output channel is requantized by ``requant.requant_run``, sub-chunk of pixels by sub-chunk while the
accumulators are in cache — the same accumulators and the same requantization as ``conv.conv_int``, so
the results are equal (``tests/test_bitserial.py``). The activation's encoding counts the zero point as
a value when there is padding (it is read there). Depthwise and grouped convolutions run one GEMM per
group; several small images share one GEMM.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

from qgraph.kernels.bitplanes import (WORD, Encoding, _channel_words, _min_max_zero, _pack, _pack_nchw,
                                     encoding_for, encoding_of, input_encoding, popcount64)
from qgraph.kernels.bitserial import MR, NR, BitPacked, _fill_terms, _gemm_into, _gemm_rq_into, pack, pair_table
from qgraph.kernels.requant import requant_run

#: how ``_conv_chunks`` gets the pixels' planes
IM2COL, FROM_NCHW, TAP_WORDS = 0, 1, 2


@dataclass
class BitConv:
    """A convolution's weights as bit planes, per group: rows = output channels of the group,
    K in (kh, kw, c) order (the order ``_im2col`` writes patches in)."""
    cout: int
    cin_g: int
    kernel: tuple[int, int]
    groups: list[BitPacked]
    enc: Encoding
    panels: np.ndarray            # the groups' panels stacked [group, words of one group]
    sums: np.ndarray              # their plane sums [group, Cout / group]
    cache: dict = field(default_factory=dict)     # scratch buffers reused between calls


def pack_conv(w: np.ndarray, group: int) -> BitConv:
    """W [Cout, Cin/g, KH, KW] (or 1-D [Cout, Cin/g, KW]) int8/uint8 -> bit planes per group, one
    encoding for the whole layer (from its values)."""
    w = np.asarray(w)
    if w.ndim == 3:
        w = w[:, :, None, :]
    cout, cin_g, kh, kw = w.shape
    enc = encoding_of(w)
    rows = np.ascontiguousarray(w.transpose(0, 2, 3, 1)).reshape(cout, kh * kw * cin_g)
    cg = cout // group
    groups = [pack(rows[g * cg:(g + 1) * cg], MR, enc) for g in range(group)]
    return BitConv(cout, cin_g, (kh, kw), groups, enc, np.stack([p.panels for p in groups]),
                   np.stack([p.sums for p in groups]))


@intrinsic
def _move64(typingctx, dst, d_off, src, s_off):
    """Copy 64 bytes from byte ``s_off`` of ``src``'s data to byte ``d_off`` of ``dst``'s (one vector
    load and store; the caller leaves 64 bytes of slack after both arrays' used parts)."""
    sig = types.void(dst, types.intp, src, types.intp)

    def codegen(context, builder, signature, args):
        v64 = ir.VectorType(ir.IntType(8), WORD).as_pointer()
        i8p = ir.IntType(8).as_pointer()
        d = context.make_array(signature.args[0])(context, builder, args[0]).data
        s = context.make_array(signature.args[2])(context, builder, args[2]).data
        val = builder.load(builder.bitcast(builder.gep(builder.bitcast(s, i8p), [args[3]]), v64), align=1)
        builder.store(val, builder.bitcast(builder.gep(builder.bitcast(d, i8p), [args[1]]), v64), align=1)
        return context.get_dummy_value()

    return sig, codegen


@njit(cache=True)
def _im2col(xf, hp, wp, c_all, n0, n1, c0, cin_g, kh, kw, sh, sw, dh, dw, oh, ow, fill64, rb, of):
    """Patches of images n0..n1-1 of xf (flat NHWC [N, hp, wp, c_all], spatially padded with zx) as
    rows of ``of`` (flat [pixels, rb] bytes): row p = (n - n0)*OH*OW + y*OW + x holds tap (i, j)
    channel c at (i*KW + j)*cin_g + c, then ``fill`` up to rb. Runs are copied 64 bytes at a time
    (``_move64``; a copy may run past its end, into bytes written next: taps left to right, then the
    fill, then the next row), so both buffers carry 64 bytes of slack. With dilation 1 and all the
    channels in the group, the KW taps of a kernel row are one run of the image row."""
    k = kh * kw * cin_g
    run_row = dw == 1 and cin_g == c_all
    p = 0
    for n in range(n0, n1):
        for y in range(oh):
            for xo in range(ow):
                d0 = p * rb
                if run_row:
                    run = kw * cin_g
                    for i in range(kh):
                        s0 = ((n * hp + y * sh + i * dh) * wp + xo * sw) * c_all
                        for c in range(0, run, WORD):
                            _move64(of, d0 + i * run + c, xf, s0 + c)
                else:
                    t = 0
                    for i in range(kh):
                        for j in range(kw):
                            s0 = ((n * hp + y * sh + i * dh) * wp + xo * sw + j * dw) * c_all + c0
                            for c in range(0, cin_g, WORD):
                                _move64(of, d0 + t + c, xf, s0 + c)
                            t += cin_g
                if k < rb:
                    _move64(of, d0 + k, fill64, 0)
                p += 1


@intrinsic
def _load8(typingctx, arr, off):
    """The 8 bytes at byte ``off`` of ``arr``'s data as a uint64 (unaligned)."""
    sig = types.uint64(arr, types.intp)

    def codegen(context, builder, signature, args):
        i8p = ir.IntType(8).as_pointer()
        d = context.make_array(signature.args[0])(context, builder, args[0]).data
        p = builder.gep(builder.bitcast(d, i8p), [args[1]])
        return builder.load(builder.bitcast(p, ir.IntType(64).as_pointer()), align=1)

    return sig, codegen


@intrinsic
def _store8(typingctx, arr, off, val):
    """Write uint64 ``val`` at byte ``off`` of ``arr``'s data (unaligned)."""
    sig = types.void(arr, types.intp, types.uint64)

    def codegen(context, builder, signature, args):
        i8p = ir.IntType(8).as_pointer()
        d = context.make_array(signature.args[0])(context, builder, args[0]).data
        p = builder.gep(builder.bitcast(d, i8p), [args[1]])
        builder.store(args[2], builder.bitcast(p, ir.IntType(64).as_pointer()), align=1)
        return context.get_dummy_value()

    return sig, codegen


@njit(cache=True)
def _transpose8(r0, r1, r2, r3, r4, r5, r6, r7):
    """8 x 8 bytes: word i byte j -> word j byte i (three rounds of swaps within the words)."""
    m1 = np.uint64(0x00FF00FF00FF00FF)
    m2 = np.uint64(0x0000FFFF0000FFFF)
    m3 = np.uint64(0x00000000FFFFFFFF)
    s8, s16, s32 = np.uint64(8), np.uint64(16), np.uint64(32)
    t = ((r0 >> s8) ^ r1) & m1; r1 ^= t; r0 ^= t << s8
    t = ((r2 >> s8) ^ r3) & m1; r3 ^= t; r2 ^= t << s8
    t = ((r4 >> s8) ^ r5) & m1; r5 ^= t; r4 ^= t << s8
    t = ((r6 >> s8) ^ r7) & m1; r7 ^= t; r6 ^= t << s8
    t = ((r0 >> s16) ^ r2) & m2; r2 ^= t; r0 ^= t << s16
    t = ((r1 >> s16) ^ r3) & m2; r3 ^= t; r1 ^= t << s16
    t = ((r4 >> s16) ^ r6) & m2; r6 ^= t; r4 ^= t << s16
    t = ((r5 >> s16) ^ r7) & m2; r7 ^= t; r5 ^= t << s16
    t = ((r0 >> s32) ^ r4) & m3; r4 ^= t; r0 ^= t << s32
    t = ((r1 >> s32) ^ r5) & m3; r5 ^= t; r1 ^= t << s32
    t = ((r2 >> s32) ^ r6) & m3; r6 ^= t; r2 ^= t << s32
    t = ((r3 >> s32) ^ r7) & m3; r7 ^= t; r3 ^= t << s32
    return r0, r1, r2, r3, r4, r5, r6, r7


@njit(cache=True)
def _to_nhwc(x, xp, n_b, c, runs, run, src_step, dst_step, dst0):
    """x (NCHW bytes, flat) -> xp (NHWC bytes, flat): for each image and each of its ``runs`` runs of
    ``run`` pixels (an image row, or the whole image when nothing is padded), the [C, run] block of x
    starting at pixel ``i * src_step`` goes to xp at pixel ``dst0 + i * dst_step`` as [run, C]. Whole 8 x 8
    byte blocks by ``_transpose8`` (eight 8-byte loads and stores), the edges byte by byte."""
    hw = runs * src_step if runs > 1 else run
    hpwp = xp.shape[0] // (n_b * c)
    c8 = c - c % 8
    p8 = run - run % 8
    for n in range(n_b):
        for i in range(runs):
            s_base = n * c * hw + i * src_step               # byte of (n, channel 0, run pixel 0)
            d_base = (n * hpwp + dst0 + i * dst_step) * c     # byte of (n, dst pixel, channel 0)
            for cb in range(0, c8, 8):
                for pb in range(0, p8, 8):
                    s = s_base + cb * hw + pb
                    r0, r1, r2, r3, r4, r5, r6, r7 = _transpose8(
                        _load8(x, s), _load8(x, s + hw), _load8(x, s + 2 * hw), _load8(x, s + 3 * hw),
                        _load8(x, s + 4 * hw), _load8(x, s + 5 * hw), _load8(x, s + 6 * hw), _load8(x, s + 7 * hw))
                    d = d_base + pb * c + cb
                    _store8(xp, d, r0)
                    _store8(xp, d + c, r1)
                    _store8(xp, d + 2 * c, r2)
                    _store8(xp, d + 3 * c, r3)
                    _store8(xp, d + 4 * c, r4)
                    _store8(xp, d + 5 * c, r5)
                    _store8(xp, d + 6 * c, r6)
                    _store8(xp, d + 7 * c, r7)
                for p in range(p8, run):
                    for ch in range(cb, cb + 8):
                        xp[d_base + p * c + ch] = x[s_base + ch * hw + p]
            for ch in range(c8, c):
                for p in range(run):
                    xp[d_base + p * c + ch] = x[s_base + ch * hw + p]


@njit(cache=True)
def _frame_words(x, n_img, c, h, w, hp, wp, pt, pl, planes, add, shift, zx_words, frame, blk, tmp):
    """A convolution input's planes as words per pixel of its padded frame (``TAP_WORDS``): x (flat uint8
    NCHW, c a multiple of 64) -> frame uint64 [planes][n_img][hp][wp][c / 64], word j of a pixel holding
    channels 64j..64j+63 of one plane; the padding pixels hold the zero point's planes (``zx_words``
    [planes]: all ones or all zeros). Blocks of 64 pixels x 64 channels through ``bitplanes._channel_words``
    (an image's last block of fewer than 64 pixels read in place, masked, or where that would read past
    x's end its word's channels copied into ``tmp`` [64, 64] first), each pixel's word put at its place in the frame."""
    cw = c // WORD
    hw = h * w
    dummy = np.zeros(WORD, np.int64)
    for q in range(planes):
        for j in range(n_img * hp * wp * cw):
            frame[q * n_img * hp * wp * cw + j] = zx_words[q]
    for n in range(n_img):
        for i0 in range(0, hw, WORD):
            cnt = min(WORD, hw - i0)
            for j in range(cw):
                copied = cnt < WORD and (n * c + j * WORD + WORD - 1) * hw + i0 + WORD > x.shape[0]
                if copied:
                    tmp[:] = 0
                    for ch in range(WORD):
                        for i in range(cnt):
                            tmp[ch * WORD + i] = x[(n * c + j * WORD + ch) * hw + i0 + i]
                for q in range(planes):
                    sh = np.uint8(q + shift)
                    base = (q * n_img + n) * hp * wp
                    if copied:
                        _channel_words(tmp, 0, WORD, WORD, cnt, add, sh, blk, 0, 16, dummy, 0, 0)
                    else:
                        _channel_words(x, (n * c + j * WORD) * hw + i0, hw, WORD, cnt, add, sh, blk, 0, 16, dummy, 0, 0)
                    for i in range(cnt):
                        y = (i0 + i) // w
                        xo = (i0 + i) - y * w
                        frame[(base + (y + pt) * wp + xo + pl) * cw + j] = blk[i]


@njit(cache=True)
def _tap_panels(frame, n_img, hp, wp, cw, n0, n1, oh, ow, kh, kw, sh, sw, dh, dw, planes, coefs, out, sums, fsum):
    """The vector operand of a ``TAP_WORDS`` convolution for images n0..n1-1: pixel p's row of K =
    kh*kw*c values is its taps' frame words, tap (i, j) at words (i*kw + j)*cw.. (the weights' (kh, kw, c)
    order, whole words since c is a multiple of 64), written as ``bitplanes._pack`` writes rows: out
    [ceil(P / 16)][planes][kh*kw*cw][16], lanes past P 0; sums[p] = sum_q c_q popcount(its words), from
    each frame pixel's popcount (``fsum`` [planes][n_img*hp*wp], filled here for the images n0..n1-1)."""
    n_pix = oh * ow
    np_ = (n1 - n0) * n_pix
    words = kh * kw * cw
    ts = planes * words * 16
    fp = n_img * hp * wp
    for q in range(planes):
        for f in range(n0 * hp * wp, n1 * hp * wp):
            c = 0
            for m in range(cw):
                c += popcount64(frame[(q * fp + f) * cw + m])
            fsum[q * fp + f] = c
    bases = np.empty(16, np.int64)
    masks = np.empty(16, np.uint64)
    n, y, xo = n0, 0, 0
    for t in range(-(-np_ // 16)):
        for lane in range(16):                  # each lane's top-left frame pixel (past the last pixel: 0, masked)
            if t * 16 + lane < np_:
                bases[lane] = (n * hp + y * sh) * wp + xo * sw
                masks[lane] = np.uint64(0xFFFFFFFFFFFFFFFF)
                xo += 1
                if xo == ow:
                    xo = 0
                    y += 1
                    if y == oh:
                        y = 0
                        n += 1
            else:
                bases[lane] = 0
                masks[lane] = 0
        # the 16 pixels in one output row: each tap's words are one strided run of the frame (no gather)
        run = masks[15] != 0 and bases[15] - bases[0] == 15 * sw
        step = sw * cw
        for q in range(planes):
            qf = q * fp
            wd = 0
            for i in range(kh):
                for j in range(kw):
                    toff = qf + i * dh * wp + j * dw
                    for m in range(cw):
                        o = t * ts + (q * words + wd) * 16
                        if run:
                            src = (bases[0] + toff) * cw + m
                            for lane in range(16):
                                out[o + lane] = frame[src + lane * step]
                        else:
                            for lane in range(16):
                                out[o + lane] = frame[(bases[lane] + toff) * cw + m] & masks[lane]
                        wd += 1
        for lane in range(16):
            b = bases[lane]
            if masks[lane] != 0:
                tot = 0
                for q in range(planes):
                    st = 0
                    for i in range(kh):
                        for j in range(kw):
                            st += fsum[q * fp + b + i * dh * wp + j * dw]
                    tot += st * coefs[q]
                sums[t * 16 + lane] = tot


def conv(x, zx: int, pc: BitConv, zw, geo, rq: tuple | None = None, out_dtype=None,
         enc: Encoding | None = None, planes_out: bool = False):
    """``conv.conv_int`` computed bit-serially, same contract: int32 [N, Cout, OH, OW] accumulators,
    or with ``rq = (bias, scale, mult, shift, zp, qmin, qmax, fixed)`` the requantized output
    (``requant.requant_run``, the one requantization). ``enc``: the activation's encoding when the
    caller has it (else from x's values and zx). Per group and chunk of images (``_conv_chunks``):
    the pixels' planes (``FROM_NCHW``, ``TAP_WORDS`` or ``IM2COL``) as the vector operand, the weights
    broadcast. What does not depend on x's values (buffers, the pair table, the arguments' arrays) is
    built once per input shape, encoding, zero points and ``rq`` (``_conv_setup``, kept with the layer).

    Inside a chain of bit-serial layers: ``x`` may be ``Planes`` (what a producer wrote with
    ``planes_out``; this conv must then be 1x1, stride 1, unpadded, one group: it reads the panels as they
    are, no range pass and no packing), and with ``planes_out`` (and ``rq``; one group) the requantized
    output is returned as ``Planes`` for a pointwise bit-serial consumer instead of int8 / uint8 bytes: the
    tiles requantize into the output's bytes as usual (still in cache) and the same compiled call packs them
    (``bitplanes._pack_nchw``, the output's few planes), so the consumer neither passes over nor packs them."""
    planes_in = x if isinstance(x, Planes) else None
    if planes_in is not None:
        if not _pointwise(geo):
            raise ValueError("conv: packed planes in only for a 1x1, stride-1, unpadded, single-group convolution")
        enc = planes_in.enc
        x = np.broadcast_to(np.zeros(1, planes_in.dtype), planes_in.shape)      # shape and dtype only
    else:
        if x.ndim == 3:
            x = x[:, :, None, :]
        x = np.ascontiguousarray(x)
    if planes_out and (rq is None or geo.group != 1 or np.dtype(out_dtype).itemsize != 1):
        raise ValueError("conv: planes out need a requantized int8 / uint8 output of a single-group convolution")
    if x.shape[1] != pc.cin_g * geo.group:
        raise ValueError(f"conv: input has {x.shape[1]} channels, weights expect {pc.cin_g} x group {geo.group}")
    if enc is None:
        enc = input_encoding(x, zx, any(geo.pads))
    chain = (planes_in is not None, planes_out)
    key = (x.shape, x.dtype.str, int(zx), enc, geo, out_dtype, chain)
    hit = pc.cache.get("setup")
    if hit is None or hit[0] != key or hit[1] is not zw or hit[2] is not rq:
        hit = pc.cache["setup"] = (key, zw, rq, _conv_setup(x, zx, pc, zw, geo, rq, out_dtype, enc, chain))
    out = _run_setup(x, hit[3], -1, planes_in)
    assert out is not None
    return out


@dataclass
class Planes:
    """An activation as the bit planes a pointwise bit-serial convolution reads (``bitplanes._pack_nchw``'s
    layout): pixel p = n * H * W + i of the NCHW tensor is lane p % 16 of panel p // 16, panels
    ``[ceil(P / 16)][planes][ceil(C / 64)][16]`` uint64 (channel c is bit c % 64 of word c // 64; lanes past P
    0), ``sums[p]`` = sum_c (v - offset) (P + 64 entries). Written by a producer's tiles (``conv`` with
    ``planes_out``), so no int8 tensor is stored and no consumer packs it again."""
    panels: np.ndarray
    sums: np.ndarray
    enc: Encoding
    shape: tuple                  # NCHW
    dtype: np.dtype               # the int8 / uint8 tensor these planes stand for

    def values(self) -> np.ndarray:
        """The int8 / uint8 tensor back from the planes (tests, debugging)."""
        n, c, h, w = self.shape
        p_all, words = n * h * w, -(-c // WORD)
        pan = self.panels.reshape(-1, self.enc.bits, words, 16)
        bits = (pan[:, :, :, :, None] >> np.arange(WORD, dtype=np.uint64)) & np.uint64(1)   # [t, q, w, lane, bit]
        bits = bits.transpose(0, 3, 1, 2, 4).reshape(-1, self.enc.bits, words * WORD)[:p_all, :, :c]   # [p, q, c]
        v = (bits.astype(np.int64) * self.enc.coefs[None, :, None]).sum(axis=1) + self.enc.offset
        return v.reshape(n, h * w, c).transpose(0, 2, 1).reshape(self.shape).astype(self.dtype)


def pack_planes(x: np.ndarray, enc: Encoding | None = None) -> Planes:
    """An int8 / uint8 NCHW tensor as ``Planes`` (``bitplanes._pack_nchw``), in ``enc`` (default: from its
    values): how a chain's first input would be packed, and the tests' and benchmark's way to make planes."""
    x = np.ascontiguousarray(x)
    if x.ndim != 4 or x.dtype not in (np.int8, np.uint8):
        raise ValueError(f"pack_planes wants an int8/uint8 NCHW tensor, got {x.dtype} {x.shape}")
    enc = input_encoding(x, 0, False) if enc is None else enc
    n, c, h, w = x.shape
    p_all, words = n * h * w, max(1, -(-c // WORD))
    panels = np.empty(-(-p_all // NR) * enc.bits * words * NR, np.uint64)
    sums = np.zeros(p_all + WORD, np.int64)
    _pack_nchw(x.reshape(-1).view(np.uint8), n, c, h * w, NR, enc.bits, np.uint8(enc.add & 0xFF), enc.shift, enc.coefs,
               np.uint8(enc.fill & 0xFF), panels, sums, np.empty(WORD, np.uint64), np.empty(WORD * WORD, np.uint8))
    return Planes(panels, sums, enc, x.shape, x.dtype)


def _pointwise(geo) -> bool:
    return tuple(geo.kernel) == (1, 1) and tuple(geo.strides) == (1, 1) and geo.group == 1 and not any(geo.pads)


def conv_again(x: np.ndarray, pc: BitConv, zw, rq) -> np.ndarray | None:
    """``conv`` for a step called again as last time (same input shape and dtype, zero points, ``rq``, and an
    input whose encoding is the one the setup was made for), in one compiled call that also checks that
    encoding (``_conv_run``: the range pass, the packing, the tiles and their requantization): no Python
    pass over x, no key to build. None when any of that differs: then ``conv`` (after the caller has chosen
    the kernel for the new encoding)."""
    hit = pc.cache.get("setup")
    if hit is None or hit[1] is not zw or hit[2] is not rq or x.shape != hit[0][0] or x.dtype.str != hit[0][1] \
            or hit[0][6] != (False, False) or not x.flags.c_contiguous:
        return None
    return _run_setup(x, hit[3], 1)


def setup_encoding(pc: BitConv) -> Encoding | None:
    """The activation encoding of ``pc``'s current setup (what ``conv_again`` checks inputs against)."""
    hit = pc.cache.get("setup")
    return None if hit is None else hit[0][3]


def _run_setup(x, setup, check: int, planes_in: "Planes | None" = None):
    mode, pre, head, tail, out_shape, out_dt, out4, enc_code, o_par, o_enc = setup
    if planes_in is not None:                   # its panels are the vector operand as they are
        flat = np.zeros(1, planes_in.dtype)
        tail = tail[:1] + (planes_in.panels,) + tail[2:]
        in_sums = planes_in.sums
    else:
        flat = x.reshape(-1)
        in_sums = _NO_SUMS
    out = np.empty(out_shape, out_dt)           # planes out: the tiles' requantized bytes, packed from there
    if o_par[0]:
        n_b, cout, pixels = out_shape
        p_all = n_b * pixels
        o_panels = np.empty(-(-p_all // NR) * int(o_par[0]) * int(o_par[3]) * NR, np.uint64)   # _pack_nchw writes all
        o_sums = np.empty(p_all + WORD, np.int64)
    else:
        o_panels, o_sums = _NO_PANELS, _NO_SUMS
    if not _conv_run(flat, flat.view(np.uint8), check, *enc_code, *pre, *head, *tail, planes_in is not None, in_sums,
                     o_panels, o_sums, o_par, out, out.reshape(-1).view(np.uint8)):
        return None
    if o_par[0]:
        return Planes(o_panels, o_sums, o_enc, out4, np.dtype(out_dt))
    return out.reshape(out4)


_NO_SUMS = np.zeros(1, np.int64)
_NO_PANELS = np.zeros(1, np.uint64)


def planes_encoding(qmin: int, qmax: int, dtype) -> Encoding:
    """The encoding of a requantized output whose values lie in [qmin, qmax] (its clamp): what a producer writes
    its consumer's planes in (every value the clamp allows, so exact whatever the values)."""
    return encoding_for(qmin, qmax, np.dtype(dtype) == np.int8)


@njit(cache=True)
def encoding_code(lo, hi, has_zero, signed, padded, zx):
    """``bitplanes.input_encoding`` from (min, max, whether a 0 occurs) of the values, compiled: (kind, bits),
    kind 0 two's complement, 1 unsigned, 2 +-1 (tests check it against ``input_encoding``)."""
    zero_free = signed and lo == -1 and hi == 1 and not has_zero
    if padded:
        lo = min(lo, zx)
        hi = max(hi, zx)
        zero_free = zero_free and zx != 0
    if signed:
        if lo == -1 and hi == 1 and zero_free:
            return 2, 1
        b = 1
        while not (-(1 << (b - 1)) <= lo and hi <= (1 << (b - 1)) - 1):
            b += 1
        return 0, b
    b = 1
    while hi >> b:
        b += 1
    return 1, b


ENC_KIND = {"twos": 0, "unsigned": 1, "pm1": 2}


@njit(cache=True)
def _conv_run(x, xb, check, kind, nbits, padded, signed, zx_w, xf, zx_words, blk, tmp, h, w, pt, pl, hp, wp, c_all, n_b, per,
              pixels, cin_g, kh, kw, sh, sw, dh, dw, oh, ow, k, words, planes, add, shift_b, coefs, fill, offset, cols,
              bpanels, wpanels, wsums, w_planes, w_offset, zw, zx, qa, qb, coef, xor, acc, raw, bias, scale, mult,
              shift, zp, qmin, qmax, fixed, mode, frame, rqp, rqs, fuse, prepacked, in_sums, o_panels, o_sums, o_par,
              out, outb):
    """One convolution call, compiled whole: with ``check``, the range pass over x and whether its encoding
    (``encoding_code``) is still (kind, nbits), returning False if not; then x's planes are prepared
    (``IM2COL``: the NHWC frame padded with the zero point, ``_to_nhwc``; ``TAP_WORDS``: the frame of words,
    ``_frame_words``) and ``_conv_chunks`` runs."""
    if check > 0 and x.shape[0]:
        lo, hi, z = _min_max_zero(x)
        kd, nb = encoding_code(np.int64(lo), np.int64(hi), z, signed, padded, np.int64(zx))
        if kd != kind or nb != nbits:
            return False
    if mode == IM2COL:                          # x to NHWC, in the frame padded with the zero point
        n_xp = n_b * hp * wp * c_all
        if hp != h or wp != w:
            xf[:n_xp] = zx_w
            _to_nhwc(xb, xf[:n_xp], n_b, c_all, h, w, w, wp, pt * wp + pl)     # row by row, into the padded frame
        else:                                   # nothing padded: each image is one run of h*w pixels
            _to_nhwc(xb, xf[:n_xp], n_b, c_all, 1, h * w, 0, 0, 0)
        src = xf
    elif mode == TAP_WORDS:
        _frame_words(xb, n_b, c_all, h, w, hp, wp, pt, pl, planes, add, shift_b, zx_words, frame, blk, tmp)
        src = xb
    else:
        src = xb
    _conv_chunks(src, hp, wp, c_all, n_b, per, pixels, cin_g, kh, kw, sh, sw, dh, dw, oh, ow, k, words, planes, add,
                 shift_b, coefs, fill, offset, cols, bpanels, wpanels, wsums, w_planes, w_offset, zw, zx, qa, qb, coef,
                 xor, acc, raw, bias, scale, mult, shift, zp, qmin, qmax, fixed, mode, frame, rqp, rqs, fuse, prepacked,
                 in_sums, o_panels, o_sums, o_par, out, outb)
    return True


def _conv_setup(x, zx, pc: BitConv, zw, geo, rq, out_dtype, enc: Encoding, chain=(False, False)) -> tuple:
    """Everything ``conv`` passes its kernels that does not depend on x's values: (mode, what fills x in
    (``IM2COL``: the NHWC frame; ``TAP_WORDS``: ``_frame_words``'s arguments), ``_conv_chunks``'s
    arguments before and after the frame ones, the output's shape and dtype, its NCHW shape)."""
    n_b, c_in, h, w = x.shape
    g = geo.group
    oh, ow = geo.out_hw(h, w)
    (kh, kw), (sh, sw), (dh, dw) = geo.kernel, geo.strides, geo.dilations
    pt, pl = geo.pads[0], geo.pads[1]
    hp = max(h + pt, (oh - 1) * sh + (kh - 1) * dh + 1)
    wp = max(w + pl, (ow - 1) * sw + (kw - 1) * dw + 1)
    # 1x1, stride 1, unpadded, one group (MobileNetV2's pointwise layers): the planes come straight from NCHW
    # (``FROM_NCHW``: ``bitplanes._pack_nchw``, 64 pixels x 64 channels per block, no NHWC copy). (Measured and
    # dropped: scalar 64x64 bit transposes from NCHW, 0.95-1.8x the time of an NHWC copy and packing its
    # pixel rows in place; and that copy-and-pack itself, 2-4x the time of ``FROM_NCHW`` on MobileNetV2's
    # pointwise shapes.) Channels a multiple of 64 (ResNet's 3x3 convs, say): each tap is whole words, so the
    # planes are packed once per input pixel into a padded frame of words (``TAP_WORDS``: ``_frame_words``,
    # O(input)) and each output pixel's row is its taps' words (``_tap_panels``), not an im2col of bytes packed
    # again. Every other convolution copies the input to NHWC and builds im2col rows (``IM2COL``).
    pointwise = (kh, kw, sh, sw) == (1, 1, 1, 1) and g == 1 and not any(geo.pads)
    tap = not pointwise and g == 1 and c_in % WORD == 0
    mode = FROM_NCHW if pointwise else TAP_WORDS if tap else IM2COL
    frame = np.empty(enc.bits * n_b * hp * wp * (c_in // WORD) if tap else 1, np.uint64)
    zx_words = np.array([0xFFFFFFFFFFFFFFFF if ((int(zx) + enc.add) & 0xFF) >> (q + enc.shift) & 1 else 0
                         for q in range(enc.bits)], np.uint64)
    # what _conv_run prepares x's planes with: the NHWC frame (IM2COL; + slack for 64-byte moves), the zero
    # point's plane words and scratch (TAP_WORDS), the image's size and padding
    pre = (ENC_KIND[enc.kind], enc.bits, bool(any(geo.pads)), x.dtype == np.int8, np.uint8(int(zx) & 0xFF),
           np.empty(n_b * hp * wp * c_in + WORD if mode == IM2COL else 1, np.uint8), zx_words,
           np.empty(WORD, np.uint64), np.empty(WORD * WORD, np.uint8), h, w, pt, pl)
    pixels = oh * ow
    k = kh * kw * pc.cin_g
    words = max(1, -(-k // WORD))
    per = max(1, min(n_b, 4096 // max(pixels, 1)))           # several small images per GEMM
    if any(chain):                  # planes in or out: all images in one chunk (the planes' pixel order)
        per = n_b
    cols = np.empty(WORD * WORD if pointwise else WORD if tap else per * pixels * words * WORD + WORD, np.uint8)
    bpanels = np.empty(-(-per * pixels // NR) * NR * enc.bits * words, np.uint64)
    # the accumulators of a sub-chunk of pixels, [Cout / g, sub] int32 contiguous: ~64 KB (in L2 when requantized)
    sub = max(NR, min(-(-per * pixels // NR) * NR, 16384 // (pc.cout // g) // NR * NR))
    acc = np.empty(pc.cout // g * sub, np.int32)
    qa, qb, coef, xor = pair_table(pc.enc, enc)
    raw = rq is None
    if raw:
        rq = (np.zeros(1, np.int32), np.ones(1, np.float32), np.zeros(1, np.int64), np.ones(1, np.int64), 0, 0, 0,
              False)
    bias, scale, mult, shift, zp, qmin, qmax, fixed = rq
    # the requantization per output channel, per group padded to whole row tiles (``bitserial._gemm_rq_into``)
    cg = pc.cout // g
    mp = -(-cg // MR) * MR
    rqp = np.zeros((g, 4, mp), np.int64)
    rqs = np.ones((g, mp), np.float32)
    per_ch = lambda v, dt: np.broadcast_to(np.asarray(v, dt).reshape(-1), (pc.cout,)).reshape(g, cg)   # noqa: E731
    if not raw:
        rqp[:, 0, :cg] = per_ch(bias, np.int32)
        rqp[:, 1, :cg] = per_ch(mult, np.int64)
        rqp[:, 2, :cg] = per_ch(shift, np.int64)
        rqp[:, 3, :cg] = np.int64(1) << np.maximum(rqp[:, 2, :cg] - 1, 0)
        rqs[:, :cg] = per_ch(scale, np.float32)
    head = (hp, wp, c_in, n_b, per, pixels, pc.cin_g, kh, kw, sh, sw, dh, dw, oh, ow, k, words,
            enc.bits, np.uint8(enc.add & 0xFF), enc.shift, enc.coefs, np.uint8(enc.fill & 0xFF), enc.offset)
    tail = (cols, bpanels, pc.panels, pc.sums, pc.enc.bits, pc.enc.offset,
            np.asarray(zw, np.int64).reshape(-1), int(zx), qa, qb, coef, xor, acc, raw,
            np.asarray(bias, np.int32).reshape(-1), np.asarray(scale, np.float32).reshape(-1),
            np.asarray(mult, np.int64).reshape(-1), np.asarray(shift, np.int64).reshape(-1), int(zp), int(qmin),
            int(qmax), bool(fixed), mode, frame, rqp, rqs, not raw and np.dtype(out_dtype).itemsize == 1)
    o_par = np.zeros(7, np.int64)               # planes out: planes, add, shift, words, offset, signed, kind
    oe = None
    if chain[1]:
        oe = planes_encoding(qmin, qmax, out_dtype)
        o_par[:] = (oe.bits, oe.add & 0xFF, oe.shift, -(-pc.cout // WORD), oe.offset, np.dtype(out_dtype) == np.int8,
                    ENC_KIND[oe.kind])
    return mode, pre[4:], head, tail, (n_b, pc.cout, pixels), np.int32 if raw else out_dtype, (n_b, pc.cout, oh, ow), \
        pre[:4], o_par, oe


@njit(cache=True)
def _conv_chunks(xf, hp, wp, c_all, n_b, per, pixels, cin_g, kh, kw, sh, sw, dh, dw, oh, ow, k, words, planes, add,
                 shift_b, coefs, fill, offset, cols, bpanels, wpanels, wsums, w_planes, w_offset, zw, zx, qa, qb, coef,
                 xor, acc, raw, bias, scale, mult, shift, zp, qmin, qmax, fixed, mode, frame, rqp, rqs, fuse, prepacked,
                 in_sums, o_panels, o_sums, o_par, out, outb):
    """The whole convolution, chunk of images by chunk, group by group: the pixels' rows and their
    planes (``mode``: ``IM2COL`` im2col rows (``_im2col``) then ``bitplanes._pack``; ``FROM_NCHW`` a
    1x1 conv's planes straight from the NCHW input, ``bitplanes._pack_nchw``; ``TAP_WORDS`` each pixel's
    taps' words from the padded frame of words ``frame``, ``_tap_panels``), the tile GEMM finished with its
    zero-point terms (``_gemm_into``), then ``requant_run`` per output channel (or, ``raw``, the int32
    accumulators), by sub-chunks of ``sub`` pixels (their accumulators fill ``acc``)."""
    groups = wpanels.shape[0]
    cout_g = wsums.shape[1]
    rb = words * WORD
    fill64 = np.empty(WORD, np.uint8)
    fill64[:] = fill
    mp = -(-cout_g // MR) * MR
    rowt = np.empty((3, mp), np.int64)
    per_w = zw.shape[0] > 1
    per_s = scale.shape[0] > 1
    fsum = np.empty(planes * n_b * hp * wp if mode == TAP_WORDS else 1, np.int64)
    sub = acc.shape[0] // cout_g // NR * NR          # pixels per sub-chunk: [Cout / g, sub] int32 fits ``acc``
    zxa = np.full(1, zx, np.int64)
    scratch = np.empty(MR * NR, np.int32)
    for n0 in range(0, n_b, per):
        n1 = min(n_b, n0 + per)
        np_ = (n1 - n0) * pixels
        npad = -(-np_ // NR) * NR
        colt = np.empty((2, min(npad, sub)), np.int64)
        colt_all = np.empty((2, npad if fuse else 1), np.int64)
        bsums = np.empty(np_ + WORD, np.int64)
        blk = np.empty(WORD, np.uint64)
        for gi in range(groups):
            if not prepacked:
                last = (np_ // NR) * NR * planes * words           # the last panel's unused lanes stay 0
                bpanels[last:npad * planes * words] = 0
            if prepacked:                       # a producer's planes (``Planes``), read as they are
                bsums = in_sums
            elif mode == TAP_WORDS:               # the taps' words of the frame packed once per input pixel
                _tap_panels(frame, n_b, hp, wp, c_all // WORD, n0, n1, oh, ow, kh, kw, sh, sw, dh, dw, planes, coefs,
                            bpanels, bsums, fsum)
            elif mode == FROM_NCHW:             # a 1x1 conv's planes straight from NCHW
                _pack_nchw(xf[n0 * pixels * c_all:n1 * pixels * c_all], n1 - n0, c_all, pixels, NR, planes, add,
                           shift_b, coefs, fill, bpanels, bsums, blk, cols)
            else:
                _im2col(xf, hp, wp, c_all, n0, n1, gi * cin_g, cin_g, kh, kw, sh, sw, dh, dw, oh, ow, fill64, rb,
                        cols)
                _pack(cols[:np_ * rb].reshape((np_, rb)), np_, rb, NR, planes, add, shift_b, coefs, fill, bpanels,
                      bsums)
            zw_g = zw[gi * cout_g:(gi + 1) * cout_g] if per_w else zw
            if fuse:                            # requantized in the tiles' epilogue, straight into the output
                _fill_terms(wsums[gi], zw_g, w_offset, k, bsums[:np_], zxa, offset, xor, rowt, colt_all)
                _gemm_rq_into(wpanels[gi], w_planes * words * MR, bpanels, planes * words * NR, qa, qb, coef, xor,
                              words, rowt, colt_all, cout_g, np_, outb, (n0 * groups + gi) * cout_g * pixels, pixels,
                              groups * cout_g * pixels, rqp[gi], rqs[gi], zp, qmin, qmax, 1 if fixed else 0, scratch)
                continue
            for s0 in range(0, np_, sub):       # pixels by sub-chunk: its accumulators requantized while in cache
                s1 = min(np_, s0 + sub)
                _fill_terms(wsums[gi], zw_g, w_offset, k, bsums[s0:s1], zxa, offset, xor, rowt, colt)
                a = acc[:cout_g * (s1 - s0)].reshape((cout_g, s1 - s0))   # C-contiguous: the requantization vectorizes
                _gemm_into(wpanels[gi], w_planes * words * MR, bpanels[(s0 // NR) * planes * words * NR:],
                           planes * words * NR, qa, qb, coef, xor, words, rowt, colt, a)
                for i in range(cout_g):
                    o = gi * cout_g + i
                    for n in range(s0 // pixels, (s1 - 1) // pixels + 1):     # the images the sub-chunk overlaps
                        lo = max(s0, n * pixels)
                        hi = min(s1, (n + 1) * pixels)
                        src = a[i, lo - s0:hi - s0]
                        dst = out[n0 + n, o, lo - n * pixels:hi - n * pixels]
                        if raw:
                            dst[:] = src
                        else:
                            c = o if per_s else 0
                            requant_run(src, np.int32(bias[o] if bias.shape[0] > 1 else bias[0]), scale[c], mult[c],
                                        shift[c], zp, qmin, qmax, fixed, dst)
    if o_par[0]:        # planes out: the requantized bytes (still in cache) packed as a pointwise consumer reads them
        o_planes = o_par[0]
        ocoefs = np.empty(o_planes, np.int64)
        for q in range(o_planes):
            ocoefs[q] = 1 << q
        if o_par[6] == 0:                       # two's complement: the sign plane weighs -2^(b-1)
            ocoefs[o_planes - 1] = -ocoefs[o_planes - 1]
        _pack_nchw(outb, n_b, groups * cout_g, pixels, NR, o_planes, np.uint8(o_par[1]), o_par[2], ocoefs,
                   np.uint8((-o_par[1]) & 0xFF), o_panels, o_sums, np.empty(WORD, np.uint64),
                   np.empty(WORD * WORD, np.uint8))
