"""The HTML report: its numbers against independent ones (plain torch hooks + numpy), its structure,\noffline, and a real render in headless Chromium."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
from html.parser import HTMLParser

import numpy as np
import pytest
from conftest import ROOT
from truth import close_to_printed, layer_row_cells, sample_cnn, sample_cnn_truth

CNN = ROOT / "sample_models" / "cnn"


class _Collect(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.rows: dict[str, list[str]] = {}
        self.urls: list[str] = []
        self.ids: list[str] = []
        self.sections: list[str] = []
        self._row: str | None = None
        self._cells: list[str] = []
        self._in_cell = False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        for key in ("src", "href"):
            if attrs.get(key) and not attrs[key].startswith("#"):
                self.urls.append(attrs[key])
        if tag == "section":
            self.sections.append(attrs.get("id", ""))
        if "id" in attrs:
            self.ids.append(attrs["id"])
        if tag == "tr" and "data-layer" in attrs:
            self._row, self._cells = attrs["data-layer"], []
        if tag == "td" and self._row is not None:
            self._in_cell = True
            self._cells.append("")

    def handle_endtag(self, tag):
        if tag == "td":
            self._in_cell = False
        if tag == "tr" and self._row is not None:
            self.rows[self._row] = self._cells
            self._row = None

    def handle_data(self, data):
        if self._in_cell:
            self._cells[-1] += data


@pytest.fixture
def report_files(cli, tmp_path):
    html_path, json_path = tmp_path / "report.html", tmp_path / "report.json"
    result = cli(
        "scan",
        CNN / "model.pt",
        "--arch",
        str(CNN / "arch.py") + ":build",
        "--data",
        CNN / "calib.npz",
        "--html",
        html_path,
        "--json",
        json_path,
        "--max-dead",
        "0.3",
    )
    assert result.code == 0, result.err
    return html_path, json.loads(json_path.read_text())


class _UnitRows(HTMLParser):
    """The unit rows of each layer's <details data-layer=…> section."""

    def __init__(self) -> None:
        super().__init__()
        self.units: dict[str, list[list[str]]] = {}
        self._layer: str | None = None
        self._cells: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "details" and "data-layer" in attrs:
            self._layer = attrs["data-layer"]
            self.units[self._layer] = []
        if tag == "tr" and self._layer is not None:
            self._cells = []
        if tag == "td" and self._cells is not None:
            self._cells.append("")

    def handle_endtag(self, tag):
        if tag == "tr" and self._cells:
            self.units[self._layer].append(self._cells)
        if tag == "tr":
            self._cells = None
        if tag == "details":
            self._layer = None

    def handle_data(self, data):
        if self._cells:
            self._cells[-1] += data


def _truths():
    """The sample CNN's numbers from plain torch hooks + numpy (tests/truth.py), not from any report."""
    return sample_cnn_truth(sample_cnn(CNN / "model.pt"), np.load(CNN / "calib.npz")["input"])


def test_every_layer_with_its_numbers(report_files):
    """Every number of the HTML's layer table, summary and unit tables against independent numbers."""
    html_path, report = report_files
    truths = _truths()
    parsed = _Collect()
    parsed.feed(html_path.read_text())
    assert list(parsed.rows) == list(truths)
    for name, t in truths.items():
        cells = parsed.rows[name]
        assert cells == layer_row_cells(name, "relu", t), name
    text = html_path.read_text()
    dead, units = sum(len(t.dead) for t in truths.values()), sum(t.units for t in truths.values())
    assert dead == 8 and f"<b>{dead}</b>dead" in text and f"<b>{100 * dead / units:.1f}%</b>dead %" in text
    assert "<b>passed</b>gate" in text
    assert hashlib.sha256((CNN / "model.pt").read_bytes()).hexdigest() in text
    sections = _UnitRows()
    sections.feed(text)
    model = sample_cnn(CNN / "model.pt")
    biases = {
        name: m.bias.detach().numpy()
        for name, m in (("relu", model.bn1), ("relu#2", model.bn2), ("relu()", model.fc))
    }
    for name, t in truths.items():
        listed = sorted(set(t.dead) | set(t.dying) | set(t.dormant) | set(t.saturated or []))
        rows = sections.units[name]
        assert [int(row[0]) for row in rows] == listed, name  # the units that are not plainly alive
        for row in rows:
            i = int(row[0])
            status = "DEAD" if i in t.dead else "dying" if i in t.dying else "dormant"
            assert row[5] == status and row[2] == f"{100 * t.active_rate[i]:.2f}%", (name, row)
            assert close_to_printed(row[1], float(biases[name][i])), (name, row)
            assert close_to_printed(row[3], float(t.max_pre[i])), (name, row)
            assert close_to_printed(row[4], float(t.mean_abs[i])), (name, row)


def test_self_contained_and_sections(report_files):
    html_path, _ = report_files
    text = html_path.read_text()
    parsed = _Collect()
    parsed.feed(text)
    assert parsed.urls == []  # no CDN, no fonts, no images from anywhere
    assert not re.search(r"https?://(?!www\.w3\.org/)", text)  # only SVG namespace URIs
    # golden structure: the sections a reader relies on, in order
    assert parsed.sections == ["summary", "by-layer", "layers", "layers-detail"]
    assert text.count("<svg") == 1 + 3  # the overview chart and one figure per layer
    assert len(text) < 3_000_000


def test_report_command_with_baseline(cli, report_files, tmp_path):
    _, report = report_files
    worse = json.loads(json.dumps(report))
    worse["layers"][0]["positive_counts"][0] = 0
    (tmp_path / "new.json").write_text(json.dumps(worse))
    (tmp_path / "old.json").write_text(json.dumps(report))
    out = tmp_path / "compare.html"
    result = cli("report", tmp_path / "new.json", "--baseline", tmp_path / "old.json", "--html", out)
    assert result.code == 0, result.err
    text = out.read_text()
    assert "Baseline dead %" in text and "baseline dead %" in text
    truths = _truths()
    dead, units = sum(len(t.dead) for t in truths.values()), sum(t.units for t in truths.values())
    assert truths["relu"].positive_counts[0] > 0  # unit 0 of relu is alive: zeroing its count adds one
    assert f"{100 * dead / units:.1f}% → {100 * (dead + 1) / units:.1f}%" in text  # 22.2% → 25.0%


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.mark.slow
def test_renders_in_headless_chromium(report_files, tmp_path):
    browser = _chromium()
    if browser is None:
        pytest.skip(
            "no Chromium on this machine: install Debian's `chromium` package (apt-get install -y chromium) to run the browser test"
        )
    html_path, report = report_files
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={tmp_path / 'profile'}",
    ]
    dom = subprocess.run(
        [browser, *flags, "--dump-dom", html_path.as_uri()], capture_output=True, text=True, timeout=120
    )
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert 'id="layer-table"' in dom.stdout
    for layer in report["layers"]:
        assert f'data-layer="{layer["name"]}"' in dom.stdout
    shot = tmp_path / "shot.png"
    subprocess.run(
        [browser, *flags, f"--screenshot={shot}", "--window-size=1000,1400", html_path.as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert shot.exists() and shot.stat().st_size > 10_000
    from matplotlib.image import imread

    pixels = imread(str(shot))
    assert pixels.std() > 0.05  # not a blank page
