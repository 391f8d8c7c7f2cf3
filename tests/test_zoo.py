"""Zoo regression (``pytest -m zoo``): every zoo model built (cached), its FP32 figures as recorded,
and every standard pipeline that exists so far within the manifest's tolerance.

Skips with the reason when ../shared/data (or $QGRAPH_DATA) is absent, or when a model that still
has to be built needs the ``zoo`` extra. Figures are only ever written by
``python tools/zoo.py record NAME``; ``fold,cleanup`` without recorded figures fails, a newer
standard pipeline not yet recorded for a model skips and says which command records it.
"""
from __future__ import annotations

import pytest

import zoo_manifest
from zoo_data import DataMissing, data_root

pytestmark = pytest.mark.zoo

MANIFEST = zoo_manifest.load_manifest()
MODELS = zoo_manifest.model_names(MANIFEST)
PIPELINES = zoo_manifest.available_pipelines()
NEEDS_DATA = {n for n, e in MANIFEST["models"].items() if e["dataset"] in ("imagenet-sample", "mnist")}


def _ready(name: str) -> None:
    """Skip (with the reason) unless ``name`` can be built or is cached, and its data is here."""
    entry = MANIFEST["models"][name]
    if name in NEEDS_DATA and not data_root().exists():
        pytest.skip(f"zoo data not found at {data_root()} (set QGRAPH_DATA or put shared/data beside the repo)")
    path = zoo_manifest.model_path(name, entry)
    if entry["source"].startswith("recipe:") and not path.exists():
        msg = zoo_manifest.missing_zoo_extra()
        if msg:
            pytest.skip(f"{name} is not built and {msg}")


@pytest.fixture(scope="module")
def built():
    """name -> build info; each model built (or found in the cache) once per session."""
    from zoo_build import build
    cache: dict = {}

    def get(name: str) -> dict:
        _ready(name)
        if name not in cache:
            try:
                cache[name] = build(name, log=lambda s: None)
            except DataMissing as e:
                pytest.skip(str(e))
        return cache[name]
    return get


@pytest.mark.parametrize("name", MODELS)
def test_fp32_metric_is_the_recorded_one(name, built):
    from zoo_eval import evaluate
    info = built(name)
    entry = MANIFEST["models"][name]
    fp32 = entry.get("fp32")
    assert fp32, f"{name}: no FP32 figures recorded; run python tools/zoo.py record {name}"
    r = evaluate(zoo_manifest.model_path(name, entry), name, progress=False)
    assert r["n"] == fp32["n"]
    # the same file on the same data with the same runtime: only thread scheduling may differ
    assert r.get("value", 0.0) == pytest.approx(fp32["metric"], abs=1e-6)
    assert info.get("op_counts", {}).get("BatchNormalization", 0) == fp32["batchnorm"]


@pytest.mark.parametrize("name,pipeline", [(n, p) for n in MODELS for p in PIPELINES])
def test_standard_pipeline_within_tolerance(name, pipeline, built):
    from zoo_eval import compare, run_pipeline
    built(name)
    recorded = MANIFEST["models"][name].get("pipelines", {}).get(pipeline)
    if not recorded:
        msg = f"{name}: '{pipeline}' has no recorded figures; run python tools/zoo.py record {name}"
        if pipeline == "fold,cleanup":
            pytest.fail(msg)
        pytest.skip(msg)       # a newly landed pipeline: its issue records it
    r = run_pipeline(name, pipeline)
    problems = compare(r, recorded, MANIFEST["models"][name].get("metric", "top1"))
    assert not problems, f"{name} / {pipeline}: " + "; ".join(problems)
    # every zoo model's BNs fold: into the layer before, or (DenseNet's Concat -> BN -> Relu -> Conv)
    # forward into the layer after
    assert r["batchnorm"] == recorded.get("batchnorm", 0), f"{name}: {r['batchnorm']} BatchNormalization left"
    if pipeline == "fold,cleanup":
        assert r["batchnorm"] == 0, f"{name}: {r['batchnorm']} BatchNormalization left after fold,cleanup"


def test_lenets_reach_the_deep_compression_baselines(built):
    for name, floor in (("lenet_300_100", 0.980), ("lenet5", 0.990)):
        built(name)
        assert MANIFEST["models"][name]["fp32"]["top1"] >= floor, name


@pytest.mark.parametrize("name", ["efficientnet_lite0", "mobilenet_v2"])
def test_onnx_top1_equals_pytorch_top1(name, built):
    fp32 = MANIFEST["models"][name]["fp32"]
    built(name)
    assert fp32["top1_all"] == fp32["pytorch_top1_all"]
    assert fp32["top1"] == fp32["pytorch_top1"]
    assert fp32["pytorch_max_abs_diff"] <= 1e-4


def test_fold_has_work_on_the_exported_cnns(built):
    for name in ("efficientnet_lite0", "mobilenet_v2", "digits_cnn", "light_resnet50"):
        built(name)
        assert MANIFEST["models"][name]["fp32"]["batchnorm"] > 0, name


def test_readme_table_is_generated_from_the_manifest():
    from zoo import zoo_table
    readme = zoo_manifest.MODELS_README.read_text(encoding="utf-8")
    assert zoo_table(MANIFEST) in readme, "models/README.md is stale: run python tools/zoo.py table --write"
