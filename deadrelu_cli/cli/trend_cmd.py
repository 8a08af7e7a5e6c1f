"""`deadrelu trend`: dead units across checkpoints of one training run."""

from __future__ import annotations

import json
import sys

import typer
from rich import box
from rich.console import Console
from rich.table import Table

from deadrelu_cli.cli import options as opt

Checkpoints = opt.Annotated[
    list[str],
    typer.Argument(
        help="Checkpoint files, a glob or a folder (ordered by their step/epoch, else by the number in the name); "
        "or JSON reports (watch(), training callbacks, scan --json): no --data needed.",
        show_default=False,
    ),
]
MAX_COLUMNS = 8


def trend(
    checkpoints: Checkpoints,
    data: opt.Annotated[
        str | None,
        typer.Option(
            "--data", "-d", help="Calibration data (not needed for JSON reports).", show_default=False
        ),
    ] = None,
    arch: opt.Arch = None,
    trust_pickle: opt.TrustPickle = False,
    batch_size: opt.BatchSize = "64",
    limit: opt.Limit = None,
    device: opt.Device = "auto",
    threshold: opt.Threshold = 0.0,
    channel_dim: opt.ChannelDim = None,
    json_out: opt.JsonOut = None,
    html_out: opt.HtmlOut = None,
) -> None:
    """Dead fraction per layer at each checkpoint, when each unit died, and which units revived."""
    from deadrelu_cli.files import write_text_atomic
    from deadrelu_cli.options import ScanOptions
    from deadrelu_cli.report.table import SPARK
    from deadrelu_cli.trend import run_trend

    options = ScanOptions(
        model="",
        data=data,
        arch=arch,
        trust_pickle=trust_pickle,
        batch_size=opt.parse_batch_size(batch_size),
        limit=limit,
        device=device,
        threshold=threshold,
        channel_dim=channel_dim,
    )
    result = run_trend(checkpoints, options)
    if html_out:
        from deadrelu_cli.report.html import render_trend_html

        write_text_atomic(html_out, render_trend_html(result))
    if json_out:
        text = json.dumps(result.to_dict(), indent=2) + "\n"
        if json_out == "-":
            sys.stdout.write(text)
            return
        write_text_atomic(json_out, text)
    console = Console(highlight=False)
    steps = [c.step if c.step is not None else i for i, c in enumerate(result.checkpoints)]
    shown = (
        sorted({round(i * (len(steps) - 1) / (MAX_COLUMNS - 1)) for i in range(MAX_COLUMNS)})
        if len(steps) > MAX_COLUMNS
        else list(range(len(steps)))
    )
    label = {"checkpoint": "step", "file name": "#", "command line": "#"}[result.checkpoints[0].source]
    table = Table(
        header_style="bold", box=box.SIMPLE_HEAVY, pad_edge=False, show_edge=False, padding=(0, 1, 0, 0)
    )
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
        table.add_row(layer.name, *cells, spark, died, str(len(layer.revived)))
    what = f"{data} · {result.samples} samples" if data else "from reports"
    console.print(
        f"{len(steps)} checkpoints, ordered by {result.checkpoints[0].source} · {what}",
        markup=False,
    )
    console.print(table)


def register(app: typer.Typer) -> None:
    app.command("trend")(trend)
