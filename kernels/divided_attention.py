"""Fused divided space-time attention (Frozen-in-Time / EgoVLPv2 `VarAttention`), one Triton launch per pass.

Input: the block's qkv Linear output `qkv` (B, S, 3*H*D), S = 1 + F*N tokens, frame-major, channel index
`which*H*D + h*D + d` (einops 'b n (h d)' after `chunk(3)`), read in place through its strides.
Output: (B, S, H*D), ready for the output projection.

Math (the official VarAttention of video_transformer.py), per batch b and head h, with q already multiplied by `scale`
(= D**-0.5, rounded to the input dtype as the official `q *= scale`), no attention dropout:
- token 0 (the clip CLS) attends to all S tokens;
- mode "time":  patch (f, n) attends to [CLS] + the F patches (g, n), g = 0..F-1;
- mode "space": patch (f, n) attends to [CLS] + the N patches (f, m), m = 0..N-1.
Both passes are "groups" of tokens: group g holds tokens 1 + g*group_stride + i*inner_stride, i < group_size
(time: N groups of F, group_stride 1, inner N; space: F groups of N, group_stride N, inner 1). Each patch query
attends to [CLS] + its own group, so one kernel serves both passes.

What the kernel saves over the reference (einops rearranges, a repeat + cat of the CLS key/value into every group,
two batched matmuls, a softmax): qkv is read once and the output written once; the CLS key/value is an extra
online-softmax step, never materialised.

The CLS query is one row over all S keys: as one program per (b, h) it is the longest program of the launch (3,137
keys at 16 frames). Its keys are split over several programs and the partial results merged by log-sum-exp
(`_triton_common.split_count`, flash-decoding), a second small launch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from ._triton_common import (
    MIN_DOT,
    autotuning,
    check_tensor,
    combine_splits,
    dot,
    dot_flags,
    fixed_launch,
    head_block,
    launch_skipped,
    new_output,
    nothing_to_compute,
    online_softmax_step,
    split_count,
    split_plan,
    split_workspace,
    store_split,
    tuned,
)

MODES = ("time", "space")

# Groups of at most this many tokens (the time pass: F = 4..32) are packed several to a tile with a block-diagonal
# mask: one 16-wide tl.dot tile on a group of 4 tokens alone would do 94% padding work and launch 4x the programs.
PACK_LIMIT = MIN_DOT

# Autotuned on the GPU (key: the group shape); every config is valid for both modes since BLOCK_M >= PACK_LIMIT.
_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
    for bm, bn, w, s in [
        (16, 32, 2, 1),
        (32, 32, 2, 2),
        (32, 64, 4, 2),
        (64, 32, 4, 2),
        (64, 64, 4, 2),
        (128, 64, 8, 2),
    ]
]


def _fixed_config(group_size: int) -> dict:
    """Used when not autotuning. The interpreter's cost is grid size x loop trips: large tiles.
    Tests may replace this."""
    if group_size <= PACK_LIMIT:
        return {"BLOCK_M": 16, "BLOCK_N": 16}
    return {"BLOCK_M": 64, "BLOCK_N": 64}


FIXED_CONFIG = _fixed_config

# How many programs share the CLS row's keys: (unsplit CLS programs, keys) -> splits. Tests may replace this.
CLS_SPLITS = split_count


# -- reference ----------------------------------------------------------------------------------------------------
def divided_attention_ref(qkv: torch.Tensor, heads: int, num_frames: int, mode: str, scale: float) -> torch.Tensor:
    """The official math in plain torch (rearranges, repeat/cat of CLS k/v, matmuls, softmax): (B, S, H*D)."""
    if mode not in MODES:
        raise ValueError(f"mode must be 'time' or 'space', got {mode!r}")
    B, S, C = qkv.shape
    D = C // (3 * heads)
    F = num_frames
    N = (S - 1) // F
    q, k, v = (t.view(B, S, heads, D).transpose(1, 2) for t in qkv.chunk(3, dim=-1))  # 3 x (B, H, S, D)
    q = q * scale

    def attend(q_, k_, v_):
        return (q_ @ k_.transpose(-2, -1)).softmax(dim=-1) @ v_

    cls_out = attend(q[:, :, :1], k, v)  # (B, H, 1, D)

    def grouped(t):
        t = t[:, :, 1:].reshape(B, heads, F, N, D)  # (B, H, F, N, D)
        return t.transpose(2, 3) if mode == "time" else t  # (B, H, groups, size, D)

    q_, k_, v_ = grouped(q), grouped(k), grouped(v)
    G = q_.shape[2]
    cls_k = k[:, :, :1].unsqueeze(2).expand(B, heads, G, 1, D)
    cls_v = v[:, :, :1].unsqueeze(2).expand(B, heads, G, 1, D)
    out = attend(q_, torch.cat((cls_k, k_), dim=3), torch.cat((cls_v, v_), dim=3))  # (B, H, G, size, D)
    if mode == "time":
        out = out.transpose(2, 3)
    out = torch.cat((cls_out, out.reshape(B, heads, F * N, D)), dim=2)  # (B, H, S, D)
    return out.transpose(1, 2).reshape(B, S, heads * D)


# -- kernels --------------------------------------------------------------------------------------------------------
@triton.jit
def _cls_row(
    qkv_ptr,
    out_ptr,
    m_ws,
    l_ws,
    acc_ws,
    b,
    h,
    H,
    split,
    splits,
    keys_per_split,
    S,
    HD,
    stride_qb,
    stride_qs,
    stride_qc,
    stride_ob,
    stride_os,
    stride_oc,
    scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SPLIT_CLS: tl.constexpr,
):
    """Token 0 of (b, h) attends to tokens [split * keys_per_split, + keys_per_split) of S: one query row, so
    CUDA-core dot products, not tl.dot. SPLIT_CLS: the partial state goes to the workspace, not the output."""
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < HEAD_DIM
    base = qkv_ptr + b * stride_qb
    q = tl.load(base + (h * HEAD_DIM + offs_d) * stride_qc, mask=dmask, other=0.0)
    q = (q.to(tl.float32) * scale).to(q.dtype).to(tl.float32)  # (D,) scaled in the input dtype, as the reference
    k_cols = (HD + h * HEAD_DIM + offs_d) * stride_qc
    v_cols = (2 * HD + h * HEAD_DIM + offs_d) * stride_qc
    m_i = tl.full((), float("-inf"), tl.float32)
    l_i = tl.full((), 0.0, tl.float32)
    acc = tl.zeros((BLOCK_D,), tl.float32)
    k_lo = split * keys_per_split
    k_hi = tl.minimum(k_lo + keys_per_split, S)
    for start in range(k_lo, k_hi, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        nmask = offs_n < k_hi
        rows = offs_n.to(tl.int64) * stride_qs
        kv_mask = nmask[:, None] & dmask[None, :]
        k = tl.load(base + rows[:, None] + k_cols[None, :], mask=kv_mask, other=0.0).to(tl.float32)  # (BN, D)
        s = tl.sum(k * q[None, :], axis=1)  # (BN,)
        s = tl.where(nmask, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=0))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new)
        v = tl.load(base + rows[:, None] + v_cols[None, :], mask=kv_mask, other=0.0).to(tl.float32)
        acc = acc * alpha + tl.sum(p[:, None] * v, axis=0)
        l_i = l_i * alpha + tl.sum(p, axis=0)
        m_i = m_new
    if SPLIT_CLS:
        one = tl.arange(0, 1)
        slot = (b * H + h) * splits + split + one  # (1,): the workspace is indexed [(bh * splits + split) * 1 + 0]
        store_split(
            m_ws,
            l_ws,
            acc_ws,
            slot,
            one == 0,
            m_i + tl.zeros((1,), tl.float32),
            l_i + tl.zeros((1,), tl.float32),
            acc[None, :],
            BLOCK_D,
        )
    else:
        out = acc / l_i
        tl.store(
            out_ptr + b * stride_ob + (h * HEAD_DIM + offs_d) * stride_oc, out.to(out_ptr.dtype.element_ty), mask=dmask
        )


@triton.jit
def _group_tile(
    qkv_ptr,
    out_ptr,
    b,
    h,
    tile,
    HD,
    num_groups,
    group_size,
    group_stride,
    inner_stride,
    stride_qb,
    stride_qs,
    stride_qc,
    stride_ob,
    stride_os,
    stride_oc,
    scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PACKED: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """One tile of patch queries of (b, h) against [CLS] + their group, online softmax in fp32."""
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < HEAD_DIM
    base = qkv_ptr + b * stride_qb
    r = tl.arange(0, BLOCK_M)
    if PACKED:
        # G whole groups per tile: row r is token i of local group r // group_size (block-diagonal attention)
        G = BLOCK_M // group_size
        row_lg = r // group_size
        row_g = tile * G + row_lg
        row_i = r % group_size
        rmask = (row_lg < G) & (row_g < num_groups)
    else:
        q_blocks = tl.cdiv(group_size, BLOCK_M)
        row_g = tile // q_blocks + r * 0
        row_i = (tile % q_blocks) * BLOCK_M + r
        rmask = row_i < group_size
    row_tok = 1 + row_g.to(tl.int64) * group_stride + row_i.to(tl.int64) * inner_stride  # (BM,) token index
    qd_mask = rmask[:, None] & dmask[None, :]
    q = tl.load(
        base + row_tok[:, None] * stride_qs + ((h * HEAD_DIM + offs_d) * stride_qc)[None, :], mask=qd_mask, other=0.0
    )
    q = (q.to(tl.float32) * scale).to(q.dtype)  # (BM, D) scaled in the input dtype, as the reference
    k_cols = (HD + h * HEAD_DIM + offs_d) * stride_qc
    v_cols = (2 * HD + h * HEAD_DIM + offs_d) * stride_qc

    # The CLS key/value opens the online softmax: m = its score, l = 1, acc = its value.
    k0 = tl.load(base + k_cols, mask=dmask, other=0.0).to(tl.float32)  # (D,)
    v0 = tl.load(base + v_cols, mask=dmask, other=0.0).to(tl.float32)
    m_i = tl.sum(q.to(tl.float32) * k0[None, :], axis=1)  # (BM,)
    l_i = tl.full((BLOCK_M,), 1.0, tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32) + v0[None, :]  # (BM, D)

    if PACKED:
        # one key tile: the same G groups, each query sees only its own group's keys
        c = tl.arange(0, BLOCK_M)
        col_lg = c // group_size
        col_g = tile * G + col_lg
        cmask = (col_lg < G) & (col_g < num_groups)
        col_tok = 1 + col_g.to(tl.int64) * group_stride + (c % group_size).to(tl.int64) * inner_stride
        kv_mask = cmask[:, None] & dmask[None, :]
        k = tl.load(base + col_tok[:, None] * stride_qs + k_cols[None, :], mask=kv_mask, other=0.0)  # (BM, D)
        v = tl.load(base + col_tok[:, None] * stride_qs + v_cols[None, :], mask=kv_mask, other=0.0)
        s = dot(q, tl.trans(k), UPCAST, PRECISION)  # (BM, BM)
        s = tl.where(cmask[None, :] & (row_lg[:, None] == col_lg[None, :]), s, float("-inf"))
        m_i, l_i, acc = online_softmax_step(s, v, m_i, l_i, acc, UPCAST, PRECISION)
    else:
        g0 = tile // tl.cdiv(group_size, BLOCK_M)
        for start in range(0, group_size, BLOCK_N):
            j = start + tl.arange(0, BLOCK_N)
            cmask = j < group_size
            col_tok = 1 + g0.to(tl.int64) * group_stride + j.to(tl.int64) * inner_stride
            kv_mask = cmask[:, None] & dmask[None, :]
            k = tl.load(base + col_tok[:, None] * stride_qs + k_cols[None, :], mask=kv_mask, other=0.0)  # (BN, D)
            v = tl.load(base + col_tok[:, None] * stride_qs + v_cols[None, :], mask=kv_mask, other=0.0)
            s = dot(q, tl.trans(k), UPCAST, PRECISION)  # (BM, BN)
            s = tl.where(cmask[None, :], s, float("-inf"))
            m_i, l_i, acc = online_softmax_step(s, v, m_i, l_i, acc, UPCAST, PRECISION)

    out = acc / l_i[:, None]
    tl.store(
        out_ptr + b * stride_ob + row_tok[:, None] * stride_os + ((h * HEAD_DIM + offs_d) * stride_oc)[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=qd_mask,
    )


@triton.jit
def _divided_attention_kernel(
    qkv_ptr,
    out_ptr,
    m_ws,
    l_ws,
    acc_ws,
    H,
    S,
    num_cls,
    cls_splits,
    cls_keys_per_split,
    num_groups,
    group_size,
    group_stride,
    inner_stride,
    stride_qb,
    stride_qs,
    stride_qc,
    stride_ob,
    stride_os,
    stride_oc,
    scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PACKED: tl.constexpr,
    SPLIT_CLS: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    # One flat grid on axis 0 (limit 2^31 - 1): B*H*groups easily passes the 65,535 limit of axes 1-2
    # (pytorch #146704). The num_cls = B*H*cls_splits CLS programs come first: they are the longest, so they start
    # first.
    pid = tl.program_id(0).to(tl.int64)
    HD = H * HEAD_DIM
    if pid < num_cls:
        bh = pid // cls_splits
        _cls_row(
            qkv_ptr,
            out_ptr,
            m_ws,
            l_ws,
            acc_ws,
            bh // H,
            bh % H,
            H,
            pid % cls_splits,
            cls_splits,
            cls_keys_per_split,
            S,
            HD,
            stride_qb,
            stride_qs,
            stride_qc,
            stride_ob,
            stride_os,
            stride_oc,
            scale,
            HEAD_DIM,
            BLOCK_D,
            BLOCK_N,
            SPLIT_CLS,
        )
    else:
        if PACKED:
            tiles_per_head = tl.cdiv(num_groups, BLOCK_M // group_size)
        else:
            tiles_per_head = num_groups * tl.cdiv(group_size, BLOCK_M)
        t = pid - num_cls
        tile = t % tiles_per_head
        bh = t // tiles_per_head
        _group_tile(
            qkv_ptr,
            out_ptr,
            bh // H,
            bh % H,
            tile,
            HD,
            num_groups,
            group_size,
            group_stride,
            inner_stride,
            stride_qb,
            stride_qs,
            stride_qc,
            stride_ob,
            stride_os,
            stride_oc,
            scale,
            HEAD_DIM,
            BLOCK_D,
            BLOCK_M,
            BLOCK_N,
            PACKED,
            UPCAST,
            PRECISION,
        )


_tuned_kernel = tuned(_divided_attention_kernel, _CONFIGS, key=["group_size", "num_groups", "cls_splits", "HEAD_DIM"])


# -- launcher + custom op -------------------------------------------------------------------------------------------
def _tiles_per_head(num_groups: int, group_size: int, packed: bool, block_m: int) -> int:
    if packed:
        return triton.cdiv(num_groups, block_m // group_size)
    return num_groups * triton.cdiv(group_size, block_m)


@triton_op("egovlp::divided_attention", mutates_args=())
def _divided_attention_op(qkv: torch.Tensor, heads: int, num_frames: int, mode: str, scale: float) -> torch.Tensor:
    check_tensor("qkv", qkv, 3)
    B, S, C = qkv.shape
    torch._check(
        heads > 0 and C % (3 * heads) == 0, lambda: f"qkv has {C} channels, not 3 * heads * head_dim for heads={heads}"
    )
    torch._check(
        num_frames > 0 and S > num_frames and (S - 1) % num_frames == 0,
        lambda: f"qkv has {S} tokens, not 1 + num_frames * N (N >= 1) for num_frames={num_frames}",
    )
    torch._check(mode in MODES, lambda: f"mode must be 'time' or 'space', got {mode!r}")
    D = C // (3 * heads)
    F = num_frames
    N = (S - 1) // F
    out = new_output((B, S, heads * D), qkv)
    if mode == "time":
        num_groups, group_size, group_stride, inner_stride = N, F, 1, N
    else:
        num_groups, group_size, group_stride, inner_stride = F, N, N, 1
    packed = group_size <= PACK_LIMIT
    meta = {} if autotuning() else fixed_launch(FIXED_CONFIG(group_size))

    if launch_skipped(qkv) or nothing_to_compute(B):
        return out

    # Symbolic sizes (dynamic-shape export) keep one split, decided without touching them (no shape guard).
    wanted = CLS_SPLITS(B * heads, S) if isinstance(B, int) and isinstance(S, int) else 1
    cls_splits, cls_keys_per_split = split_plan(S, wanted)
    num_cls = B * heads * cls_splits
    block_d = head_block(D)
    workspace = split_workspace(B * heads, cls_splits, block_d, qkv.device) if cls_splits > 1 else (out, out, out)

    def grid(m):
        return (num_cls + B * heads * _tiles_per_head(num_groups, group_size, packed, m["BLOCK_M"]),)

    wrap_triton(_tuned_kernel)[grid](
        qkv,
        out,
        *workspace,
        heads,
        S,
        num_cls,
        cls_splits,
        cls_keys_per_split,
        num_groups,
        group_size,
        group_stride,
        inner_stride,
        *qkv.stride(),
        *out.stride(),
        scale,
        HEAD_DIM=D,
        BLOCK_D=block_d,
        PACKED=packed,
        SPLIT_CLS=cls_splits > 1,
        **dot_flags(qkv.dtype),
        **meta,
    )
    if cls_splits > 1:
        combine_splits(workspace, out, B, heads, 1, cls_splits, D, block_d)
    return out


def _no_backward(ctx, grad_out):
    raise RuntimeError(
        "egovlp::divided_attention has no backward kernel; train with attention_backend 'reference' or 'sdpa' "
        "(the model switches automatically when gradients are needed)"
    )


# A registered backward that raises: a caller who differentiates through the op gets an error, never a silently
# zero or missing gradient.
_divided_attention_op.register_autograd(_no_backward)


# -- public function --------------------------------------------------------------------------------------------------
def divided_attention(
    qkv: torch.Tensor, heads: int, num_frames: int, mode: str, scale: float | None = None
) -> torch.Tensor:
    """Fused divided attention on the qkv Linear output.

    qkv: (B, 1 + F*N, 3*H*D), any strides; fp32, fp16 or bf16; CUDA (or CPU under TRITON_INTERPRET=1).
    mode: "time" or "space". scale: multiplies q first; default D**-0.5 as the official code.
    Returns (B, 1 + F*N, H*D) in qkv's dtype. Forward only (see `_no_backward`).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be 'time' or 'space', got {mode!r}")
    if scale is None:
        head_dim = qkv.shape[-1] // (3 * heads) if heads > 0 else 0
        scale = head_dim**-0.5 if head_dim > 0 else 1.0  # a bad head count is reported by the op's checks
    return torch.ops.egovlp.divided_attention(qkv, int(heads), int(num_frames), mode, float(scale))
