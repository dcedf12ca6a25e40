"""Separable spatio-temporal attention (separable STA) on I3D features, driven by 3-D poses.

Das, Dai, Koperski, Minciullo, Garattoni, Bremond, Francesca, "Toyota Smarthome:
Real-World Activities of Daily Living", ICCV 2019 (the method it proposes with the dataset).

The clip's I3D feature map g (Mixed_5c: t x m x n x c, 8 x 7 x 7 x 1024 for 64 frames of
224 x 224) is modulated by attention weights computed from the 3-D skeleton sequence of
the same clip (13 joints from LCR-Net). A 3-layer LSTM encodes the poses; its final
hidden state h* drives both attentions, each through its own two-layer network with a
tanh hidden layer and a softmax:

    alpha = softmax(W_s2 tanh(W_s1 h* + b_s1) + b_s2)    m x n spatial weights,
    beta  = softmax(W_t2 tanh(W_t1 h* + b_t1) + b_t2)    t temporal weights.

Separable: the two are computed jointly from one pose encoding but applied separately,
alpha to every frame of g (g_s = alpha * g, broadcast over t and c) and beta to every
location (g_t = beta * g, broadcast over m, n and c), instead of one t x m x n weighting.
The combined prediction is a 1 x 1 x 1 convolution (a linear layer on the pooled map) of
the two attended maps, each globally average-pooled and then concatenated:
logits = W [GAP(g_s); GAP(g_t)] + b.

The model takes the feature map as (batch, c, t, m, n), the layout of a PyTorch I3D's
Mixed_5c, and the poses as (batch, frames, joints, 3). Its outputs are the logits and
the two attention maps. The attention layers' sizes fix t, m and n; the pose sequence
may have any length from t frames on (the poses of the clip the features come from,
sampled at any rate; fewer poses than feature steps is refused as a mismatch). The
LSTM is `attnserve::lstm_layer` (an ONNX LSTM node), so the exported graph keeps that
length dynamic. Clip top-k is `attnserve.imaging.top_k`, the client's and the video
servers' softmax top-k.

Not stated in the paper, chosen here: the width of the attention networks' hidden layer
(`attention_hidden`, the LSTM's width 512 by default) and dropout (0.5, training only)
before the classifier. The LSTM's 512 units and the 13 x 3 pose input are those of the
authors' skeleton LSTM for Toyota Smarthome (srijandas07/LSTM_action_recognition).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from attnserve.errors import InputError
from attnserve.models.registry import register_model
from attnserve.ops import lstm_layer
from attnserve.spec import DEFAULT_TOLERANCES, ModelSpec, TensorSpec


@dataclass(frozen=True)
class SeparableStaConfig:
    channels: int = 1024  # c: I3D Mixed_5c
    feature_frames: int = 8  # t: 64 input frames / I3D's temporal stride 8
    feature_height: int = 7  # m: 224 px / 32
    feature_width: int = 7  # n
    num_joints: int = 13  # LCR-Net's skeleton
    lstm_hidden: int = 512
    lstm_layers: int = 3
    attention_hidden: int = 512
    num_classes: int = 31  # Toyota Smarthome
    dropout: float = 0.5
    # Poses in the example inputs (export, benchmarks): one per frame of the I3D clip.
    skeleton_frames: int = 64


class PoseAttention(nn.Module):
    """3-D poses (B, S, J, 3) -> spatial weights alpha (B, m, n) and temporal weights
    beta (B, t), each summing to 1."""

    def __init__(self, cfg: SeparableStaConfig):
        super().__init__()
        self.cfg = cfg
        self.lstm = nn.LSTM(cfg.num_joints * 3, cfg.lstm_hidden, cfg.lstm_layers, batch_first=True)
        spatial = cfg.feature_height * cfg.feature_width
        self.spatial = nn.Sequential(nn.Linear(cfg.lstm_hidden, cfg.attention_hidden), nn.Tanh(),
                                     nn.Linear(cfg.attention_hidden, spatial))
        self.temporal = nn.Sequential(nn.Linear(cfg.lstm_hidden, cfg.attention_hidden), nn.Tanh(),
                                      nn.Linear(cfg.attention_hidden, cfg.feature_frames))

    def encode(self, skeleton: torch.Tensor) -> torch.Tensor:
        """h*: the last layer's hidden state after the last pose, (B, lstm_hidden)."""
        x = skeleton.flatten(2)  # (B, S, J * 3): one pose vector per frame
        # Every sequence runs to its end (a batch of clips shares one pose count).
        lengths = torch.ones_like(x[:, :, 0], dtype=torch.int64).sum(dim=1)  # (B,) = S
        for layer in range(self.cfg.lstm_layers):
            x, h, _ = lstm_layer(self.lstm, x, lengths, layer)
        return h

    def forward(self, skeleton: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.encode(skeleton)
        alpha = self.spatial(h).softmax(dim=-1)  # over the m x n locations
        beta = self.temporal(h).softmax(dim=-1)  # over the t steps
        return alpha.reshape(-1, self.cfg.feature_height, self.cfg.feature_width), beta


class SeparableSTA(nn.Module):
    """(features (B, c, t, m, n), skeleton (B, S, J, 3)) -> (logits (B, classes),
    spatial_attention (B, m, n), temporal_attention (B, t))."""

    def __init__(self, cfg: SeparableStaConfig):
        super().__init__()
        self.cfg = cfg
        self.attention = PoseAttention(cfg)
        self.dropout = nn.Dropout(cfg.dropout)
        # The 1 x 1 x 1 convolution on the pooled, concatenated maps: a linear layer.
        self.classifier = nn.Linear(2 * cfg.channels, cfg.num_classes)

    def check_inputs(self, features: torch.Tensor, skeleton: torch.Tensor) -> None:
        cfg = self.cfg
        grid = (cfg.channels, cfg.feature_frames, cfg.feature_height, cfg.feature_width)
        if features.dim() != 5 or tuple(features.shape[1:]) != grid:
            raise InputError(
                f"separable_sta takes an I3D feature map of shape (batch, {', '.join(map(str, grid))}) "
                f"(batch, c, t, m, n), got {tuple(features.shape)}")
        if skeleton.dim() != 4 or tuple(skeleton.shape[2:]) != (cfg.num_joints, 3):
            raise InputError(
                f"separable_sta takes 3-D poses of shape (batch, frames, {cfg.num_joints}, 3), got "
                f"{tuple(skeleton.shape)}")
        if skeleton.shape[0] != features.shape[0]:
            raise InputError(
                f"separable_sta got {features.shape[0]} feature maps but {skeleton.shape[0]} pose "
                "sequences; send one pose sequence per clip")
        if skeleton.shape[1] < cfg.feature_frames:
            raise InputError(
                f"the pose sequence has {skeleton.shape[1]} frames but the feature map "
                f"{cfg.feature_frames} steps: send the poses of the clip the features come from, "
                f"at least one per step")

    def forward(self, features: torch.Tensor, skeleton: torch.Tensor):
        self.check_inputs(features, skeleton)
        alpha, beta = self.attention(skeleton)  # (B, m, n), (B, t)
        g_s = features * alpha[:, None, None]  # alpha over every frame and channel
        g_t = features * beta[:, None, :, None, None]  # beta over every location and channel
        pooled = torch.cat([g_s.mean(dim=(2, 3, 4)), g_t.mean(dim=(2, 3, 4))], dim=1)  # (B, 2c)
        return self.classifier(self.dropout(pooled)), alpha, beta


CONFIGS = {
    # tiny: 32-channel 4 x 3 x 3 maps, a 3-layer LSTM of 32 units on the 13-joint poses,
    # 10 classes (29k parameters).
    "tiny": SeparableStaConfig(channels=32, feature_frames=4, feature_height=3, feature_width=3,
                               lstm_hidden=32, attention_hidden=32, num_classes=10, skeleton_frames=16),
    # Toyota Smarthome: I3D Mixed_5c of 64-frame 224 x 224 clips, 31 activities.
    "smarthome": SeparableStaConfig(),
}


def _spec(name: str, config_name: str, cfg: SeparableStaConfig) -> ModelSpec:
    grid = (cfg.feature_frames, cfg.feature_height, cfg.feature_width)
    return ModelSpec(
        name=name,
        config=config_name,
        task="pose-video-classification",
        inputs=(TensorSpec("features", "float32", ("batch", cfg.channels, *grid)),
                TensorSpec("skeleton", "float32", ("batch", "frames", cfg.num_joints, 3))),
        outputs=(TensorSpec("logits", "float32", ("batch", cfg.num_classes)),
                 TensorSpec("spatial_attention", "float32", ("batch", cfg.feature_height, cfg.feature_width)),
                 TensorSpec("temporal_attention", "float32", ("batch", cfg.feature_frames))),
        default_dims={"frames": cfg.skeleton_frames},
        tolerances=dict(DEFAULT_TOLERANCES),
    )


register_model(
    "separable_sta",
    configs=CONFIGS,
    spec=_spec,
    paper="Das et al., Toyota Smarthome: Real-World Activities of Daily Living, ICCV 2019",
)(SeparableSTA)
