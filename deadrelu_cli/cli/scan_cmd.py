"""`deadrelu scan`: replay calibration data, report dead units per call site."""

from __future__ import annotations

import sys
import time

import typer
from rich.console import Console

from deadrelu_cli.cli import options as opt


def _progress_callback(quiet: bool, err: Console):
    """A Rich progress bar on stderr, only when stderr is a terminal."""
    if quiet or not err.is_terminal:
        return None, None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    progress = Progress(TextColumn("scanning"), BarColumn(), MofNCompleteColumn(), TextColumn("samples"),
                        TextColumn("{task.fields[rate]}"), TimeRemainingColumn(), console=err, transient=True)
    task = progress.add_task("scan", total=None, rate="")
    started = time.perf_counter()

    def update(done: int, total: int) -> None:
        elapsed = time.perf_counter() - started
        rate = f"{done / elapsed:,.0f} samples/s" if elapsed > 0 else ""
        progress.update(task, completed=done, total=total, rate=rate)

    return progress, update


def scan(
    model: opt.Model,
    data: opt.Data,
    arch: opt.Arch = None,
    trust_pickle: opt.TrustPickle = False,
    batch_size: opt.BatchSize = 64,
    limit: opt.Limit = None,
    device: opt.Device = "auto",
    threshold: opt.Threshold = 0.0,
    dying: opt.Dying = 0.01,
    tau: opt.Tau = 0.1,
    channel_dim: opt.ChannelDim = None,
    ops: opt.Ops = None,
    allow_nonfinite: opt.AllowNonfinite = False,
    const: opt.Const = None,
    batch_axis: opt.BatchAxis = None,
    layer: opt.LayerName = None,
    json_out: opt.JsonOut = None,
    max_dead: opt.MaxDead = None,
    quiet: opt.Quiet = False,
) -> None:
    """Scan MODEL on the calibration data: per-unit activation rates at every ReLU call site."""
    from deadrelu_cli.engine import ScanOptions, run_scan
    from deadrelu_cli.errors import GateFailed
    from deadrelu_cli.files import refuse_overwrite_of_inputs, write_text_atomic
    from deadrelu_cli.probe.ops import parse_ops
    from deadrelu_cli.report.model import report_to_json
    from deadrelu_cli.report.table import print_report

    json_to_stdout = json_out == "-"
    out = Console(stderr=json_to_stdout, highlight=False)
    err = Console(stderr=True, highlight=False)
    if json_out and not json_to_stdout:
        refuse_overwrite_of_inputs(json_out, [model, data])
    progress, update = _progress_callback(quiet, err)
    options = ScanOptions(model=model, data=data, arch=arch, trust_pickle=trust_pickle, batch_size=batch_size,
                          limit=limit, device=device, threshold=threshold, dying=dying, tau=tau,
                          channel_dim=channel_dim, ops=parse_ops(ops), allow_nonfinite=allow_nonfinite,
                          consts=tuple(const or ()), batch_axes=opt.parse_batch_axes(batch_axis), progress=update)
    if progress is not None:
        with progress:
            report = run_scan(options)
    else:
        report = run_scan(options)
    if json_to_stdout:
        sys.stdout.write(report_to_json(report))
        sys.stdout.flush()
    else:
        print_report(report, out, layer)
        if json_out:
            write_text_atomic(json_out, report_to_json(report))
    if layer and json_to_stdout:
        report.layer(layer)  # still validate the name
    if max_dead is not None:
        summary = report.summary()
        if summary.dead_fraction > max_dead:
            raise GateFailed(f"gate failed: {100 * summary.dead_fraction:.1f}% of units are dead, above --max-dead {100 * max_dead:.1f}%")


def register(app: typer.Typer) -> None:
    app.command("scan", no_args_is_help=True)(scan)
