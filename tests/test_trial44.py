"""A new user's trial (trial44): what real wheels and Hugging Face folders turned up.

Certification's input box (`--certify --input-range auto|LO HI`) with data: swift-f0's ONNX pitch model
takes `audio` plus two scalars fed with `--const fmin --const fmax`, and the scan crashed (exit 3); the
auto box was also matched to the model's inputs by where each array sits in the file, so a file that
stores the arrays in another order certified units over the wrong inputs' ranges.

Truth: interval bounds computed here in numpy from the weights and the data's min/max (or the fixed box),
never from deadrelu's output.
"""

from __future__ import annotations

import numpy as np
import onnx
import torch
from conftest import arch_file, save_npz
from onnx import TensorProto, helper, numpy_helper

# relu(a @ WA + b @ WB + C): unit 0 reads a0 + a1, unit 1 reads b0
WA = np.array([[1.0, 0.0], [1.0, 0.0]], np.float32)
WB = np.array([[0.0, 1.0], [0.0, 0.0]], np.float32)
C = np.array([-1.5, -0.5], np.float32)
A = np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)  # a0 + a1 - 1.5 < 0 on both samples, not on the box
B = np.array([[0.0, 0.1], [0.0, 0.2]], np.float32)


def _upper(weight: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """max over the box [lo, hi] of x @ weight, per output (numpy, float64)."""
    w = weight.astype(np.float64)
    return np.maximum(w * lo[:, None], w * hi[:, None]).sum(0)


def _two_input_onnx(path):
    nodes = [
        helper.make_node("MatMul", ["a", "WA"], ["ma"]),
        helper.make_node("MatMul", ["b", "WB"], ["mb"]),
        helper.make_node("Add", ["ma", "mb"], ["s"]),
        helper.make_node("Add", ["s", "C"], ["pre"]),
        helper.make_node("Relu", ["pre"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["N", 2]) for n in ("a", "b")],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])],
        [numpy_helper.from_array(v, n) for n, v in (("WA", WA), ("WB", WB), ("C", C))],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(path))
    return path


TWO_ARCH = """
import torch
from torch import nn


class Two(nn.Module):
    def __init__(self):
        super().__init__()
        self.la = nn.Linear(2, 2, bias=False)
        self.lb = nn.Linear(2, 2)

    def forward(self, a, b):
        return torch.relu(self.la(a) + self.lb(b))


def build():
    return Two()
"""


def _auto_truth() -> tuple[list[float], list[int]]:
    upper = _upper(WA, A.min(0), A.max(0)) + _upper(WB, B.min(0), B.max(0)) + C
    return upper.tolist(), np.flatnonzero(upper < 0).tolist()


def _certified(result) -> tuple[list[float], list[int]]:
    (layer,) = result.json()["layers"]
    return layer["upper_bound"], layer["certified_dead_indices"]


def test_auto_box_follows_the_inputs_not_the_file_order(cli, tmp_path):
    """The same data saved as (b, a): each input keeps its own box, in ONNX and in PyTorch alike."""
    upper, dead = _auto_truth()
    assert dead == [1]  # unit 0 reaches 0.5 at a = (1, 1), inside the data's box
    model = _two_input_onnx(tmp_path / "two.onnx")
    module, spec = arch_file(tmp_path / "two_arch.py", TWO_ARCH)
    with torch.no_grad():
        module.la.weight.copy_(torch.from_numpy(WA.T))
        module.lb.weight.copy_(torch.from_numpy(WB.T))
        module.lb.bias.copy_(torch.from_numpy(C))
    torch.save(module.state_dict(), tmp_path / "two.pt")
    for order in ({"a": A, "b": B}, {"b": B, "a": A}):
        data = save_npz(tmp_path / f"{''.join(order)}.npz", **order)
        for target in ([model], [tmp_path / "two.pt", "--arch", spec]):
            result = cli("scan", *target, "--data", data, "--input-range", "auto", "--json", "-")
            assert result.code == 0, result.err
            got_upper, got_dead = _certified(result)
            assert got_dead == dead, (target, list(order))
            np.testing.assert_allclose(got_upper, upper, atol=1e-6)


def _const_onnx(path):
    """relu(((x * scale) + state[0] + state[1]) @ W + bias): scale a scalar fed whole (--const), state
    [2, N, 3] with its samples on axis 1 (--batch-axis state=1)."""
    nodes = [
        helper.make_node("Mul", ["x", "scale"], ["xs"]),
        helper.make_node("ReduceSum", ["state", "axes"], ["st"], keepdims=0),
        helper.make_node("Add", ["xs", "st"], ["h"]),
        helper.make_node("MatMul", ["h", "W"], ["m"]),
        helper.make_node("Add", ["m", "bias"], ["pre"]),
        helper.make_node("Relu", ["pre"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3]),
            helper.make_tensor_value_info("scale", TensorProto.FLOAT, []),
            helper.make_tensor_value_info("state", TensorProto.FLOAT, [2, "N", 3]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
        [
            numpy_helper.from_array(CONST_W, "W"),
            numpy_helper.from_array(CONST_BIAS, "bias"),
            numpy_helper.from_array(np.array([0], np.int64), "axes"),
        ],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(path))
    return path


CONST_W = np.array([[1.0, -1.0, 0.5, 0.0], [0.0, 1.0, -0.5, 0.2], [-1.0, 0.0, 1.0, -0.3]], np.float32)
CONST_BIAS = np.array([-2.0, 0.1, -9.0, -0.2], np.float32)
SCALE = np.float32(3.0)


def _const_data(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (16, 3)).astype(np.float32)
    state = rng.uniform(-0.5, 0.5, (2, 16, 3)).astype(np.float32)
    return x, state, save_npz(tmp_path / "const.npz", x=x, scale=np.array(SCALE), state=state)


def test_const_and_batch_axis_inputs_are_boxed_as_fed(cli, tmp_path):
    """The scalar is bounded by its value, the state by its min/max over the samples on axis 1: the
    crash (exit 3) and the fixed box given to the scalar are gone."""
    model = _const_onnx(tmp_path / "const.onnx")
    x, state, data = _const_data(tmp_path)
    feed = ["--data", data, "--const", "scale", "--batch-axis", "state=1", "--json", "-"]
    s = SCALE.astype(np.float64)
    boxes = {
        "auto": (
            s * x.min(0) + state.min(1).sum(0),  # scale > 0; the state's two rows bounded apart, then added
            s * x.max(0) + state.max(1).sum(0),
        ),
        "fixed": (np.full(3, -s - 2.0), np.full(3, s + 2.0)),  # x and both state rows in [-1, 1]
    }
    for kind, args in (("auto", ["auto"]), ("fixed", ["-1", "1"])):
        lo, hi = boxes[kind]
        upper = _upper(CONST_W, lo, hi) + CONST_BIAS
        result = cli("scan", model, *feed, "--input-range", *args)
        assert result.code == 0, result.err
        got_upper, got_dead = _certified(result)
        np.testing.assert_allclose(got_upper, upper, rtol=1e-6, atol=1e-6)
        assert got_dead == np.flatnonzero(upper < 0).tolist()


CONST_ARCH = """
import torch
from torch import nn


class Scaled(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 4)

    def forward(self, x, scale):
        return torch.relu(self.fc(x * scale))


def build():
    return Scaled()
"""


def test_torch_certify_with_a_const_input_is_refused_in_one_line(cli, tmp_path):
    module, spec = arch_file(tmp_path / "scaled.py", CONST_ARCH)
    torch.save(module.state_dict(), tmp_path / "scaled.pt")
    data = save_npz(tmp_path / "s.npz", x=np.ones((4, 3), np.float32), scale=np.array(2.0, np.float32))
    args = [tmp_path / "scaled.pt", "--arch", spec, "--data", data, "--const", "scale"]
    assert cli("scan", *args).code == 0
    result = cli("scan", *args, "--input-range", "auto")
    assert result.code == 2, result.err
    assert result.err.count("\n") == 1 and "--const" in result.err and "Traceback" not in result.err


def test_a_custom_domain_op_is_refused_saying_what_to_do(cli, tmp_path):
    """qonnx's quantized ESPCN holds `onnx.brevitas:Quant` nodes, which onnxruntime cannot run: the error
    said only onnxruntime's words; it now names the ops and the way on (QCDQ, or the float model)."""
    nodes = [
        helper.make_node("Quant", ["x", "s", "z", "b"], ["q"], domain="onnx.brevitas", signed=1, narrow=0),
        helper.make_node("Relu", ["q"], ["y"]),
    ]
    scalars = [
        numpy_helper.from_array(np.array(v, np.float32), n) for n, v in (("s", 0.1), ("z", 0.0), ("b", 8.0))
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
        scalars,
    )
    opsets = [helper.make_opsetid("", 13), helper.make_opsetid("onnx.brevitas", 1)]
    onnx.save(helper.make_model(graph, opset_imports=opsets), str(tmp_path / "q.onnx"))
    data = save_npz(tmp_path / "x.npz", x=np.ones((2, 4), np.float32))
    result = cli("scan", tmp_path / "q.onnx", "--data", data)
    assert result.code == 2 and result.err.count("\n") == 1, result.err
    assert (
        "Quant ops (domain 'onnx.brevitas')" in result.err and "convert them to standard ONNX" in result.err
    )


FEATURES_ARCH = """
import torch
import torch.nn.functional as F
from torch import nn


class Detector(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.size_op = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        features = F.relu(self.conv(x))
        return {"size": F.relu(self.size_op(features)), "features": features}


def build():
    return Detector()
"""


def test_returned_features_that_feed_a_head_are_no_relu_on_output(cli, tmp_path):
    """batdetect2's Net2DFast returns its last ReLU's output as `features` beside the heads it feeds: the
    warning said to move that activation before the last layer; only the ReLU on the size head itself
    (read by nothing inside the model) is on the output."""
    module, spec = arch_file(tmp_path / "det.py", FEATURES_ARCH)
    torch.save(module.state_dict(), tmp_path / "det.pt")
    x = np.random.default_rng(0).standard_normal((3, 1, 6, 6)).astype(np.float32)
    data = save_npz(tmp_path / "x.npz", x=x)
    result = cli("scan", tmp_path / "det.pt", "--arch", spec, "--data", data, "-q")
    assert result.code == 0, result.err
    warned = [line.split(":")[2].split()[0] for line in result.err.splitlines() if "relu-on-output" in line]
    assert warned == ["relu()#2"], result.err


def _clip(tmp_path):
    """A tiny CLIP with ReLU towers: 4 patches + CLS = 5 image positions, as many as the 5 tokens."""
    import transformers
    from hf_models import save_tokenizer, token_data

    torch.manual_seed(0)
    common = dict(hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2)
    text = dict(common, vocab_size=32, max_position_embeddings=16, hidden_act="relu", pad_token_id=1,
                bos_token_id=2, eos_token_id=2)  # fmt: skip
    vision = dict(common, image_size=28, patch_size=14, num_channels=3, hidden_act="relu")
    config = transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=8)
    model = transformers.CLIPModel(config).eval()
    model.save_pretrained(tmp_path / "clip")
    save_tokenizer(tmp_path / "clip")
    ids, mask = token_data(samples=6, tokens=5)
    assert not mask.all()
    pixels = np.random.default_rng(0).standard_normal((6, 3, 28, 28)).astype(np.float32)
    feed = {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels}
    captured = {}
    hooks = [
        module.register_forward_hook(lambda _m, _a, out, name=name: captured.__setitem__(name, out.numpy()))
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.ReLU)
    ]
    with torch.no_grad():
        model(**{k: torch.from_numpy(v) for k, v in feed.items()})
    for hook in hooks:
        hook.remove()
    truth = {}  # tower -> (positives per unit, counted positions): the text tower on real tokens only
    for name, act in captured.items():
        keep = mask.astype(bool) if name.startswith("text_model") else np.ones(act.shape[:2], bool)
        truth[name.split("_model")[0]] = ((act[keep] > 0).sum(0).tolist(), int(keep.sum()))
    assert truth["vision"][1] == 30 and truth["text"][1] == int(mask.sum()) < 30
    return model, feed, truth


class _ClipLogits(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.m = model

    def forward(self, input_ids, attention_mask, pixel_values):
        out = self.m(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values)
        return out.logits_per_image


def _by_tower(report_layers) -> dict:
    return {
        ("vision" if "vision" in layer["name"] else "text"): (
            layer["positive_counts"],
            layer["elements_per_unit"],
        )
        for layer in report_layers
    }


def test_an_image_tower_is_not_counted_with_the_token_mask(cli, tmp_path):
    """CLIP's vision tower runs on 5 positions (4 patches + CLS); with 5 tokens per text, the text's
    attention_mask was applied to the image positions too (25 values per unit counted instead of 30, no
    note) in every format and in watch(). Truth: hooks, the text tower on the real tokens only."""
    import warnings

    from deadrelu_cli import watch

    model, feed, truth = _clip(tmp_path)
    data = save_npz(tmp_path / "clip.npz", **feed)
    wrapper = _ClipLogits(model).eval()
    args = tuple(torch.from_numpy(feed[k]) for k in ("input_ids", "attention_mask", "pixel_values"))
    batch = torch.export.Dim("batch")
    torch.export.save(
        torch.export.export(wrapper, args, dynamic_shapes=({0: batch}, {0: batch}, {0: batch})),
        tmp_path / "clip.pt2",
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.trace(wrapper, args, check_trace=False).save(tmp_path / "clip.ts")
        torch.onnx.export(
            wrapper, args, tmp_path / "clip.onnx", input_names=["input_ids", "attention_mask", "pixel_values"],
            dynamic_axes={name: {0: "batch"} for name in ("input_ids", "attention_mask", "pixel_values")},
            opset_version=17, dynamo=False,
        )  # fmt: skip
    for target in ("clip", "clip.pt2", "clip.ts", "clip.onnx"):
        result = cli("scan", tmp_path / target, "--data", data, "--json", "-")
        assert result.code == 0, result.err
        assert _by_tower(result.json()["layers"]) == truth, target

    with watch(model, every=1, window=1, count_evaluation=True) as w:
        w.step(0)
        with torch.no_grad():
            model(**{k: torch.from_numpy(v) for k, v in feed.items()})
        w.end_step()
    layers = [{"name": layer.name, "positive_counts": list(map(int, layer.positive_counts)),
               "elements_per_unit": layer.elements_per_unit} for layer in w.last.layers]  # fmt: skip
    assert _by_tower(layers) == truth


def test_hyper_parameters_of_unknown_classes_do_not_keep_the_weights_out(cli, tmp_path):
    """pesto-pitch's `mir-1k_g7.ckpt` (a Lightning checkpoint) holds omegaconf configs beside its
    state_dict: the scan refused it ("refused to unpickle … --trust-pickle"), though the weights need none
    of that code. Now the weights are read with those objects as inert placeholders (their module is never
    imported) and a note says so; `fix`, which would write them back, refuses in one line."""
    import subprocess
    import sys

    conf = tmp_path / "conf"
    conf.mkdir()
    (conf / "hparams_conf44.py").write_text(
        "class Conf:\n    def __init__(self, **kw):\n        self.__dict__.update(kw)\n"
    )
    module, spec = arch_file(tmp_path / "mlp.py", "import torch\nfrom torch import nn\n\n\n"
                             "def build():\n    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))\n")  # fmt: skip
    with torch.no_grad():
        module[0].bias[:3] = -50.0
    saver = (  # saved by another process, where the hyper-parameters' module is importable
        "import argparse, sys, torch; sys.path.insert(0, sys.argv[1]); import hparams_conf44; "
        "torch.save({'epoch': 3, 'state_dict': torch.load(sys.argv[2]), 'hyper_parameters': "
        "{'cfg': hparams_conf44.Conf(width=8), 'args': argparse.Namespace(lr=0.1)}}, sys.argv[3])"
    )
    torch.save(module.state_dict(), tmp_path / "sd.pt")
    subprocess.run([sys.executable, "-c", saver, conf, tmp_path / "sd.pt", tmp_path / "run.ckpt"], check=True)
    x = np.random.default_rng(0).standard_normal((16, 4)).astype(np.float32)
    data = save_npz(tmp_path / "x.npz", x=x)
    with torch.no_grad():
        truth = (module[1](module[0](torch.from_numpy(x))) > 0).sum(0).tolist()
    result = cli("scan", tmp_path / "run.ckpt", "--arch", spec, "--data", data, "--json", "-")
    assert result.code == 0, result.err
    (layer,) = result.json()["layers"]
    assert layer["positive_counts"] == truth and truth[:3] == [0, 0, 0]
    (note,) = [n for n in result.json()["notes"] if "does not unpickle" in n]
    assert "hparams_conf44.Conf" in note and "argparse.Namespace" in note
    assert "hparams_conf44" not in sys.modules
    fixed = cli("fix", tmp_path / "run.ckpt", "--arch", spec, "--data", data, "--strategy", "reinit",
                "--output", tmp_path / "fixed.ckpt")  # fmt: skip
    assert fixed.code == 2 and fixed.err.count("\n") == 1 and "--trust-pickle" in fixed.err, fixed.err
    assert not (tmp_path / "fixed.ckpt").exists()
    # a whole model pickled from the user's classes holds its weights inside such objects: still refused
    (conf / "net_conf44.py").write_text(
        "import torch\nfrom torch import nn\n\n\nclass Net(nn.Module):\n    def __init__(self):\n"
        "        super().__init__()\n        self.w = nn.Parameter(torch.ones(4, 4))\n"
    )
    pickler = "import sys, torch; sys.path.insert(0, sys.argv[1]); import net_conf44; torch.save(net_conf44.Net(), sys.argv[2])"
    subprocess.run([sys.executable, "-c", pickler, conf, tmp_path / "net.pt"], check=True)
    whole = cli("scan", tmp_path / "net.pt", "--arch", spec, "--data", data)
    assert whole.code == 2 and "refused to unpickle" in whole.err and "--trust-pickle" in whole.err, whole.err


def test_perceiver_latents_as_many_as_tokens_count_every_position(cli, tmp_path):
    """Perceiver's encoder runs on its learned latents; with as many latents as tokens, the token mask was
    applied to them (28 values per unit counted instead of 36, no note), in scan and watch(). Truth: hooks
    on the encoder's ReLUs, every latent position."""
    import transformers
    from hf_models import save_tokenizer, token_data

    from deadrelu_cli import watch

    torch.manual_seed(0)
    config = transformers.PerceiverConfig(
        num_latents=6, d_latents=16, d_model=16, num_blocks=1, num_self_attends_per_block=1,
        num_self_attention_heads=2, num_cross_attention_heads=2, vocab_size=32, max_position_embeddings=16,
        hidden_act="relu",
    )  # fmt: skip
    model = transformers.PerceiverForMaskedLM(config).eval()
    model.save_pretrained(tmp_path / "perceiver")
    save_tokenizer(tmp_path / "perceiver")
    ids, mask = token_data(samples=6, tokens=6)
    assert not mask.all()
    captured = {}
    hooks = [
        module.register_forward_hook(lambda _m, _a, out, name=name: captured.__setitem__(name, out.numpy()))
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.ReLU) and ".encoder." in name
    ]
    feed = {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask)}
    with torch.no_grad():
        model(**feed)
    for hook in hooks:
        hook.remove()
    truth = {
        name: ((act > 0).sum((0, 1)).tolist(), act.shape[0] * act.shape[1]) for name, act in captured.items()
    }
    assert len(truth) == 2 and all(n == 36 for _, n in truth.values())

    result = cli("scan", tmp_path / "perceiver", "--data", save_npz(tmp_path / "t.npz", input_ids=ids,
                 attention_mask=mask), "--json", "-")  # fmt: skip
    assert result.code == 0, result.err
    got = {
        layer["name"]: (layer["positive_counts"], layer["elements_per_unit"])
        for layer in result.json()["layers"]
    }
    assert {name: got[name] for name in truth} == truth

    with watch(model, every=1, window=1, count_evaluation=True) as w:
        w.step(0)
        with torch.no_grad():
            model(**feed)
        w.end_step()
    watched = {
        layer.name: (list(map(int, layer.positive_counts)), layer.elements_per_unit)
        for layer in w.last.layers
    }
    assert {name: watched[name] for name in truth} == truth


class _AttentionByHand(torch.nn.Module):
    """batdetect2's SelfAttention: `torch.matmul(x, self.key_fun.weight.T)`, and `.mT` / `.mH` alike."""

    def __init__(self):
        super().__init__()
        self.key, self.out = torch.nn.Linear(4, 6), torch.nn.Linear(6, 2)

    def forward(self, x):
        h = torch.matmul(x, self.key.weight.T) + self.key.bias
        h = torch.relu(h @ self.key.weight.mT.mH @ self.key.weight.T)
        return self.out(h)


def test_a_transpose_written_dot_T_loads_without_trust_pickle(cli, tmp_path):
    """`.T` is aten::numpy_T in TorchScript and .pt2: batdetect2's exports were refused ("would run
    aten::numpy_T … not pure tensor math", pass --trust-pickle). Truth: the ReLU's input in plain torch."""
    torch.manual_seed(0)
    model = _AttentionByHand().eval()
    x = torch.randn(12, 4)
    with torch.no_grad():
        h = torch.matmul(x, model.key.weight.T) + model.key.bias
        truth = ((h @ model.key.weight @ model.key.weight.T) > 0).sum(0).tolist()
    torch.jit.trace(model, (x[:2],)).save(tmp_path / "m.ts")
    program = torch.export.export(model, (x[:2],), dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(program, tmp_path / "m.pt2")
    data = save_npz(tmp_path / "x.npz", x=x.numpy())
    for target in ("m.ts", "m.pt2"):
        result = cli("scan", tmp_path / target, "--data", data, "--json", "-")
        assert result.code == 0, (target, result.err)
        (layer,) = result.json()["layers"]
        assert layer["positive_counts"] == truth, target


def _spectral_onnx(path, rng):
    """x [N, 8] -> reflect Pad -> constant Pad -> Slice -> |x| as Sqrt(x * x), Log(x*x + 1), Exp(x),
    Pow(x, 2) -> Concat -> constant @ x (a DFT-like basis on the left) -> + bias -> Relu: swift-f0's
    front end in small, each op one its certification stopped at."""
    basis = rng.standard_normal((5, 48)).astype(np.float32) * 0.3
    bias = np.array([-1000.0, 0.5, -0.5, 0.0, -2.0], np.float32)
    const = {
        "reflect_pads": np.array([0, 2, 0, 2], np.int64), "fill_pads": np.array([0, 1, 0, 1], np.int64),
        "fill": np.array(0.5, np.float32), "starts": np.array([1], np.int64), "ends": np.array([13], np.int64),
        "axes": np.array([1], np.int64), "one": np.array(1.0, np.float32), "two": np.array(2.0, np.float32),
        "unsq": np.array([2], np.int64), "basis": basis, "bias": bias,
    }  # fmt: skip
    nodes = [
        helper.make_node("Pad", ["x", "reflect_pads"], ["a"], mode="reflect"),
        helper.make_node("Pad", ["a", "fill_pads", "fill"], ["b"], mode="constant"),
        helper.make_node("Slice", ["b", "starts", "ends", "axes"], ["c"]),
        helper.make_node("Mul", ["c", "c"], ["sq"]),
        helper.make_node("Sqrt", ["sq"], ["e"]),
        helper.make_node("Add", ["sq", "one"], ["sq1"]),
        helper.make_node("Log", ["sq1"], ["g"]),
        helper.make_node("Exp", ["c"], ["h"]),
        helper.make_node("Pow", ["c", "two"], ["k"]),
        helper.make_node("Concat", ["e", "g", "h", "k"], ["cat"], axis=1),
        helper.make_node("Unsqueeze", ["cat", "unsq"], ["u"]),
        helper.make_node("MatMul", ["basis", "u"], ["m"]),
        helper.make_node("Squeeze", ["m", "unsq"], ["flat"]),
        helper.make_node("Add", ["flat", "bias"], ["pre"]),
        helper.make_node("Relu", ["pre"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5])],
        [numpy_helper.from_array(v, n) for n, v in const.items()],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def test_certify_bounds_pads_slices_squares_and_a_basis_on_the_left(cli, tmp_path):
    """swift-f0's ONNX model certified no layer ("unsupported op Pad", then Slice, a constant MatMul'd on
    the left, Sqrt of a square): every layer "n/c". Truth: onnxruntime on many points of the box (corners
    included): a certified unit never fires there, and each upper bound is at least the largest
    pre-activation seen; the unit planted with bias -1000 is certified."""
    import onnxruntime as ort

    rng = np.random.default_rng(0)
    model = _spectral_onnx(tmp_path / "s.onnx", rng)
    data = save_npz(tmp_path / "x.npz", x=rng.uniform(-1, 1, (8, 8)).astype(np.float32))
    result = cli("scan", model, "--data", data, "--input-range", "-1", "1", "--json", "-")
    assert result.code == 0, result.err
    (layer,) = result.json()["layers"]
    assert layer["certified_dead_indices"] is not None, layer.get("certify_note")
    points = rng.uniform(-1, 1, (4000, 8)).astype(np.float32)
    points[:1000] = np.where(rng.random((1000, 8)) < 0.5, -1.0, 1.0)
    exposed = onnx.load(str(model))
    exposed.graph.output.append(helper.make_tensor_value_info("pre", TensorProto.FLOAT, None))
    session = ort.InferenceSession(exposed.SerializeToString(), providers=["CPUExecutionProvider"])
    (pre,) = session.run(["pre"], {"x": points})
    assert 0 in layer["certified_dead_indices"]
    assert not (pre[:, layer["certified_dead_indices"]] > 0).any()
    assert (np.asarray(layer["upper_bound"]) >= pre.max(0) - 1e-4).all()
