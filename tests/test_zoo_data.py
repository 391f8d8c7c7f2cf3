"""tools/zoo_data.py: the zoo's datasets, their fixed split, and what happens when data is absent.

Runs in the default ``pytest``: only the checked-in data (models/digits_sample.npz) is read, and
QGRAPH_DATA points at an empty tmp_path where the shared data would be needed.
"""
from __future__ import annotations

import pytest

from qgraph.errors import ModelError
from zoo_data import DataMissing, split_positions, zoo_split


def test_zoo_splits_are_disjoint_and_documented():
    c, e = split_positions("imagenet-sample", 500)
    assert len(c) == 100 and len(e) == 400 and not set(c) & set(e)
    assert list(c[:3]) == [0, 5, 10]
    c, e = split_positions("sentences", 80)
    assert (len(c), len(e)) == (20, 60)


def test_zoo_split_without_the_data_raises_data_missing(tmp_path, monkeypatch):
    monkeypatch.setenv("QGRAPH_DATA", str(tmp_path))
    with pytest.raises(DataMissing, match="zoo data not found"):
        zoo_split("imagenet-sample")
    with pytest.raises(DataMissing):
        zoo_split("mnist")
    assert issubclass(DataMissing, ModelError)


def test_zoo_split_unknown_name_lists_datasets_and_models():
    with pytest.raises(ModelError, match=r"datasets: imagenet-sample, .*models: .*digits_cnn"):
        zoo_split("no-such-dataset")


def test_a_model_name_brings_its_dataset_and_input_names(tmp_path, monkeypatch):
    # digits_cnn reads models/digits_sample.npz: every 5th of 360 calibrates, the other 288 evaluate
    monkeypatch.setenv("QGRAPH_DATA", str(tmp_path))
    calib, evaluation = zoo_split("digits_cnn")
    assert (len(calib), len(evaluation)) == (72, 288)
    assert calib.input_names == ["input"] and evaluation.labels is not None


def test_structure_only_models_get_seeded_random_inputs_of_the_manifest_shapes():
    calib, evaluation = zoo_split("light_squeezenet")
    assert (len(calib), len(evaluation)) == (8, 4)
    x = next(evaluation.batches(1))
    assert {k: v.shape for k, v in x.items()} == {"data_0": (1, 3, 224, 224)}


def test_compare_knows_which_way_a_metric_regresses():
    """top-1 regresses when it drops; the structure models' max |y - y_FP32| when it rises (a smaller
    output difference after a change is an improvement, not a failure)."""
    from zoo_eval import compare
    rec = {"metric": 0.32, "size_bytes": 100, "tolerance": {"metric": 0.005, "size_rel": 0.01}}

    def run(metric):
        return {"metric": metric, "size_bytes": 100, "max_output_diff": 0.0}
    assert compare(run(0.31), rec, "max_output_diff") == []
    assert compare(run(0.33), rec, "max_output_diff")
    assert compare(run(0.31), rec, "top1")
    assert compare(run(0.33), rec, "top1") == []
