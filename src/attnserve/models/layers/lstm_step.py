"""One step of an nn.LSTMCell, written out, for models that unroll a recurrence whose
input depends on the previous step (RAM's glimpses, RACDNN's sub-regions), where the
sequence-level `attnserve.ops.lstm_layer` does not apply."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def lstm_step(cell: nn.LSTMCell, x: torch.Tensor, h: torch.Tensor,
              c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """nn.LSTMCell's step on its own weights (gates i, f, g, o): (h, c) -> (h', c'). It
    equals `cell(x, (h, c))` and traces to fewer operations than the module, which keeps
    exporting an unrolled graph quick."""
    gates = F.linear(x, cell.weight_ih, cell.bias_ih) + F.linear(h, cell.weight_hh, cell.bias_hh)
    i, f, g, o = gates.chunk(4, dim=-1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c), c
