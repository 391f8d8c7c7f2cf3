"""The register-tile loop of the GEMM micro-kernels, as LLVM IR (shared by the float and int8 kernels).

A micro-kernel keeps a ``rows x vecs`` tile of accumulator vectors in registers and walks k:

    for k in range(count):
        b[v] = load_b(k, v)                      # one vector of B's packed panel per v
        for r in range(rows):
            a = load_a(k, r)                     # A[r, k] broadcast to a vector
            acc[r][v] = mac(acc[r][v], a, b[v])  # fma (float), vpdpbusd (VNNI), ...

``tile_loop`` writes that loop (the accumulators are phi nodes, so LLVM keeps them in registers);
what differs between kernels — the element types, how A is broadcast, the multiply-accumulate
instruction, and how the tile is stored — stays in each kernel.
"""
from __future__ import annotations

from llvmlite import ir


def tile_loop(builder, count, *, rows: int, vecs: int, vec_type, load_a, load_b, mac, guard: bool = False,
              init=None):
    """Emit the k loop; returns (entry block, loop block, done block, accumulators after the loop).

    ``count`` is the i64 trip count. With ``guard`` the loop is skipped when ``count <= 0`` and the
    accumulators are then their start values (phi nodes in the done block); without it ``count >= 1``
    is assumed. The accumulators start at zero, or at ``init`` (``rows * vecs`` values computed before
    the call). The builder is left positioned at the start of the done block."""
    i64 = ir.IntType(64)
    zero = ir.Constant(vec_type, None)
    entry = builder.block
    loop = builder.append_basic_block("tile_k")
    done = builder.append_basic_block("tile_done")
    if guard:
        builder.cbranch(builder.icmp_signed(">", count, ir.Constant(i64, 0)), loop, done)
    else:
        builder.branch(loop)
    builder.position_at_end(loop)
    k = builder.phi(i64)
    k.add_incoming(ir.Constant(i64, 0), entry)
    start = [zero] * (rows * vecs) if init is None else list(init)
    acc = []
    for j in range(rows * vecs):
        p = builder.phi(vec_type)
        p.add_incoming(start[j], entry)
        acc.append(p)
    b = [load_b(k, v) for v in range(vecs)]
    new = []
    for r in range(rows):
        a = load_a(k, r)
        for v in range(vecs):
            new.append(mac(acc[r * vecs + v], a, b[v]))
    k_next = builder.add(k, ir.Constant(i64, 1))
    k.add_incoming(k_next, loop)
    for p, n in zip(acc, new):
        p.add_incoming(n, loop)
    builder.cbranch(builder.icmp_signed("<", k_next, count), loop, done)
    builder.position_at_end(done)
    if not guard:
        return entry, loop, done, new
    sums = []
    for j, n in enumerate(new):
        p = builder.phi(vec_type)
        p.add_incoming(start[j], entry)
        p.add_incoming(n, loop)
        sums.append(p)
    return entry, loop, done, sums


def broadcast(builder, scalar, vec_type):
    """``scalar`` in every lane of a ``vec_type`` vector (insertelement + zero-mask shuffle)."""
    lanes = vec_type.count
    zero = ir.Constant(vec_type, None)
    mask = ir.Constant(ir.VectorType(ir.IntType(32), lanes), None)
    return builder.shuffle_vector(builder.insert_element(zero, scalar, ir.Constant(ir.IntType(32), 0)), zero, mask)
