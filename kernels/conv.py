"""Integer convolution: int8/uint8 NCHW x int8/uint8 OIHW -> int32, zero points taken out exactly.

    acc[n, o, y, x] = sum_{c, i, j} (X[n, c, y*sh - pt + i*dh, x*sw - pl + j*dw] - zx) * (W[o, c, i, j] - zw[o])

Padding reads as ``zx`` (it contributes zero). Two kernels:

- groups with more than one input channel each: ``C[Cout_g, pixels] = W_g @ im2col`` per image and
  group, the weights packed once as the A operand and im2col written straight into B panels (padding
  reads as ``zx``), so the result lands in NCHW order without a transpose;
- one input channel per group, several groups (depthwise, any channel multiplier): direct NCHW
  kernels in ``depthwise.py``.

1-D convolutions run as 2-D with height 1. ``conv_reference`` is the plain numpy definition.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from numba import njit

from qgraph.errors import ModelError
from qgraph.kernels.amx import aligned_empty
from qgraph.kernels.gemm import Packed, conv_gemm_requant, k4_of, pack_a, qgemm_packed
from qgraph.kernels.depthwise import depthwise
from qgraph.kernels.vnni import NR
from qgraph.ops import ConvGeometry


@dataclass
class PackedConv:
    """Weights prepared once: packed GEMM panels per group, or the raw depthwise weights."""
    cout: int
    cin_g: int
    kernel: tuple[int, int]
    groups: list[Packed] | None      # weights as packed A operands per group; None: depthwise path
    w: np.ndarray                    # original weights [Cout, Cin/g, KH, KW]
    cache: dict = field(default_factory=dict)    # depthwise: weights with zw taken out


def pack_conv(w: np.ndarray, group: int) -> PackedConv:
    w = np.asarray(w)
    if w.ndim == 3:
        w = w[:, :, None, :]
    cout, cin_g, kh, kw = w.shape
    if cin_g == 1 and group > 1:
        return PackedConv(cout, cin_g, (kh, kw), None, np.ascontiguousarray(w))
    cout_g = cout // group
    c4 = -(-cin_g // 4) * 4
    # k order (i, j, c) with channels padded to a multiple of 4: each 4-k group of the B panel is then
    # 4 adjacent channels of one NHWC pixel, copied as one int32. Padded weights are 0 and padded
    # activations are zx, so every padded k contributes (0 - zw)(zx - zx) = 0.
    wt = np.zeros((cout, kh, kw, c4), w.dtype)
    wt[..., :cin_g] = w.transpose(0, 2, 3, 1)
    panels = [pack_a(np.ascontiguousarray(wt[g * cout_g:(g + 1) * cout_g].reshape(cout_g, -1)))
              for g in range(group)]
    return PackedConv(cout, cin_g, (kh, kw), panels, np.ascontiguousarray(w))


def _im2col_panels(x, n0, n1, c0, cin_g, zx, kh, kw, sh, sw, dh, dw, pt, pl, oh, ow, flip, k4, out, sums):
    """im2col of images n0..n1-1, channels c0..c0+cin_g, as int8 B panels [P/NR][k4][NR][4] with
    pixel p = (n - n0)*OH*OW + y*OW + x and k = ((i*KW + j)*C4 + c) (C4: channels padded to 4);
    values are ^ flip (uint8 inputs shift by -128); sums[p] = column sums of the packed values.

    The images are first copied (numpy) into an NHWC buffer padded with zx, spatially and in
    channels, so each 4-k group is one aligned int32 and the gather has no bounds checks. Column
    sums come from a channel-summed image and a window sum (Cin*HW + KH*KW*P instead of K*P)."""
    _, _, h, w = x.shape
    nb = n1 - n0
    c4 = k4 * 4 // (kh * kw)
    hp = max(h + pt, (oh - 1) * sh + (kh - 1) * dh + 1)
    wp = max(w + pl, (ow - 1) * sw + (kw - 1) * dw + 1)
    zf = np.int8(zx ^ flip)
    xp = np.full((nb, hp, wp, c4), zf, np.int8)
    xp[:, pt:pt + h, pl:pl + w, :cin_g] = x[n0:n1, c0:c0 + cin_g].transpose(0, 2, 3, 1) ^ np.int8(flip)
    _gather_panels(xp.reshape(-1).view(np.int32), _channel_sums(xp.reshape(-1, c4)), nb, hp, wp, c4 // 4,
                   kh, kw, sh, sw, dh, dw, oh, ow, k4, out.view(np.int32), sums)


@njit(cache=True)
def _channel_sums(xp):
    """Sum of each NHWC pixel's (padded) channels, int32 (numpy's small-axis reduction is slow)."""
    out = np.empty(xp.shape[0], np.int32)
    for i in range(xp.shape[0]):
        s = np.int32(0)
        for c in range(xp.shape[1]):
            s += xp[i, c]
        out[i] = s
    return out


def _pack_pointwise(x, n0, n1, c0, cin_g, zf, flip, k4, out, sums):
    """The im2col of a 1x1, stride-1, unpadded conv is the input itself: pack B panels straight from
    NCHW rows (pixel p = (n - n0)*H*W + i), channels padded to 4*k4 with zf = zx ^ flip."""
    _pack_rows(x, n0, n1, c0, cin_g, zf, flip, k4, out, sums)


@njit(cache=True)
def _pack_rows(x, n0, n1, c0, cin_g, zf, flip, k4, out, sums):
    """Four channel rows at a time: byte q of lane r of a panel's 4-k group is channel 4g + q of
    pixel r, so each run of pixels within one panel is an interleaving store of 4 rows (vectorized).
    sums[p] += the pixel's (signed, flipped) values, channel row by channel row."""
    _, _, h, w = x.shape
    hw = h * w
    zrow = np.full(hw, zf, np.int8)
    s32 = np.empty(hw, np.int32)
    for n in range(n0, n1):
        pbase = (n - n0) * hw
        for g in range(k4):
            r0 = x[n, c0 + 4 * g].ravel() if 4 * g < cin_g else zrow
            r1 = x[n, c0 + 4 * g + 1].ravel() if 4 * g + 1 < cin_g else zrow
            r2 = x[n, c0 + 4 * g + 2].ravel() if 4 * g + 2 < cin_g else zrow
            r3 = x[n, c0 + 4 * g + 3].ravel() if 4 * g + 3 < cin_g else zrow
            f0 = flip if 4 * g < cin_g else np.int8(0)
            f1 = flip if 4 * g + 1 < cin_g else np.int8(0)
            f2 = flip if 4 * g + 2 < cin_g else np.int8(0)
            f3 = flip if 4 * g + 3 < cin_g else np.int8(0)
            i = 0
            while i < hw:
                p = pbase + i
                lane = p % NR
                cnt = min(NR - lane, hw - i)
                d0 = ((p // NR * k4 + g) * NR + lane) * 4
                dst = out[d0:d0 + 4 * cnt]
                s0, s1, s2, s3 = r0[i:i + cnt], r1[i:i + cnt], r2[i:i + cnt], r3[i:i + cnt]
                for r in range(cnt):               # slices: no index wraparound, so this vectorizes
                    dst[4 * r] = s0[r] ^ f0
                    dst[4 * r + 1] = s1[r] ^ f1
                    dst[4 * r + 2] = s2[r] ^ f2
                    dst[4 * r + 3] = s3[r] ^ f3
                i += cnt
        s32[:] = (4 * k4 - cin_g) * np.int32(zf)        # padded channels read zf
        for c in range(cin_g):
            row = x[n, c0 + c].ravel()
            for i in range(hw):
                s32[i] += np.int32(row[i] ^ flip)
        dsum = sums[pbase:pbase + hw]
        for i in range(hw):
            dsum[i] += s32[i]


@njit(cache=True)
def _gather_panels(xp32, chan, nb, hp, wp, g4, kh, kw, sh, sw, dh, dw, oh, ow, k4, out32, sums):
    pixels = nb * oh * ow
    src = np.empty(pixels, np.int64)                 # int32 offset of tap (0, 0) per pixel
    p = 0
    for n in range(nb):
        for y in range(oh):
            for xo in range(ow):
                pix = (n * hp + y * sh) * wp + xo * sw
                src[p] = pix * g4
                cs = np.int64(0)
                for i in range(kh):
                    for j in range(kw):
                        cs += chan[pix + i * dh * wp + j * dw]
                sums[p] = cs
                p += 1
    taps = np.empty(kh * kw * g4, np.int64)
    kk = 0
    for i in range(kh):
        for j in range(kw):
            for g in range(g4):
                taps[kk] = (i * dh * wp + j * dw) * g4 + g
                kk += 1
    for t in range(-(-pixels // NR)):
        p0 = t * NR
        lanes = min(NR, pixels - p0)
        for kk in range(k4):
            base = (t * k4 + kk) * NR
            off = taps[kk]
            for r in range(lanes):
                out32[base + r] = xp32[src[p0 + r] + off]


def conv_int(x: np.ndarray, zx: int, pc: PackedConv, zw, geo: ConvGeometry, rq: tuple | None = None,
             out_dtype=None) -> np.ndarray:
    """Integer convolution -> int32 [N, Cout, OH, OW] (x [N, C, H, W] or [N, C, L] -> [N, Cout, 1, OL]).

    ``rq = (bias, scale, mult, shift, zp, qmin, qmax, fixed)`` (per output channel) fuses the
    requantization into the epilogue (GEMM: ``gemm.conv_gemm_requant``, block by block; depthwise:
    ``depthwise.depthwise``) and the result is the ``out_dtype`` NCHW output."""
    if x.ndim == 3:
        x = x[:, :, None, :]
    x = np.ascontiguousarray(x)
    n_b, c_in, h, w = x.shape
    g = geo.group
    if c_in != pc.cin_g * g:
        raise ModelError(f"conv: input has {c_in} channels, weights expect {pc.cin_g} x group {g}")
    oh, ow = geo.out_hw(h, w)
    (kh, kw), (sh, sw), (dh, dw) = geo.kernel, geo.strides, geo.dilations
    pt, pl = geo.pads[0], geo.pads[1]
    zw_in, zw = zw, np.ascontiguousarray(np.asarray(zw, np.int64).reshape(-1))
    if pc.groups is None:
        if rq is None:
            out = np.empty((n_b, pc.cout, oh, ow), np.int32)
            bias, scale, mult, shift, zp, qmin, qmax, mode = (np.zeros(pc.cout, np.int32), np.ones(1, np.float32),
                                                              np.zeros(1, np.int64), np.ones(1, np.int64), 0, 0, 0, 0)
        else:
            out = np.empty((n_b, pc.cout, oh, ow), out_dtype)
            bias, scale, mult, shift, zp, qmin, qmax, fixed = rq
            mode = 2 if fixed else 1
        hit = pc.cache.get("wz")                         # (zw as given, as int64, weights - zw)
        if hit is None or not (hit[0] is zw_in or np.array_equal(hit[1], zw)):
            hit = (zw_in, zw, pc.w[:, 0].astype(np.int32) - zw.astype(np.int32).reshape(-1, 1, 1))
            pc.cache["wz"] = hit
        wz = hit[2]
        depthwise(x, np.int32(zx), wz, pt, pl, sh, sw, dh, dw, np.asarray(bias, np.int32), scale, mult, shift,
                   zp, qmin, qmax, mode, out)
        return out
    cout_g = pc.cout // g
    pixels = oh * ow
    k = pc.groups[0].k                                   # kh * kw * channels padded to 4
    k4 = k4_of(k)
    ob = 128 if x.dtype == np.uint8 else 0
    xs = x.view(np.int8)
    zx_code = np.int8(np.array(zx).astype(x.dtype).view(np.int8))
    out = np.empty((n_b, pc.cout, pixels), np.int32 if rq is None else out_dtype)
    pointwise = (kh, kw, sh, sw) == (1, 1, 1, 1) and not any(geo.pads)
    # small images: several per GEMM (pixels of consecutive images side by side)
    per = max(1, min(n_b, 4096 // max(pixels, 1)))
    flip = np.int8(-128 if ob else 0)
    for n0 in range(0, n_b, per):
        n1 = min(n_b, n0 + per)
        cols = (n1 - n0) * pixels
        res = None if rq is not None else (np.empty((pc.cout, cols), out.dtype) if per > 1 else out[n0])
        for gi, pa in enumerate(pc.groups):
            panels = aligned_empty(-(-cols // NR) * NR * k4 * 4, np.int8)    # 64-byte aligned (AMX)
            panels[cols // NR * NR * k4 * 4:] = 0                  # the last panel's unused lanes
            sums = np.zeros(cols, np.int64)
            if pointwise:
                _pack_pointwise(xs, n0, n1, gi * pc.cin_g, pc.cin_g, np.int8(zx_code ^ flip), flip, k4,
                                panels, sums)
            else:
                _im2col_panels(xs, n0, n1, gi * pc.cin_g, pc.cin_g, zx_code, kh, kw, sh, sw, dh, dw, pt, pl,
                               oh, ow, flip, k4, panels, sums)
            zw_g = zw if zw.size == 1 else zw[gi * cout_g:(gi + 1) * cout_g]
            rows = slice(gi * cout_g, (gi + 1) * cout_g)
            pb = Packed(panels, cols, k, k4, sums, ob)
            if rq is None:
                qgemm_packed(pa, zw_g, pb, zx, out=res[rows])
                continue
            rq_g = tuple(v[rows] if isinstance(v, np.ndarray) and v.size == pc.cout and pc.cout > 1 else v
                         for v in rq)
            conv_gemm_requant(pa, zw_g, pb, zx, pixels, rq_g, gi * cout_g, out[n0:n1])
        if rq is None and per > 1:
            out[n0:n1] = res.reshape(pc.cout, n1 - n0, pixels).transpose(1, 0, 2)
    return out.reshape(n_b, pc.cout, oh, ow)


def conv_reference(x, zx, w, zw, geo: ConvGeometry) -> np.ndarray:
    """Plain numpy definition (int64 arithmetic), for tests."""
    x = np.asarray(x, np.int64)
    w = np.asarray(w, np.int64)
    if x.ndim == 3:
        x, w = x[:, :, None, :], w[:, :, None, :]
    n_b, c_in, h, wd = x.shape
    cout, cin_g, kh, kw = w.shape
    pt, pl, pb, pr = geo.pads
    xp = np.full((n_b, c_in, h + pt + pb, wd + pl + pr), int(zx), np.int64)
    xp[:, :, pt:pt + h, pl:pl + wd] = x
    xp -= int(zx)
    wz = w - np.asarray(zw, np.int64).reshape(-1, 1, 1, 1)
    oh, ow = geo.out_hw(h, wd)
    (sh, sw), (dh, dw), g = geo.strides, geo.dilations, geo.group
    out = np.zeros((n_b, cout, oh, ow), np.int64)
    cout_g = cout // g
    for o in range(cout):
        c0 = (o // cout_g) * cin_g
        for i in range(kh):
            for j in range(kw):
                patch = xp[:, c0:c0 + cin_g, i * dh:i * dh + sh * (oh - 1) + 1:sh, j * dw:j * dw + sw * (ow - 1) + 1:sw]
                out[:, o] += np.einsum("nchw,c->nhw", patch, wz[o, :, i, j])
    return out.astype(np.int32)
