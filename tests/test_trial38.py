"""Front-door checks (README/docs as pasted): --weights-key messages and notes say what to do."""

import json

import numpy as np
import torch

from tests.conftest import ROOT

ARCH = ROOT / "sample_models" / "mlp" / "arch.py"
CALIB = ROOT / "sample_models" / "mlp" / "calib.npz"
STATE = ROOT / "sample_models" / "mlp" / "model.pt"  # a plain state_dict


def test_weights_key_on_a_plain_state_dict_says_to_leave_it_out(cli):
    # before: "no weight dict under that key (weight dicts: none)", with nothing to do
    result = cli("scan", STATE, "--arch", f"{ARCH}:build", "--data", CALIB, "--weights-key", "ema")
    assert result.code == 2 and len(result.err.strip().splitlines()) == 1
    assert "leave out --weights-key" in result.err and "none" not in result.err


def test_second_weight_dict_note_names_the_option(cli, tmp_path):
    """README: a second weight dict beside the model's is named in a note and `--weights-key NAME` reads
    it; the note said to save it on its own with torch.save instead."""
    state = torch.load(STATE, weights_only=True)
    ema = {k: v.clone() for k, v in state.items()}
    ema["fc1.bias"] -= 2.0  # another set of weights: more fc1 units dead than in `model`
    torch.save({"model": state, "ema": ema, "epoch": 3}, tmp_path / "ckpt.pt")
    result = cli("scan", tmp_path / "ckpt.pt", "--arch", f"{ARCH}:build", "--data", CALIB)
    assert result.code == 0, result.err
    assert "--weights-key 'ema'" in result.out + result.err
    assert "torch.save(torch.load" not in result.out + result.err
    # the option the note names reads those weights: fc1's dead units of `ema`, counted by hand
    x = np.load(CALIB)["input"].astype(np.float64)
    pre = x @ ema["fc1.weight"].double().numpy().T + ema["fc1.bias"].double().numpy()
    dead = sorted(np.flatnonzero(~(pre > 0).any(0)).tolist())
    scanned = cli("scan", tmp_path / "ckpt.pt", "--arch", f"{ARCH}:build", "--data", CALIB,
                  "--weights-key", "ema", "--json", tmp_path / "r.json")  # fmt: skip
    assert scanned.code == 0, scanned.err
    layers = json.loads((tmp_path / "r.json").read_text())["layers"]
    assert layers[0]["name"] == "act1" and layers[0]["dead_indices"] == dead


def test_help_names_todays_unseen_activations_and_json_text(cli):
    """`--allow-unseen` passes torch ReLUs the probe cannot read too (an nn.RNN's kernel: README "What
    the scan sees"), and `--text` reads .json; the help spoke of ONNX nodes and .jsonl only."""
    import re

    for command in ("scan", "gate"):
        result = cli(command, "--help")
        assert result.code == 0
        flat = re.sub(r"[\s│]+", " ", result.out)
        allow = flat.split("--allow-unseen", 1)[1].split("--allow-unpaired", 1)[0]
        assert "nn.RNN" in allow, allow
    flat = re.sub(r"[\s│]+", " ", cli("scan", "--help").out)
    assert ".json," in flat.split("--text ", 1)[1].split("--text-field", 1)[0]


def test_fix_help_says_seed_drives_kick(cli, tmp_path):
    """`fix --seed` seeds kick's push too (two seeds, two different pushes); the help named reinit and
    bias-shift only."""
    import re

    seed_help = (
        re.sub(r"[\s│]+", " ", cli("fix", "--help").out).split("--seed", 1)[1].split("--target-rate")[0]
    )
    assert "kick" in seed_help, seed_help
    written = []
    for seed in (0, 1):
        out = tmp_path / f"k{seed}.pt"
        result = cli("fix", STATE, "--arch", f"{ARCH}:build", "--data", CALIB, "-s", "kick", "-o", out,
                     "--seed", seed, "--force", "-q")  # fmt: skip
        assert result.code == 0, result.err
        written.append(torch.load(out, weights_only=True)["fc1.weight"])
    assert not torch.equal(written[0], written[1])


class _WithRnn(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(4, 6)
        self.rnn = torch.nn.RNN(6, 5, nonlinearity="relu", batch_first=True)

    def forward(self, x):
        y, _ = self.rnn(torch.relu(self.fc(x)).unsqueeze(1))
        return y.squeeze(1)


def test_report_schema_describes_torch_unseen_activations(cli, tmp_path):
    """docs/report-schema.md said `unseen_activations` was ONNX nodes; a torch scan writes its nn.RNN's
    ReLU kernel there, keyed as the page now shows."""
    torch.manual_seed(0)
    torch.save(_WithRnn().state_dict(), tmp_path / "m.pt")
    np.savez(tmp_path / "c.npz", x=np.random.default_rng(0).standard_normal((8, 4)).astype(np.float32))
    result = cli("scan", tmp_path / "m.pt", "--arch", f"{__file__}:_WithRnn", "--data", tmp_path / "c.npz",
                 "--json", tmp_path / "r.json", "--allow-unseen")  # fmt: skip
    assert result.code == 0, result.err
    unseen = json.loads((tmp_path / "r.json").read_text())["unseen_activations"]
    assert unseen == {"rnn: RNN(activation=Relu)": 1}
    row = next(line for line in (ROOT / "docs" / "report-schema.md").read_text().splitlines()
               if line.startswith("| `unseen_activations`"))  # fmt: skip
    assert "`rnn: RNN(activation=Relu)`" in row and "torch" in row


class _RnnThenReluOut(_WithRnn):
    def forward(self, x):
        return torch.relu(super().forward(x))  # a ReLU on the output: the relu-on-output check


def test_inspect_prints_each_finding_on_its_own_line(cli, tmp_path):
    """docs/causes.md: structural checks are `warning:` lines in inspect as in scan; inspect glued them
    and the unseen-RNN note into one `note:` line ("…before the last layer; not countable …")."""
    torch.save(_RnnThenReluOut().state_dict(), tmp_path / "m.pt")
    result = cli("inspect", tmp_path / "m.pt", "--arch", f"{__file__}:_RnnThenReluOut", "--input-shape", "4")
    assert result.code == 0, result.err
    lines = result.out.splitlines()
    warning = [line for line in lines if line.startswith("warning: relu-on-output:")]
    unseen = [line for line in lines if line.startswith("note: not countable")]
    assert len(warning) == 1 and len(unseen) == 1, result.out
    assert "not countable" not in warning[0] and "rnn: RNN(activation=Relu)" in unseen[0]


def test_trend_names_the_weight_dict_it_did_not_read(cli, tmp_path):
    """scan notes a second weight dict beside the one it reads; trend read 'model' of {model, ema}
    checkpoints without a word. With --weights-key ema it trends the EMA weights (fc1 by hand)."""
    state = torch.load(STATE, weights_only=True)
    x = np.load(CALIB)["input"].astype(np.float64)
    truth = []
    for step in (1, 2):
        ema = {k: v.clone() for k, v in state.items()}
        ema["fc1.bias"] -= 1.5 * step
        torch.save({"model": state, "ema": ema, "step": step}, tmp_path / f"ckpt-{step}.pt")
        pre = x @ ema["fc1.weight"].double().numpy().T + ema["fc1.bias"].double().numpy()
        truth.append(float((~(pre > 0).any(0)).mean()))
    args = (
        "trend",
        tmp_path / "ckpt-1.pt",
        tmp_path / "ckpt-2.pt",
        "--data",
        CALIB,
        "--arch",
        f"{ARCH}:build",
    )
    result = cli(*args)
    assert result.code == 0, result.err
    assert "it also holds 'ema'" in result.out and "--weights-key 'ema'" in result.out
    result = cli(*args, "--weights-key", "ema", "--json", tmp_path / "t.json")
    assert result.code == 0, result.err
    layers = json.loads((tmp_path / "t.json").read_text())["layers"]
    act1 = next(layer for layer in layers if layer["name"] == "act1")
    assert act1["dead_fraction"] == truth, (act1, truth)
