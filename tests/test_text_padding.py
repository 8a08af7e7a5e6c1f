"""--text: padding is never a position, whatever the tokenizer declares (`model_input_names` without
attention_mask, left padding, no pad token so the EOS pads), and the real tokens see what they would
see unpadded.

Ground truth: each document tokenized here by hand (VOCAB, truncated to --seq-len), run alone and
unpadded through the same model with plain forward hooks, (y > 0) counted per unit over its tokens in
numpy. Each model has a unit planted to fire on the padding positions of a padded batch (as a scan
that counts padding would run it) and on no real token: it must come out dead."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from hf_models import PAD, VOCAB, opt_model, plant_unit, relu_sites, save_tokenizer, transformers

torch = pytest.importorskip("torch")

SEQ_LEN = 7


def _documents(seed: int) -> list[str]:
    """Documents of 1 to 11 words (some longer than SEQ_LEN), each starting with [BOS] as OPT's do:
    with no pad token the EOS ([BOS] here) pads, and only the mask tells it from the real one."""
    rng = np.random.default_rng(seed)
    return [
        " ".join(["[BOS]"] + [f"w{i}" for i in rng.integers(0, 29, int(rng.integers(0, 11)))])
        for _ in range(9)
    ]


def _ids(document: str, seq_len: int = SEQ_LEN) -> list[int]:
    return [VOCAB.index(word) for word in document.split()][:seq_len]


def _padded(documents: list[list[int]], side: str) -> tuple[np.ndarray, np.ndarray]:
    width = max(map(len, documents))
    ids, mask = np.full((len(documents), width), PAD, np.int64), np.zeros((len(documents), width), np.int64)
    for row, doc in enumerate(documents):
        where = slice(0, len(doc)) if side == "right" else slice(width - len(doc), width)
        ids[row, where], mask[row, where] = doc, 1
    return ids, mask


def _captured(model, ids: np.ndarray, **extra) -> dict[str, np.ndarray]:
    """Every ReLU module's output of one forward on IDS (no attention_mask unless in EXTRA), as
    [samples, tokens, units]; plain forward hooks."""
    captured: dict[str, np.ndarray] = {}
    handles = [
        m.register_forward_hook(lambda _m, _a, out, name=name: captured.__setitem__(name, out.numpy()))
        for name, m in relu_sites(model).items()
    ]
    try:
        with torch.no_grad():
            model(input_ids=torch.from_numpy(ids), **{k: torch.from_numpy(v) for k, v in extra.items()})
    finally:
        for handle in handles:
            handle.remove()
    return {name: a.reshape(ids.shape[0], ids.shape[1], -1) for name, a in captured.items()}


def _unpadded_truth(model, documents: list[list[int]]) -> dict[str, tuple[np.ndarray, int]]:
    """Per site: (positive counts per unit, tokens) with every document run alone, unpadded."""
    truth: dict[str, tuple[np.ndarray, int]] = {}
    for doc in documents:
        for name, a in _captured(model, np.asarray([doc], np.int64)).items():
            counts, tokens = truth.get(name, (0, 0))
            truth[name] = (counts + (a[0] > 0).sum(axis=0), tokens + len(doc))
    return truth


def _plant_padding_unit(model, linear, documents: list[list[int]], unit: int) -> None:
    """LINEAR's row UNIT fires on padding as a padded batch without attention_mask shows it to the
    model (either side), and on no real token of any unpadded document."""
    seen: list = []
    handle = linear.register_forward_hook(
        lambda _m, args, _o: seen.append(args[0].reshape(-1, args[0].shape[-1]))
    )
    try:
        with torch.no_grad():
            fire = []
            for side in ("right", "left"):
                ids, mask = _padded(documents, side)
                model(input_ids=torch.from_numpy(ids))
                fire.append(seen.pop()[torch.from_numpy(mask.reshape(-1) == 0)])
            for doc in documents:
                model(input_ids=torch.tensor([doc]))
    finally:
        handle.remove()
    plant_unit(linear, torch.cat(fire), torch.cat(seen), unit)


def _folder(source, destination, **tokenizer):
    """SOURCE's config and weights with a tokenizer of its own (tests/hf_models.py's vocabulary)."""
    destination.mkdir()
    for path in source.iterdir():
        shutil.copy(path, destination / path.name)
    save_tokenizer(destination, **tokenizer)
    return destination


def _write_documents(path, documents: list[str]) -> None:
    """One per line, with empty and blank lines between them (they are not documents)."""
    path.write_text("\n\n".join(documents[:3]) + "\n  \n" + "\n".join(documents[3:]) + "\n")


def _scan(cli, folder, text, *args):
    result = cli(
        "scan", folder, "--text", text, "--seq-len", SEQ_LEN, "--batch-size", "4", "--json", "-", *args
    )
    assert result.code == 0, result.err
    return result.json()


def _assert_counts(report, truth) -> None:
    layers = {layer["name"]: layer for layer in report["layers"]}
    assert set(layers) == set(truth)
    for name, (counts, tokens) in truth.items():
        assert layers[name]["elements_per_unit"] == tokens, name
        assert layers[name]["positive_counts"] == counts.tolist(), name


@pytest.fixture(scope="module")
def opt_folder(tmp_path_factory):
    """(folder without a tokenizer, model, documents, (site, unit)): OPT (causal) with a unit that
    fires on padding only."""
    model = opt_model(seed=1)
    with torch.no_grad():  # padding unlike any word (a constant row would vanish in the LayerNorm)
        model.model.decoder.embed_tokens.weight[PAD] = torch.linspace(-3, 3, 16)
    documents = _documents(11)
    site, unit = "model.decoder.layers.0.activation_fn", 10
    _plant_padding_unit(model, model.model.decoder.layers[0].fc1, [_ids(d) for d in documents], unit)
    folder = tmp_path_factory.mktemp("opt") / "weights"
    model.save_pretrained(folder)
    return folder, model, documents, (site, unit)


@pytest.mark.parametrize(
    "tokenizer",
    [
        {"model_input_names": ("input_ids",)},
        {"model_input_names": ("input_ids",), "padding_side": "left"},
        {"model_input_names": ("input_ids", "attention_mask"), "padding_side": "left"},
        {"model_input_names": ("input_ids",), "pad_token": None, "eos_token": "[BOS]"},
        {"model_input_names": ("input_ids", "token_type_ids")},  # OPT's forward() takes no token_type_ids
    ],
    ids=["no-mask-declared", "no-mask-declared-left", "left", "eos-pads", "token-types"],
)
def test_padding_never_counts_whatever_the_tokenizer_declares(opt_folder, cli, tmp_path, tokenizer):
    weights, model, documents, (site, unit) = opt_folder
    folder = _folder(weights, tmp_path / "opt", **tokenizer)
    tokenized = [_ids(d) for d in documents]
    assert len(set(map(len, tokenized))) > 2 and max(len(d.split()) for d in documents) > SEQ_LEN
    truth = _unpadded_truth(model, tokenized)
    assert truth[site][0][unit] == 0  # the planted unit is dead on real tokens
    _write_documents(tmp_path / "docs.txt", documents)
    report = _scan(cli, folder, tmp_path / "docs.txt")
    _assert_counts(report, truth)
    assert report["mask"] == {"array": "attention_mask", "exclude_token_ids": []}
    assert report["data"]["samples"] == len(documents)
    cut = sum(len(d.split()) > SEQ_LEN for d in documents)  # words are tokens here
    assert cut and report["data"]["text"]["truncated"] == cut
    assert f"{cut} of {len(documents)} documents are longer than --seq-len {SEQ_LEN}" in " ".join(
        report["notes"]
    )
    # .jsonl: a document that is empty, or blank, holds no token to count
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text(
        "".join(json.dumps({"text": d}) + "\n" for d in documents[:4] + ["", "  "] + documents[4:])
    )
    _assert_counts(_scan(cli, folder, jsonl, "--batch-size", "3"), truth)


def test_packed_blocks_count_real_tokens_only(opt_folder, cli, tmp_path):
    """--text-packing pack with a tokenizer that declares only input_ids and pads on the left: each
    block run alone (the last one shorter) is the truth."""
    weights, model, documents, (site, unit) = opt_folder
    folder = _folder(
        weights, tmp_path / "opt", model_input_names=("input_ids",), padding_side="left", eos_token="[BOS]"
    )
    stream = [token for d in documents for token in _ids(d, seq_len=100)]  # each starts with the separator
    blocks = [stream[start : start + SEQ_LEN] for start in range(0, len(stream), SEQ_LEN)]
    assert len(blocks[-1]) < SEQ_LEN
    _write_documents(tmp_path / "docs.txt", documents)
    report = _scan(cli, folder, tmp_path / "docs.txt", "--text-packing", "pack")
    _assert_counts(report, _unpadded_truth(model, blocks))
    assert report["data"]["samples"] == len(blocks)


def _bert(seed: int = 0):
    """A tiny bidirectional BERT with ReLU FFNs: without the attention_mask its real tokens attend to
    the padding, and its positions are absolute (left padding would move them)."""
    torch.manual_seed(seed)
    config = transformers.BertConfig(
        vocab_size=len(VOCAB),
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        hidden_act="relu",
        max_position_embeddings=64,
        pad_token_id=PAD,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    model = transformers.BertModel(config, add_pooling_layer=False).eval()
    with torch.no_grad():
        model.embeddings.word_embeddings.weight[PAD] = torch.linspace(
            -3, 3, 16
        )  # padding looks like nothing else
    return model


@pytest.mark.parametrize(
    "names", [("input_ids", "token_type_ids"), ("input_ids", "token_type_ids", "attention_mask")]
)
@pytest.mark.parametrize("side", ["right", "left"])
def test_bidirectional_model_gets_the_mask_it_takes(cli, tmp_path, side, names):
    """BERT, whose tokenizer may declare no attention_mask (then its real tokens would attend to the
    padding) and may pad on the left (then its absolute positions would move)."""
    model = _bert()
    documents = _documents(12)
    tokenized = [_ids(d) for d in documents]
    layer = model.encoder.layer[0].intermediate
    _plant_padding_unit(model, layer.dense, tokenized, unit=4)
    site = "encoder.layer.0.intermediate.intermediate_act_fn"
    model.save_pretrained(tmp_path / "weights")
    folder = _folder(
        tmp_path / "weights",
        tmp_path / "bert",
        model_input_names=names,
        padding_side=side,
    )
    truth = _unpadded_truth(model, tokenized)
    assert site in truth and truth[site][0][4] == 0
    _write_documents(tmp_path / "docs.txt", documents)
    _assert_counts(_scan(cli, folder, tmp_path / "docs.txt"), truth)


def test_model_without_an_attention_mask_input_is_masked_and_told(cli, tmp_path):
    """FNet's forward() takes no attention_mask (its tokenizer declares none): the mask still says which
    positions count, it is not passed to forward(), and the report says that the real tokens of padded
    samples saw the padding (FNet mixes every position)."""
    torch.manual_seed(0)
    config = transformers.FNetConfig(
        vocab_size=len(VOCAB),
        hidden_size=16,
        num_hidden_layers=1,
        intermediate_size=32,
        hidden_act="relu",
        max_position_embeddings=64,
        pad_token_id=PAD,
        hidden_dropout_prob=0.0,
    )
    model = transformers.FNetModel(config, add_pooling_layer=False).eval()
    model.save_pretrained(tmp_path / "weights")
    folder = _folder(
        tmp_path / "weights", tmp_path / "fnet", model_input_names=("input_ids", "token_type_ids")
    )
    documents = _documents(13)
    ids, mask = _padded([_ids(d) for d in documents], "right")
    _write_documents(tmp_path / "docs.txt", documents)
    report = _scan(cli, folder, tmp_path / "docs.txt")
    # the truth here is the padded batch as the model saw it, counted at the real tokens only
    seen = _captured(model, ids, token_type_ids=np.zeros_like(ids))
    _assert_counts(
        report, {name: ((a[mask == 1] > 0).sum(axis=0), int(mask.sum())) for name, a in seen.items()}
    )
    assert any("takes no attention_mask" in note for note in report["notes"]), report["notes"]
    every = _scan(
        cli, folder, tmp_path / "docs.txt", "--mask", "none"
    )  # what --mask none says: every position
    _assert_counts(every, {name: ((a > 0).sum(axis=(0, 1)), ids.size) for name, a in seen.items()})
