#!/usr/bin/env python
"""Benchmark: the sensitivity of a zoo model (all layers x w8/w6/w4 by default), as CPU seconds and as a
ratio to ONNX Runtime running the float model over the same samples in the same run.

    python tools/bench_sensitivity.py mobilenet_v2 [--samples 32] [--candidates "w8;w6;w4"] [--executor process]

Wall time on a shared machine says little; the CPU seconds (the parent's float pass + every worker's
jobs) divided by the cores is what the measurement costs on that many dedicated cores.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import cpu_model  # noqa: E402

from qgraph import ir  # noqa: E402
from qgraph.calibrate import stream  # noqa: E402
from qgraph.passes import build_passes  # noqa: E402
from qgraph.pipeline import Context, PassManager  # noqa: E402
from zoo_data import zoo_split  # noqa: E402
from zoo_manifest import model_entry, model_path  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("name", nargs="?", default="mobilenet_v2")
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--candidates", default="w8;w6;w4")
    ap.add_argument("--executor", default="process")
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args(argv)
    calib, _ = zoo_split(args.name)
    data = calib.subset(range(min(args.samples, len(calib))))
    g = ir.load(model_path(args.name, model_entry(args.name)))
    ctx = Context(calib=data, progress=False, executor=args.executor)
    PassManager(build_passes("fold")).run(g, ctx)
    model = ir.to_model(g)
    outs = [o.name for o in model.graph.output]
    c0, t0 = time.process_time(), time.perf_counter()
    for _ in stream(model, outs, data, batch_size=8, threads=1):
        pass
    ort_cpu, ort_wall = time.process_time() - c0, time.perf_counter() - t0
    t0 = time.perf_counter()
    PassManager(build_passes(f"sensitivity:samples={args.samples},candidates={args.candidates},pin=none,show=0,"
                             f"workers={args.workers}")).run(g, ctx)
    wall = time.perf_counter() - t0
    t = ctx.sensitivity
    cpu = t.seconds["cpu_float_pass"] + t.seconds["cpu_sites"]
    cores = 1 if args.executor == "serial" else min(args.workers, os.cpu_count() or 1)
    print(f"CPU: {cpu_model()}; {os.cpu_count()} cores visible; executor {t.executor} x {args.workers}")
    print(f"{args.name}: {len(t.sites)} sites x {args.candidates} on {t.samples} samples; cached {t.cached_tensors} "
          f"tensors ({t.cached_bytes / 1e6:.0f} MB spilled)")
    print(f"  one ORT float pass over the samples (1 thread): {ort_cpu:.1f} CPU s")
    print(f"  sensitivity: {cpu:.1f} CPU s (float pass {t.seconds['cpu_float_pass']}, sites {t.seconds['cpu_sites']}) "
          f"= {cpu / max(ort_cpu, 1e-9):.1f} x the float pass; on {cores} dedicated cores: {cpu / cores:.0f} s; "
          f"wall here {wall:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
