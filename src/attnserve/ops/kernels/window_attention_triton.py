"""Triton kernel for `attnserve::window_attention`.

Semantics are those of `attnserve.ops.window_attention`, checked against
`attnserve.ops.reference.window_attention`. One program handles one (batch, head) and a
tile of BLOCK_Q query positions; it loops over the K keys of the window, computing each
query's j-th key position from the per-axis formula

    block:   (p // w) * w - memory_before + j
    sliding: p + dilation * (j - (w - 1) // 2)

and keeps a streaming (online) softmax in fp32. Keys outside the map, or later in raster
order than the query when causal, are masked out. A cyclic shift is handled by working in
rolled coordinates (the original index of rolled index i is (i + shift) % S), so neither
the inputs nor the output are rolled in memory. A 1-D map runs as a 2-D map of height 1.

The kernel takes plain pointers, integer sizes and constexpr flags (no strides: the
launcher makes the tensors contiguous), so it can also be compiled ahead of time.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from attnserve.errors import AttnserveError
from attnserve.ops.window_attention import check_window_args

DTYPES = (torch.float32, torch.float16)


@triton.jit
def _window_attention_kernel(
    q_ptr, k_ptr, v_ptr, bias_ptr, mask_ptr, out_ptr,
    H, S0, S1, D, K1, K,
    W0, W1, START0, START1, STEP0, STEP1, SHIFT0, SHIFT1,
    scale,
    BLOCK_MODE: tl.constexpr, CAUSAL: tl.constexpr, HAS_BIAS: tl.constexpr,
    BIAS_PER_QUERY: tl.constexpr, HAS_MASK: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """out = window attention of q, k, v: (B * H, S0 * S1, D) contiguous.

    The keys of a query at rolled position (r0, r1) are at (a0 + STEP0 * j0, a1 + STEP1 * j1)
    for j = j0 * K1 + j1 < K, with a_i = (r_i // W_i) * W_i - START_i in block mode
    (START = memory_before, STEP = 1) and a_i = r_i - START_i in sliding mode
    (START = dilation * ((w - 1) // 2), STEP = dilation). SHIFT_i is in [0, S_i).

    bias: block (H, Nq, K); sliding (H, K) or, with BIAS_PER_QUERY, (B * H, S0 * S1, K).
    mask: (nW, Nq, K), block only. Nq = W0 * W1.
    """
    bh = tl.program_id(0)
    pid_q = tl.program_id(1)
    S = S0 * S1
    offs = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)  # rolled raster index of each query
    q_valid = offs < S
    r0 = offs // S1
    r1 = offs - r0 * S1
    # original (unrolled) position of the query: its row in q and in out
    q_row = ((r0 + SHIFT0) % S0) * S1 + (r1 + SHIFT1) % S1
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    head_base = bh.to(tl.int64) * S * D
    qd_mask = q_valid[:, None] & d_mask[None, :]
    q = tl.load(q_ptr + head_base + q_row[:, None] * D + offs_d[None, :], mask=qd_mask, other=0.0)
    q = q.to(tl.float32) * scale  # (BLOCK_Q, BLOCK_D)

    if BLOCK_MODE:
        a0 = (r0 // W0) * W0 - START0
        a1 = (r1 // W1) * W1 - START1
        q_index = (r0 % W0) * W1 + r1 % W1  # query's index inside its window
        window_index = (r0 // W0) * (S1 // W1) + r1 // W1
    else:
        a0 = r0 - START0
        a1 = r1 - START1
    h = bh % H

    m_i = tl.full([BLOCK_Q], float("-inf"), dtype=tl.float32)  # running max of the logits
    l_i = tl.zeros([BLOCK_Q], dtype=tl.float32)  # running sum of exp(logit - m_i)
    acc = tl.zeros([BLOCK_Q, BLOCK_D], dtype=tl.float32)
    for j in range(0, K):
        j0 = j // K1
        j1 = j - j0 * K1
        k0 = a0 + STEP0 * j0  # (BLOCK_Q,) rolled key position
        k1 = a1 + STEP1 * j1
        valid = q_valid & (k0 >= 0) & (k0 < S0) & (k1 >= 0) & (k1 < S1)
        if CAUSAL:
            valid = valid & (k0 * S1 + k1 <= offs)
        # clamp invalid keys into the map so every computed address stays in bounds
        k_row = ((tl.where(valid, k0, 0) + SHIFT0) % S0) * S1 + (tl.where(valid, k1, 0) + SHIFT1) % S1
        kv_offs = head_base + k_row[:, None] * D + offs_d[None, :]
        kv_mask = valid[:, None] & d_mask[None, :]
        k = tl.load(k_ptr + kv_offs, mask=kv_mask, other=0.0).to(tl.float32)
        s = tl.sum(q * k, axis=1)  # (BLOCK_Q,)
        if HAS_BIAS:
            if BLOCK_MODE:
                b_offs = (h * (W0 * W1) + q_index) * K + j
            elif BIAS_PER_QUERY:
                b_offs = (bh.to(tl.int64) * S + offs) * K + j
            else:
                b_offs = h * K + j + offs * 0
            s += tl.load(bias_ptr + b_offs, mask=q_valid, other=0.0).to(tl.float32)
        if HAS_MASK:
            m_offs = (window_index * (W0 * W1) + q_index) * K + j
            s += tl.load(mask_ptr + m_offs, mask=q_valid, other=0.0).to(tl.float32)
        s = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m_i, s)
        # while every key so far is excluded m_new is -inf; subtract 0 instead (no inf - inf)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(s - m_safe)
        l_i = l_i * alpha + p
        v = tl.load(v_ptr + kv_offs, mask=kv_mask, other=0.0).to(tl.float32)
        acc = acc * alpha[:, None] + p[:, None] * v
        m_i = m_new
    # Each query sees at least itself; the guard only keeps padding rows finite.
    out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
    tl.store(out_ptr + head_base + q_row[:, None] * D + offs_d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=qd_mask)


def window_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, window: Sequence[int],
    mode: str = "block", shift: Sequence[int] | None = None,
    memory_before: Sequence[int] | None = None, memory_after: Sequence[int] | None = None,
    dilation: Sequence[int] | None = None, causal: bool = False,
    rel_pos_bias: torch.Tensor | None = None, mask: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Windowed multi-head attention with a Triton kernel; the semantics of
    `attnserve.ops.window_attention` (see its module docstring).

    Args:
        q, k, v: (B, heads, *spatial, head_dim) with one or two spatial axes, float32 or
            float16, one shape and dtype.
        window: window size per spatial axis.
        mode: "block" (non-overlapping windows) or "sliding" (centred neighbourhoods).
        shift: block mode: cyclic shift per axis (Swin's shifted windows).
        memory_before, memory_after: block mode: extra key positions per axis before /
            after the window (out-of-map keys are excluded).
        dilation: sliding mode: distance between keys per axis.
        causal: exclude keys later than the query in raster order.
        rel_pos_bias: added to the logits; block (heads, Nq, Nk), sliding (heads, K) or
            (B, heads, *spatial, K).
        mask: block mode: (windows, Nq, Nk), added to the logits.
        scale: logit scale, head_dim ** -0.5 by default.

    Returns:
        (B, heads, *spatial, head_dim) in q's dtype.

    Raises:
        AttnserveError: on arguments `check_window_args` rejects, or on a dtype or device
            the kernel does not take.
    """
    a = check_window_args(
        q.shape, k.shape, v.shape, window, mode, shift, memory_before, memory_after, dilation,
        None if rel_pos_bias is None else rel_pos_bias.shape, None if mask is None else mask.shape,
    )
    if q.dtype not in DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise AttnserveError(
            f"window_attention kernel takes q, k, v of one dtype, float32 or float16; got "
            f"{q.dtype}, {k.dtype}, {v.dtype}"
        )
    for name, t in (("k", k), ("v", v), ("rel_pos_bias", rel_pos_bias), ("mask", mask)):
        if t is not None and t.device != q.device:
            raise AttnserveError(f"window_attention: {name} is on {t.device}, q on {q.device}")
    for name, t in (("rel_pos_bias", rel_pos_bias), ("mask", mask)):
        if t is not None and not t.is_floating_point():
            raise AttnserveError(f"window_attention: {name} must be floating point; got {t.dtype}")

    B, H = q.shape[:2]
    D = q.shape[-1]
    spatial = [int(s) for s in q.shape[2:-1]]
    # A 1-D map is a 2-D map of height 1 with a window of height 1.
    lead = [1] if len(spatial) == 1 else []
    S0, S1 = lead + spatial
    w0, w1 = lead + a["window"]
    shift0, shift1 = [0] * len(lead) + a["shift"]
    if mode == "block":
        mb0, mb1 = [0] * len(lead) + a["memory_before"]
        ma0, ma1 = [0] * len(lead) + a["memory_after"]
        start0, start1 = mb0, mb1
        step0 = step1 = 1
        k0, k1 = w0 + mb0 + ma0, w1 + mb1 + ma1
    else:
        d0, d1 = lead + a["dilation"]
        start0, start1 = d0 * ((w0 - 1) // 2), d1 * ((w1 - 1) // 2)
        step0, step1 = d0, d1
        k0, k1 = w0, w1

    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    # Unused pointer arguments get q; the constexpr flags keep the kernel from reading them.
    bias = q if rel_pos_bias is None else rel_pos_bias.contiguous()
    mask_t = q if mask is None else mask.contiguous()
    scale = float(D ** -0.5 if scale is None else scale)

    S = S0 * S1
    block_d = triton.next_power_of_2(D)
    block_q = max(16, min(triton.next_power_of_2(S), 64, max(1, 8192 // block_d)))
    _window_attention_kernel[(B * H, triton.cdiv(S, block_q))](
        q, k, v, bias, mask_t, out,
        H, S0, S1, D, k1, k0 * k1,
        w0, w1, start0, start1, step0, step1, shift0 % S0, shift1 % S1,
        scale,
        BLOCK_MODE=mode == "block", CAUSAL=bool(causal), HAS_BIAS=rel_pos_bias is not None,
        BIAS_PER_QUERY=rel_pos_bias is not None and rel_pos_bias.dim() > 2, HAS_MASK=mask is not None,
        BLOCK_Q=block_q, BLOCK_D=block_d,
    )
    return out
