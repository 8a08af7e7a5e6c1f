"""Regression tests of polish36: which settings file a command reads, and what it says when it passes
one over (README "Configuration")."""

from __future__ import annotations

from conftest import ROOT

MLP_ONNX = ROOT / "sample_models" / "mlp" / "model.onnx"  # 6 of its 40 units are dead (README)
MLP_CALIB = MLP_ONNX.parent / "calib.npz"


def _shared_parent_with_checkout(tmp_path, parent_settings: str):
    """/tmp-like folder (sticky, anyone may write) holding PARENT_SETTINGS as pyproject.toml, and a
    checkout of one's own inside it."""
    shared = tmp_path / "shared"
    checkout = shared / "checkout"
    checkout.mkdir(parents=True)
    (shared / "pyproject.toml").write_text(parent_settings)
    shared.chmod(0o1777)
    return checkout


def test_an_invalid_pyproject_someone_else_could_plant_above_is_passed_over_with_a_warning(
    cli, tmp_path, monkeypatch
):
    """An invalid /tmp/pyproject.toml (anyone can write one) stopped every command run under /tmp with
    exit 2. It cannot be our settings file: passed over with a warning, the scan runs (exit 0: no limits)."""
    checkout = _shared_parent_with_checkout(tmp_path, "[tool.deadrelu\nmax-dead = 0.0\n")
    monkeypatch.chdir(checkout)
    try:
        result = cli("scan", MLP_ONNX, "--data", MLP_CALIB)
        assert result.code == 0, result.err
        assert "6/40" in result.out
        assert "warning:" in result.err and "invalid TOML" in result.err and "passed over" in result.err
        # the checkout's own settings still apply, and the planted file is not even read then
        (checkout / "pyproject.toml").write_text("[tool.deadrelu]\nmax-dead = 0.0\n")
        result = cli("scan", MLP_ONNX, "--data", MLP_CALIB)
        assert result.code == 1 and "passed over" not in result.err, result.err
    finally:
        (tmp_path / "shared").chmod(0o755)


def test_an_invalid_pyproject_of_ones_own_stops_the_command(cli, tmp_path, monkeypatch):
    """One's own pyproject.toml that cannot be parsed may hold [tool.deadrelu] limits: running on the
    defaults would let a gate pass that the limits fail. One line, exit 2, saying what to do."""
    (tmp_path / "pyproject.toml").write_text("[tool.deadrelu]\nmax-dead = \n")
    monkeypatch.chdir(tmp_path)
    result = cli("scan", MLP_ONNX, "--data", MLP_CALIB)
    assert result.code == 2 and "invalid TOML" in result.err and "--config" in result.err, result.err
    assert result.err.count("\n") == 1


def test_two_settings_files_in_one_folder_are_refused_not_one_silently_ignored(cli, tmp_path, monkeypatch):
    """deadrelu.toml used to win over pyproject.toml [tool.deadrelu] in the same folder without a word:
    the pyproject's max-dead = 0 was ignored and the gate passed."""
    (tmp_path / "pyproject.toml").write_text("[tool.deadrelu]\nmax-dead = 0.0\n")
    (tmp_path / "deadrelu.toml").write_text("max-dead = 0.5\n")
    monkeypatch.chdir(tmp_path)
    result = cli("scan", MLP_ONNX, "--data", MLP_CALIB)
    assert result.code == 2 and "keep one" in result.err, result.err
    assert result.err.count("\n") == 1
    # --config names the one to use
    result = cli("scan", MLP_ONNX, "--data", MLP_CALIB, "--config", str(tmp_path / "pyproject.toml"))
    assert result.code == 1, result.err
    # a pyproject.toml without our table beside a deadrelu.toml is no conflict
    (tmp_path / "pyproject.toml").write_text("[project]\nname = 'x'\n")
    result = cli("scan", MLP_ONNX, "--data", MLP_CALIB)
    assert result.code == 0, result.err


def test_fix_and_merge_take_quiet_as_scan_report_and_gate_do(cli, tmp_path):
    """`fix … -q` and `merge … -q` were usage errors (exit 2) although every other command takes -q."""
    import numpy as np
    import onnx

    out = tmp_path / "fixed.onnx"
    result = cli("fix", MLP_ONNX, "--data", MLP_CALIB, "--strategy", "leaky", "--output", out, "-q")
    assert result.code == 0, result.err
    assert "Layer" not in result.out and result.out.strip() == f"written: {out}"
    assert [n.op_type for n in onnx.load(out).graph.node].count("LeakyRelu") == 2

    calib = np.load(MLP_CALIB)
    (name,) = calib.files
    halves = []
    for i, part in enumerate(np.array_split(calib[name], 2)):
        np.savez(tmp_path / f"part{i}.npz", **{name: part})
        halves.append(tmp_path / f"part{i}.json")
        assert (
            cli("scan", MLP_ONNX, "--data", tmp_path / f"part{i}.npz", "--json", halves[-1], "-q").code == 0
        )
    merged = tmp_path / "merged.json"
    result = cli("merge", *halves, "--json", merged, "-q")
    assert result.code == 0 and result.err == "" and result.out == "", result.err
    assert merged.is_file()


def test_markdown_summary_counts_saturated_units_as_the_terminal_does(cli, tmp_path, planted_module):
    """The Markdown summary ($GITHUB_STEP_SUMMARY) left out the saturated ReLU6 units the terminal's
    summary line shows. Truth: the test's own hook on the ReLU6's input."""
    import numpy as np
    import torch
    from conftest import arch, save_npz, save_state_dict

    model = planted_module.graded().eval()
    x = np.random.default_rng(0).standard_normal((64, 3)).astype(np.float32)
    seen = {}
    model.act6.register_forward_hook(lambda m, i, o: seen.setdefault("pre", i[0].detach()))
    with torch.no_grad():
        model(torch.from_numpy(x))
    saturated = int((seen["pre"] >= 6).all(dim=0).sum())
    assert saturated >= 1  # the planted unit (bias +100)
    weights = save_state_dict(model, tmp_path / "m.pt")
    data = save_npz(tmp_path / "x.npz", x=x)
    md = tmp_path / "summary.md"
    result = cli("scan", weights, "--arch", arch("graded"), "--data", data, "--markdown", md)
    assert result.code == 0, result.err
    assert f"saturated {saturated}" in result.out
    assert f"saturated {saturated}" in md.read_text()
