"""Differences between two reports, layer by layer: matched by the producer's weight when both reports
record it (a quantized or optimized ONNX graph renames its activations but keeps the float graph's
weight names, suffixed), else by the tensor the activation writes (onnxruntime keeps it for fused
activations, also where it renames the weights), else by name."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from rich.console import Console

from deadrelu_cli.display import rich_text, terminal_text
from deadrelu_cli.report.model import COUNT_SETTINGS, Report, settings_difference
from deadrelu_cli.report.table import plain_table
from deadrelu_cli.stats import LayerStats

# what quantizers append to a weight's name (onnxruntime: c1.weight -> c1.weight_quantized, and a
# dynamically quantized Gemm's fc.weight -> fc.weight_Transposed_quantized)
QUANTIZED_NAME_SUFFIXES = ("_quantized", "_DequantizeLinear_Output", "_dequantized", "_Transposed")


def weight_key(name: str | None) -> str | None:
    """A weight name without the suffixes quantizers add, to match a deployed layer to its float one."""
    if not name:
        return None
    stripped = True
    while stripped:
        stripped = False
        for suffix in QUANTIZED_NAME_SUFFIXES:
            if name.endswith(suffix) and len(name) > len(suffix):
                name, stripped = name[: -len(suffix)], True
    return name


def _unique(report: Report, key) -> dict[str, LayerStats]:
    """The layers of a report by `key(layer)`, for the keys only one layer has."""
    keyed: dict[str, list[LayerStats]] = {}
    for layer in report.layers:
        value = key(layer)
        if value:
            keyed.setdefault(value, []).append(layer)
    return {value: layers[0] for value, layers in keyed.items() if len(layers) == 1}


def match_layers(old: Report, new: Report) -> dict[str, LayerStats]:
    """new layer name -> the old layer it is, by the first of these that pairs it (each key held by one
    layer on each side, the unit counts equal): the producer's weight (a quantized graph keeps the float
    graph's weight names, suffixed); the tensor the activation writes (onnxruntime keeps it when it fuses
    the activation, also in ORT_ENABLE_ALL graphs whose weights it renames `reorder_token_*`); the name."""
    matched: dict[str, LayerStats] = {}
    taken: set[str] = set()
    for key in (lambda layer: weight_key(layer.weight), lambda layer: layer.output_tensor):
        old_keyed = _unique(old, key)
        for value, layer in _unique(new, key).items():
            before = old_keyed.get(value)
            if (
                layer.name not in matched
                and before is not None
                and before.name not in taken
                and before.units == layer.units
            ):
                matched[layer.name] = before
                taken.add(before.name)
    old_by_name = {layer.name: layer for layer in old.layers}
    for layer in new.layers:
        before = old_by_name.get(layer.name)
        if layer.name not in matched and before is not None and before.name not in taken:
            matched[layer.name] = before
            taken.add(before.name)
    return matched


@dataclass
class LayerDiff:
    name: str
    old_dead: int | None
    new_dead: int | None
    units: int
    revived: list[int]
    newly_dead: list[int]
    old_name: str | None = None  # when matched by weight under another name
    # the old layer's width when it differs (`fix --strategy prune`): units are not paired one to one
    old_units: int | None = None

    @property
    def delta(self) -> int:
        return (self.new_dead or 0) - (self.old_dead or 0)

    @property
    def unchanged(self) -> bool:
        return (
            self.old_dead == self.new_dead
            and not self.revived
            and not self.newly_dead
            and self.old_units is None
        )

    @staticmethod
    def _text(dead: int | None, units: int) -> str:
        return "–" if dead is None else f"{dead}/{units} ({100 * dead / units:.1f}%)" if units else "0"

    @property
    def old_text(self) -> str:
        units = self.units if self.old_units is None else self.old_units
        return self._text(self.old_dead, units) if self.old_dead is not None else "(absent)"

    @property
    def new_text(self) -> str:
        return self._text(self.new_dead, self.units) if self.new_dead is not None else "(absent)"

    @property
    def change_text(self) -> str:
        if self.old_dead is None:
            return "added"
        if self.new_dead is None:
            return "removed"
        if self.old_units is not None:
            return f"{self.delta:+d}, {self.old_units}→{self.units} units"
        return f"{self.delta:+d}"


def diff_reports(old: Report, new: Report) -> tuple[list[LayerDiff], str]:
    old_layers = match_layers(old, new)
    matched_old = {layer.name for layer in old_layers.values()}
    rows = []
    for layer in new.layers:
        before = old_layers.get(layer.name)
        new_dead = set(np.flatnonzero(layer.dead_mask()).tolist())
        if before is None:
            rows.append(LayerDiff(layer.name, None, len(new_dead), layer.units, [], []))
            continue
        if before.units != layer.units:  # resized (pruned): unit i is not the old unit i
            old_dead = int(before.dead_mask().sum())
            rows.append(
                LayerDiff(layer.name, old_dead, len(new_dead), layer.units, [], [], None, before.units)
            )
            continue
        old_dead = set(np.flatnonzero(before.dead_mask()).tolist())
        rows.append(
            LayerDiff(
                layer.name,
                len(old_dead),
                len(new_dead),
                layer.units,
                sorted(old_dead - new_dead),
                sorted(new_dead - old_dead),
                before.name if before.name != layer.name else None,
            )
        )
    for layer in old.layers:
        if layer.name not in matched_old:
            rows.append(LayerDiff(layer.name, int(layer.dead_mask().sum()), None, layer.units, [], []))
    a, b = old.summary(), new.summary()
    summary = (
        f"Dead units: {a.dead}/{a.units} ({100 * a.dead_fraction:.1f}%) → {b.dead}/{b.units} "
        f"({100 * b.dead_fraction:.1f}%), {sum(1 for r in rows if not r.unchanged)} layers changed"
    )
    return rows, summary


def diff_warning(old: Report, new: Report) -> str | None:
    """Said under the diff, not refused (comparing thresholds can be the point), so that it is not missed."""
    differ = settings_difference(old, new, COUNT_SETTINGS)
    return (
        f"warning: the reports were scanned with {differ}: changes may come from that, not the model"
        if differ
        else None
    )


def print_diff(rows: list[LayerDiff], summary: str, console: Console, all_layers: bool = False) -> None:
    """What `deadrelu diff` prints: changed layers (all with ALL_LAYERS), growth red, shrinkage green."""
    table = plain_table()
    for column in ("Layer", "Old dead", "New dead", "Change", "Revived", "Newly dead"):
        table.add_column(column, justify="left" if column == "Layer" else "right", overflow="fold")
    for row in rows:
        if not all_layers and row.unchanged:
            continue
        style = "red" if row.delta > 0 else ("green" if row.delta < 0 else "")
        table.add_row(
            rich_text(row.name if row.old_name is None else f"{row.name} ← {row.old_name}"),
            row.old_text,
            row.new_text,
            row.change_text,
            str(len(row.revived)),
            str(len(row.newly_dead)),
            style=style,
        )
    console.print(table)
    console.print(terminal_text(summary), markup=False)
