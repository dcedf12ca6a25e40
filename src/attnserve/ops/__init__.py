"""The attnserve custom ops: one computation, four faces (torch, ONNX, ONNX Runtime, GPU
kernels), all held to the NumPy references in `attnserve.ops.reference`."""

from attnserve.ops.grid_sample import affine_grid_sample, grid_sample
from attnserve.ops.recurrent import gru_layer, lstm_layer
from attnserve.ops.window_attention import window_attention

__all__ = ["affine_grid_sample", "grid_sample", "gru_layer", "lstm_layer", "window_attention"]
