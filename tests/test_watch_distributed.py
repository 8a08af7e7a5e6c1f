"""watch() under DDP (2 processes, gloo on CPU): each window's counts are those of the union of the ranks'
batches, equal to a single-process reference over all the data (plain hooks + numpy); every rank gets the
same report and decision; rank 0 alone writes."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import torch
import torch.nn.functional as F
from conftest import ROOT
from torch import nn

BUILD = """
class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.act, self.fc2, self.out = nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 5), nn.Linear(5, 1)

    def forward(self, x):
        return self.out(F.relu(self.fc2(self.act(self.fc1(x)))))


def build_model():
    torch.manual_seed(0)
    model = Net()
    with torch.no_grad():
        model.fc1.weight[0] = torch.tensor([1.0, 0.0, 0.0, 0.0])
        model.fc1.bias[0] = -5.0  # fires only where x[:, 0] > 5: on one sample of rank 1's half
        model.fc1.bias[1] = -100.0  # dead everywhere
    return model


def build_data():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(32, 4, generator=g).clamp(-3, 3)
    y = torch.randn(32, 1, generator=g)
    x[20, 0] = 10.0
    return x, y
"""

SCRIPT = """
import json, sys, warnings
import torch, torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from deadrelu_cli import watch
from deadrelu_cli.report.model import report_to_dict
exec(open(sys.argv[2]).read())
dist.init_process_group("gloo")
rank, size = dist.get_rank(), dist.get_world_size()
model = build_model()
x, y = build_data()
mine = slice(rank * len(x) // size, (rank + 1) * len(x) // size)
ddp = DistributedDataParallel(model)
optimizer = torch.optim.SGD(ddp.parameters(), lr=0.0)  # the weights stay: one reference for every window
out = sys.argv[1]
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    w = watch(model, every=2, out_dir=f"{out}/reports{rank}", config=False, max_dead_units=1, stop_on_gate=True)
    for step in range(4):
        w.step()
        loss = F.mse_loss(ddp(x[mine]), y[mine])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    w.close()
result = {
    "reports": [report_to_dict(r) for r in w.reports],
    "should_stop": w.should_stop,
    "warnings": [str(c.message) for c in caught if "deadrelu" in str(c.message)],
}
with open(f"{out}/rank{rank}.json", "w") as f:
    json.dump(result, f)
dist.destroy_process_group()
"""


def _reference(rows: slice):
    """Pre-activations of fc1 and fc2 over `rows` of the data, from plain forward hooks."""
    scope = {"torch": torch, "nn": nn, "F": F}
    exec(BUILD, scope)
    model = scope["build_model"]()
    x, _ = scope["build_data"]()
    seen = {}
    model.fc1.register_forward_hook(lambda _m, _a, out: seen.__setitem__("act", out.detach().numpy()))
    model.fc2.register_forward_hook(lambda _m, _a, out: seen.__setitem__("relu()", out.detach().numpy()))
    with torch.no_grad():
        model(x[rows])
    return seen


def test_ddp_windows_count_the_union_of_the_ranks(tmp_path):
    (tmp_path / "build.py").write_text(BUILD)
    (tmp_path / "train.py").write_text(SCRIPT)
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            str(tmp_path / "train.py"),
            str(tmp_path),
            str(tmp_path / "build.py"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env={**__import__("os").environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"},
    )
    assert run.returncode == 0, run.stderr[-3000:]
    union = _reference(slice(0, 32))
    rank0_only = _reference(slice(0, 16))
    dead_union = sum(int(((pre > 0).sum(axis=0) == 0).sum()) for pre in union.values())
    dead_rank0 = sum(int(((pre > 0).sum(axis=0) == 0).sum()) for pre in rank0_only.values())
    assert dead_union == 1 and dead_rank0 >= 2  # alone, rank 0 would fail the limit of 1 dead unit

    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert results[0]["reports"] == results[1]["reports"]  # the same report on every rank
    reports = results[0]["reports"]
    assert [r["training"]["step"] for r in reports] == [0, 2]
    for report in reports:
        assert report["data"]["samples"] == 32
        assert {layer["name"] for layer in report["layers"]} == set(union)
        for layer in report["layers"]:
            pre = union[layer["name"]]
            assert layer["positive_counts"] == (pre > 0).sum(axis=0).tolist()
            assert layer["elements_per_unit"] == 32
            np.testing.assert_allclose(layer["max_preactivation"], pre.max(axis=0), rtol=1e-6)
    # the decision of the union, on both ranks: no stop, no warning
    assert [r["should_stop"] for r in results] == [False, False]
    assert results[0]["warnings"] == results[1]["warnings"] == []
    assert sorted(p.name for p in (tmp_path / "reports0").iterdir()) == [
        "deadrelu-step00000000.json",
        "deadrelu-step00000002.json",
    ]
    assert not any((tmp_path / "reports1").iterdir())  # rank 1 wrote nothing
