"""Per-head tensors of an attention region, carried in the ANE's (B, C, 1, S) form.

Between the head split (a reshape of a (B, S, C) projection into (B, S, H, d), or any other
factoring of C) and the attention core, every tensor is a :class:`HeadForm`: which of its axes
is the batch, which the sequence and which factor the channels, and for every channel element
where it lives: a channel of one of the form's *sources*, each a (B, N, 1, S) var. Layout ops
(transpose, reshape, slices, splits, concats, tiles) only rearrange that channel map, at compile
time, and emit nothing; an op that computes (elementwise ops, reductions) first *materialises*
its operands (a split and a concat when the channels come in long runs, a grouped selection
conv when they are scattered, nothing when they already are one source in order) and then runs
once on (B, C, 1, S). The physical channel order of a materialised form is the row-major order of
its channel axes, in the tensor's own axis order, except that a form may carry *head orders*:
for a last channel axis of a given size, the order its elements are laid out in (interleaved
rotary reads even and odd channels; with the Q and K projections' rows permuted to put each
head's evens before its odds, those reads become two contiguous halves). Any order is exact:
every computing rule runs its operands in one order and lays constants out in it, and the
scores contract Q and K over the same order.

Every rule is written once for both phases: while matching, :class:`DryRun` stands in for the
MIL builder, so a region is accepted only if every op in it has a rule that takes it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
from coremltools.converters.mil import Builder as mb

from milpasses.passes.shared.matching import NoMatch

BATCH, SEQ, CHANNEL = "b", "s", "c"
#: Shortest average run of consecutive channels worth a split and a concat; shorter runs are
#: gathered by one grouped 0/1 conv instead (a split into d pieces per head would cost more).
MIN_RUN = 4


@dataclass(frozen=True)
class Placeholder:
    """A var that does not exist yet: what the dry run builds."""

    name: str


@dataclass(frozen=True)
class Source:
    var: object  # (B|1, size, 1, S|1), or a Placeholder while matching
    size: int


@dataclass(frozen=True)
class HeadForm:
    axes: tuple  # per axis of the MIL tensor: BATCH, SEQ or CHANNEL
    src: np.ndarray  # per channel element (shape: the CHANNEL axes' sizes, in axis order): its source
    chan: np.ndarray  # ... and its channel within that source
    sources: tuple  # of Source
    batch: object
    seq: object
    scale: float = 1.0  # a pending scalar factor, applied when the form is materialised
    linear: bool = True  # a linear function of the region's roots (a scale can move into them)
    roots: frozenset = field(default_factory=frozenset)  # ids of the root vars it is computed from
    orders: tuple = ()  # ((size, order), ...): physical order of a last channel axis of that size

    @property
    def channel_shape(self) -> tuple:
        return tuple(self.src.shape)

    @property
    def channels(self) -> int:
        return int(self.src.size)

    def channel_axes(self) -> list[int]:
        return [i for i, role in enumerate(self.axes) if role == CHANNEL]

    def with_channels(self, axes, src, chan) -> "HeadForm":
        return replace(self, axes=tuple(axes), src=np.asarray(src), chan=np.asarray(chan))

    def last_axis_order(self, channel_shape=None) -> np.ndarray | None:
        """The physical order of the last channel axis (element p holds index order[p]), or
        None for the natural order."""
        shape = self.channel_shape if channel_shape is None else tuple(channel_shape)
        return order_of(self.orders, shape[-1]) if shape else None


def order_of(orders: tuple, size: int) -> np.ndarray | None:
    for n, order in orders:
        if n == size:
            return np.asarray(order, dtype=np.int64)
    return None


def in_physical_order(array: np.ndarray, order) -> np.ndarray:
    """``array`` (channel-map shaped) with its last axis in physical order."""
    return array if order is None else array[..., order]


def _physical_channels(shape, order) -> np.ndarray:
    """For each element of a channel map laid out with ``order`` on its last axis, its channel."""
    size = int(np.prod(shape))
    chan = np.arange(size).reshape(shape)
    if order is None:
        return chan
    placed = np.empty_like(chan)
    placed[..., order] = chan
    return placed


def root_form(source, var_bc1s, axes, channel_shape, root_id, orders=()) -> HeadForm:
    """The head split of a (B, S, C) ``source`` into axes with the roles ``axes`` (B and S in
    order, channel factors and unit axes around them). With ``orders``, the source's channels
    were permuted by them (the projection's rows) and the form reads them where they went."""
    size = int(np.prod(channel_shape))
    chan = _physical_channels(tuple(channel_shape), order_of(orders, channel_shape[-1]) if orders else None)
    return HeadForm(tuple(axes), np.zeros(channel_shape, dtype=np.int64), chan, (Source(var_bc1s, size),),
                    source.shape[0], source.shape[1], roots=frozenset([root_id]), orders=tuple(orders))


def materialised(var, like: HeadForm, channel_shape=None, axes=None) -> HeadForm:
    """A form whose channels are ``var``'s, as :func:`materialise` laid ``like`` out."""
    shape = like.channel_shape if channel_shape is None else tuple(channel_shape)
    size = int(np.prod(shape))
    return HeadForm(like.axes if axes is None else tuple(axes), np.zeros(shape, dtype=np.int64),
                    _physical_channels(shape, like.last_axis_order(shape)), (Source(var, size),), like.batch,
                    like.seq, linear=like.linear, roots=like.roots, orders=like.orders)


class DryRun:
    """The MIL builder's stand-in while matching: every op makes a placeholder. It counts the
    pieces (runs of consecutive channels) the gathers of a layout would cut, and notes the cuts of a last channel axis (strided
    ones are the evidence for a head order)."""

    building = False

    def __init__(self):
        self.pieces = 0
        self.slices = []  # (axis size, indices read) per cut of a last channel axis

    def note_slice(self, size: int, indices) -> None:
        self.slices.append((int(size), tuple(int(i) for i in indices)))

    def __getattr__(self, op_type):
        return lambda name, **_: Placeholder(name)

    @staticmethod
    def split(x, name, num_splits=None, split_sizes=None, **_):
        count = num_splits if split_sizes is None else len(split_sizes)
        return [Placeholder(f"{name}_{i}") for i in range(count)]


class Build:
    """The MIL builder, with the splits of each source cached (one split serves every cut)."""

    building = True

    def __init__(self):
        self._splits = {}

    def note_slice(self, size: int, indices) -> None:
        pass

    def __getattr__(self, op_type):
        return getattr(mb, op_type)

    def pieces(self, var, bounds: tuple, name: str) -> dict:
        """``var`` cut on the channel axis at ``bounds``: {(lo, hi): piece}."""
        key = (id(var), bounds)
        if key not in self._splits:
            sizes = [hi - lo for lo, hi in zip(bounds[:-1], bounds[1:])]
            parts = [var] if len(sizes) == 1 else list(mb.split(x=var, split_sizes=sizes, axis=1, name=name))
            self._splits[key] = dict(zip(zip(bounds[:-1], bounds[1:]), parts))
        return self._splits[key]


def _runs(src: np.ndarray, chan: np.ndarray) -> list[tuple[int, int, int]]:
    """(source, first channel, length) for each maximal run of consecutive channels."""
    runs = []
    for s, c in zip(src.ravel().tolist(), chan.ravel().tolist()):
        if runs and runs[-1][0] == s and runs[-1][1] + runs[-1][2] == c:
            runs[-1] = (s, runs[-1][1], runs[-1][2] + 1)
        else:
            runs.append((s, c, 1))
    return runs


def materialise(form: HeadForm, builder, name: str, apply_scale: bool = True):
    """The form as one (B, C, 1, S) var, channels in row-major order of its channel axes."""
    var = _gather(form, builder, name)
    if apply_scale and form.scale != 1.0:
        var = builder.mul(x=var, y=np.float32(form.scale), name=f"{name}_scaled")
    return var


def _gather(form: HeadForm, builder, name: str):
    order = form.last_axis_order()
    form = form.with_channels(form.axes, in_physical_order(form.src, order), in_physical_order(form.chan, order))
    runs = _runs(form.src, form.chan)
    if len(runs) == 1 and runs[0][1] == 0 and runs[0][2] == form.sources[runs[0][0]].size:
        return form.sources[runs[0][0]].var
    if not builder.building:  # matching only needs to know the op can be carried
        builder.pieces += len(runs)
        return Placeholder(name)
    if form.channels / len(runs) >= MIN_RUN:
        return _split_and_concat(form, runs, builder, name)
    return _selection_conv(form, builder, name)


def _split_and_concat(form, runs, builder, name):
    bounds = {}
    for s, c, n in runs:
        bounds.setdefault(s, {0, form.sources[s].size}).update((c, c + n))
    cut = {s: builder.pieces(form.sources[s].var, tuple(sorted(b)), f"{name}_cut{s}") for s, b in bounds.items()}
    pieces = [cut[s][(c, c + n)] for s, c, n in runs]
    return pieces[0] if len(pieces) == 1 else mb.concat(values=pieces, axis=1, name=name)


def _selection_conv(form, builder, name):
    """Gather scattered channels with a 0/1 conv, grouped per outer channel block when every
    block reads one block of the (concatenated) sources."""
    offsets = np.cumsum([0] + [s.size for s in form.sources])
    wanted = (offsets[form.src] + form.chan).ravel()
    total = int(offsets[-1])
    x = form.sources[0].var if len(form.sources) == 1 else mb.concat(
        values=[s.var for s in form.sources], axis=1, name=f"{name}_sources")
    groups = _groups(wanted, total, form.channel_shape)
    per_in = total // groups
    weight = np.zeros((len(wanted), per_in, 1, 1), dtype=np.float32)
    weight[np.arange(len(wanted)), wanted % per_in, 0, 0] = 1.0
    return mb.conv(x=x, weight=weight, groups=groups, name=name)


def _groups(wanted: np.ndarray, total: int, channel_shape) -> int:
    """The most conv groups under which output block g reads only input block g."""
    outer = int(np.prod(channel_shape[:-1])) if len(channel_shape) > 1 else 1
    for groups in sorted({g for g in range(1, outer + 1) if outer % g == 0 and total % g == 0}, reverse=True):
        per_out, per_in = len(wanted) // groups, total // groups
        if np.all(wanted // per_in == np.arange(len(wanted)) // per_out):
            return groups
    return 1


def constant_to_form(value, form: HeadForm, out_axes) -> np.ndarray | NoMatch:
    """A constant broadcasting against a tensor with ``out_axes`` roles, laid out for the
    form's (B, C, 1, S): batch and sequence kept or 1, channels expanded to the full channel
    layout (a table shared by every head is repeated per head), in the form's head order."""
    value = np.asarray(value, dtype=np.float32)
    if value.ndim == 0:
        return value
    if value.ndim > len(out_axes):
        return NoMatch("a constant operand has more axes than the region tensor")
    value = value.reshape((1,) * (len(out_axes) - value.ndim) + value.shape)
    channel = [i for i, role in enumerate(out_axes) if role == CHANNEL]
    batch, seq = out_axes.index(BATCH), out_axes.index(SEQ)
    target = list(value.shape)
    for i, size in zip(channel, form.channel_shape):
        if value.shape[i] not in (1, size):
            return NoMatch("a constant operand does not broadcast against the heads")
        target[i] = size
    value = np.broadcast_to(value, target)
    value = np.transpose(value, [batch] + channel + [seq])
    order = form.last_axis_order()
    if order is not None:
        value = value[..., order, :]
    return np.ascontiguousarray(value).reshape(value.shape[0], -1, 1, value.shape[-1])

