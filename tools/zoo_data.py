"""The zoo's datasets and their fixed calibration / evaluation split (``zoo_split``).

    imagenet-sample  $QGRAPH_DATA/imagenet-sample: 500 images sorted by file name; calibration =
                     every 5th image (sorted positions 0, 5, 10, ..., 495: 100 images), evaluation =
                     the other 400
    mnist            $QGRAPH_DATA/mnist/mnist.npz: calibration = the first 1,000 training images,
                     evaluation = the official 10,000-image test set
    digits-sample    models/digits_sample.npz (360 images): calibration = every 5th (72),
                     evaluation = the other 288
    sentences        models/zoo/sentences.npz (80 tokenized sentences of models/zoo/sentences.txt):
                     calibration = every 4th (20), evaluation = the other 60
    random           seeded standard-normal inputs of the model's shapes (the structure-only
                     models): calibration = 8 samples (seed 0), evaluation = 4 others (seed 1)

The shared data root is ``$QGRAPH_DATA`` when set, else ``../shared/data`` next to the repository.
A zoo model name (models/manifest.toml, read by tools/zoo_manifest.py) brings its dataset, preset
and input names. Everything is opened with ``qgraph.data.open_samples``, so a split is a
``qgraph.data.Samples`` like any other calibration or evaluation data.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from qgraph.data import LABELS_KEY, Preset, Samples, open_samples, random_samples
from qgraph.errors import ModelError
from zoo_manifest import REPO, model_entry, model_names


class DataMissing(ModelError):
    """A zoo dataset is not on this machine: callers may skip."""


def data_root() -> Path:
    """``$QGRAPH_DATA`` or ``../shared/data`` beside the repository."""
    env = os.environ.get("QGRAPH_DATA")
    return Path(env) if env else REPO.parent / "shared" / "data"


@dataclass(frozen=True)
class ZooDataset:
    name: str
    preset: str
    input_names: tuple[str, ...]
    doc: str


DATASETS: dict[str, ZooDataset] = {d.name: d for d in (
    ZooDataset("imagenet-sample", "imagenet", ("input",),
               "500 ImageNet images; calibration every 5th in file order (100), evaluation the other 400"),
    ZooDataset("mnist", "mnist", ("input",),
               "MNIST; calibration the first 1,000 training images, evaluation the 10,000 test images"),
    ZooDataset("digits-sample", "raw", ("input",),
               "models/digits_sample.npz (360); calibration every 5th (72), evaluation the other 288"),
    ZooDataset("sentences", "raw", ("input_ids", "attention_mask", "token_type_ids"),
               "models/zoo/sentences.npz (80); calibration every 4th (20), evaluation the other 60"),
)}

RANDOM_CALIBRATION, RANDOM_EVALUATION = 8, 4
MNIST_CALIBRATION = 1000


def _every(n: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    pos = np.arange(n)
    return pos[pos % k == 0], pos[pos % k != 0]


def split_positions(dataset: str, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Positions, within ``open_zoo_dataset(dataset)`` (n samples), of the calibration and the
    evaluation subsets. For mnist every sample of that set (the test set) evaluates and the
    calibration images come from the training set instead, so the first array is empty."""
    if dataset == "mnist":
        return np.arange(0), np.arange(n)
    _dataset(dataset)
    return _every(n, 4 if dataset == "sentences" else 5)


def open_zoo_dataset(name: str, *, preset: str | Preset | None = None,
                     input_names: Sequence[str] | None = None) -> Samples:
    """Every sample of a zoo dataset (for ``mnist``: the test set), in its documented order."""
    ds = _dataset(name)
    names = list(input_names or ds.input_names)
    p = preset or ds.preset
    if name == "imagenet-sample":
        folder = data_root() / "imagenet-sample"
        if not (folder / "labels.csv").exists():
            raise DataMissing(f"zoo data not found: {folder} (set QGRAPH_DATA or put shared/data "
                              "beside the repository)")
        return open_samples(folder, names, preset=p)
    if name == "mnist":
        return _mnist(names, p)[1]
    return open_samples(_repo_file(name), names, preset=p)


def zoo_split(name: str, *, preset: str | Preset | None = None,
              input_names: Sequence[str] | None = None) -> tuple[Samples, Samples]:
    """(calibration, evaluation) for a zoo dataset or a zoo model name from models/manifest.toml.

    A model name brings its dataset, preset and input names; a dataset name uses the dataset's
    default preset (``imagenet`` for imagenet-sample) unless ``preset`` is given. Raises
    ``DataMissing`` (a ModelError) when the data is not on this machine.
    """
    if name not in DATASETS:
        entry = _model(name)
        ds = entry.get("dataset")
        if ds == "random":
            shapes = {i["name"]: i["shape"] for i in entry.get("inputs", [])}
            return (random_samples(shapes, RANDOM_CALIBRATION, seed=0),
                    random_samples(shapes, RANDOM_EVALUATION, seed=1))
        if ds not in DATASETS:
            raise ModelError(f"zoo model '{name}' has no dataset split (dataset: {ds})")
        preset = preset or entry.get("preset")
        input_names = input_names or [i["name"] for i in entry.get("inputs", [])] or None
        name = ds
    ds = DATASETS[name]
    names = list(input_names or ds.input_names)
    p = preset or ds.preset
    if name == "mnist":
        return _mnist(names, p)
    every = open_zoo_dataset(name, preset=p, input_names=names)
    calib, evaluation = split_positions(name, len(every))
    return every.subset(calib), every.subset(evaluation)


def _dataset(name: str) -> ZooDataset:
    try:
        return DATASETS[name]
    except KeyError:
        raise ModelError(f"unknown zoo dataset '{name}' (valid: {', '.join(DATASETS)})") from None


def _model(name: str) -> dict:
    """The manifest entry of zoo model ``name``; a ModelError naming both kinds of name if none."""
    try:
        return model_entry(name)
    except KeyError:
        raise ModelError(f"unknown zoo dataset or model '{name}' (datasets: {', '.join(DATASETS)}; "
                         f"models: {', '.join(model_names())})") from None


def _repo_file(name: str) -> Path:
    path = {"digits-sample": REPO / "models" / "digits_sample.npz",
            "sentences": REPO / "models" / "zoo" / "sentences.npz"}[name]
    if not path.exists():
        raise DataMissing(f"zoo data not found: {path}")
    return path


def _mnist(names: list[str], preset: str | Preset) -> tuple[Samples, Samples]:
    path = data_root() / "mnist" / "mnist.npz"
    if not path.exists():
        raise DataMissing(f"zoo data not found: {path} (set QGRAPH_DATA or put shared/data "
                          "beside the repository)")
    with np.load(path) as z:
        train = {"input": z["x_train"][:MNIST_CALIBRATION], LABELS_KEY: z["y_train"][:MNIST_CALIBRATION]}
        test = {"input": z["x_test"], LABELS_KEY: z["y_test"]}
    calib = open_samples(train, names, preset=preset)
    calib.description = f"{path} train[:{MNIST_CALIBRATION}]"
    evaluation = open_samples(test, names, preset=preset)
    evaluation.description = f"{path} test"
    return calib, evaluation
