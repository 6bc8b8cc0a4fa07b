"""Heads on top of the towers: EgoNCE projections, fusion poolers, VTM and MLM.

`nn.Sequential` indices and attribute names follow the official state dict (`txt_proj.0`, `mlm_score.decoder`, ...).
"""

from __future__ import annotations

import torch
from torch import nn

from ..activations import activation


def projections(kind: str, video_width: int, text_width: int, dim: int) -> tuple[nn.Sequential, nn.Sequential]:
    """(txt_proj, vid_proj). "big": Linear(no bias)-ReLU-Linear-ReLU-Linear; "small": text ReLU-Linear, video Linear."""
    if kind == "big":

        def mlp(width: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Linear(width, dim, bias=False), nn.ReLU(), nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, dim)
            )

        return mlp(text_width), mlp(video_width)
    if kind == "small":
        # The ReLU before the text Linear is the EgoVLP-v1 layout the smallproj checkpoints were trained with.
        return nn.Sequential(nn.ReLU(), nn.Linear(text_width, dim)), nn.Sequential(nn.Linear(video_width, dim))
    raise ValueError(f"unknown projection kind {kind!r}")


class Pooler(nn.Module):
    """tanh(dense(x)) on an already-selected CLS vector."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.dense = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(x))


class VTMHead(nn.Module):
    """Video-text matching logits (B, 2); input is [text, video] features, class 1 = match (the official order)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc = nn.Linear(width, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


class PredictionTransform(nn.Module):
    def __init__(self, width: int, act: str, eps: float) -> None:
        super().__init__()
        self.dense = nn.Linear(width, width)
        self.act = activation(act)
        self.LayerNorm = nn.LayerNorm(width, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.act(self.dense(x)))


class MLMHead(nn.Module):
    """transform -> decoder (no bias) + separate bias; not tied to the word embeddings."""

    def __init__(self, width: int, vocab_size: int, act: str, eps: float) -> None:
        super().__init__()
        self.transform = PredictionTransform(width, act, eps)
        self.decoder = nn.Linear(width, vocab_size, bias=False)
        self.bias = nn.Parameter(torch.zeros(vocab_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.transform(x)) + self.bias
