"""The installed package does not know the repository it was built from.

``qgraph``, ``qgraph.passes`` and ``qgraph.kernels`` are installed into site-packages, where there is
no ``models/manifest.toml``, no ``../shared/data`` and no repository root above the package: the zoo's
data, splits and manifest live in ``tools/`` (tools/zoo_data.py, tools/zoo_manifest.py).
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_DIRS = ("qgraph", "passes", "kernels")      # qgraph, qgraph.passes, qgraph.kernels

#: what only the repository layout gives meaning to
REPO_LAYOUT = {
    "a folder above the package": re.compile(r"parents\[[1-9]"),
    "the zoo manifest": re.compile(r"manifest\.toml"),
    "the shared data folder": re.compile(r"shared/data|[\"']shared[\"']"),
    "the zoo data variable": re.compile(r"QGRAPH_DATA"),
}


def _sources() -> list[Path]:
    return sorted(p for d in PACKAGE_DIRS for p in (ROOT / d).rglob("*.py"))


def test_package_sources_are_found():
    names = {p.relative_to(ROOT).as_posix() for p in _sources()}
    assert {"qgraph/data.py", "passes/__init__.py", "kernels/__init__.py"} <= names


@pytest.mark.parametrize("what", sorted(REPO_LAYOUT))
def test_package_sources_do_not_reference_the_repository_layout(what):
    pattern = REPO_LAYOUT[what]
    hits = [f"{p.relative_to(ROOT)}:{i}: {line.strip()}"
            for p in _sources()
            for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
            if pattern.search(line)]
    assert not hits, f"{what} referenced inside the installed package:\n" + "\n".join(hits)


def test_qgraph_data_has_no_zoo_datasets():
    import qgraph.data
    zoo_names = {"zoo_split", "open_zoo_dataset", "split_positions", "data_root", "DATASETS", "REPO"}
    left = sorted(zoo_names & set(vars(qgraph.data)))
    assert not left, f"qgraph.data still defines {left}: zoo datasets belong to tools/zoo_data.py"
