"""Fused cross-attention for EgoVLPv2's gated cross-attention branches, and their gated residual epilogue.

Both towers run the same core, softmax((q * scale) k^T + bias) v per head, on token-major (B, L, H*D) views read in
place through their strides (the official fusion layers' order):
- video side (`attn` of the top video blocks): q = qkv_i2t(norm_i2t_i(h)) for ALL video tokens (CLS included),
  k, v = the two halves of qkv_text_i2t(text) (views of one Linear output), bias = the text padding mask
  (additive, HF extended mask (1 - m) * finfo.min, given as (B, L));
- text side (`crossattention_t2i` of the top text layers): q = query(self-attention output), k, v = key/value of the
  raw video stream, up to 1 + 16*196 = 3137 tokens, no mask. The official code divides the scores by sqrt(D) after
  the product; here q is scaled first, which is exact for D = 64 (a power-of-two scale commutes with rounding).
The gated residual h + alpha * proj(attn) follows (`gated_residual`).

The text side has few query tiles (B*H*ceil(Lq/BLOCK_M) programs: 12 at batch 1) over thousands of keys, so its keys
are split over several programs and the partial results merged by log-sum-exp (`_triton_common.split_count`,
flash-decoding); the video side, with many queries over a few text keys, runs unsplit.

Why the projection is not fused into the attention kernel: proj contracts over all H*D channels, while an attention
program owns one head; fusing it would need either a cross-head reduction (atomics, non-deterministic) or one
program per query tile holding all heads plus the (H*D)^2 weight, i.e. a GEMM inside the attention kernel. The
elementwise tail, alpha * y + h, is fused instead: one `addcmul` pass in place of two (alpha * y, then + h), which
saves one read and one write of the (B, T, H*D) activation.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from ._triton_common import (
    autotuning,
    check_same_device,
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

_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
    for bm, bn, w, s in [
        (16, 64, 4, 2),
        (32, 64, 4, 2),
        (64, 32, 4, 2),
        (64, 64, 4, 2),
        (128, 32, 8, 2),
        (128, 64, 8, 2),
    ]
]


def _fixed_config(q_len: int, k_len: int) -> dict:
    """Used when not autotuning. Large tiles: the interpreter's cost is grid size x loop trips.
    Tests may replace this."""
    return {"BLOCK_M": 64 if q_len > 32 else 16, "BLOCK_N": 64}


FIXED_CONFIG = _fixed_config

# How many programs share one query tile's keys: (unsplit programs, keys) -> splits. Tests may replace this.
KEY_SPLITS = split_count


# -- reference --------------------------------------------------------------------------------------------------------
def cross_attention_ref(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, scale: float, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """softmax((q * scale) k^T + bias) v per head, plain torch. q (B, Lq, H*D), k/v (B, Lk, H*D), bias (B, Lk)."""
    B, Lq, C = q.shape
    Lk = k.shape[1]
    D = C // heads
    qh = q.view(B, Lq, heads, D).transpose(1, 2) * scale  # (B, H, Lq, D)
    kh = k.reshape(B, Lk, heads, D).transpose(1, 2)  # (B, H, Lk, D)
    vh = v.reshape(B, Lk, heads, D).transpose(1, 2)
    scores = qh @ kh.transpose(-2, -1)  # (B, H, Lq, Lk)
    if bias is not None:
        scores = scores + bias[:, None, None, :]
    out = scores.softmax(dim=-1) @ vh  # (B, H, Lq, D)
    return out.transpose(1, 2).reshape(B, Lq, C)


def gated_residual(h: torch.Tensor, alpha: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """h + alpha * y in one pass (the gates are plain scalars, no tanh, as in the official layers)."""
    return torch.addcmul(h, alpha, y)


# -- kernel -----------------------------------------------------------------------------------------------------------
@triton.jit
def _cross_attention_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    bias_ptr,
    out_ptr,
    m_ws,
    l_ws,
    acc_ws,
    H,
    Lq,
    Lk,
    splits,
    keys_per_split,
    stride_qb,
    stride_ql,
    stride_qc,
    stride_kb,
    stride_kl,
    stride_kc,
    stride_vb,
    stride_vl,
    stride_vc,
    stride_bb,
    stride_bl,
    stride_ob,
    stride_ol,
    stride_oc,
    scale,
    HAS_BIAS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SPLIT: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    # Flat grid on axis 0 (B*H*query-tiles*splits can pass 65,535); splits, then query tiles, fastest so that
    # neighbours share k/v in L2. SPLIT: this program covers keys [split * keys_per_split, + keys_per_split) and
    # writes its partial state to the workspace (m_ws, l_ws, acc_ws) instead of the output.
    pid = tl.program_id(0).to(tl.int64)
    split = pid % splits
    pid = pid // splits
    q_tiles = tl.cdiv(Lq, BLOCK_M)
    mt = pid % q_tiles
    bh = pid // q_tiles
    b = bh // H
    h = bh % H
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < HEAD_DIM
    ch = h * HEAD_DIM + offs_d  # channel of head h
    rows = mt * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < Lq
    qd_mask = rmask[:, None] & dmask[None, :]
    q = tl.load(q_ptr + b * stride_qb + rows[:, None] * stride_ql + (ch * stride_qc)[None, :], mask=qd_mask, other=0.0)
    q = (q.to(tl.float32) * scale).to(q.dtype)  # (BM, D) scaled in the input dtype, as the reference

    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    k_lo = split * keys_per_split
    k_hi = tl.minimum(k_lo + keys_per_split, Lk)
    for start in range(k_lo, k_hi, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        cmask = cols < k_hi
        kv_mask = cmask[:, None] & dmask[None, :]
        cols64 = cols.to(tl.int64)
        k = tl.load(
            k_ptr + b * stride_kb + cols64[:, None] * stride_kl + (ch * stride_kc)[None, :], mask=kv_mask, other=0.0
        )  # (BN, D)
        v = tl.load(
            v_ptr + b * stride_vb + cols64[:, None] * stride_vl + (ch * stride_vc)[None, :], mask=kv_mask, other=0.0
        )
        s = dot(q, tl.trans(k), UPCAST, PRECISION)  # (BM, BN)
        if HAS_BIAS:
            # finite padding bias (finfo.min), added in fp32 as the reference: a row with every key masked
            # averages all keys instead of producing NaN, exactly like the official code
            bias = tl.load(bias_ptr + b * stride_bb + cols64 * stride_bl, mask=cmask, other=0.0).to(tl.float32)
            s = s + bias[None, :]
        s = tl.where(cmask[None, :], s, float("-inf"))
        m_i, l_i, acc = online_softmax_step(s, v, m_i, l_i, acc, UPCAST, PRECISION)
    if SPLIT:
        store_split(m_ws, l_ws, acc_ws, (bh * splits + split) * Lq + rows, rmask, m_i, l_i, acc, BLOCK_D)
    else:
        out = acc / l_i[:, None]
        tl.store(
            out_ptr + b * stride_ob + rows[:, None] * stride_ol + (ch * stride_oc)[None, :],
            out.to(out_ptr.dtype.element_ty),
            mask=qd_mask,
        )


_tuned_kernel = tuned(_cross_attention_kernel, _CONFIGS, key=["Lq", "Lk", "splits", "HEAD_DIM"])


# -- launcher + custom op -------------------------------------------------------------------------------------------
@triton_op("egovlp::cross_attention", mutates_args=())
def _cross_attention_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None, heads: int, scale: float
) -> torch.Tensor:
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t, 3)
    B, Lq, C = q.shape
    Lk = k.shape[1]
    torch._check(heads > 0 and C % heads == 0, lambda: f"q has {C} channels, not divisible by heads={heads}")
    torch._check(
        k.shape == (B, Lk, C) and v.shape == (B, Lk, C),
        lambda: f"k {tuple(k.shape)} and v {tuple(v.shape)} must both be (B={B}, Lk, {C})",
    )
    torch._check(k.dtype == q.dtype and v.dtype == q.dtype, lambda: "q, k and v must share one dtype")
    check_same_device(q=q, k=k, v=v, bias=bias)
    torch._check(Lk > 0, lambda: "cross-attention needs at least one key")
    if bias is not None:
        torch._check(bias.shape == (B, Lk), lambda: f"bias must be (B={B}, Lk={Lk}), got {tuple(bias.shape)}")
        torch._check(bias.is_floating_point(), lambda: f"bias must be an additive float mask, got {bias.dtype}")
    D = C // heads
    out = new_output((B, Lq, C), q)
    meta = {} if autotuning() else fixed_launch(FIXED_CONFIG(Lq, Lk))

    if launch_skipped(q) or nothing_to_compute(B, Lq):
        return out

    # Split before the autotuner picks a tile: the workspace is indexed by query row, so the plan fits every config
    # (the program count assumes the fixed config's query tile). Symbolic sizes (dynamic-shape export) keep one
    # split, decided without touching them: any comparison would put a guard on the shape.
    wanted = 1
    if all(isinstance(n, int) for n in (B, Lq, Lk)):
        wanted = KEY_SPLITS(B * heads * triton.cdiv(Lq, FIXED_CONFIG(Lq, Lk)["BLOCK_M"]), Lk)
    splits, keys_per_split = split_plan(Lk, wanted)
    block_d = head_block(D)
    workspace = split_workspace(B * heads * Lq, splits, block_d, q.device) if splits > 1 else (out, out, out)

    def grid(m):
        return (B * heads * triton.cdiv(Lq, m["BLOCK_M"]) * splits,)

    bias_arg = bias if bias is not None else q  # never read when HAS_BIAS is False
    bias_strides = bias.stride() if bias is not None else (0, 0)
    wrap_triton(_tuned_kernel)[grid](
        q,
        k,
        v,
        bias_arg,
        out,
        *workspace,
        heads,
        Lq,
        Lk,
        splits,
        keys_per_split,
        *q.stride(),
        *k.stride(),
        *v.stride(),
        *bias_strides,
        *out.stride(),
        scale,
        HAS_BIAS=bias is not None,
        HEAD_DIM=D,
        BLOCK_D=block_d,
        SPLIT=splits > 1,
        **dot_flags(q.dtype),
        **meta,
    )
    if splits > 1:
        combine_splits(workspace, out, B, heads, Lq, splits, D, block_d)
    return out


def _no_backward(ctx, grad_out):
    raise RuntimeError(
        "egovlp::cross_attention has no backward kernel; train with attention_backend 'reference' or 'sdpa' "
        "(the model switches automatically when gradients are needed)"
    )


_cross_attention_op.register_autograd(_no_backward)


# -- public functions -------------------------------------------------------------------------------------------------
def cross_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    heads: int,
    scale: float | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Fused multi-head cross-attention on token-major views.

    q: (B, Lq, H*D); k, v: (B, Lk, H*D) (e.g. the two halves of one Linear output, any strides); bias: additive
    (B, Lk) float mask or None. scale multiplies q first (default D**-0.5). Returns (B, Lq, H*D), q's dtype.
    Forward only.
    """
    if scale is None:
        head_dim = q.shape[-1] // heads if heads > 0 else 0
        scale = head_dim**-0.5 if head_dim > 0 else 1.0  # a bad head count is reported by the op's checks
    return torch.ops.egovlp.cross_attention(q, k, v, bias, int(heads), float(scale))
