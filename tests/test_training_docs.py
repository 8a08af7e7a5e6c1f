"""docs/training.md, executed: its plain-loop, Lightning and Trainer examples and its shell commands."""

from __future__ import annotations

import json
import re
import shlex

import numpy as np
import pytest
from conftest import ROOT

DOC = ROOT / "docs" / "training.md"


def _blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", DOC.read_text(), flags=re.S)


def test_examples_run_as_written(cli, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    plain, lightning, trainer = _blocks("python")
    assert "from deadrelu_cli import watch" in plain
    assert "DeadReluCallback" in lightning and "lightning" in lightning
    assert "DeadReluCallback" in trainer and "transformers" in trainer

    scope: dict = {}
    exec(compile(plain, "training.md:plain", "exec"), scope)
    w = scope["w"]
    files = sorted((tmp_path / "reports").iterdir())
    assert [f.name for f in files] == [f"deadrelu-step{s:08d}.json" for s in (10, 30, 50, 70, 90)]
    assert sum(r.summary().dead for r in w.reports) > 0, "the example's learning rate should kill units"
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith("steps 0-10: ") and len(printed) == 5
    # what the page says about them holds: dead sets per window agree with the written reports
    for f, report in zip(files, w.reports, strict=True):
        data = json.loads(f.read_text())
        for layer, saved in zip(report.layers, data["layers"], strict=True):
            assert saved["dead_indices"] == np.flatnonzero(layer.dead_mask()).tolist()

    for line in _blocks("bash")[0].strip().splitlines():
        result = cli(*shlex.split(line)[1:])
        assert result.code == 0, (line, result.err)
    assert (tmp_path / "window.html").is_file()

    pytest.importorskip("lightning", reason="the lightning extra is not installed")
    exec(compile(lightning, "training.md:lightning", "exec"), {})
    written = sorted((tmp_path / "lightning_run").rglob("deadrelu-step*.json"))
    assert [f.name for f in written] == [f"deadrelu-step{s:08d}.json" for s in (0, 5, 10, 15)]
    assert written[0].parent.parent.name == "checkpoints"
    header = (tmp_path / "lightning_run" / "lightning_logs" / "version_0" / "metrics.csv").read_text()
    assert "deadrelu/dead_fraction/1" in header.splitlines()[0]  # the trainer's default (CSV) logger got them

    pytest.importorskip("transformers", reason="the transformers extra is not installed")
    scope = {}
    exec(compile(trainer, "training.md:trainer", "exec"), scope)
    history = [h for h in scope["trainer"].state.log_history if "deadrelu/dead_fraction" in h]
    assert len(history) == 4  # windows at steps 0, 5, 10, 15
    assert len(list((tmp_path / "hf_run" / "deadrelu").iterdir())) == 4
