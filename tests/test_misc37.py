"""misc37: merge of reports whose layer lists differ, non-data files in a --data folder, and -q
meaning "only problems and the verdict" on every command. Truth: numpy on the weights and the inputs
the test fed, never the tool's own output."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import torch
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
