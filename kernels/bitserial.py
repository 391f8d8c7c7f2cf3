"""Bit-serial integer GEMM and convolution: dot products of low-bit integers as popcounts.

With both operands split into bit planes (``bitplanes``: a = sum_q d_q a_q + o_a, w = sum_p c_p w_p
+ o_w, two's complement planes carrying the sign plane at -2^(b-1)), a dot product over K is

    S' = sum_k (a_k - o_a)(w_k - o_w) = sum_(p, q) c_p d_q popcount(A_q AND W_p)        (AND planes)

one popcount per 64 products per plane pair: a 2-bit x 2-bit product costs 4 of them, an 8-bit
activation times a binary weight 8. When both operands are +-1 (XNOR-Net) one XOR does it:
sum_k a_k w_k = K - 2 popcount(A XOR W), so S' = sum (a - o)(w - o) = sum(A') + sum(W') - 2 popcount.
The zero points (and the offsets o) come out with the same row / column sum terms as the int8 GEMM
(``gemm``): sum (a - za)(w - zw) = S' - zw' sum(A') - za' sum(W') + K za' zw', za' = za - o_a. The
result is the same int32 accumulator the int8 kernel computes (exact: int32 wrapping arithmetic, the
true value fits), requantized by the same epilogue (``gemm._requant_block`` for convolutions) — so
it equals the int8 kernel bit for bit, which the tests check on every shape and width.

Micro-kernel (``_tile_and`` / ``_tile_xor``, LLVM IR through ``tiles.tile_loop``): ``MR`` rows of
the broadcast operand x ``NR = 8 * NV`` columns of the vector operand, one <8 x i64> accumulator
per row and vector held in registers across K; per 64-bit word of K: one broadcast per row, one
vector load per NV, then AND (or XOR), ``llvm.ctpop.v8i64`` (``vpopcntq`` with AVX-512 VPOPCNTDQ; a
byte-table sequence elsewhere) and an add. The loop over plane pairs is inside the tile, so the
pair sums are weighted (``c_p d_q``) and added into totals that also stay in registers; the tile
stores them once, as int32. Panels (``bitplanes.pack_panels``): [tiles][planes][words][T].

Which operand is which: matmul C[M, N] = A[M, K] B[K, N] broadcasts the activation rows and takes
the packed weight columns as vectors; convolution C[Cout, P] = W[Cout, K] im2col[K, P] broadcasts
the packed weight rows and takes pixels as vectors (the result is NCHW without a transpose).
Reference: ``gemm_reference`` (numpy, from the planes); the int8 kernels are the other reference.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

from qgraph.kernels import cpu
from qgraph.kernels.bitplanes import WORD, Encoding, encoding_of, pack_panels, padded_rows, planes_reference
from qgraph.kernels.gemm import _requant_block, _zero_point_terms
from qgraph.kernels.tiles import broadcast, tile_loop

MR = 6          # rows of the broadcast operand per tile
NV = 2          # <8 x i64> vectors of the vector operand per tile
LANES = 8
NR = LANES * NV

#: ``auto`` considers layers whose weights have at most this many bits (``lower.kernel_for``) ...
AUTO_WEIGHT_BITS = 4
#: ... and runs one bit-serially when weight planes x activation planes is at most this: each plane
#: pair costs an AND, a popcount and an add per 64 x 8 products, and on AVX-512 VPOPCNTDQ (Zen 4,
#: ``tools/bench_bitserial.py``) 4 pairs (2 x 2 bits) match the int8 VNNI kernel, 8 (1 x 8) run at
#: about half its speed. Without VPOPCNTDQ the vector popcount is a byte-table sequence (several
#: instructions), so only the 1-pair forms (1-bit weights and activations) are taken there.
#: (Not measured: with AMX-INT8 the int8 tiles are several times VNNI's speed, so there too only 1 pair.)
AUTO_MAX_PAIRS = 4 if cpu.has("avx512vpopcntdq") and not cpu.has("amx-int8") else 1
#: ... and when K fills at least half a 64-bit word (a depthwise 3x3 has K = 9: 55 of 64 bits idle)
AUTO_MIN_K = WORD // 2


def pairs(w: Encoding, x: Encoding) -> int:
    """Plane pairs a product of the two encodings costs (1 for the XOR form)."""
    return 1 if w.kind == "pm1" and x.kind == "pm1" else w.bits * x.bits


def use_bitserial(kernel: str, w: Encoding | None, x: Encoding, k: int) -> bool:
    """Whether a step lowered with ``kernel`` runs bit-serially on an input encoded as ``x``."""
    if kernel == "bitserial":
        return True
    return kernel == "auto" and w is not None and pairs(w, x) <= AUTO_MAX_PAIRS and k >= AUTO_MIN_K


def _make_tile(op: str):
    """The tile intrinsic: C[MR, NR] (int32, row stride ldc) = sum over plane pairs i of
    coef[i] * sum_k popcount(A[pa[i]][k][r] op B[pb[i]][k][c]), ``op`` "and" or "xor"."""

    @intrinsic
    def tile(typingctx, a, a_off, a_ps, b, b_off, b_ps, pa, pb, coef, npairs, c, c_off, ldc, kw):
        sig = types.void(a, types.intp, types.intp, b, types.intp, types.intp, pa, pb, coef, types.intp, c,
                         types.intp, types.intp, types.intp)

        def codegen(context, builder, signature, args):
            (a_v, a_off_v, a_ps_v, b_v, b_off_v, b_ps_v, pa_v, pb_v, cf_v, np_v, c_v, c_off_v, ldc_v, kw_v) = args
            arrs = [context.make_array(signature.args[i])(context, builder, args[i]) for i in (0, 3, 6, 7, 8, 10)]
            i32, i64 = ir.IntType(32), ir.IntType(64)
            vt = ir.VectorType(i64, LANES)
            a_p = builder.gep(builder.bitcast(arrs[0].data, i64.as_pointer()), [a_off_v])
            b_p = builder.gep(builder.bitcast(arrs[1].data, i64.as_pointer()), [b_off_v])
            pa_p = builder.bitcast(arrs[2].data, i64.as_pointer())
            pb_p = builder.bitcast(arrs[3].data, i64.as_pointer())
            cf_p = builder.bitcast(arrs[4].data, i64.as_pointer())
            c_p = builder.gep(builder.bitcast(arrs[5].data, i32.as_pointer()), [c_off_v])
            name = f"llvm.ctpop.v{LANES}i64"
            ctpop = builder.module.globals.get(name) or ir.Function(builder.module, ir.FunctionType(vt, [vt]), name)
            zero = ir.Constant(vt, None)

            entry = builder.block
            pair_block = builder.append_basic_block("pair")
            exit_block = builder.append_basic_block("pairs_done")
            builder.branch(pair_block)
            builder.position_at_end(pair_block)
            i = builder.phi(i64)
            i.add_incoming(ir.Constant(i64, 0), entry)
            totals = []
            for _ in range(MR * NV):
                t = builder.phi(vt)
                t.add_incoming(zero, entry)
                totals.append(t)
            qa = builder.load(builder.gep(pa_p, [i]))
            qb = builder.load(builder.gep(pb_p, [i]))
            cf = broadcast(builder, builder.load(builder.gep(cf_p, [i])), vt)
            ap = builder.gep(a_p, [builder.mul(qa, a_ps_v)])
            bp = builder.gep(b_p, [builder.mul(qb, b_ps_v)])

            def load_a(k, r):
                w = builder.load(builder.gep(ap, [builder.add(builder.mul(k, ir.Constant(i64, MR)), ir.Constant(i64, r))]))
                return broadcast(builder, w, vt)

            def load_b(k, v):
                q = builder.gep(bp, [builder.add(builder.mul(k, ir.Constant(i64, NR)), ir.Constant(i64, LANES * v))])
                return builder.load(builder.bitcast(q, vt.as_pointer()), align=8)

            def mac(acc, x, y):
                both = builder.and_(x, y) if op == "and" else builder.xor(x, y)
                return builder.add(acc, builder.call(ctpop, [both]))

            _, _, _, sums = tile_loop(builder, kw_v, rows=MR, vecs=NV, vec_type=vt, load_a=load_a, load_b=load_b,
                                      mac=mac)
            new = [builder.add(t, builder.mul(s, cf)) for t, s in zip(totals, sums)]
            after = builder.block
            i_next = builder.add(i, ir.Constant(i64, 1))
            i.add_incoming(i_next, after)
            for t, n in zip(totals, new):
                t.add_incoming(n, after)
            builder.cbranch(builder.icmp_signed("<", i_next, np_v), pair_block, exit_block)
            builder.position_at_end(exit_block)
            v32 = ir.VectorType(i32, LANES)
            for r in range(MR):
                row = builder.gep(c_p, [builder.mul(ir.Constant(i64, r), ldc_v)])
                for v in range(NV):
                    q = builder.bitcast(builder.gep(row, [ir.Constant(i64, LANES * v)]), v32.as_pointer())
                    builder.store(builder.trunc(new[r * NV + v], v32), q, align=4)
            return context.get_dummy_value()

        return sig, codegen

    return tile


_tile_and = _make_tile("and")
_tile_xor = _make_tile("xor")


# ----------------------------------------------------------------------------- packed operands

@dataclass
class BitPacked:
    """One operand as panels of bit planes (``bitplanes.pack_panels``) with its plane sums."""
    panels: np.ndarray        # uint64 [tiles][planes][words][tile]
    enc: Encoding
    rows: int                 # real rows (M, N, Cout or pixels)
    k: int                    # real K
    words: int
    tile: int
    sums: np.ndarray          # int64 [rows]: sum_k (v - o)


def pack(a: np.ndarray, tile: int, enc: Encoding | None = None) -> BitPacked:
    """Rows of A [R, K] (int8 / uint8) as bit-plane panels; the encoding from A's values unless given."""
    a = np.asarray(a)
    if a.ndim != 2 or a.dtype not in (np.int8, np.uint8):
        raise ValueError(f"bit-serial packing wants a 2-D int8/uint8 matrix, got {a.dtype} {a.shape}")
    enc = encoding_of(a) if enc is None else enc
    src = padded_rows(a, enc)
    panels, sums = pack_panels(src, enc, tile)
    return BitPacked(panels, enc, a.shape[0], a.shape[1], src.shape[1] // WORD, tile, sums)


def pair_table(a: Encoding, b: Encoding) -> tuple[np.ndarray, np.ndarray, np.ndarray, bool]:
    """(plane of A, plane of B, weight) per plane pair, and whether the XOR form applies."""
    if a.kind == "pm1" and b.kind == "pm1":
        return np.zeros(1, np.int64), np.zeros(1, np.int64), np.array([-2], np.int64), True
    ca, cb = a.coefs, b.coefs
    qa, qb = np.meshgrid(np.arange(a.bits), np.arange(b.bits), indexing="ij")
    return qa.reshape(-1).astype(np.int64), qb.reshape(-1).astype(np.int64), \
        (ca[qa] * cb[qb]).reshape(-1).astype(np.int64), False


# ----------------------------------------------------------------------------- GEMM

@njit(cache=True)
def _gemm_raw(a, a_words, b, b_words, pa, pb, coef, xor, kw, mt_n, nt_n, raw):
    """raw[mt_n*MR, nt_n*NR] int32 = S' of every tile (module docstring) without the XOR sums."""
    ldc = raw.shape[1]
    flat = raw.reshape(-1)
    npairs = pa.shape[0]
    a_ps = kw * MR
    b_ps = kw * NR
    for nt in range(nt_n):
        for mt in range(mt_n):
            if xor:
                _tile_xor(a, mt * a_words, a_ps, b, nt * b_words, b_ps, pa, pb, coef, npairs, flat,
                          mt * MR * ldc + nt * NR, ldc, kw)
            else:
                _tile_and(a, mt * a_words, a_ps, b, nt * b_words, b_ps, pa, pb, coef, npairs, flat,
                          mt * MR * ldc + nt * NR, ldc, kw)


@njit(cache=True)
def _add_sums(raw, rowsum, colsum):
    """raw[i, j] += rowsum[i] + colsum[j] (wrapping int32): the XOR form's sum(A') + sum(W')."""
    m = rowsum.shape[0]
    n = colsum.shape[0]
    cs = np.empty(n, np.int32)
    for j in range(n):
        cs[j] = np.int32(colsum[j] & 0xFFFFFFFF)
    for i in range(m):
        ri = np.int32(rowsum[i] & 0xFFFFFFFF)
        row = raw[i]
        for j in range(n):
            row[j] += ri + cs[j]


def raw_product(pa: BitPacked, pb: BitPacked) -> np.ndarray:
    """S' = sum_k (a - o_a)(b - o_b) for the packed rows of A (tile MR) and of B (tile NR), as a
    padded int32 [Mp, Np] array (wrapping; the real block is [:pa.rows, :pb.rows])."""
    if pa.k != pb.k or pa.tile != MR or pb.tile != NR:
        raise ValueError(f"bit-serial GEMM: operands do not match (K {pa.k} / {pb.k}, tiles {pa.tile} / {pb.tile})")
    mt_n, nt_n = -(-pa.rows // MR), -(-pb.rows // NR)
    raw = np.empty((mt_n * MR, nt_n * NR), np.int32)
    qa, qb, coef, xor = pair_table(pa.enc, pb.enc)
    if raw.size:
        _gemm_raw(pa.panels, pa.enc.bits * pa.words * MR, pb.panels, pb.enc.bits * pb.words * NR, qa, qb, coef, xor,
                  pa.words, mt_n, nt_n, raw)
        if xor:
            _add_sums(raw[:pa.rows, :pb.rows], pa.sums, pb.sums)
    return raw


def _zero_points(pa: BitPacked, za, pb: BitPacked, zb) -> tuple:
    """gemm's (rowsum, oa, za, colsum, ob, zb) for the planes: za' = za - o_a is za + oa with
    oa = -o_a; zb' = zb - o_b is zb - ob with ob = o_b."""
    return (pa.sums, -pa.enc.offset, np.asarray(za, np.int64).reshape(-1), pb.sums, pb.enc.offset,
            np.asarray(zb, np.int64).reshape(-1))


def gemm(pa: BitPacked, za, pb: BitPacked, zb) -> np.ndarray:
    """sum_k (A[m, k] - za) (B[k, n] - zb) as int32 [M, N]: A's rows and B's columns packed (B as
    the rows of Bᵀ); za per tensor or per row, zb per tensor or per column."""
    raw = raw_product(pa, pb)
    rowsum, oa, za_, colsum, ob, zb_ = _zero_points(pa, za, pb, zb)
    out = np.empty((pa.rows, pb.rows), np.int32)
    if out.size:
        _zero_point_terms(raw, pa.k, rowsum, oa, za_, colsum, ob, zb_, out)
    return out


def matmul(a: np.ndarray, za, pb: BitPacked, zb) -> np.ndarray:
    """(A - za) @ (B - zb) in int32 with B's columns packed once (``pack(b.T, NR)``); A [M, K]
    int8/uint8 is packed per call with the encoding its values need."""
    return gemm(pack(a, MR), za, pb, zb)


# ----------------------------------------------------------------------------- convolution

@dataclass
class BitConv:
    """A convolution's weights as bit planes, per group: rows = output channels of the group,
    K in (kh, kw, c) order (the order ``_im2col`` writes patches in)."""
    cout: int
    cin_g: int
    kernel: tuple[int, int]
    groups: list[BitPacked]
    enc: Encoding


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
    return BitConv(cout, cin_g, (kh, kw), [pack(rows[g * cg:(g + 1) * cg], MR, enc) for g in range(group)], enc)


def input_encoding(x: np.ndarray, zx: int, padded: bool) -> Encoding:
    """The planes an activation needs: from its values, and the zero point when padding reads it."""
    x = np.asarray(x)
    signed = x.dtype == np.int8
    if x.size == 0:
        return encoding_of(np.array([zx], x.dtype))
    lo, hi = _min_max(x.reshape(-1))
    zero_free = False
    if signed and lo == -1 and hi == 1:
        zero_free = not _has_zero(x.reshape(-1))
    if padded:
        lo, hi = min(lo, int(zx)), max(hi, int(zx))
        zero_free = zero_free and int(zx) != 0
    from qgraph.kernels.bitplanes import encoding_for
    return encoding_for(lo, hi, signed, zero_free)


@njit(cache=True)
def _min_max(v):
    lo = np.int64(v[0])
    hi = lo
    for i in range(v.shape[0]):
        t = np.int64(v[i])
        lo = min(lo, t)
        hi = max(hi, t)
    return lo, hi


@njit(cache=True)
def _has_zero(v):
    for i in range(v.shape[0]):
        if v[i] == 0:
            return True
    return False


@njit(cache=True)
def _im2col(xp, n0, n1, c0, cin_g, kh, kw, sh, sw, dh, dw, oh, ow, fill, out):
    """Patches of images n0..n1-1 of xp (NHWC, spatially padded with zx) as rows of ``out``
    [pixels, words * 64] bytes: row p = (n - n0)*OH*OW + y*OW + x holds tap (i, j) channel c at
    (i*KW + j)*cin_g + c, then ``fill`` up to the row's end."""
    k = kh * kw * cin_g
    rb = out.shape[1]
    p = 0
    for n in range(n0, n1):
        for y in range(oh):
            for xo in range(ow):
                row = out[p]
                t = 0
                for i in range(kh):
                    yy = y * sh + i * dh
                    for j in range(kw):
                        src = xp[n, yy, xo * sw + j * dw, c0:c0 + cin_g]
                        for c in range(cin_g):
                            row[t + c] = src[c]
                        t += cin_g
                for q in range(k, rb):
                    row[q] = fill
                p += 1


def conv(x: np.ndarray, zx: int, pc: BitConv, zw, geo, rq: tuple | None = None, out_dtype=None,
         enc: Encoding | None = None) -> np.ndarray:
    """``conv.conv_int`` computed bit-serially, same contract: int32 [N, Cout, OH, OW] accumulators,
    or with ``rq = (bias, scale, mult, shift, zp, qmin, qmax, fixed)`` the requantized output (the
    int8 conv's epilogue, ``gemm._requant_block``). ``enc``: the activation's encoding when the
    caller has it (else from x's values and zx)."""
    if x.ndim == 3:
        x = x[:, :, None, :]
    x = np.ascontiguousarray(x)
    n_b, c_in, h, w = x.shape
    g = geo.group
    if c_in != pc.cin_g * g:
        raise ValueError(f"conv: input has {c_in} channels, weights expect {pc.cin_g} x group {g}")
    oh, ow = geo.out_hw(h, w)
    (kh, kw), (sh, sw), (dh, dw) = geo.kernel, geo.strides, geo.dilations
    pt, pl = geo.pads[0], geo.pads[1]
    if enc is None:
        enc = input_encoding(x, zx, any(geo.pads))
    hp = max(h + pt, (oh - 1) * sh + (kh - 1) * dh + 1)
    wp = max(w + pl, (ow - 1) * sw + (kw - 1) * dw + 1)
    xp = np.full((n_b, hp, wp, c_in), np.array(zx).astype(x.dtype), x.dtype)
    xp[:, pt:pt + h, pl:pl + w, :] = x.transpose(0, 2, 3, 1)
    pixels = oh * ow
    cout_g = pc.cout // g
    k = kh * kw * pc.cin_g
    words = max(1, -(-k // WORD))
    zw = np.asarray(zw, np.int64).reshape(-1)
    out = np.empty((n_b, pc.cout, pixels), np.int32 if rq is None else out_dtype)
    per = max(1, min(n_b, 4096 // max(pixels, 1)))           # several small images per GEMM
    fill = np.array(enc.fill).astype(x.dtype)
    cols = np.empty((per * pixels, words * WORD), x.dtype)
    for n0 in range(0, n_b, per):
        n1 = min(n_b, n0 + per)
        np_ = (n1 - n0) * pixels
        for gi, pw in enumerate(pc.groups):
            _im2col(xp, n0, n1, gi * pc.cin_g, pc.cin_g, kh, kw, sh, sw, dh, dw, oh, ow, fill, cols)
            panels, sums = pack_panels(cols, enc, NR, np_)
            pb = BitPacked(panels, enc, np_, k, words, NR, sums)
            zw_g = zw if zw.size == 1 else zw[gi * cout_g:(gi + 1) * cout_g]
            rows = slice(gi * cout_g, (gi + 1) * cout_g)
            if rq is None:
                res = gemm(pw, zw_g, pb, zx)                    # [cout_g, np_]
                out[n0:n1, rows] = res.reshape(cout_g, n1 - n0, pixels).transpose(1, 0, 2)
                continue
            rq_g = tuple(v[rows] if isinstance(v, np.ndarray) and v.size == pc.cout and pc.cout > 1 else v
                         for v in rq)
            raw = raw_product(pw, pb)
            rowsum, oa, za_, colsum, ob, zb_ = _zero_points(pw, zw_g, pb, zx)
            _requant_block(raw, 0, np_, pixels, k, rowsum, oa, za_, colsum, ob, zb_, *rq_g, gi * cout_g,
                           out[n0:n1])
    return out.reshape(n_b, pc.cout, oh, ow)


# ----------------------------------------------------------------------------- reference

def gemm_reference(a: np.ndarray, za, b: np.ndarray, zb) -> np.ndarray:
    """Plain numpy, through the planes: sum over plane pairs of c_p d_q (A_q @ B_p) (popcounts of
    ANDed planes), plus the offsets and zero points; int64 then int32 (wrapping)."""
    a, b = np.asarray(a), np.asarray(b)
    ea, eb = encoding_of(a), encoding_of(b)
    pa, pb = planes_reference(a, ea), planes_reference(b, eb)        # [qa, M, K], [qb, K, N]
    s = np.zeros((a.shape[0], b.shape[1]), np.int64)
    for q, cq in enumerate(ea.coefs):
        for p, cp in enumerate(eb.coefs):
            s += int(cq) * int(cp) * (pa[q].astype(np.int64) @ pb[p].astype(np.int64))
    k = a.shape[1]
    ra = (a.astype(np.int64) - ea.offset).sum(axis=1)
    cb = (b.astype(np.int64) - eb.offset).sum(axis=0)
    za1 = np.asarray(za, np.int64).reshape(-1, 1) - ea.offset
    zb1 = np.asarray(zb, np.int64).reshape(1, -1) - eb.offset
    out = s - za1 * cb[None, :] - zb1 * ra[:, None] + k * za1 * zb1
    return out.astype(np.int32)
