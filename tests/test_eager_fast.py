"""The eager probe's fast paths (issue 22) count exactly what plain forward hooks see.

* relu counted slice by slice while it runs (CPU, large activations): the model's outputs are bit for
  bit those of the unprobed model, and counts / max / sums match numpy over the hooks' tensors;
* the one-pass torch.compile'd statistics (DEADRELU_FUSED_STATS; on CUDA in use, forced onto the CPU
  here): the same, for relu and relu6, rank 2 / 3 / 4 and channels_last, with NaN;
* a site that first runs in a later batch (data-dependent branch) gets the name, producer and counts
  the references give it.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import compiled_kernel
from torch import nn
from truth import capture, truth_of

from deadrelu_cli.probe import accumulator
from deadrelu_cli.probe.base import ProbeSettings
from deadrelu_cli.probe.eager import EagerProbe


@pytest.fixture(params=["compiled", "aten"])
def counting(request, monkeypatch):
    """The relu counted while it runs, both ways: by the compiled kernel (native.py; float32) and by ATen's
    kernels (where there is no compiler, and for the other float types)."""
    if request.param == "compiled":
        compiled_kernel()
    else:
        monkeypatch.setattr(accumulator, "relu_stats", lambda: None)
    return request.param


def _check(layers: dict, truths: dict, exact_sum: bool = False) -> None:
    assert set(layers) == set(truths)
    for name, truth in truths.items():
        layer = layers[name]
        np.testing.assert_array_equal(layer.positive_counts, truth.positive_counts, err_msg=name)
        assert layer.elements_per_unit == truth.elements, name
        np.testing.assert_array_equal(layer.max_preactivation, truth.max_pre, err_msg=name)
        if exact_sum:
            np.testing.assert_array_equal(layer.sum_abs, truth.sum_abs, err_msg=name)
        else:
            np.testing.assert_allclose(layer.sum_abs, truth.sum_abs, rtol=2e-5, err_msg=name)


class _Wide(nn.Module):
    """Activations of 4.7-9.4 MiB per batch (sliced), in place, out of place, functional, channels_last."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.ReLU(inplace=True)  # on the input itself: NaN, -0.0, subnormals reach it
        self.conv = nn.Conv2d(16, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.act = nn.ReLU()
        self.conv2 = nn.Conv2d(16, 8, 1)
        self.act2 = nn.ReLU(inplace=True)

    def forward(self, x):
        h = self.act(self.bn(self.conv(self.first(x))))
        return self.act2(self.conv2(h)).contiguous(memory_format=torch.channels_last)


def _wide_batches(channels_last: bool) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    out = []
    for i in range(2):
        x = torch.randn(16, 16, 96, 96, generator=gen) - 0.2
        x[:, 3] = -x[:, 3].abs() - 0.5  # unit 3 of the first site never fires
        x[:, 4] = -0.0 if i == 0 else 1e-45  # -0.0 never fires; a subnormal does (second batch only)
        if i == 1:
            x[2, 5, 7, 7] = float("nan")  # a NaN does not fire; it makes unit 5's max NaN
        out.append(x.contiguous(memory_format=torch.channels_last) if channels_last else x)
    return out


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_relu_counted_in_parts_matches_plain_hooks(channels_last, counting, monkeypatch):
    torch.manual_seed(0)
    model = _Wide().eval()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-0.5, 0.5)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=layout)
    batches = _wide_batches(channels_last)
    with torch.no_grad():
        plain = [model(x.clone()) for x in batches]
    truths = capture(model, [x.clone() for x in batches])
    truths = {name: truth_of(site, 1) for name, site in truths.items()}

    ran = []
    real = accumulator.SiteAccumulator.run_relu_in_parts

    def spy(self, pre, in_place, threshold):
        out = real(self, pre, in_place, threshold)
        ran.append((self.name, out is not None))
        return out

    monkeypatch.setattr(accumulator.SiteAccumulator, "run_relu_in_parts", spy)
    probe = EagerProbe(model, ProbeSettings())
    with probe.attached(), torch.inference_mode():
        outs = [probe.run((x.clone(),)) for x in batches]
    for got, want in zip(outs, plain, strict=True):
        # relu's output bit for bit (-0.0 kept as the op keeps it), NaN where the op gives NaN
        assert torch.equal(got.isnan(), want.isnan()) and got.stride() == want.stride()
        assert torch.equal(got.nan_to_num(0.0).view(torch.int32), want.nan_to_num(0.0).view(torch.int32))
    assert {name for name, used in ran if used} == {"first", "act", "act2"}  # the sliced path is what ran
    layers = {layer.name: layer for layer in probe.registry.layer_stats()}
    _check(layers, truths)
    assert np.isnan(layers["first"].max_preactivation[5])
    assert layers["first"].positive_counts[3] == 0 and layers["first"].positive_counts[4] == 16 * 96 * 96
    assert layers["act"].producer == "bn" and layers["act2"].producer == "conv2"


class _Mixed(nn.Module):
    """relu and relu6 at rank 2, 3 and 4 (and functional), for the fused statistics."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.act = nn.ReLU(inplace=True)
        self.conv1d = nn.Conv1d(6, 5, 1)
        self.act6 = nn.ReLU6()
        self.fc = nn.Linear(5 * 64, 7)
        self.out_act = nn.ReLU()

    def forward(self, x):
        h = self.act(self.conv(x))  # [N, 6, 8, 8]
        h = self.act6(self.conv1d(h.flatten(2)) * 3)  # [N, 5, 64], channel first
        return self.out_act(self.fc(h.flatten(1)))  # [N, 7]


@pytest.mark.slow
def test_fused_compiled_statistics_match_numpy():
    """The one-pass compiled reductions (as used on CUDA with DEADRELU_FUSED_STATS=cuda), run on the
    CPU: exact counts and max, saturation for relu6, NaN neither counted nor lost, channels_last."""
    torch.manual_seed(1)
    model = _Mixed().eval()
    gen = torch.Generator().manual_seed(2)
    batches = [torch.randn(4, 3, 8, 8, generator=gen) * 2 for _ in range(2)]
    batches[1][0, :, 2, 2] = float("nan")
    captured = capture(model, [x.clone() for x in batches])
    truths = {name: truth_of(site, 1) for name, site in captured.items()}
    post6 = np.moveaxis(captured["act6"].post, 1, -1).reshape(-1, 5)
    for layout in (torch.contiguous_format, torch.channels_last):
        probe = EagerProbe(model, ProbeSettings(fused_devices=("cpu",)))
        calls = []
        real = accumulator.fused_stats
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(
                accumulator,
                "fused_stats",
                lambda *a, calls=calls, real=real: calls.append(a[3].name) or real(*a),
            )
            with probe.attached(), torch.inference_mode():
                for x in batches:
                    probe.run((x.clone().contiguous(memory_format=layout),))
        assert sorted(set(calls)) == ["act", "act6", "out_act"] and len(calls) == 6
        layers = {layer.name: layer for layer in probe.registry.layer_stats()}
        _check(layers, truths)
        np.testing.assert_array_equal(layers["act6"].saturated_counts, (post6 >= 6).sum(0))
        assert layers["act6"].producer == "conv1d" and layers["act"].producer == "conv"
        assert np.isnan(layers["act"].max_preactivation).any()


class _Branchy(nn.Module):
    """A site that runs only for some batches (data-dependent), functional, behind its own Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 6)
        self.act = nn.ReLU()
        self.rare = nn.Linear(6, 5)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        h = self.act(self.fc(x))
        if x[0, 0] > 100:  # only the third batch takes this branch
            return F.relu(self.rare(h))
        return self.head(h)


@pytest.mark.parametrize("fused", [False, True], ids=["eager", "fused"])
def test_site_first_seen_in_a_later_batch(fused):
    torch.manual_seed(3)
    model = _Branchy().eval()
    gen = torch.Generator().manual_seed(4)
    batches = [torch.randn(5, 8, generator=gen) for _ in range(4)]
    batches[2][0, 0] = 1000.0
    rare_pre = []
    hook = model.rare.register_forward_hook(lambda m, a, out: rare_pre.append(out.detach().double().numpy()))
    truths = capture(model, batches)
    hook.remove()
    probe = EagerProbe(model, ProbeSettings(fused_devices=("cpu",) if fused else ()))
    with probe.attached(), torch.inference_mode():
        for x in batches:
            probe.run((x,))
    layers = {layer.name: layer for layer in probe.registry.layer_stats()}
    assert list(layers) == ["act", "relu()"]
    assert layers["relu()"].producer == "rare" and layers["act"].producer == "fc"
    assert layers["relu()"].module_type == "functional"
    pre = np.concatenate(rare_pre)
    np.testing.assert_array_equal(layers["relu()"].positive_counts, (pre > 0).sum(0))
    assert layers["relu()"].elements_per_unit == 5
    np.testing.assert_array_equal(layers["relu()"].max_preactivation, pre.max(0))
    np.testing.assert_allclose(layers["relu()"].sum_abs, np.maximum(pre, 0).sum(0), rtol=1e-5)
    _check({"act": layers["act"]}, {"act": truth_of(truths["act"], 1)})


def test_fused_devices_come_from_the_environment(monkeypatch):
    """DEADRELU_FUSED_STATS picks the devices of the one-pass statistics; unknown words are ignored."""
    monkeypatch.setenv("DEADRELU_FUSED_STATS", "cuda, cpu,tpu")
    assert ProbeSettings().fused_devices == ("cuda", "cpu")
    monkeypatch.delenv("DEADRELU_FUSED_STATS")
    assert ProbeSettings().fused_devices == ()


class _BranchyConv(nn.Module):
    """A large conv site (counted in slices) that runs only for the second batch."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, padding=1)
        self.rare = nn.Conv2d(8, 8, 1)

    def forward(self, x):
        h = F.relu(self.conv(x), inplace=True)
        if x[0, 0, 0, 0] > 100:
            h = F.relu(self.rare(h))
        return h.mean((2, 3))


def test_sliced_site_first_seen_in_a_later_batch(counting, monkeypatch):
    torch.manual_seed(5)
    model = _BranchyConv().eval()
    gen = torch.Generator().manual_seed(6)
    batches = [torch.randn(16, 4, 96, 96, generator=gen) for _ in range(3)]
    batches[1][0, 0, 0, 0] = 1000.0
    seen = {"conv": [], "rare": []}
    hooks = [
        getattr(model, n).register_forward_hook(
            lambda m, a, out, n=n: seen[n].append(out.double().numpy().copy())
        )
        for n in seen
    ]
    with torch.no_grad():
        for x in batches:
            model(x)
    for hook in hooks:
        hook.remove()
    used = []
    real = accumulator.SiteAccumulator.run_relu_in_parts
    monkeypatch.setattr(
        accumulator.SiteAccumulator,
        "run_relu_in_parts",
        lambda self, *a: used.append(self.name) or real(self, *a),
    )
    probe = EagerProbe(model, ProbeSettings())
    with probe.attached(), torch.inference_mode():
        for x in batches:
            probe.run((x,))
    layers = {layer.name: layer for layer in probe.registry.layer_stats()}
    assert list(layers) == ["relu()", "relu()#2"] and used.count("relu()#2") == 1
    for name, producer in (("relu()", "conv"), ("relu()#2", "rare")):
        pre = np.moveaxis(np.concatenate(seen[producer]), 1, -1).reshape(-1, 8)
        layer = layers[name]
        assert layer.producer == producer and layer.module_type == "functional"
        np.testing.assert_array_equal(layer.positive_counts, (pre > 0).sum(0), err_msg=name)
        assert layer.elements_per_unit == pre.shape[0]
        np.testing.assert_array_equal(layer.max_preactivation, pre.max(0))
        np.testing.assert_allclose(layer.sum_abs, np.maximum(pre, 0).sum(0), rtol=1e-5)


@pytest.mark.parametrize(
    ("shape", "dtype", "in_place"),
    [
        ((20, 2, 2**15 - 1), "float32", True),  # rows of 2**15 - 1: the count's int16 sums at their limit
        ((5, 2, 2**17), "float32", False),  # rows of 2**17: int32 sums
        ((40_000, 32), "float32", False),  # [rows, units], 16384 rows per slice: int16
        ((70_000, 16), "float32", True),  # [rows, units], 32768 rows per slice: int32
        ((24, 3, 120, 120, 3), "float16", True),  # rank 5; sums of halves (they overflowed to inf before)
        ((24, 3, 120, 120, 3), "bfloat16", False),
        ((3, 3, 60, 60, 20), "float64", True),
    ],
)
def test_relu_in_parts_counts_at_the_edges_of_its_sums(shape, dtype, in_place, counting):
    """run_relu_in_parts on rows whose counts reach the limit of the narrow sums it uses, every float
    width, a NaN and a dead unit, two batches: counts, max and sums against numpy in float64, and the
    output bit for bit torch.relu's."""
    torch_dtype, channel_dim = getattr(torch, dtype), 1
    gen = torch.Generator().manual_seed(5)
    batches = []
    for i in range(2):
        x = (torch.rand(*shape, generator=gen) + 0.01).to(torch_dtype)  # every element fires...
        x.select(channel_dim, 0).neg_()  # ...but unit 0's, which never does
        if i == 1:
            x.view(-1)[7 * shape[-1] + 3] = float("nan")
        batches.append(x)
    pre = np.concatenate(
        [np.moveaxis(x.double().numpy(), channel_dim, -1).reshape(-1, shape[channel_dim]) for x in batches]
    )  # before the in-place runs overwrite the batches
    acc = accumulator.SiteAccumulator("site", "relu", channel_dim)
    for x in batches:
        want = torch.relu(x)
        got = acc.run_relu_in_parts(x if in_place else x.clone(), in_place, 0.0)
        assert got is not None  # the sliced path is the one tested
        assert torch.equal(got.isnan(), want.isnan())
        assert torch.equal(got.nan_to_num(0.0), want.nan_to_num(0.0))
    with np.errstate(invalid="ignore"):
        np.testing.assert_array_equal(acc.positive.numpy(), (pre > 0).sum(0))
    assert acc.positive[0] == 0 and acc.positive[1] == pre.shape[0] - (np.isnan(pre[:, 1]).sum())
    np.testing.assert_array_equal(acc.max_pre.numpy(), np.max(pre, 0))  # NaN where a NaN was seen
    finite = np.where(np.isnan(pre), 0.0, np.maximum(pre, 0.0))
    want_sum = np.where(np.isnan(pre).any(0), np.nan, finite.sum(0))
    np.testing.assert_allclose(acc.sum_abs.numpy(), want_sum, rtol=2e-3 if dtype != "float64" else 1e-12)
    assert acc.elements_per_unit == pre.shape[0]


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize(
    ("shape", "channel_dim", "op"),
    [
        ((4, 2, 200, 200), 1, "relu"),  # [N, C, H, W], one batch, not sliced
        ((64, 3, 150, 150), 1, "relu"),  # sliced (observe_post's parts)
        ((3, 40_000, 2), 2, "relu"),  # [B, T, F]: the rows path
        ((4, 2, 200, 200), 1, "elu"),  # Σ|y| of a signed activation
    ],
)
def test_half_precision_sums_do_not_round_or_overflow(dtype, shape, channel_dim, op):
    """A unit's sum over one batch of float16/bfloat16 activations is taken in float32: in the tensor's own
    dtype it overflowed float16 at 65504 (inf in the report) and rounded bfloat16 to 8 bits. Checked
    against numpy in float64 over the same half values."""
    gen = torch.Generator().manual_seed(9)
    pre = (torch.rand(*shape, generator=gen) * 2 + 0.5).to(getattr(torch, dtype))
    post = pre.relu() if op == "relu" else F.elu(pre.float()).to(pre.dtype)
    acc = accumulator.SiteAccumulator("site", op, channel_dim)
    acc.observe_pre(pre, 0.0)
    acc.observe_post(post, 0.0)
    values = np.abs(np.moveaxis(post.double().numpy(), channel_dim, -1).reshape(-1, shape[channel_dim]))
    assert values.sum(0).min() > 65504  # beyond float16's range: the old sums were inf
    np.testing.assert_allclose(acc.sum_abs.numpy(), values.sum(0), rtol=1e-5)


@pytest.mark.parametrize(
    ("shape", "dtype"),
    [
        ((400, 3, 1016), "float32"),  # 127 int64 words a row: each byte lane sums to its limit
        ((200, 3, 2032), "float32"),  # 254 words: two groups a row
        ((100, 4, 56, 56), "float32"),  # 3136 = 4 groups of 98 words
        ((2000, 3, 14, 14), "float32"),  # 196: int32 words
        ((25_000, 3, 4, 4), "float32"),  # 16: int16 words
        ((8000, 3, 7, 7), "float32"),  # 49: odd, byte sums widened as before
        ((400_000, 3), "float32"),  # [rows, units] of 3 bytes: byte sums widened as before
        ((100_003, 16), "float32"),  # [rows, units]: words added down groups of 127 rows, and a rest
        ((40_000, 64), "bfloat16"),
        ((50, 3, 120, 120), "bfloat16"),
        ((60, 3, 30, 30, 8), "float64"),
    ],
)
def test_relu_in_parts_once_every_unit_has_fired(shape, dtype, counting):
    """After every unit of a site has fired, run_relu_in_parts takes the max on the integer view of the
    input and finds NaNs by the sums; its counts sum the byte mask in words, lane by lane. Four batches:
    unit 1 never fires in the first (no switch yet), every unit fires in the second, unit 1 is all
    negative again in the third (its running max must stay) while unit 2 holds a negative NaN and unit 0
    a positive NaN, -0.0 and +inf; against numpy in float64, and the output bit for bit torch.relu's."""
    torch_dtype = getattr(torch, dtype)
    gen = torch.Generator().manual_seed(11)
    batches = []
    for i in range(4):
        x = torch.rand(*shape, generator=gen, dtype=torch.float64) + 0.01  # every element fires...
        if i in (0, 2):
            x.select(1, 1).neg_()  # ...but unit 1's, in the first and third batch
        if i == 2:
            rest = (0,) * (len(shape) - 2)
            x[(5, 2, *rest)] = -float("nan")
            for sample, value in zip((3, 4, 5, 6), ("nan", "-0.0", "inf", "-inf"), strict=True):
                x[(sample, 0, *rest)] = float(value)
        if i == 3:
            x = x - 0.5  # some of every unit fire, some not
        batches.append(x.to(torch_dtype))
    pre = np.concatenate([np.moveaxis(x.double().numpy(), 1, -1).reshape(-1, shape[1]) for x in batches])
    acc = accumulator.SiteAccumulator("site", "relu", 1)
    for i, x in enumerate(batches):
        want = torch.relu(x)
        got = acc.run_relu_in_parts(x.clone(), False, 0.0)
        assert got is not None  # the sliced path is the one tested
        assert torch.equal(got.isnan(), want.isnan())
        assert torch.equal(got.nan_to_num(0.0), want.nan_to_num(0.0))
        if i == 0:  # unit 1's max is still its (negative) pre-activation's
            np.testing.assert_array_equal(acc.max_pre.numpy(), np.max(pre[: len(pre) // 4], 0))
    with np.errstate(invalid="ignore"):
        np.testing.assert_array_equal(acc.positive.numpy(), (pre > 0).sum(0))
    got_max = acc.max_pre.numpy()
    np.testing.assert_array_equal(got_max, np.max(pre, 0))  # NaN for units 0 and 2
    assert np.isnan(got_max[[0, 2]]).all() and got_max[1] == pre[:, 1].max() > 0
    finite = np.where(np.isnan(pre), 0.0, np.maximum(pre, 0.0))
    want_sum = np.where(np.isnan(pre).any(0), np.nan, finite.sum(0))
    np.testing.assert_allclose(acc.sum_abs.numpy(), want_sum, rtol=2e-3 if dtype == "bfloat16" else 1e-5)
    assert acc.elements_per_unit == pre.shape[0]
