"""train36: deadrelu in real training set-ups. Each test's truth comes from its own forward hooks, numpy
on the weights, or the frameworks' own optimizers and logs, never from the tool's output."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import arch_file
from torch import nn


def _mlp(dead=(0, 5)):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 12), nn.ReLU(), nn.Linear(12, 1))
    with torch.no_grad():
        net[0].bias[list(dead)] = -100.0  # planted dead units
    return net


def _fired(net, step_of):
    """The test's own hook: per step, which hidden units fired in that step's training forwards."""
    fired: dict[int, np.ndarray] = {}

    def hook(module, args, out):
        if torch.is_grad_enabled():
            mask = (out.detach() > 0).reshape(-1, out.shape[-1]).any(0).numpy()
            step = step_of()
            fired[step] = fired.get(step, np.zeros_like(mask)) | mask

    net[0].register_forward_hook(hook)
    return fired


class _MlpWithLoss(nn.Module):
    """_mlp() as a Hugging Face Trainer takes a model: labels in, a dict with the loss out."""

    def __init__(self):
        super().__init__()
        self.mlp = _mlp()

    def forward(self, x, labels=None):
        out = self.mlp(x)
        return {"loss": F.mse_loss(out, labels), "logits": out}


def test_hf_callback_logs_each_window_at_the_step_it_reports():
    """Before: the window of step k (its report, deadrelu-step<k>.json) reached log_history and every
    logger at step k+1 (the Trainer's global_step after the step). Now at step k, beside the report."""
    pytest.importorskip("accelerate", reason="the transformers extra is not installed")
    from transformers import Trainer, TrainingArguments

    from deadrelu_cli.integrations.hf_trainer import DeadReluCallback

    class Data(torch.utils.data.Dataset):
        def __len__(self):
            return 128

        def __getitem__(self, i):
            g = torch.Generator().manual_seed(i)
            return {"x": torch.randn(8, generator=g), "labels": torch.randn(1, generator=g)}

    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        model = _MlpWithLoss()
        args = TrainingArguments(
            output_dir=folder, max_steps=7, per_device_train_batch_size=16, logging_steps=1,
            save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True,
        )  # fmt: skip
        trainer = Trainer(model=model, args=args, train_dataset=Data())
        fired = _fired(model.mlp, lambda: trainer.state.global_step)  # steps: optimizer steps done before
        seen = []
        trainer.add_callback(type("Spy", (__import__("transformers").TrainerCallback,), {
            "on_log": lambda self, a, state, c, logs=None, **k: seen.append((state.global_step, dict(logs)))
        })())  # fmt: skip
        callback = DeadReluCallback(every=3, config=False).attach(trainer)
        trainer.train()
    entries = [h for h in trainer.state.log_history if "deadrelu/dead_fraction" in h]
    assert [h["step"] for h in entries] == [0, 3, 6]  # before: [1, 4, 7]
    for entry in entries:
        dead = ~fired[entry["step"]]
        assert entry["deadrelu/dead_fraction/mlp.1"] == pytest.approx(dead.mean())
    # what a reporting integration receives (its on_log reads state.global_step)
    assert [s for s, logs in seen if "deadrelu/dead" in logs] == [0, 3, 6]
    assert callback.watch.last.training.step == 6
    # the Trainer's own losses stay at their steps, and its global_step is restored
    assert [h["step"] for h in trainer.state.log_history if "loss" in h] == list(range(1, 8))
    assert trainer.state.global_step == 7


def test_hf_callback_not_attached_says_the_step_of_the_window_it_rides_with():
    """Given to Trainer(callbacks=[…]) the metrics ride along with the Trainer's next own log (a later
    step): `deadrelu/step` says which step's window they are (truth: the test's own hooks)."""
    pytest.importorskip("accelerate", reason="the transformers extra is not installed")
    import tempfile

    from transformers import Trainer, TrainingArguments

    from deadrelu_cli.integrations.hf_trainer import DeadReluCallback

    data = [{"x": torch.randn(8), "labels": torch.randn(1)} for _ in range(64)]
    with tempfile.TemporaryDirectory() as folder:
        model = _MlpWithLoss()
        args = TrainingArguments(
            output_dir=folder, max_steps=5, per_device_train_batch_size=16, logging_steps=2,
            save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True,
        )  # fmt: skip
        trainer = Trainer(
            model=model, args=args, train_dataset=data, callbacks=[DeadReluCallback(every=3, config=False)]
        )
        fired = _fired(model.mlp, lambda: trainer.state.global_step)
        trainer.train()
    entries = [h for h in trainer.state.log_history if "deadrelu/dead_fraction" in h]
    assert [h["deadrelu/step"] for h in entries] == [0, 3]
    for entry in entries:
        assert entry["step"] > entry["deadrelu/step"]  # the Trainer's log event that carried them
        assert entry["deadrelu/dead_fraction/mlp.1"] == pytest.approx((~fired[entry["deadrelu/step"]]).mean())


def test_lightning_callback_closes_the_window_in_the_batch_that_ends_the_step(tmp_path):
    """Before: a window closed at the next batch's start, so `stop_on_gate` stopped one batch late (2
    optimizer steps instead of 1). With gradient accumulation the window still holds both micro-batches."""
    L = pytest.importorskip("lightning", reason="the lightning extra is not installed")
    from lightning.pytorch.loggers import Logger

    from deadrelu_cli.integrations.lightning import DeadReluCallback

    class Recorder(Logger):
        name, version = "rec", 0

        def __init__(self):
            super().__init__()
            self.logged = []

        def log_metrics(self, metrics, step=None):
            self.logged.append((step, dict(metrics)))

        def log_hyperparams(self, *args, **kwargs):
            pass

        @property
        def experiment(self):
            return None

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = _mlp()
            self.rows = {}

        def training_step(self, batch, _):
            x, y = batch
            step = self.trainer.global_step
            self.rows[step] = self.rows.get(step, 0) + len(x)
            loss = F.mse_loss(self.model(x), y)
            self.log("loss", loss)
            return loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    data = torch.utils.data.TensorDataset(torch.randn(128, 8), torch.randn(128, 1))
    closed_at = []

    def run(accumulate, **options):
        module, logger = Module(), Recorder()
        callback = DeadReluCallback(every=2, submodule="model", config=False, **options)

        class Spy(L.Callback):  # after ours: has the window of this batch's step closed?
            def on_train_batch_end(self, trainer, *args):
                closed_at.append(
                    (trainer.global_step, callback.watch.last and callback.watch.last.training.step)
                )

        trainer = L.Trainer(
            max_steps=4, callbacks=[callback, Spy()], logger=logger, log_every_n_steps=1,
            accumulate_grad_batches=accumulate, enable_progress_bar=False, enable_checkpointing=False,
            enable_model_summary=False, accelerator="cpu", default_root_dir=tmp_path,
        )  # fmt: skip
        fired = _fired(module.model, lambda: trainer.global_step)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=8))
        return trainer, logger, callback, fired, module

    trainer, logger, callback, fired, _ = run(1, max_dead_layer=0.1, stop_on_gate=True)
    assert trainer.global_step == 1  # before: 2 (stopped one batch after the failing window)
    assert closed_at == [(1, 0)]  # the window of step 0 closed in step 0's own batch
    logged = [(s, m) for s, m in logger.logged if "deadrelu/dead" in m]
    assert [s for s, _ in logged] == [0]  # Lightning's step of that batch's own `self.log`
    assert [s for s, m in logger.logged if "loss" in m] == [0]
    closed_at.clear()
    trainer, logger, callback, fired, module = run(2)
    assert trainer.global_step == 4
    # two micro-batches per step: the window closes at the second, never at the first
    assert closed_at == [(0, None), (1, 0), (1, 0), (2, 0), (2, 0), (3, 2), (3, 2), (4, 2)]
    report = callback.watch.last  # the window of step 2: both micro-batches of that step
    assert report.training.step == 2
    assert report.layer("1").elements_per_unit == module.rows[2] == 16
    assert report.layer("1").dead_mask().tolist() == (~fired[2]).tolist()


def test_watch_samples_of_a_gan_step_are_the_rows_each_site_saw():
    """A GAN step runs G on B noise rows and D on B real + B generated rows. Before: data.samples added
    every forward's rows (G's and D's: 4B per step), matching no layer. Now the most any site saw (D: 3B),
    and G's layer says its own B (the test's own hooks count the rows at each site)."""
    from deadrelu_cli import watch

    torch.manual_seed(0)

    class GAN(nn.Module):
        def __init__(self):
            super().__init__()
            self.G = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 8))
            self.D = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))

    gan = GAN()
    rows = {"G.1": 0, "D.1": 0}
    for name in rows:
        gan.get_submodule(name).register_forward_hook(
            lambda m, a, o, name=name: rows.__setitem__(name, rows[name] + a[0].shape[0])
        )
    opt_g, opt_d = torch.optim.Adam(gan.G.parameters()), torch.optim.Adam(gan.D.parameters())
    batch = 10
    with watch(gan, every=1, window=2, config=False) as w:
        for _ in range(2):
            w.step()
            real, fake = torch.randn(batch, 8), gan.G(torch.randn(batch, 4))
            loss_d = gan.D(fake.detach()).mean() - gan.D(real).mean()
            opt_d.zero_grad()
            loss_d.backward()
            opt_d.step()
            loss_g = -gan.D(fake).mean()
            opt_g.zero_grad()
            loss_g.backward()
            opt_g.step()
    (report,) = w.reports
    assert rows == {"G.1": 2 * batch, "D.1": 6 * batch}
    assert report.data.samples == rows["D.1"]  # before: 80
    assert report.layer("D.1").samples is None  # all of data.samples
    assert report.layer("G.1").samples == rows["G.1"]
    for name in rows:
        assert report.layer(name).elements_per_unit == rows[name]
    # `deadrelu merge` of a window where G saw the most rows (G: all of them, D fewer) with a GAN step's
    # window where D did: every layer's samples add up
    from deadrelu_cli.report.model import merge_reports

    w = watch(gan, every=1, config=False)
    w.step()
    gan.D(gan.G(torch.randn(2 * batch, 4))[:batch])
    w.step()
    gan.D(torch.cat([gan.G(torch.randn(batch, 4)), torch.randn(batch, 8)]))
    w.close()
    first, second = w.reports
    assert first.data.samples == 2 * batch and first.layer("G.1").samples is None
    assert second.data.samples == 2 * batch and second.layer("G.1").samples == batch
    merged = merge_reports([first, second])
    assert merged.data.samples == 4 * batch
    assert merged.layer("G.1").samples == merged.layer("D.1").samples == 3 * batch  # before: G None (4B)
    assert merged.layer("G.1").elements_per_unit == 3 * batch


ARCH = """
from torch import nn


def build():
    return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 4))
"""
KILLED = [1, 4, 9]


def test_adafactor_factored_moments_of_recycled_units_are_reset_and_resumed(cli, tmp_path):
    """transformers' Adafactor keeps a weight's second moment as a row factor [out] and a column factor
    [in]. Before: they were kept (only a note) and the resume check refused (exit 2). Now the row factor
    of each re-initialised row and the column factor of each zeroed consumer column are zero, every other
    entry byte-identical, and the resume check runs Adafactor itself."""
    transformers = pytest.importorskip("transformers", reason="the transformers extra is not installed")
    Adafactor = transformers.optimization.Adafactor
    model, spec = arch_file(tmp_path / "arch.py", ARCH)
    model.train()
    x, y = torch.randn(256, 8), torch.randn(256, 4)
    optimizer = Adafactor(model.parameters(), lr=1e-2, relative_step=False, scale_parameter=False, beta1=0.9)
    for _ in range(5):
        loss = F.mse_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        model[0].bias[KILLED] = -100.0
    before = optimizer.state_dict()
    torch.save({"model": model.state_dict(), "optimizer": before, "epoch": 1}, tmp_path / "ckpt.pt")
    np.savez(tmp_path / "data.npz", x=x.numpy())
    # truth: dead units of both layers from the weights, in numpy
    w1, b1 = model[0].weight.detach().double().numpy(), model[0].bias.detach().double().numpy()
    w2, b2 = model[2].weight.detach().double().numpy(), model[2].bias.detach().double().numpy()
    pre1 = x.double().numpy() @ w1.T + b1
    pre2 = np.maximum(pre1, 0) @ w2.T + b2
    dead1 = np.flatnonzero((pre1 <= 0).all(0))
    dead2 = np.flatnonzero((pre2 <= 0).all(0))
    assert set(KILLED) <= set(dead1.tolist())
    out = tmp_path / "fixed.pt"
    result = cli("fix", tmp_path / "ckpt.pt", "--arch", spec, "--data", tmp_path / "data.npz",
                 "-s", "reinit", "-o", out, "--json", "-")  # fmt: skip
    assert result.code == 0, result.err  # before: 2 (resume check refused)
    after = torch.load(out, weights_only=True)["optimizer"]
    # parameter order: 0 w1, 1 b1, 2 w2, 3 b2, 4 w3, 5 b3; what each rewritten entry is
    zero = {  # key -> (param index, factor) -> indices that must be zero
        (0, "exp_avg_sq_row"): dead1, (2, "exp_avg_sq_col"): dead1,
        (2, "exp_avg_sq_row"): dead2, (4, "exp_avg_sq_col"): dead2,
        (1, "exp_avg_sq"): dead1, (3, "exp_avg_sq"): dead2,
    }  # fmt: skip
    full = {0: (dead1, None), 1: (dead1, None), 2: (dead2, dead1), 3: (dead2, None), 4: (None, dead2)}
    for index, entry in before["state"].items():
        for key, value in entry.items():
            new = after["state"][index][key]
            if not isinstance(value, torch.Tensor) or value.dim() == 0:
                assert new == value if not isinstance(value, torch.Tensor) else torch.equal(new, value)
                continue
            mask = np.zeros(tuple(value.shape), bool)
            if (index, key) in zero:
                mask[zero[(index, key)]] = True
            elif key == "exp_avg" and index in full:  # beta1's first moment: whole rows and columns
                rows, cols = full[index]
                if rows is not None:
                    mask[rows] = True
                if cols is not None:
                    mask[:, cols] = True
            old_v, new_v = value.numpy(), new.numpy()
            assert (new_v[mask] == 0).all(), (index, key)
            assert new_v[~mask].tobytes() == old_v[~mask].tobytes(), (index, key)
    # the resume check, against transformers' own Adafactor: 10 steps with zero gradients from the
    # written state over the written weights, then which recycled units fire (numpy)
    resumed, _ = arch_file(tmp_path / "arch2.py", ARCH)
    resumed.load_state_dict(torch.load(out, weights_only=True)["model"])
    again = Adafactor(resumed.parameters(), lr=1e-2, relative_step=False, scale_parameter=False, beta1=0.9)
    again.load_state_dict(after)
    for _ in range(10):
        for parameter in resumed.parameters():
            parameter.grad = torch.zeros_like(parameter)
        again.step()
    with torch.no_grad():
        pre1 = resumed[0](x)
        pre2 = resumed[2](torch.relu(pre1))
    alive = {"1": int((pre1[:, dead1] > 0).any(0).sum()), "3": int((pre2[:, dead2] > 0).any(0).sum())}
    reported = {layer["name"]: layer["alive_after_resume"] for layer in json.loads(result.out)["layers"]}
    assert reported == {name: count for name, count in alive.items() if name in reported}
    assert reported["1"] == len(dead1)
    # and it trains on in transformers' own Adafactor
    F.mse_loss(resumed(x), y).backward()
    again.step()
    assert all(torch.isfinite(p).all() for p in resumed.parameters())


GAN_ARCH = """
from torch import nn


class GAN(nn.Module):
    def __init__(self):
        super().__init__()
        self.G = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 8))
        self.D = nn.Sequential(nn.Linear(8, 24), nn.ReLU(), nn.Linear(24, 1))

    def forward(self, z):
        return self.D(self.G(z))


def build():
    return GAN()


def build_g():
    return GAN().G
"""


def test_a_checkpoint_with_several_weight_dicts_is_fixed_only_under_the_named_one(cli, tmp_path):
    """{"model", "G", "D", "opt_g", "opt_d"}: before, fix rewrote "model" alone and wrote G and D back
    with their dead units, saying nothing about them. Now: without --weights-key, one line listing the
    candidates (exit 2); with --weights-key G, G is fixed (its dead unit fires again, by numpy), every
    other weight dict and D's optimizer are byte-identical, G's optimizer reset at the rewritten rows."""
    gan, spec = arch_file(tmp_path / "gan.py", GAN_ARCH)
    gan.train()
    with torch.no_grad():
        gan.G[0].bias[[3, 7]] = -100.0
    opt_g, opt_d = torch.optim.Adam(gan.G.parameters()), torch.optim.Adam(gan.D.parameters())
    z = torch.randn(64, 4)
    for _ in range(3):
        loss = gan(z).mean()
        opt_g.zero_grad()
        opt_d.zero_grad()
        loss.backward()
        opt_g.step()
        opt_d.step()
    checkpoint = {
        "model": gan.state_dict(), "G": gan.G.state_dict(), "D": gan.D.state_dict(),
        "opt_g": opt_g.state_dict(), "opt_d": opt_d.state_dict(), "epoch": 3,
    }  # fmt: skip
    torch.save(checkpoint, tmp_path / "gan.pt")
    np.savez(tmp_path / "z.npz", z=z.numpy())
    out = tmp_path / "fixed.pt"
    args = ("fix", tmp_path / "gan.pt", "--data", tmp_path / "z.npz", "-s", "reinit", "-o", out)
    result = cli(*args, "--arch", spec)
    assert result.code == 2 and not out.exists()  # before: 0, "model" fixed, G and D kept
    assert len(result.err.strip().splitlines()) == 1
    assert "'model', 'G', 'D'" in result.err and "--weights-key" in result.err
    result = cli(*args, "--arch", spec.replace(":build", ":build_g"), "--weights-key", "G")
    assert result.code == 0, result.err
    written = torch.load(out, weights_only=True)
    g = written["G"]
    pre = z.double().numpy() @ g["0.weight"].double().numpy().T + g["0.bias"].double().numpy()
    assert (pre > 0).any(0).all()  # every G unit fires again
    for key in ("model", "D", "opt_d", "epoch"):
        assert _same(written[key], checkpoint[key]), key
    moments = written["opt_g"]["state"][0]["exp_avg"]
    assert (moments[[3, 7]] == 0).all() and (np.delete(moments.numpy(), [3, 7], 0) != 0).any()
    assert "'model', 'D' written back as they were" in result.out
    assert "opt_d" in result.out and "kept as it was" in result.out
    # a format with no weight dicts: said, not ignored
    from safetensors.torch import save_file

    save_file(checkpoint["G"], tmp_path / "g.safetensors")
    result = cli("scan", tmp_path / "g.safetensors", "--arch", spec.replace(":build", ":build_g"),
                 "--data", tmp_path / "z.npz", "--weights-key", "G")  # fmt: skip
    assert (
        result.code == 2
        and len(result.err.strip().splitlines()) == 1
        and "not a torch checkpoint dict" in result.err
    )


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return a.dtype == b.dtype and a.numpy().tobytes() == b.numpy().tobytes()
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.act = nn.Linear(8, 16), nn.ReLU()
        self.block = nn.Sequential(nn.Linear(16, 16), nn.ReLU())
        self.fc2 = nn.Linear(16, 1)
        with torch.no_grad():
            self.fc1.bias[:3] = -100.0  # planted dead

    def forward(self, x):
        return self.fc2(self.block(self.act(self.fc1(x))))


def _watched_once(wrapped, base, x) -> dict:
    """One sampled step of `wrapped`; checks each layer against the test's own hooks on `base`."""
    from deadrelu_cli import watch

    counts = {}
    handles = [
        module.register_forward_hook(lambda m, a, o, n=name: counts.__setitem__(n, (a[0] > 0).sum(0).numpy()))
        for name, module in (("act", base.act), ("block.1", base.block[1]))
    ]
    with watch(wrapped, every=1, config=False) as w:
        w.step()
        wrapped(x).sum().backward()
    for handle in handles:
        handle.remove()
    layers = {layer.name: layer for layer in w.reports[0].layers}
    assert sorted(layers) == sorted(counts)  # the base model's names
    for name, layer in layers.items():
        np.testing.assert_array_equal(layer.positive_counts, counts[name])
        assert layer.elements_per_unit == len(x)
    return layers


def test_a_peft_model_is_watched_with_the_base_models_names():
    """watch(get_peft_model(net, LoraConfig(…))): before, layers were named `base_model.model.act`; now
    `act`, as a scan of the base model's weights names them. Counts equal the test's own hooks."""
    peft = pytest.importorskip("peft", reason="peft is not installed (the test extra installs it)")
    torch.manual_seed(0)
    base = _Net()
    wrapped = peft.get_peft_model(base, peft.LoraConfig(target_modules=["fc1", "block.0", "fc2"], r=2))
    layers = _watched_once(wrapped, base, torch.randn(10, 8))
    assert layers["act"].dead_mask().nonzero()[0].tolist() == [0, 1, 2]


@pytest.mark.filterwarnings("ignore:FSDP is switching to use `NO_SHARD`:UserWarning")
@pytest.mark.parametrize("kind", ["fsdp1", "fsdp1-nested", "fsdp2"])
def test_fsdp_models_are_watched_as_the_module_inside(tmp_path, kind):
    """FSDP1 (`FullyShardedDataParallel`, also auto-wrapped: `_fsdp_wrapped_module.` inside every name)
    and FSDP2 (`fully_shard`: DTensor parameters) in a gloo world of one process: names are the model's,
    counts equal the test's own hooks, biases are the full ones. Before: FSDP1 names kept the wrapper's
    segments; FSDP2 failed when the window closed (`.numpy()` on a DTensor bias). Two processes:
    scripts/check_fsdp_watch.py (too slow for the suite)."""
    import torch.distributed as dist
    from torch.distributed.fsdp import FullyShardedDataParallel, fully_shard
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    torch.manual_seed(0)
    base = _Net()
    bias = base.fc1.bias.detach().clone()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        if kind == "fsdp2":
            fully_shard(base.block)
            wrapped = fully_shard(base)
        else:
            policy = ModuleWrapPolicy({nn.Sequential}) if kind == "fsdp1-nested" else None
            wrapped = FullyShardedDataParallel(base, device_id=torch.device("cpu"), auto_wrap_policy=policy)
        layers = _watched_once(wrapped, base, torch.randn(10, 8))
        np.testing.assert_array_equal(layers["act"].bias, bias.double().numpy())  # no optimizer step
    finally:
        dist.destroy_process_group()
