"""Per-layer quantization sensitivity, measured incrementally.

The question (HAWQ, Dong et al. 2019 §3; "Data-free/post-training mixed precision", e.g. Cai et al.
2020 ZeroQ §3.3): how much does the model's output degrade when *only* site i is quantized with
candidate c (weights at 8/6/4 bits, or an activation at 8/16 bits)?

    Ω_i(c) = E ||y - y_i,c||² / E ||y||²        (relative output noise power; SQNR_i(c) = -10 log10 Ω_i(c))

or the KL divergence KL(softmax(y) || softmax(y_i,c)) averaged over samples, or a user callable. Under the
usual additivity assumption (the quantization noises of different sites are small and uncorrelated, so
their contributions to the output noise power add — ZeroQ §3.3, HAWQ-V2 §3), Σ_i Ω_i(c_i) predicts the
noise of the mixed configuration; ``qgraph.allocate`` minimizes that sum under a size budget.

Incremental: ONE float pass over the samples stores every tensor some suffix needs (per batch, as .npy
files in a spill directory: memory stays one batch); then per site the *suffix* of the graph below the
perturbed tensors becomes its own small model whose inputs are the cached tensors, and each candidate is
one run of that suffix with the perturbed tensor fed in (a weight becomes a graph input). No candidate
ever re-runs the part of the model above its site. Sites are independent jobs: serial, a local process
pool (default), or a Dask cluster (``dask://HOST:PORT``; the spill directory must then be visible to the
workers, e.g. the same machine or a shared filesystem).
"""
from __future__ import annotations

import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import onnx

from qgraph import ir
from qgraph.errors import ModelError, OptionError
from qgraph.ops import QParams, fake_quant
from qgraph.qparams import make_qparams, sqnr_db, weight_qparams

#: candidate name -> (site kind, bits)
CANDIDATES = {"w8": ("weight", 8), "w6": ("weight", 6), "w5": ("weight", 5), "w4": ("weight", 4),
              "w3": ("weight", 3), "w2": ("weight", 2), "a8": ("act", 8), "a16": ("act", 16)}
PROXIES = ("sqnr", "kl")


@dataclass
class Site:
    """One thing that can be quantized on its own.

    key      -- the name a decision uses: the layer node's name (weight sites) or the tensor name (act)
    kind     -- "weight" or "act"
    tensors  -- the tensors perturbed: the weight constant, or the activation tensors sharing one scale
    op       -- the layer's op type (weights) or the producer's (acts)
    params   -- weight elements (0 for activations)
    axis     -- the per-channel axis of a weight (None: per tensor)
    """
    key: str
    kind: str
    tensors: tuple[str, ...]
    op: str = ""
    params: int = 0
    axis: int | None = None


@dataclass
class SensitivityTable:
    """Ω (relative output noise power), SQNR and KL per (site, candidate), measured one site at a time."""
    proxy: str
    samples: int
    sites: list[Site]
    noise: dict[tuple[str, str], float] = field(default_factory=dict)     # (site key, cand) -> Ω
    kl: dict[tuple[str, str], float] = field(default_factory=dict)
    metric: dict[tuple[str, str], float] = field(default_factory=dict)
    fingerprint: str = ""
    cached_bytes: int = 0
    cached_tensors: int = 0
    seconds: dict[str, float] = field(default_factory=dict)
    executor: str = "serial"
    pinned: list[str] = field(default_factory=list)    # layers kept at 8 bits by the allocator

    def site(self, key: str) -> Site:
        return next(s for s in self.sites if s.key == key)

    def candidates(self, kind: str | None = None) -> list[str]:
        seen = dict.fromkeys(c for _, c in self.noise)
        return [c for c in seen if kind is None or CANDIDATES[c][0] == kind]

    def error(self, key: str, cand: str) -> float:
        """What the allocator minimizes: Ω (sqnr), the mean KL (kl), or the user metric's error."""
        table = {"sqnr": self.noise, "kl": self.kl, "metric": self.metric}[self.proxy]
        return float(table[(key, cand)])

    def sqnr(self, key: str, cand: str) -> float:
        return sqnr_db(1.0, self.noise[(key, cand)])

    def to_dict(self) -> dict:
        rows = []
        for s in self.sites:
            row = {"site": s.key, "kind": s.kind, "op": s.op, "params": s.params, "tensors": list(s.tensors)}
            for c in self.candidates():
                if (s.key, c) in self.noise:
                    row[c] = {"sqnr_db": _round(self.sqnr(s.key, c)), "noise": self.noise[(s.key, c)]}
                    if (s.key, c) in self.kl:
                        row[c]["kl"] = self.kl[(s.key, c)]
                    if (s.key, c) in self.metric:
                        row[c]["metric_error"] = self.metric[(s.key, c)]
            rows.append(row)
        return {"proxy": self.proxy, "samples": self.samples, "cached_tensors": self.cached_tensors,
                "cached_bytes": self.cached_bytes, "seconds": self.seconds, "executor": self.executor,
                "sites": rows}

    def format(self, limit: int | None = None) -> str:
        """The table, most sensitive first (by the worst candidate's SQNR), output SQNR in dB per cell."""
        cands = self.candidates()
        order = sorted(self.sites, key=lambda s: min((self.sqnr(s.key, c) for c in cands
                                                      if (s.key, c) in self.noise), default=np.inf))
        if limit:
            order = order[:limit]
        width = max([len(s.key) for s in order] + [4])
        head = f"{'site'.ljust(width)}  {'op':<18} {'params':>9}  " + "  ".join(f"{c:>7}" for c in cands)
        lines = [f"output SQNR (dB) with only that site quantized; {self.samples} samples", head]
        for s in order:
            cells = [f"{self.sqnr(s.key, c):7.1f}" if (s.key, c) in self.noise else "      -" for c in cands]
            lines.append(f"{s.key.ljust(width)}  {s.op[:18]:<18} {s.params:>9}  " + "  ".join(cells))
        return "\n".join(lines)


def _round(v: float) -> float | None:
    return round(v, 3) if np.isfinite(v) else None


# ----------------------------------------------------------------------------- graph slicing

def _node_io(model: onnx.ModelProto):
    producer, readers = {}, {}
    for i, n in enumerate(model.graph.node):
        for o in n.output:
            if o:
                producer[o] = i
        for x in n.input:
            if x:
                readers.setdefault(x, []).append(i)
    return producer, readers


def suffix_nodes(model: onnx.ModelProto, tensors: Sequence[str]) -> list[int]:
    """Indices (graph order) of the nodes downstream of ``tensors``: those whose output can change."""
    producer, readers = _node_io(model)
    nodes = model.graph.node
    todo = [i for t in tensors for i in readers.get(t, [])]
    seen: set[int] = set()
    while todo:
        i = todo.pop()
        if i in seen:
            continue
        seen.add(i)
        for o in nodes[i].output:
            todo.extend(readers.get(o, []))
    return sorted(seen)


def suffix_model(model: onnx.ModelProto, site: Site) -> tuple[onnx.ModelProto, list[str], list[str]]:
    """The subgraph below ``site`` as a model: (model, its cached inputs, its outputs).

    Inputs are every tensor the suffix reads that it does not compute (cached from the float pass) and,
    for a weight site, the weight itself (fed quantized); initializers the suffix reads stay."""
    g = model.graph
    idx = suffix_nodes(model, site.tensors)
    graph_outputs = [o.name for o in g.output]
    passthrough = [t for t in site.tensors if t in graph_outputs]   # a quantized output: Identity(fed) -> output
    if not idx and not passthrough:
        raise ModelError(f"site '{site.key}': nothing reads {', '.join(site.tensors)}")
    inits = {t.name: t for t in g.initializer}
    produced = {o for i in idx for o in g.node[i].output if o}
    perturbed = set(site.tensors)
    needed: list[str] = []
    for i in idx:
        for x in g.node[i].input:
            if x and x not in produced and x not in needed and (x not in inits or x in perturbed):
                needed.append(x)
    types = _elem_types(model)
    extra = [onnx.helper.make_node("Identity", [t + FED], [t]) for t in passthrough]
    needed += [t + FED for t in passthrough]
    types.update({t + FED: types.get(t, onnx.TensorProto.FLOAT) for t in passthrough})
    produced |= set(passthrough)
    outs = [o for o in graph_outputs if o in produced]
    sub = onnx.helper.make_graph(
        extra + [g.node[i] for i in idx], f"suffix_{site.key}",
        [onnx.helper.make_tensor_value_info(x, types.get(x, onnx.TensorProto.FLOAT), None) for x in needed],
        [onnx.helper.make_tensor_value_info(o, types.get(o, onnx.TensorProto.FLOAT), None) for o in outs],
        [inits[x] for x in dict.fromkeys(x for i in idx for x in g.node[i].input) if x in inits and x not in perturbed])
    m = onnx.helper.make_model(sub, opset_imports=model.opset_import, ir_version=model.ir_version)
    cached = [x.removesuffix(FED) for x in needed if x not in perturbed or site.kind == "act"]
    return m, cached, outs


#: the input name under which a quantized graph output is fed to its suffix
FED = "__fed"


def _elem_types(model: onnx.ModelProto) -> dict[str, int]:
    out = {}
    for vi in list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output):
        if vi.type.tensor_type.elem_type:
            out[vi.name] = vi.type.tensor_type.elem_type
    return out


# ----------------------------------------------------------------------------- the float pass (cache)

class ActivationCache:
    """Per batch, the float values of the tensors the suffixes need, spilled to ``folder/b<i>/<k>.npy``."""

    def __init__(self, folder: str, names: list[str], batches: int, nbytes: int, samples: int):
        self.folder, self.names, self.batches, self.nbytes, self.samples = folder, names, batches, nbytes, samples
        self.index = {n: k for k, n in enumerate(names)}

    def load(self, b: int, name: str) -> np.ndarray:
        return np.load(os.path.join(self.folder, f"b{b}", f"{self.index[name]}.npy"), mmap_mode="r")

    def ranges(self, name: str) -> tuple[float, float]:
        """min/max over the cached batches, without mask values (|x| >= calibrate.SENTINEL, inf, nan), as
        ``quant``'s calibration: Q saturates those to the range's end."""
        from qgraph.calibrate import SENTINEL
        lo, hi = np.inf, -np.inf
        for b in range(self.batches):
            v = np.asarray(self.load(b, name)).reshape(-1)
            v = v[np.abs(v) < SENTINEL]
            if v.size:
                lo, hi = min(lo, float(v.min())), max(hi, float(v.max()))
        return (lo, hi) if lo <= hi else (0.0, 0.0)


def fill_cache(model: onnx.ModelProto, names: list[str], samples, folder: str, *, batch_size: int,
               progress: bool = False) -> ActivationCache:
    """One ORT session over ``samples``: every tensor of ``names`` of every batch to ``folder``."""
    from qgraph.calibrate import batch_size_for, stream
    names = list(dict.fromkeys(names))
    batch_size = batch_size_for(model, batch_size)
    inputs = {i.name for i in model.graph.input}
    computed = [n for n in names if n not in inputs]
    nbytes, batches = 0, 0
    for b, values in enumerate(_with_inputs(stream(model, computed, samples, batch_size=batch_size,
                                                   progress=progress, desc="sensitivity: float pass"),
                                            samples, batch_size, [n for n in names if n in inputs])):
        os.makedirs(os.path.join(folder, f"b{b}"), exist_ok=True)
        for k, n in enumerate(names):
            v = np.ascontiguousarray(values[n])
            np.save(os.path.join(folder, f"b{b}", f"{k}.npy"), v)
            nbytes += v.nbytes
        batches = b + 1
    return ActivationCache(folder, names, batches, nbytes, len(samples))


def _with_inputs(stream_it, samples, batch_size: int, input_names: list[str]):
    """The stream's batches with the graph inputs among the cached names added (same batching)."""
    if not input_names:
        yield from stream_it
        return
    for values, feed in zip(stream_it, samples.batches(batch_size)):
        values.update({n: feed[n] for n in input_names})
        yield values


# ----------------------------------------------------------------------------- the per-site job

@dataclass
class Job:
    """Everything one worker needs to measure one site (small and picklable: runs in a process or on
    Dask). The worker cuts the suffix out of the float model saved beside the cache."""
    site: Site
    model_path: str                 # the whole float model (the worker slices it)
    all_outputs: list[str]          # every graph output (signal power is over all of them)
    cache: ActivationCache
    candidates: list[str]
    act_range: tuple[float, float] | None = None
    weight_method: str = "minmax"
    act_symmetric: bool = False
    metric: Callable | None = None
    threads: int = 1


_MODELS: dict[str, onnx.ModelProto] = {}    # per worker process: the float model, loaded once


def _model(path: str) -> onnx.ModelProto:
    if path not in _MODELS:
        _MODELS.clear()
        _MODELS[path] = onnx.load(path)
    return _MODELS[path]


def perturbation(job: Job, cand: str, weight: np.ndarray | None) -> dict[str, np.ndarray] | QParams:
    """The weight fed for a weight candidate, or the QParams every site tensor is fake-quantized with."""
    kind, bits = CANDIDATES[cand]
    if kind == "weight":
        method = job.weight_method if job.site.axis is None else "minmax"
        qp = weight_qparams(weight, bits=bits, storage="int8", symmetric=True, axis=job.site.axis,
                            method=method)
        return {job.site.tensors[0]: fake_quant(weight.astype(np.float32), qp)}
    lo, hi = job.act_range
    return make_qparams(lo, hi, bits=bits, storage="int16" if bits == 16 else "int8",
                        symmetric=job.act_symmetric)


def measure_job(job: Job) -> dict:
    """Per candidate: signal and noise power summed over the cached batches (+ KL, + metric error), and
    the CPU seconds this job took (``cpu_seconds``)."""
    from qgraph.ops import ort_session
    t0 = time.process_time()
    full = _model(job.model_path)
    sub, _, outputs = suffix_model(full, job.site)
    weight = None
    if job.site.kind == "weight":
        weight = onnx.numpy_helper.to_array(next(t for t in full.graph.initializer if t.name == job.site.tensors[0]))
    sess = ort_session(sub, threads=job.threads)
    del sub
    feeds_names = [i.name for i in sess.get_inputs()]
    out: dict[str, dict[str, float]] = {}
    for cand in job.candidates:
        if CANDIDATES[cand][0] != job.site.kind:
            continue
        pert = perturbation(job, cand, weight)
        acc = {"signal": 0.0, "noise": 0.0, "kl": 0.0, "kl_rows": 0, "metric": 0.0, "n": 0}
        for b in range(job.cache.batches):
            feed = {}
            for name in feeds_names:
                if isinstance(pert, dict) and name in pert:
                    feed[name] = pert[name]
                    continue
                v = np.asarray(job.cache.load(b, name.removesuffix(FED)))
                if not isinstance(pert, dict) and name.removesuffix(FED) in job.site.tensors:
                    with np.errstate(over="ignore"):     # mask values (-3.4e38): saturate to qmin, as Q does
                        v = fake_quant(v.astype(np.float32), pert)
                feed[name] = v
            ys = dict(zip(outputs, sess.run(outputs, feed)))
            ref = {o: np.asarray(job.cache.load(b, o)) for o in job.all_outputs}
            _accumulate(acc, ref, ys)
            if job.metric is not None:
                n = len(next(iter(ref.values())))
                acc["metric"] += float(job.metric(ref, {**ref, **ys})) * n
        out[cand] = acc
    return {"candidates": out, "cpu_seconds": time.process_time() - t0}


def _accumulate(acc: dict, ref: dict, ys: dict) -> None:
    n = 0
    for o, r in ref.items():
        r64 = r.astype(np.float64)
        acc["signal"] += float(np.vdot(r64, r64))
        n = max(n, r.shape[0] if r.ndim else 1)
        if o in ys:
            d = ys[o].astype(np.float64) - r64
            acc["noise"] += float(np.vdot(d, d))
            if r.ndim >= 2 and r.shape[-1] > 1:
                acc["kl"] += float(np.sum(_kl(r64, ys[o].astype(np.float64))))
                acc["kl_rows"] += r.size // r.shape[-1]
    acc["n"] += n


def _kl(p_logits: np.ndarray, q_logits: np.ndarray) -> np.ndarray:
    """KL(softmax(p) || softmax(q)) over the last axis."""
    lp = p_logits - p_logits.max(-1, keepdims=True)
    lp = lp - np.log(np.exp(lp).sum(-1, keepdims=True))
    lq = q_logits - q_logits.max(-1, keepdims=True)
    lq = lq - np.log(np.exp(lq).sum(-1, keepdims=True))
    return (np.exp(lp) * (lp - lq)).sum(-1)


# ----------------------------------------------------------------------------- executors

def run_jobs(jobs: list[Job], executor: str, workers: int, progress: bool = False) -> list[dict]:
    """``measure_job`` over ``jobs``: serial, a local process pool, or a Dask cluster (dask://HOST:PORT)."""
    if executor == "serial" or (executor == "process" and (workers <= 1 or len(jobs) <= 1)):
        bar = _bar(len(jobs), progress)
        out = []
        for j in jobs:
            out.append(measure_job(j))
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        return out
    if executor == "process":
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor
        bar = _bar(len(jobs), progress)
        with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = [pool.submit(measure_job, j) for j in jobs]
            out = []
            for f in futures:
                out.append(f.result())
                if bar is not None:
                    bar.update(1)
        if bar is not None:
            bar.close()
        return out
    if executor.startswith("dask://"):
        return _run_dask(jobs, executor[len("dask://"):])
    raise OptionError(f"unknown executor '{executor}': serial, process or dask://HOST:PORT")


def _run_dask(jobs: list[Job], address: str) -> list[dict]:
    try:
        from distributed import Client
    except ImportError:
        raise OptionError("--executor dask://... needs the 'distributed' package: pip install qgraph[dask]") from None
    if "://" not in address:
        address = "tcp://" + address
    try:
        client = Client(address, timeout=10)
    except OSError as exc:
        raise ModelError(f"cannot reach the Dask scheduler at {address}: {ir.first_line(exc)}") from None
    try:
        futures = client.map(measure_job, jobs, pure=False)
        return client.gather(futures)
    finally:
        client.close()


def _bar(total: int, progress: bool):
    if not progress:
        return None
    from qgraph.calibrate import progress_bar
    return progress_bar(total, "sensitivity", unit="site")


# ----------------------------------------------------------------------------- entry

def measure(model: onnx.ModelProto, sites: list[Site], samples, *,
            candidates: Sequence[str] = ("w8", "w6", "w4", "a8", "a16"),
            per_site: dict[str, Sequence[str]] | None = None,
            proxy: str = "sqnr", metric: Callable | None = None, batch_size: int = 8,
            executor: str = "process", workers: int = 2, cache_dir: str | None = None,
            weight_method: str = "mse", act_symmetric: bool = False, progress: bool = False) -> SensitivityTable:
    """The sensitivity table of ``sites`` of the float ``model`` over ``samples`` (see the module doc).

    ``per_site`` overrides ``candidates`` for some sites (``--explain-quant`` measures only the bits
    chosen); ``metric(reference_outputs, outputs) -> error`` (lower is better) is averaged per sample.
    """
    if proxy not in PROXIES + ("metric",):
        raise OptionError(f"unknown proxy '{proxy}': one of {', '.join(PROXIES)} (or a metric callable)")
    if proxy == "metric" and metric is None:
        raise OptionError("proxy 'metric' needs a metric callable (Python API)")
    unknown = [c for c in candidates if c not in CANDIDATES]
    if unknown:
        raise OptionError(f"unknown candidate(s) {', '.join(unknown)}; known: {', '.join(CANDIDATES)}")
    from qgraph.calibrate import fingerprint
    t0 = time.perf_counter()
    c0 = time.process_time()
    need_of = {}
    for s in sites:
        _, cached, _ = suffix_model(model, s)
        need_of[s.key] = cached
    outputs = [o.name for o in model.graph.output]
    need = list(dict.fromkeys([x for cached in need_of.values() for x in cached] + outputs))
    own_dir = cache_dir is None
    folder = tempfile.mkdtemp(prefix="qgraph-sens-") if own_dir else tempfile.mkdtemp(prefix="sens-", dir=cache_dir)
    try:
        model_path = os.path.join(folder, "model.onnx")
        ir.save(model, model_path)
        cache = fill_cache(model, need, samples, folder, batch_size=batch_size, progress=progress)
        t1 = time.perf_counter()
        parent_cpu = time.process_time() - c0
        jobs = []
        for s in sites:
            rng = None
            if s.kind == "act":
                lo_hi = [cache.ranges(t) for t in s.tensors if t in cache.index]
                rng = (min(r[0] for r in lo_hi), max(r[1] for r in lo_hi))
            cands = list(per_site.get(s.key, candidates)) if per_site else list(candidates)
            jobs.append(Job(site=s, model_path=model_path, all_outputs=outputs, cache=cache, candidates=cands,
                            act_range=rng, weight_method=weight_method, act_symmetric=act_symmetric, metric=metric))
        size = {s.key: len(suffix_nodes(model, s.tensors)) for s in sites}
        order = sorted(range(len(jobs)), key=lambda i: -size[jobs[i].site.key])   # longest first: balance
        results = run_jobs([jobs[i] for i in order], executor, workers, progress)
        table = SensitivityTable(proxy=proxy, samples=len(samples), sites=list(sites),
                                 fingerprint=fingerprint(model), cached_bytes=cache.nbytes,
                                 cached_tensors=len(need), executor=executor)
        worker_cpu = 0.0
        for i, res in zip(order, results):
            key = jobs[i].site.key
            worker_cpu += res["cpu_seconds"]
            for cand, acc in res["candidates"].items():
                table.noise[(key, cand)] = acc["noise"] / acc["signal"] if acc["signal"] > 0 else float("inf")
                table.kl[(key, cand)] = acc["kl"] / max(acc["kl_rows"], 1)
                if metric is not None:
                    table.metric[(key, cand)] = acc["metric"] / max(acc["n"], 1)
        table.seconds = {"float_pass": round(t1 - t0, 3), "sites": round(time.perf_counter() - t1, 3),
                         "cpu_float_pass": round(parent_cpu, 2), "cpu_sites": round(worker_cpu, 2)}
        return table
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def plot_heatmap(table: SensitivityTable, path: str | os.PathLike, limit: int = 80) -> str:
    """A PNG heat map: sites (rows, graph order) x candidates (columns), output SQNR in dB."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise OptionError("the heat map needs matplotlib: pip install qgraph[plots]") from None
    cands = table.candidates()
    sites = table.sites[:limit] if limit else table.sites
    data = np.array([[table.sqnr(s.key, c) if (s.key, c) in table.noise else np.nan for c in cands] for s in sites])
    data = np.where(np.isfinite(data), data, np.nan)
    fig, ax = plt.subplots(figsize=(1.2 + 0.8 * len(cands), 1.0 + 0.18 * len(sites)))
    im = ax.imshow(data, aspect="auto", cmap="viridis")
    ax.set_xticks(range(len(cands)), cands)
    ax.set_yticks(range(len(sites)), [s.key[:40] for s in sites], fontsize=6)
    ax.set_title(f"output SQNR (dB), one site quantized ({table.samples} samples)", fontsize=8)
    fig.colorbar(im, ax=ax, label="dB")
    fig.tight_layout()
    tmp = str(path) + ".tmp.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return str(path)


__all__ = ["CANDIDATES", "Site", "SensitivityTable", "measure", "suffix_model", "suffix_nodes", "plot_heatmap",
           "measure_job", "Job"]
