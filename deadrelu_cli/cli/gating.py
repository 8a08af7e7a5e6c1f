"""What `scan` and `gate` share: settings from config files, the gate, and the CI outputs."""

from __future__ import annotations

import os
from typing import Any

import typer
from rich.console import Console

from deadrelu_cli.config import KEYS, FileConfig, load_config, shown, table_label
from deadrelu_cli.display import terminal_text
from deadrelu_cli.errors import GateFailed


def merge_settings(
    ctx: typer.Context, params: dict[str, Any], config_path: str | None
) -> tuple[dict[str, Any], dict[str, str], FileConfig]:
    """Fill every parameter not given on the command line from the config file; say where each came from."""
    given = frozenset(name for name in params if _from_command_line(ctx, name))
    file_config = load_config(config_path, given=given)
    if file_config.skipped:
        from deadrelu_cli.cli.console import make_console

        err = make_console(stderr=True, soft_wrap=True)
        for line in file_config.skipped:
            err.print(f"warning: {terminal_text(line)}", style="yellow", markup=False)
    sources = {}
    declared = {param.name: param for param in ctx.command.params}
    for name in params:
        if name not in given and name in file_config.values:
            params[name] = _as_flag_would(ctx, declared.get(name), file_config.values[name], file_config)
            sources[name] = _relative(file_config.path)
        else:
            sources[name] = "command line" if name in given else "default"
    return params, sources, file_config


def _from_command_line(ctx: typer.Context, name: str) -> bool:
    source = ctx.get_parameter_source(name)
    return source is not None and source.name in ("COMMANDLINE", "ENVIRONMENT", "PROMPT")


def _as_flag_would(ctx: typer.Context, param, value: Any, file_config: FileConfig) -> Any:
    """A value from the file through the option's own type and range, as the flag's value would go
    (`max-dead-units = -1` passed no `min=0`): one check for both."""
    from deadrelu_cli.errors import UserError, one_line

    if param is None:
        return value
    try:
        return param.type_cast_value(ctx, value)
    except typer.BadParameter as exc:
        key = next((k for k, (n, _) in KEYS.items() if n == param.name), param.name)
        reason = getattr(exc, "message", "") or exc.format_message()
        where = f"{_relative(file_config.path)} {table_label(file_config.path)}".strip()
        raise UserError(f"{key} = {shown(value)} in {where}: {one_line(reason, 160)}") from None


def config_file(explicit: str | None) -> str | None:
    """The settings file a command reads (an input no output may overwrite)."""
    from deadrelu_cli.config import find_config

    found = explicit or find_config()
    return str(found) if found else None


def _relative(path) -> str:
    try:
        return os.path.relpath(path)
    except ValueError:  # another drive on Windows
        return str(path)


def show_config(
    params: dict[str, Any], sources: dict[str, str], console: Console, flags: dict[str, str] | None = None
) -> None:
    """The settings a command would run with; `flags`: each parameter's option as typed (--json, not
    --json-out)."""
    from deadrelu_cli.report.table import plain_table

    table = plain_table()
    for column in ("Setting", "Value", "From"):
        table.add_column(column, overflow="fold")
    for name, value in params.items():
        if name in ("show_config_flag", "config", "model", "data"):
            continue
        table.add_row(
            (flags or {}).get(name, "--" + name.replace("_", "-")),
            "–" if value is None else str(value),
            sources.get(name, "default"),
        )
    console.print(table)


def _annotate_github(result, report, err: Console) -> None:
    """GitHub workflow commands (read from the job log) for each failure; names are percent-encoded
    (display.github_*) so that a layer name cannot end the command and forge another line."""
    from deadrelu_cli.display import github_message, github_property

    title = github_property(f"deadrelu {report.model.path}")
    for message in result.failures:
        err.print(
            f"::error title={title}::{github_message(message)}", markup=False, highlight=False, soft_wrap=True
        )
    for name in result.added:
        err.print(
            f"::warning title=deadrelu::{github_message(f'layer {name} is not in the baseline: not compared with it')}",
            markup=False,
            soft_wrap=True,
        )
    for name in result.removed:
        err.print(
            f"::warning title=deadrelu::{github_message(f'baseline layer {name} is gone')}",
            markup=False,
            soft_wrap=True,
        )


def print_quiet(report, config, out: Console, err: Console) -> None:
    """What `-q` keeps of the table (scan, gate): the problems, on stderr. The verdict follows from
    `run_gate`; without limits the table's one-line summary (on OUT) stands for it: -q is never silent."""
    from deadrelu_cli.report.table import nothing_counted_line, print_warnings, summary_line

    print_warnings(report, err)
    if not report.layers:
        err.print(nothing_counted_line(report), markup=False)
    if config is None or not config.active:
        out.print(summary_line(report), markup=False)


def run_gate(report, config, junit: str | None, markdown: str | None, err: Console) -> None:
    """Evaluate the gate, write the CI outputs, print the verdict on stderr; raise GateFailed (exit 1) on failure.
    (The caller has checked JUNIT and MARKDOWN against its inputs with files.guard_outputs.)"""
    from deadrelu_cli.files import append_text, write_text_atomic
    from deadrelu_cli.gate import evaluate, unscanned_text, unseen_text
    from deadrelu_cli.report.junit import render_junit
    from deadrelu_cli.report.markdown import render_markdown

    result = evaluate(report, config)
    if junit:
        write_text_atomic(junit, render_junit(report, result))
    text = render_markdown(report, result) if (markdown or os.environ.get("GITHUB_STEP_SUMMARY")) else None
    if markdown:
        write_text_atomic(markdown, text)
    summary_file = os.environ.get("GITHUB_STEP_SUMMARY")
    if summary_file and text:
        append_text(summary_file, text)  # GitHub's own file: append, as documented
    if os.environ.get("GITHUB_ACTIONS") == "true":
        _annotate_github(result, report, err)
    # loud, not a dim note: a layer that pairs with nothing in the baseline was not compared with it
    for name in result.added:
        err.print(
            f"warning: layer {terminal_text(name)} is not in the baseline: not compared with it",
            markup=False,
            style="yellow",
        )
    for name in result.removed:
        err.print(
            f"warning: baseline layer {terminal_text(name)} is not in this report",
            markup=False,
            style="yellow",
        )
    if not result.checked:
        return
    for message in result.width_changes + result.unused_limits:
        err.print(f"warning: {terminal_text(message)}", markup=False, style="yellow")
    if result.unseen_other:
        err.print(
            f"note: not gated: activations the scan could not see that are none of the scanned ops: {unseen_text(result.unseen_other)}",
            markup=False,
            style="dim",
        )
    if result.unscanned:
        err.print(
            f"note: not gated: {unscanned_text(result.unscanned, report.settings.ops)}",
            markup=False,
            style="dim",
        )
    if result.passed:
        err.print("gate passed", markup=False, style="green")
        return
    for message in result.failures:
        err.print(f"gate: {terminal_text(message)}", markup=False)
    raise GateFailed(f"gate failed: {len(result.failures)} limit(s) exceeded")


def write_html(path: str, report, config=None, baseline=None) -> None:
    """The HTML report, with the gate verdict when limits were given."""
    from deadrelu_cli.files import write_text_atomic
    from deadrelu_cli.gate import evaluate
    from deadrelu_cli.report.html import GateSummary, render_html

    verdict = None
    if config is not None and config.active:
        result = evaluate(report, config)
        verdict = GateSummary(result.passed, result.failures)
    write_text_atomic(
        path,
        render_html(report, baseline if baseline is not None else getattr(config, "baseline", None), verdict),
    )
