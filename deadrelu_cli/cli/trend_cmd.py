"""`deadrelu trend`: dead units across checkpoints of one training run."""

from __future__ import annotations

import json
import sys

import typer

from deadrelu_cli.cli import options as opt
from deadrelu_cli.cli.console import make_console

Checkpoints = opt.Annotated[
    list[str],
    typer.Argument(
        help="Checkpoint files, a glob or a folder (ordered by their step/epoch, else by the number in the name); "
        "or JSON reports (watch(), training callbacks, scan --json): no --data needed.",
        show_default=False,
    ),
]


@opt.command
def trend(
    checkpoints: Checkpoints,
    data: opt.Annotated[
        str | None,
        typer.Option(
            "--data", "-d", help="Calibration data (not needed for JSON reports).", show_default=False
        ),
    ] = None,
    loading: opt.Loading = None,
    running: opt.Running = None,
    ops: opt.Ops = None,
    allow_nonfinite: opt.AllowNonfinite = False,
    json_out: opt.JsonOut = None,
    html_out: opt.HtmlOut = None,
    quiet: opt.QuietSummary = False,
    no_progress: opt.NoProgressAccepted = False,
) -> None:
    """Dead fraction per layer at each checkpoint, when each unit died, and which units revived."""
    from deadrelu_cli.files import guard_outputs, write_text_atomic
    from deadrelu_cli.loaders.arch import arch_file
    from deadrelu_cli.loaders.companions import model_companions
    from deadrelu_cli.probe.ops import parse_ops
    from deadrelu_cli.report.trend_table import print_trend
    from deadrelu_cli.trend import expand_paths, run_trend

    outputs = [("--json", json_out), ("--html", html_out)]
    guard_outputs(
        outputs,
        [("checkpoint", str(path)) for path in expand_paths(checkpoints)]
        + [role for path in expand_paths(checkpoints) for role in model_companions(path, outputs)]
        + [("--data", data), ("--arch", arch_file(loading.arch))],
    )

    options = opt.scan_options(
        "", data, loading, running, ops=parse_ops(ops), allow_nonfinite=allow_nonfinite
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
    console = make_console()
    print_trend(result, console, data, make_console(stderr=True, soft_wrap=True) if quiet else None)


def register(app: typer.Typer) -> None:
    app.command("trend")(trend)
