"""bias-shift through the ops people put between a producer and its ReLU (LayerNorm, a scale, a
residual add, an affine-free BatchNorm), and the graph probes' unit axis through transposes.

Truth is computed here with plain torch (forwards written out, files loaded with torch.load /
torch.export.load / torch.jit.load), never read from the tool's own output."""

from __future__ import annotations

import json

import numpy as np
import torch
import torch.nn.functional as F
from arch_sources import net_source, rebuild, samples
from arch_sources import setup as _setup
from conftest import counts_from_pre
from test_resume_fix import _check_optimizer, _dead_units, plain_checkpoint  # noqa: F401 (a fixture)


def _x(shape, n=64, seed=0):
    return samples(shape, n, seed)


def _fixed(spec: str, path) -> torch.nn.Module:
    model = rebuild(spec)
    model.load_state_dict(torch.load(path, weights_only=True))
    return model.eval()


def _changed(before: dict, after: dict) -> dict[str, list[int]]:
    """Per tensor, the flat indices whose values differ (bit for bit)."""
    out = {}
    for key, value in before.items():
        diff = (value != after[key]).reshape(-1).nonzero().reshape(-1).tolist()
        if diff:
            out[key] = diff
    return out


def _assert_shift_exact(pre_before, pre_after, units, n_rows, rate=0.01):
    """The shifted units fire on a few rows (about --target-rate), every other unit is bit-identical."""
    others = [u for u in range(pre_before.shape[-1]) if u not in units]
    assert torch.equal(pre_before[..., others], pre_after[..., others])
    fired = (pre_after[..., units].reshape(-1, len(units)) > 0).sum(0)
    assert (fired >= 1).all() and (fired <= 2 * rate * n_rows + 2).all(), fired
    assert (pre_before[..., units] <= 0).all()


LAYER_NORM = net_source(
    "self.fc1, self.norm, self.fc2 = nn.Linear(6, 8), nn.LayerNorm(8), nn.Linear(8, 3)",
    "return self.fc2(F.relu(self.norm(self.fc1(x))))",
    seed=9,
    plant="_plant(net.norm, [2, 5])",
)


def test_bias_shift_moves_the_layer_norm_beta(cli, tmp_path):
    """Linear -> LayerNorm -> ReLU: LayerNorm's beta is per unit and right before the activation, so
    bias-shift moves it (state_dict and .pt2): the dead units fire on about --target-rate of the data and
    nothing else changes, not the Linear's bias (shifting it would move every unit through the norm)."""
    x = _x((6,))
    model, spec, path, data = _setup(tmp_path, LAYER_NORM, x)
    xt = torch.from_numpy(x)
    out = tmp_path / "out.pt"
    result = cli("fix", path, "--arch", spec, "--data", data, "--strategy", "bias-shift", "--output", out)
    assert result.code == 0, result.err
    fixed = _fixed(spec, out)
    assert set(_changed(model.state_dict(), fixed.state_dict())) == {"norm.bias"}
    assert _changed(model.state_dict(), fixed.state_dict())["norm.bias"] == [2, 5]
    with torch.no_grad():
        _assert_shift_exact(model.norm(model.fc1(xt)), fixed.norm(fixed.fc1(xt)), [2, 5], len(x))

    program = torch.export.export(model, (xt[:4],), dynamic_shapes=({0: torch.export.Dim("b")},))
    torch.export.save(program, tmp_path / "model.pt2")
    out2 = tmp_path / "out.pt2"
    result = cli("fix", tmp_path / "model.pt2", "--data", data, "--strategy", "bias-shift", "--output", out2)
    assert result.code == 0, result.err
    state = torch.export.load(str(out2)).state_dict
    assert _changed(model.state_dict(), dict(state)) == {"norm.bias": [2, 5]}


SCALED = net_source(
    [
        "self.fc1, self.fc2 = nn.Linear(6, 8), nn.Linear(8, 3)",
        "self.scale = nn.Parameter(torch.tensor([4.0, -2.0, 0.5, -0.25, 3.0, 1.0, -1.0, 2.0]))",
    ],
    "return self.fc2(F.relu(self.scale * (self.fc1(x) * 4.0) + x.sum(-1, keepdim=True)))",
    seed=10,
    plant=[
        "with torch.no_grad():  # dead whatever the sign of the scale: a big bias against it",
        "    net.fc1.bias[[1, 3, 4]] = torch.tensor([50.0, 50.0, -50.0])",
    ],
)


def test_bias_shift_through_a_scale_divides_by_the_gain(cli, tmp_path):
    """`relu(scale * (fc1(x) * 4) + residual)` with a learned per-unit scale, some entries negative: the
    Linear's bias moves by shift / gain (sign included), so the units fire on about --target-rate of
    the data; only those bias entries change and the other units' pre-activations are bit-identical."""
    x = _x((6,))
    model, spec, path, data = _setup(tmp_path, SCALED, x)
    xt = torch.from_numpy(x)
    out = tmp_path / "out.pt"
    result = cli("fix", path, "--arch", spec, "--data", data, "--strategy", "bias-shift", "--output", out)
    assert result.code == 0, result.out + result.err
    fixed = _fixed(spec, out)
    assert _changed(model.state_dict(), fixed.state_dict()) == {"fc1.bias": [1, 3, 4]}

    def pre(net):
        return net.scale * (net.fc1(xt) * 4.0) + xt.sum(-1, keepdim=True)

    with torch.no_grad():
        _assert_shift_exact(pre(model), pre(fixed), [1, 3, 4], len(x))

    # the same through a .pt2 (the graph's mul by the scale parameter and the add of the residual)
    program = torch.export.export(model, (xt[:4],), dynamic_shapes=({0: torch.export.Dim("b")},))
    torch.export.save(program, tmp_path / "model.pt2")
    out2 = tmp_path / "out.pt2"
    result = cli("fix", tmp_path / "model.pt2", "--data", data, "--strategy", "bias-shift", "--output", out2)
    assert result.code == 0, result.out + result.err
    state = dict(torch.export.load(str(out2)).state_dict)
    assert _changed(model.state_dict(), state) == {"fc1.bias": [1, 3, 4]}
    fixed.load_state_dict(state)
    with torch.no_grad():
        _assert_shift_exact(pre(model), pre(fixed), [1, 3, 4], len(x))


AFFINE_FREE_BN = net_source(
    [
        "self.conv, self.bn = nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4, affine=False)",
        "self.head = nn.Linear(4 * 5 * 5, 3)",
    ],
    "return self.head(torch.flatten(F.relu(self.bn(self.conv(x))), 1))",
    seed=11,
    plant=[
        "with torch.no_grad():",
        "    net.bn.running_mean[[0, 2]] = 50.0",
        "    net.bn.running_var.fill_(2.0)",
    ],
)


def test_bias_shift_moves_an_affine_free_batch_norm_mean(cli, tmp_path):
    """Conv -> BatchNorm(affine=False) -> ReLU has no beta: the running mean is the per-unit offset
    (gain -1/sqrt(var + eps)); bias-shift moves it, so the units fire again, nothing else changes."""
    x = _x((2, 5, 5), n=16)
    model, spec, path, data = _setup(tmp_path, AFFINE_FREE_BN, x)
    xt = torch.from_numpy(x)
    out = tmp_path / "out.pt"
    result = cli("fix", path, "--arch", spec, "--data", data, "--strategy", "bias-shift", "--output", out)
    assert result.code == 0, result.out + result.err
    fixed = _fixed(spec, out)
    assert _changed(model.state_dict(), fixed.state_dict()) == {"bn.running_mean": [0, 2]}
    with torch.no_grad():
        before, after = model.bn(model.conv(xt)), fixed.bn(fixed.conv(xt))
        _assert_shift_exact(before.movedim(1, -1), after.movedim(1, -1), [0, 2], len(x) * 25)


MIXED = net_source(
    "self.fc1, self.fc2 = nn.Linear(6, 8), nn.Linear(8, 3)",
    ["h = self.fc1(x)", "return self.fc2(F.relu(h * h.abs().mean(-1, keepdim=True)))"],
    seed=12,
    plant="_plant(net.fc1, [1, 3])",
)


def test_bias_shift_through_a_data_dependent_op_is_refused(cli, tmp_path):
    """`relu(h * mean|h|)`: a move of the bias does not move the pre-activation by a constant (and moves
    the other units): refused in the report's action, nothing claimed."""
    x = _x((6,))
    _, spec, path, data = _setup(tmp_path, MIXED, x)
    out = tmp_path / "out.pt"
    result = cli("fix", path, "--arch", spec, "--data", data, "-s", "bias-shift", "-o", out)
    assert result.code == 2 and not out.exists()
    assert "skipped: moving fc1.bias moves other units of the site too" in result.err, result.err


LAYOUT = net_source(
    [
        "self.conv = nn.Conv1d(3, 6, 3, padding=1)",
        "self.norm = nn.LayerNorm(6)",
        "self.fc = nn.Linear(6, 5)",
        "self.out = nn.Linear(5, 2)",
    ],
    [
        "# x: [B, 3, T]",
        "h = self.norm(self.conv(x).transpose(1, 2)).transpose(1, 2)  # [B, 6, T], channels are units",
        "a = torch.relu(h)",
        "b = torch.relu(self.fc(a.permute(0, 2, 1)).permute(0, 2, 1))  # [B, 5, T]",
        "return self.out(b.mean(-1))",
    ],
    seed=13,
)


def test_graph_probes_follow_the_unit_axis_through_transposes(cli, tmp_path):
    """Conv1d -> transpose -> LayerNorm -> transpose -> ReLU and Linear -> permute -> ReLU on [B, C, T]:
    the .pt2 and TorchScript (scripted and traced) scans report the per-unit counts of the channels,
    as the eager scan and hooks on the model do (they defaulted to the last axis, time)."""
    x = _x((3, 7), n=8)
    model, spec, path, data = _setup(tmp_path, LAYOUT, x)
    xt = torch.from_numpy(x)
    with torch.no_grad():
        h = model.norm(model.conv(xt).transpose(1, 2)).transpose(1, 2)
        g = model.fc(torch.relu(h).permute(0, 2, 1)).permute(0, 2, 1)
    truth = [counts_from_pre(h, 1)[0].tolist(), counts_from_pre(g, 1)[0].tolist()]
    program = torch.export.export(model, (xt[:2],), dynamic_shapes=({0: torch.export.Dim("b")},))
    torch.export.save(program, tmp_path / "model.pt2")
    torch.jit.script(model).save(tmp_path / "scripted.ts")
    torch.jit.trace(model, (xt[:2],)).save(tmp_path / "traced.ts")
    sources = {
        "eager": [path, "--arch", spec],
        "pt2": [tmp_path / "model.pt2"],
        "scripted": [tmp_path / "scripted.ts"],
        "traced": [tmp_path / "traced.ts"],
    }
    for label, source in sources.items():
        result = cli("scan", *source, "--data", data, "--json", "-")
        assert result.code in (0, 1), (label, result.err)
        counts = [layer["positive_counts"] for layer in json.loads(result.out)["layers"]]
        assert counts == truth, label


def test_bias_shift_resets_the_moments_of_the_moved_bias_entries(cli, tmp_path, plain_checkpoint):  # noqa: F811
    """bias-shift on a training checkpoint: like reinit/kick, the moments of exactly the entries it
    moved (the dead units' bias entries) are zero in the written optimizer state, every other optimizer
    entry byte-identical (they were kept as they were)."""
    path, spec, model, x, _ = plain_checkpoint
    before = torch.load(path, weights_only=True)
    dead = _dead_units(before["model"], x.numpy())
    out = tmp_path / "shifted.pt"
    result = cli("fix", path, "--arch", spec, "--data", tmp_path / "data.npz", "-s", "bias-shift", "-o", out)
    assert result.code == 0, result.err
    after = torch.load(out, weights_only=True)
    masks = {name: np.zeros(tuple(p.shape), bool) for name, p in model.named_parameters()}
    for site, producer in (("act1", "fc1"), ("act2", "fc2")):
        masks[f"{producer}.bias"][dead[site]] = True
    names = [n for n, _ in model.named_parameters()]
    assert _check_optimizer(before["optimizer"], after["optimizer"], names, masks) > 0


SEEDED = net_source(
    "self.fc1, self.fc2 = nn.Linear(6, 8), nn.Linear(8, 3)",
    "return self.fc2(F.relu(self.fc1(x)))",
    seed=0,
    plant="_plant(net.fc1, [1, 3])",
)


def test_reinit_with_seed_0_does_not_redraw_the_original_init_rows(cli, tmp_path):
    """A model built right after torch.manual_seed(0): reinit --seed 0 drew its rows from the same
    stream, so the 're-initialised' rows were the original ones. Now they are fresh (and within the
    default init's bound), and the same --seed gives the same rows again."""
    x = _x((6,))
    model, spec, path, data = _setup(tmp_path, SEEDED, x)
    rows = []
    for name in ("a.pt", "b.pt"):
        out = tmp_path / name
        result = cli("fix", path, "--arch", spec, "--data", data, "-s", "reinit", "--seed", "0", "-o", out)
        assert result.code == 0, result.err
        rows.append(_fixed(spec, out).fc1.weight.detach()[[1, 3]])
    original = model.fc1.weight.detach()[[1, 3]]
    assert not torch.isclose(rows[0], original).any()
    assert torch.equal(rows[0], rows[1]) and (rows[0].abs() <= 1 / 6**0.5).all()


TWICE = net_source(
    "self.fc1, self.fc3, self.fc2 = nn.Linear(6, 8), nn.Linear(6, 8), nn.Linear(8, 3)",
    "return self.fc2(F.relu(self.fc1(x))) + self.fc2(F.relu(self.fc3(x)))",
    seed=6,
    plant="_plant(net.fc1, [2])",
)


def test_pt2_consumer_applied_at_two_places_is_named_as_such(cli, tmp_path):
    """A .pt2 whose consumer Linear is one module applied to two sites: reinit/prune skip the layer
    (its input columns belong to both) and say that the module is applied at two places, not that its
    weight is "tied to another layer" (there is no other layer)."""
    x = _x((6,))
    model, _, _, data = _setup(tmp_path, TWICE, x)
    program = tmp_path / "model.pt2"
    xt = torch.from_numpy(x)
    torch.export.save(
        torch.export.export(model, (xt[:2],), dynamic_shapes=({0: torch.export.Dim("b")},)), program
    )
    for strategy in ("reinit", "prune"):
        out = tmp_path / f"{strategy}.pt2"
        result = cli("fix", program, "--data", data, "--strategy", strategy, "--output", out)
        assert result.code == 2 and not out.exists(), result.err
        assert "fc2 is applied at 2 places" in result.err and "tied" not in result.err, result.err


DEPTHWISE = net_source(
    [
        "self.pw1, self.bn1 = nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8)",
        "self.dw, self.bn2 = nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.BatchNorm2d(8)",
        "self.pw2, self.head = nn.Conv2d(8, 6, 1), nn.Linear(6, 3)",
        "self.act = nn.ReLU6()",
    ],
    [
        "h = self.act(self.bn1(self.pw1(x)))",
        "h = self.act(self.bn2(self.dw(h)))",
        "return self.head(F.relu(self.pw2(h)).mean((2, 3)))",
    ],
    seed=1,
    plant=["_plant(net.bn1, [1])", "_plant(net.bn2, [2, 5])", "_plant(net.pw2, [0])"],
)


def test_bias_shift_settles_layers_after_a_revived_one(cli, tmp_path):
    """Depthwise-separable block with ReLU6: reviving bn1's unit 1 changes what the depthwise conv feeds
    bn2's unit 1 (dead only because its one input channel was), so the shift computed on the original
    model made it fire on 3.6% instead of 1% and the fix failed verification. The fix now rescans and
    moves again the units that do not fire on their target count; every shifted unit fires on about
    --target-rate of the values (own forward), only the BatchNorm betas / conv bias entries changed."""
    x = _x((3, 6, 6), n=32)
    model, spec, path, data = _setup(tmp_path, DEPTHWISE, x)
    xt = torch.from_numpy(x)
    out = tmp_path / "out.pt"
    result = cli("fix", path, "--arch", spec, "--data", data, "--strategy", "bias-shift", "--output", out)
    assert result.code == 0, result.out + result.err
    fixed = _fixed(spec, out)
    changed = _changed(model.state_dict(), fixed.state_dict())
    assert set(changed) == {"bn1.bias", "bn2.bias", "pw2.bias"} and changed["pw2.bias"] == [0]
    with torch.no_grad():
        pre1 = fixed.bn1(fixed.pw1(xt))
        pre2 = fixed.bn2(fixed.dw(F.relu6(pre1)))
        pre3 = fixed.pw2(F.relu6(pre2))
    for pre, units in ((pre1, changed["bn1.bias"]), (pre2, changed["bn2.bias"]), (pre3, [0])):
        fired = (pre.movedim(1, -1)[..., units].reshape(-1, len(units)) > 0).sum(0)
        n = pre.numel() // pre.shape[1]
        assert ((fired >= 1) & (fired <= 2 * 0.01 * n + 2)).all(), (units, fired, n)


def test_affine_free_batch_norm_is_a_producer_for_reinit(cli, tmp_path):
    """Conv -> BatchNorm(affine=False) -> ReLU: the BatchNorm (mean and variance per unit) makes the
    units as a BN with beta does, so reinit acts on the state_dict as on the .pt2 (it refused there):
    conv rows redrawn, the BN's mean/var reset to 0/1 at those units, the consumer's inputs zeroed;
    outputs equal (own forward)."""
    x = _x((2, 5, 5), n=16)
    model, spec, path, data = _setup(tmp_path, AFFINE_FREE_BN, x)
    out = tmp_path / "out.pt"
    result = cli("fix", path, "--arch", spec, "--data", data, "--strategy", "reinit", "--output", out)
    assert result.code == 0, result.out + result.err
    fixed = _fixed(spec, out)
    changed = _changed(model.state_dict(), fixed.state_dict())
    assert changed["bn.running_mean"] == [0, 2] and changed["bn.running_var"] == [0, 2]
    assert (fixed.bn.running_mean[[0, 2]] == 0).all() and (fixed.bn.running_var[[0, 2]] == 1).all()
    assert (fixed.head.weight.view(3, 4, 25)[:, [0, 2]] == 0).all()
    xt = torch.from_numpy(x)
    with torch.no_grad():
        torch.testing.assert_close(fixed(xt), model(xt), rtol=0, atol=1e-5)


TRANSPOSED_CONV = net_source(
    "self.up, self.c2 = nn.ConvTranspose2d(4, 6, 2, stride=2), nn.Conv2d(6, 2, 1)",
    "return self.c2(F.relu(self.up(x)))",
    seed=4,
    plant="_plant(net.up, [2])",
)


def test_bias_shift_of_a_transposed_convolution_in_a_pt2(cli, tmp_path):
    """A ConvTranspose's bias is per output channel, right before the ReLU: bias-shift moved it on the
    state_dict but refused the .pt2 ("no bias to shift"): the graph probe did not name the producer."""
    x = _x((4, 3, 3), n=16)
    model, _, _, data = _setup(tmp_path, TRANSPOSED_CONV, x)
    xt = torch.from_numpy(x)
    program = tmp_path / "model.pt2"
    torch.export.save(
        torch.export.export(model, (xt[:2],), dynamic_shapes=({0: torch.export.Dim("b")},)), program
    )
    out = tmp_path / "out.pt2"
    result = cli("fix", program, "--data", data, "--strategy", "bias-shift", "--output", out)
    assert result.code == 0, result.out + result.err
    state = dict(torch.export.load(str(out)).state_dict)
    assert _changed(model.state_dict(), state) == {"up.bias": [2]}
    with torch.no_grad():
        after = torch.nn.functional.conv_transpose2d(xt, state["up.weight"], state["up.bias"], stride=2)
        _assert_shift_exact(model.up(xt).movedim(1, -1), after.movedim(1, -1), [2], len(x) * 36)


GROUP_NORM = net_source(
    [
        "self.conv, self.norm = nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(2, 8)",
        "self.head = nn.Conv2d(8, 2, 1)",
    ],
    "return self.head(F.relu(self.norm(self.conv(x))))",
    seed=14,
    plant="_plant(net.norm, [1, 6])",
)


def test_bias_shift_moves_the_group_norm_beta(cli, tmp_path):
    """Conv -> GroupNorm -> ReLU: the GroupNorm's beta is per channel, after the normalisation: moved on
    the state_dict and the .pt2 alike; only those entries change, the other channels are bit-identical."""
    x = _x((3, 4, 4), n=16)
    model, spec, path, data = _setup(tmp_path, GROUP_NORM, x)
    xt = torch.from_numpy(x)
    program = tmp_path / "model.pt2"
    torch.export.save(
        torch.export.export(model, (xt[:2],), dynamic_shapes=({0: torch.export.Dim("b")},)), program
    )
    for source, out in (([path, "--arch", spec], tmp_path / "out.pt"), ([program], tmp_path / "out.pt2")):
        result = cli("fix", *source, "--data", data, "--strategy", "bias-shift", "--output", out)
        assert result.code == 0, result.out + result.err
        state = (
            torch.load(out, weights_only=True)
            if out.suffix == ".pt"
            else dict(torch.export.load(str(out)).state_dict)
        )
        assert _changed(model.state_dict(), state) == {"norm.bias": [1, 6]}
        fixed = _fixed(spec, tmp_path / "out.pt")
        fixed.load_state_dict(state)
        with torch.no_grad():
            before, after = model.norm(model.conv(xt)), fixed.norm(fixed.conv(xt))
        _assert_shift_exact(before.movedim(1, -1), after.movedim(1, -1), [1, 6], len(x) * 16)


GAP = net_source(
    "self.conv, self.head = nn.Conv2d(3, 6, 3, padding=1), nn.Linear(6, 2)",
    "return self.head(F.relu(self.conv(x)).mean((2, 3)))",
    seed=15,
    plant="_plant(net.conv, [0, 4])",
)


def test_global_average_pool_written_as_a_mean_leads_to_the_consumer(cli, tmp_path):
    """conv -> relu -> x.mean((2, 3)) -> Linear (a global average pool without a module): the mean over
    the spatial axes keeps each channel in its own slot, so the Linear is the consumer; reinit (state_dict
    and .pt2) and prune (.pt2) act on the layer (it was skipped: "its output goes to mean"); outputs equal."""
    x = _x((3, 4, 4), n=16)
    model, spec, path, data = _setup(tmp_path, GAP, x)
    xt = torch.from_numpy(x)
    program = tmp_path / "model.pt2"
    torch.export.save(
        torch.export.export(model, (xt[:2],), dynamic_shapes=({0: torch.export.Dim("b")},)), program
    )
    with torch.no_grad():
        expected = model(xt)
    runs = (
        ([path, "--arch", spec], "reinit", tmp_path / "r.pt"),
        ([program], "reinit", tmp_path / "r.pt2"),
        ([program], "prune", tmp_path / "p.pt2"),
    )
    for source, strategy, out in runs:
        result = cli("fix", *source, "--data", data, "--strategy", strategy, "--output", out)
        assert result.code == 0, (strategy, result.out + result.err)
        if out.suffix == ".pt":
            fixed = _fixed(spec, out)
            assert (fixed.head.weight[:, [0, 4]] == 0).all()
        else:
            fixed = torch.export.load(str(out)).module()
        with torch.no_grad():
            torch.testing.assert_close(fixed(xt), expected, rtol=0, atol=1e-5)
    state = dict(torch.export.load(str(tmp_path / "p.pt2")).state_dict)
    assert state["conv.weight"].shape[0] == 4 and state["head.weight"].shape == (2, 4)


def test_explain_names_a_layer_norm_beta_as_the_shift(cli, tmp_path):
    """--explain on Linear -> LayerNorm -> ReLU with two betas at -50: the LayerNorm is the producer, so
    the cause is its shift (the "batchnorm shift" rule: beta <= 0 and max pre - beta > 0, checked here
    with our own forward), not "unknown"."""
    x = _x((6,))
    model, spec, path, data = _setup(tmp_path, LAYER_NORM, x)
    with torch.no_grad():
        pre = model.norm(model.fc1(torch.from_numpy(x)))
    assert ((pre.max(0).values - model.norm.bias) > 0)[[2, 5]].all()
    result = cli("scan", path, "--arch", spec, "--data", data, "--explain", "--json", "-")
    assert result.code in (0, 1), result.err
    (layer,) = json.loads(result.out)["layers"]
    assert layer["producer"] == "norm"
    assert {int(k): v for k, v in layer["extra"]["causes"].items()} == {
        2: "batchnorm shift",
        5: "batchnorm shift",
    }


POSITIVE_INPUTS = net_source(
    "self.fc1, self.fc2 = nn.Linear(6, 12), nn.Linear(12, 3)",
    "return self.fc2(F.relu(self.fc1(x)))",
    seed=16,
    plant=["with torch.no_grad():", "    net.fc1.bias[:8] = -50.0"],
)


def test_reinit_revives_units_whose_inputs_are_all_positive(cli, tmp_path):
    """On inputs that are all > 0 (and alike), a fresh row with bias 0 fires on ~all or ~no samples: a
    coin flip per unit, so reinit used to leave about half of 8 dead units dead. A fresh row that never
    fires on the data is now negated (same init distribution): all 8 fire (own forward), outputs equal,
    in the state_dict and the .pt2 alike."""
    x = (5.0 + 0.1 * _x((6,))).astype(np.float32)
    model, spec, path, data = _setup(tmp_path, POSITIVE_INPUTS, x)
    xt = torch.from_numpy(x)
    program = tmp_path / "model.pt2"
    torch.export.save(
        torch.export.export(model, (xt[:2],), dynamic_shapes=({0: torch.export.Dim("b")},)), program
    )
    for source, out in (([path, "--arch", spec], tmp_path / "out.pt"), ([program], tmp_path / "out.pt2")):
        result = cli("fix", *source, "--data", data, "--strategy", "reinit", "--output", out)
        assert result.code == 0, result.out + result.err
        state = (
            torch.load(out, weights_only=True)
            if out.suffix == ".pt"
            else dict(torch.export.load(str(out)).state_dict)
        )
        fixed = _fixed(spec, tmp_path / "out.pt")
        fixed.load_state_dict(state)
        with torch.no_grad():
            assert ((fixed.fc1(xt)[:, :8] > 0).sum(0) > 0).all()
            torch.testing.assert_close(fixed(xt), model(xt), rtol=0, atol=1e-5)
        assert (fixed.fc1.weight[:8].abs() <= 1 / 6**0.5).all()
