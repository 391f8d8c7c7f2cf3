"""qgraph.data: every source kind, presets, subsets and the errors people see.

All data is made in tmp_path. The zoo's datasets and splits (tools/zoo_data.py): test_zoo_data.py.
"""
from __future__ import annotations

import numpy as np
import pytest

from qgraph.data import PRESETS, Samples, open_samples, random_samples
from qgraph.errors import ModelError


def _collect(s: Samples, batch: int = 3) -> dict[str, np.ndarray]:
    parts: dict[str, list] = {}
    for feed in s.batches(batch):
        for k, v in feed.items():
            parts.setdefault(k, []).append(v)
    return {k: np.concatenate(v) for k, v in parts.items()}


def _png(path, array):
    Image = pytest.importorskip("PIL.Image")
    Image.fromarray(array).save(path)


# ----------------------------------------------------------------------------- .npz and dicts

def test_npz_keys_match_input_names_and_labels_ride_along(tmp_path):
    x = np.arange(10 * 2, dtype=np.float32).reshape(10, 2)
    y = np.arange(10, dtype=np.float32).reshape(10, 1)
    np.savez(tmp_path / "d.npz", a=x, b=y, labels=np.arange(10))
    s = open_samples(tmp_path / "d.npz", ["a", "b"])
    assert len(s) == 10 and s.input_names == ["a", "b"]
    got = _collect(s, 4)
    np.testing.assert_array_equal(got["a"], x)
    np.testing.assert_array_equal(got["b"], y)
    np.testing.assert_array_equal(s.labels, np.arange(10))


def test_npz_single_array_maps_to_the_single_input_whatever_its_key(tmp_path):
    x = np.random.default_rng(0).standard_normal((5, 3)).astype(np.float32)
    np.savez(tmp_path / "d.npz", whatever=x)
    s = open_samples(tmp_path / "d.npz", ["input"])
    np.testing.assert_array_equal(_collect(s)["input"], x)
    assert s.labels is None


def test_npz_keys_not_matching_inputs_is_a_model_error(tmp_path):
    np.savez(tmp_path / "d.npz", a=np.zeros((2, 1)), c=np.zeros((2, 1)))
    with pytest.raises(ModelError, match=r"keys \['a', 'c'\] do not match the model inputs \['a', 'b'\]"):
        open_samples(tmp_path / "d.npz", ["a", "b"])


def test_npz_arrays_with_different_sample_counts_are_refused(tmp_path):
    np.savez(tmp_path / "d.npz", a=np.zeros((3, 1)), labels=np.zeros(4))
    with pytest.raises(ModelError, match="disagree on the number of samples"):
        open_samples(tmp_path / "d.npz", ["a"])


def test_dict_source_and_limit(tmp_path):
    x = np.arange(12, dtype=np.float32).reshape(6, 2)
    s = open_samples({"x": x, "labels": np.arange(6)}, ["x"], limit=4)
    assert len(s) == 4
    np.testing.assert_array_equal(_collect(s)["x"], x[:4])
    np.testing.assert_array_equal(s.labels, np.arange(4))


def test_preset_applies_to_arrays_mnist_adds_the_channel_axis():
    raw = np.full((2, 28, 28), 255, np.uint8)
    s = open_samples({"input": raw}, ["input"], preset="mnist")
    x = _collect(s)["input"]
    assert x.shape == (2, 1, 28, 28) and x.dtype == np.float32
    np.testing.assert_allclose(x, (1.0 - 0.1307) / 0.3081, rtol=1e-6)


# ----------------------------------------------------------------------------- folders of .npy / .npz

def test_npy_folder_is_one_sample_per_file_in_name_order(tmp_path):
    for i in (2, 0, 1):
        np.save(tmp_path / f"s{i}.npy", np.full((1, 4), i, np.float32))
    s = open_samples(tmp_path, ["input"])
    got = _collect(s, 2)["input"]
    assert got.shape == (3, 1, 4)
    np.testing.assert_array_equal(got[:, 0, 0], [0, 1, 2])


def test_npy_folder_with_mismatched_shapes_names_the_file(tmp_path):
    np.save(tmp_path / "a.npy", np.zeros((1, 4), np.float32))
    np.save(tmp_path / "b.npy", np.zeros((1, 5), np.float32))
    s = open_samples(tmp_path, ["input"])
    with pytest.raises(ModelError, match=r"sample b.npy has shape \[1, 5\] but a.npy has \[1, 4\]"):
        _collect(s)


def test_npy_folder_for_a_two_input_model_points_to_npz(tmp_path):
    np.save(tmp_path / "a.npy", np.zeros(3, np.float32))
    with pytest.raises(ModelError, match="use .npz files"):
        open_samples(tmp_path, ["a", "b"])


def test_npz_folder_feeds_multi_input_models(tmp_path):
    for i in range(3):
        np.savez(tmp_path / f"{i}.npz", ids=np.full(5, i, np.int64), mask=np.ones(5, np.int64))
    got = _collect(open_samples(tmp_path, ["ids", "mask"]))
    assert got["ids"].shape == (3, 5) and got["ids"].dtype == np.int64
    np.testing.assert_array_equal(got["ids"][:, 0], [0, 1, 2])


def test_mixed_folder_is_refused(tmp_path):
    np.save(tmp_path / "a.npy", np.zeros(3))
    np.savez(tmp_path / "b.npz", x=np.zeros(3))
    with pytest.raises(ModelError, match="mixes npy and npz"):
        open_samples(tmp_path, ["x"])


def test_empty_folder_and_missing_path_say_so(tmp_path):
    with pytest.raises(ModelError, match="no .npy, .npz or image files"):
        open_samples(tmp_path, ["x"])
    with pytest.raises(ModelError, match="data not found"):
        open_samples(tmp_path / "nope.npz", ["x"])


# ----------------------------------------------------------------------------- images

def _image_folder(tmp_path, n=3, size=(256, 256), labels=True):
    rng = np.random.default_rng(0)
    arrays = []
    for i in range(n):
        a = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
        _png(tmp_path / f"{i:02d}.png", a)
        arrays.append(a)
    if labels:
        rows = "file,label\n" + "".join(f"{i:02d}.png,{10 + i}\n" for i in range(n))
        (tmp_path / "labels.csv").write_text(rows)
    return arrays


def test_image_folder_imagenet_preset_crops_and_normalizes_like_torchvision(tmp_path):
    arrays = _image_folder(tmp_path)
    s = open_samples(tmp_path, ["input"], preset="imagenet")
    x = _collect(s, 2)["input"]
    assert x.shape == (3, 3, 224, 224) and x.dtype == np.float32
    # 256x256 needs no resize; center crop 224 starts at 16 (torchvision's rounding)
    ref = arrays[1][16:240, 16:240].astype(np.float32).transpose(2, 0, 1) / 255
    mean = np.array([0.485, 0.456, 0.406], np.float32)[:, None, None]
    std = np.array([0.229, 0.224, 0.225], np.float32)[:, None, None]
    np.testing.assert_allclose(x[1], (ref - mean) / std, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(s.labels, [10, 11, 12])


def test_efficientnet_lite_preset_is_x_minus_127_over_128(tmp_path):
    arrays = _image_folder(tmp_path, n=1, labels=False)
    x = _collect(open_samples(tmp_path, ["input"], preset="efficientnet-lite"))["input"]
    ref = (arrays[0][16:240, 16:240].astype(np.float32).transpose(2, 0, 1) - 127) / 128
    np.testing.assert_allclose(x[0], ref, rtol=1e-6)


def test_imagenet_preset_resizes_the_shorter_side_to_256_first(tmp_path):
    _image_folder(tmp_path, n=1, size=(300, 400), labels=False)   # H=300, W=400
    x = _collect(open_samples(tmp_path, ["input"], preset="imagenet"))["input"]
    assert x.shape == (1, 3, 224, 224)


def test_raw_preset_keeps_pixels_0_to_255(tmp_path):
    arrays = _image_folder(tmp_path, n=1, size=(8, 8), labels=False)
    x = _collect(open_samples(tmp_path, ["input"], preset="raw"))["input"]
    np.testing.assert_array_equal(x[0], arrays[0].transpose(2, 0, 1).astype(np.float32))


def test_image_folder_without_a_preset_lists_the_presets(tmp_path):
    _image_folder(tmp_path, n=1, labels=False)
    with pytest.raises(ModelError, match="give a preset \\(efficientnet-lite, imagenet, mnist, ppocr-cls, ppocr-det, ppocr-rec, raw\\)"):
        open_samples(tmp_path, ["input"])


def test_unknown_preset_lists_the_valid_ones():
    with pytest.raises(ModelError, match=r"unknown preset 'imgnet' \(valid: efficientnet-lite, imagenet, mnist, ppocr-cls, ppocr-det, ppocr-rec, raw\)"):
        open_samples({"x": np.zeros((1, 2))}, ["x"], preset="imgnet")
    assert {"imagenet", "efficientnet-lite", "mnist", "raw"} <= set(PRESETS)


def test_labels_csv_missing_an_image_is_refused(tmp_path):
    _image_folder(tmp_path, n=2, size=(8, 8), labels=False)
    (tmp_path / "labels.csv").write_text("file,label\n00.png,1\n")
    with pytest.raises(ModelError, match="no label for 01.png"):
        open_samples(tmp_path, ["input"], preset="raw")


def test_images_are_decoded_only_when_a_batch_asks(tmp_path, monkeypatch):
    _image_folder(tmp_path, n=5, size=(8, 8), labels=False)
    calls = []
    real = PRESETS["raw"].image
    monkeypatch.setattr(type(PRESETS["raw"]), "image", lambda self, p: calls.append(p) or real(p))
    s = open_samples(tmp_path, ["input"], preset="raw")
    assert calls == []
    next(s.batches(2))
    assert len(calls) == 2


# ----------------------------------------------------------------------------- Samples

def test_subset_is_a_view_in_the_given_order_and_reiterable():
    x = np.arange(10, dtype=np.float32)[:, None]
    s = open_samples({"x": x, "labels": np.arange(10)}, ["x"])
    sub = s.subset([7, 2, 5])
    assert len(sub) == 3
    for _ in range(2):
        np.testing.assert_array_equal(_collect(sub, 2)["x"][:, 0], [7, 2, 5])
    np.testing.assert_array_equal(sub.labels, [7, 2, 5])
    np.testing.assert_array_equal(sub.subset([1])._index, [2])


def test_subset_out_of_range_is_a_model_error():
    s = open_samples({"x": np.zeros((3, 1))}, ["x"])
    with pytest.raises(ModelError, match="out of range for 3 samples"):
        s.subset([3])


def test_samples_pass_through_and_rename_for_a_single_input():
    s = open_samples({"x": np.ones((2, 1))}, ["x"])
    assert open_samples(s, ["x"]) is s
    r = open_samples(s, ["input"])
    assert list(next(r.batches())) == ["input"]


def test_input_shapes_check_names_the_input_and_both_shapes():
    s = {"x": np.zeros((2, 3, 8, 8), np.float32)}
    open_samples(s, ["x"], input_shapes={"x": ["N", 3, 8, 8]})
    with pytest.raises(ModelError, match=r"input 'x': data sample has shape \[3, 8, 8\] but the model expects \[1, 8, 8\]"):
        open_samples(s, ["x"], input_shapes={"x": ["N", 1, 8, 8]})


def test_random_samples_are_the_same_whatever_the_batch_size():
    s = random_samples({"x": [1, 3, 4, 4]}, 5, seed=3)
    a, b = _collect(s, 1)["x"], _collect(s, 4)["x"]
    np.testing.assert_array_equal(a, b)
    assert a.shape == (5, 3, 4, 4)

