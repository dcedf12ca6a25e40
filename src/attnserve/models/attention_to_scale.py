"""Attention to Scale: scale-aware semantic image segmentation.

Chen, Yang, Wang, Xu, Yuille, "Attention to Scale: Scale-aware Semantic Image
Segmentation", CVPR 2016. https://arxiv.org/abs/1511.03339

One network (DeepLab-LargeFOV, shared by all scales: the paper's "share-net") runs on
the image resized to each scale s (1, 0.75 and 0.5). Its score maps f^s are resized
to the largest scale's resolution, and an attention model, a small FCN on the scales'
fc7 features, gives per-pixel weights over the scales (eq. 3),

    w_i^s = exp(h_i^s) / sum_t exp(h_i^t),

shared by all classes; the merged score map is their weighted sum (eq. 2),

    g_{i,c} = sum_s w_i^s f_{i,c}^s.

The attention model is two layers, 512 filters of 3 x 3 then S filters of 1 x 1 (S scales,
sec. 4), on the convolutionalised fc7 features, here those of all scales concatenated
after resizing to the common grid, so that its weights can compare the scales. The
extra supervision of each scale's own score map (sec. 3.4) is a training loss on f^s; it
changes nothing at inference.

DeepLab-LargeFOV (Chen et al., ICLR 2015) is VGG-16 with output stride 8: 3 x 3 max pools
of stride 2 after conv1-3 and of stride 1 after conv4-5, conv5 dilated by 2, then an
average pool, fc6 as a 3 x 3 convolution of 1024 filters dilated by 12, fc7 1 x 1 (1024)
and the classifier fc8. Pools round up and resizing aligns corners, as Caffe's Pooling and
Interp layers do, so an image of 8k + 1 pixels gives a (k + 1)-pixel score map whose
corners sit on the image's corners; the scale-s input is (n - 1) s + 1 pixels (Interp's
shrink/zoom). The tiny config is the same VGG network at a sixteenth of the widths (not
a ResNet trunk), so the tests run the paper's architecture. Layer names are
Caffe's (conv1_1 ... fc8); the Caffe model takes BGR, ours RGB (flip conv1_1's input
channels to load those weights).

Outputs are at the score maps' resolution (output stride 8); `postprocess_segmentation`
turns them into label maps of the image's size with numpy.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from fractions import Fraction

import torch
import torch.nn.functional as F
from torch import nn

from attnserve.errors import InputError
from attnserve.models.registry import register_model
from attnserve.spec import DEFAULT_TOLERANCES, ModelSpec, TensorSpec, image_preprocessing

# VGG-16's Caffe mean pixel (BGR 104.008, 116.669, 122.675 on 0-255), in RGB and as the
# spec's [0, 1] mean with std 1/255: (x - mean) / std = 255 x - mean pixel, DeepLab's input.
CAFFE_MEAN = (122.675 / 255, 116.669 / 255, 104.008 / 255)
CAFFE_STD = (1 / 255, 1 / 255, 1 / 255)
OUTPUT_STRIDE = 8


@dataclass(frozen=True)
class AttentionToScaleConfig:
    img_size: int = 321  # DeepLab's training crop (8k + 1)
    in_chans: int = 3
    num_classes: int = 21  # PASCAL VOC 2012
    scales: tuple[float, ...] = (1.0, 0.75, 0.5)  # sec. 4: the best of the paper's settings
    widths: tuple[int, ...] = (64, 128, 256, 512, 512)  # VGG-16 conv1..conv5
    depths: tuple[int, ...] = (2, 2, 3, 3, 3)
    fc_width: int = 1024  # LargeFOV's fc6/fc7
    fc6_dilation: int = 12  # LargeFOV's field of view
    attention_width: int = 512  # the attention model's first layer (sec. 4)
    dropout: float = 0.5  # after fc6 and fc7 in training


def scaled_size(n: int, scale: Fraction) -> int:
    """Pixels of a side of n resized by `scale`, as Caffe's Interp layer sizes it:
    (n - 1) * scale + 1 (rounded down), so that the corners stay aligned."""
    return (n - 1) * scale.numerator // scale.denominator + 1


def _resize(x: torch.Tensor, size) -> torch.Tensor:
    # Bilinear with aligned corners: Caffe's Interp, which the authors resize with.
    return F.interpolate(x, size=size, mode="bilinear", align_corners=True)


class DeepLabLargeFOV(nn.Module):
    """The shared network: images (B, C, H, W) -> (fc7 features (B, fc_width, h, w),
    scores (B, classes, h, w)), h = ceil(H / 8) for H = 8k + 1."""

    def __init__(self, cfg: AttentionToScaleConfig):
        super().__init__()
        if len(cfg.widths) != 5 or len(cfg.depths) != 5:
            raise ValueError(
                f"DeepLab-LargeFOV has 5 VGG stages; got widths {cfg.widths}, depths {cfg.depths}")
        in_chs = cfg.in_chans
        for stage, (width, depth) in enumerate(zip(cfg.widths, cfg.depths, strict=True), start=1):
            dilation = 2 if stage == 5 else 1  # conv5 atrous: pool4 and pool5 no longer subsample
            for k in range(1, depth + 1):
                conv = nn.Conv2d(in_chs, width, 3, padding=dilation, dilation=dilation)
                self.add_module(f"conv{stage}_{k}", conv)
                in_chs = width
            # pool1-3 halve the map, pool4-5 keep it (stride 1): output stride 8. Caffe's
            # Pooling rounds the output size up.
            pool = nn.MaxPool2d(3, stride=2 if stage <= 3 else 1, padding=1, ceil_mode=True)
            self.add_module(f"pool{stage}", pool)
        self.depths = cfg.depths
        self.pool5a = nn.AvgPool2d(3, stride=1, padding=1)  # LargeFOV's pool5a (Caffe counts the padding)
        d = cfg.fc6_dilation
        self.fc6 = nn.Conv2d(in_chs, cfg.fc_width, 3, padding=d, dilation=d)
        self.fc7 = nn.Conv2d(cfg.fc_width, cfg.fc_width, 1)
        self.fc8 = nn.Conv2d(cfg.fc_width, cfg.num_classes, 1)
        self.drop = nn.Dropout(cfg.dropout)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.fc8.weight, std=0.01)  # DeepLab's classifier init

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        for stage, depth in enumerate(self.depths, start=1):
            for k in range(1, depth + 1):
                x = torch.relu(getattr(self, f"conv{stage}_{k}")(x))
            x = getattr(self, f"pool{stage}")(x)
        x = self.pool5a(x)
        x = self.drop(torch.relu(self.fc6(x)))
        fc7 = self.drop(torch.relu(self.fc7(x)))
        return fc7, self.fc8(fc7)


class AttentionToScale(nn.Module):
    """Images (B, C, H, W) -> merged scores (B, classes, h, w) and the attention over
    scales (B, S, h, w), on the grid of the largest scale's score map."""

    def __init__(self, cfg: AttentionToScaleConfig):
        super().__init__()
        if not cfg.scales or any(s <= 0 for s in cfg.scales) or len(set(cfg.scales)) != len(cfg.scales):
            raise ValueError(f"scales must be distinct and positive, got {cfg.scales}")
        self.cfg = cfg
        # Exact ratios, so sizes are integer arithmetic (traced, they stay symbolic).
        self.ratios = [Fraction(s).limit_denominator(64) for s in cfg.scales]
        self.reference = max(range(len(cfg.scales)), key=lambda i: cfg.scales[i])
        self.backbone = DeepLabLargeFOV(cfg)
        num_scales = len(cfg.scales)
        self.attention = nn.Sequential(OrderedDict(
            conv1=nn.Conv2d(num_scales * cfg.fc_width, cfg.attention_width, 3, padding=1),
            act=nn.ReLU(inplace=True),
            conv2=nn.Conv2d(cfg.attention_width, num_scales, 1),  # h^s: one map per scale
        ))
        for m in self.attention.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                nn.init.zeros_(m.bias)

    def scale_outputs(self, images: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The shared network on each scale: (fc7 features, score maps f^s), each resized to
        the largest scale's grid."""
        H, W = images.shape[-2:]
        features, scores = [], []
        for ratio in self.ratios:
            x = images if ratio == 1 else _resize(images, (scaled_size(H, ratio), scaled_size(W, ratio)))
            fc7, fc8 = self.backbone(x)
            features.append(fc7)
            scores.append(fc8)
        size = scores[self.reference].shape[-2:]
        features = [f if i == self.reference else _resize(f, size) for i, f in enumerate(features)]
        scores = [f if i == self.reference else _resize(f, size) for i, f in enumerate(scores)]
        return features, scores

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if images.dim() != 4 or images.shape[1] != self.cfg.in_chans:
            raise InputError(
                f"attention_to_scale takes images of shape (batch, {self.cfg.in_chans}, height, width), "
                f"got {tuple(images.shape)}")
        features, scores = self.scale_outputs(images)
        h = self.attention(torch.cat(features, dim=1))  # (B, S, h, w)
        weights = h.softmax(dim=1)  # eq. 3: over scales, per pixel
        stacked = torch.stack(scores, dim=1)  # (B, S, classes, h, w)
        merged = (weights.unsqueeze(2) * stacked).sum(dim=1)  # eq. 2: (B, classes, h, w)
        return merged, weights


CONFIGS = {
    # DeepLab-LargeFOV at a sixteenth of VGG-16's widths, one conv per stage, on 65 x 65
    # (9 x 9 score maps; 49 and 33 pixels at 0.75 and 0.5). fc6's dilation shrinks with
    # the map: 12 would only reach padding on a 9 x 9 map.
    "tiny": AttentionToScaleConfig(img_size=65, num_classes=5, widths=(8, 16, 32, 64, 64),
                                   depths=(1, 1, 1, 1, 1), fc_width=64, fc6_dilation=2, attention_width=32),
    # The paper's model on PASCAL VOC 2012 (21 classes) with scales 1, 0.75, 0.5.
    "voc": AttentionToScaleConfig(),
    # PASCAL-Person-Part: background and six parts (sec. 5.1).
    "person_part": AttentionToScaleConfig(num_classes=7),
}


def score_size(n: int) -> int:
    """Side of the score map for an input side of n: pool1-3 each give floor(n / 2) + 1."""
    for _ in range(3):
        n = n // 2 + 1
    return n


def _spec(name: str, config_name: str, cfg: AttentionToScaleConfig) -> ModelSpec:
    # The image size is fixed: the exporter cannot keep the scales' bilinear resizing
    # symbolic (aligned corners divide by the output size - 1, which it must prove is not
    # 0 for every size). DeepLab tests on a fixed canvas too (images padded to 513 x 513).
    size, grid = cfg.img_size, score_size(cfg.img_size)
    # Resize the short side to the model size (no margin) and centre-crop it.
    preprocessing = {**image_preprocessing(size, CAFFE_MEAN, CAFFE_STD), "resize": size,
                     "output_stride": OUTPUT_STRIDE, "scales": list(cfg.scales)}
    return ModelSpec(
        name=name,
        config=config_name,
        task="semantic-segmentation",
        inputs=(TensorSpec("images", "float32", ("batch", cfg.in_chans, size, size)),),
        outputs=(TensorSpec("scores", "float32", ("batch", cfg.num_classes, grid, grid)),
                 TensorSpec("attention", "float32", ("batch", len(cfg.scales), grid, grid))),
        tolerances=dict(DEFAULT_TOLERANCES),
        preprocessing=preprocessing,
    )


register_model(
    "attention_to_scale",
    configs=CONFIGS,
    spec=_spec,
    paper="Chen et al., Attention to Scale: Scale-aware Semantic Image Segmentation, CVPR 2016",
)(AttentionToScale)
