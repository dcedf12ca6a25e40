"""Recurrent Attentional Convolutional-Deconvolution Network (RACDNN) for saliency.

Kuen, Wang and Wang, "Recurrent Attentional Networks for Saliency Detection", CVPR 2016.
https://arxiv.org/abs/1604.03227

A convolution-deconvolution network (CNN-DecNN) maps the image to a saliency map; its
fixed receptive fields handle objects of one scale best. RACDNN adds a recurrent
attention module between the deconvolution layers: at each of T iterations a spatial
transformer (Jaderberg et al. 2015) picks a sub-region of the deconvolutional features,
the features of that sub-region are refined at a fixed resolution (so small regions are
seen magnified), and written back to where they came from; the recurrent state carries
context from past iterations into the next refinement and the next choice of region.

Here:

- CNN: VGG-16's 13 convolutions (3 x 3, ReLU, 2 x 2 max pool after each block), so that
  VGG-16's ImageNet weights can start it. DecNN: the mirror image, each stage a learnt x2
  deconvolution (transposed convolution, 2 x 2, stride 2) followed by 3 x 3 convolutions,
  back to the input resolution; a 1 x 1 convolution and a sigmoid give the saliency map.
- Recurrent attention, on the output features F_0 (B, C, h, w) of decoder stage
  `refine_stage`, with two LSTM layers as in the deep recurrent attention model (Ba et
  al. 2015) the paper builds on: the lower one (r1) sees what is attended and drives the
  refinement, the upper one (r2) chooses where to look. A context network starts r2 from
  the whole map (r2_0 = tanh(Linear(Enc(F_0))), F_0 read with the identity transform when
  it is not g x g), then for t = 1..T:

      theta_t = [[s, 0, x], [0, s, y]]  from the emission network on r2_{t-1}
                (the spatial transformer's attention form: isotropic scale s = sigmoid(.)
                 in (0, 1), centre (x, y) = tanh(.) in the map's [-1, 1] coordinates)
      G_t  = ST(F_{t-1}, theta_t)          sub-region resampled to g x g  (AffineGridSampler)
      r1_t = LSTM1(Enc(G_t), r1_{t-1});  r2_t = LSTM2(r1_t, r2_{t-1})
      R_t  = G_t + Refine([G_t, Dec(r1_t)])   refined sub-region features
      F_t  = ST(R_t, theta_t^-1) + (1 - ST(1, theta_t^-1)) F_{t-1}   written back

  Enc is stride-2 3 x 3 convolutions and a linear layer; Dec a linear layer, reshaped and
  deconvolved to g x g. The write-back samples R_t (and a map of ones, the coverage) with
  the inverse transform theta^-1 = [[1/s, 0, -x/s], [0, 1/s, -y/s]], so F_t is F_{t-1}
  outside the sub-region and the refined features inside it (blended over the border
  pixel). The remaining decoder stages run once on F_T.

Outputs: `saliency` (B, 1, H, W) in [0, 1] at the input resolution, and `theta` (B, T,
2, 3), the sub-regions attended (grid_sample's convention: output coordinates to map
coordinates, both in [-1, 1], x first). `attnserve.postprocess_saliency` turns the map
into binary masks of any size and the thetas into pixel boxes, with numpy.

Sources. The paper's text could not be read from here, only its abstract, which states
the conv-deconv network, the spatial transformer with recurrent units attending to
sub-regions one after another, the progressive refinement and the context carried from
past iterations. The VGG-16 encoder, the attention form of theta and the two recurrent
layers after Ba et al. are the paper as recalled, not re-read. This implementation's own
choices, in the config below: T = 4, the decoder stage refined and the glimpse size, the
attention module's widths, LSTM units, the residual refinement and the coverage-weighted
write-back. No parameter count was at hand to check the standard config against.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from attnserve.errors import InputError
from attnserve.models.layers.lstm_step import lstm_step
from attnserve.models.registry import register_model
from attnserve.ops import affine_grid_sample
from attnserve.spec import DEFAULT_TOLERANCES, ModelSpec, TensorSpec, image_preprocessing

# VGG-16's 13 convolutions in five blocks, and the decoder mirroring them.
VGG16 = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))
VGG16_MIRROR = ((512, 512, 512), (512, 512, 256), (256, 256, 128), (128, 64), (64, 64))


@dataclass(frozen=True)
class RACDNNConfig:
    img_size: int = 224  # VGG-16's input
    in_chans: int = 3
    encoder: tuple[tuple[int, ...], ...] = VGG16  # widths of the convolutions, block by block
    decoder: tuple[tuple[int, ...], ...] = VGG16_MIRROR  # per stage, after its x2 deconvolution
    # The decoder stage whose output the attention refines: 2 is the 56 x 56 x 128 map of a
    # 224 image, fine enough to place regions and coarse enough that g x g magnifies them.
    refine_stage: int = 2
    iterations: int = 4  # T
    glimpse_size: int = 56  # g: sub-regions are resampled to g x g (the map's own size here)
    ran_widths: tuple[int, ...] = (64, 128, 256)  # Enc's stride-2 convolutions
    hidden_size: int = 512  # each LSTM layer
    hidden_channels: int = 32  # channels Dec makes from r1 for the refinement


def _conv_relu(cin: int, cout: int, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, stride=stride, padding=1), nn.ReLU(inplace=True)]


def attention_theta(scale: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """[[s, 0, x], [0, s, y]] from (B,) tensors: (B, 2, 3)."""
    zero = torch.zeros_like(scale)
    return torch.stack([scale, zero, x, zero, scale, y], dim=-1).reshape(-1, 2, 3)


def inverse_attention_theta(theta: torch.Tensor) -> torch.Tensor:
    """The inverse of an attention-form theta: [[1/s, 0, -x/s], [0, 1/s, -y/s]]."""
    inv = 1 / theta[:, 0, 0]
    return attention_theta(inv, -theta[:, 0, 2] * inv, -theta[:, 1, 2] * inv)


def read_region(features: torch.Tensor, theta: torch.Tensor, size: int) -> torch.Tensor:
    """The spatial transformer: the sub-region theta picks, resampled to size x size."""
    return affine_grid_sample(features, theta, (size, size))


def write_region(features: torch.Tensor, region: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Put `region` (B, C, g, g) back where `theta` read it from in `features` (B, C, h, w):
    inside the sub-region the result is the region's features, outside it `features`."""
    h, w = features.shape[-2:]
    coverage = torch.ones_like(region[:, :1])  # (B, 1, g, g)
    # One sampler for the features and their coverage: zeros outside the region, the
    # bilinear weight of the region's pixels on its border.
    back = affine_grid_sample(torch.cat([region, coverage], dim=1), inverse_attention_theta(theta), (h, w))
    return back[:, :-1] + (1 - back[:, -1:]) * features


class RecurrentAttention(nn.Module):
    """The recurrent attention module: (B, C, h, w) features -> refined features and the T
    thetas (B, T, 2, 3)."""

    def __init__(self, channels: int, cfg: RACDNNConfig):
        super().__init__()
        self.cfg = cfg
        g = cfg.glimpse_size
        down = 2 ** len(cfg.ran_widths)
        if g % down:
            raise InputError(f"glimpse_size {g} must be a multiple of 2^len(ran_widths) = {down}")
        self.grid = g // down
        layers, cin = [], channels
        for width in cfg.ran_widths:
            layers += _conv_relu(cin, width, stride=2)
            cin = width
        self.encoder = nn.Sequential(*layers, nn.Flatten(), nn.Linear(cin * self.grid**2, cfg.hidden_size),
                                     nn.ReLU(inplace=True))
        self.context = nn.Linear(cfg.hidden_size, cfg.hidden_size)  # r2_0 from the whole map
        self.rnn1 = nn.LSTMCell(cfg.hidden_size, cfg.hidden_size)
        self.rnn2 = nn.LSTMCell(cfg.hidden_size, cfg.hidden_size)
        self.emission = nn.Linear(cfg.hidden_size, 3)  # (scale, x, y) before squashing
        self.decoder = nn.Linear(cfg.hidden_size, cfg.hidden_channels * self.grid**2)
        self.decoder_up = nn.ConvTranspose2d(cfg.hidden_channels, cfg.hidden_channels, down, stride=down)
        self.refine = nn.Sequential(*_conv_relu(channels + cfg.hidden_channels, channels),
                                    nn.Conv2d(channels, channels, 3, padding=1))

    def emit(self, r2: torch.Tensor) -> torch.Tensor:
        """theta (B, 2, 3) in the attention form from the upper recurrent state."""
        z = self.emission(r2)
        return attention_theta(torch.sigmoid(z[:, 0]), torch.tanh(z[:, 1]), torch.tanh(z[:, 2]))

    def refine_region(self, region: torch.Tensor, r1: torch.Tensor) -> torch.Tensor:
        """R = G + Refine([G, Dec(r1)]): the attended features plus a correction that
        depends on them and on the recurrent state."""
        cfg = self.cfg
        state = self.decoder(r1).reshape(-1, cfg.hidden_channels, self.grid, self.grid)  # (B, c, k, k)
        state = F.relu(self.decoder_up(state))  # (B, c, g, g)
        return region + self.refine(torch.cat([region, state], dim=1))

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cfg, g = self.cfg, self.cfg.glimpse_size
        if features.shape[-2:] == (g, g):  # the identity transform reads the map itself
            whole = features
        else:
            one = features.new_ones(features.shape[0])
            whole = read_region(features, attention_theta(one, 0 * one, 0 * one), g)
        r2 = torch.tanh(self.context(self.encoder(whole)))  # the context network
        c2 = torch.zeros_like(r2)
        r1, c1 = torch.zeros_like(r2), torch.zeros_like(r2)
        thetas = []
        for _ in range(cfg.iterations):
            theta = self.emit(r2)
            region = read_region(features, theta, g)  # (B, C, g, g)
            r1, c1 = lstm_step(self.rnn1, self.encoder(region), r1, c1)
            r2, c2 = lstm_step(self.rnn2, r1, r2, c2)
            features = write_region(features, self.refine_region(region, r1), theta)
            thetas.append(theta)
        return features, torch.stack(thetas, dim=1)


class RACDNN(nn.Module):
    """images (B, 3, S, S) -> saliency (B, 1, S, S) in [0, 1] and theta (B, T, 2, 3)."""

    def __init__(self, cfg: RACDNNConfig):
        super().__init__()
        stages = len(cfg.encoder)
        if len(cfg.decoder) != stages:
            raise InputError(f"the decoder mirrors the encoder: {stages} stages each, got {len(cfg.decoder)}")
        if cfg.img_size % 2**stages:
            raise InputError(f"img_size must be a multiple of 2^{stages} = {2**stages} (one pool per "
                             f"encoder block), got {cfg.img_size}")
        if not 0 <= cfg.refine_stage < stages:
            raise InputError(f"refine_stage must name a decoder stage, 0 .. {stages - 1}; "
                             f"got {cfg.refine_stage}")
        if cfg.iterations < 1:
            raise InputError(f"iterations must be at least 1, got {cfg.iterations}")
        self.cfg = cfg
        blocks, cin = [], cfg.in_chans
        for widths in cfg.encoder:
            layers = []
            for width in widths:
                layers += _conv_relu(cin, width)
                cin = width
            blocks.append(nn.Sequential(*layers, nn.MaxPool2d(2)))
        self.encoder = nn.ModuleList(blocks)
        stages_ = []
        for widths in cfg.decoder:
            layers = [nn.ConvTranspose2d(cin, cin, 2, stride=2), nn.ReLU(inplace=True)]
            for width in widths:
                layers += _conv_relu(cin, width)
                cin = width
            stages_.append(nn.Sequential(*layers))
        self.decoder = nn.ModuleList(stages_)
        self.attention = RecurrentAttention(cfg.decoder[cfg.refine_stage][-1], cfg)
        self.head = nn.Conv2d(cin, 1, 1)
        # He initialisation, as torchvision initialises VGG: torch's default shrinks the
        # activations layer by layer, and an untrained 20-layer trunk would give a flat map.
        for m in self.modules():
            if isinstance(m, nn.Conv2d | nn.ConvTranspose2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)

    def refine_features(self, images: torch.Tensor) -> torch.Tensor:
        """F_0: the features the attention refines, (B, C, h, w)."""
        x = images
        for block in self.encoder:
            x = block(x)
        for stage in self.decoder[:self.cfg.refine_stage + 1]:
            x = stage(x)
        return x

    def decode(self, features: torch.Tensor) -> torch.Tensor:
        """The decoder stages after the refined one and the head: saliency (B, 1, H, W)."""
        for stage in self.decoder[self.cfg.refine_stage + 1:]:
            features = stage(features)
        return torch.sigmoid(self.head(features))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.cfg
        want = (cfg.in_chans, cfg.img_size, cfg.img_size)
        if images.dim() != 4 or tuple(images.shape[1:]) != want:
            raise InputError(f"recurrent_saliency ({cfg.img_size} x {cfg.img_size}) takes images of shape "
                             f"(batch, {', '.join(map(str, want))}); got {tuple(images.shape)}")
        features, theta = self.attention(self.refine_features(images))
        return self.decode(features), theta


def _spec(name: str, config_name: str, cfg: RACDNNConfig) -> ModelSpec:
    size = cfg.img_size
    # The whole image resized to size x size (no crop margin: the mask covers the image);
    # postprocess_saliency resizes the map back to the image's own size.
    preprocessing = {**image_preprocessing(size, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
                     "resize": size,
                     "postprocess": "attnserve.postprocess_saliency.saliency_mask"}
    return ModelSpec(
        name=name,
        config=config_name,
        task="salient-object-detection",
        inputs=(TensorSpec("images", "float32", ("batch", cfg.in_chans, size, size)),),
        outputs=(TensorSpec("saliency", "float32", ("batch", 1, size, size)),
                 TensorSpec("theta", "float32", ("batch", cfg.iterations, 2, 3))),
        tolerances=dict(DEFAULT_TOLERANCES),
        preprocessing=preprocessing,
    )


CONFIGS = {
    # The same network at 32 x 32 with three blocks of one narrow convolution each; the
    # attention refines the 16 x 16 decoder stage.
    "tiny": RACDNNConfig(img_size=32, encoder=((8,), (16,), (32,)), decoder=((32,), (16,), (8,)),
                         refine_stage=1, iterations=3, glimpse_size=16, ran_widths=(16, 32),
                         hidden_size=32, hidden_channels=8),
    # VGG-16 conv-deconv at 224 x 224 (see the module docstring for what is not the paper's).
    "vgg16": RACDNNConfig(),
}


register_model(
    "recurrent_saliency",
    configs=CONFIGS,
    spec=_spec,
    paper="Kuen et al., Recurrent Attentional Networks for Saliency Detection, CVPR 2016",
    custom_ops=("AffineGridSampler",),
)(RACDNN)
