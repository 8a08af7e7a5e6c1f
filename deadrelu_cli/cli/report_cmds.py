"""Commands on saved JSON reports: `gate`, `merge`, `diff` (no torch, no onnx)."""

from __future__ import annotations

import sys

import typer

from deadrelu_cli.cli import options as opt
from deadrelu_cli.cli.console import make_console
from deadrelu_cli.cli.gating import config_file, print_quiet, run_gate


@opt.command
def gate(
    report_path: opt.ReportPath,
    gating: opt.Gating = None,
    settings: opt.Settings = None,
    quiet: opt.Quiet = False,
) -> None:
    """Apply gate limits to a saved REPORT: exit 0 pass, 1 failed, 2 usage or input error."""
    from deadrelu_cli.files import guard_outputs
    from deadrelu_cli.report.model import load_report
    from deadrelu_cli.report.table import print_report

    guard_outputs(
        [("--junit", gating.junit), ("--markdown", gating.markdown)],
        [
            ("REPORT", report_path),
            ("--baseline", gating.baseline),
            ("--config", config_file(settings.config)),
        ],
    )
    config = gating.config()  # a usage error in the limits comes before any output
    if not config.active:
        from deadrelu_cli.errors import UserError

        raise UserError(
            "no gate limit given: pass --max-dead, --max-dead-layer, --layer-limit, --max-dead-units or --baseline (or set them in [tool.deadrelu])"
        )
    report = load_report(report_path)
    err = make_console(stderr=True, soft_wrap=True)
    if quiet:
        print_quiet(report, config, make_console(), err)
    else:
        print_report(report, make_console())
    run_gate(report, config, gating.junit, gating.markdown, err)


def merge(
    reports: list[str] = typer.Argument(
        ..., help="Partial JSON reports of the same model over disjoint data."
    ),
    json_out: opt.JsonOut = "-",
    quiet: bool = typer.Option(
        False, "--quiet", "-q", help="Do not print the summary (warnings and errors still)."
    ),
    allow_overlap: bool = typer.Option(
        False,
        "--allow-overlap",
        help="Merge parts whose data fingerprints share samples (disjoint shards that each hold an "
        "identical sample: a blank image, a repeated sentence) as given, with a warning; a shared sample "
        "then counts once per part.",
    ),
) -> None:
    """Merge partial reports (same model, disjoint data) into exactly the report of the union."""
    from deadrelu_cli.display import terminal_text
    from deadrelu_cli.files import guard_outputs, write_text_atomic
    from deadrelu_cli.report.model import (
        DATA_CHECK_NOTE,
        PARTIAL_LAYERS_NOTE,
        load_report,
        merge_reports,
        refuse_repeated_reports,
        report_to_json,
    )
    from deadrelu_cli.report.table import summary_line

    guard_outputs([("--json", json_out)], [("REPORT", path) for path in reports])
    refuse_repeated_reports(reports)
    merged = merge_reports(
        [load_report(path) for path in reports], [str(path) for path in reports], allow_overlap
    )
    text = report_to_json(merged)
    err = make_console(stderr=True, soft_wrap=True)
    for note in merged.notes:
        if note.startswith(DATA_CHECK_NOTE):
            err.print(f"warning: {terminal_text(note.removeprefix('check '))}", style="yellow", markup=False)
        elif note.startswith(PARTIAL_LAYERS_NOTE) and not quiet:
            err.print(f"note: {terminal_text(note)}", markup=False)
    if json_out in (None, "-"):
        sys.stdout.write(text)
        return
    write_text_atomic(json_out, text)
    if quiet:
        return
    err.print(
        terminal_text(f"merged {len(reports)} reports, {merged.data.samples} samples → {json_out}")
        + f"\n{summary_line(merged)}",
        markup=False,
    )


def diff(
    old: opt.ReportPath,
    new: opt.ReportPath,
    all_layers: bool = typer.Option(False, "--all", help="Show unchanged layers too."),
) -> None:
    """Per-layer changes in dead units between two reports (matched by producer weight, else layer name)."""
    from deadrelu_cli.report.diff import diff_reports, diff_warning, print_diff

    before, after = load(old), load(new)
    rows, summary = diff_reports(before, after)
    console = make_console()
    print_diff(rows, summary, console, all_layers)
    warning = diff_warning(before, after)
    if warning:
        console.print(warning, style="yellow", markup=False)


def report(
    report_path: opt.ReportPath,
    html_out: opt.HtmlOut = None,
    baseline: opt.Baseline = None,
    json_out: opt.JsonOut = None,
    layer: opt.LayerName = None,
    quiet: opt.QuietTable = False,
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
        if not quiet:
            print_report(saved, make_console(), layer)
        if json_out:
            write_text_atomic(json_out, report_to_json(saved))
    if html_out:
        write_html(html_out, saved, baseline=old)
        make_console(stderr=True, soft_wrap=True).print(f"wrote {html_out}", markup=False)


def load(path):
    from deadrelu_cli.report.model import load_report

    return load_report(path)


def register(app: typer.Typer) -> None:
    app.command("gate")(gate)
    app.command("merge")(merge)
    app.command("diff")(diff)
    app.command("report")(report)
