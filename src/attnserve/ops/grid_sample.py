"""`attnserve::grid_sample` and `attnserve::affine_grid_sample`: sampling a 2-D or 3-D
map at given coordinates (the spatial transformer's sampler, RAM's glimpse).

Semantics are those of torch.nn.functional.grid_sample / affine_grid: x is
(N, C, H, W) or (N, C, D, H, W); grid is (N, Ho, Wo, 2) or (N, Do, Ho, Wo, 3) holding
normalised coordinates in [-1, 1], x (width) first. `affine_grid_sample` fuses the grid
generator: theta is (N, 2, 3) or (N, 3, 4) and the output size is given. The NumPy
references are in `attnserve.ops.reference`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from attnserve.errors import AttnserveError

MODES = ("bilinear", "nearest")
PADDING_MODES = ("zeros", "border", "reflection")


def check_sampler_args(x_shape, mode: str, padding_mode: str) -> int:
    """Validate the input rank and the modes; returns the number of spatial axes."""
    if len(x_shape) not in (4, 5):
        raise AttnserveError(
            f"grid_sample takes a 4-D (N, C, H, W) or 5-D (N, C, D, H, W) input; got shape "
            f"{tuple(x_shape)}"
        )
    if mode not in MODES:
        raise AttnserveError(f"grid_sample mode must be one of {MODES}, got {mode!r}")
    if padding_mode not in PADDING_MODES:
        raise AttnserveError(f"grid_sample padding_mode must be one of {PADDING_MODES}, got {padding_mode!r}")
    return len(x_shape) - 2


def check_grid(x_shape, grid_shape) -> None:
    r = check_sampler_args(x_shape, "bilinear", "zeros")
    if len(grid_shape) != r + 2 or grid_shape[-1] != r:
        want = "(N, Ho, Wo, 2)" if r == 2 else "(N, Do, Ho, Wo, 3)"
        raise AttnserveError(
            f"grid_sample on a {len(x_shape)}-D input needs a grid of shape {want}; "
            f"got {tuple(grid_shape)}"
        )
    if grid_shape[0] != x_shape[0]:
        raise AttnserveError(f"grid_sample: grid batch {grid_shape[0]} differs from input batch {x_shape[0]}")


def check_theta(x_shape, theta_shape, out_size) -> None:
    r = len(x_shape) - 2
    if tuple(theta_shape[1:]) != (r, r + 1) or len(theta_shape) != 3:
        raise AttnserveError(
            f"affine_grid_sample on a {len(x_shape)}-D input needs theta of shape (N, {r}, {r + 1}); "
            f"got {tuple(theta_shape)}"
        )
    if theta_shape[0] != x_shape[0]:
        raise AttnserveError(
            f"affine_grid_sample: theta batch {theta_shape[0]} differs from input batch {x_shape[0]}"
        )
    if len(out_size) != r or any(int(s) < 1 for s in out_size):
        raise AttnserveError(
            f"affine_grid_sample needs {r} positive output sizes for a {len(x_shape)}-D input; "
            f"got {list(out_size)}"
        )


@torch.library.custom_op("attnserve::grid_sample", mutates_args=())
def grid_sample_op(x: torch.Tensor, grid: torch.Tensor, mode: str, padding_mode: str,
                   align_corners: bool) -> torch.Tensor:
    check_sampler_args(x.shape, mode, padding_mode)
    check_grid(x.shape, grid.shape)
    return F.grid_sample(x, grid.to(x.dtype), mode=mode, padding_mode=padding_mode,
                         align_corners=align_corners)


@grid_sample_op.register_fake
def _(x, grid, mode, padding_mode, align_corners):
    check_sampler_args(x.shape, mode, padding_mode)
    check_grid(x.shape, grid.shape)
    return x.new_empty((x.shape[0], x.shape[1], *grid.shape[1:-1]))


@torch.library.custom_op("attnserve::affine_grid_sample", mutates_args=())
def affine_grid_sample_op(x: torch.Tensor, theta: torch.Tensor, out_size: list[int], mode: str,
                          padding_mode: str, align_corners: bool) -> torch.Tensor:
    check_sampler_args(x.shape, mode, padding_mode)
    check_theta(x.shape, theta.shape, out_size)
    # affine_grid has no fp16 CPU kernel; the grid is made in fp32 and sampled in x's dtype.
    grid = F.affine_grid(theta.float(), [x.shape[0], x.shape[1], *out_size], align_corners=align_corners)
    return F.grid_sample(x, grid.to(x.dtype), mode=mode, padding_mode=padding_mode,
                         align_corners=align_corners)


@affine_grid_sample_op.register_fake
def _(x, theta, out_size, mode, padding_mode, align_corners):
    check_sampler_args(x.shape, mode, padding_mode)
    check_theta(x.shape, theta.shape, out_size)
    return x.new_empty((x.shape[0], x.shape[1], *out_size))


def grid_sample(x: torch.Tensor, grid: torch.Tensor, *, mode: str = "bilinear",
                padding_mode: str = "zeros", align_corners: bool = False) -> torch.Tensor:
    """Sample x at grid (see the module docstring). Exports as `attnserve.GridSampler`."""
    return grid_sample_op(x, grid, mode, padding_mode, bool(align_corners))


def affine_grid_sample(x: torch.Tensor, theta: torch.Tensor, out_size: Sequence[int], *,
                       mode: str = "bilinear", padding_mode: str = "zeros",
                       align_corners: bool = False) -> torch.Tensor:
    """Sample x on the affine grid theta generates over out_size. Exports as
    `attnserve.AffineGridSampler`."""
    return affine_grid_sample_op(x, theta, [int(s) for s in out_size], mode, padding_mode,
                                 bool(align_corners))
