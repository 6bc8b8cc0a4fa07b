"""Typed model configuration for EgoVLPv2, stored as JSON beside every checkpoint.

Sizes follow the official code (model/model.py, video_transformer.py and the RoBERTa config it loads). Loading a config
is strict: an unknown or missing key, or a value of the wrong kind, raises `ConfigError` naming the key, so a typo never
silently falls back to a default. Every field also has a declared range (`validate`): finite, positive where a size,
within a ceiling (`LIMITS`), in a set where a name. An out-of-range value raises `ConfigError` naming the key, the value
and the allowed range before any module is built, so a bad `config.json` costs milliseconds and never a large
allocation.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .activations import ACTIVATION_NAMES
from .jsonfile import read_json

PROJECTIONS = ("big", "small")
# How the attention cores run (model/attention.py): "reference" is the official math in plain torch, "sdpa" torch's
# scaled_dot_product_attention with the official rearranges, "triton" the fused kernels (forward only; training
# falls back to "reference"), "auto" = "triton" on CUDA, "reference" elsewhere, "tuned" = per call shape the fastest
# of those measured on this device (model/attention_plan.py).
ATTENTION_BACKENDS = ("auto", "reference", "sdpa", "triton", "tuned")


class ConfigError(ValueError):
    """A configuration is malformed or inconsistent."""


# Ceilings on the sizes a config may ask for, far above every released model (ViT-B/16, roberta-base, 16 frames) and
# low enough that a config never asks for unbounded memory or time. "params" bounds the estimated parameter count of
# the whole model (`estimated_parameters`; the paper's model has about 0.4e9). Raise one for an experiment with the
# environment variable EGOVLP_MAX_<NAME> (EGOVLP_MAX_FRAMES=1024) or by assigning to LIMITS in Python.
DEFAULT_LIMITS = {
    "frames": 512,  # video.num_frames (the paper evaluates at 16)
    "img_size": 2048,  # video.img_size
    "video_tokens": 65_536,  # 1 + num_frames * patches per frame: the attention sequence of the video tower
    "depth": 128,  # video.depth, text.num_hidden_layers
    "width": 16_384,  # video.width, text.hidden_size, projection_dim, video.in_chans
    "mlp_width": 65_536,  # video.width * mlp_ratio, text.intermediate_size
    "heads": 256,  # video.heads, text.num_attention_heads
    "vocab_size": 1_000_000,  # text.vocab_size, text.type_vocab_size
    "positions": 65_536,  # text.max_position_embeddings
    "params": 8_000_000_000,  # estimated_parameters(config): 32 GB of float32 weights
}


def _limits_from_environment() -> dict[str, int]:
    limits = dict(DEFAULT_LIMITS)
    for name in limits:
        value = os.environ.get(f"EGOVLP_MAX_{name.upper()}")
        if value is not None:
            try:
                limits[name] = int(value)
            except ValueError:
                raise ConfigError(f"EGOVLP_MAX_{name.upper()} must be an integer, got {value!r}") from None
    return limits


LIMITS = _limits_from_environment()


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
    layer_norm_eps: float = 1e-5  # not ViT's 1e-6: the official norm_layer default is nn.LayerNorm
    # Frozen-in-Time's `time_init`: "zeros" (official) zeroes the temporal attention's qkv so it starts as a no-op
    # on top of an image ViT. From random weights that is a saddle: with q = k = 0 the query and key weights get
    # exactly zero gradient, the temporal attention stays a uniform average over frames, and the model is blind to
    # frame order (which EgoMCQ's intra-video questions test). "rand" keeps the default Linear init there and gives
    # the temporal embedding the spatial one's trunc-normal(0.02) init: a zero temporal embedding makes the whole
    # network invariant to the order of the frames, so a clip and its time reversal (picks up / puts down) look the
    # same to it.
    time_init: str = "zeros"
    # Std of a trunc-normal(-2 std, 2 std) init of the temporal embedding, drawn after every other init of a new
    # model (0: keep time_init's). Zeros suit a pretrained image tower; from random weights a temporal embedding at
    # about the patch tokens' scale (0.5) lets the frame-order features form early (TRAINING_LOG.md).
    temporal_embed_std: float = 0.0

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
    fusion_layer_norm_eps: float = 1e-6  # FrozenInTime.norm, the fusion-mode final norm
    mlm_layer_norm_eps: float = 1e-12  # RobertaConfig's default, used by the MLM head transform
    attention_backend: str = "auto"  # one of ATTENTION_BACKENDS; switch at run time with model.set_attention_backend
    # Start value of every cross-attention gate (alpha_i2t, alpha_t2i) of a new model. The official 0 suits
    # pretrained towers; from random towers a zero gate keeps each fused layer blind to the other modality, and its
    # cross-attention weights without gradient, until the gate itself grows.
    cross_gate_init: float = 0.0

    def __post_init__(self):
        self.validate()

    # -- constructors -------------------------------------------------------------------------------------------
    @classmethod
    def base(cls, num_frames: int = 4, projection: str = "big") -> EgoVLPv2Config:
        """The paper's model (ViT-B/16 video tower, roberta-base text tower, fusion in the top 6 layers)."""
        return cls(
            video=VideoConfig(num_frames=num_frames),
            text=TextConfig(),
            num_fuse_blocks=6,
            projection=projection,
            projection_dim=4096 if projection == "big" else 256,
        )

    @classmethod
    def tiny(cls, num_frames: int = 4, vocab_size: int = 1000) -> EgoVLPv2Config:
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

    def with_num_frames(self, num_frames: int) -> EgoVLPv2Config:
        return dataclasses.replace(self, video=dataclasses.replace(self.video, num_frames=num_frames))

    # -- checks -------------------------------------------------------------------------------------------------
    def validate(self) -> None:
        """Raise ConfigError naming the key, the value and the allowed range for the first field out of range."""
        v, t, top = self.video, self.text, LIMITS
        if not isinstance(v, VideoConfig) or not isinstance(t, TextConfig):
            raise ConfigError(
                f"video and text must be a VideoConfig and a TextConfig, got {type(v).__name__} and {type(t).__name__}"
            )
        _int_in("video.img_size", v.img_size, 1, top["img_size"])
        _int_in("video.patch_size", v.patch_size, 1, v.img_size)
        if v.img_size % v.patch_size:
            raise ConfigError(f"video.img_size {v.img_size} is not a multiple of video.patch_size {v.patch_size}")
        _int_in("video.in_chans", v.in_chans, 1, top["width"])
        check_num_frames(v.num_frames, "video.num_frames")
        if v.num_tokens > top["video_tokens"]:
            raise ConfigError(
                f"video.num_frames {v.num_frames} x {v.patches_per_frame} patches per frame gives "
                f"{v.num_tokens} video tokens, above the ceiling {top['video_tokens']} "
                f"(EGOVLP_MAX_VIDEO_TOKENS)"
            )
        _int_in("video.width", v.width, 1, top["width"])
        _int_in("video.depth", v.depth, 1, top["depth"])
        _int_in("video.heads", v.heads, 1, min(v.width, top["heads"]))
        if v.width % v.heads:
            raise ConfigError(f"video.width {v.width} is not divisible by video.heads {v.heads}")
        _float_in("video.mlp_ratio", v.mlp_ratio, 0.0, float(top["mlp_width"]), low_open=True)
        if not 1 <= int(v.width * v.mlp_ratio) <= top["mlp_width"]:
            raise ConfigError(
                f"video.mlp_ratio {v.mlp_ratio!r} gives an MLP of int(width * mlp_ratio) = "
                f"{int(v.width * v.mlp_ratio)} channels; allowed: [1, {top['mlp_width']}]"
            )
        _float_in("video.layer_norm_eps", v.layer_norm_eps, *EPS_RANGE)
        _choice("video.time_init", v.time_init, TIME_INITS)
        _float_in("video.temporal_embed_std", v.temporal_embed_std, 0.0, 10.0)

        _int_in("text.vocab_size", t.vocab_size, 1, top["vocab_size"])
        _int_in("text.hidden_size", t.hidden_size, 1, top["width"])
        _int_in("text.num_hidden_layers", t.num_hidden_layers, 1, top["depth"])
        _int_in("text.num_attention_heads", t.num_attention_heads, 1, min(t.hidden_size, top["heads"]))
        if t.hidden_size % t.num_attention_heads:
            raise ConfigError(
                f"text.hidden_size {t.hidden_size} is not divisible by text.num_attention_heads {t.num_attention_heads}"
            )
        _int_in("text.intermediate_size", t.intermediate_size, 1, top["mlp_width"])
        _int_in("text.max_position_embeddings", t.max_position_embeddings, 1, top["positions"])
        _int_in("text.type_vocab_size", t.type_vocab_size, 1, top["vocab_size"])
        _float_in("text.layer_norm_eps", t.layer_norm_eps, *EPS_RANGE)
        for name in ("pad_token_id", "bos_token_id", "eos_token_id"):  # rows of the word embedding
            _int_in(f"text.{name}", getattr(t, name), 0, t.vocab_size - 1)
        if t.max_text_length < 2:
            raise ConfigError(
                f"text.max_position_embeddings {t.max_position_embeddings} leaves no room for <s> </s> "
                f"(positions start at text.pad_token_id + 1 = {t.pad_token_id + 1})"
            )
        _float_in("text.hidden_dropout_prob", t.hidden_dropout_prob, 0.0, 1.0, high_open=True)
        _float_in("text.attention_probs_dropout_prob", t.attention_probs_dropout_prob, 0.0, 1.0, high_open=True)
        _choice("text.hidden_act", t.hidden_act, ACTIVATION_NAMES)

        _int_in("num_fuse_blocks", self.num_fuse_blocks, 0, min(v.depth, t.num_hidden_layers))
        _choice("projection", self.projection, PROJECTIONS)
        _int_in("projection_dim", self.projection_dim, 1, top["width"])
        _float_in("fusion_layer_norm_eps", self.fusion_layer_norm_eps, *EPS_RANGE)
        _float_in("mlm_layer_norm_eps", self.mlm_layer_norm_eps, *EPS_RANGE)
        check_attention_backend(self.attention_backend)
        _float_in("cross_gate_init", self.cross_gate_init, -10.0, 10.0)
        params = estimated_parameters(self)
        if params > top["params"]:
            raise ConfigError(
                f"the config describes a model of about {params:.3g} parameters, above the ceiling "
                f"{top['params']:.3g} (EGOVLP_MAX_PARAMS)"
            )

    # -- (de)serialisation --------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EgoVLPv2Config:
        if not isinstance(data, dict):
            raise ConfigError(f"a model config must be a JSON object, got {type(data).__name__}")
        # Configs written before a field existed leave it out: it takes its default.
        data = {**_LATER_FIELDS, **data}
        top = strict_fields(cls, data, "config", nested={"video", "text"})
        video = data["video"]
        if isinstance(video, dict):
            video = {**_LATER_VIDEO_FIELDS, **video}
        return cls(
            video=VideoConfig(**strict_fields(VideoConfig, video, "video")),
            text=TextConfig(**strict_fields(TextConfig, data["text"], "text")),
            **top,
        )

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def digest(self) -> str:
        """sha256 of every setting that shapes the model's outputs: all of them but `attention_backend`, which picks
        an implementation of the same function (a user may switch it in config.json). Key order and layout of the
        JSON do not count, and neither do fields a config written before they existed leaves at their default."""
        settings = {k: v for k, v in self.to_dict().items() if k != "attention_backend"}
        return hashlib.sha256(json.dumps(settings, sort_keys=True, separators=(",", ":")).encode()).hexdigest()

    @classmethod
    def from_json_file(cls, path: str | Path) -> EgoVLPv2Config:
        return cls.from_dict(read_json(path, ConfigError, expect=dict))


TIME_INITS = ("zeros", "rand")
_LATER_FIELDS = {"attention_backend": "auto", "cross_gate_init": 0.0}
_LATER_VIDEO_FIELDS = {"time_init": "zeros", "temporal_embed_std": 0.0}
# LayerNorm eps: positive and representable in float16 and float32 (1e-12 is RoBERTa's MLM default); at most 1.
EPS_RANGE = (1e-12, 1.0)


def check_attention_backend(name: Any) -> str:
    _choice("attention_backend", name, ATTENTION_BACKENDS)
    return name


def check_num_frames(value: Any, name: str = "num_frames") -> int:
    """`value` if it is a frame count in [1, LIMITS['frames']], else ConfigError (before any tensor is sized by it)."""
    _int_in(name, value, 1, LIMITS["frames"], hint="EGOVLP_MAX_FRAMES")
    return value


def _int_in(name: str, value: Any, low: int, high: int, hint: str | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ConfigError(
            f"{name} must be an integer in [{low}, {high}], got {value!r:.80}"
            + (f" (ceiling: {hint})" if hint and isinstance(value, int) and value > high else "")
        )


def _float_in(name: str, value: Any, low: float, high: float, low_open: bool = False, high_open: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (low < value if low_open else low <= value) and (value < high if high_open else value <= high)
    if not ok:
        bounds = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise ConfigError(f"{name} must be a finite number in {bounds}, got {value!r:.80}")


def _choice(name: str, value: Any, options: tuple[str, ...]) -> None:
    if not isinstance(value, str) or value not in options:
        raise ConfigError(f"{name} must be one of {options}, got {value!r:.80}")


def estimated_parameters(config: EgoVLPv2Config) -> int:
    """The parameter count of `EgoVLPv2(config)` to within a few percent, from the sizes alone (no module built)."""
    v, t = config.video, config.text
    w, h, d, fused = v.width, t.hidden_size, config.projection_dim, config.num_fuse_blocks
    mlp = int(w * v.mlp_ratio)
    video = (
        v.in_chans * v.patch_size**2 * w
        + (1 + v.patches_per_frame + v.num_frames) * w
        + v.depth * (8 * w * w + 2 * w * mlp)
        + fused * (2 * h * w + 2 * w * w)
    )
    text = (
        (t.vocab_size + t.max_position_embeddings + t.type_vocab_size) * h
        + t.num_hidden_layers * (4 * h * h + 2 * h * t.intermediate_size)
        + fused * (2 * h * h + 2 * w * h)
    )
    proj = (h + w) * d + (4 * d * d if config.projection == "big" else 0)
    heads = 4 * h * h + w * h + h * t.vocab_size
    return video + text + proj + heads


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


def strict_fields(
    klass, data: Any, where: str, nested: set[str] = frozenset(), allow_missing: bool = False
) -> dict[str, Any]:
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
        try:
            out[name] = float(value) if str(f.type) == "float" else value
        except OverflowError:  # a JSON integer beyond float range
            raise ConfigError(
                f"{where}.{name} must be a finite number, got an integer of {len(str(value))} digits"
            ) from None
    return out
