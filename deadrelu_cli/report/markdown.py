"""A Markdown summary for pull requests and $GITHUB_STEP_SUMMARY."""

from __future__ import annotations

from deadrelu_cli.display import markdown_code, markdown_text
from deadrelu_cli.gate import GateResult, unscanned_text, unseen_text
from deadrelu_cli.report.model import Report


def render_markdown(report: Report, result: GateResult) -> str:
    s = report.summary()
    verdict = "passed" if result.passed else "FAILED"
    extras = [f"dying {s.dying}", f"dormant {s.dormant}"]  # as the terminal's summary line (table.py)
    if s.saturated:
        extras.append(f"saturated {s.saturated}")
    if s.certified_dead is not None:
        extras.append(f"provably dead {s.certified_dead}")
    lines = [
        f"### deadrelu: {markdown_code(report.model.path)} — gate {verdict if result.checked else 'not configured'}",
        "",
        f"**{s.dead}/{s.units} units dead ({100 * s.dead_fraction:.1f}%)** in {s.layers_with_dead} of {s.layers} layers · "
        f"{' · '.join(extras)} · {report.data.samples} samples of {markdown_code(report.data.path)}",
        "",
    ]
    has_baseline = result.baseline_dead_fraction is not None
    header = (
        "| Layer | Op | Units | Dead | Dead % |"
        + (" Baseline % |" if has_baseline else "")
        + " Limit | Status |"
    )
    lines += [header, "|" + "---|" * (header.count("|") - 1)]
    for v in result.layers:
        base = (
            ""
            if not has_baseline
            else (" – |" if v.baseline_fraction is None else f" {100 * v.baseline_fraction:.1f}% |")
        )
        limit = "–" if v.limit is None else f"{100 * v.limit:.1f}%"
        status = "✅" if v.passed else "❌"
        lines.append(
            f"| {markdown_code(v.name, in_table=True)} | {v.op} | {v.units} | {v.dead} | {100 * v.fraction:.1f}% |{base} {limit} | {status} |"
        )
    if result.failures:
        lines += ["", "**Failures**", ""] + [f"- {markdown_text(f)}" for f in result.failures]
    if result.added or result.removed:
        lines += ["", "**Layers that differ from the baseline**", ""]
        lines += [f"- added: {markdown_code(n)}" for n in result.added] + [
            f"- removed: {markdown_code(n)}" for n in result.removed
        ]
    if result.width_changes:
        lines += ["", "**Layers of another width than in the baseline**", ""]
        lines += [f"- {markdown_text(message)}" for message in result.width_changes]
    if result.unused_limits:
        lines += ["", "**Layer limits that limited nothing**", ""]
        lines += [f"- {markdown_text(message)}" for message in result.unused_limits]
    if result.unseen_other:
        lines += [
            "",
            f"Not gated (activations the scan could not see, none of the scanned ops): {markdown_text(unseen_text(result.unseen_other))}",
        ]
    if result.unscanned:
        lines += ["", f"Not gated: {markdown_text(unscanned_text(result.unscanned, report.settings.ops))}"]
    return "\n".join(lines) + "\n"
