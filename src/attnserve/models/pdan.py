"""PDAN: Pyramid Dilated Attention Network for temporal action detection.

Dai, Das, Minciullo, Garattoni, Francesca, Bremond, "PDAN: Pyramid Dilated Attention
Network for Action Detection", WACV 2021. https://hal.inria.fr/hal-03026308
The authors' code: https://github.com/dairui01/PDAN (PDAN.py).

Per-frame features of an untrimmed video (I3D RGB features, 1024-d per snippet) go
through a 1x1 convolution to d channels, a stack of PDAN blocks and a 1x1 classifier
that gives multi-label logits for every frame (sigmoid scores, trained with binary
cross-entropy; `attnserve.postprocess_pdan` turns them into segments).

A PDAN block is a Dilated Attention Layer (DAL), ReLU, a 1x1 convolution, dropout and
a residual connection. The DAL is a temporal convolution whose kernel is replaced by
attention: for frame t at dilation rate r the kernel covers the frames t - r, t, t + r
(kernel size 3), queries, keys and values are 1x1 convolutions of the block input, and
the output is the softmax-weighted sum of the kernel's values,

    DAL(f)_t = sum_{i in {t-r, t, t+r}} softmax_i(q_t k_i) v_i,

with no 1/sqrt(d) scale (the authors' code has none). The blocks' rates form the
pyramid 2^0 ... 2^(N-1) (1, 2, 4, 8, 16 in the paper's 5 blocks, d = 512): one frame's
output depends on 1 + 2 (1 + 2 + ... + 2^(N-1)) = 63 frames.

The attention is the `attnserve::window_attention` op in its "sliding" mode, with
window 3 and dilation r, over the frame axis. Two details that the formula above does
not settle follow the authors' code:

- The product q_t k_i is taken channel by channel (their DAL multiplies q and k element
  by element and normalises each channel over the kernel): every channel is one head of
  dimension 1. `num_heads` groups channels into fewer, wider heads (dot products within
  a head) for other variants.
- At the ends of the clip the missing taps are zero frames (their code pads the input
  with zeros before the bias-free key and value convolutions): a zero key with logit 0
  and a zero value that take part in the softmax. `border="exclude"` drops them
  instead (the op's own rule: keys outside the clip leave the softmax).

The authors' code also adds a learned per-channel, per-tap vector `rel_t` to the values
(v_i + rel_t[:, tap of i]). It is not part of the layer as described above, and the op
cannot express it (the op's values belong to key frames, rel_t to the tap offset: frame
t + r is tap 2 for the query t but tap 1 for the query t + r), so it is left out; the
authors' released weights therefore do not load as they are (rel_t is an extra key).

The model has no position-dependent parameters: the exported graph takes clips of any
number of frames (from 1: taps beyond the clip are zero frames or excluded).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from attnserve.errors import InputError
from attnserve.models.registry import register_model
from attnserve.ops import window_attention
from attnserve.spec import DEFAULT_TOLERANCES, ModelSpec, TensorSpec

BORDERS = ("zeros", "exclude")


@dataclass(frozen=True)
class PdanConfig:
    feature_dim: int = 1024  # I3D RGB features (Mixed_5c, pooled), one per snippet
    dim: int = 512  # d, the width of every block
    num_blocks: int = 5  # dilation rates 1, 2, 4, 8, 16
    num_classes: int = 157  # Charades
    kernel_size: int = 3  # the DAL's kernel: frames t - r, t, t + r
    # None: one head per channel (the authors' code); else channels / num_heads per head.
    num_heads: int | None = None
    border: str = "zeros"  # "zeros" (the authors' code) or "exclude" (see the docstring)
    dropout: float = 0.5  # after each block's 1x1 convolution, as the authors' code
    # Frames of the example inputs (export, benchmarks); the graph takes any length.
    num_frames: int = 128

    @property
    def dilations(self) -> tuple[int, ...]:
        return tuple(2**i for i in range(self.num_blocks))

    @property
    def receptive_field(self) -> int:
        """Frames one output frame depends on: 1 + 2 * sum of the rates' reach."""
        return 1 + 2 * sum(r * (self.kernel_size - 1) // 2 for r in self.dilations)


class DilatedAttentionLayer(nn.Module):
    """DAL: attention over the dilated kernel {t - r, t, t + r}; (B, d, T) -> (B, d, T).

    Names follow the authors' code (query_conv, key_conv, value_conv: bias-free 1x1
    convolutions).
    """

    def __init__(self, dim: int, dilation: int, kernel_size: int = 3, num_heads: int | None = None,
                 border: str = "zeros"):
        super().__init__()
        num_heads = dim if num_heads is None else num_heads
        if dim % num_heads:
            raise ValueError(f"{dim} channels do not split into {num_heads} heads")
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"the DAL's kernel is centred on its frame: kernel_size must be odd, "
                             f"got {kernel_size}")
        if border not in BORDERS:
            raise ValueError(f"border must be one of {BORDERS}, got {border!r}")
        self.dim, self.dilation, self.kernel_size = dim, dilation, kernel_size
        self.num_heads, self.head_dim, self.border = num_heads, dim // num_heads, border
        self.query_conv = nn.Conv1d(dim, dim, 1, bias=False)
        self.key_conv = nn.Conv1d(dim, dim, 1, bias=False)
        self.value_conv = nn.Conv1d(dim, dim, 1, bias=False)
        for conv in (self.query_conv, self.key_conv, self.value_conv):  # the authors' init
            nn.init.kaiming_normal_(conv.weight, mode="fan_out")

    @property
    def reach(self) -> int:
        """Frames between the query and its farthest tap."""
        return self.dilation * (self.kernel_size - 1) // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.query_conv(x), self.key_conv(x), self.value_conv(x)  # (B, d, T)
        pad = self.reach if self.border == "zeros" else 0
        if pad:
            # Zero frames beyond both ends: the key and value convolutions have no bias,
            # so padding their outputs is padding their input (the authors' code). The
            # op then sees every tap inside the padded clip; the padded queries' outputs
            # are cut off below.
            q, k, v = (F.pad(t, (pad, pad)) for t in (q, k, v))
        B, _, T = q.shape

        def heads(t: torch.Tensor) -> torch.Tensor:  # (B, d, T) -> (B, heads, T, head_dim)
            return t.reshape(B, self.num_heads, self.head_dim, T).transpose(2, 3)

        out = window_attention(heads(q), heads(k), heads(v), window=(self.kernel_size,), mode="sliding",
                               dilation=(self.dilation,), scale=1.0)  # unscaled q_t k_i
        out = out.transpose(2, 3).reshape(B, self.dim, T)  # heads concatenated: (B, d, T)
        return out[:, :, pad:T - pad] if pad else out


class PdanBlock(nn.Module):
    """DAL -> ReLU -> 1x1 convolution -> dropout, plus the block's input."""

    def __init__(self, dim: int, dilation: int, cfg: PdanConfig):
        super().__init__()
        self.conv_attention = DilatedAttentionLayer(dim, dilation, cfg.kernel_size, cfg.num_heads, cfg.border)
        self.conv_1x1 = nn.Conv1d(dim, dim, 1)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.dropout(self.conv_1x1(F.relu(self.conv_attention(x))))


class PDAN(nn.Module):
    """Per-frame features (B, T, feature_dim) -> per-frame multi-label logits
    (B, T, num_classes). Frames of one batch share one length; run videos of other
    lengths as other batches (nothing here masks padded frames)."""

    def __init__(self, cfg: PdanConfig):
        super().__init__()
        self.cfg = cfg
        self.conv_1x1 = nn.Conv1d(cfg.feature_dim, cfg.dim, 1)
        self.layers = nn.ModuleList(PdanBlock(cfg.dim, r, cfg) for r in cfg.dilations)
        self.conv_out = nn.Conv1d(cfg.dim, cfg.num_classes, 1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if features.dim() != 3 or features.shape[2] != self.cfg.feature_dim:
            raise InputError(
                f"pdan takes per-frame features of shape (batch, frames, {self.cfg.feature_dim}), got "
                f"{tuple(features.shape)}; extract {self.cfg.feature_dim}-d features per snippet first")
        if features.shape[1] < 1:
            raise InputError("pdan needs at least one frame of features, got 0")
        x = self.conv_1x1(features.transpose(1, 2))  # (B, d, T), the layout of Conv1d
        for layer in self.layers:
            x = layer(x)
        return self.conv_out(x).transpose(1, 2)  # (B, T, classes)


CONFIGS = {
    # tiny: the paper's 5 blocks (rates 1..16, so 40 frames reach past both ends) at
    # d = 32 on 64-d features, 10 classes (23k parameters).
    "tiny": PdanConfig(feature_dim=64, dim=32, num_classes=10, num_frames=40),
    # The paper's network (5 blocks, d = 512, 1024-d I3D RGB features) per dataset.
    "charades": PdanConfig(),  # 157 classes
    "multithumos": PdanConfig(num_classes=65),
    "tsu": PdanConfig(num_classes=51),  # Toyota Smarthome Untrimmed
}


def _spec(name: str, config_name: str, cfg: PdanConfig) -> ModelSpec:
    return ModelSpec(
        name=name,
        config=config_name,
        task="temporal-action-detection",
        inputs=(TensorSpec("features", "float32", ("batch", "frames", cfg.feature_dim)),),
        outputs=(TensorSpec("logits", "float32", ("batch", "frames", cfg.num_classes)),),
        default_dims={"frames": cfg.num_frames},
        tolerances=dict(DEFAULT_TOLERANCES),
    )


register_model(
    "pdan",
    configs=CONFIGS,
    spec=_spec,
    paper="Dai et al., PDAN: Pyramid Dilated Attention Network for Action Detection, WACV 2021",
    custom_ops=("WindowAttention",),
)(PDAN)
