"""Funnel-style encoders pool the sequence between blocks ([B, T] -> [B, ceil(T/2)], CLS kept apart) and
pool their attention_mask by min: each block counts the positions the model treats as real, in `scan`
and in `watch()`. The truth: plain hooks, the pooled masks computed in numpy from the model's docs."""

from __future__ import annotations

import numpy as np
import pytest
from hf_models import PAD, VOCAB, relu_counts, token_data, transformers

from deadrelu_cli import watch

torch = pytest.importorskip("torch")


def _funnel():
    torch.manual_seed(0)
    config = transformers.FunnelConfig(
        vocab_size=len(VOCAB), block_sizes=[1, 1, 1], d_model=16, n_head=2, d_head=8, d_inner=24,
        hidden_act="relu", num_decoder_layers=1, hidden_dropout=0.0, attention_dropout=0.0,
        activation_dropout=0.0, pad_token_id=PAD,
    )  # fmt: skip
    return transformers.FunnelModel(config).eval()


def _pool_min(mask: np.ndarray) -> np.ndarray:
    """separate_cls + truncate_seq: [m0, m0, m1, …, m_{T-2}], then the min of each pair (a last single
    one alone)."""
    shifted = np.concatenate([mask[:, :1], mask[:, :-1]], axis=1)
    if shifted.shape[1] % 2:
        shifted = np.concatenate([shifted, np.ones_like(shifted[:, :1])], axis=1)
    return shifted.reshape(shifted.shape[0], -1, 2).min(axis=2)


def _truth(model, ids, mask):
    block_masks = [mask]
    for _ in range(2):
        block_masks.append(_pool_min(block_masks[-1]))

    def keep(name, _shape):
        if name.startswith("encoder.blocks."):
            return block_masks[int(name.split(".")[2])]
        return mask  # the decoder runs upsampled, on every position again

    truth = relu_counts(model, {"input_ids": ids, "attention_mask": mask}, keep)
    assert [rows for _, rows in truth.values()][1:3] == [int(m.sum()) for m in block_masks[1:]]
    return truth


def test_funnel_blocks_count_their_pooled_real_positions(cli, tmp_path):
    model = _funnel()
    folder = tmp_path / "funnel"
    model.save_pretrained(folder)
    ids, mask = token_data(samples=8, tokens=9, seed=2)
    truth = _truth(model, ids, mask)
    np.savez(tmp_path / "d.npz", input_ids=ids, attention_mask=mask)
    for batch_size in ("3", "8"):
        result = cli("scan", folder, "--data", tmp_path / "d.npz", "--json", "-", "--batch-size", batch_size)
        assert result.code == 0, result.err
        report = result.json()
        layers = {layer["name"]: layer for layer in report["layers"]}
        assert set(layers) == set(truth)
        for name, (counts, rows) in truth.items():
            assert (layers[name]["positive_counts"], layers[name]["elements_per_unit"]) == (counts, rows), (
                name
            )
    assert not [n for n in report["notes"] if n.startswith("position mask not applied")], report["notes"]


def test_watch_funnel_blocks_count_their_pooled_real_positions():
    model = _funnel()
    ids, mask = token_data(samples=8, tokens=9, seed=2)
    truth = _truth(model, ids, mask)
    model.train()  # no dropout in this config: the eval numbers
    w = watch(model, every=1)
    w.step()
    model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))
    layers = {layer.name: layer for layer in w.close().layers}
    for name, (counts, rows) in truth.items():
        assert (layers[name].positive_counts.tolist(), layers[name].elements_per_unit) == (counts, rows), name
