"""The commands that docs/ci.md tells CI jobs to run, executed on the bundled CNN sample."""

from __future__ import annotations

import json
import shlex
import shutil
import xml.etree.ElementTree as ET

from conftest import ROOT

DOC = ROOT / "docs" / "ci.md"


def _doc_commands() -> list[str]:
    commands = []
    for line in DOC.read_text().splitlines():
        text = line.strip().removeprefix("- ").removeprefix("run: ").strip()
        if text.startswith("deadrelu scan") or text.startswith("deadrelu gate"):
            commands.append(text)
    return commands


def test_doc_has_the_commands():
    commands = _doc_commands()
    assert sum("--baseline main.json" in c for c in commands) == 3  # shell, GitHub and GitLab
    assert len(set(c for c in commands if "--baseline" in c)) == 1  # the jobs run the same command


def test_doc_commands_run(cli, tmp_path, monkeypatch):
    sample = ROOT / "sample_models" / "cnn"
    shutil.copy(sample / "model.onnx", tmp_path / "model.onnx")
    shutil.copy(sample / "calib.npz", tmp_path / "calib.npz")
    monkeypatch.chdir(tmp_path)
    assert (
        cli("scan", "model.onnx", "--data", "calib.npz", "--json", "main.json").code == 0
    )  # the main branch's report
    for command in dict.fromkeys(_doc_commands()):
        args = shlex.split(command)[1:]
        result = cli(*args)
        assert result.code == 0, (command, result.err)
    assert ET.parse(tmp_path / "deadrelu.xml").getroot().get("failures") == "0"
    assert "| `/relu/Relu` | relu | 8 | 2 |" in (tmp_path / "deadrelu.md").read_text()
    assert json.loads((tmp_path / "report.json").read_text())["model"]["format"] == "onnx"
