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


class GeluTanh(nn.GELU):
    """GELU with the tanh approximation, 0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3))):
    the default of JAX's `nn.gelu`, so the activation of models trained in JAX (ViViT),
    and Hugging Face's `gelu_fast` / `gelu_new` / `gelu_pytorch_tanh` (the same function,
    rounded differently: within 5e-7 of `gelu_fast`). Exports as one ONNX Gelu node
    (approximate="tanh")."""

    def __init__(self):
        super().__init__(approximate="tanh")
