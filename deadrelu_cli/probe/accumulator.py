"""On-device per-unit counters for torch probes: O(units) memory, no host sync per batch."""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.autograd.forward_ad import unpack_dual
from torch.autograd.graph import increment_version

from deadrelu_cli.errors import UserError
from deadrelu_cli.gate import (
    LAYOUT_AMBIGUOUS,
    PIXELS_FLATTENED,
    PIXELS_MIXED,
    ROW_ORDER_AMBIGUOUS,
    ROWS_NOT_ATTRIBUTED,
)
from deadrelu_cli.native import ReluStats, relu_stats
from deadrelu_cli.probe.ops import (
    TOKEN_FLAT,
    TOKEN_FLAT_TIME_MAJOR,
    TOKEN_ROWS,
    TOKENS_FIRST,
    TOKENS_LAST,
    counts_from_output,
    layout_ambiguous,
    pixel_cells,
    pixels_flattened,
    row_order_ambiguous,
    threshold_below,
    token_layout,
)
from deadrelu_cli.stats import CAPPED_OPS, LayerStats

# a mask's runs of kept rows are reduced as views (no copy) when they average at least this many
# elements; shorter runs cost more in per-view calls than one gathered copy (measured on CPU, fp32)
RUN_VIEW_ELEMENTS = 8192


class PositionMask:
    """Which token positions of the current batch count: a bool [B, T] (True = kept).

    A site's tensor has the token axis when it is [B, T, ...] with its units after T, time-major
    [T, B, ...] (nn.TransformerEncoderLayer with batch_first=False), the same flattened to [B*T, ...]
    (OPT's FFN runs on [B*T, D]), or [B, C, T] with its units on axis 1
    (SqueezeBERT's Conv1d feed-forward, a text CNN); only kept positions are counted there,
    exactly as if the padded positions were not in the data. `select` returns the kept rows with the
    tensor's rank and unit axis unchanged ([1, K, ...], [K, ...] or [1, C, K]), or None for a site without the
    token axis (a pooled [B, F] head, a conv [N, C, H, W]), which is then counted over every element.
    """

    def __init__(self, mask: torch.Tensor) -> None:
        if mask.dim() != 2:
            raise UserError(f"a position mask is [batch, tokens]; this one has shape {list(mask.shape)}")
        self.mask = mask.bool()
        self.batch, self.tokens = (int(d) for d in mask.shape)
        flat = self.mask.reshape(-1)
        self.kept = int(flat.sum())  # one host sync per batch, not per site
        self.all_kept = self.kept == flat.numel()
        self._index = None if self.all_kept else flat.nonzero().squeeze(1)
        self._index_on: dict = {}
        self._time_major_index_on: dict = {}  # kept rows of the [T*B] flattening (TOKEN_FLAT_TIME_MAJOR)
        self._runs: list[tuple[int, int]] | None = None
        self._symmetric: bool | None = None  # mask == mask.T (see `ambiguous`)

    def runs(self) -> list[tuple[int, int]]:
        """The kept rows of the flattened [B*T] axis as (start, stop) runs: padding makes a few long runs."""
        if self._runs is None:
            kept = np.concatenate(([False], self.mask.reshape(-1).cpu().numpy(), [False]))
            edges = np.flatnonzero(kept[1:] != kept[:-1])
            self._runs = list(zip(edges[0::2].tolist(), edges[1::2].tolist(), strict=True))
        return self._runs

    def index(self, device) -> torch.Tensor:
        found = self._index_on.get(device)
        if found is None:
            found = self._index_on[device] = self._index.to(device)
        return found

    def time_major_index(self, device) -> torch.Tensor:
        found = self._time_major_index_on.get(device)
        if found is None:
            found = self.mask.t().reshape(-1).nonzero().squeeze(1).to(device)
            self._time_major_index_on[device] = found
        return found

    def parts(
        self, tensor: torch.Tensor, channel_dim: int, time_major: bool | None = None
    ) -> list[torch.Tensor] | None:
        """The kept rows as `select` shapes them, but as views of the tensor's runs of kept rows where
        that is cheaper than one gathered copy (on the CPU, with runs of RUN_VIEW_ELEMENTS or more
        elements on average; each view is reduced while it is in cache). None without the token axis.
        `time_major`: how to read a tensor whose shape reads both ways (see `layout`)."""
        layout = self.layout(tensor, channel_dim, time_major)
        if layout is None:
            return None
        if (
            self.all_kept
            or tensor.device.type != "cpu"
            or layout in (TOKENS_LAST, TOKENS_FIRST, TOKEN_FLAT_TIME_MAJOR)
        ):
            return [self.select(tensor, channel_dim, time_major)]
        if layout == TOKEN_ROWS:
            if tensor.stride(0) != tensor.shape[1] * tensor.stride(1):  # flatten(0, 1) would copy
                return [self.select(tensor, channel_dim, time_major)]
            rows, lead = tensor.flatten(0, 1), True
        else:
            rows, lead = tensor, False
        runs = self.runs()
        if not runs:  # nothing kept: an empty view, so that the site still learns its units
            runs = [(0, 0)]
        elif self.kept * (rows[0].numel() if rows.shape[0] else 0) < RUN_VIEW_ELEMENTS * len(runs):
            return [self.select(tensor, channel_dim, time_major)]
        views = [rows[start:stop] for start, stop in runs]
        return [view.unsqueeze(0) for view in views] if lead else views

    def layout(self, tensor: torch.Tensor, channel_dim: int, time_major: bool | None = None) -> str | None:
        """Where the tensor holds this mask's positions (probe.ops.token_layout); a shape that reads as
        [B, T, ...] and [T, B, ...] alike (`ambiguous`) is [T, B, ...] when `time_major`, and flattened
        rows [B*T, ...] are those of a [T, B, ...] (row t*B + b) when `time_major`."""
        dim = channel_dim % max(tensor.dim(), 1)
        layout = token_layout(tuple(tensor.shape), dim, self.batch, self.tokens)
        if time_major and layout == TOKEN_ROWS and self.ambiguous(tensor, channel_dim):
            return TOKENS_FIRST
        if time_major and layout == TOKEN_FLAT and self.batch > 1:
            return TOKEN_FLAT_TIME_MAJOR
        return layout

    def ambiguous(self, tensor: torch.Tensor, channel_dim: int) -> bool:
        """Whether the tensor's shape reads as [B, T, ...] and as [T, B, ...] (probe.ops.layout_ambiguous)
        and the two readings keep different positions: a symmetric mask (no padding at all, or the same
        lengths along both axes) keeps the same elements either way, so there is nothing to decide. Rows
        [B*T, ...] of either order (probe.ops.row_order_ambiguous) are, unless every position is kept."""
        shape, dim = tuple(tensor.shape), channel_dim % max(tensor.dim(), 1)
        if row_order_ambiguous(shape, dim, self.batch, self.tokens):
            return not self.all_kept
        if not layout_ambiguous(shape, dim, self.batch, self.tokens):
            return False
        return not self.symmetric

    @property
    def symmetric(self) -> bool:
        """Whether the mask equals its transpose (B == T): kept [i, j] exactly where [j, i] is."""
        if self._symmetric is None:  # once per mask (one host sync), and only where asked
            square = self.batch == self.tokens
            self._symmetric = square and (self.all_kept or bool(torch.equal(self.mask, self.mask.T)))
        return self._symmetric

    def reading(self, value: torch.Tensor) -> bool | None:
        """How a forward's input of this square mask's shape is laid out, by its values: False when it is
        [B, T] as the mask (it is the mask, as 0/nonzero, or its padded positions hold one value: a pad
        id), True when it is [T, B] (the same read on its transpose: time-major token ids), None when
        neither or both readings fit (ids padded with varied values, a mask that is all kept)."""
        if self.all_kept or tuple(value.shape) != (self.batch, self.tokens):
            return None

        keep = self.mask.to(value.device)

        def fits(candidate: torch.Tensor) -> bool:
            padded = candidate[~keep]
            return bool(torch.equal(candidate != 0, keep)) or bool((padded == padded[0]).all())

        batch_first, time_major = fits(value), fits(value.T)
        return None if batch_first == time_major else time_major

    def not_applied(self, tensor: torch.Tensor, channel_dim: int) -> str | None:
        """Why this mask could not be applied to a tensor where that must be said and gated (None: the
        tensor has no token axis, or it was applied)."""
        return None

    def select(
        self, tensor: torch.Tensor, channel_dim: int, time_major: bool | None = None
    ) -> torch.Tensor | None:
        layout = self.layout(tensor, channel_dim, time_major)
        if layout is None or self.all_kept:
            return None if layout is None else tensor
        if layout == TOKENS_LAST:
            rows = tensor.transpose(0, 1).flatten(1, 2)  # [C, B*T]
            return rows.index_select(1, self.index(tensor.device)).unsqueeze(0)  # [1, C, kept]
        if layout in (TOKEN_ROWS, TOKENS_FIRST):
            rows = tensor.transpose(0, 1) if layout == TOKENS_FIRST else tensor  # [T, B, ...] -> [B, T, ...]
            return rows.flatten(0, 1).index_select(0, self.index(tensor.device)).unsqueeze(0)
        if layout == TOKEN_FLAT_TIME_MAJOR:  # rows t*B + b
            return tensor.index_select(0, self.time_major_index(tensor.device))
        return tensor.index_select(0, self.index(tensor.device))  # TOKEN_FLAT


class RoutedRows(PositionMask):
    """The rows one expert of a mixture ran in one call (probe.experts): KEPT holds, per row, whether it
    is a real token's (True) or padding's, in the implementation's order. A 1-D KEPT reads a tensor of
    those rows [rows, …]; a 2-D one [a, b] reads a tensor [a, b, …] (an expert's rows kept in a
    `[1, rows, …]` from `x[None, index]`). Built as a [1, rows] / [a, b] mask (a [1, 1] PositionMask
    would read no token axis: one row counts too)."""

    def __init__(self, kept: torch.Tensor) -> None:
        self.lead = tuple(int(d) for d in kept.shape)
        super().__init__(kept.reshape(1, -1) if kept.dim() == 1 else kept)

    def layout(self, tensor: torch.Tensor, channel_dim: int, time_major: bool | None = None) -> str | None:
        dim = channel_dim % max(tensor.dim(), 1)
        rank = len(self.lead)
        if tensor.dim() <= rank or tuple(tensor.shape[:rank]) != self.lead or dim < rank:
            return None
        return TOKEN_FLAT if rank == 1 else TOKEN_ROWS

    def ambiguous(self, tensor: torch.Tensor, channel_dim: int) -> bool:
        return False


class RowsNotAttributed(PositionMask):
    """An expert's rows (probe.experts) whose tokens the probe could not follow to its activation (an
    index op it does not read): every row counted, padding's included, and said: `not_applied` gives
    the reason the report and the gate read (gate.ROWS_NOT_ATTRIBUTED)."""

    def __init__(self) -> None:
        super().__init__(torch.ones((1, 1), dtype=torch.bool))

    def layout(self, tensor: torch.Tensor, channel_dim: int, time_major: bool | None = None) -> str | None:
        return None

    def ambiguous(self, tensor: torch.Tensor, channel_dim: int) -> bool:
        return False

    def not_applied(self, tensor: torch.Tensor, channel_dim: int) -> str | None:
        return ROWS_NOT_ATTRIBUTED


PIXELS = "pixels"  # PixelMask.layout: a conv feature map [B, C, h, w] of the image


class PixelMask:
    """Which pixels of the current batch's images count: a bool [B, H, W] (True = image, False = padding;
    a DETR-style `pixel_mask`). A conv feature map [B, C, h, w] whose grid divides the image (H = h·sy,
    W = w·sx) holds these positions as cells of sy×sx pixels: where every cell is all image or all
    padding, its image cells are counted (`select`: [1, C, kept, 1]), exactly as if the padding were not
    there; where a cell holds both (the padding does not end on the map's stride), nothing tells which
    it is, and the site counts every cell and is marked (`not_applied`: PIXELS_MIXED). A [B, T, F] site
    whose T may be the pixels of such a map flattened is marked too (PIXELS_FLATTENED); a module given the
    flattened mask as its attention_mask scopes its sites to it instead (backends.torch.scan). Other
    sites (a pooled head, object queries) have no pixel axis: every element counts."""

    def __init__(self, mask: torch.Tensor) -> None:
        if mask.dim() != 3:
            raise UserError(f"a pixel mask is [batch, height, width]; this one has shape {list(mask.shape)}")
        self.pixels = mask.bool()
        self.batch, self.height, self.width = (int(d) for d in mask.shape)
        self.tokens = 0  # no token axis: no token layout matches (probe.ops.token_layout)
        self.mask = self.pixels.reshape(self.batch, -1)
        self.kept = int(self.mask.sum())
        self.all_kept = self.kept == self.mask.numel()
        self.symmetric = False
        self._cells: dict[tuple[int, int], torch.Tensor | None] = {}

    def cells(self, h: int, w: int) -> torch.Tensor | None:
        """bool [B, h, w]: the cells of an h×w grid over the images that are all image, or None when some
        cell holds image and padding both, or the grid does not divide the image."""
        if (h, w) not in self._cells:
            found = None
            if 0 < h <= self.height and 0 < w <= self.width and not self.height % h and not self.width % w:
                cells = pixel_cells(self.pixels.cpu().numpy(), (self.height // h, self.width // w), (h, w))
                found = None if cells is None else torch.from_numpy(cells).to(self.pixels.device)
            self._cells[(h, w)] = found
        return self._cells[(h, w)]

    def _spatial(self, tensor: torch.Tensor, channel_dim: int) -> bool:
        return tensor.dim() == 4 and channel_dim % 4 == 1 and tensor.shape[0] == self.batch

    def _flattened(self, tensor: torch.Tensor, channel_dim: int) -> bool:
        return pixels_flattened(tuple(tensor.shape), channel_dim, self.batch, self.height, self.width)

    def layout(self, tensor: torch.Tensor, channel_dim: int, time_major: bool | None = None) -> str | None:
        return PIXELS if self._spatial(tensor, channel_dim) else None

    def ambiguous(self, tensor: torch.Tensor, channel_dim: int) -> bool:
        return False

    def not_applied(self, tensor: torch.Tensor, channel_dim: int) -> str | None:
        """Why a site that holds the images' positions counted them all (padding included), or None."""
        if self.all_kept:
            return None
        if self._spatial(tensor, channel_dim):
            return None if self.cells(*tensor.shape[2:]) is not None else PIXELS_MIXED
        return PIXELS_FLATTENED if self._flattened(tensor, channel_dim) else None

    def select(
        self, tensor: torch.Tensor, channel_dim: int, time_major: bool | None = None
    ) -> torch.Tensor | None:
        if not self._spatial(tensor, channel_dim):
            return None
        if self.all_kept:
            return tensor
        keep = self.cells(*tensor.shape[2:])
        if keep is None:
            return None
        index = keep.reshape(-1).nonzero().squeeze(1).to(tensor.device)
        rows = tensor.transpose(0, 1).reshape(tensor.shape[1], -1)  # [C, B*h*w]
        return rows.index_select(1, index)[None, :, :, None]  # [1, C, kept, 1]

    def parts(
        self, tensor: torch.Tensor, channel_dim: int, time_major: bool | None = None
    ) -> list[torch.Tensor] | None:
        found = self.select(tensor, channel_dim, time_major)
        return None if found is None else [found]


def position_mask(mask: torch.Tensor) -> PositionMask | PixelMask:
    """A [batch, tokens] mask of token positions, or a [batch, height, width] mask of pixels."""
    return PixelMask(mask) if mask.dim() == 3 else PositionMask(mask)


@dataclass
class SiteAccumulator:
    """Counters for one call site, living on the activation's device."""

    name: str
    op: str
    channel_dim: int
    module_type: str | None = None
    producer: str | None = None
    positive: torch.Tensor | None = None
    max_pre: torch.Tensor | None = None
    sum_abs: torch.Tensor | None = None
    saturated: torch.Tensor | None = None
    elements_per_unit: int = 0
    track_min: bool = False
    min_pre: torch.Tensor | None = None
    extra: dict = field(default_factory=dict)
    _nan_in_batch: bool = False
    _fused_batch: bool = False  # this batch was counted by fused_stats in observe_pre
    # max_pre itself once every unit's maximum is positive (run_relu_in_parts' cheaper max), else None
    _positive_max: torch.Tensor | None = None
    masked_now: bool = False  # whether the current batch's position mask applies at this site
    # [T, B, ...] (True) or [B, T, ...] (False) where a batch of as many samples as tokens leaves the
    # shape ambiguous: `time_major` as an earlier batch's shape showed it, else `layout_hint` (the
    # module the site runs in says it: nn.TransformerEncoderLayer's batch_first); None: not known
    time_major: bool | None = None
    layout_hint: bool | None = None
    call_hint: bool | None = None  # this call's tensor, by descent from the forward's token ids
    # while not known: the ambiguous batches counted three ways (PENDING_LAYOUTS), until a batch's shape
    # tells (the matching count joins this one) or the counts are read (every position: LAYOUT_AMBIGUOUS)
    pending: dict | None = None
    pending_reason: str = LAYOUT_AMBIGUOUS  # or ROW_ORDER_AMBIGUOUS: flattened rows of either order
    _pending_now: bool = False
    # --allow-nonfinite: NaN/±Inf values counted and left out of every statistic
    # (finite_pre/finite_post, called once per batch by the registry); where this batch had them
    nonfinite: torch.Tensor | None = None
    _nonfinite_at: torch.Tensor | None = None

    def restart(self) -> None:
        """Count from zero again, in place (a new window of a training run keeps the counters' memory)."""
        if self.positive is not None:
            self.positive.zero_()
            self.max_pre.fill_(-torch.inf)
            self.sum_abs.zero_()
            if self.saturated is not None:
                self.saturated.zero_()
        if self.min_pre is not None:
            self.min_pre.fill_(torch.inf)
        self.elements_per_unit = 0
        self.extra.clear()
        self.nonfinite = self._nonfinite_at = None
        self._nan_in_batch = self.masked_now = False
        self._positive_max = None  # max_pre was reset in place
        self.pending, self._pending_now = None, False  # a new window; what was learned of the layout stays

    def known_time_major(self) -> bool | None:
        for known in (self.time_major, self.layout_hint, self.call_hint):
            if known is not None:
                return known
        return None

    def _layout_pending(self, pre: torch.Tensor, mask: PositionMask) -> bool:
        """Whether this batch goes to the `pending` counts: its shape reads as [B, T, ...] and [T, B, ...]
        and nothing says which. A batch whose shape tells settles the layout (and the pending counts)."""
        self._pending_now = False
        if not mask.ambiguous(pre, self.channel_dim):
            dim = self.channel_dim % max(pre.dim(), 1)
            layout = mask.layout(pre, self.channel_dim)
            # a square shape tells nothing (its mask is symmetric: either reading keeps the same elements)
            if layout in (TOKEN_ROWS, TOKENS_FIRST) and not layout_ambiguous(
                tuple(pre.shape), dim, mask.batch, mask.tokens
            ):
                self.learn_layout(layout == TOKENS_FIRST)
            return False
        if self.time_major is None and self.layout_hint is None and self.call_hint is not None:
            self.learn_layout(self.call_hint)  # what the model did to the token ids' axes tells
        if self.known_time_major() is not None:
            return False
        if self.pending is None:
            flat = mask.layout(pre, self.channel_dim) == TOKEN_FLAT
            self.pending_reason = ROW_ORDER_AMBIGUOUS if flat else LAYOUT_AMBIGUOUS
            self.pending = {
                key: SiteAccumulator(
                    self.name,
                    self.op,
                    self.channel_dim,
                    track_min=self.track_min,
                    time_major=time_major,
                )
                for key, time_major in PENDING_LAYOUTS.items()
            }
        self._pending_now = True
        self.masked_now = False  # a collector (fixes) gets every position, as the fallback counts them
        return True

    def learn_layout(self, time_major: bool) -> None:
        """The site's tensors are [T, B, ...] (`time_major`) or [B, T, ...], as a batch's shape showed:
        the batches counted both ways meanwhile join the counts read that way."""
        if self.time_major is None:
            self.time_major = time_major
        if self.pending is not None:
            pending, self.pending = self.pending, None
            self.absorb(pending[TOKENS_FIRST if self.time_major else TOKEN_ROWS])

    def absorb(self, other: SiteAccumulator) -> None:
        """Add another accumulator's counts of the same site (its tensors copied, never shared)."""
        if other.positive is None:
            return
        if self.positive is None:
            self.positive, self.max_pre = other.positive.clone(), other.max_pre.clone()
            self.sum_abs = other.sum_abs.clone()
            self.saturated = None if other.saturated is None else other.saturated.clone()
        else:
            self.positive += other.positive
            torch.maximum(self.max_pre, other.max_pre, out=self.max_pre)
            self.sum_abs += other.sum_abs
            if self.saturated is not None and other.saturated is not None:
                self.saturated += other.saturated
        if other.min_pre is not None:
            self.min_pre = (
                other.min_pre.clone() if self.min_pre is None else torch.minimum(self.min_pre, other.min_pre)
            )
        self.elements_per_unit += other.elements_per_unit
        if other.nonfinite is not None:
            self.nonfinite = (
                other.nonfinite.clone() if self.nonfinite is None else self.nonfinite + other.nonfinite
            )
        mark = other.extra.get("position_mask")
        if mark is not None and self.extra.get("position_mask") != "no token axis":
            self.extra["position_mask"] = mark

    def counted_elements(self) -> int:
        """Values per unit counted so far, those of batches still pending included."""
        pending = self.pending[TOKEN_ROWS].elements_per_unit if self.pending else 0
        return self.elements_per_unit + pending

    def _kept_pre(self, pre: torch.Tensor, mask: PositionMask | None) -> list[torch.Tensor] | None:
        """The kept positions of the pre-activation as parts (views of runs, or one gathered copy), or
        None to count all of it (no mask, or no token axis); `extra["position_mask"]` says which:
        "applied", or "no token axis" (counted over every element)."""
        kept = mask.parts(pre, self.channel_dim, self.known_time_major()) if mask is not None else None
        self.masked_now = kept is not None
        if mask is not None:
            self._say_mask(kept is not None, mask.not_applied(pre, self.channel_dim))
        return kept

    def _say_mask(self, kept: bool, missed: str | None = None) -> None:
        """`extra["position_mask"]` after a masked batch: "applied", or "no token axis" for good once a
        batch had none; the mask's reason it was not applied (`missed`); a batch that counted padding
        (PIXELS_MIXED, PIXELS_FLATTENED, ROWS_NOT_ATTRIBUTED) is said for good."""
        before = self.extra.get("position_mask")
        if before in (PIXELS_MIXED, PIXELS_FLATTENED, ROWS_NOT_ATTRIBUTED):
            return
        if not kept and missed is not None:
            self.extra["position_mask"] = missed
        else:
            self.extra["position_mask"] = "applied" if kept and before != "no token axis" else "no token axis"

    def _observe_parts(self, observe, parts: list[torch.Tensor], threshold: float) -> None:
        """Each part of one batch through the unmasked path; the batch's NaN flag is any part's."""
        nan = False
        for part in parts:
            observe(part, threshold)
            nan = nan or self._nan_in_batch
        self._nan_in_batch = nan
        self.masked_now = True

    def _allocate(self, units: int, device) -> None:
        def make() -> None:
            self.positive = torch.zeros(units, dtype=torch.int64, device=device)
            self.max_pre = torch.full((units,), -torch.inf, dtype=torch.float64, device=device)
            self.sum_abs = torch.zeros(units, dtype=torch.float64, device=device)
            if self.op in CAPPED_OPS:
                self.saturated = torch.zeros(units, dtype=torch.int64, device=device)

        allocated_apart(make, device)

    def _reduce_dims(self, tensor: torch.Tensor) -> list[int]:
        dim = self.channel_dim if tensor.dim() > 1 else 0
        return [d for d in range(tensor.dim()) if d != dim]

    def _as_reducible(self, tensor: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
        """Units on the last axis in memory ([B, T, F], or NCHW stored channels_last): view the tensor as
        [rows, units] and reduce dim 0, which PyTorch's CPU kernels do several times faster than a
        multi-dim reduction."""
        if tensor.dim() > 2 and self.channel_dim == tensor.dim() - 1 and tensor.is_contiguous():
            return tensor.view(-1, tensor.shape[-1]), [0]
        if self.channel_dim == 1 and not tensor.is_contiguous():
            # channels_last (NHWC in memory, --channels-last): the same [N*H*W, C] view, no copy
            for rank, layout in ((4, torch.channels_last), (5, torch.channels_last_3d)):
                if tensor.dim() == rank and tensor.is_contiguous(memory_format=layout):
                    moved = tensor.movedim(1, -1)
                    return moved.reshape(-1, moved.shape[-1]), [0]
        return tensor, self._reduce_dims(tensor)

    def _check_units(self, pre: torch.Tensor) -> int:
        """The batch's unit count; allocates the counters on the first batch, refuses a changed width."""
        dim = self.channel_dim if pre.dim() > 1 else 0
        units = pre.shape[dim] if pre.dim() else 1
        if self.positive is None:
            self._allocate(units, pre.device)
        elif self.positive.shape[0] != units:
            raise UserError(
                f"layer {self.name} produced {units} units on this batch but {self.positive.shape[0]} before; "
                "pass --channel-dim to pick a fixed unit axis"
            )
        return units

    def finite_pre(self, pre: torch.Tensor, mask: PositionMask | None = None) -> torch.Tensor:
        """--allow-nonfinite: the pre-activation with its NaN/±Inf values replaced by -inf, which fires
        nowhere, adds nothing to the max and is 0 after relu (the output's values there are zeroed by
        `finite_post`); they are counted (`nonfinite`; with MASK, those at kept positions). PRE itself
        when all are finite (one check per batch; the model's tensors are never changed)."""
        self._nonfinite_at = None
        if not pre.is_floating_point():
            return pre
        bad = ~torch.isfinite(pre.detach())
        if not bool(bad.any()):
            return pre
        kept = None if mask is None else mask.select(bad, self.channel_dim, self.known_time_major())
        self._count_nonfinite(bad if kept is None else kept)
        self._nonfinite_at = bad
        return pre.detach().masked_fill(bad, -torch.inf)

    def finite_post(self, post: torch.Tensor, mask: PositionMask | None = None) -> torch.Tensor:
        """The output with 0 where the input was not finite, and where the output is not (counted too;
        a clamp of a finite input is finite, so relu/relu6 outputs are not checked again)."""
        bad, self._nonfinite_at = self._nonfinite_at, None
        if not post.is_floating_point():
            return post
        post = post.detach()
        if bad is not None and bad.shape == post.shape:
            post = post.masked_fill(bad, 0.0)
        if self.op in CAPPED_OPS or self.op == "relu":
            return post
        more = ~torch.isfinite(post)
        if bool(more.any()):
            kept = None if mask is None else mask.select(more, self.channel_dim, self.known_time_major())
            self._count_nonfinite(more if kept is None else kept)
            post = post.masked_fill(more, 0.0)
        return post

    def _count_nonfinite(self, bad: torch.Tensor) -> None:
        found = bad.sum(dtype=torch.int64)  # per site (the report's note), on the device
        self.nonfinite = found if self.nonfinite is None else self.nonfinite + found

    def observe_pre(
        self,
        pre: torch.Tensor,
        threshold: float,
        mask: PositionMask | None = None,
        fused_devices: tuple[str, ...] = (),
    ) -> None:
        """The part that needs the pre-activation (before an in-place op overwrites it): the max,
        and the counts when they cannot be read off the output. With `mask`, only kept positions count
        (the same mask must then be given to `observe_post`). On a device in `fused_devices`, relu and
        relu6 sites are counted here in one compiled pass (`fused_stats`), and `observe_post` skips."""
        pre = pre.detach()
        self._fused_batch = False
        if mask is not None and self._layout_pending(pre, mask):
            for key, shadow in self.pending.items():
                shadow.observe_pre(pre, threshold, None if key == EVERY_POSITION else mask, fused_devices)
            return
        if (
            mask is None
            and not self.track_min
            and pre.device.type not in fused_devices
            and self._observe_rows_pre(pre, threshold)
        ):
            return
        parts = self._kept_pre(pre, mask)
        if parts is not None:
            self._observe_parts(self.observe_pre, parts, threshold)
            return
        units = self._check_units(pre)
        if pre.numel() == 0:
            return
        if (
            pre.device.type in fused_devices
            and self.op in FUSED_OPS
            and not self.track_min
            and pre.is_floating_point()
        ):
            view, dims = self._as_reducible(pre)
            if fused_stats(view, dims, threshold, self):
                self._fused_batch = True
                self.elements_per_unit += pre.numel() // units
                return
        pre, dims = self._as_reducible(pre)
        batch_max = _channel_first_reduce(pre, dims, torch.amax) if dims else pre
        # amax propagates NaN: remember it, so that the fast count below (which would count a NaN as
        # fired) is replaced by the exact comparison for this batch
        # (only on CPU, where reading the flag costs nothing; on CUDA the exact count is used: no sync)
        self._nan_in_batch = (
            (pre.device.type != "cpu" or bool(torch.isnan(batch_max).any()))
            if pre.is_floating_point()
            else False
        )
        torch.maximum(self.max_pre, batch_max, out=self.max_pre)  # promotes to float64 in place
        if self.track_min:
            low = pre if self._nonfinite_at is None else pre.masked_fill(pre == -torch.inf, torch.inf)
            batch_min = _channel_first_reduce(low, dims, torch.amin) if dims else low
            if self.min_pre is None:
                self.min_pre = allocated_apart(
                    lambda: torch.full((units,), torch.inf, dtype=torch.float64, device=pre.device),
                    pre.device,
                )
            torch.minimum(self.min_pre, batch_min, out=self.min_pre)
        if not counts_from_output(self.op, threshold):
            self.positive += _count(pre > threshold_below(threshold, pre.dtype), dims)
        self.elements_per_unit += pre.numel() // units

    def observe_post(self, post: torch.Tensor, threshold: float, mask: PositionMask | None = None) -> None:
        """Counts and sums from the activation's output (relu/relu6: y > t exactly when x > t, t >= 0)."""
        if self._fused_batch:  # counted with the input, in one pass
            return
        if self._pending_now:
            for key, shadow in self.pending.items():
                shadow.observe_post(post, threshold, None if key == EVERY_POSITION else mask)
            return
        post = post.detach()
        if not self.masked_now and self._observe_rows_post(post, threshold):
            return
        if mask is not None and self.masked_now:
            parts = mask.parts(post, self.channel_dim, self.known_time_major())
            self._observe_parts(self.observe_post, parts, threshold)
            return
        if post.numel() == 0:
            return
        post, dims = self._as_reducible(post)
        if counts_from_output(self.op, threshold):
            if (
                threshold == 0.0
                and post.is_floating_point()
                and not self._nan_in_batch
                and post.numel() // max(1, self.positive.shape[0]) < 2**31
            ):
                # for y >= 0 (and no NaN), y.bool() is y > 0; its bytes summed into int32 (exact below 2**31
                # per unit and batch), in two steps for [N, C, ...], cost about a third of (y > 0).sum()
                for part in _cache_sized_parts(post, dims):
                    # per part: the byte mask and the second read of y stay in cache (one pass from memory)
                    fired = part.bool().view(torch.uint8)
                    self.positive += (  # int32 added into int64 in place
                        _channel_first_reduce(fired, dims, lambda t, d: t.sum(d, dtype=torch.int32))
                        if dims
                        else fired
                    )
                    self.sum_abs += _channel_first_reduce(part, dims, _wide_sum)  # y >= 0: |y| = y
                total = None
            else:
                self.positive += _count(post > threshold_below(threshold, post.dtype), dims)
                total = _channel_first_reduce(post, dims, _wide_sum)  # y >= 0: |y| = y
        else:
            total = _sum(post.abs(), dims, sum_dtype(post))
        if total is not None:
            self.sum_abs += total  # float32 (or float64) per batch, accumulated in float64
        if self.saturated is not None:
            self.saturated += _count(post >= CAPPED_OPS[self.op], dims)

    def run_relu_in_parts(self, pre: torch.Tensor, in_place: bool, threshold: float) -> torch.Tensor | None:
        """Run the site's relu itself (a relu6 too, with the compiled kernel: `_run_relu_compiled`),
        slice by cache-sized slice along the batch, counting each slice
        while it is in cache: the max of the input slice, then relu on it (`clamp_min(x, 0)`, which is
        what ATen's relu and relu_ compute, so the output is bit for bit the op's), then the byte-mask
        count and the sum of the output slice. The activation is read from memory once — by the relu
        the model runs anyway — instead of three times (the max, the relu, the counting).

        Returns the output (`pre` itself when in place), or None where this does not apply (not a
        large CPU float tensor laid out along the batch, a threshold other than 0, autograd (forward-mode
        too), an in-place write ATen refuses, --explain's minimum): the caller then runs the op and
        `observe_pre`/`observe_post` as usual."""
        if not self._runs_its_relu(pre, threshold, in_place):
            return None
        view, dims = self._as_reducible(pre)
        if view.data_ptr() != pre.data_ptr() or not view.is_contiguous():
            return None
        if dims != [0] and dims != [0, *range(2, view.dim())]:  # units neither last nor at dim 1
            return None
        kernel = self._kernel(pre)
        if kernel is not None:
            return self._run_relu_compiled(kernel, pre, view, dims, in_place)
        if self.op != "relu":  # ATen's slices below run a relu only
            return None
        short = len(dims) > 1 and view[0, 0].numel() < SHORT_ROW
        if short:  # reduced over the samples first, in slices of at most LANE_LIMIT samples
            row_bytes = view[0].numel() * view.element_size()
            parts = list(view.split(max(1, min(LANE_LIMIT, CACHE_PART_BYTES // row_bytes))))
        else:
            parts = _cache_sized_parts(view, dims)
            if len(parts) < 2:
                return None
        units = self._check_units(pre)
        if units == 0 or view.numel() // units >= 2**31:
            return None
        out = pre if in_place else torch.empty_like(pre)
        if not in_place:
            if out.stride() != pre.stride():
                return None
            out_parts = list(self._as_reducible(out)[0].split([x.shape[0] for x in parts]))
        else:
            out_parts = parts
        positive_max = self._positive_max is self.max_pre
        count = _count_relu_columns if short else _count_relu_parts
        batch_max, counts, sums = count(parts, out_parts, dims, in_place, positive_max)
        self.positive += counts
        self.sum_abs += sums
        nan_units = torch.isnan(sums)  # relu keeps a NaN: its unit's sum is NaN
        if bool(nan_units.any()):  # y.bool() counted each NaN as fired
            self.positive -= _count(torch.isnan(self._as_reducible(out)[0]), dims)
            batch_max = batch_max.masked_fill(nan_units, torch.nan)  # as a float max would have it
        torch.maximum(self.max_pre, batch_max, out=self.max_pre)  # maximum propagates NaN
        if not positive_max and bool((self.max_pre > 0).all()):
            self._positive_max = self.max_pre  # from now on, while these counters live
        self.elements_per_unit += pre.numel() // units
        self._fused_batch = False
        self.masked_now = False
        return out

    def run_relu_masked(
        self, pre: torch.Tensor, in_place: bool, threshold: float, mask: PositionMask
    ) -> torch.Tensor | None:
        """run_relu_in_parts for a site under a token mask, units last ([B, T, F], or OPT's [B*T, F]):
        the compiled kernel counts each run of kept rows — the rows observe_pre/observe_post count, as
        views — and the relu alone (no counting) runs on the padding rows between them, so the output is
        the op's bit for bit. None where this does not apply (no kernel, another layout, a shape that
        reads both ways while nothing has told which): the caller then runs the op and
        observe_pre/observe_post."""
        if type(mask) is not PositionMask or not self._runs_its_relu(pre, threshold, in_place):
            return None
        kernel = self._kernel(pre)
        # padding leaves at most a run per sequence; a scattered --mask goes the general way (one gather)
        if kernel is None or not pre.is_contiguous() or len(mask.runs()) > mask.batch:
            return None
        if self._layout_pending(pre, mask):
            return None
        rank = pre.dim()
        layout = mask.layout(pre, self.channel_dim, self.known_time_major())
        if self.channel_dim % rank != rank - 1 or (layout, rank) not in ((TOKEN_ROWS, 3), (TOKEN_FLAT, 2)):
            return None
        units = self._check_units(pre)
        if units == 0 or pre.numel() // units >= 2**31 or not self._counters_ready():
            return None
        out = pre if in_place else torch.empty_like(pre)
        if out.stride() != pre.stride():
            return None
        rows, out_rows = pre.view(-1, units), out.view(-1, units)
        done = 0
        for start, stop in [*mask.runs(), (rows.shape[0], rows.shape[0])]:
            if start > done:  # padding rows: the op, uncounted
                self._apply(rows[done:start], out_rows[done:start], in_place)
            if stop > start:
                self._count_compiled(
                    kernel, rows[start:stop], out_rows[start:stop], stop - start, units, 1, True
                )
            done = stop
        if in_place:  # written through its address: say so, as relu_ would (eager reads version counters)
            increment_version(pre)
        self._say_mask(kept=True)
        self.elements_per_unit += mask.kept
        self._fused_batch = False
        self.masked_now = True
        return out

    def _runs_its_relu(self, pre: torch.Tensor, threshold: float, in_place: bool) -> bool:
        """Whether the probe may run this site's op itself: a relu/relu6 at threshold 0 on a plain CPU
        float tensor of rank 2 or more, no autograd (forward-mode either), no --explain minimum, and not
        an in-place write ATen would refuse."""
        return not (
            self.op not in ("relu", "relu6")
            or threshold != 0.0
            or self.track_min
            or type(pre) is not torch.Tensor
            or pre.device.type != "cpu"
            or pre.dtype not in (torch.float32, torch.float64, torch.bfloat16, torch.float16)
            or pre.layout is not torch.strided
            or (pre.requires_grad and torch.is_grad_enabled())
            # ATen refuses to write an inference tensor outside inference mode: the op raises as it would
            or (in_place and pre.is_inference() and not torch.is_inference_mode_enabled())
            or pre.dim() < 2
            # forward-mode AD: the op carries the tangent (the kernel's output had none, ATen's out=
            # kernels refuse a dual tensor)
            or unpack_dual(pre).tangent is not None
        )

    def _kernel(self, pre: torch.Tensor) -> ReluStats | None:
        """The compiled kernel for this batch, or None (not float32, none built, or a one-thread build
        of the kernel for a relu that ATen's slices run on several threads)."""
        kernel = relu_stats() if pre.dtype == torch.float32 else None
        if kernel is not None and not kernel.parallel and self.op == "relu" and torch.get_num_threads() > 1:
            return None  # (relu6's ATen path is the general one, far slower than one thread of the kernel)
        return kernel

    def _counters_ready(self) -> bool:
        """Whether the counters are what the kernel writes in place: contiguous CPU float64 max and sum,
        int64 counts (and relu6's int64 count at the cap)."""
        counters = [self.max_pre, self.positive, self.sum_abs]
        if self.op in CAPPED_OPS:
            counters.append(self.saturated)
        return (
            not any(t is None or t.device.type != "cpu" or not t.is_contiguous() for t in counters)
            and [t.dtype for t in counters]
            == [torch.float64, torch.int64, torch.float64, torch.int64][: len(counters)]
        )

    def _count_compiled(
        self,
        kernel: ReluStats,
        x: torch.Tensor,
        y: torch.Tensor,
        outer: int,
        units: int,
        length: int,
        columns: bool,
    ) -> None:
        cap = CAPPED_OPS.get(self.op)
        kernel.run(
            x.data_ptr(),
            y.data_ptr(),
            outer,
            units,
            length,
            columns,
            torch.get_num_threads() if kernel.parallel else 1,
            self.max_pre.data_ptr(),
            self.positive.data_ptr(),
            self.sum_abs.data_ptr(),
            cap,
            None if cap is None else self.saturated.data_ptr(),
        )

    def _apply(self, x: torch.Tensor, y: torch.Tensor, in_place: bool) -> None:
        """The site's op alone (bit for bit ATen's relu / hardtanh(0, 6), as the kernel's)."""
        cap = CAPPED_OPS.get(self.op)
        if in_place and cap is not None:
            x.clamp_(0, cap)
        elif in_place:
            x.clamp_min_(0)
        elif cap is not None:
            torch.clamp(x, 0, cap, out=y)
        else:
            torch.clamp_min(x, 0, out=y)

    def _run_relu_compiled(
        self, kernel: ReluStats, pre: torch.Tensor, view: torch.Tensor, dims: list[int], in_place: bool
    ) -> torch.Tensor | None:
        """run_relu_in_parts with the compiled kernel (native.relu_stats): the relu and all three
        statistics in one pass, at any size; the batch's max, count and sum go straight into the
        counters (float64 / int64, which the kernel writes in place)."""
        units = self._check_units(pre)
        if units == 0 or view.numel() == 0 or view.numel() // units >= 2**31 or not self._counters_ready():
            return None
        out = pre if in_place else torch.empty_like(pre)
        if out.stride() != pre.stride():
            return None
        if dims == [0]:  # [rows, units]
            outer, length, columns = view.shape[0], 1, True
        else:  # [N, C, L]: short rows are read down their columns too, unless a sample has so many
            # columns that the kernel's per-column results (28 bytes each, per thread) would be large
            outer, length = view.shape[0], view[0, 0].numel()
            columns = length < SHORT_ROW and units * length <= COLUMN_LIMIT
        self._count_compiled(kernel, pre, out, outer, units, length, columns)
        if in_place:  # written through its address: say so, as relu_ would (eager reads version counters)
            increment_version(pre)
        self.elements_per_unit += pre.numel() // units
        self._fused_batch = False
        self.masked_now = False
        return out

    def _rows(self, tensor: torch.Tensor) -> torch.Tensor | None:
        """The batch as a [rows, units] view when its units are the last axis of a contiguous tensor
        (MLP and token activations, the common case), else None (the general path below)."""
        rank = tensor.dim()
        if rank < 2 or self.channel_dim != rank - 1 or not tensor.is_contiguous() or not tensor.numel():
            return None
        return tensor.view(-1, tensor.shape[-1])

    def _observe_rows_pre(self, pre: torch.Tensor, threshold: float) -> bool:
        """observe_pre for a [rows, units] batch with no position mask, in a few tensor ops and little Python
        (a training loop's sampled step pays this per call site); False when it does not apply."""
        rows = self._rows(pre)
        if rows is None:
            return False
        units = rows.shape[1]
        if self.positive is None:
            self._allocate(units, rows.device)
        elif self.positive.shape[0] != units:
            return False  # the general path says what is wrong
        self.masked_now = False
        batch_max = rows.amax(0)
        # NaN: see observe_pre; one reduction and one read of a scalar instead of isnan + any
        self._nan_in_batch = rows.is_floating_point() and (
            rows.device.type != "cpu" or math.isnan(float(batch_max.sum()))
        )
        torch.maximum(self.max_pre, batch_max, out=self.max_pre)
        if not counts_from_output(self.op, threshold):
            self.positive += (rows > threshold_below(threshold, rows.dtype)).sum(0)
        self.elements_per_unit += rows.shape[0]
        return True

    def _observe_rows_post(self, post: torch.Tensor, threshold: float) -> bool:
        """observe_post for what `_observe_rows_pre` took, while it is small (one cache-sized part)."""
        rows = self._rows(post)
        if (
            rows is None
            or self.positive is None
            or rows.shape[1] != self.positive.shape[0]
            or rows.numel() * rows.element_size() > 2 * CACHE_PART_BYTES
            or rows.shape[0] >= 2**31
        ):
            return False
        if counts_from_output(self.op, threshold):
            if threshold == 0.0 and rows.is_floating_point() and not self._nan_in_batch:
                self.positive += rows.bool().sum(0, dtype=torch.int32)  # y >= 0: y.bool() is y > 0
            else:
                self.positive += (rows > threshold_below(threshold, rows.dtype)).sum(0)
            self.sum_abs += rows.sum(0, dtype=sum_dtype(rows))  # y >= 0: |y| = y
        else:
            self.sum_abs += rows.abs().sum(0, dtype=sum_dtype(rows))
        if self.saturated is not None:
            self.saturated += (rows >= CAPPED_OPS[self.op]).sum(0)
        return True

    def add_reduced(
        self,
        maximum: torch.Tensor,
        count: torch.Tensor,
        total: torch.Tensor,
        numel: int,
        saturated: torch.Tensor | None,
    ) -> None:
        units = count.shape[0]
        if self.positive is None:
            self._allocate(units, count.device)
        self.max_pre = torch.maximum(self.max_pre, maximum.to(torch.float64))
        self.positive += count
        self.sum_abs += total.to(torch.float64)
        if self.saturated is not None and saturated is not None:
            self.saturated += saturated
        self.elements_per_unit += numel // units if units else 0

    def update(
        self,
        pre: torch.Tensor,
        post: torch.Tensor | None,
        threshold: float,
        mask: PositionMask | None = None,
    ) -> None:
        """Count one batch. `pre` is the pre-activation; `post` the output, or None to derive it from `pre`."""
        self.observe_pre(pre, threshold, mask)
        self.observe_post(apply_op(self.op, pre) if post is None else post, threshold, mask)

    def to_layer_stats(self) -> LayerStats:
        if self.pending:  # never told: those batches count every position (and say so)
            settled = SiteAccumulator(self.name, self.op, self.channel_dim, self.module_type, self.producer)
            settled.extra = dict(self.extra)
            settled.absorb(self)
            settled.absorb(self.pending[EVERY_POSITION])
            settled.extra["position_mask"] = self.pending_reason
            return settled._layer_stats()
        return self._layer_stats()

    def _layer_stats(self) -> LayerStats:
        def host(t: torch.Tensor | None, dtype) -> np.ndarray | None:
            return None if t is None else t.detach().cpu().numpy().astype(dtype)

        return LayerStats(
            name=self.name,
            op=self.op,
            channel_dim=self.channel_dim,
            positive_counts=host(self.positive, np.int64),
            elements_per_unit=self.elements_per_unit,
            max_preactivation=host(self.max_pre, np.float64),
            sum_abs=host(self.sum_abs, np.float64),
            saturated_counts=host(self.saturated, np.int64),
            module_type=self.module_type,
            producer=self.producer,
            extra=dict(self.extra),
            min_preactivation=host(self.min_pre, np.float64),
            nonfinite=0 if self.nonfinite is None else int(self.nonfinite),
        )


EVERY_POSITION = "every position"
# how a pending batch is counted: as [B, T, ...], as [T, B, ...] (flattened rows: sample-major, time-major),
# and over every element
PENDING_LAYOUTS = {TOKEN_ROWS: False, TOKENS_FIRST: True, EVERY_POSITION: None}


def allocated_apart(make: Callable, device):
    """MAKE() (which allocates a site's counters) run on another thread when DEVICE is the CPU.

    A site's counters are made during the first forward pass, right after that site's activations. With
    glibc's malloc a small block that stays (the counters) above a large one that is freed (an activation
    below the mmap threshold) keeps that memory from being reused or returned, so the first pass grew by
    about one activation per site (+8 MiB per layer on an OPT folder, peak RSS +~60 MiB over plain
    inference). Another thread allocates from its own arena, away from the activations. (CUDA memory has
    its own allocator, and streams are per thread: made in place.)"""
    if torch.device(device).type != "cpu":
        return make()
    return _counter_thread().submit(make).result()  # its exception, if any, is raised here


_counter_worker: tuple[int, ThreadPoolExecutor] | None = None


def _counter_thread() -> ThreadPoolExecutor:
    """One thread for every site's counters, kept for the process (starting a thread per site cost ~0.1 ms
    each, paid on a training loop's first sampled step); made again in a forked child, which has none."""
    global _counter_worker
    if _counter_worker is None or _counter_worker[0] != os.getpid():
        _counter_worker = (os.getpid(), ThreadPoolExecutor(1, thread_name_prefix="deadrelu-counters"))
    return _counter_worker[1]


CACHE_PART_BYTES = 2 << 20  # what the count's two passes over one part can share in cache
SMALL_PART_BYTES = 256 << 10  # a smaller activation is counted the general way: a few kernels either way


def counted_while_running(pre: torch.Tensor) -> bool:
    """Whether a relu's input is worth SiteAccumulator.run_relu_in_parts: a CPU tensor, of any size where
    the compiled kernel counts it (one call), else of SMALL_PART_BYTES or more (several ATen kernels a
    slice pay off only on large activations)."""
    if pre.device.type != "cpu":
        return False
    if pre.numel() * pre.element_size() >= SMALL_PART_BYTES:
        return True
    return pre.dtype == torch.float32 and relu_stats() is not None


def _cache_sized_parts(tensor: torch.Tensor, dims: list[int]) -> list[torch.Tensor]:
    """Slices along dim 0 of about CACHE_PART_BYTES each, when dim 0 is reduced, the tensor is large and
    on the CPU: the passes of the count then read each activation once from memory, not twice."""
    if (
        tensor.device.type != "cpu"
        or not dims
        or dims[0] != 0
        or tensor.dim() < 2
        or tensor.shape[0] < 2
        or tensor.numel() * tensor.element_size() <= 2 * CACHE_PART_BYTES
    ):
        return [tensor]
    row_bytes = max(1, tensor[0].numel() * tensor.element_size())
    return list(tensor.split(max(1, CACHE_PART_BYTES // row_bytes)))


def _count_relu_parts(
    parts: list[torch.Tensor],
    out_parts: list[torch.Tensor],
    dims: list[int],
    in_place: bool,
    positive_max: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """relu run slice by slice (`clamp_min(x, 0)`, bit for bit ATen's relu) and one batch's statistics:
    the max of x, the count of y > 0 (y.bool(): exact for y >= 0; a NaN counts, which the caller takes
    back) and the sum of y, per unit. Each slice's partial results go into a row of small per-batch
    buffers, reduced once at the end: per slice 5 short kernels instead of ~12 (the second-stage reductions,
    the in-place adds and their dtype conversions), which is what a slice costs on 2+ threads, where
    every kernel is a parallel region.

    The count sums the byte mask without widening it (`byte_lanes`): a dtype argument to a CPU sum
    first copies the whole slice into that dtype. `positive_max`: every unit's maximum so far is
    positive, so only a positive x can raise it, and the max is taken on the integer view of x (for
    non-negative floats the bits' order is the values' order; about twice as fast as a float max,
    which checks every element for NaN). A negative x then reads as some negative value the running
    maximum ignores, and a NaN is not seen by that max: the caller finds NaNs by the sums instead."""
    first = parts[0]
    tail = len(dims) > 1  # [N, C, ...] reduced as [N, C, L] over L per slice; else [rows, units] over rows
    if tail:
        views = [x.view(x.shape[0], x.shape[1], -1) for x in parts]
        out_views = views if in_place else [y.view(y.shape[0], y.shape[1], -1) for y in out_parts]
        rows, per_row = sum(x.shape[0] for x in parts), views[0].shape[2]
    else:
        views, out_views = parts, out_parts
        rows, per_row = len(parts), max(x.shape[0] for x in parts)
    units = views[0].shape[1]
    wide = sum_dtype(first) or first.dtype
    lanes = byte_lanes(per_row) if tail else None
    # [rows, units]: the mask's words added down each slice's rows in groups of LANE_LIMIT rows
    row_words = None if tail else word_dtype(units)
    if lanes is not None:
        lane_dtype, groups = lanes
        part_count = torch.empty((rows, units, groups), dtype=lane_dtype)
    elif row_words is not None:
        part_count = torch.empty(
            (sum(-(-x.shape[0] // LANE_LIMIT) for x in views), units // row_words.itemsize), dtype=row_words
        )
    else:
        count_dtype = torch.int16 if per_row < 2**15 else torch.int32
        part_count = torch.empty((rows, units), dtype=count_dtype)
    max_dtype = _SAME_WIDTH_INT[first.dtype] if positive_max else first.dtype
    part_max = torch.empty((rows, units), dtype=max_dtype)
    part_sum = torch.empty((rows, units), dtype=wide)
    reduce_dim = -1 if tail else 0
    row = group = 0
    for x, y in zip(views, out_views, strict=True):
        end = row + x.shape[0] if tail else row + 1
        at = slice(row, end) if tail else row
        torch.amax(x.view(max_dtype), reduce_dim, out=part_max[at])
        if in_place:
            x.clamp_min_(0)
        else:
            torch.clamp_min(x, 0, out=y)
        fired = y.bool().view(torch.uint8)
        if lanes is not None:
            words = fired.view(lane_dtype)
            words = words.view(words.shape[0], units, groups, -1)
            torch.sum(words, -1, dtype=lane_dtype, out=part_count[at])
        elif row_words is not None:
            words = fired.view(row_words)
            whole = words.shape[0] // LANE_LIMIT
            if whole:
                grouped = words[: whole * LANE_LIMIT].view(whole, LANE_LIMIT, -1)
                torch.sum(grouped, 1, dtype=row_words, out=part_count[group : group + whole])
            if words.shape[0] > whole * LANE_LIMIT:
                rest = words[whole * LANE_LIMIT :]
                torch.sum(
                    rest, 0, keepdim=True, dtype=row_words, out=part_count[group + whole : group + whole + 1]
                )
                whole += 1
            group += whole
        else:
            torch.sum(fired, reduce_dim, dtype=count_dtype, out=part_count[at])
        torch.sum(y, reduce_dim, dtype=wide, out=part_sum[at])
        row = end
    if lanes is not None:  # each byte of a word holds the count of its lane: add the bytes up
        part_count = part_count.view(torch.uint8).sum(-1, dtype=torch.int64)
    elif row_words is not None:  # [groups, units] bytes, each a group's count of its unit
        part_count = part_count.view(torch.uint8)
    return _batch_totals(part_max, part_count, part_sum, first.dtype)


def word_dtype(length: int) -> torch.dtype | None:
    """The widest integer dtype whose words tile a row of `length` bytes (None for an odd length)."""
    return next((t for t in (torch.int64, torch.int32, torch.int16) if length % t.itemsize == 0), None)


SHORT_ROW = 128  # [N, C, L] with fewer than this many elements per row: _count_relu_columns
COLUMN_LIMIT = 1 << 17  # the compiled kernel reads short rows down at most this many columns


def _count_relu_columns(
    parts: list[torch.Tensor],
    out_parts: list[torch.Tensor],
    dims: list[int],
    in_place: bool,
    positive_max: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """_count_relu_parts for [N, C, ...] slices of short rows (fewer than SHORT_ROW elements per sample
    and unit, a late conv stage's 7x7 maps) and at most LANE_LIMIT samples each. Each statistic is reduced
    over the slice's samples first, as [n, C*L] down its columns (which the CPU kernels vectorise across
    the columns), then over L on the small [C, L] result: reducing the short rows first costs 2-3 times
    as much, the kernels' per-row overhead over so few elements. The count adds the byte mask down the
    columns as words, lane by lane: a slice of at most LANE_LIMIT samples cannot carry."""
    first = parts[0]
    units, columns = first.shape[1], first[0].numel()
    wide = sum_dtype(first) or first.dtype
    max_dtype = _SAME_WIDTH_INT[first.dtype] if positive_max else first.dtype
    lane_dtype = word_dtype(columns)
    part_max = torch.empty((len(parts), units), dtype=max_dtype)
    part_count = torch.empty((len(parts), units), dtype=torch.int16)  # < LANE_LIMIT * SHORT_ROW each
    part_sum = torch.empty((len(parts), units), dtype=wide)
    for k, (x, y) in enumerate(zip(parts, out_parts, strict=True)):
        n = x.shape[0]
        torch.amax(torch.amax(x.view(max_dtype).view(n, columns), 0).view(units, -1), -1, out=part_max[k])
        if in_place:
            x.clamp_min_(0)
        else:
            torch.clamp_min(x, 0, out=y)
        fired = y.view(n, columns).bool().view(torch.uint8)
        if lane_dtype is not None:
            per_column = fired.view(lane_dtype).sum(0, dtype=lane_dtype).view(torch.uint8)
        else:
            per_column = fired.sum(0, dtype=torch.int16)
        torch.sum(per_column.view(units, -1), -1, dtype=torch.int16, out=part_count[k])
        torch.sum(torch.sum(y.view(n, columns), 0, dtype=wide).view(units, -1), -1, out=part_sum[k])
    return _batch_totals(part_max, part_count, part_sum, first.dtype)


def _batch_totals(
    part_max: torch.Tensor, part_count: torch.Tensor, part_sum: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One batch's max, count and sum per unit from the per-slice rows (a max taken on the integer view
    is viewed back as `dtype`)."""
    batch_max = part_max.amax(0)
    if not batch_max.is_floating_point():
        batch_max = batch_max.view(dtype)
    return batch_max, part_count.sum(0, dtype=torch.int64), part_sum.sum(0, dtype=torch.float64)


_SAME_WIDTH_INT = {
    torch.float64: torch.int64,
    torch.float32: torch.int32,
    torch.float16: torch.int16,
    torch.bfloat16: torch.int16,
}
LANE_LIMIT = 127  # bytes added into one lane: below 2**7, so no lane carries into the next or the sign


def byte_lanes(length: int) -> tuple[torch.dtype, int] | None:
    """How to count a 0/1 byte mask's rows of `length` bytes without widening it: viewed as `dtype`
    words of several bytes each, in `groups` groups of 8 to LANE_LIMIT words per row, the words of a
    group sum lane by lane (each byte of the sum counts its lane); None when the length does not split
    so (odd, or too few words per group to be worth it)."""
    for dtype in (torch.int64, torch.int32, torch.int16):
        width = dtype.itemsize
        if length % width:
            continue
        words = length // width
        for groups in range(-(-words // LANE_LIMIT), words // 8 + 1):
            if words % groups == 0:
                return dtype, groups
    return None


FUSED_OPS = ("relu", "relu6")
_FUSED: dict = {}  # dims -> the compiled update, made on first use


def _fused_update(x, max_acc, pos_acc, sum_acc, sat_acc, dims: tuple[int, ...], threshold: float, cap):
    """One batch of a relu/relu6 site from its input alone, into the accumulators in place: max of x,
    count of x > t (what y > t is for these ops), Σ op(x) (= Σ|y|), and for relu6 the count of x >= 6
    (= y >= 6). A NaN fires nowhere (x > t is false) and makes the max and the sum NaN, as in eager."""
    max_acc.copy_(torch.maximum(max_acc, x.amax(dims).to(max_acc.dtype)))
    pos_acc.add_((x > threshold).sum(dims, dtype=torch.int64))
    y = x.clamp_min(0) if cap is None else x.clamp(0, cap)
    sum_acc.add_(y.sum(dims, dtype=torch.float32).to(sum_acc.dtype))
    if sat_acc is not None:
        sat_acc.add_((x >= cap).sum(dims, dtype=torch.int64))


def fused_stats(tensor: torch.Tensor, dims: list[int], threshold: float, site: SiteAccumulator) -> bool:
    """Count a batch of a relu/relu6 site with one `torch.compile`d function (dynamic shapes, so a few
    compiles serve every site): the reductions read the activation's input once, in one kernel where
    the compiler fuses them, instead of ~8 separate kernels and their Python calls. False when it cannot
    be used here (then the caller counts in eager)."""
    if tensor.dim() >= 3 and dims == [0, *range(2, tensor.dim())]:  # [N, C, ...] as [N, C, L]
        if not tensor.is_contiguous():
            return False
        x, key = tensor.view(tensor.shape[0], tensor.shape[1], -1), (0, 2)
    elif tensor.dim() == 2 and dims == [0]:
        x, key = tensor, (0,)
    else:
        return False
    update = _FUSED.get(key)
    if update is None:
        update = _FUSED[key] = torch.compile(_fused_update, dynamic=True, fullgraph=True)
    cap = CAPPED_OPS.get(site.op)
    threshold = threshold_below(threshold, x.dtype)
    update(x, site.max_pre, site.positive, site.sum_abs, site.saturated, key, threshold, cap)
    return True


def _channel_first_reduce(tensor: torch.Tensor, dims: list[int], reduce) -> torch.Tensor:
    """Reduce all but dim 1 of a contiguous [N, C, ...] tensor in two steps (the contiguous tail first,
    then N): about twice as fast on CPU as one reduction over dims (0, 2, 3, …)."""
    if (
        dims
        and dims[0] == 0
        and dims[1:] == list(range(2, tensor.dim()))
        and tensor.dim() >= 3
        and tensor.is_contiguous()
    ):
        return reduce(reduce(tensor.view(tensor.shape[0], tensor.shape[1], -1), -1), 0)
    return reduce(tensor, dims)


def sum_dtype(tensor: torch.Tensor) -> torch.dtype | None:
    """The dtype a batch's per-unit sums are taken in: float32 for float16/bfloat16 activations (a half
    sum rounds to 8-11 bits and overflows float16 at 65504: a unit's sum over one batch was inf), else
    the tensor's own (float32, float64; None lets torch pick)."""
    return torch.float32 if tensor.dtype in (torch.float16, torch.bfloat16) else None


def _wide_sum(tensor: torch.Tensor, dims) -> torch.Tensor:
    return tensor.sum(dims, dtype=sum_dtype(tensor))


def _sum(tensor: torch.Tensor, dims: list[int], dtype: torch.dtype | None = None) -> torch.Tensor:
    if not dims:
        return tensor.to(dtype) if dtype is not None else tensor
    return tensor.sum(dim=dims, dtype=dtype)


def _count(mask: torch.Tensor, dims: list[int]) -> torch.Tensor:
    return mask.sum(dim=dims, dtype=torch.int64) if dims else mask.to(torch.int64)


def apply_op(op: str, pre: torch.Tensor) -> torch.Tensor:
    if op == "relu":
        return pre.clamp(min=0)
    if op == "relu6":
        return pre.clamp(0, 6)
    raise AssertionError(f"no reference activation for op {op}")
