"""`attnserve::gru_layer`: one GRU direction over padded sequences of any length.

torch.export unrolls nn.GRU over the time axis and so fixes the sequence length of the
exported graph. As a custom op the layer exports as ONNX's own `GRU` node instead, with
`sequence_lens`, which runs any length and handles padding in both directions: a
forward layer stops at each sequence's end, a reverse one starts there. The eager
kernel defines the same semantics with an explicit masked loop: outputs at padded
positions are zero, and the final state is the state after the last real step.
"""

from __future__ import annotations

import torch
from torch import nn


@torch.library.custom_op("attnserve::gru_layer", mutates_args=())
def gru_layer_op(x: torch.Tensor, lengths: torch.Tensor, w_ih: torch.Tensor, w_hh: torch.Tensor,
                 b_ih: torch.Tensor, b_hh: torch.Tensor, reverse: bool) -> tuple[torch.Tensor, torch.Tensor]:
    B, S, _ = x.shape
    hidden = w_hh.shape[1]
    h = x.new_zeros(B, hidden)
    out = x.new_zeros(B, S, hidden)
    steps = range(S - 1, -1, -1) if reverse else range(S)
    for t in steps:
        valid = (t < lengths).unsqueeze(1)  # (B, 1): padding leaves the state alone
        h_new = torch._VF.gru_cell(x[:, t], h, w_ih, w_hh, b_ih, b_hh)
        h = torch.where(valid, h_new, h)
        out[:, t] = torch.where(valid, h_new, torch.zeros_like(h_new))
    return out, h


@gru_layer_op.register_fake
def _(x, lengths, w_ih, w_hh, b_ih, b_hh, reverse):
    B, S, _ = x.shape
    hidden = w_hh.shape[1]
    return x.new_empty(B, S, hidden), x.new_empty(B, hidden)


def gru_layer(gru: nn.GRU, x: torch.Tensor, lengths: torch.Tensor, reverse: bool = False):
    """Run a one-layer, one-direction, batch-first nn.GRU's weights over x (B, S, I)
    with per-sequence lengths (B,): -> outputs (B, S, H), final state (B, H)."""
    if gru.num_layers != 1 or gru.bidirectional or not gru.batch_first or not gru.bias:
        raise ValueError("gru_layer takes a one-layer, one-direction, batch-first GRU with biases")
    return gru_layer_op(x, lengths, gru.weight_ih_l0, gru.weight_hh_l0, gru.bias_ih_l0, gru.bias_hh_l0,
                        bool(reverse))


def onnx_translation(op):
    """The ONNX form: a standard GRU node (opset `op`), with PyTorch's gate order
    (r, z, n) reordered to ONNX's (z, r, h), and linear_before_reset as PyTorch does.
    The recurrence runs in fp32 in half-precision graphs: ONNX Runtime 1.31 has no fp16
    CPU GRU (it crashed creating the session), and errors compound over time steps."""

    def reorder(w, hidden: int):
        r = op.Slice(w, op.Constant(value_ints=[0]), op.Constant(value_ints=[hidden]))
        z = op.Slice(w, op.Constant(value_ints=[hidden]), op.Constant(value_ints=[2 * hidden]))
        n = op.Slice(w, op.Constant(value_ints=[2 * hidden]), op.Constant(value_ints=[3 * hidden]))
        return op.Concat(z, r, n, axis=0)

    def gru_layer(x, lengths, w_ih, w_hh, b_ih, b_hh, reverse):
        hidden = w_hh.shape[1]
        axis0 = op.Constant(value_ints=[0])
        f32 = 1  # TensorProto.FLOAT
        w_ih, w_hh, b_ih, b_hh = (op.Cast(w, to=f32) for w in (w_ih, w_hh, b_ih, b_hh))
        W = op.Unsqueeze(reorder(w_ih, hidden), axis0)  # (1, 3H, I)
        R = op.Unsqueeze(reorder(w_hh, hidden), axis0)  # (1, 3H, H)
        B = op.Unsqueeze(op.Concat(reorder(b_ih, hidden), reorder(b_hh, hidden), axis=0), axis0)  # (1, 6H)
        X = op.Transpose(op.Cast(x, to=f32), perm=[1, 0, 2])  # (S, B, I)
        Y, Y_h = op.GRU(X, W, R, B, op.Cast(lengths, to=6), hidden_size=hidden, linear_before_reset=1,
                        direction="reverse" if reverse else "forward")
        y = op.Transpose(op.Squeeze(Y, op.Constant(value_ints=[1])), perm=[1, 0, 2])  # (B, S, H)
        return op.CastLike(y, x), op.CastLike(op.Squeeze(Y_h, axis0), x)  # (B, H)

    return gru_layer
