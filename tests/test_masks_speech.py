"""Speech encoders (their attention_mask is over audio samples, their transformer runs on frames):
watch() counts the real frames as `deadrelu scan` does; padded audio with no mask at all is said.
The truth: plain forward hooks on the ReLU modules, the frames' mask by the conv arithmetic."""

from __future__ import annotations

import numpy as np
import pytest
from hf_models import padded_audio, relu_counts, speech_model

from deadrelu_cli import watch

torch = pytest.importorskip("torch")


@pytest.mark.parametrize("kind", ["wav2vec2", "hubert"])
@pytest.mark.parametrize("given", [False, True], ids=["forward-mask", "position_mask"])
def test_watch_counts_the_real_frames_of_padded_audio(kind, given):
    """A training step on zero-padded audio with its samples' attention_mask (read from the forward, or
    given to step()): the encoder's FFNs count the frames the model treats as real, the conv feature
    extractor (no token axis) every frame, exactly as plain hooks count them."""
    model, encoder = speech_model(kind)
    audio, samples_mask, frame_mask = padded_audio()
    feed = {"input_values": audio, "attention_mask": samples_mask}
    truth = relu_counts(model, feed, lambda name, _shape: frame_mask if name.startswith(encoder) else None)
    model.train()  # no dropout, no SpecAugment in this config: the same numbers as the eval forward
    w = watch(model, every=1)
    w.step(position_mask=torch.from_numpy(samples_mask) if given else None)
    model(**{k: torch.from_numpy(v) for k, v in feed.items()})
    report = w.close()
    layers = {layer.name: layer for layer in report.layers}
    assert set(layers) == set(truth)
    for name, (counts, rows) in truth.items():
        assert (layers[name].positive_counts.tolist(), layers[name].elements_per_unit) == (counts, rows), name
    ffn = next(name for name in truth if "feed_forward" in name)
    assert layers[ffn].elements_per_unit == int(frame_mask.sum()) < frame_mask.size
    assert layers[ffn].extra["position_mask"] == "applied"


def _scan(cli, folder, data, *args):
    result = cli("scan", folder, "--data", data, "--json", "-", *args)
    assert result.code == 0, result.err
    report = result.json()
    return {layer["name"]: layer for layer in report["layers"]}, report, result.err


def _assert_counts(layers, truth):
    assert set(layers) == set(truth)
    for name, (counts, rows) in truth.items():
        assert (layers[name]["positive_counts"], layers[name]["elements_per_unit"]) == (counts, rows), name


def test_zero_padded_audio_without_a_mask_is_said_and_a_named_mask_counts_real_frames(cli, tmp_path):
    """wav2vec2-base style: zero-padded audio fed with no attention_mask. Every frame counts (nothing
    tells padding from silence), and a warning says how many samples end in a frame's worth of exact
    zeros (on stderr too with --json -); audio that does not end in zeros is scanned quietly. A samples'
    mask under another name (--mask NAME, not fed) counts the real frames of that same forward."""
    model, encoder = speech_model("wav2vec2")
    folder = tmp_path / "w2v"
    model.save_pretrained(folder)
    audio, samples_mask, frame_mask = padded_audio()
    every = relu_counts(model, {"input_values": audio}, lambda _n, _s: None)

    np.savez(tmp_path / "padded.npz", input_values=audio)
    layers, report, err = _scan(cli, folder, tmp_path / "padded.npz")
    _assert_counts(layers, every)
    said = [n for n in report["notes"] if n.startswith("check padding: ")]
    assert len(said) == 1 and "5 of 6 samples end in 10 or more exact zeros" in said[0], report["notes"]
    assert "warning: padding: the data has input_values but no attention_mask" in " ".join(err.split())

    unpadded = np.where(audio == 0, 0.5, audio).astype(np.float32)
    np.savez(tmp_path / "unpadded.npz", input_values=unpadded)
    _, report, err = _scan(cli, folder, tmp_path / "unpadded.npz")
    assert not [n for n in report["notes"] if "padding" in n] and "warning" not in err

    np.savez(tmp_path / "named.npz", input_values=audio, audio_mask=samples_mask)
    layers, report, err = _scan(cli, folder, tmp_path / "named.npz", "--mask", "audio_mask")
    keep = lambda name, _shape: frame_mask if name.startswith(encoder) else None  # noqa: E731
    _assert_counts(layers, relu_counts(model, {"input_values": audio}, keep))
    assert not [n for n in report["notes"] if n.startswith("check padding")] and "warning" not in err
