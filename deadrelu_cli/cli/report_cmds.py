"""Commands on saved JSON reports: `gate`, `merge`, `diff` (no torch, no onnx)."""

from __future__ import annotations

import sys

import typer
from rich import box
from rich.console import Console
from rich.table import Table

from deadrelu_cli.cli import options as opt
from deadrelu_cli.cli.gating import config_file, gate_config, merge_settings, run_gate, show_config


def gate(
    ctx: typer.Context,
    report_path: opt.ReportPath,
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
    """Apply gate limits to a saved REPORT: exit 0 pass, 1 failed, 2 usage or input error."""
    from deadrelu_cli.files import guard_outputs
    from deadrelu_cli.report.model import load_report
    from deadrelu_cli.report.table import print_report

    params = {k: v for k, v in locals().items() if k in ctx.params}
    params, sources, _ = merge_settings(ctx, params, config)
    if show_config_flag:
        show_config(params, sources, Console(highlight=False))
        return
    p = params
    guard_outputs(
        [("--junit", p["junit"]), ("--markdown", p["markdown"])],
        [("REPORT", p["report_path"]), ("--baseline", p["baseline"]), ("--config", config_file(p["config"]))],
    )
    report = load_report(p["report_path"])
    err = Console(stderr=True, highlight=False, soft_wrap=True)
    if not quiet:
        print_report(report, Console(highlight=False))
    config_ = gate_config(
        p["max_dead"],
        p["max_dead_layer"],
        p["layer_limit"],
        p["max_dead_units"],
        p["baseline"],
        p["max_increase"],
    )
    if not config_.active:
        from deadrelu_cli.errors import UserError

        raise UserError(
            "no gate limit given: pass --max-dead, --max-dead-layer, --layer-limit, --max-dead-units or --baseline (or set them in [tool.deadrelu])"
        )
    run_gate(report, config_, p["junit"], p["markdown"], err)


def merge(
    reports: list[str] = typer.Argument(
        ..., help="Partial JSON reports of the same model over disjoint data."
    ),
    json_out: opt.JsonOut = "-",
) -> None:
    """Merge partial reports (same model, disjoint data) into exactly the report of the union."""
    from deadrelu_cli.files import guard_outputs, write_text_atomic
    from deadrelu_cli.report.model import load_report, merge_reports, refuse_repeated_reports, report_to_json
    from deadrelu_cli.report.table import summary_line
    from deadrelu_cli.text import terminal_text

    guard_outputs([("--json", json_out)], [("REPORT", path) for path in reports])
    refuse_repeated_reports(reports)
    merged = merge_reports([load_report(path) for path in reports])
    text = report_to_json(merged)
    if json_out in (None, "-"):
        sys.stdout.write(text)
        return
    write_text_atomic(json_out, text)
    Console(stderr=True, highlight=False, soft_wrap=True).print(
        terminal_text(f"merged {len(reports)} reports, {merged.data.samples} samples → {json_out}")
        + f"\n{summary_line(merged)}",
        markup=False,
    )


def diff(
    old: opt.ReportPath,
    new: opt.ReportPath,
    all_layers: bool = typer.Option(False, "--all", help="Show unchanged layers too."),
) -> None:
    """Per-layer changes in dead units between two reports (matched by layer name)."""
    from deadrelu_cli.report.diff import diff_reports
    from deadrelu_cli.text import rich_text, terminal_text

    rows, summary = diff_reports(load(old), load(new))
    table = Table(
        header_style="bold", box=box.SIMPLE_HEAVY, pad_edge=False, show_edge=False, padding=(0, 1, 0, 0)
    )
    for column in ("Layer", "Old dead", "New dead", "Change", "Revived", "Newly dead"):
        table.add_column(column, justify="left" if column == "Layer" else "right", overflow="fold")
    for row in rows:
        if not all_layers and row.unchanged:
            continue
        style = "red" if row.delta > 0 else ("green" if row.delta < 0 else "")
        table.add_row(
            rich_text(row.name),
            row.old_text,
            row.new_text,
            row.change_text,
            str(len(row.revived)),
            str(len(row.newly_dead)),
            style=style,
        )
    console = Console(highlight=False)
    console.print(table)
    console.print(terminal_text(summary), markup=False)


def report(
    report_path: opt.ReportPath,
    html_out: opt.HtmlOut = None,
    baseline: opt.Baseline = None,
    json_out: opt.JsonOut = None,
    layer: opt.LayerName = None,
) -> None:
    """Render a saved JSON report: the table (or one layer), an HTML page, or the JSON again."""
    from deadrelu_cli.cli.gating import write_html
    from deadrelu_cli.files import guard_outputs, write_text_atomic
    from deadrelu_cli.report.model import report_to_json
    from deadrelu_cli.report.table import print_report

    guard_outputs(
        [("--json", json_out), ("--html", html_out)], [("REPORT", report_path), ("--baseline", baseline)]
    )
    saved = load(report_path)
    old = load(baseline) if baseline else None
    if json_out == "-":
        sys.stdout.write(report_to_json(saved))
    else:
        print_report(saved, Console(highlight=False), layer)
        if json_out:
            write_text_atomic(json_out, report_to_json(saved))
    if html_out:
        write_html(html_out, saved, baseline=old)
        Console(stderr=True, highlight=False, soft_wrap=True).print(f"wrote {html_out}", markup=False)


def load(path):
    from deadrelu_cli.report.model import load_report

    return load_report(path)


def register(app: typer.Typer) -> None:
    app.command("gate")(gate)
    app.command("merge")(merge)
    app.command("diff")(diff)
    app.command("report")(report)
