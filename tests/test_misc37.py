"""misc37: merge of reports whose layer lists differ, non-data files in a --data folder, and -q
meaning "only problems and the verdict" on every command. Truth: numpy on the weights and the inputs
the test fed, never the tool's own output."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import torch
from conftest import arch_file
from torch import nn


class Branchy(nn.Module):
    """`d` runs only when asked: a training window whose forwards never reach it does not list it."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(4, 6)
        self.d = nn.Linear(6, 3)
        with torch.no_grad():
            self.a.bias[2] = -100.0  # planted dead unit of `a`
            self.d.bias[1] = -100.0  # planted dead unit of `d`

    def forward(self, x, use_d=False):
        h = torch.relu(self.a(x))
        if use_d:
            h = h + torch.relu(self.d(h)).sum(1, keepdim=True)
        return h


def _np_relu_positive(w, b, x):
    return ((x @ w.T + b) > 0).sum(0)


def test_merge_of_windows_where_a_layer_never_ran(cli, tmp_path):
    """Before: `deadrelu merge` refused ("the reports list different layers") training windows where a
    layer ran in some windows only. Now the layer's counts and samples are those of the windows that
    list it, and a note names it; other units under one name, or another model, are still refused."""
    from deadrelu_cli import watch
    from deadrelu_cli.report.model import load_report, report_to_json

    model = Branchy()
    xs = [np.random.default_rng(i).standard_normal((5 + i, 4)).astype(np.float32) for i in range(3)]
    with watch(model, every=1, window=1, out_dir=tmp_path / "w", config=False) as w:
        for step, x in enumerate(xs):
            w.step(step)
            model(torch.from_numpy(x), use_d=step == 1)
    parts = sorted((tmp_path / "w").glob("*.json"))
    assert [len(json.loads(p.read_text())["layers"]) for p in parts] == [1, 2, 1]

    result = cli("merge", *parts, "--json", tmp_path / "all.json")
    assert result.code == 0, result.err
    assert "relu()#2 (in 1 of 3)" in result.err
    merged = json.loads((tmp_path / "all.json").read_text())
    by_name = {layer["name"]: layer for layer in merged["layers"]}
    assert list(by_name) == ["relu()", "relu()#2"]

    # truth: numpy on the weights (no optimizer step: they never changed) and the fed rows
    wa, ba = model.a.weight.detach().numpy(), model.a.bias.detach().numpy()
    wd, bd = model.d.weight.detach().numpy(), model.d.bias.detach().numpy()
    every = np.concatenate(xs)
    assert merged["data"]["samples"] == len(every) == 18
    a = by_name["relu()"]
    assert a["positive_counts"] == _np_relu_positive(wa, ba, every).tolist()
    assert a["elements_per_unit"] == 18 and a.get("samples") is None  # saw every sample
    h = np.maximum(xs[1] @ wa.T + ba, 0)
    d = by_name["relu()#2"]
    assert d["positive_counts"] == _np_relu_positive(wd, bd, h).tolist()  # window 2 alone
    assert d["samples"] == d["elements_per_unit"] == 6  # only window 2's rows, not 18
    truth_d, truth_a = _np_relu_positive(wd, bd, h), _np_relu_positive(wa, ba, every)
    assert d["dead_indices"] == np.flatnonzero(truth_d == 0).tolist() and 1 in d["dead_indices"]
    assert a["dead_indices"] == np.flatnonzero(truth_a == 0).tolist() and 2 in a["dead_indices"]
    assert any("relu()#2 (in 1 of 3)" in note for note in merged["notes"])
    table = cli("report", tmp_path / "all.json")
    assert "Samples" in table.out

    # the same layer name with other units: one line, exit 2
    other = load_report(parts[1])
    two = other.layers[0]  # relu(), listed by parts[0] too, cut to 2 units
    other.layers[0] = replace(
        two, positive_counts=two.positive_counts[:2], max_preactivation=two.max_preactivation[:2],
        sum_abs=two.sum_abs[:2], bias=two.bias[:2],
    )  # fmt: skip
    (tmp_path / "other.json").write_text(report_to_json(other))
    refused = cli("merge", parts[0], tmp_path / "other.json", "--json", tmp_path / "x.json")
    assert refused.code == 2 and "units" in refused.err and len(refused.err.strip().splitlines()) == 1
    # another model: one line, exit 2
    other = json.loads(parts[1].read_text())
    other["model"]["sha256"] = "0" * 64
    (tmp_path / "model.json").write_text(json.dumps(other))
    refused = cli("merge", parts[0], tmp_path / "model.json", "--json", tmp_path / "x.json")
    assert refused.code == 2 and "different models" in refused.err
    assert len(refused.err.strip().splitlines()) == 1
    assert not (tmp_path / "x.json").exists()


QUIET_ARCH = """
import torch
from torch import nn


def build():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3), nn.ReLU())  # ReLU on the output
    with torch.no_grad():
        net[0].bias[[1, 6]] = -100.0  # planted dead units
    return net
"""


def test_quiet_prints_only_problems_and_the_verdict(cli, tmp_path):
    """Before: `scan -q` only hid the progress bar (drawn on terminals alone: in CI it did nothing) and
    printed the whole table; `gate -q` hid the table and with it the report's warnings. Now -q on both
    prints the problems and the verdict (without limits: the summary line), never the table, and
    `--no-progress` is what `scan -q` was."""
    net, spec = arch_file(tmp_path / "arch.py", QUIET_ARCH)
    torch.save(net.state_dict(), tmp_path / "model.pt")
    x = np.random.default_rng(0).standard_normal((20, 4)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    # truth: numpy on the weights
    w0, b0 = net[0].weight.detach().numpy(), net[0].bias.detach().numpy()
    h = np.maximum(x @ w0.T + b0, 0)
    w2, b2 = net[2].weight.detach().numpy(), net[2].bias.detach().numpy()
    dead = int((_np_relu_positive(w0, b0, x) == 0).sum() + (_np_relu_positive(w2, b2, h) == 0).sum())
    assert dead >= 2
    scan = ("scan", tmp_path / "model.pt", "--arch", spec, "--data", tmp_path / "x.npy")

    full = cli(*scan, "--no-progress")
    assert full.code == 0 and "Dead %" in full.out and "relu-on-output" in full.out

    quiet = cli(*scan, "-q")
    assert quiet.code == 0 and quiet.err.strip().splitlines()[0].startswith("warning: relu-on-output")
    assert len(quiet.err.strip().splitlines()) == 1
    # no table: only the verdict of a scan without limits, its summary line (on stdout, as the table was)
    assert quiet.out.strip().splitlines() == [quiet.out.strip()]
    assert quiet.out.startswith(f"Dead units: {dead}/11 ")

    failed = cli(*scan, "-q", "--max-dead-units", dead - 1, "--json", tmp_path / "r.json")
    assert failed.code == 1 and failed.out == ""
    assert "warning: relu-on-output" in failed.err and "above the limit" in failed.err
    assert "Dead units" not in failed.err and "Dead %" not in failed.err  # the gate's lines are the verdict
    assert json.loads((tmp_path / "r.json").read_text())["summary"]["dead"] == dead

    gate = cli("gate", tmp_path / "r.json", "--max-dead-units", dead, "-q")
    assert gate.code == 0 and gate.out == ""
    assert gate.err.strip().splitlines() == [gate.err.strip().splitlines()[0], "gate passed"]
    assert gate.err.startswith("warning: relu-on-output")  # before: hidden with the table


class _Obj:  # a pickled object in a training checkpoint (an argparse Namespace, a config class)
    def __reduce__(self):
        return (print, ("unpickled",))


def test_data_folder_leaves_out_checkpoints_and_says_what_it_read(cli, tmp_path):
    """Before: `--data RUN/` of a training run folder refused its `optimizer.pt` ("entry 'state' is a
    dict, expected a tensor"), though other non-data files of a folder are ignored. Now a folder leaves
    out data-suffix files that hold no arrays of samples (an optimizer state, a checkpoint of nested
    entries or pickled objects, never unpickled; another model's weights) and a note names what was read
    and what was left out; counts are those of the data files alone. Named on its own, such a file is
    refused, one line saying what it is."""
    net, spec = arch_file(tmp_path / "arch.py", QUIET_ARCH)
    run = tmp_path / "run"
    run.mkdir()
    torch.save(net.state_dict(), run / "model.pt")
    optimizer = torch.optim.Adam(net.parameters())
    net(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    torch.save(optimizer.state_dict(), run / "optimizer.pt")
    torch.save({"epoch": 3, "model": net.state_dict()}, run / "last.pt")
    torch.save({"args": _Obj(), "step": 7}, run / "trainer_state.pt")
    torch.save(nn.Linear(4, 8).state_dict(), run / "ema.pth")
    (run / "config.json").write_text("{}")
    rng = np.random.default_rng(1)
    parts = [rng.standard_normal((n, 4)).astype(np.float32) for n in (7, 5)]
    np.save(run / "calib-0.npy", parts[0])
    torch.save(torch.from_numpy(parts[1]), run / "calib-1.pt")
    # truth: numpy on the weights over the data files' rows
    x = np.concatenate(parts)
    w0, b0 = net[0].weight.detach().numpy(), net[0].bias.detach().numpy()
    first = _np_relu_positive(w0, b0, x)

    result = cli("scan", run / "model.pt", "--arch", spec, "--data", run, "--json", tmp_path / "r.json")
    assert result.code == 0, result.err
    assert "unpickled" not in result.out + result.err  # never unpickled
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["data"]["samples"] == 12
    assert report["layers"][0]["positive_counts"] == first.tolist()
    note = next(n for n in report["notes"] if n.startswith(f"--data {run}:"))
    assert "read 2 data file(s): calib-0.npy; calib-1.pt" in note
    for left in (
        "optimizer.pt (an optimizer state",
        "last.pt (a checkpoint of nested entries (model)",
        "trainer_state.pt (refused to unpickle",
        "ema.pth (a model's weights",
        "model.pt (the model being scanned)",
    ):
        assert left in note, note
    assert "1 other file(s) of no data format ignored" in note
    assert note in result.out  # shown with the table

    named = cli("scan", run / "model.pt", "--arch", spec, "--data", run / "optimizer.pt")
    assert named.code == 2 and len(named.err.strip().splitlines()) == 1
    assert "an optimizer state (state, param_groups), not calibration data" in named.err
    empty = tmp_path / "only-checkpoints"
    empty.mkdir()
    (empty / "optimizer.pt").write_bytes((run / "optimizer.pt").read_bytes())
    refused = cli("scan", run / "model.pt", "--arch", spec, "--data", empty)
    assert refused.code == 2 and "left out: optimizer.pt (an optimizer state" in refused.err
