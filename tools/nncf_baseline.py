"""Quantize an ONNX model with NNCF (the baseline); runs inside the NNCF virtual environment.

    $QGRAPH_CACHE/nncf-venv/bin/python tools/nncf_baseline.py --model M.onnx --calib calib.npz \
        --out M.nncf.onnx [--no-fast-bias-correction]

Started by ``python tools/zoo.py baselines NAME --nncf``; imports nothing of qgraph, so it runs
with only nncf, onnx, onnxruntime and numpy installed. ``calib.npz``: one array per model input,
samples along axis 0; each sample is fed as a batch of one.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
import onnx


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--calib", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--no-fast-bias-correction", action="store_true")
    args = ap.parse_args()

    import nncf
    model = onnx.load(args.model)
    with np.load(args.calib) as z:
        arrays = {k: z[k] for k in z.files}
    n = len(next(iter(arrays.values())))
    items = [{k: v[i:i + 1] for k, v in arrays.items()} for i in range(n)]
    t0 = time.perf_counter()
    kwargs = {"fast_bias_correction": False} if args.no_fast_bias_correction else {}
    q = nncf.quantize(model, nncf.Dataset(items), subset_size=n, **kwargs)
    onnx.save(q, args.out)
    print(json.dumps({"nncf": nncf.__version__, "seconds": round(time.perf_counter() - t0, 1),
                      "samples": n, **kwargs}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
