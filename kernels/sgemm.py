"""float32 GEMM in MLAS's summation order, register-tiled: the fast path of ``ortfloat``'s float Convs.

    C[m, n] = sum over k-blocks of (fma chain from 0 over k in the block, k ascending), blocks added
              in order                                                 (``ortfloat.sgemm_mlas``)

Each output's chain is the same as in the plain loops (same operands, same order, one rounding per
fma, one per block add), so tiling across outputs changes nothing but speed: a tile holds ``MR``
rows x ``NR = 16 * NV`` columns of C in ``MR * NV`` vector registers for a whole k-block, written in
LLVM IR (``llvm.fma.v16f32``, no fast-math flags) as ``vnni._vnni_tile`` is. On any x86-64 with FMA
LLVM lowers it to native FMAs (two ymm halves without AVX-512). Layouts:

    A panels  [M/MR][K][MR]  float32   (``pack_a``: the weights, once per step)
    B panels  [N/NR][K][NR]  float32   (written by the caller, e.g. ``ortfloat``'s dequantizing im2col)
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

from qgraph.kernels.tiles import broadcast, tile_loop

MR = 12         # rows of A (output channels) per tile
NV = 2          # zmm registers of B per tile
NR = 16 * NV    # columns of B (pixels) per tile


@intrinsic
def _fma_tile(typingctx, a, a_off, b, b_off, c, c_off, ldc, kn, first):
    """C tile (=| +=) sum_{k < kn} A[:, k] x B[k, :] with a fresh fma chain: ``first`` stores the
    block's sums, otherwise C = C + sums (one float32 add, as MLAS adds k-blocks)."""
    sig = types.void(a, types.intp, b, types.intp, c, types.intp, types.intp, types.intp, types.boolean)

    def codegen(context, builder, signature, args):
        a_arr = context.make_array(signature.args[0])(context, builder, args[0])
        b_arr = context.make_array(signature.args[2])(context, builder, args[2])
        c_arr = context.make_array(signature.args[4])(context, builder, args[4])
        a_off_v, b_off_v, c_off_v, ldc_v, kn_v, first_v = args[1], args[3], args[5], args[6], args[7], args[8]
        f32, i32, i64 = ir.FloatType(), ir.IntType(32), ir.IntType(64)
        v16 = ir.VectorType(f32, 16)
        ap = builder.gep(a_arr.data, [a_off_v])
        bp = builder.gep(b_arr.data, [b_off_v])
        cp = builder.gep(c_arr.data, [c_off_v])
        name = "llvm.fma.v16f32"
        fma = builder.module.globals.get(name) or ir.Function(
            builder.module, ir.FunctionType(v16, [v16, v16, v16]), name)

        def load_a(k, r):   # A[r, k] in every lane
            return broadcast(builder, builder.load(builder.gep(ap, [builder.add(builder.mul(k, ir.Constant(i64, MR)),
                                                                               ir.Constant(i64, r))]), align=4), v16)

        def load_b(k, v):
            b_k = builder.gep(bp, [builder.add(builder.mul(k, ir.Constant(i64, NR)), ir.Constant(i64, 16 * v))])
            return builder.load(builder.bitcast(b_k, v16.as_pointer()), align=4)

        _, _, _, sums = tile_loop(builder, kn_v, rows=MR, vecs=NV, vec_type=v16, load_a=load_a, load_b=load_b,
                                  mac=lambda acc, a, b: builder.call(fma, [a, b, acc]), guard=True)
        store = builder.append_basic_block("fma_store")
        add = builder.append_basic_block("fma_add")
        end = builder.append_basic_block("fma_end")
        builder.cbranch(first_v, store, add)

        def ptr(r, v):
            row = builder.gep(cp, [builder.mul(ir.Constant(i64, r), ldc_v)])
            return builder.bitcast(builder.gep(row, [ir.Constant(i64, 16 * v)]), v16.as_pointer())

        builder.position_at_end(store)
        for r in range(MR):
            for v in range(NV):
                builder.store(sums[r * NV + v], ptr(r, v), align=4)
        builder.branch(end)
        builder.position_at_end(add)
        for r in range(MR):
            for v in range(NV):
                q = ptr(r, v)
                builder.store(builder.fadd(builder.load(q, align=4), sums[r * NV + v]), q, align=4)
        builder.branch(end)
        builder.position_at_end(end)
        return context.get_dummy_value()

    return sig, codegen


@njit(cache=True)
def _pack_a(w, out):
    m_n, k_n = w.shape
    for t in range(out.shape[0] // (k_n * MR)):
        for k in range(k_n):
            base = (t * k_n + k) * MR
            for r in range(MR):
                i = t * MR + r
                out[base + r] = w[i, k] if i < m_n else np.float32(0)


def pack_a(w: np.ndarray) -> np.ndarray:
    """w [M, K] float32 -> flat A panels [M/MR][K][MR] (rows padded with zeros)."""
    m, k = w.shape
    out = np.empty(-(-m // MR) * MR * k, np.float32)
    _pack_a(np.ascontiguousarray(w, np.float32), out)
    return out


@njit(cache=True)
def sgemm_panels(a_packed, b_packed, k_n, kc, c, ncols):
    """c[:, :ncols] = A @ B in MLAS order (k-blocks of ``kc``) from packed panels; c is [Mp, ldc]
    (C-contiguous, Mp a multiple of MR), ncols a multiple of NR. Block by block over all tiles, so
    each block's B panel slice stays in cache."""
    mt_n = c.shape[0] // MR
    nt_n = ncols // NR
    ldc = c.shape[1]
    flat = c.ravel()
    for k0 in range(0, k_n, kc):
        kn = min(kc, k_n - k0)
        for nt in range(nt_n):
            b_off = (nt * k_n + k0) * NR
            for mt in range(mt_n):
                _fma_tile(a_packed, (mt * k_n + k0) * MR, b_packed, b_off, flat, mt * MR * ldc + nt * NR, ldc,
                          kn, k0 == 0)
