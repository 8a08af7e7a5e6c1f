"""The CI gate: limits, baselines, config files, JUnit/Markdown/GitHub outputs, merge and diff."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET

import numpy as np
import pytest
import torch
from conftest import ROOT

SAMPLES = ROOT / "sample_models"
ARCH = str(SAMPLES / "mlp" / "arch.py") + ":build"
DATA = str(SAMPLES / "mlp" / "calib.npz")


@pytest.fixture
def reports(tmp_path, cli):
    """A baseline report of the MLP sample and one of a copy with 2 more dead units in act1."""
    base = tmp_path / "base.json"
    assert cli("scan", SAMPLES / "mlp" / "model.pt", "--arch", ARCH, "--data", DATA, "--json", base).code == 0
    state = torch.load(SAMPLES / "mlp" / "model.pt", weights_only=True)
    state["fc1.bias"][[0, 1]] = -100.0
    torch.save(state, tmp_path / "worse.pt")
    worse = tmp_path / "worse.json"
    assert cli("scan", tmp_path / "worse.pt", "--arch", ARCH, "--data", DATA, "--json", worse).code == 0
    return base, worse


def _dead(path):
    report = json.loads(path.read_text())
    return {layer["name"]: layer["dead"] for layer in report["layers"]}, report["summary"]


def test_reports_differ_as_planted(reports):
    """The gate's inputs, checked against plain torch hooks + numpy (tests/truth.py)."""
    from truth import capture, truth_of

    base, worse = reports
    x = torch.from_numpy(np.load(DATA)["input"])
    for path, state in ((base, None), (worse, {"fc1.bias": [0, 1]})):
        model = _mlp()
        if state:
            with torch.no_grad():
                model.fc1.bias[state["fc1.bias"]] = -100.0
        sites = capture(model, [x], producers={"relu()": ("fc2", "relu")})
        expected = {name: len(truth_of(site, 1).dead) for name, site in sites.items()}
        assert _dead(path)[0] == expected
    assert _dead(base)[0] == {"act1": 3, "relu()": 3}
    assert _dead(worse)[0]["act1"] == 5


def _mlp():
    import importlib.util

    spec = importlib.util.spec_from_file_location("mlp_arch_for_gate", SAMPLES / "mlp" / "arch.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model = module.build()
    model.load_state_dict(torch.load(SAMPLES / "mlp" / "model.pt", weights_only=True))
    return model.eval()


@pytest.mark.parametrize(
    ("flags", "code", "message"),
    [
        (["--max-dead", "0.2"], 0, "gate passed"),
        (["--max-dead", "0.1"], 1, "model: 15.0% of units are dead (6/40), above the limit 10.0%"),
        (["--max-dead-layer", "0.4"], 0, "gate passed"),
        (["--max-dead-layer", "0.3"], 1, "layer relu(): 37.5% dead (3/8), above the limit 30.0%"),
        (
            ["--layer-limit", "relu*=0.5", "--max-dead-layer", "0.05"],
            1,
            "layer act1: 9.4% dead (3/32), above the limit 5.0%",
        ),
        (["--layer-limit", "relu*=0.5", "--layer-limit", "act*=0.1"], 0, "gate passed"),
        (["--max-dead-units", "6"], 0, "gate passed"),
        (["--max-dead-units", "5"], 1, "model: 6 dead units, above the limit 5"),
    ],
)
def test_gate_limits(cli, reports, flags, code, message):
    base, _ = reports
    result = cli("gate", base, *flags)
    assert result.code == code, result.err
    assert message in result.err


def test_baseline_names_the_layer_that_got_worse(cli, reports):
    base, worse = reports
    result = cli("gate", worse, "--baseline", base)
    assert result.code == 1
    assert "layer act1: dead fraction grew from 9.4% to 15.6% (+6.2 points, allowed +0.0)" in result.err
    assert "model: dead fraction grew from 15.0% to 20.0%" in result.err
    assert cli("gate", worse, "--baseline", base, "--max-increase", "0.1").code == 0
    assert cli("gate", base, "--baseline", base).code == 0
    assert cli("gate", base, "--baseline", worse).code == 0  # fewer dead is fine


def test_scan_with_baseline_and_junit(cli, reports, tmp_path):
    base, _ = reports
    junit = tmp_path / "out.xml"
    result = cli(
        "scan", tmp_path / "worse.pt", "--arch", ARCH, "--data", DATA, "--baseline", base, "--junit", junit
    )
    assert result.code == 1
    root = ET.parse(junit).getroot()
    assert root.tag == "testsuites" and root.get("failures") == "2"
    cases = {case.get("name"): case for case in root.iter("testcase")}
    assert set(cases) == {"model", "act1", "relu()"}
    assert cases["act1"].find("failure") is not None and cases["relu()"].find("failure") is None
    assert "grew from 9.4% to 15.6%" in cases["act1"].find("failure").get("message")


def test_renamed_layers_are_listed(cli, reports, tmp_path):
    base, _ = reports
    report = json.loads(base.read_text())
    report["layers"][0]["name"] = "old_name"
    renamed = tmp_path / "renamed.json"
    renamed.write_text(json.dumps(report))
    result = cli("gate", base, "--baseline", renamed)
    assert "warning: layer act1 is not in the baseline" in result.err
    assert "warning: baseline layer old_name is not in this report" in result.err
    # a layer left unpaired on each side was not compared with anything: the gate fails, loudly
    assert result.code == 1
    (reason,) = [line for line in result.err.splitlines() if "could not be paired" in line]
    assert "act1" in reason and "old_name" in reason and "--allow-unpaired" in reason
    assert cli("gate", base, "--baseline", renamed, "--allow-unpaired").code == 0
    # a layer only added (nothing of the baseline unpaired) is a warning, not a failure
    del report["layers"][0]
    fewer = tmp_path / "fewer.json"
    fewer.write_text(json.dumps(report))
    added = cli("gate", base, "--baseline", fewer)
    assert added.code == 0 and "warning: layer act1 is not in the baseline" in added.err


def test_json_stdout_stays_pure_with_gate_and_github(cli, reports, tmp_path, monkeypatch):
    base, _ = reports
    summary = tmp_path / "summary.md"
    summary.write_text("earlier step\n")
    monkeypatch.setenv("GITHUB_ACTIONS", "true")
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    result = cli(
        "scan",
        SAMPLES / "mlp" / "model.pt",
        "--arch",
        ARCH,
        "--data",
        DATA,
        "--json",
        "-",
        "--max-dead",
        "0.1",
    )
    assert result.code == 1
    assert json.loads(result.out)["summary"]["dead"] == 6  # nothing but JSON on stdout
    assert "::error title=deadrelu" in result.err and "15.0% of units are dead" in result.err
    text = summary.read_text()
    assert (
        text.startswith("earlier step\n")
        and "| `relu()` | relu | 8 | 3 | 37.5% |" in text
        and "❌" not in text.split("**Failures**")[0].split("`act1`")[0]
    )


def test_markdown_file(cli, reports, tmp_path):
    base, worse = reports
    md = tmp_path / "gate.md"
    assert cli("gate", worse, "--baseline", base, "--markdown", md).code == 1
    text = md.read_text()
    assert "| Layer | Op | Units | Dead | Dead % | Baseline % | Limit | Status |" in text
    assert "| `act1` | relu | 32 | 5 | 15.6% | 9.4% | – | ❌ |" in text


def test_config_in_pyproject_and_flag_override(cli, reports, tmp_path, monkeypatch):
    base, _ = reports
    project = tmp_path / "proj"
    (project / "sub").mkdir(parents=True)
    (project / "pyproject.toml").write_text(
        '[tool.deadrelu]\nmax-dead = 0.1\nlayer-limits = {"relu*" = 0.3}\n'
    )
    monkeypatch.chdir(project / "sub")  # nearest pyproject.toml upwards
    result = cli("gate", base)
    assert result.code == 1
    assert (
        "above the limit 10.0%" in result.err
        and "layer relu(): 37.5% dead (3/8), above the limit 30.0%" in result.err
    )
    result = cli("gate", base, "--max-dead", "0.5", "--layer-limit", "relu*=0.5")
    assert result.code == 0, result.err
    shown = cli("gate", base, "--max-dead", "0.5", "--show-config")
    assert shown.code == 0
    assert "command line" in shown.out and "../pyproject.toml" in shown.out


def test_deadrelu_toml_and_bad_keys(cli, reports, tmp_path, monkeypatch):
    base, _ = reports
    monkeypatch.chdir(tmp_path)
    (tmp_path / "deadrelu.toml").write_text("max-dead-units = 2\n")
    assert cli("gate", base).code == 1
    (tmp_path / "deadrelu.toml").write_text("max_dead = 0.1\n")
    result = cli("gate", base)
    assert (
        result.code == 2 and "unknown key 'max_dead'" in result.err and "did you mean max-dead?" in result.err
    )


def test_scan_config_sets_batch_size(cli, tmp_path, monkeypatch):
    (tmp_path / "pyproject.toml").write_text("[tool.deadrelu]\nbatch-size = 7\ndevice = 'cpu'\n")
    monkeypatch.chdir(tmp_path)
    shown = cli("scan", "--show-config")
    assert shown.code == 0
    line = next(line for line in shown.out.splitlines() if "--batch-size" in line)
    assert "7" in line and "pyproject.toml" in shown.out


@pytest.mark.parametrize("command", ["scan", "gate"])
def test_show_config_names_only_flags_the_command_takes(cli, reports, tmp_path, monkeypatch, command):
    """Every setting --show-config lists is an option of that command as a user types it (--json, not
    the parameter's name --json-out)."""
    import re

    monkeypatch.chdir(tmp_path)
    args = [reports[0]] if command == "gate" else []
    shown = cli(command, *args, "--show-config")
    assert shown.code == 0, shown.err
    listed = [line.split()[0] for line in shown.out.splitlines() if line.startswith("--")]
    assert len(listed) > 5
    import os
    import subprocess
    import sys

    from conftest import ROOT

    # --help in its own process: Typer's help console may hold a stdout captured by an earlier test
    help_text = subprocess.run(
        [sys.executable, "-m", "deadrelu_cli", command, "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200"},
    ).stdout
    offered = set(re.findall(r"--[a-z][a-z0-9-]*", help_text))
    assert set(listed) <= offered, sorted(set(listed) - offered)


def test_a_bad_value_from_the_config_file_names_the_file(cli, reports, tmp_path, monkeypatch):
    """The user never typed --max-dead: the error names the key and the file it came from."""
    (tmp_path / "pyproject.toml").write_text("[tool.deadrelu]\nmax-dead = 1.5\n")
    monkeypatch.chdir(tmp_path)
    result = cli("gate", reports[0])
    assert result.code == 2 and len(result.err.strip().splitlines()) == 1
    assert "max-dead = 1.5 in pyproject.toml [tool.deadrelu]" in result.err, result.err
    typed = cli("gate", reports[0], "--max-dead", "2")  # typed: Typer's own message about the flag
    assert typed.code == 2 and "--max-dead" in typed.err


def test_gate_without_limits_is_usage_error(cli, reports, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = cli("gate", reports[0])
    assert result.code == 2 and "no gate limit given" in result.err


def test_gate_bad_report(cli, tmp_path):
    (tmp_path / "x.json").write_text("{not json")
    result = cli("gate", tmp_path / "x.json", "--max-dead", "0.1")
    assert result.code == 2 and "not valid JSON" in result.err
    (tmp_path / "y.json").write_text('{"schema_version": 9}')
    result = cli("gate", tmp_path / "y.json", "--max-dead", "0.1")
    assert result.code == 2 and "schema version 1" in result.err


def test_merge_of_halves_equals_full_scan(cli, tmp_path):
    """Consistency (merge is exact): merging the reports of two halves gives the full scan's report."""
    x = np.load(DATA)["input"]
    np.savez(tmp_path / "a.npz", input=x[:200])
    np.savez(tmp_path / "b.npz", input=x[200:])
    model = SAMPLES / "mlp" / "model.pt"
    for name in ("a", "b"):
        assert (
            cli(
                "scan",
                model,
                "--arch",
                ARCH,
                "--data",
                tmp_path / f"{name}.npz",
                "--json",
                tmp_path / f"{name}.json",
            ).code
            == 0
        )
    assert cli("scan", model, "--arch", ARCH, "--data", DATA, "--json", tmp_path / "full.json").code == 0
    assert (
        cli("merge", tmp_path / "a.json", tmp_path / "b.json", "--json", tmp_path / "merged.json").code == 0
    )
    merged, full = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("merged", "full"))
    assert merged["data"]["samples"] == full["data"]["samples"] == 512
    assert merged["summary"] == full["summary"]
    for a, b in zip(merged["layers"], full["layers"], strict=True):
        for key in (
            "dead_indices",
            "positive_counts",
            "elements_per_unit",
            "max_preactivation",
            "dying_indices",
        ):
            assert a[key] == b[key], key
        np.testing.assert_allclose(a["sum_abs"], b["sum_abs"], rtol=1e-6)


def test_merge_refuses_different_models(cli, reports):
    base, worse = reports
    result = cli("merge", base, worse)
    assert result.code == 2 and "different models" in result.err


def test_diff(cli, reports):
    base, worse = reports
    result = cli("diff", base, worse)
    assert result.code == 0
    row = next(line for line in result.out.splitlines() if "act1" in line)
    assert "3/32" in row and "5/32" in row and "+2" in row
    assert "relu()" not in result.out.split("Dead units")[0]  # unchanged layers hidden by default
    assert "Dead units: 6/40 (15.0%) → 8/40 (20.0%), 1 layers changed" in result.out


def test_diff_shows_a_pruned_layer_as_resized(cli, reports, tmp_path):
    """After `fix --strategy prune` a layer keeps its name with fewer units: the diff row says both
    widths and dead counts (before, such a row read "added" and the old layer vanished)."""

    base, _ = reports
    pruned = tmp_path / "pruned.pt2"
    fix = ["fix", SAMPLES / "mlp" / "model.pt", "--arch", ARCH, "--data", DATA, "--strategy", "prune"]
    assert cli(*fix, "--output", pruned).code == 0
    after = tmp_path / "pruned.json"
    assert cli("scan", pruned, "--data", DATA, "--json", after).code == 0
    x = np.load(DATA)["input"].astype(np.float64)
    old_state = torch.load(SAMPLES / "mlp" / "model.pt", weights_only=True)
    new_state = torch.export.load(str(pruned)).state_dict
    widths, dead = {}, {}
    for name, state in (("old", old_state), ("new", new_state)):
        w = {k: v.detach().double().numpy() for k, v in state.items()}
        act1 = np.maximum(x @ w["fc1.weight"].T + w["fc1.bias"], 0)  # the MLP's forward, in numpy
        relu2 = np.maximum(act1 @ w["fc2.weight"].T + w["fc2.bias"], 0)
        widths[name] = {"act1": act1.shape[1], "relu()": relu2.shape[1]}
        dead[name] = {"act1": int((act1.max(0) <= 0).sum()), "relu()": int((relu2.max(0) <= 0).sum())}
    result = cli("diff", base, after)
    assert result.code == 0
    for site in ("act1", "relu()"):
        old_units, new_units = widths["old"][site], widths["new"][site]
        assert new_units < old_units  # the fix pruned this layer
        row = next(line for line in result.out.splitlines() if line.startswith(site))
        assert f"{dead['old'][site]}/{old_units} " in row and f"{dead['new'][site]}/{new_units} " in row
        assert f"{old_units}→{new_units} units" in row
        assert "added" not in row
    assert "removed" not in result.out


def test_bad_limits_are_refused_before_the_report_is_printed(cli, reports):
    result = cli("gate", reports[0], "--layer-limit", "relu*")
    assert result.code == 2 and "GLOB=FRACTION" in result.err
    assert result.out == ""  # no table first: the usage error is the whole answer
