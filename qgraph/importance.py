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


# ----------------------------------------------------------------------------- measured allocation

def output_loss(ref: list[np.ndarray], got: list[np.ndarray]) -> float:
    """How far the model's outputs moved, summed over its outputs: the KL divergence KL(p_ref || p) of
    the softmax over the last axis for class scores ([N, C] logits, or probabilities when every row
    already sums to one), the squared error relative to the reference's energy for anything else."""
    total = 0.0
    for a, b in zip(ref, got):
        a = np.asarray(a, np.float64)
        b = np.asarray(b, np.float64)
        if a.ndim == 2 and a.shape[1] > 1:
            probs = a.min() >= 0 and np.allclose(a.sum(axis=1), 1.0, atol=1e-3)
            la = np.log(np.maximum(a, 1e-12)) if probs else _log_softmax(a)
            lb = np.log(np.maximum(b, 1e-12)) if probs else _log_softmax(b)
            total += float(np.sum(np.exp(la) * (la - lb)))
        else:
            total += float(np.sum(np.square(a - b))) / max(float(np.sum(np.square(a))), 1e-30) * len(a)
    return total


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(axis=1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=1, keepdims=True))


def measured_scores(g, deps, groups, orders: dict[int, np.ndarray], limits: dict[int, int], stats, *,
                    reconstruct: bool, samples, points: int = 7, images: int = 32,
                    progress: bool = False) -> tuple[dict[int, np.ndarray], dict[str, list]]:
    """Each group's measured loss curve (sensitivity analysis, as AMC / NetAdapt without training): the
    group alone loses its first k units along its removal order ``orders[id]`` (positions into
    ``group.units``), for k at ``points`` fractions 1/(points+1) … points/(points+1) of its size (and
    at its limit), its readers' weights become what the pass will give them:

        reconstruct   W'_K = W H_{:,K} (H_KK)⁻¹ (the least-squares refit of the kept inputs K on the
                      original inputs, H = Cov[x] shrunk; He et al. 2017 with the original inputs)
        otherwise     W'_K = W_K (the removed columns dropped)
        both          b' = b + W μ − W'_K μ_K (the removed inputs' means go into the bias)

    and the model's output loss against the original (``output_loss``: KL of the class scores) on
    the first ``images`` calibration samples (held out of H: ``stats.cov_fit``; a refit scored on its
    own data looks better than it is, most for the late layers whose few positions per image give
    few rows) is measured in ONNX Runtime (readers' weights fed as
    inputs: one session). The loss at every count in between is linearly interpolated (non-
    decreasing along the order); a unit's score is the loss once it and every unit before it are
    gone, so the global step selection (error per MAC saved) allocates the budget by the measured
    curves instead of a predicted error. Returns the scores and, per group label, the curve
    [[k, loss], ...]."""
    import onnx
    from qgraph.calibrate import batch_size_for, progress_bar
    from qgraph.ops import ort_session
    from qgraph.reconstruct import current_matrix
    from qgraph.rounding import layer_matrix
    nodes = readers(g, groups)
    model = ir.to_model(g)
    # the readers' weights and biases become graph inputs of one measuring session
    protos = {n.name: n for n in model.graph.node}
    inits = {t.name: t for t in model.graph.initializer}
    base: dict[str, np.ndarray] = {}         # feed name -> current value (ONNX layout)
    layout: dict[str, tuple] = {}           # reader -> (weight feed, bias feed or None, back, K)
    for name, node in nodes.items():
        p = protos[name]
        m = current_matrix(node)            # [G, R, K(+1)]: Gemm alpha / beta folded in
        has_bias = node.op in ("Conv", "Gemm")
        k = m.shape[2] - (1 if has_bias else 0)
        _, back = layer_matrix(node, np.zeros(tuple(node.inputs[1].shape)))
        wname = p.input[1]
        bname = None
        if has_bias:
            if len(p.input) > 2 and p.input[2]:
                bname = p.input[2]
            else:
                bname = name + "__probe_bias"
                while len(p.input) < 3:
                    p.input.append("")
                p.input[2] = bname
        for a in p.attribute:
            if a.name in ("alpha", "beta"):
                a.f = 1.0
        for t in (wname, bname):
            if t is not None and t in inits:
                model.graph.initializer.remove(inits.pop(t))
        base[wname] = back(m[:, :, :k]).astype(np.float32)
        if bname is not None:
            base[bname] = m[:, :, k].reshape(-1).astype(np.float32)
        layout[name] = (wname, bname, back, k)
    for t, v in base.items():
        model.graph.input.append(onnx.helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, v.shape))
    sess = ort_session(model)
    names_in = {i.name for i in sess.get_inputs()}
    sub = samples.subset(range(min(images, len(samples))))
    feeds = [{k: v for k, v in f.items() if k in names_in} for f in sub.batches(batch_size_for(model, images))]
    ref = [sess.run(None, {**f, **base}) for f in feeds]
    del sess

    def loss(tail, cut: list[dict], change: dict[str, np.ndarray]) -> float:
        wanted = {i.name for i in tail.get_inputs()}
        total = 0.0
        for f, c, r in zip(feeds, cut, ref):
            given = {k: v for k, v in {**f, **base, **change, **c}.items() if k in wanted}
            total += output_loss(r, tail.run(None, given))
        return total / max(len(sub), 1)

    parts_of: dict[int, list] = {}
    for grp in groups:
        parts = []
        for name, node in nodes.items():
            x = node.inputs[0].name
            if x not in grp.tensors:
                continue
            m, kk = _matrix(node)
            tc = deps.tensors[x]
            units_of_channel = deps.atom_unit[tc.atoms]
            blocks = [(np.flatnonzero(units_of_channel == u)[:, None] * kk + np.arange(kk)).reshape(-1)
                      for u in grp.units]
            mu = np.repeat(np.asarray(stats.mean[name], np.float64), kk) if name in stats.mean else None
            parts.append((name, node, blocks, mu))
        parts_of[grp.id] = parts
    scores: dict[int, np.ndarray] = {}
    curves: dict[str, list] = {}
    bar = progress_bar(sum(1 for grp in groups if parts_of[grp.id]), "prune: measured sensitivity",
                       unit="group") if progress else None
    for grp in groups:
        order, limit, parts = orders[grp.id], limits[grp.id], parts_of[grp.id]
        if not parts or limit <= 0:
            scores[grp.id] = np.zeros(grp.size)
            continue
        ks = sorted({min(limit, max(1, int(round(grp.size * j / (points + 1))))) for j in range(1, points + 1)}
                    | {limit})
        # only the part of the model after the readers changes: its inputs are computed once
        head, tail = _split_at(model, [name for name, *_ in parts])
        head_sess = ort_session(head)
        head_in = {i.name for i in head_sess.get_inputs()}
        outs = [o.name for o in head.graph.output]
        cut = [dict(zip(outs, head_sess.run(None, {k: v for k, v in {**f, **base}.items() if k in head_in})))
               for f in feeds]
        del head_sess
        tail = ort_session(tail)
        curve = [(0, 0.0)]
        for k in ks:
            change = {}
            for name, node, blocks, mu in parts:
                gone = np.concatenate([blocks[u] for u in order[:k]]) if k else np.zeros(0, np.int64)
                if not gone.size:
                    continue
                wname, bname, back, kdim = layout[name]
                m = current_matrix(node)
                w, b = m[:, :, :kdim].copy(), (m[:, :, kdim].copy() if bname else None)
                h = (stats.cov_fit or {}).get(name, stats.cov.get(name))
                w_new = _refit_without(w, h, gone) if reconstruct else _drop(w, gone)
                if b is not None and mu is not None and w.shape[0] == 1:
                    b = b + ((w - w_new)[0] @ mu)[None]
                elif b is not None and mu is not None:      # grouped reader: per group of inputs
                    kg = w.shape[2]
                    b = b + np.einsum("grk,gk->gr", w - w_new, mu.reshape(w.shape[0], kg))
                change[wname] = back(w_new).astype(np.float32)
                if b is not None:
                    change[bname] = b.reshape(-1).astype(np.float32)
            curve.append((k, loss(tail, cut, change)))
        del tail, cut
        curves[grp.label()] = [[k, round(v, 6)] for k, v in curve]
        ks_arr = np.array([c[0] for c in curve], np.float64)
        ls_arr = np.maximum.accumulate(np.array([c[1] for c in curve], np.float64))
        counts = np.arange(1, len(order) + 1, dtype=np.float64)
        val = np.interp(counts, ks_arr, ls_arr)
        if len(ks_arr) > 1 and counts[-1] > ks_arr[-1]:          # past the last point: its slope
            slope = max((ls_arr[-1] - ls_arr[-2]) / max(ks_arr[-1] - ks_arr[-2], 1), 0.0)
            beyond = counts > ks_arr[-1]
            val[beyond] = ls_arr[-1] + slope * (counts[beyond] - ks_arr[-1])
        val = np.maximum.accumulate(val) + 1e-12 * counts       # strictly increasing along the order
        score = np.full(grp.size, np.inf)
        score[order] = val
        score[~np.isfinite(score)] = val[-1] + 1.0 if val.size else 1.0
        scores[grp.id] = score
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return scores, curves


def _split_at(model, names: list[str]):
    """(head, tail) of ``model`` at the nodes ``names``: the tail is every node downstream of them (them
    included), reading what the head computes for it (the head's outputs) and the model's inputs."""
    import onnx
    from qgraph.reconstruct import truncated
    tail_nodes, made = [], set()
    start = set(names)
    for node in model.graph.node:                    # topological order
        if node.name in start or any(i in made for i in node.input if i):
            tail_nodes.append(node)
            made.update(o for o in node.output if o)
    inits = {t.name for t in model.graph.initializer}
    inputs = {i.name: i for i in model.graph.input}
    needed = list(dict.fromkeys(i for n in tail_nodes for i in n.input if i and i not in made))
    cut = [t for t in needed if t not in inits and t not in inputs]
    cut += [o.name for o in model.graph.output if o.name not in made and o.name not in cut]
    types = _elem_types(model, cut)                  # shape computations cross the cut as int64
    head = truncated(model, cut)
    for vi in head.graph.output:
        vi.type.tensor_type.elem_type = types[vi.name]
    graph = onnx.helper.make_graph(
        tail_nodes, model.graph.name,
        [onnx.helper.make_tensor_value_info(t, types[t], None) for t in cut]
        + [inputs[t] for t in needed if t in inputs],
        list(model.graph.output), [t for t in model.graph.initializer if t.name in set(needed)])
    tail = onnx.helper.make_model(graph, opset_imports=model.opset_import)
    tail.ir_version = model.ir_version
    return head, tail


def _elem_types(model, names: list[str]) -> dict[str, int]:
    """ONNX element type of each tensor: from the model's value_info, else from shape inference, else
    float."""
    import onnx
    known = {vi.name: vi.type.tensor_type.elem_type for vi in
             list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output)
             if vi.type.tensor_type.elem_type}
    if any(n not in known for n in names):
        try:
            inferred = onnx.shape_inference.infer_shapes(model)
            known.update({vi.name: vi.type.tensor_type.elem_type for vi in inferred.graph.value_info
                          if vi.type.tensor_type.elem_type and vi.name not in known})
        except Exception:            # noqa: BLE001 - inference is a best effort; float is the usual case
            pass
    return {n: known.get(n, onnx.TensorProto.FLOAT) for n in names}


def _drop(w: np.ndarray, gone: np.ndarray) -> np.ndarray:
    out = w.copy()
    out[:, :, gone] = 0.0
    return out


def _refit_without(w: np.ndarray, h, gone: np.ndarray) -> np.ndarray:
    """Least-squares weights on the kept inputs for the same outputs: W'_K = W H_{:,K} (H_KK)⁻¹ (dense
    H of a single-group reader), or the columns dropped when H is only a diagonal or grouped."""
    if h is None or np.ndim(h) != 3 or w.shape[0] != 1:
        return _drop(w, gone)
    hh = h[0]
    k = hh.shape[0]
    keep = np.setdiff1d(np.arange(k), gone)
    hk = hh[np.ix_(keep, keep)].copy()
    idx = np.arange(len(keep))
    hk[idx, idx] += DAMP * max(float(np.mean(np.diagonal(hk))), 1e-12) + (np.diagonal(hk) <= 0)
    rhs = hh[keep, :] @ w[0].T                                   # H_{K,:} Wᵀ
    out = np.zeros_like(w)
    out[0][:, keep] = np.linalg.solve(hk, rhs).T
    return out
