"""Pass infrastructure: Pass, PassResult, Context, PassManager, and the ``-p`` option syntax.

A pipeline is the user's ordered list of passes; the manager runs it in exactly that order,
checks each pass's preconditions on the graph, runs ``onnx.checker`` after every pass, and lets
instruments (report, verify, dump) observe each step. Any failure becomes a ``PassError`` naming
the pass and the ones already run.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import re
import time
import typing
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Iterable, Mapping, Sequence

import numpy as np
import onnx

from qgraph import ir
from qgraph.errors import ModelError, OptionError, PassError, PassInputError, QGraphError
from qgraph.ops import OrtLoadError, QParams, ort_session

if typing.TYPE_CHECKING:  # pragma: no cover
    from qgraph.container import Packed
    from qgraph.sensitivity import SensitivityTable


# ----------------------------------------------------------------------------- results and context

@dataclass
class PassResult:
    """What a pass did: whether it changed the graph, and what it wants reported."""
    modified: bool
    notes: dict = field(default_factory=dict)


@dataclass
class BNStats:
    """A folded BatchNormalization's output distribution, per channel: N(beta, gamma²)."""
    gamma: np.ndarray
    beta: np.ndarray

    def scaled(self, s) -> "BNStats":
        """The statistics of the channels divided by ``s`` (equalization rescales them)."""
        return BNStats(gamma=self.gamma / s, beta=self.beta / s)


class SpilledModel:
    """A model kept in a temporary file rather than in memory: what a pass records for later passes
    that may never come (``QuantRecord.float_model``). ``load()`` reads a fresh ModelProto each
    time (the caller owns it, and frees it by dropping it); ``path`` is the file (ONNX Runtime can
    open it). The folder is removed when this object is garbage-collected, or at interpreter exit.
    Models over 2 GB are written with their external data beside the file (``ir.save``)."""

    def __init__(self, model: "ir.Graph | onnx.ModelProto", name: str = "model"):
        import shutil
        import tempfile
        import weakref
        self.folder = tempfile.mkdtemp(prefix=f"qgraph-{name}-")
        self._cleanup = weakref.finalize(self, shutil.rmtree, self.folder, True)
        self.path = os.path.join(self.folder, name + ".onnx")
        ir.save(model, self.path)

    def load(self) -> onnx.ModelProto:
        return onnx.load(self.path)

    def close(self) -> None:
        """Remove the file now (idempotent): a failed run must leave no temporary folder behind."""
        self._cleanup()

    def fingerprint(self) -> str:
        """A key for "the same graph state" (as ``qgraph.calibrate.fingerprint``), from the file's bytes."""
        import hashlib
        h = hashlib.sha1()
        for path in sorted(p for p in os.listdir(self.folder)):
            with open(os.path.join(self.folder, path), "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
        return h.hexdigest()

    def initializers(self, names: Iterable[str]) -> dict[str, np.ndarray]:
        """The arrays of the initializers ``names`` (one read of the file)."""
        from onnx import numpy_helper
        wanted = set(names)
        return {t.name: numpy_helper.to_array(t) for t in self.load().graph.initializer if t.name in wanted}


class FloatWeights(Mapping):
    """The float value of each quantized weight, by the name of its DequantizeLinear output: read
    from the spilled float model on first use (biascorr, mixed), not held meanwhile."""

    def __init__(self, model: SpilledModel, names: dict[str, str]):
        self._model, self._names, self._values = model, dict(names), None

    def __getitem__(self, key: str) -> np.ndarray:
        if key not in self._names:
            raise KeyError(key)
        if self._values is None:
            self._values = self._model.initializers(self._names.values())
        return self._values[self._names[key]]

    def __iter__(self):
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


@dataclass
class QuantRecord:
    """What ``quant`` knows that the quantized graph no longer holds, for later passes (``biascorr``).

    options        -- the quant pass as written on the command line
    float_source   -- the model just before quantization: a ModelProto, or a ``SpilledModel`` (a
                      temporary file: what ``quant`` records, so the pipeline does not hold a float
                      copy of the weights when no later pass reads it)
    float_model    -- that model as a ModelProto (from a ``SpilledModel``: a fresh read on each access;
                      keep it in a local while you use it)
    float_weights  -- the float values of each quantized weight, by the name of its DequantizeLinear
                      output (find the layer's with ``qgraph.ops.find_groups``); a mapping
    activations    -- the QParams of each quantized activation, by float tensor name
    """
    options: str
    float_source: "onnx.ModelProto | SpilledModel"
    float_weights: Mapping = field(default_factory=dict)
    activations: dict[str, QParams] = field(default_factory=dict)

    @property
    def float_model(self) -> onnx.ModelProto:
        src = self.float_source
        return src.load() if isinstance(src, SpilledModel) else src


@dataclass
class Context:
    """What several passes share across one pipeline run.

    calib     -- calibration inputs (a ``qgraph.data.Samples``), or None
    seed      -- seed for everything random (Verify inputs, k-means init, sampling)
    original  -- the model as loaded, before any pass (for passes that compare). For a graph loaded
                 from a file it is light (``ir.is_light``: its structure, dims and sizes, not its
                 weights, which the file holds: keeping a second copy of every weight for the whole run
                 was ~20 % of ``fold,quant``'s peak memory on EfficientNet-Lite0)
    stats     -- cached statistics, keyed by whoever computes them (e.g. calibration ranges)
    progress  -- whether long steps show progress bars
    plots     -- a directory where passes that draw (equalize) write PNGs, or None

    Facts one pass leaves for a later one, each typed:
    bn_stats  -- per layer output name, the statistics of the BatchNorm ``fold`` folded into it
    quant     -- what ``quant`` recorded (None until it ran)
    sensitivity -- the per-site sensitivity table (``qgraph.sensitivity.SensitivityTable``) the
                 ``sensitivity`` pass measured, for ``quant:budget`` (None until measured)
    executor  -- where independent measurements run: serial, process (local pool) or dask://HOST:PORT
    sparsity  -- per layer node name, the fraction of its weights ``sparsify`` set to zero: later
                 passes keep those zeros exact
    container -- the ``.qgz`` that ``huffman`` packed (None until it ran); written when the output is .qgz
    """
    calib: Any = None
    seed: int = 0
    original: onnx.ModelProto | None = None
    stats: dict = field(default_factory=dict)
    progress: bool = True
    plots: str | None = None
    bn_stats: dict[str, BNStats] = field(default_factory=dict)
    quant: QuantRecord | None = None
    sensitivity: "SensitivityTable | None" = None
    executor: str = "process"
    sparsity: dict[str, float] = field(default_factory=dict)
    container: Packed | None = None

    def rng(self, salt: int = 0) -> np.random.Generator:
        return np.random.default_rng([self.seed, salt])

    def release(self) -> None:
        """Remove the temporary files the run's records hold (quant's spilled float model) now,
        rather than when this context is collected: what a failed run calls, so that nothing is left
        behind while the exception (and its traceback, which keeps the context alive) is handled."""
        spilled = self.quant.float_source if self.quant is not None else None
        if isinstance(spilled, SpilledModel):
            spilled.close()


# ----------------------------------------------------------------------------- preconditions

@dataclass(frozen=True)
class Requirement:
    """A property the graph must have before a pass runs, checked on the graph itself.

    ``hint`` says what to do about it: a string, or a function of the requiring pass's name (so
    that a hint naming a pass never tells that pass to run before itself). ``provider`` is the
    pass that establishes the property: when it already ran, the hint says so instead (with the
    reasons it gave for what it left: ``'fold' ran but left them (skipped: weight_shared=2)``)."""
    name: str
    check: Callable[[ir.Graph], str | None]  # None when satisfied, else what is wrong
    hint: str | Callable[[str], str] = ""
    provider: str = ""

    def __call__(self, g: ir.Graph) -> str | None:
        return self.check(g)

    def hint_for(self, pass_name: str, ran: Sequence[tuple[Pass, PassResult]] = ()) -> str:
        earlier = [r for p, r in ran if p.name == self.provider] if self.provider else []
        if earlier:
            skipped = {k: v for r in earlier for k, v in (r.notes.get("skipped") or {}).items()}
            why = f" (skipped: {', '.join(f'{k}={v}' for k, v in skipped.items())})" if skipped else ""
            return f"'{self.provider}' ran before this pass but left them{why}"
        return self.hint(pass_name) if callable(self.hint) else self.hint


def _no_op(op: str) -> Callable[[ir.Graph], str | None]:
    def check(g: ir.Graph) -> str | None:
        n = sum(1 for node in g.nodes if node.op == op)
        return f"{n} {op} node(s) left" if n else None
    return check


no_batchnorm = Requirement("no BatchNormalization left", _no_op("BatchNormalization"),
                           hint="put 'fold' before this pass", provider="fold")
not_quantized = Requirement("no QuantizeLinear/DequantizeLinear yet",
                            lambda g: (None if not any(n.op in ("QuantizeLinear", "DequantizeLinear")
                                                       for n in g.nodes)
                                       else "the model is already quantized"),
                            hint=lambda p: ("quant runs once, on a float model" if p == "quant"
                                            else f"run '{p}' before 'quant'"))
quantized = Requirement("QuantizeLinear/DequantizeLinear present",
                        lambda g: (None if any(n.op == "DequantizeLinear" for n in g.nodes)
                                   else "the model has no DequantizeLinear nodes"),
                        hint="put 'quant' before this pass")


# ----------------------------------------------------------------------------- options

@dataclass
class NoOptions:
    """This pass takes no options."""


def option(default: Any, help: str, *, choices: Sequence[Any] | None = None,
           range: tuple[float, float] | None = None) -> Any:
    """A pass option: a dataclass field with help text and an optional set of choices or a range."""
    meta = {"help": help, "choices": tuple(choices) if choices else None, "range": range}
    if isinstance(default, (list, dict, set)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


LIST_SEPARATOR = ";"
_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def _convert(pass_name: str, f: dataclasses.Field, raw: Any, hints: dict) -> Any:
    typ = hints.get(f.name, str)
    origin = typing.get_origin(typ)
    args = typing.get_args(typ)
    where = f"{pass_name}:{f.name}"
    if origin is typing.Union or (origin is not None and str(origin) == "<class 'types.UnionType'>"):
        non_none = [a for a in args if a is not type(None)]
        if isinstance(raw, str) and raw.lower() in ("none", "") and type(None) in args:
            return None
        if raw is None and type(None) in args:
            return None
        typ = non_none[0] if non_none else str
        origin, args = typing.get_origin(typ), typing.get_args(typ)
    try:
        if origin in (tuple, list):
            items = raw.split(LIST_SEPARATOR) if isinstance(raw, str) else list(raw)
            item_t = args[0] if args else str
            value = tuple(_scalar(item_t, x.strip() if isinstance(x, str) else x) for x in items
                          if not (isinstance(x, str) and not x.strip()))
        elif origin is dict:
            value = _parse_mapping(raw, args)
        else:
            value = _scalar(typ, raw)
    except (ValueError, TypeError):
        kind = getattr(typ, "__name__", str(typ))
        raise OptionError(f"{where}: expected {kind}, got {raw!r}") from None
    meta = f.metadata or {}
    choices = meta.get("choices")
    if choices and value not in choices:
        raise OptionError(f"{where}: {raw!r} is not one of {', '.join(map(str, choices))}")
    rng = meta.get("range")
    if rng and value is not None and not (rng[0] <= value <= rng[1]):
        raise OptionError(f"{where}: {value} is outside [{rng[0]}, {rng[1]}]")
    return value


def _scalar(typ: Any, raw: Any) -> Any:
    if typ is bool:
        if isinstance(raw, bool):
            return raw
        s = str(raw).strip().lower()
        if s in _TRUE:
            return True
        if s in _FALSE:
            return False
        raise ValueError(raw)
    if typ is int:
        if isinstance(raw, bool):
            raise ValueError(raw)
        if isinstance(raw, str):
            return int(raw.strip(), 0)
        if isinstance(raw, float) and not raw.is_integer():
            raise ValueError(raw)
        return int(raw)
    if typ is float:
        if isinstance(raw, bool):
            raise ValueError(raw)
        return float(raw)
    return str(raw) if typ is str else typ(raw)


def _parse_mapping(raw: Any, args: tuple) -> dict:
    """``name@value;name@value`` -> {name: value} (for per-node overrides on the command line)."""
    if isinstance(raw, dict):
        items = raw.items()
    else:
        items = []
        for part in str(raw).split(LIST_SEPARATOR):
            if not part.strip():
                continue
            if "@" not in part:
                raise ValueError(part)
            k, v = part.rsplit("@", 1)
            items.append((k.strip(), v.strip()))
    vt = args[1] if len(args) == 2 else str
    return {str(k): _scalar(vt, v) for k, v in items}


def make_options(pass_cls: type["Pass"], values: dict[str, Any]) -> Any:
    """Build the pass's options dataclass from raw values, with did-you-mean for unknown names."""
    opts_cls = pass_cls.options
    fields = {f.name: f for f in dataclasses.fields(opts_cls)}
    hints = typing.get_type_hints(opts_cls)
    kwargs = {}
    for key, raw in values.items():
        if key not in fields:
            valid = ", ".join(fields) if fields else "none (this pass takes no options)"
            guess = difflib.get_close_matches(key, list(fields), n=1)
            hint = f" (did you mean '{guess[0]}'?)" if guess else ""
            raise OptionError(f"unknown option '{key}' for pass '{pass_cls.name}'{hint}; valid: {valid}")
        kwargs[key] = _convert(pass_cls.name, fields[key], raw, hints)
    opts = opts_cls(**kwargs)
    check = getattr(opts, "validate", None)
    if callable(check):
        problem = check()
        if problem:
            raise OptionError(f"{pass_cls.name}: {problem}")
    return opts


def describe_options(pass_cls: type["Pass"]) -> list[tuple[str, str, str, str]]:
    """(name, type, default, help) for each option of a pass, for --explain and the README."""
    rows = []
    hints = typing.get_type_hints(pass_cls.options)
    for f in dataclasses.fields(pass_cls.options):
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = f.default_factory()  # type: ignore[misc]
        else:
            default = "(required)"
        typ = hints.get(f.name)
        tname = getattr(typ, "__name__", None) or str(typ).replace("typing.", "")
        meta = f.metadata or {}
        help_text = meta.get("help", "")
        if meta.get("choices"):
            help_text += f" [{'|'.join(map(str, meta['choices']))}]"
        if meta.get("range"):
            help_text += f" [{meta['range'][0]}..{meta['range'][1]}]"
        rows.append((f.name, tname, _fmt_default(default), help_text))
    return rows


def _fmt_default(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (tuple, list)):
        return LIST_SEPARATOR.join(map(str, v)) if v else "(none)"
    if isinstance(v, dict):
        return LIST_SEPARATOR.join(f"{k}@{x}" for k, x in v.items()) if v else "(none)"
    return "(none)" if v is None else str(v)


# ----------------------------------------------------------------------------- passes

class Pass:
    """Base of every pass. Subclasses set ``name``, ``summary``, ``options``, ``requires`` and
    implement ``run(g, ctx) -> PassResult``.

    ``preserves_function`` says the pass claims to keep the model's outputs (within
    ``tolerance``, a relative error: max|Δ| / max|reference| per output); ``Verify`` holds it to that.
    A pass without a docstring of its own is described by its module's (``--explain`` shows it).
    """
    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    options: ClassVar[type] = NoOptions
    requires: ClassVar[tuple[Requirement, ...]] = ()
    preserves_function: ClassVar[bool] = True
    tolerance: ClassVar[float] = 1e-4
    #: whether the pass rewrites inside If/Loop/Scan bodies; one that does not leaves them as they
    #: are and the manager notes how many it left (``untouched_subgraphs``)
    handles_subgraphs: ClassVar[bool] = False

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        if cls.__doc__ is None:
            import sys
            cls.__doc__ = getattr(sys.modules.get(cls.__module__), "__doc__", None)

    def __init__(self, opts: Any = None, **values: Any):
        if opts is not None and values:
            raise OptionError(f"{self.name}: give an options object or keyword options, not both")
        self.opts = opts if opts is not None else make_options(type(self), values)

    def run(self, g: ir.Graph, ctx: Context) -> PassResult:  # pragma: no cover - abstract
        raise NotImplementedError(f"pass {self.name} has no run()")

    def unmet(self, g: ir.Graph, ran: Sequence[tuple[Pass, PassResult]] = ()) -> str | None:
        """The first unmet precondition as a message, or None; ``ran``: the passes run before this one."""
        for req in self.requires:
            problem = req(g)
            if problem:
                text = req.hint_for(self.name, ran)
                hint = f"; {text}" if text else ""
                return f"requires {req.name}: {problem}{hint}"
        return None

    def label(self) -> str:
        """The pass as it would be written on the command line, with its non-default options."""
        changed = []
        for f in dataclasses.fields(self.opts):
            value = getattr(self.opts, f.name)
            default = (f.default if f.default is not dataclasses.MISSING
                       else f.default_factory())  # type: ignore[misc]
            if value != default:
                changed.append(f"{f.name}={_fmt_default(value)}")
        return self.name + (":" + ",".join(changed) if changed else "")

    def __repr__(self) -> str:
        return f"<Pass {self.label()}>"


# ----------------------------------------------------------------------------- -p syntax

_TOKEN = re.compile(r"^[A-Za-z_][A-Za-z0-9_\-]*$")


def parse_pipeline(spec: str | Sequence[str]) -> list[tuple[str, dict[str, str]]]:
    """``"fold,quant:bits=4,granularity=channel"`` -> [("fold", {}), ("quant", {"bits": "4", ...})].

    A comma-separated token that holds ``=`` but no ``:`` continues the previous pass's options.
    A list of strings is taken as one token list (each may itself hold commas).
    """
    text = ",".join(spec) if not isinstance(spec, str) else spec
    steps: list[tuple[str, dict[str, str]]] = []
    for token in (t.strip() for t in text.split(",")):
        if not token:
            raise OptionError(f"empty pass name in pipeline '{text}'")
        if ":" in token and not ("=" in token and token.index("=") < token.index(":")):
            name, _, first = token.partition(":")
            name = name.strip()
            _check_pass_name(name, text)
            steps.append((name, {}))
            if first.strip():
                _add_option(steps, first, text)
        elif "=" in token:
            if not steps:
                raise OptionError(f"option '{token}' comes before any pass in '{text}'")
            _add_option(steps, token, text)
        else:
            _check_pass_name(token, text)
            steps.append((token, {}))
    if not steps:
        raise OptionError("the pipeline is empty: give passes with -p, e.g. -p fold,cleanup")
    return steps


def _check_pass_name(name: str, text: str) -> None:
    if not _TOKEN.match(name):
        raise OptionError(f"bad pass name '{name}' in pipeline '{text}'")


def _add_option(steps: list, token: str, text: str) -> None:
    key, eq, value = token.partition("=")
    key = key.strip()
    if not eq or not key:
        raise OptionError(f"option '{token}' of pass '{steps[-1][0]}' must be key=value")
    if key in steps[-1][1]:
        raise OptionError(f"option '{key}' given twice for pass '{steps[-1][0]}'")
    steps[-1][1][key] = value.strip()


# ----------------------------------------------------------------------------- manager

class Instrument:
    """Observes a pipeline run. Raising a QGraphError from ``after`` fails the pass."""

    def start(self, g: ir.Graph, model: onnx.ModelProto, ctx: Context) -> None: ...
    def after(self, index: int, p: Pass, g: ir.Graph, model: onnx.ModelProto, result: PassResult,
              seconds: float, ctx: Context) -> None: ...


class PassManager:
    """Runs passes in the order given (never reordered), checking the model after each one."""

    def __init__(self, passes: Iterable[Pass], instruments: Iterable[Instrument] = ()):
        self.passes = list(passes)
        self.instruments = list(instruments)
        self.results: list[tuple[Pass, PassResult]] = []
        self.model: onnx.ModelProto | None = None  # the graph as last exported (after the last pass)

    def run(self, g: ir.Graph, ctx: Context | None = None) -> ir.Graph:
        """Run the passes over ``g`` in place. ``self.model`` is the graph as exported after the last
        pass; for a model over ``ir.EXTERNAL_DATA_THRESHOLD`` it is light (``ir.is_light``: weights
        stay in the graph, never copied into a ModelProto), and instruments use the graph for what
        needs the weights.

        A pass that raises ModelError (bad calibration data, a model it cannot handle) fails with a
        PassInputError, which is a ModelError too; anything else becomes a PassError.
        """
        ctx = ctx or Context()
        try:
            return self._run(g, ctx)
        except BaseException:
            ctx.release()       # a failed run leaves no temporary file behind
            raise

    def _run(self, g: ir.Graph, ctx: Context) -> ir.Graph:
        model = _export(g)
        source = ir.meta_of(g).get("source")
        if ctx.original is None:
            ctx.original = ir.to_model(g, light=True) if source and not ir.is_light(model) else model
        for inst in self.instruments:
            inst.start(g, model, ctx)
        done: list[str] = []
        ran: list[tuple[Pass, PassResult]] = []
        for index, p in enumerate(self.passes, start=1):
            problem = p.unmet(g, ran)
            if problem:
                raise PassError(p.name, done, problem)
            t0 = time.perf_counter()
            try:
                result = p.run(g, ctx)
                if not isinstance(result, PassResult):
                    raise TypeError(f"run() returned {type(result).__name__}, not PassResult")
                if not p.handles_subgraphs:
                    untouched = len(list(g.subgraphs()))
                    if untouched:
                        result.notes["untouched_subgraphs"] = untouched
                g.cleanup().toposort()
                model = _export(g)
                _check(model)
            except PassError:
                raise
            except ModelError as exc:
                raise PassInputError(p.name, done, str(exc)) from exc
            except OrtLoadError as exc:
                if _runtime_refuses(source if source and ir.is_light(ctx.original) else ctx.original):
                    raise PassInputError(p.name, done, f"{exc} (and it refuses the input model too)") from exc
                raise PassError(p.name, done, str(exc)) from exc
            except QGraphError as exc:
                raise PassError(p.name, done, str(exc)) from exc
            except Exception as exc:
                raise PassError(p.name, done, f"{type(exc).__name__}: {ir.first_line(exc)}") from exc
            seconds = time.perf_counter() - t0
            self.results.append((p, result))
            ran.append((p, result))
            for inst in self.instruments:
                try:
                    inst.after(index, p, g, model, result, seconds, ctx)
                except PassError:
                    raise
                except ModelError as exc:
                    raise PassInputError(p.name, done, str(exc)) from exc
                except QGraphError as exc:
                    raise PassError(p.name, done, str(exc)) from exc
            done.append(p.name)
            if index < len(self.passes):
                model = None    # the next pass works on the graph: no second copy of the weights meanwhile
        self.model = model
        return g


def _runtime_refuses(original: onnx.ModelProto | str | None) -> bool:
    """Whether ONNX Runtime refuses to load the input model itself (a ModelProto, or the file it was
    loaded from): then a pass that needed ORT (to calibrate, to measure) failed because of its input,
    not of what it or an earlier pass did."""
    if original is None or (isinstance(original, onnx.ModelProto) and ir.is_light(original)):
        return False
    try:
        ort_session(original)
    except OrtLoadError:
        return True
    return False


def _export(g: ir.Graph) -> onnx.ModelProto:
    """The graph as a ModelProto; light (weights left in the graph) when it is over 2 GB."""
    return ir.to_model(g, light=ir.is_large(g))


def _check(model: onnx.ModelProto) -> None:
    try:
        ir.check(model)
    except onnx.checker.ValidationError as exc:
        raise QGraphError(f"the rewritten model fails onnx.checker: {ir.first_line(exc)}") from None
