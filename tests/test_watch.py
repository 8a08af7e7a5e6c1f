"""watch(): per-window dead sets and ReDo persistence against a hand-written forward-hook reference."""

from __future__ import annotations

import json
import warnings

import jsonschema
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from deadrelu_cli import watch
from deadrelu_cli.gate import GateConfig, evaluate
from deadrelu_cli.report.model import SCHEMA_PATH, load_report, report_to_dict
from deadrelu_cli.watcher import DeadLayerWarning


class Net(nn.Module):
    """An nn.ReLU module, a functional relu and an in-place one: the three ways a ReLU is called."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 24)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(24, 24)
        self.fc3 = nn.Linear(24, 16)
        self.out = nn.Linear(16, 1)
        self.stack_depths: list[int] = []  # TorchFunctionModes active in each forward

    def forward(self, x):
        self.stack_depths.append(torch._C._len_torch_function_stack())
        h = self.act(self.fc1(x))
        h = F.relu(self.fc2(h))
        h = self.fc3(h).relu_()
        return self.out(h)


SITES = {"act": "fc1", "relu()": "fc2", "relu()#2": "fc3"}  # site name -> the Linear making its input


def _train(every: int, window: int, steps: int = 60, **options):
    """A seeded high-learning-rate run that kills units; returns (watch, reference dead sets per window)."""
    torch.manual_seed(3)
    model = Net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.4)
    x = torch.randn(48, 6)
    y = torch.randn(48, 1) * 3
    fired: dict[str, np.ndarray] = {}
    reference: list[dict[str, set[int]]] = []

    def hook_for(site):  # the reference: pre-activations from plain forward hooks on the Linears, numpy
        def hook(_module, _inputs, output):
            pre = output.detach().numpy().reshape(-1, output.shape[-1])
            fired[site] = fired.get(site, np.zeros(pre.shape[1], bool)) | (pre > 0).any(axis=0)

        return hook

    w = watch(model, every=every, window=window, config=False, **options)
    sampled_in_window = 0
    for step in range(steps):
        sampled = w.step()
        assert sampled == (step % every == 0)
        handles = []
        if sampled:
            handles = [getattr(model, lin).register_forward_hook(hook_for(s)) for s, lin in SITES.items()]
        for chunk in (x[:20], x[20:]):  # two forwards per step (gradient accumulation)
            loss = F.mse_loss(model(chunk), y[: len(chunk)] if len(chunk) == 20 else y[20:])
            loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 5.0)  # large steps that kill units, never NaN
        optimizer.step()
        optimizer.zero_grad()
        for handle in handles:
            handle.remove()
        if sampled:
            sampled_in_window += 1
            if sampled_in_window == window:
                reference.append({s: set(np.flatnonzero(~f).tolist()) for s, f in fired.items()})
                fired.clear()
                sampled_in_window = 0
        w.end_step()
    w.close()
    if fired:
        reference.append({s: set(np.flatnonzero(~f).tolist()) for s, f in fired.items()})
    return w, model, reference


def test_window_dead_sets_and_persistence_match_a_hook_reference():
    w, model, reference = _train(every=4, window=3)
    assert len(w.reports) == len(reference) == 5  # 15 sampled steps, 3 per window
    killed = 0
    for index, (report, expected) in enumerate(zip(w.reports, reference, strict=True)):
        got = {layer.name: set(np.flatnonzero(layer.dead_mask()).tolist()) for layer in report.layers}
        assert got == expected
        killed = max(killed, sum(len(v) for v in got.values()))
        assert report.training.window == index
        assert report.training.sampled_steps == 3
        assert report.data.samples == 3 * 48  # every forward of a sampled step
        if index == 0:
            assert report.training.persistence == {} and report.training.persistence_overall is None
            continue
        before = reference[index - 1]
        for site, dead in expected.items():
            assert set(report.training.newly_dead[site]) == dead - before[site]
            assert set(report.training.revived[site]) == before[site] - dead
            share = len(dead & before[site]) / len(before[site]) if before[site] else None
            assert report.training.persistence[site] == share
        carried = sum(len(expected[s] & before[s]) for s in expected)
        total = sum(len(before[s]) for s in expected)
        assert report.training.persistence_overall == (carried / total if total else None)
    assert killed >= 5, "the run should kill units (high learning rate)"
    # steps sampled: 0, 4, 8, …; a window's step is its last sampled one
    assert [r.training.step for r in w.reports] == [8, 20, 32, 44, 56]
    # unsampled steps ran without any TorchFunctionMode; sampled ones under exactly one
    depths = model.stack_depths
    assert len(depths) == 120
    assert [d for i, d in enumerate(depths) if (i // 2) % 4] == [0] * 90
    assert [d for i, d in enumerate(depths) if (i // 2) % 4 == 0] == [1] * 30
    assert not model._forward_hooks and not model._forward_pre_hooks
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    assert model.training  # the model's mode is left alone


def test_partial_last_window_and_one_report_per_sampled_step():
    w, _, reference = _train(every=7, window=4, steps=30)  # sampled 0, 7, 14, 21, 28: windows of 4 + 1
    assert [r.training.sampled_steps for r in w.reports] == [4, 1]
    assert [r.training.first_step for r in w.reports] == [0, 28]
    for report, expected in zip(w.reports, reference, strict=True):
        assert {lay.name: set(np.flatnonzero(lay.dead_mask()).tolist()) for lay in report.layers} == expected


def test_reports_are_ordinary_reports(tmp_path, cli):
    seen = []
    w, _, _ = _train(every=5, window=2, steps=40, out_dir=tmp_path / "reports", on_report=seen.append)
    assert seen == w.reports and w.last is w.reports[-1]
    files = sorted((tmp_path / "reports").iterdir())
    assert [f.name for f in files] == [f"deadrelu-step{r.training.step:08d}.json" for r in w.reports]
    schema = json.loads(SCHEMA_PATH.read_text())
    for f, report in zip(files, w.reports, strict=True):
        data = json.loads(f.read_text())
        jsonschema.validate(data, schema)
        assert data == json.loads(json.dumps(report_to_dict(report)))  # what was written is the report
        assert data == report_to_dict(load_report(f))  # and it loads back whole
        assert data["model"]["format"] == "module"
    # the CLI reads them: gate, and trend (ordered by the reports' training step, no --data)
    result = cli("gate", str(files[-1]), "--max-dead-layer", "1.0")
    assert result.code == 0, result.err
    out = cli("trend", *reversed([str(f) for f in files]), "--json", "-")
    assert out.code == 0, out.err
    trend = out.json()
    assert [c["step"] for c in trend["checkpoints"]] == [r.training.step for r in w.reports]
    assert trend["checkpoints"][0]["order_from"] == "checkpoint"
    for layer in trend["layers"]:
        expected = [float(r.layer(layer["name"]).dead_mask().mean()) for r in w.reports]
        assert layer["dead_fraction"] == pytest.approx(expected)
    folder = cli("trend", str(tmp_path / "reports"), "--json", "-")
    assert folder.code == 0 and folder.json()["checkpoints"] == trend["checkpoints"]


def test_limits_warn_once_per_layer_and_can_stop():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        w, _, reference = _train(every=4, window=1, steps=40, max_dead_layer=0.05, stop_on_gate=True)
    over = set()
    for expected in reference:
        for site, dead in expected.items():
            if len(dead) / {"act": 24, "relu()": 24, "relu()#2": 16}[site] > 0.05:
                over.add(site)
    assert over, "the run should push a layer over 5% dead"
    messages = [str(c.message) for c in caught if issubclass(c.category, DeadLayerWarning)]
    assert sorted(m.split("layer ")[1].split(":")[0] for m in messages) == sorted(over)
    assert w.should_stop
    # the watch's verdicts are the gate's on the same report
    for report, result in zip(w.reports, w.gate_results, strict=True):
        assert result.passed == evaluate(report, GateConfig(max_dead_layer=0.05)).passed


def test_settings_from_tool_deadrelu(tmp_path, monkeypatch):
    (tmp_path / "pyproject.toml").write_text("[tool.deadrelu]\nmax-dead-layer = 0.25\nthreshold = 0.5\n")
    monkeypatch.chdir(tmp_path)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU())
    w = watch(model, every=1)
    assert w.settings.threshold == 0.5 and w.settings.gate.max_dead_layer == 0.25
    w2 = watch(model, every=1, max_dead_layer=0.5)  # arguments override the file
    assert w2.settings.gate.max_dead_layer == 0.5 and w2.settings.threshold == 0.5
    assert watch(model, every=1, config=False).settings.gate.max_dead_layer is None
    # the documented argument name (docs/training.md: `layer_limits`) and the flag's both work
    for name in ("layer_limits", "layer_limit"):
        w3 = watch(model, every=1, config=False, **{name: {"0": 0.1}})
        assert w3.settings.gate.layer_limits == [("0", 0.1)]


def test_bad_arguments_are_clear():
    from deadrelu_cli.errors import UserError

    with pytest.raises(UserError, match="every and window"):
        watch(nn.ReLU(), every=0, config=False)
    with pytest.raises(UserError, match="unknown setting"):
        watch(nn.ReLU(), every=1, config=False, max_ded=0.1)
    with pytest.raises(UserError, match="nn.Module"):
        watch(lambda x: x, every=1, config=False)


def test_the_function_stays_the_package_attribute():
    import deadrelu_cli
    import deadrelu_cli.watcher  # noqa: F401 - importing the module must not shadow the function

    assert callable(deadrelu_cli.watch) and deadrelu_cli.watch.__module__ == "deadrelu_cli"


def test_position_mask_counts_only_kept_tokens():
    """Unit 0 fires only on padding positions (feature 0 = 10 there): dead with the mask, alive without.
    Reference: numpy over the kept positions of the pre-activations."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 1))
    with torch.no_grad():
        model[0].weight[0] = torch.tensor([1.0, 0.0, 0.0, 0.0])
        model[0].bias[0] = -5.0
    g = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(3):
        x = torch.randn(5, 7, 4, generator=g).clamp(-3, 3)
        mask = torch.ones(5, 7, dtype=torch.bool)
        mask[:, 5:] = False  # two padded positions per sequence
        x[:, 5:, 0] = 10.0
        batches.append((x, mask))
    masked = watch(model, every=1, window=3, config=False)
    plain = watch(model, every=1, window=3, config=False)
    for x, mask in batches:
        masked.step(position_mask=mask)
        model(x)
    masked.close()
    for x, _ in batches:
        plain.step()
        model(x)
    plain.close()
    with torch.no_grad():
        pre = np.concatenate([model[0](x)[m].numpy() for x, m in batches])  # kept positions only
    layer = masked.last.layer("1")
    assert layer.elements_per_unit == len(pre) == 3 * 5 * 5
    assert layer.positive_counts.tolist() == (pre > 0).sum(axis=0).tolist()
    assert 0 in np.flatnonzero(layer.dead_mask())
    assert plain.last.layer("1").positive_counts[0] > 0  # the padding made it fire


def test_the_forwards_own_attention_mask_positional_keyword_and_overridden():
    """The mask is read from the forward's arguments (keyword or positional); a mask given to step()
    wins; mask=None turns it off; a mask that is not [batch, tokens] warns once and counts everything.
    Reference: numpy over the pre-activations of the kept positions."""

    class Tagger(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 5)

        def forward(self, x, attention_mask=None):
            return self.fc(x).relu()

    torch.manual_seed(0)
    model = Tagger()
    x = torch.randn(4, 6, 3)
    own = torch.ones(4, 6, dtype=torch.long)
    own[:, 4:] = 0
    given = torch.zeros(4, 6, dtype=torch.bool)
    given[:, :2] = True
    with torch.no_grad():
        pre = model.fc(x).numpy()

    def counts(keep):
        kept = pre[keep.numpy().astype(bool)]
        return (kept > 0).sum(axis=0).tolist(), len(kept)

    def layer(call, **options):
        w = watch(model, every=1, config=False, **options)
        call(w)
        w.close()
        found = w.last.layer("relu()")
        return found.positive_counts.tolist(), found.elements_per_unit

    assert layer(lambda w: (w.step(), model(x, attention_mask=own))) == counts(own)
    assert layer(lambda w: (w.step(), model(x, own))) == counts(own)  # positional
    assert layer(lambda w: (w.step(position_mask=given), model(x, attention_mask=own))) == counts(given)
    everything = counts(torch.ones(4, 6))
    assert layer(lambda w: (w.step(), model(x, attention_mask=own)), mask=None) == everything
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert layer(lambda w: (w.step(), model(x, attention_mask=own[:, None, None, :]))) == everything
    assert sum("not [batch, tokens]" in str(c.message) for c in caught) == 1


@pytest.mark.parametrize("how", ["torch.compile(model)", "model.compile()"])
def test_compiled_models_count_exactly_and_keep_their_compiled_code(how):
    """A sampled step runs the model eagerly (torch.compiler's force_eager stance, for that step only):
    the counts equal plain hooks + numpy, the compiled graph runs on every unsampled step, and nothing is
    recompiled. The backend is a counting wrapper around dynamo's captured graph (a real dynamo compile;
    inductor's C++ build would take tens of seconds on the test machines, and no sampled step runs
    compiled code whatever the backend)."""

    class Pure(Net):  # Net without its record of the mode stack (a side effect dynamo would guard on)
        def forward(self, x):
            return self.out(self.fc3(F.relu(self.fc2(self.act(self.fc1(x))))).relu_())

    torch.manual_seed(0)
    model = Pure()
    x = torch.randn(32, 6)
    with torch.no_grad():
        fc1 = model.fc1(x)
        fc2 = model.fc2(fc1.relu())
        fc3 = model.fc3(fc2.relu())
    expected = {
        name: (pre.numpy() > 0).sum(axis=0).tolist() for name, pre in zip(SITES, (fc1, fc2, fc3), strict=True)
    }
    runs = {"compiles": 0, "calls": 0}

    def backend(graph_module, _example_inputs):
        runs["compiles"] += 1

        def run(*args):
            runs["calls"] += 1
            return graph_module(*args)

        return run

    torch._dynamo.reset()
    if how == "model.compile()":
        model.compile(backend=backend)
        called = model
    else:
        called = torch.compile(model, backend=backend)
    w = watch(called, every=2, config=False)
    compiled_calls = []
    for _step in range(8):
        sampled = w.step()
        before = runs["calls"]
        called(x).sum().backward()
        compiled_calls.append((sampled, runs["calls"] - before))
    w.close()
    assert compiled_calls == [(s % 2 == 0, 0 if s % 2 == 0 else 1) for s in range(8)]
    assert runs["compiles"] == 1  # compiled once, on the first unsampled step: no recompiles
    assert [r.training.step for r in w.reports] == [0, 2, 4, 6]
    for report in w.reports:
        assert {layer.name: layer.positive_counts.tolist() for layer in report.layers} == expected
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


class Teacher(nn.Module):
    """A model holding a module it does not own (called inside its forward, not one of its submodules)."""

    def __init__(self, helper: nn.Module) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 8)
        self.act = nn.ReLU()
        self.helper = [helper]  # a plain list: not registered, so not part of this model

    def forward(self, x):
        return self.helper[0](self.act(self.fc(x)))


def test_a_submodule_replaced_mid_run_and_a_module_the_model_does_not_own():
    """Names follow the model as it is when a step runs: a ReLU swapped in between windows is named by its
    path (as on the first window), and a module of another model called inside the forward names nothing."""
    torch.manual_seed(0)
    outsider = nn.Sequential(nn.Linear(8, 3), nn.ReLU())
    model = Teacher(outsider)
    x = torch.randn(32, 4)
    w = watch(model, every=1, config=False)
    for step in range(3):
        if step == 2:
            model.act = nn.ReLU()  # a new module object at the same path
        w.step()
        model(x)
    w.close()
    pre = model.fc(x).detach().numpy()
    inner = outsider[0](torch.relu(model.fc(x))).detach().numpy()
    for report in w.reports:
        by_name = {layer.name: layer for layer in report.layers}
        # the outsider's ReLU runs inside the forward: a functional call site under the model's root,
        # never attributed to the model's own `act`
        assert by_name["act"].module_type == "ReLU"
        np.testing.assert_array_equal(by_name["act"].positive_counts, (pre > 0).sum(axis=0))
        others = [layer for name, layer in by_name.items() if name != "act"]
        assert len(others) == 1
        np.testing.assert_array_equal(others[0].positive_counts, (inner > 0).sum(axis=0))


class TwoModels(nn.Module):
    """A GAN-like wrapper whose training code calls its parts directly, never `forward`."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.G = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 8))
        self.D = nn.Sequential(nn.Linear(8, 12), nn.ReLU(), nn.Linear(12, 1))
        with torch.no_grad():
            self.G[0].bias[:3] = -50.0
            self.D[0].bias[[2, 7]] = -80.0

    def forward(self, z):
        return self.D(self.G(z))


def test_owned_modules_called_without_the_root_are_counted():
    """A LightningModule's training_step calls `self.model(x)`, a GAN loop `gan.D(gan.G(z))`: the root's
    forward never runs, yet those are the watched model's forwards. Before, such a run reported "no relu
    call" (dead fraction 0 in every logger); now each call is counted, checked against plain hooks."""
    model = TwoModels()
    z = torch.randn(2, 32, 4)
    fired = {"G.1": [], "D.1": []}
    for path in fired:
        model.get_submodule(path).register_forward_hook(
            lambda _m, _a, out, path=path: fired[path].append((out.detach().numpy() > 0).sum(axis=0))
        )
    w = watch(model, every=1, window=2, config=False)
    for step in range(2):
        w.step()
        fake = model.G(z[step])
        (model.D(fake).mean() + model.D(fake.detach()).mean()).backward()
    w.close()
    report = w.reports[0]
    assert {layer.name for layer in report.layers} == {"G.1", "D.1"}
    for path, counts in fired.items():
        layer = report.layer(path)
        np.testing.assert_array_equal(layer.positive_counts, np.sum(counts, axis=0))
        assert layer.elements_per_unit == 32 * len(counts)
    assert report.layer("G.1").dead_mask().nonzero()[0].tolist() == [0, 1, 2]
    assert {2, 7} <= set(report.layer("D.1").dead_mask().nonzero()[0].tolist())
    assert all(not m._forward_hooks or m in (model.G[1], model.D[1]) for m in model.modules())


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_recomputation_is_not_a_forward(reentrant):
    """`torch.utils.checkpoint` calls a block (or the whole model) again inside backward to recompute its
    activations: those calls are not forwards of the step. Counts equal one forward's plain hooks."""
    from torch.utils.checkpoint import checkpoint

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.block = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU())
            self.head = nn.Sequential(nn.Linear(16, 4), nn.ReLU(), nn.Linear(4, 1))

        def forward(self, x):
            return self.head(checkpoint(self.block, x, use_reentrant=reentrant))

    torch.manual_seed(0)
    model = Net()
    x = torch.randn(32, 8, requires_grad=True)
    expected = {
        name: (model.get_submodule(producer)(inner).detach().numpy() > 0).sum(axis=0)
        for name, producer, inner in (
            ("block.1", "block.0", x),
            ("block.3", "block.2", torch.relu(model.block[0](x))),
            ("head.1", "head.0", model.block(x)),
        )
    }
    w = watch(model, every=1, config=False)
    w.step()
    model(x).sum().backward()  # the block's recomputation runs here
    w.step()
    checkpoint(model, x, use_reentrant=reentrant).sum().backward()  # the whole model recomputed
    w.close()
    assert len(w.reports) == 2
    for report in w.reports:
        assert report.data.samples == 32
        for name, counts in expected.items():
            layer = report.layer(name)
            assert layer.elements_per_unit == 32, name
            np.testing.assert_array_equal(layer.positive_counts, counts)


def test_allow_no_sites_from_tool_deadrelu_and_as_an_argument(tmp_path, monkeypatch):
    """A SiLU model watched with a limit: the window's gate fails on "no activation site was scanned"
    unless allow-no-sites, which [tool.deadrelu] sets for `deadrelu scan` — before, watch() ignored the
    key and refused the argument, so the shared settings warned on every run."""
    model = nn.Sequential(nn.Linear(3, 4), nn.SiLU(), nn.Linear(4, 1))
    x = torch.randn(8, 3)

    def run(**options):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with watch(model, every=1, **options) as w:
                w.step()
                model(x)
        return w.gate_results[-1].passed, [c for c in caught if issubclass(c.category, DeadLayerWarning)]

    passed, warned = run(config=False, max_dead=0.5)
    assert not passed and len(warned) == 1 and "no activation site" in str(warned[0].message)
    assert "pass allow_no_sites=True" in str(warned[0].message)  # the argument's name, not the CLI flag
    assert run(config=False, max_dead=0.5, allow_no_sites=True) == (True, [])
    (tmp_path / "pyproject.toml").write_text("[tool.deadrelu]\nmax-dead = 0.5\nallow-no-sites = true\n")
    monkeypatch.chdir(tmp_path)
    assert run() == (True, [])


def test_a_rerun_into_the_same_out_dir_says_it_replaces_reports(tmp_path):
    """A resumed run that numbers its steps from 0 again (plain `w.step()`) writes over the first run's
    reports of the same steps: one warning says so (before: silently, and `trend` then mixed the runs);
    a run that passes its global step writes beside them without a warning."""
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU())
    x = torch.randn(8, 3)

    def run(first_step=None):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with watch(model, every=2, out_dir=tmp_path, config=False) as w:
                for i in range(4):
                    w.step(None if first_step is None else first_step + i)
                    model(x)
        return [str(c.message) for c in caught if "earlier run" in str(c.message)]

    assert run() == []
    first = (tmp_path / "deadrelu-step00000000.json").read_text()
    assert run(first_step=4) == []  # steps 4..7: new files beside the first run's
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"deadrelu-step{s:08d}.json" for s in (0, 2, 4, 6)]
    warned = run()  # steps 0..3 again
    assert len(warned) == 1 and "deadrelu-step00000000.json" in warned[0]
    assert (
        json.loads((tmp_path / "deadrelu-step00000000.json").read_text()).keys() == json.loads(first).keys()
    )


TORCH_COND_WATCH = r"""
import json, sys
import numpy as np, torch
from torch import nn
from deadrelu_cli import watch

class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 2)

    def forward(self, x):
        h = torch.relu(self.a(x))
        h = torch.cond(h.sum() > -1e9, lambda t: torch.relu(t), lambda t: torch.relu(-t), (h,))
        return self.b(h)

torch.manual_seed(0)
model = Branchy()
with torch.no_grad():
    model.a.bias[:3] = -50.0  # three units of a dead
assert "torch._dynamo" not in sys.modules  # no optimizer yet: the compiler is not loaded
w = watch(model, every=1, window=2, config=False)
truth = np.zeros(8, np.int64)
for step in range(2):
    w.step()
    x = torch.randn(16, 4)
    with torch.no_grad():
        truth += (model.a(x) > 0).sum(0).numpy()
    model.zero_grad()
    model(x).pow(2).mean().backward()
    w.end_step()
w.close()
layer = w.reports[0].layer("relu()")  # the functional relu after self.a
print(json.dumps({"pos": [int(v) for v in layer.positive_counts], "truth": truth.tolist(),
                  "notes": w.reports[0].notes}))
"""


def test_watch_survives_torch_cond_when_the_compiler_is_not_loaded_yet(tmp_path):
    """torch.cond compiles its branches on its first call; in a sampled step whose compiler was not loaded
    (no optimizer made yet), it traced the probe's mode and the training step failed ('Could not guard on
    data-dependent expression'). A fresh interpreter: this one has loaded the compiler already."""
    import subprocess
    import sys

    script = tmp_path / "cond_watch.py"
    script.write_text(TORCH_COND_WATCH)
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["pos"] == result["truth"] and result["truth"][:3] == [0, 0, 0]
    assert any("torch.cond" in note for note in result["notes"]), result["notes"]
