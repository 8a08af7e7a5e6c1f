"""Hugging Face folders with inputs whose padding the data does not mark the usual way: token ids with
no attention_mask, and speech encoders whose attention_mask is over audio samples, not frames.

Expected counts come from plain forward hooks on the ReLU modules, the kept positions from numpy
(the frame lengths by the conv arithmetic, not by the library), never from the tool."""

from __future__ import annotations

import numpy as np
import pytest
from hf_models import (
    PAD,
    VOCAB,
    padded_audio,
    relu_counts,
    save_tokenizer,
    speech_model,
    token_data,
    transformers,
)

torch = pytest.importorskip("torch")


def _scan(cli, tmp_path, folder, *args, **arrays):
    data = tmp_path / "data.npz"
    np.savez(data, **arrays)
    result = cli("scan", folder, "--data", data, "--json", "-", *args)
    assert result.code == 0, result.err
    report = result.json()
    return {layer["name"]: layer for layer in report["layers"]}, report


def _assert_counts(layers, truth):
    assert set(layers) == set(truth)
    for name, (counts, rows) in truth.items():
        assert (layers[name]["positive_counts"], layers[name]["elements_per_unit"]) == (counts, rows), name


@pytest.fixture(scope="module")
def bert_tagger(tmp_path_factory):
    torch.manual_seed(3)
    config = transformers.BertConfig(
        vocab_size=len(VOCAB), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=24, hidden_act="relu", max_position_embeddings=32, pad_token_id=PAD,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=3,
    )  # fmt: skip
    model = transformers.BertForTokenClassification(config).eval()
    folder = tmp_path_factory.mktemp("bert") / "bert-tagger"
    model.save_pretrained(folder)
    save_tokenizer(folder)
    return folder, model


def test_token_ids_without_a_mask_say_how_many_pad_ids_were_counted(bert_tagger, cli, tmp_path):
    folder, model = bert_tagger
    ids, mask = token_data(samples=8, tokens=9, seed=5)
    pads = int((ids == PAD).sum())
    assert pads > 0
    site = "bert.encoder.layer.0.intermediate.intermediate_act_fn"

    # no mask: every position counts (padding included), and the report says how many held the pad id
    layers, report = _scan(cli, tmp_path, folder, input_ids=ids)
    _assert_counts(layers, relu_counts(model, {"input_ids": ids}, lambda _n, _s: np.ones(ids.shape)))
    said = [n for n in report["notes"] if "no attention_mask" in n]
    assert len(said) == 1 and f"{pads} of them hold the model's pad_token_id {PAD}" in said[0], report[
        "notes"
    ]
    assert f"--exclude-token-ids {PAD}" in said[0]

    # what the note suggests counts the real tokens of that same forward
    layers, report = _scan(cli, tmp_path, folder, "--exclude-token-ids", str(PAD), input_ids=ids)
    _assert_counts(layers, relu_counts(model, {"input_ids": ids}, lambda _n, _s: ids != PAD))
    assert not [n for n in report["notes"] if "no attention_mask" in n]

    # with the mask, or every position asked for: nothing to say
    for args, arrays in (((), {"attention_mask": mask}), (("--mask", "none"), {})):
        layers, report = _scan(cli, tmp_path, folder, *args, input_ids=ids, **arrays)
        assert not [n for n in report["notes"] if "no attention_mask" in n]
    assert layers[site]["elements_per_unit"] == ids.size


@pytest.mark.parametrize("kind", ["wav2vec2", "hubert"])
def test_speech_encoder_counts_the_real_frames_of_padded_audio(kind, cli, tmp_path):
    model, encoder = speech_model(kind)
    folder = tmp_path / kind
    model.save_pretrained(folder)
    audio, samples_mask, frame_mask = padded_audio()
    feed = {"input_values": audio, "attention_mask": samples_mask}

    def keep(name, shape):  # the encoder runs on frames: its FFNs and its positional conv
        return frame_mask if name.startswith(encoder) else None

    truth = relu_counts(model, feed, keep)
    for batch_size in ("auto", "4"):
        layers, report = _scan(cli, tmp_path, folder, "--batch-size", batch_size, **feed)
        _assert_counts(layers, truth)
    ffn = next(name for name in truth if "feed_forward" in name)
    assert layers[ffn]["elements_per_unit"] == int(frame_mask.sum()) < frame_mask.size
    # the conv sites ([B, C, L]) have no token axis and count every frame, which is said
    unmasked = [n for n in report["notes"] if n.startswith("position mask not applied")]
    assert len(unmasked) == 1 and "feed_forward" not in unmasked[0] and "conv_layers.0" in unmasked[0]


TRANSPOSED = '''
import torch
from torch import nn


class Net(nn.Module):
    """Units moved off their usual axis before each ReLU: a Conv1d's channels through
    transpose -> LayerNorm -> transpose, a SamePad-like slice and a permute; a Linear's features
    transposed to axis 1."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(3, 6, 3)
        self.norm = nn.LayerNorm(6)
        self.act1 = nn.ReLU()
        self.act2 = nn.ReLU()
        self.act3 = nn.ReLU()
        self.fc = nn.Linear(6, 5)
        self.act4 = nn.ReLU()

    def forward(self, x):  # x [B, 3, L]
        h = self.conv(x)  # [B, 6, L-2]
        a = self.act1(self.norm(h.transpose(-2, -1)).transpose(1, 2))  # [B, 6, L-2], units on axis 1
        b = self.act2(h[:, :, :-1])  # [B, 6, L-3]: time sliced off
        c = self.act3(h.permute(0, 2, 1))  # [B, L-2, 6]: units last
        d = self.act4(self.fc(c).transpose(1, 2))  # [B, 5, L-2]: units on axis 1
        return a.sum() + b.sum() + c.sum() + d.sum()


def build():
    torch.manual_seed(0)
    return Net()
'''


def test_units_keep_their_axis_through_transposes_norms_and_slices(cli, tmp_path):
    from conftest import arch_file

    model, spec = arch_file(tmp_path / "transposed.py", TRANSPOSED)
    x = np.random.default_rng(1).standard_normal((7, 3, 11)).astype(np.float32)
    torch.save(model.state_dict(), tmp_path / "m.pt")
    units_on = {"act1": 1, "act2": 1, "act3": 2, "act4": 1}  # the axis of the units in each output
    captured = {}
    for name, axis in units_on.items():
        getattr(model, name).register_forward_hook(
            lambda _m, _a, out, name=name, axis=axis: captured.__setitem__(
                name, np.moveaxis(out.detach().numpy(), axis, -1).reshape(-1, out.shape[axis])
            )
        )
    with torch.no_grad():
        model(torch.from_numpy(x))
    truth = {name: ((rows > 0).sum(0).tolist(), rows.shape[0]) for name, rows in captured.items()}
    np.savez(tmp_path / "x.npz", x=x)
    result = cli("scan", tmp_path / "m.pt", "--arch", spec, "--data", tmp_path / "x.npz", "--json", "-")
    assert result.code == 0, result.err
    _assert_counts({layer["name"]: layer for layer in result.json()["layers"]}, truth)


def test_units_before_the_token_axis_are_masked(cli, tmp_path):
    """SqueezeBERT runs its feed-forward as Conv1d on [B, C, T]: the token axis is last, the units on
    axis 1; padding there is not a position either (it was counted, and called "no token axis")."""
    torch.manual_seed(2)
    groups = dict(
        q_groups=1, k_groups=1, v_groups=1, post_attention_groups=1, intermediate_groups=1, output_groups=1
    )
    config = transformers.SqueezeBertConfig(
        vocab_size=len(VOCAB), hidden_size=16, embedding_size=16, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=24, hidden_act="relu", max_position_embeddings=32, pad_token_id=PAD,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **groups,
    )  # fmt: skip
    model = transformers.SqueezeBertModel(config).eval()
    folder = tmp_path / "squeezebert"
    model.save_pretrained(folder)
    ids, mask = token_data(samples=8, tokens=10, seed=4)
    captured = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ReLU):
            module.register_forward_hook(
                lambda _m, _a, out, name=name: captured.__setitem__(name, out.numpy())
            )
    with torch.no_grad():
        model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))
    truth = {}
    for name, a in captured.items():  # [B, C, T] -> real tokens x units
        rows = np.moveaxis(a, 1, -1)[mask.astype(bool)]
        truth[name] = ((rows > 0).sum(0).tolist(), rows.shape[0])
    for batch_size in ("auto", "3"):
        layers, report = _scan(
            cli, tmp_path, folder, "--batch-size", batch_size, input_ids=ids, attention_mask=mask
        )
        _assert_counts(layers, truth)
        assert not [n for n in report["notes"] if n.startswith("position mask not applied")]


def test_a_mask_of_another_length_than_its_sequence_is_refused(bert_tagger, cli, tmp_path):
    """It marked nothing: BERT ran with a [4, 9] mask on [4, 10] ids and every position was counted."""
    folder, _ = bert_tagger
    data = tmp_path / "short_mask.npz"
    np.savez(data, input_ids=np.full((4, 10), 5, np.int64), attention_mask=np.ones((4, 9), np.int64))
    result = cli("scan", folder, "--data", data)
    assert result.code == 2
    lines = result.err.strip().splitlines()
    assert len(lines) == 1 and "[4, 9]" in lines[0] and "'input_ids' has [4, 10]" in lines[0], result.err
    assert "Traceback" not in result.err
    assert cli("scan", folder, "--data", data, "--mask", "none").code == 0
