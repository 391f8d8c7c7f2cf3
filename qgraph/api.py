"""The library entry: ``qgraph.optimize(model, passes, calib=..., output=...)``. The CLI is a thin layer over it."""
from __future__ import annotations

import math
import numbers
import os
from pathlib import Path
from typing import Any, Sequence

import onnx

from qgraph import container, ir, modelfile
from qgraph.errors import ModelError, OptionError
from qgraph.instruments import Dump, Report, Verify
from qgraph.passes import build_passes
from qgraph.pipeline import Context, Pass, PassManager


def optimize(model: str | os.PathLike | onnx.ModelProto,
             passes: str | Sequence[str | Pass],
             calib: Any = None,
             output: str | os.PathLike | None = None,
             *,
             report: str | os.PathLike | None = None,
             verify: bool = False,
             tolerance: float | None = None,
             noise_factor: float | None = None,
             dump_dir: str | os.PathLike | None = None,
             seed: int = 0,
             preset: str | None = None,
             calib_limit: int | None = None,
             plots: str | os.PathLike | None = None,
             progress: bool = True,
             explain_quant: int = 0,
             executor: str = "process") -> tuple[onnx.ModelProto, Report]:
    """Run ``passes`` over ``model`` in the order given; return the rewritten model and its Report.

    model   -- a path to an .onnx file or an onnx.ModelProto (never modified)
    passes  -- ``"fold,quant:bits=4"``, a list of such strings, or Pass objects
    calib   -- calibration data: a path (.npz, folder of .npy, folder of images with ``preset``),
               a dict of arrays, or a ``qgraph.data.Samples``
    output  -- where to write the result (atomically; never over the input); None to not write. A
               name ending in .qgz gets the container the ``huffman`` pass packed (it must be in the
               pipeline); any other name the ONNX model
    report  -- where to write the JSON report (with the output: both or neither are written);
               verify -- check outputs against the original after each pass (tolerance overrides
               each pass's own; an output may also differ by noise_factor x the original model's
               own float noise, default 4, 0 for none); dump_dir -- write NN_<pass>.onnx;
               plots -- directory for PNGs drawn by passes (equalize: channel ranges before/after)
    explain_quant -- after a pipeline with ``quant``: the N layers contributing most error, one at a time
               and all-but-one, with suggested exclusions (``report.meta["explain_quant"]``)
    executor -- where independent measurements (sensitivity) run: serial, process, dask://HOST:PORT

    Errors: OptionError (bad passes or arguments), ModelError (bad model, data or destination;
    PassInputError when a pass found it), PassError (a pass failed on valid input); never a bare
    TypeError / ValueError / OSError. For a model over 2 GB written to ``output``, the returned
    ModelProto refers to its weights in ``<output>.data`` (``onnx.load_external_data_for_model``
    reads them) instead of holding a second copy.
    """
    _check_arguments(passes, tolerance, seed, calib_limit, verify, noise_factor,
                      output=output, report=report, dump_dir=dump_dir, plots=plots)
    pipeline = build_passes(passes)  # option errors before any work
    if not isinstance(model, (str, os.PathLike, onnx.ModelProto)):
        raise ModelError(f"model must be a path or an onnx.ModelProto, got {type(model).__name__}")
    source = None if isinstance(model, onnx.ModelProto) else Path(model)
    # every destination is checked (and tried) before any work, so a long run never ends unwritable
    for path, what in ((output, "output"), (report, "report")):
        if path is None:
            continue
        modelfile.check_writable(path, what)
        if source is not None and ir.same_file(Path(path), source):
            raise ModelError(f"refusing to write the {what} over the input model: {path}")
    if output is not None and report is not None and ir.same_file(Path(output), Path(report)):
        raise ModelError(f"the report and the output model would be the same file: {output}")
    for folder, what in ((dump_dir, "dump folder"), (plots, "plots folder")):
        if folder is not None:
            modelfile.check_folder(folder, what)
    writes_qgz = output is not None and is_qgz_path(output)
    if writes_qgz and not any(p.name == "huffman" for p in pipeline):
        raise OptionError(f"{output}: a .qgz output is packed by the huffman pass; end the pipeline with "
                          f"',huffman' (or write .onnx)")
    g = ir.load(model, progress=progress)
    samples = None
    if calib is not None:
        from qgraph.data import conform, open_samples
        samples = open_samples(calib, [t.name for t in g.inputs], preset=preset, limit=calib_limit)
        samples = conform(samples, {t.name: (t.dtype, t.shape) for t in g.inputs})
    ctx = Context(calib=samples, seed=seed, progress=progress, plots=str(plots) if plots is not None else None,
                  executor=executor)
    rep = Report()
    rep.meta = {"model": str(source) if source else "<ModelProto>",
                "pipeline": [p.label() for p in pipeline]}
    instruments: list = [rep]
    if verify:
        instruments.append(Verify(rep, tolerance=tolerance,
                                  **({} if noise_factor is None else {"noise_factor": noise_factor})))
    if dump_dir is not None:
        instruments.append(Dump(dump_dir))
    manager = PassManager(pipeline, instruments)
    manager.run(g, ctx)
    try:
        return _finish(manager, g, ctx, rep, output, report, writes_qgz, explain_quant, pipeline, source)
    finally:
        # the context ends here (the caller gets the model and the report): its temporary files go
        # now, not whenever the garbage collector breaks its reference cycles
        ctx.release()


def _finish(manager, g, ctx, rep, output, report, writes_qgz, explain_quant, pipeline, source):
    """Write the output model (or .qgz) and the report together, after a successful run."""
    result = manager.model
    if explain_quant:
        from qgraph.passes.mixed import explain_quant as explain
        rep.meta["explain_quant"] = explain(ctx, result, explain_quant)
    light = ir.is_light(result)
    # the model and the report appear together or not at all
    with modelfile.Outputs() as out:
        if output is not None and writes_qgz:
            packed = ctx.container
            if pipeline[-1].name != "huffman":     # passes after huffman: pack what they left
                packed = container.pack(ir.to_model(g) if light else result, packed.options)
            out.write_bytes(output, packed.data)
            rep.meta["output"] = str(output)
            rep.meta["output_bytes"] = packed.size
        elif output is not None:
            _, written = ir.stage(out, g if light else result, output, protect=[source])
            rep.meta["output"] = str(output)
            if light:
                result = written   # its weights are in the external data file beside the output
        if report is not None:
            out.write_bytes(report, rep.to_json(), what="report")
        out.commit()
    if ir.is_light(result):
        result = ir.to_model(g)
    return result, rep


def _check_arguments(passes, tolerance, seed, calib_limit, verify, noise_factor, **paths) -> None:
    """OptionError for arguments of the wrong type or range, before anything is read."""
    if passes is None:
        raise OptionError("no passes given: e.g. passes='fold,cleanup'")
    for name, value in (("tolerance", tolerance), ("noise_factor", noise_factor)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Real)
                                  or not math.isfinite(value) or value < 0):
            raise OptionError(f"{name} must be a number >= 0, got {value!r}")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise OptionError(f"seed must be an integer >= 0, got {seed!r}")
    if calib_limit is not None and (isinstance(calib_limit, bool) or not isinstance(calib_limit, numbers.Integral)
                                    or calib_limit < 1):
        raise OptionError(f"calib_limit must be an integer >= 1, got {calib_limit!r}")
    if not isinstance(verify, bool):
        raise OptionError(f"verify must be True or False, got {verify!r}")
    for name, value in paths.items():
        if value is not None and not isinstance(value, (str, os.PathLike)):
            raise OptionError(f"{name} must be a path, got {type(value).__name__}")


def is_qgz_path(path: str | os.PathLike) -> bool:
    """Whether an output name asks for the .qgz container."""
    return Path(path).suffix.lower() == ".qgz"
