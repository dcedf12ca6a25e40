"""The transformer feed-forward block."""

from torch import nn


class Mlp(nn.Module):
    """Linear - GELU - Linear (Vaswani et al. 2017, eq. 2, with the GELU of ViT)."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))
