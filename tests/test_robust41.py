"""Hostile and changing files (helper robust41).

* an ONNX model file cut short in place mid-scan (an exporter's `open(path, "wb")`): onnxruntime mapped
  the released weights from it and the scan died with SIGBUS (exit 135, no message);
Truth: numpy on the weights and data the test wrote.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
from conftest import relu_onnx
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parents[1]
UNITS = 16384  # 64 KiB of float32: released at the real threshold (loaders.onnx_model.RELEASE_MIN_BYTES)

# The scan's own process, with a hook after each batch: the model file is cut short in place (its inode
# kept, as `open(path, "wb")` does) after the first batch. In a child: SIGBUS would end the test run.
_TRUNCATING = """
import sys
from deadrelu_cli.backends.onnx import scan as onnx_scan
from deadrelu_cli.cli.app import main
consider = onnx_scan._OutputMaxSwitch.consider
def truncating(self, *args):
    with open(sys.argv[1], "r+b") as handle:
        handle.truncate(64)
    consider(self, *args)
onnx_scan._OutputMaxSwitch.consider = truncating
main(["scan", sys.argv[1], "--data", sys.argv[2], "--batch-size", "2", "--json", sys.argv[3], "-q"])
"""


def test_an_onnx_model_cut_short_mid_scan_is_no_crash(tmp_path):
    """An Add's operand is not prepacked: onnxruntime reads it on every run from where it got it. Before,
    that was its map of the model file, and the page past the new end faulted: SIGBUS. Now the exit is 0
    with the loaded model's counts (or 2 with one line), and the scan's private copy is gone after."""
    weight = np.where(np.arange(UNITS) < UNITS // 2, -100.0, 0.0).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "w"], ["pre"], name="add"), helper.make_node("Relu", ["pre"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", UNITS])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", UNITS])],
        [numpy_helper.from_array(weight, "w")],
    )
    path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    x = np.random.default_rng(0).standard_normal((8, UNITS)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    temp = tmp_path / "tmp"
    temp.mkdir()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TMPDIR": str(temp)}
    args = [str(path), str(tmp_path / "x.npy"), str(tmp_path / "r.json")]
    done = subprocess.run(
        [sys.executable, "-c", _TRUNCATING, *args], env=env, capture_output=True, text=True, timeout=120
    )
    assert path.stat().st_size == 64  # the hook ran
    assert done.returncode in (0, 2), (done.returncode, done.stderr)
    if done.returncode == 2:
        assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr, done.stderr
    else:
        from deadrelu_cli.report.model import load_report

        report = load_report(str(tmp_path / "r.json"))
        np.testing.assert_array_equal(report.layers[0].positive_counts, ((x + weight) > 0).sum(0))
    assert list(temp.iterdir()) == []  # the private copy of the weights removed


def test_a_deflate_bomb_of_samples_is_refused_up_front(cli, tmp_path):
    """72 MB of zeros deflate to ~70 KB: 4.5 million samples a scan would run one by one (before: as long
    as real ones). Refused in one line that says how to pass real data; the same data uncompressed
    (np.savez) is scanned, and so is a small compressed file, whatever its ratio."""
    model = relu_onnx(tmp_path / "m.onnx", 4)
    bomb = tmp_path / "bomb.npz"
    np.savez_compressed(bomb, x=np.zeros((4_500_000, 4), np.float32))
    assert bomb.stat().st_size < 200_000
    result = cli("scan", model, "--data", bomb, "--limit", "8", "-q")
    assert result.code == 2, result.err
    assert result.err.count("\n") == 1 and "zip bomb" in result.err and "np.savez" in result.err
    small = tmp_path / "small.npz"
    x = np.zeros((1000, 4), np.float32)
    x[::7] = 1.0
    np.savez_compressed(small, x=x)
    result = cli("scan", model, "--data", small, "--json", "-", "-q")
    assert result.code == 0, result.err
    counts = result.json()["layers"][0]["positive_counts"]
    np.testing.assert_array_equal(counts, (x + np.array([-0.5, -0.5, 0, 0], np.float32) > 0).sum(0))


def test_sparse_real_data_compressing_hundreds_of_times_is_scanned(cli, tmp_path, monkeypatch):
    """A binary bag of words (0.05% of the entries 1) deflates ~700x: real data, not a bomb (review41a
    found a 200x limit refusing it). Scanned, its counts numpy's."""
    from deadrelu_cli import calibration

    monkeypatch.setattr(calibration, "MIN_NPZ_REFUSED", 1 << 20)
    width = 3000
    model = relu_onnx(tmp_path / "m.onnx", width)
    x = (np.random.default_rng(0).random((256, width)) < 0.0005).astype(np.float32)
    data = tmp_path / "bow.npz"
    np.savez_compressed(data, x=x)
    assert x.nbytes > 500 * data.stat().st_size  # compresses past the old 200x limit
    result = cli("scan", model, "--data", data, "--json", "-", "-q")
    assert result.code == 0, result.err
    bias = np.where(np.arange(width) < width // 2, -0.5, 0.0).astype(np.float32)
    np.testing.assert_array_equal(result.json()["layers"][0]["positive_counts"], ((x + bias) > 0).sum(0))


def test_a_bomb_split_over_a_glob_is_refused_as_a_whole(cli, tmp_path, monkeypatch):
    """Each file below the size floor, the glob above it: judged together."""
    from deadrelu_cli import calibration

    monkeypatch.setattr(calibration, "MIN_NPZ_REFUSED", 3 << 20)
    model = relu_onnx(tmp_path / "m.onnx", 4)
    for k in range(4):
        np.savez_compressed(tmp_path / f"part{k}.npz", x=np.zeros((2 << 17, 4), np.float32))  # 1 MiB each
    result = cli("scan", model, "--data", tmp_path / "part*.npz", "-q")
    assert result.code == 2 and "zip bomb" in result.err and result.err.count("\n") == 1, result.err
    data = tmp_path / "data"
    data.mkdir()
    for k in range(4):
        (tmp_path / f"part{k}.npz").rename(data / f"part{k}.npz")
    result = cli("scan", model, "--data", data, "-q")
    assert result.code == 2 and "zip bomb" in result.err, result.err


def test_a_settings_file_reads_a_baseline_only_inside_its_folder(cli, tmp_path, monkeypatch):
    """`baseline = "/abs/path"` (or `../`, or a link out) in a pull request's settings gated the run against
    a report from outside the checkout: refused in one line naming --baseline; inside the folder it is
    read, and --baseline on the command line may point anywhere."""
    model = relu_onnx(tmp_path / "m.onnx", 4)
    x = np.ones((8, 4), np.float32)
    np.savez(tmp_path / "d.npz", x=x)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    assert cli("scan", model, "--data", tmp_path / "d.npz", "--json", outside / "base.json", "-q").code == 0
    checkout = tmp_path / "checkout"
    checkout.mkdir()
    (checkout / "link.json").symlink_to(outside / "base.json")
    monkeypatch.chdir(checkout)
    for value in (str(outside / "base.json"), "../elsewhere/base.json", "link.json"):
        (checkout / "deadrelu.toml").write_text(f"baseline = {value!r}\n")
        result = cli("scan", model, "--data", tmp_path / "d.npz", "-q")
        assert result.code == 2 and result.err.count("\n") == 1, (value, result.err)
        assert "outside the folder of the settings file" in result.err and "--baseline" in result.err
    (checkout / "base.json").write_bytes((outside / "base.json").read_bytes())
    (checkout / "deadrelu.toml").write_text('baseline = "base.json"\nmax-increase = 0\n')
    assert cli("scan", model, "--data", tmp_path / "d.npz", "-q").code == 0
    # x = -1 kills every unit (none did in the baseline): the gate fails, so the baseline was read
    np.savez(tmp_path / "dead.npz", x=np.full((8, 4), -1.0, np.float32))
    result = cli("scan", model, "--data", tmp_path / "dead.npz", "-q")
    assert result.code == 1 and "grew from 0.0% to 100.0%" in result.err, result.err
    (checkout / "deadrelu.toml").write_text("max-increase = 0\n")
    result = cli("scan", model, "--data", tmp_path / "dead.npz", "--baseline", outside / "base.json", "-q")
    assert result.code == 1 and "grew from 0.0% to 100.0%" in result.err, result.err


def test_a_settings_value_is_quoted_escaped_and_short(cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model = relu_onnx(tmp_path / "m.onnx", 4)
    np.savez(tmp_path / "d.npz", x=np.ones((2, 4), np.float32))
    (tmp_path / "deadrelu.toml").write_text('max-dead = "\\u001b]0;owned\\u0007' + "a" * 5000 + '"\n')
    result = cli("scan", model, "--data", tmp_path / "d.npz", "-q")
    assert result.code == 2 and result.err.count("\n") == 1 and "\x1b" not in result.err, result.err
    assert "wrong type" in result.err and len(result.err) < 300


def test_merge_refuses_the_same_data_saved_under_two_names(cli, tmp_path):
    """One data file copied under another name and scanned twice: two reports, two data paths, different
    bytes (each names its own data file), and merge added their counts (every sample counted twice).
    Refused in one line naming both; two disjoint shards still merge to the counts numpy gives."""
    model = relu_onnx(tmp_path / "m.onnx", 4)
    x = np.random.default_rng(1).standard_normal((12, 4)).astype(np.float32)
    np.savez(tmp_path / "calib.npz", x=x)
    (tmp_path / "calib-copy.npz").write_bytes((tmp_path / "calib.npz").read_bytes())
    for name in ("calib", "calib-copy"):
        assert (
            cli("scan", model, "--data", tmp_path / f"{name}.npz", "--json", tmp_path / f"{name}.json").code
            == 0
        )
    a, b = tmp_path / "calib.json", tmp_path / "calib-copy.json"
    assert a.read_bytes() != b.read_bytes()
    result = cli("merge", a, b, "--json", tmp_path / "merged.json")
    assert result.code == 2 and result.err.count("\n") == 1, result.err
    assert "12 of the same samples" in result.err and "calib.json" in result.err
    assert not (tmp_path / "merged.json").exists()
    np.savez(tmp_path / "half1.npz", x=x[:6])
    np.savez(tmp_path / "half2.npz", x=x[6:])
    for name in ("half1", "half2"):
        assert (
            cli("scan", model, "--data", tmp_path / f"{name}.npz", "--json", tmp_path / f"{name}.json").code
            == 0
        )
    result = cli("merge", tmp_path / "half1.json", tmp_path / "half2.json", "--json", "-")
    assert result.code == 0, result.err
    bias = np.array([-0.5, -0.5, 0, 0], np.float32)
    np.testing.assert_array_equal(result.json()["layers"][0]["positive_counts"], ((x + bias) > 0).sum(0))


_RELU_ON_OUTPUT = """
import torch
from torch import nn

def build():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.ReLU())
"""


def test_quiet_keeps_the_problems_on_every_command(cli, tmp_path):
    """-q: no table, the problems on stderr, one line on stdout. `scan -q --json -` printed only a padding
    warning and dropped the others (a ReLU on the model's output); trend and inspect had no -q."""
    import json

    import torch

    from tests.conftest import arch_file

    model, arch = arch_file(tmp_path / "arch.py", _RELU_ON_OUTPUT)
    torch.save(model.state_dict(), tmp_path / "m.pt")
    x = np.random.default_rng(2).standard_normal((6, 4)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x)
    scan = ("scan", tmp_path / "m.pt", "--arch", arch, "--data", tmp_path / "d.npz")
    quiet = cli(*scan, "-q")
    assert quiet.code == 0 and "relu-on-output" in quiet.err and quiet.out.count("\n") == 1, quiet
    for extra in (("-q",), ()):
        result = cli(*scan, *extra, "--json", "-")
        assert result.code == 0, result.err
        truth = (x @ model[0].weight.detach().numpy().T + model[0].bias.detach().numpy() > 0).sum(0)
        np.testing.assert_array_equal(json.loads(result.out)["layers"][0]["positive_counts"], truth)
        assert [line for line in result.err.splitlines() if line.startswith("warning:")] == [
            line for line in quiet.err.splitlines() if line.startswith("warning:")
        ], result.err
    result = cli("inspect", tmp_path / "m.pt", "--arch", arch, "-q")
    assert result.code == 0 and result.out.count("\n") == 1 and "1 activation sites" in result.out, result.out
    assert "relu-on-output" in result.err
    for k in (1, 2):
        np.savez(tmp_path / f"d{k}.npz", x=x * k)
        assert cli(*scan[:4], "--data", tmp_path / f"d{k}.npz", "--json", tmp_path / f"r{k}.json").code == 0
    result = cli("trend", tmp_path / "r1.json", tmp_path / "r2.json", "-q")
    assert result.code == 0 and result.out.count("\n") == 1 and "2 checkpoints" in result.out, result.out
    assert result.err == ""


def test_merge_allow_overlap_adds_disjoint_shards_that_share_an_identical_sample(cli, tmp_path):
    """Two shards of different samples that each hold the same blank sample: merge refuses them as
    overlapping (content digests cannot tell a duplicate from an overlap) and says how to go on;
    --allow-overlap merges them as given, warns, says so in the report, and the counts are numpy's over
    both shards (the blank sample counted once per shard)."""
    model = relu_onnx(tmp_path / "m.onnx", 4)
    rng = np.random.default_rng(3)
    blank = np.zeros((1, 4), np.float32)
    shards = [np.concatenate([rng.standard_normal((5, 4)).astype(np.float32), blank]) for _ in range(2)]
    for k, shard in enumerate(shards):
        np.savez(tmp_path / f"s{k}.npz", x=shard)
        assert (
            cli("scan", model, "--data", tmp_path / f"s{k}.npz", "--json", tmp_path / f"s{k}.json").code == 0
        )
    parts = (tmp_path / "s0.json", tmp_path / "s1.json")
    refused = cli("merge", *parts, "--json", tmp_path / "merged.json")
    assert refused.code == 2 and refused.err.count("\n") == 1, refused.err
    assert "1 of the same samples" in refused.err and "--allow-overlap" in refused.err
    assert not (tmp_path / "merged.json").exists()
    merged = cli("merge", *parts, "--allow-overlap", "--json", tmp_path / "merged.json")
    assert merged.code == 0, merged.err
    assert "warning:" in merged.err and "1 of the same samples" in merged.err
    report = json.loads((tmp_path / "merged.json").read_text())
    assert any("--allow-overlap" in note for note in report["notes"])
    both = np.concatenate(shards)
    bias = np.array([-0.5, -0.5, 0, 0], np.float32)
    np.testing.assert_array_equal(report["layers"][0]["positive_counts"], ((both + bias) > 0).sum(0))
    assert report["data"]["samples"] == len(both)
