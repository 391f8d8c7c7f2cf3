"""Zoo figures recorded for pipelines beyond the standard ones (``tools/zoo.py record NAME --pipelines
...``), checked by ``pytest -m zoo`` like test_zoo.py checks the standard ones."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))

import zoo_manifest  # noqa: E402


def recorded_pipelines(pass_name: str) -> list[tuple[str, str]]:
    """(model, pipeline) for every recorded pipeline that runs ``pass_name`` and is not a standard one."""
    out = []
    for name, entry in zoo_manifest.load_manifest()["models"].items():
        for pipeline in entry.get("pipelines", {}):
            steps = [tok.split(":")[0] for tok in pipeline.split(",") if ":" in tok or "=" not in tok]
            if pass_name in steps and pipeline not in zoo_manifest.STANDARD_PIPELINES:
                out.append((name, pipeline))
    return out


def check_recorded(name: str, pipeline: str) -> None:
    """Run a recorded pipeline on the zoo model and compare with the manifest's figures and tolerance."""
    from zoo_data import data_root
    from zoo_eval import compare, run_pipeline
    entry = zoo_manifest.model_entry(name)
    if entry["dataset"] in ("imagenet-sample", "mnist") and not data_root().exists():
        pytest.skip(f"zoo data not found at {data_root()} (set QGRAPH_DATA or put shared/data beside the repo)")
    if not zoo_manifest.model_path(name, entry).exists():
        pytest.skip(f"{name} is not built: python tools/zoo.py build {name}")
    problems = compare(run_pipeline(name, pipeline), entry["pipelines"][pipeline])
    assert not problems, f"{name} / {pipeline}: " + "; ".join(problems)
