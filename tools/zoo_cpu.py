#!/usr/bin/env python
"""What the zoo's quantized models score when ONNX Runtime runs them on each x86 CPU class.

    python tools/zoo_cpu.py [NAME ...] [--pipelines "P1;P2"] [--ort-baseline] [--limit N] [--qemu N] [--json out.json]

Per model (default: mobilenet_v2 efficientnet_lite0) and pipeline (default ``fold,quant:target=any``
and ``fold,quant:target=vnni``; calibrated on the zoo's calibration split, cached in
$QGRAPH_CACHE/zoo/cpu/), over the evaluation split:

  here      top-1 of ONNX Runtime on this machine (its own CPU class, named in the header);
  avx2      top-1 of what ORT computes on a CPU without VNNI (AVX2, AVX-512BW): qgraph's ``float``
            mode with ``QGRAPH_ORT_PATH=avx2`` (int16 pair sums saturated where MLAS's vpmaddubsw
            saturates; bit-exact against ORT under emulation, see --qemu);
  check     our ``float`` mode for this machine's own path against ORT here, bit for bit;
  layers    how many u8s8 layers have weight pairs that saturate without VNNI.

``--ort-baseline`` adds ORT's own ``quantize_static`` per-channel s8s8 model (tools/zoo_baselines.py).
``--qemu N`` runs ORT under ``qemu-x86_64 -cpu Haswell`` (an AVX2-only CPU, emulated: numbers real,
timings meaningless) on the first N evaluation images and compares its outputs with our ``avx2``
figures bit for bit: the evidence that the ``avx2`` column is what an AVX2 machine computes.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("NUMBA_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402

MODELS = ("mobilenet_v2", "efficientnet_lite0")

_QEMU_ORT = """
import sys, numpy as np, onnxruntime as ort
so = ort.SessionOptions(); so.intra_op_num_threads = 1; so.log_severity_level = 3
s = ort.InferenceSession(sys.argv[1], so, providers=["CPUExecutionProvider"])
d = np.load(sys.argv[2])
np.savez(sys.argv[3], *s.run(None, {k: d[k] for k in d.files}))
"""


def qdq(name: str, pipeline: str) -> Path:
    import qgraph
    from zoo_data import zoo_split
    from zoo_eval import pipeline_slug
    from zoo_manifest import model_path, zoo_cache
    out = zoo_cache() / "cpu" / f"{name}.{pipeline_slug(pipeline)}.onnx"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        calib, _ = zoo_split(name)
        qgraph.optimize(model_path(name), pipeline, calib=calib, output=out, progress=False)
    return out


def ort_baseline(name: str) -> Path:
    from zoo_baselines import run_ort
    from zoo_manifest import zoo_cache
    out = zoo_cache() / "baselines" / f"{name}.ort_qdq_per_channel.onnx"      # where run_ort writes it
    if not out.exists():
        run_ort(name)
    return out


def _ours(prog, feeds, path: str) -> np.ndarray:
    from qgraph.kernels import run
    old = os.environ.get("QGRAPH_ORT_PATH")
    os.environ["QGRAPH_ORT_PATH"] = path
    try:
        return next(iter(run(prog, feeds, "float").values()))
    finally:
        if old is None:
            os.environ.pop("QGRAPH_ORT_PATH")
        else:
            os.environ["QGRAPH_ORT_PATH"] = old


def measure(name: str, label: str, path: Path, limit: int | None, qemu: int, batch: int = 20) -> dict:
    import onnx
    from qgraph.kernels import cpu
    from zoo_data import zoo_split
    from qgraph.kernels import lower, ortsat
    from zoo_eval import session
    model = onnx.load(path)
    prog = lower(model)
    sess = session(path)
    inputs = {i.name for i in sess.get_inputs()}
    _, evaluation = zoo_split(name)
    if limit:
        evaluation = evaluation.subset(range(min(limit, len(evaluation))))
    here_path = cpu.host_ort_path().name
    hits = {"here": 0, "avx2": 0}
    exact_here = exact_avx2_vs_here = 0
    n = 0
    first = {}
    for feed in evaluation.batches(batch):
        feed = {k: v for k, v in feed.items() if k in inputs}
        m = len(next(iter(feed.values())))
        y = evaluation.labels[n:n + m]
        ref = sess.run(None, feed)[0]
        mine = _ours(prog, feed, here_path)
        avx2 = _ours(prog, feed, "avx2")
        if n < qemu:
            first.setdefault("inputs", []).append({k: v[:qemu - n] for k, v in feed.items()})
            first.setdefault("avx2", []).append(avx2[:qemu - n])
        exact_here += int((mine == ref).all(axis=tuple(range(1, ref.ndim))).sum())
        exact_avx2_vs_here += int((avx2 == ref).all(axis=tuple(range(1, ref.ndim))).sum())
        hits["here"] += int((ref.reshape(m, -1).argmax(1) == y).sum())
        hits["avx2"] += int((avx2.reshape(m, -1).argmax(1) == y).sum())
        n += m
    row = {"model": name, "quantizer": label, "file": str(path), "n": n,
           "top1_here": 100 * hits["here"] / n, "top1_avx2": 100 * hits["avx2"] / n,
           "float_mode_bit_exact_here": exact_here / n, "avx2_equals_here": exact_avx2_vs_here / n,
           "u8s8_layers": ortsat.int16_pair_steps(prog), "saturating_layers": len(ortsat.saturating_steps(prog))}
    if qemu and first:
        feeds = {k: np.concatenate([f[k] for f in first["inputs"]]) for k in first["inputs"][0]}
        ours = np.concatenate(first["avx2"])
        with tempfile.TemporaryDirectory() as tmp:
            np.savez(Path(tmp) / "in.npz", **feeds)
            subprocess.run(["qemu-x86_64", "-cpu", "Haswell", sys.executable, "-c", _QEMU_ORT, str(path),
                            str(Path(tmp) / "in.npz"), str(Path(tmp) / "out.npz")], check=True,
                           stderr=subprocess.DEVNULL)
            emulated = np.load(Path(tmp) / "out.npz")["arr_0"]
        row["qemu_haswell_images"] = len(ours)
        row["qemu_haswell_bit_exact_vs_our_avx2"] = float(np.mean(
            (emulated == ours).all(axis=tuple(range(1, ours.ndim)))))
        row["qemu_haswell_top1_agrees"] = float(np.mean(emulated.reshape(len(ours), -1).argmax(1)
                                                        == ours.reshape(len(ours), -1).argmax(1)))
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("names", nargs="*", default=list(MODELS))
    ap.add_argument("--pipelines", default="fold,quant:target=any;fold,quant:target=vnni")
    ap.add_argument("--ort-baseline", action="store_true", help="also ORT's quantize_static per-channel model")
    ap.add_argument("--limit", type=int, default=None, help="evaluation images (default: the whole split)")
    ap.add_argument("--qemu", type=int, default=0, help="check the avx2 column against ORT under qemu Haswell")
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args(argv)
    from qgraph.kernels import cpu
    print(f"CPU: {cpu.describe_host()}; ORT's int8 path here: {cpu.host_ort_path().describe()}", flush=True)
    rows = []
    for name in args.names:
        runs = [(f"qgraph {p}", qdq(name, p)) for p in args.pipelines.split(";") if p]
        if args.ort_baseline:
            runs.append(("ORT quantize_static per-channel", ort_baseline(name)))
        for label, path in runs:
            r = measure(name, label, path, args.limit, args.qemu)
            rows.append(r)
            q = (f"; qemu Haswell ORT on {r['qemu_haswell_images']} images: {100 * r['qemu_haswell_bit_exact_vs_our_avx2']:.1f}% "
                 f"bit-exact vs our avx2 column" if "qemu_haswell_images" in r else "")
            print(f"{name:<20} {label:<45} n={r['n']}: top-1 here {r['top1_here']:6.2f}, AVX2 {r['top1_avx2']:6.2f} | "
                  f"float mode exact here {100 * r['float_mode_bit_exact_here']:.1f}%, AVX2 output = here "
                  f"{100 * r['avx2_equals_here']:.1f}% | saturating layers {r['saturating_layers']}/{r['u8s8_layers']}{q}",
                  flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"host": cpu.describe_host(), "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
