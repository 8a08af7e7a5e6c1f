"""trial29: files from strangers, as a security reviewer sees them. Each test builds its hostile input
here and computes the truth independently (numpy on the bytes that should have been read)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

# --- ONNX: every stored tensor's external data is confined to the model's folder ------------------


def _leaky_onnx(folder, variant: str, location: str) -> np.ndarray:
    """A graph that adds 16 bytes read from external data `location` to its input before a Relu: the
    report's max pre-activation per unit then *is* those bytes. The tensor sits where onnx's own
    external-data loader does not look: a sparse Constant, a sparse initializer, or a Constant inside a
    model-local function."""
    from onnx import TensorProto, helper, numpy_helper

    values = TensorProto(name="v", data_type=TensorProto.UINT8, dims=[16])
    values.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", "16")):
        entry = values.external_data.add()
        entry.key, entry.value = key, value
    sparse = helper.make_sparse_tensor(
        values, numpy_helper.from_array(np.arange(16, dtype=np.int64), "i"), [16]
    )
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 16])
    relu = helper.make_node("Relu", ["s"], ["y"], name="relu")
    opsets = [helper.make_opsetid("", 17)]
    functions = []
    if variant == "function":
        body = [
            helper.make_node("Constant", [], ["c"], value=values),
            helper.make_node("Cast", ["c"], ["cf"], to=TensorProto.FLOAT),
            helper.make_node("Add", ["X", "cf"], ["Y"]),
        ]
        functions = [helper.make_function("local", "f", ["X"], ["Y"], body, opsets)]
        nodes = [helper.make_node("f", ["x"], ["s"], domain="local"), relu]
        opsets = [*opsets, helper.make_opsetid("local", 1)]
        graph = helper.make_graph(nodes, "g", [x], [y])
    else:
        head = (
            []
            if variant == "sparse_initializer"
            else [helper.make_node("Constant", [], ["v"], sparse_value=sparse)]
        )
        nodes = [
            *head,
            helper.make_node("Cast", ["v"], ["cf"], to=TensorProto.FLOAT),
            helper.make_node("Add", ["x", "cf"], ["s"]),
            relu,
        ]
        extra = [sparse] if variant == "sparse_initializer" else []
        graph = helper.make_graph(nodes, "g", [x], [y], sparse_initializer=extra)
    model = helper.make_model(graph, opset_imports=opsets, functions=functions)
    model.ir_version = 8
    (folder / "model.onnx").write_bytes(model.SerializeToString())
    np.savez(folder / "zeros.npz", x=np.zeros((3, 16), np.float32))
    return np.zeros((3, 16), np.float32)


@pytest.mark.parametrize("variant", ["sparse_constant", "sparse_initializer", "function"])
def test_onnx_external_data_outside_the_model_folder_is_never_read(cli, tmp_path, monkeypatch, variant):
    """onnxruntime resolves external data of a model given as bytes against the *current directory*:
    a tensor that deadrelu's own loader skipped leaked a file of the CI checkout (.env, .git/config)
    byte for byte into the report's max_preactivation."""
    work, model_dir = tmp_path / "checkout", tmp_path / "model"
    work.mkdir()
    model_dir.mkdir()
    (work / "dotenv").write_bytes(b"AWS_SECRET=ABCDEFGHIJKLMNOP\n")
    monkeypatch.chdir(work)
    x = _leaky_onnx(model_dir, variant, "dotenv")
    out = tmp_path / "r.json"
    result = cli("scan", model_dir / "model.onnx", "--data", model_dir / "zeros.npz", "--json", out, "-q")
    assert result.code == 2, result.err
    assert not out.exists()
    assert result.err.count("\n") == 1 and "dotenv" in result.err and "Traceback" not in result.err

    # the same file name inside the model's folder is the model's own data: read from there, not the cwd
    own = bytes(range(40, 56))
    (model_dir / "dotenv").write_bytes(own)
    result = cli("scan", model_dir / "model.onnx", "--data", model_dir / "zeros.npz", "--json", out, "-q")
    assert result.code == 0, result.err
    (layer,) = json.loads(out.read_text())["layers"]
    pre = x + np.frombuffer(own, np.uint8).astype(np.float32)
    assert layer["max_preactivation"] == pre.max(axis=0).tolist()
    assert layer["positive_counts"] == (pre > 0).sum(axis=0).tolist()


# --- fix: files copied from someone else's folder never follow a link out of it ---------------------

SECRET = b"GITHUB_TOKEN=ghp_0123456789abcdef\n"

MLP_ARCH = """
from torch import nn


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.act = nn.ReLU()
        self.out = nn.Linear(16, 4)

    def forward(self, x):
        return self.out(self.act(self.fc1(x)))


def build():
    return MLP()
"""


def _trainer_checkpoint(tmp_path):
    """A Hugging Face Trainer-style checkpoint folder: weights, optimizer.pt, trainer_state.json, and
    `rng_state.pth` planted as a link to a secret outside the folder. fc1 units 1 and 5 are dead."""
    import torch
    from conftest import arch_file
    from safetensors.torch import save_file

    model, spec = arch_file(tmp_path / "arch.py", MLP_ARCH)
    torch.manual_seed(0)
    optimizer = torch.optim.Adam(model.parameters(), 1e-2)
    x = torch.randn(32, 8)
    model(x).sum().backward()
    optimizer.step()
    with torch.no_grad():
        model.fc1.bias[[1, 5]] = -50.0
    folder = tmp_path / "checkpoint-1"
    folder.mkdir()
    save_file(model.state_dict(), folder / "model.safetensors")
    torch.save(optimizer.state_dict(), folder / "optimizer.pt")
    (folder / "trainer_state.json").write_text('{"global_step": 1}')
    (tmp_path / "secret.txt").write_bytes(SECRET)
    (folder / "rng_state.pth").symlink_to(tmp_path / "secret.txt")
    np.savez(tmp_path / "d.npz", x=x.numpy())
    return folder, spec


def _no_secret_under(folder) -> None:
    for path in folder.rglob("*"):
        assert path.is_symlink() or not path.is_file() or SECRET not in path.read_bytes(), path


def test_fix_of_a_training_checkpoint_copies_no_link_out_of_its_folder(cli, tmp_path):
    folder, spec = _trainer_checkpoint(tmp_path)
    out = tmp_path / "fixed"
    out.mkdir()
    args = ("--arch", spec, "--data", tmp_path / "d.npz", "--strategy", "reinit")
    result = cli("fix", folder / "model.safetensors", *args, "--output", out / "model.safetensors")
    assert result.code == 0, result.err
    assert (out / "trainer_state.json").read_bytes() == (folder / "trainer_state.json").read_bytes()
    assert not (out / "rng_state.pth").exists()
    assert "rng_state.pth not copied" in result.out + result.err
    _no_secret_under(out)


def test_fix_never_replaces_an_optimizer_file_beside_the_output(cli, tmp_path):
    """OUT's folder already holds an optimizer.pt (another run's): it was silently replaced."""
    folder, spec = _trainer_checkpoint(tmp_path)
    out = tmp_path / "other-run"
    out.mkdir()
    mine = out / "optimizer.pt"
    mine.write_bytes(b"the user's own optimizer state")
    args = ("--arch", spec, "--data", tmp_path / "d.npz", "--strategy", "reinit")
    result = cli("fix", folder / "model.safetensors", *args, "--output", out / "model.safetensors")
    assert result.code == 2, result.err
    assert result.err.count("\n") == 1 and "optimizer.pt exists already" in result.err
    assert mine.read_bytes() == b"the user's own optimizer state"
    assert sorted(p.name for p in out.iterdir()) == ["optimizer.pt"]


def test_fix_of_a_model_folder_copies_no_link_out_of_it(cli, tmp_path):
    """`README.md -> ~/secret` in a model folder from a pull request landed, with the secret's bytes, in
    the fixed folder that CI uploads. Links into the folder itself, or a hub cache's blobs, are copied."""
    pytest.importorskip("transformers", reason="the transformers extra is not installed")
    from hf_models import opt_model, save_tokenizer, token_data

    cache = tmp_path / "models--x" / "snapshots" / "abc"  # the hub cache's layout
    cache.mkdir(parents=True)
    (tmp_path / "models--x" / "blobs").mkdir()
    opt_model().save_pretrained(cache)
    save_tokenizer(cache)
    blob = tmp_path / "models--x" / "blobs" / "0123"
    (cache / "tokenizer.json").rename(blob)
    (cache / "tokenizer.json").symlink_to("../../blobs/0123")
    (tmp_path / "secret.txt").write_bytes(SECRET)
    (cache / "README.md").symlink_to(tmp_path / "secret.txt")
    ids, mask = token_data()
    np.savez(tmp_path / "t.npz", input_ids=ids, attention_mask=mask)
    out = tmp_path / "fixed"
    result = cli("fix", cache, "--data", tmp_path / "t.npz", "--strategy", "reinit", "--output", out)
    assert result.code == 0, result.err
    assert "README.md not copied" in result.out + result.err
    assert not (out / "README.md").exists()
    assert (out / "tokenizer.json").read_bytes() == blob.read_bytes()
    _no_secret_under(out)


# --- --text: a tokenizer whose code ships in the folder --------------------------------------------


def test_text_never_runs_a_tokenizer_shipped_in_the_folder(cli, tmp_path, monkeypatch):
    """tokenizer_config.json's auto_map made transformers *ask on stdin* whether to run the folder's
    tokenization_*.py: a piped "y" ran it (and the question went to stdout, into `--json -`)."""
    import io

    transformers = pytest.importorskip("transformers", reason="the transformers extra is not installed")
    folder = tmp_path / "vit"  # a model type with no tokenizer of its own in transformers
    config = transformers.ViTConfig(
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        image_size=8,
        patch_size=4,
    )
    transformers.ViTModel(config).save_pretrained(folder)
    marker = tmp_path / "tokenizer-code-ran"
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"auto_map": {"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]}})
    )
    (folder / "tokenization_evil.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n"
        "from transformers import PreTrainedTokenizer\n\n\nclass EvilTokenizer(PreTrainedTokenizer):\n    pass\n"
    )
    (tmp_path / "docs.txt").write_text("one document\nanother one\n")
    monkeypatch.setattr("sys.stdin", io.StringIO("y\n" * 5))
    result = cli("scan", folder, "--text", tmp_path / "docs.txt", "--json", "-")
    assert not marker.exists()
    assert result.code == 2, result.err
    assert result.out == "" and result.err.count("\n") == 1
    assert "--trust-pickle" in result.err and "auto_map" in result.err


def test_config_naming_something_other_than_a_model_class_is_an_input_error(cli, tmp_path):
    """config.json's `architectures` was looked up in the transformers namespace and called: a tokenizer,
    a module, a function or an abstract base there crashed the scan (exit 3, a crash log)."""
    pytest.importorskip("transformers", reason="the transformers extra is not installed")
    from hf_models import opt_model, token_data

    source = tmp_path / "opt"
    opt_model().save_pretrained(source)
    ids, mask = token_data(samples=4)
    np.savez(tmp_path / "t.npz", input_ids=ids, attention_mask=mask)
    config = json.loads((source / "config.json").read_text())
    for name in ("AutoTokenizer", "logging", "pipeline", "PreTrainedModel", "OPTPreTrainedModel"):
        (source / "config.json").write_text(json.dumps({**config, "architectures": [name]}))
        result = cli("scan", source, "--data", tmp_path / "t.npz")
        assert result.code == 2, (name, result.err)
        assert result.err.count("\n") == 1 and "internal error" not in result.err, result.err


# --- every torch.load of a file from outside: CRCs, zip bombs, views claiming more than they store ----

MLP_ONNX = __import__("conftest").ROOT / "sample_models" / "mlp" / "model.onnx"  # input [N, 16] float32


def _flip_a_tensor_byte(path) -> None:
    """Flip one byte inside the largest tensor record of a torch.save zip (its CRC-32 then no longer
    matches; torch's reader does not check it)."""
    import zipfile

    with zipfile.ZipFile(path) as archive:
        records = [i for i in archive.infolist() if "/data/" in i.filename]
        info = max(records, key=lambda i: i.file_size)
    raw = bytearray(path.read_bytes())
    header = info.header_offset
    name_len = int.from_bytes(raw[header + 26 : header + 28], "little")
    extra_len = int.from_bytes(raw[header + 28 : header + 30], "little")
    raw[header + 30 + name_len + extra_len + info.file_size // 2] ^= 0x40
    path.write_bytes(bytes(raw))


def test_a_damaged_pt_data_file_is_refused_not_read_as_other_numbers(cli, tmp_path):
    import torch

    x = np.random.default_rng(0).normal(size=(8, 16)).astype(np.float32)
    path = tmp_path / "calib.pt"
    torch.save({"input": torch.from_numpy(x)}, path)
    _flip_a_tensor_byte(path)
    read = torch.load(path, weights_only=True)["input"].numpy()  # torch itself does not notice
    assert not np.array_equal(read, x)
    result = cli("scan", MLP_ONNX, "--data", path, "--json", tmp_path / "r.json")
    assert result.code == 2, result.err
    assert "damaged" in result.err and result.err.count("\n") == 1
    assert not (tmp_path / "r.json").exists()


def test_a_damaged_optimizer_file_beside_a_checkpoint_is_refused(cli, tmp_path):
    """optimizer.pt was read by a plain torch.load: a flipped byte went into the written moments."""
    folder, spec = _trainer_checkpoint(tmp_path)
    _flip_a_tensor_byte(folder / "optimizer.pt")
    out = tmp_path / "fixed"
    out.mkdir()
    args = ("--arch", spec, "--data", tmp_path / "d.npz", "--strategy", "reinit")
    result = cli("fix", folder / "model.safetensors", *args, "--output", out / "model.safetensors")
    assert result.code == 2, result.err
    assert "optimizer.pt" in result.err and "damaged" in result.err
    assert list(out.iterdir()) == []


def test_pt_data_whose_tensor_repeats_its_storage_is_refused(cli, tmp_path):
    """A 1 KiB file whose tensor is a stride-0 view of 16 stored values claims 10^12 samples (or, in
    bfloat16, a conversion of 64 TB): the values must be in the file."""
    import torch

    row = torch.arange(16, dtype=torch.float32)
    for dtype in (torch.float32, torch.bfloat16):
        path = tmp_path / f"expanded-{str(dtype)[6:]}.pt"
        torch.save({"input": row.to(dtype).expand(10**12, 16)}, path)
        assert path.stat().st_size < 4096
        result = cli("scan", MLP_ONNX, "--data", path, "--limit", 4)
        assert result.code == 2, result.err
        assert "stores only 16 of its values" in result.err and result.err.count("\n") == 1


def test_pt_data_zip_bomb_is_refused_before_it_expands(cli, tmp_path, monkeypatch):
    """torch reads deflated members: 0.1 MB of file became 80 MB of tensor (x1000, and a 100 MB file
    100 GB) with no check. Memory is made small here so that a small bomb is one."""
    import zipfile

    import torch

    plain, bomb = tmp_path / "plain.pt", tmp_path / "bomb.pt"
    torch.save({"input": torch.zeros(1_000_000, 16)}, plain)
    with zipfile.ZipFile(plain) as src, zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info.filename))
    assert bomb.stat().st_size < 200_000
    assert torch.load(bomb, weights_only=True)["input"].shape == (1_000_000, 16)  # torch expands it
    monkeypatch.setattr("deadrelu_cli.memory.available_memory", lambda: 32 << 20)
    result = cli("scan", MLP_ONNX, "--data", bomb, "--limit", 4)
    assert result.code == 2, result.err
    assert "more than the memory available" in result.err and result.err.count("\n") == 1


# --- settings files that came with someone else's checkout -----------------------------------------

MLP_CALIB = MLP_ONNX.parent / "calib.npz"


def test_settings_file_values_get_the_flags_checks(cli, tmp_path, monkeypatch):
    """Values from [tool.deadrelu] skipped the option's type and range: `max-dead-units = -1` gated
    every model as failed (exit 1), an op list holding a number crashed (exit 3)."""
    monkeypatch.chdir(tmp_path)
    for body, key in (("max-dead-units = -1", "max-dead-units"), ('ops = ["relu", 5]', "ops")):
        (tmp_path / "deadrelu.toml").write_text(body + "\n")
        result = cli("scan", MLP_ONNX, "--data", MLP_CALIB, "--json", tmp_path / "r.json")
        assert result.code == 2, (body, result.err)
        assert key in result.err and "deadrelu.toml" in result.err and result.err.count("\n") == 1
        assert not (tmp_path / "r.json").exists()
    (tmp_path / "deadrelu.toml").write_text("max-dead-units = 6\n")  # the sample MLP has 6 dead units
    assert cli("scan", MLP_ONNX, "--data", MLP_CALIB, "-q").code == 0
    (tmp_path / "deadrelu.toml").write_text("max-dead-units = 5\n")
    assert cli("scan", MLP_ONNX, "--data", MLP_CALIB, "-q").code == 1


def test_settings_file_outputs_stay_inside_its_folder(cli, tmp_path, monkeypatch):
    """`junit = "../victim"` in a checkout's pyproject.toml replaced a file outside the checkout."""
    checkout = tmp_path / "checkout"
    checkout.mkdir()
    (checkout / "build").mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("the user's own file\n")
    (tmp_path / "elsewhere").mkdir()
    (checkout / "out").symlink_to(tmp_path / "elsewhere")  # a link inside, leading out
    monkeypatch.chdir(checkout)
    for value in ("../victim.txt", str(victim), "out/report.md"):
        (checkout / "pyproject.toml").write_text(f'[tool.deadrelu]\nmarkdown = "{value}"\n')
        result = cli("scan", MLP_ONNX, "--data", MLP_CALIB)
        assert result.code == 2, (value, result.err)
        assert "outside the folder of the settings file" in result.err and result.err.count("\n") == 1
    assert victim.read_text() == "the user's own file\n"
    assert list((tmp_path / "elsewhere").iterdir()) == []
    (checkout / "pyproject.toml").write_text('[tool.deadrelu]\nmarkdown = "build/report.md"\n')
    result = cli("scan", MLP_ONNX, "--data", MLP_CALIB)
    assert result.code == 0, result.err
    assert "act1" in (checkout / "build" / "report.md").read_text()
    result = cli("scan", MLP_ONNX, "--data", MLP_CALIB, "--markdown", tmp_path / "mine.md")  # the user's flag
    assert result.code == 0 and (tmp_path / "mine.md").is_file()


def test_fixed_model_folder_files_follow_the_umask(cli, tmp_path):
    """safetensors' save_file writes 0600 whatever the umask: the fixed folder's shards could not be
    read by the model server (another user) that reads the source folder's."""
    import os
    import stat

    pytest.importorskip("transformers", reason="the transformers extra is not installed")
    from hf_models import opt_model, token_data

    opt_model().save_pretrained(tmp_path / "opt", max_shard_size="20KB")
    ids, mask = token_data()
    np.savez(tmp_path / "t.npz", input_ids=ids, attention_mask=mask)
    old = os.umask(0o022)
    try:
        result = cli(
            "fix", tmp_path / "opt", "--data", tmp_path / "t.npz", "-s", "reinit", "-o", tmp_path / "out"
        )
    finally:
        os.umask(old)
    assert result.code == 0, result.err
    shards = sorted((tmp_path / "out").glob("*.safetensors"))
    assert len(shards) > 1
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "out").iterdir()}
    assert set(modes.values()) == {0o644}, modes


# --- names shown literally ---------------------------------------------------------------------------


def test_a_layer_name_with_emoji_codes_is_shown_as_it_is(cli, tmp_path):
    """Rich replaced `:warning:` / `:thumbs_up:` in an escaped name by emoji: the table, the error line
    and the notes showed a name the model does not have (`::warning::x` became `:⚠:x`)."""
    import onnx
    from onnx import TensorProto, helper

    name = "block:thumbs_up:1::warning::relu"
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"], name=name)],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, tmp_path / "m.onnx")
    x = np.random.default_rng(0).normal(size=(6, 4)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x)
    result = cli("scan", tmp_path / "m.onnx", "--data", tmp_path / "d.npz")
    assert result.code == 0, result.err
    assert name in result.out
    assert name in cli("inspect", tmp_path / "m.onnx").out
    shown = cli("scan", tmp_path / "m.onnx", "--data", tmp_path / "d.npz", "--layer", "nothing-like-it")
    assert shown.code == 2 and name in shown.err, shown.err


def test_a_fifo_inside_a_model_folder_is_refused_not_waited_on(tmp_path):
    """A shard named by the index (or tokenizer.json) being a FIFO: safetensors' open blocked forever, in
    native code that SIGTERM could not interrupt. Run as a child process so that a hang fails the test."""
    import os
    import subprocess
    import sys

    pytest.importorskip("transformers", reason="the transformers extra is not installed")
    from conftest import ROOT
    from hf_models import opt_model, save_tokenizer, token_data

    folder = tmp_path / "opt"
    opt_model().save_pretrained(folder)
    save_tokenizer(folder)
    ids, mask = token_data(samples=4)
    np.savez(tmp_path / "t.npz", input_ids=ids, attention_mask=mask)
    (tmp_path / "docs.txt").write_text("w1 w2\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}

    def deadrelu(*args):
        command = [sys.executable, "-m", "deadrelu_cli", *map(str, args)]
        return subprocess.run(command, capture_output=True, text=True, timeout=60, env=env, cwd=tmp_path)

    (folder / "tokenizer.json").unlink()
    os.mkfifo(folder / "tokenizer.json")
    result = deadrelu("scan", folder, "--text", tmp_path / "docs.txt")
    assert result.returncode == 2 and "tokenizer.json: is a FIFO" in result.stderr, result.stderr
    (folder / "tokenizer.json").unlink()
    index = {
        "metadata": {},
        "weight_map": {"model.decoder.embed_tokens.weight": "model-00001-of-00001.safetensors"},
    }
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    (folder / "model.safetensors").unlink()
    os.mkfifo(folder / "model-00001-of-00001.safetensors")
    result = deadrelu("scan", folder, "--data", tmp_path / "t.npz")
    assert result.returncode == 2, result.stderr
    assert "model-00001-of-00001.safetensors: is a FIFO" in result.stderr and result.stderr.count("\n") == 1


# --- zip archives whose readers disagree: the code checked must be the code that runs ----------------


class _Plain(torch.nn.Module):
    def forward(self, x):
        return torch.relu(x + 1.0)


def _code_member_twins(tmp_path, victim):
    """A scripted model's archive with its forward's code stored twice: first a version that writes
    'AAAA' into VICTIM through torch.from_file, then the original. Python's zipfile (which the code
    allowlist used) reads the last, torch.jit.load the first. Also a variant storing the payload alone
    under `CODE/` instead of `code/` (torch's reader matches names case-insensitively)."""
    import copy
    import warnings
    import zipfile

    plain = tmp_path / "plain.pt"
    torch.jit.script(_Plain()).save(str(plain))
    with zipfile.ZipFile(plain) as archive:
        infos = archive.infolist()
        contents = {info.filename: archive.read(info.filename) for info in infos}
    (name,) = [n for n in contents if "/code/" in n and n.endswith(".py")]
    code = contents[name].decode()
    evil = code.replace(
        "    return torch.relu(",
        f"    _t = torch.from_file({str(victim)!r}, True, 4, dtype=0)\n"
        "    x = torch.add(x, torch.mul(torch.sum(torch.fill_(_t, 65)), 0))\n"
        "    return torch.relu(",
    )
    assert evil != code
    twins, upper = tmp_path / "twins.pt", tmp_path / "upper.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns about the duplicate name: that is the point
        for path, members in (
            (twins, [(name, evil), (name, code)]),
            (upper, [(name.replace("/code/", "/CODE/"), evil)]),
        ):
            with zipfile.ZipFile(path, "w") as out:
                for info in infos:
                    if info.filename == name:
                        for member, text in members:
                            out.writestr(member, text)
                    else:
                        out.writestr(copy.copy(info), contents[info.filename])  # (writing moves an info)
    return twins, upper


def test_torchscript_code_stored_twice_or_in_another_case_is_checked_as_torch_reads_it(cli, tmp_path):
    import torch

    victim = tmp_path / "victim"
    twins, upper = _code_member_twins(tmp_path, victim)
    np.savez(tmp_path / "x.npz", x=np.zeros((4, 3), np.float32))
    for archive, needle in ((twins, "stored twice"), (upper, "aten::from_file")):
        victim.write_bytes(b"zzzz")
        torch.jit.load(str(archive))(torch.zeros(2))  # the payload is live: torch runs the first copy
        assert victim.read_bytes() == b"AAAA", archive
        victim.write_bytes(b"zzzz")
        for command in (("scan", archive, "--data", tmp_path / "x.npz"), ("inspect", archive)):
            result = cli(*command)
            assert result.code == 2, (command, result.err)
            assert needle in result.err and result.err.count("\n") == 1, result.err
            assert victim.read_bytes() == b"zzzz"


def test_npz_with_an_array_stored_twice_is_refused(cli, tmp_path):
    """numpy (and deadrelu) read the last `input.npy` of an .npz holding two: the calibration data was
    the hidden array, not the one a reviewer's zip tool shows first."""
    import io
    import warnings
    import zipfile

    def npy(array):
        buffer = io.BytesIO()
        np.save(buffer, array)
        return buffer.getvalue()

    path = tmp_path / "twice.npz"
    with warnings.catch_warnings(), zipfile.ZipFile(path, "w") as archive:
        warnings.simplefilter("ignore")
        archive.writestr("input.npy", npy(np.ones((4, 16), np.float32)))
        archive.writestr("input.npy", npy(-np.ones((4, 16), np.float32)))
    assert np.load(path)["input"][0, 0] == -1.0  # the second one is what numpy reads
    result = cli("scan", MLP_ONNX, "--data", path)
    assert result.code == 2 and "stored twice" in result.err and result.err.count("\n") == 1, result.err


def test_a_model_folder_missing_weights_is_not_scanned_silently(cli, tmp_path):
    """transformers fills tensors a folder lacks with a random init and says so only in its (silenced)
    log: a folder without layer 1's fc1 was scanned on random weights, its planted dead unit gone,
    without a word."""
    pytest.importorskip("transformers", reason="the transformers extra is not installed")
    from hf_models import DEAD, opt_model, token_data
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "opt"
    opt_model().save_pretrained(folder)
    state = load_file(folder / "model.safetensors")
    dropped = sorted(k for k in state if "layers.1.fc1." in k)
    assert dropped and DEAD[1]
    save_file(
        {k: v for k, v in state.items() if k not in dropped}, folder / "model.safetensors", {"format": "pt"}
    )
    ids, mask = token_data()
    np.savez(tmp_path / "t.npz", input_ids=ids, attention_mask=mask)
    result = cli("scan", folder, "--data", tmp_path / "t.npz", "--json", tmp_path / "r.json")
    assert result.code == 0, result.err
    notes = json.loads((tmp_path / "r.json").read_text())["notes"]
    (note,) = [n for n in notes if "initialised them at random" in n]
    assert all(key in note for key in dropped)
    assert "warning:" in result.out + result.err


def test_pt2_sample_inputs_zip_bomb_is_refused(cli, tmp_path, monkeypatch):
    """The .pt2 check torch.load-s its sample inputs (a torch.save zip inside the archive) to see they
    are plain tensors: that inner zip was never checked, so 60 KB of deflated zeros became 64 MB (a
    100 MB member, 100 GB). Memory is made small here so that a small bomb is one."""
    import copy
    import io
    import zipfile

    class Plain(torch.nn.Module):
        def forward(self, x):
            return torch.relu(x)

    plain = tmp_path / "plain.pt2"
    torch.export.save(torch.export.export(Plain(), (torch.zeros(2, 16),)), str(plain))
    saved = io.BytesIO()
    torch.save(((torch.zeros(1_000_000, 16),), {}), saved)
    inner = io.BytesIO()
    with (
        zipfile.ZipFile(io.BytesIO(saved.getvalue())) as src,
        zipfile.ZipFile(inner, "w", zipfile.ZIP_DEFLATED) as dst,
    ):
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info.filename))
    bomb = tmp_path / "bomb.pt2"
    with zipfile.ZipFile(plain) as src, zipfile.ZipFile(bomb, "w") as dst:
        for info in src.infolist():
            payload = (
                inner.getvalue()
                if info.filename.endswith("sample_inputs/model.pt")
                else src.read(info.filename)
            )
            dst.writestr(copy.copy(info), payload)
    assert bomb.stat().st_size < 200_000
    monkeypatch.setattr("deadrelu_cli.memory.available_memory", lambda: 32 << 20)
    result = cli("inspect", bomb)
    assert result.code == 2, result.err
    assert "sample_inputs" in result.err and "more than the memory available" in result.err, result.err


def test_a_nul_byte_in_a_file_name_from_a_file_is_an_input_error(cli, tmp_path, monkeypatch):
    """File names that come from files (an ONNX external-data location, a settings file's baseline or
    junit) may hold a NUL byte, which the command line cannot: pathlib raised ValueError (exit 3)."""
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.ones((4, 4), np.float32), "W")
    weight.ClearField("raw_data")
    weight.data_location = TensorProto.EXTERNAL
    entry = weight.external_data.add()
    entry.key, entry.value = "location", "w\x00.bin"
    nodes = [helper.make_node("MatMul", ["x", "W"], ["m"]), helper.make_node("Relu", ["m"], ["y"], name="r")]
    x_info = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])
    y_info = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])
    model = helper.make_model(
        helper.make_graph(nodes, "g", [x_info], [y_info], [weight]),
        opset_imports=[helper.make_opsetid("", 17)],
    )
    model.ir_version = 8
    (tmp_path / "m.onnx").write_bytes(model.SerializeToString())
    np.savez(tmp_path / "d.npz", x=np.ones((2, 4), np.float32))
    result = cli("scan", tmp_path / "m.onnx", "--data", tmp_path / "d.npz")
    assert result.code == 2 and "invalid external data file" in result.err, result.err
    monkeypatch.chdir(tmp_path)
    for key in ("baseline", "junit"):
        (tmp_path / "deadrelu.toml").write_text(f'{key} = "a\\u0000b"\n')
        result = cli("scan", MLP_ONNX, "--data", MLP_CALIB)
        assert result.code == 2 and "not a usable file name" in result.err, (key, result.err)
        assert result.err.count("\n") == 1


def test_onnx_external_data_bigger_than_memory_is_refused_before_it_is_read(cli, tmp_path, monkeypatch):
    """An external tensor was read whole, whatever it claimed: 256 MB of a sparse file (as big as the
    folder's disk allows) went into memory before any check. Memory is made small here."""
    from onnx import TensorProto, helper

    rows = 4 << 20  # [rows, 16] float32 = 256 MiB
    with open(tmp_path / "w.bin", "wb") as handle:
        handle.truncate(rows * 16 * 4)  # sparse: no disk used
    weight = TensorProto(name="W", data_type=TensorProto.FLOAT, dims=[rows, 16])
    weight.data_location = TensorProto.EXTERNAL
    entry = weight.external_data.add()
    entry.key, entry.value = "location", "w.bin"
    nodes = [
        helper.make_node("Gather", ["W", "i"], ["g"]),
        helper.make_node("Relu", ["g"], ["y"], name="relu"),
    ]
    i_info = helper.make_tensor_value_info("i", TensorProto.INT64, ["N"])
    y_info = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 16])
    model = helper.make_model(
        helper.make_graph(nodes, "g", [i_info], [y_info], [weight]),
        opset_imports=[helper.make_opsetid("", 17)],
    )
    model.ir_version = 8
    (tmp_path / "m.onnx").write_bytes(model.SerializeToString())
    np.savez(tmp_path / "d.npz", i=np.arange(4, dtype=np.int64))
    monkeypatch.setattr("deadrelu_cli.memory.available_memory", lambda: 32 << 20)
    result = cli("scan", tmp_path / "m.onnx", "--data", tmp_path / "d.npz")
    assert result.code == 2, result.err
    assert "more than the memory available" in result.err and result.err.count("\n") == 1
    # a tensor claiming more of its file than the file holds is refused the same way, before reading
    with open(tmp_path / "w.bin", "r+b") as handle:
        handle.truncate(1024)
    monkeypatch.undo()
    result = cli("scan", tmp_path / "m.onnx", "--data", tmp_path / "d.npz")
    assert result.code == 2 and "damaged" in result.err, result.err


def test_a_settings_file_others_could_have_planted_is_not_picked_up(cli, tmp_path, monkeypatch):
    """The nearest deadrelu.toml upwards was used wherever it was: one in a folder every user can write
    (/tmp) set the limits and outputs of every run below it. --config still names one explicitly."""
    shared = tmp_path / "shared"
    (shared / "project").mkdir(parents=True)
    shared.chmod(0o777)
    (shared / "deadrelu.toml").write_text("max-dead = 0.0\n")  # fails every model with a dead unit
    monkeypatch.chdir(shared / "project")
    result = cli("scan", MLP_ONNX, "--data", MLP_CALIB)
    assert result.code == 2, result.err
    assert (
        "writable by other users" in result.err and "--config" in result.err and result.err.count("\n") == 1
    )
    assert cli("scan", MLP_ONNX, "--data", MLP_CALIB, "--config", shared / "deadrelu.toml").code == 1
    shared.chmod(0o755)
    assert cli("scan", MLP_ONNX, "--data", MLP_CALIB).code == 1  # now only its owner could have written it
