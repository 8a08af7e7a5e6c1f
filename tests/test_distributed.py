"""Data-parallel scans with torchrun (2 processes, gloo on CPU) equal the single-process scan exactly."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT

CNN = ROOT / "sample_models" / "cnn"
ARCH = str(CNN / "arch.py") + ":build"


def _torchrun(*args: str, nproc: int = 2) -> subprocess.CompletedProcess:
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        "-m",
        "deadrelu_cli",
        "scan",
        *map(str, args),
        "--distributed",
        "--quiet",
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=ROOT)


def _single(cli, *args) -> dict:
    result = cli("scan", *args, "--json", "-")
    assert result.code == 0, result.err
    return json.loads(result.out)


def _assert_same(distributed: dict, single: dict) -> None:
    """Consistency (distribution invariance): the distributed report equals the single-process one,
    which test_truth / test_table check against plain torch + numpy."""
    assert distributed["data"]["samples"] == single["data"]["samples"]
    assert distributed["summary"] == single["summary"]
    assert [layer["name"] for layer in distributed["layers"]] == [layer["name"] for layer in single["layers"]]
    for a, b in zip(distributed["layers"], single["layers"], strict=True):
        for key in (
            "positive_counts",
            "dead_indices",
            "dying_indices",
            "elements_per_unit",
            "max_preactivation",
            "units",
        ):
            assert a[key] == b[key], (a["name"], key)
        np.testing.assert_allclose(
            a["sum_abs"], b["sum_abs"], rtol=1e-6
        )  # float32 sums per batch: rounding only


@pytest.fixture(scope="module")
def uneven_data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dist")
    x = np.load(CNN / "calib.npz")["input"][:95]  # 95 samples on 2 ranks: 47 + 48
    np.save(folder / "all.npy", x)
    for i, (a, b) in enumerate(((0, 40), (40, 70), (70, 95))):
        np.save(folder / f"shard-{i}.npy", x[a:b])
    return folder


@pytest.mark.slow
def test_two_ranks_equal_one_process(cli, uneven_data):
    """Consistency: two ranks on an uneven split equal one process."""
    out = uneven_data / "dist.json"
    run = _torchrun(
        CNN / "model.pt",
        "--arch",
        ARCH,
        "--data",
        uneven_data / "all.npy",
        "--batch-size",
        "16",
        "--json",
        out,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    _assert_same(
        json.loads(out.read_text()),
        _single(cli, CNN / "model.pt", "--arch", ARCH, "--data", uneven_data / "all.npy"),
    )


@pytest.mark.slow
def test_glob_of_shards_dealt_to_ranks(cli, uneven_data):
    """Consistency: shards dealt to ranks equal one process on the whole file."""
    out = uneven_data / "glob.json"
    run = _torchrun(CNN / "model.onnx", "--data", uneven_data / "shard-*.npy", "--json", out)
    assert run.returncode == 0, run.stderr[-3000:]
    _assert_same(
        json.loads(out.read_text()), _single(cli, CNN / "model.onnx", "--data", uneven_data / "all.npy")
    )


@pytest.mark.slow
def test_a_failing_rank_fails_the_job(uneven_data, tmp_path):
    for i in range(3):
        x = np.load(uneven_data / f"shard-{i}.npy")
        if i == 1:
            x[-1, 0, 0, 0] = np.nan  # found only when rank 1 reaches its last batch
        np.save(tmp_path / f"part-{i}.npy", x)
    out = tmp_path / "report.json"
    run = _torchrun(CNN / "model.pt", "--arch", ARCH, "--data", tmp_path / "part-*.npy", "--json", out)
    assert run.returncode == 1  # torchrun's own code for "a worker failed"
    # each rank exited 2 (bad input), or was stopped by torchrun once the first had exited
    codes = re.findall(r"exitcode\s*:\s*(-?\d+)", run.stderr)
    assert codes and "2" in codes and set(codes) <= {"2", "-15"}, run.stderr[-2000:]
    assert "rank 1 of 2 failed, no report written" in run.stderr
    assert not out.exists()


@pytest.fixture
def one_rank_world(monkeypatch):
    """A real gloo process group of one rank in this process (the environment torchrun would set)."""
    import socket

    import torch.distributed as dist

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {
        "RANK": "0",
        "WORLD_SIZE": "1",
        "LOCAL_RANK": "0",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    yield
    if dist.is_initialized():
        dist.destroy_process_group()


def test_a_rank_with_bad_input_exits_2(cli, one_rank_world, tmp_path):
    x = np.load(CNN / "calib.npz")["input"][:8].copy()
    x[5, 0, 0, 0] = np.nan
    np.save(tmp_path / "bad.npy", x)
    out = tmp_path / "report.json"
    result = cli("scan", CNN / "model.onnx", "--data", tmp_path / "bad.npy", "--distributed", "--json", out)
    assert result.code == 2, result.err
    assert "rank 0 of 1 failed, no report written: UserError:" in result.err and "NaN" in result.err
    assert not out.exists()


def test_a_rank_that_crashes_exits_3(cli, one_rank_world, tmp_path, monkeypatch):
    """An internal error on a rank is an internal error for the job (exit 3), not bad input (2)."""
    import deadrelu_cli.engine as engine

    real = engine.backend_for

    class Crashing:
        def __init__(self, fmt):
            self._real = real(fmt)

        def __getattr__(self, name):
            return getattr(self._real, name)

        def load_and_scan(self, *args):
            raise RuntimeError("planted crash inside the rank")

    monkeypatch.setattr(engine, "backend_for", Crashing)
    out = tmp_path / "report.json"
    result = cli("scan", CNN / "model.onnx", "--data", CNN / "calib.npz", "--distributed", "--json", out)
    assert result.code == 3, result.err
    assert "rank 0 of 1 failed, no report written: RuntimeError: planted crash inside the rank" in result.err
    assert not out.exists()


def test_distributed_without_torchrun_is_a_usage_error(cli, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    result = cli("scan", CNN / "model.onnx", "--data", CNN / "calib.npz", "--distributed")
    assert result.code == 2 and "needs torchrun" in result.err


def test_glob_data_in_one_process(cli, uneven_data):
    """Consistency: a glob of shards in one process equals the whole file."""
    _assert_same(
        _single(cli, CNN / "model.pt", "--arch", ARCH, "--data", uneven_data / "shard-*.npy"),
        _single(cli, CNN / "model.pt", "--arch", ARCH, "--data", uneven_data / "all.npy"),
    )
