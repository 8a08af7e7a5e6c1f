"""What `deadrelu trend` prints: dead fraction per layer at (up to 8) checkpoints, when units died."""

from __future__ import annotations

from rich.console import Console

from deadrelu_cli.display import rich_text, terminal_text
from deadrelu_cli.report.table import SPARK, plain_table

MAX_COLUMNS = 8


def print_trend(result, console: Console, data: str | None, quiet: Console | None = None) -> None:
    """RESULT is a trend.TrendResult (not imported: the report layer sits below trend). QUIET (-q, the
    stderr console): the first line only, what was compared, and the notes (files whose step and name
    disagree) on QUIET."""
    steps = [c.step if c.step is not None else i for i, c in enumerate(result.checkpoints)]
    shown = (
        sorted({round(i * (len(steps) - 1) / (MAX_COLUMNS - 1)) for i in range(MAX_COLUMNS)})
        if len(steps) > MAX_COLUMNS
        else list(range(len(steps)))
    )
    label = "step" if any(c.source == "checkpoint" for c in result.checkpoints) else "#"
    table = plain_table()
    table.add_column("Layer", overflow="fold")
    for index in shown:
        table.add_column(f"{label} {steps[index]}", justify="right", no_wrap=True)
    table.add_column("Trend", no_wrap=True)
    table.add_column("Died", no_wrap=True)
    table.add_column("Revived", justify="right")
    for layer in result.layers:
        cells = [
            "–" if layer.dead_fraction[i] is None else f"{100 * layer.dead_fraction[i]:.0f}%" for i in shown
        ]
        values = [v or 0.0 for v in layer.dead_fraction]
        spark = "".join(SPARK[min(len(SPARK) - 1, int(v * (len(SPARK) - 1) + 0.5))] for v in values)
        first = sorted(layer.died_at.values())
        died = f"{len(layer.died_at)}" + (f" ({label} {steps[first[0]]})" if first else "")
        table.add_row(rich_text(layer.name), *cells, spark, died, str(len(layer.revived)))
    what = f"{data} · {result.samples} samples" if data else "from JSON reports"
    console.print(
        terminal_text(f"{len(steps)} checkpoints, ordered by {result.order} · {what}"), markup=False
    )
    if quiet is not None:
        for note in result.notes:
            quiet.print(f"note: {terminal_text(note)}", markup=False)
        return
    console.print(table)
    for note in result.notes:
        console.print(f"note: {terminal_text(note)}", style="dim", markup=False)
