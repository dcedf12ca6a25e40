"""The GRU layer op: padded sequences of any length, eager and as ONNX's GRU."""

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from attnserve.export.onnx_export import _torch_export
from attnserve.ops import gru_layer
from attnserve.spec import ModelSpec, TensorSpec

torch.manual_seed(0)
GRU = torch.nn.GRU(4, 5, batch_first=True)
LENGTHS = torch.tensor([6, 2, 4, 1])


def test_forward_matches_packed_nn_gru():
    x = torch.randn(4, 6, 4)
    y, h = gru_layer(GRU, x, LENGTHS)
    packed, h_ref = GRU(pack_padded_sequence(x, LENGTHS, batch_first=True, enforce_sorted=False))
    y_ref, _ = pad_packed_sequence(packed, batch_first=True, total_length=6)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(h, h_ref[0])


def test_reverse_reads_each_sequence_backwards_from_its_end():
    x = torch.randn(4, 6, 4)
    y, h = gru_layer(GRU, x, LENGTHS, reverse=True)
    for b, n in enumerate(LENGTHS.tolist()):
        out, last = GRU(x[b:b + 1, :n].flip(1))
        torch.testing.assert_close(y[b, :n], out[0].flip(0))
        torch.testing.assert_close(h[b], last[0, 0])
        assert torch.all(y[b, n:] == 0)


class _Both(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.gru = GRU

    def forward(self, x, lengths):
        y, h = gru_layer(self.gru, x, lengths)
        yr, hr = gru_layer(self.gru, x, lengths, reverse=True)
        return torch.cat([y, yr], -1), torch.cat([h, hr], -1)


@pytest.mark.parametrize("seq_len", [3, 6, 17])
def test_onnx_gru_runs_any_length(seq_len, tmp_path):
    spec = ModelSpec("g", "t", "test",
                     (TensorSpec("x", "float32", ("batch", "seq", 4)), TensorSpec("lengths", "int64", ("batch",), (1, 7))),
                     (TensorSpec("y", "float32", ("batch", "seq", 10)), TensorSpec("h", "float32", ("batch", 10))),
                     default_dims={"seq": 6})
    _torch_export(_Both().eval(), spec, tmp_path / "g.onnx", 20)
    session = ort.InferenceSession(str(tmp_path / "g.onnx"))
    x = np.random.default_rng(seq_len).standard_normal((3, seq_len, 4)).astype(np.float32)
    lengths = np.array([seq_len, max(1, seq_len // 2), 1], dtype=np.int64)
    y, h = session.run(None, {"x": x, "lengths": lengths})
    with torch.no_grad():
        y_ref, h_ref = _Both()(torch.from_numpy(x), torch.from_numpy(lengths))
    np.testing.assert_allclose(y, y_ref.numpy(), atol=1e-5)
    np.testing.assert_allclose(h, h_ref.numpy(), atol=1e-5)


LSTM = torch.nn.LSTM(4, 5, num_layers=2, batch_first=True)


def _stacked(x, lengths):
    from attnserve.ops import lstm_layer

    y, h0, c0 = lstm_layer(LSTM, x, lengths, 0)
    y, h1, c1 = lstm_layer(LSTM, y, lengths, 1)
    return y, torch.stack([h0, h1]), torch.stack([c0, c1])


def test_stacked_lstm_matches_packed_nn_lstm():
    x = torch.randn(4, 6, 4)
    y, h, c = _stacked(x, LENGTHS)
    packed, (h_ref, c_ref) = LSTM(pack_padded_sequence(x, LENGTHS, batch_first=True, enforce_sorted=False))
    y_ref, _ = pad_packed_sequence(packed, batch_first=True, total_length=6)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(h, h_ref)
    torch.testing.assert_close(c, c_ref)


class _Stacked(torch.nn.Module):
    def forward(self, x, lengths):
        return _stacked(x, lengths)


@pytest.mark.parametrize("seq_len", [2, 9])
def test_onnx_lstm_runs_any_length(seq_len, tmp_path):
    spec = ModelSpec("l", "t", "test",
                     (TensorSpec("x", "float32", ("batch", "seq", 4)), TensorSpec("lengths", "int64", ("batch",), (1, 7))),
                     (TensorSpec("y", "float32", ("batch", "seq", 5)), TensorSpec("h", "float32", (2, "batch", 5)),
                      TensorSpec("c", "float32", (2, "batch", 5))),
                     default_dims={"seq": 6})
    _torch_export(_Stacked().eval(), spec, tmp_path / "l.onnx", 20)
    session = ort.InferenceSession(str(tmp_path / "l.onnx"))
    x = np.random.default_rng(seq_len).standard_normal((3, seq_len, 4)).astype(np.float32)
    lengths = np.array([seq_len, 1, max(1, seq_len - 1)], dtype=np.int64)
    got = session.run(None, {"x": x, "lengths": lengths})
    with torch.no_grad():
        want = _stacked(torch.from_numpy(x), torch.from_numpy(lengths))
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w.numpy(), atol=1e-5)
