"""Non-local neural networks: ResNet-50 for images and I3D ResNet-50 for video.

Wang, Girshick, Gupta, He, "Non-local Neural Networks", CVPR 2018.
https://arxiv.org/abs/1711.07971

A non-local operation computes the response at a position as a weighted sum over all
positions (eq. 1), y_i = 1/C(x) sum_j f(x_i, x_j) g(x_j), with g a linear embedding and one
of four pairwise functions f (sec. 3.2):

- gaussian (eq. 2): f = exp(x_i^T x_j), C(x) = sum_j f: a softmax over j of raw features;
- embedded gaussian (eq. 3): f = exp(theta(x_i)^T phi(x_j)), C(x) = sum_j f (the default);
- dot product (eq. 4): f = theta(x_i)^T phi(x_j), C(x) = N;
- concatenation (eq. 5): f = ReLU(w_f^T [theta(x_i), phi(x_j)]), C(x) = N.

The block (eq. 6) is z_i = W_z y_i + x_i, with theta, phi and g halving the channels
(sec. 3.3) and x sub-sampled by a 2 x 2 spatial max pool for phi and g, so each query sees
a quarter of the positions (sec. 3.3, "subsampling"); W_z is a 1x1(x1) convolution followed
by BN whose scale starts at zero, so a new block is the identity (sec. 4.1). The operation
runs over space for images and over space-time for video.

`nonlocal_resnet` is ResNet-50 (the 2-D trunk of `models/layers/resnet.py`) with blocks
after chosen residual blocks; `nonlocal_i3d` is table 1's video ResNet-50 inflated to
I3D_{3x1x1} (`models/layers/resnet3d.py`) with space-time blocks. The default placement is
the paper's 5-block setting: after every other residual block of res3 (2) and res4 (3),
which is after blocks 1, 3 of res3 and 1, 3, 5 of res4 in the authors' code (table 2c).
`NONLOCAL_1_BLOCK` (right before the last block of res4, table 2a/b) and
`NONLOCAL_10_BLOCKS` are the table's other settings.

Differences from the authors' released code, where it and the paper disagree, follow the
paper: table 1's temporal strides (conv1 and pool1 stride 2 in time, pool2 3x1x1; the
code keeps conv1 and pool1 at stride 1 and pools 2x1x1), and no 1/sqrt(d) scale on the
embedded gaussian's logits (the code's NONLOCAL.USE_SCALE; `scale_logits=True` turns it on).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from attnserve.errors import InputError
from attnserve.models.layers import ResNet
from attnserve.models.layers.resnet3d import INFLATE_3X1X1, ResNet3d
from attnserve.models.registry import register_model
from attnserve.spec import TensorSpec, image_classifier, video_classification_spec

GAUSSIAN = "gaussian"  # eq. 2
EMBEDDED_GAUSSIAN = "embedded_gaussian"  # eq. 3
DOT_PRODUCT = "dot_product"  # eq. 4
CONCATENATION = "concatenation"  # eq. 5
PAIRWISE = (GAUSSIAN, EMBEDDED_GAUSSIAN, DOT_PRODUCT, CONCATENATION)

# Where the blocks go in ResNet-50: per stage res2..res5, the indices of the residual
# blocks a non-local block follows (table 2c; the authors' code's LAYER_MOD = 2).
NONLOCAL_5_BLOCKS = ((), (1, 3), (1, 3, 5), ())
NONLOCAL_1_BLOCK = ((), (), (4,), ())  # right before the last residual block of res4
NONLOCAL_10_BLOCKS = ((), (0, 1, 2, 3), (0, 1, 2, 3, 4, 5), ())
# ResNet-101: "we add them to the corresponding residual blocks" (sec. 5.1); res4 every
# 7th block in the authors' code (LAYER_MOD * 4 - 1).
NONLOCAL_5_BLOCKS_R101 = ((), (1, 3), (6, 13, 20), ())


class NonLocalBlock(nn.Module):
    """The non-local block (eq. 1, 6) on (B, C, H, W) maps or (B, C, T, H, W) clips.

    Args:
        channels: C of the input and output.
        pairwise: one of PAIRWISE.
        dims: 2 (space) or 3 (space-time).
        inner_channels: the bottleneck of theta, phi and g (C / 2, sec. 3.3).
        sub_sample: max-pool x 2 x 2 in space before phi and g (sec. 3.3).
        scale_logits: multiply the (embedded) gaussian's logits by 1/sqrt(d), as the
            authors' code does; the paper has no scale.
    """

    def __init__(self, channels: int, pairwise: str = EMBEDDED_GAUSSIAN, dims: int = 2,
                 inner_channels: int | None = None, sub_sample: bool = True, scale_logits: bool = False):
        super().__init__()
        if pairwise not in PAIRWISE:
            raise ValueError(f"unknown pairwise function {pairwise!r}; choose one of: {', '.join(PAIRWISE)}")
        if dims not in (2, 3):
            raise ValueError(f"a non-local block runs over 2 (space) or 3 (space-time) dims, not {dims}")
        conv = nn.Conv2d if dims == 2 else nn.Conv3d
        inner = inner_channels or channels // 2
        self.pairwise, self.dims, self.inner_channels = pairwise, dims, inner
        self.sub_sample = sub_sample
        # Sub-sampling is spatial only: a 2 x 2 window, frames untouched.
        self.pool = (nn.MaxPool2d(2) if dims == 2 else nn.MaxPool3d((1, 2, 2))) if sub_sample else None
        self.g = conv(channels, inner, 1)  # g(x_j) = W_g x_j
        if pairwise == GAUSSIAN:
            self.theta = self.phi = None  # f compares the inputs themselves
            logit_dim = channels
        else:
            self.theta = conv(channels, inner, 1)  # theta(x_i) = W_theta x_i
            self.phi = conv(channels, inner, 1)  # phi(x_j) = W_phi x_j
            logit_dim = inner
        # w_f of eq. 5, projecting [theta(x_i), phi(x_j)] (2 * inner) to a scalar.
        self.w_f = nn.Linear(2 * inner, 1, bias=False) if pairwise == CONCATENATION else None
        self.scale = logit_dim**-0.5 if scale_logits and pairwise in (GAUSSIAN, EMBEDDED_GAUSSIAN) else None
        self.W_z = conv(inner, channels, 1)
        self.bn = (nn.BatchNorm2d if dims == 2 else nn.BatchNorm3d)(channels)
        # MSRA init of the new layers (sec. 4.1, [20]); BN scale 0: the block starts as
        # the identity, so it can go into a pre-trained network (sec. 4.1).
        for m in (self.g, self.theta, self.phi, self.W_z):
            if m is not None:
                nn.init.kaiming_normal_(m.weight)
                nn.init.zeros_(m.bias)
        if self.w_f is not None:
            nn.init.kaiming_normal_(self.w_f.weight)
        nn.init.zeros_(self.bn.weight)
        nn.init.zeros_(self.bn.bias)

    def affinity(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, C, *grid) -> (f(x_i, x_j) / C(x) as a (B, N, M) matrix, g(x^)_j as (B, M, C')):
        N query positions of x, M key positions of its sub-sampled version x^."""
        x_hat = self.pool(x) if self.pool is not None else x
        g = self.g(x_hat).flatten(2).transpose(1, 2)  # (B, M, C')
        if self.pairwise == GAUSSIAN:
            theta, phi = x.flatten(2), x_hat.flatten(2)  # (B, C, N), (B, C, M)
        else:
            theta, phi = self.theta(x).flatten(2), self.phi(x_hat).flatten(2)  # (B, C', N), (B, C', M)
        num_keys = phi.shape[-1]
        if self.pairwise in (GAUSSIAN, EMBEDDED_GAUSSIAN):
            logits = theta.transpose(1, 2) @ phi  # (B, N, M)
            if self.scale is not None:
                logits = logits * self.scale
            # exp(.) / sum_j exp(.): the softmax over j (sec. 3.2)
            return logits.softmax(dim=-1), g
        if self.pairwise == DOT_PRODUCT:
            return (theta.transpose(1, 2) @ phi) / num_keys, g  # C(x) = N, the key count
        # Concatenation: w_f^T [theta_i, phi_j] = w_theta^T theta_i + w_phi^T phi_j.
        w = self.w_f.weight[0]  # (2 C',): the first C' weigh theta, the last C' phi
        w_theta, w_phi = w[:self.inner_channels], w[self.inner_channels:]
        a = torch.einsum("c,bcn->bn", w_theta, theta)  # (B, N)
        b = torch.einsum("c,bcm->bm", w_phi, phi)  # (B, M)
        return torch.relu(a.unsqueeze(2) + b.unsqueeze(1)) / num_keys, g  # (B, N, M)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.sub_sample and min(x.shape[-2:]) < 2:
            raise InputError(
                f"a non-local block sub-samples its map 2 x 2 in space, but the map reaching it is "
                f"{x.shape[-2]} x {x.shape[-1]}; give the model larger images")
        attn, g = self.affinity(x)
        # y_i = sum_j attn_ij g_j at every position (eq. 1), computed as g^T attn^T so that
        # y comes out contiguous in (B, C', N) and the trunk after the block keeps its layout.
        y = g.transpose(1, 2) @ attn.transpose(1, 2)  # (B, C', N)
        y = y.reshape(*x.shape[:1], self.inner_channels, *x.shape[2:])  # (B, C', *grid)
        return x + self.bn(self.W_z(y))  # eq. 6


def _check_placement(layers: tuple[int, ...], nonlocal_blocks: tuple[tuple[int, ...], ...]) -> None:
    if len(nonlocal_blocks) != len(layers) or any(
            not all(0 <= j < n for j in idx) or len(set(idx)) != len(idx)
            for idx, n in zip(nonlocal_blocks, layers, strict=True)):
        raise ValueError(
            f"nonlocal_blocks must list, per stage, distinct indices of residual blocks of "
            f"{tuple(layers)}; got {nonlocal_blocks}")


def _stage_blocks(trunk: nn.Module, stage: int):
    return getattr(trunk, f"layer{stage + 1}")


@dataclass(frozen=True)
class NonLocalResNetConfig:
    layers: tuple[int, ...] = (3, 4, 6, 3)  # ResNet-50
    stem_width: int = 64
    img_size: int = 224  # the training size; the graph takes others
    in_chans: int = 3
    num_classes: int = 1000
    pairwise: str = EMBEDDED_GAUSSIAN  # "by default" (sec. 5.1)
    nonlocal_blocks: tuple[tuple[int, ...], ...] = NONLOCAL_5_BLOCKS
    sub_sample: bool = True
    scale_logits: bool = False


class NonLocalResNet(ResNet):
    """ResNet with 2-D non-local blocks after chosen residual blocks; images
    (B, C, H, W) -> logits (B, num_classes).

    The trunk keeps timm's ResNet names; the blocks are `nonlocal_blocks.layer{s}_{j}`
    (after block j of stage s).
    """

    def __init__(self, cfg: NonLocalResNetConfig):
        super().__init__(cfg.layers, cfg.num_classes, cfg.in_chans, cfg.stem_width)
        _check_placement(cfg.layers, cfg.nonlocal_blocks)
        self.cfg = cfg
        self.nonlocal_blocks = nn.ModuleDict()
        for i, indices in enumerate(cfg.nonlocal_blocks):
            channels = cfg.stem_width * 2**i * self.layer1[0].expansion
            for j in indices:
                self.nonlocal_blocks[f"layer{i + 1}_{j}"] = NonLocalBlock(
                    channels, cfg.pairwise, 2, sub_sample=cfg.sub_sample, scale_logits=cfg.scale_logits)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.act1(self.bn1(self.conv1(x))))
        for i in range(self.num_stages):
            for j, block in enumerate(_stage_blocks(self, i)):
                x = block(x)
                key = f"layer{i + 1}_{j}"
                if key in self.nonlocal_blocks:
                    x = self.nonlocal_blocks[key](x)
        return x


# I3D_{3x1x1} temporal kernels of the authors' ResNet-50 (one block in two inflated;
# all of res2): res2 [3, 3, 3], res3 [3, 1, 3, 1], res4 [3, 1, 3, 1, 3, 1], res5 [1, 3, 1].
def i3d_temporal_kernels(layers: tuple[int, ...]) -> tuple[tuple[int, ...], ...]:
    """The authors' inflation pattern for any depth: every block of res2, the even blocks
    of res3 and res4, the odd blocks of res5."""
    first = (lambda j: True, lambda j: j % 2 == 0, lambda j: j % 2 == 0, lambda j: j % 2 == 1)
    return tuple(tuple(3 if first[i](j) else 1 for j in range(n)) for i, n in enumerate(layers))


@dataclass(frozen=True)
class NonLocalI3DConfig:
    layers: tuple[int, ...] = (3, 4, 6, 3)  # ResNet-50
    stem_width: int = 64
    img_size: int = 224
    num_frames: int = 32  # the training clip (sec. 4.1); the graph takes other lengths
    frame_stride: int = 2  # "64 consecutive frames ... dropping every other frame" (sec. 4.1)
    in_chans: int = 3
    num_classes: int = 400  # Kinetics-400
    pairwise: str = EMBEDDED_GAUSSIAN
    nonlocal_blocks: tuple[tuple[int, ...], ...] = NONLOCAL_5_BLOCKS
    sub_sample: bool = True
    scale_logits: bool = False
    inflate: str = INFLATE_3X1X1  # NL I3D is built on I3D_{3x1x1} (table 2f)
    temporal_kernels: tuple[tuple[int, ...], ...] | None = None  # None: i3d_temporal_kernels(layers)
    stem_temporal_kernel: int = 5  # "We inflate conv1 to 5x7x7" (sec. 4)
    # The exported graph takes any clip length; False fixes it at num_frames (the Triton
    # video pipelines and the client's sliding clips read the length from the spec).
    dynamic_frames: bool = True


class NonLocalI3D(ResNet3d):
    """I3D ResNet with space-time non-local blocks; video (B, T, C, H, W) -> logits.

    The clip may have any number of frames from `temporal_stride` (8) on: the trunk is
    convolutional in time and pools globally.
    """

    def __init__(self, cfg: NonLocalI3DConfig):
        kernels = cfg.temporal_kernels or i3d_temporal_kernels(cfg.layers)
        super().__init__(cfg.layers, cfg.num_classes, kernels, cfg.in_chans, cfg.stem_width,
                         cfg.inflate, cfg.stem_temporal_kernel)
        _check_placement(cfg.layers, cfg.nonlocal_blocks)
        self.cfg = cfg
        self.nonlocal_blocks = nn.ModuleDict()
        for i, indices in enumerate(cfg.nonlocal_blocks):
            channels = cfg.stem_width * 2**i * 4  # bottleneck expansion
            for j in indices:
                self.nonlocal_blocks[f"layer{i + 1}_{j}"] = NonLocalBlock(
                    channels, cfg.pairwise, 3, sub_sample=cfg.sub_sample, scale_logits=cfg.scale_logits)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for i in range(self.num_stages):
            for j, block in enumerate(_stage_blocks(self, i)):
                x = block(x)
                key = f"layer{i + 1}_{j}"
                if key in self.nonlocal_blocks:
                    x = self.nonlocal_blocks[key](x)
            if i == 0:
                x = self.pool2(x)
        return x

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        if video.dim() != 5 or video.shape[2] != self.cfg.in_chans:
            raise InputError(
                f"nonlocal_i3d takes video of shape (batch, frames, {self.cfg.in_chans}, height, width), "
                f"got {tuple(video.shape)}")
        if video.shape[1] < self.temporal_stride:
            raise InputError(
                f"nonlocal_i3d needs clips of at least {self.temporal_stride} frames (its temporal "
                f"stride), got {video.shape[1]}; send a longer clip")
        x = video.transpose(1, 2)  # (B, C, T, H, W), the layout of Conv3d
        x = self.forward_features(x).mean(dim=(2, 3, 4))  # (B, C') global average pool
        return self.fc(x)


def _variants(base, prefix: str = "tiny") -> dict:
    """`tiny` (embedded gaussian) and one tiny config per other pairwise function."""
    names = {GAUSSIAN: "gaussian", DOT_PRODUCT: "dot", CONCATENATION: "concat"}
    out = {prefix: base}
    out.update({f"{prefix}_{short}": dataclasses.replace(base, pairwise=p) for p, short in names.items()})
    return out


RESNET_CONFIGS = {
    # 64 x 64 images: res3 is 8 x 8 (64 queries, 16 keys), res4 4 x 4 (16 queries, 4 keys).
    **_variants(NonLocalResNetConfig(layers=(1, 1, 1, 1), stem_width=16, img_size=64, num_classes=10,
                                     nonlocal_blocks=((), (0,), (0,), ()))),
    "resnet50": NonLocalResNetConfig(),  # 5 blocks (table 2c)
    "resnet50_1block": NonLocalResNetConfig(nonlocal_blocks=NONLOCAL_1_BLOCK),
    "resnet50_10blocks": NonLocalResNetConfig(nonlocal_blocks=NONLOCAL_10_BLOCKS),
    "resnet101": NonLocalResNetConfig(layers=(3, 4, 23, 3), nonlocal_blocks=NONLOCAL_5_BLOCKS_R101),
}

I3D_CONFIGS = {
    # 16 frames of 64 x 64: res3 is 2 x 8 x 8 (128 queries, 32 keys), res4 2 x 4 x 4.
    **_variants(NonLocalI3DConfig(layers=(1, 1, 1, 1), stem_width=8, img_size=64, num_frames=16,
                                  num_classes=10, nonlocal_blocks=((), (0,), (0,), ()))),
    # The demo's synthetic actions (attnserve.train.actions): 8 consecutive frames of
    # 32 x 32, 7 classes; res3 is 1 x 4 x 4 (16 queries, 4 keys), res4 1 x 2 x 2.
    "shapes": NonLocalI3DConfig(layers=(1, 1, 1, 1), stem_width=8, img_size=32, num_frames=8, frame_stride=1,
                                num_classes=7, nonlocal_blocks=((), (0,), (0,), ())),
    # NL I3D ResNet-50 on Kinetics-400, 32 frames of 224 x 224 (sec. 4.1, table 2f).
    "i3d_resnet50": NonLocalI3DConfig(),
    "i3d_resnet101": NonLocalI3DConfig(layers=(3, 4, 23, 3), nonlocal_blocks=NONLOCAL_5_BLOCKS_R101),
}


def _i3d_spec(name: str, config_name: str, cfg: NonLocalI3DConfig):
    # The authors' normalisation: mean 114.75, std 57.375 on 0-255 RGB (their config.py);
    # test clips are short side 256, centre crop 224.
    spec = video_classification_spec(
        name, config_name, num_frames=cfg.num_frames, img_size=cfg.img_size, in_chans=cfg.in_chans,
        num_classes=cfg.num_classes, mean=(0.45, 0.45, 0.45), std=(0.225, 0.225, 0.225),
        frame_stride=cfg.frame_stride,
    )
    if not cfg.dynamic_frames:
        return spec
    # Convolutional in time with global pooling: any clip length (from 8 frames) runs.
    # preprocessing["num_frames"] stays the training length clients should send.
    video = spec.inputs[0]
    frames = TensorSpec(video.name, video.dtype, ("batch", "frames", *video.shape[2:]))
    return dataclasses.replace(spec, inputs=(frames,), default_dims={"frames": cfg.num_frames})


register_model(
    "nonlocal_resnet",
    configs=RESNET_CONFIGS,
    spec=image_classifier(dynamic_size=True),  # convolutional + global pooling: any image size
    paper="Wang et al., Non-local Neural Networks, CVPR 2018",
)(NonLocalResNet)

register_model(
    "nonlocal_i3d",
    configs=I3D_CONFIGS,
    spec=_i3d_spec,
    paper="Wang et al., Non-local Neural Networks, CVPR 2018",
)(NonLocalI3D)
