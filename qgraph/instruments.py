"""Instruments observe a pipeline from outside the passes: Report, Verify, Dump.

Measurement lives here, not in the passes: a pass returns notes; these record size, parameters,
MACs, node counts and time after every pass (Report), check outputs against the original model
through ONNX Runtime (Verify), or write the model after every pass (Dump).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from qgraph import ir
from qgraph.analysis import model_stats
from qgraph.errors import ModelError, OptionError, QGraphError
from qgraph.ops import ort_session
from qgraph.pipeline import Context, Instrument, Pass, PassResult


# ----------------------------------------------------------------------------- Report

class Report(Instrument):
    """Per pass: model bytes, parameters, MACs, node count by op type, wall time and the pass's notes.

    MACs are per sample. Symbolic input dimensions (other than the batch) are taken from the first
    calibration sample when the context has calibration data (``meta["mac_input_shapes"]``), and
    shapes static inference cannot derive even then are read from one ONNX Runtime run on that
    sample (``analysis.ort_shapes``); a model whose dot-product shapes stay unknown shows ``?``
    (``null`` in the JSON, with the nodes under ``unknown_macs``).
    """

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []
        self.meta: dict[str, Any] = {}
        self.input_shapes: dict[str, tuple] = {}
        self.sample: dict[str, np.ndarray] = {}

    def start(self, g, model, ctx) -> None:
        self.sample = calibration_sample(ctx)
        self.input_shapes = {k: tuple(np.shape(v)) for k, v in self.sample.items()}
        if self.input_shapes:
            self.meta["mac_input_shapes"] = {k: list(v) for k, v in self.input_shapes.items()}
        notes = {}
        kept = ir.meta_of(g).get("kept_constants")
        if kept:  # ConstantOfShape results over the expansion limit stay nodes (ir.materialize_constants)
            notes["constants_not_expanded"] = len(kept)
            notes["details"] = {"constants_not_expanded": {k: f"{v / 2**20:,.0f} MB" for k, v in kept.items()}}
        self.rows = [self._row("input", 0, model, seconds=0.0, notes=notes)]

    def after(self, index: int, p: Pass, g, model, result: PassResult, seconds: float, ctx: Context) -> None:
        row = self._row(p.label(), index, model, seconds, result.notes)
        row["modified"] = result.modified
        self.rows.append(row)

    def _row(self, name: str, index: int, model: onnx.ModelProto, seconds: float, notes: dict) -> dict:
        s = model_stats(model, self.input_shapes, self.sample)
        row = {"pass": name, "index": index, "bytes": s.bytes, "params": s.params, "macs": s.macs,
               "nodes": s.nodes, "ops": dict(sorted(s.ops.items())), "seconds": round(seconds, 4),
               "notes": _jsonable(notes)}
        if s.unknown_macs:
            row["unknown_macs"] = list(s.unknown_macs)
        return row

    def attach_verify(self, index: int, diffs: dict[str, dict[str, float]], tolerance: float | None,
                      bounds: dict[str, float] | None = None) -> None:
        for row in self.rows:
            if row["index"] == index:
                row["verify"] = {"outputs": diffs, "tolerance": tolerance}
                if bounds is not None:
                    row["verify"]["bounds"] = bounds

    def attach_noise(self, noise: dict[str, dict[str, float]], factor: float) -> None:
        """The original model's own float noise per output (Verify), shown on the input row."""
        self.meta["verify_noise"] = {"factor": factor, "outputs": noise}
        if self.rows:
            self.rows[0]["verify_noise"] = noise

    def to_dict(self) -> dict:
        return {"qgraph_report": 1, **self.meta, "passes": self.rows}

    def to_json(self) -> bytes:
        """The report as standard JSON: a NaN or infinite figure is written as null."""
        return (json.dumps(_finite(self.to_dict()), indent=2, allow_nan=False) + "\n").encode()

    def save(self, path: str | os.PathLike) -> None:
        ir.atomic_write_bytes(path, self.to_json())

    def format(self) -> str:
        if not self.rows:
            return "(empty report)"
        head = ["#", "pass", "nodes", "params", "size", "MACs", "time", "verify", "notes"]
        table = [head]
        for r in self.rows:
            v = r.get("verify")
            vtxt = "-"
            if v:
                worst = max((d["max_rel"] for d in v["outputs"].values()), default=0.0)
                vtxt = f"rel {worst:.1e}"
            elif r.get("verify_noise"):
                worst = max((d["max_rel"] for d in r["verify_noise"].values()), default=0.0)
                vtxt = f"noise {worst:.1e}"
            table.append([str(r["index"]), r["pass"], str(r["nodes"]), _si(r["params"]),
                          _bytes(r["bytes"]), "?" if r["macs"] is None else _si(r["macs"]),
                          f"{r['seconds']:.2f}s", vtxt,
                          _notes(r["notes"])])
        widths = [max(len(row[i]) for row in table) for i in range(len(head) - 1)]
        lines = []
        for row in table:
            cells = [c.ljust(w) if i in (1,) else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))]
            lines.append("  ".join(cells) + "  " + row[-1])
        lines.insert(1, "-" * min(120, len(lines[0])))
        lines.append("")
        lines.append(self._op_table())
        for r in self.rows:   # a pass's own table (notes["table"]: rows as dicts, or lines already formatted)
            rows = r["notes"].get("table") if isinstance(r.get("notes"), dict) else None
            if rows:
                text = "\n".join(rows) if all(isinstance(x, str) for x in rows) else format_table(rows)
                lines += ["", f"{r['pass']}:", text]
        return "\n".join(lines)

    def _op_table(self) -> str:
        """Op-type counts across the pipeline, only the rows that changed (plus the total)."""
        ops = sorted({op for r in self.rows for op in r["ops"]})
        changed = [op for op in ops if len({r["ops"].get(op, 0) for r in self.rows}) > 1]
        stages = [str(r["index"]) for r in self.rows]
        width = max([len(op) for op in changed] + [len("op type")])
        out = ["op type".ljust(width) + "  " + "  ".join(s.rjust(4) for s in stages) + "   (after pass #)"]
        for op in changed:
            out.append(op.ljust(width) + "  " + "  ".join(str(r["ops"].get(op, 0)).rjust(4) for r in self.rows))
        if not changed:
            out.append("(no op counts changed)")
        return "\n".join(out)


def calibration_sample(ctx: Context) -> dict[str, np.ndarray]:
    """Input name -> the first calibration sample (a batch of one; empty without calibration data)."""
    if ctx.calib is None:
        return {}
    return dict(next(iter(ctx.calib.batches(1)), None) or {})


def calibration_shapes(ctx: Context) -> dict[str, tuple]:
    """Input name -> shape of the first calibration sample (empty without calibration data)."""
    return {k: tuple(np.shape(v)) for k, v in calibration_sample(ctx).items()}


def _si(n: int) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


def _bytes(n: int) -> str:
    for unit, div in (("GB", 2**30), ("MB", 2**20), ("KB", 2**10)):
        if n >= div:
            return f"{n / div:.1f}{unit}"
    return f"{n}B"


def format_table(rows: list[dict]) -> str:
    """Rows of dicts as an aligned text table (columns in first-seen order; None as '-')."""
    cols = list(dict.fromkeys(k for r in rows for k in r))

    def cell(v) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:,.2f}"
        if isinstance(v, int) and not isinstance(v, bool):
            return f"{v:,}"
        return str(v)
    table = [cols] + [[cell(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(cols))]
    text = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
            for row in table]
    text.insert(1, "-" * len(text[0]))
    return "\n".join(text)


def _notes(notes: dict) -> str:
    parts = []
    for k, v in notes.items():
        if k in ("details", "table"):
            continue
        if isinstance(v, dict):
            if v:
                parts.append(f"{k}: " + ", ".join(f"{kk}={vv}" for kk, vv in v.items()))
        elif isinstance(v, (list, tuple)):
            parts.append(f"{k}={len(v)}")
        elif isinstance(v, bool):
            parts.append(f"{k}={'yes' if v else 'no'}")
        elif isinstance(v, (int, float)) and v == 0:
            continue  # zero counts are noise in the table; the JSON keeps them
        elif isinstance(v, float):
            parts.append(f"{k}={v:.4g}")
        else:
            parts.append(f"{k}={v}")
    return "; ".join(parts) or "-"


def _finite(x: Any) -> Any:
    """``x`` with every NaN / infinite float replaced by None (JSON has no NaN)."""
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    if isinstance(x, float) and not np.isfinite(x):
        return None
    return x


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    return str(x)


# ----------------------------------------------------------------------------- Verify

class VerifyError(QGraphError):
    pass


#: seeded_inputs refuses to draw more than this many bytes of random inputs (give --calib instead).
MAX_SEEDED_BYTES = 1 << 30


def seeded_inputs(model: onnx.ModelProto, seed: int, batch: int = 2) -> dict[str, np.ndarray]:
    """Random inputs for every graph input: normal floats, small ints (token-id-like), masks of ones.

    Symbolic dimensions become ``batch`` for the first axis and 8 elsewhere. Inputs declared larger
    than ``MAX_SEEDED_BYTES`` in all are refused (ModelError) before anything is drawn.
    """
    rng = np.random.default_rng(seed)
    inits = {t.name for t in model.graph.initializer}
    feeds = {}
    plan = []
    total = 0
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type
        if not vi.type.HasField("tensor_type") or tt.elem_type == onnx.TensorProto.UNDEFINED:
            raise ModelError(f"input '{vi.name}' is not a typed tensor: --verify cannot draw inputs for it; "
                             "give --calib")
        dims = [d.dim_value if d.HasField("dim_value") else (batch if i == 0 else 8)
                for i, d in enumerate(tt.shape.dim)]
        try:
            dtype = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)
        except Exception:
            raise ModelError(f"input '{vi.name}' has data type {tt.elem_type}, for which --verify cannot "
                             "draw inputs; give --calib") from None
        total += int(np.prod(dims, dtype=np.float64)) * np.dtype(dtype).itemsize
        plan.append((vi, dims, dtype))
    if total > MAX_SEEDED_BYTES:
        shapes = ", ".join(f"{vi.name} {dims}" for vi, dims, _ in plan)
        raise ModelError(f"the model's inputs ({shapes}) would take {total / 2**30:,.1f} GiB of random data "
                         "for --verify; give --calib with smaller samples")
    for vi, dims, dtype in plan:
        lname = vi.name.lower()
        if np.issubdtype(dtype, np.floating):
            feeds[vi.name] = rng.standard_normal(dims).astype(dtype)
        elif dtype == np.bool_:
            feeds[vi.name] = rng.random(dims) < 0.5
        elif "mask" in lname:
            feeds[vi.name] = np.ones(dims, dtype=dtype)
        elif "type" in lname or "segment" in lname:
            feeds[vi.name] = np.zeros(dims, dtype=dtype)
        else:
            feeds[vi.name] = rng.integers(0, 100, size=dims).astype(dtype)
    return feeds


def output_diffs(ref: dict[str, np.ndarray], got: dict[str, np.ndarray]) -> dict[str, dict[str, float]]:
    """Per output: max |Δ| and max |Δ| / max |reference| (a relative error that does not blow up at 0)."""
    out = {}
    for name, r in ref.items():
        g = got[name]
        if r.shape != g.shape:
            raise VerifyError(f"output '{name}' changed shape: {r.shape} -> {g.shape}")
        r64, g64 = r.astype(np.float64), g.astype(np.float64)
        max_abs = float(np.max(np.abs(r64 - g64))) if r.size else 0.0
        scale = float(np.max(np.abs(r64))) if r.size else 0.0
        out[name] = {"max_abs": max_abs, "max_rel": max_abs / scale if scale > 0 else max_abs}
    return out


#: Verify's noise factor k: a function-preserving pass is held to max(tolerance, k x noise) per output.
NOISE_FACTOR = 4.0
#: The other executions of the original model whose differences from the reference are its noise.
NOISE_LEVELS = ("ORT_DISABLE_ALL", "ORT_ENABLE_BASIC")


class Verify(Instrument):
    """After each pass, run the current model and the original through ORT on the same inputs.

    A pass that claims to preserve function (``Pass.preserves_function``) fails when an output's
    relative error (max|Δ| / max|reference|) exceeds its bound ``max(tolerance, k × noise)``:
    ``tolerance`` is the pass's own (or the one given here), ``noise`` the float noise of the
    original model itself on that output, measured once at the start as the largest difference
    between the reference run (ORT, all graph optimizations) and the same model run with ORT's
    graph optimizations off and at the basic level (``NOISE_LEVELS``). Those runs compute the same
    function with the float32 operations fused and ordered differently, so their difference is
    what reassociation alone does on this model and these inputs; a rewrite that only reassociates
    lands within a small multiple of it, while a real change (a wrong fold) does not shrink with
    it. ``noise_factor`` k (default ``NOISE_FACTOR`` = 4; 0 turns the floor off) is that multiple.
    Inputs: the first calibration batch when calibration data is given, else seeded random inputs.
    """

    def __init__(self, report: Report | None = None, tolerance: float | None = None, max_samples: int = 8,
                 noise_factor: float = NOISE_FACTOR):
        if noise_factor < 0:
            raise OptionError(f"the verify noise factor must be >= 0, got {noise_factor:g}")
        self.report = report
        self.tolerance = tolerance
        self.max_samples = max_samples
        self.noise_factor = noise_factor
        self.feeds: dict[str, np.ndarray] = {}
        self.reference: dict[str, np.ndarray] = {}
        self.noise: dict[str, dict[str, float]] = {}
        self.history: list[tuple[str, dict]] = []
        self.source = ""

    def start(self, g, model, ctx: Context) -> None:
        # Whatever stops the original model from running is the input's problem, not a pass's
        self.feeds = self._inputs(model, ctx)
        source = g if ir.is_light(model) else model
        try:
            self.reference = self._run(source)
        except VerifyError as exc:
            hint = ""
            if self.source.startswith("seeded") and _symbolic_inputs(model):
                hint = (f" (inputs {', '.join(_symbolic_inputs(model))} have symbolic dims, drawn as 2 for the "
                        "batch and 8 elsewhere: give --calib with real inputs)")
            raise ModelError(f"--verify cannot run the original model{hint}: {exc}") from None
        except QGraphError as exc:
            raise ModelError(f"--verify: {exc}") from None
        for name, ref in self.reference.items():
            bad = _nonfinite(ref)
            if bad:
                raise ModelError(f"--verify: the original model's output '{name}' has {bad} NaN/infinite "
                                 f"value(s) on the verify inputs ({self.source}); nothing can be checked "
                                 "against it: give --calib with inputs it computes numbers on")
        try:
            self.noise = self._noise(source) if self.noise_factor > 0 else {}
        except QGraphError as exc:
            raise ModelError(f"--verify cannot measure the original model's float noise: {exc}") from None
        if self.report is not None and self.noise:
            self.report.attach_noise(self.noise, self.noise_factor)

    def _inputs(self, model: onnx.ModelProto, ctx: Context) -> dict[str, np.ndarray]:
        if ctx.calib is not None:
            batch = next(iter(ctx.calib.batches(self.max_samples)), None)
            if batch:
                self.source = "the first calibration samples"
                return batch
        self.source = f"seeded N(0,1) inputs, seed {ctx.seed}"
        return seeded_inputs(model, ctx.seed)

    def _run(self, model: onnx.ModelProto | ir.Graph, optimize: bool | str = True) -> dict[str, np.ndarray]:
        sess = ort_session(model, optimize=optimize)
        names = [o.name for o in sess.get_outputs()]
        wanted = {i.name for i in sess.get_inputs()}
        missing = wanted - set(self.feeds)
        if missing:
            raise VerifyError(f"verify inputs lack {', '.join(sorted(missing))}")
        try:
            outs = sess.run(names, {k: v for k, v in self.feeds.items() if k in wanted})
        except Exception as exc:
            raise VerifyError(f"ONNX Runtime failed to run the model: {ir.first_line(exc)}") from None
        return dict(zip(names, outs))

    def _noise(self, model: onnx.ModelProto | ir.Graph) -> dict[str, dict[str, float]]:
        """Per output, the largest max_abs / max_rel difference of the ``NOISE_LEVELS`` runs of the
        original model from the reference run."""
        noise = {name: {"max_abs": 0.0, "max_rel": 0.0} for name in self.reference}
        for level in NOISE_LEVELS:
            for name, d in output_diffs(self.reference, self._run(model, level)).items():
                noise[name] = {k: max(noise[name][k], d[k]) for k in noise[name]}
        return noise

    def bounds(self, tolerance: float) -> dict[str, float]:
        """Per output, the relative error a function-preserving pass may show: max(tolerance, k x noise)."""
        return {name: max(tolerance, self.noise_factor * self.noise.get(name, {}).get("max_rel", 0.0))
                for name in self.reference}

    def after(self, index, p, g, model, result, seconds, ctx) -> None:
        got = self._run(g if ir.is_light(model) else model)
        missing = set(self.reference) - set(got)
        if missing:
            raise VerifyError(f"outputs disappeared: {', '.join(sorted(missing))}")
        for name, value in got.items():   # NaN compares false with any tolerance: never a pass
            bad = _nonfinite(value) if name in self.reference else 0
            if bad:
                raise VerifyError(f"output '{name}' has {bad} NaN/infinite value(s) after this pass "
                                  f"(the original's are finite)")
        diffs = output_diffs(self.reference, got)
        tol = self.tolerance if self.tolerance is not None else max(p.tolerance, half_precision_floor(self.reference))
        bounds = self.bounds(tol)
        self.history.append((p.label(), diffs))
        if self.report is not None:
            self.report.attach_verify(index, diffs, tol if p.preserves_function else None,
                                      bounds if p.preserves_function else None)
        if p.preserves_function:
            over = {n: d for n, d in diffs.items() if d["max_rel"] > bounds[n]}
            if over:
                name, worst = max(over.items(), key=lambda kv: kv[1]["max_rel"] - bounds[kv[0]])
                noise = self.noise.get(name, {}).get("max_rel", 0.0)
                raise VerifyError(f"output '{name}' differs from the original: max rel diff "
                                  f"{worst['max_rel']:.3g} > bound {bounds[name]:.3g} = max(tolerance {tol:g}, "
                                  f"{self.noise_factor:g} x the model's own float noise {noise:.3g}) "
                                  f"(max abs {worst['max_abs']:.3g})")


def _symbolic_inputs(model: onnx.ModelProto) -> list[str]:
    inits = {t.name for t in model.graph.initializer}
    return [vi.name for vi in model.graph.input if vi.name not in inits
            and any(not d.HasField("dim_value") for d in vi.type.tensor_type.shape.dim)]


def _nonfinite(a: np.ndarray) -> int:
    a = np.asarray(a)
    if a.dtype.kind not in "fc":
        return 0
    return int(a.size - np.count_nonzero(np.isfinite(a)))


#: A function-preserving pass on a model computing in half precision is held to at least this many
#: units of the output type's rounding (eps), not to a float32 tolerance: every layer rounds its
#: output to float16, so re-rounded weights move the outputs by a few eps, growing with depth
#: (fold on float16 versions of the digits CNN: 1.6 eps, EfficientNet-Lite0: 3.7, MobileNetV2: 7.7,
#: on seeded N(0,1) inputs; a wrong channel moves them by ~1/eps). Deeper float16 networks need more
#: (a randomly weighted ResNet-50: 74 eps): give --tolerance.
HALF_PRECISION_EPS = 16


def half_precision_floor(outputs: dict[str, np.ndarray]) -> float:
    """The least relative tolerance outputs of this precision allow: 16 eps of float16/bfloat16, else 0."""
    eps = {"float16": 2.0**-10, "bfloat16": 2.0**-7}
    return max([HALF_PRECISION_EPS * eps.get(np.asarray(v).dtype.name, 0.0) for v in outputs.values()],
               default=0.0)


# ----------------------------------------------------------------------------- Dump

class Dump(Instrument):
    """Write ``DIR/NN_<pass>.onnx`` after every pass (``00_input.onnx`` first), for bisecting."""

    def __init__(self, directory: str | os.PathLike):
        self.dir = Path(directory)

    def start(self, g, model, ctx) -> None:
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ModelError(f"cannot create the dump folder {self.dir}: {exc.strerror or exc}") from None
        ir.save(g if ir.is_light(model) else model, self.dir / "00_input.onnx")

    def after(self, index, p, g, model, result, seconds, ctx) -> None:
        ir.save(g if ir.is_light(model) else model, self.dir / f"{index:02d}_{p.name}.onnx")
