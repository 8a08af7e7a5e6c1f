"""Hugging Face model folders: loading without --arch, inputs by name, exact position masks, --text.

Every expected count comes from plain forward hooks on the model's ReLU modules with the mask
applied in numpy (tests/hf_models.py), never from the tool."""

from __future__ import annotations

import json
import os
import stat

import numpy as np
import pytest
from hf_models import (
    BOS,
    DEAD,
    PAD,
    VOCAB,
    hook_counts,
    opt_model,
    plant_pad_only_unit,
    relu_outputs,
    save_folder,
    token_data,
    transformers,
)

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def opt(tmp_path_factory):
    """(folder, model, ids, mask, (pad-only site, unit)): OPT saved in several safetensors shards."""
    ids, mask = token_data()
    model = opt_model()
    pad_only = plant_pad_only_unit(model, ids, mask)
    folder = save_folder(model, tmp_path_factory.mktemp("opt") / "opt-tiny")
    return folder, model, ids, mask, pad_only


def _scan(cli, tmp_path, folder, *args, **arrays):
    data = tmp_path / "tokens.npz"
    np.savez(data, **arrays)
    result = cli("scan", folder, "--data", data, "--json", "-", *args)
    assert result.code == 0, result.err
    return {layer["name"]: layer for layer in result.json()["layers"]}, result.json()


def _assert_matches(layers, truth):
    assert set(layers) == set(truth)
    for name, (counts, kept) in truth.items():
        assert layers[name]["positive_counts"] == counts.tolist(), name
        assert layers[name]["elements_per_unit"] == kept, name


def test_folder_is_sharded_and_scans_without_arch(opt, cli, tmp_path):
    folder, model, ids, mask, (site, unit) = opt
    assert len(list(folder.glob("model-*-of-*.safetensors"))) >= 2
    layers, report = _scan(cli, tmp_path, folder, input_ids=ids, attention_mask=mask)
    _assert_matches(layers, hook_counts(model, ids, mask, mask))
    assert report["model"]["format"] == "hf_folder"
    assert report["mask"] == {"array": "attention_mask", "exclude_token_ids": []}
    for layer, units in DEAD.items():
        dead = set(layers[f"model.decoder.layers.{layer}.activation_fn"]["dead_indices"])
        assert set(units) <= dead
    assert unit in layers[site]["dead_indices"]  # fires on padding only: dead where padding is not counted
    assert all(layer["extra"]["position_mask"] == "applied" for layer in layers.values())
    for name, act in _activations(model, ids, mask).items():  # mean share of inactive units per real token
        per_token = (act[mask.astype(bool)] <= 0).mean(axis=-1)
        assert np.isclose(layers[name]["activation_sparsity"], per_token.mean())


def _activations(model, ids, mask):
    seen = {}
    handles = [
        m.register_forward_hook(lambda _m, _a, out, name=name: seen.__setitem__(name, out.numpy()))
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.ReLU)
    ]
    with torch.no_grad():
        model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), use_cache=False)
    for handle in handles:
        handle.remove()
    return {name: a.reshape(ids.shape[0], ids.shape[1], -1) for name, a in seen.items()}


def test_pad_only_unit_is_alive_without_the_mask(opt, cli, tmp_path):
    folder, model, ids, mask, (site, unit) = opt
    layers, report = _scan(cli, tmp_path, folder, "--mask", "none", input_ids=ids, attention_mask=mask)
    _assert_matches(layers, hook_counts(model, ids, mask, None))
    assert unit not in layers[site]["dead_indices"]
    assert "mask" not in report


def test_exclude_token_ids_drops_those_positions(opt, cli, tmp_path):
    folder, model, ids, mask, _ = opt
    layers, report = _scan(
        cli, tmp_path, folder, "--exclude-token-ids", str(BOS), input_ids=ids, attention_mask=mask
    )
    _assert_matches(layers, hook_counts(model, ids, mask, (mask == 1) & (ids != BOS)))
    assert report["mask"]["exclude_token_ids"] == [BOS]


def test_mask_array_that_is_not_a_model_input(opt, cli, tmp_path):
    """--mask NAME with an array forward() does not take: used for counting only, not fed."""
    folder, model, ids, mask, _ = opt
    loss_mask = mask.copy()
    loss_mask[:, 0] = 0
    layers, _ = _scan(
        cli, tmp_path, folder, "--mask", "loss_mask", input_ids=ids, attention_mask=mask, loss_mask=loss_mask
    )
    _assert_matches(layers, hook_counts(model, ids, mask, loss_mask))


def test_batch_size_and_padding_side_do_not_change_counts(opt, cli, tmp_path):
    folder, _, _, _, _ = opt
    right = token_data(side="right")
    left = token_data(side="left")
    base, _ = _scan(cli, tmp_path, folder, input_ids=right[0], attention_mask=right[1])
    for args, (ids, mask) in ((("-b", "1"), right), (("-b", "5"), right), (("-b", "4"), left)):
        layers, _ = _scan(cli, tmp_path, folder, *args, input_ids=ids, attention_mask=mask)
        for name, layer in base.items():
            assert layers[name]["positive_counts"] == layer["positive_counts"], (args, name)
            assert layers[name]["elements_per_unit"] == layer["elements_per_unit"]


def test_merge_of_masked_halves_is_the_whole(opt, cli, tmp_path):
    folder, _, ids, mask, _ = opt
    whole = tmp_path / "whole.json"
    parts = []
    for name, rows in (("a", slice(0, 5)), ("b", slice(5, None))):
        np.savez(tmp_path / f"{name}.npz", input_ids=ids[rows], attention_mask=mask[rows])
        out = tmp_path / f"{name}.json"
        assert cli("scan", folder, "--data", tmp_path / f"{name}.npz", "--json", out).code == 0
        parts.append(out)
    np.savez(tmp_path / "all.npz", input_ids=ids, attention_mask=mask)
    assert cli("scan", folder, "--data", tmp_path / "all.npz", "--json", whole).code == 0
    merged = cli("merge", *parts, "--json", "-")
    assert merged.code == 0, merged.err
    expected = json.loads(whole.read_text())
    got = merged.json()
    assert got["mask"] == expected["mask"]
    for a, b in zip(got["layers"], expected["layers"], strict=True):
        assert a["positive_counts"] == b["positive_counts"]
        assert a["elements_per_unit"] == b["elements_per_unit"]


def test_report_validates_against_the_schema(opt, cli, tmp_path):
    import jsonschema

    from deadrelu_cli.report.model import SCHEMA_PATH

    folder, _, ids, mask, _ = opt
    _, report = _scan(cli, tmp_path, folder, input_ids=ids, attention_mask=mask)
    jsonschema.validate(report, json.loads(SCHEMA_PATH.read_text()))


def test_text_file_is_tokenized_with_the_folders_tokenizer(opt, cli, tmp_path):
    folder, model, _, _, (site, unit) = opt
    rng = np.random.default_rng(3)
    docs = [" ".join(f"w{i}" for i in rng.integers(0, 29, int(rng.integers(2, 9)))) for _ in range(7)]
    text = tmp_path / "sample.txt"
    text.write_text("\n".join(docs[:4]) + "\n\n" + "\n".join(docs[4:]) + "\n")
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    encoded = tokenizer(docs, padding="longest", truncation=True, max_length=6, return_tensors="np")
    ids, mask = encoded["input_ids"].astype(np.int64), encoded["attention_mask"].astype(np.int64)
    assert (mask == 0).any() and (mask.sum(1) == 6).any()  # both padded and truncated documents
    result = cli("scan", folder, "--text", text, "--seq-len", "6", "--json", "-")
    assert result.code == 0, result.err
    layers = {layer["name"]: layer for layer in result.json()["layers"]}
    _assert_matches(layers, hook_counts(model, ids, mask, mask))
    assert result.json()["data"]["samples"] == 7
    cut = sum(len(ids) > 6 for ids in tokenizer(docs)["input_ids"])  # longer than --seq-len
    assert result.json()["data"]["text"] == {"packing": "pad", "seq_len": 6, "documents": 7, "truncated": cut}
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("".join(json.dumps({"body": d}) + "\n" for d in docs))
    again = cli("scan", folder, "--text", jsonl, "--text-field", "body", "--seq-len", "6", "--json", "-")
    assert again.code == 0, again.err
    assert [x["positive_counts"] for x in again.json()["layers"]] == [
        x["positive_counts"] for x in result.json()["layers"]
    ]
    wrong = cli("scan", folder, "--text", jsonl, "--json", "-")
    assert wrong.code == 2 and "--text-field" in wrong.err


def _eos_tokenizer_folder(folder, destination, prepend_bos: bool):
    """FOLDER's config and weights with a tokenizer whose EOS is [BOS] (OPT's </s> is both) and which
    prepends it to every document when PREPEND_BOS (OPT's and LLaMA's tokenizers do, GPT-2's does not)."""
    import shutil

    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    shutil.copytree(folder, destination)
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if prepend_bos:
        tok.post_processor = processors.TemplateProcessing(single="[BOS] $A", special_tokens=[("[BOS]", BOS)])
    transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", bos_token="[BOS]", eos_token="[BOS]"
    ).save_pretrained(destination)
    return destination


@pytest.mark.parametrize("prepend_bos", [True, False], ids=["bos-per-document", "no-bos"])
def test_text_packing_counts_the_hand_split_stream(opt, cli, tmp_path, prepend_bos):
    folder, model, _, _, _ = opt
    folder = _eos_tokenizer_folder(folder, tmp_path / "opt-eos", prepend_bos)
    rng = np.random.default_rng(5)
    docs = [[f"w{i}" for i in rng.integers(0, 29, int(rng.integers(2, 9)))] for _ in range(6)]
    (tmp_path / "docs.txt").write_text("".join(" ".join(d) + "\n" for d in docs))
    # the reference, by hand: ids from the vocabulary, [BOS] between documents (once), blocks of 7
    stream: list[int] = []
    for doc in docs:
        ids = ([BOS] if prepend_bos else []) + [VOCAB.index(w) for w in doc]
        if stream and not prepend_bos:
            stream.append(BOS)
        stream.extend(ids)
    seq_len = 7
    assert len(stream) % seq_len and len(stream) > 2 * seq_len  # a partial last block; documents span blocks
    blocks = len(stream) // seq_len + 1
    ids = np.full((blocks, seq_len), PAD, np.int64)
    ids.reshape(-1)[: len(stream)] = stream
    mask = np.zeros_like(ids)
    mask.reshape(-1)[: len(stream)] = 1

    base = ("scan", folder, "--text", tmp_path / "docs.txt", "--seq-len", seq_len, "--text-packing", "pack")
    result = cli(*base, "--batch-size", "2", "--json", "-")
    assert result.code == 0, result.err
    _assert_matches({x["name"]: x for x in result.json()["layers"]}, hook_counts(model, ids, mask, mask))
    assert result.json()["data"]["samples"] == blocks
    assert result.json()["data"]["text"] == {
        "packing": "pack",
        "seq_len": seq_len,
        "documents": len(docs),
        "separator_token_id": BOS,
    }
    import jsonschema

    from deadrelu_cli.report.model import SCHEMA_PATH

    jsonschema.validate(result.json(), json.loads(SCHEMA_PATH.read_text()))
    table = cli(*base)
    assert table.code == 0 and f"{blocks} samples (6 documents packed into 7-token blocks)" in table.out
    # --exclude-token-ids drops every BOS/separator position, wherever it falls in a block
    excluded = cli(*base, "--exclude-token-ids", str(BOS), "--json", "-")
    assert excluded.code == 0, excluded.err
    keep = (mask == 1) & (ids != BOS)
    _assert_matches({x["name"]: x for x in excluded.json()["layers"]}, hook_counts(model, ids, mask, keep))


def test_text_packing_needs_a_separator_and_a_known_mode(opt, cli, tmp_path):
    folder = opt[0]  # its tokenizer has BOS and PAD, no EOS or SEP
    (tmp_path / "docs.txt").write_text("w1 w2\nw3\n")
    result = cli("scan", folder, "--text", tmp_path / "docs.txt", "--text-packing", "pack")
    assert result.code == 2 and "no EOS or SEP" in result.err and "--text-packing pad" in result.err
    assert len(result.err.strip().splitlines()) == 1
    wrong = cli("scan", folder, "--text", tmp_path / "docs.txt", "--text-packing", "concat")
    assert wrong.code == 2 and "choose pad or pack" in wrong.err


def test_text_without_a_usable_tokenizer_is_one_line(opt, cli, tmp_path):
    """A folder without tokenizer files, or with a config that transformers turns into an empty tokenizer
    (every document 0 tokens): one line naming the folder and what to do, not a failure of the model."""
    import shutil

    folder = opt[0]
    bare = tmp_path / "bare"
    bare.mkdir()
    for item in folder.iterdir():
        if item.name == "config.json" or "safetensors" in item.name:
            shutil.copy(item, bare / item.name)
    text = tmp_path / "t.txt"
    text.write_text("w1 w2 w3\nw4 w5\n")
    for expected in ("no tokenizer in the folder", "turns text into no tokens"):
        result = cli("scan", bare, "--text", text)
        assert result.code == 2 and expected in result.err and "--data" in result.err, result.err
        assert len(result.err.strip().splitlines()) == 1
        (bare / "tokenizer_config.json").write_text('{"model_max_length": 16}')


def test_mismatched_arrays_list_both_sides(opt, cli, tmp_path):
    folder, _, ids, mask, _ = opt
    np.savez(tmp_path / "bad.npz", tokens=ids, attention_mask=mask)
    result = cli("scan", folder, "--data", tmp_path / "bad.npz")
    assert result.code == 2
    line = result.err.strip()
    assert "tokens[12, 10] int64" in line and "input_ids" in line and "attention_mask" in line
    assert "the model's inputs are input_ids" in line  # reads as a sentence
    assert "Traceback" not in result.err


def test_folder_without_transformers_names_the_extra(opt, cli, tmp_path, monkeypatch):
    import sys

    folder, _, ids, mask, _ = opt
    np.savez(tmp_path / "t.npz", input_ids=ids, attention_mask=mask)
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers -> ImportError
    result = cli("scan", folder, "--data", tmp_path / "t.npz")
    assert result.code == 2
    assert "pip install 'deadrelu[transformers]'" in result.err
    assert len(result.err.strip().splitlines()) == 1


def test_folder_without_config_and_remote_code_are_refused(opt, cli, tmp_path):
    folder, _, ids, mask, _ = opt
    np.savez(tmp_path / "t.npz", input_ids=ids, attention_mask=mask)
    empty = tmp_path / "empty"
    empty.mkdir()
    result = cli("scan", empty, "--data", tmp_path / "t.npz")
    assert result.code == 2 and "config.json" in result.err
    remote = tmp_path / "remote"
    remote.mkdir()
    for path in folder.iterdir():
        (remote / path.name).write_bytes(path.read_bytes())
    config = json.loads((remote / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilModel"}
    (remote / "config.json").write_text(json.dumps(config))
    result = cli("scan", remote, "--data", tmp_path / "t.npz")
    assert result.code == 2 and "--trust-pickle" in result.err


def test_dtype_is_honoured(opt, cli, tmp_path):
    folder, _, ids, mask, _ = opt
    layers, report = _scan(cli, tmp_path, folder, "--dtype", "bf16", input_ids=ids, attention_mask=mask)
    assert any("bfloat16" in note for note in report["notes"])
    assert all(layer["elements_per_unit"] == int(mask.sum()) for layer in layers.values())


def test_pytorch_model_bin_folder(opt, tmp_path, cli):
    """A folder with pytorch_model.bin (read with weights_only) gives the same counts."""
    folder, model, ids, mask, _ = opt
    legacy = tmp_path / "legacy"
    model.save_pretrained(legacy, safe_serialization=False) if _takes_safe_serialization() else _save_bin(
        model, legacy
    )
    assert (legacy / "pytorch_model.bin").is_file() or list(legacy.glob("pytorch_model*.bin"))
    layers, _ = _scan(cli, tmp_path, legacy, input_ids=ids, attention_mask=mask)
    _assert_matches(layers, hook_counts(model, ids, mask, mask))


class _RunsCode:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_pytorch_model_bin_that_would_run_code_is_refused_in_one_line(opt, tmp_path, cli):
    """A folder's .bin holding a pickle that calls os.mkdir: refused with exit 2 and one line, with or
    without --trust-pickle (transformers reads .bin with weights_only), and the call never runs
    (before: nothing ran, but the refusal was an internal error, exit 3)."""
    folder, model, ids, mask, _ = opt
    evil = tmp_path / "evil"
    evil.mkdir()
    model.config.save_pretrained(evil)
    marker = tmp_path / "ran"
    torch.save({**model.state_dict(), "extra": _RunsCode(marker)}, evil / "pytorch_model.bin")
    np.savez(tmp_path / "t.npz", input_ids=ids, attention_mask=mask)
    for extra in ((), ("--trust-pickle",)):
        result = cli("scan", evil, "--data", tmp_path / "t.npz", *extra)
        assert result.code == 2, result.err
        assert "refused to unpickle" in result.err and len(result.err.strip().splitlines()) == 1, result.err
    assert not marker.exists()


def _takes_safe_serialization() -> bool:
    import inspect

    return "safe_serialization" in inspect.signature(transformers.PreTrainedModel.save_pretrained).parameters


def _save_bin(model, folder):
    folder.mkdir()
    model.config.save_pretrained(folder)
    torch.save(model.state_dict(), folder / "pytorch_model.bin")


def _relu_hook_truth(model, call, keep=None):
    """Per ReLU module: positives per unit and elements per unit, units on the last axis of [B, T, F]
    (masked by `keep` [B, T]) or on axis 1 of [N, C, H, W]."""
    captured: dict[str, list] = {}
    handles = [
        m.register_forward_hook(lambda _m, _a, out, name=name: captured.setdefault(name, []).append(out))
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.ReLU)
    ]
    try:
        with torch.no_grad():
            call(model)
    finally:
        for handle in handles:
            handle.remove()
    truth = {}
    for name, outs in captured.items():
        for k, act in enumerate(outs):
            a = act.float().numpy()
            if a.ndim == 4:
                rows = np.moveaxis(a, 1, -1).reshape(-1, a.shape[1])
            else:
                rows = a.reshape(-1, a.shape[-1]) if keep is None else a[keep.astype(bool)]
            truth[name if k == 0 else f"{name}#{k + 1}"] = ((rows > 0).sum(0), rows.shape[0])
    return truth


def test_t5_encoder_relu_feed_forward(cli, tmp_path):
    torch.manual_seed(1)
    config = transformers.T5Config(
        vocab_size=len(VOCAB),
        d_model=16,
        d_kv=8,
        d_ff=24,
        num_layers=2,
        num_heads=2,
        feed_forward_proj="relu",
        pad_token_id=PAD,
        dropout_rate=0.0,
    )
    model = transformers.T5EncoderModel(config).eval()
    with torch.no_grad():
        model.encoder.block[1].layer[1].DenseReluDense.wi.weight[4] = -0.0  # no input reaches unit 4
    folder = save_folder(model, tmp_path / "t5", shard="10KB")
    ids, mask = token_data(seed=2)
    truth = _relu_hook_truth(
        model, lambda m: m(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)), mask
    )
    layers, _ = _scan(cli, tmp_path, folder, input_ids=ids, attention_mask=mask)
    _assert_matches(layers, truth)
    assert 4 in layers["encoder.block.1.layer.1.DenseReluDense.act"]["dead_indices"]


def _seq2seq(kind: str):
    torch.manual_seed(4)
    if kind == "t5":  # T5 v1.0: ReLU feed-forward, decoder inputs not derived from input_ids
        config = transformers.T5Config(
            vocab_size=len(VOCAB), d_model=16, d_kv=8, d_ff=24, num_layers=2, num_heads=2,
            feed_forward_proj="relu", pad_token_id=PAD, decoder_start_token_id=PAD, dropout_rate=0.0,
        )  # fmt: skip
        return transformers.T5ForConditionalGeneration(config).eval()
    config = transformers.BartConfig(
        vocab_size=len(VOCAB), d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=24, decoder_ffn_dim=24, activation_function="relu",
        pad_token_id=PAD, bos_token_id=BOS, eos_token_id=BOS, decoder_start_token_id=BOS,
        max_position_embeddings=64, dropout=0.0,
    )  # fmt: skip
    return transformers.BartForConditionalGeneration(config).eval()


def _per_site_counts(model, feed: dict, keep_of) -> dict:
    """Plain hooks on the ReLU modules; per site, positives per unit and kept positions over the
    [B, T] positions `keep_of(site name)` keeps (None: every position), in numpy."""
    out = {}
    for name, a in relu_outputs(model, feed).items():
        keep = keep_of(name)
        rows = a.reshape(-1, a.shape[-1]) if keep is None else a[keep.astype(bool)]
        out[name] = ((rows > 0).sum(0), rows.shape[0])
    return out


@pytest.mark.parametrize("kind", ["t5", "bart"])
def test_encoder_decoder_decoder_sites_count_the_decoders_tokens(kind, cli, tmp_path):
    """An encoder-decoder fed decoder_input_ids: the decoder's sites count the positions its
    decoder_attention_mask keeps, the encoder's those of the attention_mask (before: the encoder's mask
    was applied to the decoder's positions, or every decoder position was counted); without a
    decoder_attention_mask every decoder position counts, and a note says so. T5 without decoder inputs
    is refused naming them."""
    model = _seq2seq(kind)
    folder = save_folder(model, tmp_path / kind, shard="10KB")
    ids, mask = token_data(seed=2)
    for tokens, seed in ((10, 6), (7, 5)):  # the encoder's length, and another
        dec_ids, dec_mask = token_data(tokens=tokens, seed=seed)
        feed = {"input_ids": ids, "attention_mask": mask, "decoder_input_ids": dec_ids}
        full = {**feed, "decoder_attention_mask": dec_mask}
        truth = _per_site_counts(
            model, full, lambda name, dec_mask=dec_mask: mask if ".encoder." in f".{name}" else dec_mask
        )
        assert len(truth) == (4 if kind == "t5" else 2)
        layers, _ = _scan(cli, tmp_path, folder, **full)
        _assert_matches(layers, truth)
        truth = _per_site_counts(model, feed, lambda name: mask if ".encoder." in f".{name}" else None)
        layers, report = _scan(cli, tmp_path, folder, **feed)
        _assert_matches(layers, truth)
        assert any("no decoder_attention_mask" in note for note in report["notes"]), report["notes"]
    if kind == "t5":
        np.savez(tmp_path / "enc.npz", input_ids=ids, attention_mask=mask)
        result = cli("scan", folder, "--data", tmp_path / "enc.npz")
        assert result.code == 2 and "decoder_input_ids" in result.err and "Traceback" not in result.err


@pytest.mark.parametrize("strategy", ["reinit", "kick"])
def test_fix_of_a_t5_folder_with_bias_free_feed_forward(strategy, cli, tmp_path):
    """T5's DenseReluDense: wi (bias=False) -> relu -> dropout -> wo, with a `.dtype` read in between.
    reinit and kick revive the dead units (before: refused, "no single Linear/Conv produces this
    activation"; reinit also saw the dropout and the dtype read as other uses). Judged by plain hooks
    on the decoder's own positions, and (reinit) logits equal at the counted decoder positions."""
    model = _seq2seq("t5")
    with torch.no_grad():
        model.encoder.block[0].layer[1].DenseReluDense.wi.weight[[1, 6]] = 0.0  # relu(0) never fires
        model.decoder.block[1].layer[2].DenseReluDense.wi.weight[[3]] = 0.0
    folder = save_folder(model, tmp_path / "t5", shard="10KB")
    ids, mask = token_data(seed=2)
    dec_ids, dec_mask = token_data(tokens=7, seed=5)
    feed = {
        "input_ids": ids,
        "attention_mask": mask,
        "decoder_input_ids": dec_ids,
        "decoder_attention_mask": dec_mask,
    }
    np.savez(tmp_path / "t.npz", **feed)
    out = tmp_path / "fixed"
    force = ("--force",) if strategy == "kick" else ()
    result = cli("fix", folder, "--data", tmp_path / "t.npz", "--strategy", strategy, "--output", out, *force)
    assert result.code == 0, result.err
    fixed = transformers.AutoModelForSeq2SeqLM.from_pretrained(out, local_files_only=True).eval()

    def keep(name):
        return mask if ".encoder." in f".{name}" else dec_mask

    after = _per_site_counts(fixed, feed, keep)
    assert (after["encoder.block.0.layer.1.DenseReluDense.act"][0][[1, 6]] > 0).all()
    assert after["decoder.block.1.layer.2.DenseReluDense.act"][0][3] > 0
    if strategy == "reinit":
        with torch.no_grad():
            logits = [
                m(**{k: torch.from_numpy(v) for k, v in feed.items()}).logits.numpy() for m in (model, fixed)
            ]
        kept = dec_mask.astype(bool)
        np.testing.assert_allclose(logits[1][kept], logits[0][kept], rtol=1e-5, atol=1e-5)


def test_fix_compares_a_decoders_outputs_on_the_decoders_positions(cli, tmp_path):
    """fix on an encoder-decoder fed decoder_input_ids (the encoder's length, other padding): the
    reported max |Δ| is over the logits at the decoder_attention_mask's positions and the encoder's
    outputs at the attention_mask's, computed here from both folders (before: the logits were compared
    at the encoder's positions)."""
    model = _seq2seq("t5")
    with torch.no_grad():
        model.decoder.block[0].layer[2].DenseReluDense.wi.weight[[2, 3]] = 0.0
    folder = save_folder(model, tmp_path / "t5", shard="10KB")
    ids, mask = token_data(seed=2)
    ids[:, 3:], mask[:, 3:] = PAD, 0  # short sources, long targets: most decoder positions are past them
    dec_ids, dec_mask = token_data(seed=9)
    feed = {
        "input_ids": ids,
        "attention_mask": mask,
        "decoder_input_ids": dec_ids,
        "decoder_attention_mask": dec_mask,
    }
    np.savez(tmp_path / "t.npz", **feed)
    out = tmp_path / "fixed"
    result = cli(
        "fix", folder, "--data", tmp_path / "t.npz", "--strategy", "kick", "--force", "--output", out, "--json", "-"
    )  # fmt: skip
    assert result.code == 0, result.err
    fixed = transformers.AutoModelForSeq2SeqLM.from_pretrained(out, local_files_only=True).eval()
    with torch.no_grad():
        a, b = (m(**{k: torch.from_numpy(v) for k, v in feed.items()}) for m in (model, fixed))
    logits = np.abs(a.logits.numpy() - b.logits.numpy())[dec_mask.astype(bool)].max()
    encoder = np.abs(a.encoder_last_hidden_state.numpy() - b.encoder_last_hidden_state.numpy())[
        mask.astype(bool)
    ]
    assert logits > 0
    np.testing.assert_allclose(result.json()["max_abs_diff"], max(logits, encoder.max()), rtol=1e-6)


def test_llama_style_relu_mlp(cli, tmp_path):
    torch.manual_seed(2)
    config = transformers.LlamaConfig(
        vocab_size=len(VOCAB),
        hidden_size=16,
        intermediate_size=40,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        hidden_act="relu",
        max_position_embeddings=64,
        pad_token_id=PAD,
        bos_token_id=BOS,
        eos_token_id=BOS,
        tie_word_embeddings=True,
    )
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.model.layers[0].mlp.gate_proj.weight[[2, 9]] = 0.0  # relu(0) never fires
    folder = save_folder(model, tmp_path / "llama", shard="20KB")
    ids, mask = token_data(seed=4, side="left")
    truth = _relu_hook_truth(
        model,
        lambda m: m(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), use_cache=False),
        mask,
    )
    layers, _ = _scan(cli, tmp_path, folder, input_ids=ids, attention_mask=mask)
    _assert_matches(layers, truth)
    assert {2, 9} <= set(layers["model.layers.0.mlp.act_fn"]["dead_indices"])


def test_hf_resnet_pixel_values(cli, tmp_path):
    torch.manual_seed(3)
    config = transformers.ResNetConfig(
        num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic"
    )
    model = transformers.ResNetModel(config).eval()
    folder = save_folder(model, tmp_path / "resnet", shard="10KB")
    pixels = np.random.default_rng(0).standard_normal((4, 3, 16, 16)).astype(np.float32)
    truth = _relu_hook_truth(model, lambda m: m(pixel_values=torch.from_numpy(pixels)))
    layers, report = _scan(cli, tmp_path, folder, pixel_values=pixels)
    _assert_matches(layers, truth)
    assert "mask" not in report


def _logits(folder_or_model, ids, mask):
    model = (
        transformers.AutoModelForCausalLM.from_pretrained(folder_or_model, local_files_only=True)
        if not isinstance(folder_or_model, torch.nn.Module)
        else folder_or_model
    )
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), use_cache=False)
    return out.logits.numpy()[mask.astype(bool)]  # the counted positions


def test_fix_takes_text_like_scan(opt, cli, tmp_path):
    """fix FOLDER --text: the documents tokenized by the folder's tokenizer decide and verify the fix;
    judged on ids tokenized in the test: the dead units found by plain hooks fire after reinit, and the
    logits at real tokens are unchanged."""
    folder, model, _, _, _ = opt
    rng = np.random.default_rng(5)
    docs = [" ".join(f"w{i}" for i in rng.integers(0, 29, int(rng.integers(3, 9)))) for _ in range(8)]
    text = tmp_path / "docs.txt"
    text.write_text("\n".join(docs) + "\n")
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    encoded = tokenizer(docs, padding="longest", truncation=True, max_length=8, return_tensors="np")
    ids, mask = encoded["input_ids"].astype(np.int64), encoded["attention_mask"].astype(np.int64)
    dead_before = {n: np.flatnonzero(c == 0) for n, (c, _) in hook_counts(model, ids, mask, mask).items()}
    out = tmp_path / "fixed"
    result = cli("fix", folder, "--text", text, "--seq-len", "8", "--strategy", "reinit", "--output", out)
    assert result.code == 0, result.err
    fixed = transformers.AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
    after = hook_counts(fixed, ids, mask, mask)
    assert any(len(units) for units in dead_before.values())
    for name, units in dead_before.items():
        assert (after[name][0][units] > 0).all(), name  # every recycled unit fires on the same tokens
    np.testing.assert_allclose(_logits(out, ids, mask), _logits(model, ids, mask), rtol=1e-5, atol=1e-5)
    missing = cli("fix", folder, "--strategy", "reinit", "--output", tmp_path / "other")
    assert missing.code == 2 and "--text FILE" in missing.err


@pytest.mark.parametrize("strategy", ["reinit", "bias-shift", "kick"])
def test_fix_writes_a_folder_in_the_sources_layout(opt, cli, tmp_path, strategy):
    from safetensors import safe_open

    folder, model, ids, mask, (site, unit) = opt
    np.savez(tmp_path / "t.npz", input_ids=ids, attention_mask=mask)
    out = tmp_path / "fixed"
    changed_any = False
    old_umask = os.umask(0o022)
    try:
        force = ("--force",) if strategy == "kick" else ()  # a default kick cannot lift a -1e4 bias
        result = cli(
            "fix", folder, "--data", tmp_path / "t.npz", "--strategy", strategy, "--output", out, *force
        )
    finally:
        os.umask(old_umask)
    assert result.code == 0, result.err
    assert stat.S_IMODE(out.stat().st_mode) == 0o755  # the user's umask, not mkdtemp's 0700
    source_files = sorted(p.name for p in folder.iterdir())
    assert sorted(p.name for p in out.iterdir()) == source_files  # tokenizer, config, shards, index
    assert (out / "model.safetensors.index.json").read_text() == (
        folder / "model.safetensors.index.json"
    ).read_text()
    for shard in folder.glob("*.safetensors"):
        with safe_open(str(shard), "pt") as a, safe_open(str(out / shard.name), "pt") as b:
            assert sorted(a.keys()) == sorted(b.keys())
            changed = [k for k in a.keys() if not torch.equal(a.get_tensor(k), b.get_tensor(k))]
            assert all(".fc1." in k or ".fc2." in k for k in changed), changed
            changed_any = changed_any or bool(changed)
    assert changed_any
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    if strategy == "reinit":  # exact on the counted positions
        np.testing.assert_allclose(
            _logits(reloaded, ids, mask), _logits(model, ids, mask), rtol=1e-5, atol=1e-5
        )
        after = hook_counts(reloaded, ids, mask, mask)
        for layer, units in DEAD.items():
            counts, _ = after[f"model.decoder.layers.{layer}.activation_fn"]
            assert (counts[units] > 0).all()  # revived
    assert not out.with_name(".fixed").exists()


def test_fix_of_a_model_whose_second_argument_is_not_the_mask(cli, tmp_path):
    """GPT-Neo's forward(input_ids, past_key_values, attention_mask, …): the fix runs the model with the
    data by name, as the scan does (before: the FLOP count passed attention_mask as past_key_values,
    an internal error). Judged by plain hooks: the planted dead units fire after reinit, logits at the
    real tokens unchanged."""
    torch.manual_seed(5)
    config = transformers.GPTNeoConfig(
        vocab_size=len(VOCAB), hidden_size=16, num_layers=1, num_heads=2, attention_types=[[["global"], 1]],
        intermediate_size=24, activation_function="relu", max_position_embeddings=64, bos_token_id=BOS,
        eos_token_id=BOS, pad_token_id=PAD,
    )  # fmt: skip
    model = transformers.GPTNeoForCausalLM(config).eval()
    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.bias[[1, 5]] = -50.0
    folder = save_folder(model, tmp_path / "neo")
    ids, mask = token_data(seed=3)
    np.savez(tmp_path / "t.npz", input_ids=ids, attention_mask=mask)
    site = "transformer.h.0.mlp.act"
    before = _per_site_counts(model, {"input_ids": ids, "attention_mask": mask}, lambda _: mask)
    assert np.flatnonzero(before[site][0] == 0).tolist() == [1, 5]
    out = tmp_path / "fixed"
    result = cli("fix", folder, "--data", tmp_path / "t.npz", "--strategy", "reinit", "--output", out)
    assert result.code == 0, result.err
    fixed = transformers.AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
    after = _per_site_counts(fixed, {"input_ids": ids, "attention_mask": mask}, lambda _: mask)
    assert (after[site][0][[1, 5]] > 0).all()
    np.testing.assert_allclose(_logits(fixed, ids, mask), _logits(model, ids, mask), rtol=1e-5, atol=1e-5)


def test_prune_and_leaky_on_a_folder_refuse_in_one_line(opt, cli, tmp_path):
    folder, _, ids, mask, _ = opt
    np.savez(tmp_path / "t.npz", input_ids=ids, attention_mask=mask)
    for strategy in ("prune", "leaky"):
        result = cli(
            "fix", folder, "--data", tmp_path / "t.npz", "--strategy", strategy, "-o", tmp_path / "o"
        )
        assert result.code == 2, result.err
        assert "reinit, bias-shift or kick" in result.err and len(result.err.strip().splitlines()) == 1
        assert not (tmp_path / "o").exists()
    existing = tmp_path / "exists"
    existing.mkdir()
    result = cli("fix", folder, "--data", tmp_path / "t.npz", "--strategy", "reinit", "-o", existing)
    assert result.code == 2 and "already exists" in result.err


def test_reinit_state_dict_keeps_the_source_prefix(cli, tmp_path, planted_module):
    """A state_dict saved from a wrapper (`model.` keys) is written back with the same keys."""
    from conftest import arch

    model = planted_module.eight_neuron()
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    state["model.loss.weight"] = torch.ones(3)  # a tensor --arch has no place for: kept as it was
    torch.save(state, tmp_path / "wrapped.pt")
    x = np.random.default_rng(0).standard_normal((32, 4)).astype(np.float32)
    np.savez(tmp_path / "d.npz", input=x)
    result = cli(
        "fix",
        tmp_path / "wrapped.pt",
        "--arch",
        arch("eight_neuron"),
        "--data",
        tmp_path / "d.npz",
        "--strategy",
        "reinit",
        "-o",
        tmp_path / "fixed.pt",
    )
    assert result.code == 0, result.err
    fixed = torch.load(tmp_path / "fixed.pt", weights_only=True)
    assert sorted(fixed) == sorted(state)
    assert torch.equal(fixed["model.loss.weight"], state["model.loss.weight"])


def test_device_map_through_accelerate(opt, cli, tmp_path):
    pytest.importorskip("accelerate", reason="--device-map needs accelerate (the transformers extra)")
    folder, model, ids, mask, _ = opt
    layers, _ = _scan(cli, tmp_path, folder, "--device-map", "cpu", input_ids=ids, attention_mask=mask)
    _assert_matches(layers, hook_counts(model, ids, mask, mask))


def test_device_map_offload_to_disk_counts_exactly(opt, cli, tmp_path, monkeypatch):
    """A model that does not fit: --max-memory leaves room for part of it, accelerate offloads the rest to
    disk and moves each layer in for its forward; the counts are those of the whole model in memory, and
    the biases and --explain's weight checks read the offloaded copies."""
    import gc
    import tempfile

    pytest.importorskip("accelerate", reason="--device-map needs accelerate (the transformers extra)")
    folder, model, ids, mask, _ = opt
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    limit = f"cpu={weights // 3}"
    args = ("--device-map", "auto", "--max-memory", limit, "--explain")
    layers, _ = _scan(cli, tmp_path, folder, *args, input_ids=ids, attention_mask=mask)
    _assert_matches(layers, hook_counts(model, ids, mask, mask))
    in_memory, _ = _scan(cli, tmp_path, folder, "--explain", input_ids=ids, attention_mask=mask)
    for name, layer in layers.items():
        assert layer["bias"] == in_memory[name]["bias"], name
    gc.collect()
    assert not list(scratch.iterdir())  # the offload folder goes with the model


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--max-memory", "cpu=1GiB"], "--max-memory applies with --device-map"),
        (["--device-map", "auto", "--max-memory", "gpu0:20GB"], "give DEVICE=SIZE pairs"),
        (["--device-map", "auto", "--max-memory", "tpu=1GiB"], "unknown device 'tpu'"),
    ],
)
def test_max_memory_errors_are_one_line(opt, cli, tmp_path, args, message):
    folder, _, ids, mask, _ = opt
    np.savez(tmp_path / "t.npz", input_ids=ids, attention_mask=mask)
    result = cli("scan", folder, "--data", tmp_path / "t.npz", *args)
    assert result.code == 2
    assert message in result.err and len(result.err.strip().splitlines()) == 1


@pytest.mark.slow
def test_distributed_scan_of_a_folder_equals_one_process(opt, cli, tmp_path):
    import subprocess
    import sys

    from conftest import ROOT

    folder, model, ids, mask, _ = opt
    np.savez(tmp_path / "t.npz", input_ids=ids[:11], attention_mask=mask[:11])  # 11 samples: 5 + 6
    out = tmp_path / "dist.json"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    command += ["-m", "deadrelu_cli", "scan", str(folder), "--data", str(tmp_path / "t.npz")]
    command += ["--distributed", "--quiet", "--json", str(out)]
    run = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-2000:]
    report = json.loads(out.read_text())
    layers = {layer["name"]: layer for layer in report["layers"]}
    _assert_matches(layers, hook_counts(model, ids[:11], mask[:11], mask[:11]))
    assert report["mask"]["array"] == "attention_mask"


@pytest.mark.parametrize("strategy", ["prune", "leaky"])
def test_architecture_fixes_on_an_arch_built_transformer_never_crash(opt, cli, tmp_path, strategy):
    """An OPT state_dict with an --arch that builds OPTForCausalLM: prune/leaky to .pt2 either write a
    loadable program or refuse in one line (exit 2); never an internal error (exit 3)."""
    folder, model, ids, mask, _ = opt
    torch.save(model.state_dict(), tmp_path / "opt.pt")
    (tmp_path / "arch.py").write_text(
        "import transformers\n"
        f"def build():\n    return transformers.OPTForCausalLM(transformers.AutoConfig.from_pretrained({str(folder)!r}))\n"
    )
    np.savez(tmp_path / "t.npz", input_ids=ids, attention_mask=mask)
    out = tmp_path / "fixed.pt2"
    result = cli(
        "fix",
        tmp_path / "opt.pt",
        "--arch",
        f"{tmp_path / 'arch.py'}:build",
        "--data",
        tmp_path / "t.npz",
        "--strategy",
        strategy,
        "-o",
        out,
    )
    assert result.code in (0, 1, 2), result.err
    if strategy == "prune":  # exported with use_cache off, verified on the counted positions
        assert result.code == 0 and out.is_file(), result.err
    if result.code == 2:
        assert len(result.err.strip().splitlines()) == 1 and "Traceback" not in result.err
        assert not out.exists()
