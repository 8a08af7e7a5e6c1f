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
