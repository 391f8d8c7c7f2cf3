"""Low-bit weight grids: binary, ternary, power-of-two. Decisions only, like ``qgraph.qparams``.

Each grid is an integer codebook (``QParams.levels``) and a scale α per output channel (or one per
tensor), so that DequantizeLinear's ``α · q`` is the grid exactly and plain ONNX Runtime runs it:

    binary    q ∈ {−1, +1}:  q = sign(w) (sign(0) = +1),  α = mean|w|
              XNOR-Net (Rastegari et al. 2016, §3.1): for B = sign(W), α* = ‖W‖₁ / n minimizes ‖W − αB‖²
    ternary   q ∈ {−1, 0, +1}:  Δ = 0.7 · mean|w|,  q = sign(w) · [|w| > Δ],  α = mean{|w| : |w| > Δ}
              TWN (Li, Zhang & Liu 2016, §2.2: Δ* ≈ 0.7 · E|W| for uniform / normal weights; α*
              the mean of the kept magnitudes)
    pot       q ∈ {0, ±1, ±2, ±4, …, ±2^(m−1)},  m = 2^(b−1) − 1 magnitudes for b = 2, 3, 4 bits (1, 3, 7):
              a log2 grid with zero, as INQ (Zhou et al. 2017, §3.1) — bits b: one for the sign, b − 1
              index the m powers and zero. α = max|w| / 2^(m−1) (the largest weight on the top level,
              INQ's n1 without rounding α to a power of two) for ``method=minmax``; for ``mse`` α is
              searched over a · that, a ∈ [0.3, 1], for the smallest ‖W − α q‖². q = the nearest level
              (half-way between two levels rounds up, as INQ's (α + β)/2 boundaries).

Binary and ternary are stored as −1/0/+1, power-of-two as the integers ±2^k (k ≤ 6 fits int8: b = 4 is
±64). ``weight_integers`` is each grid's own assignment (TWN's threshold Δ for ternary, which is not
the midpoint α/2 the nearest level would use); GPTQ (``qgraph.rounding``) instead projects each column
on the nearest level of the codebook and carries the error forward.
"""
from __future__ import annotations

import numpy as np

from qgraph.errors import OptionError
from qgraph.ops import QParams, nearest_level, quantize, storage_np_dtype

GRIDS = ("uniform", "binary", "ternary", "pot")
#: TWN's threshold as a fraction of mean|w|
TWN_DELTA = 0.7
POT_BITS = (2, 3, 4)


def pot_levels(bits: int) -> np.ndarray:
    """0 and ±2^k, k = 0 .. 2^(bits−1) − 2 (bits 2: [−1, 0, 1]; 3: ±{1, 2, 4}; 4: ±{1 .. 64})."""
    if bits not in POT_BITS:
        raise ValueError(f"power-of-two weights take 2, 3 or 4 bits, not {bits}")
    mags = 2 ** np.arange(2 ** (bits - 1) - 1)
    return np.concatenate([-mags[::-1], [0], mags]).astype(np.int64)


def grid_levels(grid: str, bits: int) -> np.ndarray:
    if grid == "binary":
        return np.array([-1, 1], np.int64)
    if grid == "ternary":
        return np.array([-1, 0, 1], np.int64)
    if grid == "pot":
        return pot_levels(bits)
    raise ValueError(f"no codebook for grid {grid!r}")


def grid_bits(grid: str, bits: int) -> int:
    """The bits a weight of the grid takes as a code (binary 1, ternary 2, pot ``bits``)."""
    return {"binary": 1, "ternary": 2}.get(grid, bits)


def _rows(w: np.ndarray, axis: int | None) -> np.ndarray:
    """w as [channels, entries] (one row when per tensor)."""
    w = np.asarray(w, np.float64)
    return w.reshape(1, -1) if axis is None else np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)


def _back(rows: np.ndarray, shape, axis: int | None) -> np.ndarray:
    if axis is None:
        return rows.reshape(shape)
    moved = list(shape)
    moved.insert(0, moved.pop(axis))
    return np.moveaxis(rows.reshape(moved), 0, axis)


def ternary_threshold(rows: np.ndarray) -> np.ndarray:
    """Δ per row: 0.7 · mean|w|."""
    return TWN_DELTA * np.abs(rows).mean(axis=1)


def grid_qparams(w: np.ndarray, *, grid: str, bits: int, storage: str, axis: int | None,
                 method: str = "minmax") -> QParams:
    """Scale α per slice along ``axis`` (or one) and the codebook of ``grid`` (module docstring)."""
    rows = _rows(w, axis)
    a = np.abs(rows)
    levels = grid_levels(grid, bits)
    top = int(levels.max())
    if grid == "binary":
        alpha = a.mean(axis=1)
    elif grid == "ternary":
        keep = a > ternary_threshold(rows)[:, None]
        n = keep.sum(axis=1)
        alpha = np.where(n > 0, (a * keep).sum(axis=1) / np.maximum(n, 1), 0.0)
    elif grid == "pot":
        alpha = a.max(axis=1) / top
        if method == "mse":
            alpha = _pot_mse(rows, alpha, levels)
        elif method != "minmax":
            raise ValueError(f"unknown weight method {method!r} for power-of-two weights (minmax or mse)")
    else:
        raise ValueError(f"unknown grid {grid!r}; one of {', '.join(GRIDS)}")
    tiny = alpha < np.finfo(np.float32).tiny            # an all-zero channel: any scale, integers 0 or ±1
    alpha = np.where(tiny, 1.0, alpha).astype(np.float32)
    scale = alpha if axis is not None else np.float32(alpha[0])
    zp_dtype = np.int32 if storage in ("int4", "uint4") else storage_np_dtype(storage)
    return QParams(scale=np.asarray(scale, np.float32), zero_point=np.zeros(np.shape(scale), zp_dtype),
        storage=storage, bits=grid_bits(grid, bits), qmin=int(levels.min()), qmax=top, axis=axis,
        symmetric=True, method=grid, rmin=-(alpha * top).astype(np.float32), rmax=(alpha * top).astype(np.float32),
        meta={"weight_method": method} if grid == "pot" else {}, levels=levels)


def _pot_mse(rows: np.ndarray, alpha0: np.ndarray, levels: np.ndarray, candidates: int = 60) -> np.ndarray:
    """Per row, α = a · alpha0 (a in [0.3, 1]) with the smallest ‖w − α q(w/α)‖²."""
    best = np.full(len(alpha0), np.inf)
    out = alpha0.copy()
    for a in np.linspace(0.3, 1.0, candidates):
        s = np.where(alpha0 > 0, alpha0 * a, 1.0)[:, None]
        err = np.square(nearest_level(rows / s, levels) * s - rows).sum(axis=1)
        better = err < best
        best[better] = err[better]
        out[better] = alpha0[better] * a
    return out


def weight_integers(w: np.ndarray, qp: QParams) -> np.ndarray:
    """The integers of ``w`` on ``qp``'s grid by the grid's own rule: binary sign(w), ternary TWN's
    threshold Δ, power-of-two and uniform the nearest level (``ops.quantize``)."""
    if qp.method == "binary":
        return np.where(np.asarray(w) >= 0, 1, -1).astype(np.int64)
    if qp.method == "ternary":
        rows = _rows(w, qp.axis)
        q = np.sign(rows) * (np.abs(rows) > ternary_threshold(rows)[:, None])
        return _back(q, np.shape(w), qp.axis).astype(np.int64)
    return quantize(w, qp)


def refuse_sparse_binary(grid: str, sparse: dict[str, float]) -> None:
    """Binary weights have no zero level (q ∈ {−1, +1}), so a layer ``sparsify`` left with exact zeros
    cannot be binary: nearest rounding would turn its zeros into +α (the sparsity gone, silently) and
    GPTQ's pinned zeros would write the code 0 (a ternary layer, silently). ``sparse``: layer name ->
    fraction of zeros, for the layers that would take ``grid``. Raises ``OptionError`` naming them
    and the ways out; ternary and power-of-two grids hold 0 and keep the zeros exact."""
    sparse = {k: v for k, v in sparse.items() if v > 0}
    if grid != "binary" or not sparse:
        return
    names = sorted(sparse)
    shown = ", ".join(f"{n} ({sparse[n]:.0%} zeros)" for n in names[:5]) + (f" and {len(names) - 5} more"
                                                                           if len(names) > 5 else "")
    raise OptionError(f"quant:weight_grid=binary has no zero level (±α only), so it cannot keep the zeros sparsify "
                      f"left in {len(names)} layer(s): {shown}; use weight_grid=ternary (0, ±α), keep those layers "
                      f"off the grid with precision={names[0]}@4 (uniform), or leave them dense with "
                      f"sparsify:exclude={names[0]}")


def storage_for(levels: np.ndarray, storage4: str) -> str:
    """int4 when every level fits [−8, 7] and ``storage4`` asks for it, else int8."""
    return "int4" if storage4 == "int4" and levels.min() >= -8 and levels.max() <= 7 else "int8"
