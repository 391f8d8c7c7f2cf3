#!/usr/bin/env python
"""Benchmark: how long quantizing a big zoo model takes, as a ratio to ONNX Runtime's own work on it.

    python tools/bench_bigquant.py [--models light_vgg19,light_bvlc_alexnet] [--calib 8]
                                   [--pipelines 'fold,quant:granularity=tensor|fold,equalize,...'] [--json out.json]

Per model, the unit is measured first, in the same process: an ONNX Runtime session built on the float
model file plus one pass over the ``--calib`` calibration samples (batch 4, as ``quant`` calibrates).
Then each pipeline runs through ``qgraph.optimize`` on the same samples (written to a temporary
file, as ``qgraph-opt -o`` does) and is reported as seconds and as a multiple of that unit, with the
time of each pass from the report. On a shared machine only the ratios mean something. The default
pipelines are the README lowering table's slow cells on VGG-19 / AlexNet / ZFNet-512 (``fold,quant``,
``equalize``, GPTQ, bias correction).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import cpu_model  # noqa: E402

PIPELINES = ("fold,quant:granularity=tensor",
             "fold,equalize,quant:granularity=tensor",
             "fold,equalize,quant:granularity=tensor,biascorr",
             "fold,equalize,quant:granularity=tensor,rounding=gptq,act_method=mse,biascorr")


def reference_seconds(path: Path, calib) -> float:
    """ORT session on the float model + one pass over ``calib`` in batches of 4."""
    import onnxruntime as ort
    t0 = time.perf_counter()
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(os.fspath(path), so, providers=["CPUExecutionProvider"])
    for batch in calib.batches(_batch(sess)):
        sess.run(None, batch)
    return time.perf_counter() - t0


def _batch(sess) -> int:
    dims = [i.shape[0] for i in sess.get_inputs()]
    fixed = [d for d in dims if isinstance(d, int) and d > 0]
    return min(fixed) if fixed else 4


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="light_vgg19", help="comma-separated zoo model names")
    ap.add_argument("--calib", type=int, default=8, help="calibration samples (first of the calibration split)")
    ap.add_argument("--pipelines", default="|".join(PIPELINES), help="'|'-separated pipelines")
    ap.add_argument("--json", help="write the figures here")
    ap.add_argument("--keep", metavar="DIR", help="keep each written model as DIR/<model>.<n>.onnx (n: the "
                                                  "pipeline's index), to compare two versions' outputs")
    args = ap.parse_args(argv)
    import onnxruntime

    import qgraph
    from zoo_data import zoo_split
    from zoo_manifest import model_path
    out = {"cpu": cpu_model(), "ort": onnxruntime.__version__, "calib": args.calib, "models": {}}
    print(f"{out['cpu']}, ORT {out['ort']}, {args.calib} calibration samples")
    for name in args.models.split(","):
        path = model_path(name)
        calib, _ = zoo_split(name)
        calib = calib.subset(range(min(args.calib, len(calib))))
        unit = reference_seconds(path, calib)
        rows = out["models"][name] = {"reference_seconds": round(unit, 2), "pipelines": {}}
        print(f"\n{name}: reference (ORT session + one pass over the calibration samples) {unit:.1f} s")
        for n, pipe in enumerate(args.pipelines.split("|")):
            with tempfile.TemporaryDirectory() as tmp:
                dest = Path(args.keep) / f"{name}.{n}.onnx" if args.keep else Path(tmp) / "q.onnx"
                t0 = time.perf_counter()
                _, report = qgraph.optimize(path, pipe, calib=calib, output=dest, progress=False)
                secs = time.perf_counter() - t0
            passes = {r["pass"]: r["seconds"] for r in report.rows[1:]}
            rows["pipelines"][pipe] = {"seconds": round(secs, 1), "x_reference": round(secs / unit, 2),
                                       "passes": passes}
            detail = ", ".join(f"{p.split(':')[0]} {s:.1f}" for p, s in passes.items())
            print(f"  {pipe:80s} {secs:7.1f} s = {secs / unit:5.2f} x reference   ({detail})", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
