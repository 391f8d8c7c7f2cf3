"""The channel view of a graph: which channels are tied to which (DepGraph, Fang et al. 2023, on ONNX).

Removing channel c of one tensor forces a set of channels out of other tensors: the BatchNorm after
the layer that writes it, the next layer's input, every tensor joined to it by a residual Add, a
position of a Concat, a block of features after Flatten. This module finds those sets.

Each channel-carrying tensor t has a channel axis and C_t channels; its channels are *atoms*. Every
op says how the atoms of its inputs and outputs correspond (a list of atom pairs):

    layers (Conv/Gemm/MatMul)   none between input and output: a layer is where coupling stops;
                                depthwise/grouped with one input per group: input group j <-> output
                                group j (the group shrinks with them); wider groups add a *balance*
                                constraint instead (every group must lose as many channels)
    elementwise (with numpy     output c <-> input c for every non-constant input that has the
    broadcasting)               channel (a residual Add ties both branches; a squeeze-excite gate
                                [N,C,1,1] ties the gate to the gated tensor); broadcast inputs are free
    Concat / Split / Slice      output c <-> input (c - offset), on the channel axis
    Reshape/Flatten/Transpose/  a channel <-> a block of features (Flatten into a Gemm); a split of the
    Squeeze/Unsqueeze           channel axis (A, B) keeps the outer factor and prunes the inner one
                                (channel shuffle Reshape-Transpose-Reshape: same index in every group)
    pools, Resize, Pad, BN,     output c <-> input c
    activations, ...

Atoms tied by pairs form *units*: what one removal takes out, in every tensor at once. Units that
touch the same tensors form a *group* (DepGraph's group: "channel i of these coupled layers"), with a
balance class per unit when a grouped convolution requires that every group loses as many channels.

A unit is *frozen* when any of its atoms is: graph inputs and outputs, inputs and outputs of ops the
analysis does not know (``unknown_op:LRN``), tensors whose shape it cannot read, and so on; the reason
travels with it to the report.

``channel_graph(g)`` is the networkx view (tensors and ops as nodes, annotated with channel axes and
couplings), rebuilt from the graph on demand and never edited; ``dependency_groups(g)`` the groups.
"""
from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from qgraph import ir
from qgraph.channel_rules import Coupling, Rules, is_const
from qgraph.static import known_shape, refresh_shapes, resolve_static, static_tensors  # noqa: F401
from qgraph.ops import LAYER_OPS

if TYPE_CHECKING:  # pragma: no cover - networkx is imported where a view is built (17 MB: not for every command)
    import networkx as nx

# ----------------------------------------------------------------------------- per-tensor facts

@dataclass
class TensorChannels:
    """Where a tensor's channels are: axis, count, and the first atom id in ``Dependencies.atom_unit``."""
    name: str
    axis: int
    channels: int
    offset: int = 0

    @property
    def atoms(self) -> slice:
        return slice(self.offset, self.offset + self.channels)


# ----------------------------------------------------------------------------- the networkx view

def channel_graph(g) -> nx.DiGraph:
    """A read-only networkx view of ``g``: tensors and ops as nodes, built fresh on every call.

    Tensor nodes ``("tensor", name)``: ``axis`` (channel axis or None), ``channels``, ``shape``,
    ``const``, ``frozen`` (reasons). Op nodes ``("op", i)`` (i = position in ``g.nodes``): ``op``,
    ``name``, ``rule``, ``pairs`` (atom pairs: (tensor a, ids a, tensor b, ids b)), ``balance``
    ((tensor, class per channel, layer) constraints). Edges tensor -> op and op -> tensor carry the
    input / output ``index``.
    """
    rules = Rules(g)
    rules.run()
    frozen: dict[str, list[str]] = defaultdict(list)
    for t in g.inputs:
        frozen[t.name].append("graph_input")
    for t in g.outputs:
        frozen[t.name].append("graph_output")
    import networkx as nx
    cg = nx.DiGraph()
    for t in g.tensors().values():
        if not t.name:
            continue
        shp = known_shape(t)
        a = rules.axis.get(t.name)
        n = shp[a] if shp is not None and a is not None and a < len(shp) else None
        cg.add_node(("tensor", t.name), kind="tensor", axis=a, channels=n, shape=shp,
                    const=is_const(t), frozen=frozen[t.name])
    for i, node in enumerate(g.nodes):
        c = rules.couplings.get(i, Coupling())
        for t, reason in c.freeze:
            if reason not in cg.nodes[("tensor", t.name)]["frozen"]:
                cg.nodes[("tensor", t.name)]["frozen"].append(reason)
        cg.add_node(("op", i), kind="op", op=node.op, name=node.name, rule=c.rule,
                    pairs=[(a.name, ia, b.name, ib) for a, ia, b, ib in c.pairs],
                    balance=[(t.name, labels, who) for t, labels, who in c.balance])
        for k, t in enumerate(node.inputs):
            if t is not None and t.name:
                cg.add_edge(("tensor", t.name), ("op", i), index=k)
        for k, t in enumerate(node.outputs):
            cg.add_edge(("op", i), ("tensor", t.name), index=k)
    return cg


# ----------------------------------------------------------------------------- dependency groups

@dataclass
class Group:
    """Channels coupled across layers: ``units[k]`` is one removable channel (with its copies in every
    tensor of ``tensors``). ``classes[k]`` is the unit's balance class (None: no constraint; -1: free):
    a removal must take as many units from every class. ``frozen``: why the group cannot be pruned
    (empty: it can); ``fixed[k]``: a unit that must stay although the group can be pruned."""
    id: int
    units: np.ndarray
    tensors: list[str]
    producers: list[str]          # layers writing these channels (node names)
    consumers: list[str]          # layers reading them
    classes: np.ndarray | None = None
    frozen: list[str] = field(default_factory=list)
    fixed: np.ndarray | None = None     # units that must stay (their removal would unbalance a grouped conv)

    @property
    def size(self) -> int:
        return len(self.units)

    def label(self) -> str:
        who = self.producers or self.consumers or self.tensors
        return who[0] + (f" +{len(who) - 1}" if len(who) > 1 else "")


@dataclass
class Dependencies:
    """The coupling of a graph's channels: atoms (channels of each tensor), the unit each atom belongs
    to, and the groups of units."""
    tensors: dict[str, TensorChannels]
    atom_unit: np.ndarray
    groups: list[Group]
    view: nx.DiGraph

    def unit_atoms(self, units) -> dict[str, np.ndarray]:
        """tensor name -> channel ids (sorted) that ``units`` take out of it."""
        hit = np.isin(self.atom_unit, np.asarray(units, np.int64))
        out = {}
        for name, tc in self.tensors.items():
            ids = np.flatnonzero(hit[tc.atoms])
            if ids.size:
                out[name] = ids
        return out

    def frozen_reasons(self) -> Counter:
        """Frozen groups by reason (a group frozen for several reasons counts under each)."""
        return Counter(r for grp in self.groups for r in dict.fromkeys(grp.frozen))

    def prunable(self) -> list[Group]:
        return [grp for grp in self.groups if not grp.frozen]


def _components(n: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Connected components of n items under pairs (a, b): hook larger roots under smaller, compress."""
    label = np.arange(n, dtype=np.int64)
    while a.size:
        la, lb = label[a], label[b]
        lo, hi = np.minimum(la, lb), np.maximum(la, lb)
        diff = lo != hi
        if not diff.any():
            break
        np.minimum.at(label, hi[diff], lo[diff])
        while True:
            nxt = label[label]
            if np.array_equal(nxt, label):
                break
            label = nxt
    return label


def dependency_groups(g, view: nx.DiGraph | None = None) -> Dependencies:
    """The groups of coupled channels of ``g`` (see the module docstring)."""
    cg = view if view is not None else channel_graph(g)
    tensors: dict[str, TensorChannels] = {}
    offset = 0
    for key, d in cg.nodes(data=True):
        if d["kind"] == "tensor" and not d["const"] and d["channels"]:
            tensors[key[1]] = TensorChannels(key[1], d["axis"], int(d["channels"]), offset)
            offset += int(d["channels"])
    ops = [(key, d) for key, d in cg.nodes(data=True) if d["kind"] == "op"]
    pa, pb, broken = [], [], defaultdict(list)
    for _, d in ops:
        for ta, ia, tb, ib in d["pairs"]:
            if ta not in tensors or tb not in tensors:
                for t in (ta, tb):
                    if t in tensors:
                        broken[t].append("unknown_shape")
                continue
            ca, cb = tensors[ta], tensors[tb]
            if ia.size and (ia.max() >= ca.channels or ib.max() >= cb.channels):
                broken[ta].append("unknown_shape")
                broken[tb].append("unknown_shape")
                continue
            pa.append(ca.offset + ia)
            pb.append(cb.offset + ib)
    a = np.concatenate(pa) if pa else np.zeros(0, np.int64)
    b = np.concatenate(pb) if pb else np.zeros(0, np.int64)
    root = _components(offset, a.astype(np.int64), b.astype(np.int64))
    _, atom_unit = np.unique(root, return_inverse=True)
    n_units = int(atom_unit.max()) + 1 if offset else 0

    # freezing: a unit with any atom in a frozen tensor
    unit_reasons: dict[int, list[str]] = defaultdict(list)
    for name, tc in tensors.items():
        reasons = list(cg.nodes[("tensor", name)]["frozen"]) + broken.get(name, [])
        if reasons:
            for u in np.unique(atom_unit[tc.atoms]):
                unit_reasons[int(u)].extend(r for r in reasons if r not in unit_reasons[int(u)])

    # which tensors each unit touches: its group key
    tensor_of_atom = np.empty(offset, np.int64)
    names = list(tensors)
    for k, name in enumerate(names):
        tensor_of_atom[tensors[name].atoms] = k
    pairs = np.unique(np.stack([atom_unit, tensor_of_atom], 1), axis=0) if offset else np.zeros((0, 2), np.int64)
    touched: dict[int, list[int]] = defaultdict(list)
    for u, k in pairs:
        touched[int(u)].append(int(k))
    by_key: dict[tuple, list[int]] = defaultdict(list)
    for u in range(n_units):
        by_key[tuple(touched[u])].append(u)

    # balance constraints: a class per unit; a unit hitting every class alike is free; a unit hitting
    # classes unevenly (a shuffle block straddling two groups of a grouped conv) is fixed in place
    unit_class: dict[int, dict[int, int]] = defaultdict(dict)      # unit -> {constraint id: class}
    unit_fixed: dict[int, str] = {}
    n_constraints = 0
    for _, d in ops:
        for t, labels, _who in d["balance"]:
            if t not in tensors:
                continue
            cid = n_constraints
            n_constraints += 1
            units_here = atom_unit[tensors[t].atoms]
            n_classes = int(labels.max()) + 1
            order = np.argsort(units_here, kind="stable")
            bounds = np.flatnonzero(np.diff(units_here[order])) + 1
            for chunk in np.split(order, bounds):
                u = int(units_here[chunk[0]])
                hits = np.bincount(labels[chunk], minlength=n_classes)
                if np.count_nonzero(hits) == 1:
                    unit_class[u][cid] = int(np.flatnonzero(hits)[0])
                elif not np.all(hits == hits[0]):
                    unit_fixed[u] = "grouped_conv_uneven"

    # groups: units touching the same tensors, merged when a balance constraint spans them
    keys = list(by_key)
    parent = list(range(len(keys)))

    def find(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    owner = {}
    for gi, key in enumerate(keys):
        for u in by_key[key]:
            for cid in unit_class[u]:
                if cid in owner:
                    parent[find(gi)] = find(owner[cid])
                else:
                    owner[cid] = gi
    merged: dict[int, list[int]] = defaultdict(list)
    for gi in range(len(keys)):
        merged[find(gi)].append(gi)

    layer_roles = _layer_roles(cg)
    first = np.full(n_units, offset, np.int64)       # each unit's first atom: units keep graph order
    np.minimum.at(first, atom_unit, np.arange(offset))
    groups = []
    for members in merged.values():
        units = np.asarray(sorted((u for gi in members for u in by_key[keys[gi]]), key=lambda u: first[u]),
                           np.int64)
        tnames = sorted({names[k] for gi in members for k in keys[gi]}, key=lambda n: tensors[n].offset)
        frozen = list(dict.fromkeys(r for u in units for r in unit_reasons.get(int(u), [])))
        fixed = np.asarray([int(u) in unit_fixed for u in units], bool)
        classes, problem = _balance_classes(units, fixed, unit_class)
        if problem:
            frozen.append(problem)
        producers = sorted({n for t in tnames for n in layer_roles["writes"].get(t, [])})
        consumers = sorted({n for t in tnames for n in layer_roles["reads"].get(t, [])})
        groups.append(Group(len(groups), units, tnames, producers, consumers, classes, frozen, fixed))
    groups.sort(key=lambda grp: tensors[grp.tensors[0]].offset if grp.tensors else 0)
    for i, grp in enumerate(groups):
        grp.id = i
    return Dependencies(tensors, atom_unit, groups, cg)


def _balance_classes(units: np.ndarray, fixed: np.ndarray, unit_class: dict) -> tuple[np.ndarray | None, str | None]:
    """Class per unit (-1: free, removable alone) from its balance constraints, or a reason the group
    cannot be balanced: units constrained differently, or classes a removal round cannot cover evenly."""
    sets = {tuple(sorted(unit_class[int(u)])) for u, f in zip(units, fixed) if not f and unit_class[int(u)]}
    if not sets:
        return None, None
    if len(sets) > 1:
        return None, "grouped_conv_mixed"
    cids = sets.pop()
    combos = [tuple(unit_class[int(u)][c] for c in cids) if unit_class[int(u)] and not f else None
              for u, f in zip(units, fixed)]
    uniq = {cb: i for i, cb in enumerate(dict.fromkeys(cb for cb in combos if cb is not None))}
    for j in range(len(cids)):      # a round takes one unit per combined class: each constraint's
        per = Counter(cb[j] for cb in uniq)   # classes must appear in as many combined classes
        if len(set(per.values())) != 1:
            return None, "grouped_conv_uneven"
    return np.asarray([uniq[cb] if cb is not None else -1 for cb in combos], np.int64), None


def _layer_roles(cg: nx.DiGraph) -> dict:
    """tensor -> layers writing it (output) / reading it (input 0)."""
    writes, reads = defaultdict(list), defaultdict(list)
    for key, d in cg.nodes(data=True):
        if d["kind"] != "op" or d["op"] not in LAYER_OPS:
            continue
        for _, t, e in cg.out_edges(key, data=True):
            if e["index"] == 0:
                writes[t[1]].append(d["name"])
        for t, _, e in cg.in_edges(key, data=True):
            if e["index"] == 0:
                reads[t[1]].append(d["name"])
    return {"writes": writes, "reads": reads}
