"""Model files that carry code: TorchScript source and .pt2 graphs are read before they are loaded.

Each payload is built here and is live: with --trust-pickle (the explicit opt-out) it does overwrite
the victim file, so the refusal without the flag is what keeps the file intact."""

from __future__ import annotations

import io
import json
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import save_npz
from torch import nn

from deadrelu_cli.loaders.code_policy import exported_violations, torchscript_violations

VICTIM_BYTES = b"precious user data\n"


@pytest.fixture
def victim(tmp_path) -> Path:
    path = tmp_path / "victim.txt"
    path.write_bytes(VICTIM_BYTES)
    return path


@pytest.fixture
def data(tmp_path) -> Path:
    return save_npz(tmp_path / "x.npz", x=np.random.default_rng(0).normal(size=(8, 4)).astype(np.float32))


def _refused(result, needle: str) -> None:
    assert result.code == 2, result.err
    lines = result.err.strip().splitlines()
    assert len(lines) == 1, result.err
    assert needle in lines[0] and "--trust-pickle" in lines[0], lines[0]


def _forward_payload(path: Path, victim: Path) -> Path:
    target = str(victim)

    class Evil(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.target = target

        def forward(self, x):
            t = torch.from_file(self.target, shared=True, size=4, dtype=torch.uint8)
            t.fill_(65)
            return torch.relu(self.fc(x)) + t.sum().float() * 0

    torch.jit.script(Evil()).save(str(path))
    return path


def _setstate_payload(path: Path, victim: Path) -> Path:
    target = str(victim)

    class EvilState(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.k = torch.zeros(1)
            self.target = target

        def forward(self, x):
            return torch.relu(self.fc(x)) + self.k

        @torch.jit.export
        def __getstate__(self):
            return (self.k, self.training, self.target)

        @torch.jit.export
        def __setstate__(self, state: tuple[torch.Tensor, bool, str]):
            t = torch.from_file(state[2], shared=True, size=4, dtype=torch.uint8)
            t.fill_(66)
            self.k = state[0] + t.sum().float() * 0
            self.training = state[1]
            self.target = state[2]

    torch.jit.script(EvilState()).save(str(path))
    return path


class Plain(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        t = torch.zeros(4, dtype=torch.uint8)
        t.fill_(65)
        return torch.relu(self.fc(x)) + t.sum().float() * 0


def _rewrite_pt2(source: Path, target: Path, edit) -> Path:
    with zipfile.ZipFile(source) as src, zipfile.ZipFile(target, "w") as out:
        for info in src.infolist():
            out.writestr(info, edit(info.filename, src.read(info.filename)))
    return target


def _graph_payload(tmp_path: Path, victim: Path) -> Path:
    """A .pt2 whose serialized graph was edited by hand: aten.zeros became aten.from_file(victim, shared)."""
    base = tmp_path / "base.pt2"
    torch.export.save(torch.export.export(Plain(), (torch.randn(2, 4),)), str(base))

    def edit(name: str, raw: bytes) -> bytes:
        if "/models/" not in name or not name.endswith(".json"):
            return raw
        document = json.loads(raw)
        for node in document["graph_module"]["graph"]["nodes"]:
            if node["target"] == "torch.ops.aten.zeros.default":
                node["target"] = "torch.ops.aten.from_file.default"
                node["inputs"] = [
                    {"name": "filename", "arg": {"as_string": str(victim)}, "kind": 1},
                    {"name": "shared", "arg": {"as_bool": True}, "kind": 1},
                    {"name": "size", "arg": {"as_int": 4}, "kind": 1},
                    {"name": "dtype", "arg": {"as_scalar_type": 1}, "kind": 2},
                ]
        return json.dumps(document).encode()

    return _rewrite_pt2(base, tmp_path / "evil_graph.pt2", edit)


class Marker:
    """Unpickling this creates a marker file (a stand-in for any code a pickle can run)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (os.mkdir, (self.path,))


def _sample_inputs_payload(tmp_path: Path, marker: Path) -> Path:
    """torch.export.load retries the archive's sample inputs with weights_only=False when the safe load fails."""
    base = tmp_path / "base.pt2"
    torch.export.save(torch.export.export(Plain(), (torch.randn(2, 4),)), str(base))
    buffer = io.BytesIO()
    torch.save(((Marker(str(marker)),), {}), buffer)
    return _rewrite_pt2(
        base,
        tmp_path / "evil_inputs.pt2",
        lambda name, raw: buffer.getvalue() if "sample_inputs" in name else raw,
    )


@pytest.mark.parametrize("command", ["scan", "inspect"])
def test_torchscript_forward_that_writes_a_file_is_refused(cli, tmp_path, victim, data, command):
    model = _forward_payload(tmp_path / "evil.pt", victim)
    args = ["scan", model, "--data", data] if command == "scan" else ["inspect", model]
    _refused(cli(*args), "aten::from_file")
    assert victim.read_bytes() == VICTIM_BYTES
    # the payload is live: trusting the file lets it overwrite the victim's first bytes
    cli("scan", model, "--data", data, "--trust-pickle", "-q")
    assert victim.read_bytes() == b"AAAA" + VICTIM_BYTES[4:]


def test_torchscript_setstate_that_writes_a_file_is_refused_on_inspect(cli, tmp_path, victim):
    model = _setstate_payload(tmp_path / "evil_state.pt", victim)
    _refused(cli("inspect", model), "__setstate__")
    assert victim.read_bytes() == VICTIM_BYTES
    cli("inspect", model, "--trust-pickle")  # torch.jit.load alone runs __setstate__
    assert victim.read_bytes() == b"BBBB" + VICTIM_BYTES[4:]


@pytest.mark.parametrize("command", ["scan", "inspect"])
def test_hand_edited_pt2_graph_naming_from_file_is_refused(cli, tmp_path, victim, data, command):
    model = _graph_payload(tmp_path, victim)
    args = ["scan", model, "--data", data] if command == "scan" else ["inspect", model]
    _refused(cli(*args), "torch.ops.aten.from_file.default")
    assert victim.read_bytes() == VICTIM_BYTES
    cli("scan", model, "--data", data, "--trust-pickle", "-q")
    assert victim.read_bytes() == b"AAAA" + VICTIM_BYTES[4:]


def test_pt2_with_a_pickled_sample_input_is_refused_before_torch_unpickles_it(cli, tmp_path, data):
    marker = tmp_path / "marker"
    model = _sample_inputs_payload(tmp_path, marker)
    _refused(cli("scan", model, "--data", data), "sample_inputs")
    assert not marker.exists()
    cli("inspect", model, "--trust-pickle")
    assert marker.exists()  # the payload is live


class _Zoo(nn.Module):
    """The ops real CNN / MLP / transformer / RNN models are made of."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.embed = nn.Linear(16, 8)
        self.encoder = nn.TransformerEncoderLayer(8, 2, 16, batch_first=True)
        self.norm = nn.LayerNorm(8)
        self.lstm = nn.LSTM(8, 8, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        h = torch.relu(self.bn(self.conv(x)))
        h = nn.functional.interpolate(nn.functional.max_pool2d(h, 2), scale_factor=2.0)
        h = self.pool(nn.functional.silu(h)).flatten(2).transpose(1, 2)  # [N, 4, 4]
        h = self.embed(h.reshape(h.shape[0], 1, 16).repeat(1, 3, 1))
        h = self.encoder(nn.functional.gelu(self.norm(h)))
        h, _ = self.lstm(h)
        return nn.functional.softmax(self.head(nn.functional.relu6(h.mean(1))), dim=-1)


@pytest.mark.parametrize("kind", ["script", "trace", "export"])
def test_the_allowlist_covers_what_torch_emits_for_real_models(tmp_path, kind):
    model, example = _Zoo().eval(), torch.randn(2, 3, 8, 8)
    path = tmp_path / f"zoo.{kind}.pt{'2' if kind == 'export' else ''}"
    if kind == "script":
        torch.jit.script(model).save(str(path))
    elif kind == "trace":
        torch.jit.trace(model, example, check_trace=False).save(str(path))
    else:
        torch.export.save(torch.export.export(model, (example,)), str(path))
    check = exported_violations if kind == "export" else torchscript_violations
    assert list(check(path)) == []


def test_sample_models_pass_the_allowlist():
    root = Path(__file__).resolve().parent.parent / "sample_models"
    for folder in ("cnn", "mlp"):
        assert list(torchscript_violations(root / folder / "model.torchscript.pt")) == []
        assert list(exported_violations(root / folder / "model.pt2")) == []


@pytest.mark.parametrize(
    "line, named",
    [
        ("_x = ops.evil_ns.run(x)", "evil_ns::run"),
        ("_x = torch.classes.evil.Thing()", "torch.classes.evil.Thing"),
        ('print("x")', "print"),
        ("_x = x.untyped_storage()", "untyped_storage"),
        ('_x = getattr(torch, "from_file")', "getattr on a module"),
        ("_x = __torch__.not_in_this_archive.f(x)", "__torch__.not_in_this_archive.f"),
    ],
)
def test_hand_edited_torchscript_source_outside_the_allowlist_is_named(tmp_path, line, named):
    source = tmp_path / "plain.pt"
    torch.jit.script(nn.Sequential(nn.Linear(4, 4), nn.ReLU())).save(str(source))
    edited = tmp_path / "edited.pt"
    with zipfile.ZipFile(source) as src, zipfile.ZipFile(edited, "w") as out:
        for info in src.infolist():
            raw = src.read(info.filename)
            # container.py, or container/___torch_mangle_N.py once another Sequential was scripted in
            # this process (the class is then compiled under a mangled name)
            if "code/__torch__/torch/nn/modules/container" in info.filename and info.filename.endswith(".py"):
                text = raw.decode()
                head, sep, tail = text.partition("    input: Tensor) -> Tensor:\n")
                raw = (head + sep + f"    {line.replace('(x', '(input')}\n" + tail).encode()
            out.writestr(info, raw)
    assert any(named in what for what, _ in torchscript_violations(edited))


def test_a_pt2_graph_calling_a_custom_namespace_is_refused(tmp_path):
    base = tmp_path / "base.pt2"
    torch.export.save(torch.export.export(Plain(), (torch.randn(2, 4),)), str(base))

    def edit(name: str, raw: bytes) -> bytes:
        if "/models/" in name and name.endswith(".json"):
            return raw.replace(b"torch.ops.aten.relu.default", b"torch.ops.evil_ns.relu.default")
        return raw

    edited = _rewrite_pt2(base, tmp_path / "custom.pt2", edit)
    assert [what for what, _ in exported_violations(edited)] == ["torch.ops.evil_ns.relu.default"]


def test_torchscript_swapped_between_scan_and_fix_is_refused(cli, tmp_path, victim, data, monkeypatch):
    """fix loads the archive a second time (to patch its graph): a file replaced after the scan's check
    must not be loaded there, even with a valid-looking archive (its __setstate__ runs while loading)."""
    import deadrelu_cli.backends.torch.fix as fix_module

    model = tmp_path / "model.pt"
    plain = Plain()
    with torch.no_grad():
        plain.fc.bias[:2] = -100.0  # two dead units: something for leaky to fix
    torch.jit.script(plain).save(str(model))
    evil = _setstate_payload(tmp_path / "evil_state.pt", victim)
    original = fix_module.load_torchscript_archive

    def swapped_first(path, *args):
        Path(path).write_bytes(evil.read_bytes())  # the race: someone replaces the file after the scan
        return original(path, *args)

    monkeypatch.setattr(fix_module, "load_torchscript_archive", swapped_first)
    result = cli("fix", model, "--data", data, "--strategy", "leaky", "--output", tmp_path / "fixed.pt")
    assert result.code == 2, result.err
    assert "changed since it was scanned" in result.err and len(result.err.strip().splitlines()) == 1
    assert victim.read_bytes() == VICTIM_BYTES
    assert not (tmp_path / "fixed.pt").exists()


def test_torchscript_loader_checks_and_loads_the_same_bytes(tmp_path, victim, monkeypatch):
    """The policy check reads the archive once and torch.jit.load gets those bytes, not the path again."""
    from deadrelu_cli.errors import UserError
    from deadrelu_cli.loaders.torch_models import load_torchscript_archive

    model = tmp_path / "model.pt"
    plain = Plain()
    torch.jit.script(plain).save(str(model))
    evil = _setstate_payload(tmp_path / "evil_state.pt", victim)
    calls = []
    real_load = torch.jit.load

    def load(source, *args, **kwargs):
        calls.append(source)
        model.write_bytes(evil.read_bytes())  # replaced after the check: must not matter
        return real_load(source, *args, **kwargs)

    monkeypatch.setattr(torch.jit, "load", load)
    module = load_torchscript_archive(model, "cpu", False)
    assert isinstance(calls[0], io.BytesIO)
    assert victim.read_bytes() == VICTIM_BYTES
    x = torch.randn(3, 4)
    assert torch.equal(module(x), plain(x))  # the checked archive, not the one swapped in
    with pytest.raises(UserError, match="aten::from_file|__setstate__"):
        load_torchscript_archive(model, "cpu", False)  # the swapped file itself is refused next time
