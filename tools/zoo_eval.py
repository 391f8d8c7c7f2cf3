"""Evaluating any ONNX file (FP32 or quantized) on a zoo model's data with ONNX Runtime.

Metrics, by the manifest's ``metric``:
    top1 / top5      classification accuracy against the dataset's labels
    cosine           mean cosine similarity of each output embedding to the FP32 zoo model's
                     embedding of the same input (min reported too)
    max_output_diff  structure-only models: no labels, only the output difference
Whenever the evaluated file is not the zoo model itself, the FP32 zoo model runs on the same
batches and ``max_output_diff`` (max |y - y_fp32| over every output element) is reported as well.
"""
from __future__ import annotations

import os
import time
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from qgraph.data import Samples, random_samples
from zoo_data import RANDOM_EVALUATION, open_zoo_dataset, zoo_split
from zoo_manifest import model_entry, model_path


def threads() -> int:
    """Intra-op threads for ORT: ``$QGRAPH_THREADS``, default 2 (the machine is shared)."""
    return int(os.environ.get("QGRAPH_THREADS", "2"))


def session(path: str | os.PathLike) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads()
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    from qgraph.container import is_qgz, read
    if is_qgz(path):                    # a .qgz: unpacked in memory, what qgraph-unpack would write
        return ort.InferenceSession(read(path).SerializeToString(), so, providers=["CPUExecutionProvider"])
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def fixed_batch(sess: ort.InferenceSession) -> int | None:
    """The batch size a model insists on (a concrete leading dim), or None if dynamic."""
    dims = [i.shape[0] for i in sess.get_inputs() if i.shape]
    fixed = {d for d in dims if isinstance(d, int) and d > 0}
    return fixed.pop() if fixed else None


def samples_for(name: str, split: str = "eval") -> Samples:
    """The zoo model's data: ``eval`` (the evaluation split), ``calib`` or ``all``."""
    entry = model_entry(name)
    if split == "all":
        if entry["dataset"] == "random":
            shapes = {i["name"]: i["shape"] for i in entry["inputs"]}
            return random_samples(shapes, RANDOM_EVALUATION, seed=1)
        return open_zoo_dataset(entry["dataset"], preset=entry["preset"],
                                input_names=[i["name"] for i in entry["inputs"]])
    calib, evaluation = zoo_split(name)
    return {"eval": evaluation, "calib": calib}[split]


def evaluate(model: str | os.PathLike, name: str, *, split: str = "eval", limit: int | None = None,
             batch_size: int = 32, reference: str | os.PathLike | None | bool = True,
             progress: bool = True, samples: Samples | None = None) -> dict:
    """Run ``model`` over zoo model ``name``'s data; a dict of figures (see the module docstring).

    ``reference``: True for the FP32 zoo model (skipped when ``model`` is that file), a path for
    another reference, False/None for none.
    """
    entry = model_entry(name)
    metric = entry["metric"]
    samples = samples if samples is not None else samples_for(name, split)
    if limit is not None:
        samples = samples.subset(range(min(limit, len(samples))))
    sess = session(model)
    ref_path = None
    if reference is True:
        ref_path = model_path(name, entry)
        if not ref_path.exists() or Path(model).resolve() == ref_path.resolve():
            ref_path = None             # the FP32 model itself, or not built: no comparison
    elif reference:
        ref_path = Path(reference)
    ref = session(ref_path) if ref_path is not None else None
    if metric in ("top1", "top5") and samples.labels is None:
        raise ValueError(f"zoo model '{name}': its {split} data has no labels for {metric}")
    bs = fixed_batch(sess) or batch_size
    feeds = {i.name for i in sess.get_inputs()}
    labels = samples.labels
    top1 = top5 = 0
    cos_sum, cos_min = 0.0, 1.0
    max_diff = 0.0
    n = 0
    t0 = time.perf_counter()
    bar = _bar(len(samples), f"eval {Path(model).name}", progress)
    for feed in samples.batches(bs):
        feed = {k: v for k, v in feed.items() if k in feeds}
        outs = sess.run(None, feed)
        m = len(next(iter(feed.values())))
        ref_outs = ref.run(None, feed) if ref is not None else None
        if ref_outs is not None:
            for a, b in zip(outs, ref_outs):
                if a.size:
                    max_diff = max(max_diff, float(np.max(np.abs(a.astype(np.float64) - b))))
        if metric in ("top1", "top5"):
            logits = outs[0].reshape(m, -1)
            y = labels[n:n + m]
            top1 += int((logits.argmax(1) == y).sum())
            k5 = np.argpartition(-logits, 4, axis=1)[:, :5] if logits.shape[1] > 5 else np.tile(
                np.arange(logits.shape[1]), (m, 1))
            top5 += int((k5 == y[:, None]).any(1).sum())
        elif metric == "cosine":
            e = outs[0].reshape(m, -1).astype(np.float64)
            r = (ref_outs[0] if ref_outs is not None else outs[0]).reshape(m, -1).astype(np.float64)
            c = (e * r).sum(1) / (np.linalg.norm(e, axis=1) * np.linalg.norm(r, axis=1) + 1e-30)
            cos_sum += float(c.sum())
            cos_min = min(cos_min, float(c.min()))
        n += m
        bar.update(m)
    bar.close()
    res: dict = {"model": str(model), "zoo": name, "split": split, "n": n, "metric": metric}
    if metric in ("top1", "top5"):
        res.update(top1=top1 / n, top5=top5 / n, value=(top1 if metric == "top1" else top5) / n)
    elif metric == "cosine":
        res.update(cosine=cos_sum / n, cosine_min=cos_min, value=cos_sum / n)
    if ref is not None:
        res["max_output_diff"] = max_diff
        res["reference"] = str(ref_path)
        if metric == "max_output_diff":
            res["value"] = max_diff
    elif metric == "max_output_diff":
        res["value"] = 0.0
    res["size_bytes"] = file_size(model)
    res["seconds"] = round(time.perf_counter() - t0, 2)
    return res


def file_size(path: str | os.PathLike) -> int:
    """Bytes on disk, external data included."""
    p = Path(path)
    size = p.stat().st_size
    if p.suffix == ".onnx":
        m = onnx.load(str(p), load_external_data=False)
        ext = {e.value for t in m.graph.initializer for e in t.external_data if e.key == "location"}
        size += sum((p.parent / f).stat().st_size for f in ext)
    return size


class _NoBar:
    def update(self, n: int) -> None: ...
    def close(self) -> None: ...


def _bar(total: int, desc: str, progress: bool):
    if not progress:
        return _NoBar()
    try:
        from tqdm import tqdm
    except ImportError:
        return _NoBar()
    return tqdm(total=total, desc=desc, unit="sample", leave=False, dynamic_ncols=True)


def format_result(r: dict) -> str:
    parts = [f"{r['zoo']} [{r['split']}, n={r['n']}]"]
    if "top1" in r:
        parts.append(f"top-1 {100 * r['top1']:.2f}%  top-5 {100 * r['top5']:.2f}%")
    if "cosine" in r:
        parts.append(f"cosine {r['cosine']:.6f} (min {r['cosine_min']:.6f})")
    if "max_output_diff" in r:
        parts.append(f"max |y - y_fp32| {r['max_output_diff']:.3g}")
    parts.append(f"{r['size_bytes']:,} B  {r['seconds']:.1f} s")
    return "  ".join(parts)


# ----------------------------------------------------------------------------- pipelines

def pipeline_slug(pipeline: str) -> str:
    return pipeline.replace(",", "+").replace(":", "_").replace("=", "-")


def pipeline_passes(pipeline: str) -> list:
    """The Pass objects of ``pipeline`` (qgraph's registry)."""
    from qgraph.passes import build_passes
    return build_passes(pipeline)


def run_pipeline(name: str, pipeline: str, *, progress: bool = False) -> dict:
    """``qgraph.optimize`` the zoo model with ``pipeline`` (calibration split as --calib), then
    evaluate the result on the evaluation split against the FP32 model. A pipeline ending in
    ``huffman`` writes (and is measured as) a .qgz."""
    import qgraph
    from zoo_manifest import zoo_cache
    entry = model_entry(name)
    src = model_path(name, entry)
    passes = pipeline_passes(pipeline)
    suffix = ".qgz" if passes[-1].name == "huffman" else ".onnx"
    out = zoo_cache() / "pipelines" / f"{name}.{pipeline_slug(pipeline)}{suffix}"
    out.parent.mkdir(parents=True, exist_ok=True)
    calib, evaluation = zoo_split(name)
    t0 = time.perf_counter()
    model, report = qgraph.optimize(src, passes, calib=calib, output=out, progress=progress)
    seconds = time.perf_counter() - t0
    r = evaluate(out, name, samples=evaluation, progress=progress)
    ops = Counter(n.op_type for n in model.graph.node)
    res = {"size_bytes": r["size_bytes"], "metric": r.get("value", 0.0),
           "max_output_diff": r.get("max_output_diff", 0.0), "batchnorm": ops.get("BatchNormalization", 0),
           "seconds": round(seconds, 2), "file": str(out)}
    if "top5" in r:
        res["top5"] = r["top5"]
    if "cosine_min" in r:
        res["cosine_min"] = r["cosine_min"]
    return res


#: Metrics where smaller is better (the structure-only models' max |y - y_FP32|).
LOWER_IS_BETTER = frozenset({"max_output_diff"})


def compare(measured: dict, recorded: dict, metric: str = "top1") -> list[str]:
    """Regressions of ``measured`` against a recorded pipeline entry and its tolerance; ``metric``
    names the model's metric (a regression is a drop, or a rise for ``LOWER_IS_BETTER`` ones)."""
    tol = recorded.get("tolerance", {})
    bad = []
    if "metric" in recorded and "metric" in tol:
        if metric in LOWER_IS_BETTER:
            if measured["metric"] > recorded["metric"] + tol["metric"] + 1e-12:
                bad.append(f"{metric} {measured['metric']:.6g} > recorded {recorded['metric']:.6g} + {tol['metric']}")
        elif measured["metric"] < recorded["metric"] - tol["metric"] - 1e-12:
            bad.append(f"metric {measured['metric']:.6g} < recorded {recorded['metric']:.6g} - {tol['metric']}")
    if "max_output_diff" in tol and measured["max_output_diff"] > tol["max_output_diff"]:
        bad.append(f"max output diff {measured['max_output_diff']:.3g} > tolerance {tol['max_output_diff']:.3g}")
    if "size_bytes" in recorded and "size_rel" in tol:
        limit = recorded["size_bytes"] * (1 + tol["size_rel"])
        if measured["size_bytes"] > limit:
            bad.append(f"size {measured['size_bytes']:,} B > recorded {recorded['size_bytes']:,} B "
                       f"+ {100 * tol['size_rel']:.2g}%")
    return bad
