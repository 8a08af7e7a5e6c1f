"""deadrelu added to real training setups (trial 32): the Hugging Face Trainer's own logs kept, a Trainer
`checkpoint-N/` folder fixed as a folder resumes with the recycled units' moments reset, optimizer states
under any key (a GAN's two) reset and all of them resumed. Ground truth: plain torch hooks, the test's own
parameter maps, torch's own optimizers."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import arch_file
from torch import nn

# -- the Hugging Face Trainer -------------------------------------------------------------------------


def _tiny_bert(folder=None):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=50,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=24,
        hidden_act="relu",
        max_position_embeddings=16,
        num_labels=2,
    )
    return BertForSequenceClassification(config)


class _Tokens(torch.utils.data.Dataset):
    def __init__(self, n=32, seed=1):
        g = torch.Generator().manual_seed(seed)
        lengths = torch.randint(3, 11, (n,), generator=g)
        self.mask = (torch.arange(10)[None] < lengths[:, None]).long()
        self.ids = torch.randint(1, 50, (n, 10), generator=g) * self.mask
        self.y = torch.randint(0, 2, (n,), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i], "labels": self.y[i]}


def test_hf_callback_keeps_the_trainers_own_log_of_a_window_step(tmp_path):
    """Trainer.log (what attach() logs through) clears control.should_log: the Trainer's own loss log of
    a step where a window closed was dropped (no loss at that step in log_history or any logger)."""
    pytest.importorskip("transformers", reason="the transformers extra is not installed")
    from transformers import Trainer, TrainingArguments

    from deadrelu_cli.integrations.hf_trainer import DeadReluCallback

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.mlp = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))

        def forward(self, x, labels=None):
            out = self.mlp(x)
            return {"loss": F.mse_loss(out, labels), "logits": out}

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 4, generator=g), torch.randn(64, 1, generator=g)

    class Data(torch.utils.data.Dataset):
        def __len__(self):
            return len(x)

        def __getitem__(self, i):
            return {"x": x[i], "labels": y[i]}

    def run(with_callback):
        args = TrainingArguments(
            output_dir=str(tmp_path / "out"),
            max_steps=6,
            per_device_train_batch_size=16,
            logging_steps=1,
            save_strategy="no",
            report_to=[],
            use_cpu=True,
            disable_tqdm=True,
        )
        trainer = Trainer(model=Net(), args=args, train_dataset=Data())
        if with_callback:
            DeadReluCallback(every=2, config=False).attach(trainer)
        trainer.train()
        return {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}

    plain = run(False)
    assert sorted(plain) == [1, 2, 3, 4, 5, 6]
    assert run(True) == pytest.approx(plain)  # every loss of the run without deadrelu, at its step


def test_fix_of_a_trainer_checkpoint_folder_resets_its_optimizer_and_resumes(cli, tmp_path):
    """`deadrelu fix checkpoint-N/ --output FIXED/` (the folder, as a model folder) copied optimizer.pt
    unchanged: the recycled units kept the moments that had killed them. And `deadrelu trend` over the
    Trainer's output_dir (its checkpoint-N/ folders) said "no checkpoint files", and over the folders
    themselves asked for --arch."""
    pytest.importorskip("transformers", reason="the transformers extra is not installed")
    from safetensors.torch import load_file, save_file
    from transformers import Trainer, TrainingArguments

    def args(steps):
        return TrainingArguments(
            output_dir=str(tmp_path / "run"),
            max_steps=steps,
            per_device_train_batch_size=8,
            save_steps=2,
            report_to=[],
            use_cpu=True,
            disable_tqdm=True,
            learning_rate=1e-2,
        )

    model = _tiny_bert()
    trainer = Trainer(model=model, args=args(4), train_dataset=_Tokens())
    trainer.train()
    folder = tmp_path / "run" / "checkpoint-4"
    killed = [0, 3, 7]  # units that die at the checkpoint: their moments are those of live units
    weights = load_file(folder / "model.safetensors")
    weights["bert.encoder.layer.0.intermediate.dense.bias"][killed] = -100.0
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    data = _Tokens(16, seed=2)
    np.savez(tmp_path / "tokens.npz", input_ids=data.ids.numpy(), attention_mask=data.mask.numpy())

    # which units are dead on the data, from plain hooks over the real positions
    fired = {}

    def hook(name):
        def record(_module, args):
            kept = args[0][data.mask.bool()]
            fired[name] = fired.get(name, 0) + (kept > 0).sum(0)

        return record

    for i in range(2):
        model.bert.encoder.layer[i].intermediate.intermediate_act_fn.register_forward_pre_hook(hook(i))

    def dead_on_data(state):
        fired.clear()
        model.load_state_dict(state, strict=False)
        with torch.no_grad():
            model.eval()(input_ids=data.ids, attention_mask=data.mask)
        return {i: torch.nonzero(fired[i] == 0).flatten().tolist() for i in fired}

    earlier = dead_on_data(load_file(tmp_path / "run" / "checkpoint-2" / "model.safetensors"))
    dead = dead_on_data(weights)
    assert set(killed) <= set(dead[0])

    trend = cli("trend", tmp_path / "run", "--data", tmp_path / "tokens.npz", "--json", tmp_path / "t.json")
    assert trend.code == 0, trend.err
    found = json.loads((tmp_path / "t.json").read_text())
    assert [c["step"] for c in found["checkpoints"]] == [2, 4]
    for i in range(2):
        layer = next(
            t
            for t in found["layers"]
            if t["name"] == f"bert.encoder.layer.{i}.intermediate.intermediate_act_fn"
        )
        assert layer["dead_fraction"] == [len(earlier[i]) / 24, len(dead[i]) / 24]
    assert sorted(int(u) for u in layer_died(found, 0)) == sorted(set(dead[0]) - set(earlier[0]))

    out = tmp_path / "fixed"
    result = cli(
        "fix",
        folder,
        "--data",
        tmp_path / "tokens.npz",
        "-s",
        "reinit",
        "-o",
        out,
        "--json",
        tmp_path / "f.json",
    )
    assert result.code == 0, result.err
    before = torch.load(folder / "optimizer.pt", weights_only=True)
    after = torch.load(out / "optimizer.pt", weights_only=True)
    # the Trainer's two groups (transformers' own rule for which parameters decay), in model order
    decay = set(trainer.get_decay_parameter_names(model))
    names = [n for n, _ in model.named_parameters() if n in decay]
    names += [n for n, _ in model.named_parameters() if n not in decay]
    assert [len(g["params"]) for g in before["param_groups"]] == [len(decay), len(names) - len(decay)]
    masks = {n: np.zeros(tuple(p.shape), bool) for n, p in model.named_parameters()}
    for i, units in dead.items():
        layer = f"bert.encoder.layer.{i}"
        masks[f"{layer}.intermediate.dense.weight"][units, :] = True
        masks[f"{layer}.intermediate.dense.bias"][units] = True
        masks[f"{layer}.output.dense.weight"][:, units] = True
    assert after["param_groups"] == before["param_groups"]
    for index, entry in before["state"].items():
        mask = masks[names[index]]
        for key, value in entry.items():
            old, new = value.numpy(), after["state"][index][key].numpy()
            if key in ("exp_avg", "exp_avg_sq") and mask.any():
                assert (old[mask] != 0).any(), names[index]  # there was something to reset
                assert (new[mask] == 0).all(), names[index]
                assert new[~mask].tobytes() == old[~mask].tobytes()
            else:
                assert new.tobytes() == old.tobytes(), (names[index], key)
    for name in ("scheduler.pt", "trainer_state.json", "rng_state.pth", "training_args.bin", "config.json"):
        assert (out / name).read_bytes() == (folder / name).read_bytes(), name
    layers = {layer["name"]: layer for layer in json.loads((tmp_path / "f.json").read_text())["layers"]}
    assert layers["bert.encoder.layer.0.intermediate.intermediate_act_fn"]["alive_after_resume"] is not None
    # the Trainer resumes from the fixed folder
    trainer = Trainer(model=_tiny_bert(), args=args(5), train_dataset=_Tokens())
    trainer.train(resume_from_checkpoint=str(out))
    assert trainer.state.global_step == 5


def layer_died(trend: dict, i: int) -> dict:
    name = f"bert.encoder.layer.{i}.intermediate.intermediate_act_fn"
    return next(t for t in trend["layers"] if t["name"] == name)["died_at"]


# -- optimizer states under other keys: a GAN's two -----------------------------------------------------

GAN = """
import torch
from torch import nn


class GAN(nn.Module):
    def __init__(self):
        super().__init__()
        self.G = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 8))
        self.D = nn.Sequential(nn.Linear(8, 12), nn.ReLU(), nn.Linear(12, 1))

    def forward(self, z):
        return self.D(self.G(z))


def build():
    return GAN()
"""
D_KILLED = [0, 2, 5, 6, 9, 11]


def _gan_checkpoint(tmp_path, layout):
    model, spec = arch_file(tmp_path / "gan.py", GAN)
    torch.manual_seed(0)
    z = torch.randn(64, 4)
    np.savez(tmp_path / "z.npz", z=z.numpy())
    opt_d = torch.optim.Adam(model.D.parameters(), lr=1e-2)
    opt_g = torch.optim.Adam(model.G.parameters(), lr=1e-2)
    for _ in range(3):
        loss = model(z).pow(2).mean() - model.G(z).mean()
        opt_d.zero_grad()
        opt_g.zero_grad()
        loss.backward()
        opt_d.step()
        opt_g.step()
    with torch.no_grad():
        model.D[0].bias[D_KILLED] = -100.0  # killed at the checkpoint: their moments are a live unit's
    # G's stale moments would push its output bias far down when training resumes
    for param in model.G[2].parameters():
        opt_g.state[param]["exp_avg"].fill_(0.0 if param.dim() == 2 else 0.5)
        opt_g.state[param]["exp_avg_sq"].fill_(0.0 if param.dim() == 2 else 1e-6)
    if layout == "lightning":  # D's optimizer first, as a LightningModule may list them
        checkpoint = {
            "state_dict": model.state_dict(),
            "optimizer_states": [opt_d.state_dict(), opt_g.state_dict()],
        }
    elif layout == "nested":  # a dict of them
        checkpoint = {
            "model": model.state_dict(),
            "optimizers": {"D": opt_d.state_dict(), "G": opt_g.state_dict()},
        }
    else:  # a plain GAN script's own keys
        checkpoint = {
            "model": model.state_dict(),
            "opt_d": opt_d.state_dict(),
            "opt_g": opt_g.state_dict(),
            "epoch": 3,
        }
    torch.save(checkpoint, tmp_path / "gan.pt")
    return model, spec, z, checkpoint


@pytest.mark.parametrize("layout", ["own-keys", "lightning", "nested"])
def test_every_optimizer_state_is_reset_and_resumed(cli, tmp_path, layout):
    """Optimizer states under keys other than `optimizer`/`optimizer_states` were left as they were
    (silently: "every other entry … kept"), and the resume check stepped the first optimizer only."""
    model, spec, z, checkpoint = _gan_checkpoint(tmp_path, layout)
    with torch.no_grad():
        pre = model.D[0](model.G(z))
    dead = torch.nonzero((pre > 0).sum(0) == 0).flatten().tolist()
    assert set(D_KILLED) <= set(dead)
    out = tmp_path / "fixed.pt"
    result = cli(
        "fix",
        tmp_path / "gan.pt",
        "--arch",
        spec,
        "-d",
        tmp_path / "z.npz",
        "-s",
        "reinit",
        "-o",
        out,
        "--json",
        tmp_path / "f.json",
    )
    assert result.code == 0, result.err
    written = torch.load(out, weights_only=True)
    key = "state_dict" if layout == "lightning" else "model"

    def optimizers_of(saved):
        if layout == "lightning":
            return saved["optimizer_states"]
        if layout == "nested":
            return [saved["optimizers"]["D"], saved["optimizers"]["G"]]
        return [saved["opt_d"], saved["opt_g"]]

    states, originals = optimizers_of(written), optimizers_of(checkpoint)
    # D's optimizer: D.0 rows and biases of the dead units, D.2 columns; G's: nothing to reset
    d_masks = [np.zeros((12, 8), bool), np.zeros(12, bool), np.zeros((1, 12), bool), np.zeros(1, bool)]
    d_masks[0][dead] = True
    d_masks[1][dead] = True
    d_masks[2][:, dead] = True
    for state, original, masks in ((states[0], originals[0], d_masks), (states[1], originals[1], None)):
        for index, entry in original["state"].items():
            for name, value in entry.items():
                new = state["state"][index][name]
                if masks is not None and name in ("exp_avg", "exp_avg_sq") and masks[index].any():
                    mask = torch.from_numpy(masks[index])
                    assert (value[mask] != 0).any() and (new[mask] == 0).all()
                    assert torch.equal(new[~mask], value[~mask])
                else:
                    assert torch.equal(new, value)

    # the resume the check stands for: both optimizers, torch's own Adam, 10 steps with no new gradient
    resumed = type(model)()
    resumed.load_state_dict(written[key])
    optimizers = [torch.optim.Adam(resumed.D.parameters()), torch.optim.Adam(resumed.G.parameters())]
    for optimizer, state in zip(optimizers, states, strict=True):
        optimizer.load_state_dict(state)
    for _ in range(10):
        for param in resumed.parameters():
            param.grad = torch.zeros_like(param)
        for optimizer in optimizers:
            optimizer.step()
    with torch.no_grad():
        alive = int(((resumed.D[0](resumed.G(z))[:, dead] > 0).sum(0) > 0).sum())
    layers = {layer["name"]: layer for layer in json.loads((tmp_path / "f.json").read_text())["layers"]}
    assert layers["D.1"]["alive_after_resume"] == alive


# -- watch(): wrappers and evaluation forwards ------------------------------------------------------------


class _Tagger(nn.Module):
    """Token model whose forward takes the mask positionally (a wrapper's forward is `*inputs, **kwargs`)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(20, 8)
        self.fc = nn.Linear(8, 16)
        self.act = nn.ReLU()
        self.out = nn.Linear(16, 1)

    def forward(self, ids, attention_mask=None):
        return self.out(self.act(self.fc(self.emb(ids)))).squeeze(-1)


def _tokens():
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 20, (8, 6), generator=g)
    lengths = torch.randint(2, 7, (8,), generator=g)
    return ids, (torch.arange(6)[None] < lengths[:, None]).long()


def test_wrapped_models_are_watched_as_the_module_inside(tmp_path):
    """watch(DistributedDataParallel(model)) / watch(nn.DataParallel(model)) named every layer `module.…`
    (a scan of the saved weights and `trend` say `act`) and, the wrapper's forward being `*inputs`,
    missed a positional attention_mask: padding was counted. nn.DataParallel over several devices runs
    replicas in threads the probe cannot see: refused."""
    import torch.distributed as dist

    from deadrelu_cli import watch
    from deadrelu_cli.errors import UserError

    ids, mask = _tokens()
    model = _Tagger()
    with torch.no_grad():
        pre = model.fc(model.emb(ids))[mask.bool()]  # the real positions only
    expected = ((pre > 0).sum(0).tolist(), len(pre))

    def watched(wrapper):
        w = watch(wrapper, every=1, config=False)
        w.step()
        wrapper(ids, mask).sum().backward()
        w.close()
        assert [layer.name for layer in w.last.layers] == ["act"]
        layer = w.last.layer("act")
        return layer.positive_counts.tolist(), layer.elements_per_unit

    assert watched(nn.DataParallel(model)) == expected
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        assert watched(nn.parallel.DistributedDataParallel(model)) == expected
    finally:
        dist.destroy_process_group()
    several = nn.DataParallel(model)
    several.device_ids = [0, 1]  # what it holds on a machine with two GPUs
    with pytest.raises(UserError, match="DistributedDataParallel"):
        watch(several, every=1, config=False)


def test_evaluation_forwards_inside_a_sampled_step_are_not_counted():
    """A plain loop that validates on the steps it also samples (`if step % 100 == 0: evaluate()`) had
    the validation data counted as training forwards. Forwards in eval mode with gradients off are an
    evaluation: skipped and said; eval mode with gradients (frozen BatchNorm fine-tuning) and no_grad in
    train mode (a DQN's target) are training forwards; count_evaluation=True counts everything."""
    from deadrelu_cli import watch

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 12), nn.ReLU(), nn.Linear(12, 1))
    g = torch.Generator().manual_seed(1)
    train = [torch.randn(8, 4, generator=g) for _ in range(4)]
    valid = torch.randn(50, 4, generator=g) + 3.0  # another distribution: it would change the counts
    seen = {"counted": [], "all": []}

    def record(_module, args):
        seen["all"].append(args[0].detach().clone())

    model[1].register_forward_pre_hook(record)

    def loop(w):
        counted = []
        for x in train:
            sampled = w.step()
            before = len(seen["all"])
            model(x).sum().backward()  # train mode, gradients on
            model.eval()
            model(x[:2]).sum().backward()  # eval mode with gradients (frozen BatchNorm): training
            with torch.no_grad():
                model.train()
                model(x[2:5])  # train mode, no grad (a target network pass): training
                model.eval()
                model(valid)  # the validation: eval mode, no grad
                model[0](valid)  # an owned module on its own, the same
            model.train()
            if sampled:
                counted += seen["all"][before : before + 3]
        w.close()
        return w.last, counted

    report, counted = loop(watch(model, every=2, window=2, config=False))
    pre = torch.cat(counted)
    layer = report.layer("1")
    assert layer.positive_counts.tolist() == (pre > 0).sum(0).tolist()
    assert layer.elements_per_unit == len(pre) == 2 * (8 + 2 + 3)
    assert any("4 forward(s) in eval mode with gradients off" in note for note in report.notes), report.notes
    everything, _ = loop(watch(model, every=2, window=2, config=False, count_evaluation=True))
    assert everything.layer("1").elements_per_unit == 2 * (8 + 2 + 3 + 50)


DEEP = """
import torch
from torch import nn


class Deep(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3, self.out = nn.Linear(4, 16), nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 2)
        self.act = nn.ReLU()

    def forward(self, x):
        return self.out(self.act(self.fc3(self.act(self.fc2(self.act(self.fc1(x)))))))


def build():
    return Deep()
"""


def test_parameter_names_saved_through_a_wrapper_map_the_optimizer(cli, tmp_path):
    """An optimizer made over `ddp.named_parameters()` saves `module.fc3.weight`: those names were
    ignored, and with fc2 frozen (the optimizer holds fc1, fc3, out) the shapes fit fc2 or fc3, so fix
    refused ("save the optimizer with named parameters" — which it was)."""
    model, spec = arch_file(tmp_path / "deep.py", DEEP)
    torch.manual_seed(0)
    x = torch.randn(64, 4)
    np.savez(tmp_path / "x.npz", x=x.numpy())
    wrapped = nn.DataParallel(model)  # on CPU it only adds the `module.` prefix, as DDP does
    model.fc2.requires_grad_(False)
    named = [(n, p) for n, p in wrapped.named_parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(named, lr=1e-2)
    for _ in range(3):
        loss = wrapped(x).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        alive = torch.nonzero((model.fc3(model.act(model.fc2(model.act(model.fc1(x))))) > 0).any(0)).flatten()
        killed = alive[:2].tolist()
        model.fc3.bias[killed] = -100.0  # dead at the checkpoint, with a live unit's moments
        pre3 = model.fc3(model.act(model.fc2(model.act(model.fc1(x)))))
        pre1 = model.fc1(x)
        pre2 = model.fc2(model.act(pre1))
    dead = {
        name: torch.nonzero((pre > 0).sum(0) == 0).flatten().tolist()
        for name, pre in (("fc1", pre1), ("fc2", pre2), ("fc3", pre3))
    }
    assert set(killed) <= set(dead["fc3"])
    state = optimizer.state_dict()
    assert state["param_groups"][0]["param_names"][2] == "module.fc3.weight"
    torch.save({"model": wrapped.state_dict(), "optimizer": state}, tmp_path / "ckpt.pt")
    result = cli(
        "fix",
        tmp_path / "ckpt.pt",
        "--arch",
        spec,
        "-d",
        tmp_path / "x.npz",
        "-s",
        "reinit",
        "-o",
        tmp_path / "fixed.pt",
    )
    assert result.code == 0, result.err
    assert "saved parameter names" in result.out
    written = torch.load(tmp_path / "fixed.pt", weights_only=True)["optimizer"]["state"]
    names = [n for n, _ in named]
    for index, entry in state["state"].items():
        name = names[index].removeprefix("module.")
        mask = torch.zeros_like(entry["exp_avg"], dtype=torch.bool)
        if name in ("fc1.weight", "fc1.bias"):
            mask[dead["fc1"]] = True
        if name == "fc3.weight":
            mask[:, dead["fc2"]] = True
        if name in ("fc3.weight", "fc3.bias"):
            mask[dead["fc3"]] = True
        if name == "out.weight":
            mask[:, dead["fc3"]] = True
        for key in ("exp_avg", "exp_avg_sq"):
            assert (written[index][key][mask] == 0).all(), (name, key)
            assert torch.equal(written[index][key][~mask], entry[key][~mask]), (name, key)
            if name == "fc3.bias":
                assert (entry[key][killed] != 0).all()  # there was something to reset


def test_lightning_gan_with_its_own_attribute_name_is_fixed_and_resumes(cli, tmp_path):
    """A LightningModule that keeps its network as `self.net` (not `self.model`) saves `net.G.0.weight`:
    fix with --arch building the network said "weights do not fit --arch". Two optimizers (a GAN, manual
    optimization): both reset on the rewritten entries, and `Trainer.fit(ckpt_path=FIXED)` resumes."""
    L = pytest.importorskip("lightning", reason="the lightning extra is not installed")

    network, spec = arch_file(tmp_path / "gan.py", GAN)

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.automatic_optimization = False
            torch.manual_seed(0)
            self.net = type(network)()

        def training_step(self, batch, _index):
            (z,) = batch
            opt_g, opt_d = self.optimizers()
            fake = self.net.G(z)
            loss_d = F.softplus(self.net.D(fake.detach())).mean()
            opt_d.zero_grad()
            self.manual_backward(loss_d)
            opt_d.step()
            loss_g = F.softplus(-self.net.D(fake)).mean()
            opt_g.zero_grad()
            self.manual_backward(loss_g)
            opt_g.step()

        def configure_optimizers(self):
            return [
                torch.optim.Adam(self.net.G.parameters(), 1e-2),
                torch.optim.Adam(self.net.D.parameters(), 1e-2),
            ]

    z = torch.randn(32, 4, generator=torch.Generator().manual_seed(2))
    np.savez(tmp_path / "z.npz", z=z.numpy())
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(z), batch_size=16)

    def trainer(steps):
        return L.Trainer(
            max_steps=steps,
            default_root_dir=str(tmp_path),
            enable_progress_bar=False,
            enable_model_summary=False,
            logger=False,
            enable_checkpointing=False,
        )

    run = trainer(4)
    module = Module()
    run.fit(module, loader)
    with torch.no_grad():
        alive = torch.nonzero((module.net.D[0](module.net.G(z)) > 0).any(0)).flatten()
        killed = alive[:3].tolist()
        module.net.D[0].bias[killed] = -100.0  # dead at the checkpoint, with a live unit's moments
        pre = module.net.D[0](module.net.G(z))
    dead = torch.nonzero((pre > 0).sum(0) == 0).flatten().tolist()
    run.save_checkpoint(tmp_path / "gan.ckpt")
    before = torch.load(tmp_path / "gan.ckpt", weights_only=False)
    assert next(iter(before["state_dict"])).startswith("net.")
    out = tmp_path / "fixed.ckpt"
    result = cli(
        "fix", tmp_path / "gan.ckpt", "--arch", spec, "-d", tmp_path / "z.npz", "-s", "reinit", "-o", out
    )
    assert result.code == 0, result.err
    after = torch.load(out, weights_only=False)
    assert list(after["state_dict"]) == list(before["state_dict"])
    g_state, d_state = before["optimizer_states"]
    assert _same(after["optimizer_states"][0], g_state)  # G has nothing to reset
    for index, entry in d_state["state"].items():  # D.0.weight, D.0.bias, D.2.weight, D.2.bias
        mask = torch.zeros_like(entry["exp_avg"], dtype=torch.bool)
        if index in (0, 1):
            mask[dead] = True
        if index == 2:
            mask[:, dead] = True
        for key in ("exp_avg", "exp_avg_sq"):
            new = after["optimizer_states"][1]["state"][index][key]
            assert (new[mask] == 0).all() and torch.equal(new[~mask], entry[key][~mask])
            if index == 1:
                assert (entry[key][killed] != 0).all()
    for key in before:
        if key not in ("state_dict", "optimizer_states"):
            assert repr(after[key]) == repr(before[key]), key
    resumed = trainer(6)
    resumed.fit(Module(), loader, ckpt_path=str(out))
    assert resumed.global_step == 6


def _same(a: dict, b: dict) -> bool:
    """Two optimizer state dicts equal, tensors compared by value."""
    return a["param_groups"] == b["param_groups"] and all(
        torch.equal(a["state"][i][k], b["state"][i][k]) for i in b["state"] for k in b["state"][i]
    )


MLP = """
import torch
from torch import nn


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.act, self.out = nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 2)

    def forward(self, x):
        return self.out(self.act(self.fc1(x)))


def build():
    return MLP()
"""


def test_accelerate_save_state_folder_is_fixed_with_its_optimizer(cli, tmp_path):
    """`accelerator.save_state(dir)` writes model.safetensors with optimizer.bin (not the Trainer's
    optimizer.pt) beside it: fix wrote the weights alone, with no word about the optimizer, so the
    folder could not be resumed, and copying the weights back kept the moments that killed the units."""
    pytest.importorskip("accelerate", reason="the transformers extra is not installed")
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    model, spec = arch_file(tmp_path / "mlp.py", MLP)
    model.train()
    torch.manual_seed(0)
    x, y = torch.randn(64, 6), torch.randn(64, 2)
    np.savez(tmp_path / "x.npz", x=x.numpy())
    try:
        accelerator = Accelerator(cpu=True)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        model, optimizer = accelerator.prepare(model, optimizer)
        for _ in range(3):
            loss = F.mse_loss(model(x), y)
            optimizer.zero_grad()
            accelerator.backward(loss)
            optimizer.step()
        with torch.no_grad():
            killed = torch.nonzero((model.fc1(x) > 0).any(0)).flatten()[:3].tolist()
            model.fc1.bias[killed] = -100.0  # dead at the checkpoint, with a live unit's moments
            dead = torch.nonzero((model.fc1(x) > 0).sum(0) == 0).flatten().tolist()
        accelerator.save_state(str(tmp_path / "state"))
        (tmp_path / "fixed").mkdir()
        result = cli(
            "fix",
            tmp_path / "state" / "model.safetensors",
            "--arch",
            spec,
            "-d",
            tmp_path / "x.npz",
            "-s",
            "reinit",
            "-o",
            tmp_path / "fixed" / "model.safetensors",
        )
        assert result.code == 0, result.err
        before = torch.load(tmp_path / "state" / "optimizer.bin", weights_only=True)
        after = torch.load(tmp_path / "fixed" / "optimizer.bin", weights_only=True)
        for index, entry in before["state"].items():  # fc1 rows, fc1 bias, out columns
            mask = torch.zeros_like(entry["exp_avg"], dtype=torch.bool)
            if index in (0, 1):
                mask[dead] = True
            if index == 2:
                mask[:, dead] = True
            for key in ("exp_avg", "exp_avg_sq"):
                new = after["state"][index][key]
                assert (new[mask] == 0).all() and torch.equal(new[~mask], entry[key][~mask]), (index, key)
            assert torch.equal(after["state"][index]["step"], entry["step"])
        assert (before["state"][1]["exp_avg"][killed] != 0).all()
        assert (tmp_path / "fixed" / "random_states_0.pkl").read_bytes() == (
            tmp_path / "state" / "random_states_0.pkl"
        ).read_bytes()
        accelerator.load_state(str(tmp_path / "fixed"))  # resumes from the fixed folder
        assert (optimizer.state_dict()["state"][1]["exp_avg"][dead] == 0).all()
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)


def test_samples_of_a_forward_that_takes_a_dict():
    """`model(batch)` with a dict (or list) of tensors: the report said 0 samples (only top-level tensor
    arguments were looked at) although every element was counted."""
    from deadrelu_cli import watch

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 8)

        def forward(self, batch):
            return self.fc(batch["x"][0]).relu()

    torch.manual_seed(0)
    net = Net()
    batches = [{"x": [torch.randn(5, 4)]}, {"x": [torch.randn(3, 4)]}]
    w = watch(net, every=1, window=2, config=False)
    for batch in batches:
        w.step()
        net(batch)
    w.close()
    with torch.no_grad():
        pre = torch.cat([net.fc(b["x"][0]) for b in batches])
    assert w.last.data.samples == len(pre) == 8
    assert w.last.layer("relu()").positive_counts.tolist() == (pre > 0).sum(0).tolist()


def test_forwards_of_replicas_are_said_not_counted():
    """nn.DataParallel over several GPUs (also the Hugging Face Trainer's, started without torchrun)
    runs copies of the model that share its hooks, each in a thread of its own, where the step's
    TorchFunctionMode is not active and the probe's state would be raced on: the watch counted them as
    forwards of the model (here one replica, run after the model: its rows counted twice). Now they are
    not counted, and the report and one warning say so."""
    import copy
    import threading

    from deadrelu_cli import watch

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    x, other = torch.randn(6, 4), torch.randn(9, 4)
    w = watch(model, every=1, config=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        w.step()
        model(x)
        replica = _replicate(model)
        worker = threading.Thread(target=lambda: replica(other))
        worker.start()
        worker.join()
        w.close()
    with torch.no_grad():
        pre = model[0](x)
    layer = w.last.layer("1")
    assert layer.elements_per_unit == 6 and w.last.data.samples == 6
    assert layer.positive_counts.tolist() == (pre > 0).sum(0).tolist()
    assert any("1 forward(s) of copies of the model" in note for note in w.last.notes)
    assert sum("copies of the model" in str(c.message) for c in caught) == 1
    # a deepcopy made while the probe is on carries its hooks: inert on it once the step is over
    w = watch(model, every=10, config=False)
    w.step()
    twin = copy.deepcopy(model)
    for _ in range(3):
        w.step()
        twin(other)
    w.close()
    assert w.last.data.samples == 0 and not any("copies" in note for note in w.last.notes)


def _replicate(model: nn.Module) -> nn.Module:
    """What torch.nn.parallel.replicate makes for one device, on the CPU: every module copied by
    `_replicate_for_data_parallel` (new objects sharing the original's hook dicts), children re-linked,
    parameters set as plain tensors (replicate sets the broadcast copies the same way)."""
    modules = list(model.modules())
    copies = {id(m): m._replicate_for_data_parallel() for m in modules}
    for module in modules:
        replica = copies[id(module)]
        for key, child in module._modules.items():
            replica._modules[key] = copies[id(child)] if child is not None else None
        for key, param in module._parameters.items():
            setattr(replica, key, param.detach())
    return copies[id(model)]
