"""Data-efficient image Transformers (DeiT).

Touvron et al., "Training data-efficient image transformers & distillation through
attention", ICML 2021. https://arxiv.org/abs/2012.12877

The architecture is ViT's; the distilled variant adds a distillation token beside the
class token, with its own head. At inference the two heads' outputs are averaged
(sec. 4, "Classification with our approach: joint classifiers"). Names follow timm's
`deit_*` and `deit_*_distilled` checkpoints (`dist_token`, `head_dist`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from attnserve.models import vit
from attnserve.models.registry import register_model
from attnserve.spec import image_classifier


@dataclass(frozen=True)
class DeiTConfig(vit.ViTConfig):
    distilled: bool = True


class DeiT(vit.VisionTransformer):
    def __init__(self, cfg: DeiTConfig):
        self.num_prefix_tokens = 2 if cfg.distilled else 1
        super().__init__(cfg)
        if cfg.distilled:
            self.dist_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim))
            nn.init.trunc_normal_(self.dist_token, std=0.02)
            self.head_dist = nn.Linear(cfg.embed_dim, cfg.num_classes)
            nn.init.trunc_normal_(self.head_dist.weight, std=0.02)
            nn.init.zeros_(self.head_dist.bias)

    def prefix_tokens(self, batch: int) -> torch.Tensor:
        cls = self.cls_token.expand(batch, -1, -1)
        if not self.cfg.distilled:
            return cls
        return torch.cat([cls, self.dist_token.expand(batch, -1, -1)], dim=1)

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        if not self.cfg.distilled:
            return self.head(x[:, 0])
        return (self.head(x[:, 0]) + self.head_dist(x[:, 1])) / 2


def _deit(dim: int, heads: int, distilled: bool) -> DeiTConfig:
    return DeiTConfig(embed_dim=dim, depth=12, num_heads=heads, distilled=distilled)


CONFIGS = {
    "tiny": DeiTConfig(img_size=32, patch_size=8, num_classes=10, embed_dim=64, depth=2, num_heads=2),
    "tiny_plain": DeiTConfig(img_size=32, patch_size=8, num_classes=10, embed_dim=64, depth=2,
                             num_heads=2, distilled=False),
    # Table 1 of the paper.
    "ti": _deit(192, 3, False),
    "s": _deit(384, 6, False),
    "b": _deit(768, 12, False),
    "ti_distilled": _deit(192, 3, True),
    "s_distilled": _deit(384, 6, True),
    "b_distilled": _deit(768, 12, True),
}


register_model(
    "deit",
    configs=CONFIGS,
    spec=image_classifier(),
    paper="Touvron et al., Training data-efficient image transformers, ICML 2021",
    checkpoint_filter=vit.checkpoint_filter,
    checkpoint_formats=("timm deit_*", "timm deit_*_distilled"),
)(DeiT)
