"""Coupled channel groups and the one operation every method is built from: :meth:`ChannelGraph.assemble`.

A :class:`ChannelGroup` is a set of channels that must move together: every tensor dimension that a
channel touches (the producing layer's output rows, the normalization's per-channel parameters and
statistics, every consumer's input columns, skip paths, concatenations...) is one :class:`Slot`. Channels
are organised in *units* that move whole: a unit is one channel for ordinary groups, one block of a
grouped convolution (its input and output channels together) and, for attention, one head.

``assemble(states, selection)`` writes a new model state from the states of N members where, for every
group, ``selection`` lists which units (of which member) the new model has, in order. The new model is
what "concatenate the members, then keep exactly these units" defines: a tensor entry that connects a
unit of member a to a unit of member b is the member's own value when a == b and zero otherwise (the
block-diagonal concatenation); layers that consume channels but produce none (the classifier) are scaled
by 1/N, and tensors that touch no group are averaged, so that keeping every unit gives exactly the
output average of the members. With a single member, ``assemble`` permutes (or prunes) a model.
"""

from __future__ import annotations

import contextlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from .layers import IN, is_float

Selection = list[tuple[torch.Tensor, torch.Tensor]]  # per group: (member index [K], unit index [K])


@dataclass
class Slot:
    """One dimension of one tensor that a group's channels occupy.

    ``positions[u, j, r]`` is the index along ``dim`` of channel j of unit u; r counts the repeats of a
    channel within the tensor (e.g. q, k and v rows of one attention channel); -1 marks "absent".
    """

    tensor: str
    dim: int
    role: str
    kind: str
    is_weight: bool
    layer: str
    positions: torch.Tensor

    def __repr__(self) -> str:
        return f"Slot({self.tensor}[dim {self.dim}], {self.role}, units={self.positions.shape[0]}x{self.positions.shape[1]})"


def slot_of(spec, layer: str, positions: torch.Tensor) -> Slot:
    """The slot of one traced tensor dimension (a :class:`fusion.layers.SlotSpec`) at ``positions``."""
    return Slot(spec.tensor, spec.dim, spec.role, spec.kind, spec.is_weight, layer, positions)


@dataclass
class ChannelGroup:
    """Channels that must be kept, dropped, permuted or aligned together."""

    name: str  # the module whose output channels root the group
    n_units: int
    slots: list[Slot]
    # "channel", "conv-block", "head" or "coupled channels" (equal parts that meet)
    unit_kind: str = "channel"

    @property
    def layers(self) -> list[str]:
        return sorted({s.layer for s in self.slots})

    def __repr__(self) -> str:
        return f"ChannelGroup({self.name!r}, {self.n_units} {self.unit_kind}s, {len(self.slots)} slots)"


@dataclass
class ChannelGraph:
    """The traced channel groups of one architecture; independent of any particular weights."""

    groups: list[ChannelGroup]
    output_layers: list[str]
    shapes: dict[str, tuple[int, ...]]
    # tensor name -> dim -> list of (group index, slot index)
    tensor_dims: dict[str, dict[int, list[tuple[int, int]]]] = field(default_factory=dict)
    # channels that cannot be permuted (mixed with each other across the channel axis, e.g. ECA's 1-D
    # convolution over channels): one description per such coupled set. They belong to no group, so every
    # method keeps them in place: ``assemble`` averages the tensors that hold them, and a layer that reads a
    # group into pinned channels is scaled by 1/N like the classifier (its output is the members' average)
    pinned: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.tensor_dims:
            for gi, g in enumerate(self.groups):
                for si, s in enumerate(g.slots):
                    self.tensor_dims.setdefault(s.tensor, {}).setdefault(s.dim, []).append((gi, si))
            for dims in self.tensor_dims.values():
                for refs in dims.values():
                    # several groups on one dimension (a concatenation): their segments in tensor order
                    refs.sort(key=lambda r: _min_pos(self._slot(r).positions))

    def __repr__(self) -> str:
        lines = [f"ChannelGraph: {len(self.groups)} groups, output layers {self.output_layers}"]
        lines += [f"  {g!r}: {', '.join(g.layers)}" for g in self.groups]
        return "\n".join(lines)

    def _slot(self, ref: tuple[int, int]) -> Slot:
        return self.groups[ref[0]].slots[ref[1]]

    def is_consumer_only(self, tensor: str) -> bool:
        """True for tensors that read group channels but write none (e.g. the classifier's weight)."""
        dims = self.tensor_dims.get(tensor, {})
        return bool(dims) and all(self._slot(r).role == IN for refs in dims.values() for r in refs)

    # ------------------------------------------------------------------ selections
    def identity_selection(self) -> Selection:
        return [(torch.zeros(g.n_units, dtype=torch.long), torch.arange(g.n_units)) for g in self.groups]

    def random_permutation(self, generator: torch.Generator | None = None) -> Selection:
        return [
            (torch.zeros(g.n_units, dtype=torch.long), torch.randperm(g.n_units, generator=generator))
            for g in self.groups
        ]

    # ------------------------------------------------------------------ importance
    def unit_importance(
        self, state: dict[str, torch.Tensor], n_members: int, p: float = 2.0
    ) -> list[torch.Tensor]:
        """Per group, the magnitude importance of every unit as the concatenated model would score it.

        Mirrors torch-pruning's ``GroupMagnitudeImportance(p)``: for each conv / linear / norm weight of the
        group, the p-th power of the p-norm of the channel's slice, averaged over those weights; a unit sums its
        channels. The zero blocks of the concatenation add nothing, and the classifier's 1/N scaling is applied,
        so a member's scores equal its scores inside the concatenated model. Every weight is read once, for all
        the groups on its dimensions (a hidden layer's rows and columns belong to two groups).
        """
        scored = [
            [s for s in g.slots if s.is_weight and s.kind in ("conv", "linear", "bn", "ln")]
            for g in self.groups
        ]
        dims: dict[str, set[int]] = {}
        for slots in scored:
            for s in slots:
                dims.setdefault(s.tensor, set()).add(s.dim)
        sums = {name: power_sums(state[name], sorted(ds), p) for name, ds in dims.items()}
        out = []
        for g, slots in zip(self.groups, scored):
            total = None
            for s in slots:
                per_pos = sums[s.tensor][s.dim]
                if s.role == IN and self.is_consumer_only(s.tensor):
                    per_pos = per_pos * (1.0 / n_members) ** p
                pos = s.positions.to(per_pos.device)
                vals = per_pos.index_select(0, pos.clamp(min=0).reshape(-1)).reshape(pos.shape) * (pos >= 0)
                unit = vals.sum(dim=(1, 2))
                total = unit if total is None else total + unit
            out.append(torch.zeros(g.n_units) if total is None else total / len(slots))
        return out

    # ------------------------------------------------------------------ assembly
    def _dim_index(self, refs, selection: Selection) -> tuple[torch.Tensor, torch.Tensor]:
        """Source positions and source members along one tensor dimension of the new model."""
        pos_parts, mem_parts = [], []
        for gi, si in refs:
            members, units = selection[gi]
            # index_select / masked_select: advanced indexing is parallelised and, on small index tensors,
            # far slower than these (milliseconds per call when the cores are busy)
            pos = self.groups[gi].slots[si].positions.index_select(0, units)  # [K, u, r]
            mem = members[:, None, None].expand_as(pos)
            pos = pos.permute(2, 0, 1).reshape(-1)
            mem = mem.permute(2, 0, 1).reshape(-1)
            keep = pos >= 0
            pos_parts.append(torch.masked_select(pos, keep))
            mem_parts.append(torch.masked_select(mem, keep))
        return torch.cat(pos_parts), torch.cat(mem_parts)

    def assemble(
        self,
        states: list[dict[str, torch.Tensor]],
        selection: Selection,
        dtype: torch.dtype | None = None,
        into: dict[str, torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        """The new model's tensors (see the module docstring). Members' tensors are only read. ``dtype``: the
        new float tensors' type, written as they are gathered (the self-check's float64 copy), else the members'.
        ``into``: tensors of the new model's shapes and types to overwrite instead of allocating (the
        self-check's reference copy: fresh memory's page faults cost as much as the copy itself)."""
        n = len(states)
        new: dict[str, torch.Tensor] = {}
        for name, ref in states[0].items():
            dims = self.tensor_dims.get(name)
            target = into.get(name) if into is not None else None
            if not dims or not is_float(ref):
                if not is_float(ref):
                    new[name] = ref.clone()
                elif n == 1 and target is not None:
                    new[name] = target.copy_(ref)
                elif n == 1 and dtype not in (None, ref.dtype):
                    new[name] = ref.to(dtype)
                else:
                    mean = mean_tensor([s[name] for s in states])
                    if target is not None:
                        new[name] = target.copy_(mean)
                    else:
                        new[name] = mean if dtype is None else mean.to(dtype)
                continue
            index = {d: self._dim_index(refs, selection) for d, refs in dims.items()}
            shape = list(ref.shape)
            for d, (pos, _) in index.items():
                shape[d] = pos.numel()
            scale = 1.0 / n if self.is_consumer_only(name) else 1.0
            # per member: {dim: (destination positions, source positions)}, or None when it has no entry here
            picks = []
            for m in range(n):
                device = states[m][name].device
                member = {}
                for d, (pos, mem) in index.items():
                    dst = (mem == m).nonzero().squeeze(1)
                    if dst.numel() == 0:
                        member = None
                        break
                    member[d] = (dst.to(device), pos[dst].to(device))
                picks.append(member)
            if target is not None and (list(target.shape) != shape or target.dtype != (dtype or ref.dtype)):
                raise ValueError(f"assemble: {name!r} in 'into' has the wrong shape or type")
            new[name] = _assemble_tensor(
                ref, shape, [s[name] for s in states], picks, scale, dtype or ref.dtype, target
            )
        return new


def _assemble_tensor(ref, shape, tensors, picks, scale: float, dtype: torch.dtype, into=None) -> torch.Tensor:
    """One tensor of the new model from the members' ``tensors``: member m writes its entries ``picks[m]``
    (per slotted dimension: destination and source positions); entries between two members stay zero.
    ``into``: the tensor to write (of ``shape`` and ``dtype``), else a new one."""

    def empty():
        return ref.new_empty(shape, dtype=dtype) if into is None else into

    def zeros():
        return ref.new_zeros(shape, dtype=dtype) if into is None else into.zero_()

    slotted = sorted({d for member in picks if member is not None for d in member})
    live = [(t, member) for t, member in zip(tensors, picks) if member is not None]
    if not live:
        # no member has both its rows and its columns here (one group kept only one member's units, another
        # only another's): every entry lies between two members, zero in their concatenation
        return zeros()
    # per live member and slotted dimension: its destination positions as a slice when they are one run
    runs = [{d: _as_range(dst) for d, (dst, _) in member.items()} for _, member in live]
    blocks = all(r.get(0) is not None and r.get(1) is not None for r in runs)  # rows x columns, both runs
    if len(slotted) == 1 or len(tensors) == 1:
        # every entry is written: each slice along the one slotted dimension comes whole from one member,
        # or a single member fills everything
        out = empty()
    elif (
        slotted == [0, 1]
        and blocks
        and sum(m[0][0].numel() for _, m in live) == shape[0]  # every row belongs to a member with columns
    ):
        # the members' rows x columns blocks (NT keeps concatenation order); only the rest is zeroed
        out = empty()
        for r in runs:
            out[r[0], : r[1].start].zero_()
            out[r[0], r[1].stop :].zero_()
    else:
        out = zeros()
    last = slotted[-1]
    for (t, member), r in zip(live, runs):
        if len(member) == 1:
            ((d, (dst, src)),) = member.items()
            run = r[d]
            if run is not None and d == 0 and scale == 1.0 and _as_range(src) is None and t.dtype == dtype:
                torch.index_select(t, 0, src, out=out.narrow(0, run.start, run.stop - run.start))
                continue
            sub = _take(t, d, src)
            if scale != 1.0:
                sub = sub * scale  # not in place: sub may be a view of the member
            if run is not None:
                out.narrow(d, run.start, run.stop - run.start).copy_(sub)
            else:
                out.index_copy_(d, dst, sub.to(dtype))
        elif sorted(member) == [0, 1] and r[0] is not None and r[1] is not None:
            # rows x columns into a block of the output, gathered straight into place
            _gather_block(out[r[0], r[1]], t, member[0][1], member[1][1], scale)
        elif len(member) == 2 and sorted(member)[1] == sorted(member)[0] + 1:
            # one gather and one scatter of the member's block (rows x columns), no zero padding
            d0, d1 = sorted(member)
            lead = (slice(None),) * d0
            (dst0, src0), (dst1, src1) = member[d0], member[d1]
            block = _take(_take(t, d0, src0), d1, src1)
            if scale != 1.0:
                block = block * scale  # not in place: block may be a view of the member
            out[lead + (dst0[:, None], dst1[None, :])] = block.to(dtype)
        else:
            # the last slotted dimension is written with index_copy_: its positions belong to one member each,
            # and the entries of such a slice that are not that member's are zero
            sub = t.index_select(last, member[last][1])
            for d, (dst, src) in member.items():
                if d == last:
                    continue
                sub = sub.index_select(d, src)
                full_shape = list(sub.shape)
                full_shape[d] = shape[d]
                full = sub.new_zeros(full_shape)
                full.index_copy_(d, dst, sub)
                sub = full
            if scale != 1.0:
                sub = sub * scale
            out.index_copy_(last, member[last][0], sub.to(dtype))
    return out


def _gather_block(
    dst: torch.Tensor, t: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, scale: float
) -> None:
    """``dst[:] = t[rows][:, cols] * scale`` without a temporary of the block's size: a few rows at a time, each
    piece small enough to stay in the cache, in one row part per thread (see :func:`in_row_parts`). A large
    temporary is fresh memory whose page faults cost as much as the copy itself."""
    step = max(1, _SERIAL_ELEMENTS // max(1, dst[0].numel()))
    run, cols_run = _as_range(rows), _as_range(cols)

    def part_rows(first: int, stop: int) -> None:
        for start in range(first, stop, step):
            n = min(step, stop - start)
            part = (
                t.narrow(0, run.start + start, n)
                if run is not None
                else t.index_select(0, rows[start : start + n])
            )
            if cols_run is not None:
                part = part.narrow(1, cols_run.start, cols_run.stop - cols_run.start)
            else:
                part = part.index_select(1, cols)
            target = dst.narrow(0, start, n)
            if scale != 1.0:
                target.copy_(part * scale)
            else:
                target.copy_(part)

    in_row_parts(part_rows, rows.numel(), step, dst.numel())


def _take(t: torch.Tensor, dim: int, index: torch.Tensor) -> torch.Tensor:
    """``t.index_select(dim, index)``, as a view when ``index`` is a run of consecutive positions (NT keeps
    each member's units in order, so its blocks are often whole runs)."""
    run = _as_range(index)
    if run is not None:
        return t.narrow(dim, run.start, run.stop - run.start)
    return t.index_select(dim, index)


def _as_range(index: torch.Tensor) -> slice | None:
    """``index`` as a slice when it is a run of consecutive positions (a view write is far cheaper)."""
    n = index.numel()
    if n == 0:
        return None
    first, last = int(index[0]), int(index[-1])
    if last - first + 1 == n and (n == 1 or bool((index[1:] - index[:-1] == 1).all())):
        return slice(first, last + 1)
    return None


# a chunk of a tensor read piece by piece: 512 KB of float32, resident in a core's L2 cache with its powers
# (measured on vgg11's 400 MB classifier, NT warm: 64 K elements 0.37 s, 128 K 0.30 s, 256 K 0.33 s, 1 M 0.37 s)
_SERIAL_ELEMENTS = 1 << 17


@contextlib.contextmanager
def serial():
    """Run torch operations on this thread only. Loops over cache-sized chunks issue hundreds of small
    operations; as parallel regions each costs a thread barrier, and on busy cores a barrier waits for a
    descheduled thread (measured: one 4096 x 4096 weight took 5 s instead of 40 ms). OpenMP's thread count
    is a setting of the calling thread, so other threads are not affected; the previous count is restored."""
    before = torch.get_num_threads()
    if before == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# a loop over fewer elements than this runs on the calling thread alone (threads cost ~0.1 ms to start)
_PARALLEL_ELEMENTS = 1 << 22


def in_row_parts(fn, n_rows: int, step: int, elements: int) -> None:
    """``fn(first, stop)`` over ``range(n_rows)`` cut into one part per thread torch may use (at multiples of
    ``step``), each part in a Python thread of its own that runs torch serially: both cores do the work of a
    chunk loop, and no operation waits at a thread barrier (see :func:`serial`). ``fn`` must write disjoint
    outputs per part. Small loops (``elements`` below ``_PARALLEL_ELEMENTS``) run serially here."""
    n_steps = -(-n_rows // step)
    k = min(torch.get_num_threads(), n_steps) if elements >= _PARALLEL_ELEMENTS else 1
    if k <= 1:
        with serial():
            fn(0, n_rows)
        return
    bounds = [min(n_rows, (n_steps * i // k) * step) for i in range(k + 1)]

    def work(i: int) -> None:
        torch.set_num_threads(1)  # this worker thread's own OpenMP / MKL setting, not the caller's
        fn(bounds[i], bounds[i + 1])

    with ThreadPoolExecutor(k) as pool:
        list(pool.map(work, range(k)))  # list(): re-raises a worker's exception here


def power_sums(t: torch.Tensor, dims: list[int], p: float) -> dict[int, torch.Tensor]:
    """``sum |t|^p`` over every dimension but ``d``, for each ``d`` in ``dims``: one value per position along
    ``d`` (float32), all from one read of ``t``.

    Rows are contiguous: the leading dimension alone is one norm per row. Otherwise ``t`` is read in chunks of
    rows small enough that the chunk's powers stay in the CPU cache while every dimension's sums are taken
    from them (a norm along a strided dimension is many times slower, and a whole-tensor power a second pass
    through memory). The chunks run in one row part per thread (see :func:`in_row_parts`), each part's sums
    added in a fixed order.
    """
    t = t.float()
    if t.dim() == 1:
        return {0: t.abs().pow(p)}
    if list(dims) == [0]:
        return {0: torch.linalg.vector_norm(t.reshape(t.shape[0], -1), ord=p, dim=1).pow(p)}
    rows_sum = t.new_empty(t.shape[0]) if 0 in dims else None
    parts: dict[int, dict] = {}  # per row part: its sums over the other dimensions, added up below
    step = max(1, _SERIAL_ELEMENTS // max(1, t[0].numel()))

    def part_sums(first: int, stop: int) -> None:
        cols = {d: None for d in dims if d != 0}
        _chunked_power_sums(t, first, stop, step, p, rows_sum, cols)
        parts[first] = cols

    in_row_parts(part_sums, t.shape[0], step, t.numel())
    ordered = [parts[first] for first in sorted(parts)]  # a fixed order: the same sums on every call
    out = {d: sum_parts([c[d] for c in ordered]) for d in dims if d != 0}
    if rows_sum is not None:
        out[0] = rows_sum
    return out


def sum_parts(tensors: list) -> torch.Tensor:
    total = tensors[0]
    for t in tensors[1:]:
        total = total + t
    return total


def _chunked_power_sums(t, first, stop, step, p, rows_sum, cols) -> None:
    # rows and input channels of a conv / linear weight: the kernel positions are summed first (contiguous),
    # and both sums come from that small [rows, channels] matrix instead of two passes over the chunk
    rows_and_channels = t.dim() >= 2 and list(cols) == [1]
    for start in range(first, stop, step):
        chunk = t[start : min(start + step, stop)]
        powered = chunk.square() if p == 2 else chunk.abs().pow(p)
        if rows_and_channels:
            per_channel = powered.reshape(powered.shape[0], t.shape[1], -1)
            per_channel = per_channel.sum(2) if per_channel.shape[2] > 1 else per_channel.squeeze(2)
            if rows_sum is not None:
                torch.sum(per_channel, dim=1, out=rows_sum[start : start + chunk.shape[0]])
            part = per_channel.sum(0)
            cols[1] = part if cols[1] is None else cols[1].add_(part)
            continue
        if rows_sum is not None:
            torch.sum(
                powered.reshape(powered.shape[0], -1), dim=1, out=rows_sum[start : start + chunk.shape[0]]
            )
        for d in cols:
            part = powered.sum(dim=[o for o in range(t.dim()) if o != d])
            cols[d] = part if cols[d] is None else cols[d].add_(part)


def mean_tensor(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Elementwise mean without stacking (no N-sized temporary)."""
    out = tensors[0].clone()
    for t in tensors[1:]:
        out.add_(t)
    if len(tensors) > 1:
        out.div_(len(tensors))
    return out


def _min_pos(positions: torch.Tensor) -> int:
    valid = positions[positions >= 0]
    return int(valid.min()) if valid.numel() else 0
