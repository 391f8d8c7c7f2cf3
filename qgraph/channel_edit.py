"""Remove coupled channels from a graph: one removal edits every member consistently.

Given the units to remove (``qgraph.channels.Dependencies``), every tensor loses the same channels
in all its copies, and each op is rewritten to match:

    Conv                 W[out_keep][:, in_keep], bias[out_keep]; depthwise: group = channels kept;
                         grouped (g groups of k inputs): each group keeps its own inputs (as many in
                         every group: the balance constraint made sure)
    ConvTranspose        W[in_keep][:, out_keep] (one group)
    Gemm / MatMul        rows and columns of B / W, the bias C
    BatchNormalization,  the per-channel parameters
    InstanceNormalization
    elementwise ops      constant operands that broadcast per channel
    Split / Slice        split sizes, slice bounds
    Reshape / Resize     the channel entry of the target shape / sizes
and the shapes of the changed tensors (exported as value_info). Weights shared by several layers are
cut once; every other constant is replaced, never edited in place (it may be shared).
"""
from __future__ import annotations

import numpy as np

from qgraph import ir
from qgraph.errors import QGraphError
from qgraph.ops import input_at


class ChannelEdit:
    """The kept channel ids of every tensor that loses channels."""

    def __init__(self, g, deps, units):
        self.g = g
        self.deps = deps
        removed = deps.unit_atoms(units)
        self.keep: dict[str, np.ndarray] = {}
        self.old: dict[str, int] = {}
        for name, ids in removed.items():
            n = deps.tensors[name].channels
            mask = np.ones(n, bool)
            mask[ids] = False
            if not mask.any():
                raise QGraphError(f"pruning would remove every channel of '{name}'")
            self.keep[name] = np.flatnonzero(mask)
            self.old[name] = n
        self._cut_weights: dict[tuple, ir.Constant] = {}

    def kept(self, t) -> np.ndarray | None:
        return self.keep.get(t.name) if t is not None else None

    def count(self, t) -> int:
        return len(self.keep[t.name]) if t.name in self.keep else self.deps.tensors[t.name].channels

    # -- applying -------------------------------------------------------------------------

    def apply(self) -> int:
        """Rewrite the graph; returns the number of nodes edited."""
        edited = 0
        for node in list(self.g.nodes):
            touched = any(t is not None and t.name in self.keep for t in list(node.inputs) + list(node.outputs))
            if not touched:
                continue
            fn = getattr(self, "_" + node.op, None)
            if fn is None and node.op in ("Add", "Sub", "Mul", "Div", "Sum", "Max", "Min", "Mean", "Pow", "PRelu",
                                          "Where"):
                fn = self._elementwise
            if fn is not None:
                fn(node)
            edited += 1
        tensors = self.g.tensors()
        for name, keep in self.keep.items():
            t = tensors[name]
            shape = list(t.shape)
            shape[self.deps.tensors[name].axis] = len(keep)
            t.shape = shape
        return edited

    def _new_const(self, base: str, values: np.ndarray) -> ir.Constant:
        return ir.add_const(self.g, base, np.ascontiguousarray(values))

    def _set(self, node, i: int, values: np.ndarray) -> None:
        node.inputs[i] = self._new_const(node.inputs[i].name, values)

    # -- layers ---------------------------------------------------------------------------

    def _weight(self, node, key: tuple, make) -> None:
        """Replace ``node``'s weight by ``make(W)``, once per (weight, cut): shared weights stay shared."""
        w = node.inputs[1]
        k = (w.name,) + key
        if k not in self._cut_weights:
            self._cut_weights[k] = self._new_const(w.name, make(np.asarray(ir.const(w))))
        node.inputs[1] = self._cut_weights[k]

    @staticmethod
    def _key(a) -> bytes:
        return b"" if a is None else np.asarray(a, np.int64).tobytes()

    def _Conv(self, node) -> None:
        x, y = node.inputs[0], node.outputs[0]
        kin, kout = self.kept(x), self.kept(y)
        w_shape = tuple(node.inputs[1].shape)
        groups = int(node.attrs.get("group", 1))
        cpg_in = w_shape[1]
        if groups == 1:
            def make(w):
                w = w[kout] if kout is not None else w
                return w[:, kin] if kin is not None else w
        elif cpg_in == 1:                  # depthwise: groups go with their channels
            m = w_shape[0] // groups
            kin_ = kin if kin is not None else np.arange(groups)
            want = (kin_[:, None] * m + np.arange(m)).reshape(-1)
            if kout is not None and not np.array_equal(kout, want) or kout is None and kin is not None:
                raise QGraphError(f"Conv '{node.name}': depthwise channels pruned unevenly")
            node.attrs["group"] = len(kin_)

            def make(w):
                return w[want]
        else:
            make = self._grouped_cut(node, kin, kout, groups, w_shape)
        self._weight(node, (self._key(kin), self._key(kout)), make)
        self._bias(node, 2, kout)

    def _grouped_cut(self, node, kin, kout, groups: int, w_shape):
        cpg_in, cpg_out = w_shape[1], w_shape[0] // groups
        cin = cpg_in * groups
        kin_ = kin if kin is not None else np.arange(cin)
        kout_ = kout if kout is not None else np.arange(w_shape[0])
        local = [kin_[kin_ // cpg_in == j] % cpg_in for j in range(groups)]
        outs = [kout_[kout_ // cpg_out == j] for j in range(groups)]
        if len({len(v) for v in local}) != 1 or len({len(v) for v in outs}) != 1:
            raise QGraphError(f"Conv '{node.name}': groups would lose different channel counts")

        def make(w):
            return np.concatenate([w[o][:, local[j]] for j, o in enumerate(outs)], axis=0)
        return make

    def _ConvTranspose(self, node) -> None:
        kin, kout = self.kept(node.inputs[0]), self.kept(node.outputs[0])

        def make(w):
            w = w[kin] if kin is not None else w
            return w[:, kout] if kout is not None else w
        self._weight(node, (self._key(kin), self._key(kout)), make)
        self._bias(node, 2, kout)

    def _Gemm(self, node) -> None:
        kin, kout = self.kept(node.inputs[0]), self.kept(node.outputs[0])
        trans = bool(node.attrs.get("transB", 0))

        def make(w):
            rows, cols = (kout, kin) if trans else (kin, kout)
            w = w[rows] if rows is not None else w
            return w[:, cols] if cols is not None else w
        self._weight(node, (self._key(kin), self._key(kout)), make)
        c = input_at(node, 2)
        if kout is not None and c is not None:
            v = np.asarray(ir.const(c))
            if v.ndim >= 1 and v.shape[-1] == self.old[node.outputs[0].name]:
                self._set(node, 2, v[..., kout])

    def _MatMul(self, node) -> None:
        kin, kout = self.kept(node.inputs[0]), self.kept(node.outputs[0])

        def make(w):
            w = w[kin] if kin is not None else w
            return w[:, kout] if kout is not None else w
        self._weight(node, (self._key(kin), self._key(kout)), make)

    def _bias(self, node, i: int, kout) -> None:
        b = input_at(node, i)
        if b is not None and kout is not None:
            self._set(node, i, np.asarray(ir.const(b))[kout])

    # -- per-channel parameters -----------------------------------------------------------

    def _BatchNormalization(self, node) -> None:
        keep = self.kept(node.outputs[0])
        for i in range(1, 5):
            self._set(node, i, np.asarray(ir.const(node.inputs[i]))[keep])

    def _InstanceNormalization(self, node) -> None:
        keep = self.kept(node.outputs[0])
        for i in (1, 2):
            self._set(node, i, np.asarray(ir.const(node.inputs[i]))[keep])

    def _elementwise(self, node) -> None:
        y = node.outputs[0]
        keep = self.kept(y)
        if keep is None:
            return
        axis, old, rank = self.deps.tensors[y.name].axis, self.old[y.name], len(y.shape)
        for i, t in enumerate(node.inputs):
            v = ir.const(t) if t is not None and t.name else None
            if v is None:
                continue
            v = np.asarray(v)
            k = axis - (rank - v.ndim)
            if 0 <= k < v.ndim and v.shape[k] == old and old > 1:
                self._set(node, i, np.take(v, keep, axis=k))

    # -- slicing and shapes ---------------------------------------------------------------

    def _Split(self, node) -> None:
        x = node.inputs[0]
        tc = self.deps.tensors.get(x.name)
        if tc is None or int(node.attrs.get("axis", 0)) % len(x.shape) != tc.axis:
            return
        sizes = np.asarray([self.count(o) for o in node.outputs], np.int64)
        node.attrs.pop("num_outputs", None)
        if "split" in node.attrs:
            node.attrs["split"] = [int(v) for v in sizes]
        elif input_at(node, 1) is not None:
            self._set(node, 1, sizes)
        else:
            while len(node.inputs) < 2:
                node.inputs.append(None)
            node.inputs[1] = self._new_const(node.name + "_split", sizes)

    def _Slice(self, node) -> None:
        x, y = node.inputs[0], node.outputs[0]
        tc = self.deps.tensors.get(x.name)
        kin = self.kept(x)
        if tc is None or kin is None:
            return
        rank = len(x.shape)
        starts = np.asarray(ir.const(node.inputs[1])).copy()
        ends = np.asarray(ir.const(node.inputs[2])).copy()
        axes_t = input_at(node, 3)
        axes = np.asarray(ir.const(axes_t)) if axes_t is not None else np.arange(len(starts))
        axes = [int(v) % rank for v in axes.reshape(-1)]
        if tc.axis not in axes:
            return
        k = axes.index(tc.axis)
        n = self.old[x.name]
        start = int(starts[k])
        start = max(0, min(n, start + n if start < 0 else start))
        new_start = int(np.count_nonzero(kin < start))
        starts[k], ends[k] = new_start, new_start + self.count(y)
        self._set(node, 1, starts)
        self._set(node, 2, ends)

    def _Reshape(self, node) -> None:
        y = node.outputs[0]
        if y.name not in self.keep:
            return
        target = ir.const(node.inputs[1])
        if target is None:           # computed at run time: its channel entry is -1 or 0 (the analysis checked)
            return
        shape = np.asarray(target, np.int64).copy()
        a = self.deps.tensors[y.name].axis
        if shape[a] > 0:
            shape[a] = self.count(y)
            self._set(node, 1, shape)

    def _Resize(self, node) -> None:
        y = node.outputs[0]
        sizes = input_at(node, 3)
        if y.name in self.keep and sizes is not None and ir.const(sizes) is not None and np.size(ir.const(sizes)):
            v = np.asarray(ir.const(sizes), np.int64).copy()
            v[self.deps.tensors[y.name].axis] = self.count(y)
            self._set(node, 3, v)


def remove_units(g, deps, units) -> ChannelEdit:
    """Remove ``units`` (ids in ``deps``) from ``g`` in place; returns the edit (kept ids per tensor)."""
    edit = ChannelEdit(g, deps, units)
    edit.apply()
    return edit
