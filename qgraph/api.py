"""The library entry: ``qgraph.optimize(model, passes, calib=..., output=...)``. The CLI is a thin layer over it."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import onnx

from qgraph import ir
from qgraph.errors import ModelError
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
             progress: bool = True) -> tuple[onnx.ModelProto, Report]:
    """Run ``passes`` over ``model`` in the order given; return the rewritten model and its Report.

    model   -- a path to an .onnx file or an onnx.ModelProto (never modified)
    passes  -- ``"fold,quant:bits=4"``, a list of such strings, or Pass objects
    calib   -- calibration data: a path (.npz, folder of .npy, folder of images with ``preset``),
               a dict of arrays, or a ``qgraph.data.Samples``
    output  -- where to write the result (atomically; never over the input); None to not write
    report  -- where to write the JSON report; verify -- check outputs against the original after
               each pass (tolerance overrides each pass's own; an output may also differ by
               noise_factor x the original model's own float noise, default 4, 0 for none); dump_dir -- write NN_<pass>.onnx;
               plots -- directory for PNGs drawn by passes (equalize: channel ranges before/after)
    """
    pipeline = build_passes(passes)  # option errors before any work
    source = None if isinstance(model, onnx.ModelProto) else Path(model)
    if output is not None and source is not None and ir.same_file(Path(output), source):
        raise ModelError(f"refusing to write the output over the input model: {output}")
    g = ir.load(model)
    samples = None
    if calib is not None:
        from qgraph.data import open_samples
        samples = open_samples(calib, [t.name for t in g.inputs], preset=preset, limit=calib_limit)
    ctx = Context(calib=samples, seed=seed, progress=progress, plots=str(plots) if plots is not None else None)
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
    result = manager.model
    if output is not None:
        ir.save(result, output, protect=[source])
        rep.meta["output"] = str(output)
    if report is not None:
        rep.save(report)
    return result, rep

