"""`deadrelu scan`: replay calibration data, report dead units per call site, gate the result."""

from __future__ import annotations

import os
import sys
import time

import typer
from rich.console import Console

from deadrelu_cli.cli import options as opt
from deadrelu_cli.cli.console import make_console, on_a_terminal
from deadrelu_cli.cli.gating import config_file, print_quiet, run_gate, write_html


def _progress_callback(quiet: bool, err: Console):
    """A Rich progress bar on stderr, only when stderr is a terminal that can redraw a line (TERM=dumb,
    an editor's shell buffer, cannot: the bar left a blank line above the table)."""
    if quiet or not on_a_terminal(err) or err.is_dumb_terminal:
        return None, None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    progress = Progress(
        TextColumn("scanning"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("samples"),
        TextColumn("{task.fields[rate]}"),
        TimeRemainingColumn(),
        console=err,
        transient=True,
        # redrawn from a thread of its own: at Rich's default of 10 per second it took ~1% of a core beside
        # every scan on a terminal, 2 per second ~0.3% (docs/performance.md, tenth session)
        refresh_per_second=2,
    )
    task = progress.add_task("scan", total=None, rate="")
    started = time.perf_counter()

    def update(done: int, total: int) -> None:
        elapsed = time.perf_counter() - started
        rate = f"{done / elapsed:,.0f} samples/s" if elapsed > 0 else ""
        progress.update(task, completed=done, total=total, rate=rate)

    return progress, update


@opt.command
def scan(
    model: opt.OptionalModel = None,
    data: opt.OptionalData = None,
    loading: opt.Loading = None,
    running: opt.Running = None,
    dying: opt.Dying = 0.01,
    tau: opt.Tau = 0.1,
    ops: opt.Ops = None,
    allow_nonfinite: opt.AllowNonfinite = False,
    compile_graph: opt.Compile = False,
    distributed: opt.Distributed = False,
    explain: opt.Explain = False,
    certify: opt.Certify = False,
    input_range: opt.InputRange = None,
    input_shape: opt.InputShapeOpt = None,
    dtype: opt.Dtype = None,
    channels_last: opt.ChannelsLast = False,
    feeding: opt.Feeding = None,
    texts: opt.TextInput = None,
    device_map: opt.DeviceMap = None,
    max_memory: opt.MaxMemory = None,
    layer: opt.LayerName = None,
    json_out: opt.JsonOut = None,
    html_out: opt.HtmlOut = None,
    gating: opt.Gating = None,
    settings: opt.Settings = None,
    quiet: opt.Quiet = False,
    no_progress: opt.NoProgress = False,
) -> None:
    """Scan MODEL on the calibration data: per-unit activation rates at every ReLU call site.

    Settings not given as flags come from \\[tool.deadrelu] in the nearest pyproject.toml (or deadrelu.toml).
    """
    from deadrelu_cli.engine import run_scan_detailed
    from deadrelu_cli.errors import UserError
    from deadrelu_cli.files import guard_outputs, require_temp_folder, write_text_atomic
    from deadrelu_cli.loaders.arch import arch_file
    from deadrelu_cli.loaders.companions import model_companions
    from deadrelu_cli.probe.ops import parse_ops
    from deadrelu_cli.report.model import report_to_json
    from deadrelu_cli.report.table import print_report

    if not model:
        raise UserError("missing MODEL: deadrelu scan MODEL --data DATA (see --help)")
    certify = certify or input_range is not None  # a box is only for certifying (as in fix)
    if not data and not texts.text and not certify:
        raise UserError(
            "missing --data: the calibration data to replay (.npz, .npy, .pt or .safetensors), or --text FILE"
        )
    json_to_stdout = json_out == "-"
    out = make_console(stderr=json_to_stdout)
    err = make_console(stderr=True, soft_wrap=True)
    outputs = [
        ("--json", json_out),
        ("--junit", gating.junit),
        ("--markdown", gating.markdown),
        ("--html", html_out),
    ]
    guard_outputs(
        outputs,
        [
            ("MODEL", model),
            ("--data", data),
            ("--text", texts.text),
            ("--arch", arch_file(loading.arch)),
            ("--baseline", gating.baseline),
            ("--config", config_file(settings.config)),
            *model_companions(model, outputs),
        ],
    )
    if html_out:  # before the scan, not after it (a read-only container without a tmpfs)
        require_temp_folder("the HTML report (matplotlib)")
    gate = gating.config()
    hide_bar = quiet or no_progress or (distributed and os.environ.get("RANK", "0") != "0")
    progress, update = _progress_callback(hide_bar, err)
    options = opt.scan_options(
        model,
        data,
        loading,
        running,
        feeding,
        texts,
        compile=compile_graph,
        distributed=distributed,
        explain=explain,
        certify=certify,
        input_range=opt.parse_input_range(input_range),
        input_shape=input_shape,
        dtype=dtype,
        channels_last=channels_last,
        dying=dying,
        tau=tau,
        ops=parse_ops(ops),
        allow_nonfinite=allow_nonfinite,
        device_map=device_map,
        max_memory=max_memory,
        progress=update,
    )
    if progress is not None:
        with progress:
            result = run_scan_detailed(options)
    else:
        result = run_scan_detailed(options)
    if os.environ.get("DEADRELU_DEBUG") == "1":  # which way the activations were counted, and why
        from deadrelu_cli import native

        for line in native.statuses():
            make_console(stderr=True).print(f"deadrelu: debug: {line}", markup=False, soft_wrap=True)
    if not result.is_main:  # other ranks of a distributed scan: rank 0 reports
        return
    report = result.report
    if layer:
        report.layer(layer)  # a wrong name is a usage error, also with --json -
    if json_to_stdout:
        sys.stdout.write(report_to_json(report))
        sys.stdout.flush()
        from deadrelu_cli.report.table import nothing_counted_line, print_warnings

        # the report's problems are said where a reader sees them, also here (stdout is the JSON): every
        # `warning:` line -q prints (padding counted as data, a ReLU on the output, …), on stderr
        print_warnings(report, err)
        if not report.layers:
            err.print(nothing_counted_line(report), markup=False)
    else:
        text = report_to_json(report) if json_out else None  # what JSON cannot hold: said before the table
        if quiet:
            print_quiet(report, gate, out, err)
        else:
            print_report(report, out, layer)
        if text is not None:
            write_text_atomic(json_out, text)
    try:
        run_gate(report, gate, gating.junit, gating.markdown, err)
    finally:  # the picture is written whether the gate passed or not
        if html_out:
            write_html(html_out, report, gate)


def register(app: typer.Typer) -> None:
    app.command("scan")(scan)
