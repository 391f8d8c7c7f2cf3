"""qgraph-run: run a quantized ONNX model on qgraph's integer kernels, optionally diffed against ORT.

    qgraph-run MODEL --inputs x.npz [--mode fixed] [--compare-ort] [--per-layer] [--limit N] [--json]

Prints per output the fraction of bit-exact elements, the max |delta| in LSB and the histogram of
delta; ``--per-layer`` lists every quantized tensor and marks the first that diverges from ORT.
``--compare-ort`` also names the kernel path ORT's int8 GEMMs take on this CPU (``qgraph.cpu``) and
how many layers have weights whose int16 pair sums saturate there (``float`` mode computes them as ORT
does). Exit codes: 0 ok, 2 bad input (model, inputs, unsupported op), 1 when ``--compare-ort`` finds
a difference above ``--max-lsb`` (one line on stderr says which output and why).
"""
from __future__ import annotations

import argparse
import json
import sys

import numpy as np


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qgraph-run", description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="quantized ONNX model (QDQ or QOperator)")
    p.add_argument("--inputs", required=True, help=".npz whose keys are the model's input names")
    p.add_argument("--mode", choices=("float", "fixed"), default="float",
                   help="requantization: float (RNE, as ORT) or fixed (int32 multiplier + shift)")
    p.add_argument("--compare-ort", action="store_true", help="diff every output against ONNX Runtime")
    p.add_argument("--per-layer", action="store_true",
                   help="diff every quantized tensor against ORT, chained and isolated (on ORT's inputs)")
    p.add_argument("--limit", type=int, default=None, help="use only the first N samples of each input")
    p.add_argument("--max-lsb", type=int, default=1, help="--compare-ort fails above this (default 1)")
    p.add_argument("--output", help="write our outputs to this .npz")
    p.add_argument("--json", action="store_true", help="print one JSON document instead of text")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def _load_inputs(path: str, limit: int | None) -> dict[str, np.ndarray]:
    from qgraph.errors import ModelError
    try:
        data = np.load(path)
    except Exception as exc:
        raise ModelError(f"cannot read inputs {path}: {exc}") from None
    return {k: (data[k][:limit] if limit else data[k]) for k in data.files}


def _histogram(h: dict) -> str:
    return " ".join(f"{k}:{v}" for k, v in sorted(h.items()))


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from qgraph.errors import ModelError, QGraphError
    try:
        return _main(args)
    except (ModelError, QGraphError) as exc:
        if args.debug:
            raise
        print(f"qgraph-run: error: {exc}", file=sys.stderr)
        return 2


def _main(args) -> int:

    from qgraph import ir
    from qgraph.kernels import diff
    from qgraph.kernels.lower import lower
    from qgraph.kernels.runtime import run

    model = ir.read_model(args.model)
    prog = lower(model)
    feeds = _load_inputs(args.inputs, args.limit)
    feeds = {k: v for k, v in feeds.items() if k in prog.inputs}
    report: dict = {"model": args.model, "mode": args.mode, "steps": prog.summary()}
    ours = run(prog, feeds, args.mode)
    worst = 0
    if args.compare_ort:
        from qgraph import cpu
        from qgraph.kernels import ortsat
        figures, _, _ = diff.against_ort(model, feeds, args.mode, prog)
        report["outputs"] = figures
        worst = max((f.get("max_lsb", 10**9) for f in figures.values()), default=0)
        path = cpu.ort_path()
        sat = ortsat.saturating_steps(prog)
        report["ort_path"] = {"name": path.name, "description": path.describe(), "saturates": path.saturates,
                              "layers_that_can_saturate": sat, "layers": ortsat.int16_pair_steps(prog)}
    else:
        report["outputs"] = {k: {"shape": list(v.shape), "dtype": str(v.dtype)} for k, v in ours.items()}
    if args.per_layer:
        rows = diff.per_layer(model, feeds, args.mode, prog)
        report["layers"] = rows
        first = next((r for r in rows if r.get("max_lsb", 1) > 0), None)
        report["first_divergence"] = first["output"] if first else None
    if args.output:
        ir.atomic_write_bytes(args.output, _npz_bytes(ours))
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        _print(report, args)
    if args.compare_ort and worst > args.max_lsb:
        print(f"qgraph-run: exit 1: {_why(report, args, worst)}", file=sys.stderr)
        return 1
    return 0


def _why(report: dict, args, worst: int) -> str:
    """One line: which output differs from ORT, by how much, and the likely reason."""
    name, f = max(report["outputs"].items(), key=lambda kv: kv[1].get("max_lsb", 10**9))
    what = (f"output {name} differs from ONNX Runtime by up to {worst} LSB on {100 * (1 - f.get('exact', 0)):.3f}% "
            f"of its values (--max-lsb {args.max_lsb})") if "max_lsb" in f else f"output {name}: {f}"
    from qgraph import cpu
    if cpu.ort_path() != cpu.host_ort_path():
        return what + (f": QGRAPH_ORT_PATH={cpu.ort_path().name} reproduces ORT on another CPU class "
                       f"({cpu.ort_path().describe()}); ORT ran {cpu.host_ort_path().describe()} here")
    if args.mode == "fixed":
        return what + ": fixed mode requantizes with integer multipliers, ORT with float32 (use --mode float to match)"
    return what + ": float mode is meant to match ORT bit for bit here; --per-layer shows the first layer that diverges"



def _npz_bytes(arrays: dict) -> bytes:
    import io
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def _print(report: dict, args) -> None:
    steps = ", ".join(f"{k} {v}" for k, v in report["steps"].items())
    print(f"{report['model']}: {sum(report['steps'].values())} integer steps ({steps}); mode {args.mode}")
    if "ort_path" in report:
        p = report["ort_path"]
        n_sat, n = len(p["layers_that_can_saturate"]), p["layers"]
        if not n_sat:
            sat = f"no weight pair of its {n} u8s8 layers can leave int16 (exact on every CPU class)"
        elif p["saturates"]:
            sat = (f"{n_sat} of its {n} u8s8 layers have weight pairs that saturate int16 here; {args.mode} mode "
                   + ("computes them as ORT does" if args.mode == "float" else "computes them exactly"))
        else:
            sat = (f"{n_sat} of its {n} u8s8 layers have weight pairs that would saturate on AVX2 / AVX-512BW CPUs "
                   f"(quant:target=any avoids it)")
        print(f"  ORT path: {p['description']}; {sat}")
    for name, f in report["outputs"].items():
        if "exact" in f:
            print(f"  {name}: {f['exact'] * 100:.3f}% bit-exact of {f['elements']}, max {f['max_lsb']} LSB, "
                  f"histogram |d| {_histogram(f['histogram'])}")
        elif "shape" in f:
            print(f"  {name}: {f['dtype']} {f['shape']}")
        else:
            print(f"  {name}: {f}")
    if "layers" in report:
        print("  per layer (vs ORT):")
        for r in report["layers"]:
            mark = "  <- first divergence" if r["output"] == report["first_divergence"] else ""
            iso = r.get("isolated")
            iso_txt = f"  | isolated {iso['exact'] * 100:8.4f}% max {iso['max_lsb']}" if iso else ""
            print(f"    {r['op']:<26} {r['output'][:56]:<56} {r['exact'] * 100:8.3f}%  max {r['max_lsb']}"
                  f"{iso_txt}{mark}")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
