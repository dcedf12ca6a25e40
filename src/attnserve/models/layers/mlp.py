"""The transformer feed-forward block."""

from torch import nn


class Mlp(nn.Module):
    """Linear - activation - Linear (Vaswani et al. 2017, eq. 2: ReLU; ViT uses GELU)."""

    def __init__(self, dim: int, hidden_dim: int, act_layer: type[nn.Module] = nn.GELU):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = act_layer()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))
