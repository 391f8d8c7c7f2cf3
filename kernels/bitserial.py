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
true value fits), requantized by the same ``requant.requant_run`` — so it equals the int8 kernel bit
for bit, which the tests check on every shape and width.

Micro-kernel (``_tile_and`` / ``_tile_xor``, LLVM IR through ``tiles.tile_loop``): ``MR`` rows of
the broadcast operand x ``NR = 8 * NV`` columns of the vector operand, one <8 x i64> accumulator
per row and vector held in registers across K; per 64-bit word of K: one broadcast per row, one
vector load per NV, then AND (or XOR), ``llvm.ctpop.v8i64`` (``vpopcntq`` with AVX-512 VPOPCNTDQ; a
byte-table sequence elsewhere) and an add. The loop over plane pairs is inside the tile, so the
pair sums are weighted (``c_p d_q``) and added into totals that also stay in registers; the tile
stores them once, as int32. Panels (``bitplanes.pack_panels``): [tiles][planes][words][T].

Which operand is which: matmul C[M, N] = A[M, K] B[K, N] broadcasts the activation rows and takes
the packed weight columns as vectors; convolution (``bitconv``) C[Cout, P] = W[Cout, K] im2col[K, P]
broadcasts the packed weight rows and takes pixels as vectors (the result is NCHW without a transpose).
Reference: ``gemm_reference`` (numpy, from the planes); the int8 kernels are the other reference.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

from qgraph.kernels import cpu
from qgraph.kernels.bitplanes import WORD, Encoding, _pack, encoding_of, input_encoding, pack_panels, planes_reference
from qgraph.kernels.requant import requant_run
from qgraph.kernels.tiles import broadcast, tile_loop

MR = 6          # rows of the broadcast operand per tile
NV = 2          # <8 x i64> vectors of the vector operand per tile
LANES = 8
NR = LANES * NV

#: ``auto`` considers layers whose weights have at most this many bits (``lower.kernel_for``) ...
AUTO_WEIGHT_BITS = 4
#: ... and runs one bit-serially when weight planes x activation planes is at most this: each plane
#: pair costs an AND, a popcount and an add per 64 x 8 products, and on AVX-512 VPOPCNTDQ (Zen 4,
#: ``tools/bench_bitserial.py``) 4 pairs (2 x 2 bits) match or beat the int8 VNNI kernel, 8 (1 x 8) run at
#: 0.6-1.0x its speed. Without VPOPCNTDQ the vector popcount is a byte-table sequence (several
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


def _make_tile(op: str, nv: int = NV, rq: bool = False):
    """The tile intrinsic: for rows r < MR of the broadcast operand and columns c < 8 * nv (NR, or 8 for
    a last tile of at most 8 columns, which reads the first half of its 16-column panel),

        C[r, c] = trunc32( sum over plane pairs i of coef[i] * T_i[r, c]
                           + gamma[c] * alpha[r] + delta[c] * beta[r] + eps[r] )
        T_i[r, c] = sum_k popcount(A[pa[i]][k][r] op B[pb[i]][k][c]),   op "and" or "xor"

    (the zero-point and XOR terms of ``_terms``, so C is the finished int32 accumulator), stored at
    ``c`` + c_off with row stride ldc. alpha/beta/eps are read from row ``r0``, gamma/delta from
    column ``c0`` (both padded to whole tiles).

    With ``rq`` the tile requantizes C in its epilogue, while it is still in registers, and stores bytes:
    ``c`` is a uint8 array (the int8 / uint8 output's bytes), rows r < ``nrows`` only, per row r0 + r the
    int64 parameters ``rqp`` [4][rows] (bias, multiplier m, shift n, 2^(n-1)) and float32 ``rqs`` [rows]
    (scale s), and ``requant.requant_run``'s arithmetic lane by lane (v = C + bias, wrapping int32):

        fixed:  clamp(((int64(v) * m + 2^(n-1)) >> n) + zp, qmin, qmax)
        float:  rint(clamp(float32(v) * s, qmin - zp, qmax - zp)) + zp        (float32; rint: half to even)

    so the bytes equal what ``requant_run`` writes from the stored accumulators (tests)."""

    def typed(a, b, pa, pb, coef, rowt, colt, c, extra=()):
        sig = types.void(a, types.intp, types.intp, b, types.intp, types.intp, pa, pb, coef, types.intp, types.intp,
                         rowt, types.intp, colt, types.intp, c, types.intp, types.intp, *extra)

        def codegen(context, builder, signature, args):
            (_, a_off_v, a_ps_v, _, b_off_v, b_ps_v, _, _, _, np_v, kw_v, _, r0_v, _, c0_v, _, c_off_v,
             ldc_v) = args[:18]
            arrs = [context.make_array(signature.args[i])(context, builder, args[i])
                    for i in (0, 3, 6, 7, 8, 11, 13, 15)]
            i32, i64 = ir.IntType(32), ir.IntType(64)
            vt = ir.VectorType(i64, LANES)
            a_p = builder.gep(builder.bitcast(arrs[0].data, i64.as_pointer()), [a_off_v])
            b_p = builder.gep(builder.bitcast(arrs[1].data, i64.as_pointer()), [b_off_v])
            pa_p = builder.bitcast(arrs[2].data, i64.as_pointer())
            pb_p = builder.bitcast(arrs[3].data, i64.as_pointer())
            cf_p = builder.bitcast(arrs[4].data, i64.as_pointer())
            row_p = builder.bitcast(arrs[5].data, i64.as_pointer())        # [3][rows]: alpha, beta, eps
            col_p = builder.bitcast(arrs[6].data, i64.as_pointer())        # [2][cols]: gamma, delta
            c_p = builder.gep(builder.bitcast(arrs[7].data, (ir.IntType(8) if rq else i32).as_pointer()), [c_off_v])
            name = f"llvm.ctpop.v{LANES}i64"
            ctpop = builder.module.globals.get(name) or ir.Function(builder.module, ir.FunctionType(vt, [vt]), name)
            zero = ir.Constant(vt, None)
            n_rows = builder.extract_value(arrs[5].shape, 1)
            n_cols = builder.extract_value(arrs[6].shape, 1)

            # Pairs come sorted by |weight| = 2^e, largest first (``pair_table``), and are summed Horner-wise in
            # the accumulators themselves: before pair i they are shifted left by e_(i-1) - e_i, its K loop then
            # adds (or, weight < 0, subtracts) its popcounts, and after the last pair they are shifted by its e.
            # One shift per accumulator and pair, no multiply: T = sum_i +-2^(e_i) S_i exactly (int64 lanes).
            cttz = builder.module.globals.get("llvm.cttz.i64") or ir.Function(
                builder.module, ir.FunctionType(i64, [i64, ir.IntType(1)]), "llvm.cttz.i64")
            e_first = builder.call(cttz, [builder.load(cf_p), ir.Constant(ir.IntType(1), 0)])
            entry = builder.block
            pair_block = builder.append_basic_block("pair")
            exit_block = builder.append_basic_block("pairs_done")
            builder.branch(pair_block)
            builder.position_at_end(pair_block)
            i = builder.phi(i64)
            i.add_incoming(ir.Constant(i64, 0), entry)
            e_prev = builder.phi(i64)
            e_prev.add_incoming(e_first, entry)
            totals = []
            for _ in range(MR * nv):
                t = builder.phi(vt)
                t.add_incoming(zero, entry)
                totals.append(t)
            qa = builder.load(builder.gep(pa_p, [i]))
            qb = builder.load(builder.gep(pb_p, [i]))
            cf_s = builder.load(builder.gep(cf_p, [i]))
            e_i = builder.call(cttz, [cf_s, ir.Constant(ir.IntType(1), 0)])
            d_v = broadcast(builder, builder.sub(e_prev, e_i), vt)
            init = [builder.shl(t, d_v) for t in totals]
            ap = builder.gep(a_p, [builder.mul(qa, a_ps_v)])
            bp = builder.gep(b_p, [builder.mul(qb, b_ps_v)])

            def load_a(k, r):
                at = builder.add(builder.mul(k, ir.Constant(i64, MR)), ir.Constant(i64, r))
                return broadcast(builder, builder.load(builder.gep(ap, [at])), vt)

            def load_b(k, v):
                q = builder.gep(bp, [builder.add(builder.mul(k, ir.Constant(i64, NR)), ir.Constant(i64, LANES * v))])
                return builder.load(builder.bitcast(q, vt.as_pointer()), align=8)

            def mac_with(add):
                def mac(acc, x, y):
                    count = builder.call(ctpop, [builder.and_(x, y) if op == "and" else builder.xor(x, y)])
                    return builder.add(acc, count) if add else builder.sub(acc, count)
                return mac

            add_block = builder.append_basic_block("pair_add")
            sub_block = builder.append_basic_block("pair_sub")
            join_block = builder.append_basic_block("pair_join")
            builder.cbranch(builder.icmp_signed("<", cf_s, ir.Constant(i64, 0)), sub_block, add_block)
            ends = []
            for block, add in ((add_block, True), (sub_block, False)):
                builder.position_at_end(block)
                _, _, _, sums = tile_loop(builder, kw_v, rows=MR, vecs=nv, vec_type=vt, load_a=load_a,
                                          load_b=load_b, mac=mac_with(add), init=init)
                ends.append((builder.block, sums))
                builder.branch(join_block)
            builder.position_at_end(join_block)
            new = []
            for j in range(MR * nv):
                p = builder.phi(vt)
                for block, sums in ends:
                    p.add_incoming(sums[j], block)
                new.append(p)
            i_next = builder.add(i, ir.Constant(i64, 1))
            i.add_incoming(i_next, join_block)
            e_prev.add_incoming(e_i, join_block)
            for t, n in zip(totals, new):
                t.add_incoming(n, join_block)
            builder.cbranch(builder.icmp_signed("<", i_next, np_v), pair_block, exit_block)
            builder.position_at_end(exit_block)
            e_last = broadcast(builder, e_i, vt)
            new = [builder.shl(t, e_last) for t in new]

            def col_vec(which, v):
                q = builder.gep(col_p, [builder.add(builder.add(builder.mul(ir.Constant(i64, which), n_cols), c0_v),
                                                    ir.Constant(i64, LANES * v))])
                return builder.load(builder.bitcast(q, vt.as_pointer()), align=8)

            def row_val(which, r):
                q = builder.gep(row_p, [builder.add(builder.add(builder.mul(ir.Constant(i64, which), n_rows), r0_v),
                                                    ir.Constant(i64, r))])
                return broadcast(builder, builder.load(q), vt)

            # the terms in wrapping int32 (the result is int32 mod 2^32 anyway): 8-lane 32-bit multiplies
            v32 = ir.VectorType(i32, LANES)
            gamma = [builder.trunc(col_vec(0, v), v32) for v in range(nv)]
            delta = [builder.trunc(col_vec(1, v), v32) for v in range(nv)]
            vals = []
            for r in range(MR):
                alpha, beta, eps = (builder.trunc(row_val(w, r), v32) for w in range(3))
                for v in range(nv):
                    vals.append(builder.add(builder.trunc(new[r * nv + v], v32),
                                            builder.add(builder.mul(gamma[v], alpha),
                                                        builder.add(builder.mul(delta[v], beta), eps))))
            if not rq:
                for r in range(MR):
                    row = builder.gep(c_p, [builder.mul(ir.Constant(i64, r), ldc_v)])
                    for v in range(nv):
                        q = builder.bitcast(builder.gep(row, [ir.Constant(i64, LANES * v)]), v32.as_pointer())
                        builder.store(vals[r * nv + v], q, align=4)
                return context.get_dummy_value()
            _requant_epilogue(context, builder, signature, args, vals, nv, c_p, ldc_v, r0_v)
            return context.get_dummy_value()

        return sig, codegen

    if rq:
        @intrinsic
        def tile_rq(typingctx, a, a_off, a_ps, b, b_off, b_ps, pa, pb, coef, npairs, kw, rowt, r0, colt, c0, c, c_off,
                    ldc, rqp, rqs, zp, qmin, qmax, fixed, nrows):
            return typed(a, b, pa, pb, coef, rowt, colt, c, (rqp, rqs) + (types.intp,) * 5)
        return tile_rq

    @intrinsic
    def tile(typingctx, a, a_off, a_ps, b, b_off, b_ps, pa, pb, coef, npairs, kw, rowt, r0, colt, c0, c, c_off, ldc):
        return typed(a, b, pa, pb, coef, rowt, colt, c)
    return tile


def _requant_epilogue(context, builder, signature, args, vals, nv, c_p, ldc_v, r0_v):
    """The ``rq`` tile's epilogue (``_make_tile``): the finished int32 lanes ``vals`` [MR * nv] (<8 x i32>)
    requantized and stored as bytes, rows r < nrows; fixed or float chosen by the ``fixed`` argument."""
    i8, i32, i64, f32 = ir.IntType(8), ir.IntType(32), ir.IntType(64), ir.FloatType()
    v8, v32, v64, vf = (ir.VectorType(t, LANES) for t in (i8, i32, i64, f32))
    rqp = context.make_array(signature.args[18])(context, builder, args[18])
    rqs = context.make_array(signature.args[19])(context, builder, args[19])
    zp_v, qmin_v, qmax_v, fixed_v, nrows_v = args[20:25]
    rqp_p = builder.bitcast(rqp.data, i64.as_pointer())
    rqs_p = builder.bitcast(rqs.data, f32.as_pointer())
    n_rq = builder.extract_value(rqp.shape, 1)
    rint = builder.module.globals.get("llvm.rint.v8f32") or ir.Function(builder.module, ir.FunctionType(vf, [vf]),
                                                                        "llvm.rint.v8f32")

    def param(which, r):
        at = builder.add(builder.add(builder.mul(ir.Constant(i64, which), n_rq), r0_v), ir.Constant(i64, r))
        return builder.load(builder.gep(rqp_p, [at]))

    def clamp(x, lo, hi, vt):
        lo_v, hi_v = broadcast(builder, lo, vt), broadcast(builder, hi, vt)
        x = builder.select(builder.icmp_signed("<", x, lo_v), lo_v, x)
        return builder.select(builder.icmp_signed(">", x, hi_v), hi_v, x)

    done = builder.append_basic_block("rq_done")
    for kind in ("fixed", "float"):
        block = builder.append_basic_block(f"rq_{kind}")
        nxt = builder.append_basic_block(f"rq_not_{kind}") if kind == "fixed" else None
        if kind == "fixed":
            builder.cbranch(builder.icmp_signed("!=", fixed_v, ir.Constant(i64, 0)), block, nxt)
        else:
            builder.branch(block)
        builder.position_at_end(block)
        for r in range(MR):
            store = builder.append_basic_block(f"rq_{kind}_row{r}")
            skip = builder.append_basic_block(f"rq_{kind}_row{r}_done")
            builder.cbranch(builder.icmp_signed("<", ir.Constant(i64, r), nrows_v), store, skip)
            builder.position_at_end(store)
            bias = broadcast(builder, builder.trunc(param(0, r), i32), v32)
            row = builder.gep(c_p, [builder.mul(ir.Constant(i64, r), ldc_v)])
            if kind == "fixed":
                m = broadcast(builder, param(1, r), v64)
                sh = broadcast(builder, param(2, r), v64)
                half = broadcast(builder, param(3, r), v64)
            else:
                s = broadcast(builder, builder.load(builder.gep(rqs_p, [builder.add(r0_v, ir.Constant(i64, r))])), vf)
                lo = broadcast(builder, builder.sitofp(builder.sub(qmin_v, zp_v), f32), vf)
                hi = broadcast(builder, builder.sitofp(builder.sub(qmax_v, zp_v), f32), vf)
                zp32 = broadcast(builder, builder.trunc(zp_v, i32), v32)
            for v in range(nv):
                val = builder.add(vals[r * nv + v], bias)                  # wrapping int32, as np.int32(acc + bias)
                if kind == "fixed":
                    y = builder.ashr(builder.add(builder.mul(builder.sext(val, v64), m), half), sh)
                    y = clamp(builder.add(y, broadcast(builder, zp_v, v64)), qmin_v, qmax_v, v64)
                else:
                    f = builder.fmul(builder.sitofp(val, vf), s)
                    f = builder.select(builder.fcmp_ordered("<", f, lo), lo, f)      # max(f, lo)
                    f = builder.select(builder.fcmp_ordered(">", f, hi), hi, f)      # min(., hi)
                    y = builder.add(builder.fptosi(builder.call(rint, [f]), v32), zp32)
                q = builder.bitcast(builder.gep(row, [ir.Constant(i64, LANES * v)]), v8.as_pointer())
                builder.store(builder.trunc(y, v8), q, align=1)
            builder.branch(skip)
            builder.position_at_end(skip)
        builder.branch(done)
        if nxt is not None:
            builder.position_at_end(nxt)
    builder.position_at_end(done)


_tile_and = _make_tile("and")
_tile_xor = _make_tile("xor")
_tile_and8 = _make_tile("and", 1)      # a last tile of at most 8 columns: half the popcounts of a 16-column one
_tile_xor8 = _make_tile("xor", 1)
# the same tiles requantizing in their epilogue (``_gemm_rq_into``)
_tile_and_rq = _make_tile("and", NV, True)
_tile_xor_rq = _make_tile("xor", NV, True)
_tile_and8_rq = _make_tile("and", 1, True)
_tile_xor8_rq = _make_tile("xor", 1, True)


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
    enc = input_encoding(a, 0, False) if enc is None else enc
    panels, sums = pack_panels(a, enc, tile)
    return BitPacked(panels, enc, a.shape[0], a.shape[1], max(1, -(-a.shape[1] // WORD)), tile, sums)


@lru_cache(maxsize=256)
def pair_table(a: Encoding, b: Encoding) -> tuple[np.ndarray, np.ndarray, np.ndarray, bool]:
    """(plane of A, plane of B, weight) per plane pair, and whether the XOR form applies. The pairs
    come sorted by |weight| (a power of two), largest first: the tile sums them Horner-wise."""
    if a.kind == "pm1" and b.kind == "pm1":
        return np.zeros(1, np.int64), np.zeros(1, np.int64), np.array([-2], np.int64), True
    ca, cb = a.coefs, b.coefs
    qa, qb = np.meshgrid(np.arange(a.bits), np.arange(b.bits), indexing="ij")
    qa, qb = qa.reshape(-1).astype(np.int64), qb.reshape(-1).astype(np.int64)
    coef = (ca[qa] * cb[qb]).astype(np.int64)
    order = np.argsort(-np.abs(coef), kind="stable")     # largest |weight| first: the tile sums Horner-wise
    return qa[order], qb[order], coef[order], False


# ----------------------------------------------------------------------------- GEMM

@njit(cache=True)
def _gemm_into(a, a_words, b, b_words, pa, pb, coef, xor, kw, rowt, colt, out):
    """out[M, N] (int32, rows contiguous) = the finished accumulators of every tile (``_make_tile``; a
    last column tile of at most 8 columns with the 8-column tile); edge tiles go through a small scratch
    tile and only their real part is copied."""
    m, n = out.shape
    ldc = out.strides[0] // 4            # any row stride; columns contiguous (the tile writes from out's data)
    npairs = pa.shape[0]
    a_ps = kw * MR
    b_ps = kw * NR
    scratch = np.empty(MR * NR, np.int32)
    for nt in range(-(-n // NR)):
        c0 = nt * NR
        half = n - c0 <= LANES                  # at most 8 columns left: the 8-column tile
        cols = LANES if half else NR
        for mt in range(-(-m // MR)):
            r0 = mt * MR
            full = r0 + MR <= m and c0 + cols <= n
            if full and half and xor:
                _tile_xor8(a, mt * a_words, a_ps, b, nt * b_words, b_ps, pa, pb, coef, npairs, kw, rowt, r0, colt,
                           c0, out, r0 * ldc + c0, ldc)
            elif full and half:
                _tile_and8(a, mt * a_words, a_ps, b, nt * b_words, b_ps, pa, pb, coef, npairs, kw, rowt, r0, colt,
                           c0, out, r0 * ldc + c0, ldc)
            elif full and xor:
                _tile_xor(a, mt * a_words, a_ps, b, nt * b_words, b_ps, pa, pb, coef, npairs, kw, rowt, r0, colt,
                          c0, out, r0 * ldc + c0, ldc)
            elif full:
                _tile_and(a, mt * a_words, a_ps, b, nt * b_words, b_ps, pa, pb, coef, npairs, kw, rowt, r0, colt,
                          c0, out, r0 * ldc + c0, ldc)
            elif half and xor:
                _tile_xor8(a, mt * a_words, a_ps, b, nt * b_words, b_ps, pa, pb, coef, npairs, kw, rowt, r0, colt,
                           c0, scratch, 0, NR)
            elif half:
                _tile_and8(a, mt * a_words, a_ps, b, nt * b_words, b_ps, pa, pb, coef, npairs, kw, rowt, r0, colt,
                           c0, scratch, 0, NR)
            elif xor:
                _tile_xor(a, mt * a_words, a_ps, b, nt * b_words, b_ps, pa, pb, coef, npairs, kw, rowt, r0, colt,
                          c0, scratch, 0, NR)
            else:
                _tile_and(a, mt * a_words, a_ps, b, nt * b_words, b_ps, pa, pb, coef, npairs, kw, rowt, r0, colt,
                          c0, scratch, 0, NR)
            if not full:
                for r in range(min(MR, m - r0)):
                    for c in range(min(cols, n - c0)):
                        out[r0 + r, c0 + c] = scratch[r * NR + c]


@njit(cache=True)
def _gemm_rq_into(a, a_words, b, b_words, pa, pb, coef, xor, kw, rowt, colt, m, n, out, o_base, pixels, img_stride,
                  rqp, rqs, zp, qmin, qmax, fixed, scratch):
    """``_gemm_into`` requantized in the tiles' epilogue (``_make_tile`` with ``rq``): C[m, n] (rows: output
    channels, columns: pixels of consecutive images) goes to the bytes ``out`` (the int8 / uint8 output,
    flat) at ``o_base + (c // pixels) * img_stride + r * pixels + c % pixels``. A tile whose columns are whole
    and lie in one image is requantized and stored by the tile itself (rows past m skipped); any other (the
    last, partial column tile; one straddling two images) is written to ``scratch`` as int32 and requantized
    by ``requant_run`` per row and image. ``rqp`` [4][rows] int64 (bias, m, n, 2^(n-1)), ``rqs`` [rows] float32."""
    npairs = pa.shape[0]
    a_ps = kw * MR
    b_ps = kw * NR
    for nt in range(-(-n // NR)):
        c0 = nt * NR
        half = n - c0 <= LANES                  # at most 8 columns left: the 8-column tile
        cols = LANES if half else NR
        img = c0 // pixels
        fused = c0 + cols <= n and (c0 + cols - 1) // pixels == img
        off = o_base + img * img_stride + (c0 - img * pixels)
        for mt in range(-(-m // MR)):
            r0 = mt * MR
            nrows = min(MR, m - r0)
            if fused:
                o = off + r0 * pixels
                if half and xor:
                    _tile_xor8_rq(a, mt * a_words, a_ps, b, nt * b_words, b_ps, pa, pb, coef, npairs, kw, rowt, r0,
                                  colt, c0, out, o, pixels, rqp, rqs, zp, qmin, qmax, fixed, nrows)
                elif half:
                    _tile_and8_rq(a, mt * a_words, a_ps, b, nt * b_words, b_ps, pa, pb, coef, npairs, kw, rowt, r0,
                                  colt, c0, out, o, pixels, rqp, rqs, zp, qmin, qmax, fixed, nrows)
                elif xor:
                    _tile_xor_rq(a, mt * a_words, a_ps, b, nt * b_words, b_ps, pa, pb, coef, npairs, kw, rowt, r0,
                                 colt, c0, out, o, pixels, rqp, rqs, zp, qmin, qmax, fixed, nrows)
                else:
                    _tile_and_rq(a, mt * a_words, a_ps, b, nt * b_words, b_ps, pa, pb, coef, npairs, kw, rowt, r0,
                                 colt, c0, out, o, pixels, rqp, rqs, zp, qmin, qmax, fixed, nrows)
                continue
            if half and xor:
                _tile_xor8(a, mt * a_words, a_ps, b, nt * b_words, b_ps, pa, pb, coef, npairs, kw, rowt, r0, colt,
                           c0, scratch, 0, NR)
            elif half:
                _tile_and8(a, mt * a_words, a_ps, b, nt * b_words, b_ps, pa, pb, coef, npairs, kw, rowt, r0, colt,
                           c0, scratch, 0, NR)
            elif xor:
                _tile_xor(a, mt * a_words, a_ps, b, nt * b_words, b_ps, pa, pb, coef, npairs, kw, rowt, r0, colt,
                          c0, scratch, 0, NR)
            else:
                _tile_and(a, mt * a_words, a_ps, b, nt * b_words, b_ps, pa, pb, coef, npairs, kw, rowt, r0, colt,
                          c0, scratch, 0, NR)
            c1 = min(n, c0 + cols)
            for r in range(nrows):
                rr = r0 + r
                j = c0
                while j < c1:                   # the tile's columns image by image
                    im = j // pixels
                    e = min(c1, (im + 1) * pixels)
                    d = o_base + im * img_stride + rr * pixels + (j - im * pixels)
                    requant_run(scratch[r * NR + j - c0:r * NR + e - c0], np.int32(rqp[0, rr]), rqs[rr], rqp[1, rr],
                                rqp[2, rr], zp, qmin, qmax, fixed, out[d:d + e - j])
                    j = e


def _terms(pa: BitPacked, za, pb: BitPacked, zb, xor: bool) -> tuple[np.ndarray, np.ndarray]:
    """The per-row and per-column terms that finish a tile (``_make_tile``), as int64 padded to whole
    tiles: with za' = za - o_a (per row), zb' = zb - o_b (per column), K the real depth,

        sum_k (a - za)(b - zb) = S' + zb'_c (K za'_r - sum A'_r) - za'_r sum B'_c
        AND form:  S' = the tile;  XOR form: S' = sum A'_r + sum B'_c - 2 popcounts (tile = -2 popcounts)

    so alpha = K za' - sum A', gamma = zb', delta = sum B', beta = -za' (1 - za' for XOR), eps = 0
    (sum A' for XOR)."""
    rowt = np.empty((3, -(-pa.rows // MR) * MR), np.int64)
    colt = np.empty((2, -(-pb.rows // NR) * NR), np.int64)
    _fill_terms(pa.sums, np.asarray(za, np.int64).reshape(-1), pa.enc.offset, pa.k, pb.sums,
                np.asarray(zb, np.int64).reshape(-1), pb.enc.offset, xor, rowt, colt)
    return rowt, colt


@njit(cache=True)
def _fill_terms(asum, za, oa, k, bsum, zb, ob, xor, rowt, colt):
    rowt[:] = 0
    colt[:] = 0
    for r in range(asum.shape[0]):
        z = za[r if za.shape[0] > 1 else 0] - oa
        rowt[0, r] = k * z - asum[r]
        rowt[1, r] = (1 if xor else 0) - z
        rowt[2, r] = asum[r] if xor else 0
    for c in range(bsum.shape[0]):
        colt[0, c] = zb[c if zb.shape[0] > 1 else 0] - ob
        colt[1, c] = bsum[c]


def gemm(pa: BitPacked, za, pb: BitPacked, zb, out: np.ndarray | None = None) -> np.ndarray:
    """sum_k (A[m, k] - za) (B[k, n] - zb) as int32 [M, N] (into ``out`` when given: rows contiguous):
    A's rows (tile MR) and B's columns (the rows of Bᵀ, tile NR) packed; za per tensor or per row, zb per
    tensor or per column. Wrapping int32, exact whenever the true value fits (as the int8 kernel)."""
    if pa.k != pb.k or pa.tile != MR or pb.tile != NR:
        raise ValueError(f"bit-serial GEMM: operands do not match (K {pa.k} / {pb.k}, tiles {pa.tile} / {pb.tile})")
    out = np.empty((pa.rows, pb.rows), np.int32) if out is None else out
    qa, qb, coef, xor = pair_table(pa.enc, pb.enc)
    if out.size:
        rowt, colt = _terms(pa, za, pb, zb, xor)
        _gemm_into(pa.panels, pa.enc.bits * pa.words * MR, pb.panels, pb.enc.bits * pb.words * NR, qa, qb, coef, xor,
                   pa.words, rowt, colt, out)
    return out


def matmul(a: np.ndarray, za, pb: BitPacked, zb, enc: Encoding | None = None) -> np.ndarray:
    """(A - za) @ (B - zb) in int32 with B's columns packed once (``pack(b.T, NR)``); A [M, K]
    int8/uint8 is packed per call with the encoding its values need (``enc`` when the caller has it).
    One compiled call packs A, makes the zero-point terms and runs the tiles (``_matmul_into``): the
    same steps as ``gemm(pack(a, MR), ...)`` without their Python glue, which on a 256^3 product is
    a tenth of the time."""
    a = np.asarray(a)
    if a.ndim != 2 or a.dtype not in (np.int8, np.uint8):
        raise ValueError(f"bit-serial matmul wants a 2-D int8/uint8 A, got {a.dtype} {a.shape}")
    m, k = a.shape
    if k != pb.k or pb.tile != NR:
        raise ValueError(f"bit-serial matmul: A has K = {k}, B was packed with K = {pb.k} (tile {pb.tile})")
    enc = input_encoding(a, 0, False) if enc is None else enc
    out = np.empty((m, pb.rows), np.int32)
    if out.size:
        if a.shape[1] > 1 and a.strides[1] != 1:
            a = np.ascontiguousarray(a)
        qa, qb, coef, xor = pair_table(enc, pb.enc)
        _matmul_into(a.view(np.uint8), enc.bits, np.uint8(enc.add & 0xFF), enc.shift, enc.coefs, np.uint8(enc.fill & 0xFF),
                     enc.offset, _zp64(za), pb.panels, pb.enc.bits * pb.words * NR, pb.sums, _zp64(zb), pb.enc.offset,
                     qa, qb, coef, xor, pb.words, out)
    return out


def _zp64(z) -> np.ndarray:
    return np.asarray(z, np.int64).reshape(-1)


@njit(cache=True)
def _matmul_into(a, planes, add, shift, coefs, fill, offset, za, bpanels, b_words, bsums, zb, b_offset, qa, qb, coef,
                 xor, words, out):
    """``gemm(pack(a, MR), za, pb, zb, out)`` in one call: A's panels (``bitplanes._pack``), the
    zero-point terms (``_fill_terms``) and the tiles (``_gemm_into``)."""
    m, k = a.shape
    n = out.shape[1]
    asums = np.empty(m, np.int64)
    if k:
        apanels = np.empty(-(-m // MR) * planes * words * MR, np.uint64)      # _pack writes every word
        _pack(a, m, k, MR, planes, add, shift, coefs, fill, apanels, asums)
    else:
        apanels = np.zeros(-(-m // MR) * planes * words * MR, np.uint64)
        asums[:] = 0
    rowt = np.empty((3, -(-m // MR) * MR), np.int64)
    colt = np.empty((2, -(-n // NR) * NR), np.int64)
    _fill_terms(asums, za, offset, k, bsums, zb, b_offset, xor, rowt, colt)
    _gemm_into(apanels, planes * words * MR, bpanels, b_words, qa, qb, coef, xor, words, rowt, colt, out)


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
