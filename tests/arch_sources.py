"""Small planted nets as --arch source files, for the fix and call-site tests (test_fix36, test_trial31,
test_review36a): one template, each test naming its own layers, forward, seed and planted units."""

from __future__ import annotations

import importlib.util
import textwrap
from collections.abc import Sequence

import numpy as np
import torch
from conftest import arch_file, save_npz

HEADER = """
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrizations


def _plant(module, units):
    with torch.no_grad():
        module.bias[units] = -50.0
"""


def _lines(code: str | Sequence[str], indent: int) -> str:
    lines = [code] if isinstance(code, str) else list(code)
    return textwrap.indent("\n".join(lines), " " * indent)


def net_source(
    init: str | Sequence[str],
    forward: str | Sequence[str],
    seed: int,
    plant: str | Sequence[str] = (),
    args: str = "x",
) -> str:
    """`class Net` whose __init__ runs INIT (after super().__init__()) and whose forward(self, ARGS)
    runs FORWARD; `build()` seeds torch with SEED, makes a Net and runs PLANT on it (statements on
    `net`, e.g. `_plant(net.fc1, [1, 3])`: those units' bias -50, dead on any data of the tests)."""
    plant = _lines(plant, 4) + "\n" if plant else ""
    return f"""
class Net(nn.Module):
    def __init__(self):
        super().__init__()
{_lines(init, 8)}

    def forward(self, {args}):
{_lines(forward, 8)}


def build():
    torch.manual_seed({seed})
    net = Net()
{plant}    return net
"""


def samples(shape, n: int, seed: int = 0) -> np.ndarray:
    """N standard-normal float32 samples of SHAPE."""
    return np.random.default_rng(seed).standard_normal((n, *shape)).astype(np.float32)


def setup(tmp_path, body: str, x: np.ndarray):
    """HEADER + BODY as tmp_path/arch.py, its state dict as model.pt and X as calib.npz (`input`):
    (the model, the --arch spec, the model's path, the data's path)."""
    model, spec = arch_file(tmp_path / "arch.py", HEADER + body)
    torch.save(model.state_dict(), tmp_path / "model.pt")
    save_npz(tmp_path / "calib.npz", input=x)
    return model, spec, str(tmp_path / "model.pt"), str(tmp_path / "calib.npz")


def rebuild(spec: str) -> torch.nn.Module:
    """A fresh model from an --arch spec `FILE:FACTORY` (the user's own class, to load a fixed state dict into)."""
    path, _, factory = spec.rpartition(":")
    module_spec = importlib.util.spec_from_file_location("arch_sources_again", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return getattr(module, factory)()


# A calibrated QAT model (FakeQuantize between a Linear and its ReLU; observers off): test_sites37, test_sites41
FAKE_QUANT = """
import torch
from torch import nn
from torch.ao.quantization import FakeQuantize, MovingAverageMinMaxObserver, disable_observer


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 6)
        self.fq = FakeQuantize(MovingAverageMinMaxObserver, quant_min=0, quant_max=255)
        self.fc2 = nn.Linear(6, 2)

    def forward(self, x):
        return self.fc2(torch.relu(self.fq(self.fc(x))))


def build():
    torch.manual_seed(0)
    model = Net()
    with torch.no_grad():
        model.fc.bias[2] = -40.0
        model.fq(torch.linspace(-6, 6, 64).reshape(-1, 1).expand(64, 6))  # a calibrated QAT model
    model.apply(disable_observer)  # frozen ranges: eval is then a fixed function
    return model.eval()
"""


def lora_source(inner: bool) -> str:
    """A Linear+ReLU net with a LoRA layer on fc (peft), unit 2 of fc planted dead. INNER: build() returns
    the module holding the LoRA layer, as exported or traced (test_sites41); else the PeftModel (test_sites37)."""
    made = "peft.base_model.model.eval()" if inner else "peft.eval()"
    return f"""
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 6)
        self.fc2 = nn.Linear(6, 2)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc(x)))


def build():
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = Net()
    with torch.no_grad():
        model.fc.bias[2] = -40.0
    peft = get_peft_model(model, LoraConfig(r=2, target_modules=["fc"], init_lora_weights=False))
    return {made}
"""
