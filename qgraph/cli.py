"""``qgraph-opt``: the command line over ``qgraph.optimize``.

Exit codes: 0 ok, 1 a pass failed, 2 bad input or options. Errors are one line on stderr; the
traceback only with ``--debug``. The input file is never written; the output appears whole or not
at all.
"""
from __future__ import annotations

import argparse
import sys
import textwrap
from pathlib import Path

from qgraph.errors import ModelError, OptionError, PassError, QGraphError

PROG = "qgraph-opt"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2 (argparse prints usage + message)
        print(f"{self.prog}: error: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(2)


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
    p.add_argument("--dump-dir", help="write NN_<pass>.onnx after every pass into this directory")
    p.add_argument("--plots", help="write PNG plots from passes that draw them (equalize) into this directory "
                                   "(needs matplotlib: pip install qgraph[plots])")
    p.add_argument("--seed", type=int, default=0, help="seed for verify inputs and any randomness (default 0)")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.add_argument("-q", "--quiet", action="store_true", help="print only errors and the output path")
    p.add_argument("--list-passes", action="store_true", help="list the passes with a one-line summary")
    p.add_argument("--explain", metavar="PASS", help="show a pass's description and options with defaults")
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
        lines.append("requires: " + "; ".join(f"{r.name} ({r.hint})" if r.hint else r.name for r in cls.requires))
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
    args = p.parse_args(argv)
    try:
        from qgraph import container
        if not container.is_qgz(args.model):
            raise ModelError(f"not a .qgz file: {args.model}")
        if args.info:
            print(_format_info(container.info(args.model), args.json))
            return 0
        return _unpack(args.model, args.output)
    except (ModelError, OptionError) as exc:
        return _fail(args, exc, 2, prog="qgraph-unpack")
    except Exception as exc:
        return _fail(args, exc, 1, prefix="internal error: ", prog="qgraph-unpack")


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
    args = build_parser().parse_args(argv)
    try:
        return _main(args)
    except (ModelError, OptionError) as exc:
        return _fail(args, exc, 2)
    except PassError as exc:
        return _fail(args, exc, 1)
    except QGraphError as exc:
        return _fail(args, exc, 1)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug in qgraph: still one line unless --debug
        return _fail(args, exc, 1, prefix="internal error: ")


def _fail(args, exc: BaseException, code: int, prefix: str = "", prog: str = PROG) -> int:
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
        verify=args.verify, tolerance=args.tolerance, dump_dir=args.dump_dir, seed=args.seed,
        preset=args.preset, calib_limit=args.calib_limit, plots=args.plots, progress=not args.quiet)
    if not args.quiet:
        print(report.format())
        print()
    print(f"wrote {output} ({Path(output).stat().st_size:,} bytes)")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
