#!/usr/bin/env python
"""The model zoo: build, evaluate, record, compare with the tools users would otherwise pick.

    python tools/zoo.py list
    python tools/zoo.py build [NAME ...|all] [--force] [--retrain]
    python tools/zoo.py eval MODEL.onnx --zoo NAME [--split eval|all|calib] [--limit N] [--json]
    python tools/zoo.py record NAME|all            # FP32 figures + every standard pipeline -> manifest
    python tools/zoo.py baselines NAME|all [--nncf] [--no-ort] [--record]
    python tools/zoo.py table [--write]            # the README table, from the manifest

Models and their recorded figures: models/manifest.toml. Built models are cached in
``$QGRAPH_CACHE/zoo`` (default ``~/.cache/qgraph/zoo``); data comes from ``$QGRAPH_DATA`` or
``../shared/data``. Recording is always this explicit command, never a side effect of a test.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from zoo_manifest import (MODELS_README, available_pipelines, default_tolerance,  # noqa: E402
                          load_manifest, missing_zoo_extra, model_entry, model_path, resolve_names,
                          updating_manifest)

from qgraph.errors import QGraphError  # noqa: E402
from zoo_data import DataMissing  # noqa: E402


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- commands

def cmd_list(args) -> int:
    man = load_manifest()
    for name, e in man["models"].items():
        p = model_path(name, e)
        state = "present" if p.exists() else "not built"
        fp32 = e.get("fp32", {})
        fig = f"{e['metric']} {fp32['metric']:.4f}" if "metric" in fp32 else "not recorded"
        print(f"{name:20s} {e['task']:22s} {state:10s} {fig:22s} {p}")
    return 0


def cmd_build(args) -> int:
    from zoo_build import build
    names = resolve_names(args.names or ["all"])
    need_torch = [n for n in names if model_entry(n)["source"].startswith("recipe:")
                  and (args.retrain or not model_entry(n)["file"].startswith("repo:"))]
    if need_torch:
        msg = missing_zoo_extra()
        if msg:
            log(f"error: building {', '.join(need_torch)}: {msg}")
            return 2
    failed = []
    t_all = time.perf_counter()
    for n in names:
        try:
            build(n, force=args.force, retrain=args.retrain, log=log)
        except Exception as e:      # report every model, then fail
            log(f"error: {n}: {type(e).__name__}: {e}")
            failed.append(n)
    log(f"build: {len(names) - len(failed)}/{len(names)} ok in {time.perf_counter() - t_all:.0f} s")
    return 1 if failed else 0


def cmd_eval(args) -> int:
    from zoo_eval import evaluate, format_result
    model = Path(args.model)
    if not model.exists():
        log(f"error: model not found: {model}")
        return 2
    r = evaluate(model, args.zoo, split=args.split, limit=args.limit, batch_size=args.batch,
                 reference=False if args.no_reference else True, progress=not args.quiet)
    print(json.dumps(r, indent=1) if args.json else format_result(r))
    return 0


def measure_fp32(name: str) -> dict:
    """The FP32 figures of the manifest: ORT metric on the eval split and on every sample, the
    PyTorch figures the build measured, size and BatchNormalization count."""
    from zoo_build import build, build_info
    from zoo_eval import evaluate
    entry = model_entry(name)
    info = build(name, log=log)
    path = model_path(name, entry)
    ev = evaluate(path, name, split="eval")
    fp32: dict = {"metric": ev.get("value", 0.0), "n": ev["n"]}
    if "top1" in ev:
        fp32.update(top1=ev["top1"], top5=ev["top5"])
        if entry["dataset"] != "mnist":           # mnist: "all" is the test set, the eval split
            al = evaluate(path, name, split="all")
            fp32.update(top1_all=al["top1"], top5_all=al["top5"], n_all=al["n"])
    check = (build_info(name) or info).get("check", {})
    for k_src, k_dst in (("pytorch_top1_eval", "pytorch_top1"), ("pytorch_top1_all", "pytorch_top1_all"),
                         ("pytorch_cosine_mean", "pytorch_cosine"), ("pytorch_cosine_min", "pytorch_cosine_min"),
                         ("data_max_abs_diff", "pytorch_max_abs_diff")):
        if k_src in check:
            fp32[k_dst] = check[k_src]
    if entry["dataset"] == "mnist" and "pytorch_top1_all" in fp32:
        fp32["pytorch_top1"] = fp32.pop("pytorch_top1_all")
    fp32["size_bytes"] = ev["size_bytes"]
    fp32["batchnorm"] = info.get("op_counts", {}).get("BatchNormalization", 0)
    return fp32


def cmd_record(args) -> int:
    from zoo_eval import run_pipeline
    names = resolve_names(args.names)
    pipelines = args.pipelines.split(";") if args.pipelines else available_pipelines()
    for name in names:
        entry = model_entry(name)
        log(f"{name}: measuring FP32")
        fp32 = measure_fp32(name)
        log(f"{name}: fp32 {json.dumps(fp32)}")
        measured = {}
        for p in pipelines:
            log(f"{name}: running {p}")
            r = run_pipeline(name, p)
            measured[p] = {"size_bytes": r["size_bytes"], "metric": r["metric"],
                           "max_output_diff": r["max_output_diff"], "batchnorm": r["batchnorm"]}
            log(f"{name}: {p}: {json.dumps(measured[p])}")
        with updating_manifest() as man:
            e = man["models"][name]
            e["fp32"] = {**e.get("fp32", {}), **fp32}   # keep what the build recorded (PyTorch's own figures)
            recorded = e.setdefault("pipelines", {})
            for p, fig in measured.items():
                old = recorded.get(p, {})
                tol = old.get("tolerance", default_tolerance(p, entry["metric"]))
                # hand-edited keys survive a re-record: the tolerance, and a "doc" saying why it is so
                recorded[p] = {**fig, "tolerance": tol, **({"doc": old["doc"]} if "doc" in old else {})}
        log(f"{name}: recorded in models/manifest.toml")
    return 0


def cmd_baselines(args) -> int:
    from zoo_baselines import run_nncf, run_ort
    names = [n for n in resolve_names(args.names) if model_entry(n)["dataset"] != "random"]
    for name in names:
        results = {}
        if not args.no_ort:
            results.update(run_ort(name, log=log))
        if args.nncf:
            results.update(run_nncf(name, log=log))
        for k, r in results.items():
            log(f"{name}: {k}: {json.dumps(r)}")
        if args.record and results:
            with updating_manifest() as man:
                man["models"][name].setdefault("baselines", {}).update(results)
            log(f"{name}: baselines recorded in models/manifest.toml")
    return 0


def cmd_table(args) -> int:
    table = zoo_table(load_manifest())
    if not args.write:
        print(table)
        return 0
    text = MODELS_README.read_text(encoding="utf-8")
    start, end = "<!-- zoo-table:start -->", "<!-- zoo-table:end -->"
    if start not in text or end not in text:
        log(f"error: {MODELS_README} has no {start} ... {end} markers")
        return 2
    new = re.sub(re.escape(start) + ".*?" + re.escape(end),
                 lambda _: f"{start}\n{table}\n{end}", text, flags=re.S)
    if new != text:
        MODELS_README.write_text(new, encoding="utf-8")
    log(f"updated the zoo table in {MODELS_README}")
    return 0


# ----------------------------------------------------------------------------- the table

def _pct(x) -> str:
    return f"{100 * x:.2f}%" if isinstance(x, (int, float)) else "–"


def _fig(entry: dict, block: dict | None) -> str:
    if not block or "metric" not in block:
        return "–"
    m = entry["metric"]
    if m in ("top1", "top5"):
        return _pct(block["metric"])
    if m == "cosine":
        return f"{block['metric']:.4f}"
    return f"{block.get('max_output_diff', block['metric']):.1e}"


def _mb(n) -> str:
    if not isinstance(n, (int, float)):
        return "–"
    return f"{n / 1e6:.2f} MB" if n >= 1e6 else f"{n / 1e3:.1f} kB"


def zoo_table(man: dict) -> str:
    """Markdown: one row per model, FP32 and each recorded pipeline / baseline."""
    models = man["models"]
    pipes = list(dict.fromkeys(p for e in models.values() for p in e.get("pipelines", {})))
    bases = list(dict.fromkeys(b for e in models.values() for b in e.get("baselines", {})))
    head = ["model", "task", "data (eval)", "metric", "FP32", "FP32 size", "BN"]
    head += [f"`{p}`" for p in pipes] + [f"{b}" for b in bases]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, e in models.items():
        fp = e.get("fp32", {})
        n = f"{e['dataset']} ({fp['n']})" if "n" in fp else e["dataset"]
        cells = [name, e["task"], n, e["metric"], _fig(e, fp) if e["metric"] != "max_output_diff" else "–",
                 _mb(fp.get("size_bytes")), str(fp.get("batchnorm", "–"))]
        for p in pipes:
            r = e.get("pipelines", {}).get(p)
            left = f" ({r['batchnorm']} BN left)" if r and r.get("batchnorm") else ""
            cells.append(f"{_fig(e, r)}, {_mb(r['size_bytes'])}{left}" if r else "–")
        for b in bases:
            r = e.get("baselines", {}).get(b)
            if not r:
                cells.append("–")
            elif "error" in r:
                cells.append("fails")
            else:
                cells.append(f"{_fig(e, r)}, {_mb(r.get('size_bytes'))}")
        rows.append("| " + " | ".join(cells) + " |")
    notes = ("FP32 and pipeline cells: the metric on the evaluation split (top-1; mean cosine to FP32 "
             "for the sentence encoder; max |y - y_FP32| for the structure-only models), then the "
             "model size. Generated by `python tools/zoo.py table --write` from models/manifest.toml.")
    return "\n".join(rows) + "\n\n" + notes


# ----------------------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="tools/zoo.py", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("list", help="the zoo models, built or not, and their FP32 figure")
    b = sub.add_parser("build", help="build (or verify) zoo models into the cache")
    b.add_argument("names", nargs="*", help="model names, or all (default)")
    b.add_argument("--force", action="store_true", help="rebuild even when cached")
    b.add_argument("--retrain", action="store_true",
                   help="LeNets: train again and rewrite the checked-in ONNX file")
    e = sub.add_parser("eval", help="evaluate an ONNX file on a zoo model's data")
    e.add_argument("model")
    e.add_argument("--zoo", required=True, metavar="NAME")
    e.add_argument("--split", choices=("eval", "all", "calib"), default="eval")
    e.add_argument("--limit", type=int)
    e.add_argument("--batch", type=int, default=32)
    e.add_argument("--no-reference", action="store_true", help="skip the FP32 output comparison")
    e.add_argument("--json", action="store_true")
    e.add_argument("--quiet", action="store_true", help="no progress bar")
    r = sub.add_parser("record", help="measure FP32 + standard pipelines and write the manifest")
    r.add_argument("names", nargs="+")
    r.add_argument("--pipelines", help="';'-separated pipelines instead of every available one")
    bl = sub.add_parser("baselines", help="ONNX Runtime quantize_static (and NNCF) on the same split")
    bl.add_argument("names", nargs="+")
    bl.add_argument("--nncf", action="store_true", help="also NNCF, in its own venv under the cache")
    bl.add_argument("--no-ort", action="store_true", help="skip ONNX Runtime's quantize_static")
    bl.add_argument("--record", action="store_true", help="write the figures into the manifest")
    t = sub.add_parser("table", help="the README zoo table from the manifest")
    t.add_argument("--write", action="store_true", help="update models/README.md in place")
    args = ap.parse_args(argv)
    try:
        return {"list": cmd_list, "build": cmd_build, "eval": cmd_eval, "record": cmd_record,
                "baselines": cmd_baselines, "table": cmd_table}[args.cmd](args)
    except DataMissing as e:
        log(f"error: {e}")
        return 2
    except (QGraphError, KeyError) as e:
        log(f"error: {e.args[0] if isinstance(e, KeyError) else e}")
        return 2


if __name__ == "__main__":
    sys.exit(main())
