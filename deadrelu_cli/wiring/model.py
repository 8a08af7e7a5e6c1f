"""The backend-neutral model of where a layer's units live.

A unit of an activation site is made by rows of one Linear/Conv/Gemm weight (and entries of its bias),
possibly shifted by a BatchNorm after it, and read by input columns of the weights that consume the
activation. Each backend has a reader that fills this model from its own graph (`wiring.torch`:
`eager_wiring`, `exported_wiring`; `wiring.onnx`: `unit_wiring`); fixes and causes read the model,
never a backend's graph.
Tensors are named, not held: each backend resolves a name in its own store (a module's parameters, an
ONNX graph's initializers).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class TensorRef:
    """A stored tensor by name, and the axis along which it holds units (or a consumer's input columns)."""

    name: str
    axis: int = 0


@dataclass(frozen=True)
class BatchNormRef:
    """A BatchNorm between the weights and the activation: its display name and its tensors' names."""

    owner: str
    weight: str | None
    bias: str | None
    running_mean: str | None
    running_var: str | None


@dataclass
class ProducerTrace:
    """What the walk back from an activation's input finds: the unit axis and the producing op.

    `channel_first` is True for conv-like [N, C, …] producers, False for [.., F] ones, None when unknown.
    `producer` is the display name of the op that makes the units (kept only when no other tensor is
    mixed in on the way: a sum of two Linears has no single producer)."""

    channel_first: bool | None = None
    producer: str | None = None
    bias: np.ndarray | None = None  # the producer's bias values, when the reader can read them
    axis: int | None = None  # the unit axis, when a transpose on the way put it elsewhere than 1 or last
    # a producer made the units, but a layout op on the way moved them where the walk cannot follow
    lost: bool = False


@dataclass
class UnitWiring:
    """The tensors behind one layer's units. `why` says what is missing (empty when nothing is)."""

    producer: str | None = None  # display name of the op closest to the activation (a Linear/Conv or a BN)
    owner: str = ""  # the Linear/Conv/Gemm whose weight rows make the units
    weight: TensorRef | None = None  # incoming weights; units along weight.axis
    bias: str | None = None  # the owner's own bias (one value per unit, after any reshape)
    bias_reshaped: bool = False  # the graph re-shapes the bias before adding it (paddle2onnx)
    batchnorm: BatchNormRef | None = None
    norm_bias: str | None = None  # a LayerNormalization right before the activation: its B (per unit)
    # ("LayerNormalization", or "Add": a per-unit B added after no weight, a LayerNorm written out)
    norm_op: str = ""
    # the shift tensor of a producer reached through elementwise ops with a constant operand (a scale:
    # `Gemm -> Mul(4) -> Relu`); bias-shift measures how much it moves the pre-activation
    scaled_shift: str | None = None
    consumer: str = ""  # the one Linear/Conv/Gemm reading the activation
    consumer_weight: TensorRef | None = None  # its weight; the units' input columns along .axis
    readers: tuple[str, ...] = field(default_factory=tuple)  # everything that reads the activation
    # a Concat (along the unit axis) between the activation and the consumer: the consumer reads
    # `column_units` units, this layer's from `column_offset` on (None: only this layer's)
    column_offset: int = 0
    column_units: int | None = None
    # further layers reading the activation directly, each by its own weight's columns (a SqueezeNet
    # squeeze Relu read by both expand Convs): (display name, weight); every fix acts on all of them
    also_read_by: tuple[tuple[str, TensorRef], ...] = ()
    # per consumer weight (by name), where the units sit in what it reads: (offset, units in all; None:
    # only this layer's), once per place (nested concatenations give each reader its own offset; a
    # concatenation holding the units twice, two); a weight not listed reads at `column_offset`
    column_at: dict[str, list[tuple[int, int | None]]] = field(default_factory=dict)
    why: str = ""

    @property
    def shift(self) -> str | None:
        """The tensor whose entries shift each unit's pre-activation: a BatchNorm's or LayerNorm's beta,
        else the bias."""
        if self.batchnorm is not None:
            return self.batchnorm.bias
        return self.norm_bias or self.bias or self.scaled_shift

    def per_unit(self, units: int, fan_in: int) -> int:
        """How many input columns of the consumer each unit feeds (1, or H*W after a flatten)."""
        if fan_in % units:
            raise ValueError(f"consumer fan-in {fan_in} is not a multiple of {units} units")
        return fan_in // units

    def consumers(self) -> list[tuple[str, TensorRef]]:
        """Every (display name, weight) reading the units: the consumer, then `also_read_by`."""
        first = [(self.consumer, self.consumer_weight)] if self.consumer_weight is not None else []
        return first + list(self.also_read_by)

    def consumer_columns(
        self, units: list[int], all_units: int, fan_in: int, ref: TensorRef | None = None
    ) -> list[int]:
        """The input columns (of `fan_in`) of the consumer weight `ref` (default: the consumer) that
        `units` of this layer's `all_units` feed, past the other inputs of any Concat before them."""
        places = self.column_at.get(ref.name) if ref is not None else None
        columns: list[int] = []
        for offset, width in places or [(self.column_offset, self.column_units)]:
            per_unit = self.per_unit(width or all_units, fan_in)
            columns += [c for c in input_columns([offset + u for u in units], per_unit) if c not in columns]
        return columns


def unit_vector_axis(shape: tuple[int, ...]) -> int | None:
    """The axis along which a stored bias holds one value per unit, when it broadcasts onto the unit
    axis with 1s elsewhere ([N], [1, N], [1, C, 1, 1]); None for a scalar or a 2-D table."""
    axes = [i for i, size in enumerate(shape) if size != 1]
    if len(axes) > 1 or not shape:
        return None
    return axes[0] if axes else len(shape) - 1


def is_last_axis_vector(shape: tuple[int, ...]) -> bool:
    """A bias for units on the last axis: [N], [1, N], [1, 1, N] (leading 1s; exporters write either)."""
    return len(shape) >= 1 and all(size == 1 for size in shape[:-1])


def input_columns(units: list[int], per_unit: int) -> list[int]:
    """The consumer's input columns fed by `units` when each unit feeds `per_unit` consecutive columns."""
    return [u * per_unit + j for u in units for j in range(per_unit)]


@dataclass
class ProducerTensors:
    """What the cause rules read about the op that makes a layer's units, as arrays from any backend."""

    batchnorm: bool  # True: weight is gamma, bias beta; False: weight rows [units, fan_in or in, *kernel]
    weight: np.ndarray | None
    bias: np.ndarray | None


def producer_tensors(
    wiring: UnitWiring | None, read: Callable[[str], np.ndarray | None]
) -> ProducerTensors | None:
    """The arrays of a wiring's producer: a BatchNorm's gamma and beta when one sits before the
    activation, else the weight rows (units first) and the bias. `read` resolves a tensor name."""
    if wiring is None:
        return None
    if wiring.batchnorm is not None:
        bn = wiring.batchnorm
        gamma = read(bn.weight) if bn.weight else None
        beta = read(bn.bias) if bn.bias else None
        return ProducerTensors(True, gamma, None if beta is None else beta.reshape(-1))
    if wiring.weight is None and wiring.bias is None:
        return None
    weight = read(wiring.weight.name) if wiring.weight is not None else None
    if weight is not None:
        weight = np.moveaxis(weight, wiring.weight.axis, 0).astype(np.float64)
    bias = read(wiring.bias) if wiring.bias else None
    return ProducerTensors(False, weight, None if bias is None else bias.reshape(-1).astype(np.float64))


def upstream_sites(wirings: dict[str, UnitWiring]) -> dict[str, str | None]:
    """Per site, the site whose activation the site's producer reads (for "starved" units): the one
    whose readers include this site's weight owner."""
    out: dict[str, str | None] = {}
    for name, wiring in wirings.items():
        out[name] = None
        if not wiring.owner:
            continue
        for other, candidate in wirings.items():
            if other != name and wiring.owner in candidate.readers:
                out[name] = other
                break
    return out
