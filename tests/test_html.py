"""The HTML report: structure and numbers against the JSON, offline, and a real render in headless Chromium."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from html.parser import HTMLParser

import pytest
from conftest import ROOT

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


def test_every_layer_with_its_numbers(report_files):
    html_path, report = report_files
    parsed = _Collect()
    parsed.feed(html_path.read_text())
    assert set(parsed.rows) == {layer["name"] for layer in report["layers"]}
    for layer in report["layers"]:
        cells = parsed.rows[layer["name"]]
        assert cells[0] == layer["name"] and cells[1] == layer["op"]
        assert int(cells[2]) == layer["units"] and int(cells[3]) == layer["dead"]
        assert cells[4] == f"{100 * layer['dead'] / layer['units']:.1f}%"
    text = html_path.read_text()
    summary = report["summary"]
    assert (
        f"<b>{summary['dead']}</b>dead" in text
        and f"<b>{100 * summary['dead_fraction']:.1f}%</b>dead %" in text
    )
    assert "<b>passed</b>gate" in text
    assert report["model"]["sha256"] in text


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
    assert (
        f"{100 * report['summary']['dead_fraction']:.1f}% → {100 * (report['summary']['dead'] + 1) / report['summary']['units']:.1f}%"
        in text
    )


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
