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
from truth import assert_json_matches, capture, onnx_relu_io, truth_of

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
    if mode == "one byte":  # the damage most likely to leave a readable file
        flips = flips[:1]
    data = bytearray(raw)
    for where, value in flips:
        data[int(where * (len(data) - 1))] = value
    return bytes(data)


# zip archives carry a CRC-32 per member: a damaged one is refused or reads as the undamaged file
CHECKSUMMED = {"state_dict", "torchscript", "exported_program", "npz"}


def _mlp_data() -> np.ndarray:
    return np.load(MLP / "calib.npz")["input"]


def _truth_of_damaged(kind: str, target: Path, data: np.ndarray) -> dict | None:
    """safetensors, ONNX and .npy have no checksum: a flipped weight byte is a different (valid) file.
    Its truth: the file decoded by the format's own library, run in plain torch / onnxruntime, counted
    in numpy; None when that library cannot read it (then deadrelu must refuse it too)."""
    try:
        if kind == "safetensors":
            from safetensors.torch import load_file

            model = _load_arch(MLP / "arch.py").build()
            model.load_state_dict(load_file(str(target)), strict=True)
            sites = capture(model.eval(), [torch.from_numpy(data)], producers={"relu()": ("fc2", "relu")})
            return {name: truth_of(site, 1) for name, site in sites.items()}
        if kind == "onnx":
            import onnx

            model = onnx.load_from_string(target.read_bytes())
            nodes = [n.name for n in model.graph.node if n.op_type == "Relu"]
            sites = onnx_relu_io(model, {model.graph.input[0].name: data}, nodes)
            return {name: truth_of(sites[name], 1) for name in nodes}
        if kind == "npy":
            x = np.load(target, allow_pickle=False)
            if x.dtype.kind not in "fiu" or not np.isfinite(x).all():
                return None
            return _truth_of_damaged("onnx", MLP / "model.onnx", np.ascontiguousarray(x, dtype=np.float32))
    except Exception:  # noqa: BLE001 - whatever the reference library raises: it could not read the file
        return None
    raise AssertionError(kind)


def _load_arch(path: Path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("mlp_arch_for_fuzz", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _statistics(report: dict) -> tuple:
    return json.dumps([report["layers"], report["summary"], report["data"]["samples"]], sort_keys=True)


@pytest.mark.parametrize("kind", list(FUZZ_TARGETS))
def test_damaged_files_are_refused_or_read_exactly(kind, cli, tmp_path_factory):
    """A damaged file gives exit 2 with one line, or a report: for formats with checksums (zip) exactly
    the undamaged file's report (consistency, with the undamaged report anchored to plain torch /
    onnxruntime below), for those without (a flipped byte is another valid file) exactly the
    numbers of that file as its own library reads it. Never a traceback, never a silent wrong number."""
    source, role = FUZZ_TARGETS[kind]
    if source is None:
        folder = tmp_path_factory.mktemp("npy")
        source = folder / "calib.npy"
        np.save(source, _mlp_data()[:64])
    raw = Path(source).read_bytes()

    def run(target: Path):
        if role == "model":
            return cli("scan", target, *MLP_ARCH, "--data", MLP / "calib.npz", "--json", "-")
        return cli("scan", MLP / "model.onnx", "--data", target, "--json", "-")

    reference = run(Path(source))
    assert reference.code == 0, reference.err
    # the undamaged report is itself checked against plain torch / onnxruntime + numpy
    if role == "data":
        anchor = _truth_of_damaged(
            "onnx", MLP / "model.onnx", np.load(source)["input"] if kind == "npz" else np.load(source)
        )
    elif kind == "onnx":
        anchor = _truth_of_damaged("onnx", MLP / "model.onnx", _mlp_data())
    else:  # every torch format of the sample holds the same weights as its .safetensors
        anchor = _truth_of_damaged("safetensors", MLP / "model.safetensors", _mlp_data())
    assert_json_matches(reference.json(), anchor)
    undamaged = _statistics(reference.json())

    @FUZZ
    @given(
        mode=st.sampled_from(["truncate", "flip", "one byte"]),
        position=st.floats(0, 0.999),
        flips=st.lists(st.tuples(st.floats(0, 1), st.integers(0, 255)), min_size=1, max_size=16),
    )
    def check(mode, position, flips):
        folder = tmp_path_factory.mktemp("fuzz")
        target = folder / Path(source).name
        damaged = _damage(raw, mode, position, flips)
        target.write_bytes(damaged)
        result = run(target)
        assert result.code in (0, 2), (kind, mode, result.code, result.err)
        assert "Traceback" not in result.err and "internal error" not in result.err, result.err
        assert Path(source).read_bytes() == raw  # the original is never touched
        if result.code == 2:
            assert len(result.err.strip().splitlines()) == 1
            return
        report = result.json()
        if kind in CHECKSUMMED or damaged == raw:
            assert _statistics(report) == undamaged, (kind, mode)
            return
        data = _mlp_data() if role == "model" else None
        truth = _truth_of_damaged(kind, target, data)
        assert truth is not None, f"{kind}: deadrelu read a file its own library refuses"
        assert_json_matches(report, truth)

    check()


@pytest.mark.parametrize("kind", ["safetensors", "onnx", "npy"])
def test_flipped_weight_bytes_without_a_checksum_are_read_exactly(kind, cli, tmp_path):
    """Formats without a checksum: single bit flips in the tensor bytes (the fuzz above rarely lands
    there) make another valid file, and its report has exactly that file's numbers (plain torch /
    onnxruntime + numpy), low mantissa bits and exponent bits alike."""
    source, role = FUZZ_TARGETS[kind]
    if source is None:
        source = tmp_path / "calib.npy"
        np.save(source, _mlp_data()[:64])
    raw = Path(source).read_bytes()
    target = tmp_path / ("damaged" + Path(source).suffix)
    read = 0
    for where in np.linspace(0.55, 0.98, 4):
        for bit in (0x01, 0x20):
            damaged = bytearray(raw)
            damaged[int(where * len(raw))] ^= bit
            target.write_bytes(bytes(damaged))
            if role == "model":
                result = cli("scan", target, *MLP_ARCH, "--data", MLP / "calib.npz", "--json", "-")
            else:
                result = cli("scan", MLP / "model.onnx", "--data", target, "--json", "-")
            assert result.code in (0, 2), result.err
            if result.code == 2:
                assert len(result.err.strip().splitlines()) == 1 and "internal error" not in result.err
                continue
            truth = _truth_of_damaged(kind, target, _mlp_data() if role == "model" else None)
            assert truth is not None, f"{kind}: deadrelu read a file its own library refuses"
            assert_json_matches(result.json(), truth)
            read += 1
    assert read >= 4  # most flips leave a valid file: the comparison above really ran


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


@pytest.mark.parametrize("flag", ["--json", "--html", "--junit", "--markdown"])
def test_every_report_writer_is_atomic(cli, tmp_path, monkeypatch, flag):
    """A write that fails half-way (disk full after some bytes) leaves the previous file intact and no
    temp file behind, for each of the four report writers."""
    out = tmp_path / f"report{flag.replace('--', '.')}"
    out.write_text("previous report\n")
    real_write_text = Path.write_text

    def half_then_full(self, text, *args, **kwargs):
        real_write_text(self, text[: len(text) // 2], *args, **kwargs)  # some bytes reach the disk
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_text", half_then_full)
    result = cli("scan", MLP / "model.onnx", "--data", MLP / "calib.npz", "--max-dead", "0.9", flag, out)
    monkeypatch.undo()
    assert result.code == 2 and "No space left on device" in result.err, result.err
    assert out.read_text() == "previous report\n"
    assert [p.name for p in tmp_path.iterdir()] == [out.name]  # no temp file left behind
    result = cli("scan", MLP / "model.onnx", "--data", MLP / "calib.npz", "--max-dead", "0.9", flag, out)
    assert result.code == 0 and out.read_text() != "previous report\n"  # the same write, undisturbed
    assert [p.name for p in tmp_path.iterdir()] == [out.name]


def _npz_member_start(path: Path) -> int:
    """Offset of the first member's bytes in a zip (after its local header)."""
    import struct
    import zipfile

    info = zipfile.ZipFile(path).infolist()[0]
    raw = path.read_bytes()
    name_len, extra_len = struct.unpack("<HH", raw[info.header_offset + 26 : info.header_offset + 30])
    return info.header_offset + 30 + name_len + extra_len


@pytest.mark.parametrize("compressed", [False, True], ids=["stored", "deflated"])
def test_npz_crc_damage_is_refused_even_when_only_some_rows_are_read(cli, tmp_path, compressed):
    """One flipped bit in an .npz member fails its CRC-32: refused (exit 2, one line) whether the damage
    is in the rows scanned or not, with --limit too (zipfile checks the CRC only at the member's end, so
    a scan stopping early must still read to it); the undamaged file's rows give onnxruntime's numbers."""
    x = _mlp_data()[:64]
    save = np.savez_compressed if compressed else np.savez
    save(tmp_path / "good.npz", input=x)
    raw = (tmp_path / "good.npz").read_bytes()
    start = _npz_member_start(tmp_path / "good.npz")
    header = 128  # the .npy header inside the member (version 1.0, padded to 128 bytes)
    import zipfile

    size = zipfile.ZipFile(tmp_path / "good.npz").infolist()[0].compress_size
    cases = {"last row": start + size - 9}
    if not compressed:
        cases["row 2"] = start + header + 2 * x.shape[1] * 4 + 3  # inside the first 10 rows
    for where, offset in cases.items():
        damaged = bytearray(raw)
        damaged[offset] ^= 0x40
        (tmp_path / "bad.npz").write_bytes(bytes(damaged))
        for extra in ((), ("--limit", "10")):
            result = cli("scan", MLP / "model.onnx", "--data", tmp_path / "bad.npz", *extra)
            assert result.code == 2, (where, extra, result.out[-300:])
            assert "damaged" in result.err and len(result.err.strip().splitlines()) == 1, result.err
    result = cli("scan", MLP / "model.onnx", "--data", tmp_path / "good.npz", "--limit", "10", "--json", "-")
    assert result.code == 0, result.err
    truth = _truth_of_damaged("onnx", MLP / "model.onnx", x[:10])  # the undamaged graph, first 10 rows
    assert_json_matches(result.json(), truth)


def test_internal_error_writes_a_crash_log_with_the_traceback(cli, tmp_path, monkeypatch):
    """Exit 3: one line on stderr naming the crash log; the log holds the full traceback of the error."""
    import tempfile

    import deadrelu_cli.engine as engine

    def broken_step(_options):
        raise ZeroDivisionError("planted for the crash-log test")

    monkeypatch.setattr(engine, "run_scan_detailed", broken_step)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the log goes to the temp dir: this one
    result = cli("scan", MLP / "model.onnx", "--data", MLP / "calib.npz")
    assert result.code == 3
    (log,) = tmp_path.glob("deadrelu-crash-*.log")
    line = result.err.strip()
    assert len(line.splitlines()) == 1 and "Traceback" not in line
    assert "internal error: ZeroDivisionError: planted for the crash-log test" in line
    assert f"traceback in {log}" in line
    text = log.read_text()
    assert text.startswith("Traceback (most recent call last):")
    assert "in broken_step" in text and text.rstrip().endswith(
        "ZeroDivisionError: planted for the crash-log test"
    )


def test_damage_found_by_the_wider_fuzz_is_refused(cli, tmp_path):
    """Damage a longer fuzz run (1,050 files) turned into internal errors: each is now exit 2, one line.
    An .npy header whose dict lost its closing brace; a .pt2 member whose flags now say 'encrypted';
    weights that became Inf (a valid safetensors file) with a JSON report, which has no Inf."""
    import struct
    import zipfile

    np.save(tmp_path / "x.npy", _mlp_data()[:8])
    raw = bytearray((tmp_path / "x.npy").read_bytes())
    raw[raw.index(b"}")] = ord(" ")
    (tmp_path / "unbalanced.npy").write_bytes(bytes(raw))
    program = bytearray((MLP / "model.pt2").read_bytes())
    info = zipfile.ZipFile(MLP / "model.pt2").infolist()[-1]
    central = program.rindex(b"PK\x01\x02")  # the central directory entry of that last member
    for offset in (info.header_offset + 6, central + 8):  # local and central general-purpose flags
        flags = struct.unpack("<H", program[offset : offset + 2])[0]
        program[offset : offset + 2] = struct.pack("<H", flags | 1)
    (tmp_path / "encrypted.pt2").write_bytes(bytes(program))
    from safetensors.torch import load_file, save_file

    weights = load_file(str(MLP / "model.safetensors"))
    weights["fc1.weight"][0, 0] = float("inf")
    save_file(weights, str(tmp_path / "inf.safetensors"))
    for args, message in (
        (("scan", MLP / "model.onnx", "--data", tmp_path / "unbalanced.npy"), "not a valid .npy"),
        (("scan", tmp_path / "encrypted.pt2", "--data", MLP / "calib.npz"), "damaged zip archive"),
        (
            (
                "scan",
                tmp_path / "inf.safetensors",
                *MLP_ARCH,
                "--data",
                MLP / "calib.npz",
                "--json",
                tmp_path / "r.json",
            ),
            "NaN or Inf",
        ),
    ):
        result = cli(*args)
        assert result.code == 2, (args, result.err)
        assert message in result.err and len(result.err.strip().splitlines()) == 1, result.err
    assert not (tmp_path / "r.json").exists()
    # NaN data with --allow-nonfinite: the report is written, the NaN left out and counted (data42)
    x = _mlp_data()[:8].copy()
    x[2, 3] = np.nan
    np.save(tmp_path / "nan.npy", x)
    result = cli(
        "scan", MLP / "model.onnx", "--data", tmp_path / "nan.npy", "--allow-nonfinite", "--json", "-"
    )
    assert result.code == 0, result.err
    assert all(np.isfinite(layer["sum_abs"]).all() for layer in result.json()["layers"])
    assert result.json()["layers"][0]["nonfinite"] > 0


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
    """Consistency (batch-size and order invariance) against one reference scan."""
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
    """Consistency (merge is exact over any split)."""
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


def _matmul_relu(weight, constant=None):
    """input[b, 3] @ W -> (+ C) -> Relu, the weight (and the Constant's value) given as TensorProtos."""
    from onnx import TensorProto, helper

    nodes = [helper.make_node("MatMul", ["input", "W"], ["h"], name="mm")]
    if constant is not None:
        nodes += [
            helper.make_node("Constant", [], ["c"], name="const", value=constant),
            helper.make_node("Add", ["h", "c"], ["h2"], name="add"),
        ]
    nodes.append(helper.make_node("Relu", ["h2" if constant is not None else "h"], ["y"], name="relu"))
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["b", 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 4])],
        [weight],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def test_onnx_tensor_claiming_absurd_dims_is_refused(cli, tmp_path):
    """An initializer or Constant that declares 3x10^12 elements and stores none (in float_data, not
    raw_data) is refused in one line (before: an internal error, exit 3); the same graph with its
    values in float_data scans to onnxruntime's own counts."""
    import onnx
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)
    w = rng.standard_normal((3, 4)).astype(np.float32)
    c = rng.standard_normal(4).astype(np.float32)
    x = rng.standard_normal((16, 3)).astype(np.float32)
    save_npz(tmp_path / "x.npz", input=x)
    typed_w = helper.make_tensor("W", TensorProto.FLOAT, [3, 4], w.ravel().tolist())  # float_data
    typed_c = helper.make_tensor("c", TensorProto.FLOAT, [4], c.tolist())
    good = _matmul_relu(typed_w, typed_c)
    onnx.save(good, tmp_path / "good.onnx")
    result = cli("scan", tmp_path / "good.onnx", "--data", tmp_path / "x.npz", "--json", "-")
    assert result.code == 0, result.err
    relu = onnx_relu_io(good, {"input": x}, ["relu"])["relu"]
    assert result.json()["layers"][0]["positive_counts"] == (relu.pre > 0).sum(0).tolist()

    def hollow(name, dims):
        tensor = TensorProto(name=name, data_type=TensorProto.FLOAT)
        tensor.dims.extend(dims)
        return tensor

    for case, model in {
        "initializer": _matmul_relu(hollow("W", [3, 10**12])),
        "constant": _matmul_relu(typed_w, hollow("c", [10**12])),
    }.items():
        onnx.save(model, tmp_path / f"{case}.onnx")
        result = cli("scan", tmp_path / f"{case}.onnx", "--data", tmp_path / "x.npz")
        assert result.code == 2, (case, result.err)
        assert len(result.err.strip().splitlines()) == 1 and "Traceback" not in result.err, result.err
        assert case == "constant" or "holds 0 values" in result.err, result.err  # the checker sees Constants
