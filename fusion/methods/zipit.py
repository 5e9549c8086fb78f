"""ZipIt! (Stoica, Bolya et al., ICLR 2024) on the traced channel groups: merge correlated units within AND
across members.

Per group, every member's units (N x U of them) are described by their activations on a batch (``data``;
the outputs of the conv / linear layers that produce the group, as activation matching and OT's activation
mode use), and merged greedily: the two most correlated clusters are merged, over and over, until U remain,
so the fused model has the members' architecture. Unlike a permutation, two units of one member may be
merged (redundant features), and a fused unit may hold several units of a member and none of another. A
merged cluster's similarity to another is the smaller of its parts' (min linkage), and:

* ``alpha`` in [0, 1] penalises merging a cluster again with a cluster that holds a unit of a member it
  already holds (positive similarities are multiplied by ``alpha``; 0 forbids it, which for N = 2 and
  ``beta = 0`` is a one-to-one matching). Merges that bring in a member not yet in the cluster are not
  penalised, so N > 2 members zip one unit of each member together when they are alike (ZipIt!'s
  ``alpha <= 0`` rule, extended to ``alpha > 0``);
* ``beta`` in [0, 1] is the budget of same-member merges (two clusters made only of one member's units):
  each member may take ``floor(beta * (N - 1) * U / N)`` of them (ZipIt!'s beta; 0: only cross-member merges).

The merge of a group is a many-to-one map: fused unit k is the mean of the units of its cluster S_k (the
"merge" matrix M, which is also the provenance). Every layer is zipped as ``sum_m M_m W_m U_m`` (ZipIt!'s
Eq. 8): the rows a group produces (weights, biases, normalization) are merged with M, the columns its
consumers read are "unmerged" with U (U[j, k] = 1 when member unit j is in S_k: the fused unit k stands in
for each of its sources); consumer-only layers (the classifier) are divided by N, tensors that touch no
group are averaged. A member fused with permuted copies of itself comes back exactly.

Partial zipping (zip up to a layer, keep the rest per member: a multi-head model) is not offered: the fused
model always has the members' architecture.
"""

from __future__ import annotations

import numpy as np
import torch

from ..build import build_model, check_runs
from ..errors import FusionError
from ..groups import ChannelGraph, mean_tensor
from ..layers import OUT, is_float
from ..provenance import Provenance, attach
from ..registry import register
from ..state import full_state, map_inputs
from ..trace import channel_groups
from .ot import _Observer, _producers, _unit_features


def _check(alpha, beta, data):
    if data is None:
        raise FusionError("zipit needs a batch of inputs: pass data=<tensor of inputs>")
    for name, v in (("alpha", alpha), ("beta", beta)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= float(v) <= 1.0:
            raise FusionError(f"{name} must be a number in [0, 1], got {v!r}")


def similarity(feats: torch.Tensor) -> torch.Tensor:
    """Pearson correlation between every pair of rows (units) of ``feats`` [n, samples], float32, with ties
    broken by raw distance (at most 1e-3): units constant over the batch have no correlation, but their values
    still tell them apart."""
    f = feats.float()
    centred = f - f.mean(1, keepdim=True)
    centred = centred / centred.norm(dim=1, keepdim=True).clamp(min=1e-12)
    sim = centred @ centred.T
    del centred
    sq = (f * f).sum(1)
    n = f.shape[0]
    blocks = [slice(i, min(n, i + _ROWS)) for i in range(0, n, _ROWS)]

    def dist(rows: slice) -> torch.Tensor:  # one row block: the only other n-wide temporary
        return (f[rows] @ f.T).mul_(-2).add_(sq[rows, None]).add_(sq[None, :]).clamp_(min=0)

    scale = 1e-3 / max(max((float(dist(b).max()) for b in blocks), default=0.0), 1e-30)
    for b in blocks:
        sim[b].sub_(dist(b).mul_(scale))
    return sim


_ROWS = 512  # rows per block of the tie-breaking distances


GRAM_BUDGET = 32 * 2**20  # bytes: all members' features of one chunk of the batch, for the Gram groups


class _Gram:
    """Centred Gram matrix of ``n`` units' activations, accumulated over sample chunks in float64.

    Columns are shifted by the first chunk's per-unit means before they are multiplied (the shifted-data
    algorithm): subtracting the mean at the end then cancels only the small remainder, not the raw second
    moments. ``similarity`` gives :func:`similarity`'s matrix (correlation, ties broken by raw distance)
    from these statistics, without the features.
    """

    def __init__(self) -> None:
        self.shift = self.gram = self.sums = None
        self.count = 0

    def add(self, f: torch.Tensor) -> None:
        f = f.double()
        if self.shift is None:
            self.shift = f.mean(1, keepdim=True)
            self.gram = torch.zeros(f.shape[0], f.shape[0], dtype=torch.float64, device=f.device)
            self.sums = torch.zeros(f.shape[0], dtype=torch.float64, device=f.device)
        f = f - self.shift
        self.gram.addmm_(f, f.T)
        self.sums += f.sum(1)
        self.count += f.shape[1]

    def similarity(self) -> torch.Tensor:
        """Consumes the statistics. Works in the Gram matrix's memory plus the float32 result: two passes over
        row blocks (the largest tie-breaking distance, then the result), no other n x n temporary."""
        g = self.gram.addr_(self.sums, self.sums, alpha=-1.0 / self.count)  # sum (x - mean)(y - mean)
        self.gram = None
        var = g.diagonal().clone()
        norm = var.clamp(min=0).sqrt().clamp(min=1e-12)
        mean = self.shift.reshape(-1) + self.sums / self.count

        def dist(rows: slice) -> torch.Tensor:
            # |x - y|^2 = |(x - mean_x) - (y - mean_y)|^2 + count (mean_x - mean_y)^2 over the columns
            d = (mean[rows, None] - mean[None, :]).square_().mul_(self.count)
            return d.add_(var[rows, None]).add_(var[None, :]).sub_(g[rows], alpha=2).clamp_(min=0)

        n = g.shape[0]
        step = max(1, (8 * 2**20) // (8 * n))  # row blocks of 8 MB in float64
        blocks = [slice(i, min(n, i + step)) for i in range(0, n, step)]
        scale = 1e-3 / max(max((float(dist(b).max()) for b in blocks), default=0.0), 1e-30)
        out = torch.empty(n, n, dtype=torch.float32, device=g.device)
        for b in blocks:
            sim = g[b].div(norm[b, None]).div_(norm[None, :])
            out[b] = sim.sub_(dist(b).mul_(scale))
        return out


def _batch_size(data) -> int:
    sizes = []
    map_inputs(data, lambda t: sizes.append(t.shape[0]) if t.dim() else None)
    if not sizes:
        raise FusionError("zipit: data holds no batched tensor to observe the members on")
    return sizes[0]


def zip_statistics(models, graph: ChannelGraph, data, budget: int = GRAM_BUDGET):
    """Per group: what :func:`zip_sources` needs to compare all members' units, or None (no producing conv /
    linear to observe).

    A group whose features over the batch are smaller than a Gram matrix of all members' units (few
    columns: deep layers, small spatial maps) keeps its features, per member ([U, columns]); the others
    (wide spatial maps) accumulate a centred Gram matrix of all N x U units over chunks of the batch
    (:class:`_Gram`), so that no member's features for the whole batch, nor every member's features at
    once, are ever held. Chunks are sized so that all members' features of one chunk fit in ``budget``
    bytes. The members run once per chunk.
    """
    wanted = _producers(graph)
    observers = [_Observer(m, wanted) for m in models]
    n_members = len(models)
    total = _batch_size(data)

    def group_features(outputs, gi_filter=None):
        feats: dict[int, torch.Tensor] = {}
        for name, entries in wanted.items():
            out = outputs.pop(name, None)
            if out is None:
                continue
            for gi, s in entries:
                if gi_filter is not None and gi not in gi_filter:
                    continue
                f = _unit_features(out, s.positions, observers[0].channel_dim(name, out))
                feats[gi] = f if gi not in feats else torch.cat([feats[gi], f], dim=1)
        return feats

    # columns per sample of each group, from one sample
    probe = group_features(observers[0].run(map_inputs(data, lambda t: t[:1] if t.dim() else t)))
    per_sample = {gi: f.shape[1] for gi, f in probe.items()}
    del probe
    gram = {
        gi: _Gram()
        for gi, c in per_sample.items()
        if c * total > 2 * n_members * graph.groups[gi].n_units  # features bigger than a float64 Gram
    }
    kept = {gi: [[] for _ in models] for gi in per_sample if gi not in gram}
    chunk_bytes = 4 * n_members * sum(per_sample[gi] * graph.groups[gi].n_units for gi in gram)
    step = max(1, min(total, budget // max(1, chunk_bytes)))
    for start in range(0, total, step):
        rows = slice(start, start + step)
        inputs = map_inputs(data, lambda t, rows=rows: t[rows] if t.dim() else t)
        chunk = {gi: [] for gi in gram}
        for m, observer in enumerate(observers):
            for gi, f in group_features(observer.run(inputs)).items():
                (chunk[gi] if gi in gram else kept[gi][m]).append(f)
        for gi, fs in chunk.items():
            gram[gi].add(torch.cat(fs))
        del chunk
    stats: list = [None] * len(graph.groups)
    for gi, per_member in kept.items():
        stats[gi] = [torch.cat(fs, dim=1) if len(fs) > 1 else fs[0] for fs in per_member]
    for gi, g in gram.items():
        stats[gi] = g
    return stats


def zip_clusters(sim: torch.Tensor, member_of: torch.Tensor, n_members: int, alpha: float, beta: float):
    """Greedy ZipIt! merging of ``n`` units (``member_of[i]``: unit i's member) into ``n // n_members``
    clusters. Returns each unit's cluster, numbered in the order of the clusters' first unit. ``sim`` is
    consumed (overwritten).

    Each row keeps its best partner (value and column); a merge recomputes only the rows whose best partner
    it touched (and, when a member's same-member budget runs out or a cluster stops being one member's,
    that member's clusters), so a merge costs O(n) instead of a scan of the n x n matrix. The loop runs in
    NumPy: thousands of merges of tiny steps, where each torch call's overhead (and its thread pool) would
    dominate."""
    n = sim.shape[0]
    target = n // n_members
    # min-linkage similarity between clusters (by first unit), in ``sim``'s memory when it is a float32 CPU
    # tensor: at N members of U units it is (N U)^2 floats (256 MB for 16 resnet18 at 512 channels)
    raw = sim.detach().to("cpu", torch.float32).contiguous().numpy()
    np.fill_diagonal(raw, -np.inf)  # a dead cluster's row and column become -inf too
    member_of = member_of.cpu().numpy().astype(np.int64)
    alive = np.ones(n, dtype=bool)
    holds = np.left_shift(1, member_of)  # bit m set: the cluster holds a unit of member m
    pure = member_of.copy()  # the member a cluster is made of, or -1 once mixed
    label = np.arange(n)
    budget = [int(beta * (n - target) / n_members + 1e-9)] * n_members
    exhausted = np.array([b <= 0 for b in budget])

    def effective(rows: np.ndarray) -> np.ndarray:
        s = raw[rows]  # a copy (fancy indexing)
        shared = (holds[rows][:, None] & holds[None, :]) != 0
        if alpha == 0.0:
            s[shared] = -np.inf
        else:
            np.multiply(s, alpha, out=s, where=shared & (s > 0))
        p = pure[rows]
        closed = (p >= 0) & exhausted[np.maximum(p, 0)]  # rows of members whose budget is spent
        if closed.any():
            s[closed[:, None] & (p[:, None] == pure[None, :])] = -np.inf
        return s

    best = np.empty(n, dtype=np.float32)
    arg = np.empty(n, dtype=np.int64)

    def refresh(rows: np.ndarray) -> None:
        for chunk in np.array_split(rows, max(1, rows.size * n // (1 << 22))):  # bounded temporaries
            s = effective(chunk)
            arg[chunk] = s.argmax(1)
            best[chunk] = s[np.arange(chunk.size), arg[chunk]]

    refresh(np.arange(n))
    for _ in range(n - target):
        i = int(best.argmax())
        j = int(arg[i])
        if best[i] == -np.inf:
            raise FusionError(
                f"zipit cannot merge further with alpha={alpha}: every remaining merge repeats a member; "
                "use alpha > 0"
            )
        i, j = min(i, j), max(i, j)
        was = {int(pure[i]), int(pure[j])} - {-1}
        same_member = pure[i] >= 0 and pure[i] == pure[j]
        merged = np.minimum(raw[i], raw[j])
        raw[i], raw[:, i] = merged, merged
        raw[j], raw[:, j] = -np.inf, -np.inf
        alive[j] = False
        label[label == j] = i
        holds[i] |= holds[j]
        stale = (arg == i) | (arg == j)
        stale[i] = True
        if same_member:
            m = int(pure[i])
            budget[m] -= 1
            if budget[m] == 0:
                exhausted[m] = True
                stale |= pure == m
        else:
            pure[i] = -1
            for m in was:  # a cluster that was one exhausted member's is now open to that member's clusters
                if exhausted[m]:
                    stale |= pure == m
        stale &= alive
        best[j] = -np.inf
        rows = np.flatnonzero(stale)
        if rows.size:
            refresh(rows)
    reps = np.flatnonzero(alive)
    rank = np.empty(n, dtype=np.int64)
    rank[reps] = np.arange(reps.size)
    return torch.from_numpy(rank[label])


def zip_sources(graph: ChannelGraph, stats, n_members: int, alpha: float, beta: float):
    """Per group, the merge as provenance entries (fused unit, member, member unit, 1 / cluster size), from
    :func:`zip_statistics`'s per-group statistics (consumed: each group's are released once it is zipped)."""
    sources = []
    for gi, g in enumerate(graph.groups):
        u = g.n_units
        members = torch.arange(n_members).repeat_interleave(u)
        units = torch.arange(u).repeat(n_members)
        st = stats[gi]
        if st is None:  # no producing conv / linear to observe: averaging
            cluster = units.clone()
        else:
            sim = st.similarity() if isinstance(st, _Gram) else similarity(torch.cat(st))
            cluster = zip_clusters(sim, members, n_members, float(alpha), float(beta))
            stats[gi] = sim = None
        size = torch.bincount(cluster, minlength=u).float()
        sources.append((cluster, members, units, 1.0 / size[cluster]))
    return sources


def zip_tensor(graph: ChannelGraph, name: str, t: torch.Tensor, member: int, sources) -> torch.Tensor:
    """Member ``member``'s share of the fused tensor ``name``: M along the dimensions a group produces,
    U along the dimensions a group is read on."""
    for d, refs in graph.tensor_dims.get(name, {}).items():
        for gi, si in refs:
            slot = graph.groups[gi].slots[si]
            fused, members, units, weights = sources[gi]
            pick = members == member
            pos = slot.positions
            if (pos < 0).any():
                raise FusionError(f"zipit: units of group {graph.groups[gi].name!r} differ in shape")
            k, j = fused[pick], units[pick]
            w = weights[pick] if slot.role == OUT else torch.ones(k.numel())
            dst = pos[k].reshape(-1).to(t.device)
            src = pos[j].reshape(-1).to(t.device)
            scale = w[:, None].expand(k.numel(), pos[0].numel()).reshape(-1).to(t.device, t.dtype)
            shape = [1] * t.dim()
            shape[d] = -1
            moved = t.index_select(d, src) * scale.reshape(shape)
            out = t.index_fill(d, pos.reshape(-1).to(t.device), 0)
            t = out.index_add_(d, dst, moved)
    return t


@register("zipit")
def zipit(models, *, example_inputs=None, data=None, alpha=0.3, beta=0.125, verify=True):
    """Merge correlated units within and across members (ZipIt!) on ``data``, keeping the members' widths."""
    _check(alpha, beta, data)
    inputs = example_inputs if example_inputs is not None else data
    graph = channel_groups(models[0], inputs, verify=verify)
    n = len(models)
    with torch.no_grad():
        sources = zip_sources(graph, zip_statistics(models, graph, data), n, alpha, beta)
        states = [full_state(m) for m in models]
        fused_state = {}
        for name, ref in states[0].items():
            if not is_float(ref):
                fused_state[name] = ref.clone()
            elif name not in graph.tensor_dims:
                fused_state[name] = mean_tensor([s[name] for s in states])
            else:
                total = zip_tensor(graph, name, states[0][name], 0, sources)
                for m in range(1, n):
                    total = total.add_(zip_tensor(graph, name, states[m][name], m, sources))
                fused_state[name] = total.div_(n) if graph.is_consumer_only(name) else total
    fused = build_model(models[0], fused_state)
    check_runs(fused, inputs)
    return attach(fused, Provenance("zipit", n, sources, pinned=tuple(graph.pinned)))
