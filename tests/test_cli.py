"""The command line: exit codes, one-line errors, JSON on stdout, the table, --help without torch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jsonschema
import numpy as np
import pytest
import torch
from conftest import ROOT, arch, arch_file, save_npz, save_state_dict

SAMPLES = ROOT / "sample_models"
MLP = [
    str(SAMPLES / "mlp" / "model.pt"),
    "--arch",
    str(SAMPLES / "mlp" / "arch.py") + ":build",
    "--data",
    str(SAMPLES / "mlp" / "calib.npz"),
]


def test_scan_prints_table_and_summary(cli):
    result = cli("scan", *MLP)
    assert result.code == 0, result.err
    assert "act1" in result.out and "relu()" in result.out
    assert "Dead units: 6/40 (15.0%) in 2 of 2 layers" in result.out


def test_json_to_stdout_is_pure_json_and_valid(cli):
    result = cli("scan", *MLP, "--json", "-")
    assert result.code == 0, result.err
    report = json.loads(result.out)
    schema = json.loads((ROOT / "deadrelu_cli" / "report" / "schema_v2.json").read_text())
    jsonschema.validate(report, schema)
    layer = report["layers"][1]
    assert layer["name"] == "relu()" and layer["dead_indices"] == [2, 4, 6]
    assert report["summary"]["dead"] == 6 and report["model"]["format"] == "state_dict"
    assert len(report["model"]["sha256"]) == 64


def test_json_file_written_atomically(cli, tmp_path):
    out = tmp_path / "report.json"
    result = cli("scan", *MLP, "--json", out)
    assert result.code == 0, result.err
    assert json.loads(out.read_text())["schema_version"] == 2
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]  # no temp file left


def test_refuses_to_overwrite_input_with_json(cli, tmp_path):
    data = tmp_path / "d.npz"
    data.write_bytes((SAMPLES / "mlp" / "calib.npz").read_bytes())
    before = data.read_bytes()
    result = cli("scan", MLP[0], "--arch", MLP[2], "--data", data, "--json", data)
    assert result.code == 2 and "refusing to overwrite" in result.err
    assert data.read_bytes() == before


def test_layer_drill_down(cli):
    result = cli("scan", *MLP, "--layer", "relu()")
    assert result.code == 0, result.err
    lines = [line for line in result.out.splitlines() if "DEAD" in line]
    assert len(lines) == 3 and all(b in result.out for b in ("-8", "-10", "-15"))


def test_unknown_layer_is_usage_error(cli):
    result = cli("scan", *MLP, "--layer", "nope")
    assert result.code == 2 and "no layer named 'nope'" in result.err


@pytest.mark.parametrize(("limit", "code"), [("0.2", 0), ("0.1", 1)])
def test_max_dead_gate(cli, limit, code):
    result = cli("scan", *MLP, "--max-dead", limit)
    assert result.code == code
    if code:
        assert "model: 15.0% of units are dead (6/40), above the limit 10.0%" in result.err
        assert "gate failed: 1 limit(s) exceeded" in result.err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["scan", "missing.pt", "--data", "x.npz"], "no such file"),
        (
            ["scan", str(SAMPLES / "mlp" / "model.pt"), "--data", str(SAMPLES / "mlp" / "calib.npz")],
            "pass --arch",
        ),
        (
            [
                "scan",
                str(SAMPLES / "mlp" / "model.pt"),
                "--arch",
                "nowhere_module_xyz:build",
                "--data",
                str(SAMPLES / "mlp" / "calib.npz"),
            ],
            "cannot import module",
        ),
        (
            [
                "scan",
                str(SAMPLES / "mlp" / "model.pt"),
                "--arch",
                str(SAMPLES / "mlp" / "arch.py") + ":nothing",
                "--data",
                str(SAMPLES / "mlp" / "calib.npz"),
            ],
            "no callable 'nothing'",
        ),
        (
            [
                "scan",
                str(SAMPLES / "mlp" / "model.pt"),
                "--arch",
                str(SAMPLES / "cnn" / "arch.py") + ":build",
                "--data",
                str(SAMPLES / "mlp" / "calib.npz"),
            ],
            "weights do not fit --arch",
        ),
        (["scan", *MLP, "--device", "tpu"], "choose auto, cpu or cuda"),
        (["scan", str(SAMPLES), "--data", "x.npz"], "is a directory"),
    ],
)
def test_input_errors_are_one_line_exit_2(cli, args, message):
    result = cli(*args)
    assert result.code == 2, (result.out, result.err)
    assert message in result.err
    assert len(result.err.strip().splitlines()) == 1
    assert "Traceback" not in result.err


def test_wrong_feature_count(cli, tmp_path):
    data = save_npz(tmp_path / "d.npz", x=np.zeros((4, 20), np.float32))
    result = cli("scan", *MLP[:3], "--data", data)
    assert result.code == 2
    assert "samples have 20 features (shape [4, 20]) but the model's first Linear expects 16" in result.err


def test_recurrent_first_layer_is_not_mistaken_for_the_linear_after_it(cli, tmp_path):
    """resemblyzer's VoiceEncoder: LSTM(40 -> 256) then Linear(256 -> 256) -> ReLU. Its data have 40
    features; the Linear's 256 is no reason to refuse it. Counts checked against plain torch."""
    model, arch_spec = arch_file(
        tmp_path / "arch.py",
        "import torch\nfrom torch import nn\n\n"
        "class Encoder(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.lstm = nn.LSTM(40, 32, 2, batch_first=True)\n"
        "        self.linear = nn.Linear(32, 16)\n"
        "        self.relu = nn.ReLU()\n\n"
        "    def forward(self, mels):\n"
        "        _, (hidden, _) = self.lstm(mels)\n"
        "        return self.relu(self.linear(hidden[-1]))\n\n"
        "def build():\n    torch.manual_seed(0)\n    return Encoder()\n",
    )
    weights = save_state_dict(model, tmp_path / "enc.pt")
    x = np.random.default_rng(0).standard_normal((10, 12, 40)).astype(np.float32)
    data = save_npz(tmp_path / "mels.npz", mels=x)
    result = cli("scan", weights, "--arch", arch_spec, "--data", data, "--json", "-")
    assert result.code == 0, result.err
    with torch.no_grad():
        _, (hidden, _) = model.lstm(torch.from_numpy(x))
        pre = model.linear(hidden[-1])
    (layer,) = json.loads(result.out)["layers"]
    assert layer["positive_counts"] == (pre > 0).sum(0).tolist()


def test_cuda_requested_without_gpu(cli):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the no-GPU message cannot be exercised here")
    result = cli("scan", *MLP, "--device", "cuda")
    assert result.code == 2 and "no CUDA device" in result.err


def test_cuda_requested_for_onnx_without_the_cuda_provider(cli):
    """As for torch models: --device cuda that cannot be honoured is an error, not a quiet CPU run."""
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("onnxruntime has the CUDA provider here: the message cannot be exercised")
    from conftest import ROOT

    onnx_mlp = ROOT / "sample_models" / "mlp"
    result = cli("scan", onnx_mlp / "model.onnx", "--data", onnx_mlp / "calib.npz", "--device", "cuda")
    assert result.code == 2 and "CUDAExecutionProvider" in result.err and "--device cpu" in result.err
    assert len(result.err.strip().splitlines()) == 1


def test_debug_shows_traceback(cli):
    result = cli("scan", "missing.pt", "--data", "x.npz", "--debug")
    assert result.code == 2 and "Traceback" in result.err


def test_internal_error_exit_3(cli, monkeypatch, tmp_path):
    import tempfile

    import deadrelu_cli.engine as engine

    def boom(_options):
        raise ZeroDivisionError("planted")

    monkeypatch.setattr(engine, "run_scan_detailed", boom)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the crash log lands here, not in /tmp
    result = cli("scan", *MLP)
    assert result.code == 3
    assert "internal error: ZeroDivisionError: planted" in result.err and "please report" in result.err


def test_nan_in_data(cli, tmp_path, planted_module):
    x = np.zeros((5, 4), np.float32)
    x[3, 1] = np.nan
    ckpt = save_state_dict(planted_module.eight_neuron(), tmp_path / "m.pt")
    result = cli("scan", ckpt, "--arch", arch("eight_neuron"), "--data", save_npz(tmp_path / "d.npz", x=x))
    assert result.code == 2 and "NaN or Inf at sample 3" in result.err
    result = cli(
        "scan", ckpt, "--arch", arch("eight_neuron"), "--data", tmp_path / "d.npz", "--allow-nonfinite"
    )
    assert result.code == 0


def test_pickle_refused_names_flag(cli, tmp_path, planted_module):
    torch.save(planted_module.eight_neuron(), tmp_path / "whole.pt")
    data = save_npz(tmp_path / "d.npz", x=np.zeros((3, 4), np.float32))
    result = cli("scan", tmp_path / "whole.pt", "--data", data)
    assert result.code == 2 and "--trust-pickle" in result.err
    assert cli("scan", tmp_path / "whole.pt", "--data", data, "--trust-pickle").code == 0


def test_inspect_lists_sites(cli):
    result = cli("inspect", str(SAMPLES / "cnn" / "model.pt2"))
    assert result.code == 0, result.err
    for name in ("relu", "relu#2", "relu()"):
        assert name in result.out
    eager = cli(
        "inspect",
        str(SAMPLES / "cnn" / "model.pt"),
        "--arch",
        str(SAMPLES / "cnn" / "arch.py") + ":build",
        "--input-shape",
        "3x16x16",
    )
    assert eager.code == 0 and "relu#2" in eager.out and "bn2" in eager.out


def test_version(cli):
    from deadrelu_cli import __version__

    result = cli("--version")
    assert result.code == 0 and __version__ in result.out


def test_help_does_not_import_torch():
    code = (
        "import sys\n"
        "from deadrelu_cli.cli.app import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit as e:\n    assert e.code in (0, None), e.code\n"
        "heavy = [m for m in ('torch', 'onnx', 'onnxruntime', 'numpy') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "main(['scan', '--help'])\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "--data" in proc.stdout


def test_console_script_and_module_entry_points():
    proc = subprocess.run(
        [sys.executable, "-m", "deadrelu_cli", "--version"], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0 and "deadrelu" in proc.stdout
    script = Path(sys.executable).parent / "deadrelu"
    proc = subprocess.run(
        [str(script), "scan", "nope.pt", "--data", "x.npz"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2 and proc.stderr.startswith("deadrelu: error:")


def test_inspect_says_which_sites_a_scan_counts(cli, tmp_path):
    """inspect lists every activation it sees; when some are outside --ops, it says how many a scan
    counts and the --ops that counts them all."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = np.ones((4, 4), np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w"], ["a"], name="mm1"),
            helper.make_node("Relu", ["a"], ["r"], name="relu"),
            helper.make_node("MatMul", ["r", "w"], ["b"], name="mm2"),
            helper.make_node("LeakyRelu", ["b"], ["y"], name="leaky", alpha=0.1),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
        [numpy_helper.from_array(w, "w")],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "m.onnx")
    result = cli("inspect", tmp_path / "m.onnx")
    assert result.code == 0, result.err
    assert "scan counts --ops relu,relu6: 1 of these 2 sites" in result.out
    assert "--ops relu,relu6,leaky_relu" in result.out
    everything = cli("inspect", tmp_path / "m.onnx", "--ops", "relu,leaky_relu")
    assert everything.code == 0 and "scan counts" not in everything.out
