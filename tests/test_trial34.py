"""Regression tests of trial34: deadrelu in real CI set-ups (GitLab's Docker executor, containers reading
a checkout another uid owns, non-UTF-8 logs)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import ROOT

MLP_ONNX = ROOT / "sample_models" / "mlp" / "model.onnx"  # 6 of its 40 units are dead (README)
MLP_CALIB = MLP_ONNX.parent / "calib.npz"
FAILS_EVERY_DEAD_UNIT = "[tool.deadrelu]\nmax-dead = 0.0\n"


def _checkout(tmp_path, mode: int, file_mode: int = 0o644):
    """A checkout whose pyproject.toml sets max-dead = 0 (the sample MLP then fails the gate: exit 1,
    exit 0 without the settings), its folder and the file with the given modes."""
    checkout = tmp_path / "checkout"
    (checkout / "sub").mkdir(parents=True)
    settings = checkout / "pyproject.toml"
    settings.write_text(FAILS_EVERY_DEAD_UNIT)
    settings.chmod(file_mode)
    (checkout / "sub").chmod(mode)
    checkout.chmod(mode)
    return checkout


def test_gitlab_docker_executor_checkout_with_umask_0000_uses_its_settings(cli, tmp_path, monkeypatch):
    """GitLab's Docker executor clones with umask 0000: every folder 0777, every file 0666. The
    project's own pyproject.toml was refused ("writable by other users", exit 2) in the job the docs show.
    A folder anyone may change holds models and --arch code no safer than the settings, so they apply."""
    checkout = _checkout(tmp_path, 0o777, 0o666)
    for here in (checkout, checkout / "sub"):
        monkeypatch.chdir(here)
        result = cli("scan", MLP_ONNX, "--data", MLP_CALIB)
        assert result.code == 1, result.err  # the file's max-dead = 0 applied
        assert "6/40" in result.out
    # a settings file in a shared folder (sticky like /tmp, or open above a checkout of one's own) stays refused
    (tmp_path / "mine").mkdir()
    for shared_mode, here in ((0o1777, checkout), (0o777, tmp_path / "mine")):
        (tmp_path / "deadrelu.toml").write_text("max-dead = 0.0\n")
        tmp_path.chmod(shared_mode)
        checkout.chmod(0o1777 if shared_mode == 0o1777 else 0o755)
        (checkout / "pyproject.toml").unlink(missing_ok=True)
        monkeypatch.chdir(here)
        result = cli("scan", MLP_ONNX, "--data", MLP_CALIB)
        assert result.code == 2 and "writable by other users" in result.err, (oct(shared_mode), result.err)
        assert result.err.count("\n") == 1
    tmp_path.chmod(0o755)


def test_container_user_reading_a_checkout_another_uid_owns_uses_its_settings(cli, tmp_path, monkeypatch):
    """A container's user (uid 1000) on a checkout the runner's uid 1001 cloned: the checkout's own
    pyproject.toml was refused ("another user owns it"). Its folder's owner could replace it anyway.
    Simulated by claiming another euid than the files' owner; a file whose owner is neither us, root nor
    its folder's owner (a plant in /tmp) is still refused, checked where chown is allowed (root)."""
    checkout = _checkout(tmp_path, 0o755)
    owner = checkout.stat().st_uid
    monkeypatch.setattr(os, "geteuid", lambda: owner + 1000)
    monkeypatch.chdir(checkout / "sub")
    result = cli("scan", MLP_ONNX, "--data", MLP_CALIB)
    assert result.code == 1, result.err
    if owner == 0:  # root: the file handed to another uid than its folder's
        os.chown(checkout / "pyproject.toml", 4242, 4242)
        result = cli("scan", MLP_ONNX, "--data", MLP_CALIB)
        assert result.code == 2 and "another user owns it" in result.err, result.err
        monkeypatch.setattr(os, "geteuid", lambda: 0)  # root is no exception: it would run the plant
        result = cli("scan", MLP_ONNX, "--data", MLP_CALIB)
        assert result.code == 2 and "another user owns it" in result.err, result.err
    else:
        print("not root: the foreign-owner half needs chown")


@pytest.mark.parametrize("encoding", ["ascii", "cp1252"])
def test_a_log_that_is_not_utf8_gets_the_table_not_an_internal_error(tmp_path, encoding):
    """PYTHONIOENCODING=ascii, or a Windows runner's cp1252 pipe: the table's '·', bars and sparklines
    could not be encoded and every scan ended in "internal error: UnicodeEncodeError", exit 3. The
    planted units (fc1: 3 of 32, fc2: 3 of 8, README) must still be read in the log, the gate's exit kept."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHONIOENCODING", "LC_", "LANG"))}
    env.update(PYTHONIOENCODING=encoding, PYTHONPATH=str(ROOT), LANG="C", COLUMNS="200")
    args = ["scan", str(MLP_ONNX), "--data", str(MLP_CALIB), "--max-dead", "0.01", "--json", "-"]
    done = subprocess.run(
        [sys.executable, "-m", "deadrelu_cli", *args[:-2], "--markdown", str(tmp_path / "m.md")],
        capture_output=True,
        env=env,
        timeout=120,
    )
    out, err = done.stdout.decode(encoding), done.stderr.decode(encoding)
    assert done.returncode == 1, err
    assert "internal error" not in err and "gate failed" in err and "above the limit" in err
    rows = [
        line.replace("|", " ").split() for line in out.splitlines() if "relu" in line.lower() and "%" in line
    ]
    assert [row[2:5] for row in rows] == [["32", "3", "9.4%"], ["8", "3", "37.5%"]], out
    assert "6/40" in out
    assert "— gate FAILED" in (tmp_path / "m.md").read_text(encoding="utf-8")  # files stay UTF-8
    # --json - stays exact: JSON is ASCII-escaped, so no name is replaced
    done = subprocess.run(
        [sys.executable, "-m", "deadrelu_cli", *args], capture_output=True, env=env, timeout=120
    )
    assert done.returncode == 1, done.stderr
    report = __import__("json").loads(done.stdout)
    assert report["summary"]["dead"] == 6


def test_a_read_only_home_adds_no_library_chatter_to_the_ci_log(tmp_path):
    """A container's non-root user often has a $HOME it cannot write: onnxruntime printed a coloured
    "Failed to persist telemetry device ID" warning on import (its telemetry, on by default since 1.29,
    also tried the network), matplotlib two lines about a temporary cache folder. A scan's stderr is
    deadrelu's own: here, with -q and a passing model, empty; the HTML still written."""
    (tmp_path / "a-file").write_text("")
    drop = ("HOME", "XDG_", "MPLCONFIGDIR", "ORT_", "PYTHONIOENCODING", "DEADRELU_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    env.update(HOME=str(tmp_path / "a-file" / "home"), PYTHONPATH=str(ROOT))
    args = ["scan", str(MLP_ONNX), "--data", str(MLP_CALIB), "-q", "--html", str(tmp_path / "r.html")]
    done = subprocess.run(
        [sys.executable, "-m", "deadrelu_cli", *args], capture_output=True, env=env, timeout=120, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr.decode() == ""
    assert "6/40" in done.stdout.decode() and (tmp_path / "r.html").stat().st_size > 0


@pytest.mark.parametrize("columns", [20, 45])
def test_a_tiny_columns_keeps_every_layer_name_and_number(cli, tmp_path, monkeypatch, columns):
    """COLUMNS=20 (or 45) in a CI job: the Layer column was dropped and the Op column cut to "r…", so
    rows of numbers named no layer. The table is now printed wider than COLUMNS instead (names folded at
    8 characters); dead counts checked against onnxruntime's own Relu outputs, counted in numpy."""
    import numpy as np
    import onnx
    from truth import onnx_relu_io

    cnn = ROOT / "sample_models" / "cnn"
    relus = ["/relu/Relu", "/relu_1/Relu", "/Relu"]
    x = np.load(cnn / "calib.npz")["input"]
    sites = onnx_relu_io(onnx.load(str(cnn / "model.onnx")), {"input": x}, relus)
    monkeypatch.setenv("COLUMNS", str(columns))
    result = cli("scan", cnn / "model.onnx", "--data", cnn / "calib.npz")
    assert result.code == 0, result.err
    lines = result.out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("Layer"))
    width = lines[header].index("Op")
    end = next(i for i, line in enumerate(lines) if line.startswith("Dead units"))
    rows = lines[header + 2 : end]
    assert "".join(row[:width].strip() for row in rows) == "".join(relus)  # folded, every name there
    numbered = [row[width:].split() for row in rows if row[width:].strip()]
    for name, cells in zip(relus, numbered, strict=True):
        pre = sites[name].pre
        per_unit = np.moveaxis(pre, 1, -1).reshape(-1, pre.shape[1])
        assert cells[:3] == ["relu", str(per_unit.shape[1]), str(int((per_unit <= 0).all(axis=0).sum()))]


def test_force_color_in_a_ci_log_keeps_colours_but_draws_no_progress_and_full_width(cli, monkeypatch):
    """FORCE_COLOR=1 (set in CI for coloured logs) made Rich treat the log as a terminal: the progress
    bar's animation frames (carriage returns, cursor codes) landed in the log, and the table was cut to
    Rich's default 80 columns, losing the bar and Rates columns a CI log keeps (docs/ci.md)."""
    import re

    cnn = ROOT / "sample_models" / "cnn"
    monkeypatch.setenv("FORCE_COLOR", "1")
    monkeypatch.delenv("COLUMNS", raising=False)
    monkeypatch.delenv("NO_COLOR", raising=False)
    result = cli("scan", cnn / "model.onnx", "--data", cnn / "calib.npz")
    assert result.code == 0, result.err
    assert "\x1b[" in result.out  # the colours asked for
    plain = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", result.out)
    header = next(line for line in plain.splitlines() if line.startswith("Layer"))
    assert header.split()[-1] == "Rates", header
    assert "scanning" not in result.err and "\r" not in result.err and "\x1b[?25l" not in result.err


def test_a_dumb_terminal_gets_no_progress_bar(tmp_path):
    """TERM=dumb (an editor's shell buffer, some CI consoles): a terminal, but one that cannot redraw a
    line, so the progress bar could not erase itself and left a blank line (and cursor codes) above the
    table. Run on a real pseudo-terminal."""
    import pty

    master, slave = pty.openpty()
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "FORCE_COLOR", "NO_COLOR")}
    env.update(TERM="dumb", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "deadrelu_cli", "scan", str(MLP_ONNX), "--data", str(MLP_CALIB)]
    with subprocess.Popen(cmd, stdin=slave, stdout=slave, stderr=slave, env=env, cwd=tmp_path) as child:
        os.close(slave)
        chunks = []
        while True:
            try:
                chunk = os.read(master, 4096)
            except OSError:  # the child closed the terminal
                break
            if not chunk:
                break
            chunks.append(chunk)
        assert child.wait(timeout=120) == 0
    os.close(master)
    text = b"".join(chunks).decode()
    assert text.startswith(str(MLP_ONNX)) and "scanning" not in text and "\x1b[?25l" not in text, text[:300]


def test_an_internal_error_without_a_writable_temp_folder_is_still_one_line_and_exit_3(
    cli, monkeypatch, tmp_path
):
    """A read-only container (`docker run --read-only`, no tmpfs): the crash handler's own temp file
    failed, so an internal error became a FileNotFoundError traceback and exit 1 — read as "gate
    failed". Now: one line, exit 3, saying to rerun with --debug."""
    import tempfile

    import deadrelu_cli.config

    def boom(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(deadrelu_cli.config, "find_config", boom)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "no-such-folder"))
    monkeypatch.chdir(tmp_path)
    result = cli("scan", MLP_ONNX, "--data", MLP_CALIB)
    assert result.code == 3
    assert result.err.count("\n") == 1 and "internal error: RuntimeError: boom" in result.err
    assert "--debug" in result.err and "Traceback" not in result.err


def test_no_writable_temp_folder_is_named_not_misreported(cli, monkeypatch, tmp_path):
    """A read-only container without a tmpfs: torch.export.load and TorchScript need a temp folder, and
    their failures read as "the file is truncated or from an incompatible torch" and "check that --data
    fits the model's input" (fix: an internal error). Now one line naming TMPDIR; with TMPDIR set to a
    writable folder the same scan counts the sample CNN's planted dead units (8 of 36, README)."""
    import tempfile

    cnn = ROOT / "sample_models" / "cnn"
    monkeypatch.setattr(tempfile, "tempdir", None)
    monkeypatch.setattr(tempfile, "_candidate_tempdir_list", lambda: [str(tmp_path / "read-only")])
    for model in ("model.pt2", "model.torchscript.pt"):
        result = cli("scan", cnn / model, "--data", cnn / "calib.npz")
        assert result.code == 2 and result.err.count("\n") == 1, result.err
        assert "writable temporary folder" in result.err and "TMPDIR" in result.err, result.err
    # --html: said before the scan, not after its table (matplotlib needs the folder at the end)
    result = cli("scan", MLP_ONNX, "--data", MLP_CALIB, "--html", tmp_path / "r.html")
    assert result.code == 2 and "TMPDIR" in result.err and result.out == "", result.out
    (tmp_path / "read-only").mkdir()  # now there is one
    result = cli("scan", cnn / "model.pt2", "--data", cnn / "calib.npz")
    assert result.code == 0 and "8/36" in result.out, result.err


def test_columns_zero_still_prints_the_verdict_and_errors(cli, monkeypatch):
    """COLUMNS=0 (a pseudo-terminal without a size: `docker exec -t`, some runners): Rich took it as a
    width of 0 and printed only the table — no header, no "Dead units" line, and on stderr neither the
    gate's reason nor "gate failed". Now it counts as unset (full width in a log)."""
    monkeypatch.setenv("COLUMNS", "0")
    result = cli("scan", MLP_ONNX, "--data", MLP_CALIB, "--max-dead", "0.01")
    assert result.code == 1
    assert str(MLP_ONNX) in result.out and "Dead units: 6/40 (15.0%)" in result.out, result.out
    assert "above the limit 1.0%" in result.err and "gate failed" in result.err, result.err


def test_narrow_columns_never_cut_a_number_in_any_table(cli, monkeypatch):
    """COLUMNS=30: the per-unit table (`--layer`) showed "66…" for an active rate and "0.…" for a bias,
    `diff` folded "2/8 (25.0%)" into "2/8 (25 .0% )". Every table is now printed at least as wide as its
    columns' longest word. Active rates checked against onnxruntime's Relu inputs, counted in numpy."""
    import numpy as np
    import onnx
    from truth import onnx_relu_io

    cnn = ROOT / "sample_models" / "cnn"
    x = np.load(cnn / "calib.npz")["input"]
    pre = onnx_relu_io(onnx.load(str(cnn / "model.onnx")), {"input": x}, ["/relu/Relu"])["/relu/Relu"].pre
    rates = (np.moveaxis(pre, 1, -1).reshape(-1, pre.shape[1]) > 0).mean(axis=0)
    monkeypatch.setenv("COLUMNS", "30")
    result = cli("scan", cnn / "model.onnx", "--data", cnn / "calib.npz", "--layer", "/relu/Relu")
    assert result.code == 0, result.err
    rows = [
        line.split()
        for line in result.out.splitlines()
        if line.strip()[:1].isdigit() and len(line.split()) == 6
    ]
    assert [row[0] for row in rows] == [str(u) for u in range(len(rates))], result.out
    assert [row[2] for row in rows] == [f"{100 * r:.2f}%" for r in rates], result.out
    assert "…" not in "".join(" ".join(row) for row in rows)


_CUSTOM_OP_EXPORT = """
import sys, numpy as np, torch
@torch.library.custom_op("deadrelu_test44::twice", mutates_args=())
def twice(x: torch.Tensor) -> torch.Tensor:
    return x * 2
@twice.register_fake
def _(x):
    return torch.empty_like(x)
class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(4, 4)
    def forward(self, x):
        return torch.relu(twice(self.fc(x)))
torch.export.save(torch.export.export(Net(), (torch.randn(2, 4),)), sys.argv[1])
np.savez(sys.argv[2], x=np.random.default_rng(0).standard_normal((8, 4)).astype("float32"))
"""


def test_a_program_calling_a_custom_op_this_process_lacks_is_one_line(tmp_path):
    """A .pt2 whose graph calls a custom operator (transformers' grouped_mm experts, any torch.library op)
    loads only where the op is registered. With --trust-pickle, torch.export.load logged a whole traceback
    as warnings on stderr and raised "check the warnings above"; deadrelu then said "the file is truncated
    or from an incompatible torch". Now one line naming the operator and what to do, exit 2."""
    program, data = tmp_path / "custom.pt2", tmp_path / "calib.npz"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, "-c", _CUSTOM_OP_EXPORT, program, data], check=True, env=env, timeout=300)
    scan = [sys.executable, "-m", "deadrelu_cli", "scan", program, "--data", data]
    refused = subprocess.run(scan, capture_output=True, text=True, env=env, timeout=300)
    assert refused.returncode == 2 and "not pure tensor math" in refused.stderr  # the code policy first
    trusted = subprocess.run([*scan, "--trust-pickle"], capture_output=True, text=True, env=env, timeout=300)
    assert trusted.returncode == 2, trusted.stderr
    assert trusted.stderr.count("\n") == 1, trusted.stderr  # no traceback, no logged warnings
    assert "torch.ops.deadrelu_test44.twice.default" in trusted.stderr
    assert "custom operator" in trusted.stderr and "truncated" not in trusted.stderr
