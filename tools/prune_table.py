#!/usr/bin/env python
"""The README's pruning table: top-1 against MAC reduction, with and without reconstruction, for two
criteria, on the zoo's ImageNet models; then quantization after pruning.

    python tools/prune_table.py                      # mobilenet_v2 and efficientnet_lite0, full grid
    python tools/prune_table.py --models mobilenet_v2 --ratios 0.1 0.2 --criteria taylor_act
    python tools/prune_table.py --table              # print the markdown from the results so far
    python tools/prune_table.py --models mobilenet_v2 --ratios 0.3 --criteria taylor_act --extra restore_stats=true

Every cell is ``qgraph.optimize(model, "fold,prune:ratio=R,criterion=C,reconstruct=B")`` with the
zoo's calibration split (100 images) as calibration data, evaluated on the evaluation split (400
images; one image = 0.25 pt), also on each half of it (images 0-199 / 200-399) to show a difference
holds on both. Results are kept in ``$QGRAPH_CACHE/prune_table.json`` as they come,
so an interrupted run resumes where it stopped (``--fresh`` starts over). The ``+ quant`` rows run
``fold,prune:...,quant`` (W8A8 per-channel, the quant pass's defaults) at ``--quant-ratio``.
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

from zoo_manifest import cache_dir, model_path  # noqa: E402

MODELS = ("mobilenet_v2", "efficientnet_lite0")
RATIOS = (0.1, 0.2, 0.3, 0.4)
CRITERIA = ("l2", "taylor_act")


def results_file() -> Path:
    return cache_dir() / "prune_table.json"


def load() -> dict:
    p = results_file()
    return json.loads(p.read_text()) if p.exists() else {}


def save(res: dict) -> None:
    p = results_file()
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(".tmp")
    tmp.write_text(json.dumps(res, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, p)


def measure(model: str, pipeline: str) -> dict:
    import qgraph
    from qgraph.analysis import model_stats
    from zoo_data import zoo_split
    from zoo_eval import evaluate
    calib, evaluation = zoo_split(model)
    out = cache_dir() / "zoo" / "pipelines" / f"prune_table.{model}.onnx"
    out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    result, report = qgraph.optimize(model_path(model), pipeline, calib=calib, output=out, progress=False)
    seconds = time.perf_counter() - t0
    half = len(evaluation) // 2             # both halves apart: a setting should hold on each
    parts = [evaluate(out, model, samples=evaluation.subset(idx), progress=False, reference=False)
             for idx in (range(half), range(half, len(evaluation)))]
    m0 = report.rows[0]["macs"]
    row = next(x for x in report.rows if x["pass"].startswith("prune")) if "prune" in pipeline else report.rows[-1]
    removed = round(1 - row["macs"] / m0, 4) if isinstance(m0, (int, float)) and m0 and \
        isinstance(row["macs"], (int, float)) else None
    if removed is None and "prune" in pipeline:
        # MACs of the raw model unknown (EfficientNet-Lite0's Pad amounts come from a Shape computation):
        # the prune pass's own count, made on the graph with those shapes resolved
        removed = round(-float(row["notes"]["removed"]["macs"].rsplit("(", 1)[1].rstrip("%)")) / 100, 4)
    return {"top1": (parts[0]["top1"] * parts[0]["n"] + parts[1]["top1"] * parts[1]["n"]) / len(evaluation),
            "top1_halves": [p["top1"] for p in parts],
            "macs_removed": removed or 0.0,
            "seconds": round(seconds, 1), "size_bytes": parts[0]["size_bytes"]}


def pipelines(args) -> list[tuple[str, str]]:
    """Every cell, most telling first (so a run cut short still answers the main question): per model
    FP32, then ``taylor_act`` with reconstruction and ``l2`` without (Torch-Pruning's magnitude pruner
    with its group mean normalizer, no fine-tuning: the baseline), then prune+quant, then the rest."""
    def cell(model, crit, rec, ratio):
        return model, f"fold,prune:ratio={ratio},criterion={crit},reconstruct={rec},latency=false{args.extra}"
    combos = [(c, r) for c in args.criteria for r in ("true", "false")]
    first = [c for c in (("taylor_act", "true"), ("l2", "false")) if c in combos]
    out = [(model, "fold") for model in args.models]
    out += [cell(m, c, r, ratio) for m in args.models for c, r in first for ratio in args.ratios]
    if args.quant_ratio:
        for model in args.models:
            base = cell(model, args.quant_criterion, "true", args.quant_ratio)[1]
            out += [(model, base), (model, base + ",quant"), (model, "fold,quant")]
    out += [cell(m, c, r, ratio) for m in args.models for c, r in combos if (c, r) not in first
            for ratio in args.ratios]
    return out


def table(res: dict, args) -> str:
    lines = []
    for model in args.models:
        fp32 = res.get(f"{model}|fold", {}).get("top1")
        head = "| criterion | reconstruct | " + " | ".join(f"-{int(100 * r)}% MACs" for r in args.ratios) + " |"
        lines += [f"**{model}** (FP32 {100 * fp32:.2f})" if fp32 is not None else f"**{model}**", "", head,
                  "|" + "---|" * (2 + len(args.ratios))]
        for crit in args.criteria:
            for rec in ("false", "true"):
                cells = []
                for ratio in args.ratios:
                    r = res.get(f"{model}|fold,prune:ratio={ratio},criterion={crit},reconstruct={rec},latency=false"
                                f"{args.extra}")
                    cells.append("–" if r is None else "fails" if "error" in r else f"{100 * r['top1']:.2f}"
                                 + (" ({:.1f} / {:.1f})".format(*(100 * h for h in r["top1_halves"]))
                                    if "top1_halves" in r else ""))
                lines.append(f"| {crit} | {'yes' if rec == 'true' else 'no'} | " + " | ".join(cells) + " |")
        if args.quant_ratio:
            base = (f"{model}|fold,prune:ratio={args.quant_ratio},criterion={args.quant_criterion},"
                    f"reconstruct=true,latency=false{args.extra}")
            a, b, c = res.get(base), res.get(base + ",quant"), res.get(f"{model}|fold,quant")
            if a and b and "error" not in a and "error" not in b:
                lines += ["", f"`fold,prune:ratio={args.quant_ratio},criterion={args.quant_criterion},reconstruct=true` "
                              f"{100 * a['top1']:.2f} (-{100 * a['macs_removed']:.1f}% MACs); `+ quant` "
                              f"{100 * b['top1']:.2f}" + (f"; unpruned `fold,quant` {100 * c['top1']:.2f}"
                                                          if c and "error" not in c else "")]
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS))
    ap.add_argument("--ratios", nargs="+", type=float, default=list(RATIOS))
    ap.add_argument("--criteria", nargs="+", default=list(CRITERIA))
    ap.add_argument("--quant-ratio", type=float, default=0.25, help="ratio of the prune+quant rows (0: none)")
    ap.add_argument("--quant-criterion", default="taylor_act")
    ap.add_argument("--extra", default="", help="more prune options for every cell, e.g. restore_stats=true "
                                                "(cells kept apart from the default ones)")
    ap.add_argument("--table", action="store_true", help="only print the table from the results so far")
    ap.add_argument("--fresh", action="store_true", help="forget earlier results")
    args = ap.parse_args(argv)
    args.extra = f",{args.extra.strip(',')}" if args.extra.strip(",") else ""
    res = {} if args.fresh else load()
    if not args.table:
        for model, pipe in pipelines(args):
            key = f"{model}|{pipe}"
            if key in res:
                continue
            print(f"{model}: {pipe}", file=sys.stderr, flush=True)
            try:
                res[key] = measure(model, pipe)
            except Exception as exc:          # record and go on: one failed cell is not the table
                res[key] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
            print(f"  -> {res[key]}", file=sys.stderr, flush=True)
            save(res)
    print(table(res, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
