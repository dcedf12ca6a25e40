"""`attnserve::window_attention`: multi-head attention restricted to local windows.

One op covers the windowed attentions of the zoo; docs/custom_ops.md defines it exactly
and `attnserve.ops.reference.window_attention` is its loop-by-loop reference.

- mode "block": the map is cut into non-overlapping windows of `window` positions per
  axis; a query attends to the keys of its own window, extended by `memory_before` /
  `memory_after` positions per axis (Image Transformer's memory blocks; keys outside
  the map are excluded). `shift` rolls the map by -shift first and the output back
  (Swin's shifted windows). `rel_pos_bias` (heads, Nq, Nk) and `mask` (nW, Nq, Nk) are
  added to the logits; `causal` excludes keys later in raster order than the query.
- mode "sliding": every query attends to the `window` neighbourhood centred on it, keys
  `dilation` apart (stand-alone self-attention; PDAN's dilated 1-D windows); keys outside
  the map are excluded. `rel_pos_bias` is (heads, K) or (B, heads, *spatial, K).

q, k, v: (B, heads, *spatial, head_dim) with one or two spatial axes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from attnserve.errors import AttnserveError

MODES = ("block", "sliding")


def _fill(values: Sequence[int] | None, r: int, default: int, name: str) -> list[int]:
    if values is None or len(values) == 0:
        return [default] * r
    values = [int(v) for v in values]
    if len(values) != r:
        raise AttnserveError(f"window_attention: {name} has {len(values)} values for {r} spatial axes")
    return values


def check_window_args(q_shape, k_shape, v_shape, window, mode, shift, memory_before, memory_after,
                      dilation, rel_pos_bias_shape, mask_shape) -> dict:
    """Validate the arguments against the shapes; returns the normalised attributes.

    Raises AttnserveError with one sentence saying what is wrong; used by the eager
    kernel, the fake kernel (so export fails early, not at run time) and the GPU kernels.
    """
    if len(q_shape) not in (4, 5):
        raise AttnserveError(
            f"window_attention takes (B, heads, *spatial, head_dim) with 1 or 2 spatial axes; "
            f"q has shape {tuple(q_shape)}"
        )
    if tuple(k_shape) != tuple(q_shape) or tuple(v_shape) != tuple(q_shape):
        raise AttnserveError(
            f"window_attention needs q, k and v of one shape; got {tuple(q_shape)}, "
            f"{tuple(k_shape)}, {tuple(v_shape)}"
        )
    if mode not in MODES:
        raise AttnserveError(f"window_attention mode must be one of {MODES}, got {mode!r}")
    spatial = [int(s) for s in q_shape[2:-1]]
    r = len(spatial)
    window = _fill(window, r, 0, "window")
    if any(w < 1 for w in window):
        raise AttnserveError(f"window_attention window sizes must be positive, got {window}")
    shift = _fill(shift, r, 0, "shift")
    memory_before = _fill(memory_before, r, 0, "memory_before")
    memory_after = _fill(memory_after, r, 0, "memory_after")
    dilation = _fill(dilation, r, 1, "dilation")
    heads = int(q_shape[1])
    if mode == "block":
        if any(s % w for s, w in zip(spatial, window, strict=True)):
            raise AttnserveError(
                f"window_attention: spatial size {spatial} is not a multiple of the window {window}; "
                "pad the map first (Swin pads bottom/right with zeros, then crops the output)"
            )
        if any(d != 1 for d in dilation):
            raise AttnserveError("window_attention: dilation applies to mode 'sliding' only")
        if any(shift) and (any(memory_before) or any(memory_after)):
            raise AttnserveError("window_attention: shift and memory blocks cannot be combined")
        if any(m < 0 for m in memory_before + memory_after):
            raise AttnserveError("window_attention: memory extents must be >= 0")
        nq = _prod(window)
        nk = _prod([w + a + b for w, a, b in zip(window, memory_before, memory_after, strict=True)])
        n_windows = _prod([s // w for s, w in zip(spatial, window, strict=True)])
        if rel_pos_bias_shape is not None and tuple(rel_pos_bias_shape) != (heads, nq, nk):
            raise AttnserveError(
                f"window_attention: rel_pos_bias must be (heads, Nq, Nk) = {(heads, nq, nk)}, "
                f"got {tuple(rel_pos_bias_shape)}"
            )
        if mask_shape is not None and tuple(mask_shape) != (n_windows, nq, nk):
            raise AttnserveError(
                f"window_attention: mask must be (windows, Nq, Nk) = {(n_windows, nq, nk)}, "
                f"got {tuple(mask_shape)}"
            )
    else:
        if any(shift) or any(memory_before) or any(memory_after):
            raise AttnserveError("window_attention: shift and memory blocks apply to mode 'block' only")
        if mask_shape is not None:
            raise AttnserveError("window_attention: mask applies to mode 'block' only")
        if any(d < 1 for d in dilation):
            raise AttnserveError(f"window_attention: dilation must be >= 1, got {dilation}")
        nk = _prod(window)
        allowed = [(heads, nk), (int(q_shape[0]), heads, *spatial, nk)]
        if rel_pos_bias_shape is not None and tuple(rel_pos_bias_shape) not in map(tuple, allowed):
            raise AttnserveError(
                f"window_attention: rel_pos_bias must be (heads, K) = {allowed[0]} or "
                f"(B, heads, *spatial, K) = {allowed[1]}, got {tuple(rel_pos_bias_shape)}"
            )
    return {
        "window": window, "mode": mode, "shift": shift, "memory_before": memory_before,
        "memory_after": memory_after, "dilation": dilation,
    }


def _prod(values) -> int:
    out = 1
    for v in values:
        out *= int(v)
    return out


@torch.library.custom_op("attnserve::window_attention", mutates_args=())
def window_attention_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rel_pos_bias: torch.Tensor | None,
    mask: torch.Tensor | None, window: list[int], mode: str, shift: list[int],
    memory_before: list[int], memory_after: list[int], dilation: list[int], causal: bool,
    scale: float,
) -> torch.Tensor:
    a = check_window_args(q.shape, k.shape, v.shape, window, mode, shift, memory_before, memory_after,
                          dilation, None if rel_pos_bias is None else rel_pos_bias.shape,
                          None if mask is None else mask.shape)
    if mode == "block" and not any(a["memory_before"]) and not any(a["memory_after"]) and not causal:
        return _block_attention(q, k, v, rel_pos_bias, mask, a["window"], a["shift"], scale)
    return _gathered_attention(q, k, v, rel_pos_bias, mask, a, causal, scale)


@window_attention_op.register_fake
def _(q, k, v, rel_pos_bias, mask, window, mode, shift, memory_before, memory_after, dilation,
      causal, scale):
    # Shapes may be symbolic here; check what does not depend on the spatial sizes.
    if len(q.shape) not in (4, 5) or mode not in MODES:
        check_window_args(q.shape, k.shape, v.shape, window, mode, shift, memory_before,
                          memory_after, dilation, None, None)
    return torch.empty_like(q)


def _block_attention(q, k, v, bias, mask, window, shift, scale):
    """Partitioned windows (Swin): (B, h, *S, d) -> (B, nW, h, N, d) and back."""
    B, H = q.shape[:2]
    spatial = list(q.shape[2:-1])
    d = q.shape[-1]
    r = len(spatial)
    axes = list(range(2, 2 + r))
    if any(shift):
        q, k, v = (torch.roll(t, [-s for s in shift], dims=axes) for t in (q, k, v))
    grid = [s // w for s, w in zip(spatial, window, strict=True)]

    def partition(t):
        if r == 1:  # (B, h, g, w, d) -> (B, g, h, w, d)
            return t.reshape(B, H, grid[0], window[0], d).permute(0, 2, 1, 3, 4)
        t = t.reshape(B, H, grid[0], window[0], grid[1], window[1], d)
        t = t.permute(0, 2, 4, 1, 3, 5, 6)  # (B, g0, g1, h, w0, w1, d)
        return t.reshape(B, grid[0] * grid[1], H, window[0] * window[1], d)

    qw, kw, vw = partition(q), partition(k), partition(v)  # (B, nW, h, N, d)
    logits = (qw * scale) @ kw.transpose(-2, -1)  # (B, nW, h, N, N)
    if bias is not None:
        logits = logits + bias.unsqueeze(0).unsqueeze(0)
    if mask is not None:
        logits = logits + mask.unsqueeze(0).unsqueeze(2)
    out = logits.softmax(dim=-1) @ vw  # (B, nW, h, N, d)
    if r == 1:
        out = out.permute(0, 2, 1, 3, 4).reshape(B, H, spatial[0], d)
    else:
        out = out.reshape(B, grid[0], grid[1], H, window[0], window[1], d)
        out = out.permute(0, 3, 1, 4, 2, 5, 6).reshape(B, H, spatial[0], spatial[1], d)
    if any(shift):
        out = torch.roll(out, list(shift), dims=axes)
    return out


def key_index_tables(spatial, a: dict, causal: bool, device=None):
    """Per-axis key positions and validity, and the causal mask, for the general path.

    Returns (positions, valid) with positions[i]: (S_i, K_i) long (clamped into the map)
    and valid: bool of shape (*S, *K) combining the bounds and causality.
    """
    r = len(spatial)
    positions, valids = [], []
    for i in range(r):
        p = torch.arange(spatial[i], device=device).unsqueeze(1)  # (S_i, 1)
        if a["mode"] == "block":
            w = a["window"][i]
            j = torch.arange(w + a["memory_before"][i] + a["memory_after"][i], device=device)
            pos = (p // w) * w - a["memory_before"][i] + j  # (S_i, K_i)
        else:
            w = a["window"][i]
            j = torch.arange(w, device=device)
            pos = p + a["dilation"][i] * (j - (w - 1) // 2)
        valids.append((pos >= 0) & (pos < spatial[i]))
        positions.append(pos.clamp(0, spatial[i] - 1))
    if r == 1:
        valid = valids[0]  # (S, K)
        if causal:
            valid = valid & (positions[0] <= torch.arange(spatial[0], device=device).unsqueeze(1))
        return positions, valid
    # (S0, S1, K0, K1)
    valid = valids[0][:, None, :, None] & valids[1][None, :, None, :]
    if causal:
        key_raster = positions[0][:, None, :, None] * spatial[1] + positions[1][None, :, None, :]
        q_raster = torch.arange(spatial[0] * spatial[1], device=device).reshape(spatial[0], spatial[1], 1, 1)
        valid = valid & (key_raster <= q_raster)
    return positions, valid


def _gathered_attention(q, k, v, bias, mask, a, causal, scale):
    """Every query gathers its own keys: the general path (memory blocks, causal,
    sliding windows, dilation)."""
    B, H = q.shape[:2]
    spatial = list(q.shape[2:-1])
    r = len(spatial)
    axes = list(range(2, 2 + r))
    if any(a["shift"]):  # causal shifted windows: causality holds in rolled raster order
        q, k, v = (torch.roll(t, [-s for s in a["shift"]], dims=axes) for t in (q, k, v))
    positions, valid = key_index_tables(spatial, a, causal, q.device)
    if r == 1:
        kg, vg = k[:, :, positions[0]], v[:, :, positions[0]]  # (B, h, S, K, d)
    else:
        p0, p1 = positions[0][:, None, :, None], positions[1][None, :, None, :]
        kg, vg = k[:, :, p0, p1], v[:, :, p0, p1]  # (B, h, S0, S1, K0, K1, d)
        kg = kg.flatten(4, 5)
        vg = vg.flatten(4, 5)
        valid = valid.flatten(2, 3)  # (S0, S1, K)
    logits = ((q * scale).unsqueeze(-2) * kg).sum(-1)  # (B, h, *S, K)
    if bias is not None:
        if a["mode"] == "block":
            logits = logits + _block_table(bias, spatial, a["window"], per_window=False)
        else:
            logits = logits + (bias.reshape(1, H, *([1] * r), -1) if bias.dim() == 2 else bias)
    if mask is not None:
        logits = logits + _block_table(mask, spatial, a["window"], per_window=True)
    logits = logits.masked_fill(~valid, float("-inf"))
    out = (logits.softmax(dim=-1).unsqueeze(-1) * vg).sum(-2)  # (B, h, *S, d)
    return torch.roll(out, list(a["shift"]), dims=axes) if any(a["shift"]) else out


def _block_table(table, spatial, window, per_window: bool):
    """Look up (heads|windows, Nq, Nk) for every query position: (1, h|1, *S, Nk)."""
    grids = [torch.arange(s) for s in spatial]
    idx = torch.meshgrid(*grids, indexing="ij")
    q_index = torch.zeros_like(idx[0])
    w_index = torch.zeros_like(idx[0])
    for i, g in enumerate(idx):
        q_index = q_index * window[i] + g % window[i]
        w_index = w_index * (spatial[i] // window[i]) + g // window[i]
    if per_window:  # mask: (nW, Nq, Nk) -> (1, 1, *S, Nk)
        return table[w_index, q_index].unsqueeze(0).unsqueeze(0)
    return table[:, q_index].unsqueeze(0)  # bias: (h, *S, Nk) -> (1, h, *S, Nk)


def window_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, window: Sequence[int],
    mode: str = "block", shift: Sequence[int] | None = None,
    memory_before: Sequence[int] | None = None, memory_after: Sequence[int] | None = None,
    dilation: Sequence[int] | None = None, causal: bool = False,
    rel_pos_bias: torch.Tensor | None = None, mask: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Windowed multi-head attention; see the module docstring and docs/custom_ops.md.

    Exports as one `attnserve.WindowAttention` node.
    """
    r = q.dim() - 3
    scale = float(q.shape[-1] ** -0.5 if scale is None else scale)
    return window_attention_op(
        q, k, v, rel_pos_bias, mask, [int(w) for w in window], mode,
        _fill(shift, r, 0, "shift") if r in (1, 2) else list(shift or []),
        _fill(memory_before, r, 0, "memory_before") if r in (1, 2) else [],
        _fill(memory_after, r, 0, "memory_after") if r in (1, 2) else [],
        _fill(dilation, r, 1, "dilation") if r in (1, 2) else [], bool(causal), scale,
    )

