"""The command lines: ``qgraph-opt`` over ``qgraph.optimize``, and ``qgraph-run`` over the integer
runtime (``qgraph.kernels``).

Both exit 0 when all went well, 1 when the work failed on valid input (a pass failed; ``qgraph-run
--compare-ort`` found a difference above ``--max-lsb``), 2 for bad input or options (a missing or
broken file, an unsupported op, a bad option). Errors are one line on stderr; the traceback only with
``--debug``. The input file is never written; an output appears whole or not at all.
"""
from __future__ import annotations

import argparse
import json
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np

from qgraph.errors import ModelError, OptionError, PassError, QGraphError

PROG = "qgraph-opt"
RUN_PROG = "qgraph-run"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2 (argparse prints usage + message)
        print(f"{self.prog}: error: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(2)


def version() -> str:
    """The installed distribution's version (package metadata), else the source tree's."""
    try:
        from importlib.metadata import PackageNotFoundError, version as dist_version
        return dist_version("qgraph")
    except (ImportError, PackageNotFoundError):  # pragma: no cover - running from a bare checkout
        from qgraph import __version__
        return __version__


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog=PROG,
        description="Rewrite an ONNX model with an ordered list of passes.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=textwrap.dedent("""\
            examples:
              qgraph-opt models/digits_cnn.onnx -p fold,cleanup --verify
              qgraph-opt model.onnx -p fold,quant:granularity=channel --calib images/ --preset imagenet
              qgraph-opt model.onnx -p fold,share,huffman --calib data.npz -o model.qgz
              qgraph-opt model.qgz -o model.onnx          (no -p: unpack a .qgz)
              qgraph-opt --list-passes
              qgraph-opt --explain fold
            """))
    p.add_argument("model", nargs="?", help="input .onnx or .qgz model (never modified)")
    p.add_argument("-p", "--passes", help="comma-separated passes with options, e.g. fold,quant:bits=4,granularity=channel")
    p.add_argument("-o", "--output", help="output path (default: <stem>.opt.onnx next to the input); a name "
                                          "ending in .qgz writes the container the huffman pass packed")
    p.add_argument("--calib", help="calibration data: .npz, folder of .npy, or folder of images (with --preset)")
    p.add_argument("--preset", help="preprocessing preset for image folders (e.g. imagenet, efficientnet-lite, mnist)")
    p.add_argument("--calib-limit", type=int, help="use at most this many calibration samples")
    p.add_argument("--report", help="write the per-pass report as JSON to this file")
    p.add_argument("--verify", action="store_true", help="compare outputs with the original after every pass (ONNX Runtime)")
    p.add_argument("--tolerance", type=float, help="relative tolerance for --verify (default: each pass's own)")
    p.add_argument("--noise-factor", type=float, metavar="K",
                   help="--verify allows each output max(tolerance, K x the original model's own float noise), "
                        "the noise measured by running it with ORT's graph optimizations off and basic vs all "
                        "(default 4; 0: the tolerance alone)")
    p.add_argument("--dump-dir", help="write NN_<pass>.onnx after every pass into this directory")
    p.add_argument("--plots", help="write PNG plots from passes that draw them (equalize) into this directory "
                                   "(needs matplotlib: pip install qgraph[plots])")
    p.add_argument("--explain-quant", type=int, metavar="N", default=0,
                   help="after quant: the N layers contributing most output error (one at a time and "
                        "all-but-one, on 16 calibration samples) and the exclusions that would help")
    p.add_argument("--executor", default="process", metavar="WHERE",
                   help="where sensitivity measurements run: serial, process (local pool, default) or "
                        "dask://HOST:PORT (pip install qgraph[dask])")
    p.add_argument("--seed", type=int, default=0, help="seed for verify inputs and any randomness (default 0)")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.add_argument("-q", "--quiet", action="store_true", help="print only errors and the output path")
    p.add_argument("--list-passes", action="store_true", help="list the passes with a one-line summary")
    p.add_argument("--explain", metavar="PASS", help="show a pass's description and options with defaults")
    p.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    return p


def list_passes() -> str:
    from qgraph.passes import PASSES as table
    width = max(len(n) for n in table)
    return "\n".join(f"{name.ljust(width)}  {cls.summary}" for name, cls in table.items())


def explain(name: str) -> str:
    from qgraph.passes import lookup
    from qgraph.pipeline import describe_options
    cls = lookup(name)
    doc = textwrap.dedent(cls.__doc__ or cls.summary).strip()
    lines = [f"{cls.name}: {cls.summary}", "", doc, ""]
    if cls.requires:
        lines.append("requires: " + "; ".join(f"{r.name} ({r.hint_for(cls.name)})" if r.hint_for(cls.name) else r.name
                                              for r in cls.requires))
    lines.append(f"preserves function: {'yes, verify tolerance ' + format(cls.tolerance, 'g') if cls.preserves_function else 'no (lossy)'}")
    rows = describe_options(cls)
    if rows:
        lines.append("")
        lines.append("options (-p " + cls.name + ":key=value,key=value):")
        w = [max(len(r[i]) for r in rows) for i in range(3)]
        for n, t, d, h in rows:
            lines.append(f"  {n.ljust(w[0])}  {t.ljust(w[1])}  default {d.ljust(w[2])}  {h}")
    else:
        lines.append("options: none")
    return "\n".join(lines)


def default_output(model: str) -> str:
    p = Path(model)
    return str(p.with_name(p.stem + ".opt.onnx"))


def _unpack(model: str, output: str | None) -> int:
    """Write the ONNX model a .qgz holds (default: <stem>.onnx beside it), exactly as it was packed."""
    from qgraph import container, ir
    out = Path(output) if output else Path(model).with_suffix(".onnx")
    if out.suffix.lower() == ".qgz":
        raise OptionError(f"{out}: unpacking writes an ONNX model; give an output name ending in .onnx")
    size = ir.save(container.read(model), out, protect=[model])
    print(f"wrote {out} ({size:,} bytes)")
    return 0


def unpack_main(argv: list[str] | None = None) -> int:
    """``qgraph-unpack M.qgz [-o OUT.onnx] [--info]``: the ONNX model a .qgz holds, or its section table."""
    p = _Parser(prog="qgraph-unpack", description="Unpack a .qgz into the ONNX model it holds (bit-exact).")
    p.add_argument("model", help="input .qgz (never modified)")
    p.add_argument("-o", "--output", help="output .onnx (default: <stem>.onnx next to the input)")
    p.add_argument("--info", action="store_true", help="print the sections (codec, stored and raw bytes) instead")
    p.add_argument("--json", action="store_true", help="with --info: as JSON")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return _guarded("qgraph-unpack", p.parse_args(argv), _unpack_main)


def _unpack_main(args) -> int:
    from qgraph import container
    if not container.is_qgz(args.model):
        raise ModelError(f"not a .qgz file: {args.model}")
    if args.info:
        print(_format_info(container.info(args.model), args.json))
        return 0
    return _unpack(args.model, args.output)


def _format_info(info: dict, as_json: bool) -> str:
    if as_json:
        import json
        return json.dumps(info, indent=2)
    lines = [f"{info['file']}: {info['bytes']:,} bytes, .qgz {info['version']}, unpacks to "
             f"{info['unpacked_bytes']:,} bytes ({info['unpacked_bytes'] / info['bytes']:.1f}x)"]
    w = max([len(s["name"] or "(graph)") for s in info["sections"]] + [7])
    for s in info["sections"]:
        ratio = s["raw"] / s["stored"] if s["stored"] else float("inf")
        lines.append(f"  {(s['name'] or '(graph)').ljust(w)}  {s['codec']:<13} {s['stored']:>12,} <- "
                     f"{s['raw']:>12,}  {ratio:6.2f}x")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``qgraph-opt``."""
    args = build_parser().parse_args(argv)
    return _guarded(PROG, args, _main)


def _guarded(prog: str, args, body) -> int:
    """Run ``body(args)`` with the exit codes and one-line errors both command lines share.

    Library warnings (numpy's RuntimeWarnings on odd values, deprecations) are not for users: what
    matters is checked and said by qgraph itself; ``--debug`` shows them.
    """
    try:
        with warnings.catch_warnings():
            if not args.debug:
                warnings.simplefilter("ignore")
            return body(args)
    except (ModelError, OptionError) as exc:
        return _fail(prog, args, exc, 2)
    except QGraphError as exc:           # PassError and other failures on valid input
        return _fail(prog, args, exc, 1)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug in qgraph: still one line unless --debug
        return _fail(prog, args, exc, 1, prefix="internal error: ")


def _fail(prog: str, args, exc: BaseException, code: int, prefix: str = "") -> int:
    if args.debug:
        import traceback
        traceback.print_exc()
    msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    print(f"{prog}: error: {prefix}{msg}", file=sys.stderr)
    return code


def _main(args) -> int:
    if args.list_passes:
        print(list_passes())
        return 0
    if args.explain:
        print(explain(args.explain))
        return 0
    if not args.model:
        raise OptionError("no input model given (usage: qgraph-opt MODEL -p PASSES [-o OUT])")
    if not args.passes:
        from qgraph.container import is_qgz
        if Path(args.model).is_file() and is_qgz(args.model):      # qgraph-opt m.qgz -o m.onnx: unpack
            return _unpack(args.model, args.output)
        raise OptionError("no passes given: use -p, e.g. -p fold,cleanup (qgraph-opt --list-passes)")
    from qgraph.api import optimize
    output = args.output or default_output(args.model)
    model, report = optimize(
        args.model, args.passes, calib=args.calib, output=output, report=args.report,
        verify=args.verify, tolerance=args.tolerance, noise_factor=args.noise_factor, dump_dir=args.dump_dir, seed=args.seed,
        preset=args.preset, calib_limit=args.calib_limit, plots=args.plots, progress=not args.quiet,
        explain_quant=args.explain_quant, executor=args.executor)
    if not args.quiet:
        print(report.format())
        print()
    if "explain_quant" in report.meta:
        from qgraph.passes.mixed import format_explain
        print(format_explain(report.meta["explain_quant"]))
        print()
    print(f"wrote {output} ({Path(output).stat().st_size:,} bytes)")
    return 0


# ----------------------------------------------------------------------------- qgraph-run

RUN_DOC = """Run a quantized ONNX model (QDQ or QOperator) on qgraph's integer kernels, optionally diffed
against ONNX Runtime: per output the share of bit-exact elements, the max |delta| in LSB and its
histogram; --per-layer lists every quantized tensor and marks the first that diverges from ORT."""


def build_run_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=RUN_PROG, description=RUN_DOC)
    p.add_argument("model", help="quantized ONNX model (QDQ or QOperator)")
    p.add_argument("--inputs", required=True, help=".npz whose keys are the model's input names")
    p.add_argument("--mode", choices=("float", "fixed"), default="float",
                   help="requantization: float (RNE, as ORT) or fixed (int32 multiplier + shift)")
    p.add_argument("--kernel", choices=("auto", "bitserial", "int8"), default="auto",
                   help="dot products of Conv/MatMul/Gemm with constant weights: int8, bitserial (AND/XNOR-"
                        "popcount over bit planes, every such layer), or auto (bit-serial for weights of <= 4 "
                        "bits when weight x activation planes are few enough; default). All give the same integers")
    p.add_argument("--compare-ort", action="store_true", help="diff every output against ONNX Runtime; names the int8 kernel path ORT takes on this CPU "
                   "(QGRAPH_ORT_PATH=avx2 reproduces an AVX2 CPU)")
    p.add_argument("--per-layer", action="store_true",
                   help="diff every quantized tensor against ORT, chained and isolated (on ORT's inputs)")
    p.add_argument("--limit", type=int, default=None, help="use only the first N samples of each input")
    p.add_argument("--max-lsb", type=int, default=1, help="--compare-ort fails (exit 1) above this (default 1)")
    p.add_argument("--output", help="write our outputs to this .npz (also when --compare-ort then exits 1)")
    p.add_argument("--json", action="store_true", help="print one JSON document instead of text")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    return p


def run_main(argv: list[str] | None = None) -> int:
    """``qgraph-run``."""
    args = build_run_parser().parse_args(argv)
    return _guarded(RUN_PROG, args, _run_main)


def _load_inputs(model, path: str, limit: int | None) -> dict[str, np.ndarray]:
    """The feeds for ``model``'s inputs from an .npz (or a folder of .npy/.npz), checked against the
    model's declared inputs (names, dtypes, every fixed dim) and for NaN/infinity; ModelError otherwise."""
    from qgraph.data import conform, open_samples
    if limit is not None and limit < 1:
        raise OptionError(f"--limit must be >= 1, got {limit}")
    inits = {t.name for t in model.graph.initializer}
    declared = {}
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type
        try:
            dtype = onnx_dtype(tt.elem_type)
        except Exception:
            dtype = None
        dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in tt.shape.dim] \
            if tt.HasField("shape") else None
        declared[vi.name] = (dtype, dims)
    samples = open_samples(path, list(declared), limit=limit)
    samples = conform(samples, declared)
    feeds = next(samples.batches(len(samples)))
    for name, (_, dims) in declared.items():
        if dims and dims[0] and len(feeds[name]) != dims[0]:
            raise ModelError(f"input '{name}': the model's batch axis is fixed at {dims[0]} but {path} has "
                             f"{len(feeds[name])} samples (use --limit {dims[0]})")
    return feeds


def onnx_dtype(elem_type: int):
    import onnx
    return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type))


def _histogram(h: dict) -> str:
    return " ".join(f"{k}:{v}" for k, v in sorted(h.items()))


def _run_main(args) -> int:
    from qgraph import ir
    from qgraph.kernels import diff
    from qgraph.kernels.lower import lower
    from qgraph.kernels.runtime import run

    if args.output:
        from qgraph.modelfile import check_writable
        for other in (args.model, args.inputs):
            if ir.same_file(Path(args.output), Path(other)):
                raise ModelError(f"refusing to write --output over {other}")
        check_writable(args.output, "--output")
    model = ir.read_model(args.model)
    ir.check_strict(model, args.model)
    prog = lower(model, kernel=args.kernel)
    feeds = _load_inputs(model, args.inputs, args.limit)
    feeds = {k: v for k, v in feeds.items() if k in prog.inputs}
    report: dict = {"model": args.model, "mode": args.mode, "kernel": args.kernel, "steps": prog.summary()}
    ours = run(prog, feeds, args.mode)
    report["dot_products"] = {s.name: s.cache["ran"] for s in prog.steps if "ran" in s.cache}
    worst = 0
    if args.compare_ort:
        from qgraph.kernels import cpu, ortsat
        with _ort_refusals():
            figures, _, _ = diff.against_ort(model, feeds, args.mode, prog)
        report["outputs"] = figures
        worst = max((f.get("max_lsb", 10**9) for f in figures.values()), default=0)
        path = cpu.ort_path()
        report["ort_path"] = {"name": path.name, "description": path.describe(), "saturates": path.saturates,
                              "layers_that_can_saturate": ortsat.saturating_steps(prog),
                              "layers": ortsat.int16_pair_steps(prog)}
    else:
        report["outputs"] = {k: {"shape": list(v.shape), "dtype": str(v.dtype)} for k, v in ours.items()}
    if args.per_layer:
        with _ort_refusals():
            rows = diff.per_layer(model, feeds, args.mode, prog)
        report["layers"] = rows
        first = next((r for r in rows if r.get("max_lsb", 1) > 0), None)
        report["first_divergence"] = first["output"] if first else None
    if args.output:
        ir.atomic_write_bytes(args.output, _npz_bytes(ours))
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        _print_run(report, args)
    if args.compare_ort and worst > args.max_lsb:
        over = [n for n, f in report["outputs"].items() if f.get("max_lsb", 10**9) > args.max_lsb]
        print(f"{RUN_PROG}: {len(over)} of {len(report['outputs'])} outputs differ from ONNX Runtime by more than "
              f"--max-lsb {args.max_lsb} (worst {worst} LSB: {', '.join(over[:3])}): {_why_differs(args)}",
              file=sys.stderr)
        return 1
    return 0


def _why_differs(args) -> str:
    """The likely reason ``--compare-ort`` found a difference, for the one line it prints."""
    from qgraph.kernels import cpu
    here, named = cpu.host_ort_path(), cpu.ort_path()
    if named != here:
        return (f"QGRAPH_ORT_PATH={named.name} reproduces ORT on another CPU class ({named.describe()}); "
                f"ORT ran {here.describe()} here")
    if args.mode == "fixed":
        return "fixed mode requantizes with integer multipliers, ORT in float32 (--mode float matches ORT)"
    return "float mode is meant to equal ORT bit for bit here; --per-layer shows the first layer that diverges"


class _ort_refusals:
    """ONNX Runtime refusing to load or run the user's model (an attribute that contradicts the
    weights) is bad input: a one-line ModelError, not an internal error or a failure."""

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb):
        from qgraph import ir
        if exc is not None and type(exc).__module__.startswith("onnxruntime"):
            raise ModelError(f"ONNX Runtime cannot run the model: {ir.first_line(exc)}") from None
        if isinstance(exc, QGraphError) and not isinstance(exc, (ModelError, OptionError)):
            raise ModelError(str(exc)) from None    # ops.ort_session: ORT cannot load the model
        return False


def _npz_bytes(arrays: dict) -> bytes:
    import io
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def _print_run(report: dict, args) -> None:
    steps = ", ".join(f"{k} {v}" for k, v in report["steps"].items())
    print(f"{report['model']}: {sum(report['steps'].values())} integer steps ({steps}); mode {args.mode}")
    ran: dict[str, int] = {}
    for how in report.get("dot_products", {}).values():
        ran[how] = ran.get(how, 0) + 1
    if ran:
        print(f"  dot products (--kernel {args.kernel}): " + ", ".join(f"{k}: {v}" for k, v in sorted(ran.items())))
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
