#!/usr/bin/env python
"""Mixed precision on a zoo model: the sensitivity once, then the accuracy-size curve of ``quant:budget``
beside uniform weight bit widths, each point evaluated on the evaluation split.

    python tools/mixed_pareto.py mobilenet_v2 --budgets "4.5bits;5bits;5.5bits;6bits;7bits" --uniform 8,6,4
    python tools/mixed_pareto.py minilm --act "cosine:0.99;sqnr:25" --json out.json

Calibration: the zoo calibration split (as ``tools/zoo.py record``); the sensitivity uses its first
``--samples`` samples. Size: ``packed`` = Σ over quantized layers of params·bits/8 (what a bit-packed
container holds), ``file`` = the .onnx bytes (5/6-bit weights are stored as int8 with a narrowed range, so
ONNX Runtime's integer kernels run them; the file stays int8-sized). Prints the CPU; times are wall seconds
on a shared machine (only the sensitivity's own ratio to one float pass of its samples means much).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402

from bench_common import cpu_model as cpu  # noqa: E402
from qgraph import ir  # noqa: E402
from qgraph.errors import QGraphError  # noqa: E402
from qgraph.ops import find_groups  # noqa: E402
from qgraph.passes import build_passes  # noqa: E402
from qgraph.passes.mixed import effective_bits  # noqa: E402
from qgraph.pipeline import Context, PassManager  # noqa: E402
from zoo_data import zoo_split  # noqa: E402
from zoo_eval import evaluate  # noqa: E402
from zoo_manifest import model_entry, model_path, zoo_cache  # noqa: E402


def packed_bytes(model) -> tuple[int, int, float]:
    """(Σ params·bits/8 over the quantized layers' weights, their params, average bits)."""
    g = ir.load(model, infer_shapes=False)
    total_bits = params = 0
    for grp in find_groups(g):
        if grp.w_dq is None:
            continue
        n = int(grp.weight_int.size)
        total_bits += n * effective_bits(grp.weight_int)
        params += n
    return total_bits // 8, params, (total_bits / params if params else 0.0)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("name")
    ap.add_argument("--budgets", default="", help="';'-separated quant:budget values (weight bits)")
    ap.add_argument("--act", default="", help="';'-separated quant:budget values for 8/16-bit activations")
    ap.add_argument("--uniform", default="8,6,4", help="uniform weight bits to compare with")
    ap.add_argument("--act16", action="store_true", help="also all activations at 16 bits")
    ap.add_argument("--samples", type=int, default=32, help="sensitivity samples")
    ap.add_argument("--candidates", default="", help="sensitivity candidates (default by the budgets asked)")
    ap.add_argument("--pin", default="first;last", help="sensitivity:pin (layers kept at 8 bits)")
    ap.add_argument("--prefix", default="fold", help="passes before sensitivity/quant (minilm: cleanup, which "
                    "folds the Transpose(initializer) in front of its MatMul weights)")
    ap.add_argument("--quant", default="", help="extra quant options, e.g. act_method=percentile")
    ap.add_argument("--executor", default="process")
    ap.add_argument("--limit", type=int, help="evaluate on the first N evaluation samples only")
    ap.add_argument("--plot", help="write the accuracy-size plot (PNG) here")
    ap.add_argument("--json", help="write all figures here")
    args = ap.parse_args(argv)
    entry = model_entry(args.name)
    src = model_path(args.name, entry)
    calib, evaluation = zoo_split(args.name)
    if args.limit:
        evaluation = evaluation.subset(range(min(args.limit, len(evaluation))))
    print(f"# {args.name}: CPU {cpu()}; calibration {len(calib)}, evaluation {len(evaluation)}", flush=True)
    extra = ("," + args.quant) if args.quant else ""
    g = ir.load(src)
    ctx = Context(calib=calib, progress=False, executor=args.executor)
    PassManager(build_passes(args.prefix)).run(g, ctx)
    folded = ir.to_model(g)
    out_dir = zoo_cache() / "pipelines"
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    cands = args.candidates or ";".join((["w8", "w6", "w4"] if args.budgets else []) + (["w8", "a8", "a16"] if args.act else []))
    if args.budgets or args.act:
        g = ir.load(folded)
        t0 = time.perf_counter()
        PassManager(build_passes(f"sensitivity:samples={args.samples},candidates={cands},show=0,"
                                 f"pin={args.pin or 'none'}")).run(g, ctx)
        sens_s = time.perf_counter() - t0
        t = ctx.sensitivity
        print(f"# sensitivity: {len(t.sites)} sites x {cands}; {t.samples} samples; {sens_s:.1f} s wall "
              f"(float pass {t.seconds['float_pass']} s, sites {t.seconds['sites']} s, {t.executor}; CPU seconds: "
              f"float pass {t.seconds['cpu_float_pass']}, sites {t.seconds['cpu_sites']}); pinned {t.pinned}; "
              f"cached {t.cached_tensors} tensors, {t.cached_bytes / 1e6:.0f} MB on disk", flush=True)
        print(t.format(15), flush=True)
    configs = [("uniform", f"quant:bits={b},storage4=int8{extra}") for b in args.uniform.split(",") if b]
    if args.act16:
        configs.append(("uniform", f"quant:act_bits=16{extra}"))
    configs += [("mixed", f"quant:budget={b},storage4=int8{extra}") for b in args.budgets.split(";") if b]
    configs += [("mixed-act", f"quant:budget={b}{extra}") for b in args.act.split(";") if b]
    for kind, spec in configs:
        g = ir.load(folded)
        t0 = time.perf_counter()
        mgr = PassManager(build_passes(spec))
        try:
            mgr.run(g, ctx)
        except QGraphError as exc:
            print(json.dumps({"kind": kind, "pipeline": f"{args.prefix}," + spec, "error": str(exc)}), flush=True)
            continue
        secs = time.perf_counter() - t0
        notes = mgr.results[-1][1].notes
        slug = spec.replace(":", "_").replace("=", "-").replace(",", "_").replace(";", "+")
        path = out_dir / f"{args.name}.{slug}.onnx"
        ir.save(mgr.model, path)
        packed, params, avg = packed_bytes(mgr.model)
        r = evaluate(path, args.name, samples=evaluation, progress=False)
        alloc = notes.get("allocation", {})
        row = {"kind": kind, "pipeline": f"{args.prefix}," + spec, "metric": r.get("value"), "file_bytes": path.stat().st_size,
               "packed_bytes": packed, "avg_weight_bits": round(avg, 3), "quant_seconds": round(secs, 1),
               "predicted_sqnr_db": alloc.get("predicted_sqnr_db"), "weight_bits": notes.get("weight_bits"),
               "act16": len(alloc.get("act16", [])) if "act16" in alloc else None,
               "act16_of": len([s for s in ctx.sensitivity.sites if s.kind == "act"]) if ctx.sensitivity else None}
        if "top5" in r:
            row["top5"] = r["top5"]
        if "cosine_min" in r:
            row["cosine_min"] = r["cosine_min"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    print()
    print(f"| {'pipeline':<58} | {entry['metric']:>8} | avg bits | packed weights | file |")
    print(f"|{'-' * 60}|{'-' * 10}|----------|----------------|------|")
    for r in rows:
        print(f"| `{r['pipeline']}`{' ' * max(0, 56 - len(r['pipeline']))} | {r['metric']:.4f} | {r['avg_weight_bits']:.2f} | "
              f"{r['packed_bytes'] / 1e6:.3f} MB | {r['file_bytes'] / 1e6:.2f} MB |")
    if args.plot:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for kind, marker in (("uniform", "s"), ("mixed", "o")):
            pts = sorted((r["packed_bytes"] / 1e6, r["metric"]) for r in rows if r["kind"] == kind)
            if pts:
                ax.plot(*zip(*pts), marker=marker, label=kind)
        ax.set_xlabel("weights, packed (MB)")
        ax.set_ylabel(entry["metric"])
        ax.set_title(f"{args.name}: accuracy vs size", fontsize=9)
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.plot, dpi=110)
    if args.json:
        ir.atomic_write_bytes(args.json, (json.dumps({"cpu": cpu(), "rows": rows}, indent=2) + "\n").encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
