#!/usr/bin/env python
"""Benchmark: channel pruning on the zoo. For each model, ``fold`` then ``fold,prune:ratio=R``; checks
onnx.checker and that ONNX Runtime runs the result, reports MACs before/after (``qgraph.analysis``),
the time the prune pass took, and ORT latency of the pruned model against the unpruned one measured
in the same run (alternating runs, best of N each, one image).

    python tools/bench_prune.py                                  # the acceptance list, ratio 0.3
    python tools/bench_prune.py --models mobilenet_v2 --ratio 0.3 --threads 1 2 --json bench.json

Real-weight models prune with reconstruction on the zoo's calibration split (100 images); the
structure-only ``light_*`` models (random weights, random calibration data) with ``criterion=l2`` (unless
``--criterion``) and ``reconstruct=false`` unless ``--reconstruct-light`` (their accuracy means nothing;
their structure is what is tested).
Timings on a shared machine are noisy: the CPU, the load average, ratios from one run and the pass's CPU
time (all threads; what it takes on an idle machine, wall time under load is not) are printed,
never asserted by a test. The prune time is also given as a ratio to ONNX Runtime running the
calibration set once through the unpruned model, measured in the same run.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import onnx  # noqa: E402

from bench_common import cpu_model  # noqa: E402
from zoo_manifest import model_entry, model_path  # noqa: E402

ACCEPTANCE = ("light_resnet50", "light_densenet121", "light_shufflenet", "light_inception_v2", "light_squeezenet",
              "mobilenet_v2", "efficientnet_lite0")


def latency_ratio(original: onnx.ModelProto, pruned: onnx.ModelProto, feeds: dict, threads: int,
                  runs: int, budget: float) -> dict:
    """Best-of-N ORT latency of both models on the same inputs, runs alternating (same machine state)."""
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    sess = [ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
            for m in (original, pruned)]
    for s in sess:
        s.run(None, feeds)
    best = [np.inf, np.inf]
    t_start = time.perf_counter()
    n = 0
    for n in range(1, runs + 1):
        for j, s in enumerate(sess):
            t0 = time.perf_counter()
            s.run(None, feeds)
            best[j] = min(best[j], time.perf_counter() - t0)
        if n >= 5 and time.perf_counter() - t_start > budget:
            break
    return {"threads": threads, "original_ms": round(1e3 * best[0], 3), "pruned_ms": round(1e3 * best[1], 3),
            "ratio": round(best[1] / best[0], 3), "runs": n}


def calibration_pass_seconds(model: onnx.ModelProto, calib, batch_size: int = 16) -> float:
    """Wall time of ONNX Runtime (default threads) running the calibration set once through ``model``,
    batches decoded beforehand: the yardstick the prune time is divided by (same process, same load)."""
    from qgraph.calibrate import batch_size_for
    from qgraph.ops import ort_session
    sess = ort_session(model)
    names = [i.name for i in sess.get_inputs()]
    feeds = [{n: f[n] for n in names} for f in calib.batches(batch_size_for(model, batch_size))]
    sess.run(None, feeds[0])
    t0 = time.perf_counter()
    for f in feeds:
        sess.run(None, f)
    return time.perf_counter() - t0


def macs(model: onnx.ModelProto, shapes: dict) -> int | None:
    """MACs per sample; shapes computed at run time (EfficientNet-Lite0's Pad amounts come from Shape)
    are resolved first, as the prune pass does, where ONNX shape inference alone leaves them unknown."""
    from qgraph import ir
    from qgraph.analysis import model_stats
    from qgraph.channels import refresh_shapes, resolve_static
    m = model_stats(model, shapes).macs
    if m is None:
        g = ir.load(model)
        resolve_static(g)
        refresh_shapes(g)
        m = model_stats(ir.to_model(g), shapes).macs
    return m


def bench_one(name: str, args) -> dict:
    import qgraph
    from qgraph.analysis import model_stats
    from zoo_data import zoo_split
    from qgraph.instruments import seeded_inputs
    light = model_entry(name)["dataset"] == "random"
    calib, _ = zoo_split(name)
    spec = f"prune:ratio={args.ratio},latency=false"
    if args.criterion:
        spec += f",criterion={args.criterion}"
    elif light:
        spec += ",criterion=l2"        # random weights: a data-driven ranking measures nothing
    if light and not args.reconstruct_light:
        spec += ",reconstruct=false"
    folded, _ = qgraph.optimize(model_path(name), "fold", progress=False)
    reference = calibration_pass_seconds(folded, calib)
    t0, c0 = time.perf_counter(), time.process_time()
    pruned, report = qgraph.optimize(folded, spec, calib=calib, progress=not args.quiet)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    onnx.checker.check_model(pruned)
    feeds = seeded_inputs(folded, 0, batch=1)
    notes = report.rows[-1]["notes"]
    shapes = {k: v.shape for k, v in feeds.items()}      # symbolic input dims resolved (batch 1)
    m0, m1 = macs(folded, shapes), macs(pruned, shapes)
    out = {"model": name, "pipeline": "fold," + spec, "seconds": round(seconds, 1), "cpu_seconds": round(cpu, 1),
           "ort_calib_pass_seconds": round(reference, 2), "seconds_per_ort_pass": round(seconds / reference, 1),
           "macs_before": m0,
           "macs_after": m1, "macs_removed": round(1 - m1 / m0, 4), "reported": notes["removed"]["macs"],
           "checker": "ok", "latency": [latency_ratio(folded, pruned, feeds, t, args.runs, args.budget)
                                         for t in args.threads]}
    if "reconstruct" in notes:
        out["reconstructed_layers"] = notes["reconstruct"].get("layers", 0)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=list(ACCEPTANCE))
    ap.add_argument("--ratio", type=float, default=0.3)
    ap.add_argument("--criterion", default="", help="prune criterion (default: the pass's own)")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="ORT intra-op threads for latency")
    ap.add_argument("--runs", type=int, default=50, help="latency runs per model (best of)")
    ap.add_argument("--budget", type=float, default=20.0, help="seconds per latency measurement at most")
    ap.add_argument("--reconstruct-light", action="store_true", help="reconstruct the light_* models too")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("-q", "--quiet", action="store_true")
    args = ap.parse_args(argv)
    import onnxruntime
    print(f"CPU: {cpu_model()} ({os.cpu_count()} logical), onnxruntime {onnxruntime.__version__}, "
          f"load average {', '.join(f'{x:.1f}' for x in os.getloadavg())}", flush=True)
    rows = []
    for name in args.models:
        r = bench_one(name, args)
        rows.append(r)
        lat = "; ".join(f"{x['threads']}T {x['pruned_ms']:.1f}/{x['original_ms']:.1f} ms = {x['ratio']:.2f}x"
                        for x in r["latency"])
        print(f"| {name} | -{100 * r['macs_removed']:.1f}% ({r['macs_before'] / 1e6:.0f}M -> "
              f"{r['macs_after'] / 1e6:.0f}M) | {r['checker']} | {lat} | {r['seconds']:.0f} s wall = "
              f"{r['seconds_per_ort_pass']:.0f}x one ORT pass over the calibration set, {r['cpu_seconds']:.0f} s CPU |",
              flush=True)
    print(f"load average after: {', '.join(f'{x:.1f}' for x in os.getloadavg())}")
    if args.json:
        Path(args.json).write_text(json.dumps({"cpu": cpu_model(), "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
