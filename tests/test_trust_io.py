"""Trust, round two: outputs that land on inputs, names that carry control sequences, special files,
full disks, signals, and reports and options that are not what they claim. Each test builds its
attack here and checks the victim's bytes, the exit code and the one-line stderr."""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from conftest import ROOT, save_npz
from onnx_graphs import gemm_relu

MLP = ROOT / "sample_models" / "mlp"
MLP_ARCH = f"{MLP / 'arch.py'}:build"
EVIL_NAME = "relu\x1b]0;T\x07\n::warning title=x::y [red]x[/] a|b `c`"


def one_line_error(result, needle: str = "") -> str:
    assert result.code == 2, (result.code, result.err)
    lines = result.err.strip().splitlines()
    assert len(lines) == 1, result.err
    assert lines[0].startswith("deadrelu: error: ") and needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def work(tmp_path) -> Path:
    for name in ("model.pt", "model.pt2", "model.onnx", "calib.npz", "arch.py"):
        shutil.copy(MLP / name, tmp_path / name)
    return tmp_path


def _report(cli, work: Path, name: str = "r.json", *extra: str) -> Path:
    out = work / name
    result = cli("scan", work / "model.onnx", "--data", work / "calib.npz", "--json", out, "-q", *extra)
    assert result.code == 0, result.err
    return out


# --- one output guard ------------------------------------------------------------------------------


def test_scan_output_named_by_a_data_glob_is_refused(cli, work):
    rng = np.random.default_rng(0)
    for i in range(3):
        save_npz(work / f"part{i}.npz", input=rng.normal(size=(8, 12)).astype(np.float32))
    victim = work / "part1.npz"
    before = victim.read_bytes()
    result = cli("scan", work / "model.onnx", "--data", str(work / "part*.npz"), "--json", victim)
    one_line_error(result, "refusing to overwrite")
    assert victim.read_bytes() == before


@pytest.mark.parametrize("link", ["symlink", "hardlink"])
def test_outputs_reaching_inputs_through_links_are_refused(cli, work, link):
    """--html through a link to the --arch file, --markdown through a link to the model."""
    for target, flag in ((work / "arch.py", "--html"), (work / "model.pt", "--markdown")):
        alias = work / f"alias-{target.name}.out"
        os.symlink(target, alias) if link == "symlink" else os.link(target, alias)
        before = target.read_bytes()
        result = cli(
            "scan", work / "model.pt", "--arch", f"{work / 'arch.py'}:build", "--data", work / "calib.npz",
            flag, alias, "--max-dead", "1",
        )  # fmt: skip
        one_line_error(result, flag)
        assert target.read_bytes() == before


def test_scan_junit_over_the_baseline_and_fix_json_over_model_or_output(cli, work):
    baseline = _report(cli, work, "baseline.json")
    before = baseline.read_bytes()
    result = cli(
        "scan", work / "model.onnx", "--data", work / "calib.npz", "--baseline", baseline, "--junit", baseline
    )  # fmt: skip
    one_line_error(result, "--baseline")
    assert baseline.read_bytes() == before
    model_bytes = (work / "model.pt2").read_bytes()
    common = ("fix", work / "model.pt2", "--data", work / "calib.npz", "-s", "leaky")
    one_line_error(cli(*common, "-o", work / "fixed.pt2", "--json", work / "model.pt2"), "MODEL")
    one_line_error(cli(*common, "-o", work / "fixed.pt2", "--json", work / "fixed.pt2"), "--output")
    assert (work / "model.pt2").read_bytes() == model_bytes
    assert not (work / "fixed.pt2").exists()


def test_trend_outputs_over_a_checkpoint_or_the_data_are_refused(cli, work):
    for step in (1, 2):
        shutil.copy(work / "model.onnx", work / f"ckpt-{step}.onnx")
    victim = work / "ckpt-2.onnx"
    before = victim.read_bytes()
    one_line_error(
        cli("trend", work / "ckpt-*.onnx", "--data", work / "calib.npz", "--html", victim), "checkpoint"
    )
    one_line_error(
        cli(
            "trend", work / "ckpt-1.onnx", victim, "--data", work / "calib.npz", "--json", work / "calib.npz"
        ),
        "--data",
    )
    assert victim.read_bytes() == before


def test_report_and_merge_outputs_over_their_inputs_are_refused(cli, work):
    first = _report(cli, work, "a.json", "--limit", "32")
    before = first.read_bytes()
    os.symlink(first, work / "link.json")
    one_line_error(cli("report", first, "--json", work / "link.json"), "REPORT")
    one_line_error(cli("merge", first, work / "b.json", "--json", first), "REPORT")
    assert first.read_bytes() == before


def test_unwritable_outputs_are_refused_before_any_work(cli, work, monkeypatch):
    """A missing folder, a folder given as a file name: refused by the output guard, before the scan
    starts (the scan is made to fail loudly if it is ever reached)."""
    import deadrelu_cli.engine as engine

    def never(*_args, **_kwargs):
        raise AssertionError("the scan started before the outputs were checked")

    import deadrelu_cli.fixes.run as fix_run

    monkeypatch.setattr(engine, "run_scan_detailed", never)
    monkeypatch.setattr(fix_run, "run_scan_detailed", never)
    model, data = work / "model.onnx", work / "calib.npz"
    missing = work / "no-such-dir"
    one_line_error(cli("scan", model, "--data", data, "--json", missing / "r.json"), "does not exist")
    one_line_error(cli("scan", model, "--data", data, "--html", missing / "r.html"), "does not exist")
    one_line_error(cli("scan", model, "--data", data, "--json", work), "is a directory")
    one_line_error(cli("scan", model, "--data", data, "--junit", missing / "j.xml"), "does not exist")
    one_line_error(cli("scan", model, "--data", data, "--markdown", missing / "m.md"), "does not exist")
    fix = ("fix", model, "--data", data, "-s", "reinit", "-o", missing / "f.onnx")
    one_line_error(cli(*fix), "does not exist")
    assert not missing.exists()


def test_written_files_get_the_users_umask_not_0600(cli, work):
    old = os.umask(0o022)
    try:
        out = _report(cli, work, "perm.json")
        fixed = work / "fixed.pt2"
        result = cli("fix", work / "model.pt2", "--data", work / "calib.npz", "-s", "leaky", "-o", fixed)
        assert result.code == 0, result.err
    finally:
        os.umask(old)
    for path in (out, fixed):
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, oct(path.stat().st_mode)


# --- names that carry control sequences ------------------------------------------------------------


def test_a_hostile_layer_name_cannot_forge_ci_output(cli, work, monkeypatch):
    model = gemm_relu()
    model.graph.node[1].name = EVIL_NAME
    onnx.save(model, work / "evil.onnx")
    save_npz(work / "x.npz", x=np.random.default_rng(0).normal(size=(32, 4)).astype(np.float32))
    monkeypatch.setenv("GITHUB_ACTIONS", "true")
    monkeypatch.delenv("GITHUB_STEP_SUMMARY", raising=False)
    result = cli(
        "scan", work / "evil.onnx", "--data", work / "x.npz", "--max-dead-layer", "0.1",
        "--json", work / "r.json", "--junit", work / "j.xml", "--markdown", work / "m.md",
        "--html", work / "r.html",
    )  # fmt: skip
    assert result.code == 1, result.err
    page = (work / "r.html").read_text()
    for text in (result.out, result.err, (work / "m.md").read_text(), (work / "j.xml").read_text(), page):
        assert "\x1b" not in text and "\x07" not in text
    # the page shows the name as the terminal does (before: the raw controls were in the HTML)
    assert "relu\\x1b]0;T\\x07\\n::warning title=x::y [red]x[/] a|b `c`" in page
    commands = [line for line in result.err.splitlines() if line.startswith("::")]
    assert len(commands) == 1 and commands[0].startswith("::error title=deadrelu "), result.err
    assert "%0A" in commands[0]  # the newline is percent-encoded, as the runner decodes it
    assert not any(line.startswith("::warning") for line in result.out.splitlines())
    markdown_rows = [line for line in (work / "m.md").read_text().splitlines() if line.startswith("| ")]
    assert (
        len(markdown_rows) == 2 and markdown_rows[1].count(" | ") == 6
    )  # header + one layer, columns intact
    suite = ET.parse(work / "j.xml").getroot()
    names = [case.get("name") for case in suite.iter("testcase")]
    assert names[1] == "relu\\x1b]0;T\\x07\\n::warning title=x::y [red]x[/] a|b `c`"
    # JSON keeps the exact name, and its counts are the planted ones (units 2, 4, 6 dead)
    layer = json.loads((work / "r.json").read_text())["layers"][0]
    assert layer["name"] == EVIL_NAME and layer["dead_indices"] == [2, 4, 6]
    table = cli("inspect", work / "evil.onnx")
    assert table.code == 0 and "\x1b" not in table.out and "\\x1b" in table.out


# --- special files, resources, full disks, signals -------------------------------------------------


def _unblock_later(fifo: Path, after: float = 20.0) -> None:
    """If the tool opens FIFO and blocks, a writer shows up after AFTER seconds (the test then fails on time)."""

    def writer() -> None:
        time.sleep(after)
        try:
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:
            pass

    threading.Thread(target=writer, daemon=True).start()


def test_fifos_are_refused_before_any_blocking_open(cli, work):
    fifo = work / "pipe.npz"
    os.mkfifo(fifo)
    folder = work / "ckpts"
    folder.mkdir()
    shutil.copy(work / "model.onnx", folder / "a-1.onnx")
    os.mkfifo(folder / "b-2.onnx")
    _unblock_later(fifo)
    _unblock_later(folder / "b-2.onnx")
    started = time.monotonic()
    one_line_error(cli("scan", fifo, "--data", work / "calib.npz"), "FIFO")
    one_line_error(cli("scan", work / "model.onnx", "--data", fifo), "FIFO")
    one_line_error(cli("gate", fifo, "--max-dead", "1"), "FIFO")
    one_line_error(cli("trend", folder, "--data", work / "calib.npz"), "FIFO")
    one_line_error(cli("scan", "/dev/zero", "--data", work / "calib.npz"), "device")
    assert time.monotonic() - started < 15


def test_an_npz_glob_closes_each_archive_when_its_part_ends(tmp_path):
    from deadrelu_cli.calibration import open_calibration

    rng = np.random.default_rng(0)
    for i in range(40):
        save_npz(tmp_path / f"c{i:03d}.npz", a=rng.normal(size=(4, 3)).astype(np.float32), b=np.ones((4, 2)))
    fds = len(os.listdir("/proc/self/fd"))
    data = open_calibration(str(tmp_path / "c*.npz"))
    rows = sum(len(batch["a"]) for batch in data.batches(3))
    assert rows == 160
    assert len(os.listdir("/proc/self/fd")) <= fds + 2  # 80 members were read; none left open


CHILD = """
import io, json, resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
resource.setrlimit(resource.RLIMIT_FSIZE, (BYTES, BYTES))
from deadrelu_cli.cli.app import main
results = []
for args in json.loads(sys.argv[1]):
    sys.stderr = io.StringIO()
    try:
        main(args)
        code = 0
    except SystemExit as exc:
        code = exc.code
    results.append([code, sys.stderr.getvalue()])
sys.__stdout__.write("RESULTS" + json.dumps(results))
"""


def test_a_full_disk_is_one_line_for_every_writer(work):
    """Every writer in a child whose file writes past 256 bytes fail in the kernel, as on a full disk."""
    scan = ["scan", "model.onnx", "--data", "calib.npz", "-q"]
    runs = [
        scan + ["--json", "o.json"],
        scan + ["--html", "o.html"],
        scan + ["--junit", "o.xml"],
        scan + ["--markdown", "o.md"],
        ["fix", "model.pt2", "--data", "calib.npz", "-s", "leaky", "-o", "fixed.pt2"],
        ["fix", "model.pt", "--arch", MLP_ARCH, "--data", "calib.npz", "-s", "reinit", "-o", "fixed.pt"],
        ["fix", "model.onnx", "--data", "calib.npz", "-s", "leaky", "-o", "fixed.onnx"],
    ]
    child = subprocess.run(
        [sys.executable, "-c", CHILD.replace("BYTES", "256"), json.dumps(runs)],
        cwd=work,
        env={**os.environ, "PYTHONPATH": str(ROOT), "PYTHONDONTWRITEBYTECODE": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert child.returncode == 0, child.stderr[-2000:]
    results = json.loads(child.stdout.rpartition("RESULTS")[2])
    for args, (code, err) in zip(runs, results, strict=True):
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and "nothing was written" in lines[0], (args, code, err)
        assert f"{args[-1]}: write failed" in lines[0], lines[0]  # the file the user named, not the temp
    left = sorted(
        p.name for p in work.iterdir() if p.name.startswith(".") or p.name.startswith(("o.", "fixed"))
    )
    assert left == []


def test_sigterm_removes_the_temp_file_as_sigint_does(cli, work, monkeypatch):
    import deadrelu_cli.fixes.run as fix_run

    seen = {}
    original = fix_run._outputs_of

    def terminate_during_verification(*args, **kwargs):
        seen["temps"] = [p.name for p in work.iterdir() if ".tmp." in p.name]
        os.kill(os.getpid(), signal.SIGTERM)  # a real signal, delivered to this process
        return original(*args, **kwargs)

    monkeypatch.setattr(fix_run, "_outputs_of", terminate_during_verification)
    previous = signal.getsignal(signal.SIGTERM)
    try:
        result = cli(
            "fix", work / "model.pt2", "--data", work / "calib.npz", "-s", "leaky", "-o", work / "f.pt2"
        )
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert result.code == 143 and result.err.strip() == "deadrelu: terminated"
    assert seen["temps"]  # there was a temp file to clean up
    assert not [p for p in work.iterdir() if ".tmp." in p.name] and not (work / "f.pt2").exists()


def test_ctrl_c_during_a_scan_says_interrupted(cli, work, monkeypatch):
    """A real SIGINT while the scan runs: exit 130 and one line saying so (Typer turns the
    KeyboardInterrupt into a silent Exit(130) inside the command)."""
    import deadrelu_cli.engine as engine

    def interrupted(options):
        os.kill(os.getpid(), signal.SIGINT)  # delivered to this process: KeyboardInterrupt here
        raise AssertionError("the interrupt did not arrive")

    monkeypatch.setattr(engine, "run_scan_detailed", interrupted)
    result = cli("scan", work / "model.pt2", "--data", work / "calib.npz")
    assert result.code == 130 and result.err.strip() == "deadrelu: interrupted", result


@pytest.mark.parametrize(
    ("sent", "said", "code"), [("SIGINT", "interrupted", 130), ("SIGTERM", "terminated", 143)]
)
def test_a_signal_that_native_code_turns_into_its_own_error_still_says_so(
    cli, work, monkeypatch, sent, said, code
):
    """Ctrl-C or SIGTERM while the TorchScript interpreter runs a Python hook: the interpreter re-raises the
    interrupt as its own RuntimeError. That is the signal, not an internal error (exit 3 with a crash
    log, as it was)."""
    import deadrelu_cli.engine as engine

    def interrupted_inside_torchscript(options):
        try:
            os.kill(os.getpid(), getattr(signal, sent))  # a real signal: its handler raises here
        except BaseException as exc:  # noqa: BLE001 - what the interpreter does with it
            raise RuntimeError("The following operation failed in the TorchScript interpreter.") from exc
        raise AssertionError("the signal did not arrive")

    monkeypatch.setattr(engine, "run_scan_detailed", interrupted_inside_torchscript)
    previous = signal.getsignal(signal.SIGTERM)
    try:
        result = cli("scan", work / "model.pt2", "--data", work / "calib.npz")
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert result.code == code and result.err.strip() == f"deadrelu: {said}", result


@pytest.mark.parametrize(
    "tensor",
    [
        lambda: torch.eye(12).to_sparse(),
        lambda: torch.randn(8, 12).to(torch.float8_e4m3fn),
        lambda: torch.randn(8, 12, dtype=torch.complex64),
    ],
    ids=["sparse", "float8", "complex"],
)
def test_unsupported_tensor_types_in_pt_data_are_exit_2(cli, work, tensor):
    torch.save({"input": tensor()}, work / "d.pt")
    one_line_error(cli("scan", work / "model.onnx", "--data", work / "d.pt"), "d.pt")


# --- what is read: reports and options -------------------------------------------------------------


def _edited(path: Path, edit) -> Path:
    path = Path(path)
    document = json.loads(path.read_text())
    edit(document)
    out = path.with_name("edited.json")
    out.write_text(json.dumps(document))
    return out


@pytest.fixture(scope="module")
def saved_report(tmp_path_factory) -> Path:
    """One real report (scanned once for the module's many edits of it)."""
    from deadrelu_cli import scan
    from deadrelu_cli.report.model import report_to_json

    path = tmp_path_factory.mktemp("report") / "good.json"
    path.write_text(report_to_json(scan(str(MLP / "model.onnx"), str(MLP / "calib.npz"))))
    return path


@pytest.mark.parametrize(
    "edit, field",
    [
        (lambda d: d["layers"][0]["positive_counts"].__setitem__(0, -3), "layers[0].positive_counts[0]"),
        (lambda d: d["layers"][1]["positive_counts"].__setitem__(2, 10**9), "layers[1].positive_counts[2]"),
        (lambda d: d["layers"][0]["sum_abs"].pop(), "layers[0].sum_abs"),
        (lambda d: d["layers"][0].__setitem__("elements_per_unit", 10**30), "layers[0].elements_per_unit"),
        (lambda d: d["layers"][0]["dead_indices"].append(999), "layers[0].dead_indices"),
        (lambda d: d["data"].__setitem__("samples", -1), "data.samples"),
        (lambda d: d["settings"].__setitem__("dying", 7), "settings.dying"),
        (
            lambda d: d["layers"][0].__setitem__("extra", {"a": [[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]]}),
            "nested",
        ),
    ],
)
@pytest.mark.parametrize("command", ["gate", "report", "diff", "merge"])
def test_inconsistent_reports_are_exit_2_naming_the_field(cli, tmp_path, saved_report, edit, field, command):
    good = shutil.copy(saved_report, tmp_path / "good.json")
    bad = _edited(good, edit)
    args = {
        "gate": ["gate", bad, "--max-dead", "1"],
        "report": ["report", bad],
        "diff": ["diff", good, bad],
        "merge": ["merge", good, bad],
    }[command]
    one_line_error(cli(*args), field)


def test_nan_in_a_report_is_refused(cli, tmp_path, saved_report):
    bad = tmp_path / "nan.json"
    bad.write_text(saved_report.read_text().replace('"threshold": 0.0', '"threshold": NaN'))
    one_line_error(cli("gate", bad, "--max-dead", "1"), "NaN")


def test_merge_refuses_one_report_twice_and_different_settings(cli, work):
    first = _report(cli, work, "a.json", "--limit", "32")
    os.link(first, work / "hard.json")
    shutil.copy(first, work / "copy.json")
    one_line_error(cli("merge", first, first), "twice")
    one_line_error(cli("merge", first, work / "hard.json"), "twice")
    one_line_error(cli("merge", first, work / "copy.json"), "twice")
    for flag in ("--dying", "--tau"):
        other = _report(cli, work, f"b{flag}.json", "--limit", "16", flag, "0.5")
        one_line_error(cli("merge", first, other), flag)


@pytest.mark.parametrize(
    "args, flag",
    [
        (["--threshold", "nan"], "--threshold"),
        (["--threshold", "inf"], "--threshold"),
        (["--dying", "1.5"], "--dying"),
        (["--tau", "-0.1"], "--tau"),
        (["--batch-size", "0"], "--batch-size"),
    ],
)
def test_options_out_of_range_are_exit_2(cli, work, args, flag):
    one_line_error(cli("scan", work / "model.onnx", "--data", work / "calib.npz", *args), flag)


def test_a_nan_limit_from_the_config_file_is_exit_2(cli, work):
    (work / "deadrelu.toml").write_text("max-dead = nan\n")  # TOML has nan; a range check alone lets it by
    result = cli(
        "scan", work / "model.onnx", "--data", work / "calib.npz", "--config", work / "deadrelu.toml"
    )
    one_line_error(result, "max-dead = nan in ")  # the key and the file it came from
    # a deadrelu.toml holds its keys at the top level: the message names no table the file lacks
    assert "deadrelu.toml: " in result.err and "[tool.deadrelu]" not in result.err


def test_onnxruntime_log_lines_stay_off_stderr(work):
    """A graph that fails inside onnxruntime: its own `[E:onnxruntime:…]` line is not printed, ours is."""
    from onnx import TensorProto, helper

    nodes = [
        helper.make_node("Reshape", ["x", "shape"], ["r"], name="reshape"),
        helper.make_node("Relu", ["r"], ["y"], name="relu"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        initializer=[onnx.numpy_helper.from_array(np.array([3, -1], np.int64), "shape")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, work / "bad.onnx")
    save_npz(work / "x.npz", x=np.ones((4, 4), np.float32))  # 16 elements: no [3, -1] shape
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    run = subprocess.run(
        [sys.executable, "-m", "deadrelu_cli", "scan", "bad.onnx", "--data", "x.npz", "-q"],
        cwd=work, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 2, run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("deadrelu: error:"), run.stderr
