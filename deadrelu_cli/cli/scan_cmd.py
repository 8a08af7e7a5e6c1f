"""`deadrelu scan`: replay calibration data, report dead units per call site, gate the result."""

from __future__ import annotations

import os
import sys
import time

import typer
from rich.console import Console

from deadrelu_cli.cli import options as opt
from deadrelu_cli.cli.gating import (
    config_file,
    gate_config,
    merge_settings,
    run_gate,
    show_config,
    write_html,
)


def _progress_callback(quiet: bool, err: Console):
    """A Rich progress bar on stderr, only when stderr is a terminal."""
    if quiet or not err.is_terminal:
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
    )
    task = progress.add_task("scan", total=None, rate="")
    started = time.perf_counter()

    def update(done: int, total: int) -> None:
        elapsed = time.perf_counter() - started
        rate = f"{done / elapsed:,.0f} samples/s" if elapsed > 0 else ""
        progress.update(task, completed=done, total=total, rate=rate)

    return progress, update


def scan(
    ctx: typer.Context,
    model: opt.OptionalModel = None,
    data: opt.OptionalData = None,
    arch: opt.Arch = None,
    trust_pickle: opt.TrustPickle = False,
    batch_size: opt.BatchSize = "64",
    limit: opt.Limit = None,
    device: opt.Device = "auto",
    threshold: opt.Threshold = 0.0,
    dying: opt.Dying = 0.01,
    tau: opt.Tau = 0.1,
    channel_dim: opt.ChannelDim = None,
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
    const: opt.Const = None,
    batch_axis: opt.BatchAxis = None,
    layer: opt.LayerName = None,
    json_out: opt.JsonOut = None,
    html_out: opt.HtmlOut = None,
    max_dead: opt.MaxDead = None,
    max_dead_layer: opt.MaxDeadLayer = None,
    layer_limit: opt.LayerLimit = None,
    max_dead_units: opt.MaxDeadUnits = None,
    baseline: opt.Baseline = None,
    max_increase: opt.MaxIncrease = None,
    junit: opt.Junit = None,
    markdown: opt.Markdown = None,
    config: opt.ConfigPath = None,
    show_config_flag: opt.ShowConfig = False,
    quiet: opt.Quiet = False,
) -> None:
    """Scan MODEL on the calibration data: per-unit activation rates at every ReLU call site.

    Settings not given as flags come from [tool.deadrelu] in the nearest pyproject.toml (or deadrelu.toml).
    """
    from deadrelu_cli.engine import run_scan_detailed
    from deadrelu_cli.errors import UserError
    from deadrelu_cli.files import guard_outputs, write_text_atomic
    from deadrelu_cli.loaders.arch import arch_file
    from deadrelu_cli.options import ScanOptions
    from deadrelu_cli.probe.ops import parse_ops
    from deadrelu_cli.report.model import report_to_json
    from deadrelu_cli.report.table import print_report

    params = {k: v for k, v in locals().items() if k in ctx.params}
    params, sources, _ = merge_settings(ctx, params, config)
    if show_config_flag:
        show_config(params, sources, Console(highlight=False))
        return
    p = params
    if not p["model"]:
        raise UserError("missing MODEL: deadrelu scan MODEL --data DATA (see --help)")
    p["certify"] = p["certify"] or p["input_range"] is not None  # a box is only for certifying (as in fix)
    if not p["data"] and not p["certify"]:
        raise UserError("missing --data: the calibration data to replay (.npz, .npy, .pt or .safetensors)")
    json_to_stdout = p["json_out"] == "-"
    out = Console(stderr=json_to_stdout, highlight=False)
    err = Console(stderr=True, highlight=False, soft_wrap=True)
    guard_outputs(
        [
            ("--json", p["json_out"]),
            ("--junit", p["junit"]),
            ("--markdown", p["markdown"]),
            ("--html", p["html_out"]),
        ],
        [
            ("MODEL", p["model"]),
            ("--data", p["data"]),
            ("--arch", arch_file(p["arch"])),
            ("--baseline", p["baseline"]),
            ("--config", config_file(p["config"])),
        ],
    )
    gate = gate_config(
        p["max_dead"],
        p["max_dead_layer"],
        p["layer_limit"],
        p["max_dead_units"],
        p["baseline"],
        p["max_increase"],
    )
    progress, update = _progress_callback(quiet or (distributed and os.environ.get("RANK", "0") != "0"), err)
    options = ScanOptions(
        model=p["model"],
        data=p["data"],
        arch=p["arch"],
        trust_pickle=p["trust_pickle"],
        batch_size=opt.parse_batch_size(p["batch_size"]),
        compile=p["compile_graph"],
        distributed=p["distributed"],
        explain=p["explain"],
        certify=p["certify"],
        input_range=opt.parse_input_range(p["input_range"]),
        input_shape=p["input_shape"],
        dtype=p["dtype"],
        channels_last=p["channels_last"],
        limit=p["limit"],
        device=p["device"],
        threshold=p["threshold"],
        dying=p["dying"],
        tau=p["tau"],
        channel_dim=p["channel_dim"],
        ops=parse_ops(p["ops"]),
        allow_nonfinite=p["allow_nonfinite"],
        consts=tuple(p["const"] or ()),
        batch_axes=opt.parse_batch_axes(p["batch_axis"]),
        progress=update,
    )
    if progress is not None:
        with progress:
            result = run_scan_detailed(options)
    else:
        result = run_scan_detailed(options)
    if not result.is_main:  # other ranks of a distributed scan: rank 0 reports
        return
    report = result.report
    if p["layer"]:
        report.layer(p["layer"])  # a wrong name is a usage error, also with --json -
    if json_to_stdout:
        sys.stdout.write(report_to_json(report))
        sys.stdout.flush()
    else:
        print_report(report, out, p["layer"])
        if p["json_out"]:
            write_text_atomic(p["json_out"], report_to_json(report))
    try:
        run_gate(report, gate, p["junit"], p["markdown"], err)
    finally:  # the picture is written whether the gate passed or not
        if p["html_out"]:
            write_html(p["html_out"], report, gate)


def register(app: typer.Typer) -> None:
    app.command("scan")(scan)
