"""Spatial Transformer Networks.

Jaderberg et al., "Spatial Transformer Networks", NeurIPS 2015.
https://arxiv.org/abs/1506.02025

A localisation network regresses the parameters of a transformation from the input
image; a grid generator turns them into sampling coordinates over the output grid; a
bilinear sampler reads the input there (sec. 3). The transformed image goes to an
ordinary classifier. Two transformations, as in the paper's cluttered/distorted MNIST
experiments (sec. 4.1):

- affine: 6 parameters, initialised to the identity; the grid generator and sampler are
  fused in `attnserve::affine_grid_sample` (one AffineGridSampler node).
- thin-plate spline: the localisation net moves a K x K lattice of control points
  (initialised in place); the dense grid follows Bookstein's TPS interpolation of those
  points, computed with constant matrices so it exports as plain matmuls; the sampler
  is `attnserve::grid_sample` (one GridSampler node).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from attnserve.models.registry import register_model
from attnserve.ops import affine_grid_sample, grid_sample
from attnserve.spec import ModelSpec, image_classification_spec


@dataclass(frozen=True)
class STNConfig:
    img_size: int = 60  # cluttered MNIST canvas
    in_chans: int = 1
    num_classes: int = 10
    transform: str = "affine"  # or "tps"
    out_size: int = 30  # the transformer's output, which the classifier sees
    tps_grid: int = 4  # control points per side for "tps"
    loc_channels: tuple[int, int] = (20, 20)
    loc_hidden: int = 50
    cls_channels: tuple[int, int] = (32, 64)
    cls_hidden: int = 128
    # The localisation net's ReLUs (the paper's) or, above 0, leaky ones with this slope.
    loc_negative_slope: float = 0.0
    # The paper starts from the identity transform; the tiny test configs start from a
    # random one so that parity tests exercise the sampler on non-trivial grids.
    identity_init: bool = True


def _activation(negative_slope: float = 0.0) -> nn.Module:
    return nn.LeakyReLU(negative_slope, inplace=True) if negative_slope else nn.ReLU(inplace=True)


def _conv_stack(in_chans: int, channels: tuple[int, int], negative_slope: float = 0.0) -> nn.Sequential:
    c1, c2 = channels
    return nn.Sequential(
        nn.Conv2d(in_chans, c1, 5, padding=2), nn.MaxPool2d(2), _activation(negative_slope),
        nn.Conv2d(c1, c2, 5, padding=2), nn.MaxPool2d(2), _activation(negative_slope),
    )


def _tps_kernel(r2: torch.Tensor) -> torch.Tensor:
    """U(r) = r^2 log r^2 with U(0) = 0 (Bookstein 1989), taking squared distances."""
    return torch.where(r2 > 0, r2 * torch.log(r2.clamp_min(1e-12)), torch.zeros_like(r2))


def tps_matrices(grid: int, out_h: int, out_w: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Constant matrices of the TPS grid generator.

    Returns (control, generator): control (K, 2) are the lattice points in [-1, 1] (x, y);
    generator (Ho*Wo, K) maps moved control points (K, 2) to the dense grid (Ho*Wo, 2).
    It is [U(|g - P_k|), 1, g] (Ho*Wo, K + 3) times the first K columns of L^-1, where
    L = [[U(|P_i - P_j|), 1, P], [1, P]^T, 0]: the interpolating spline of the points.
    """
    lin = torch.linspace(-1, 1, grid, dtype=torch.float64)
    ys, xs = torch.meshgrid(lin, lin, indexing="ij")
    control = torch.stack([xs.flatten(), ys.flatten()], dim=1)  # (K, 2)
    k = control.shape[0]
    L = torch.zeros(k + 3, k + 3, dtype=torch.float64)
    L[:k, :k] = _tps_kernel(torch.cdist(control, control) ** 2)
    L[:k, k] = 1
    L[:k, k + 1:] = control
    L[k, :k] = 1
    L[k + 1:, :k] = control.T
    L_inv = torch.linalg.inv(L)
    gy, gx = torch.meshgrid(torch.linspace(-1, 1, out_h, dtype=torch.float64),
                            torch.linspace(-1, 1, out_w, dtype=torch.float64), indexing="ij")
    points = torch.stack([gx.flatten(), gy.flatten()], dim=1)  # (Ho*Wo, 2)
    basis = torch.cat([_tps_kernel(torch.cdist(points, control) ** 2),
                       torch.ones(points.shape[0], 1, dtype=torch.float64), points], dim=1)
    generator = basis @ L_inv[:, :k]  # the affine rows of the right-hand side are zero
    return control.float(), generator.float()


class SpatialTransformerClassifier(nn.Module):
    def __init__(self, cfg: STNConfig):
        super().__init__()
        if cfg.transform not in ("affine", "tps"):
            raise ValueError(f"transform must be 'affine' or 'tps', got {cfg.transform!r}")
        self.cfg = cfg
        self.localization = _conv_stack(cfg.in_chans, cfg.loc_channels, cfg.loc_negative_slope)
        loc_features = cfg.loc_channels[1] * (cfg.img_size // 4) ** 2
        n_params = 6 if cfg.transform == "affine" else 2 * cfg.tps_grid**2
        self.fc_loc = nn.Sequential(
            nn.Linear(loc_features, cfg.loc_hidden), _activation(cfg.loc_negative_slope),
            nn.Linear(cfg.loc_hidden, n_params),
        )
        # Start from the identity transformation (paper, sec. 4: "initialised to the
        # identity"); the last layer's weights are zero so the start is exact.
        if cfg.identity_init:
            nn.init.zeros_(self.fc_loc[2].weight)
        else:
            nn.init.normal_(self.fc_loc[2].weight, std=0.05)
        if cfg.transform == "affine":
            with torch.no_grad():
                self.fc_loc[2].bias.copy_(torch.tensor([1, 0, 0, 0, 1, 0], dtype=torch.float))
        else:
            control, generator = tps_matrices(cfg.tps_grid, cfg.out_size, cfg.out_size)
            with torch.no_grad():
                self.fc_loc[2].bias.copy_(control.flatten())
            self.register_buffer("tps_generator", generator, persistent=False)
        self.features = _conv_stack(cfg.in_chans, cfg.cls_channels)
        self.classifier = nn.Sequential(
            nn.Linear(cfg.cls_channels[1] * (cfg.out_size // 4) ** 2, cfg.cls_hidden),
            nn.ReLU(inplace=True), nn.Linear(cfg.cls_hidden, cfg.num_classes),
        )

    def transform(self, images: torch.Tensor) -> torch.Tensor:
        """The spatial transformer alone: (B, C, H, W) -> (B, C, out, out)."""
        params = self.fc_loc(self.localization(images).flatten(1))
        size = (self.cfg.out_size, self.cfg.out_size)
        if self.cfg.transform == "affine":
            return affine_grid_sample(images, params.reshape(-1, 2, 3), size)
        points = params.reshape(-1, self.cfg.tps_grid**2, 2)  # moved control points (x, y)
        grid = (self.tps_generator @ points).reshape(-1, *size, 2)  # (B, Ho, Wo, 2)
        return grid_sample(images, grid)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.features(self.transform(images))
        return self.classifier(x.flatten(1))


CONFIGS = {
    "tiny": STNConfig(img_size=28, out_size=20, loc_channels=(4, 8), loc_hidden=16,
                      cls_channels=(8, 16), cls_hidden=32, identity_init=False),
    "tiny_tps": STNConfig(img_size=28, out_size=20, transform="tps", tps_grid=3, loc_channels=(4, 8),
                          loc_hidden=16, cls_channels=(8, 16), cls_hidden=32, identity_init=False),
    # Cluttered MNIST (60 x 60 canvas), sec. 4.1 and appendix.
    "affine": STNConfig(),
    "tps": STNConfig(transform="tps"),
    # Demo (attnserve train digits): 16 x 16 digits on a cluttered 40 x 40 canvas. The output
    # keeps the canvas's size, so the classifier behind the transformer is exactly the
    # no-transformer baseline the demo compares it with. Leaky units in the localisation net:
    # with ReLUs, two of four seeded trainings (seeds 0 and 2 at two torch threads) lost
    # every unit of it in the first epoch or two (Adam's early steps push them all below
    # zero), and a dead localisation net leaves the identity transform for good; with a
    # slope of 0.1 none died and the transform moved within an epoch (train/digits.py).
    "digits": STNConfig(img_size=40, out_size=40, loc_channels=(8, 16), loc_hidden=32,
                        cls_channels=(8, 16), cls_hidden=64, loc_negative_slope=0.1),
}


def _spec(name: str, config_name: str, cfg: STNConfig) -> ModelSpec:
    """Static size (the FC layers fix it). The canvas is the whole input, as the paper's
    cluttered MNIST: clients resize it to the canvas without cropping (a crop would cut
    off digits at the edge), in grey for one channel, values in [0, 1]."""
    spec = image_classification_spec(name, config_name, img_size=cfg.img_size, in_chans=cfg.in_chans,
                                      num_classes=cfg.num_classes, dynamic_size=False,
                                      mean=(0.0,) * cfg.in_chans, std=(1.0,) * cfg.in_chans)
    return dataclasses.replace(spec, preprocessing={**spec.preprocessing, "resize": cfg.img_size})


register_model(
    "stn",
    configs=CONFIGS,
    spec=_spec,
    paper="Jaderberg et al., Spatial Transformer Networks, NeurIPS 2015",
    custom_ops=("AffineGridSampler", "GridSampler"),  # affine / thin-plate spline
)(SpatialTransformerClassifier)
