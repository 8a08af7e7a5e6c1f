"""watch() where training goes wrong or starts again: a diverging run (NaN/Inf activations or weights)
keeps training and says so, a run resumed from a checkpoint writes windows that never overlap the first
run's, and a long run keeps a bounded number of reports. Truth: the tests' own forward hooks."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from deadrelu_cli import watch
from deadrelu_cli.report.model import load_report
from deadrelu_cli.watcher import layer_metrics


def _net() -> tuple[nn.Module, dict]:
    """fc1 → ReLU → fc2; `seen["act"]` collects the ReLU's outputs of the forwards since the last clear."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 1))
    seen: dict = {"act": []}
    model[1].register_forward_hook(lambda _m, _a, out: seen["act"].append(out.detach().clone()))
    return model, seen


def _fired(outputs: list[torch.Tensor]) -> np.ndarray:
    """Per unit, the elements > 0 (a NaN is not > 0): what a hook says fired."""
    return sum((out > 0).sum(0).numpy().astype(np.int64) for out in outputs)


def test_a_diverging_run_keeps_training_and_its_reports_say_so(tmp_path):
    model, seen = _net()
    g = torch.Generator().manual_seed(1)
    truth = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with watch(model, every=1, config=False, out_dir=tmp_path) as w:
            for step in range(4):
                if step == 2:  # the weights diverge: unit 0's pre-activation is NaN from now on
                    with torch.no_grad():
                        model[0].weight[0, 0] = float("nan")
                w.step()
                seen["act"].clear()
                model(torch.randn(5, 4, generator=g)).sum().backward()  # no exception from the watch
                truth.append(_fired(seen["act"]))
    assert [r.training.step for r in w.reports] == [0, 1, 2, 3]
    for report, fired in zip(w.reports, truth, strict=True):
        np.testing.assert_array_equal(report.layers[0].positive_counts, fired)
    # healthy windows are written; NaN windows cannot be (JSON holds no NaN) and say so in memory
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "deadrelu-step00000000.json",
        "deadrelu-step00000001.json",
    ]
    nan_window = w.reports[2]
    assert any("NaN activations" in note and "1 unit(s)" in note for note in nan_window.notes)
    assert any("not written" in note for note in nan_window.notes)
    metrics = layer_metrics(
        nan_window
    )  # what the callbacks log: not a dead fraction that looks like an answer
    assert math.isnan(metrics["deadrelu/dead_fraction/1"]) and math.isnan(metrics["deadrelu/dead_fraction"])
    assert metrics["deadrelu/nan_units"] == 1.0
    assert not any(math.isnan(v) for v in layer_metrics(w.reports[1]).values())
    diverged = [c for c in caught if "NaN activations" in str(c.message)]
    assert len(diverged) == 1  # once per run


def test_an_infinite_bias_is_left_out_and_the_window_still_written(tmp_path):
    model, seen = _net()
    with torch.no_grad():
        model[0].bias[2] = -float("inf")  # unit 2 can never fire: dead, and its bias is no JSON number
    with pytest.warns(UserWarning, match="NaN/Inf bias in 1"):
        with watch(model, every=1, config=False, out_dir=tmp_path) as w:
            w.step()
            model(torch.randn(7, 4)).sum().backward()
    written = load_report(tmp_path / "deadrelu-step00000000.json")
    np.testing.assert_array_equal(written.layers[0].positive_counts, _fired(seen["act"]))
    assert 2 in np.flatnonzero(written.layers[0].dead_mask())
    assert written.layers[0].bias is None
    assert any("NaN/Inf bias in 1" in note for note in written.notes)


def _run(model, seen, steps, out_dir, data_seed) -> dict[int, np.ndarray]:
    """Steps `steps` (w.step(global_step), as a resumed trainer gives them), every=2, window=2; the
    hooks' counts per sampled step."""
    g = torch.Generator().manual_seed(data_seed)
    per_step = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with watch(model, every=2, window=2, config=False, out_dir=out_dir) as w:
            for step in steps:
                sampled = w.step(step)
                seen["act"].clear()
                model(torch.randn(3, 4, generator=g) * 2).sum().backward()
                if sampled:
                    per_step[step] = _fired(seen["act"])
    return per_step


def test_a_resumed_run_replaces_the_first_runs_windows_of_its_steps(tmp_path):
    model, seen = _net()
    first = _run(model, seen, range(0, 9), tmp_path, data_seed=1)  # windows 0+2, 4+6, 8 (partial)
    second = _run(model, seen, range(5, 13), tmp_path, data_seed=2)  # resumed from a checkpoint at step 5
    # windows are blocks of every*window = 4 steps: the resumed run's 6 closes the block 4-7, its 8+10 the
    # block 8-11, 12 the next; the first run's partial window of step 8 is replaced, not left beside them
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [f"deadrelu-step{n:08d}.json" for n in (2, 6, 10, 12)]
    expected = {2: (first, [0, 2]), 6: (second, [6]), 10: (second, [8, 10]), 12: (second, [12])}
    for step, (run, steps) in expected.items():
        report = load_report(tmp_path / f"deadrelu-step{step:08d}.json")
        assert (report.training.first_step, report.training.step) == (steps[0], steps[-1])
        assert report.training.sampled_steps == len(steps)
        np.testing.assert_array_equal(report.layers[0].positive_counts, sum(run[s] for s in steps))
        assert report.data.samples == 3 * len(steps)


def test_a_long_run_keeps_a_bounded_number_of_reports():
    model, _ = _net()
    x = torch.randn(2, 4)
    w = watch(model, every=1, config=False)
    for _ in range(103):
        w.step()
        model(x)
    w.close()
    assert len(w.reports) == 100  # memory O(units), not O(windows)
    assert [r.training.step for r in w.reports[-2:]] == [101, 102]


def test_a_failed_lightning_fit_takes_the_probe_off(tmp_path):
    lightning = pytest.importorskip("lightning", reason="the lightning extra is not installed")
    from torch.nn.modules import module as torch_module

    from deadrelu_cli.integrations.lightning import DeadReluCallback

    fired = {}

    class Failing(lightning.LightningModule):
        def __init__(self):
            super().__init__()
            self.model, seen = _net()
            self.seen = seen

        def training_step(self, batch, batch_idx):
            self.seen["act"].clear()
            out = self.model(batch[0])
            fired[self.trainer.global_step] = _fired(self.seen["act"])
            if self.trainer.global_step == 2:
                raise RuntimeError("the loss went wrong")
            return out.pow(2).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    module = Failing()
    callback = DeadReluCallback(every=1, submodule="model", out_dir=tmp_path, config=False)
    trainer = lightning.Trainer(
        max_steps=5,
        callbacks=[callback],
        default_root_dir=tmp_path,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    data = torch.utils.data.TensorDataset(torch.randn(24, 4))
    with pytest.raises(RuntimeError, match="the loss went wrong"):
        trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=4))
    # nothing of the probe is left on the model or on every module of the process
    assert not module.model._forward_hooks and not module.model._forward_pre_hooks
    assert not torch_module._global_forward_hooks and not torch_module._global_forward_pre_hooks
    # one process: the open window (the failing step's forward) is reported, as leaving `with watch()` does
    last = load_report(tmp_path / "deadrelu-step00000002.json")
    np.testing.assert_array_equal(last.layers[0].positive_counts, fired[2])


def test_a_failing_rank_enters_no_collective(monkeypatch):
    """With several ranks, an exception leaving `with watch()` must not reduce the open window: the peers
    are still training, and the all_reduce would pair with their next window's."""
    import deadrelu_cli.watcher as watcher
    from deadrelu_cli.distributed import World

    model, _ = _net()
    monkeypatch.setattr(watcher.Watch, "_world", lambda self: World(1, 2, "gloo"))

    def no_collective(*args, **kwargs):
        raise AssertionError("a failing rank entered a collective")

    monkeypatch.setattr(watcher, "reduce_layers", no_collective)
    with pytest.raises(RuntimeError, match="data loader broke"):
        with watch(model, every=1, config=False) as w:
            w.step()
            model(torch.randn(2, 4))
            raise RuntimeError("data loader broke")
    assert w.reports == [] and not model._forward_hooks and not model._forward_pre_hooks
