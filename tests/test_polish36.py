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


def _chain_onnx(path, ops: list[str], opset: int = 20):
    """x[N,4] -> MatMul -> OPS… -> y (no ReLU anywhere)."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    nodes, last = [helper.make_node("MatMul", ["x", "w"], ["h0"])], "h0"
    for i, op in enumerate(ops):
        nodes.append(helper.make_node(op, [last], [f"h{i + 1}"]))
        last = f"h{i + 1}"
    nodes.append(helper.make_node("Identity", [last], ["y"]))
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 4])],
        initializer=[numpy_helper.from_array(np.eye(4, dtype=np.float32), "w")],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)]), str(path))
    return path


def test_the_no_relu_note_suggests_only_ops_that_would_find_something(cli, tmp_path):
    """The note on a model without ReLUs suggested `--ops leaky_relu,elu,gelu` whatever it had: for a
    GELU written out with Tanh (T5 int8) `--ops gelu` finds nothing, and a LeakyReLU-only model got no
    hint at all. Each suggestion is checked by running it: it must find sites."""
    import numpy as np

    data = tmp_path / "d.npz"
    np.savez(data, x=np.random.default_rng(0).standard_normal((6, 4)).astype(np.float32))
    cases = {
        "leaky": (["LeakyRelu"], "--ops leaky_relu"),
        "tanh": (["Tanh", "Tanh"], None),
        "gelu": (["Gelu"], "--ops gelu"),
    }
    for name, (ops, hint) in cases.items():
        model = _chain_onnx(tmp_path / f"{name}.onnx", ops)
        result = cli("scan", model, "--data", data, "--allow-no-sites")
        note = " ".join(result.out.split())
        assert result.code == 0 and f"{ops[0]} ×{len(ops)}" in note, (name, result.err, note)
        if hint is None:
            assert "--ops" not in note, note
            continue
        assert hint in note, note
        found = cli("scan", model, "--data", data, *hint.split(), "--json", "-")
        assert found.code == 0 and len(found.json()["layers"]) == len(ops), found.err


def test_the_no_relu_note_of_an_exported_program_lists_its_leaky_relus(cli, tmp_path):
    """.pt2 graphs spell the op `leaky_relu`; the note's list looked for `leakyrelu` and said nothing."""
    import numpy as np
    import torch

    class Leaky(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(4, 4)

        def forward(self, x):
            return torch.nn.functional.leaky_relu(self.fc(x), 0.1)

    path = tmp_path / "leaky.pt2"
    torch.export.save(torch.export.export(Leaky().eval(), (torch.zeros(2, 4),)), path)
    data = tmp_path / "d.npz"
    np.savez(data, x=np.random.default_rng(0).standard_normal((6, 4)).astype(np.float32))
    result = cli("scan", path, "--data", data, "--allow-no-sites")
    note = " ".join(result.out.split())
    assert result.code == 0 and "leaky_relu ×1" in note and "--ops leaky_relu" in note, (result.err, note)
