"""Per-unit statistics of one activation site, as raw counts, and what derives from them.

Backend-free (numpy only): the torch and ONNX probes fill these, the report, gate, merge and
renderers read them. Everything derived (dead, dying, dormant, rates) is computed from the raw
counts, so two reports of disjoint data merge into exactly the report of their union.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from deadrelu_cli.errors import UserError

# Ops whose output is capped above: a unit pinned at the cap is "saturated" (also gradient-free).
CAPPED_OPS = {"relu6": 6.0}


# bins of per-unit firing frequency: half decades from 1e-7 to 1 (a token in ten million … every token)
FREQUENCY_EDGES = 10.0 ** np.arange(-7.0, 0.01, 0.5)


@dataclass(frozen=True)
class Thresholds:
    """What counts as firing, dying and dormant."""

    threshold: float = 0.0
    dying: float = 0.01
    tau: float = 0.1


@dataclass
class LayerStats:
    """Raw per-unit counts for one activation call site."""

    name: str
    op: str
    channel_dim: int
    positive_counts: np.ndarray  # int64[units]: elements > threshold
    elements_per_unit: int  # elements seen per unit (same for every unit of a site)
    max_preactivation: np.ndarray  # float64[units]; -inf where nothing was seen
    sum_abs: np.ndarray  # float64[units]: sum of |activation|
    saturated_counts: np.ndarray | None = None  # int64[units], capped ops only: elements >= cap
    module_type: str | None = None
    producer: str | None = None  # module whose rows (and .bias, if any) make the units (Linear/Conv/BN)
    bias: np.ndarray | None = None
    extra: dict = field(default_factory=dict)
    # data-free certification (--certify): per-unit upper bound of the pre-activation over the input box,
    # the units that can never fire, or None with the reason when the layer could not be certified
    upper_bound: np.ndarray | None = None
    certified_dead: list[int] | None = None
    certify_note: str | None = None
    # deployed ONNX graphs: "quantize" (a QuantizeLinear clamping at its zero point) or "fused" (an
    # activation inside a FusedConv/FusedGemm); the producer's stored weight name, to match layers
    # of a quantized or optimized graph to the float graph's (report.diff)
    implicit: str | None = None
    weight: str | None = None
    # ONNX: the tensor the activation writes in the graph the user exported (a fused or nchwc
    # activation: the tensor onnxruntime named the fused node for, which is the float graph's); pairs
    # layers of an optimized graph whose weights were renamed (ORT_ENABLE_ALL: reorder_token_*)
    output_tensor: str | None = None
    # per-unit minimum of the pre-activation (only with --explain: constant channels)
    min_preactivation: np.ndarray | None = None
    # samples that reached the site (None: not counted, i.e. every sample); fewer than the data's when
    # the site sits in a branch that ran on some batches only
    samples: int | None = None
    # --allow-nonfinite: NaN/±Inf values of this site's input or output, left out of its statistics
    nonfinite: int = 0

    @property
    def units(self) -> int:
        return int(self.positive_counts.shape[0])

    @property
    def ran(self) -> bool:
        """False for a site that no sample reached (an untaken branch): never reported as dead."""
        return self.elements_per_unit > 0

    def active_rate(self) -> np.ndarray:
        if not self.ran:
            return np.zeros(self.units, dtype=np.float64)
        return self.positive_counts / float(self.elements_per_unit)

    def dead_mask(self) -> np.ndarray:
        return (self.positive_counts == 0) & self.ran

    def dying_mask(self, dying: float) -> np.ndarray:
        rate = self.active_rate()
        return (self.positive_counts > 0) & (rate < dying)

    def dormant_scores(self) -> np.ndarray:
        """ReDo score s_i = mean|h_i| / mean over the layer of mean|h_j| (Sokar et al. 2023)."""
        if not self.ran:
            return np.full(self.units, np.nan)
        mean_abs = self.sum_abs / float(self.elements_per_unit)
        layer_mean = float(mean_abs.mean()) if self.units else 0.0
        if layer_mean <= 0.0:
            return np.zeros(self.units, dtype=np.float64)
        return mean_abs / layer_mean

    def dormant_mask(self, tau: float) -> np.ndarray:
        if not self.ran:
            return np.zeros(self.units, dtype=bool)
        return self.dormant_scores() <= tau

    def saturated_mask(self) -> np.ndarray:
        if self.saturated_counts is None or not self.ran:
            return np.zeros(self.units, dtype=bool)
        return self.saturated_counts == self.elements_per_unit

    def activation_sparsity(self) -> float | None:
        """Mean fraction of this layer's units that do not fire, per counted position (token, pixel):
        1 - positives / (units * positions). None for a site that never ran."""
        if not self.ran or not self.units:
            return None
        return 1.0 - float(self.positive_counts.sum()) / (self.units * float(self.elements_per_unit))

    def firing_histogram(self) -> tuple[int, np.ndarray]:
        """(dead units, units per bin of FREQUENCY_EDGES): how often each unit fires, on a log scale
        (rates below the first edge fall in the first bin)."""
        rates = self.active_rate()
        dead = self.dead_mask()
        firing = np.clip(rates[~dead & (self.positive_counts > 0)], FREQUENCY_EDGES[0], 1.0)
        counts, _ = np.histogram(firing, bins=FREQUENCY_EDGES)
        return int(dead.sum()), counts

    def constant_masks(self) -> tuple[np.ndarray, np.ndarray | None]:
        """Units whose activation was one value over all the data: (all zero, one other value). The
        second needs the minimum of the pre-activation (None when it was not recorded)."""
        none = np.zeros(self.units, dtype=bool)
        if not self.ran:
            return none, (None if self.min_preactivation is None else none)
        high, low = self.max_preactivation, self.min_preactivation
        clamps_at_zero = self.op in ("relu", "relu6", "clip")
        if clamps_at_zero:
            zero = high <= 0.0  # relu(x) is 0 for every x <= 0
        else:
            zero = none if low is None else (low == 0.0) & (high == 0.0)
        if low is None:
            return zero, None
        single = (low == high) & ~zero
        if self.op == "relu6":
            single |= low >= 6.0  # pinned at the cap
        return zero, single

    def mean_abs(self) -> np.ndarray:
        if not self.ran:
            return np.zeros(self.units, dtype=np.float64)
        return self.sum_abs / float(self.elements_per_unit)


def merge_layer(a: LayerStats, b: LayerStats) -> LayerStats:
    """Exact union of two disjoint-data statistics of the same site. A part where the site did not run
    (no sample reached it: no units known there) adds nothing but its samples (none)."""
    if a.name == b.name and a.op == b.op and not (a.ran and b.ran):
        kept, other = (b, a) if not a.ran and b.units else (a, b)
        samples = None if kept.samples is None or other.samples is None else kept.samples + other.samples
        return replace(kept, samples=samples)
    if (a.name, a.op, a.units) != (b.name, b.op, b.units):
        raise UserError(
            f"cannot merge layer {a.name!r} ({a.op}, {a.units} units) with {b.name!r} ({b.op}, {b.units} units): "
            "the reports come from different models"
        )
    saturated = None
    if a.saturated_counts is not None and b.saturated_counts is not None:
        saturated = a.saturated_counts + b.saturated_counts
    return LayerStats(
        name=a.name,
        op=a.op,
        channel_dim=a.channel_dim,
        positive_counts=a.positive_counts + b.positive_counts,
        elements_per_unit=a.elements_per_unit + b.elements_per_unit,
        max_preactivation=np.maximum(a.max_preactivation, b.max_preactivation),
        sum_abs=a.sum_abs + b.sum_abs,
        saturated_counts=saturated,
        module_type=a.module_type or b.module_type,
        producer=a.producer or b.producer,
        bias=a.bias if a.bias is not None else b.bias,
        extra={**b.extra, **a.extra},
        upper_bound=a.upper_bound if a.upper_bound is not None else b.upper_bound,
        certified_dead=a.certified_dead if a.certified_dead is not None else b.certified_dead,
        certify_note=a.certify_note or b.certify_note,
        implicit=a.implicit or b.implicit,
        weight=a.weight or b.weight,
        output_tensor=a.output_tensor or b.output_tensor,
        min_preactivation=(
            np.minimum(a.min_preactivation, b.min_preactivation)
            if a.min_preactivation is not None and b.min_preactivation is not None
            else None
        ),
        samples=None if a.samples is None or b.samples is None else a.samples + b.samples,
        nonfinite=a.nonfinite + b.nonfinite,
    )
