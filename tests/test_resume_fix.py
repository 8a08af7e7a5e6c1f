"""Resume-safe `fix --strategy reinit|kick` on training checkpoints: the moments of exactly the rewritten
entries are zero, every other optimizer entry and checkpoint key is byte-identical, and training
resumed from the written checkpoint keeps the recycled units alive (the stale moments would kill them).
Ground truth: dead units and the rows/columns they own, computed in numpy from the weights."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import arch_file
from safetensors.torch import load_file

ARCH = """
import torch
from torch import nn


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(8, 32)
        self.act1 = nn.ReLU()
        self.fc2 = nn.Linear(32, 32)
        self.act2 = nn.ReLU()
        self.out = nn.Linear(32, 4)

    def forward(self, x, labels=None):
        out = self.out(self.act2(self.fc2(self.act1(self.fc1(x)))))
        if labels is None:
            return out
        return {"loss": nn.functional.mse_loss(out, labels), "logits": out}


def build():
    return MLP()
"""
KILLED = [1, 4, 9, 17, 30]  # fc1 units planted dead


def _data():
    g = torch.Generator().manual_seed(5)
    return torch.randn(256, 8, generator=g), torch.randn(256, 4, generator=g)


def _dead_units(state: dict, x: np.ndarray) -> dict[str, list[int]]:
    """act1/act2 units that never fire on x, from the weights in numpy."""
    w1, b1 = state["fc1.weight"].numpy().astype(np.float64), state["fc1.bias"].numpy().astype(np.float64)
    w2, b2 = state["fc2.weight"].numpy().astype(np.float64), state["fc2.bias"].numpy().astype(np.float64)
    pre1 = x.astype(np.float64) @ w1.T + b1
    pre2 = np.maximum(pre1, 0) @ w2.T + b2
    return {
        "act1": np.flatnonzero((pre1 <= 0).all(axis=0)).tolist(),
        "act2": np.flatnonzero((pre2 <= 0).all(axis=0)).tolist(),
    }


def _expected_masks(model, dead: dict[str, list[int]]) -> dict[str, np.ndarray]:
    """Per parameter, the entries reinit rewrites: producer rows and bias entries, consumer columns."""
    masks = {name: np.zeros(tuple(p.shape), bool) for name, p in model.named_parameters()}
    for site, producer, consumer in (("act1", "fc1", "fc2"), ("act2", "fc2", "out")):
        units = dead[site]
        masks[f"{producer}.weight"][units, :] = True
        masks[f"{producer}.bias"][units] = True
        masks[f"{consumer}.weight"][:, units] = True
    return masks


def _check_optimizer(before: dict, after: dict, names: list[str], masks: dict[str, np.ndarray]) -> int:
    """Moments zero exactly on the masks; every other optimizer entry byte-identical. Returns #zeroed."""
    assert after["param_groups"] == before["param_groups"]
    assert sorted(after["state"]) == sorted(before["state"])
    zeroed = 0
    for index, entry in before["state"].items():
        mask = masks[names[index]]
        new = after["state"][index]
        assert sorted(new) == sorted(entry)
        for key, value in entry.items():
            old_bytes, new_value = value.numpy(), new[key].numpy()
            if key in ("exp_avg", "exp_avg_sq", "momentum_buffer") and mask.any():
                assert (old_bytes[mask] != 0).any()  # there was something to reset
                assert (new_value[mask] == 0).all()
                assert new_value[~mask].tobytes() == old_bytes[~mask].tobytes()
                zeroed += int(mask.sum())
            else:  # step counters, and moments of parameters the fix did not touch
                assert new_value.tobytes() == old_bytes.tobytes() and new_value.dtype == old_bytes.dtype
    return zeroed


def _stale_moments(optimizer: torch.optim.Adam, model, units: list[int]) -> None:
    """The moments a unit has right after a large update killed it: pushing its bias and weights further down."""
    for name, param in model.named_parameters():
        if name in ("fc1.weight", "fc1.bias"):
            state = optimizer.state[param]
            state["exp_avg"][units] = 0.5 * (1 if name == "fc1.bias" else param.detach()[units].sign())
            state["exp_avg_sq"][units] = 1e-4


def _train_from(state: dict, optimizer_state: dict, arch_module, x, y, steps: int):
    """The test's own resume: the architecture + Adam loaded from the checkpoint, `steps` steps of MSE."""
    model = arch_module()
    model.load_state_dict(state)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    optimizer.load_state_dict(optimizer_state)
    for _ in range(steps):
        loss = F.mse_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        pre = model.fc1(x).numpy()
    return (pre > 0).any(axis=0)  # which fc1 units fire after the resumed steps


@pytest.fixture
def plain_checkpoint(tmp_path):
    model, spec = arch_file(tmp_path / "arch.py", ARCH)
    torch.manual_seed(0)
    model.train()
    x, y = _data()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 10)
    for _ in range(20):
        loss = F.mse_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
    with torch.no_grad():
        model.fc1.bias[KILLED] = -50.0
    _stale_moments(optimizer, model, KILLED)
    checkpoint = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "epoch": 3,
        "step": 20,
        "notes": {"run": "a", "seed": 0},
    }
    path = tmp_path / "ckpt.pt"
    torch.save(checkpoint, path)
    np.savez(tmp_path / "data.npz", x=x.numpy())
    return path, spec, model, x, y


def test_reinit_resets_exactly_the_recycled_moments_and_resumes(cli, tmp_path, plain_checkpoint):
    path, spec, model, x, y = plain_checkpoint
    before = torch.load(path, weights_only=True)
    dead = _dead_units(before["model"], x.numpy())
    assert set(KILLED) <= set(dead["act1"])
    out = tmp_path / "fixed.pt"
    result = cli(
        "fix", path, "--arch", spec, "--data", tmp_path / "data.npz", "-s", "reinit", "-o", out, "--json", "-"
    )
    assert result.code == 0, result.err
    report = result.json()
    after = torch.load(out, weights_only=True)
    assert list(after) == list(before)
    for key in ("scheduler", "epoch", "step", "notes"):
        assert after[key] == before[key]
    # weights: only the planned entries changed
    masks = _expected_masks(model, dead)
    for name, mask in masks.items():
        old, new = before["model"][name].numpy(), after["model"][name].numpy()
        assert new[~mask].tobytes() == old[~mask].tobytes()
    names = [n for n, _ in model.named_parameters()]
    assert _check_optimizer(before["optimizer"], after["optimizer"], names, masks) > 0
    # the CLI's own resume check: every recycled unit still fires
    alive = {layer["name"]: layer["alive_after_resume"] for layer in report["layers"]}
    assert alive == {site: len(units) for site, units in dead.items() if units}
    # the test's own resume: 10 Adam steps of MSE from the written checkpoint keep the recycled units alive
    fired = _train_from(after["model"], after["optimizer"], type(model), x, y, 10)
    assert fired[KILLED].all()


def test_kick_resets_rows_and_bias_only(cli, tmp_path, plain_checkpoint):
    path, spec, model, x, _ = plain_checkpoint
    before = torch.load(path, weights_only=True)
    dead = _dead_units(before["model"], x.numpy())
    out = tmp_path / "kicked.pt"
    # the point is which moments are reset: --force, as a default kick cannot lift the -50 biases
    result = cli(
        "fix", path, "--arch", spec, "--data", tmp_path / "data.npz", "-s", "kick", "-o", out, "--force"
    )
    assert result.code == 0, result.err
    after = torch.load(out, weights_only=True)
    masks = {name: np.zeros(tuple(p.shape), bool) for name, p in model.named_parameters()}
    for site, producer in (("act1", "fc1"), ("act2", "fc2")):
        masks[f"{producer}.weight"][dead[site], :] = True
        masks[f"{producer}.bias"][dead[site]] = True
    names = [n for n, _ in model.named_parameters()]
    assert _check_optimizer(before["optimizer"], after["optimizer"], names, masks) > 0


def test_lightning_ckpt(cli, tmp_path):
    L = pytest.importorskip("lightning", reason="the lightning extra is not installed")
    _, spec = arch_file(tmp_path / "arch.py", ARCH)
    import importlib.util

    loaded = importlib.util.spec_from_file_location("lightning_arch", tmp_path / "arch.py")
    module = importlib.util.module_from_spec(loaded)
    loaded.loader.exec_module(module)

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.model = module.build()

        def training_step(self, batch, _index):
            if self.global_step == 3:  # units die mid-run: their moments hold what came before
                with torch.no_grad():
                    self.model.fc1.bias[KILLED] = -50.0
            return F.mse_loss(self.model(batch[0]), batch[1])

        def configure_optimizers(self):
            optimizer = torch.optim.AdamW(self.parameters(), lr=1e-2)
            return [optimizer], [torch.optim.lr_scheduler.StepLR(optimizer, 3)]

    x, y = _data()
    np.savez(tmp_path / "data.npz", x=x.numpy())
    trainer = L.Trainer(
        max_steps=6,
        default_root_dir=tmp_path,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=64)
    trainer.fit(Module(), loader)
    ckpt = next(tmp_path.rglob("*.ckpt"))
    out = tmp_path / "fixed.ckpt"
    result = cli("fix", ckpt, "--arch", spec, "--data", tmp_path / "data.npz", "-s", "reinit", "-o", out)
    assert result.code == 0, result.err
    before, after = torch.load(ckpt, weights_only=True), torch.load(out, weights_only=True)
    assert list(after) == list(before)
    assert list(after["state_dict"]) == list(before["state_dict"])  # the "model." prefix kept
    for key in before:
        if key not in ("state_dict", "optimizer_states"):
            assert after[key] == before[key], key
    arch_state = {k.removeprefix("model."): v for k, v in before["state_dict"].items()}
    dead = _dead_units(arch_state, x.numpy())
    assert set(KILLED) <= set(dead["act1"])
    build = module.build()
    masks = _expected_masks(build, dead)
    names = [n for n, _ in build.named_parameters()]
    _check_optimizer(before["optimizer_states"][0], after["optimizer_states"][0], names, masks)
    # Lightning resumes from it
    resumed = L.Trainer(
        max_steps=8,
        default_root_dir=tmp_path / "resumed",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    resumed.fit(Module(), loader, ckpt_path=str(out))
    assert resumed.global_step == 8


def test_hf_trainer_checkpoint_folder(cli, tmp_path):
    pytest.importorskip("transformers", reason="the transformers extra is not installed")
    pytest.importorskip("accelerate", reason="the transformers extra is not installed")
    from transformers import Trainer, TrainerCallback, TrainingArguments

    model, spec = arch_file(tmp_path / "arch.py", ARCH)
    torch.manual_seed(0)

    class Kill(TrainerCallback):  # units die mid-run: their moments hold what came before
        def on_step_begin(self, args, state, control, model=None, **kwargs):
            if state.global_step == 2:
                with torch.no_grad():
                    model.fc1.bias[KILLED] = -50.0

    x, y = _data()
    np.savez(tmp_path / "data.npz", x=x.numpy())

    class Data(torch.utils.data.Dataset):
        def __len__(self):
            return len(x)

        def __getitem__(self, i):
            return {"x": x[i], "labels": y[i]}

    def args(steps):
        return TrainingArguments(
            output_dir=str(tmp_path / "run"),
            max_steps=steps,
            per_device_train_batch_size=64,
            save_steps=4,
            report_to=[],
            use_cpu=True,
            disable_tqdm=True,
            learning_rate=1e-2,
            weight_decay=0.01,
        )

    model.train()
    Trainer(model=model, args=args(4), train_dataset=Data(), callbacks=[Kill()]).train()
    folder = tmp_path / "run" / "checkpoint-4"
    weights = folder / "model.safetensors"
    assert (folder / "optimizer.pt").is_file()
    same_folder = cli(
        "fix",
        weights,
        "--arch",
        spec,
        "-d",
        tmp_path / "data.npz",
        "-s",
        "reinit",
        "-o",
        folder / "f.safetensors",
    )
    assert same_folder.code == 2 and "optimizer.pt" in same_folder.err, same_folder.err
    (tmp_path / "fixed").mkdir()
    out = tmp_path / "fixed" / "model.safetensors"
    result = cli("fix", weights, "--arch", spec, "--data", tmp_path / "data.npz", "-s", "reinit", "-o", out)
    assert result.code == 0, result.err
    before = torch.load(folder / "optimizer.pt", weights_only=True)
    after = torch.load(out.parent / "optimizer.pt", weights_only=True)
    dead = _dead_units(load_file(weights), x.numpy())
    assert set(KILLED) <= set(dead["act1"])
    masks = _expected_masks(model, dead)
    # the Trainer's groups: weight decay (the weights) first, then none (the biases)
    order = [n for n, _ in model.named_parameters() if "bias" not in n]
    order += [n for n, _ in model.named_parameters() if "bias" in n]
    assert [len(g["params"]) for g in before["param_groups"]] == [3, 3]
    _check_optimizer(before, after, order, masks)
    for name in ("scheduler.pt", "trainer_state.json", "rng_state.pth", "training_args.bin"):
        assert (out.parent / name).read_bytes() == (folder / name).read_bytes()
    assert json.loads((out.parent / "trainer_state.json").read_text())["global_step"] == 4
    # the Trainer resumes from the fixed folder
    fresh = type(model)()
    trainer = Trainer(model=fresh, args=args(6), train_dataset=Data())
    trainer.train(resume_from_checkpoint=str(out.parent))
    assert trainer.state.global_step == 6


@pytest.mark.parametrize("kind", ["adam", "sgd", "rmsprop", "lion-like"])
def test_checkpoint_saved_before_the_first_step(cli, tmp_path, kind):
    """An optimizer saved before its first step has no moments: its kind comes from its hyperparameters
    (Adam: betas, eps, amsgrad; SGD: momentum, dampening, nesterov; RMSprop: alpha, centered, …); the
    state is written back as it was; a kind torch does not ship is one line, exit 2."""
    model, spec = arch_file(tmp_path / "arch.py", ARCH)
    with torch.no_grad():
        model.fc1.bias[KILLED] = -50.0
    lion = {
        "state": {},
        "param_groups": [{"lr": 1e-4, "betas": (0.9, 0.99), "weight_decay": 0.0, "params": [0]}],
    }
    make = {
        "adam": lambda p: torch.optim.Adam(p, lr=1e-3).state_dict(),
        "sgd": lambda p: torch.optim.SGD(p, lr=1e-3, momentum=0.9).state_dict(),
        "rmsprop": lambda p: torch.optim.RMSprop(p, lr=1e-3).state_dict(),
        "lion-like": lambda p: {
            **lion,
            "param_groups": [{**lion["param_groups"][0], "params": list(range(len(p)))}],
        },
    }[kind]
    state = make(list(model.parameters()))
    path = tmp_path / "ckpt.pt"
    torch.save({"model": model.state_dict(), "optimizer": state, "epoch": 0}, path)
    x, _ = _data()
    np.savez(tmp_path / "data.npz", x=x.numpy())
    out = tmp_path / "fixed.pt"
    result = cli("fix", path, "--arch", spec, "--data", tmp_path / "data.npz", "-s", "reinit", "-o", out)
    if kind == "lion-like":
        assert result.code == 2 and "--resume-steps 0" in result.err, result.err
        assert len(result.err.strip().splitlines()) == 1 and not out.exists()
        return
    assert result.code == 0, result.err
    after = torch.load(out, weights_only=True)
    assert after["optimizer"]["state"] == {}
    assert after["optimizer"]["param_groups"] == state["param_groups"]
    assert after["epoch"] == 0


def _optimizer_layout(model, kind: str):
    """The optimizers users make: other torch kinds, param groups in another order than the model's
    (a learning rate per part), the trainable parameters only (fc1 frozen: its state is absent)."""
    fc1, rest = list(model.fc1.parameters()), list(model.fc2.parameters()) + list(model.out.parameters())
    if kind == "adamax":
        return torch.optim.Adamax(model.parameters(), lr=1e-2)
    if kind == "rmsprop":
        return torch.optim.RMSprop(model.parameters(), lr=1e-3, momentum=0.9, centered=True)
    if kind == "groups-reordered":
        return torch.optim.AdamW([{"params": rest, "lr": 1e-2}, {"params": fc1, "lr": 1e-3}])
    if kind == "frozen":
        for p in fc1:
            p.requires_grad_(False)
        return torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["adamax", "rmsprop", "groups-reordered", "frozen"])
def test_other_optimizers_and_layouts(cli, tmp_path, kind):
    """Before: Adamax and RMSprop(momentum) stopped the fix with an internal error (exit 3: their state
    was loaded into Adam / SGD for the resume check), and reordered groups or frozen parameters were
    refused as "not for this architecture". Now every per-element state (exp_inf, square_avg, grad_avg,
    momentum_buffer, …) is zero exactly at the rewritten entries, the rest byte-identical, matched by
    the test's own knowledge of which parameter each optimizer entry is."""
    model, spec = arch_file(tmp_path / "arch.py", ARCH)
    model.train()
    x, y = _data()
    optimizer = _optimizer_layout(model, kind)
    for _ in range(5):
        loss = F.mse_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        model.fc1.bias[KILLED] = -50.0
    by_param = {p: n for n, p in model.named_parameters()}
    names = {}
    index = 0
    for group in optimizer.param_groups:
        for p in group["params"]:
            names[index] = by_param[p]
            index += 1
    path = tmp_path / "ckpt.pt"
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": 2}, path)
    np.savez(tmp_path / "data.npz", x=x.numpy())
    out = tmp_path / "fixed.pt"
    result = cli("fix", path, "--arch", spec, "--data", tmp_path / "data.npz", "-s", "reinit", "-o", out)
    assert result.code == 0, result.err
    before, after = torch.load(path, weights_only=True), torch.load(out, weights_only=True)
    masks = _expected_masks(model, _dead_units(before["model"], x.numpy()))
    assert after["optimizer"]["param_groups"] == before["optimizer"]["param_groups"]
    zeroed = 0
    for i, entry in before["optimizer"]["state"].items():
        mask = masks[names[i]]
        for key, value in entry.items():
            old, new = value.numpy(), after["optimizer"]["state"][i][key].numpy()
            if value.dim() and mask.any():  # a per-element state of a rewritten parameter
                assert (new[mask] == 0).all(), (names[i], key)
                assert new[~mask].tobytes() == old[~mask].tobytes()
                zeroed += int((old[mask] != 0).sum())
            else:
                assert new.tobytes() == old.tobytes()
    assert zeroed > 0
    # the written state loads into the user's own optimizer, and training resumes from it
    resumed = type(model)()
    resumed.load_state_dict(after["model"])
    again = _optimizer_layout(resumed, kind)
    again.load_state_dict(after["optimizer"])
    F.mse_loss(resumed(x), y).backward()
    again.step()


def test_an_optimizer_torch_does_not_ship(cli, tmp_path):
    """A Lion-like state (exp_avg only; lr, betas, weight_decay): the moments are reset, but the resume
    check cannot run it: one line, exit 2 (before: loaded into Adam, internal error, exit 3)."""
    model, spec = arch_file(tmp_path / "arch.py", ARCH)
    with torch.no_grad():
        model.fc1.bias[KILLED] = -50.0
    params = list(model.parameters())
    state = {
        "state": {i: {"exp_avg": torch.ones_like(p)} for i, p in enumerate(params)},
        "param_groups": [
            {"lr": 1e-4, "betas": (0.9, 0.99), "weight_decay": 0.0, "params": list(range(len(params)))}
        ],
    }
    path = tmp_path / "ckpt.pt"
    torch.save({"model": model.state_dict(), "optimizer": state}, path)
    x, _ = _data()
    np.savez(tmp_path / "data.npz", x=x.numpy())
    out = tmp_path / "fixed.pt"
    result = cli("fix", path, "--arch", spec, "--data", tmp_path / "data.npz", "-s", "reinit", "-o", out)
    assert result.code == 2 and "--resume-steps 0" in result.err, result.err
    assert len(result.err.strip().splitlines()) == 1 and not out.exists()
    result = cli(
        "fix",
        path,
        "--arch",
        spec,
        "--data",
        tmp_path / "data.npz",
        "-s",
        "reinit",
        "-o",
        out,
        "--resume-steps",
        "0",
    )
    assert result.code == 0, result.err
    after = torch.load(out, weights_only=True)["optimizer"]["state"]
    assert (after[0]["exp_avg"][KILLED] == 0).all() and (
        np.delete(after[0]["exp_avg"].numpy(), KILLED, 0) == 1
    ).all()


def test_left_out_parameters_that_fit_two_ways_are_refused():
    """Three identical layers, the optimizer over two of them: which one was frozen cannot be told from
    shapes, so the mapping refuses (a guess could reset another layer's moments)."""
    from deadrelu_cli.backends.torch.optimizer_state import map_parameters
    from deadrelu_cli.errors import UserError

    model = torch.nn.Sequential(*(torch.nn.Linear(8, 8) for _ in range(3)))
    optimizer = torch.optim.Adam(list(model[1].parameters()) + list(model[2].parameters()))
    model(torch.randn(4, 8)).sum().backward()
    optimizer.step()
    with pytest.raises(UserError, match="cannot tell which architecture parameter"):
        map_parameters(optimizer.state_dict(), model)
    # the same with only the first layer left out of a model whose layers differ: one fit, by shapes
    model = torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.Linear(6, 8), torch.nn.Linear(8, 3))
    optimizer = torch.optim.Adam(list(model[1].parameters()) + list(model[2].parameters()))
    model(torch.randn(4, 8)).sum().backward()
    optimizer.step()
    names = map_parameters(optimizer.state_dict(), model).names
    assert names == {0: "1.weight", 1: "1.bias", 2: "2.weight", 3: "2.bias"}


def arch_file_module():
    namespace: dict = {}
    exec(ARCH, namespace)
    return namespace["build"](), namespace


def test_hugging_face_groups_of_a_model_with_frozen_parameters():
    """The Trainer's two groups (weight decay, then biases) hold only the parameters that require grad:
    with `out` frozen, each group is its own names in order with `out`'s left out. The test builds the
    groups as the Trainer does and knows which name each entry is."""
    from deadrelu_cli.backends.torch.optimizer_state import map_parameters

    model, _ = arch_file_module()
    for p in model.out.parameters():
        p.requires_grad_(False)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [(n, p) for n, p in trainable if "bias" not in n]
    no_decay = [(n, p) for n, p in trainable if "bias" in n]
    optimizer = torch.optim.AdamW(
        [
            {"params": [p for _, p in decay], "weight_decay": 0.01},
            {"params": [p for _, p in no_decay], "weight_decay": 0.0},
        ]
    )
    x, y = _data()
    F.mse_loss(model(x), y).backward()
    optimizer.step()
    expected = dict(enumerate([n for n, _ in decay] + [n for n, _ in no_decay]))
    fresh, _ = arch_file_module()  # --arch builds every parameter trainable
    assert map_parameters(optimizer.state_dict(), fresh).names == expected
