"""Hostile and broken inputs: fuzzed files, malicious pickles, failing writes; properties of the report."""

from __future__ import annotations

import errno
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, arch, save_npz, save_state_dict
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deadrelu_cli import scan
from deadrelu_cli.report.model import merge_reports, report_to_dict

MLP = ROOT / "sample_models" / "mlp"
MLP_ARCH = ["--arch", str(MLP / "arch.py") + ":build"]
FUZZ_TARGETS = {
    "state_dict": (MLP / "model.pt", "model"),
    "safetensors": (MLP / "model.safetensors", "model"),
    "torchscript": (MLP / "model.torchscript.pt", "model"),
    "exported_program": (MLP / "model.pt2", "model"),
    "onnx": (MLP / "model.onnx", "model"),
    "npz": (MLP / "calib.npz", "data"),
    "npy": (None, "data"),
}
FUZZ = settings(max_examples=15, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))


def _damage(raw: bytes, mode: str, position: float, flips: list[tuple[float, int]]) -> bytes:
    if mode == "truncate":
        return raw[: int(position * len(raw))]
    data = bytearray(raw)
    for where, value in flips:
        data[int(where * (len(data) - 1))] = value
    return bytes(data)


@pytest.mark.parametrize("kind", list(FUZZ_TARGETS))
def test_damaged_files_give_exit_2_or_a_report(kind, cli, tmp_path_factory):
    source, role = FUZZ_TARGETS[kind]
    if source is None:
        folder = tmp_path_factory.mktemp("npy")
        source = folder / "calib.npy"
        np.save(source, np.load(MLP / "calib.npz")["input"][:64])
    raw = Path(source).read_bytes()

    @FUZZ
    @given(
        mode=st.sampled_from(["truncate", "flip"]),
        position=st.floats(0, 0.999),
        flips=st.lists(st.tuples(st.floats(0, 1), st.integers(0, 255)), min_size=1, max_size=16),
    )
    def check(mode, position, flips):
        folder = tmp_path_factory.mktemp("fuzz")
        target = folder / Path(source).name
        target.write_bytes(_damage(raw, mode, position, flips))
        if role == "model":
            args = ["scan", target, *MLP_ARCH, "--data", MLP / "calib.npz"]
        else:
            args = ["scan", MLP / "model.onnx", "--data", target]
        result = cli(*args)
        assert result.code in (0, 1, 2), (kind, mode, result.err)
        assert "Traceback" not in result.err and "internal error" not in result.err, result.err
        if result.code == 2:
            assert len(result.err.strip().splitlines()) == 1
        assert Path(source).read_bytes() == raw  # the original is never touched

    check()


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))  # unpickling this creates the marker file


def test_malicious_pickle_never_runs(cli, tmp_path):
    marker = tmp_path / "PWNED"
    torch.save(
        {"state_dict": {"fc1.weight": torch.zeros(1)}, "payload": _Payload(marker)}, tmp_path / "evil.pt"
    )
    torch.save({"input": torch.zeros(4, 16), "payload": _Payload(marker)}, tmp_path / "evil_data.pt")
    result = cli("scan", tmp_path / "evil.pt", *MLP_ARCH, "--data", MLP / "calib.npz")
    assert result.code == 2 and "--trust-pickle" in result.err
    result = cli("scan", MLP / "model.pt", *MLP_ARCH, "--data", tmp_path / "evil_data.pt")
    assert result.code == 2 and "refused to unpickle" in result.err
    with open(tmp_path / "evil.npy", "wb") as handle:  # an object array: numpy would unpickle it
        np.lib.format.write_array(handle, np.array([_Payload(marker)], dtype=object), allow_pickle=True)
    result = cli("scan", MLP / "model.onnx", "--data", tmp_path / "evil.npy")
    assert result.code == 2
    assert not marker.exists()
    with pytest.raises(pickle.UnpicklingError):  # the same file would indeed run code with pickle
        torch.load(tmp_path / "evil.pt", weights_only=True)


def test_write_into_unwritable_place(cli):
    result = cli(
        "scan", MLP / "model.onnx", "--data", MLP / "calib.npz", "--json", "/proc/deadrelu-report.json"
    )
    assert result.code == 2 and "cannot write" in result.err


def test_failed_write_keeps_the_old_file(cli, tmp_path, monkeypatch):
    out = tmp_path / "report.json"
    out.write_text("previous report\n")

    def full_disk(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_text", full_disk)
    result = cli("scan", MLP / "model.onnx", "--data", MLP / "calib.npz", "--json", out)
    monkeypatch.undo()
    assert result.code == 2 and "No space left on device" in result.err
    assert out.read_text() == "previous report\n"
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]  # no temp file left behind


def test_zip_member_escaping_the_archive(cli, tmp_path):
    import zipfile

    with zipfile.ZipFile(tmp_path / "evil.pt", "w") as archive:
        archive.writestr("archive/data.pkl", b"x")
        archive.writestr("../../etc/evil", b"x")
    result = cli("scan", tmp_path / "evil.pt", *MLP_ARCH, "--data", MLP / "calib.npz")
    assert result.code == 2 and "outside the archive" in result.err


def test_npz_with_a_lying_header(cli, tmp_path):
    import zipfile

    header = np.lib.format.header_data_from_array_1_0(np.zeros((4, 16), np.float32))
    header["shape"] = (10**9, 10**6)
    with zipfile.ZipFile(tmp_path / "bomb.npz", "w") as archive:
        with archive.open("input.npy", "w") as member:
            np.lib.format.write_array_header_1_0(member, header)
            member.write(b"\0" * 256)
    result = cli("scan", MLP / "model.onnx", "--data", tmp_path / "bomb.npz")
    assert result.code == 2 and "declares shape" in result.err


# -- properties ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def conv_case(tmp_path_factory):
    import planted

    folder = tmp_path_factory.mktemp("prop")
    model = planted.conv_bn().eval()
    x = np.random.default_rng(12).standard_normal((30, 3, 5, 5)).astype(np.float32)
    return str(save_state_dict(model, folder / "m.pt")), x, folder


def _counts(report):
    return [(layer.name, layer.positive_counts.tolist(), layer.elements_per_unit) for layer in report.layers]


@settings(max_examples=8, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(batch=st.integers(1, 31), seed=st.integers(0, 10**6))
def test_batch_size_and_order_never_change_counts(conv_case, batch, seed):
    ckpt, x, folder = conv_case
    reference = scan(
        ckpt, str(save_npz(folder / "ref.npz", x=x)), arch=arch("conv_bn"), device="cpu", batch_size=30
    )
    shuffled = x[np.random.default_rng(seed).permutation(len(x))]
    report = scan(
        ckpt,
        str(save_npz(folder / f"p{seed}.npz", x=shuffled)),
        arch=arch("conv_bn"),
        device="cpu",
        batch_size=batch,
    )
    assert _counts(report) == _counts(reference)


@settings(max_examples=6, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(cuts=st.lists(st.integers(1, 29), min_size=1, max_size=4, unique=True))
def test_merge_of_any_split_equals_the_whole(conv_case, cuts):
    ckpt, x, folder = conv_case
    edges = [0, *sorted(cuts), len(x)]
    parts = [
        scan(ckpt, str(save_npz(folder / f"s{a}_{b}.npz", x=x[a:b])), arch=arch("conv_bn"), device="cpu")
        for a, b in zip(edges, edges[1:], strict=False)
    ]
    whole = scan(ckpt, str(save_npz(folder / "whole.npz", x=x)), arch=arch("conv_bn"), device="cpu")
    merged = merge_reports(parts)
    assert _counts(merged) == _counts(whole)
    a, b = report_to_dict(merged), report_to_dict(whole)
    for left, right in zip(a["layers"], b["layers"], strict=True):
        assert (
            left["dead_indices"] == right["dead_indices"] and left["dying_indices"] == right["dying_indices"]
        )
        np.testing.assert_allclose(
            left["max_preactivation"], right["max_preactivation"], rtol=1e-6, atol=1e-6
        )
    assert json.dumps(a["summary"]) == json.dumps(b["summary"])
