"""Shapes of real models met by trial42 (Hugging Face vision and speech architectures, built here with
random weights). Truth: plain forward hooks on the models' own modules, counted in numpy here."""

import importlib.util

import numpy as np
import torch

# A ConvNeXt block (Hugging Face ConvNext/ConvNextV2, torchvision's convnext_*, timm): the pointwise
# convolutions are nn.Linear on the channels-last [N, H, W, C] image, so the ReLU's units are on the
# last axis of a rank-4 tensor. Units 1, 5, 9 of pw1 are planted dead.
CONVNEXT_BLOCK = """
import torch
from torch import nn


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.pw1 = nn.Linear(8, 16)
        self.act = nn.ReLU()
        self.pw2 = nn.Linear(16, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        h = self.stem(x).permute(0, 2, 3, 1)
        h = self.pw2(self.act(self.pw1(h)))
        return self.head(h.permute(0, 3, 1, 2).mean((2, 3)))


def build():
    torch.manual_seed(0)
    model = Block().eval()
    with torch.no_grad():
        model.pw1.bias[[1, 5, 9]] = -100.0
    return model
"""


def _convnext(tmp_path):
    source = tmp_path / "convnext_block.py"
    source.write_text(CONVNEXT_BLOCK)
    spec = importlib.util.spec_from_file_location("convnext_block", source)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.build(), f"{source}:build"


def _act_counts(model, x: torch.Tensor) -> tuple[np.ndarray, int]:
    """Per unit of `model.act`: how many of its values are > 0, and values per unit; units are what
    pw1's rows make (its out_features, the last axis), read from the hook's tensor."""
    seen = []
    handle = model.act.register_forward_hook(lambda _m, _a, out: seen.append(out.detach().numpy()))
    with torch.no_grad():
        model(x)
    handle.remove()
    out = np.concatenate([a.reshape(-1, model.pw1.out_features) for a in seen])
    assert seen[0].shape[-1] == model.pw1.out_features and seen[0].ndim == 4
    return (out > 0).sum(0), out.shape[0]


def test_a_linear_on_channels_last_images_has_its_units_on_the_last_axis(cli, tmp_path):
    """A ConvNeXt's ReLU after `nn.Linear` on [N, H, W, C] was counted on axis 1 (the image rows: 5
    "units", 0 dead) in every torch format (state_dict, TorchScript, .pt2), so its 3 dead channels
    passed `--max-dead` silently; the ONNX export was right. A Linear's units are its last axis at any
    rank; `fix` then finds pw1 as the producer."""
    model, arch = _convnext(tmp_path)
    x = torch.randn(6, 3, 5, 7, generator=torch.Generator().manual_seed(1))
    np.savez(tmp_path / "d.npz", x=x.numpy())
    positive, per_unit = _act_counts(model, x)
    assert np.flatnonzero(positive == 0).tolist() == [1, 5, 9]
    torch.save(model.state_dict(), tmp_path / "sd.pt")
    torch.jit.trace(model, x).save(str(tmp_path / "m.ts"))
    torch.export.save(torch.export.export(model, (x,)), tmp_path / "m.pt2")
    for given in (["sd.pt", "--arch", arch], ["m.ts"], ["m.pt2"]):
        path = tmp_path / given[0]
        res = cli("scan", path, *given[1:], "--data", tmp_path / "d.npz", "--json", "-", "--max-dead", "0.1")
        assert res.code == 1, (given, res.err)  # 3/16 dead > 10%: the gate fails
        (layer,) = res.json()["layers"]
        assert layer["positive_counts"] == positive.tolist(), given
        assert layer["elements_per_unit"] == per_unit, given
        assert layer["dead_indices"] == [1, 5, 9], given
    res = cli("fix", tmp_path / "sd.pt", "--arch", arch, "--data", tmp_path / "d.npz", "--strategy", "reinit",
              "--output", tmp_path / "fixed.pt")  # fmt: skip
    assert res.code == 0, res.err
    fixed, _ = _convnext(tmp_path)
    fixed.load_state_dict(torch.load(tmp_path / "fixed.pt", weights_only=True))
    assert (_act_counts(fixed, x)[0] > 0).all()  # the planted units fire (my hook)
    with torch.no_grad():
        assert torch.equal(fixed(x), model(x))  # reinit keeps the outputs


def test_watch_counts_a_channels_last_linear_on_its_last_axis(tmp_path):
    """The same under `watch()` in a training loop (the probe the Lightning and Trainer callbacks use):
    each window's counts equal my hooks' over that step's forward."""
    from deadrelu_cli import watch

    model, _ = _convnext(tmp_path)
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(2)
    batches = [torch.randn(4, 3, 6, 6, generator=g) for _ in range(4)]
    seen = {}  # step -> the act's output on that step's training forward (my hook)
    now = {}

    def hook(_module, _args, out):
        seen.setdefault(now["step"], out.detach().numpy())

    model.act.register_forward_hook(hook)
    with watch(model, every=2, window=1, config=False) as w:
        for step, x in enumerate(batches):
            w.step(step)
            now["step"] = step
            loss = model(x).square().mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    truth = [seen[s].reshape(-1, 16) for s in (0, 2)]
    assert len(w.reports) == 2
    for report, out in zip(w.reports, truth, strict=True):
        (layer,) = report.layers
        assert np.asarray(layer.positive_counts).tolist() == (out > 0).sum(0).tolist()
        assert layer.elements_per_unit == out.shape[0]
        assert np.flatnonzero(layer.positive_counts == 0).tolist() == [1, 5, 9]


def _s2t(tmp_path):
    """A tiny Speech2Text (conv subsampler: 2 stride-2 convs, then a ReLU transformer) saved as a
    folder, and padded filterbank frames with their attention_mask (zeros on padding)."""
    import transformers

    torch.manual_seed(0)
    config = transformers.Speech2TextConfig(
        vocab_size=32, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, activation_function="relu",
        pad_token_id=1, decoder_start_token_id=2, input_feat_per_channel=8, conv_channels=16,
        max_source_positions=64, max_target_positions=64, dropout=0.0, activation_dropout=0.0,
        attention_dropout=0.0,
    )  # fmt: skip
    model = transformers.Speech2TextForConditionalGeneration(config).eval()
    model.save_pretrained(tmp_path / "s2t")
    r = np.random.default_rng(0)
    lengths = np.array([40, 33, 24, 17, 40, 9])
    mask = (np.arange(40)[None] < lengths[:, None]).astype(np.int64)
    features = (r.standard_normal((6, 40, 8)) * mask[..., None]).astype(np.float32)
    tokens = r.integers(3, 32, (6, 7))
    decoder_mask = (np.arange(7)[None] < np.array([7, 5, 6, 3, 7, 4])[:, None]).astype(np.int64)
    feed = dict(input_features=features, attention_mask=mask, decoder_input_ids=tokens,
                decoder_attention_mask=decoder_mask)  # fmt: skip
    np.savez(tmp_path / "speech.npz", **feed)
    frames = lengths
    for _ in range(2):  # each subsampling conv: kernel 5, stride 2, padding 2
        frames = (frames - 1) // 2 + 1
    return model, feed, frames


def _relu_outputs(model, feed: dict) -> dict[str, np.ndarray]:
    seen = {}

    def keep(name):
        def hook(_module, _args, out):
            seen.setdefault(name, out.detach().numpy())

        return hook

    hooks = [
        m.register_forward_hook(keep(n)) for n, m in model.named_modules() if isinstance(m, torch.nn.ReLU)
    ]
    with torch.no_grad():
        model(**{k: torch.from_numpy(v) for k, v in feed.items()})
    for h in hooks:
        h.remove()
    return seen


def test_speech2text_encoder_counts_the_real_frames_beside_its_decoder(cli, tmp_path):
    """Speech2Text takes `input_features` [N, frames, 80] with an attention_mask per frame, and its
    conv subsampler shortens them 4×: the encoder's sites counted every subsampled frame, padding
    included (a note said "position mask not applied"), so units firing only on padding passed as
    alive; the speech-frame scoping knew only wav2vec2's `input_values` and no encoder-decoder.
    Truth: my hooks, frames kept by the subsampler's own arithmetic ((L - 1) // 2 + 1, twice)."""
    model, feed, frames = _s2t(tmp_path)
    outs = _relu_outputs(model, feed)
    encoder = outs["model.encoder.layers.0.activation_fn"]
    keep = np.arange(encoder.shape[1])[None] < frames[:, None]
    decoder = outs["model.decoder.layers.0.activation_fn"]
    truth = {
        "model.encoder.layers.0.activation_fn": encoder[keep],
        "model.decoder.layers.0.activation_fn": decoder[feed["decoder_attention_mask"].astype(bool)],
    }
    res = cli("scan", tmp_path / "s2t", "--data", tmp_path / "speech.npz", "--json", "-", "--batch-size", "4")
    assert res.code == 0, res.err
    layers = {layer["name"]: layer for layer in res.json()["layers"]}
    for name, values in truth.items():
        assert layers[name]["positive_counts"] == (values > 0).sum(0).tolist(), name
        assert layers[name]["elements_per_unit"] == values.shape[0], name
    assert "position mask not applied" not in res.err

    from deadrelu_cli import watch

    model.train()
    seen = _relu_outputs(model, feed)  # dropout 0: train mode computes the same values as eval
    with watch(model, every=1, config=False) as w:
        w.step(0)
        model(**{k: torch.from_numpy(v) for k, v in feed.items()}).logits.sum().backward()
    layers = {layer.name: layer for layer in w.reports[0].layers}
    assert (
        np.asarray(layers["model.encoder.layers.0.activation_fn"].positive_counts).tolist()
        == (seen["model.encoder.layers.0.activation_fn"][keep] > 0).sum(0).tolist()
    )
    assert (
        layers["model.decoder.layers.0.activation_fn"].elements_per_unit
        == truth["model.decoder.layers.0.activation_fn"].shape[0]
    )


def test_fix_of_a_speech_encoder_compares_its_outputs_on_the_real_frames(cli, tmp_path):
    """wav2vec2 with an attention_mask over the audio: units dead on the real frames that fire on
    padded ones were counted right, but `fix --strategy reinit` compared every frame of the outputs
    (the mask is over audio samples, the outputs over frames) and refused an exact fix ("outputs
    changed by 0.0661 relative"). Truth: the written folder's outputs on the real frames (frames by
    the conv arithmetic) equal the original's, and the planted units fire there (my hooks)."""
    import transformers

    torch.manual_seed(0)
    config = transformers.Wav2Vec2Config(
        hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, hidden_act="relu",
        conv_dim=(8, 8), conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=4,
        num_conv_pos_embedding_groups=2, feat_extract_norm="layer", do_stable_layer_norm=True, vocab_size=8,
    )  # fmt: skip
    model = transformers.Wav2Vec2Model(config).eval()
    r = np.random.default_rng(0)
    lengths = np.array([400, 300, 210, 400, 150, 333])
    mask = (np.arange(400)[None] < lengths[:, None]).astype(np.int64)
    audio = (r.standard_normal((6, 400)) * mask).astype(np.float32)
    np.savez(tmp_path / "a.npz", input_values=audio, attention_mask=mask)
    frames = lengths
    for kernel, stride in zip(config.conv_kernel, config.conv_stride, strict=True):
        frames = (frames - kernel) // stride + 1
    dense = model.encoder.layers[0].feed_forward.intermediate_dense
    feed = {"input_values": torch.from_numpy(audio), "attention_mask": torch.from_numpy(mask)}

    def pre_activations(m):
        seen = []
        h = m.encoder.layers[0].feed_forward.intermediate_dense.register_forward_hook(
            lambda _m, _a, out: seen.append(out.detach())
        )
        with torch.no_grad():
            out = m(**feed).last_hidden_state
        h.remove()
        real = torch.arange(seen[0].shape[1])[None] < torch.from_numpy(frames)[:, None]
        return seen[0], real, out

    pre, real, before = pre_activations(model)
    gap = pre[~real].amax(0) - pre[real].amax(0)  # units whose padding frames reach higher than real ones
    planted = torch.argsort(gap, descending=True)[:3]
    assert (gap[planted] > 0).all()
    with torch.no_grad():
        dense.bias[planted] -= pre[real].amax(0)[planted] + 1e-3  # dead on real frames, alive on padding
    pre, real, before = pre_activations(model)
    assert (pre[real][:, planted] <= 0).all() and (pre[~real][:, planted] > 0).any()
    model.save_pretrained(tmp_path / "w2v")
    res = cli("fix", tmp_path / "w2v", "--data", tmp_path / "a.npz", "--strategy", "reinit", "--output",
              tmp_path / "fixed")  # fmt: skip
    assert res.code == 0, res.err
    fixed = transformers.Wav2Vec2Model.from_pretrained(tmp_path / "fixed").eval()
    pre_after, _, after = pre_activations(fixed)
    assert torch.equal(after[real], before[real])
    assert ((pre_after[real][:, planted] > 0).sum(0) > 0).all()


def test_onnx_bias_shift_moves_the_beta_of_a_layer_norm_written_out(cli, tmp_path):
    """openWakeWord's `hey_jarvis` (torch.onnx below opset 17 writes LayerNorm out as ReduceMean, Sub,
    Pow, Sqrt, Div, Mul(gamma), Add(beta)) had a LayerNorm before each Relu: `fix --strategy
    bias-shift` said "not produced by a Conv, Gemm, MatMul+bias or BatchNormalization" and wrote
    nothing, while a LayerNormalization node's B is moved. Truth: onnxruntime's own Relu outputs of
    the written file (planted units fire), and only the planted units' beta entries moved."""
    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(6, 16), torch.nn.LayerNorm(16), torch.nn.ReLU(), torch.nn.Linear(16, 2)
    ).eval()
    with torch.no_grad():
        model[1].bias[[2, 11]] = -5.0  # LayerNorm output is within √15 of 0: dead for any input
    x = torch.randn(64, 6, generator=torch.Generator().manual_seed(1))
    path = tmp_path / "ln.onnx"
    torch.onnx.export(model, (x,), path, dynamo=False, opset_version=13, input_names=["x"],
                      dynamic_axes={"x": {0: "n"}})  # fmt: skip
    graph = onnx.load(path).graph
    assert "LayerNormalization" not in {n.op_type for n in graph.node}  # written out
    np.savez(tmp_path / "d.npz", x=x.numpy())
    res = cli(
        "fix", path, "--data", tmp_path / "d.npz", "--strategy", "bias-shift", "--output", tmp_path / "f.onnx"
    )
    assert res.code == 0, res.err

    def relu_and_betas(file):
        m = onnx.load(file)
        (relu,) = [n for n in m.graph.node if n.op_type == "Relu"]
        m.graph.output.append(onnx.helper.make_empty_tensor_value_info(relu.output[0]))
        session = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
        betas = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer if i.dims == [16]}
        return session.run([relu.output[0]], {"x": x.numpy()})[0], betas

    before, betas = relu_and_betas(path)
    after, moved = relu_and_betas(tmp_path / "f.onnx")
    assert np.flatnonzero((before > 0).sum(0) == 0).tolist() == [2, 11]
    assert ((after > 0).sum(0) > 0).all()
    changed = {name: np.flatnonzero(betas[name] != moved[name]).tolist() for name in betas}
    assert sorted(v for v in changed.values() if v) == [[2, 11]]


SCALED_FIRST = """
import torch
from torch import nn


class Scaled(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(4, 8)
        self.scale = nn.Parameter(torch.full((8,), 0.5))
        self.fc2 = nn.Linear(8, 6)
        self.register_buffer("offset", torch.zeros(6))

    def forward(self, x):
        h = torch.relu(self.scale * self.fc1(x))  # the constant first: ConvNeXt's layer scale
        return torch.relu(self.offset - self.fc2(h))  # a constant minus the input-dependent value


def build():
    torch.manual_seed(0)
    model = Scaled().eval()
    with torch.no_grad():
        model.fc1.bias[0] = -100.0
        model.offset[3] = -100.0
    return model
"""


def test_certify_bounds_a_product_or_difference_whose_constant_comes_first(cli, tmp_path):
    """`--certify` on a Hugging Face ConvNeXt said "n/c — AttributeError at mul" for every layer after
    its first block: `layer_scale * x` has the constant as the first operand, and the bound took the
    first operand as the interval. Truth: a hand bound in numpy (|W| times the box) proves the planted
    units dead; soundness: no unit the tool certifies fires on data from the box."""
    source = tmp_path / "scaled.py"
    source.write_text(SCALED_FIRST)
    spec = importlib.util.spec_from_file_location("scaled", source)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model = module.build()
    w1, b1 = model.fc1.weight.detach().numpy(), model.fc1.bias.detach().numpy()
    w2, b2 = model.fc2.weight.detach().numpy(), model.fc2.bias.detach().numpy()
    scale, offset = model.scale.detach().numpy(), model.offset.numpy()
    hi1 = np.maximum(scale * (np.abs(w1).sum(1) + b1), 0)  # x in [-1, 1]^4, scale > 0
    assert hi1[0] == 0
    upper2 = offset - b2 + np.abs(w2) @ hi1  # h in [0, hi1]
    assert upper2[3] < 0
    torch.save(model.state_dict(), tmp_path / "m.pt")
    x = torch.rand(256, 4, generator=torch.Generator().manual_seed(3)) * 2 - 1
    np.savez(tmp_path / "d.npz", x=x.numpy())
    res = cli("scan", tmp_path / "m.pt", "--arch", f"{source}:build", "--data", tmp_path / "d.npz",
              "--input-range", "-1", "1", "--json", "-")  # fmt: skip
    assert res.code == 0, res.err
    layers = res.json()["layers"]
    assert [layer.get("certify_note") for layer in layers] == [None, None]
    assert 0 in layers[0]["certified_dead_indices"] and 3 in layers[1]["certified_dead_indices"]
    for layer in layers:  # sound: a certified unit never fires on data from the box
        assert set(layer["certified_dead_indices"]) <= set(layer["dead_indices"])


def test_encoder_decoders_that_shift_labels_inside_forward_run_their_decoder_on_them(cli, tmp_path):
    """M2M100 (and NLLB, Blenderbot, Speech2Text, Whisper) derive the decoder's input from `labels`
    inside forward() but have no `prepare_decoder_input_ids_from_labels`: a scan with `labels` and no
    `decoder_input_ids` left the labels out and failed ("You cannot specify both decoder_input_ids
    and decoder_inputs_embeds"), and `watch()` under the Trainer (which feeds labels) counted every
    decoder position, those after label padding (-100) included. Truth: my hooks, the decoder's
    positions being the start one and each after a label that is not -100."""
    import transformers

    from deadrelu_cli import watch

    torch.manual_seed(0)
    config = transformers.M2M100Config(
        vocab_size=32, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, activation_function="relu",
        pad_token_id=1, decoder_start_token_id=2, bos_token_id=2, eos_token_id=0, dropout=0.0,
    )  # fmt: skip
    model = transformers.M2M100ForConditionalGeneration(config).eval()
    model.save_pretrained(tmp_path / "m2m")
    r = np.random.default_rng(0)
    lengths = np.array([9, 4, 6, 3, 9, 7, 5, 8])
    mask = (np.arange(9)[None] < lengths[:, None]).astype(np.int64)
    ids = np.where(mask == 1, r.integers(3, 32, (8, 9)), 1)
    labels = np.where(mask == 1, ids, -100)
    feed = dict(input_ids=ids, attention_mask=mask, labels=labels)
    np.savez(tmp_path / "d.npz", **feed)
    decoder = "model.decoder.layers.0.activation_fn"
    keep = np.concatenate([np.ones((8, 1), bool), labels[:, :-1] != -100], axis=1)
    truth = (_relu_outputs(model, feed)[decoder][keep] > 0).sum(0)
    assert (truth == 0).sum() > ((_relu_outputs(model, feed)[decoder] > 0).sum((0, 1)) == 0).sum()
    res = cli("scan", tmp_path / "m2m", "--data", tmp_path / "d.npz", "--json", "-")
    assert res.code == 0, res.err
    layer = next(layer for layer in res.json()["layers"] if layer["name"] == decoder)
    assert layer["positive_counts"] == truth.tolist()
    assert layer["elements_per_unit"] == int(keep.sum())

    model.train()
    with watch(model, every=1, config=False) as w:
        w.step(0)
        model(**{k: torch.from_numpy(v) for k, v in feed.items()}).loss.backward()
    layer = next(layer for layer in w.reports[0].layers if layer.name == decoder)
    assert np.asarray(layer.positive_counts).tolist() == truth.tolist()
    assert layer.elements_per_unit == int(keep.sum())
