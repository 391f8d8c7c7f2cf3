#!/usr/bin/env python
"""Every README quantization pipeline on every zoo model, through qgraph-run, against ONNX Runtime.

    python tools/zoo_lowering.py [--models all|NAME,...] [--pipelines KEY,...] [--calib 16] [--images 2]
                                 [--json out.json [--resume]] [--timeout 1200] [--weight-only check|skip]
    python tools/zoo_lowering.py --table a.json,b.json     (the table of earlier runs, merged)

Per (model, pipeline): the model is optimized with the pipeline (calibrated on the first ``--calib``
samples of the zoo's calibration split; ``quant``'s SQNR report off, ``without_sqnr``), lowered by
``qgraph.kernels.lower`` and run in ``float``
mode on the first ``--images`` evaluation samples; each output is compared with ONNX Runtime (one
thread) on the same inputs. A cell is ``100% / 0`` (share of output elements bit-exact, max
difference in LSB of the output's scale), or the one-line reason it could not be run: the pass that
failed, or the node and op ``lower`` cannot lower. Weight-only and float-only pipelines (no
QuantizeLinear written: float activations) are ``n/a``: qgraph-run is an integer runtime. A
weight-only pipeline is still optimized (``--weight-only check``, the default) so that ``n/a`` says
the pipeline ran on the model and wrote no QuantizeLinear; ``--weight-only skip`` marks it ``n/a``
unoptimized (the JSON says which).

Each cell runs in a forked child process with a time limit (``--timeout`` seconds, ``timeout`` in
the table past it; a child that dies, e.g. out of memory, is ``crashed`` with its exit signal), so
one cell cannot stop the run. ``--json`` is rewritten (atomically) after every cell; ``--resume``
keeps the cells of an existing ``--json`` that passed (``n/a``, or bit-exact) and reruns the rest,
so a long run can be stopped and continued, and a fix re-checked on the cells it concerns.

The pipelines are the README's: the DFQ table (``tools/dfq_table.py``), the W8A8 rows of the
ImageNet table, each model's recorded pipelines in ``models/manifest.toml``, and the pipelines the
README measures on some models only (``README_MODEL``: the mixed-precision table's uniform widths
and bit budgets on MobileNetV2 and EfficientNet-Lite0, MiniLM's 16-bit activations). Few samples are
enough: the point is coverage and bit-exactness, not accuracy (``tools/dfq_table.py`` and
``pytest -m zoo`` measure that). Prints a markdown table (the README's) and the CPU.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import cpu_model  # noqa: E402
from dfq_table import PIPELINES as DFQ_PIPELINES  # noqa: E402

#: README pipelines outside the DFQ table (ImageNet W8A8 table, runtime table, MiniLM row)
EXTRA = ("fold,quant", "fold,quant:granularity=tensor", "fold,quant:act_dtype=int8", "fold,equalize,quant,biascorr")
#: README pipelines recorded for some models only: the mixed-precision table (``tools/mixed_pareto.py``:
#: uniform widths and bit budgets, 4-6-bit weights stored as int8) and MiniLM's 16-bit activations
_MIXED = tuple(f"fold,quant:bits={b},storage4=int8" for b in (8, 6, 5, 4)) + tuple(
    f"fold,sensitivity:pin=first,candidates=w8;w6;w5;w4,quant:budget={b}bits,storage4=int8"
    for b in ("4.5", "5", "5.5", "6", "7"))
README_MODEL = {"mobilenet_v2": _MIXED, "efficientnet_lite0": _MIXED,
                "minilm": ("cleanup,quant:act_bits=16", "fold,sensitivity:candidates=w8;a8;a16,quant:budget=cosine:0.99")}


def pipelines_for(entry: dict, name: str = "") -> list[str]:
    """The README's quantizing pipelines plus the ones the manifest records for this model, in order."""
    out: list[str] = []
    for p in [pipe for _, _, pipe in DFQ_PIPELINES] + list(EXTRA) + list(entry.get("pipelines", {})) \
            + list(README_MODEL.get(name, ())):
        if any(step.split(":")[0] == "quant" for step in p.split(",")) and p not in out:
            out.append(p)
    return out


def without_sqnr(pipeline: str) -> str:
    """``pipeline`` with ``sqnr=false`` on its ``quant`` step: the SQNR report is a second pass of the
    float and the QDQ model over the calibration data (a third of a VGG-19 cell) and changes nothing
    in the model written, which is all a cell compares. A pipeline that sets ``sqnr`` keeps it."""
    if "sqnr=" in pipeline:
        return pipeline
    tokens = pipeline.split(",")        # steps and their options (``quant:bits=4,granularity=tensor,biascorr``)
    for i, tok in enumerate(tokens):
        if tok.partition(":")[0] == "quant":
            tokens[i] = tok + (",sqnr=false" if ":" in tok else ":sqnr=false")
    return ",".join(tokens)


def run_cell(path: Path, pipeline: str, calib, feeds: dict, weight_only: str = "check") -> dict:
    """One (model, pipeline): optimize, lower, run against ORT. Errors become the cell's reason."""
    import onnx

    import qgraph
    from qgraph.errors import QGraphError
    from qgraph.kernels import diff, lower
    t0 = time.perf_counter()
    wonly = "weight_only=true" in pipeline
    if wonly and weight_only == "skip":
        return {"status": "n/a", "optimized": False,
                "error": "weight-only: no QuantizeLinear written (float activations), nothing for qgraph-run"}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "q.onnx"
        try:
            qgraph.optimize(path, without_sqnr(pipeline), calib=calib, output=out, progress=False)
        except QGraphError as e:
            return {"status": "optimize failed", "error": str(e).splitlines()[0],
                    "seconds": round(time.perf_counter() - t0, 1)}
        model = onnx.load(out)
    t_opt = round(time.perf_counter() - t0, 1)
    if not any(n.op_type == "QuantizeLinear" for n in model.graph.node):
        why = "weight-only: " if wonly else ""
        return {"status": "n/a", "optimized": True, "seconds": t_opt,
                "error": f"{why}no QuantizeLinear written (float activations): nothing for qgraph-run"}
    try:
        prog = lower(model)
    except QGraphError as e:
        return {"status": "not lowered", "error": str(e).splitlines()[0], "seconds": t_opt}
    floats = sum(1 for s in prog.steps if s.op == "Float")
    figs: dict = {}
    try:
        for batch in feeds:                       # one feed per batch the model accepts
            for k, v in diff.against_ort(model, batch, "float", prog)[0].items():
                if "shape_mismatch" in v:
                    return {"status": "run failed", "error": f"output {k}: shape {v['shape_mismatch'][0]}, "
                                                             f"ORT's {v['shape_mismatch'][1]}", "seconds": t_opt}
                f = figs.setdefault(k, {"elements": 0, "exact_n": 0.0, "max_lsb": -1})
                f["elements"] += v["elements"]
                f["exact_n"] += v["exact"] * v["elements"]
                f["max_lsb"] = max(f["max_lsb"], v["max_lsb"])
    except QGraphError as e:
        return {"status": "run failed", "error": str(e).splitlines()[0], "seconds": t_opt}
    for f in figs.values():
        f["exact"] = f.pop("exact_n") / max(f["elements"], 1)
    exact = min(f.get("exact", 0.0) for f in figs.values())
    max_lsb = max(f.get("max_lsb", -1) for f in figs.values())
    return {"status": "ok", "exact": exact, "max_lsb": max_lsb, "float_steps": floats,
            "outputs": figs,
            "optimize_seconds": t_opt, "seconds": round(time.perf_counter() - t0, 1)}


def _cell_child(conn, path, pipeline, calib, feeds, weight_only) -> None:
    try:
        res = run_cell(path, pipeline, calib, feeds, weight_only)
    except BaseException as e:          # noqa: BLE001 - a bug in a pass or kernel is the cell's finding
        tb = traceback.extract_tb(e.__traceback__)
        where = f" ({Path(tb[-1].filename).name}:{tb[-1].lineno})" if tb else ""
        res = {"status": "internal error", "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                                                    f"{where}"}
    conn.send(res)
    conn.close()


def run_cell_isolated(path: Path, pipeline: str, calib, feeds: dict, weight_only: str, timeout: float) -> dict:
    """``run_cell`` in a forked child: a cell past ``timeout`` seconds or a child that dies is the cell's status."""
    ctx = multiprocessing.get_context("fork")
    recv, send = ctx.Pipe(duplex=False)
    t0 = time.perf_counter()
    # not a daemon: a pass may start its own worker processes (sensitivity's pool); killed below on timeout
    proc = ctx.Process(target=_cell_child, args=(send, path, pipeline, calib, feeds, weight_only))
    proc.start()
    send.close()
    res = None
    if recv.poll(timeout):
        try:
            res = recv.recv()
        except EOFError:
            res = None
    proc.join(5 if res is not None else 0)
    if proc.is_alive():
        proc.kill()
        proc.join()
    if res is None:
        secs = round(time.perf_counter() - t0, 1)
        if proc.exitcode is not None and proc.exitcode < 0 and secs < timeout:
            return {"status": "crashed", "error": f"cell process killed by signal {-proc.exitcode}", "seconds": secs}
        return {"status": "timeout", "error": f"no result within {timeout:g} s", "seconds": secs}
    return res


def _batch_size(path: Path, images: int) -> int:
    """The batch the model's inputs accept: their fixed batch dimension (1 for most ONNX-zoo CNNs), or
    all ``images`` at once when it is dynamic."""
    import onnx
    graph = onnx.load(path, load_external_data=False).graph
    inits = {i.name for i in graph.initializer}
    fixed = {vi.type.tensor_type.shape.dim[0].dim_value for vi in graph.input if vi.name not in inits
             and vi.type.tensor_type.shape.dim and vi.type.tensor_type.shape.dim[0].dim_value > 0}
    return min(fixed) if fixed else images


def cell_text(c: dict) -> str:
    if c["status"] == "ok":
        return f"{100 * c['exact']:.3f}% / {c['max_lsb']}".replace("100.000%", "100%")
    if c["status"] == "n/a" and c.get("optimized") is False:
        return "n/a (not optimized)"
    return c["status"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="all", help="all, or comma-separated zoo model names (built ones only)")
    ap.add_argument("--pipelines", help="comma-separated indices into each model's pipeline list, or '|'-separated "
                                        "pipelines (default: all of the README's)")
    ap.add_argument("--calib", type=int, default=16, help="calibration samples (first of the calibration split)")
    ap.add_argument("--images", type=int, default=2, help="evaluation samples run through both runtimes")
    ap.add_argument("--json", help="write every cell here (rewritten after each cell)")
    ap.add_argument("--resume", action="store_true",
                    help="keep the passed (n/a, bit-exact) cells of an existing --json file, run the others")
    ap.add_argument("--timeout", type=float, default=1200, help="seconds per cell before it is 'timeout'")
    ap.add_argument("--weight-only", choices=("check", "skip"), default="check",
                    help="check: optimize weight-only pipelines to show they write no QuantizeLinear (n/a); "
                         "skip: mark them n/a without optimizing")
    ap.add_argument("--table", metavar="JSON,...", help="print the table of earlier --json runs (merged), run nothing")
    ap.add_argument("--split", type=int, default=0, metavar="N",
                    help="print the table as several tables of at most N model columns each")
    args = ap.parse_args(argv)
    if args.table:
        runs = [json.loads(Path(f).read_text()) for f in args.table.split(",")]
        head = next((r for r in reversed(runs) if "ort" in r), runs[-1])
        merged = {**head, "models": {}, "calib": " or ".join(sorted({str(r["calib"]) for r in runs}))}
        for r in runs:                       # a later file's model replaces an earlier one's
            merged["models"].update(r["models"])
        expected = None
        if args.models != "all" or "--models" in (argv or sys.argv):
            from zoo_manifest import model_entry, resolve_names
            names = resolve_names(args.models.split(",") if args.models != "all" else "all")
            expected = {n: pipelines_for(model_entry(n), n) for n in names}
        _print_table(merged, args.split, expected)
        return 0

    from zoo_data import DataMissing, zoo_split
    from zoo_manifest import model_entry, model_path, resolve_names
    names = resolve_names(args.models.split(",") if args.models != "all" else "all")
    import onnxruntime
    results: dict = {"cpu": cpu_model(), "ort": onnxruntime.__version__, "calib": args.calib,
                     "images": args.images, "models": {}}
    if args.resume and args.json and Path(args.json).exists():
        old = json.loads(Path(args.json).read_text())
        if (old.get("calib"), old.get("images")) != (args.calib, args.images):
            print(f"--resume: {args.json} was run with --calib {old.get('calib')} --images {old.get('images')}",
                  file=sys.stderr)
            return 2
        results["models"] = old["models"]     # cells not selected this time stay as they were
    for name in names:
        path = model_path(name)
        if not path.exists():
            print(f"{name}: not built ({path}), skipped", file=sys.stderr)
            continue
        try:
            calib, evaluation = zoo_split(name)
        except DataMissing as e:
            print(f"{name}: {e}, skipped", file=sys.stderr)
            continue
        calib = calib.subset(range(min(args.calib, len(calib))))
        feeds = list(evaluation.subset(range(min(args.images, len(evaluation)))).batches(_batch_size(path, args.images)))
        pipes = pipelines_for(model_entry(name), name)
        if args.pipelines:
            pipes = args.pipelines.split("|") if "|" in args.pipelines or ":" in args.pipelines else \
                [pipes[int(i)] for i in args.pipelines.split(",")]
        pipes = sorted(pipes, key=lambda p: "weight_only=true" in p)   # integer pipelines first (stable)
        cells = results["models"].setdefault(name, {})
        for p in pipes:
            if p in cells and (_passed(cells[p]) or not args.resume):
                continue
            cells[p] = c = run_cell_isolated(path, p, calib, feeds, args.weight_only, args.timeout)
            print(f"{name:22s} {p:80s} {cell_text(c):14s} {c.get('seconds', ''):>7} s  {c.get('error', '')}",
                  flush=True)
            if args.json:
                _write_json(args.json, results)
    _print_table(results, args.split)
    if args.json:
        _write_json(args.json, results)
    bad = [(m, p) for m, cs in results["models"].items() for p, c in cs.items() if not _passed(c)]
    return 1 if bad else 0


def _passed(c: dict) -> bool:
    """n/a, or run and bit-exact."""
    return c["status"] == "n/a" or (c["status"] == "ok" and c["max_lsb"] == 0)


def _write_json(path: str, results: dict) -> None:
    tmp = Path(path).with_name(Path(path).name + ".tmp")
    tmp.write_text(json.dumps(results, indent=1))
    os.replace(tmp, path)


def _print_table(results: dict, split: int = 0, expected: dict | None = None) -> None:
    """``expected``: {model: its pipelines}, to show every model as a column and a cell not run as
    ``not run`` (default: the models and cells of ``results`` only)."""
    print(f"\nqgraph-run float mode vs ONNX Runtime (one thread), % of output elements bit-exact / max LSB; "
          f"{results['calib']} calibration samples, {results['images']} evaluation samples; {results['cpu']}"
          f"{', ORT ' + results['ort'] if 'ort' in results else ''}\n")
    models = list(expected) if expected else list(results["models"])
    split = split or len(models) or 1
    for start in range(0, len(models), split):
        chunk = models[start:start + split]
        pipes: list[str] = []
        for m in chunk:
            pipes += [p for p in (expected or {}).get(m, results["models"].get(m, {})) if p not in pipes]
            pipes += [p for p in results["models"].get(m, {}) if p not in pipes]
        print("| pipeline | " + " | ".join(chunk) + " |")
        print("|---|" + "---|" * len(chunk))
        for p in pipes:
            row = []
            for m in chunk:
                cs = results["models"].get(m, {})
                row.append(cell_text(cs[p]) if p in cs else
                           "not run" if expected and p in expected.get(m, ()) else "")
            print(f"| `{p}` | " + " | ".join(row) + " |")
        print()
    errors = sorted({f"{m}, `{p}`: {c['status']}: {c['error']}" for m, cs in results["models"].items()
                     for p, c in cs.items() if c["status"] not in ("ok", "n/a")})
    for e in errors:
        print(f"- {e}")


if __name__ == "__main__":
    sys.exit(main())
