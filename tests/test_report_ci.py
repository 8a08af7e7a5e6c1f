"""Saved reports in CI: newer optional fields, trends over reports, baselines, narrow CI logs.
Ground truth: counts from onnxruntime on the bundled CNN (tests/truth.py), counted here in numpy."""

from __future__ import annotations

import copy
import json

import numpy as np
import onnx
import pytest
from conftest import ROOT
from truth import onnx_relu_io

CNN = ROOT / "sample_models" / "cnn"
RELUS = ["/relu/Relu", "/relu_1/Relu", "/Relu"]


@pytest.fixture(scope="module")
def truth():
    """Per Relu node: units dead over calib.npz, from onnxruntime's own outputs, channel axis 1."""
    x = np.load(CNN / "calib.npz")["input"]
    sites = onnx_relu_io(onnx.load(str(CNN / "model.onnx")), {"input": x}, RELUS)
    dead = {}
    for name, site in sites.items():
        rows = np.moveaxis(site.pre, 1, -1).reshape(-1, site.pre.shape[1])
        dead[name] = int(((rows > 0).sum(axis=0) == 0).sum())
    return dead


@pytest.fixture
def report(cli, tmp_path):
    out = tmp_path / "report.json"
    result = cli("scan", CNN / "model.onnx", "--data", CNN / "calib.npz", "--json", out, "-q")
    assert result.code == 0, result.err
    return json.loads(out.read_text())


def _write(path, data):
    path.write_text(json.dumps(data))
    return path


def test_unknown_optional_fields_still_load(cli, report, truth, tmp_path):
    """A report of a later version may add optional fields anywhere (the schema allows them)."""
    d = copy.deepcopy(report)
    for part in (d, d["model"], d["data"], d["settings"], d["summary"], d["layers"][0]):
        part["x_later_field"] = {"nested": [1, 2]}
    d["training"] = {"step": 5, "first_step": 1, "sampled_steps": 5, "every": 1, "window": 0, "x_later": 1}
    path = _write(tmp_path / "later.json", d)
    total = sum(truth.values())
    units = sum(layer["units"] for layer in report["layers"])
    result = cli("gate", path, "--max-dead-units", total, "-q")
    assert result.code == 0, result.err
    result = cli("gate", path, "--max-dead-units", total - 1, "-q")
    assert result.code == 1 and f"{total} dead units" in result.err
    result = cli("report", path, "--json", "-")
    assert result.code == 0, result.err
    assert result.json()["summary"]["dead_fraction"] == pytest.approx(total / units)


def test_trend_refuses_two_reports_at_one_step(cli, report, tmp_path):
    paths = []
    for step, name in ((100, "a.json"), (200, "b.json"), (200, "other-run.json")):
        d = copy.deepcopy(report)
        d["training"] = {"step": step, "first_step": step, "sampled_steps": 1, "every": 1, "window": 0}
        paths.append(_write(tmp_path / name, d))
    result = cli("trend", *paths)
    assert result.code == 2 and "both at step 200" in result.err
    assert len(result.err.strip().splitlines()) == 1
    assert cli("trend", *paths[:2]).code == 0


def test_reports_scanned_at_other_thresholds_do_not_compare(cli, report, truth, tmp_path):
    other = copy.deepcopy(report)
    other["settings"]["threshold"] = 0.5  # counts made at another threshold: a unit dead there may fire at 0
    old, new = _write(tmp_path / "old_1.json", other), _write(tmp_path / "new_2.json", report)
    result = cli("trend", old, new)
    assert result.code == 2 and "different --threshold (0.5 and 0.0)" in result.err
    result = cli("gate", new, "--baseline", old, "-q")
    assert result.code == 2 and "different --threshold" in result.err
    assert len(result.err.strip().splitlines()) == 1
    result = cli("diff", old, new)  # diff shows it (comparing thresholds can be the point), with a warning
    assert result.code == 0 and "warning: the reports were scanned with different --threshold" in result.out
    assert "warning" not in cli("diff", new, new).out
    # the same settings: compared, and the dead counts are onnxruntime's
    result = cli("gate", new, "--baseline", _write(tmp_path / "same.json", report), "--max-dead-units", 99)
    assert result.code == 0, result.err
    for name, dead in truth.items():
        assert any(
            line.split()[:1] == [name] and line.split()[3] == str(dead) for line in result.out.splitlines()
        )


def test_narrow_ci_log_keeps_layer_names_and_numbers(cli, report, truth, tmp_path, monkeypatch):
    """COLUMNS=60 in a CI log: Rich used to squeeze the Layer column to nothing."""
    monkeypatch.setenv("COLUMNS", "60")
    result = cli("report", _write(tmp_path / "r.json", report))
    assert result.code == 0, result.err
    lines = result.out.splitlines()
    assert max(len(line) for line in lines) <= 60
    header = next(i for i, line in enumerate(lines) if line.startswith("Layer"))
    width = lines[header].index("Op")
    rows = lines[header + 2 : next(i for i, line in enumerate(lines) if line.startswith("Dead units"))]
    assert width >= 8 and "".join(row[:width].strip() for row in rows) == "".join(RELUS)  # folded, all there
    for name, dead in truth.items():
        units = next(layer["units"] for layer in report["layers"] if layer["name"] == name)
        assert f"{100 * dead / units:.1f}%" in result.out


def test_help_shows_the_config_table_name(cli):
    result = cli("scan", "--help")
    assert "[tool.deadrelu]" in result.out


def test_merge_of_shards_is_exact_and_overlap_is_flagged(cli, tmp_path):
    x = np.load(CNN / "calib.npz")["input"]
    parts = []
    for name, rows in (("s0.npz", x[:40]), ("s1.npz", x[40:])):
        np.savez(tmp_path / name, input=rows)
        out = tmp_path / f"{name}.json"
        assert cli("scan", CNN / "model.onnx", "--data", tmp_path / name, "--json", out, "-q").code == 0
        parts.append(out)
    result = cli("merge", *parts, "--json", "-")
    assert result.code == 0 and "warning" not in result.err
    merged = result.json()
    sites = onnx_relu_io(onnx.load(str(CNN / "model.onnx")), {"input": x}, RELUS)
    for layer in merged["layers"]:
        pre = sites[layer["name"]].pre
        rows = np.moveaxis(pre, 1, -1).reshape(-1, pre.shape[1])
        assert layer["positive_counts"] == (rows > 0).sum(axis=0).tolist()
        assert layer["elements_per_unit"] == rows.shape[0]
    # two --limit scans of one file both start at its first sample: 40 samples would count twice
    limited = []
    for n in (40, 60):
        out = tmp_path / f"limit{n}.json"
        args = ("scan", CNN / "model.onnx", "--data", CNN / "calib.npz", "--limit", n, "--json", out, "-q")
        assert cli(*args).code == 0
        limited.append(out)
    # their data fingerprints show it: refused (data42), naming both reports
    result = cli("merge", *limited, "--json", tmp_path / "overlap.json")
    assert result.code == 2 and "40 of the same samples" in result.err
    assert all(str(path) in result.err for path in limited)
    assert not (tmp_path / "overlap.json").exists()


def test_summary_activation_sparsity_weighs_every_counted_value(cli, report):
    """docs/report-schema.md: 1 - Σ positives / Σ (units × elements_per_unit); the CNN's conv layers count
    256 positions per sample, its Linear one 1, so a mean over layers or units differs."""
    x = np.load(CNN / "calib.npz")["input"]
    sites = onnx_relu_io(onnx.load(str(CNN / "model.onnx")), {"input": x}, RELUS)
    positives = values = 0
    for site in sites.values():
        rows = np.moveaxis(site.pre, 1, -1).reshape(-1, site.pre.shape[1])
        positives += int((rows > 0).sum())
        values += rows.size
    assert report["summary"]["activation_sparsity"] == pytest.approx(1 - positives / values, abs=1e-12)


def test_trend_refuses_reports_of_another_model(cli, report, tmp_path):
    """The CNN and the MLP both have a Relu node named /Relu (12 and 8 units): not one trend."""
    mlp = ROOT / "sample_models" / "mlp"
    other = tmp_path / "mlp_2.json"
    assert cli("scan", mlp / "model.onnx", "--data", mlp / "calib.npz", "--json", other, "-q").code == 0
    assert json.loads(other.read_text())["layers"][-1]["name"] == "/Relu"
    result = cli("trend", _write(tmp_path / "cnn_1.json", report), other)
    assert result.code == 2 and "not checkpoints of one model" in result.err
    assert "12 units" in result.err and "but 8" in result.err


def test_junit_one_failure_per_testcase_with_every_message(cli, report, truth, tmp_path):
    """A model over --max-dead and over its baseline: both reasons, in the one <failure> readers see."""
    import xml.etree.ElementTree as ET

    better = copy.deepcopy(report)
    layer = next(la for la in better["layers"] if la["name"] == "/Relu")
    layer["positive_counts"] = [max(c, 1) for c in layer["positive_counts"]]  # the baseline: none dead there
    path, base, junit = tmp_path / "r.json", _write(tmp_path / "base.json", better), tmp_path / "j.xml"
    _write(path, report)
    result = cli("gate", path, "--baseline", base, "--max-dead", 0.1, "--junit", junit, "-q")
    assert result.code == 1
    cases = {case.get("name"): case for case in ET.parse(junit).getroot().iter("testcase")}
    assert all(len(case.findall("failure")) <= 1 for case in cases.values())
    units = sum(la["units"] for la in report["layers"])
    dead = sum(truth.values())
    model = cases["model"].find("failure")
    assert f"({dead}/{units})" in model.get("message") and "dead fraction grew" in model.get("message")
    assert len(model.text.splitlines()) == 2
    relu = cases["/Relu"].find("failure")
    assert f"to {100 * truth['/Relu'] / 12:.1f}%" in relu.get("message")


@pytest.mark.parametrize(
    "command", [("report", "{path}", "--html", "{out}"), ("gate", "{path}", "--max-dead", "1")]
)
def test_hand_edited_duplicate_layer_names_are_an_input_error(cli, report, tmp_path, command):
    """Layers are found by name everywhere; two of one name crashed the HTML page (exit 3)."""
    d = copy.deepcopy(report)
    d["layers"][1]["name"] = d["layers"][0]["name"]
    path = _write(tmp_path / "dup.json", d)
    result = cli(*[part.format(path=path, out=tmp_path / "o.html") for part in command])
    assert result.code == 2 and "layers[1].name" in result.err and "also the name of layers[0]" in result.err
    assert len(result.err.strip().splitlines()) == 1 and not (tmp_path / "o.html").exists()


def test_markdown_names_with_pipes_render_literally(cli, report, truth, tmp_path):
    """`|` is escaped in table cells only: in the heading and the baseline list a backslash would show."""
    from markdown_it import MarkdownIt

    d = copy.deepcopy(report)
    d["model"]["path"] = "exports/a|b.onnx"
    d["layers"][0]["name"] = "/relu|x/Relu"
    del d["layers"][0]["weight"], d["layers"][0]["output_tensor"]  # pairs with nothing in the baseline
    path, md = _write(tmp_path / "r.json", d), tmp_path / "s.md"
    result = cli("gate", path, "--baseline", _write(tmp_path / "base.json", report), "--markdown", md, "-q")
    assert result.code == 1  # one layer on each side unpaired
    html = MarkdownIt("commonmark").enable("table").render(md.read_text())
    assert "<code>exports/a|b.onnx</code>" in html and "\\|" not in html
    assert html.count("<code>/relu|x/Relu</code>") == 2  # its table row and the "added" line
    row = html.split("<code>/relu|x/Relu</code></td>")[1].split("</tr>")[0]
    assert f"<td>{truth['/relu/Relu']}</td>" in row
