"""The compiled counting kernel (deadrelu_cli/native.py, csrc/relu_stats.c), issue 22.

* its relu is bit for bit ATen's (-0.0 and NaN kept) and its max / count / sum per unit are numpy's in
  float64, for every way it reads a batch (long rows, short rows down their columns, units last), row
  counts and widths that leave vector and block remainders, one to five threads, in place and not;
* where it cannot be built (no compiler, a compiler that fails, an unwritable cache, DEADRELU_NATIVE=0)
  it says why and the probe counts with ATen's kernels instead (tests/test_eager_fast.py runs its tests
  both ways);
* a failed build leaves nothing behind, and a build is atomic; a damaged cached library is rebuilt, a
  cache that cannot be read falls back, a scan that stops early leaves no temporary, and $CC's own
  arguments cannot turn IEEE semantics off;
* what the kernel must not take (a forward-mode tangent, an in-place write ATen refuses) runs as the op.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from conftest import compiled_kernel
from torch import nn
from truth import capture

import deadrelu_cli
from deadrelu_cli import native
from deadrelu_cli.probe import accumulator
from deadrelu_cli.probe.base import ProbeSettings
from deadrelu_cli.probe.eager import EagerProbe


def _batch(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Mixed signs, a quarter above 6; unit 0 never fires, unit 1 always does; units 2 and the last get
    NaN (of either sign), -0.0, +inf, -inf, a subnormal and values at, above and just below 6."""
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(*shape, generator=gen) - 0.3) * 6
    x.select(1, 0).copy_(-x.select(1, 0).abs() - 1e-3)
    x.select(1, 1).copy_(x.select(1, 1).abs() + 1e-3)
    specials = torch.tensor(
        [float("nan"), -0.0, float("inf"), float("-inf"), 1e-45, 6.0, -float("nan"), 7.0, 5.9999995, -0.0]
    )
    for index in {2, x.shape[1] - 1}:  # the last unit: the kernels' remainder lanes and columns
        unit = x.select(1, index)
        values = unit.reshape(-1).clone()
        take = min(values.numel(), len(specials))
        values[:take] = specials[:take] if index == 2 else specials.flip(0)[:take]
        unit.copy_(values.view(unit.shape))
    return x


def _truth(batches: list[torch.Tensor], op: str) -> dict:
    """Per unit, in float64 over every sample and position: max of x, count of x > 0, sum of the op's
    output (NaN where a NaN was), count at the cap (relu6), and the elements per unit."""
    pre = np.concatenate([np.moveaxis(x.double().numpy(), 1, -1).reshape(-1, x.shape[1]) for x in batches])
    with np.errstate(invalid="ignore"):
        post = np.maximum(pre, 0.0) if op == "relu" else np.minimum(np.maximum(pre, 0.0), 6.0)
        truth = {"max": np.max(pre, 0), "count": (pre > 0).sum(0), "at_cap": (pre >= 6.0).sum(0)}
    with np.errstate(over="ignore"):  # +inf in the sums of relu's units 2 and last
        truth["sum"] = np.where(np.isnan(pre).any(0), np.nan, np.nan_to_num(post, nan=0.0).sum(0))
    truth["elements"] = pre.shape[0]
    return truth


ATEN = {"relu": torch.relu, "relu6": torch.nn.functional.relu6}

SHAPES = [  # [N, C, ...] as made; units_last: counted as x.movedim(1, -1) (units on the last axis)
    ((3, 5, 200), False),  # long rows of 200: 12 vectors and 8 left
    ((2, 3, 128), False),  # the shortest long row
    ((4, 37, 127), False),  # the longest short row: read down its columns
    ((67, 7, 7, 7), False),  # short rows, 67 samples: 16 blocks of 4 rows and 3 left
    ((1, 3, 2, 3), False),  # one sample
    ((131, 37), True),  # units last, 37 units (2 vectors and 5 left), 131 rows (2 blocks of 64 and 3)
    ((5, 2048, 40), True),  # [B, T, F]
]


@pytest.mark.parametrize(
    ("shape", "units_last"),
    SHAPES,
    ids=["x".join(map(str, s)) + ("-last" if last else "") for s, last in SHAPES],
)
@pytest.mark.parametrize("threads", [1, 2, 5])
@pytest.mark.parametrize("in_place", [False, True], ids=["out", "in_place"])
@pytest.mark.parametrize("op", ["relu", "relu6"])
def test_kernel_matches_numpy_and_atens_relu(shape, units_last, threads, in_place, op):
    kernel = compiled_kernel()
    units = shape[1]
    batches = [_batch(shape, seed) for seed in range(3)]
    truth = _truth(batches, op)
    maximum = torch.full((units,), -torch.inf, dtype=torch.float64)
    count, at_cap = torch.zeros(units, dtype=torch.int64), torch.zeros(units, dtype=torch.int64)
    total = torch.zeros(units, dtype=torch.float64)
    for x in batches:
        x = x.movedim(1, -1).contiguous() if units_last else x.contiguous()
        want = ATEN[op](x)
        out = x if in_place else torch.empty_like(x)
        if units_last:
            outer, length, columns = x.numel() // units, 1, True
        else:
            outer, length = x.shape[0], x[0, 0].numel()
            columns = length < accumulator.SHORT_ROW
        kernel.run(
            x.data_ptr(),
            out.data_ptr(),
            outer,
            units,
            length,
            columns,
            threads,
            maximum.data_ptr(),
            count.data_ptr(),
            total.data_ptr(),
            6.0 if op == "relu6" else None,
            at_cap.data_ptr() if op == "relu6" else None,
        )
        assert torch.equal(out.view(torch.int32), want.view(torch.int32))  # bit for bit, NaNs included
    np.testing.assert_array_equal(count.numpy(), truth["count"])
    assert count[0] == 0 and count[1] == truth["elements"]
    np.testing.assert_array_equal(maximum.numpy(), truth["max"])  # NaN where a NaN was
    np.testing.assert_allclose(total.numpy(), truth["sum"], rtol=1e-6)
    np.testing.assert_array_equal(at_cap.numpy(), truth["at_cap"] if op == "relu6" else 0)


@pytest.mark.parametrize(
    ("shape", "channels_last"),
    [((6, 5, 33, 33), False), ((6, 5, 33, 33), True), ((9, 512, 7, 7), False), ((9, 512, 7, 7), True)]
    + [((3, 70, 96), False), ((2, 3000, 50), False)],
    ids=["long", "long-channels_last", "short", "short-channels_last", "rank3", "short-many-columns"],
)
@pytest.mark.parametrize("op", ["relu", "relu6"])
def test_probe_counts_through_the_kernel(shape, channels_last, op, monkeypatch):
    """SiteAccumulator.run_relu_in_parts hands a batch of any size to the kernel (channels_last read as
    units last); two batches against numpy, and nothing else counted (the ATen slices never ran)."""
    compiled_kernel()
    monkeypatch.setattr(accumulator, "_count_relu_parts", None)  # the ATen path would fail if it ran
    monkeypatch.setattr(accumulator, "_count_relu_columns", None)
    batches = [_batch(shape, seed) for seed in (7, 8)]
    if channels_last:
        batches = [x.contiguous(memory_format=torch.channels_last) for x in batches]
    truth = _truth(batches, op)
    site = accumulator.SiteAccumulator("site", op, 1)
    for x in batches:
        want = ATEN[op](x)
        version = x._version
        got = site.run_relu_in_parts(x, True, 0.0)
        assert got is x and x._version > version  # in place, and its version counter says so
        assert torch.equal(got.view(torch.int32), want.view(torch.int32))
    np.testing.assert_array_equal(site.positive.numpy(), truth["count"])
    np.testing.assert_array_equal(site.max_pre.numpy(), truth["max"])
    np.testing.assert_allclose(site.sum_abs.numpy(), truth["sum"], rtol=1e-6)
    assert site.elements_per_unit == truth["elements"]
    if op == "relu6":
        np.testing.assert_array_equal(site.saturated.numpy(), truth["at_cap"])
    else:
        assert site.saturated is None


def test_relu6_without_the_kernel_runs_as_written(monkeypatch):
    """ATen's sliced counting runs a relu only: without the kernel a relu6 site is not taken over."""
    monkeypatch.setattr(accumulator, "relu_stats", lambda: None)
    site = accumulator.SiteAccumulator("site", "relu6", 1)
    assert site.run_relu_in_parts(_batch((64, 8, 40, 40), 1), False, 0.0) is None


def _fresh_load(monkeypatch, tmp_path, **env: str) -> tuple[native.ReluStats | None, str]:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(native, "_loaded", None)
    return native.relu_stats(), native.status()


@pytest.mark.parametrize("value", ["0", "false", "OFF", " no "])
def test_switched_off_by_the_environment(monkeypatch, tmp_path, value):
    kernel, why = _fresh_load(monkeypatch, tmp_path, DEADRELU_NATIVE=value)
    assert kernel is None and why == f"off (DEADRELU_NATIVE={value.strip()})"
    assert not (tmp_path / "cache").exists()  # nothing built
    monkeypatch.setattr(native, "_onnx_built", None)
    assert native.onnx_library() is None and native.onnx_status() == why


@pytest.mark.parametrize("value", ["1", "yes", ""])
def test_other_values_leave_it_on(monkeypatch, value):
    monkeypatch.setenv("DEADRELU_NATIVE", value)
    assert native.switched_off() is None


def test_no_compiler(monkeypatch, tmp_path):
    monkeypatch.delenv("CC", raising=False)
    kernel, why = _fresh_load(monkeypatch, tmp_path, PATH=str(tmp_path / "empty"))
    assert kernel is None and why.startswith("no C compiler")


def test_a_failed_build_says_why_and_leaves_nothing(monkeypatch, tmp_path):
    broken = tmp_path / "bin" / "cc"
    broken.parent.mkdir()
    broken.write_text("#!/bin/sh\necho 'cc: error: no such target' >&2\nexit 1\n")
    broken.chmod(0o755)
    kernel, why = _fresh_load(monkeypatch, tmp_path, CC=str(broken))
    assert kernel is None and why == f"{broken} could not build the kernel: cc: error: no such target"
    assert list((tmp_path / "cache" / "deadrelu" / "native").iterdir()) == []  # no partial library


def test_a_build_that_times_out_caches_no_one_thread_kernel(monkeypatch, tmp_path):
    """The OpenMP build timing out (a loaded machine) says so, counts with ATen's kernels for this process
    and caches nothing: a one-thread kernel built in its place would be loaded by every later scan."""
    slow = tmp_path / "bin" / "cc"
    slow.parent.mkdir()
    slow.write_text("#!/bin/sh\nsleep 5\n")
    slow.chmod(0o755)
    monkeypatch.setattr(native, "BUILD_SECONDS", 0.5)
    answering = native.compiler()  # this machine's own compiler, if any
    kernel, why = _fresh_load(monkeypatch, tmp_path, CC=str(slow))
    assert kernel is None and "timed out" in why and why.endswith("(tried again by the next scan)"), why
    assert list((tmp_path / "cache" / "deadrelu" / "native").iterdir()) == []
    if answering is not None:  # the next scan, with a compiler that answers in time, builds the kernel
        monkeypatch.setenv("CC", " ".join(answering))
        monkeypatch.setattr(native, "BUILD_SECONDS", 120)
        monkeypatch.setattr(native, "_loaded", None)
        assert native.relu_stats() is not None, native.status()
        built = [p.name for p in (tmp_path / "cache" / "deadrelu" / "native").iterdir()]
        assert len(built) == 1 and built[0].startswith("relu_stats-"), built


def test_an_unwritable_cache_says_so(monkeypatch, tmp_path):
    blocked = tmp_path / "cache"
    blocked.write_text("a file where the cache directory would be")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocked))
    monkeypatch.setattr(native, "_loaded", None)
    assert native.relu_stats() is None
    assert native.status().startswith(f"cannot write the kernel's cache {blocked / 'deadrelu' / 'native'}")


def test_built_once_into_the_cache_then_loaded(monkeypatch, tmp_path):
    if native.compiler() is None:
        pytest.skip("no C compiler on this machine")
    kernel, why = _fresh_load(monkeypatch, tmp_path)
    assert kernel is not None, why
    built = list((tmp_path / "cache" / "deadrelu" / "native").iterdir())
    assert built == [kernel.path] and why == f"loaded {kernel.path}"
    stamp = kernel.path.stat().st_mtime_ns
    monkeypatch.setattr(native, "_loaded", None)
    again = native.relu_stats()
    assert again is not None and again.path == kernel.path and kernel.path.stat().st_mtime_ns == stamp


class _Graphable(nn.Module):
    """relu in place on a conv map, relu6 on a short-row map, relu on a linear layer's units."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=3)
        self.act2 = nn.ReLU6()
        self.fc = nn.Linear(16 * 6 * 6, 24)
        self.act3 = nn.ReLU()

    def forward(self, x):
        h = self.act2(self.conv2(self.act1(self.conv1(x))))  # [N, 8, 18, 18], then [N, 16, 6, 6]
        return self.act3(self.fc(h.flatten(1)))


@pytest.mark.parametrize("kind", ["scripted", "traced", "exported_program"])
def test_graph_formats_count_through_the_kernel(kind, tmp_path, monkeypatch):
    """TorchScript and torch.export files run their CPU relus through the kernel too (they counted with
    ATen's general path before): against plain forward hooks on the eager model."""
    compiled_kernel()
    torch.manual_seed(3)
    model = _Graphable().eval()
    with torch.no_grad():
        model.conv2.bias.sub_(0.3)
        model.conv2.weight.mul_(8.0)  # some of relu6's inputs above 6
        model.fc.bias[:5] = -50.0  # five units that never fire
    x = np.random.default_rng(4).standard_normal((21, 3, 18, 18)).astype(np.float32)
    example = torch.from_numpy(x[:2])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if kind == "scripted":
            torch.jit.script(model).save(str(tmp_path / "m.pt"))
        elif kind == "exported_program":
            program = torch.export.export(
                model, (example,), dynamic_shapes=({0: torch.export.Dim("b", min=1)},)
            )
            torch.export.save(program, str(tmp_path / "m.pt2"))
        else:
            torch.jit.trace(model, example).save(str(tmp_path / "m.pt"))
    path = tmp_path / ("m.pt2" if kind == "exported_program" else "m.pt")
    data = tmp_path / "d.npz"
    np.savez(data, x=x)
    calls = []
    real = native.ReluStats.run
    monkeypatch.setattr(native.ReluStats, "run", lambda self, *a: calls.append(a[3]) or real(self, *a))
    report = deadrelu_cli.scan(
        str(path),
        str(data),
        device="cpu",
        batch_size=8,
    )
    truths = capture(model, [torch.from_numpy(x[i : i + 8]) for i in range(0, len(x), 8)])
    assert sorted(calls) == sorted([8, 16, 24] * 3)  # units of each site, for each of the 3 batches
    layers = {layer.name: layer for layer in report.layers}
    assert set(layers) == set(truths) == {"act1", "act2", "act3"}
    for name, truth in truths.items():
        pre = np.moveaxis(truth.pre, 1, -1).reshape(-1, truth.pre.shape[1])
        post = np.moveaxis(truth.post, 1, -1).reshape(-1, truth.post.shape[1])
        layer = layers[name]
        np.testing.assert_array_equal(layer.positive_counts, (pre > 0).sum(0), err_msg=name)
        np.testing.assert_array_equal(layer.max_preactivation, pre.max(0), err_msg=name)
        np.testing.assert_allclose(layer.sum_abs, post.sum(0), rtol=1e-6, err_msg=name)
    at_cap = (np.moveaxis(truths["act2"].pre, 1, -1).reshape(-1, 16) >= 6).sum(0)
    assert layers["act2"].op == "relu6" and at_cap.sum() > 0
    np.testing.assert_array_equal(layers["act2"].saturated_counts, at_cap)
    assert (layers["act3"].positive_counts[:5] == 0).all()


def test_prepared_in_the_background_then_waited_for(monkeypatch, tmp_path):
    """prepare() builds on a thread (a first build overlaps the model's loading); relu_stats() waits for
    that build rather than starting its own or counting without it."""
    if native.compiler() is None:
        pytest.skip("no C compiler on this machine")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(native, "_loaded", None)
    monkeypatch.setattr(native, "_builder", None)
    builds = []
    real_build = native._build
    monkeypatch.setattr(native, "_build", lambda *a: builds.append(a) or real_build(*a))
    native.prepare()
    native.prepare()  # once
    assert native._builder is not None and native._builder.name == "deadrelu-native"
    kernel = native.relu_stats()
    assert kernel is not None and kernel.path.parent == tmp_path / "cache" / "deadrelu" / "native"
    assert len(builds) == 1


def test_the_kernel_shares_torchs_openmp_runtime(tmp_path):
    """A CPU scan loads torch before the kernel, so the kernel's libgomp.so.1 is the one torch loaded:
    one OpenMP thread pool in the process, not two."""
    compiled_kernel()
    torch.save(nn.Sequential(nn.Linear(4, 8), nn.ReLU()).state_dict(), tmp_path / "m.pt")
    (tmp_path / "arch.py").write_text(
        "from torch import nn\n\ndef build():\n    return nn.Sequential(nn.Linear(4, 8), nn.ReLU())\n"
    )
    np.savez(tmp_path / "d.npz", x=np.ones((3, 4), np.float32))
    script = (
        "import deadrelu_cli\n"
        f"deadrelu_cli.scan({str(tmp_path / 'm.pt')!r}, {str(tmp_path / 'd.npz')!r}, "
        f"arch={str(tmp_path / 'arch.py') + ':build'!r}, device='cpu')\n"
        "from deadrelu_cli import native\n"
        "assert native.relu_stats() is not None, native.status()\n"
        "print(sorted({l.split()[-1] for l in open('/proc/self/maps') if 'libgomp' in l}))\n"
    )
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}  # a first build, in the background
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, check=False
    )
    assert done.returncode == 0, done.stderr
    mapped = ast.literal_eval(done.stdout.strip().splitlines()[-1])
    torch_lib = Path(torch.__file__).parent / "lib"
    assert len(mapped) == 1 and Path(mapped[0]).parent == torch_lib, mapped


class _Sixes(nn.Module):
    """relu6 spelled four ways; the last with a lower bound of -0.0, which gives -0.0 below zero."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.act = nn.ReLU6(inplace=True)
        self.lin = nn.Linear(20, 20)
        self.lin2 = nn.Linear(20, 20)
        self.lin3 = nn.Linear(20, 20)

    def forward(self, x):
        h = self.act(self.conv(x) * 4).mean((2, 3)).repeat(1, 4)[:, :20] * 3  # [N, 20]
        h = F.relu6(self.lin(h))
        h = F.hardtanh(self.lin2(h), 0.0, 6.0)
        return F.hardtanh(self.lin3(h), -0.0, 6.0)


def test_eager_relu6_through_the_kernel(monkeypatch):
    compiled_kernel()
    torch.manual_seed(2)
    model = _Sixes().eval()
    batches = [torch.randn(9, 3, 12, 12, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    with torch.no_grad():
        plain = [model(x.clone()) for x in batches]
    truths = capture(
        model,
        [x.clone() for x in batches],
        {"relu6()": ("lin", "relu6"), "relu6()#2": ("lin2", "relu6"), "relu6()#3": ("lin3", "relu6")},
    )
    calls = []
    real = native.ReluStats.run
    monkeypatch.setattr(native.ReluStats, "run", lambda self, *a: calls.append(a[3]) or real(self, *a))
    probe = EagerProbe(model, ProbeSettings())
    with probe.attached(), torch.inference_mode():
        outs = [probe.run((x.clone(),)) for x in batches]
    for got, want in zip(outs, plain, strict=True):  # -0.0 of the last hardtanh kept: bit for bit
        assert torch.equal(got.view(torch.int32), want.view(torch.int32))
    assert (plain[0] == 0).any() and torch.signbit(plain[0][plain[0] == 0]).all()  # the -0.0 are there
    assert sorted(calls) == sorted([6, 20, 20] * 2)  # not the hardtanh with a -0.0 floor
    layers = {layer.name: layer for layer in probe.registry.layer_stats()}
    assert set(layers) == set(truths) == {"act", "relu6()", "relu6()#2", "relu6()#3"}
    for name, truth in truths.items():
        pre = np.moveaxis(truth.pre, 1, -1).reshape(-1, truth.pre.shape[1])
        layer = layers[name]
        assert layer.op == "relu6", name
        np.testing.assert_array_equal(layer.positive_counts, (pre > 0).sum(0), err_msg=name)
        np.testing.assert_array_equal(layer.max_preactivation, pre.max(0), err_msg=name)
        np.testing.assert_allclose(layer.sum_abs, np.clip(pre, 0, 6).sum(0), rtol=1e-6, err_msg=name)
        np.testing.assert_array_equal(layer.saturated_counts, (pre >= 6).sum(0), err_msg=name)
    assert sum(layer.saturated_counts.sum() for layer in layers.values()) > 0


def test_without_openmp_a_one_thread_kernel(monkeypatch, tmp_path):
    """A compiler without OpenMP (Apple's clang) builds the same source for one thread: it counts relu6
    (whose ATen path is the slow general one) at any thread count, and relu only where torch runs one
    thread; the numbers are numpy's either way."""
    if native.compiler() is None:
        pytest.skip("no C compiler on this machine")
    monkeypatch.setattr(native, "PARALLEL_FLAGS", ("-fno-such-openmp-flag",))  # the OpenMP build fails
    kernel, why = _fresh_load(monkeypatch, tmp_path)
    assert kernel is not None and not kernel.parallel, why
    assert why.startswith(f"loaded {kernel.path} without OpenMP (") and "could not build" in why
    monkeypatch.setattr(accumulator, "relu_stats", lambda: kernel)
    calls = []
    real = native.ReluStats.run
    monkeypatch.setattr(
        native.ReluStats, "run", lambda self, *a: calls.append((a[3], a[6])) or real(self, *a)
    )
    threads = torch.get_num_threads()
    try:
        for torch_threads, op, expect_kernel in ((2, "relu6", True), (2, "relu", False), (1, "relu", True)):
            torch.set_num_threads(torch_threads)
            calls.clear()
            batches = [_batch((6, 5, 40, 40), seed) for seed in (3, 4)]
            truth = _truth(batches, op)
            site = accumulator.SiteAccumulator("site", op, 1)
            for x in batches:
                want = ATEN[op](x)
                got = site.run_relu_in_parts(x.clone(), False, 0.0)
                if got is None:  # too small for ATen's slices: the caller would run the op as written
                    site.update(x, None, 0.0)
                else:
                    assert torch.equal(got.view(torch.int32), want.view(torch.int32))
            assert calls == ([(5, 1)] * 2 if expect_kernel else []), (op, torch_threads)  # one thread
            np.testing.assert_array_equal(site.positive.numpy(), truth["count"])
            np.testing.assert_array_equal(site.max_pre.numpy(), truth["max"])
            np.testing.assert_allclose(site.sum_abs.numpy(), truth["sum"], rtol=1e-6)
    finally:
        torch.set_num_threads(threads)


class _Tokens(nn.Module):
    """A feed-forward block on [B, T, F] tokens, and OPT's flattened [B*T, F] one, relu and relu6."""

    def __init__(self, op: str) -> None:
        super().__init__()
        self.up = nn.Linear(16, 40)
        self.act = nn.ReLU() if op == "relu" else nn.ReLU6()
        self.up2 = nn.Linear(40, 24)
        self.act2 = nn.ReLU(inplace=True) if op == "relu" else nn.ReLU6(inplace=True)

    def forward(self, x):
        h = self.act(self.up(x) * 4)  # [B, T, 40]
        return self.act2(self.up2(h.flatten(0, 1)) * 4).view(x.shape[0], x.shape[1], -1)  # [B*T, 24]


@pytest.mark.parametrize("op", ["relu", "relu6"])
def test_masked_tokens_through_the_kernel(op, monkeypatch):
    """Under a token mask the kernel counts each run of kept rows and the op alone runs on padding:
    outputs bit for bit the model's, counts against numpy over kept rows only (right and left padding,
    nothing kept, nothing padded; NaN and huge values at padding positions change nothing)."""
    compiled_kernel()
    torch.manual_seed(6)
    model = _Tokens(op).eval()
    B, T = 4, 9
    lengths = [[9, 3, 0, 5], [9, 9, 9, 9], [0, 0, 0, 0], [1, 8, 2, 6]]
    gen = torch.Generator().manual_seed(8)
    batches = []
    for i, lens in enumerate(lengths):
        x = torch.randn(B, T, 16, generator=gen)
        mask = torch.arange(T)[None, :] < torch.tensor(lens)[:, None]
        if i == 3:
            mask = mask.flip(1)  # left padding
        x[~mask] = 1e6  # padding: huge pre-activations everywhere, which must count nowhere
        if i == 0:
            x[1, 5, :] = float("nan")  # a padding row: ignored
        batches.append((x, mask))
    want = {"act": [], "act2": []}
    hooks = [
        getattr(model, name).register_forward_pre_hook(
            lambda m, a, name=name: want[name].append(a[0].detach().double().clone())
        )
        for name in want
    ]
    with torch.no_grad():
        plain = [model(x.clone()) for x, _ in batches]
    for hook in hooks:
        hook.remove()
    calls = []
    real = native.ReluStats.run
    monkeypatch.setattr(native.ReluStats, "run", lambda self, *a: calls.append(a[2]) or real(self, *a))
    probe = EagerProbe(model, ProbeSettings())
    with probe.attached(), torch.inference_mode():
        outs = []
        for x, mask in batches:
            probe.registry.position_mask = accumulator.PositionMask(mask)
            outs.append(probe.run((x.clone(),)))
    for got, expected in zip(outs, plain, strict=True):
        assert torch.equal(got.view(torch.int32), expected.view(torch.int32))
    assert sum(calls) == 2 * sum(sum(lens) for lens in lengths)  # the kept rows, through the kernel
    layers = {layer.name: layer for layer in probe.registry.layer_stats()}
    for name, units in (("act", 40), ("act2", 24)):
        kept = np.concatenate(
            [
                pre.reshape(B, T, units)[mask].numpy()
                for pre, (_, mask) in zip(want[name], batches, strict=True)
            ]
        )
        layer = layers[name]
        assert layer.extra["position_mask"] == "applied"
        assert layer.elements_per_unit == kept.shape[0]
        with np.errstate(invalid="ignore"):
            np.testing.assert_array_equal(layer.positive_counts, (kept > 0).sum(0), err_msg=name)
        np.testing.assert_array_equal(layer.max_preactivation, kept.max(0), err_msg=name)
        post = np.maximum(kept, 0) if op == "relu" else np.clip(kept, 0, 6)
        np.testing.assert_allclose(layer.sum_abs, post.sum(0), rtol=1e-6, err_msg=name)
        if op == "relu6":
            np.testing.assert_array_equal(layer.saturated_counts, (kept >= 6).sum(0), err_msg=name)


_LOAD_AND_COUNT = """
import json, numpy as np
from deadrelu_cli import native
kernel = native.relu_stats()
x = np.random.default_rng(5).standard_normal((6, 3, 40)).astype(np.float32)
y = np.empty_like(x)
stats = np.full(3, -np.inf), np.zeros(3, np.int64), np.zeros(3)
if kernel is not None:
    kernel.run(x.ctypes.data, y.ctypes.data, 6, 3, 40, True, 2, *(a.ctypes.data for a in stats))
print(json.dumps({"why": native.status(), "stats": [a.tolist() for a in stats], "y": y.tolist(), "x": x.tolist()}))
"""


@pytest.mark.parametrize("damage", ["truncated", "empty", "foreign"])
def test_a_damaged_cached_library_is_rebuilt(damage, monkeypatch, tmp_path):
    """A library in the cache that is not whole (a copied or half-written cache) was loaded as it was: a
    truncated one killed the scan with SIGBUS inside dlopen, one without the kernel's symbol raised
    AttributeError (exit 3). It is checked against its digest first and rebuilt; a fresh process then
    counts as numpy does."""
    if native.compiler() is None:
        pytest.skip("no C compiler on this machine")
    kernel, why = _fresh_load(monkeypatch, tmp_path)
    assert kernel is not None, why
    whole = kernel.path.read_bytes()
    # the damaged copy goes into another cache: this process has the library it built mapped, and a
    # mapped file truncated in place is SIGBUS for this process too
    copied = tmp_path / "copied"
    damaged = copied / kernel.path.relative_to(tmp_path / "cache")
    damaged.parent.mkdir(parents=True)
    if damage == "truncated":
        damaged.write_bytes(whole[:3000])
    elif damage == "empty":
        damaged.write_bytes(b"")
    else:  # a whole library, but another one
        other = tmp_path / "other.c"
        other.write_text("int other(void) { return 1; }\n")
        built = subprocess.run(
            [*native.compiler(), "-shared", "-fPIC", "-o", str(damaged), str(other)], check=False
        )
        assert built.returncode == 0
    env = {
        **os.environ,
        "PYTHONPATH": str(Path(deadrelu_cli.__file__).parents[1]),
        "XDG_CACHE_HOME": str(copied),
    }
    done = subprocess.run(
        [sys.executable, "-c", _LOAD_AND_COUNT], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    got = json.loads(done.stdout)
    assert got["why"] == f"loaded {damaged} (rebuilt: the cached copy was damaged)"
    assert damaged.read_bytes() == whole  # the same build again
    x = np.asarray(got["x"], dtype=np.float64)
    np.testing.assert_array_equal(got["y"], np.maximum(x, 0))
    np.testing.assert_array_equal(got["stats"][0], x.max((0, 2)))
    np.testing.assert_array_equal(got["stats"][1], (x > 0).sum((0, 2)))
    np.testing.assert_allclose(got["stats"][2], np.maximum(x, 0).sum((0, 2)), rtol=1e-6)


def test_a_cache_that_cannot_be_looked_at_says_so(monkeypatch, tmp_path):
    """Looking for the cached library raised what stat raises (EACCES for HOME=/root as another user,
    a docker image run with --user; here a name too long for the file system): every CPU scan ended in
    exit 3. The kernel is not used, and status says why; the probe counts with ATen's kernels."""
    long = tmp_path / ("c" * 300)
    monkeypatch.setenv("XDG_CACHE_HOME", str(long))
    monkeypatch.setattr(native, "_loaded", None)
    assert native.relu_stats() is None
    assert native.status().startswith(f"cannot read the kernel's cache {long / 'deadrelu' / 'native'}")


def test_an_in_place_write_aten_refuses_still_raises():
    """x.relu_() on an inference tensor outside inference mode raises in ATen (after writing it: its
    version counter refuses); the kernel wrote it through its address and returned, so a watched forward
    went on where the model alone stops."""
    compiled_kernel()

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return self.fc(x.relu_())

    model = Model().train()
    with torch.inference_mode():
        x = torch.randn(8, 4) - 0.5
    with pytest.raises(RuntimeError, match="inference tensor") as plain, torch.no_grad():
        model(x)
    watcher = deadrelu_cli.watch(model, every=1)
    watcher.step()
    with pytest.raises(RuntimeError) as watched, torch.no_grad():
        model(x)
    watcher.close()
    assert str(watched.value) == str(plain.value)


@pytest.mark.parametrize("counted_by", ["kernel", "aten"])
@pytest.mark.parametrize("in_place", [False, True], ids=["out", "in_place"])
def test_forward_mode_autograd_through_a_watched_model(counted_by, in_place, monkeypatch):
    """A jvp (torch.autograd.forward_ad) through a watched model: the kernel's output carried no tangent
    (the model's jvp came back None), ATen's sliced counting raised NotImplementedError (out= kernels
    refuse a dual tensor). Such a relu runs as the op itself: the tangent is plain torch's, the counts
    those of a forward hook."""
    if counted_by == "kernel":
        compiled_kernel()
    else:
        monkeypatch.setattr(accumulator, "relu_stats", lambda: None)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4096), nn.ReLU(inplace=in_place), nn.Linear(4096, 1)).train()
    x = torch.randn(300, 4)  # 4.9 MB per activation: ATen counts it in slices
    tangent = torch.randn(300, 4)

    def jvp() -> torch.Tensor | None:
        with fwAD.dual_level(), torch.no_grad():
            return fwAD.unpack_dual(model(fwAD.make_dual(x, tangent))).tangent

    want = jvp()
    with torch.no_grad():
        pre = model[0](x).double().numpy()
    watcher = deadrelu_cli.watch(model, every=1)
    watcher.step()
    got = jvp()
    watcher.close()
    assert got is not None
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    (layer,) = watcher.reports[-1].layers
    np.testing.assert_array_equal(layer.positive_counts, (pre > 0).sum(0))
    np.testing.assert_array_equal(layer.max_preactivation, pre.max(0))


def test_a_scan_that_stops_early_leaves_no_temporary_in_the_cache(tmp_path):
    """A CPU scan starts the first build on a thread; one that then stopped (exit 2, a bad --arch) before
    the build ended left the compiler's `.build-*.so` in the cache, one more per run, and nothing built.
    Exit now waits for the build: the cache holds the library and nothing else. A temporary older than
    any build can run (a process killed mid-build) is removed by the next build."""
    if native.compiler() is None:
        pytest.skip("no C compiler on this machine")
    cache = tmp_path / "cache" / "deadrelu" / "native"
    cache.mkdir(parents=True)
    stale = cache / ".build-killed.so"
    stale.write_bytes(b"half a library")
    os.utime(stale, (0, 0))
    torch.save(nn.Linear(3, 4).state_dict(), tmp_path / "m.pt")
    (tmp_path / "arch.py").write_text("from torch import nn\n\ndef build():\n    return nn.Linear(3, 4)\n")
    np.savez(tmp_path / "d.npz", x=np.zeros((2, 3), np.float32))
    env = {
        **os.environ,
        "PYTHONPATH": str(Path(deadrelu_cli.__file__).parents[1]),
        "XDG_CACHE_HOME": str(tmp_path / "cache"),
    }
    env.pop("DEADRELU_NATIVE", None)
    args = [tmp_path / "m.pt", "--data", tmp_path / "d.npz", "--arch", f"{tmp_path / 'arch.py'}:absent"]
    done = subprocess.run(
        [sys.executable, "-m", "deadrelu_cli", "scan", *map(str, args), "--device", "cpu"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and "absent" in done.stderr
    left = sorted(path.name for path in cache.iterdir())
    assert len(left) == 1 and left[0].startswith("relu_stats-") and left[0].endswith(".so"), left


@pytest.mark.parametrize("flags", ["-ffast-math", "-ffinite-math-only -fno-signed-zeros"])
def test_compiler_arguments_in_cc_keep_ieee_semantics(flags, monkeypatch, tmp_path):
    """CC="gcc -ffast-math" (its arguments go first): the kernel built, and its relu lost -0.0 and its max
    missed NaN. The kernel's own flags come after and restore them: bit for bit ATen's relu, numpy's max."""
    found = native.compiler()
    if found is None:
        pytest.skip("no C compiler on this machine")
    kernel, why = _fresh_load(monkeypatch, tmp_path, CC=f"{found[0]} {flags}")
    assert kernel is not None, why
    x = _batch((3, 5, 200), 11)
    want = torch.relu(x)
    truth = _truth([x], "relu")
    maximum = torch.full((5,), -torch.inf, dtype=torch.float64)
    count = torch.zeros(5, dtype=torch.int64)
    total = torch.zeros(5, dtype=torch.float64)
    kernel.run(
        x.data_ptr(), x.data_ptr(), 3, 5, 200, False, 2, *(t.data_ptr() for t in (maximum, count, total))
    )
    assert torch.equal(x.view(torch.int32), want.view(torch.int32))  # -0.0 and NaN kept, bit for bit
    np.testing.assert_array_equal(maximum.numpy(), truth["max"])  # NaN where a NaN was
    np.testing.assert_array_equal(count.numpy(), truth["count"])
    np.testing.assert_allclose(total.numpy(), truth["sum"], rtol=1e-6)


_FORK_DURING_THE_BUILD = """
import os, signal, sys, time
from deadrelu_cli import native
native.prepare()
time.sleep(0.5)  # the builder thread holds its lock: the compiler takes 2 s
pid = os.fork()
if pid == 0:
    signal.alarm(30)  # where the child would wait forever
    kernel = native.relu_stats()
    os._exit(0 if kernel is not None else 1)
_, code = os.waitpid(pid, 0)
print(code, native.relu_stats() is not None)
"""


def test_a_process_forked_during_the_first_build_builds_for_itself(tmp_path):
    """prepare() builds on a thread holding a lock; a process forked meanwhile (a fork-based pool started
    while a first scan runs) inherited that lock held, with no thread to release it: its relu_stats()
    waited forever. The child now forgets the parent's builder and loads the kernel itself."""
    found = native.compiler()
    if found is None:
        pytest.skip("no C compiler on this machine")
    slow = tmp_path / "slow-cc"
    slow.write_text(f'#!/bin/sh\nsleep 2\nexec {found[0]} "$@"\n')
    slow.chmod(0o755)
    env = {
        **os.environ,
        "PYTHONPATH": str(Path(deadrelu_cli.__file__).parents[1]),
        "XDG_CACHE_HOME": str(tmp_path / "cache"),
        "CC": str(slow),
    }
    env.pop("DEADRELU_NATIVE", None)
    done = subprocess.run(
        [sys.executable, "-c", _FORK_DURING_THE_BUILD], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["0", "True"]  # the child exited 0 with a kernel, and so did the parent
