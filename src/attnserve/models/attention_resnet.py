"""ResNets with attention inside: Squeeze-and-Excitation and CBAM.

Hu et al., "Squeeze-and-Excitation Networks", CVPR 2018. https://arxiv.org/abs/1709.01507
Woo et al., "CBAM: Convolutional Block Attention Module", ECCV 2018.
https://arxiv.org/abs/1807.06521

Both insert an attention module at the end of each bottleneck's residual branch, before
the identity sum (SE fig. 3, CBAM fig. 3). SE-ResNet-50 loads timm's `seresnet50`
checkpoints by name. The trunk has no position-dependent parameters, so the exported
graphs take any image size.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

from attnserve.models.layers import Cbam, ResNet, SqueezeExcite
from attnserve.models.registry import register_model
from attnserve.spec import image_classifier


@dataclass(frozen=True)
class AttentionResNetConfig:
    layers: tuple[int, ...] = (3, 4, 6, 3)  # ResNet-50
    stem_width: int = 64
    img_size: int = 224  # the training size; the graph accepts others
    in_chans: int = 3
    num_classes: int = 1000
    reduction: int = 16  # r in both papers
    spatial_kernel: int = 7  # CBAM only


class SEResNet(ResNet):
    def __init__(self, cfg: AttentionResNetConfig):
        super().__init__(cfg.layers, cfg.num_classes, cfg.in_chans, cfg.stem_width,
                         attn_factory=partial(SqueezeExcite, reduction=cfg.reduction))
        self.cfg = cfg


class CbamResNet(ResNet):
    def __init__(self, cfg: AttentionResNetConfig):
        super().__init__(cfg.layers, cfg.num_classes, cfg.in_chans, cfg.stem_width,
                         attn_factory=partial(Cbam, reduction=cfg.reduction,
                                              kernel_size=cfg.spatial_kernel))
        self.cfg = cfg


CONFIGS = {
    "tiny": AttentionResNetConfig(layers=(1, 1, 1, 1), stem_width=16, img_size=64, num_classes=10,
                                  reduction=4),
    "resnet50": AttentionResNetConfig(),
    "resnet101": AttentionResNetConfig(layers=(3, 4, 23, 3)),
}


register_model(
    "se_resnet",
    configs=CONFIGS,
    spec=image_classifier(dynamic_size=True),  # global pooling: any image size
    paper="Hu et al., Squeeze-and-Excitation Networks, CVPR 2018",
    checkpoint_formats=("timm seresnet50",),  # timm's layout is ours: no filter needed
)(SEResNet)

register_model(
    "cbam_resnet",
    configs=CONFIGS,
    spec=image_classifier(dynamic_size=True),
    paper="Woo et al., CBAM: Convolutional Block Attention Module, ECCV 2018",
)(CbamResNet)
