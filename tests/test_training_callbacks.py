"""The Lightning and Hugging Face Trainer callbacks on tiny models: metrics logged, reports written, the
gate stops training — checked against dead sets from the test's own forward hooks."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

EVERY = 3


def _planted_mlp() -> nn.Sequential:
    """4 → 12 → 1 with units 0 and 5 of the hidden layer dead from the start (bias far below zero)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 12), nn.ReLU(), nn.Linear(12, 1))
    with torch.no_grad():
        model[0].bias[[0, 5]] = -100.0
    return model


def _reference_hook(fired: dict[int, np.ndarray], current_step):
    """A plain forward hook on the hidden Linear: per step, which units' pre-activations were > 0."""

    def hook(_module, _inputs, output):
        if not torch.is_grad_enabled():  # validation / evaluation forwards are not training steps
            return
        step = current_step()
        mask = (output.detach().numpy() > 0).any(axis=0)
        fired[step] = fired.get(step, np.zeros_like(mask)) | mask

    return hook


def _data(n=48):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 4, generator=g), torch.randn(n, 1, generator=g)


def test_lightning_callback_logs_writes_and_stops(tmp_path):
    L = pytest.importorskip("lightning", reason="the lightning extra is not installed")
    from lightning.pytorch.loggers import Logger

    from deadrelu_cli.integrations.lightning import DeadReluCallback
    from deadrelu_cli.report.model import load_report

    class Recorder(Logger):  # a logger of the trainer, like TensorBoard or CSV would be
        def __init__(self):
            super().__init__()
            self.logged: list[tuple[int, dict]] = []

        name, version = "recorder", 0

        def log_metrics(self, metrics, step=None):
            self.logged.append((step, dict(metrics)))

        def log_hyperparams(self, params, *args, **kwargs):
            pass

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = _planted_mlp()

        def training_step(self, batch, _index):
            x, y = batch
            return F.mse_loss(self.model(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05)

    def run(steps, submodule="model", **options):
        module = Module()
        fired: dict[int, np.ndarray] = {}
        module.model[0].register_forward_hook(_reference_hook(fired, lambda: module.trainer.global_step))
        logger = Recorder()
        callback = DeadReluCallback(every=EVERY, submodule=submodule, config=False, **options)
        trainer = L.Trainer(
            max_steps=steps,
            default_root_dir=tmp_path,
            logger=logger,
            callbacks=[callback],
            enable_progress_bar=False,
            enable_model_summary=False,
            accelerator="cpu",
        )
        x, y = _data()
        trainer.fit(module, torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16))
        return trainer, logger, fired

    trainer, logger, fired = run(8)
    sampled = [s for s in sorted(fired) if s % EVERY == 0]
    assert sampled == [0, 3, 6]
    logged = {step: m for step, m in logger.logged if any(k.startswith("deadrelu/") for k in m)}
    assert sorted(logged) == sampled
    folder = tmp_path / "recorder" / "version_0" / "checkpoints" / "deadrelu"  # next to the .ckpt files
    assert any(p.suffix == ".ckpt" for p in folder.parent.iterdir())
    for step in sampled:
        dead = set(np.flatnonzero(~fired[step]).tolist())
        assert {0, 5} <= dead
        assert logged[step]["deadrelu/dead_fraction/1"] == pytest.approx(len(dead) / 12)
        report = load_report(folder / f"deadrelu-step{step:08d}.json")
        assert set(report.layer("1").dead_mask().nonzero()[0].tolist()) == dead
        assert report.training.step == step and report.training.epoch == step // 3
    # a limit that the planted units exceed: one warning, training stops after the first window
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer, _, _ = run(8, max_dead_layer=0.1, stop_on_gate=True, out_dir=tmp_path / "gate")
    messages = [str(c.message) for c in caught if "deadrelu" in str(c.message)]
    assert len(messages) == 1 and "layer 1:" in messages[0] and "16.7% dead" in messages[0]
    assert trainer.global_step < 8
    # the LightningModule itself watched: its training_step calls self.model(x), never forward(); those
    # calls are its forwards (before: "no relu call", a dead fraction of 0 in every logger)
    _, logger, fired = run(4, submodule=None, out_dir=tmp_path / "whole")
    logged = {step: m for step, m in logger.logged if any(k.startswith("deadrelu/") for k in m)}
    assert sorted(logged) == [0, 3]
    for step in (0, 3):
        assert logged[step]["deadrelu/dead_fraction/model.1"] == pytest.approx((~fired[step]).sum() / 12)


def test_hf_trainer_callback_logs_writes_and_stops(tmp_path):
    pytest.importorskip("transformers", reason="the transformers extra is not installed")
    pytest.importorskip("accelerate", reason="the transformers extra is not installed")
    from transformers import Trainer, TrainingArguments

    from deadrelu_cli.integrations.hf_trainer import DeadReluCallback
    from deadrelu_cli.report.model import load_report

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.mlp = _planted_mlp()

        def forward(self, x, labels=None):
            out = self.mlp(x)
            return {"loss": F.mse_loss(out, labels), "logits": out}

    class Data(torch.utils.data.Dataset):
        def __init__(self):
            self.x, self.y = _data()

        def __len__(self):
            return len(self.x)

        def __getitem__(self, i):
            return {"x": self.x[i], "labels": self.y[i]}

    def run(steps, attach=True, **options):
        model = Net()
        args = TrainingArguments(
            output_dir=str(tmp_path / "out"),
            max_steps=steps,
            per_device_train_batch_size=16,
            logging_steps=2,
            save_strategy="no",
            report_to=[],
            use_cpu=True,
            disable_tqdm=True,
            learning_rate=0.05,
        )
        trainer = Trainer(model=model, args=args, train_dataset=Data())
        fired: dict[int, np.ndarray] = {}
        model.mlp[0].register_forward_hook(_reference_hook(fired, lambda: trainer.state.global_step))
        callback = DeadReluCallback(every=EVERY, config=False, **options)
        if attach:
            callback.attach(trainer)
        else:
            trainer.add_callback(callback)
        trainer.train()
        return trainer, fired

    trainer, fired = run(8)
    sampled = [s for s in sorted(fired) if s % EVERY == 0]
    assert sampled == [0, 3, 6]
    entries = [h for h in trainer.state.log_history if "deadrelu/dead_fraction" in h]
    assert len(entries) == 3
    folder = tmp_path / "out" / "deadrelu"
    assert sorted(p.name for p in folder.iterdir()) == [f"deadrelu-step{s:08d}.json" for s in sampled]
    for step, entry in zip(sampled, entries, strict=True):
        dead = set(np.flatnonzero(~fired[step]).tolist())
        assert {0, 5} <= dead
        assert entry["deadrelu/dead_fraction/mlp.1"] == pytest.approx(len(dead) / 12)
        report = load_report(folder / f"deadrelu-step{step:08d}.json")
        assert set(report.layer("mlp.1").dead_mask().nonzero()[0].tolist()) == dead
        assert json.loads((folder / f"deadrelu-step{step:08d}.json").read_text())["training"]["step"] == step
    # added without attach: the metrics ride along with the Trainer's own log events
    trainer, fired = run(4, attach=False, out_dir=tmp_path / "plain")
    entries = [h for h in trainer.state.log_history if "deadrelu/dead_fraction/mlp.1" in h]
    assert len(entries) == 2  # windows at steps 0 and 3
    # the gate: one warning, training stops after the first window
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer, _ = run(8, max_dead_layer=0.1, stop_on_gate=True, out_dir=tmp_path / "gate")
    messages = [str(c.message) for c in caught if "deadrelu" in str(c.message)]
    assert len(messages) == 1 and "layer mlp.1:" in messages[0]
    assert trainer.state.global_step == 1


def test_hf_trainer_masks_padding_from_the_forwards_attention_mask(tmp_path):
    """A tiny OPT (random weights) trained by a real Trainer on padded batches: each window's counts are
    those of the attended positions only, read from the forward's own attention_mask. Reference: plain
    forward hooks on the ReLU modules and the forward's kwargs, masked in numpy. A planted unit fires on
    padding only: dead with the mask, alive with `mask=None`."""
    pytest.importorskip("accelerate", reason="the transformers extra is not installed")
    from hf_models import PAD, opt_model, plant_pad_only_unit, relu_sites, token_data
    from transformers import Trainer, TrainingArguments

    from deadrelu_cli.integrations.hf_trainer import DeadReluCallback
    from deadrelu_cli.report.model import load_report

    ids, mask = token_data(samples=12, tokens=10, seed=3)
    assert (mask == 0).any()

    class Tokens(torch.utils.data.Dataset):
        def __len__(self):
            return len(ids)

        def __getitem__(self, i):
            labels = np.where(mask[i] == 1, ids[i], -100)
            return {
                "input_ids": torch.from_numpy(ids[i]),
                "attention_mask": torch.from_numpy(mask[i]),
                "labels": torch.from_numpy(labels),
            }

    def run(folder, **options):
        model = opt_model(seed=1)
        site, unit = plant_pad_only_unit(model, ids, mask)
        model.train()
        args = TrainingArguments(
            output_dir=str(folder),
            max_steps=3,
            per_device_train_batch_size=4,
            save_strategy="no",
            report_to=[],
            use_cpu=True,
            disable_tqdm=True,
            learning_rate=1e-3,
        )
        trainer = Trainer(model=model, args=args, train_dataset=Tokens())
        seen: dict[int, dict] = {}  # step -> the reference's counts

        def keep_mask(_module, _args, kwargs):
            seen.setdefault(trainer.state.global_step, {})["mask"] = kwargs["attention_mask"].numpy() != 0

        def count(name):
            def hook(_module, _args, output):
                entry = seen[trainer.state.global_step]
                keep = entry["mask"]
                act = output.detach().numpy().reshape(keep.shape[0], keep.shape[1], -1)[keep]
                entry[name] = ((act > 0).sum(axis=0), int(keep.sum()))

            return hook

        model.register_forward_pre_hook(keep_mask, with_kwargs=True)
        for name, module in relu_sites(model).items():
            module.register_forward_hook(count(name))
        DeadReluCallback(every=1, config=False, **options).attach(trainer)
        trainer.train()
        return seen, site, unit

    seen, site, unit = run(tmp_path / "masked")
    assert sorted(seen) == [0, 1, 2]
    for step, expected in seen.items():
        report = load_report(tmp_path / "masked" / "deadrelu" / f"deadrelu-step{step:08d}.json")
        names = [n for n in expected if n != "mask"]
        assert sorted(layer.name for layer in report.layers) == sorted(names)
        for name in names:
            counts, kept = expected[name]
            layer = report.layer(name)
            assert layer.elements_per_unit == kept < expected["mask"].size  # padding was left out
            assert layer.positive_counts.tolist() == counts.tolist()
            assert layer.extra.get("position_mask") == "applied"
        assert report.layer(site).positive_counts[unit] == 0  # fires on padding only
    # turned off: every position counts, and the planted unit fires (on the padding)
    plain, site, unit = run(tmp_path / "plain", mask=None)
    report = load_report(tmp_path / "plain" / "deadrelu" / "deadrelu-step00000000.json")
    assert report.layer(site).elements_per_unit == plain[0]["mask"].size
    assert report.layer(site).positive_counts[unit] > 0
    assert PAD in ids
