#!/usr/bin/env python
"""Benchmark: qgraph's k-means and Huffman codec against the usual tools, as ratios from one run.

    python tools/bench_compress.py                      # 25 M weights, k = 256, 20 iterations
    python tools/bench_compress.py --n 2000000 --repeat 3 --json bench.json

k-means: the same weights (seeded Student-t(4) values, the shape of trained weights, or ``--weights
MODEL.onnx``: every Conv/Gemm/MatMul weight of a model), the same linear initialization, 20 Lloyd
iterations each, one thread each (``--threads`` for scikit-learn's own):
    ours      sort once (Numba radix sort), Lloyd on prefix sums (O(k log n) per iteration), labels;
              as ``share`` runs it (empty clusters refilled by splitting the worst one) and as plain Lloyd
    numpy     vectorized Lloyd: labels = searchsorted(midpoints, x), centroids = bincount(labels, x) / counts
    sklearn   sklearn.cluster.KMeans(algorithm="lloyd", n_init=1, max_iter=20, tol=0)
numpy's centroids must equal our plain Lloyd's (the same algorithm from the same start); scikit-learn
moves empty clusters to far points instead, so its centroids differ: compare the inertia.

Huffman: the codebook indices of those weights at k = 256 and k = 32 (one byte each), as ``share``
writes them; ours encodes / decodes with a canonical Huffman code (one core, Numba), zlib (level 6)
and zstd (level 3 and 9, one thread) compress / decompress the same bytes. Rates are input symbols
(bytes) per second, best of ``--repeat``; the machine is shared, so only the ratios of one run mean
something, and even they move with the load. The "CPU s" / "per CPU s" columns are the process CPU
time of the same runs (for these one-thread runs: what they take on a core of their own).
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
import zlib
from pathlib import Path

import numpy as np

from qgraph import huffman, kmeans


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


#: CPU seconds of the last ``best`` call (its fastest run): on a shared machine the wall time of a
#: one-thread run is its CPU time plus the time other jobs held the core; the CPU time is not
CPU = {"last": 0.0}


def best(fn, repeat: int) -> tuple[float, object]:
    """Best wall time of ``repeat`` runs (and, in ``CPU["last"]``, the least process CPU time)."""
    out, t_best, c_best = None, float("inf"), float("inf")
    for _ in range(repeat):
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        t_best = min(t_best, time.perf_counter() - t0)
        c_best = min(c_best, time.process_time() - c0)
    CPU["last"] = c_best
    return t_best, out


def weights(args) -> np.ndarray:
    if args.weights:
        from qgraph import ir
        from qgraph.ops import LAYER_OPS, layer_weight
        g = ir.load(args.weights)
        parts = [np.asarray(layer_weight(n), np.float32).reshape(-1) for n in g.nodes
                 if n.op in LAYER_OPS and layer_weight(n) is not None]
        w = np.concatenate(parts)
        return w[:args.n] if args.n else w
    return (np.random.default_rng(0).standard_t(4, args.n) * 0.02).astype(np.float32)


# ----------------------------------------------------------------------------- k-means

def ours(x, c0, iters, repair=True):
    xs = kmeans.sort_values(x)
    c = c0.copy()
    kmeans.lloyd_sorted(xs, *kmeans.prefix_sums(xs), c, iters, repair)
    labels = np.empty(x.size, np.int32)
    inertia = kmeans.assign(x, c, labels)
    return c, labels, inertia


def numpy_lloyd(x, c0, iters):
    c = c0.copy()
    x64 = x.astype(np.float64)
    for _ in range(iters):
        labels = np.searchsorted((c[1:] + c[:-1]) / 2, x64)
        counts = np.bincount(labels, minlength=c.size)
        sums = np.bincount(labels, weights=x64, minlength=c.size)
        c = np.where(counts > 0, sums / np.maximum(counts, 1), c)
        c.sort()
    labels = np.searchsorted((c[1:] + c[:-1]) / 2, x64)
    return c, labels, float(np.sum((x64 - c[labels]) ** 2))


def sklearn_lloyd(x, c0, iters, threads):
    from sklearn.cluster import KMeans
    from threadpoolctl import threadpool_limits
    with threadpool_limits(limits=threads):
        km = KMeans(n_clusters=c0.size, init=c0.reshape(-1, 1).astype(x.dtype), n_init=1, max_iter=iters, tol=0.0,
                    algorithm="lloyd", copy_x=False)
        km.fit(x.reshape(-1, 1))
    c = np.sort(km.cluster_centers_.reshape(-1).astype(np.float64))
    return c, km.labels_, float(km.inertia_)


def bench_kmeans(x: np.ndarray, k: int, iters: int, args) -> dict:
    c0 = kmeans.init_centroids(np.array([x.min(), x.max()], np.float64), k, "linear")
    ours(x[:1000], c0, 2)                                   # compile outside the timing
    ours(x[:1000], c0, 2, False)
    rows = {}
    t, (c_ours, lab_ours, in_ours) = best(lambda: ours(x, c0, iters), args.repeat)
    rows["qgraph share (Numba, 1 thread)"] = {"seconds": t, "cpu_s": CPU["last"], "inertia": in_ours, "vs": "-", "max_centroid_diff": 0.0}
    t, (c_plain, _, in_plain) = best(lambda: ours(x, c0, iters, False), args.repeat)
    rows["qgraph, plain Lloyd (repair=False)"] = {"seconds": t, "cpu_s": CPU["last"], "inertia": in_plain, "vs": "-",
                                                  "max_centroid_diff": float(np.max(np.abs(c_plain - c_ours)))}
    if not args.skip_numpy:
        t, (c, _, inertia) = best(lambda: numpy_lloyd(x, c0, iters), 1)
        rows["numpy vectorized Lloyd"] = {"seconds": t, "cpu_s": CPU["last"], "inertia": inertia, "vs": "plain",
                                          "max_centroid_diff": float(np.max(np.abs(c - c_plain)))}
    if not args.skip_sklearn:
        t, (c, _, inertia) = best(lambda: sklearn_lloyd(x, c0, iters, args.threads), 1)
        rows[f"scikit-learn KMeans (lloyd, {args.threads} thread{'s' if args.threads > 1 else ''})"] = {
            "seconds": t, "cpu_s": CPU["last"], "inertia": inertia, "vs": "plain", "max_centroid_diff": float(np.max(np.abs(c - c_plain)))}
    return {"n": int(x.size), "k": k, "iterations": iters, "rows": rows, "labels": lab_ours}


# ----------------------------------------------------------------------------- Huffman

def bench_codecs(symbols: np.ndarray, alphabet: int, args) -> dict:
    import zstandard
    data = symbols.astype(np.uint8)
    raw = data.tobytes()
    n = data.size
    lengths = huffman.code_lengths(np.bincount(data, minlength=alphabet))
    dec = huffman.Decoder(lengths)
    enc_small, nb_small = huffman.encode(data[:1000], lengths)        # compile
    dec.decode(enc_small, nb_small, 1000)
    t_enc, (stream, nbits) = best(lambda: huffman.encode(data, lengths), args.repeat)
    out = np.empty(n, np.int32)
    t_dec, _ = best(lambda: dec.decode(stream, nbits, n, out), args.repeat)
    cpu_dec = CPU["last"]
    assert np.array_equal(out, data), "Huffman round trip failed"
    rows = {"qgraph Huffman (Numba)": {"encode_s": t_enc, "decode_s": t_dec, "decode_cpu_s": cpu_dec,
                                       "bytes": (nbits + 7) // 8}}
    t_c, z = best(lambda: zlib.compress(raw, 6), args.repeat)
    t_d, _ = best(lambda: zlib.decompress(z), args.repeat)
    rows["zlib level 6"] = {"encode_s": t_c, "decode_s": t_d, "decode_cpu_s": CPU["last"], "bytes": len(z)}
    for level in (3, 9):
        cctx, dctx = zstandard.ZstdCompressor(level=level), zstandard.ZstdDecompressor()
        t_c, z = best(lambda: cctx.compress(raw), args.repeat)
        t_d, _ = best(lambda: dctx.decompress(z), args.repeat)
        rows[f"zstd level {level}"] = {"encode_s": t_c, "decode_s": t_d, "decode_cpu_s": CPU["last"], "bytes": len(z)}
    for r in rows.values():
        r["encode_msym_s"] = n / r["encode_s"] / 1e6
        r["decode_msym_s"] = n / r["decode_s"] / 1e6
        r["decode_msym_cpu_s"] = n / max(r["decode_cpu_s"], 1e-9) / 1e6
        r["bits_per_symbol"] = 8 * r["bytes"] / n
    return {"symbols": n, "alphabet": alphabet, "entropy_bits": _entropy(data, alphabet), "rows": rows}


def _entropy(data: np.ndarray, a: int) -> float:
    p = np.bincount(data, minlength=a) / data.size
    p = p[p > 0]
    return float(-(p * np.log2(p)).sum())


# ----------------------------------------------------------------------------- main

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=25_000_000, help="weights (default 25 M)")
    ap.add_argument("--k", type=int, default=256)
    ap.add_argument("--iterations", type=int, default=20)
    ap.add_argument("--weights", help="take the weights of this ONNX model instead of random ones")
    ap.add_argument("--repeat", type=int, default=3, help="best of this many runs (ours and the codecs)")
    ap.add_argument("--threads", type=int, default=1, help="scikit-learn's threads (ours use one)")
    ap.add_argument("--skip-sklearn", action="store_true")
    ap.add_argument("--skip-numpy", action="store_true")
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args(argv)
    import numba
    import sklearn
    import zstandard
    head = {"cpu": cpu_model(), "python": platform.python_version(), "numpy": np.__version__,
            "numba": numba.__version__, "sklearn": sklearn.__version__, "zstandard": zstandard.__version__}
    print(f"CPU: {head['cpu']}; numpy {head['numpy']}, numba {head['numba']}, scikit-learn {head['sklearn']}, "
          f"zstandard {head['zstandard']}", flush=True)
    x = weights(args)
    km = bench_kmeans(x, args.k, args.iterations, args)
    print(f"\nk-means: {km['n']:,} weights, k = {km['k']}, {km['iterations']} Lloyd iterations, same linear start")
    base = km["rows"]["qgraph share (Numba, 1 thread)"]["seconds"]
    print(f"  {'':44s} {'seconds':>9s} {'CPU s':>8s} {'x ours':>8s} {'inertia':>14s} {'max |c - c_ref|':>16s} (ref)")
    for name, r in km["rows"].items():
        print(f"  {name:44s} {r['seconds']:9.3f} {r['cpu_s']:8.3f} {r['seconds'] / base:8.1f} {r['inertia']:14.6g} "
              f"{r['max_centroid_diff']:16.3g} ({'qgraph share' if r['vs'] == '-' else 'qgraph plain Lloyd'})")
    codecs = {}
    for k in (args.k, 32):
        labels = km["labels"] if k == args.k else kmeans.kmeans_1d(x, k, max_iter=args.iterations).labels
        c = bench_codecs(labels, k, args)
        codecs[k] = c
        print(f"\ncodebook indices, k = {k}: {c['symbols']:,} one-byte symbols, entropy {c['entropy_bits']:.3f} bits")
        print(f"  {'':24s} {'encode Msym/s':>14s} {'decode Msym/s':>14s} {'per CPU s':>10s} {'bits/symbol':>12s} "
              f"{'decode x zlib':>14s} {'decode x zstd-3':>16s}")
        zl, zs = c["rows"]["zlib level 6"]["decode_s"], c["rows"]["zstd level 3"]["decode_s"]
        for name, r in c["rows"].items():
            print(f"  {name:24s} {r['encode_msym_s']:14.1f} {r['decode_msym_s']:14.1f} {r['decode_msym_cpu_s']:10.1f} "
                  f"{r['bits_per_symbol']:12.3f} "
                  f"{zl / r['decode_s']:14.2f} {zs / r['decode_s']:16.2f}")
    if args.json:
        km.pop("labels")
        Path(args.json).write_text(json.dumps({**head, "kmeans": km, "codecs": codecs}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
