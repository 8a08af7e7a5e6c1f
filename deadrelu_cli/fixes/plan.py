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
# (a TorchScript input patched with leaky/elu is written as TorchScript whatever OUT's extension)
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
    alive_after_resume: int | None = None  # training checkpoints: acted-on units firing after resumed steps


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
    """How many of a unit's n values a shift by `firing_thresholds` makes fire: k = max(1, round(rate * n))."""
    return min(n, max(1, int(round(target_rate * n))))


def firing_thresholds(values: np.ndarray, target_rate: float) -> np.ndarray:
    """Per column, a value that exactly k = max(1, round(target_rate * n)) values exceed (ties aside).

    Shifting a unit's bias by minus this makes it fire on about `target_rate` of the data it saw.
    """
    n = values.shape[0]
    k = firing_count(n, target_rate)
    if k >= n:
        return values.min(axis=0) - 1.0
    ordered = np.partition(values, [n - k - 1, n - k], axis=0)
    # midway between the largest value that must stay off and the smallest that must fire: the shifted
    # bias, rounded to the weights' dtype and summed again in another order, cannot tip either across 0
    return ordered[n - k - 1] / 2 + ordered[n - k] / 2
