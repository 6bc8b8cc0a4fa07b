"""Text tower: RoBERTa (sizes from `egovlp_deploy.config.TextConfig`) with EgoVLPv2's gated text<-video cross-attention.

Written here rather than subclassed from `transformers`, whose attention internals change between releases; the
official layer's changes are:
- the attention output LayerNorm + residual is applied in the layer, after the gated cross-attention is added;
- the cross-attention query is the self-attention output before residual/LN, its keys/values the raw video stream
  (no LN, no mask), and its output has no LayerNorm;
- the pooler has no dense layer (and no parameters), so it is omitted.
Parameter names equal the official ones (`text_model.encoder.layer.{i}.crossattention_t2i.self.query`, ...).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from ..activations import activation
from .attention import gated_residual, multihead_attention, run_layer

if TYPE_CHECKING:
    from ..config import TextConfig


class Embeddings(nn.Module):
    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.pad_token_id = cfg.pad_token_id
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=cfg.pad_token_id)
        self.position_embeddings = nn.Embedding(
            cfg.max_position_embeddings, cfg.hidden_size, padding_idx=cfg.pad_token_id
        )
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        # fairseq position ids: pad tokens keep pad_token_id, the others count from pad_token_id + 1
        not_pad = input_ids.ne(self.pad_token_id).long()
        position_ids = torch.cumsum(not_pad, dim=1) * not_pad + self.pad_token_id
        x = (
            self.word_embeddings(input_ids)
            + self.token_type_embeddings(torch.zeros_like(input_ids))
            + self.position_embeddings(position_ids)
        )
        return self.dropout(self.LayerNorm(x))


class MultiHeadAttention(nn.Module):
    """RoBERTa attention core: softmax(Q K^T / sqrt(d) + bias) V with dropout on the probabilities."""

    def __init__(self, cfg: TextConfig, kv_width: int) -> None:
        super().__init__()
        self.heads = cfg.num_attention_heads
        self.query = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.key = nn.Linear(kv_width, cfg.hidden_size)
        self.value = nn.Linear(kv_width, cfg.hidden_size)
        self.dropout = nn.Dropout(cfg.attention_probs_dropout_prob)
        self.scale = (cfg.hidden_size // self.heads) ** -0.5
        self.attention_backend = "reference"  # set by EgoVLPv2.set_attention_backend

    def forward(self, x: torch.Tensor, kv: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        # x: (B, L, D) queries; kv: (B, S, Dkv) keys/values source; bias: (B, 1, 1, S) or None -> (B, L, D)
        return multihead_attention(
            self.query(x),
            self.key(kv),
            self.value(kv),
            self.heads,
            self.scale,
            bias,
            self.attention_backend,
            self.dropout.p,
            self.training,
        )


class AttentionOutput(nn.Module):
    """dense -> dropout. The LayerNorm is owned here (for the official key name) but applied by the layer."""

    def __init__(self, cfg: TextConfig, with_layer_norm: bool) -> None:
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        if with_layer_norm:
            self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.dense(x))


class Attention(nn.Module):
    def __init__(self, cfg: TextConfig, kv_width: int, with_layer_norm: bool) -> None:
        super().__init__()
        self.self = MultiHeadAttention(cfg, kv_width)
        self.output = AttentionOutput(cfg, with_layer_norm)

    def forward(self, x: torch.Tensor, kv: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return self.output(self.self(x, kv, bias))


class Intermediate(nn.Module):
    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.act = activation(cfg.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.dense(x))


class Output(nn.Module):
    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(x)) + residual)


class TextLayer(nn.Module):
    def __init__(self, cfg: TextConfig, video_width: int | None) -> None:
        super().__init__()
        self.attention = Attention(cfg, cfg.hidden_size, with_layer_norm=True)
        self.has_cross = video_width is not None
        if self.has_cross:
            self.crossattention_t2i = Attention(cfg, video_width, with_layer_norm=False)
            self.alpha_t2i = nn.Parameter(torch.zeros(1))  # plain scalar gate, no tanh (as the official checkpoints)
        self.intermediate = Intermediate(cfg)
        self.output = Output(cfg)
        self.attention_backend = "reference"  # set by EgoVLPv2.set_attention_backend

    def forward(self, x: torch.Tensor, bias: torch.Tensor, video: torch.Tensor | None = None) -> torch.Tensor:
        # x: (B, L, D); bias: (B, 1, 1, L); video: (B, T, Dv) raw residual stream, or None in dual mode
        a = self.attention(x, x, bias)
        if video is not None:
            if not self.has_cross:
                raise RuntimeError("video states were passed to a text layer without cross-attention")
            # unmasked, query = a: the official layer's order
            a = gated_residual(a, self.alpha_t2i, self.crossattention_t2i(a, video), self.attention_backend)
        a = self.attention.output.LayerNorm(a + x)
        return self.output(self.intermediate(a), a)


class Encoder(nn.Module):
    def __init__(self, cfg: TextConfig, num_fuse_blocks: int, video_width: int) -> None:
        super().__init__()
        first_fused = cfg.num_hidden_layers - num_fuse_blocks
        self.layer = nn.ModuleList(
            [TextLayer(cfg, video_width if i >= first_fused else None) for i in range(cfg.num_hidden_layers)]
        )
        self.first_fused = first_fused


# The std of RoBERTa's initial weights: `initializer_range` in every RoBERTa config (roberta-base included).
INITIALIZER_RANGE = 0.02


class RobertaTextModel(nn.Module):
    def __init__(self, cfg: TextConfig, num_fuse_blocks: int, video_width: int) -> None:
        """`cfg`: the sizes (egovlp_deploy.config.TextConfig, or anything with the same attributes)."""
        super().__init__()
        self.config = cfg
        self.embeddings = Embeddings(cfg)
        self.encoder = Encoder(cfg, num_fuse_blocks, video_width)
        self.gradient_checkpointing = False
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # HF RobertaPreTrainedModel._init_weights: N(0, initializer_range) weights, zero bias, LN 1/0, pad row 0.
        std = INITIALIZER_RANGE
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=std)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
            if isinstance(m, nn.Embedding) and m.padding_idx is not None:
                with torch.no_grad():
                    m.weight[m.padding_idx].zero_()
            if isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, input_ids: torch.Tensor, attention_bias: torch.Tensor) -> torch.Tensor:
        """Dual mode: the last hidden states (B, L, D); no cross-attention runs."""
        x = self.embeddings(input_ids)
        for layer in self.encoder.layer:
            x = run_layer(layer, x, attention_bias, checkpoint=self.gradient_checkpointing)
        return x
