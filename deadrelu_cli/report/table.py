"""Rich rendering of a Report: the per-layer table, the summary line, the per-unit drill-down."""

from __future__ import annotations

import numpy as np
from rich import box
from rich.console import Console
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text

from deadrelu_cli.display import rich_text, terminal_text
from deadrelu_cli.report.model import Report
from deadrelu_cli.stats import LayerStats

WARN_FRACTION = 0.20  # CS231n: "as much as 40%" dead after a bad learning rate
CRITICAL_FRACTION = 0.40
BAR_WIDTH = 8


def plain_table() -> Table:
    """The one table style of every command: bold header, a rule under it, no outer frame."""
    return Table(
        header_style="bold", box=box.SIMPLE_HEAVY, pad_edge=False, show_edge=False, padding=(0, 1, 0, 0)
    )


def severity_style(fraction: float) -> str:
    if fraction >= CRITICAL_FRACTION:
        return "bold red"
    if fraction > WARN_FRACTION:
        return "yellow"
    return ""


def _bar(fraction: float) -> Text:
    filled = min(BAR_WIDTH, int(fraction * BAR_WIDTH + 0.5))
    return Text("█" * filled + "·" * (BAR_WIDTH - filled), style=severity_style(fraction) or "green")


SPARK = "▁▂▃▄▅▆▇█"


def sparkline(rates: np.ndarray, bins: int = 8) -> str:
    """Distribution of a layer's active rates over [0, 1] in `bins` characters (dead units in the first)."""
    if rates.size == 0:
        return ""
    counts, _ = np.histogram(rates, bins=bins, range=(0.0, 1.0))
    top = counts.max()
    return "".join(
        " " if c == 0 else SPARK[min(len(SPARK) - 1, int(c * (len(SPARK) - 1) / top + 0.5))] for c in counts
    )


DEPTH_MIN_LAYERS = 4  # below this a by-depth picture says nothing the table does not


def depth_sparkline(values: list[float], width: int = 64) -> str:
    """Values in [0, 1] in execution order, one character each (averaged in groups when there are more
    than `width`), on an absolute scale: ' ' is 0, '█' is 1."""
    if not values:
        return ""
    array = np.asarray(values, dtype=np.float64)
    if array.size > width:
        array = np.array([part.mean() for part in np.array_split(array, width)])
    return "".join(" " if v <= 0 else SPARK[min(len(SPARK) - 1, int(v * len(SPARK)))] for v in array)


def depth_lines(report: Report) -> list[str]:
    """Deep models: the dead fraction by depth as a sparkline, and the activation sparsity."""
    ran = [layer for layer in report.layers if layer.ran and layer.units]
    if len(ran) < DEPTH_MIN_LAYERS:
        return []
    fractions = [float(layer.dead_mask().sum()) / layer.units for layer in ran]
    worst = int(np.argmax(fractions))
    sparsity = [layer.activation_sparsity() for layer in ran]
    overall = report.summary().activation_sparsity
    return [
        f"Dead by depth  |{depth_sparkline(fractions)}|  first → last of {len(ran)} layers; "
        f"most: {100 * fractions[worst]:.1f}% in {ran[worst].name}",
        f"Activation sparsity: {100 * overall:.1f}% of units inactive per counted position "
        f"(layers {100 * min(sparsity):.1f}–{100 * max(sparsity):.1f}%)",
    ]


def summary_line(report: Report) -> str:
    s = report.summary()
    if s.certified_dead is not None and not any(layer.ran for layer in report.layers):
        units = sum(len(layer.upper_bound) for layer in report.layers if layer.upper_bound is not None)
        share = 100 * s.certified_dead / units if units else 0.0
        certified = sum(1 for layer in report.layers if layer.certified_dead is not None)
        return (
            f"Provably dead units: {s.certified_dead}/{units} ({share:.1f}%) for every input in the box; "
            f"{certified} of {s.layers} layers certified"
        )
    text = f"Dead units: {s.dead}/{s.units} ({100 * s.dead_fraction:.1f}%) in {s.layers_with_dead} of {s.layers} layers"
    extras = [f"dying {s.dying}", f"dormant {s.dormant}"]
    if s.saturated:
        extras.append(f"saturated {s.saturated}")
    if s.certified_dead is not None:
        extras.append(f"provably dead {s.certified_dead}")
    return f"{text} · {', '.join(extras)}"


def layers_table(report: Report, decorated: bool = True, name_width: int = 40) -> Table:
    """One row per layer; for a narrow console (fit_layers_table) `decorated=False` leaves out the bar
    and the rates sparkline and `name_width` caps the names' column (they fold)."""
    settings = report.settings
    table = plain_table()
    longest = max((len(layer.name) for layer in report.layers), default=8)
    table.add_column("Layer", overflow="fold", min_width=min(max(longest, 5), name_width))
    # layers inside a branch that ran on some batches only: say how many samples each layer saw
    partial = any(
        layer.samples is not None and layer.samples != report.data.samples for layer in report.layers
    )
    columns = (
        ("Op", "Units") + (("Samples",) if partial else ()) + ("Dead", "Dead %", "Dying", "Dormant", "Median")
    )
    for column in columns:
        table.add_column(
            column, justify="left" if column == "Op" else "right", no_wrap=True, min_width=len(column)
        )
    certified = any(layer.upper_bound is not None or layer.certify_note for layer in report.layers)
    why_not = any(layer.certified_dead is None and layer.certify_note for layer in report.layers)
    if decorated:
        table.add_column("", no_wrap=True, width=BAR_WIDTH)
    if certified:  # the proof column takes the sparkline's place (80 columns)
        table.add_column("Proven", justify="right", no_wrap=True)
    elif decorated:
        table.add_column("Rates", no_wrap=True, width=8)
    if why_not:  # "n/c" says nothing without the op that stopped the proof
        table.add_column("Why not certified", overflow="fold")
    for layer in report.layers:
        proof = [_certified_cell(layer)] if certified else []
        if why_not:
            proof.append(rich_text(layer.certify_note or "") if layer.certified_dead is None else "")
        seen = [("–" if layer.samples is None else f"{layer.samples:,}")] if partial else []
        if not layer.ran:
            units = str(len(layer.upper_bound)) if layer.upper_bound is not None else "–"
            table.add_row(
                rich_text(layer.name),
                rich_text(layer.op),
                units,
                *seen,
                "–",
                "not run",
                "–",
                "–",
                "–",
                *(["", *(proof or [""])] if decorated else proof),
                style="dim",
            )
            continue
        dead = int(layer.dead_mask().sum())
        fraction = dead / layer.units if layer.units else 0.0
        table.add_row(
            rich_text(layer.name),
            rich_text(layer.op),
            str(layer.units),
            *seen,
            str(dead),
            f"{100 * fraction:.1f}%",
            str(int(layer.dying_mask(settings.dying).sum())),
            str(int(layer.dormant_mask(settings.tau).sum())),
            f"{100 * float(np.median(layer.active_rate())):.1f}%",
            *([_bar(fraction), *(proof or [sparkline(layer.active_rate())])] if decorated else proof),
            style=severity_style(fraction),
        )
    return table


def fit_layers_table(report: Report, console: Console) -> tuple[Table, int]:
    """The layers table at the console's width, and the width to print it at: Rich squeezes a table too
    wide for it by shrinking the one folding column, the names, to nothing; drop the bar and sparkline
    first, then fold the names into what the numbers leave (at least 8 characters). Narrower than that
    (COLUMNS=20 in a CI job) Rich would drop the names and crop the numbers: the table is printed wider
    than the console instead, as a line longer than the window loses nothing."""

    def natural(table: Table) -> int:
        return Measurement.get(console, console.options.update_width(1 << 16), table).maximum

    table = layers_table(report)
    if natural(table) <= console.width:
        return table, console.width
    table = layers_table(report, decorated=False)
    longest = max(max((len(layer.name) for layer in report.layers), default=8), 5)
    numbers = natural(table) - longest
    names = max(8, min(40, console.width - numbers))
    return layers_table(report, decorated=False, name_width=names), max(
        console.width, numbers + min(names, longest)
    )


def _certified_cell(layer: LayerStats) -> str:
    if layer.certified_dead is None:
        return "n/c"
    return str(len(layer.certified_dead))


def certificate_table(report: Report) -> Table:
    """Data-free `scan --certify`: per layer, the units that can never fire over the input box."""
    table = plain_table()
    longest = max((len(layer.name) for layer in report.layers), default=8)
    table.add_column("Layer", overflow="fold", min_width=min(max(longest, 5), 40))
    for column in ("Op", "Units", "Provably dead", "%", "Why not certified"):
        table.add_column(
            column, justify="left" if column in ("Op", "Why not certified") else "right", overflow="fold"
        )
    for layer in report.layers:
        if layer.certified_dead is None:
            table.add_row(
                rich_text(layer.name),
                rich_text(layer.op),
                "–",
                "–",
                "–",
                rich_text(layer.certify_note or ""),
                style="dim",
            )
            continue
        units = len(layer.upper_bound)
        fraction = len(layer.certified_dead) / units if units else 0.0
        table.add_row(
            rich_text(layer.name),
            rich_text(layer.op),
            str(units),
            str(len(layer.certified_dead)),
            f"{100 * fraction:.1f}%",
            "",
            style=severity_style(fraction),
        )
    return table


def unit_status(layer: LayerStats, index: int, dying: float) -> str:
    if not layer.ran:
        return "not run"
    if layer.positive_counts[index] == 0:
        cause = layer.extra.get("causes", {}).get(str(index))
        return f"DEAD ({cause})" if cause else "DEAD"
    if layer.saturated_counts is not None and layer.saturated_counts[index] == layer.elements_per_unit:
        return "saturated"
    if layer.active_rate()[index] < dying:
        return "dying"
    return "alive"


def units_table(report: Report, layer: LayerStats) -> Table:
    table = plain_table()
    bias_title = f"Bias ({rich_text(layer.producer)})" if layer.producer else "Bias"
    for column in ("Unit", bias_title, "Active %", "Max pre-act", "Mean |act|", "Status"):
        table.add_column(column, justify="left" if column == "Status" else "right")
    rates = layer.active_rate()
    mean_abs = layer.mean_abs()
    for i in range(layer.units):
        status = unit_status(layer, i, report.settings.dying)
        style = {"DEAD": "bold red", "dying": "yellow", "saturated": "magenta"}.get(status.split(" ")[0], "")
        bias = "–" if layer.bias is None else f"{layer.bias[i]:.4g}"
        table.add_row(
            str(i),
            bias,
            f"{100 * rates[i]:.2f}%",
            f"{layer.max_preactivation[i]:.4g}",
            f"{mean_abs[i]:.4g}",
            status,
            style=style,
        )
    return table


def print_causes(report: Report, console: Console) -> None:
    """--explain: dead units per cause and layer, then what to do about each cause found."""
    from deadrelu_cli.report.advice import ADVICE, CAUSES

    found = [c for c in CAUSES if any(c in layer.extra.get("cause_counts", {}) for layer in report.layers)]
    table = plain_table()
    table.add_column("Layer", overflow="fold")
    for cause in found:
        table.add_column(cause, justify="right")
    for layer in report.layers:
        counts = layer.extra.get("cause_counts")
        if counts:
            table.add_row(rich_text(layer.name), *[str(counts.get(c, 0)) for c in found])
    console.print("Why they are dead (docs/causes.md):", markup=False)
    console.print(table)
    for cause in found:
        console.print(f"{cause}: " + "; ".join(ADVICE[cause]), markup=False)


def header_line(report: Report) -> str:
    return terminal_text(
        f"{report.model.path} ({report.model.format}) · {report.data.path} · {report.data.samples_text()}"
    )


def print_warnings(report: Report, console: Console) -> None:
    """The report's problems (its `check …` notes) as `warning:` lines: all that `-q` keeps of the table."""
    for note in report.notes:
        if note.startswith("check "):
            console.print(
                f"warning: {terminal_text(note.removeprefix('check '))}", style="yellow", markup=False
            )


def nothing_counted_line(report: Report) -> str:
    ops = ", ".join(report.settings.ops) if report.settings.ops else "the scanned ops"
    return f"No activation site of {ops} in this model: nothing was counted."


def print_report(report: Report, console: Console, layer_name: str | None = None) -> None:
    console.print(header_line(report), markup=False)
    print_warnings(report, console)  # structural problems first: they matter more than any count
    if layer_name:
        layer = report.layer(layer_name)
        console.print(
            terminal_text(f"{layer.name}: {layer.op}, {layer.units} units on axis {layer.channel_dim}"),
            markup=False,
        )
        console.print(units_table(report, layer))
    elif (
        report.layers
        and not any(layer.ran for layer in report.layers)
        and report.summary().certified_dead is not None
    ):
        console.print(certificate_table(report))
    elif report.layers:
        table, width = fit_layers_table(report, console)
        narrow, console.width = console.width, width  # print(width=) only narrows
        try:
            console.print(table, width=width)  # names fold inside it: the width is already chosen
        finally:
            console.width = narrow
    else:  # an empty table would read as "all clear"; the notes below say what the model has instead
        console.print(nothing_counted_line(report), style="bold")
    console.print(summary_line(report), markup=False)
    if not layer_name:
        for line in depth_lines(report):
            console.print(line, markup=False)
    if any("cause_counts" in layer.extra for layer in report.layers) and not layer_name:
        print_causes(report, console)
    for note in report.notes:
        if not note.startswith("check "):
            console.print(f"note: {terminal_text(note)}", style="dim", markup=False)
