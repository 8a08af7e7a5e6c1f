"""data42: NaN/Inf under --allow-nonfinite in every format, the model hash of ONNX external data,
merge's data fingerprint (overlapping scans refused, identical statistics of disjoint data merged).
Truth from numpy, onnxruntime and hashlib in the test."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import onnx
import pytest
import torch
from onnx_graphs import gemm_relu
from test_distributed import one_rank_world  # noqa: F401 - a fixture


def test_onnx_external_data_is_in_the_model_hash(tmp_path, cli):
    """Changing the weights file of an ONNX model saved with external data changes the report's hash;
    a self-contained model's hash stays the sha256 of its file."""
    folder = tmp_path / "ext"
    folder.mkdir()
    onnx.save(gemm_relu(), folder / "m.onnx", save_as_external_data=True, location="m.data", size_threshold=0)
    onnx.save(gemm_relu(), tmp_path / "plain.onnx")
    np.savez(tmp_path / "x.npz", x=np.ones((4, 4), np.float32))

    def sha(model) -> str:
        result = cli("scan", model, "--data", tmp_path / "x.npz", "--json", "-", "-q")
        assert result.code == 0, result.err
        return result.json()["model"]["sha256"]

    before = sha(folder / "m.onnx")
    data = bytearray((folder / "m.data").read_bytes())
    data[0] ^= 1  # the first weight, one bit
    (folder / "m.data").write_bytes(bytes(data))
    after = sha(folder / "m.onnx")
    assert before != after
    assert after != hashlib.sha256((folder / "m.onnx").read_bytes()).hexdigest()
    assert sha(tmp_path / "plain.onnx") == hashlib.sha256((tmp_path / "plain.onnx").read_bytes()).hexdigest()


def _constant_model(path):
    """y = Relu(0·x + b), b = [1, -1, 2]: the same statistics whatever the input."""
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [
            helper.make_node("Mul", ["x", "zero"], ["z"]),
            helper.make_node("Add", ["z", "b"], ["h"]),
            helper.make_node("Relu", ["h"], ["y"], name="relu"),
        ],
        "constant",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 3])],
        [
            numpy_helper.from_array(np.zeros(3, np.float32), "zero"),
            numpy_helper.from_array(np.array([1, -1, 2], np.float32), "b"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


def test_merge_refuses_overlapping_scans_and_merges_identical_statistics_of_disjoint_data(tmp_path, cli):
    model = _constant_model(tmp_path / "c.onnx")
    x = np.random.default_rng(3).standard_normal((12, 3)).astype(np.float32)
    np.savez(tmp_path / "all.npz", x=x)
    np.savez(tmp_path / "s1.npz", x=x[:6])
    np.savez(tmp_path / "s2.npz", x=x[6:])

    def scan(data, name, *flags):
        result = cli("scan", model, "--data", tmp_path / data, "--json", tmp_path / name, "-q", *flags)
        assert result.code == 0, result.err

    # two disjoint shards, same statistics (the model ignores its input): merged, counts add up
    scan("s1.npz", "s1.json")
    scan("s2.npz", "s2.json")
    merged = cli("merge", tmp_path / "s1.json", tmp_path / "s2.json", "--json", "-", "-q")
    assert merged.code == 0, merged.err
    layer = merged.json()["layers"][0]
    assert layer["positive_counts"] == [12, 0, 12] and merged.json()["data"]["samples"] == 12
    assert layer["sum_abs"] == [12.0, 0.0, 24.0]
    assert not any("fingerprint" in note for note in merged.json()["notes"])

    # overlapping scans of one file: --limit 4 and --limit 8; the same samples in other batch sizes
    scan("all.npz", "l4.json", "--limit", "4")
    scan("all.npz", "l8.json", "--limit", "8", "--batch-size", "3")
    scan("all.npz", "b5.json", "--batch-size", "5")
    for a, b, shared in (("l4.json", "l8.json", 4), ("b5.json", "l8.json", 8), ("s2.json", "b5.json", 6)):
        out = tmp_path / "merged.json"
        refused = cli("merge", tmp_path / a, tmp_path / b, "--json", out)
        assert refused.code == 2 and len(refused.err.strip().splitlines()) == 1, refused.err
        assert f"{shared} of the same samples" in refused.err
        assert str(tmp_path / a) in refused.err and str(tmp_path / b) in refused.err
        assert not out.exists()


def test_reports_without_fingerprint_keep_the_statistics_check_with_a_note(tmp_path, cli):
    model = _constant_model(tmp_path / "c.onnx")
    x = np.random.default_rng(4).standard_normal((8, 3)).astype(np.float32)
    np.savez(tmp_path / "s1.npz", x=x[:4])
    np.savez(tmp_path / "s2.npz", x=x[4:])
    for name in ("s1", "s2"):
        assert (
            cli("scan", model, "--data", tmp_path / f"{name}.npz", "--json", tmp_path / f"{name}.json").code
            == 0
        )
        d = json.loads((tmp_path / f"{name}.json").read_text())
        del d["data"]["fingerprint"]  # as an older deadrelu wrote it
        (tmp_path / f"{name}.json").write_text(json.dumps(d))
    refused = cli("merge", tmp_path / "s1.json", tmp_path / "s2.json")
    assert refused.code == 2 and "no data fingerprint" in refused.err


def test_the_fingerprint_ignores_batches_and_order_and_merges_as_the_union():
    from deadrelu_cli.report.fingerprint import SKETCH_SIZE, SampleSketch, shared_samples, union_sketch

    rng = np.random.default_rng(5)
    x = rng.standard_normal((1500, 2)).astype(np.float32)
    ids = rng.integers(0, 9, (1500, 3))
    wide = rng.standard_normal((1500, 20)).astype(np.float32)  # 80-byte rows: the sha256 digest

    def sketch(rows, size):
        s = SampleSketch()
        for start in range(0, len(rows), size):
            part = rows[start : start + size]
            s.add({"x": x[part], "ids": ids[part], "wide": wide[part]})
        return s

    order = rng.permutation(1500)
    whole, shuffled = sketch(np.arange(1500), 1500), sketch(order, 7)
    assert whole.digests.tolist() == shuffled.digests.tolist() and not whole.complete
    assert len(whole.digests) == SKETCH_SIZE
    first, second = sketch(np.arange(700), 64), sketch(np.arange(700, 1500), 100)
    assert shared_samples(first, second) == 0
    assert union_sketch([first, second]).digests.tolist() == whole.digests.tolist()
    # half of the samples in both: the sketches show it
    assert shared_samples(sketch(np.arange(0, 1000), 50), sketch(np.arange(500, 1500), 50)) > 0
    small = sketch(np.arange(10), 3)
    assert small.complete and len(small.digests) == 10


def _finite_truth(pre: np.ndarray) -> dict:
    """--allow-nonfinite, by hand: NaN/±Inf pre-activations fire nowhere and add nothing to max or sum."""
    bad = ~np.isfinite(pre)
    clean = np.where(bad, -np.inf, pre)
    return {
        "positive_counts": (clean > 0).sum(0).tolist(),
        "max": clean.max(0),
        "sum_abs": np.maximum(clean, 0).sum(0),
        "nonfinite": int(bad.sum()),
    }


def _check(layer: dict, truth: dict, notes: list[str]) -> None:
    assert layer["positive_counts"] == truth["positive_counts"]
    np.testing.assert_allclose(layer["sum_abs"], truth["sum_abs"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(layer["max_preactivation"], truth["max"], rtol=1e-5)
    assert layer["nonfinite"] == truth["nonfinite"] > 0
    assert any(f"{truth['nonfinite']} NaN/Inf value(s)" in note for note in notes)


def _nonfinite_data(path, features):
    x = np.random.default_rng(6).standard_normal((10, features)).astype(np.float32)
    x[2, 1], x[5, 0], x[7, 3] = np.nan, np.inf, -np.inf
    np.savez(path, x=x)
    return x


class _Scripted(torch.nn.Module):
    def __init__(self, first: torch.nn.Linear, second: torch.nn.Linear) -> None:
        super().__init__()
        self.fc1, self.fc2 = first, second

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def test_allow_nonfinite_writes_the_report_with_nan_left_out_in_every_format(tmp_path, cli):
    """NaN/Inf in the data reach the sites: the JSON report is written (was: the table, then exit 2 on
    ONNX), each statistic over the finite values only, the same definition for ONNX, state_dict,
    TorchScript and .pt2; numpy computes the truth from the weights."""

    x = _nonfinite_data(tmp_path / "x.npz", 4)
    model = gemm_relu()
    onnx.save(model, tmp_path / "m.onnx")
    weights = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    truth = _finite_truth(x @ weights["w"].T + weights["b"])
    result = cli(
        "scan",
        tmp_path / "m.onnx",
        "--data",
        tmp_path / "x.npz",
        "--allow-nonfinite",
        "--json",
        tmp_path / "o.json",
    )
    assert result.code == 0, result.err
    report = json.loads((tmp_path / "o.json").read_text())
    _check(report["layers"][0], truth, report["notes"])

    (tmp_path / "arch.py").write_text(
        "import torch\nfrom torch import nn\n\ndef build():\n    torch.manual_seed(0)\n"
        "    return nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))\n"
    )
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.ReLU(), torch.nn.Linear(6, 2))
    torch.save(net.state_dict(), tmp_path / "m.pt")
    # (a class of its own: scripting nn.Sequential here would leave TorchScript's cached Sequential type
    # to later tests, which read its saved source)
    torch.jit.script(_Scripted(net[0], net[2])).save(str(tmp_path / "m.ts"))
    program = torch.export.export(net, (torch.zeros(3, 4),), dynamic_shapes=({0: torch.export.Dim("b")},))
    torch.export.save(program, tmp_path / "m.pt2")
    w, b = net[0].weight.detach().numpy(), net[0].bias.detach().numpy()
    truth = _finite_truth(x @ w.T + b)
    for model_args in (
        (tmp_path / "m.pt", "--arch", tmp_path / "arch.py:build"),
        (tmp_path / "m.ts",),
        (tmp_path / "m.pt2",),
    ):
        out = tmp_path / "t.json"
        result = cli(
            "scan", *model_args, "--data", tmp_path / "x.npz", "--allow-nonfinite", "--json", out, "-q"
        )
        assert result.code == 0, (model_args, result.err)
        report = json.loads(out.read_text())
        _check(report["layers"][0], truth, report["notes"])


def test_a_report_json_cannot_hold_fails_before_the_table(tmp_path, cli):
    """Without --allow-nonfinite, NaN from the weights: one error line and no table on stdout."""
    from onnx import numpy_helper

    model = gemm_relu()
    for t in model.graph.initializer:
        if t.name == "b":
            t.CopyFrom(numpy_helper.from_array(np.array([np.nan] + [0.0] * 7, np.float32), "b"))
    onnx.save(model, tmp_path / "m.onnx")
    np.savez(tmp_path / "x.npz", x=np.ones((3, 4), np.float32))
    result = cli("scan", tmp_path / "m.onnx", "--data", tmp_path / "x.npz", "--json", tmp_path / "o.json")
    assert result.code == 2 and result.out == "" and "--allow-nonfinite" in result.err
    assert len(result.err.strip().splitlines()) == 1


def test_nonfinite_values_at_masked_positions_are_not_counted(tmp_path, cli):
    """A NaN at a padded token position is no position: it is not in the note's count (torch and ONNX),
    and the statistics are those of the kept positions (numpy)."""

    (tmp_path / "arch.py").write_text(
        "import torch\nfrom torch import nn\n\ndef build():\n    torch.manual_seed(0)\n"
        "    return nn.Sequential(nn.Linear(3, 4), nn.ReLU())\n"
    )
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU())
    torch.save(net.state_dict(), tmp_path / "m.pt")
    x = np.random.default_rng(7).standard_normal((4, 5, 3)).astype(np.float32)
    mask = np.ones((4, 5), np.int64)
    mask[1, 3:] = 0
    x[1, 4, 0] = np.nan  # padding
    x[2, 1, 2] = np.inf  # a kept position
    np.savez(tmp_path / "d.npz", x=x, attention_mask=mask)
    w, b = net[0].weight.detach().numpy(), net[0].bias.detach().numpy()
    pre = (x @ w.T + b)[mask.astype(bool)]
    truth = _finite_truth(pre)
    out = tmp_path / "t.json"
    args = ("--data", tmp_path / "d.npz", "--allow-nonfinite", "--json", out, "-q")
    result = cli("scan", tmp_path / "m.pt", "--arch", tmp_path / "arch.py:build", *args)
    assert result.code == 0, result.err
    report = json.loads(out.read_text())
    assert truth["nonfinite"] == 4  # the Inf's row: every unit; the padded NaN not
    _check(report["layers"][0], truth, report["notes"])


@pytest.mark.usefixtures("one_rank_world")
def test_a_distributed_scan_carries_the_fingerprint_and_nonfinite_counts(tmp_path, cli):
    """One rank under a real gloo group: the report has the same data fingerprint and NaN/Inf counts as
    the scan without --distributed."""
    x = _nonfinite_data(tmp_path / "x.npz", 4)
    onnx.save(gemm_relu(), tmp_path / "m.onnx")
    args = ("scan", tmp_path / "m.onnx", "--data", tmp_path / "x.npz", "--allow-nonfinite", "-q")
    plain = cli(*args, "--json", tmp_path / "p.json")
    assert plain.code == 0, plain.err
    spread = cli(*args, "--distributed", "--json", tmp_path / "d.json")
    assert spread.code == 0, spread.err
    p, d = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("p", "d"))
    assert d["data"]["fingerprint"] == p["data"]["fingerprint"]
    assert len(d["data"]["fingerprint"]["digests"]) == len(x)
    assert d["layers"][0]["nonfinite"] == p["layers"][0]["nonfinite"] > 0


def test_merged_nonfinite_counts_add_up_in_one_note(tmp_path, cli):
    x = _nonfinite_data(tmp_path / "all.npz", 4)
    np.savez(tmp_path / "a.npz", x=x[:5])
    np.savez(tmp_path / "b.npz", x=x[5:])
    onnx.save(gemm_relu(), tmp_path / "m.onnx")
    for part in ("a", "b", "all"):
        args = ("--data", tmp_path / f"{part}.npz", "--allow-nonfinite", "--json", tmp_path / f"{part}.json")
        assert cli("scan", tmp_path / "m.onnx", *args, "-q").code == 0
    merged = cli("merge", tmp_path / "a.json", tmp_path / "b.json", "--json", "-", "-q").json()
    whole = json.loads((tmp_path / "all.json").read_text())
    assert merged["layers"][0]["nonfinite"] == whole["layers"][0]["nonfinite"] == 24  # 3 samples x 8 units
    assert [n for n in merged["notes"] if "NaN/Inf" in n] == [n for n in whole["notes"] if "NaN/Inf" in n]


def test_allow_nonfinite_with_nan_in_the_first_sample(tmp_path, cli):
    """The passes before the scan (batch sizing, input dtypes) read the first sample: they used to refuse
    NaN there although --allow-nonfinite was given."""
    x = np.ones((3, 4), np.float32)
    x[0, 0] = np.nan
    np.savez(tmp_path / "x.npz", x=x)
    onnx.save(gemm_relu(), tmp_path / "m.onnx")
    (tmp_path / "arch.py").write_text(
        "from torch import nn\n\ndef build():\n    return nn.Sequential(nn.Linear(4, 6), nn.ReLU())\n"
    )

    torch.save(torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.ReLU()).state_dict(), tmp_path / "m.pt")
    for model in ((tmp_path / "m.onnx",), (tmp_path / "m.pt", "--arch", tmp_path / "arch.py:build")):
        result = cli("scan", *model, "--data", tmp_path / "x.npz", "--allow-nonfinite", "--json", "-")
        assert result.code == 0, (model, result.err)
        assert result.json()["layers"][0]["nonfinite"] > 0


def test_allow_nonfinite_with_a_nan_bias_writes_the_report_without_the_bias(tmp_path, cli):
    """A NaN in a ReLU's bias (broken weights) with --allow-nonfinite: the report is written (was: exit 2,
    'its bias holds NaN or Inf', also with the flag); the bias is left out with a note and the counts are
    those over the finite pre-activations, from numpy."""
    from onnx import numpy_helper

    x = np.random.default_rng(3).standard_normal((12, 4)).astype(np.float32)
    np.savez(tmp_path / "x.npz", x=x)
    model = gemm_relu()
    weights = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    bias = weights["b"].copy()
    bias[2] = np.nan
    for t in model.graph.initializer:
        if t.name == "b":
            t.CopyFrom(numpy_helper.from_array(bias, "b"))
    onnx.save(model, tmp_path / "m.onnx")
    onnx_truth = {**_finite_truth(x @ weights["w"].T + bias), "dead": 2}

    (tmp_path / "arch.py").write_text(
        "import torch\nfrom torch import nn\n\ndef build():\n    torch.manual_seed(0)\n"
        "    return nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))\n"
    )
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.ReLU(), torch.nn.Linear(6, 2))
    with torch.no_grad():
        net[0].bias[4] = float("nan")
    torch.save(net.state_dict(), tmp_path / "m.pt")
    w, b = net[0].weight.detach().numpy(), net[0].bias.detach().numpy()
    torch_truth = {**_finite_truth(x @ w.T + b), "dead": 4}

    for model_args, truth in (
        ((tmp_path / "m.onnx",), onnx_truth),
        ((tmp_path / "m.pt", "--arch", tmp_path / "arch.py:build"), torch_truth),
    ):
        out = tmp_path / f"{model_args[0].stem}-{model_args[0].suffix[1:]}.json"
        refused = cli("scan", *model_args, "--data", tmp_path / "x.npz", "--json", out)
        assert refused.code == 2 and "--allow-nonfinite" in refused.err and not out.exists()
        result = cli("scan", *model_args, "--data", tmp_path / "x.npz", "--allow-nonfinite", "--json", out)
        assert result.code == 0, (model_args, result.err)
        report = json.loads(out.read_text())
        layer = report["layers"][0]
        assert layer["max_preactivation"][truth["dead"]] is None  # JSON's "never seen": the NaN unit
        layer["max_preactivation"] = [-np.inf if v is None else v for v in layer["max_preactivation"]]
        _check(layer, truth, report["notes"])
        assert layer["bias"] is None
        assert any("its bias holds 1 NaN/Inf value(s)" in note for note in report["notes"]), report["notes"]
