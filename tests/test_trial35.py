"""trial35: the same numbers from every way of giving deadrelu the same model, against numpy truth.

Each test computes its truth independently (numpy comparisons in float64 of the values the model
computes, or plain torch forward hooks) and fails on the code before the fix it names."""

from __future__ import annotations

import numpy as np
import torch
from conftest import arch_file, save_npz
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from truth import capture, truth_of

# an identity Linear: each unit's pre-activation is exactly the input value, so the data sets them
IDENTITY = """
import torch
from torch import nn


class Identity(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.act = nn.ReLU()
        self.act6 = nn.ReLU6()

    def forward(self, x):
        h = self.fc(x)
        return self.act(h), self.act6(h * 1.0)


def build():
    model = Identity()
    with torch.no_grad():
        model.fc.weight.copy_(torch.eye(4))
        model.fc.bias.zero_()
    return model.eval()
"""


def _scan(cli, *args) -> dict:
    result = cli("scan", *args, "--json", "-", "-q")
    assert result.code == 0, result.err
    return result.json()


def _identity_files(tmp_path):
    model, spec = arch_file(tmp_path / "identity.py", IDENTITY)
    state = tmp_path / "id.pt"
    torch.save(model.state_dict(), state)
    example = torch.zeros(2, 4)
    batch = torch.export.Dim("batch", min=1, max=4096)
    pt2 = tmp_path / "id.pt2"
    torch.export.save(torch.export.export(model, (example,), dynamic_shapes=({0: batch},)), pt2)
    scripted = tmp_path / "id_ts.pt"
    torch.jit.script(model).save(scripted)
    onnx_path = tmp_path / "id.onnx"
    torch.onnx.export(
        model, (example,), onnx_path, dynamo=False, input_names=["x"], dynamic_axes={"x": {0: "b"}}
    )
    return model, {
        "state_dict": [state, "--arch", spec],
        "state_dict --compile": [state, "--arch", spec, "--compile"],
        "exported_program": [pt2],
        "torchscript": [scripted],
        "onnx": [onnx_path],
    }


def test_threshold_is_compared_exactly_in_every_format(cli, tmp_path):
    """A unit fires when its pre-activation exceeds --threshold. float32(0.1) = 0.10000000149 exceeds
    0.1, but `x > 0.1` on a float32 tensor (and an ONNX Greater with a float32 constant) rounds 0.1 to
    that same float32 first: the unit was dead while its max pre-activation, in the same report, was
    above the threshold. Every format, --compile, and fp16/bf16 (--dtype) must count as float64 math does."""
    _, formats = _identity_files(tmp_path)
    f32 = np.float32
    x = np.zeros((6, 4), np.float32)
    x[:, 0] = f32(0.1)  # above 0.1 (rounds up)
    x[:3, 1] = f32(0.3)  # above 0.3 (rounds up)
    x[:, 2] = np.nextafter(f32(0.1), f32(0))  # below 0.1
    x[:2, 3] = -f32(0.1)  # below -0.1 (rounds to a larger magnitude)
    x[2:4, 3] = np.nextafter(-f32(0.1), f32(0))  # above -0.1
    data = save_npz(tmp_path / "x.npz", x=x)
    for threshold in (0.1, 0.3, -0.1):
        truth = (x.astype(np.float64) > threshold).sum(axis=0).tolist()
        assert any(truth), threshold
        for what, args in formats.items():
            report = _scan(cli, *args, "--data", data, "--threshold", threshold, "--batch-size", "4")
            for layer in report["layers"]:
                where = (threshold, what, layer["name"])
                assert layer["positive_counts"] == truth, where
                assert layer["dead_indices"] == [i for i, n in enumerate(truth) if n == 0], where
                # the report agrees with itself: a unit fired exactly when its max exceeds the threshold
                fired = [m is not None and m > threshold for m in layer["max_preactivation"]]
                assert fired == [n > 0 for n in layer["positive_counts"]], where
    # in half precision the model computes with the data rounded to fp16 / bf16: the truth counts those
    state = formats["state_dict"]
    for flag, dtype in (("fp16", torch.float16), ("bf16", torch.bfloat16)):
        values = torch.from_numpy(x).to(dtype).double().numpy()
        for threshold in (0.1, 0.3, -0.1):
            truth = (values > threshold).sum(axis=0).tolist()
            report = _scan(cli, *state, "--data", data, "--threshold", threshold, "--dtype", flag)
            for layer in report["layers"]:
                assert layer["positive_counts"] == truth, (flag, threshold, layer["name"])


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    threshold=st.floats(-4, 4, allow_nan=False, width=64),
    dtype=st.sampled_from(["float32", "float64", "float16"]),
)
def test_threshold_property_any_value_and_data_dtype(cli, tmp_path_factory, threshold, dtype):
    """Any threshold, data around it (its nearest float32 and that value's neighbours, so one sits on
    the rounding): counts equal numpy's float64 comparison of the values the model sees (float32)."""
    tmp_path = tmp_path_factory.mktemp("thr")
    model, spec = arch_file(tmp_path / "identity.py", IDENTITY)
    state = tmp_path / "id.pt"
    torch.save(model.state_dict(), state)
    near = np.float32(threshold)
    column = np.array(
        [np.nextafter(near, np.float32(-np.inf)), near, np.nextafter(near, np.float32(np.inf))], np.float32
    )
    x = np.stack([column, column[::-1], column, np.zeros(3, np.float32)], axis=1).astype(dtype)
    data = save_npz(tmp_path / "x.npz", x=x)
    seen = x.astype(np.float32).astype(np.float64)  # the model's input dtype
    truth = (seen > threshold).sum(axis=0).tolist()
    for extra in ([], ["--compile"]):
        report = _scan(cli, state, "--arch", spec, "--data", data, "--threshold", repr(threshold), *extra)
        for layer in report["layers"]:
            assert layer["positive_counts"] == truth, (threshold, dtype, extra, layer["name"])


CONV = """
import torch
from torch import nn
import torch.nn.functional as F


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.act = nn.ReLU(inplace=True)
        self.dw = nn.Conv2d(6, 6, 3, padding=1, groups=6)
        self.act6 = nn.ReLU6()

    def forward(self, x):
        y = self.act(self.bn(self.conv(x)))
        return F.relu(self.act6(self.dw(y) * 3) + y).mean((2, 3))


def build():
    torch.manual_seed(0)
    model = Net()
    with torch.no_grad():
        model.bn.bias[:2] = -20.0
        model.dw.bias[3] = 40.0
        model.dw.bias[4] = -40.0
    return model.eval()
"""


def test_compile_takes_data_named_after_forwards_argument(cli, tmp_path):
    """Data arrays named after forward()'s arguments go to forward() by name. With --compile the graph
    was exported with positional inputs and then called with none ('Trying to flatten user inputs'):
    exit 2 for the same data a plain scan reads. Now both equal plain-torch hooks."""
    model, spec = arch_file(tmp_path / "conv.py", CONV)
    state = tmp_path / "conv.pt"
    torch.save(model.state_dict(), state)
    x = torch.randn(11, 3, 5, 5)
    data = save_npz(tmp_path / "named.npz", x=x.numpy())  # `x`: forward's argument
    sites = capture(model, [x], producers={})
    # the functional relu reads act6's output plus y: recomputed here from the captured tensors
    y = torch.from_numpy(sites["act"].post).float()
    post6 = torch.from_numpy(sites["act6"].post).float()
    sites["relu()"] = type(sites["act"])(
        "relu", (post6 + y).double().numpy(), (post6 + y).relu().double().numpy()
    )
    truths = {name: truth_of(site, 1) for name, site in sites.items()}
    for extra in ([], ["--compile"], ["--compile", "--batch-size", "4"]):
        report = _scan(cli, state, "--arch", spec, "--data", data, *extra)
        assert [layer["name"] for layer in report["layers"]] == ["act", "act6", "relu()"], extra
        for layer in report["layers"]:
            t = truths[layer["name"]]
            assert layer["positive_counts"] == t.positive_counts.tolist(), (extra, layer["name"])
            assert layer["elements_per_unit"] == t.elements, (extra, layer["name"])
            assert layer["dead_indices"] == t.dead, (extra, layer["name"])
            np.testing.assert_allclose(layer["sum_abs"], t.sum_abs, rtol=1e-5, atol=1e-4)
            np.testing.assert_allclose(layer["max_preactivation"], t.max_pre, rtol=1e-5, atol=1e-5)
    assert truths["act"].dead == [0, 1] and truths["act6"].saturated == [3]


def test_bfloat16_safetensors_data_is_read_like_bfloat16_pt_data(cli, tmp_path):
    """CALIB may be .safetensors, and bf16 is that format's usual dtype; safetensors' numpy reader
    refuses it, so the scan stopped ("data type 'bf16' not understood") while the same tensor in a .pt
    was read. Now the values, widened exactly to float32, are counted as numpy counts them."""
    from safetensors.torch import save_file

    _, formats = _identity_files(tmp_path)
    torch.manual_seed(3)
    x = (torch.randn(9, 4) + torch.tensor([0.5, -0.5, -9.0, 0.0])).bfloat16()
    x[0, 3] = 0.1  # bf16(0.1) = 0.10009765625 > 0.1
    save_file({"x": x}, tmp_path / "x.safetensors")
    values = x.double().numpy()  # bf16 -> float64 is exact
    for what in ("state_dict", "onnx"):
        for threshold, limit in ((0.0, None), (0.1, 5)):
            seen = values if limit is None else values[:limit]
            extra = [] if limit is None else ["--limit", str(limit)]
            report = _scan(
                cli, *formats[what], "--data", tmp_path / "x.safetensors", "--threshold", threshold, *extra
            )
            assert report["data"]["samples"] == len(seen)
            for layer in report["layers"]:
                where = (what, threshold, layer["name"])
                assert layer["positive_counts"] == (seen > threshold).sum(axis=0).tolist(), where
                assert layer["max_preactivation"] == seen.max(axis=0).tolist(), where
                assert layer["dead_indices"] == [2], where
