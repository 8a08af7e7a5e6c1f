#!/usr/bin/env python
"""Build sample_models/ deterministically: small models with planted dead units and their calibration data.

Each model is saved as a state_dict (.pt, with arch.py beside it), safetensors, TorchScript and
torch.export (.pt2) and ONNX, so that every loader is exercised on the same weights.
Run: python scripts/make_sample_models.py [--out sample_models]
"""

from __future__ import annotations

import argparse
import importlib.util
import warnings
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent

# The 8-unit layer of the guide: units 2, 4 and 6 have biases far below anything the data reaches.
MLP_FC2_BIASES = [0.5, -0.2, -8.0, 0.1, -10.0, 0.3, -15.0, -0.1]
MLP_FC1_DEAD = [3, 17, 29]  # planted dead units of fc1
CNN_BN1_DEAD = [1, 5]  # BatchNorm beta far negative, gamma small
CNN_BN2_DEAD = [0, 7, 8, 15]


def _load_arch(path: Path):
    spec = importlib.util.spec_from_file_location(f"sample_arch_{path.parent.name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.build


def build_mlp(arch: Path) -> tuple[torch.nn.Module, np.ndarray]:
    torch.manual_seed(0)
    model = _load_arch(arch)()
    with torch.no_grad():
        model.fc1.bias[MLP_FC1_DEAD] = -30.0
        model.fc2.weight.mul_(0.5)
        model.fc2.bias.copy_(torch.tensor(MLP_FC2_BIASES))
    rng = np.random.default_rng(0)
    data = rng.standard_normal((512, 16)).astype(np.float32)
    return model.eval(), data


def build_cnn(arch: Path) -> tuple[torch.nn.Module, np.ndarray]:
    torch.manual_seed(1)
    model = _load_arch(arch)()
    with torch.no_grad():
        for bn in (model.bn1, model.bn2):
            bn.running_mean.uniform_(-0.2, 0.2)
            bn.running_var.uniform_(0.5, 1.5)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.1, 0.3)
        model.bn1.weight[CNN_BN1_DEAD] = 0.01
        model.bn1.bias[CNN_BN1_DEAD] = -5.0
        model.bn2.weight[CNN_BN2_DEAD] = 0.01
        model.bn2.bias[CNN_BN2_DEAD] = -3.0
        model.fc.weight.mul_(3.0)
        model.fc.bias.uniform_(1.0, 2.0)
        model.fc.bias[[2, 9]] = -50.0
    rng = np.random.default_rng(1)
    data = rng.standard_normal((96, 3, 16, 16)).astype(np.float32)
    return model.eval(), data


def save_all(model: torch.nn.Module, data: np.ndarray, out: Path) -> None:
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    example = torch.from_numpy(data[:2])
    torch.save(model.state_dict(), out / "model.pt")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "model.safetensors"))
    np.savez(out / "calib.npz", input=data)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.script(model).save(str(out / "model.torchscript.pt"))
        batch = torch.export.Dim("batch", min=1)
        program = torch.export.export(model, (example,), dynamic_shapes=({0: batch},))
        torch.export.save(program, str(out / "model.pt2"))
        torch.onnx.export(
            model,
            (example,),
            str(out / "model.onnx"),
            input_names=["input"],
            output_names=["output"],
            dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
            opset_version=17,
            dynamo=False,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "sample_models")
    args = parser.parse_args()
    for name, builder in (("mlp", build_mlp), ("cnn", build_cnn)):
        model, data = builder(ROOT / "sample_models" / name / "arch.py")
        save_all(model, data, args.out / name)
        print(f"wrote {args.out / name}")


if __name__ == "__main__":
    main()
