"""Tiny Hugging Face ReLU models built from configs (no download), saved with save_pretrained (sharded),
with planted dead units and one unit that fires only on padding; ground truth from plain hooks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

transformers = pytest.importorskip("transformers", reason="the transformers extra is not installed")
torch = pytest.importorskip("torch")

VOCAB = ["[UNK]", "[PAD]", "[BOS]"] + [f"w{i}" for i in range(29)]
PAD, BOS = 1, 2
DEAD = {0: [0, 3, 7], 1: [5]}  # layer -> FFN units planted dead (large negative bias)


def save_tokenizer(
    folder: Path,
    model_input_names: tuple[str, ...] = ("input_ids", "attention_mask"),
    padding_side: str = "right",
    pad_token: str | None = "[PAD]",
    eos_token: str | None = None,
) -> None:
    """A word-level tokenizer over VOCAB (no special tokens added to documents). The defaults are the
    common case; `model_input_names` without attention_mask, left padding and no pad token (the EOS
    stands in) are what real tokenizers also declare."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token=pad_token,
        bos_token="[BOS]",
        eos_token=eos_token,
        model_input_names=list(model_input_names),  # as init arguments: saved with the tokenizer
        padding_side=padding_side,
    ).save_pretrained(folder)


def token_data(samples: int = 12, tokens: int = 10, seed: int = 0, side: str = "right"):
    """input_ids with BOS first and padding of varying length; attention_mask 1 on real tokens."""
    rng = np.random.default_rng(seed)
    ids = np.full((samples, tokens), PAD, dtype=np.int64)
    mask = np.zeros((samples, tokens), dtype=np.int64)
    for i in range(samples):
        length = int(rng.integers(3, tokens + 1)) if i else tokens  # sample 0 unpadded
        row = np.concatenate([[BOS], rng.integers(3, len(VOCAB), length - 1)])
        if side == "right":
            ids[i, :length], mask[i, :length] = row, 1
        else:
            ids[i, tokens - length :], mask[i, tokens - length :] = row, 1
    return ids, mask


def opt_model(seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.OPTConfig(
        vocab_size=len(VOCAB),
        hidden_size=16,
        ffn_dim=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=64,
        word_embed_proj_dim=16,
        activation_function="relu",
        pad_token_id=PAD,
        bos_token_id=BOS,
        eos_token_id=BOS,
        dropout=0.0,
        attention_dropout=0.0,
    )
    model = transformers.OPTForCausalLM(config).eval()
    with torch.no_grad():
        for layer, units in DEAD.items():
            model.model.decoder.layers[layer].fc1.bias[units] = -1e4
        model.model.decoder.embed_tokens.weight[PAD] = 4.0  # padding looks like nothing else
    return model


def mixtral_config(layers: int = 1, kv_heads: int = 1):
    """A tiny transformers-5 Mixtral's config with relu: 3 experts (fused in one [experts, 2·I, H] weight and
    one act_fn), 2 per token, hidden 16, intermediate 12."""
    return transformers.MixtralConfig(
        vocab_size=32, hidden_size=16, intermediate_size=12, num_hidden_layers=layers, num_attention_heads=2,
        num_key_value_heads=kv_heads, hidden_act="relu", num_local_experts=3, num_experts_per_tok=2,
        max_position_embeddings=32,
    )  # fmt: skip


def relu_sites(model) -> dict[str, object]:
    return {name: m for name, m in model.named_modules() if isinstance(m, torch.nn.ReLU)}


def relu_outputs(model, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The output of every ReLU module on one forward of `feed` (numpy arrays by argument name), as
    float32 numpy arrays, by module name (plain forward hooks; a module called twice keeps its last)."""
    captured: dict[str, np.ndarray] = {}
    handles = [
        m.register_forward_hook(
            lambda _m, _a, out, name=name: captured.__setitem__(name, out.float().numpy())
        )
        for name, m in relu_sites(model).items()
    ]
    try:
        with torch.no_grad():
            model(**{k: torch.from_numpy(v) for k, v in feed.items()})
    finally:
        for handle in handles:
            handle.remove()
    return captured


def hook_counts(model, ids: np.ndarray, mask: np.ndarray, keep: np.ndarray | None, **extra):
    """Plain forward hooks on the ReLU modules: per site, (positive counts, kept positions) over the
    positions where `keep` is true (every position when None), computed in numpy."""
    captured: dict[str, list] = {}
    handles = [
        m.register_forward_hook(lambda _m, _a, out, name=name: captured.setdefault(name, []).append(out))
        for name, m in relu_sites(model).items()
    ]
    try:
        with torch.no_grad():
            model(
                input_ids=torch.from_numpy(ids),
                attention_mask=torch.from_numpy(mask),
                use_cache=False,
                **extra,
            )
    finally:
        for handle in handles:
            handle.remove()
    out = {}
    for name, (act,) in captured.items():
        a = act.numpy().reshape(ids.shape[0], ids.shape[1], -1)
        kept = np.ones(ids.shape, bool) if keep is None else keep.astype(bool)
        out[name] = ((a[kept] > 0).sum(axis=0), int(kept.sum()))
    return out


def plant_pad_only_unit(model, ids: np.ndarray, mask: np.ndarray, layer: int = 0, unit: int = 10):
    """Point fc1 row `unit` of `layer` at what padding positions look like there, with a bias between
    the padding and the real tokens: it then fires on padding only (checked, with a margin)."""
    fc1 = model.model.decoder.layers[layer].fc1
    seen = []
    handle = fc1.register_forward_hook(lambda _m, args, _o: seen.append(args[0].detach()))
    with torch.no_grad():
        model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), use_cache=False)
    handle.remove()
    x = seen[0].reshape(ids.shape[0] * ids.shape[1], -1)
    pad = torch.from_numpy(mask.reshape(-1) == 0)
    plant_unit(fc1, x[pad], x[~pad], unit)
    return f"model.decoder.layers.{layer}.activation_fn", unit


def plant_unit(linear, fire, quiet, unit: int) -> None:
    """Point LINEAR's row UNIT from the QUIET input rows towards the FIRE ones, with a bias between
    them: the unit then fires on FIRE and on none of QUIET (checked, with a margin)."""
    direction = fire.mean(0) - quiet.mean(0)
    lo, hi = float((quiet @ direction).max()), float((fire @ direction).min())
    assert hi > lo + 1e-3, "the positions to fire on are not separable at this layer"
    with torch.no_grad():
        linear.weight[unit] = direction
        linear.bias[unit] = -(lo + hi) / 2


def save_folder(model, folder: Path, shard: str = "20KB") -> Path:
    model.save_pretrained(folder, max_shard_size=shard)
    save_tokenizer(folder)
    return folder


CONV = ((10, 5), (3, 2))  # (kernel, stride) of each feature-extractor conv of speech_model


def frames(samples: int) -> int:
    """Frames of speech_model's feature extractor for this many audio samples (the conv arithmetic)."""
    for kernel, stride in CONV:
        samples = (samples - kernel) // stride + 1
    return samples


def speech_model(kind: str = "wav2vec2", seed: int = 7, **overrides):
    """A tiny random speech encoder with ReLU FFNs (wav2vec2 with a CTC head, or HuBERT), in eval mode,
    and the module path prefix of its encoder (which runs on frames)."""
    torch.manual_seed(seed)
    common = dict(
        hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=24, hidden_act="relu",
        feat_extract_activation="relu", conv_dim=(8, 8), conv_kernel=tuple(k for k, _ in CONV),
        conv_stride=tuple(s for _, s in CONV), num_conv_pos_embeddings=4, num_conv_pos_embedding_groups=2,
        hidden_dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, feat_proj_dropout=0.0,
        layerdrop=0.0, mask_time_prob=0.0, feat_extract_norm="layer", vocab_size=len(VOCAB),
    )  # fmt: skip
    common.update(overrides)
    if kind == "wav2vec2":
        model = transformers.Wav2Vec2ForCTC(transformers.Wav2Vec2Config(**common, do_stable_layer_norm=True))
        return model.eval(), "wav2vec2.encoder."
    return transformers.HubertModel(transformers.HubertConfig(**common)).eval(), "encoder."


def padded_audio(batch: int = 6, length: int = 400, seed: int = 0):
    """Audio zero-padded on the right (sample 0 unpadded), its samples' attention_mask and the frames'
    mask by the conv arithmetic: (audio, samples_mask, frame_mask)."""
    rng = np.random.default_rng(seed)
    audio = rng.standard_normal((batch, length)).astype(np.float32)
    samples_mask = np.ones((batch, length), np.int64)
    real = [length - 40 * i for i in range(batch)]
    frame_mask = np.zeros((batch, frames(length)), bool)
    for i, n in enumerate(real):
        samples_mask[i, n:], audio[i, n:] = 0, 0.0
        frame_mask[i, : frames(n)] = True
    return audio, samples_mask, frame_mask


def relu_counts(model, feed: dict, keep_of) -> dict:
    """Per ReLU module: (positives per unit, counted rows). Units on the last axis of a feed-forward's
    [B, T, F] (by name, or its first axes the keep's shape), on axis 1 of a conv's [B, C, T]; positions kept where `keep_of(name, shape)` [B, T] is
    true (None: every position)."""
    out = {}
    for name, a in relu_outputs(model, feed).items():
        keep = keep_of(name, a.shape)
        ffn = "feed_forward" in name or "intermediate" in name or tuple(a.shape[:2]) == np.shape(keep)
        if keep is not None and not ffn:
            rows = np.moveaxis(a, 1, -1)[keep.astype(bool)]  # [B, C, T]: units on axis 1, tokens last
        elif keep is not None:
            rows = a[keep.astype(bool)]
        elif "feed_forward" in name:
            rows = a.reshape(-1, a.shape[-1])
        else:  # conv feature extractor / positional conv: [B, C, L], units on axis 1
            rows = np.moveaxis(a, 1, -1).reshape(-1, a.shape[1])
        out[name] = ((rows > 0).sum(0).tolist(), rows.shape[0])
    return out


def bart_model(seed: int = 4):
    """A tiny ReLU BART (1 encoder and 1 decoder layer; pad 1, bos/eos/decoder start 2), random weights."""
    torch.manual_seed(seed)
    config = transformers.BartConfig(
        vocab_size=32, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=24, decoder_ffn_dim=24, activation_function="relu",
        pad_token_id=1, bos_token_id=2, eos_token_id=2, decoder_start_token_id=2,
        max_position_embeddings=64, dropout=0.0,
    )  # fmt: skip
    return transformers.BartForConditionalGeneration(config).eval()


def token_relu_counts(model, feed: dict, keep_of) -> dict[str, tuple[list[int], int]]:
    """Per ReLU module of a transformers model: positives per unit and counted positions over the
    [B, T] positions `keep_of(site name)` keeps (units on the last axis; OPT's [B*T, F] too), in numpy."""
    out = {}
    for name, a in relu_outputs(model, feed).items():
        keep = keep_of(name).astype(bool)
        rows = a.reshape(*keep.shape, -1)[keep]  # [B, T, F], or OPT's [B*T, F]
        out[name] = ((rows > 0).sum(0).tolist(), rows.shape[0])
    return out
