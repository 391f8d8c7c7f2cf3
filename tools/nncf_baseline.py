"""Quantize an ONNX model with NNCF (the baseline); runs inside the NNCF virtual environment.

    $QGRAPH_CACHE/nncf-venv/bin/python tools/nncf_baseline.py --model M.onnx --calib calib.npz \
        --out M.nncf.onnx [--no-fast-bias-correction]

Started by ``python tools/zoo.py baselines NAME --nncf``; imports nothing of qgraph, so it runs
with only nncf, onnx, onnxruntime and numpy installed. ``calib.npz``: one array per model input,
samples along axis 0 (or a ``.npy`` of a one-input model's samples, read from disk one at a time);
each sample is fed as a batch of one.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
import onnx


class NpySamples:
    """The samples of a one-input model's .npy file, read one at a time from disk on every pass (so
    NNCF's memory holds no more of the data than qgraph's and ORT's do in tools/bench_quant.py)."""

    def __init__(self, path: str, name: str):
        with open(path, "rb") as f:
            major, _ = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
            self.shape, _, dtype = read(f)
            self.offset = f.tell()
        self.path, self.name, self.dtype = path, name, np.dtype(dtype)
        self.count = int(np.prod(self.shape[1:]))

    def __len__(self) -> int:
        return self.shape[0]

    def __iter__(self):
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            for _ in range(len(self)):
                yield {self.name: np.fromfile(f, self.dtype, self.count).reshape((1,) + tuple(self.shape[1:]))}


def _peak_rss_mb() -> float | None:
    """This process's peak resident memory (VmHWM), or None off Linux."""
    try:
        with open("/proc/self/status") as f:
            return next(round(int(line.split()[1]) / 1024, 1) for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return None


def _input_name(model) -> str:
    inits = {t.name for t in model.graph.initializer}
    return next(i.name for i in model.graph.input if i.name not in inits)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--calib", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--no-fast-bias-correction", action="store_true")
    args = ap.parse_args()

    import nncf
    model = onnx.load(args.model)
    if args.calib.endswith(".npy"):
        items = NpySamples(args.calib, _input_name(model))
        n = len(items)
    else:
        with np.load(args.calib) as z:
            arrays = {k: z[k] for k in z.files}
        n = len(next(iter(arrays.values())))
        items = [{k: v[i:i + 1] for k, v in arrays.items()} for i in range(n)]
    t0 = time.perf_counter()
    kwargs = {"fast_bias_correction": False} if args.no_fast_bias_correction else {}
    q = nncf.quantize(model, nncf.Dataset(items), subset_size=n, **kwargs)
    onnx.save(q, args.out)
    print(json.dumps({"nncf": nncf.__version__, "seconds": round(time.perf_counter() - t0, 1),
                      "samples": n, "peak_rss_mb": _peak_rss_mb(), **kwargs}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
