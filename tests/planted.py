"""Planted models with known dead units. Used as --arch tests/planted.py:FACTORY and by the tests.

Every factory is deterministic (fixed seed), so the same weights come back each time.
"""

import torch
import torch.nn.functional as F
from torch import nn

EIGHT_BIASES = [0.5, -0.2, -8.0, 0.1, -10.0, 0.3, -15.0, -0.1]


class EightNeuron(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 8)
        self.relu = nn.ReLU()
        self.out = nn.Linear(8, 2)

    def forward(self, x):
        return self.out(self.relu(self.fc(x)))


def eight_neuron() -> nn.Module:
    torch.manual_seed(0)
    model = EightNeuron()
    with torch.no_grad():
        model.fc.weight.copy_(torch.randn(8, 4) * 0.3)
        model.fc.bias.copy_(torch.tensor(EIGHT_BIASES))
    return model


class SharedAndFunctional(nn.Module):
    """One nn.ReLU(inplace) used at two places, plus F.relu, torch.relu, Tensor.relu_ and an inplace F.relu."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 10)
        self.fc2 = nn.Linear(10, 10)
        self.fc3 = nn.Linear(10, 10)
        self.fc4 = nn.Linear(10, 10)
        self.fc5 = nn.Linear(10, 3)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        x = self.relu(self.fc1(x))
        x = self.relu(self.fc2(x))
        x = F.relu(self.fc3(x))
        x = torch.relu(self.fc4(x))
        x = self.fc5(x).relu_()
        return F.relu(x - 0.5, inplace=True)


def shared_and_functional() -> nn.Module:
    torch.manual_seed(1)
    model = SharedAndFunctional()
    with torch.no_grad():
        model.fc1.bias[[0, 7]] = -20.0
        model.fc2.bias[[3]] = -20.0
        model.fc3.bias[[1, 2, 9]] = -20.0
        model.fc4.bias[[5]] = -20.0
    return model


class ConvBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.act = nn.ReLU()
        self.conv1d = nn.Conv1d(6, 4, 1)
        self.act1d = nn.ReLU()

    def forward(self, x):
        x = self.act(self.bn(self.conv(x)))
        x = x.flatten(2)  # [N, 6, H*W]
        return self.act1d(self.conv1d(x))  # rank 3 from a Conv1d: units on dim 1


def conv_bn() -> nn.Module:
    torch.manual_seed(2)
    model = ConvBN()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-0.1, 0.1)
        model.bn.running_var.uniform_(0.8, 1.2)
        model.bn.weight[[2, 4]] = 0.0
        model.bn.bias[[2, 4]] = -1.0  # gamma 0, beta < 0: dead for every input
        model.conv1d.bias[[1]] = -50.0
    return model


class Relu6Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 6)
        self.act = nn.ReLU6()
        self.fc2 = nn.Linear(6, 6)

    def forward(self, x):
        return F.relu6(self.fc2(self.act(self.fc(x))))


def relu6_model() -> nn.Module:
    torch.manual_seed(3)
    model = Relu6Model()
    with torch.no_grad():
        model.fc.bias[[0]] = -100.0  # dead
        model.fc.bias[[1]] = 100.0  # saturated at 6
        model.fc2.bias[[2]] = -100.0
    return model


class Tokens(nn.Module):
    """[B, T, F] Linear outputs: units on the last axis."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(8, 16)
        self.down = nn.Linear(16, 8)

    def forward(self, x):
        return self.down(F.relu(self.up(x)))


def tokens() -> nn.Module:
    torch.manual_seed(4)
    model = Tokens()
    with torch.no_grad():
        model.up.bias[[0, 5, 6]] = -40.0
    return model


class TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 4)
        self.b = nn.Linear(2, 4)

    def forward(self, image, extra):
        return torch.relu(self.a(image) + self.b(extra))


def two_inputs() -> nn.Module:
    torch.manual_seed(5)
    return TwoInputs()


class CausesMLP(nn.Module):
    """One dead unit per cause (data: x in [0, 1]^4). fc1: 0 negative bias, 1 collapsed weights,
    2 direction (weights point away from the positive data); fc2: unit 0 reads only fc1's dead units."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 8)
        self.fc2 = nn.Linear(8, 6)
        self.out = nn.Linear(6, 2)

    def forward(self, x):
        return self.out(F.relu(self.fc2(F.relu(self.fc1(x)))))


def causes_mlp() -> nn.Module:
    torch.manual_seed(6)
    model = CausesMLP()
    with torch.no_grad():
        model.fc1.weight.copy_(
            torch.rand(8, 4) + 0.2
        )  # positive weights: every unit fires on positive data...
        model.fc1.bias.fill_(0.1)
        model.fc1.bias[0] = -50.0  # ...unless its bias is far negative
        model.fc1.weight[1] *= 1e-4  # collapsed weights (weight decay's signature)
        model.fc1.bias[1] = -0.01
        model.fc1.weight[2] = -model.fc1.weight[2]  # points away from the data
        model.fc1.bias[2] = 0.0
        model.fc2.weight.copy_(torch.rand(6, 8) + 0.1)
        model.fc2.bias.fill_(0.1)
        model.fc2.weight[0] = 0.0
        model.fc2.weight[0, :3] = 1.0  # reads only fc1's dead units 0, 1, 2
        model.fc2.bias[0] = 0.0
    return model


class ReluBeforeSoftmax(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return torch.softmax(torch.relu(self.fc(x)), dim=-1)


def relu_before_softmax() -> nn.Module:
    torch.manual_seed(7)
    return ReluBeforeSoftmax()


class Graded(nn.Module):
    """One unit per status (data: standard normal x[N, 3]). fc: 0 dead (bias -20), 1 dying (fires only
    when x0 > 2.7, ~0.35% of samples), 2 dormant (fires half the time with a tiny weight), 3-5 alive;
    fc2 + ReLU6: 0 saturated (bias +100), 1 dead (bias -100), 2-3 alive."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 6)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(6, 4)
        self.act6 = nn.ReLU6()
        self.out = nn.Linear(4, 2)

    def forward(self, x):
        return self.out(self.act6(self.fc2(self.act(self.fc(x)))))


def graded() -> nn.Module:
    torch.manual_seed(8)
    model = Graded()
    with torch.no_grad():
        model.fc.weight.copy_(torch.randn(6, 3))
        model.fc.bias.fill_(0.5)
        model.fc.weight[0] = torch.tensor([1.0, 0.0, 0.0])
        model.fc.bias[0] = -20.0
        model.fc.weight[1] = torch.tensor([1.0, 0.0, 0.0])
        model.fc.bias[1] = -2.7
        model.fc.weight[2] = torch.tensor([0.01, 0.0, 0.0])
        model.fc.bias[2] = 0.0
        model.fc2.bias[0] = 100.0
        model.fc2.bias[1] = -100.0
    return model


class SmoothOps(nn.Module):
    """The optional --ops: LeakyReLU(0.2), ELU(0.7), GELU and SiLU, one Linear before each, plus a ReLU
    that --ops leaky_relu,elu,gelu,silu leaves out. Unit 0 of each site: bias -30, never above 0."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.leaky = nn.Linear(4, 5), nn.LeakyReLU(0.2)
        self.fc2, self.elu = nn.Linear(5, 5), nn.ELU(alpha=0.7)
        self.fc3, self.gelu = nn.Linear(5, 5), nn.GELU()
        self.fc4, self.silu = nn.Linear(5, 5), nn.SiLU()
        self.fc5, self.relu = nn.Linear(5, 3), nn.ReLU()

    def forward(self, x):
        x = self.leaky(self.fc1(x))
        x = self.elu(self.fc2(x))
        x = self.gelu(self.fc3(x))
        x = self.silu(self.fc4(x))
        return self.relu(self.fc5(x))


def smooth_ops() -> nn.Module:
    torch.manual_seed(9)
    model = SmoothOps()
    with torch.no_grad():
        for fc in (model.fc1, model.fc2, model.fc3, model.fc4):
            fc.bias[0] = -30.0
    return model
