"""JUnit XML for CI test reporters: one testcase per layer, failures for layers over their limit."""

from __future__ import annotations

import xml.etree.ElementTree as ET

from deadrelu_cli.display import xml_text
from deadrelu_cli.gate import GateResult
from deadrelu_cli.report.model import Report


def _fail(case: ET.Element, messages: list[str]) -> None:
    """One <failure> per testcase, holding every message: readers take only the first (GitHub's
    action-junit-report), count a testcase with two as passed (allure) or reject it (junitparser)."""
    if not messages:
        return
    message = (
        messages[0] if len(messages) == 1 else f"{len(messages)} limits exceeded: " + "; ".join(messages)
    )
    failure = ET.SubElement(case, "failure", message=xml_text(message), type="DeadUnits")
    failure.text = "\n".join(xml_text(m) for m in messages)


def render_junit(report: Report, result: GateResult) -> str:
    model = xml_text(report.model.path)
    cases = []
    model_case = ET.Element("testcase", classname=f"deadrelu.{model}", name="model")
    _fail(model_case, result.model_failures)
    cases.append(model_case)
    for verdict in result.layers:
        case = ET.Element("testcase", classname=f"deadrelu.{model}", name=xml_text(verdict.name))
        limit = "none" if verdict.limit is None else f"{100 * verdict.limit:.1f}%"
        out = ET.SubElement(case, "system-out")
        out.text = f"{xml_text(verdict.op)}: {verdict.dead}/{verdict.units} dead ({100 * verdict.fraction:.1f}%), limit {limit}"
        _fail(case, verdict.failures)
        cases.append(case)
    failures = sum(1 for case in cases if case.find("failure") is not None)
    suites = ET.Element(
        "testsuites", name="deadrelu", tests=str(len(cases)), failures=str(failures), errors="0"
    )
    suite = ET.SubElement(
        suites,
        "testsuite",
        name=f"deadrelu {model}",
        tests=str(len(cases)),
        failures=str(failures),
        errors="0",
        skipped="0",
    )
    properties = ET.SubElement(suite, "properties")
    for key, value in (
        ("model.sha256", xml_text(report.model.sha256)),
        ("data", xml_text(report.data.path)),
        ("samples", str(report.data.samples)),
        ("dead_fraction", f"{result.dead_fraction:.6f}"),
    ):
        ET.SubElement(properties, "property", name=key, value=value)
    for note in result.added:
        ET.SubElement(properties, "property", name="layer.added", value=xml_text(note))
    for note in result.removed:
        ET.SubElement(properties, "property", name="layer.removed", value=xml_text(note))
    suite.extend(cases)
    ET.indent(suites)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(suites, encoding="unicode") + "\n"
