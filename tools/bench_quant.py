"""Benchmark: qgraph's PTQ (``quant``) against ONNX Runtime's ``quantize_static`` on the same model,
calibration set and method. Reports wall-time ratios and peak RSS at 100 vs 400 calibration samples.

    python tools/bench_quant.py                              # efficientnet_lite0 from the zoo cache
    python tools/bench_quant.py --zoo mobilenet_v2 --methods minmax entropy --json bench.json

Each measurement runs in a fresh subprocess (so peak RSS is that run's own, ru_maxrss), loading the
calibration images lazily, batch by batch, from the zoo data (so the data itself is not what grows).
Both tools get the BN-folded model (``fold``), the same samples in the same order, QDQ s8s8
(int8 activations, int8 symmetric weights) and the method's default parameters; ORT uses
``per_channel`` as given, the same batch size (default 10: ORT's Entropy/Percentile calibrators
fail on a ragged last batch). qgraph runs with ``sqnr=false`` (ORT measures no error; the SQNR pass is
timed separately). Timings on a shared machine are noisy: ratios from one run, not a test.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("minmax", "entropy", "percentile")


def _samples(zoo: str, n: int):
    from zoo_data import open_zoo_dataset, zoo_split
    from zoo_manifest import model_entry
    if n <= 100:
        calib, _ = zoo_split(zoo)
        return calib.subset(range(min(n, len(calib))))
    entry = model_entry(zoo)
    every = open_zoo_dataset(entry["dataset"], preset=entry.get("preset"),
                             input_names=[i["name"] for i in entry.get("inputs", [])] or None)
    return every.subset(range(min(n, len(every))))


def child(args) -> None:
    """One measurement: quantize once, print {"seconds", "peak_rss_mb"} as JSON."""
    samples = _samples(args.zoo, args.n)
    out = Path(args.out)
    extra = {}
    if args.tool == "qgraph":
        import qgraph
        spec = (f"quant:act_method={args.method},granularity={args.granularity},"
                f"sqnr={'true' if args.sqnr else 'false'},batch_size={args.batch}")
        t0 = time.perf_counter()
        qgraph.optimize(args.model, spec, calib=samples, output=out, progress=False)
        seconds = time.perf_counter() - t0
    else:
        from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat,
                                              QuantType, quantize_static)

        class Reader(CalibrationDataReader):
            def __init__(self):
                self.it = iter(samples.batches(args.batch))

            def get_next(self):
                return next(self.it, None)

        method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                  "percentile": CalibrationMethod.Percentile}[args.method]
        t0 = time.perf_counter()
        quantize_static(args.model, str(out), Reader(), quant_format=QuantFormat.QDQ,
                        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                        per_channel=args.granularity == "channel", calibrate_method=method)
        seconds = time.perf_counter() - t0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    print(json.dumps({"seconds": seconds, "peak_rss_mb": rss, **extra}))


def run_child(model: str, zoo: str, tool: str, method: str, n: int, granularity: str, batch: int,
              out: str, sqnr: bool = False) -> dict:
    cmd = [sys.executable, __file__, "_child", "--model", model, "--zoo", zoo, "--tool", tool,
           "--method", method, "--n", str(n), "--granularity", granularity, "--batch", str(batch),
           "--out", out] + (["--sqnr"] if sqnr else [])
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1][:300]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def latency(path: str, zoo: str, runs: int = 20) -> float:
    """Median seconds per batch-1 inference of a model in ORT (for the fused-QDQ speed check)."""
    import numpy as np
    import onnxruntime as ort
    feed = next(iter(_samples(zoo, 1).batches(1)))
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    names = {i.name for i in sess.get_inputs()}
    feed = {k: v for k, v in feed.items() if k in names}
    for _ in range(3):
        sess.run(None, feed)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        sess.run(None, feed)
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--zoo", default="efficientnet_lite0", help="zoo model name (models/manifest.toml)")
    p.add_argument("--model", help="ONNX model (default: the zoo model from the cache)")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--granularity", default="channel", choices=("channel", "tensor"))
    p.add_argument("--batch", type=int, default=10,
                   help="calibration batch, both tools (ORT's histogram calibrators need every batch the same "
                        "size: it must divide the sample counts)")
    p.add_argument("--rss", nargs="*", type=int, default=[100, 400], help="sample counts for the RSS check")
    p.add_argument("--ort-rss-methods", nargs="*", default=["minmax"],
                   help="methods for which ORT runs at the larger sample count (its Entropy/Percentile "
                        "hold every activation: 400 images would need ~4x the 100-image RSS)")
    p.add_argument("--json", help="write the figures here")
    args = p.parse_args(argv)

    import qgraph
    from zoo_manifest import model_path
    src = args.model
    if src is None:
        src = str(model_path(args.zoo))
    tmp = tempfile.mkdtemp(prefix="bench-quant-")
    folded = os.path.join(tmp, "folded.onnx")
    qgraph.optimize(src, "fold", output=folded, progress=False)

    rows = []
    small, large = (args.rss + [100, 400])[:2]
    for method in args.methods:
        for n in sorted({small, large}):
            for tool in ("qgraph", "ort"):
                if tool == "ort" and n == large and method not in args.ort_rss_methods:
                    continue
                out = os.path.join(tmp, f"{tool}_{method}_{n}.onnx")
                r = run_child(folded, args.zoo, tool, method, n, args.granularity, args.batch, out)
                r.update(tool=tool, method=method, n=n, out=out)
                rows.append(r)
                print(json.dumps({k: v for k, v in r.items() if k != "out"}), flush=True)
    sq = run_child(folded, args.zoo, "qgraph", "minmax", small, args.granularity, args.batch,
                   os.path.join(tmp, "qgraph_sqnr.onnx"), sqnr=True)
    summary = {"model": args.zoo, "granularity": args.granularity, "batch": args.batch, "runs": rows,
               "qgraph_minmax_with_sqnr_seconds": sq.get("seconds")}
    for method in args.methods:
        q = next((r for r in rows if r["tool"] == "qgraph" and r["method"] == method and r["n"] == small), {})
        o = next((r for r in rows if r["tool"] == "ort" and r["method"] == method and r["n"] == small), {})
        if "seconds" in q and "seconds" in o:
            summary[f"time_ratio_{method}"] = round(q["seconds"] / o["seconds"], 3)
        for tool in ("qgraph", "ort"):
            a = next((r for r in rows if r["tool"] == tool and r["method"] == method and r["n"] == small), {})
            b = next((r for r in rows if r["tool"] == tool and r["method"] == method and r["n"] == large), {})
            if "peak_rss_mb" in a and "peak_rss_mb" in b:
                summary[f"rss_growth_{tool}_{method}"] = round(b["peak_rss_mb"] / a["peak_rss_mb"], 3)
    q = next((r for r in rows if r["tool"] == "qgraph" and r["method"] == "minmax" and r["n"] == small), None)
    o = next((r for r in rows if r["tool"] == "ort" and r["method"] == "minmax" and r["n"] == small), None)
    if q and o and "seconds" in q and "seconds" in o:
        lq, lo = latency(q["out"], args.zoo), latency(o["out"], args.zoo)
        summary.update(latency_qgraph_ms=round(lq * 1e3, 3), latency_ort_ms=round(lo * 1e3, 3),
                       latency_ratio=round(lq / lo, 3))
    print()
    print(f"{'tool':8} {'method':11} {'n':>4} {'seconds':>8} {'peak RSS MB':>12}")
    for r in rows:
        print(f"{r['tool']:8} {r['method']:11} {r['n']:>4} {r.get('seconds', float('nan')):8.2f} "
              f"{r.get('peak_rss_mb', float('nan')):12.0f}  {r.get('error', '')}")
    for k, v in summary.items():
        if k.startswith(("time_ratio", "rss_growth", "latency", "qgraph_minmax")):
            print(f"{k:32} {v}")
    if args.json:
        Path(args.json).write_text(json.dumps({k: v for k, v in summary.items()}, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_child":
        ap = argparse.ArgumentParser()
        ap.add_argument("_child")
        for a in ("--model", "--zoo", "--tool", "--method", "--granularity", "--out"):
            ap.add_argument(a, required=True)
        ap.add_argument("--n", type=int, required=True)
        ap.add_argument("--batch", type=int, default=16)
        ap.add_argument("--sqnr", action="store_true")
        child(ap.parse_args())
    else:
        sys.exit(main())
