"""`attnserve::gru_layer` and `attnserve::lstm_layer`: one recurrent direction over
padded sequences of any length.

torch.export unrolls nn.GRU over the time axis and so fixes the sequence length of the
exported graph. As a custom op the layer exports as ONNX's own `GRU` node instead, with
`sequence_lens` (and likewise `LSTM`), which runs any length and handles padding in both directions: a
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

    def gru_layer(x, lengths, w_ih, w_hh, b_ih, b_hh, reverse):
        hidden = w_hh.shape[1]
        # torch (r, z, n) -> ONNX (z, r, h)
        X, W, R, B, seq = _onnx_rnn_inputs(op, x, lengths, (w_ih, w_hh, b_ih, b_hh), hidden, [1, 0, 2])
        Y, Y_h = op.GRU(X, W, R, B, seq, hidden_size=hidden, linear_before_reset=1,
                        direction="reverse" if reverse else "forward")
        return _onnx_rnn_outputs(op, x, Y, Y_h)

    return gru_layer


@torch.library.custom_op("attnserve::lstm_layer", mutates_args=())
def lstm_layer_op(x: torch.Tensor, lengths: torch.Tensor, w_ih: torch.Tensor, w_hh: torch.Tensor,
                  b_ih: torch.Tensor, b_hh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    B, S, _ = x.shape
    hidden = w_hh.shape[1]
    h, c = x.new_zeros(B, hidden), x.new_zeros(B, hidden)
    out = x.new_zeros(B, S, hidden)
    for t in range(S):
        valid = (t < lengths).unsqueeze(1)
        h_new, c_new = torch._VF.lstm_cell(x[:, t], (h, c), w_ih, w_hh, b_ih, b_hh)
        h, c = torch.where(valid, h_new, h), torch.where(valid, c_new, c)
        out[:, t] = torch.where(valid, h_new, torch.zeros_like(h_new))
    return out, h, c


@lstm_layer_op.register_fake
def _(x, lengths, w_ih, w_hh, b_ih, b_hh):
    B, S, _ = x.shape
    hidden = w_hh.shape[1]
    return x.new_empty(B, S, hidden), x.new_empty(B, hidden), x.new_empty(B, hidden)


def lstm_layer(lstm: nn.LSTM, x: torch.Tensor, lengths: torch.Tensor, layer: int = 0):
    """Run layer `layer` of a batch-first, one-direction nn.LSTM over x (B, S, I):
    -> outputs (B, S, H), final hidden and cell states (B, H)."""
    if lstm.bidirectional or not lstm.batch_first or not lstm.bias or lstm.proj_size:
        raise ValueError("lstm_layer takes a one-direction, batch-first LSTM with biases")
    return lstm_layer_op(x, lengths, *(getattr(lstm, f"{n}_l{layer}") for n in
                                       ("weight_ih", "weight_hh", "bias_ih", "bias_hh")))


def lstm_onnx_translation(op):
    """ONNX's LSTM, with PyTorch's gate order (i, f, g, o) reordered to ONNX's
    (i, o, f, c); in fp32 as the GRU is."""

    def lstm_layer(x, lengths, w_ih, w_hh, b_ih, b_hh):
        hidden = w_hh.shape[1]
        # torch (i, f, g, o) -> ONNX (i, o, f, c)
        X, W, R, B, seq = _onnx_rnn_inputs(op, x, lengths, (w_ih, w_hh, b_ih, b_hh), hidden, [0, 3, 1, 2])
        Y, Y_h, Y_c = op.LSTM(X, W, R, B, seq, hidden_size=hidden)
        return _onnx_rnn_outputs(op, x, Y, Y_h, Y_c)

    return lstm_layer


def _onnx_rnn_inputs(op, x, lengths, weights, hidden: int, gate_order: list[int]):
    """ONNX RNN inputs from one torch layer's weights, in fp32: X (S, B, I), W (1, gH, I),
    R (1, gH, H), B (1, 2gH) with torch's gates reordered to ONNX's, sequence_lens int32."""
    f32 = 1  # TensorProto.FLOAT
    axis0 = op.Constant(value_ints=[0])

    def reorder(w):  # gate blocks of `hidden` rows, rearranged
        gates = [op.Slice(w, op.Constant(value_ints=[k * hidden]), op.Constant(value_ints=[(k + 1) * hidden]))
                 for k in range(len(gate_order))]
        return op.Concat(*[gates[k] for k in gate_order], axis=0)

    w_ih, w_hh, b_ih, b_hh = (reorder(op.Cast(w, to=f32)) for w in weights)
    W, R = op.Unsqueeze(w_ih, axis0), op.Unsqueeze(w_hh, axis0)
    B = op.Unsqueeze(op.Concat(b_ih, b_hh, axis=0), axis0)
    X = op.Transpose(op.Cast(x, to=f32), perm=[1, 0, 2])
    return X, W, R, B, op.Cast(lengths, to=6)  # 6: TensorProto.INT32


def _onnx_rnn_outputs(op, x, Y, *states):
    """Y (S, 1, B, H) -> (B, S, H) and each final state (1, B, H) -> (B, H), in x's dtype."""
    y = op.Transpose(op.Squeeze(Y, op.Constant(value_ints=[1])), perm=[1, 0, 2])
    return (op.CastLike(y, x), *(op.CastLike(op.Squeeze(h, op.Constant(value_ints=[0])), x) for h in states))
