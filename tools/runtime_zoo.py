#!/usr/bin/env python
"""Our integer runtime against ONNX Runtime on the zoo models, quantized s8s8 by qgraph.

    python tools/runtime_zoo.py [NAME ...] [--eval-limit N] [--layer-n 4] [--rebuild] [--json out.json]

Per model (default: digits_cnn lenet5 lenet_300_100 mobilenet_v2 efficientnet_lite0):
  1. the QDQ model: ``fold,quant:act_dtype=int8`` (int8 activations, int8 per-channel weights)
     calibrated on the zoo's calibration split, cached in $QGRAPH_CACHE/zoo/runtime/ (--rebuild);
  2. over the evaluation split (all of it unless --eval-limit): the final output of our runtime in
     ``float`` and ``fixed`` mode against ORT (default optimization level, one thread): % of elements
     bit-exact, max |delta| in LSB of the output's scale, histogram of |delta|; top-1 of ORT, of ours
     in each mode, and how often our top-1 class equals ORT's;
  3. on the first --layer-n images: per layer, each step rerun on ORT's own values of its inputs
     (worst % exact, max LSB), and ``fixed`` vs ``float`` per layer (max LSB);
  4. the units ORT leaves unfused (DQ -> float op -> Q) as predicted by ``lower.ort_float_units``
     and as read from ORT's optimized graph (they must be the same set).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("NUMBA_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import onnx  # noqa: E402

from bench_common import cpu_model, one_thread_session  # noqa: E402

MODELS = ("digits_cnn", "lenet5", "lenet_300_100", "mobilenet_v2", "efficientnet_lite0")
PIPELINE = "fold,quant:act_dtype=int8"


def qdq_model(name: str, rebuild: bool = False) -> Path:
    """The s8s8 QDQ model of zoo model ``name`` (built once, then cached)."""
    import qgraph
    from zoo_data import zoo_split
    from zoo_manifest import model_path, zoo_cache
    out = zoo_cache() / "runtime" / f"{name}.s8s8.onnx"
    stamp = out.with_suffix(".key")
    key = _build_key(name)
    if out.exists() and not rebuild and stamp.exists() and stamp.read_text() == key:
        return out
    src = model_path(name)
    if not src.exists():
        raise FileNotFoundError(f"zoo model {name} is not built: {src} (python tools/zoo.py build {name})")
    out.parent.mkdir(parents=True, exist_ok=True)
    calib, _ = zoo_split(name)
    qgraph.optimize(src, PIPELINE, calib=calib, output=out, progress=False)
    stamp.write_text(key)
    return out


def _build_key(name: str) -> str:
    """What a cached QDQ model depends on: the pipeline, the source model's bytes on disk (size and
    mtime) and qgraph's own code (every .py of the installed package), so a change to quant's
    defaults rebuilds it instead of testing a model the current code would not write."""
    import hashlib
    import qgraph
    from zoo_manifest import model_path
    h = hashlib.sha256(f"{PIPELINE}|".encode())
    src = model_path(name)
    if src.exists():
        st = src.stat()
        h.update(f"{st.st_size}|{st.st_mtime_ns}|".encode())
    roots = [Path(p) for p in qgraph.__path__]
    for sub in ("passes", "kernels"):
        mod = __import__(f"qgraph.{sub}", fromlist=["__path__"])
        roots += [Path(p) for p in mod.__path__]
    for root in roots:
        for f in sorted(root.glob("*.py")):
            h.update(f.name.encode())
            h.update(f.read_bytes())
    return h.hexdigest()


def _merge(hist: dict, more: dict) -> None:
    for k, v in more.items():
        hist[k] = hist.get(k, 0) + v


def measure(name: str, path: Path, eval_limit: int | None = None, layer_n: int = 4,
            batch: int = 32) -> dict:
    """Every figure of the module docstring for one QDQ model."""
    from qgraph import ir
    from qgraph.kernels import lower, run
    from qgraph.kernels.diff import compare, fixed_vs_float_per_layer, ort_float_nodes, output_lsb, per_layer
    from qgraph.kernels.lower import ort_float_units
    from zoo_data import zoo_split
    model = onnx.load(path)
    prog = lower(model)
    g = ir.load(model)
    g.toposort()
    predicted = sorted(n.name for n in ort_float_units(g))
    actual = sorted(ort_float_nodes(model))
    _, evaluation = zoo_split(name)
    if eval_limit:
        evaluation = evaluation.subset(range(min(eval_limit, len(evaluation))))
    labels = evaluation.labels
    sess = one_thread_session(model)
    out_name = model.graph.output[0].name
    lsb = output_lsb(model).get(out_name)
    feeds_names = {i.name for i in model.graph.input}
    res = {"model": name, "file": str(path), "n": len(evaluation), "float_units_predicted": len(predicted),
           "float_units_ort": len(actual), "float_units_agree": predicted == actual}
    hist = {"float": {}, "fixed": {}}
    top1 = {"ort": 0, "float": 0, "fixed": 0}
    same = {"float": 0, "fixed": 0}
    seen = 0
    first = None
    t0 = time.perf_counter()
    for feed in evaluation.batches(batch):
        feed = {k: v for k, v in feed.items() if k in feeds_names}
        if first is None:
            first = {k: v[:layer_n] for k, v in feed.items()}
        m = len(next(iter(feed.values())))
        ref = sess.run([out_name], feed)[0]
        ref_cls = ref.reshape(m, -1).argmax(1)
        y = labels[seen:seen + m] if labels is not None else None
        if y is not None:
            top1["ort"] += int((ref_cls == y).sum())
        for mode in ("float", "fixed"):
            ours = run(prog, feed, mode)[out_name]
            _merge(hist[mode], compare(ours, ref, lsb)["histogram"])
            cls = ours.reshape(m, -1).argmax(1)
            same[mode] += int((cls == ref_cls).sum())
            if y is not None:
                top1[mode] += int((cls == y).sum())
        seen += m
    res["seconds_eval"] = round(time.perf_counter() - t0, 1)
    for mode in ("float", "fixed"):
        h = dict(sorted(hist[mode].items()))
        total = sum(h.values())
        res[mode] = {"exact": h.get(0, 0) / total, "max_lsb": max(h), "histogram": h,
                     "top1": top1[mode] / seen if labels is not None else None,
                     "top1_same_as_ort": same[mode] / seen}
    res["ort_top1"] = top1["ort"] / seen if labels is not None else None
    rows = [r for r in per_layer(model, first, "float", prog) if "isolated" in r]
    res["per_layer"] = {"layers": len(rows),
                        "isolated_worst_exact": min((r["isolated"]["exact"] for r in rows), default=1.0),
                        "isolated_max_lsb": max((r["isolated"]["max_lsb"] for r in rows), default=0),
                        "chained_worst_exact": min((r["exact"] for r in rows), default=1.0)}
    fx = fixed_vs_float_per_layer(prog, first)
    res["fixed_vs_float"] = {"layers": len(fx), "max_lsb": max((r["max_lsb"] for r in fx), default=0),
                             "worst_exact": min((r["exact"] for r in fx), default=1.0)}
    return res


def _hist(h: dict) -> str:
    return " ".join(f"{k}:{v}" for k, v in h.items())


def report(r: dict) -> str:
    lines = [f"{r['model']} (s8s8, n={r['n']}; units ORT leaves float: {r['float_units_ort']}, "
             f"predicted {r['float_units_predicted']}, same set: {r['float_units_agree']})"]
    for mode in ("float", "fixed"):
        f = r[mode]
        t1 = (f"top-1 ours {100 * f['top1']:.2f}% vs ORT {100 * r['ort_top1']:.2f}%  "
              if f["top1"] is not None else "")
        lines.append(f"  {mode:<5} {100 * f['exact']:8.4f}% bit-exact, max {f['max_lsb']} LSB, |d| {_hist(f['histogram'])}; "
                     f"{t1}same top-1 class as ORT {100 * f['top1_same_as_ort']:.2f}%")
    p, fx = r["per_layer"], r["fixed_vs_float"]
    lines.append(f"  per layer vs ORT ({p['layers']} tensors): isolated worst {100 * p['isolated_worst_exact']:.4f}% "
                 f"exact, max {p['isolated_max_lsb']} LSB; chained worst {100 * p['chained_worst_exact']:.4f}%")
    lines.append(f"  fixed vs float per layer ({fx['layers']} tensors): max {fx['max_lsb']} LSB, "
                 f"worst {100 * fx['worst_exact']:.3f}% exact")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("names", nargs="*", default=list(MODELS))
    ap.add_argument("--eval-limit", type=int, default=None, help="first N evaluation samples (default: all)")
    ap.add_argument("--layer-n", type=int, default=4, help="images for the per-layer figures")
    ap.add_argument("--rebuild", action="store_true", help="re-quantize even if a cached QDQ model exists")
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args(argv)
    import onnxruntime
    print(f"CPU: {cpu_model()} ({platform.machine()}), onnxruntime {onnxruntime.__version__}, one thread", flush=True)
    results = []
    for name in args.names:
        try:
            path = qdq_model(name, args.rebuild)
        except Exception as exc:   # missing model or data: say so, go on with the others
            print(f"{name}: skipped ({exc})", flush=True)
            continue
        r = measure(name, path, args.eval_limit, args.layer_n)
        print(report(r), flush=True)
        results.append(r)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=float) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
