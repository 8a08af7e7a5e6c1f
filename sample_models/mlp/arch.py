"""Architecture of the sample MLP (used with --arch sample_models/mlp/arch.py:build)."""

import torch.nn.functional as F
from torch import nn


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(16, 32)
        self.act1 = nn.ReLU()
        self.fc2 = nn.Linear(32, 8)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        x = self.act1(self.fc1(x))
        x = F.relu(self.fc2(x))  # functional: missed by module hooks, found by deadrelu
        return self.head(x)


def build() -> nn.Module:
    return MLP()
