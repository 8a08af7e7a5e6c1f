"""trial36: calibration data as people have it (Fortran-ordered arrays, labels beside the inputs,
np.savez's positional names, uint8 images, a folder of files, one sample without its axis, text files
with a BOM or Unicode line separators, a .json array, sequences longer than the model's positions).

Truth is computed in each test with plain torch forward hooks and numpy; each test fails on the code
before the fix it names."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import torch

NETS = """
import torch
from torch import nn


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(6, 10)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(10, 3)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class CNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 5, 3, padding=1)
        self.act = nn.ReLU()
        self.fc = nn.Linear(5, 2)

    def forward(self, x):
        return self.fc(self.act(self.conv(x)).mean((2, 3)))


class Two(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 4)
        self.b = nn.Linear(2, 4)
        self.act = nn.ReLU()
        self.head = nn.Linear(4, 1)

    def forward(self, image, meta):
        return self.head(self.act(self.a(image) + 3 * self.b(meta)))


class NHWC(CNN):
    def forward(self, x):  # takes images [N, H, W, C], as a TensorFlow-layout export does
        return super().forward(x.permute(0, 3, 1, 2))


def nhwc():
    torch.manual_seed(0)
    return NHWC().eval()


class DictIn(Two):
    def forward(self, batch):  # a training codebase's dict batch
        return super().forward(batch["image"], batch["meta"])


def dictin():
    torch.manual_seed(0)
    return DictIn().eval()


class Tok(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 5)
        self.act = nn.ReLU()

    def forward(self, input_ids):
        return self.act(self.emb(input_ids)).sum(1)


def tok():
    torch.manual_seed(0)
    return Tok().eval()


def mlp():
    torch.manual_seed(0)
    return MLP().eval()


def cnn():
    torch.manual_seed(0)
    return CNN().eval()


def two():
    torch.manual_seed(0)
    return Two().eval()
"""


def _model(tmp_path, name):
    """(the model in eval mode, its state_dict file, the --arch spec that builds it)."""
    path = tmp_path / "nets.py"
    path.write_text(NETS)
    spec = importlib.util.spec_from_file_location(f"trial36_nets_{tmp_path.name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model = getattr(module, name)()
    state = tmp_path / f"{name}.pt"
    torch.save(model.state_dict(), state)
    return model, state, f"{path}:{name}"


def _truth(model, *inputs) -> list[int]:
    """Positive counts per unit of `model.act`, from a forward hook (units: a conv's channels, else
    the last axis)."""
    seen = {}
    hook = model.act.register_forward_hook(lambda m, i, o: seen.__setitem__("out", o.detach().numpy()))
    with torch.no_grad():
        model(*(torch.as_tensor(x) for x in inputs))
    hook.remove()
    out = (
        seen["out"] if seen["out"].ndim != 4 else np.moveaxis(seen["out"], 1, -1)
    )  # units: channels, else last
    return (out > 0).reshape(-1, out.shape[-1]).sum(0).tolist()


def _onnx(model, path, names, example):
    torch.onnx.export(
        model,
        tuple(torch.as_tensor(e) for e in example),
        path,
        dynamo=False,
        input_names=names,
        dynamic_axes={n: {0: "b"} for n in names},
    )
    return path


def _counts(cli, *args) -> tuple[list[int], dict]:
    result = cli("scan", *args, "--json", "-", "-q")
    assert result.code == 0, result.err
    report = result.json()
    (layer,) = [layer for layer in report["layers"] if layer["ran"]]
    return layer["positive_counts"], report


def test_npz_fortran_ordered_array_is_read(cli, tmp_path):
    """np.savez of a transposed (Fortran-ordered) array was refused; now read, same counts."""
    model, state, spec = _model(tmp_path, "mlp")
    x = np.random.default_rng(0).standard_normal((6, 23)).astype(np.float32).T  # F-contiguous [23, 6]
    np.savez(tmp_path / "f.npz", x=x)
    counts, report = _counts(cli, str(state), "--arch", spec, "--data", str(tmp_path / "f.npz"), "-b", "4")
    assert counts == _truth(model, np.ascontiguousarray(x))
    assert report["data"]["samples"] == 23


def test_label_arrays_are_left_out_and_named(cli, tmp_path):
    """An x/y or images/labels file was refused ("arrays y match no model input"); the label array is
    now not fed, and a note names it — torch and ONNX alike."""
    model, state, spec = _model(tmp_path, "mlp")
    rng = np.random.default_rng(1)
    x = rng.standard_normal((17, 6)).astype(np.float32)
    np.savez(tmp_path / "xy.npz", x=x, y=rng.integers(0, 3, 17))
    np.savez(tmp_path / "images.npz", images=x, labels=rng.integers(0, 3, 17))
    onnx_path = _onnx(model, tmp_path / "m.onnx", ["x"], [x[:1]])
    want = _truth(model, x)
    for args, label in (
        ((str(state), "--arch", spec, "--data", str(tmp_path / "xy.npz")), "y"),
        ((str(state), "--arch", spec, "--data", str(tmp_path / "images.npz")), "labels"),
        ((str(onnx_path), "--data", str(tmp_path / "xy.npz")), "y"),
    ):
        counts, report = _counts(cli, *args)
        assert counts == want
        assert any(note.startswith(f"array(s) {label} not fed") for note in report["notes"])


def test_savez_positional_arrays_feed_inputs_in_order(cli, tmp_path):
    """np.savez(f, image, meta) names the arrays arr_0, arr_1: they feed a two-input model in order
    (they were refused: "no array for model input(s) image, meta")."""
    model, state, spec = _model(tmp_path, "two")
    rng = np.random.default_rng(2)
    image = rng.standard_normal((19, 6)).astype(np.float32)
    meta = rng.standard_normal((19, 2)).astype(np.float32)
    np.savez(tmp_path / "pos.npz", image, meta)
    onnx_path = _onnx(model, tmp_path / "two.onnx", ["image", "meta"], [image[:1], meta[:1]])
    want = _truth(model, image, meta)
    assert want != _truth(model, image, meta[::-1].copy())  # the order of the arrays matters here
    assert _counts(cli, str(state), "--arch", spec, "--data", str(tmp_path / "pos.npz"))[0] == want
    assert _counts(cli, str(onnx_path), "--data", str(tmp_path / "pos.npz"))[0] == want


def test_uint8_images_feed_a_float_torch_model(cli, tmp_path):
    """uint8 (and bool) data into a float torch model failed ("Input type (long int) and bias type
    (float)"); it is now fed as float, as the ONNX scan does, with the same note, whatever the batch."""
    model, state, spec = _model(tmp_path, "cnn")
    images = np.random.default_rng(3).integers(0, 256, (7, 3, 5, 5), dtype=np.uint8)
    np.save(tmp_path / "u8.npy", images)
    want = _truth(model, images.astype(np.float32))
    for batch in ("1", "3", "auto"):
        counts, report = _counts(
            cli, str(state), "--arch", spec, "--data", str(tmp_path / "u8.npy"), "-b", batch
        )
        assert counts == want
        assert any("uint8 converted to the model's float32 as raw values" in n for n in report["notes"])
    model, state, spec = _model(tmp_path, "mlp")
    flags = np.random.default_rng(4).random((9, 6)) > 0.5
    np.save(tmp_path / "b.npy", flags)
    counts, _ = _counts(cli, str(state), "--arch", spec, "--data", str(tmp_path / "b.npy"))
    assert counts == _truth(model, flags.astype(np.float32))


def test_fix_compares_uint8_fed_models(cli, tmp_path):
    """`fix` loads the written model back and runs it on the same uint8 data: fed as floats there too."""
    model, state, spec = _model(tmp_path, "mlp")
    with torch.no_grad():
        model.fc1.bias[2] = -1e3  # one dead unit to fix
    torch.save(model.state_dict(), state)
    data = np.random.default_rng(5).integers(0, 9, (12, 6), dtype=np.uint8)
    np.save(tmp_path / "u8.npy", data)
    assert _truth(model, data.astype(np.float32))[2] == 0
    # --force: the check under test is that the model loaded back runs on the uint8 data at all
    result = cli(
        "fix", str(state), "--arch", spec, "--data", str(tmp_path / "u8.npy"),
        "--strategy", "reinit", "--output", str(tmp_path / "fixed.pt"), "--force",
    )  # fmt: skip
    assert result.code == 0, result.err
    assert "max |Δ| = 0," in result.out
    assert (tmp_path / "fixed.pt").exists()


def test_data_folder_scans_every_data_file(cli, tmp_path):
    """--data FOLDER was refused ("is a directory"); it now scans the folder's data files in order."""
    model, state, spec = _model(tmp_path, "mlp")
    x = np.random.default_rng(6).standard_normal((15, 6)).astype(np.float32)
    (tmp_path / "calib").mkdir()
    np.save(tmp_path / "calib" / "a.npy", x[:9])
    np.save(tmp_path / "calib" / "b.npy", x[9:])
    (tmp_path / "calib" / "README.txt").write_text("not data")
    counts, report = _counts(cli, str(state), "--arch", spec, "--data", str(tmp_path / "calib"))
    assert counts == _truth(model, x)
    assert report["data"]["samples"] == 15
    # the model kept in the same folder is the model, not data (it was read as arrays fc1.weight, …)
    inside = tmp_path / "calib" / "model.pt"
    inside.write_bytes(state.read_bytes())
    counts, report = _counts(cli, str(inside), "--arch", spec, "--data", str(tmp_path / "calib"))
    assert counts == _truth(model, x) and report["data"]["samples"] == 15


def test_one_sample_without_its_axis_and_hwc_images_are_explained(cli, tmp_path):
    """A single image [C, H, W] and [N, H, W, C] images: one line saying what to do (torch failed with
    "Dimension out of range"; ONNX said only the shapes)."""
    model, state, spec = _model(tmp_path, "cnn")
    image = np.zeros((3, 5, 5), np.float32)
    np.save(tmp_path / "one.npy", image)
    np.save(tmp_path / "hwc.npy", np.zeros((4, 5, 5, 3), np.float32))
    onnx_path = _onnx(model, tmp_path / "c.onnx", ["x"], [image[None]])
    for model_args in ((str(state), "--arch", spec), (str(onnx_path),)):
        result = cli("scan", *model_args, "--data", str(tmp_path / "one.npy"))
        assert result.code == 2 and len(result.err.strip().splitlines()) == 1, result.err
        assert "x[None]" in result.err
        result = cli("scan", *model_args, "--data", str(tmp_path / "hwc.npy"))
        assert result.code == 2 and len(result.err.strip().splitlines()) == 1, result.err
        assert "np.transpose(x, (0, 3, 1, 2))" in result.err


def test_text_lines_end_at_newlines_only(tmp_path):
    """A UTF-8 BOM is not part of the first document (it made its first word unknown); U+2028, form
    feeds and the like inside a line do not split a document (they did, and broke .jsonl records)."""
    from deadrelu_cli.text import read_documents

    docs = ["w0 w1\u2028w2", "w3\x0cw4 w5", "w6"]
    (tmp_path / "a.txt").write_bytes(("\ufeff" + "\r\n".join(docs) + "\r\n\r\n").encode())
    assert read_documents(str(tmp_path / "a.txt"), "text") == docs
    lines = "\n".join(json.dumps({"body": d}, ensure_ascii=False) for d in docs)
    (tmp_path / "a.jsonl").write_bytes(("\ufeff" + lines + "\n").encode())
    assert read_documents(str(tmp_path / "a.jsonl"), "body") == docs


def test_json_array_of_documents(tmp_path):
    """A .json array was read as one text document (its raw JSON); now one document per item."""
    from deadrelu_cli.text import read_documents

    (tmp_path / "r.json").write_text(json.dumps([{"text": "w0 w1"}, {"text": "w2"}], indent=1))
    assert read_documents(str(tmp_path / "r.json"), "text") == ["w0 w1", "w2"]
    (tmp_path / "s.json").write_text(json.dumps(["w0", "w1 w2"]))
    assert read_documents(str(tmp_path / "s.json"), "text") == ["w0", "w1 w2"]
    (tmp_path / "o.json").write_text(json.dumps({"id": 1, "text": "w3 w4"}, indent=2))  # pretty-printed
    assert read_documents(str(tmp_path / "o.json"), "text") == ["w3 w4"]
    (tmp_path / "l.json").write_text(json.dumps({"text": "w5"}) + "\n" + json.dumps({"text": "w6"}) + "\n")
    assert read_documents(str(tmp_path / "l.json"), "text") == ["w5", "w6"]  # JSON lines named .json


def test_text_longer_than_the_positions_names_seq_len(cli, tmp_path):
    """--text documents longer than max_position_embeddings failed with "index out of range in
    self"; the message now gives the limit and the --seq-len to pass."""
    from hf_models import VOCAB, opt_model, save_folder

    model = opt_model()
    limit = model.config.max_position_embeddings
    folder = save_folder(model, tmp_path / "opt")
    (tmp_path / "long.txt").write_text(" ".join(VOCAB[3:8] * limit) + "\n")
    result = cli("scan", str(folder), "--text", str(tmp_path / "long.txt"), "--seq-len", str(2 * limit))
    assert result.code == 2 and len(result.err.strip().splitlines()) == 1, result.err
    assert f"--seq-len {limit}" in result.err


def test_one_vector_without_its_sample_axis_is_not_counted_as_many_samples(cli, tmp_path):
    """A single sample saved as [6] for a Linear(6, …) model ran as one vector and was reported as 6
    samples (each unit with 1 value); now refused, saying to add the sample axis. Its [1, 6] form
    counts as one sample."""
    model, state, spec = _model(tmp_path, "mlp")
    x = np.random.default_rng(8).standard_normal(6).astype(np.float32)
    np.save(tmp_path / "one.npy", x)
    np.save(tmp_path / "one1.npy", x[None])
    for batch in ("auto", "6"):
        result = cli("scan", str(state), "--arch", spec, "--data", str(tmp_path / "one.npy"), "-b", batch)
        assert result.code == 2 and len(result.err.strip().splitlines()) == 1, result.err
        assert "x[None]" in result.err
    counts, report = _counts(cli, str(state), "--arch", spec, "--data", str(tmp_path / "one1.npy"))
    assert counts == _truth(model, x[None])
    assert report["data"]["samples"] == 1 and report["layers"][0]["elements_per_unit"] == 1


def test_images_for_a_channels_last_onnx_model(cli, tmp_path):
    """An ONNX model taking [N, H, W, C]: NHWC data counts as plain torch does; NCHW data is refused
    with the transpose that fits (not the reverse one)."""
    model, _state, _spec = _model(tmp_path, "nhwc")
    images = np.random.default_rng(9).standard_normal((5, 6, 6, 3)).astype(np.float32)
    onnx_path = _onnx(model, tmp_path / "nhwc.onnx", ["x"], [images[:1]])
    np.save(tmp_path / "nhwc.npy", images)
    np.save(tmp_path / "nchw.npy", images.transpose(0, 3, 1, 2).copy())
    assert _counts(cli, str(onnx_path), "--data", str(tmp_path / "nhwc.npy"))[0] == _truth(model, images)
    result = cli("scan", str(onnx_path), "--data", str(tmp_path / "nchw.npy"))
    assert result.code == 2 and len(result.err.strip().splitlines()) == 1, result.err
    assert "np.transpose(x, (0, 2, 3, 1))" in result.err


def test_onnx_integer_input_takes_only_values_that_survive(cli, tmp_path):
    """Float data into an ONNX int64 input was cast silently (3.5 -> 3, NaN -> a huge id): integral
    floats still count as the ids they hold; a value that would change is refused, naming it."""
    onnx_path = _onnx(_Embed(), tmp_path / "ids.onnx", ["input_ids"], [np.zeros((1, 4), np.int64)])
    ids = np.random.default_rng(10).integers(0, 20, (6, 4))
    np.savez(tmp_path / "f.npz", input_ids=ids.astype(np.float32))
    bad = ids.astype(np.float32)
    bad[2, 1] = 3.5
    np.savez(tmp_path / "bad.npz", input_ids=bad)
    assert _counts(cli, str(onnx_path), "--data", str(tmp_path / "f.npz"))[0] == _truth(_Embed(), ids)
    result = cli("scan", str(onnx_path), "--data", str(tmp_path / "bad.npz"))
    assert result.code == 2 and len(result.err.strip().splitlines()) == 1, result.err
    assert "3.5" in result.err and "int64" in result.err


class _Embed(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(20, 5)
        self.act = torch.nn.ReLU()

    def forward(self, input_ids):
        return self.act(self.emb(input_ids)).sum(1)


def test_static_batch_pt2_with_a_partial_last_batch(cli, tmp_path):
    """A .pt2 exported with batch 4 (torch.export's default: static shapes) and 9 samples crashed on
    the last batch of 1 (exit 3, "Guard failed"); now exit 2 naming --limit 8, and with it the counts
    of the first 8; fewer samples than one batch are told so (not "--limit 0")."""
    model, _state, _spec = _model(tmp_path, "mlp")
    x = np.random.default_rng(11).standard_normal((9, 6)).astype(np.float32)
    pt2 = tmp_path / "b4.pt2"
    torch.export.save(torch.export.export(model, (torch.as_tensor(x[:4]),)), pt2)
    np.save(tmp_path / "x.npy", x)
    result = cli("scan", str(pt2), "--data", str(tmp_path / "x.npy"))
    assert result.code == 2 and "--limit 8" in result.err and len(result.err.strip().splitlines()) == 1
    assert _counts(cli, str(pt2), "--data", str(tmp_path / "x.npy"), "--limit", "8")[0] == _truth(
        model, x[:8]
    )
    result = cli("scan", str(pt2), "--data", str(tmp_path / "x.npy"), "--limit", "3")
    assert result.code == 2 and "give at least 4 samples" in result.err, result.err


def test_dict_input_from_input_dot_key_arrays(cli, tmp_path):
    """forward(self, batch) taking a dict: arrays batch.image / batch.meta make that dict (the file was
    refused, advising to name an array "batch"); the counts are plain torch's on the same dict."""
    model, state, spec = _model(tmp_path, "dictin")
    rng = np.random.default_rng(12)
    image = rng.standard_normal((13, 6)).astype(np.float32)
    meta = rng.standard_normal((13, 2)).astype(np.float32)
    np.savez(tmp_path / "d.npz", **{"batch.meta": meta, "batch.image": image})
    seen = {}
    model.act.register_forward_hook(lambda m, i, o: seen.__setitem__("out", o.detach().numpy()))
    with torch.no_grad():
        model({"image": torch.as_tensor(image), "meta": torch.as_tensor(meta)})
    want = (seen["out"] > 0).sum(0).tolist()
    for batch in ("4", "auto"):
        args = (str(state), "--arch", spec, "--data", str(tmp_path / "d.npz"), "-b", batch)
        assert _counts(cli, *args)[0] == want


def test_float_token_ids_into_a_torch_model_say_what_to_do(cli, tmp_path):
    """Float token ids into an Embedding failed with torch's "Expected tensor for argument #1
    'indices'…"; the one line now names the array and the dtype to save it in."""
    _model_, state, spec = _model(tmp_path, "tok")
    np.savez(tmp_path / "f.npz", input_ids=np.ones((3, 4), np.float32))
    result = cli("scan", str(state), "--arch", spec, "--data", str(tmp_path / "f.npz"))
    assert result.code == 2 and len(result.err.strip().splitlines()) == 1, result.err
    assert "input_ids: float32" in result.err and "int64" in result.err


def test_onnx_float16_input_overflow_is_refused(cli, tmp_path):
    """float32 data beyond float16's range into an fp16 ONNX input became inf after the NaN/Inf check
    (a silent change of the data); now exit 2 naming the value. In-range data counts as torch does."""
    model, _state, _spec = _model(tmp_path, "mlp")
    x = np.random.default_rng(13).standard_normal((8, 6)).astype(np.float32)
    onnx_path = _onnx(model.half(), tmp_path / "h.onnx", ["x"], [x[:1].astype(np.float16)])
    np.save(tmp_path / "ok.npy", x)
    assert _counts(cli, str(onnx_path), "--data", str(tmp_path / "ok.npy"))[0] == _truth(
        model, x.astype(np.float16)
    )
    x[3, 1] = 1e6
    np.save(tmp_path / "big.npy", x)
    result = cli("scan", str(onnx_path), "--data", str(tmp_path / "big.npy"))
    assert result.code == 2 and len(result.err.strip().splitlines()) == 1, result.err
    assert "1000000.0" in result.err and "float16" in result.err


def test_one_array_per_sample_says_stack_them(cli, tmp_path):
    """A .pt list or an .npz of per-sample arrays (input0…, arr_0…) gave "no array for model input(s)
    x … name the arrays after the inputs"; it now says to stack them. Named arrays of one shape keep
    the mismatch message."""
    _model_, state, spec = _model(tmp_path, "mlp")
    samples = [torch.full((6,), float(i)) for i in range(4)]
    torch.save(samples, tmp_path / "list.pt")
    np.savez(tmp_path / "each.npz", *[s.numpy() for s in samples])
    onnx_path = _onnx(_model_, tmp_path / "m.onnx", ["x"], [np.zeros((1, 6), np.float32)])
    for args in ((str(state), "--arch", spec), (str(onnx_path),)):
        for data in ("list.pt", "each.npz"):
            result = cli("scan", *args, "--data", str(tmp_path / data))
            assert result.code == 2 and len(result.err.strip().splitlines()) == 1, result.err
            assert "one array per sample? stack them" in result.err, result.err
    np.savez(tmp_path / "named.npz", a=np.zeros((5, 6)), b=np.zeros((5, 6)), c=np.zeros((5, 6)))
    result = cli("scan", str(state), "--arch", spec, "--data", str(tmp_path / "named.npz"))
    assert result.code == 2 and "stack" not in result.err and "no array for model input(s) x" in result.err


def test_zero_samples_says_what_to_do(cli, tmp_path):
    """An empty array said only "has zero samples"; the one line now gives its shape and what to do."""
    _model_, state, spec = _model(tmp_path, "mlp")
    np.save(tmp_path / "empty.npy", np.zeros((0, 6), np.float32))
    result = cli("scan", str(state), "--arch", spec, "--data", str(tmp_path / "empty.npy"))
    assert result.code == 2 and len(result.err.strip().splitlines()) == 1, result.err
    assert "[0, 6]" in result.err and "save at least one sample" in result.err


def test_ragged_samples_saved_as_objects_say_what_to_do(cli, tmp_path):
    """Samples of different lengths saved as an object array (what np.array makes of them): refused
    as before, never unpickled, and the line now says what such an array is and what to do."""
    _model_, state, spec = _model(tmp_path, "mlp")
    ragged = np.empty(2, dtype=object)
    ragged[0], ragged[1] = np.zeros(6, np.float32), np.zeros(4, np.float32)
    np.save(tmp_path / "r.npy", ragged, allow_pickle=True)
    np.savez(tmp_path / "r.npz", x=ragged)
    for name in ("r.npy", "r.npz"):
        result = cli("scan", str(state), "--arch", spec, "--data", str(tmp_path / name))
        assert result.code == 2 and len(result.err.strip().splitlines()) == 1, result.err
        assert "different shapes" in result.err and "np.stack" in result.err
