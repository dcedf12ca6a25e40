"""Triton kernels for `attnserve::grid_sample` and `attnserve::affine_grid_sample`.

Semantics are those of `attnserve.ops.grid_sample` (torch.nn.functional.grid_sample /
affine_grid), checked against `attnserve.ops.reference`. One program samples a tile of
BLOCK_P output positions of one batch item for every channel, so the source coordinates,
corner offsets and weights are computed once per position and reused across channels.
2-D maps run through the 3-D code with D = 1 and a single z plane.

The kernels take plain pointers, integer sizes and constexpr flags (no strides: the
launchers make the tensors contiguous), so they can also be compiled ahead of time.
Coordinates and accumulation are fp32 whatever the input dtype; the output has the
input's dtype.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from attnserve.errors import AttnserveError
from attnserve.ops.grid_sample import check_grid, check_sampler_args, check_theta

PADDING_CODES = {"zeros": 0, "border": 1, "reflection": 2}
DTYPES = (torch.float32, torch.float16)


@triton.jit
def _round_half_even(x):
    """nearbyint under the default rounding mode, as torch's nearest sampling uses."""
    f = tl.floor(x)
    d = x - f
    f_is_odd = (f - 2.0 * tl.floor(f * 0.5)) != 0.0
    return tl.where((d > 0.5) | ((d == 0.5) & f_is_odd), f + 1.0, f)


@triton.jit
def _reflect(x, low, high):
    """Reflect x into [low, high], the bounds being mirrors (torch's reflect_coordinates)."""
    span = high - low
    # span is 0 only for align_corners with size 1; the caller's clamp then gives 0.
    safe_span = tl.maximum(span, 1.0)
    d = tl.abs(x - low)
    flips = tl.floor(d / safe_span)
    extra = d - flips * safe_span
    even = (flips - 2.0 * tl.floor(flips * 0.5)) == 0.0
    return tl.where(even, low + extra, high - extra)


@triton.jit
def _source_coord(coord, size, PADDING: tl.constexpr, ALIGN_CORNERS: tl.constexpr):
    """Normalised coordinate in [-1, 1] -> pixel coordinate after padding (fp32)."""
    # `size * 1.0`, not `.to()`: an integer argument equal to 1 may arrive as a constexpr.
    sizef = size * 1.0
    if ALIGN_CORNERS:
        x = (coord + 1.0) / 2.0 * (sizef - 1.0)
    else:
        x = ((coord + 1.0) * sizef - 1.0) / 2.0
    if PADDING == 1:  # border
        x = tl.minimum(tl.maximum(x, 0.0), sizef - 1.0)
    elif PADDING == 2:  # reflection
        if ALIGN_CORNERS:
            x = _reflect(x, 0.0, sizef - 1.0)
        else:
            x = _reflect(x, -0.5, sizef - 0.5)
        x = tl.minimum(tl.maximum(x, 0.0), sizef - 1.0)
    return x


@triton.jit
def _axis_corner(s, NEAREST: tl.constexpr):
    """Pixel coordinate -> (index of the first corner, fraction towards the second)."""
    if NEAREST:
        i0 = _round_half_even(s)
        frac = s * 0.0
    else:
        i0 = tl.floor(s)
        frac = s - i0
    return i0.to(tl.int32), frac


@triton.jit
def _sample_tile(x_ptr, out_ptr, n, gx, gy, gz, offs_p, p_mask, C, D, H, W, P,
                 IS_3D: tl.constexpr, NEAREST: tl.constexpr, PADDING: tl.constexpr,
                 ALIGN_CORNERS: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """Sample x[n] at the normalised coordinates (gx, gy, gz), each (BLOCK_P,), into out[n].

    x[n] is (C, D, H, W) and out[n] is (C, P) with P the number of output positions;
    gz is ignored and D is 1 unless IS_3D.
    """
    sx = _source_coord(gx, W, PADDING, ALIGN_CORNERS)
    sy = _source_coord(gy, H, PADDING, ALIGN_CORNERS)
    ix0, fx = _axis_corner(sx, NEAREST)
    iy0, fy = _axis_corner(sy, NEAREST)
    if IS_3D:
        sz = _source_coord(gz, D, PADDING, ALIGN_CORNERS)
        iz0, fz = _axis_corner(sz, NEAREST)
    else:
        iz0 = ix0 * 0
        fz = fx * 0.0
    # Nearest reads one corner per axis, (tri)linear two; 2-D reads a single z plane.
    CORNERS: tl.constexpr = 1 if NEAREST else 2
    CORNERS_Z: tl.constexpr = CORNERS if IS_3D else 1

    n64 = n.to(tl.int64)
    x_base = x_ptr + n64 * C * D * H * W
    out_base = out_ptr + n64 * C * P
    plane = D * H * W
    offs_c = tl.arange(0, BLOCK_C)
    for c_start in range(0, C, BLOCK_C):
        c = c_start + offs_c
        c_mask = c < C
        c_off = c.to(tl.int64) * plane  # (BLOCK_C,)
        acc = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
        for dz in tl.static_range(CORNERS_Z):
            for dy in tl.static_range(CORNERS):
                for dx in tl.static_range(CORNERS):
                    ix = ix0 + dx
                    iy = iy0 + dy
                    iz = iz0 + dz
                    # weight of corner 0 is 1 - frac, of corner 1 frac (dx etc. are 0 or 1)
                    w = ((fx * dx + (1.0 - fx) * (1 - dx)) * (fy * dy + (1.0 - fy) * (1 - dy))
                         * (fz * dz + (1.0 - fz) * (1 - dz)))
                    # Out-of-map corners read zero (zeros padding; others are clamped already).
                    ok = (p_mask & (ix >= 0) & (ix < W) & (iy >= 0) & (iy < H)
                          & (iz >= 0) & (iz < D))
                    off = (iz * H + iy) * W + ix  # (BLOCK_P,)
                    val = tl.load(x_base + c_off[None, :] + off[:, None],
                                  mask=ok[:, None] & c_mask[None, :], other=0.0)
                    acc += val.to(tl.float32) * w[:, None]
        out_ptrs = out_base + c.to(tl.int64)[None, :] * P + offs_p[:, None]
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=p_mask[:, None] & c_mask[None, :])


@triton.jit
def _grid_sample_kernel(x_ptr, grid_ptr, out_ptr, C, D, H, W, P,
                        IS_3D: tl.constexpr, NEAREST: tl.constexpr, PADDING: tl.constexpr,
                        ALIGN_CORNERS: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """out (N, C, P) = x (N, C, D, H, W) sampled at grid (N, P, 2|3), all contiguous."""
    pid_p = tl.program_id(0)
    n = tl.program_id(1)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    p_mask = offs_p < P
    R: tl.constexpr = 3 if IS_3D else 2
    g_ptrs = grid_ptr + (n.to(tl.int64) * P + offs_p) * R
    # grid's last axis is (x, y[, z]): x indexes W
    gx = tl.load(g_ptrs, mask=p_mask, other=0.0).to(tl.float32)
    gy = tl.load(g_ptrs + 1, mask=p_mask, other=0.0).to(tl.float32)
    if IS_3D:
        gz = tl.load(g_ptrs + 2, mask=p_mask, other=0.0).to(tl.float32)
    else:
        gz = gx * 0.0
    _sample_tile(x_ptr, out_ptr, n, gx, gy, gz, offs_p, p_mask, C, D, H, W, P,
                 IS_3D, NEAREST, PADDING, ALIGN_CORNERS, BLOCK_P, BLOCK_C)


@triton.jit
def _base_coord(i, size, ALIGN_CORNERS: tl.constexpr):
    """affine_grid's base grid along one axis: linspace(-1, 1, size), scaled by
    (size - 1) / size without align_corners, 0 for size 1. i: int32 indices."""
    fi = i.to(tl.float32)
    sizef = size * 1.0
    if ALIGN_CORNERS:
        # max(): no division by zero for size 1, where the where() picks 0 anyway
        lin = 2.0 * fi / tl.maximum(sizef - 1.0, 1.0) - 1.0
        lin = tl.where(sizef > 1.0, lin, 0.0)
    else:
        lin = (2.0 * fi + 1.0) / sizef - 1.0
    return lin


@triton.jit
def _affine_grid_sample_kernel(x_ptr, theta_ptr, out_ptr, C, D, H, W, Do, Ho, Wo,
                               IS_3D: tl.constexpr, NEAREST: tl.constexpr, PADDING: tl.constexpr,
                               ALIGN_CORNERS: tl.constexpr, BLOCK_P: tl.constexpr,
                               BLOCK_C: tl.constexpr):
    """out (N, C, Do, Ho, Wo) = x (N, C, D, H, W) sampled on the grid theta (N, 2, 3) or
    (N, 3, 4) generates over the output positions (Do = 1 in 2-D), all contiguous."""
    pid_p = tl.program_id(0)
    n = tl.program_id(1)
    P = Do * Ho * Wo
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    p_mask = offs_p < P
    ow = offs_p % Wo
    oh = (offs_p // Wo) % Ho
    od = offs_p // (Wo * Ho)
    bx = _base_coord(ow, Wo, ALIGN_CORNERS)
    by = _base_coord(oh, Ho, ALIGN_CORNERS)
    if IS_3D:
        bz = _base_coord(od, Do, ALIGN_CORNERS)
        t = theta_ptr + n.to(tl.int64) * 12  # theta[n]: (3, 4)
        gx = (tl.load(t + 0).to(tl.float32) * bx + tl.load(t + 1).to(tl.float32) * by
              + tl.load(t + 2).to(tl.float32) * bz + tl.load(t + 3).to(tl.float32))
        gy = (tl.load(t + 4).to(tl.float32) * bx + tl.load(t + 5).to(tl.float32) * by
              + tl.load(t + 6).to(tl.float32) * bz + tl.load(t + 7).to(tl.float32))
        gz = (tl.load(t + 8).to(tl.float32) * bx + tl.load(t + 9).to(tl.float32) * by
              + tl.load(t + 10).to(tl.float32) * bz + tl.load(t + 11).to(tl.float32))
    else:
        t = theta_ptr + n.to(tl.int64) * 6  # theta[n]: (2, 3)
        gx = (tl.load(t + 0).to(tl.float32) * bx + tl.load(t + 1).to(tl.float32) * by
              + tl.load(t + 2).to(tl.float32))
        gy = (tl.load(t + 3).to(tl.float32) * bx + tl.load(t + 4).to(tl.float32) * by
              + tl.load(t + 5).to(tl.float32))
        gz = gx * 0.0
    _sample_tile(x_ptr, out_ptr, n, gx, gy, gz, offs_p, p_mask, C, D, H, W, P,
                 IS_3D, NEAREST, PADDING, ALIGN_CORNERS, BLOCK_P, BLOCK_C)


def _block_sizes(p: int, c: int) -> tuple[int, int]:
    block_c = min(triton.next_power_of_2(max(c, 1)), 16)
    block_p = min(triton.next_power_of_2(max(p, 1)), 128)
    return max(block_p, 16), block_c


def _coordinates(x: torch.Tensor, other: torch.Tensor, other_name: str) -> torch.Tensor:
    """Check x's dtype and device; returns the grid or theta contiguous, as float if it was not."""
    if x.dtype not in DTYPES:
        raise AttnserveError(f"grid_sample kernels take float32 or float16 input; got {x.dtype}")
    if other.device != x.device:
        raise AttnserveError(
            f"grid_sample kernels need x and {other_name} on one device; got {x.device} and {other.device}"
        )
    # The torch ops cast the grid / theta to x's dtype; the kernels read any float as fp32.
    return (other if other.is_floating_point() else other.float()).contiguous()


def _spatial(shape) -> tuple[int, int, int]:
    """(D, H, W) of a 2-D or 3-D spatial shape, D = 1 for 2-D."""
    return (1, *shape) if len(shape) == 2 else tuple(shape)


def grid_sample(x: torch.Tensor, grid: torch.Tensor, *, mode: str = "bilinear",
                padding_mode: str = "zeros", align_corners: bool = False) -> torch.Tensor:
    """Sample x at grid with a Triton kernel; the semantics of `attnserve.ops.grid_sample`.

    Args:
        x: (N, C, H, W) or (N, C, D, H, W), float32 or float16.
        grid: (N, Ho, Wo, 2) or (N, Do, Ho, Wo, 3) normalised coordinates, x (width)
            first; read as fp32 whatever its dtype.
        mode: "bilinear" (trilinear for 5-D) or "nearest" (round half to even).
        padding_mode: "zeros", "border" or "reflection".
        align_corners: whether -1 and 1 are the centres of the corner pixels (True) or
            their outer edges (False).

    Returns:
        (N, C, Ho, Wo) or (N, C, Do, Ho, Wo) in x's dtype.

    Raises:
        AttnserveError: on a bad rank, mode, grid shape, dtype or device.
    """
    r = check_sampler_args(x.shape, mode, padding_mode)
    check_grid(x.shape, grid.shape)
    grid = _coordinates(x, grid, "grid")
    N, C = x.shape[:2]
    D, H, W = _spatial(x.shape[2:])
    out_spatial = tuple(grid.shape[1:-1])
    out = torch.empty((N, C, *out_spatial), dtype=x.dtype, device=x.device)
    P = math.prod(out_spatial)
    if out.numel() == 0:
        return out
    x = x.contiguous()
    block_p, block_c = _block_sizes(P, C)
    _grid_sample_kernel[(triton.cdiv(P, block_p), N)](
        x, grid, out, C, D, H, W, P,
        IS_3D=r == 3, NEAREST=mode == "nearest", PADDING=PADDING_CODES[padding_mode],
        ALIGN_CORNERS=bool(align_corners), BLOCK_P=block_p, BLOCK_C=block_c,
    )
    return out


def affine_grid_sample(x: torch.Tensor, theta: torch.Tensor, out_size: Sequence[int], *,
                       mode: str = "bilinear", padding_mode: str = "zeros",
                       align_corners: bool = False) -> torch.Tensor:
    """Sample x on the affine grid theta generates over out_size, fused in one Triton kernel
    (the grid is never written to memory); the semantics of `attnserve.ops.affine_grid_sample`.

    Args:
        x: (N, C, H, W) or (N, C, D, H, W), float32 or float16.
        theta: (N, 2, 3) or (N, 3, 4) affine matrices mapping output to input coordinates,
            read as fp32 whatever its dtype.
        out_size: (Ho, Wo) or (Do, Ho, Wo).
        mode, padding_mode, align_corners: as for `grid_sample`.

    Returns:
        (N, C, *out_size) in x's dtype.

    Raises:
        AttnserveError: on a bad rank, mode, theta shape, output size, dtype or device.
    """
    r = check_sampler_args(x.shape, mode, padding_mode)
    check_theta(x.shape, theta.shape, out_size)
    theta = _coordinates(x, theta, "theta")
    if theta.shape[0] != x.shape[0]:
        raise AttnserveError(
            f"affine_grid_sample: theta batch {theta.shape[0]} differs from input batch {x.shape[0]}"
        )
    N, C = x.shape[:2]
    D, H, W = _spatial(x.shape[2:])
    out_size = [int(s) for s in out_size]
    Do, Ho, Wo = _spatial(out_size)
    out = torch.empty((N, C, *out_size), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    x = x.contiguous()
    P = Do * Ho * Wo
    block_p, block_c = _block_sizes(P, C)
    _affine_grid_sample_kernel[(triton.cdiv(P, block_p), N)](
        x, theta, out, C, D, H, W, Do, Ho, Wo,
        IS_3D=r == 3, NEAREST=mode == "nearest", PADDING=PADDING_CODES[padding_mode],
        ALIGN_CORNERS=bool(align_corners), BLOCK_P=block_p, BLOCK_C=block_c,
    )
    return out
