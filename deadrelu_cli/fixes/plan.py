"""What a fix touches and what it reports, whatever the backend."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field

import numpy as np

from deadrelu_cli.errors import UserError
from deadrelu_cli.report.model import Report

STRATEGIES = ("leaky", "elu", "reinit", "bias-shift", "prune", "kick")
EXACT_STRATEGIES = ("reinit", "prune")  # outputs on the calibration data must not change
ARTIFACT_SUFFIXES = {".pt2": "exported_program", ".onnx": "onnx", ".ts": "torchscript", ".jit": "torchscript"}
# (a TorchScript input is written as TorchScript, under a .ts/.jit/.pt/.pth name: backends/torch/fix._script_output)
STATE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors")


@dataclass
class FixOptions:
    strategy: str
    output: str
    layers: tuple[str, ...] = ()  # globs; empty = every layer with dead units
    slope: float = 0.01
    seed: int = 0
    target_rate: float = 0.01
    tolerance: float = 1e-5  # relative, for the exact strategies
    force: bool = False
    kick_scale: float = 0.1  # kick: noise std as a fraction of the layer's weight std
    certified_only: bool = False  # act only on units certified dead over the input box (--certify)
    resume_steps: int = (
        10  # training checkpoints: optimizer steps taken from the written state, then rescanned
    )
    holdout: float | None = None  # fraction of the data kept from the scan, to verify the fix on


@dataclass
class LayerPlan:
    name: str
    units: list[int]  # the units to act on (dead ones)
    all_units: int


@dataclass
class LayerOutcome:
    name: str
    units: list[int]
    action: str  # what was done, or why it was skipped
    applied: bool
    dead_before: int
    dead_after: int | None = None
    units_after: int | None = None
    rates_after: list[float] | None = (
        None  # active rate of the acted-on units after the fix (same widths only)
    )
    # reviving strategies: per acted-on unit, the fraction of its values the fix computed it to exceed
    # --threshold on afterwards (0: it could not make that unit fire); checked against the rescan
    promised: list[float] | None = None
    alive_after_resume: int | None = None  # training checkpoints: acted-on units firing after resumed steps
    # bias-shift: the stored half-precision dtype whose step was wider than the gap above a unit's cut
    # (those units fire on more values than asked; one step less would leave them dead)
    coarse_dtype: str | None = None


@dataclass
class FixResult:
    strategy: str
    output: str
    layers: list[LayerOutcome] = field(default_factory=list)
    max_abs_diff: float = 0.0
    max_rel_diff: float = 0.0
    params_before: int | None = None
    params_after: int | None = None
    flops_before: int | None = None
    flops_after: int | None = None
    verified: bool = False
    written: bool = False
    nothing_to_fix: bool = False  # no dead units: a success, nothing written
    # the evidence the verdict rests on: samples scanned, fewest values any acted-on unit was seen over
    scanned_samples: int = 0
    values_per_unit: int | None = None
    # --holdout: samples the scan did not see; acted-on units that fired there; outputs compared there
    holdout_samples: int | None = None
    holdout_fired: dict[str, list[int]] = field(default_factory=dict)
    holdout_max_abs_diff: float | None = None
    holdout_max_rel_diff: float | None = None
    notes: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)  # the notes that failed the verification
    new_widths: dict[str, int] = field(default_factory=dict)
    # files written with OUT (temp, final) and copied beside it (source, destination): a training
    # checkpoint's optimizer.pt and the rest of its folder; moved into place only when OUT is
    companions: list[tuple] = field(default_factory=list)
    copies: list[tuple] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "strategy": self.strategy,
            "output": self.output,
            "written": self.written,
            "nothing_to_fix": self.nothing_to_fix,
            "scanned_samples": self.scanned_samples,
            "values_per_unit": self.values_per_unit,
            "holdout_samples": self.holdout_samples,
            "holdout_fired": self.holdout_fired,
            "holdout_max_abs_diff": self.holdout_max_abs_diff,
            "holdout_max_rel_diff": self.holdout_max_rel_diff,
            "verified": self.verified,
            "max_abs_diff": self.max_abs_diff,
            "max_rel_diff": self.max_rel_diff,
            "params_before": self.params_before,
            "params_after": self.params_after,
            "flops_before": self.flops_before,
            "flops_after": self.flops_after,
            "new_widths": self.new_widths,
            "notes": self.notes,
            "failures": self.failures,
            "layers": [vars(layer).copy() for layer in self.layers],
        }


def plan_layers(report: Report, globs: tuple[str, ...], certified_only: bool = False) -> list[LayerPlan]:
    """Layers with dead units (optionally only those matching the globs) and their dead units; with
    `certified_only`, only the units that are dead for every input of the certified box."""
    plans = []
    matched_any = False
    for layer in report.layers:
        if globs and not any(fnmatch.fnmatchcase(layer.name, g) for g in globs):
            continue
        matched_any = True
        dead = np.flatnonzero(layer.dead_mask()).astype(int).tolist()
        if certified_only:
            dead = sorted(set(dead) & set(layer.certified_dead or []))
        if dead:
            plans.append(LayerPlan(layer.name, dead, layer.units))
    if globs and not matched_any:
        names = ", ".join(layer.name for layer in report.layers[:8])
        raise UserError(f"--layers {' '.join(globs)} matches no layer; layers are: {names}")
    return plans


def firing_count(n: int, target_rate: float) -> int:
    """How many of a unit's n values a shift by `firing_cuts` makes fire (ties aside): k = max(1, round(rate * n))."""
    return min(n, max(1, int(round(target_rate * n))))


def firing_cuts(
    values: np.ndarray, target_rate: float, rel_gap: float = float(np.finfo(np.float32).eps)
) -> tuple[np.ndarray, np.ndarray]:
    """Per column of `values` [n, units]: (cut, count), where exactly `count` values exceed `cut` and
    none lies within a rounding of it. Moving a unit's pre-activation by `threshold - cut` makes it
    exceed the threshold on exactly those `count` values.

    `count` is k = max(1, round(target_rate * n)) where the k-th and (k+1)-th largest values differ;
    where they tie (a unit whose values repeat: padding, a constant input, a saturated one), tied values
    fire together or not at all, so `count` is the nearest count at a gap (at least 1; n when the column
    is constant). Values within `rel_gap` of their size (adjacent float32 values) count as tied: the
    shifted bias, rounded to the weights' dtype, could tip either across the threshold; wider gaps keep
    the midway cut, as exact as before (the verification rescans the written file either way)."""
    n, units = values.shape
    if n == 0:
        return np.zeros(units), np.zeros(units, dtype=np.int64)
    k = firing_count(n, target_rate)
    counts = np.full(units, k, dtype=np.int64)
    if k >= n:
        return values.min(axis=0) - 1.0, np.full(units, n, dtype=np.int64)
    ordered = np.partition(values, [n - k - 1, n - k], axis=0)
    low, high = ordered[n - k - 1], ordered[n - k]
    # midway between the largest value that must stay off and the smallest that must fire
    cuts = low / 2 + high / 2
    tied = ~(high - low > rel_gap * np.maximum(np.abs(low), np.abs(high)))
    for column in np.flatnonzero(tied):
        cuts[column], counts[column] = _cut_at_a_gap(values[:, column], k, rel_gap)
    return cuts, counts


def _cut_at_a_gap(column: np.ndarray, k: int, rel_gap: float) -> tuple[float, int]:
    """The (cut, count) of one column whose k-th and (k+1)-th largest values tie: the count nearest to k
    (the smaller one of two as near) where the sorted values have a gap."""
    ordered = np.sort(column)[::-1]  # descending: the top c values fire
    upper, lower = ordered[:-1], ordered[1:]  # count c = i + 1 cuts between upper[i] and lower[i]
    gaps = np.flatnonzero(upper - lower > rel_gap * np.maximum(np.abs(upper), np.abs(lower))) + 1
    if not len(gaps):  # constant on the data: only all of its values can fire
        lowest = float(ordered[-1])  # 1 below it (more where 1 is within a float32 rounding of it)
        return lowest - max(1.0, 16 * rel_gap * abs(lowest)), len(ordered)
    count = int(gaps[np.argmin(np.abs(gaps - k))])  # argmin: the first (smaller) of two as near
    return float(ordered[count - 1] / 2 + ordered[count] / 2), count


def shift_gains(
    target: str,
    units: list[int],
    before: np.ndarray,
    after: np.ndarray | None,
    applied: np.ndarray,
    eps: float = 0.0,
) -> np.ndarray | str:
    """Per unit, how much its pre-activation moved per unit of move of its `target` entry (`before`,
    `after`: [values, every unit of the site] as float64, around moves `applied` per acted-on unit), or
    why the move is not a shift ("skipped: …"): it moved other units too, or not by one constant per unit.
    `eps`: the machine epsilon of the pre-activation's dtype; a float16/bfloat16 one rounds each value by
    up to eps/2 of its size, so a plain bias moves it by one constant only up to that."""
    if after is None or after.shape != before.shape:
        return f"skipped: moving {target} changed the site's shape"
    others = np.ones(before.shape[1], dtype=bool)
    others[units] = False
    if not np.array_equal(before[:, others], after[:, others]):
        return (
            f"skipped: moving {target} moves other units of the site too (a normalisation or mixing op "
            "between it and the activation); use leaky"
        )
    delta = np.maximum(np.abs(applied), 1e-30)
    moved = (after[:, units] - before[:, units]) / np.where(applied != 0, applied, 1.0)
    gains = np.percentile(moved, 50, axis=0, method="lower")  # (torch's median: the lower middle one)
    spread = np.abs(moved - gains).max(axis=0)
    scale = float(np.abs(before[:, units]).max()) + delta
    rel = max(1e-5, 4 * eps)  # float32: the old bound; half precision: a few roundings of its own
    constant = spread <= max(1e-4, rel) * np.abs(gains) + rel * scale / delta
    unmoved = np.abs(gains) <= 1e-6
    if constant.all() and unmoved.any():  # a zero factor between them (a mask, a scale of 0)
        shown = ", ".join(str(units[i]) for i in np.flatnonzero(unmoved)[:8])
        return (
            f"skipped: a move of {target} does not move the pre-activation of unit(s) {shown} at all (a zero "
            "factor between them: no bias makes them fire); use leaky"
        )
    if not bool((constant & ~unmoved).all()):
        return (
            f"skipped: a move of {target} does not move the pre-activation by one constant per unit "
            "(a data-dependent op between them); use leaky"
        )
    return gains
