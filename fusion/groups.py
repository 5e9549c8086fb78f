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


@dataclass
class ChannelGroup:
    """Channels that must be kept, dropped, permuted or aligned together."""

    name: str  # the module whose output channels root the group
    n_units: int
    slots: list[Slot]
    unit_kind: str = "channel"  # "channel", "conv-block" or "head"

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
        self, gi: int, state: dict[str, torch.Tensor], n_members: int, p: float = 2.0
    ) -> torch.Tensor:
        """Magnitude importance of every unit of group ``gi`` as the concatenated model would score it.

        Mirrors torch-pruning's ``GroupMagnitudeImportance(p)``: for each conv / linear / norm weight of the
        group, the p-th power of the p-norm of the channel's slice, averaged over those weights; a unit sums its
        channels. The zero blocks of the concatenation add nothing, and the classifier's 1/N scaling is applied,
        so a member's scores equal its scores inside the concatenated model.
        """
        g = self.groups[gi]
        total = None
        n_items = 0
        for s in g.slots:
            if not s.is_weight or s.kind not in ("conv", "linear", "bn", "ln"):
                continue
            per_pos = power_sums(state[s.tensor], s.dim, p)
            if s.role == IN and self.is_consumer_only(s.tensor):
                per_pos = per_pos * (1.0 / n_members) ** p
            pos = s.positions.to(per_pos.device)
            vals = per_pos.index_select(0, pos.clamp(min=0).reshape(-1)).reshape(pos.shape) * (pos >= 0)
            unit = vals.sum(dim=(1, 2))
            total = unit if total is None else total + unit
            n_items += 1
        if total is None:
            return torch.zeros(g.n_units)
        return total / n_items

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
        self, states: list[dict[str, torch.Tensor]], selection: Selection
    ) -> dict[str, torch.Tensor]:
        """The new model's tensors (see the module docstring). Members' tensors are only read."""
        n = len(states)
        new: dict[str, torch.Tensor] = {}
        for name, ref in states[0].items():
            dims = self.tensor_dims.get(name)
            if not dims or not is_float(ref):
                new[name] = mean_tensor([s[name] for s in states]) if is_float(ref) else ref.clone()
                continue
            index = {d: self._dim_index(refs, selection) for d, refs in dims.items()}
            shape = list(ref.shape)
            for d, (pos, _) in index.items():
                shape[d] = pos.numel()
            scale = 1.0 / n if self.is_consumer_only(name) else 1.0
            # every entry is written when one member fills it all or only one dimension is slotted (each slice
            # along it comes whole from one member); otherwise the blocks between members stay zero
            out = ref.new_empty(shape) if n == 1 or len(index) == 1 else ref.new_zeros(shape)
            # each member writes only its own block; entries between members stay zero. In the general case the
            # last slotted dimension is written with index_copy_: its positions belong to one member each, and
            # the entries of such a slice that are not that member's are zero
            last = max(index)
            for m, state in enumerate(states):
                t = state[name]
                picks = {}
                for d, (pos, mem) in index.items():
                    dst = (mem == m).nonzero().squeeze(1)
                    if dst.numel() == 0:
                        break
                    picks[d] = (dst.to(t.device), pos[dst].to(t.device))
                else:
                    slotted = sorted(picks)
                    if len(slotted) == 1:
                        dst, src = picks[last]
                        sub = _take(t, last, src)
                        if scale != 1.0:
                            sub = sub * scale  # not in place: sub may be a view of the member
                        out.index_copy_(last, dst, sub)
                    elif len(slotted) == 2 and slotted[1] == slotted[0] + 1:
                        # one gather and one scatter of the member's block (rows x columns), no zero padding
                        lead = (slice(None),) * slotted[0]
                        (dst0, src0), (dst1, src1) = picks[slotted[0]], picks[slotted[1]]
                        block = _take(_take(t, slotted[0], src0), slotted[1], src1)
                        if scale != 1.0:
                            block = block * scale  # not in place: block may be a view of the member
                        rows, cols = _as_range(dst0), _as_range(dst1)
                        if rows is not None and cols is not None:  # NT keeps concatenation order: blocks
                            out[lead + (rows, cols)].copy_(block)
                        else:
                            out[lead + (dst0[:, None], dst1[None, :])] = block
                    else:
                        sub = t.index_select(last, picks[last][1])
                        for d, (dst, src) in picks.items():
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
                        out.index_copy_(last, picks[last][0], sub)
            new[name] = out
        return new


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


def power_sums(t: torch.Tensor, dim: int, p: float) -> torch.Tensor:
    """``sum |t|^p`` over every dimension but ``dim``: one value per position along ``dim`` (float32).

    Along the leading dimension rows are contiguous and a norm is fast; along another one (a consumer's
    input columns) a strided norm is many times slower than summing row chunks, which also bounds the
    temporary to one chunk.
    """
    t = t.float()
    if t.dim() == 1:
        return t.abs().pow(p)
    if dim == 0:
        return torch.linalg.vector_norm(t.reshape(t.shape[0], -1), ord=p, dim=1).pow(p)
    other = [d for d in range(t.dim()) if d != dim]
    rows = max(1, (1 << 22) // max(1, t[0].numel()))
    total = None
    for chunk in t.split(rows, dim=0):
        part = (chunk.square() if p == 2 else chunk.abs().pow(p)).sum(dim=other)
        total = part if total is None else total.add_(part)
    return total


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
