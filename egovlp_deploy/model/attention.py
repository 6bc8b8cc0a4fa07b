"""Attention math shared by the towers, and the backend switch.

The plain-PyTorch functions here are the official math (the reference the Triton kernels are checked against).
The model calls one dispatch function per attention kind, each taking the `attention_backend` name:
- `divided_attention_tokens`: video self-attention (time or space pass) from the qkv Linear output;
- `multihead_attention`: the cross-attention cores of both towers (and RoBERTa's self-attention);
- `gated_residual`: h + alpha * y after a gated cross-attention.
Backends: "reference" (this file), "sdpa" (torch SDPA with the official rearranges), "triton" (the fused kernels of
`egovlp_deploy.kernels`, forward only), "auto" (triton on CUDA, reference elsewhere), "tuned" (per call shape, the
implementation measured fastest on this device: `attention_plan.py`). The Triton kernels have no
backward and no attention dropout, so whenever autograd or dropout is needed the "triton" choice runs the reference
instead: training is never silently given wrong or missing gradients.

Shapes: B batch, h heads, d head dim, F frames, N patches per frame, T = 1 + F*N video tokens, L text tokens.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as nnf
import torch.utils.checkpoint

from ..config import check_attention_backend

if TYPE_CHECKING:
    from typing import Any


def run_layer(layer: torch.nn.Module, *args: Any, checkpoint: bool = False, **kwargs: Any) -> torch.Tensor:
    """Call a transformer layer, recomputing its activations in backward when `checkpoint` (saves memory)."""
    if checkpoint and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(layer, *args, use_reentrant=False, **kwargs)
    return layer(*args, **kwargs)


def softmax_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """softmax(q k^T + bias) v over the last two dims; q is already scaled (as in the official VarAttention)."""
    scores = q @ k.transpose(-2, -1)
    if bias is not None:
        scores = scores + bias
    return scores.softmax(dim=-1) @ v


class MultiHeadAttentionCore(torch.nn.Module):
    """`multihead_attention` as a parameter-free module, so compute accounting can attribute its MACs by name.
    `attention_backend` is set by `EgoVLPv2.set_attention_backend`."""

    def __init__(self, heads: int, scale: float) -> None:
        super().__init__()
        self.heads = heads
        self.scale = scale
        self.attention_backend = "reference"

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        return multihead_attention(q, k, v, self.heads, self.scale, bias, self.attention_backend)


def divided_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_frames: int, mode: str) -> torch.Tensor:
    """Frozen-in-Time divided attention with one clip-level CLS token (the official `VarAttention`).

    q, k, v: (B, h, 1 + F*N, d), tokens frame-major, q already multiplied by d**-0.5.
    - The CLS query attends to all 1 + F*N keys.
    - mode "time": patch (f, n) attends to [CLS] + the F patches at position n.
    - mode "space": patch (f, n) attends to [CLS] + the N patches of frame f.
    Returns (B, h, 1 + F*N, d).
    """
    B, h, T, d = q.shape
    F = num_frames
    N = (T - 1) // F
    cls_out = softmax_attention(q[:, :, :1], k, v)  # (B, h, 1, d)

    def grouped(t: torch.Tensor) -> torch.Tensor:
        t = t[:, :, 1:].reshape(B, h, F, N, d)  # (B, h, F, N, d)
        return t.transpose(2, 3) if mode == "time" else t  # time: (B, h, N, F, d); space: (B, h, F, N, d)

    if mode not in ("time", "space"):
        raise ValueError(f"mode must be 'time' or 'space', got {mode!r}")
    q_, k_, v_ = grouped(q), grouped(k), grouped(v)
    groups = q_.shape[2]
    # Every group also sees the CLS key/value, prepended as in the official code.
    cls_k = k[:, :, :1].unsqueeze(2).expand(B, h, groups, 1, d)
    cls_v = v[:, :, :1].unsqueeze(2).expand(B, h, groups, 1, d)
    out = softmax_attention(q_, torch.cat((cls_k, k_), dim=3), torch.cat((cls_v, v_), dim=3))  # (B, h, G, size, d)
    if mode == "time":
        out = out.transpose(2, 3)  # back to (B, h, F, N, d)
    return torch.cat((cls_out, out.reshape(B, h, F * N, d)), dim=2)


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, T, h*d) -> (B, h, T, d); the channel split is (h d), as einops 'b n (h d)' in the official code."""
    B, T, C = x.shape
    return x.view(B, T, heads, C // heads).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(B, h, T, d) -> (B, T, h*d)."""
    B, h, T, d = x.shape
    return x.transpose(1, 2).reshape(B, T, h * d)


def extended_attention_mask(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, L) 1/0 mask -> (B, 1, 1, L) additive bias, as HF's get_extended_attention_mask: (1 - m) * finfo.min."""
    mask = attention_mask[:, None, None, :].to(dtype)
    return (1.0 - mask) * torch.finfo(dtype).min


def divided_attention_sdpa(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_frames: int, mode: str
) -> torch.Tensor:
    """`divided_attention` through torch SDPA: the same rearranges and CLS repeat, q already scaled (scale=1)."""
    if mode not in ("time", "space"):
        raise ValueError(f"mode must be 'time' or 'space', got {mode!r}")
    B, h, T, d = q.shape
    F = num_frames
    N = (T - 1) // F
    cls_out = nnf.scaled_dot_product_attention(q[:, :, :1], k, v, scale=1.0)  # (B, h, 1, d)

    def grouped(t: torch.Tensor) -> torch.Tensor:
        t = t[:, :, 1:].reshape(B, h, F, N, d)
        return t.transpose(2, 3) if mode == "time" else t  # (B, h, groups, size, d)

    q_, k_, v_ = grouped(q), grouped(k), grouped(v)
    G, size = q_.shape[2], q_.shape[3]
    k_ = torch.cat((k[:, :, :1].unsqueeze(2).expand(B, h, G, 1, d), k_), dim=3)  # (B, h, G, 1 + size, d)
    v_ = torch.cat((v[:, :, :1].unsqueeze(2).expand(B, h, G, 1, d), v_), dim=3)
    # groups folded into the heads axis, not the batch: SDPA's CUDA kernels cap batch and heads at 65,535 each
    # (pytorch #146704), and B*h*N reaches that at B = 28 clips
    out = nnf.scaled_dot_product_attention(
        q_.reshape(B, h * G, size, d),
        k_.reshape(B, h * G, size + 1, d),
        v_.reshape(B, h * G, size + 1, d),
        scale=1.0,
    ).view(B, h, G, size, d)
    if mode == "time":
        out = out.transpose(2, 3)
    return torch.cat((cls_out, out.reshape(B, h, F * N, d)), dim=2)


# -- backend dispatch -------------------------------------------------------------------------------------------------
def _triton_runs_on(t: torch.Tensor) -> bool:
    if t.is_cuda:
        try:
            import triton  # noqa: F401
        except ImportError:
            return False
        return True
    return False


def _needs_grad(*tensors: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def tuned_backend(op: str, shape: dict, run, *tensors: torch.Tensor, dropout: float = 0.0) -> str:
    """The active attention plan's pick for this call (measured on first sight of its shape key); 'auto' where
    autograd or dropout is needed (the plan times inference only) and inside torch.compile (its graph is traced
    once, with the sizes symbolic, and Inductor generates its own kernels for the torch paths)."""
    if dropout > 0 or _needs_grad(*tensors) or torch.compiler.is_compiling():
        return "auto"
    from .attention_plan import active_plan

    return active_plan().choose(op, shape, run, *tensors)


def resolve_backend(backend: str, *tensors: torch.Tensor, dropout: float = 0.0) -> str:
    """The backend that actually runs: 'auto' picks by device; 'triton' yields to the reference when autograd or
    attention dropout is needed (the kernels are forward-only, without dropout). The attention cores resolve
    'tuned' per shape first (`tuned_backend`); anything else given 'tuned' (the gated residual) takes 'auto'."""
    check_attention_backend(backend)
    if backend in ("auto", "tuned"):
        backend = "triton" if _triton_runs_on(tensors[0]) else "reference"
    if backend == "triton":
        if _needs_grad(*tensors) or dropout > 0:
            return "reference"
        # the ONNX export traces the ops (its custom-op route translates them into standard ONNX operators): no
        # kernel runs, so the graph is written on a machine without a GPU too
        if (
            not tensors[0].is_cuda
            and os.environ.get("TRITON_INTERPRET") != "1"
            and tensors[0].device.type != "meta"
            and not torch.onnx.is_in_onnx_export()
        ):
            raise ValueError(
                "attention_backend 'triton' needs a CUDA device (or TRITON_INTERPRET=1 on the CPU, "
                "for tests); use 'auto', 'reference' or 'sdpa' on this machine"
            )
    return backend


def divided_attention_tokens(
    qkv: torch.Tensor, heads: int, num_frames: int, mode: str, scale: float, backend: str = "reference"
) -> torch.Tensor:
    """Divided attention from the qkv Linear output (B, T, 3*h*d) to (B, T, h*d), before the output projection."""
    if backend == "tuned":
        B, T, C = qkv.shape
        backend = tuned_backend(
            f"divided_{mode}",
            {"batch": B, "tokens": T, "width": C // 3, "heads": heads, "frames": num_frames},
            lambda name: divided_attention_tokens(qkv, heads, num_frames, mode, scale, name),
            qkv,
        )
    backend = resolve_backend(backend, qkv)
    if backend == "triton":
        from ..kernels.divided_attention import divided_attention as fused

        return fused(qkv, heads, num_frames, mode, scale)
    q, k, v = (split_heads(t, heads) for t in qkv.chunk(3, dim=-1))  # 3 x (B, h, T, d)
    attend = divided_attention_sdpa if backend == "sdpa" else divided_attention
    return merge_heads(attend(q * scale, k, v, num_frames, mode))  # (B, T, h*d)


def multihead_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    heads: int,
    scale: float,
    bias: torch.Tensor | None = None,
    backend: str = "reference",
    dropout: float = 0.0,
    training: bool = False,
) -> torch.Tensor:
    """softmax((q * scale) k^T + bias) v per head on token-major tensors: q (B, Lq, h*d), k/v (B, Lk, h*d) (views of
    a fused Linear output are fine), bias the (B, 1, 1, Lk) extended mask or None; returns (B, Lq, h*d).
    Scaling q first equals the official RoBERTa division of the scores by sqrt(d) exactly for d = 64 (power of 2).
    `dropout` applies to the probabilities in training (RoBERTa's attention dropout)."""
    p = dropout if training else 0.0
    if backend == "tuned":
        shape = {"batch": q.shape[0], "queries": q.shape[1], "keys": k.shape[1], "width": q.shape[2], "heads": heads}
        shape["masked"] = int(bias is not None)
        backend = tuned_backend(
            "attention",
            shape,
            lambda name: multihead_attention(q, k, v, heads, scale, bias, name, dropout, training),
            q,
            k,
            v,
            dropout=p,
        )
    backend = resolve_backend(backend, q, k, v, dropout=p)
    if backend == "triton":
        from ..kernels.gated_cross_attention import cross_attention as fused

        if bias is not None:  # the kernel takes one key bias per batch row: a per-query mask would lose its rows
            torch._check(
                bias.dim() == 4 and bias.shape[1] == 1 and bias.shape[2] == 1,
                lambda: f"the triton attention backend takes a (B, 1, 1, Lk) bias, got {tuple(bias.shape)}",
            )
        return fused(q, k, v, heads, scale, None if bias is None else bias[:, 0, 0, :])
    qh, kh, vh = split_heads(q, heads) * scale, split_heads(k, heads), split_heads(v, heads)  # (B, h, L, d)
    if backend == "sdpa":
        return merge_heads(nnf.scaled_dot_product_attention(qh, kh, vh, attn_mask=bias, dropout_p=p, scale=1.0))
    scores = qh @ kh.transpose(-2, -1)
    if bias is not None:
        scores = scores + bias
    probs = scores.softmax(dim=-1)
    if p > 0:
        probs = nnf.dropout(probs, p, training=True)
    return merge_heads(probs @ vh)


def gated_residual(h: torch.Tensor, alpha: torch.Tensor, y: torch.Tensor, backend: str = "reference") -> torch.Tensor:
    """h + alpha * y; fused into one pass (addcmul) off the reference backend, which keeps the official two ops."""
    if resolve_backend(backend, h, alpha, y) == "reference":
        return h + alpha * y
    return torch.addcmul(h, alpha, y)
