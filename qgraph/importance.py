"""Channel importance for pruning, aggregated over a coupled group (``qgraph.channels.Group``).

Scores are per unit; lower goes first.

    l1 / l2      DepGraph's group magnitude (Fang et al. 2023 §3.3): I_u = mean over the group's members
                 (rows of the layers writing unit u, columns of the layers reading it) of Σ |w|^p
    bn_gamma     network slimming (Liu et al. 2017): I_u = Σ |γ_u| over the BatchNorms on the group
    taylor_act   the output error of the layers reading the group when the unit goes, from their input
                 covariance H = Cov[x] on calibration data (the means of removed inputs go into the
                 bias), relative to their output variance tr(W H Wᵀ). The error of a linear layer is quadratic in its inputs, so its
                 second-order Taylor expansion is exact (LeCun et al. 1990; Hassibi & Stork 1993):
                   without reconstruction (the weights stay):   ΔE = tr(W_B H_BB W_Bᵀ)
                   with reconstruction (the rest is refit):     ΔE = tr(W_B [(H⁻¹)_BB]⁻¹ W_Bᵀ)
                 (B: the unit's inputs: one column of a 1x1 conv or Gemm, k² of a kxk conv, a block of
                 features after Flatten). With reconstruction, units go greedily, H⁻¹ and W updated
                 after each (optimal brain surgeon). A unit's score is the total error once it and
                 every unit ranked before it are gone. Readers whose H would not fit in memory use
                 the diagonal of H (Molchanov et al. 2019's activation term).

Magnitude scores differ in scale from group to group; ``normalized`` divides them by their group's
mean (Torch-Pruning's mean normalizer). taylor_act's scores are already fractions of an output's
energy, comparable across groups.
"""
from __future__ import annotations

import numpy as np

from qgraph import ir
from qgraph.jit import njit
from qgraph.ops import LAYER_OPS

#: readers with more inputs than this use the diagonal of H (a dense H of 4096² doubles is 128 MB)
MAX_DENSE = 4096
DAMP = 1e-4


def _is_depthwise(node) -> bool:
    return node.op == "Conv" and int(node.attrs.get("group", 1)) > 1 and node.inputs[1].shape[1] == 1


def magnitude(g, deps, groups, power: int) -> dict[int, np.ndarray]:
    """DepGraph group magnitude: mean over members of Σ |w|^p of the unit's rows and columns."""
    total, members = _accumulators(deps)
    wanted = {t for grp in groups for t in grp.tensors}
    for node in g.nodes:
        if node.op not in LAYER_OPS or ir.const(node.inputs[1]) is None:
            continue
        w_in, w_out = layer_norms(node, power)
        if node.outputs[0].name in wanted:
            _add(deps, total, members, node.outputs[0].name, w_out)
        if node.inputs[0].name in wanted:
            _add(deps, total, members, node.inputs[0].name, w_in)
    return _per_group(groups, total, members)


def bn_gamma(g, deps, groups) -> dict[int, np.ndarray]:
    total, members = _accumulators(deps)
    wanted = {t for grp in groups for t in grp.tensors}
    for node in g.nodes:
        if node.op == "BatchNormalization" and node.inputs[0].name in wanted:
            _add(deps, total, members, node.inputs[0].name, np.abs(np.asarray(ir.const(node.inputs[1]), np.float64)))
    out = _per_group(groups, total, members)
    return {k: v * np.maximum(members[groups_by_id(groups)[k].units], 1) for k, v in out.items()}   # a sum


def groups_by_id(groups) -> dict:
    return {grp.id: grp for grp in groups}


def normalized(scores: dict[int, np.ndarray]) -> dict[int, np.ndarray]:
    """Each group's scores divided by their mean."""
    out = {}
    for k, v in scores.items():
        m = float(np.mean(v)) if v.size else 0.0
        out[k] = v / m if m > 0 else np.zeros_like(v)
    return out


def _accumulators(deps):
    n_units = int(deps.atom_unit.max()) + 1 if deps.atom_unit.size else 0
    return np.zeros(n_units), np.zeros(n_units)


def _add(deps, total, members, tensor: str, per_channel: np.ndarray) -> None:
    units = deps.atom_unit[deps.tensors[tensor].atoms]
    np.add.at(total, units, per_channel)
    members[np.unique(units)] += 1


def _per_group(groups, total, members) -> dict[int, np.ndarray]:
    return {grp.id: total[grp.units] / np.maximum(members[grp.units], 1) for grp in groups}


def layer_norms(node, p: int) -> tuple[np.ndarray, np.ndarray]:
    """Σ|w|^p per input channel and per output channel of a layer."""
    w = np.abs(np.asarray(ir.const(node.inputs[1]), np.float64)) ** p
    op = node.op
    if op == "Conv":
        groups = int(node.attrs.get("group", 1))
        cout, cpg = w.shape[0], w.shape[1]
        per = w.reshape(cout, cpg, -1).sum(axis=2)              # [Cout, Cin/g]
        out = per.sum(axis=1)
        inp = per.reshape(groups, cout // groups, cpg).sum(axis=1).reshape(-1)
        return inp, out
    if op == "ConvTranspose":
        return w.sum(axis=tuple(range(1, w.ndim))), w.sum(axis=(0,) + tuple(range(2, w.ndim)))
    if op == "Gemm" and node.attrs.get("transB", 0):
        return w.sum(axis=0), w.sum(axis=1)
    return w.sum(axis=1), w.sum(axis=0)                         # Gemm B[K, N] / MatMul W[K, N]


# ----------------------------------------------------------------------------- output error (taylor_act)

def readers(g, groups) -> dict[str, object]:
    """The layers whose output error measures a group's units: every layer reading a group tensor,
    except depthwise convolutions inside the group (their kept channels read what they read before)."""
    wanted = {t for grp in groups for t in grp.tensors}
    out = {}
    for node in g.nodes:
        if node.op in ("Conv", "Gemm", "MatMul") and node.inputs[0].name in wanted \
                and ir.const(node.inputs[1]) is not None and not _is_depthwise(node):
            if node.op == "Conv" and len(node.inputs[1].shape) != 4:
                continue
            if node.op == "Gemm" and node.attrs.get("transA", 0):
                continue
            out[node.name] = node
    return out


def _matrix(node) -> tuple[np.ndarray, int]:
    """W as [G, R, K] over the reader's input features (conv: channel-major patches) and the
    kernel size per input channel."""
    from qgraph.rounding import layer_matrix
    w = np.asarray(ir.const(node.inputs[1]), np.float64)
    m, _ = layer_matrix(node, w)
    kk = int(np.prod(w.shape[2:])) if node.op == "Conv" else 1
    return m, kk


def shrunk(h: np.ndarray, rows: int) -> np.ndarray:
    """A covariance estimated from ``rows`` samples, shrunk toward its diagonal by α = min(1, K/rows)
    (Ledoit & Wolf 2004's target; the weight is the dimension-to-sample ratio): with fewer samples
    than inputs the off-diagonal part is mostly noise, and OBS would find whole subspaces "free"."""
    k = h.shape[-1]
    alpha = min(1.0, k / max(rows, 1))
    if alpha <= 0:
        return h
    out = (1 - alpha) * h
    idx = np.arange(k)
    out[:, idx, idx] += alpha * h[:, idx, idx]
    return out


def output_sensitivity(model, readers: dict, samples, *, eps: float = 0.01, images: int = 16) -> dict[str, float]:
    """How much of a relative error at each reader's output reaches the model's outputs: a perturbation
    of relative size eps (another image's centered output of the same layer, scaled: an error shaped
    like feature maps) is added to one reader's output at a time, and s = (Σ E||Δout||² / Σ E||out||²)
    / (its energy / Var[y]) is measured: the error's gain through the rest of the network, linearized
    (one ORT session, the first ``images`` of ``samples``)."""
    import onnx
    from qgraph.ops import ort_session
    m = onnx.ModelProto()
    m.CopyFrom(model)
    outs = {node.name: node.output[0] for node in m.graph.node if node.name in readers}
    for node in m.graph.node:
        if node.name in outs:
            node.output[0] = outs[node.name] + "__clean"
    for name, y in outs.items():
        m.graph.node.append(onnx.helper.make_node("Add", [y + "__clean", y + "__noise"], [y], name=name + "__noisy"))
        m.graph.input.append(onnx.helper.make_tensor_value_info(y + "__noise", onnx.TensorProto.FLOAT, None))
    finals = [o.name for o in m.graph.output]
    clean_names = [y + "__clean" for y in outs.values()]
    m.graph.output.extend(onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in clean_names)
    sess = ort_session(m)
    from qgraph.calibrate import batch_size_for
    names_in = {i.name for i in model.graph.input}
    subset = samples.subset(range(min(images, len(samples))))
    feeds = [{k: v for k, v in f.items() if k in names_in} for f in subset.batches(batch_size_for(model, images))]
    silent = {y + "__noise": np.zeros(1, np.float32) for y in outs.values()}
    base, ys = [], {y: [] for y in outs.values()}
    for f in feeds:
        r = sess.run(finals + clean_names, {**f, **silent})
        base.append(r[:len(finals)])
        for y, v in zip(outs.values(), r[len(finals):]):
            ys[y].append(v)
    energy = sum(float(np.sum(np.square(x, dtype=np.float64))) for b in base for x in b)
    out = {}
    for name, y in outs.items():
        v = np.concatenate(ys[y])
        axis = v.ndim - 1 if v.ndim == 2 or readers[name].op == "MatMul" else 1
        flat = np.moveaxis(v, axis, 0).reshape(v.shape[axis], -1)
        shape = [1] * v.ndim
        shape[axis] = -1
        mean, std = flat.mean(axis=1).reshape(shape), flat.std(axis=1)
        # the error pruning leaves is made of feature maps, not white noise (which a global pool
        # averages away): the next image's centered activations, scaled to eps of the variance
        noise = ((np.roll(v, -1, axis=0) - mean) * np.sqrt(eps)).astype(np.float32)
        delta, start = 0.0, 0
        for f, clean in zip(feeds, base):
            n = len(next(iter(f.values())))
            got = sess.run(finals, {**f, **silent, y + "__noise": noise[start:start + n]})
            delta += sum(float(np.sum(np.square(a.astype(np.float64) - c))) for a, c in zip(got, clean))
            start += n
        injected = float(np.sum(np.square(noise, dtype=np.float64)))
        variance = float(np.sum(np.square(std))) * v.size / v.shape[axis]
        out[name] = (delta / max(energy, 1e-30)) / max(injected / max(variance, 1e-30), 1e-30)
    return out


def output_error(g, deps, groups, hessians: dict[str, np.ndarray], *, compensate: bool,
                 gain: dict[str, float] | None = None) -> dict[int, np.ndarray]:
    """taylor_act: per group, the relative output error each unit's removal costs its readers
    (see the module docstring). ``hessians``: reader name -> H [G, K, K] (or its diagonal [G, K]);
    pass the covariance of the inputs when the means of removed inputs go into the bias. ``gain``:
    per reader, the share of its relative error that reaches the model's outputs (see
    ``output_sensitivity``): the errors then count at the outputs, comparable from depth to depth."""
    nodes = readers(g, groups)
    out = {}
    for grp in groups:
        parts = []                        # per reader: (W [G,R,K], H or diag, blocks per unit, energy)
        for name, node in nodes.items():
            x = node.inputs[0].name
            if x not in grp.tensors or name not in hessians:
                continue
            m, kk = _matrix(node)
            h = hessians[name]
            if m.shape[0] != 1 and h.ndim == 3:     # grouped reader: the diagonal of each group's H
                h = np.diagonal(h, axis1=1, axis2=2)
            tc = deps.tensors[x]
            units_of_channel = deps.atom_unit[tc.atoms]
            blocks = []
            for u in grp.units:
                ch = np.flatnonzero(units_of_channel == u)
                blocks.append((ch[:, None] * kk + np.arange(kk)).reshape(-1))
            weight = 1.0 if gain is None else gain.get(name, 1.0)
            parts.append((m, h, blocks, weight))
        if not parts:
            out[grp.id] = np.zeros(grp.size)
            continue
        out[grp.id] = _greedy(parts, grp.size) if compensate else _cumulative(_diagonal(parts, grp.size))
    return out


def _cumulative(delta: np.ndarray) -> np.ndarray:
    """Independent errors -> the total error once this unit and every cheaper one are gone."""
    order = np.argsort(delta, kind="stable")
    out = np.empty_like(delta)
    out[order] = np.cumsum(delta[order])
    return out


def _energy(m: np.ndarray, h: np.ndarray) -> float:
    if h.ndim == 3:
        return quadratic(m, h)
    return float(np.einsum("grk,gk->", m * m, h))


def quadratic(m: np.ndarray, h: np.ndarray) -> float:
    """Σ_g tr(M_g H_g M_gᵀ) as a BLAS product (a three-operand einsum loops in C without BLAS)."""
    return float(np.sum((m @ h) * m))


def _diagonal(parts, n: int) -> np.ndarray:
    """ΔE_u = Σ_readers tr(W_B H_BB W_Bᵀ) / E||y||² with the weights kept (no compensation)."""
    score = np.zeros(n)
    for m, h, blocks, weight in parts:
        energy = max(_energy(m, h), 1e-30) / weight
        if h.ndim == 3 and m.shape[0] == 1:
            hh, w = h[0], m[0]
            for u, b in enumerate(blocks):
                if b.size:
                    wb = w[:, b]
                    score[u] += float(np.einsum("rk,kl,rl->", wb, hh[np.ix_(b, b)], wb)) / energy
        else:
            diag = h if h.ndim == 2 else np.diagonal(h, axis1=1, axis2=2)
            contrib = np.einsum("grk,gk->k", m * m, diag) if m.shape[0] == 1 else \
                (m * m * diag[:, None, :]).sum(axis=1).reshape(-1)
            for u, b in enumerate(blocks):
                if b.size:
                    score[u] += float(contrib[b].sum()) / energy
    return score


def _greedy(parts, n: int) -> np.ndarray:
    """Optimal-brain-surgeon order: repeatedly remove the unit whose removal adds the least relative
    error over all readers (the rest of each reader refit), updating H⁻¹ and W after each. Returns
    per unit the total error once it and every unit before it are gone (increasing along the order,
    so sorting by it gives the order)."""
    state = []
    for m, h, blocks, weight in parts:
        if h.ndim != 3 or m.shape[0] != 1 or h.shape[1] > MAX_DENSE:
            state.append(None)            # too large or grouped: diagonal, no compensation
            continue
        hh = h[0].copy()
        idx = np.arange(hh.shape[0])
        dead = hh[idx, idx] <= 0
        hh[idx, idx] += DAMP * max(float(hh[idx, idx].mean()), 1e-12) + dead
        single = all(b.size <= 1 for b in blocks)
        s = {"w": m[0].copy(), "hinv": np.linalg.inv(hh), "energy": max(_energy(m, h), 1e-30) / weight,
             "blocks": blocks, "single": single}
        if single:                        # one input per unit: the compiled rank-one OBS step
            s["wt"] = np.ascontiguousarray(s.pop("w").T)
            s["cols"] = np.array([b[0] if b.size else -1 for b in blocks], np.int64)
            s["colcost"] = _column_costs(s["wt"], s["hinv"])
        state.append(s)
    fixed = _diagonal([p for p, s in zip(parts, state) if s is None], n) if any(s is None for s in state) \
        else np.zeros(n)
    alive = np.ones(n, bool)
    marginal = np.zeros(n)
    order = []
    for _ in range(n):
        cost = fixed.copy()
        for s in state:
            if s is None:
                continue
            if s["single"]:
                has = (s["cols"] >= 0) & alive
                cost[has] += s["colcost"][s["cols"][has]] / s["energy"]
            else:
                cost += _removal_costs(s, alive) / s["energy"]
        cost[~alive] = np.inf
        u = int(np.argmin(cost))
        marginal[u] = cost[u]
        order.append(u)
        alive[u] = False
        for s in state:
            if s is None or not s["blocks"][u].size:
                continue
            if s["single"]:
                obs_remove_column(s["wt"], s["hinv"], int(s["cols"][u]), s["colcost"])
            else:
                _remove(s, s["blocks"][u])
    out = np.zeros(n)
    total = 0.0
    for u in order:
        total += max(marginal[u], 0.0)
        out[u] = total
    return out


def _column_costs(wt: np.ndarray, hinv: np.ndarray) -> np.ndarray:
    """OBS cost of removing each single input c: ||W[:, c]||² / [H⁻¹]_cc (``wt`` is Wᵀ)."""
    return np.einsum("kr,kr->k", wt, wt) / np.maximum(np.diagonal(hinv), 1e-30)


@njit()
def obs_remove_column(wt, hinv, j, colcost):  # pragma: no cover - compiled
    """The OBS step for one input j, in place (numpy reference: ``_remove`` with b = [j]):
    Wᵀ_c -= (H⁻¹_jc / H⁻¹_jj) Wᵀ_j and H⁻¹ -= H⁻¹_:j H⁻¹_j: / H⁻¹_jj for every c, row and column j
    zeroed; then ``colcost`` [K] gets every input's new removal cost ||W_:c||² / max(H⁻¹_cc, 1e-30).
    wt: float64 [K, R] (Wᵀ, rows contiguous), hinv: float64 [K, K] symmetric."""
    k, r = wt.shape
    d = hinv[j, j]
    if d < 1e-30:
        d = 1e-30
    hj = hinv[j].copy()
    wj = wt[j].copy()
    for c in range(k):
        f = hj[c] / d
        if f != 0.0:
            for i in range(r):
                wt[c, i] -= f * wj[i]
            for i in range(k):
                hinv[c, i] -= f * hj[i]
    for i in range(r):
        wt[j, i] = 0.0
    for i in range(k):
        hinv[j, i] = 0.0
        hinv[i, j] = 0.0
    for c in range(k):
        acc = 0.0
        for i in range(r):
            acc += wt[c, i] * wt[c, i]
        dc = hinv[c, c]
        if dc < 1e-30:
            dc = 1e-30
        colcost[c] = acc / dc


def _removal_costs(s: dict, alive_units: np.ndarray) -> np.ndarray:
    w, hinv, blocks = s["w"], s["hinv"], s["blocks"]
    cost = np.zeros(len(blocks))
    sizes = {len(b) for b in blocks if b.size}
    if sizes == {1}:                      # one input per unit: vectorized
        cols = np.array([b[0] if b.size else 0 for b in blocks])
        has = np.array([b.size > 0 for b in blocks]) & alive_units
        d = np.maximum(hinv[cols, cols], 1e-30)
        c = (w[:, cols] ** 2).sum(axis=0) / d
        cost[has] = c[has]
        return cost
    for u, b in enumerate(blocks):
        if not b.size or not alive_units[u]:
            continue
        wb = w[:, b]
        inv = np.linalg.pinv(hinv[np.ix_(b, b)])
        cost[u] = float(np.einsum("rk,kl,rl->", wb, inv, wb))
    return cost


def _remove(s: dict, b: np.ndarray) -> None:
    """OBS: drop inputs ``b``; the other weights absorb them (W_R -= W_B (H⁻¹_BB)⁻¹ H⁻¹_BR) and H⁻¹
    becomes the inverse over the remaining inputs."""
    w, hinv = s["w"], s["hinv"]
    inv = np.linalg.pinv(hinv[np.ix_(b, b)])
    w -= (w[:, b] @ inv) @ hinv[b, :]
    hinv -= hinv[:, b] @ inv @ hinv[b, :]
    w[:, b] = 0.0
    hinv[b, :] = 0.0
    hinv[:, b] = 0.0
