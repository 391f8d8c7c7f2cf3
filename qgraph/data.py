"""Calibration and evaluation inputs: one streaming ``Samples`` type over every source qgraph reads.

Sources (``open_samples``):

    .npz file        keys = model input names, each with a leading sample axis; for a single-input
                     model one array under any key maps to the input; an optional ``labels`` key
    folder of .npy   one sample per file (no batch axis), sorted by file name; single-input models
    folder of .npz   one sample per file, keys = input names (multi-input models)
    folder of images .jpg/.jpeg/.png/.bmp/.webp sorted by name, decoded and preprocessed with a
                     ``preset`` batch by batch; ``labels.csv`` (columns ``file,label``) when present
    dict             input name -> array with a leading sample axis (``labels`` as in .npz)
    Samples          passed through (renamed for a single-input model)

Nothing decodes an image or reads a per-sample file before ``batches`` asks for it, so a folder of
any size streams in constant memory; arrays given as arrays (npz, dict) are used in place.

``random_samples(shapes, count, seed=...)`` gives seeded N(0, 1) inputs of fixed shapes, for models
that have no data of their own.
"""
from __future__ import annotations

import csv
import os
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np

from qgraph.errors import ModelError

#: What reading a broken .npz / .npy raises (a bad zip, a bad member, a pickle refused, a short file).
READ_ERRORS = (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
LABELS_KEY = "labels"


# ----------------------------------------------------------------------------- presets

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preset:
    """Preprocessing of one model family: ``y = ((x * scale) - mean) / std`` per channel, NCHW.

    For images: convert to ``mode``, resize the shorter side to ``resize`` (PIL bilinear) when it
    differs, center-crop ``crop`` x ``crop`` (torchvision's rounding), then normalize.
    For arrays: normalize only; a (N, H, W) array gets its channel axis when ``channels == 1``.
    """
    name: str
    mode: str = "RGB"                  # PIL mode for images: "RGB" or "L"
    resize: int | None = None          # shorter side before the crop
    crop: int | None = None            # center crop size
    scale: float = 1.0
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    identity: bool = False             # "raw": arrays untouched, images as float32 0..255 NCHW
    size: tuple[int, int] | None = None  # images resized to exactly (width, height), no crop
    bgr: bool = False                  # channels in B, G, R order (OpenCV-fed models)

    @property
    def channels(self) -> int:
        return 1 if self.mode == "L" else 3

    def normalize(self, x: np.ndarray) -> np.ndarray:
        """(N, C, H, W) or (N, H, W) pixels -> float32 NCHW model input."""
        if self.identity:
            return x
        x = np.asarray(x, dtype=np.float32)
        if x.ndim == 3 and self.channels == 1:
            x = x[:, None]
        if x.ndim != 4:
            raise ModelError(f"preset '{self.name}' expects (N, C, H, W) arrays, got shape {x.shape}")
        shape = (1, -1, 1, 1)
        mean = np.asarray(self.mean, np.float32).reshape(shape)
        std = np.asarray(self.std, np.float32).reshape(shape)
        return ((x * np.float32(self.scale) - mean) / std).astype(np.float32, copy=False)

    def image(self, path: Path) -> np.ndarray:
        """Decode one image file to a (C, H, W) float32 model input."""
        Image = _pil()
        try:
            with Image.open(path) as im:
                im = im.convert("L" if self.mode == "L" else "RGB")
                if self.size is not None:
                    im = im.resize(self.size, Image.BILINEAR)
                if self.resize is not None and min(im.size) != self.resize:
                    w, h = im.size
                    s = self.resize / min(w, h)
                    # torchvision Resize(int): the long side is truncated, not rounded
                    size = (self.resize, int(h * s)) if w <= h else (int(w * s), self.resize)
                    im = im.resize(size, Image.BILINEAR)
                if self.crop is not None:
                    w, h = im.size
                    if w < self.crop or h < self.crop:
                        raise ModelError(f"image {path.name} is {w}x{h}, smaller than the "
                                         f"{self.crop}x{self.crop} crop of preset '{self.name}'")
                    top = int(round((h - self.crop) / 2.0))
                    left = int(round((w - self.crop) / 2.0))
                    im = im.crop((left, top, left + self.crop, top + self.crop))
                a = np.asarray(im, dtype=np.float32)
        except OSError as e:
            raise ModelError(f"cannot read image {path}: {e}") from None
        a = a[None] if a.ndim == 2 else a.transpose(2, 0, 1)
        if self.bgr:
            a = np.ascontiguousarray(a[::-1])
        return a if self.identity else self.normalize(a[None])[0]


PRESETS: dict[str, Preset] = {
    # torchvision ImageNet models (MobileNetV2 ...): Resize(256), CenterCrop(224), ToTensor, Normalize
    "imagenet": Preset("imagenet", resize=256, crop=224, scale=1 / 255,
                       mean=IMAGENET_MEAN, std=IMAGENET_STD),
    # EfficientNet-Lite (TF Lite recipe, the weights' own): (x - 127) / 128 on 0..255 pixels
    "efficientnet-lite": Preset("efficientnet-lite", resize=256, crop=224, mean=(127.0,), std=(128.0,)),
    # MNIST: (x/255 - 0.1307) / 0.3081, (N, 1, 28, 28)
    "mnist": Preset("mnist", mode="L", resize=28, crop=28, scale=1 / 255, mean=(0.1307,), std=(0.3081,)),
    # PaddleOCR (PP-OCR, BGR as OpenCV reads): detection normalizes like ImageNet (x/255 - mean) / std
    # at a multiple of 32 (here 256x256: shorter side 256, center crop); recognition (3x48x320) and
    # direction classification (3x48x192) use (x/255 - 0.5) / 0.5 on the image resized to that size
    "ppocr-det": Preset("ppocr-det", resize=256, crop=256, scale=1 / 255, mean=IMAGENET_MEAN,
                        std=IMAGENET_STD, bgr=True),
    "ppocr-rec": Preset("ppocr-rec", size=(320, 48), scale=1 / 255, mean=(0.5,), std=(0.5,), bgr=True),
    "ppocr-cls": Preset("ppocr-cls", size=(192, 48), scale=1 / 255, mean=(0.5,), std=(0.5,), bgr=True),
    # no change: arrays as given, images as float32 0..255 NCHW
    "raw": Preset("raw", identity=True),
}


def get_preset(preset: str | Preset | None) -> Preset | None:
    if preset is None or isinstance(preset, Preset):
        return preset
    try:
        return PRESETS[preset]
    except KeyError:
        raise ModelError(f"unknown preset '{preset}' (valid: {', '.join(sorted(PRESETS))})") from None


def _pil():
    try:
        from PIL import Image
    except ImportError:
        raise ModelError("reading images needs Pillow: pip install pillow") from None
    return Image


# ----------------------------------------------------------------------------- Samples

Fetch = Callable[[np.ndarray], dict[str, np.ndarray]]


class Samples:
    """A re-iterable, streaming source of model inputs (and optional labels).

    ``fetch(indices)`` returns a feed dict for those source positions; a ``Samples`` is a view of
    positions ``index`` into its source, so ``subset`` is free and never copies data.
    """

    def __init__(self, input_names: Sequence[str], count: int, fetch: Fetch, *,
                 labels: np.ndarray | None = None, index: np.ndarray | None = None,
                 description: str = "", preprocessed: bool = False):
        self.input_names = list(input_names)
        self._fetch = fetch
        self._index = np.arange(count, dtype=np.int64) if index is None else np.asarray(index, np.int64)
        self._labels = None if labels is None else np.asarray(labels)
        self.description = description or f"{count} samples"
        self.preprocessed = preprocessed   # values made by a preset (their dtype is ours to choose)

    @property
    def labels(self) -> np.ndarray | None:
        return None if self._labels is None else self._labels[self._index]

    def __len__(self) -> int:
        return len(self._index)

    def __repr__(self) -> str:
        return f"Samples({len(self)} of {self.description}, inputs={self.input_names})"

    def batches(self, batch_size: int = 32) -> Iterator[dict[str, np.ndarray]]:
        """Feed dicts for onnxruntime, ``batch_size`` samples each (the last one may be shorter)."""
        if batch_size < 1:
            raise ModelError(f"batch_size must be >= 1, got {batch_size}")
        for start in range(0, len(self._index), batch_size):
            batch = self._fetch(self._index[start:start + batch_size])
            self._check_finite(batch, start)
            yield batch

    def _check_finite(self, batch: dict[str, np.ndarray], start: int) -> None:
        """NaN or infinity in an input is bad data: it would set every range it reaches to NaN."""
        for name, x in batch.items():
            x = np.asarray(x)
            if x.dtype.kind not in "fc" or x.size == 0:
                continue
            ok = np.isfinite(x.reshape(len(x), -1) if x.ndim else x.reshape(1, -1)).all(axis=1)
            if not ok.all():
                i = start + int(np.argmin(ok))
                k = int(ok.size - ok.sum())
                more = f", and {k - 1} more of the {ok.size} in its batch" if k > 1 else ""
                raise ModelError(f"{self.description}: input '{name}' has NaN or infinite values "
                                 f"(sample {i}{more})")

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self.batches()

    def subset(self, indices: Sequence[int] | np.ndarray | slice | range) -> Samples:
        """The samples at ``indices`` (positions in this Samples), in that order."""
        if isinstance(indices, slice):
            pos = np.arange(len(self))[indices]
        else:
            pos = np.asarray(list(indices) if isinstance(indices, range) else indices)
            if pos.dtype == bool:
                if pos.shape != (len(self),):
                    raise ModelError(f"boolean subset mask has shape {pos.shape}, expected ({len(self)},)")
                pos = np.flatnonzero(pos)
            elif pos.size and not np.issubdtype(pos.dtype, np.integer):
                raise ModelError(f"subset indices must be integers, got {pos.dtype}")
            pos = pos.astype(np.int64).reshape(-1)
            if pos.size and (pos.min() < -len(self) or pos.max() >= len(self)):
                raise ModelError(f"subset index out of range for {len(self)} samples")
        return Samples(self.input_names, 0, self._fetch, labels=self._labels,
                       index=self._index[pos], description=self.description, preprocessed=self.preprocessed)

    def renamed(self, input_names: Sequence[str]) -> Samples:
        """The same samples fed under other input names (same count, same order)."""
        if len(input_names) != len(self.input_names):
            raise ModelError(f"cannot map {len(self.input_names)} inputs {self.input_names} "
                             f"onto {len(input_names)} inputs {list(input_names)}")
        mapping = dict(zip(self.input_names, input_names))
        fetch = self._fetch
        return Samples(input_names, 0, lambda idx: {mapping[k]: v for k, v in fetch(idx).items()},
                       labels=self._labels, index=self._index, description=self.description,
                       preprocessed=self.preprocessed)

    def cast(self, dtypes: Mapping[str, np.dtype]) -> Samples:
        """The same samples with inputs converted to ``dtypes`` (name -> dtype)."""
        fetch = self._fetch
        return Samples(self.input_names, 0,
                       lambda idx: {k: (v.astype(dtypes[k]) if k in dtypes else v) for k, v in fetch(idx).items()},
                       labels=self._labels, index=self._index, description=self.description,
                       preprocessed=self.preprocessed)


# ----------------------------------------------------------------------------- sources

def open_samples(source: Any, input_names: Sequence[str], *, preset: str | Preset | None = None,
                 limit: int | None = None, input_shapes: Mapping[str, Sequence] | None = None) -> Samples:
    """Open ``source`` as model inputs named ``input_names`` (see the module docstring).

    ``preset`` preprocesses images (required for a folder of images) and arrays (e.g. "mnist" on
    raw uint8 digits); ``limit`` keeps the first samples; ``input_shapes`` (name -> dims, with
    None / str for a dynamic dim, batch axis included) checks the first sample's shape.
    """
    names = list(input_names)
    if not names:
        raise ModelError("the model has no inputs to feed")
    p = get_preset(preset)
    if isinstance(source, Samples):
        s = _match_samples(source, names)
    elif isinstance(source, Mapping):
        s = _from_arrays(dict(source), names, p, "dict")
    elif isinstance(source, (str, os.PathLike)):
        s = _from_path(Path(source), names, p)
    else:
        raise ModelError(f"calibration/eval data must be a path, a dict of arrays or a Samples, "
                         f"got {type(source).__name__}")
    if limit is not None:
        if limit < 1:
            raise ModelError(f"limit must be >= 1, got {limit}")
        s = s.subset(range(min(limit, len(s))))
    if len(s) == 0:
        raise ModelError(f"no samples in {s.description}")
    if input_shapes:
        check_shapes(s, input_shapes)
    return s


def check_shapes(samples: Samples, input_shapes: Mapping[str, Sequence]) -> None:
    """ModelError when the first sample does not fit the model's declared input shapes."""
    first = next(samples.subset([0]).batches(1))
    for name, dims in input_shapes.items():
        if name not in first:
            continue
        got = first[name].shape
        want = list(dims)
        ok = len(got) == len(want) and all(
            not isinstance(d, int) or d <= 0 or i == 0 or d == g for i, (d, g) in enumerate(zip(want, got)))
        if not ok:
            shown = ["?" if not isinstance(d, int) or d <= 0 else d for d in want]
            raise ModelError(f"input '{name}': data sample has shape {list(got)[1:]} "
                             f"but the model expects {shown[1:]} (after the batch axis)")


def conform(samples: Samples, inputs: Mapping[str, tuple[Any, Sequence]]) -> Samples:
    """Check samples against the model's inputs {name: (dtype or None, dims)} on the first sample,
    before any pass runs: ModelError naming the input when its shape or dtype differs. Values a
    preset made are converted to a float input's dtype (the preset's float32 is our choice, not
    the user's); arrays the user gave must match."""
    first = next(samples.subset([0]).batches(1))
    check_shapes(samples, {n: dims for n, (_, dims) in inputs.items() if dims is not None})
    casts = {}
    for name, (dtype, _) in inputs.items():
        if name not in first or dtype is None:
            continue
        want, got = np.dtype(dtype), np.asarray(first[name]).dtype
        if want == got:
            continue
        if samples.preprocessed and want.kind == "f" and got.kind == "f":
            casts[name] = want
            continue
        raise ModelError(f"input '{name}': data is {got} but the model expects {want} "
                         f"({samples.description}; convert it, e.g. a.astype(np.{want.name}))")
    return samples.cast(casts) if casts else samples


def _match_samples(s: Samples, names: list[str]) -> Samples:
    if s.input_names == names:
        return s
    if len(names) == 1 and len(s.input_names) == 1:
        return s.renamed(names)
    if set(s.input_names) == set(names):
        return s
    raise ModelError(f"samples feed inputs {s.input_names}, the model has {names}")


def _from_path(path: Path, names: list[str], preset: Preset | None) -> Samples:
    if not path.exists():
        raise ModelError(f"data not found: {path}")
    if path.is_file():
        if path.suffix == ".npz":
            try:
                arrays = np.load(path, allow_pickle=False)
            except READ_ERRORS as e:
                raise _unreadable(path, e) from None
            if not hasattr(arrays, "files"):
                raise ModelError(f"{path.name} is a single .npy array saved under an .npz name; use np.savez "
                                 "with the input names as keys")
            return _from_arrays(arrays, names, preset, path.name)
        if path.suffix == ".npy":
            raise ModelError(f"{path.name}: a single .npy is not a sample set; use a folder of .npy "
                             "files (one sample each) or an .npz with the input names as keys")
        raise ModelError(f"unsupported data file {path.name}: expected .npz, a folder of .npy/.npz "
                         "files, or a folder of images")
    if not path.is_dir():                   # a device, a FIFO, a socket: nothing to read samples from
        raise ModelError(f"data {path} is neither a file nor a folder: expected .npz, a folder of "
                         ".npy/.npz files, or a folder of images")
    try:
        files = sorted(f for f in path.iterdir() if f.is_file() and not f.name.startswith("."))
    except OSError as e:
        raise _unreadable(path, e) from None
    kinds = {
        "npy": [f for f in files if f.suffix == ".npy"],
        "npz": [f for f in files if f.suffix == ".npz"],
        "image": [f for f in files if f.suffix.lower() in IMAGE_SUFFIXES],
    }
    present = [k for k, v in kinds.items() if v]
    if not present:
        raise ModelError(f"no .npy, .npz or image files in {path}")
    if len(present) > 1:
        raise ModelError(f"{path} mixes {' and '.join(present)} files; keep one kind per folder")
    kind = present[0]
    if kind == "image":
        return _from_images(path, kinds["image"], names, preset)
    return _from_sample_files(path, kinds[kind], names, preset)


def _from_arrays(arrays: Mapping[str, np.ndarray], names: list[str], preset: Preset | None,
                 where: str) -> Samples:
    keys = list(arrays.keys())
    data_keys = [k for k in keys if k != LABELS_KEY]
    if set(names) <= set(data_keys):
        chosen = {n: n for n in names}
    elif len(names) == 1 and len(data_keys) == 1:
        chosen = {names[0]: data_keys[0]}
    else:
        raise ModelError(f"{where}: keys {data_keys} do not match the model inputs {names}")
    # an NpzFile decompresses a key on every access: read each used array once, lazily
    cache: dict[str, np.ndarray] = {}

    def array(key: str) -> np.ndarray:
        if key not in cache:
            try:
                a = np.asarray(arrays[key])
            except READ_ERRORS as e:  # pickled object arrays, broken zip members
                raise _unreadable(f"{where} ['{key}']", e) from None
            if a.dtype.kind in "OV" or a.dtype.hasobject:
                raise ModelError(f"{where}: '{key}' is not a numeric array (dtype {a.dtype})")
            if a.ndim == 0:
                raise ModelError(f"{where}: '{key}' is a scalar, expected a leading sample axis")
            cache[key] = a
        return cache[key]

    counts = {n: len(array(k)) for n, k in chosen.items()}
    labels = array(LABELS_KEY) if LABELS_KEY in keys else None
    if labels is not None:
        counts[LABELS_KEY] = len(labels)
    if len(set(counts.values())) > 1:
        raise ModelError(f"{where}: arrays disagree on the number of samples {counts}")
    n = next(iter(counts.values()))

    def fetch(idx: np.ndarray) -> dict[str, np.ndarray]:
        out = {}
        for name, key in chosen.items():
            x = array(key)[idx]
            out[name] = preset.normalize(x) if preset is not None else x
        return out

    return Samples(names, n, fetch, labels=labels, description=where, preprocessed=preset is not None)


def _unreadable(where, e: BaseException) -> ModelError:
    text = str(e)
    if "pickle" in text.lower():
        return ModelError(f"{where} holds pickled Python objects; qgraph never unpickles data "
                          "(save plain numeric arrays with np.savez)")
    return ModelError(f"cannot read {where}: {text.splitlines()[0] if text else type(e).__name__}")


def _from_sample_files(folder: Path, files: list[Path], names: list[str], preset: Preset | None) -> Samples:
    npy = files[0].suffix == ".npy"
    if npy and len(names) != 1:
        raise ModelError(f"{folder}: a folder of .npy feeds a single-input model; this one has inputs "
                         f"{names}: use .npz files with those keys")

    def load(f: Path) -> dict[str, np.ndarray]:
        try:
            if npy:
                return {names[0]: np.load(f, allow_pickle=False)}
            with np.load(f, allow_pickle=False) as z:
                keys = [k for k in z.files if k != LABELS_KEY]
                if set(names) <= set(keys):
                    return {n: z[n] for n in names}
                if len(names) == 1 and len(keys) == 1:
                    return {names[0]: z[keys[0]]}
                raise ModelError(f"{f.name}: keys {keys} do not match the model inputs {names}")
        except READ_ERRORS as e:
            raise _unreadable(f, e) from None

    def fetch(idx: np.ndarray) -> dict[str, np.ndarray]:
        samples = [load(files[i]) for i in idx]
        out = {}
        for n in names:
            first = samples[0][n].shape
            for i, s in zip(idx, samples):
                if s[n].shape != first:
                    raise ModelError(f"{folder}: sample {files[i].name} has shape {list(s[n].shape)} "
                                     f"but {files[idx[0]].name} has {list(first)}")
            x = np.stack([s[n] for s in samples])
            out[n] = preset.normalize(x) if preset is not None else x
        return out

    return Samples(names, len(files), fetch, description=str(folder), preprocessed=preset is not None)


def _from_images(folder: Path, files: list[Path], names: list[str], preset: Preset | None) -> Samples:
    if preset is None:
        raise ModelError(f"{folder} holds images: give a preset ({', '.join(sorted(PRESETS))})")
    if len(names) != 1:
        raise ModelError(f"{folder}: images feed a single-input model; this one has inputs {names}")
    labels = _read_labels(folder, files)

    def fetch(idx: np.ndarray) -> dict[str, np.ndarray]:
        return {names[0]: np.stack([preset.image(files[i]) for i in idx])}

    return Samples(names, len(files), fetch, labels=labels,
                   description=f"{folder} (preset {preset.name})", preprocessed=not preset.identity)


def _read_labels(folder: Path, files: list[Path]) -> np.ndarray | None:
    path = folder / "labels.csv"
    if not path.exists():
        return None
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or not {"file", "label"} <= set(reader.fieldnames):
            raise ModelError(f"{path}: needs the columns 'file' and 'label', has {reader.fieldnames}")
        try:
            table = {row["file"]: int(row["label"]) for row in reader}
        except ValueError as e:
            raise ModelError(f"{path}: a label is not an integer ({e})") from None
    missing = [f.name for f in files if f.name not in table]
    if missing:
        raise ModelError(f"{path}: no label for {missing[0]}" +
                         (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))
    return np.array([table[f.name] for f in files], dtype=np.int64)


# ----------------------------------------------------------------------------- random inputs

def random_samples(shapes: Mapping[str, Sequence], count: int, *, seed: int = 0,
                   dtype=np.float32) -> Samples:
    """``count`` seeded N(0, 1) samples; sample i is the same whatever the batch (one generator
    per sample, seeded ``[seed, i]``). A non-positive or symbolic dim after the batch axis is an
    error: random data needs concrete shapes."""
    dims = {}
    for name, shape in shapes.items():
        rest = list(shape)[1:]
        if any(not isinstance(d, int) or d <= 0 for d in rest):
            raise ModelError(f"input '{name}' has a dynamic dim {list(shape)}: random data needs fixed dims")
        dims[name] = rest

    def fetch(idx: np.ndarray) -> dict[str, np.ndarray]:
        out: dict[str, list] = {n: [] for n in dims}
        for i in idx:
            rng = np.random.default_rng([seed, int(i)])
            for n, d in dims.items():
                out[n].append(rng.standard_normal(d).astype(dtype))
        return {n: np.stack(v) for n, v in out.items()}

    return Samples(list(dims), count, fetch, description=f"random N(0,1), seed {seed}")
