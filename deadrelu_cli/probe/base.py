"""What every torch probe shares: the ordered set of site accumulators and the probe settings."""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from deadrelu_cli import native
from deadrelu_cli.probe.accumulator import (
    PixelMask,
    PositionMask,
    SiteAccumulator,
    counted_while_running,
    position_mask,
)
from deadrelu_cli.probe.ops import reshaped_unit_axis, resolve_channel_dim, unit_axis_reduced
from deadrelu_cli.stats import LayerStats


@dataclass(frozen=True)
class ProbeSettings:
    threshold: float = 0.0
    channel_dim: int | None = None
    ops: tuple[str, ...] = ("relu", "relu6")
    track_min: bool = False  # also the per-unit minimum of the pre-activation (--explain: constant channels)
    # --allow-nonfinite: NaN/±Inf values fire nowhere and are left out of max and sum (counted per site)
    skip_nonfinite: bool = False
    # devices ("cuda", "cpu") where relu/relu6 sites are counted by one torch.compile'd pass
    # (accumulator.fused_stats); off by default, DEADRELU_FUSED_STATS=cuda (or cuda,cpu) turns it on
    fused_devices: tuple[str, ...] = field(default_factory=lambda: fused_devices_from_env())


def fused_devices_from_env() -> tuple[str, ...]:
    text = os.environ.get("DEADRELU_FUSED_STATS", "")
    return tuple(part.strip() for part in text.split(",") if part.strip() in ("cuda", "cpu"))


class SiteRegistry:
    """Accumulators keyed by site name, in the order the sites first ran."""

    def __init__(self, settings: ProbeSettings) -> None:
        # the counting kernel loaded (built the first time) on its own thread before the first forward
        # pass: loaded inside it, its allocations would sit between activations the heap then cannot reuse
        native.prepare()
        self.settings = settings
        self.sites: dict[str, SiteAccumulator] = {}
        # site name -> callback(pre-activation): for fixes that need the values of a few units
        self.collectors: dict[str, Callable[[torch.Tensor, int], None]] = {}
        self.position_mask: PositionMask | PixelMask | None = None
        self.scoped_masks: dict[str, PositionMask | PixelMask | None] = {}
        self._given: tuple[PositionMask | None, dict[str, PositionMask | None]] = (None, {})
        self.fused_devices = settings.fused_devices
        self._stale: set[str] = set()  # sites of an earlier window, not run since `restart`
        # site name -> whether its tensors are [T, B, ...] (True) or [B, T, ...], as the model's structure
        # says it (probe.eager: the nn.Transformer*Layer it runs in); read where a batch's shape cannot tell
        self.layout_hints: dict[str, bool | None] = {}
        # the same for the site recorded next, from how its tensor descends from the forward's inputs
        self.call_hint: bool | None = None
        # sites of rank >= 3 whose units were put on an axis with no producer to say so, with their rank
        # ([B, T, C] and [B, C, T] look alike; rank >= 4 is taken as [N, C, ...]): the scan says so and a
        # gate stops on them, as the ONNX scan does (probe.ops.axis_guess_notes)
        self.axis_guesses: dict[str, int] = {}
        # sites whose units a layer made but a layout op moved where the probe could not follow them (a view
        # merging them with other axes, a permute of a rank not known): counted on a guessed axis, said in a
        # note and stopped at by the gate (probe.ops.axis_lost_note)
        self.axis_lost: dict[str, None] = {}
        # while not None (tell_layouts' runs): each call's per-index sums of |x| along axes 0 and 1 of a site's
        # pre-activation, with its mask's (batch, tokens) and unit axis; nothing is counted meanwhile
        self.fingerprints: dict[str, list[tuple]] | None = None

    def restart(self) -> None:
        """Count from zero again (a new window of a training run): each site is cleared in place when it
        next runs; sites that do not run again are left out of `layer_stats`."""
        self._stale = set(self.sites)

    def elements_seen(self) -> dict[str, int]:
        """Values per unit each site has counted since `restart` (a stale site: 0)."""
        stale = self._stale
        return {name: 0 if name in stale else site.counted_elements() for name, site in self.sites.items()}

    def _fresh(self, site: SiteAccumulator) -> SiteAccumulator:
        if self._stale and site.name in self._stale:
            self._stale.discard(site.name)
            site.restart()
        return site

    def set_position_mask(
        self, mask: torch.Tensor | None, scoped: dict[str, torch.Tensor | None] | None = None
    ) -> None:
        """Count only the token positions where `mask` ([batch, tokens], bool or 0/1) is true, at every
        site with the token axis, until the next call; None counts every position again. `scoped`
        gives the sites under a module path their own mask (None: every position): an encoder-decoder's
        decoder runs on the decoder's tokens, whose padding is not the encoder's."""
        self.position_mask = None if mask is None else position_mask(mask)
        self.scoped_masks = {
            path: None if m is None else position_mask(m) for path, m in (scoped or {}).items()
        }
        self._given = (self.position_mask, dict(self.scoped_masks))  # what `given_scope` puts back

    def set_scoped_mask(self, path: str, mask: torch.Tensor | PositionMask | None) -> None:
        """The sites under module `path` ("" = every site) count where `mask` is true (None: every
        position), for the forward under way (a module's own key padding mask, read as it is called;
        a mask object as it is: an expert's routed rows)."""
        positions = mask if mask is None or isinstance(mask, PositionMask) else position_mask(mask)
        if path:
            self.scoped_masks[path] = positions
        else:
            self.position_mask = positions

    def given_scope(self, path: str) -> None:
        """The sites under module `path` count as `set_position_mask` set them again: a module called
        without its own key padding mask after a call with one (`set_scoped_mask`) in the same forward
        must not count its new positions with the earlier call's mask."""
        position_mask, scoped = self._given
        if not path:
            self.position_mask = position_mask
        elif path in scoped:
            self.scoped_masks[path] = scoped[path]
        else:
            self.scoped_masks.pop(path, None)

    def mask_for(self, name: str) -> PositionMask | None:
        """The position mask of the site `name` (a module path, maybe with `#k` or `.relu()`): its own
        (`set_scoped_mask(name, …)`: an expert's routed rows) before its modules'."""
        if name in self.scoped_masks:
            return self.scoped_masks[name]
        for path, mask in self.scoped_masks.items():
            if name == path or name.startswith((path + ".", path + "#")):
                return mask
        return self.position_mask

    def note_axis_guess(self, name: str, rank: int, origin_known: bool, axis_lost: bool = False) -> None:
        """Keep `name` in `axis_guesses` when its rank >= 3 input's unit axis was a guess (no producer, no
        --channel-dim), in `axis_lost` when a layer's units were moved where the probe lost them."""
        if self.settings.channel_dim is not None or rank < 2:
            return
        if axis_lost:
            self.axis_lost[name] = None
        elif rank >= 3 and not origin_known:
            self.axis_guesses[name] = rank

    def _site(
        self, name, op, pre, inferred_channel_dim, module_type, producer, origin_known=True, axis_lost=False
    ) -> SiteAccumulator:
        site = self.sites.get(name)
        if site is None:
            site = SiteAccumulator(
                name=name, op=op, channel_dim=-1, module_type=module_type, producer=producer
            )
            site.layout_hint = self.layout_hints.get(name)
            self.sites[name] = site
        else:
            self._fresh(site)
        site.track_min = self.settings.track_min
        if site.positive is None:
            site.channel_dim = resolve_channel_dim(pre.dim(), inferred_channel_dim, self.settings.channel_dim)
            self.note_axis_guess(name, pre.dim(), origin_known, axis_lost)
        return site

    def _fingerprint(self, name: str, pre: torch.Tensor, inferred_channel_dim: int) -> None:
        mask = self.mask_for(name)
        if mask is None or pre.dim() < 2:
            return
        dim = resolve_channel_dim(pre.dim(), inferred_channel_dim, self.settings.channel_dim)
        values = pre.detach().to(torch.float64).abs()  # sums of |x|: no cancellation
        sums = tuple(
            values.sum(dim=[d for d in range(pre.dim()) if d != lead]).cpu().numpy()
            for lead in range(min(pre.dim(), 2))
        )
        self.fingerprints.setdefault(name, []).append((tuple(pre.shape), dim, mask.batch, mask.tokens, sums))

    def tell_layout(self, name: str, time_major: bool) -> None:
        """What reordering a batch's samples showed of the site's tensors: [T, B, ...] (or rows of a
        [T, B, ...] flattened) when `time_major`, else [B, T, ...] (rows of it): read where shapes cannot."""
        self.layout_hints[name] = time_major
        site = self.sites.get(name)
        if site is not None:
            site.layout_hint = time_major
            if site.pending is not None:
                site.learn_layout(time_major)

    def record_pre(
        self,
        name: str,
        op: str,
        pre: torch.Tensor,
        inferred_channel_dim: int,
        module_type: str | None = None,
        producer: str | None = None,
        origin_known: bool = True,
        axis_lost: bool = False,
    ) -> None:
        """First half of a batch at a site, while the pre-activation is intact (`origin_known`: a layer
        says where its units are; else a rank >= 3 input's unit axis is a guess, `axis_guesses`; `axis_lost`:
        a layer made the units but the probe lost their axis on the way, `axis_lost`)."""
        if self.fingerprints is not None:
            self.call_hint = None
            self._fingerprint(name, pre, inferred_channel_dim)
            return
        site = self._site(name, op, pre, inferred_channel_dim, module_type, producer, origin_known, axis_lost)
        site.call_hint, self.call_hint = self.call_hint, None
        mask = self.mask_for(name)
        counted = site.finite_pre(pre, mask) if self.settings.skip_nonfinite else pre
        site.observe_pre(counted, self.settings.threshold, mask, self.fused_devices)
        collector = self.collectors.get(name)
        if collector is not None:
            if mask is not None and site.masked_now:
                pre = mask.select(pre, site.channel_dim, site.known_time_major())
            collector(pre, site.channel_dim)

    def run_relu_in_parts(
        self,
        name: str,
        op: str,
        pre: torch.Tensor,
        in_place: bool,
        inferred_channel_dim: int,
        module_type: str | None = None,
        producer: str | None = None,
        origin_known: bool = True,
        axis_lost: bool = False,
    ) -> torch.Tensor | None:
        """Run a relu site and count it in one pass from memory (SiteAccumulator.run_relu_in_parts, or
        run_relu_masked under a token mask); None where that does not apply (a collector, a fused device,
        small tensors, a mask the kernel cannot follow …): then the caller runs the op and
        record_pre/record_post."""
        if (
            self.fingerprints is not None
            or name in self.collectors
            or pre.device.type in self.fused_devices
            or op not in ("relu", "relu6")
            or self.settings.skip_nonfinite
        ):
            return None
        site = self._site(name, op, pre, inferred_channel_dim, module_type, producer, origin_known, axis_lost)
        site.call_hint, self.call_hint = self.call_hint, None  # as record_pre hands it on
        mask = self.mask_for(name)
        if mask is not None:
            return site.run_relu_masked(pre, in_place, self.settings.threshold, mask)
        return site.run_relu_in_parts(pre, in_place, self.settings.threshold)

    def record_post(self, name: str, post: torch.Tensor) -> None:
        """Second half: counts and sums from the activation's output."""
        if self.fingerprints is not None:
            return
        site = self.sites[name]
        if self.settings.skip_nonfinite:
            post = site.finite_post(post, self.mask_for(name))
        site.observe_post(post, self.settings.threshold, self.mask_for(name))

    def record(
        self,
        name: str,
        op: str,
        pre: torch.Tensor,
        post: torch.Tensor | None,
        inferred_channel_dim: int,
        module_type: str | None = None,
        producer: str | None = None,
    ) -> None:
        self.record_pre(name, op, pre, inferred_channel_dim, module_type, producer)
        self.record_post(name, post if post is not None else _derived_output(op, pre))

    def add_batch(
        self,
        name: str,
        op: str,
        channel_dim: int,
        maximum: torch.Tensor,
        count: torch.Tensor,
        total: torch.Tensor,
        numel: int,
        saturated: torch.Tensor | None,
        module_type: str | None,
        producer: str | None,
    ) -> None:
        """A batch whose reductions were computed elsewhere (inside the compiled graph)."""
        site = self.sites.get(name)
        if site is None:
            site = SiteAccumulator(
                name=name, op=op, channel_dim=channel_dim, module_type=module_type, producer=producer
            )
            self.sites[name] = site
        else:
            self._fresh(site)
        site.channel_dim = channel_dim
        site.add_reduced(maximum, count, total, numel, saturated)

    def declare(self, name: str, op: str, module_type: str | None, producer: str | None) -> None:
        """Make a site known before it runs, so that a site no sample reaches is reported as not run."""
        if name not in self.sites:
            self.sites[name] = SiteAccumulator(
                name=name, op=op, channel_dim=-1, module_type=module_type, producer=producer
            )

    def withdraw(self, name: str) -> None:
        """Forget a declared site that turned out to be no layer (probe.ops.clamp_is_layer), unless it counted."""
        site = self.sites.get(name)
        if site is not None and site.positive is None:
            del self.sites[name]

    def layer_stats(self) -> list[LayerStats]:
        out = []
        for site in self.sites.values():
            if site.name in self._stale:
                continue
            if site.positive is None and not site.pending:  # declared, never ran
                out.append(
                    LayerStats(
                        name=site.name,
                        op=site.op,
                        channel_dim=site.channel_dim,
                        positive_counts=np.zeros(0, dtype=np.int64),
                        elements_per_unit=0,
                        max_preactivation=np.zeros(0),
                        sum_abs=np.zeros(0),
                        module_type=site.module_type,
                        producer=site.producer,
                    )
                )
            else:
                out.append(site.to_layer_stats())
        return out


def infer_channel_dim(rank: int, producer_is_channel_first: bool | None, unit_axis: int | None = None) -> int:
    """Unit axis: dim 1 for conv-like [N, C, …] outputs, the last dim for [N, F] and [B, T, F], and for
    a Linear's output of any rank (ConvNeXt's `Linear` on channels-last [N, H, W, C] images): a producer
    that says where its units are wins (`unit_axis`: a middle axis a permute moved them to); without one,
    rank >= 4 is taken as [N, C, …]."""
    if unit_axis is not None and 0 <= unit_axis < rank:
        return unit_axis
    if producer_is_channel_first is not None:
        return 1 if producer_is_channel_first else -1
    return 1 if rank >= 4 else -1


def _reductions() -> dict:
    """Reductions that may take a tensor's unit axis away, each with where its `dim` argument sits."""
    T = torch.Tensor
    table = {f: 1 for f in (T.sum, torch.sum, T.mean, torch.mean, T.amax, torch.amax, T.amin, torch.amin)}
    table.update({f: 1 for f in (T.var, torch.var, T.std, torch.std, T.logsumexp, torch.logsumexp)})
    table.update({f: 1 for f in (T.prod, torch.prod)})
    table.update({T.norm: 2, torch.norm: 2, torch.linalg.vector_norm: 2})
    return table


REDUCTIONS = _reductions()
# elementwise ops besides the pass-through ones (eager._pass_through_functions) that keep a reduction
# over the units one value per position (`2 - h.sum(-1)`, `-m`, `m ** 2`)
PER_POSITION_ELEMENTWISE = frozenset(
    (torch.Tensor.__rsub__, torch.Tensor.__rtruediv__, torch.Tensor.__neg__, torch.Tensor.neg, torch.neg)
    + (torch.Tensor.__pow__, torch.Tensor.pow, torch.pow, torch.Tensor.abs, torch.abs, torch.sqrt)
    + (torch.Tensor.sqrt, torch.exp, torch.Tensor.exp, torch.log, torch.Tensor.log)
)


def reduces_unit_axis(func, args: tuple, kwargs: dict, channel_first: bool | None) -> bool:
    """Whether `func(*args, **kwargs)` reduces its rank >= 2 input over the unit axis alone (as
    `infer_channel_dim` places it): what remains is one value per position or sample (`h.sum(-1)`,
    `x.norm(dim=-1)`), which holds no units, and a clamp of it (`(h.sum(-1) - m).clamp(min=0)`, a
    margin) is no ReLU layer, whatever its shape (probe.ops.clamp_is_layer)."""
    where = REDUCTIONS.get(func)
    if where is None or not args or not isinstance(args[0], torch.Tensor) or args[0].dim() < 2:
        return False
    dim = args[where] if len(args) > where else kwargs.get("dim")
    return unit_axis_reduced(args[0].dim(), dim, channel_first)


def moved_unit_axis(kind: str, dims: tuple, axis: int, rank: int = 3) -> int | None:
    """Where a rank-RANK tensor's unit axis `axis` is after a layout op (`aten_ops.LAYOUT`), or None when
    that is not known: `transpose`/`swapaxes` (dims = the two axes), `permute` (dims = the order),
    `movedim`/`moveaxis` (dims = (source, destination), each an axis or a sequence of them), `slice`
    (dims = the sliced axis; slicing the unit axis changes the units), any other kind keeps the axis
    (layer_norm over the units). Eager, torch.export and TorchScript probes all move it here."""
    try:
        if kind in ("movedim", "moveaxis"):
            return _movedim_order(dims, rank).index(axis)
        if kind in ("transpose", "swapaxes", "swapdims"):
            if any(int(v) >= rank for v in dims[:2]):
                return None  # an axis this rank has not: the tensor is of another rank than assumed
            a, b = (int(v) % rank for v in dims[:2])
            return b if axis == a else a if axis == b else axis
        if kind == "permute":
            return [int(d) % rank for d in dims].index(axis)
        if kind == "slice":
            return None if int(dims[0]) % rank == axis else axis
    except (TypeError, ValueError, IndexError):
        return None
    return axis


def einsum_permutation(equation) -> tuple[int, ...] | None:
    """The permute an einsum of one operand that only reorders its axes is (`"nchw->nhwc"`: (0, 2, 3, 1)),
    else None (a reduction, a diagonal, an ellipsis, several operands)."""
    if not isinstance(equation, str):
        return None
    parts = equation.replace(" ", "").split("->")
    if len(parts) != 2:
        return None
    source, result = parts
    if not source.isalpha() or len(set(source)) != len(source) or sorted(source) != sorted(result):
        return None
    return tuple(source.index(axis) for axis in result)


def _movedim_order(dims: tuple, rank: int) -> list[int]:
    """The axes of a rank-RANK tensor in their order after movedim(source, destination) (= dims): the
    moved ones at their destinations, the others in their order in the places left (torch's rule)."""
    source, destination = ([v] if isinstance(v, int) else list(v) for v in dims[:2])
    if len(source) != len(destination) or any(not -rank <= int(v) < rank for v in source + destination):
        raise ValueError("not a movedim of this rank")
    order: list[int | None] = [None] * rank
    for a, b in zip(source, destination, strict=True):
        order[int(b) % rank] = int(a) % rank
    rest = iter(a for a in range(rank) if a not in order)
    return [next(rest) if a is None else a for a in order]


def unit_axis_side(axis: int | None, rank: int) -> bool | None:
    """A unit axis as the probes keep it: True at dim 1 (channel-first), False at the last dim, None
    anywhere else (a rank >= 4 tensor whose units a permute left in the middle: not representable)."""
    return True if axis == 1 else False if axis == rank - 1 else None


def pools_over_space(rank: int, dims) -> bool:
    """True when a mean/amax over `dims` of a rank>=4 [N, C, ...] tensor keeps every channel in its own
    slot (a global average pool written as `x.mean((2, 3))`): the dims are spatial only."""
    if rank < 4 or dims is None:
        return False
    dims = (dims,) if isinstance(dims, int) else tuple(dims)
    try:
        return bool(dims) and all(int(d) % rank >= 2 for d in dims)
    except (TypeError, ValueError):
        return False


SQUEEZES = ("squeeze", "unsqueeze")


def squeeze_keeps_channels(kind: str, dims, rank_in: int | None) -> bool:
    """Whether a squeeze / unsqueeze of `dims` (of a tensor of `rank_in` dims) leaves dim 1 where it is:
    every removed or added dim comes after it (a Conv1d written as a Conv2d: conv2d(x.unsqueeze(2))
    .squeeze(2)). Without dims (squeeze every size-1 dim) or with a negative one of unknown rank: no."""
    if isinstance(dims, int):
        dims = (dims,)
    if not dims:
        return False
    rank = rank_in if kind == "squeeze" or rank_in is None else rank_in + len(dims)
    try:
        for d in dims:
            d = int(d)
            if d < 0 and rank is None:
                return False
            if (d % rank if d < 0 else d) <= 1:
                return False
    except (TypeError, ValueError):
        return False
    return True


def relaid_channel_first(
    channel_first: bool | None, layouts: list[tuple[str, tuple]], rank: int | None = None
) -> bool | None:
    """`relaid_units`' side alone: True (dim 1), False (last axis), None (elsewhere or not followed)."""
    return relaid_units(channel_first, layouts, rank)[0]


def relaid_units(
    channel_first: bool | None, layouts: list[tuple[str, tuple]], rank: int | None = None
) -> tuple[bool | None, int | None]:
    """A graph probe's walk back from an activation met the layout ops `layouts` (nearest the
    activation first) before reaching a producer whose units are channel-first (or last-axis): where the
    units are at the activation, as (True, None) at dim 1, (False, None) on the last axis, (None, k) on a
    middle axis k of a rank >= 4 tensor (a conv's [N, C, H, W] permuted to [N, H, C, W]), or (None, None)
    where the walk cannot follow them (then the producer's units were lost on the way: the caller says so).
    `rank`: the rank of the producer's output (None: a permute on the way tells it, else a [B, T, F] is
    assumed for transposes, as ever, while squeezes are read at every rank a producer's output may have and
    must agree: TorchScript holds no shapes). Layout kinds: `moved_unit_axis`'s, `squeeze` / `unsqueeze`
    (dims), `reshape` (dims = the shapes before and after: probe.ops.reshaped_unit_axis)."""
    if channel_first is None or not layouts:
        return channel_first, None
    told = rank if rank is not None else _rank_told(layouts)
    if told is not None or not any(kind in SQUEEZES for kind, _ in layouts):
        return _relaid_at(channel_first, layouts, told if told is not None else 3, told is not None)
    found = {
        _relaid_at(channel_first, layouts, guess, False)
        for guess in (2, 3, 4, 5)
        if guess >= 3 or not channel_first
    }
    return found.pop() if len(found) == 1 else (None, None)


def _relaid_at(
    channel_first: bool, layouts: list[tuple[str, tuple]], rank: int, rank_known: bool
) -> tuple[bool | None, int | None]:
    """`relaid_units` for a producer output of `rank` dims (negative squeeze dims only when `rank_known`)."""
    current = rank
    axis: int | None = 1 if channel_first else current - 1
    for kind, dims in reversed(layouts):
        if kind in SQUEEZES:
            axis, current = squeezed_unit_axis(kind, dims, axis, current, rank_known)
        elif kind == "reshape":
            before, after = dims
            axis = reshaped_unit_axis(before, after, axis) if len(before) == current else None
            current = len(after)
        elif kind == "lost" or (kind == "permute" and len(dims) != current):
            return None, None
        else:
            axis = moved_unit_axis(kind, dims, axis, current)
        if axis is None or axis == 0:
            return None, None
    side = unit_axis_side(axis, current)
    return side, axis if side is None else None


def squeezed_unit_axis(
    kind: str, dims, axis: int, rank: int, rank_known: bool = True
) -> tuple[int | None, int]:
    """(where the unit axis `axis` of a rank-`rank` tensor is after squeeze / unsqueeze of `dims`, the new
    rank); None when the units are squeezed away or a dim cannot be read (none given, negative at a rank
    not known). A squeeze's dims are taken to be of size 1 (a graph probe without shapes cannot know)."""
    if isinstance(dims, int):
        dims = (dims,)
    try:
        dims = tuple(int(d) for d in dims or ())
    except (TypeError, ValueError):
        return None, rank
    if not dims or (not rank_known and any(d < 0 for d in dims)):
        return None, rank
    if kind == "unsqueeze":
        new_rank = rank + len(dims)
        added = {d % new_rank for d in dims}
        if any(d >= new_rank for d in dims):
            return None, new_rank
        return [k for k in range(new_rank) if k not in added][axis], new_rank
    if any(d >= rank for d in dims):
        return None, rank
    gone = {d % rank for d in dims}
    if axis in gone:
        return None, rank - len(gone)
    return axis - sum(g < axis for g in gone), rank - len(gone)


def _rank_told(layouts: list[tuple[str, tuple]]) -> int | None:
    """The producer's output rank as the first permute after it says (its number of dims, less the
    dims squeezes before it added), or None."""
    change = 0
    for kind, dims in reversed(layouts):
        if kind == "permute":
            return len(dims) - change
        if kind in SQUEEZES:
            change += -len(dims) if kind == "squeeze" else len(dims)
    return None


def submodule(module: torch.nn.Module, path: str) -> torch.nn.Module:
    """`module.get_submodule(path)`, for a TorchScript module too (which has no get_submodule): its
    submodules are attributes. AttributeError when there is none."""
    if not isinstance(module, torch.jit.ScriptModule):
        return module.get_submodule(path)
    for part in path.split(".") if path else ():
        child = getattr(module, part, None)
        if not isinstance(child, torch.nn.Module):
            raise AttributeError(f"{path}: no such submodule")
        module = child
    return module


def is_stored(module: torch.nn.Module, name: str) -> bool:
    """True when `name` is a parameter or buffer itself (so writing into it changes the model; its values
    are the checkpoint's), not a value computed by a parametrization or a constant of the code. An
    nn.Module, a program's module or a TorchScript module."""
    owner, _, leaf = name.rpartition(".")
    try:
        sub = submodule(module, owner)
    except AttributeError:
        return False
    return any(leaf == key for key, _ in sub.named_parameters(recurse=False)) or any(
        leaf == key for key, _ in sub.named_buffers(recurse=False)
    )


def copy_program_module(module: torch.nn.Module) -> torch.nn.Module:
    """A deep copy of a program's module (an ExportedProgram's `module()`) whose constants of the code
    (`torch.tensor(0.)` lifted by the export) stay plain attributes: GraphModule's deepcopy registers them
    as buffers, and a buffer's zeros are the checkpoint's (no ReLU's Z: probe.ops), so the `maximum(x,
    torch.tensor(0.))` the scan counted would be no site in the copy (`fix`, `--certify`)."""
    import copy

    stored = {name for name, _ in module.named_buffers()}
    copied = copy.deepcopy(module)
    for name, tensor in list(copied.named_buffers()):
        if name not in stored:
            owner, _, leaf = name.rpartition(".")
            holder = copied.get_submodule(owner)
            del holder._buffers[leaf]
            setattr(holder, leaf, tensor)
    return copied


def keeps_dtype(x: torch.Tensor, zeros) -> bool:
    """Whether maximum(x, zeros) of a float x has x's dtype (a ReLU spelled with a maximum, probe.ops):
    a number or a 0-d tensor (not complex) does not promote a float tensor; zeros with dims promote as
    their dtype says. Reads dtypes only: no op that an export tracing the probe would record."""
    dtype = getattr(zeros, "dtype", None)
    if dtype is None or dtype == x.dtype:
        return True
    if dtype.is_complex:
        return False
    if zeros.dim() == 0 or not dtype.is_floating_point:  # a 0-d value or an integer tensor: x's float type
        return True
    return dtype.itemsize < x.dtype.itemsize  # float16 / bfloat16 into float32, not into each other


def _derived_output(op: str, pre: torch.Tensor) -> torch.Tensor:
    from deadrelu_cli.probe.accumulator import apply_op

    return apply_op(op, pre)


def call_and_record(
    func,
    args: tuple,
    kwargs: dict,
    op: str,
    in_place: bool,
    before: Callable[[torch.Tensor], None],
    after: Callable[[torch.Tensor], None],
) -> object:
    """Run an activation, handing its pre-activation to `before` and its output to `after`.

    Right even in place: `before` runs before the op overwrites its input (ops other than
    relu/relu6 get a copy of the input, as their counts need it).
    """
    pre = args[0]
    if in_place and op not in ("relu", "relu6"):
        pre = pre.clone()
    if in_place:
        before(pre)
        out = func(*args, **kwargs)
    else:
        out = func(*args, **kwargs)
        before(pre)
    after(out)
    return out


# the relu / relu6 kernels a graph calls (ExportedProgram nodes, TorchScript's dispatched ops), run as the
# probe's own (bit for bit these: clamp_min(x, 0), hardtanh(x, 0, 6)); other spellings run as written
ATEN_RELUS = (torch.ops.aten.relu.default, torch.ops.aten.relu_.default)
ATEN_RELU6S = (
    torch.ops.aten.relu6.default,
    torch.ops.aten.hardtanh.default,
    torch.ops.aten.hardtanh_.default,
)


def plain_relu_call(op: str, func, args: tuple, kwargs: dict) -> bool:
    """Whether a graph's call is a plain relu (relu6): one tensor, the op's own bounds (+0.0 and 6)."""
    if kwargs or not args or not isinstance(args[0], torch.Tensor):
        return False
    if op == "relu":
        return func in ATEN_RELUS and len(args) == 1
    if op != "relu6" or func not in ATEN_RELU6S:
        return False
    bounds = tuple(args[1:])
    if func is torch.ops.aten.relu6.default:
        return not bounds
    return (
        len(bounds) == 2
        and all(isinstance(b, int | float) for b in bounds)
        and (float(bounds[0]), float(bounds[1])) == (0.0, 6.0)
        and math.copysign(1.0, bounds[0]) > 0
    )


def run_static_site(registry: SiteRegistry, site, func, args: tuple, kwargs: dict, in_place: bool) -> object:
    """call_and_record for a site known from a graph (ExportedProgram, TorchScript); a plain relu (relu6)
    on the CPU is run and counted in one pass instead (SiteRegistry.run_relu_in_parts), as in eager."""
    pre = args[0] if args else None
    if plain_relu_call(site.op, func, args, kwargs) and counted_while_running(pre):
        out = registry.run_relu_in_parts(site.name, site.op, pre, in_place, *static_site_facts(site, pre))
        if out is not None:
            return out
    return call_and_record(func, args, kwargs, site.op, in_place, *static_site_hooks(registry, site))


def static_site_facts(site, pre: torch.Tensor) -> tuple:
    """What a graph's site tells the registry of a call (record_pre's and run_relu_in_parts' arguments
    after the tensor): the inferred unit axis, module type, producer, whether a layer places the units,
    whether their axis was lost."""
    return (
        infer_channel_dim(pre.dim(), site.channel_first, site.unit_axis),
        site.module_type,
        site.producer,
        site.channel_first is not None or site.unit_axis is not None,
        site.axis_lost,
    )


def static_site_hooks(registry: SiteRegistry, site) -> tuple[Callable, Callable]:
    """`before`/`after` for a site known from a graph (ExportedProgram, TorchScript)."""

    def before(pre: torch.Tensor) -> None:
        registry.record_pre(site.name, site.op, pre, *static_site_facts(site, pre))

    def after(out: torch.Tensor) -> None:
        registry.record_post(site.name, out)

    return before, after
