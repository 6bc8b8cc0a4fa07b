"""Attention math shared by the towers, in plain PyTorch (the reference the Triton kernels are checked against).

Shapes: B batch, h heads, d head dim, F frames, N patches per frame, T = 1 + F*N video tokens, L text tokens.
"""

from __future__ import annotations

import torch
import torch.utils.checkpoint


def run_layer(layer: torch.nn.Module, *args, checkpoint: bool = False, **kwargs):
    """Call a transformer layer, recomputing its activations in backward when `checkpoint` (saves memory)."""
    if checkpoint and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(layer, *args, use_reentrant=False, **kwargs)
    return layer(*args, **kwargs)


def softmax_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None = None):
    """softmax(q k^T + bias) v over the last two dims; q is already scaled (as in the official VarAttention)."""
    scores = q @ k.transpose(-2, -1)
    if bias is not None:
        scores = scores + bias
    return scores.softmax(dim=-1) @ v


class SoftmaxAttention(torch.nn.Module):
    """`softmax_attention` as a (parameter-free) module, so compute accounting can attribute its MACs by name."""

    def forward(self, q, k, v, bias=None):
        return softmax_attention(q, k, v, bias)


def divided_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_frames: int, mode: str) -> torch.Tensor:
    """Frozen-in-Time divided attention with one clip-level CLS token (EGOVLPV2_SPEC.md §1, hazard 3).

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
    groups, size = q_.shape[2], q_.shape[3]
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
