"""Hostile files, round 40: what an attacker hands a deadrelu user, built here (no downloads).

Each test is one hole found by attacking the CLI as a user runs it and closed since: nesting that
overflowed a parser (exit 3 instead of one line), a FIFO in a trend folder that blocked, outputs that
landed on a file the model's load reads beside it (ONNX external data, a Trainer's optimizer.pt), and
an internal-error line that printed a message's control characters raw.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from conftest import save_npz
from onnx import numpy_helper
from onnx_graphs import gemm_relu

DEEP = "[" * 100_000 + "]" * 100_000  # past any recursive parser's depth


def one_line_error(result, *needles: str) -> str:
    assert result.code == 2, (result.code, result.err)
    lines = result.err.strip().splitlines()
    assert len(lines) == 1, result.err
    assert lines[0].startswith("deadrelu: error: "), lines[0]
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def _with_deep_key(path: Path) -> None:
    """The JSON object in PATH with one more key whose value is nested 100,000 levels deep."""
    text = path.read_text().rstrip()
    assert text.endswith("}")
    path.write_text(f'{text[:-1]}, "x": {DEEP}}}')


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    from hf_models import opt_model, save_tokenizer, token_data

    folder = tmp_path_factory.mktemp("hf") / "opt"
    opt_model().save_pretrained(folder, max_shard_size="20KB")  # sharded: an index file
    save_tokenizer(folder)
    assert (folder / "model.safetensors.index.json").is_file()
    ids, mask = token_data()
    data = save_npz(folder.parent / "tokens.npz", input_ids=ids, attention_mask=mask)
    return folder, data


@pytest.mark.parametrize("member", ["config.json", "model.safetensors.index.json"])
def test_a_model_folder_json_nested_past_the_parser_is_one_line(cli, hf_folder, tmp_path, member):
    folder, data = hf_folder
    copy = shutil.copytree(folder, tmp_path / "opt")
    _with_deep_key(copy / member)
    # before: RecursionError from json (ours for the index, transformers' for config.json): exit 3
    one_line_error(cli("scan", copy, "--data", data), member, "nested")


def test_text_and_tokenizer_files_nested_past_the_parser_are_one_line(cli, hf_folder, tmp_path):
    folder, _ = hf_folder
    (tmp_path / "deep.json").write_text(DEEP)
    one_line_error(cli("scan", folder, "--text", tmp_path / "deep.json"), "deep.json", "nested")
    (tmp_path / "docs.jsonl").write_text('{"text": "w1 w2"}\n' + DEEP + "\n")
    one_line_error(cli("scan", folder, "--text", tmp_path / "docs.jsonl"), "docs.jsonl:2", "nested")
    copy = shutil.copytree(folder, tmp_path / "opt")
    _with_deep_key(copy / "tokenizer.json")  # read by transformers' tokenizer code
    (tmp_path / "docs.txt").write_text("w1 w2 w3\n")
    one_line_error(cli("scan", copy, "--text", tmp_path / "docs.txt"), "tokenizer", "recursion")
    # a JSON file given as the model: told it is not a model, not a crash
    one_line_error(cli("scan", tmp_path / "deep.json", "--data", tmp_path / "x.npz"), "deep.json", "nested")


def test_a_settings_file_nested_past_the_parser_is_one_line(cli, tmp_path):
    onnx.save(gemm_relu(), tmp_path / "m.onnx")
    save_npz(tmp_path / "x.npz", x=np.zeros((4, 4), np.float32))
    (tmp_path / "arrays.toml").write_text(
        "[tool.deadrelu]\nthreshold = " + "[" * 50_000 + "]" * 50_000 + "\n"
    )
    (tmp_path / "tables.toml").write_text("x = " + "{a=" * 50_000 + "}" * 50_000 + "\n")
    for name in ("arrays.toml", "tables.toml"):
        result = cli("scan", tmp_path / "m.onnx", "--data", tmp_path / "x.npz", "--config", tmp_path / name)
        one_line_error(result, name, "nested")


def test_trend_with_a_trainer_state_nested_past_the_parser_is_one_line(cli, hf_folder, tmp_path):
    folder, data = hf_folder
    for step in (1, 2):
        shutil.copytree(folder, tmp_path / "run" / f"checkpoint-{step}")
    (tmp_path / "run" / "checkpoint-2" / "trainer_state.json").write_text(DEEP)
    one_line_error(cli("trend", tmp_path / "run", "--data", data), "trainer_state.json", "nested")


def _unblock_later(fifo: Path, stop: threading.Event, after: float = 20.0) -> None:
    """If the tool opens FIFO and blocks, a writer comes and goes every half second from AFTER seconds
    on, until STOP (the test then fails on time instead of hanging)."""

    def writer() -> None:
        if stop.wait(after):
            return
        while not stop.wait(0.5):
            try:
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
            except OSError:
                pass

    threading.Thread(target=writer, daemon=True).start()


def test_trend_never_opens_a_fifo_among_its_reports_or_trainer_states(cli, hf_folder, tmp_path):
    folder, data = hf_folder
    onnx.save(gemm_relu(), tmp_path / "m.onnx")
    save_npz(tmp_path / "x.npz", x=np.zeros((4, 4), np.float32))
    report = tmp_path / "r-1.json"
    assert cli("scan", tmp_path / "m.onnx", "--data", tmp_path / "x.npz", "--json", report, "-q").code == 0
    os.mkfifo(tmp_path / "r-2.json")
    for step in (1, 2):
        shutil.copytree(folder, tmp_path / "run" / f"checkpoint-{step}")
    os.mkfifo(tmp_path / "run" / "checkpoint-1" / "trainer_state.json")
    stop = threading.Event()
    _unblock_later(tmp_path / "r-2.json", stop)
    _unblock_later(tmp_path / "run" / "checkpoint-1" / "trainer_state.json", stop)
    started = time.monotonic()
    try:
        # before: trend read each report / trainer_state.json for its step first, and blocked there
        one_line_error(cli("trend", report, tmp_path / "r-2.json"), "r-2.json", "FIFO")
        one_line_error(cli("trend", tmp_path / "run", "--data", data), "trainer_state.json", "FIFO")
    finally:
        stop.set()
    assert time.monotonic() - started < 15


def _external_data_model(folder: Path) -> tuple[Path, Path]:
    folder.mkdir()
    model = folder / "m.onnx"
    onnx.save(gemm_relu(), model, save_as_external_data=True, location="weights.bin", size_threshold=0)
    return model, folder / "weights.bin"


def test_outputs_never_land_on_an_onnx_models_external_data(cli, tmp_path):
    model, weights = _external_data_model(tmp_path / "model")
    x = np.random.default_rng(0).normal(size=(32, 4)).astype(np.float32)
    data = save_npz(tmp_path / "x.npz", x=x)
    before = weights.read_bytes()
    os.symlink(weights, tmp_path / "soft.json")
    for out in (weights, tmp_path / "soft.json", tmp_path / "hard.json"):
        if out.name == "hard.json":
            os.link(weights, out)
            # onnx refuses a data file with several hard links (one could lead outside the folder):
            # before, that refusal was an internal error (exit 3)
            one_line_error(cli("scan", model, "--data", data), "external data", "hard links")
        # before: the report replaced weights.bin (or the file its link names): the model was gone
        one_line_error(
            cli("scan", model, "--data", data, "--json", out), "external data", "nothing was written"
        )
        one_line_error(
            cli("fix", model, "--data", data, "-s", "reinit", "-o", tmp_path / "f.onnx", "--json", out)
        )
        one_line_error(cli("trend", model, model, "--data", data, "--html", out), "external data")
    assert weights.read_bytes() == before and not (tmp_path / "f.onnx").exists()
    (tmp_path / "hard.json").unlink()
    # the same model still scans, with the dead units a numpy forward pass of its own weights gives
    result = cli("scan", model, "--data", data, "--json", tmp_path / "r.json", "-q")
    assert result.code == 0, result.err
    loaded = onnx.load(str(model))  # reads weights.bin
    inits = {t.name: numpy_helper.to_array(t) for t in loaded.graph.initializer}
    pre = x.astype(np.float64) @ inits["w"].T.astype(np.float64) + inits["b"]
    truth = np.flatnonzero((pre > 0).sum(axis=0) == 0).tolist()
    import json

    layer = json.loads((tmp_path / "r.json").read_text())["layers"][0]
    assert layer["dead_indices"] == truth and truth  # (2, 4, 6 are planted dead)


def test_fix_json_never_lands_on_the_optimizer_state_beside_the_checkpoint(cli, tmp_path):
    from conftest import arch_file

    net, spec = arch_file(
        tmp_path / "arch.py",
        "import torch\n\ndef build():\n    torch.manual_seed(0)\n"
        "    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))\n",
    )
    optimizer = torch.optim.Adam(net.parameters())
    net(torch.randn(3, 4)).sum().backward()
    optimizer.step()
    folder = tmp_path / "ckpt"
    folder.mkdir()
    torch.save({"state_dict": net.state_dict()}, folder / "model.pt")
    torch.save(optimizer.state_dict(), folder / "optimizer.pt")
    before = (folder / "optimizer.pt").read_bytes()
    data = save_npz(tmp_path / "x.npz", x=np.random.default_rng(0).normal(size=(16, 4)).astype(np.float32))
    fix = (
        "fix",
        folder / "model.pt",
        "--arch",
        spec,
        "--data",
        data,
        "-s",
        "reinit",
        "-o",
        tmp_path / "out.pt",
    )
    # before: fix read optimizer.pt, then wrote its JSON result over it
    one_line_error(cli(*fix, "--json", folder / "optimizer.pt"), "optimizer state", "nothing was written")
    one_line_error(
        cli("scan", folder / "model.pt", "--arch", spec, "--data", data, "--json", folder / "optimizer.pt")
    )
    assert (folder / "optimizer.pt").read_bytes() == before


def test_an_internal_error_line_shows_a_messages_controls_as_escapes(cli, tmp_path, monkeypatch):
    import deadrelu_cli.engine as engine

    def crash(*args, **kwargs):
        raise RuntimeError("boom \x1b]0;owned\x07\x1b[2J\n::error::forged")

    monkeypatch.setattr(engine, "run_scan_detailed", crash)
    monkeypatch.setattr(engine, "run_scan", crash)
    onnx.save(gemm_relu(), tmp_path / "m.onnx")
    save_npz(tmp_path / "x.npz", x=np.zeros((4, 4), np.float32))
    result = cli("scan", tmp_path / "m.onnx", "--data", tmp_path / "x.npz")
    assert result.code == 3, result.err
    lines = result.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("deadrelu: internal error: RuntimeError: boom"), result.err
    assert "\x1b" not in result.err and "\x07" not in result.err and "\\x1b]0;owned\\x07" in lines[0]


def test_certify_refuses_an_input_box_that_an_onnx_header_makes_huge(cli, tmp_path):
    model = gemm_relu()
    model.graph.input[0].type.tensor_type.shape.dim[1].dim_value = 10**12  # 8 bytes in the file
    onnx.save(model, tmp_path / "m.onnx")
    # before: torch.full tried to allocate 8 TB: an allocator's internal error (exit 3), or the OOM
    # killer where the allocation is lazily granted
    result = cli("scan", tmp_path / "m.onnx", "--certify", "--input-range", "-1", "1")
    one_line_error(result, "--certify", "[1000000000000]", "--input-shape")


def test_trend_over_safetensors_checkpoints_refuses_a_hostile_header_in_one_line(cli, tmp_path):
    import json
    import struct

    from conftest import arch_file
    from safetensors.torch import save_file

    net, spec = arch_file(
        tmp_path / "arch.py",
        "import torch\n\ndef build():\n    torch.manual_seed(0)\n"
        "    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))\n",
    )
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, tmp_path / "ck-1.safetensors")
    # a header the loader's sniffing accepts, claiming 4 TB of tensor in 64 bytes
    header = json.dumps(
        {"0.weight": {"dtype": "F32", "shape": [10**6, 10**6], "data_offsets": [0, 64]}}
    ).encode()
    (tmp_path / "ck-2.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + bytes(64))
    data = save_npz(tmp_path / "x.npz", x=np.random.default_rng(0).normal(size=(16, 4)).astype(np.float32))
    result = cli(
        "trend", tmp_path / "ck-1.safetensors", tmp_path / "ck-2.safetensors", "--arch", spec, "--data", data
    )
    # before: SafetensorError escaped trend's own reader: an internal error (exit 3)
    one_line_error(result, "ck-2.safetensors", "cannot read safetensors")


@pytest.mark.parametrize("sharded", [True, False])
def test_a_config_declaring_far_more_layers_than_its_weights_is_refused_before_building(
    cli, hf_folder, tmp_path, sharded
):
    import json

    folder, data = hf_folder
    copy = shutil.copytree(folder, tmp_path / "opt")
    if not sharded:  # one model.safetensors: the names come from its header
        from hf_models import opt_model

        for shard in copy.glob("model*.safetensors*"):
            shard.unlink()
        opt_model().save_pretrained(copy)
        assert (copy / "model.safetensors").is_file()
    config = json.loads((copy / "config.json").read_text())
    config["num_hidden_layers"] = 300  # the weights hold layers 0 and 1
    (copy / "config.json").write_text(json.dumps(config))
    # before: transformers built all 300 blocks (2000 ran for minutes), filled 298 at random, and the scan went on
    one_line_error(cli("scan", copy, "--data", data), "declares 300 layers", "at most 2")

    config["num_hidden_layers"] = 3  # a small mismatch is transformers' to fill, and the scan says so
    (copy / "config.json").write_text(json.dumps(config))
    result = cli("scan", copy, "--data", data)
    assert result.code == 0, result.err
    assert "initialised them at random" in result.out + result.err
