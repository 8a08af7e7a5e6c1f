"""The Rich table: every number in it equals the independent numbers of tests/truth.py (plain torch
hooks + numpy); the golden files then pin the layout only, at a fixed console width.

Regenerate the goldens with DEADRELU_UPDATE_GOLDEN=1 pytest tests/test_table.py: the numbers are
asserted against the independent truth before anything is written, so a wrong number is never frozen in.
"""

from __future__ import annotations

import os

import numpy as np
from conftest import ROOT
from rich.console import Console
from truth import (
    assert_layers_table,
    assert_summary_line,
    assert_units_table,
    sample_cnn,
    sample_cnn_truth,
)

from deadrelu_cli import scan
from deadrelu_cli.report.table import print_report

GOLDEN = ROOT / "tests" / "golden"
SAMPLES = ROOT / "sample_models"
CNN = SAMPLES / "cnn"


def _render(layer: str | None = None) -> str:
    report = scan(
        str(CNN / "model.pt"),
        str(CNN / "calib.npz"),
        arch=str(CNN / "arch.py") + ":build",
        device="cpu",
    )
    report.model.path, report.data.path = "model.pt", "calib.npz"
    console = Console(
        width=100, record=True, color_system=None, force_terminal=False, file=open(os.devnull, "w")
    )
    print_report(report, console, layer)
    return console.export_text()


def _truth():
    model = sample_cnn(CNN / "model.pt")
    return model, sample_cnn_truth(model, np.load(CNN / "calib.npz")["input"])


def _check_layout(name: str, text: str) -> None:
    """Called only after the numbers in `text` were asserted independently."""
    path = GOLDEN / name
    if os.environ.get("DEADRELU_UPDATE_GOLDEN"):
        path.write_text(text)
    assert text == path.read_text()


def test_layers_table_numbers_then_golden_layout():
    text = _render()
    _, truths = _truth()
    assert "96 samples" in text
    assert_layers_table(text, truths, {"relu": "relu", "relu#2": "relu", "relu()": "relu"})
    assert_summary_line(text, truths)
    _check_layout("cnn_table.txt", text)


def test_units_table_numbers_then_golden_layout():
    text = _render("relu#2")
    model, truths = _truth()
    assert "relu#2: relu, 16 units on axis 1" in text and "Bias (bn2)" in text
    assert_units_table(text, truths["relu#2"], model.bn2.bias.detach().numpy())
    assert truths["relu#2"].dead == [0, 7, 8, 15]  # planted by scripts/make_sample_models.py
    assert_summary_line(text, truths)
    _check_layout("cnn_relu2_units.txt", text)
