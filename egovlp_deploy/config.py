"""Typed model configuration for EgoVLPv2, stored as JSON beside every checkpoint.

Sizes follow the official code (EGOVLPV2_SPEC.md §1-§4). Loading a config is strict: an unknown or missing key,
or a value of the wrong kind, raises `ConfigError` naming the key, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .activations import ACTIVATION_NAMES
from .jsonfile import read_json

PROJECTIONS = ("big", "small")
# How the attention cores run (model/attention.py): "reference" is the official math in plain torch, "sdpa" torch's
# scaled_dot_product_attention with the official rearranges, "triton" the fused kernels (forward only; training
# falls back to "reference"), "auto" = "triton" on CUDA, "reference" elsewhere.
ATTENTION_BACKENDS = ("auto", "reference", "sdpa", "triton")


class ConfigError(ValueError):
    """A configuration is malformed or inconsistent."""


@dataclass
class VideoConfig:
    """The Frozen-in-Time SpaceTimeTransformer (divided space-time attention, one clip-level CLS)."""

    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    num_frames: int = 4  # the pos table is built for exactly this many frames (official VideoPatchEmbed asserts it)
    width: int = 768
    depth: int = 12
    heads: int = 12
    mlp_ratio: float = 4.0
    layer_norm_eps: float = 1e-5  # not ViT's 1e-6: the official norm_layer default is nn.LayerNorm (hazard 8)
    # Frozen-in-Time's `time_init`: "zeros" (official) zeroes the temporal attention's qkv so it starts as a no-op
    # on top of an image ViT. From random weights that is a saddle: with q = k = 0 the query and key weights get
    # exactly zero gradient, the temporal attention stays a uniform average over frames, and the model is blind to
    # frame order (the EgoMCQ intra-video hazard). "rand" keeps the default Linear init there and gives the
    # temporal embedding the spatial one's trunc-normal(0.02) init: a zero temporal embedding makes the whole
    # network invariant to the order of the frames (measured: the tiny recipe's intra-video errors were all
    # time-reversed pairs such as picks up / puts down).
    time_init: str = "zeros"

    @property
    def patches_per_frame(self) -> int:
        return (self.img_size // self.patch_size) ** 2

    @property
    def num_tokens(self) -> int:
        return 1 + self.num_frames * self.patches_per_frame


@dataclass
class TextConfig:
    """RoBERTa sizes; `to_roberta_config()` gives the matching `transformers.RobertaConfig`."""

    vocab_size: int = 50265
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 514
    type_vocab_size: int = 1
    layer_norm_eps: float = 1e-5
    pad_token_id: int = 1
    bos_token_id: int = 0
    eos_token_id: int = 2
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    hidden_act: str = "gelu"

    @property
    def max_text_length(self) -> int:
        # fairseq position ids start at pad_token_id + 1, so the table holds pad_token_id + 1 fewer tokens.
        return self.max_position_embeddings - self.pad_token_id - 1

    def to_roberta_config(self):
        from transformers import RobertaConfig

        return RobertaConfig(**dataclasses.asdict(self))


@dataclass
class EgoVLPv2Config:
    """The whole model: both towers, the fusion depth and the heads."""

    video: VideoConfig = field(default_factory=VideoConfig)
    text: TextConfig = field(default_factory=TextConfig)
    num_fuse_blocks: int = 6  # top layers of BOTH towers that carry gated cross-attention
    projection: str = "big"  # "big": 768-4096-4096-4096 MLP (EgoVLPv2.pth); "small": 256 linear (smallproj)
    projection_dim: int = 4096
    fusion_layer_norm_eps: float = 1e-6  # FrozenInTime.norm, the fusion-mode final norm (hazard 1)
    mlm_layer_norm_eps: float = 1e-12  # RobertaConfig's default, used by the MLM head transform (hazard 8)
    attention_backend: str = "auto"  # one of ATTENTION_BACKENDS; switch at run time with model.set_attention_backend

    def __post_init__(self):
        self.validate()

    # -- constructors -------------------------------------------------------------------------------------------
    @classmethod
    def base(cls, num_frames: int = 4, projection: str = "big") -> "EgoVLPv2Config":
        """The paper's model (ViT-B/16 video tower, roberta-base text tower, fusion in the top 6 layers)."""
        return cls(
            video=VideoConfig(num_frames=num_frames),
            text=TextConfig(),
            num_fuse_blocks=6,
            projection=projection,
            projection_dim=4096 if projection == "big" else 256,
        )

    @classmethod
    def tiny(cls, num_frames: int = 4, vocab_size: int = 1000) -> "EgoVLPv2Config":
        """A small model for CPU tests and the demo: 32 px frames, width 64, 4 layers, fusion in the top half."""
        return cls(
            video=VideoConfig(img_size=32, patch_size=8, num_frames=num_frames, width=64, depth=4, heads=4),
            text=TextConfig(
                vocab_size=vocab_size,
                hidden_size=64,
                num_hidden_layers=4,
                num_attention_heads=4,
                intermediate_size=256,
                max_position_embeddings=66,
            ),
            num_fuse_blocks=2,
            projection="big",
            projection_dim=128,
        )

    def with_num_frames(self, num_frames: int) -> "EgoVLPv2Config":
        return dataclasses.replace(self, video=dataclasses.replace(self.video, num_frames=num_frames))

    # -- checks -------------------------------------------------------------------------------------------------
    def validate(self) -> None:
        v, t = self.video, self.text
        positive = {
            "video.img_size": v.img_size, "video.patch_size": v.patch_size, "video.in_chans": v.in_chans,
            "video.num_frames": v.num_frames, "video.width": v.width, "video.depth": v.depth,
            "video.heads": v.heads, "text.vocab_size": t.vocab_size, "text.hidden_size": t.hidden_size,
            "text.num_hidden_layers": t.num_hidden_layers, "text.num_attention_heads": t.num_attention_heads,
            "text.intermediate_size": t.intermediate_size, "projection_dim": self.projection_dim,
        }
        for name, value in positive.items():
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if v.img_size % v.patch_size:
            raise ConfigError(f"video.img_size {v.img_size} is not a multiple of video.patch_size {v.patch_size}")
        if v.width % v.heads:
            raise ConfigError(f"video.width {v.width} is not divisible by video.heads {v.heads}")
        if t.hidden_size % t.num_attention_heads:
            raise ConfigError(
                f"text.hidden_size {t.hidden_size} is not divisible by text.num_attention_heads {t.num_attention_heads}"
            )
        if t.max_text_length < 2:
            raise ConfigError(f"text.max_position_embeddings {t.max_position_embeddings} leaves no room for <s> </s>")
        if not 0 <= self.num_fuse_blocks <= min(v.depth, t.num_hidden_layers):
            raise ConfigError(
                f"num_fuse_blocks {self.num_fuse_blocks} must be in [0, min(video.depth, text.num_hidden_layers)]"
            )
        if self.projection not in PROJECTIONS:
            raise ConfigError(f"projection must be one of {PROJECTIONS}, got {self.projection!r}")
        check_attention_backend(self.attention_backend)
        if t.hidden_act not in ACTIVATION_NAMES:
            raise ConfigError(f"text.hidden_act must be one of {ACTIVATION_NAMES}, got {t.hidden_act!r}")
        if v.time_init not in TIME_INITS:
            raise ConfigError(f"video.time_init must be one of {TIME_INITS}, got {v.time_init!r}")

    # -- (de)serialisation --------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "EgoVLPv2Config":
        if not isinstance(data, dict):
            raise ConfigError(f"a model config must be a JSON object, got {type(data).__name__}")
        if "attention_backend" not in data:  # configs written before the field existed
            data = {**data, "attention_backend": "auto"}
        top = strict_fields(cls, data, "config", nested={"video", "text"})
        video = data["video"]
        if isinstance(video, dict) and "time_init" not in video:  # configs written before the field existed
            video = {**video, "time_init": "zeros"}
        return cls(
            video=VideoConfig(**strict_fields(VideoConfig, video, "video")),
            text=TextConfig(**strict_fields(TextConfig, data["text"], "text")),
            **top,
        )

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json_file(cls, path: str | Path) -> "EgoVLPv2Config":
        return cls.from_dict(read_json(path, ConfigError, expect=dict))


TIME_INITS = ("zeros", "rand")


def check_attention_backend(name: Any) -> str:
    if name not in ATTENTION_BACKENDS:
        raise ConfigError(f"attention_backend must be one of {ATTENTION_BACKENDS}, got {name!r}")
    return name


_KINDS = {"int": (int,), "float": (int, float), "str": (str,), "bool": (bool,)}


def _fits(value: Any, annotation: str) -> bool:
    """Does `value` (from JSON) fit a simple annotation such as 'int', 'float | None', 'bool', 'list[int]'?"""
    for option in (a.strip() for a in annotation.split("|")):
        if option == "None" and value is None:
            return True
        kinds = _KINDS.get(option)
        if kinds is not None and isinstance(value, kinds) and (option == "bool" or not isinstance(value, bool)):
            return True
        if option.startswith("list") and isinstance(value, list):
            return True
    return annotation not in _KINDS and not any(o.strip() in _KINDS for o in annotation.split("|"))


def strict_fields(klass, data: Any, where: str, nested: set[str] = frozenset(),
                  allow_missing: bool = False) -> dict[str, Any]:
    """Check `data` has only the dataclass's fields (all of them unless `allow_missing`), each with a value of the
    declared kind; return the flat (non-nested) ones."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a JSON object, got {type(data).__name__}")
    names = {f.name: f for f in dataclasses.fields(klass)}
    unknown = sorted(set(data) - set(names))
    missing = sorted(set(names) - set(data))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}")
    if missing and not allow_missing:
        raise ConfigError(f"{where}: missing key(s) {missing}")
    out = {}
    for name, f in names.items():
        if name in nested or name not in data:
            continue
        value = data[name]
        if not _fits(value, str(f.type)):
            raise ConfigError(f"{where}.{name} must be {f.type}, got {value!r}")
        out[name] = float(value) if str(f.type) == "float" else value
    return out
