"""Video tower: the Frozen-in-Time SpaceTimeTransformer with gated video<-text cross-attention in its top blocks.

Module and parameter names equal the official ones (`video_model.blocks.{i}.attn.qkv_i2t`, ...), so an official
state dict maps onto this module one to one.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import VideoConfig
from .attention import MultiHeadAttentionCore, divided_attention_tokens, gated_residual, run_layer


class DividedSelfAttention(nn.Module):
    """One divided attention pass ("time" or "space"), optionally followed by gated cross-attention to text.

    The cross-attention (`*_i2t`, `alpha_i2t`) exists only on the spatial pass of fusion blocks and runs only when
    text states are passed: dual mode does no cross-attention work at all, not a zero-gated one.
    """

    def __init__(self, width: int, heads: int, mode: str, text_width: int | None = None, eps: float = 1e-5) -> None:
        super().__init__()
        self.heads = heads
        self.mode = mode
        self.scale = (width // heads) ** -0.5
        self.attention_backend = "reference"  # set by EgoVLPv2.set_attention_backend
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.has_cross = text_width is not None
        if self.has_cross:
            self.qkv_text_i2t = nn.Linear(text_width, 2 * width)  # text keys and values
            self.qkv_i2t = nn.Linear(width, width)  # video queries
            self.attn_i2t = MultiHeadAttentionCore(heads, self.scale)
            self.proj_i2t = nn.Linear(width, width)
            self.norm_i2t_i = nn.LayerNorm(width, eps=eps)
            self.alpha_i2t = nn.Parameter(torch.zeros(1))  # plain scalar gate, no tanh (as the official checkpoints)

    def forward(
        self, x: torch.Tensor, num_frames: int, text: torch.Tensor | None = None, text_bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        # x: (B, T, D), T = 1 + F*N
        qkv = self.qkv(x)  # (B, T, 3D), read in place by the fused kernel
        out = divided_attention_tokens(qkv, self.heads, num_frames, self.mode, self.scale, self.attention_backend)
        x = self.proj(out)  # (B, T, D)
        if text is None:
            return x
        if not self.has_cross:
            raise RuntimeError("text states were passed to a video attention without cross-attention")
        # Queries are ALL video tokens (CLS included) after norm_i2t_i; keys/values the raw text states.
        k_t, v_t = self.qkv_text_i2t(text).chunk(2, dim=-1)  # 2 x (B, L, D), views of one Linear output
        q_v = self.qkv_i2t(self.norm_i2t_i(x))  # (B, T, D)
        cross = self.attn_i2t(q_v, k_t, v_t, text_bias)  # (B, T, D)
        return gated_residual(x, self.alpha_i2t, self.proj_i2t(cross), self.attention_backend)


class Mlp(nn.Module):
    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SpaceTimeBlock(nn.Module):
    """x' = x + Space(LN1(x + Time(LN3(x)))); out = x' + MLP(LN2(x')). The residual base is x, not x + Time."""

    def __init__(self, cfg: VideoConfig, text_width: int | None) -> None:
        super().__init__()
        w, eps = cfg.width, cfg.layer_norm_eps
        self.norm1 = nn.LayerNorm(w, eps=eps)
        self.attn = DividedSelfAttention(w, cfg.heads, "space", text_width=text_width, eps=eps)
        self.timeattn = DividedSelfAttention(w, cfg.heads, "time", eps=eps)
        self.norm2 = nn.LayerNorm(w, eps=eps)
        self.mlp = Mlp(w, int(w * cfg.mlp_ratio))
        self.norm3 = nn.LayerNorm(w, eps=eps)

    def forward(
        self, x: torch.Tensor, num_frames: int, text: torch.Tensor | None = None, text_bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        time_residual = x + self.timeattn(self.norm3(x), num_frames)
        x = x + self.attn(self.norm1(time_residual), num_frames, text, text_bias)
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, cfg: VideoConfig) -> None:
        super().__init__()
        self.proj = nn.Conv2d(cfg.in_chans, cfg.width, kernel_size=cfg.patch_size, stride=cfg.patch_size)

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        # video: (B, F, C, H, W) -> tokens (B, F*N, D), frame-major
        B, F, C, H, W = video.shape
        x = self.proj(video.reshape(B * F, C, H, W))  # (B*F, D, h, w)
        return x.flatten(2).transpose(1, 2).reshape(B, -1, x.shape[1])


class SpaceTimeTransformer(nn.Module):
    def __init__(self, cfg: VideoConfig, num_fuse_blocks: int, text_width: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.width))
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.patches_per_frame + 1, cfg.width))
        self.temporal_embed = nn.Parameter(torch.zeros(1, cfg.num_frames, cfg.width))
        first_fused = cfg.depth - num_fuse_blocks
        self.blocks = nn.ModuleList(
            [SpaceTimeBlock(cfg, text_width if i >= first_fused else None) for i in range(cfg.depth)]
        )
        self.norm = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.first_fused = first_fused
        self.gradient_checkpointing = False
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        if self.cfg.time_init == "rand":
            # a zero temporal embedding leaves the network invariant to frame order (VideoConfig.time_init)
            nn.init.trunc_normal_(self.temporal_embed, std=0.02)
        for block in self.blocks:
            if self.cfg.time_init != "zeros":
                continue  # "rand": the default Linear init (see VideoConfig.time_init)
            # time_init='zeros': the temporal pass starts as an exact zero (proj weight 1 is the official quirk)
            nn.init.zeros_(block.timeattn.qkv.weight)
            nn.init.zeros_(block.timeattn.qkv.bias)
            nn.init.ones_(block.timeattn.proj.weight)
            nn.init.zeros_(block.timeattn.proj.bias)

    def embed(self, video: torch.Tensor, cls_token: torch.Tensor) -> torch.Tensor:
        """Patch tokens plus position embeddings behind `cls_token` (the dual or the fusion CLS): (B, 1+F*N, D)."""
        x = self.patch_embed(video)  # (B, F*N, D)
        N, F = self.cfg.patches_per_frame, self.cfg.num_frames
        # patch (f, n) gets pos_embed[1+n] + temporal_embed[f]; the CLS gets pos_embed[0]
        patch_pos = self.pos_embed[:, 1:].repeat(1, F, 1) + self.temporal_embed.repeat_interleave(N, dim=1)
        pos = torch.cat((self.pos_embed[:, :1], patch_pos), dim=1)  # (1, T, D)
        return torch.cat((cls_token.expand(x.shape[0], -1, -1), x), dim=1) + pos

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        """Dual mode: the clip CLS after the final norm, (B, D)."""
        x = self.embed(video, self.cls_token)
        for block in self.blocks:
            x = run_layer(block, x, self.cfg.num_frames, checkpoint=self.gradient_checkpointing)
        return self.norm(x)[:, 0]
