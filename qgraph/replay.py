"""Replaying a model segment by segment over the calibration data.

A pass that changes the model between measurements (bias correction: a layer is measured once the
layers upstream of it are corrected) would otherwise run the whole model again for every change.
Here each segment starts from tensors an earlier segment computed, kept per batch in a
``BatchCache``, so every node runs a bounded number of times whatever the depth:

    segment 0:  graph inputs ──▶ cut 1 (cached), tensors to measure
    segment 1:  cut 1        ──▶ cut 2 (cached), tensors to measure        ... and so on

``BatchCache`` holds arrays in memory up to a budget and writes the rest to ``.npy`` files in a
temporary directory (read back one batch at a time), so its memory stays bounded whatever the
number of samples. Which tensors form each cut is the caller's decision (``qgraph.ir.segment``
extracts the nodes between them).
"""
from __future__ import annotations

import math
import os
import shutil
import tempfile
from typing import Iterator

import numpy as np
import onnx

from qgraph.calibrate import batch_size_for, progress_bar, release_memory, run_session
from qgraph.errors import ModelError


class BatchCache:
    """Per-batch values of named tensors: in memory up to ``budget_bytes``, beyond it in files."""

    def __init__(self, budget_bytes: int, directory: str | None = None):
        self.budget = int(budget_bytes)
        self.directory = directory
        self._tmp: str | None = None
        self._mem: dict[str, dict[int, np.ndarray]] = {}
        self._disk: dict[str, dict[int, str]] = {}
        self.dtypes: dict[str, np.dtype] = {}
        self.in_memory = 0           # bytes held now
        self.peak_memory = 0
        self.spilled = 0             # bytes written to disk, in total
        self._files = 0

    def __contains__(self, name: str) -> bool:
        return name in self.dtypes

    def names(self) -> list[str]:
        return list(self.dtypes)

    def put(self, name: str, batch: int, value: np.ndarray) -> None:
        value = np.ascontiguousarray(value)
        self.dtypes[name] = value.dtype
        if self.in_memory + value.nbytes <= self.budget:
            self._mem.setdefault(name, {})[batch] = value
            self.in_memory += value.nbytes
            self.peak_memory = max(self.peak_memory, self.in_memory)
            return
        if self._tmp is None:
            self._tmp = tempfile.mkdtemp(prefix="qgraph-replay-", dir=self.directory)
        self._files += 1
        path = os.path.join(self._tmp, f"{self._files}.npy")
        np.save(path, value, allow_pickle=False)
        self._disk.setdefault(name, {})[batch] = path
        self.spilled += value.nbytes

    def get(self, name: str, batch: int) -> np.ndarray:
        held = self._mem.get(name, {})
        if batch in held:
            return held[batch]
        path = self._disk.get(name, {}).get(batch)
        if path is None:
            raise KeyError(f"{name} (batch {batch}) is not cached")
        return np.load(path, allow_pickle=False)

    def drop(self, name: str) -> None:
        for v in self._mem.pop(name, {}).values():
            self.in_memory -= v.nbytes
        for path in self._disk.pop(name, {}).values():
            os.remove(path)
        self.dtypes.pop(name, None)

    def close(self) -> None:
        self._mem.clear()
        self._disk.clear()
        self.dtypes.clear()
        self.in_memory = 0
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    def __enter__(self) -> "BatchCache":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def replay(model: onnx.ModelProto, samples, cache: BatchCache, *, keep: list[str], batch_size: int,
           progress: bool = False, desc: str = "replay", source: onnx.ModelProto | None = None
           ) -> Iterator[dict[str, np.ndarray]]:
    """Run ``model`` once over the batches of ``samples``. Its inputs come from ``cache`` when held
    there, else from the samples (graph inputs); its outputs named in ``keep`` go into the cache;
    the other outputs are yielded per batch. ``source`` (the full model) fixes the batch size when
    its inputs have a fixed batch dimension; every replay of one cache must batch the same way."""
    from qgraph.ops import ort_session
    sess = ort_session(model)
    inputs = [i.name for i in sess.get_inputs()]
    outputs = [o.name for o in sess.get_outputs()]
    rest = [o for o in outputs if o not in set(keep)]
    bs = batch_size_for(source if source is not None else model, batch_size)
    n_batches = math.ceil(len(samples) / bs)
    from_samples = [n for n in inputs if n not in cache]
    feeds = samples.batches(bs) if from_samples else iter([None] * n_batches)
    bar = progress_bar(len(samples), desc) if progress else None
    try:
        for b, fed in zip(range(n_batches), feeds):
            feed = {}
            for n in inputs:
                if n in cache:
                    feed[n] = cache.get(n, b)
                elif fed is not None and n in fed:
                    feed[n] = fed[n]
                else:
                    raise ModelError(f"replay: input '{n}' is neither cached nor in the calibration data")
            values = dict(zip(outputs, run_session(sess, outputs, feed)))
            for n in keep:
                cache.put(n, b, values.pop(n))
            if bar is not None:
                bar.update(min(bs, len(samples) - b * bs))
            yield {n: values[n] for n in rest}
    finally:
        if bar is not None:
            bar.close()
        del sess
        release_memory()
