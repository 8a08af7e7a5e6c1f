"""Shapes of real models met by trial43 (a Hugging Face fused mixture of experts built here with random
weights; a statically quantized ONNX model with an input normalisation; a model whose own forward
raises). Truth: plain hooks / numpy / onnxruntime here, never the tool's output."""

import json

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers", reason="the transformers extra is not installed")
from hf_models import mixtral_config  # noqa: E402


def _mixtral(tmp_path):
    """A 1-layer Mixtral (transformers 5: the experts' weights fused in one [experts, 2·I, H] tensor, one
    act_fn) with relu; expert 0's gate rows 0, 3, 7 are zero, so those units are 0 on every token."""
    torch.manual_seed(0)
    config = mixtral_config()
    model = transformers.MixtralModel(config).eval()
    with torch.no_grad():
        model.layers[0].mlp.experts.gate_up_proj[0, [0, 3, 7], :] = 0.0
    model.save_pretrained(tmp_path / "moe")
    return model


def _expert_counts(model, ids: np.ndarray) -> dict[int, tuple[list[int], int]]:
    """Per expert: how many of its routed rows give each unit a gate pre-activation > 0, and its rows;
    from the experts module's own inputs (hidden states, routing) and its weights, in numpy."""
    experts = model.layers[0].mlp.experts
    seen = []
    handle = experts.register_forward_hook(
        lambda _m, args, _o: seen.append([a.detach().numpy() for a in args[:2]])
    )
    with torch.no_grad():
        model(input_ids=torch.from_numpy(ids))
    handle.remove()
    (hidden, routes), weights = seen[0], experts.gate_up_proj.detach().numpy()
    units = weights.shape[1] // 2
    counts = {}
    for expert in range(weights.shape[0]):
        rows = hidden[(routes == expert).any(axis=1)]
        counts[expert] = (((rows @ weights[expert, :units].T) > 0).sum(0).tolist(), rows.shape[0])
    return counts


def test_a_fused_mixture_of_experts_counts_each_experts_units_apart(cli, tmp_path):
    """transformers 5 fuses a MoE layer's experts into one 3-D weight and one act_fn called on every
    routed row: unit i of every expert was one "unit", so expert 0's 3 dead units were alive in the table
    (0/12 dead) and `--max-dead` passed. Each expert's units are now a site of their own."""
    model = _mixtral(tmp_path)
    ids = np.random.default_rng(0).integers(0, 32, (6, 9))
    np.savez(tmp_path / "d.npz", input_ids=ids)
    truth = _expert_counts(model, ids)
    assert all(rows for _, rows in truth.values())  # every expert got tokens
    res = cli("scan", tmp_path / "moe", "--data", tmp_path / "d.npz", "--json", "-", "--max-dead", "0.05")
    assert res.code == 1, res.err  # 3 of expert 0's 12 units are dead: the gate fails
    layers = {layer["name"]: layer for layer in res.json()["layers"]}
    assert sorted(layers) == [f"layers.0.mlp.experts.{e}.act_fn" for e in range(3)]
    for expert, (positive, rows) in truth.items():
        layer = layers[f"layers.0.mlp.experts.{expert}.act_fn"]
        assert layer["positive_counts"] == positive, expert
        assert layer["elements_per_unit"] == rows, expert
        assert layer["dead_indices"] == [u for u, c in enumerate(positive) if c == 0], expert
    assert layers["layers.0.mlp.experts.0.act_fn"]["dead_indices"][:3] == [0, 3, 7]
    assert not any(name.endswith(".0.act_fn") for name, _ in model.named_modules())  # the model as it was
    res = cli("scan", tmp_path / "moe", "--data", tmp_path / "d.npz", "--compile")
    assert res.code == 2 and "layers.0.mlp.experts is a fused mixture of experts" in res.err  # not merged
    # one token reaches 2 of the 3 experts: the third is listed as not run, not left out
    np.savez(tmp_path / "one.npz", input_ids=ids[:1, :1])
    routed = _expert_counts(model, ids[:1, :1])
    res = cli("scan", tmp_path / "moe", "--data", tmp_path / "one.npz", "--json", "-")
    ran = {layer["name"]: layer["ran"] for layer in res.json()["layers"]}
    assert ran == {f"layers.0.mlp.experts.{e}.act_fn": rows > 0 for e, (_, rows) in routed.items()}
    assert sorted(ran.values()) == [False, True, True]
    # merging it with a report where that expert ran: exact, as one scan of both parts
    np.savez(tmp_path / "rest.npz", input_ids=ids[1:, :1])
    np.savez(tmp_path / "all.npz", input_ids=ids[:, :1])
    for part in ("one", "rest", "all"):
        res = cli(
            "scan", tmp_path / "moe", "--data", tmp_path / f"{part}.npz", "--json", tmp_path / f"{part}.json"
        )
        assert res.code == 0, res.err
    res = cli("merge", tmp_path / "one.json", tmp_path / "rest.json", "--json", "-")
    assert res.code == 0, res.err  # was: "cannot merge … (relu, 0 units) with … (relu, 12 units)"
    merged = {layer["name"]: layer for layer in res.json()["layers"]}
    whole = {layer["name"]: layer for layer in json.loads((tmp_path / "all.json").read_text())["layers"]}
    assert merged.keys() == whole.keys() and all(layer["ran"] for layer in whole.values())
    for name, layer in whole.items():
        assert merged[name]["positive_counts"] == layer["positive_counts"], name
        assert merged[name]["elements_per_unit"] == layer["elements_per_unit"], name
    # fix cannot patch rows of one fused tensor: it says so (not "no single Linear/Conv makes it")
    res = cli("fix", tmp_path / "moe", "--data", tmp_path / "d.npz", "--strategy", "reinit",
              "--output", tmp_path / "fixed")  # fmt: skip
    assert res.code == 2 and "expert 0 of the fused mixture of experts layers.0.mlp.experts" in res.err
    assert not (tmp_path / "fixed").exists()


class _Normalised(torch.nn.Module):
    """A min-max normalisation of the input (as speech front ends write it), then Linear → ReLU → Linear."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = torch.nn.Linear(16, 12), torch.nn.Linear(12, 3)

    def forward(self, x):
        low, high = x.min(dim=1, keepdim=True).values, x.max(dim=1, keepdim=True).values
        return self.fc2(torch.relu(self.fc1((x - low) / (high - low))))


def test_a_quantized_min_max_normalisation_is_no_folded_relu(cli, tmp_path):
    """A static (QDQ) quantization stores the normalised input (x - min) / (max - min) with zero point 0,
    as it stores a ReLU it folded: the scan counted it as a ReLU layer (efficientword-net's ResNet-50:
    9,536 "units", 43% of the model's, diluting every model-level fraction and `--max-dead`). The
    subtraction of a tensor's own minimum is never negative: only the real ReLU is a site."""
    import onnx
    import onnxruntime as ort
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static

    torch.manual_seed(0)
    model = _Normalised().eval()
    with torch.no_grad():
        model.fc1.bias[[2, 5]] = -50.0  # never fire on inputs in [0, 1]
    x = np.random.default_rng(0).standard_normal((16, 16)).astype(np.float32)
    torch.onnx.export(model, torch.from_numpy(x[:1]), str(tmp_path / "f.onnx"), input_names=["x"],
                      dynamic_axes={"x": {0: "n"}}, dynamo=False, opset_version=17)  # fmt: skip

    class Reader(CalibrationDataReader):
        batches = iter([{"x": x}])

        def get_next(self):
            return next(self.batches, None)

    quantize_static(tmp_path / "f.onnx", tmp_path / "q.onnx", Reader(), quant_format=QuantFormat.QDQ)
    np.savez(tmp_path / "d.npz", x=x)
    # truth: onnxruntime's quantized tensor at the QuantizeLinear that follows fc1's MatMul/Add, above
    # its zero point (the folded ReLU), per unit
    graph = onnx.load(tmp_path / "q.onnx")
    zeros = {i.name: onnx.numpy_helper.to_array(i) for i in graph.graph.initializer}
    quantizes = [n for n in graph.graph.node if n.op_type == "QuantizeLinear"]
    lowest = [n for n in quantizes if zeros[n.input[2]].item() == np.iinfo(zeros[n.input[2]].dtype).min]
    producer = {o: n for n in graph.graph.node for o in n.output}
    assert [producer[n.input[0]].op_type for n in lowest] == ["Div", "Gemm"]  # both stored from their minimum
    relu_q = lowest[1]
    assert any(name.startswith("fc1.weight") for name in producer[relu_q.input[0]].input)
    graph.graph.output.append(onnx.helper.make_empty_tensor_value_info(relu_q.output[0]))
    session = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    (quantized,) = session.run([relu_q.output[0]], {"x": x})
    positive = (quantized > zeros[relu_q.input[2]]).sum(0)
    res = cli("scan", tmp_path / "q.onnx", "--data", tmp_path / "d.npz", "--json", "-")
    assert res.code == 0, res.err
    (layer,) = res.json()["layers"]  # the normalised input is no site
    assert layer["positive_counts"] == positive.tolist()
    assert layer["dead_indices"] == np.flatnonzero(positive == 0).tolist()
    assert {2, 5} <= set(layer["dead_indices"])
    assert res.json()["summary"]["units"] == 12


RAISING = """
import torch
from torch import nn


class Checked(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(8, 4)
        self.fc = nn.Linear(4, 3)

    def forward(self, ids):
        assert ids.shape[1] == 5, "Checked expects 5 tokens"
        return torch.relu(self.fc(self.emb(ids))).sum(1)


def build():
    torch.manual_seed(0)
    return Checked()
"""


def test_an_error_raised_by_the_models_own_code_is_the_models(cli, tmp_path):
    """BeatNet's pickled model reads `self.hidden`, which its pickle lacks: AttributeError in its forward
    was "deadrelu: internal error … please report it" (exit 3), as was a model's `assert` on its input and
    an id past an Embedding's table on a later batch. Raised by the model's code, they are the model's:
    one line naming the file, line and batch, exit 2."""
    (tmp_path / "checked.py").write_text(RAISING)
    arch = f"{tmp_path / 'checked.py'}:build"
    exec(compile(RAISING, "checked.py", "exec"), space := {})
    torch.save(space["build"]().state_dict(), tmp_path / "m.pt")
    ids = np.random.default_rng(0).integers(0, 8, (6, 5))
    np.savez(tmp_path / "short.npz", ids=ids[:, :4])
    res = cli("scan", tmp_path / "m.pt", "--arch", arch, "--data", tmp_path / "short.npz")
    assert res.code == 2, res.err
    assert "AssertionError at checked.py:13 in forward() on batch 1" in res.err
    assert "Checked expects 5 tokens" in res.err and "internal error" not in res.err
    ids[4, 2] = 9  # the third batch of two holds an id the table lacks
    np.savez(tmp_path / "ids.npz", ids=ids)
    res = cli("scan", tmp_path / "m.pt", "--arch", arch, "--data", tmp_path / "ids.npz", "--batch-size", "2")
    assert res.code == 2, res.err
    assert "IndexError at checked.py:14 in forward() on batch 3 (ids[2, 5])" in res.err
    assert len(res.err.strip().splitlines()) == 1


def test_watch_says_a_fused_mixture_of_experts_is_counted_as_one(tmp_path):
    """The watch does not change a training step, so the fused experts' one activation stays one site:
    the report and a warning say so (the watch's count of expert 0's dead units is not per expert)."""
    from deadrelu_cli import watch

    model = _mixtral(tmp_path)
    with pytest.warns(UserWarning, match="fused mixture of experts"), watch(model, every=1, window=1) as w:
        w.step()
        model(input_ids=torch.from_numpy(np.random.default_rng(0).integers(0, 32, (4, 9))))
    (layer,) = w.reports[-1].layers
    assert layer.name == "layers.0.mlp.experts.act_fn" and len(layer.positive_counts) == 12
    assert any("layers.0.mlp.experts.act_fn (3 experts)" in note for note in w.reports[-1].notes)


def test_sew_counts_its_squeezed_frames_on_the_models_own_mask(cli, tmp_path):
    """SEW runs its transformer on frames average-pooled by squeeze_factor, with the frames' mask
    max-pooled alike. Its encoder sites counted every squeezed position, padding included (114 values per
    unit where the model treats 78 as real), under a note; now on the model's own squeezed mask."""
    torch.manual_seed(0)
    config = transformers.SEWConfig(
        hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, hidden_act="relu",
        conv_dim=(8, 8), conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=4,
        num_conv_pos_embedding_groups=2, feat_extract_activation="relu", squeeze_factor=2,
    )  # fmt: skip
    model = transformers.SEWModel(config).eval()
    model.save_pretrained(tmp_path / "sew")
    lengths = np.array([400, 330, 240, 170, 400, 90])
    mask = (np.arange(400)[None] < lengths[:, None]).astype(np.int64)
    audio = (np.random.default_rng(0).standard_normal((6, 400)) * mask).astype(np.float32)
    np.savez(tmp_path / "a.npz", input_values=audio, attention_mask=mask)
    seen = {}
    hooks = [
        module.register_forward_hook(lambda _m, _a, out, name=name: seen.update({name: out.detach().numpy()}))
        for name, module in model.named_modules()
        if name.startswith("encoder.") and isinstance(module, torch.nn.ReLU)
    ]
    with torch.no_grad():
        model(input_values=torch.from_numpy(audio), attention_mask=torch.from_numpy(mask))
    for hook in hooks:
        hook.remove()
    frames = model._get_feat_extract_output_lengths(torch.from_numpy(lengths)).numpy()  # the model's own
    res = cli("scan", tmp_path / "sew", "--data", tmp_path / "a.npz", "--json", "-")
    assert res.code == 0, res.err
    layers = {layer["name"]: layer for layer in res.json()["layers"]}
    for name in ("encoder.layers.0.feed_forward.intermediate_act_fn", "encoder.upsample.activation"):
        out = seen[name]  # [samples, squeezed positions, units]
        real = (
            np.arange(out.shape[1])[None] * 2 < frames[:, None]
        )  # a squeezed position pools frames 2j, 2j+1
        assert real.sum() < real.size  # padding is there
        kept = out[real]
        assert layers[name]["elements_per_unit"] == kept.shape[0], name
        assert layers[name]["positive_counts"] == (kept > 0).sum(0).tolist(), name


def _relu_outputs(model, feed: dict, prefix: str) -> dict[str, np.ndarray]:
    seen = {}
    hooks = [
        module.register_forward_hook(lambda _m, _a, out, name=name: seen.update({name: out.detach().numpy()}))
        for name, module in model.named_modules()
        if name.startswith(prefix) and isinstance(module, torch.nn.ReLU)
    ]
    with torch.no_grad():
        model(**{k: torch.from_numpy(v) for k, v in feed.items()})
    for hook in hooks:
        hook.remove()
    return seen


def _check_masked(layers: dict, seen: dict, real: np.ndarray) -> None:
    assert seen and real.sum() < real.size
    for name, out in seen.items():  # [samples, positions, units]
        kept = out[real]
        assert layers[name]["elements_per_unit"] == kept.shape[0], name
        assert layers[name]["positive_counts"] == (kept > 0).sum(0).tolist(), name


def test_models_that_derive_their_own_mask_count_on_it(cli, tmp_path):
    """Decision Transformer runs its GPT-2 on three tokens per time step (its attention_mask stacked
    alike); Canine runs its deep encoder on molecules (the characters' mask max-pooled by
    downsampling_rate). Those sites counted every position, padded steps / molecules included (a note
    said so); now on the mask the model derives. Canine's ReLU → LayerNorm is no "relu-before-softmax"."""
    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    dt = transformers.DecisionTransformerModel(
        transformers.DecisionTransformerConfig(
            state_dim=5, act_dim=3, hidden_size=16, n_layer=1, n_head=2, n_inner=32,
            activation_function="relu", max_ep_len=16, n_positions=32,
        )
    ).eval()  # fmt: skip
    dt.save_pretrained(tmp_path / "dt")
    steps = (np.arange(8)[None] < np.array([8, 5, 3, 8, 6, 2])[:, None]).astype(np.int64)
    feed = {
        "states": rng.standard_normal((6, 8, 5)).astype(np.float32),
        "actions": rng.standard_normal((6, 8, 3)).astype(np.float32),
        "rewards": rng.standard_normal((6, 8, 1)).astype(np.float32),
        "returns_to_go": rng.standard_normal((6, 8, 1)).astype(np.float32),
        "timesteps": np.tile(np.arange(8), (6, 1)),
        "attention_mask": steps,
    }
    np.savez(tmp_path / "dt.npz", **feed)
    res = cli("scan", tmp_path / "dt", "--data", tmp_path / "dt.npz", "--json", "-")
    assert res.code == 0, res.err
    layers = {layer["name"]: layer for layer in res.json()["layers"]}
    _check_masked(layers, _relu_outputs(dt, feed, "encoder."), np.repeat(steps.astype(bool), 3, axis=1))

    canine = transformers.CanineModel(
        transformers.CanineConfig(
            hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, hidden_act="relu",
            downsampling_rate=2, num_hash_buckets=16, num_hash_functions=2, local_transformer_stride=4,
            max_position_embeddings=32,
        )
    ).eval()  # fmt: skip
    canine.save_pretrained(tmp_path / "canine")
    chars = (np.arange(12)[None] < np.array([12, 7, 3, 10, 5, 9])[:, None]).astype(np.int64)
    feed = {"input_ids": rng.integers(100, 200, (6, 12)) * chars, "attention_mask": chars}
    np.savez(tmp_path / "canine.npz", **feed)
    res = cli("scan", tmp_path / "canine", "--data", tmp_path / "canine.npz", "--json", "-")
    assert res.code == 0, res.err
    assert "relu-before-softmax" not in res.err + " ".join(res.json()["notes"])
    layers = {layer["name"]: layer for layer in res.json()["layers"]}
    molecules = chars.reshape(6, 6, 2).max(axis=2).astype(bool)
    _check_masked(layers, _relu_outputs(canine, feed, "encoder."), molecules)
    _check_masked(layers, _relu_outputs(canine, feed, "chars_to_molecules."), molecules)


SMOOTH = """
import torch
from torch import nn


def build():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.SiLU(), nn.Linear(8, 2))
"""


def test_inspect_of_a_model_without_relus_says_what_it_uses(cli, tmp_path):
    """captcha-recognizer's YOLOv8 (SiLU everywhere): `inspect` printed "0 activation sites" and an empty
    table, where `scan` names what the model uses instead. Now `inspect` says it too (ONNX and torch)."""
    (tmp_path / "smooth.py").write_text(SMOOTH)
    exec(compile(SMOOTH, "smooth.py", "exec"), space := {})
    model = space["build"]()
    torch.save(model.state_dict(), tmp_path / "m.pt")
    torch.onnx.export(model, torch.zeros(1, 4), str(tmp_path / "m.onnx"), dynamo=False, opset_version=17)
    import onnx

    silu = [n.op_type for n in onnx.load(tmp_path / "m.onnx").graph.node if n.op_type in ("Sigmoid", "Mul")]
    assert silu == ["Sigmoid", "Mul"]  # x * Sigmoid(x), as exporters write SiLU
    res = cli("inspect", tmp_path / "m.onnx")
    assert res.code == 0 and "0 activation sites" in res.out
    assert "the graph has no relu/relu6 nodes; its activations: Sigmoid ×1" in " ".join(res.out.split())
    res = cli("inspect", tmp_path / "m.pt", "--arch", f"{tmp_path / 'smooth.py'}:build")
    assert res.code == 0 and "its activations: SiLU ×1" in " ".join(res.out.split())


def test_merging_a_site_that_did_not_run_in_one_part_adds_only_the_other_parts_counts():
    """A site no sample reached in one part (an expert no token was routed to, an ONNX branch not taken)
    has no units there: merging refused ("the reports come from different models"). It adds nothing."""
    from deadrelu_cli.stats import LayerStats, merge_layer

    ran = LayerStats(
        name="s", op="relu", channel_dim=-1, positive_counts=np.array([3, 0, 5]), elements_per_unit=7,
        max_preactivation=np.array([1.0, -2.0, 0.5]), sum_abs=np.array([2.0, 0.0, 1.0]), samples=4,
    )  # fmt: skip
    idle = LayerStats(
        name="s", op="relu", channel_dim=-1, positive_counts=np.zeros(0, np.int64), elements_per_unit=0,
        max_preactivation=np.zeros(0), sum_abs=np.zeros(0), samples=0,
    )  # fmt: skip
    for merged in (merge_layer(idle, ran), merge_layer(ran, idle)):
        assert merged.positive_counts.tolist() == [3, 0, 5] and merged.elements_per_unit == 7
        assert merged.samples == 4 and merged.units == 3
