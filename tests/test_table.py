"""Golden test of the Rich table at a fixed console width (regenerate: DEADRELU_UPDATE_GOLDEN=1 pytest tests/test_table.py)."""

from __future__ import annotations

import os

from conftest import ROOT
from rich.console import Console

from deadrelu_cli import scan
from deadrelu_cli.report.table import print_report

GOLDEN = ROOT / "tests" / "golden"
SAMPLES = ROOT / "sample_models"


def _render(layer: str | None = None) -> str:
    report = scan(
        str(SAMPLES / "cnn" / "model.pt"),
        str(SAMPLES / "cnn" / "calib.npz"),
        arch=str(SAMPLES / "cnn" / "arch.py") + ":build",
        device="cpu",
    )
    report.model.path, report.data.path = "model.pt", "calib.npz"
    console = Console(
        width=100, record=True, color_system=None, force_terminal=False, file=open(os.devnull, "w")
    )
    print_report(report, console, layer)
    return console.export_text()


def _check(name: str, text: str) -> None:
    path = GOLDEN / name
    if os.environ.get("DEADRELU_UPDATE_GOLDEN"):
        path.write_text(text)
    assert text == path.read_text()


def test_layers_table_golden():
    _check("cnn_table.txt", _render())


def test_units_table_golden():
    _check("cnn_relu2_units.txt", _render("relu#2"))
