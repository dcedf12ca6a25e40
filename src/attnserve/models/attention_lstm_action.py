"""Soft-attention LSTM for action recognition: where to look in each frame, from what the
LSTM has seen so far.

Sharma, Kiros, Salakhutdinov, "Action Recognition using Visual Attention", ICLR 2016
workshop. https://arxiv.org/abs/1511.04119

- Features (sec. 2.1): each frame through GoogLeNet to its last convolutional layer, a
  K x K x D cube (7 x 7 x 1024 at 224 x 224), read as K^2 feature slices X_t,i in R^D,
  row-major so the attention reshapes onto the grid.
- Attention (sec. 2.2, eq. 4-5): at step t a softmax over the K^2 locations from the
  previous hidden state, l_t,i = exp(W_i^T h_{t-1}) / sum_j exp(W_j^T h_{t-1}) (no bias in
  eq. 4), and the LSTM input is the expected slice x_t = sum_i l_t,i X_t,i (soft attention).
- LSTM (eq. 1-3): a deep LSTM, 3 layers (sec. 4.2); layer 1 reads x_t, layer n the output
  of layer n - 1; the location softmax reads the top layer's h_{t-1}.
- Initial state (sec. 2.2): c_0 = f_init,c(u), h_0 = f_init,h(u) with u the mean of the
  feature slices over all frames and locations, f_init two MLPs. The paper gives no
  sizes; ours have the form of the authors' released code (actrec.py: hidden layers of
  width D with ReLU, then a tanh layer to the states), one hidden layer shared by the
  two, giving the states of every layer.
- Prediction (sec. 2.2): y_t, a softmax over classes through an additional tanh hidden
  layer on the top layer's h_t. Of the two readings of the clip (the last step's y_T, or
  the average), we take the paper's test protocol (sec. 4.2, Training details and
  evaluation): class predictions at every time step, averaged over the clip's frames.
  `logits` is log(mean_t y_t), so softmax(logits) is that average exactly. Hollywood2
  is multi-label (the authors' actrec_mAP.py: per-class sigmoids, averaged over time);
  its `logits` are logit(mean_t sigmoid(z_t)), so sigmoid(logits) is the average.

The model takes video frames, as the zoo's other video models do (vivit, nonlocal_i3d):
the client, the Triton video pipelines and the stream model send preprocessed clips
(batch, frames, 3, H, W), so the trunk is in the graph. `classify_features` runs the same
recurrence on pre-extracted 7 x 7 x 1024 cubes in eager mode.

The trunk is GoogLeNet as torchvision builds it (batch norm after every convolution, and
its 3 x 3 convolution where the paper's Inception has 5 x 5), so that torchvision's
ImageNet GoogLeNet loads with `load_trunk`; the paper's Caffe GoogLeNet has no batch norm,
LRN after the stem and 5 x 5 convolutions. Frames are normalised with mean = std = 0.5,
which is what torchvision's `transform_input` turns ImageNet-normalised input into.

Export: the recurrence feeds the attention back into the LSTM's input, so ONNX's LSTM
node (ops/recurrent.py, which needs the inputs of every step up front) cannot run it.
The steps run as one ONNX Scan over the frame axis (torch's scan, exported as Scan by
torch.onnx), so the exported graph takes clips of any length; in eager mode the same step
function runs in a Python loop (torch's eager scan compiles on every new shape).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from attnserve.errors import CheckpointError, InputError, first_line
from attnserve.models.registry import register_model
from attnserve.spec import DEFAULT_TOLERANCES, ModelSpec, TensorSpec, video_classification_spec

# torchvision's GoogLeNet Inception modules: (in, 1x1, 3x3 reduce, 3x3, "5x5" reduce,
# "5x5", pool proj), Szegedy et al. 2015, table 1.
INCEPTIONS = {
    "inception3a": (192, 64, 96, 128, 16, 32, 32),
    "inception3b": (256, 128, 128, 192, 32, 96, 64),
    "inception4a": (480, 192, 96, 208, 16, 48, 64),
    "inception4b": (512, 160, 112, 224, 24, 64, 64),
    "inception4c": (512, 128, 128, 256, 24, 64, 64),
    "inception4d": (512, 112, 144, 288, 32, 64, 64),
    "inception4e": (528, 256, 160, 320, 32, 128, 128),
    "inception5a": (832, 256, 160, 320, 32, 128, 128),
    "inception5b": (832, 384, 192, 384, 48, 128, 128),
}
GOOGLENET_FEATURES = 1024  # channels out of inception5b


class BasicConv2d(nn.Module):
    """Convolution without bias, batch norm (eps 1e-3, as torchvision's), ReLU."""

    def __init__(self, in_chans: int, out_chans: int, **kwargs):
        super().__init__()
        self.conv = nn.Conv2d(in_chans, out_chans, bias=False, **kwargs)
        self.bn = nn.BatchNorm2d(out_chans, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


class Inception(nn.Module):
    def __init__(self, in_chans, ch1x1, ch3x3red, ch3x3, ch5x5red, ch5x5, pool_proj):
        super().__init__()
        self.branch1 = BasicConv2d(in_chans, ch1x1, kernel_size=1)
        self.branch2 = nn.Sequential(BasicConv2d(in_chans, ch3x3red, kernel_size=1),
                                     BasicConv2d(ch3x3red, ch3x3, kernel_size=3, padding=1))
        # torchvision's "5x5" branch is a 3x3 convolution (its pretrained weights have it).
        self.branch3 = nn.Sequential(BasicConv2d(in_chans, ch5x5red, kernel_size=1),
                                     BasicConv2d(ch5x5red, ch5x5, kernel_size=3, padding=1))
        self.branch4 = nn.Sequential(nn.MaxPool2d(kernel_size=3, stride=1, padding=1, ceil_mode=True),
                                     BasicConv2d(in_chans, pool_proj, kernel_size=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.branch1(x), self.branch2(x), self.branch3(x), self.branch4(x)], dim=1)


class GoogLeNetTrunk(nn.Module):
    """GoogLeNet up to inception5b (stride 32), parameter names as torchvision's; every
    width divided by `width_divisor` (1: GoogLeNet itself)."""

    def __init__(self, in_chans: int = 3, width_divisor: int = 1):
        super().__init__()

        def w(c: int) -> int:
            return c // width_divisor

        self.conv1 = BasicConv2d(in_chans, w(64), kernel_size=7, stride=2, padding=3)
        self.maxpool1 = nn.MaxPool2d(3, stride=2, ceil_mode=True)
        self.conv2 = BasicConv2d(w(64), w(64), kernel_size=1)
        self.conv3 = BasicConv2d(w(64), w(192), kernel_size=3, padding=1)
        self.maxpool2 = nn.MaxPool2d(3, stride=2, ceil_mode=True)
        for name, widths in INCEPTIONS.items():
            setattr(self, name, Inception(*(w(c) for c in widths)))
        self.maxpool3 = nn.MaxPool2d(3, stride=2, ceil_mode=True)
        self.maxpool4 = nn.MaxPool2d(2, stride=2, ceil_mode=True)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                # He init keeps the features at unit scale through the ~60 convolutions (the
                # default init shrinks them to ~1e-5 at 1/8 width, which would leave an
                # untrained model's output independent of its input); trained weights
                # replace it anyway.
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool2(self.conv3(self.conv2(self.maxpool1(self.conv1(x)))))
        x = self.maxpool3(self.inception3b(self.inception3a(x)))
        for name in ("inception4a", "inception4b", "inception4c", "inception4d", "inception4e"):
            x = getattr(self, name)(x)
        return self.inception5b(self.inception5a(self.maxpool4(x)))


def googlenet_grid(img_size: int) -> int:
    """Side of GoogLeNet's last feature map: conv1 (stride 2) then four ceil-mode max
    pools (3/2, 3/2, 3/2, 2/2); 7 at 224."""

    def pool(n: int, k: int) -> int:
        return -(-(n - k) // 2) + 1

    side = (img_size + 1) // 2  # conv1: 7x7, stride 2, padding 3
    for k in (3, 3, 3, 2):
        side = pool(side, k)
    return side


@dataclass(frozen=True)
class AttentionLSTMConfig:
    num_classes: int = 11  # UCF-11
    img_size: int = 224  # GoogLeNet's input: a 7 x 7 grid (K = 7)
    in_chans: int = 3
    trunk_width_divisor: int = 1  # 1: GoogLeNet, D = 1024
    # Sec. 4.2: LSTM hidden and cell states and the output's hidden layer of 512 for
    # UCF-11 and Hollywood2, 1024 for HMDB-51.
    hidden_dim: int = 512
    num_layers: int = 3  # sec. 4.2: 3-layer LSTMs for all datasets
    init_hidden_layers: int = 1  # hidden ReLU layers of f_init (released code's form)
    multi_label: bool = False  # Hollywood2: independent sigmoids per class
    # Sec. 4.2: 30 frames at a time, in training and testing; the graph takes any number.
    num_frames: int = 30

    @property
    def grid_size(self) -> int:
        return googlenet_grid(self.img_size)

    @property
    def feature_dim(self) -> int:
        return GOOGLENET_FEATURES // self.trunk_width_divisor


class AttentionLSTMAction(nn.Module):
    """video (B, T, 3, S, S) -> class logits (B, C) and the attention over the K x K grid
    of every frame (B, T, K, K)."""

    def __init__(self, cfg: AttentionLSTMConfig):
        super().__init__()
        if cfg.num_layers < 1 or cfg.init_hidden_layers < 0:
            raise ValueError("num_layers must be at least 1 and init_hidden_layers at least 0")
        widths = (64, 192, *(c for module in INCEPTIONS.values() for c in module))
        if any(c % cfg.trunk_width_divisor for c in widths):
            raise ValueError(f"trunk_width_divisor must divide every GoogLeNet width (1, 2, 4 or 8), "
                             f"got {cfg.trunk_width_divisor}")
        self.cfg = cfg
        D, H, L = cfg.feature_dim, cfg.hidden_dim, cfg.num_layers
        self.trunk = GoogLeNetTrunk(cfg.in_chans, cfg.trunk_width_divisor)
        # f_init,h and f_init,c (sec. 2.2): a shared ReLU trunk, then one tanh layer per
        # LSTM layer and state.
        self.init_mlp = nn.Sequential(*[m for _ in range(cfg.init_hidden_layers)
                                        for m in (nn.Linear(D, D), nn.ReLU())])
        self.init_hidden = nn.ModuleList([nn.Linear(D, H) for _ in range(L)])
        self.init_cell = nn.ModuleList([nn.Linear(D, H) for _ in range(L)])
        self.locate = nn.Linear(H, cfg.grid_size**2, bias=False)  # W_i of eq. 4
        self.cells = nn.ModuleList([nn.LSTMCell(D if i == 0 else H, H) for i in range(L)])
        self.out_hidden = nn.Linear(H, H)  # the "additional hidden layer with tanh"
        self.classifier = nn.Linear(H, cfg.num_classes)

    def forward(self, video: torch.Tensor):
        cfg = self.cfg
        S = cfg.img_size
        if video.dim() != 5 or tuple(video.shape[2:]) != (cfg.in_chans, S, S):
            raise InputError(f"attention_lstm_action takes video of shape (batch, frames, {cfg.in_chans}, "
                             f"{S}, {S}), got {tuple(video.shape)}")
        B, T = video.shape[:2]
        maps = self.trunk(video.flatten(0, 1))  # (B*T, D, K, K)
        features = maps.flatten(2).transpose(1, 2).unflatten(0, (B, T))  # (B, T, K*K, D), row-major
        return self.classify_features(features)

    def classify_features(self, features: torch.Tensor):
        """Pre-extracted feature slices (B, T, K*K, D) -> logits (B, C), attention (B, T, K, K)."""
        cfg = self.cfg
        K, D = cfg.grid_size, cfg.feature_dim
        if features.dim() != 4 or tuple(features.shape[2:]) != (K * K, D):
            raise InputError(f"features must have shape (batch, frames, {K * K}, {D}), "
                             f"got {tuple(features.shape)}")
        # Sec. 2.2: the mean slice over all frames and locations initialises the LSTM.
        summary = self.init_mlp(features.mean(dim=(1, 2)))  # (B, D)
        # The state is a flat tuple (h_1 .. h_L, c_1 .. c_L) of (B, H) tensors, each from its
        # own layer: torch 2.13's scan fails to export a stacked carry, or one made of
        # views (chunks) of a wider tensor, when the batch axis is dynamic.
        state = tuple(torch.tanh(f(summary)) for f in (*self.init_hidden, *self.init_cell))
        steps = features.transpose(0, 1)  # (T, B, K*K, D): time first, as scan slices
        exporting = torch.compiler.is_exporting()
        if not exporting and steps.shape[0] < 1:
            raise InputError("attention_lstm_action needs clips of at least one frame, got 0")
        if exporting:
            from torch._higher_order_ops.scan import scan

            # One ONNX Scan over the frames: any clip length runs.
            _, (scores, attention) = scan(self._step, state, steps)
        else:
            per_step = []
            for t in range(steps.shape[0]):
                state, out = self._step(state, steps[t])
                per_step.append(out)
            scores, attention = (torch.stack(o) for o in zip(*per_step, strict=True))
        if cfg.multi_label:  # (T, 2, B, C): logit(mean_t sigmoid) = log mean p - log mean (1 - p)
            positive, negative = scores.unbind(1)
            logits = _log_mean(positive) - _log_mean(negative)
        else:  # (T, B, C) log-probabilities: log of their mean
            logits = _log_mean(scores)
        return logits, attention.transpose(0, 1).unflatten(-1, (K, K))  # (B, T, K, K)

    def _step(self, state, frame):
        """One frame: state = (h_1 .. h_L, c_1 .. c_L), each (B, H); frame (B, K*K, D) ->
        the next state, and (the step's class scores, its attention (B, K*K))."""
        L = self.cfg.num_layers
        hidden, cell = state[:L], state[L:]
        attention = self.locate(hidden[-1]).softmax(dim=-1)  # eq. 4, from the top layer's h_{t-1}
        x = (attention.unsqueeze(-1) * frame).sum(dim=1)  # eq. 5: the expected slice, (B, D)
        next_hidden, next_cell = [], []
        for i, lstm in enumerate(self.cells):
            x, c = _lstm_cell(lstm, x, hidden[i], cell[i])
            next_hidden.append(x)
            next_cell.append(c)
        z = self.classifier(torch.tanh(self.out_hidden(x)))  # y_t before its softmax, (B, C)
        if self.cfg.multi_label:  # log sigmoid(z) and log (1 - sigmoid(z)), averaged later
            scores = torch.stack([F.logsigmoid(z), F.logsigmoid(-z)])
        else:
            scores = F.log_softmax(z, dim=-1)
        return (*next_hidden, *next_cell), (scores, attention)

    def load_trunk(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Load torchvision's GoogLeNet weights (`torchvision.models.googlenet(...)
        .state_dict()`) into the trunk; its classifier and auxiliary heads are dropped."""
        dropped = ("fc.", "aux1.", "aux2.")
        trunk = {k: v for k, v in state_dict.items() if not k.startswith(dropped)}
        try:
            missing, unexpected = self.trunk.load_state_dict(trunk, strict=False)
        except RuntimeError as e:  # shapes that do not fit: another width
            raise CheckpointError(f"the GoogLeNet weights do not fit this trunk (trunk_width_divisor "
                                  f"{self.cfg.trunk_width_divisor}): {first_line(e)}") from None
        if missing or unexpected:
            raise CheckpointError(
                f"not a torchvision GoogLeNet state dict for this trunk: missing {missing[:3]}, "
                f"unexpected {unexpected[:3]}")


def _lstm_cell(lstm: nn.LSTMCell, x, h, c):
    """nn.LSTMCell's step on its weights (gates i, f, g, o; eq. 1-3), written out: the
    module's own call does not trace inside torch's scan."""
    gates = F.linear(x, lstm.weight_ih, lstm.bias_ih) + F.linear(h, lstm.weight_hh, lstm.bias_hh)
    i, f, g, o = gates.chunk(4, dim=-1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c), c


def _log_mean(log_p: torch.Tensor) -> torch.Tensor:
    """log(mean_t exp(log_p)) over the leading (time) axis, stably; a mean rather than
    logsumexp - log T keeps the clip length symbolic in the export."""
    top = log_p.amax(dim=0)
    return torch.log(torch.exp(log_p - top).mean(dim=0)) + top


def _tiny(**kw) -> AttentionLSTMConfig:
    # 96 x 96 frames through GoogLeNet at 1/8 width: a 3 x 3 grid of 128-d slices.
    return AttentionLSTMConfig(**{**dict(num_classes=5, img_size=96, trunk_width_divisor=8, hidden_dim=32,
                                         num_frames=4), **kw})


CONFIGS = {
    "tiny": _tiny(),
    "tiny_multilabel": _tiny(multi_label=True),
    "ucf11": AttentionLSTMConfig(num_classes=11),  # UCF-11 (YouTube Action), 11 actions
    "hmdb51": AttentionLSTMConfig(num_classes=51, hidden_dim=1024),  # sec. 4.2: 1024 for HMDB-51
    "hollywood2": AttentionLSTMConfig(num_classes=12, multi_label=True),  # 12 actions, mAP
}


def action_spec(name: str, config_name: str, cfg: AttentionLSTMConfig) -> ModelSpec:
    """Clips of any length in (num_frames is the training length clients default to); the
    logits and the attention of every frame out."""
    spec = video_classification_spec(name, config_name, num_frames=cfg.num_frames, img_size=cfg.img_size,
                                      in_chans=cfg.in_chans, num_classes=cfg.num_classes,
                                      mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
                                      tolerances=DEFAULT_TOLERANCES)
    video = spec.inputs[0]
    K = cfg.grid_size
    return dataclasses.replace(
        spec,
        inputs=(TensorSpec(video.name, video.dtype, ("batch", "frames", *video.shape[2:])),),
        outputs=spec.outputs + (TensorSpec("attention", "float32", ("batch", "frames", K, K)),),
        default_dims={"frames": cfg.num_frames},
    )


register_model(
    "attention_lstm_action",
    configs=CONFIGS,
    spec=action_spec,
    paper="Sharma, Kiros, Salakhutdinov, Action Recognition using Visual Attention, 2015 (arXiv:1511.04119)",
)(AttentionLSTMAction)
