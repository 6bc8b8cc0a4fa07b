"""Anything -> EgoVLPv2: the one place a model is made, for the trainer, the exporters, the runtime's torch backend
and the command line.

A model comes from
- a preset ("tiny", "base") or a model config.json, new, with the config's from-scratch init options, its towers
  optionally filled from pretrained files (an image ViT-B/16, a Hugging Face roberta-base folder);
- an official `.pth` (read without executing pickled code);
- a `save_pretrained` directory, a trainer checkpoint `step_N/` (verified against its MANIFEST.json) or a trainer
  run directory (its newest checkpoint that verifies); the `model.safetensors` of either stands for its folder;
- `random:tiny` / `random:base`: seeded random weights, for benchmarks and smoke tests.
Any of them at another frame count: the temporal embedding is resized by the official rule.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch

from ..checkpoint import (
    MANIFEST,
    CheckpointError,
    checkpoint_hashes,
    is_safetensors_file,
    latest_valid_checkpoint,
    resize_temporal_embed,
    verify_checkpoint,
)
from ..config import ConfigError, EgoVLPv2Config, check_num_frames
from ..hashing import sha256_tree
from .egovlp import CONFIG_FILE, WEIGHTS_FILE, EgoVLPv2

PRESETS = ("tiny", "base")
RANDOM_PREFIX = "random:"


def preset_config(
    name: str,
    num_frames: int = 4,
    *,
    vocab_size: int | None = None,
    projection: str = "big",
    **video_options: int | float | str | None,
) -> EgoVLPv2Config:
    """The preset's config at `num_frames`; `video_options` replace VideoConfig fields (img_size, patch_size,
    time_init, temporal_embed_std; None keeps the preset's). `vocab_size` sizes the tiny preset's vocabulary
    (at least 1000); the base model keeps roberta-base's and takes `projection` ("big" or "small")."""
    if name not in PRESETS:
        raise ConfigError(f"unknown model preset {name!r}; choose from {list(PRESETS)}")
    if name == "tiny":
        config = EgoVLPv2Config.tiny(num_frames=num_frames, vocab_size=max(vocab_size or 0, 1000))
    else:
        config = EgoVLPv2Config.base(num_frames=num_frames, projection=projection)
    options = {k: v for k, v in video_options.items() if v is not None}
    if options:
        try:
            config = dataclasses.replace(config, video=dataclasses.replace(config.video, **options))
            config.validate()
        except TypeError as exc:
            raise ConfigError(f"unknown video option in {sorted(options)}") from exc
    return config


def new_model(
    config: EgoVLPv2Config, init_video: str | os.PathLike | None = None, init_text: str | os.PathLike | None = None
) -> tuple[EgoVLPv2, list]:
    """A new model of `config` (its init options applied), then, as the official pre-training starts, the video
    tower's spatial layers from an image ViT-B/16 file and the text tower from a roberta-base folder. Returns the
    model (train mode) and the fill reports of the towers filled."""
    model = EgoVLPv2(config)
    reports = []
    if init_video or init_text:
        from ..pretrained_init import init_text_tower, init_video_tower

        for path, fill in ((init_video, init_video_tower), (init_text, init_text_tower)):
            if path:
                reports.append(fill(model, path))
    return model.train(), reports


def model_at_frames(model: EgoVLPv2, num_frames: int) -> EgoVLPv2:
    """The same weights with the temporal embedding resized to `num_frames` by the official rule, on the model's
    device and in its dtype (eval mode; the model itself when it already has that many frames)."""
    if num_frames == model.config.video.num_frames:
        return model
    state = dict(model.state_dict())
    state["video_model.temporal_embed"] = resize_temporal_embed(state["video_model.temporal_embed"], num_frames)
    # load_state_dict copies into the new model's own parameters: built in fp32, a half model would come back fp32
    other = EgoVLPv2(model.config.with_num_frames(num_frames)).to(model.cls_token.device, model.cls_token.dtype)
    other.load_state_dict(state)
    return other.eval()


def checkpoint_kind(path: Path) -> str:
    """'run' (a trainer run directory), 'trainer' (a step_N checkpoint), 'pretrained' (a save_pretrained
    directory) or 'official' (a file: an official .pth)."""
    if not path.is_dir():
        return "official"
    if (path / "checkpoints").is_dir():
        return "run"
    return "trainer" if (path / MANIFEST).is_file() else "pretrained"


def _folder_of_weights(path: Path) -> Path:
    """The folder a `model.safetensors` named on its own belongs to (its config.json is beside it): the model is the
    folder, which `save_pretrained` and the trainer write whole."""
    if path.name == WEIGHTS_FILE and (path.parent / CONFIG_FILE).is_file():
        return path.parent
    raise CheckpointError(
        f"{path}: a safetensors weights file without its folder ({CONFIG_FILE} beside a {WEIGHTS_FILE}); give the "
        "folder save_pretrained or the trainer wrote, or an official .pth"
    )


def load_model(source: str | os.PathLike, frames: int | None = None) -> tuple[EgoVLPv2, dict]:
    """(model in eval mode, source info {path, kind, sha256}) from any source the module docstring lists, at
    `frames` frames per clip (None: the checkpoint's own; 4 for random weights). Raises CheckpointError for an
    unusable checkpoint, FileNotFoundError for a missing path, ConfigError for an unknown random preset or a frame
    count outside [1, LIMITS['frames']]."""
    if frames is not None:
        check_num_frames(frames)  # 0 is refused here, not taken for "the checkpoint's own"
    text = os.fspath(source)
    if text.startswith(RANDOM_PREFIX):
        name = text[len(RANDOM_PREFIX) :]
        if name not in PRESETS:
            raise ConfigError(f"random checkpoints are 'random:tiny' or 'random:base', got {text!r}")
        torch.manual_seed(0)
        return EgoVLPv2(preset_config(name, frames or 4)).eval(), {"path": text, "kind": "random", "sha256": None}
    path = Path(text)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.is_file() and is_safetensors_file(path):
        path = _folder_of_weights(path)
    kind = checkpoint_kind(path)
    if kind == "run":
        step = latest_valid_checkpoint(path / "checkpoints")  # the newest one that verifies
        if step is None:
            raise CheckpointError(f"{path}: no valid checkpoint under checkpoints/")
        path, kind = step, "trainer"
    elif kind == "trainer":
        verify_checkpoint(path)
    known = None  # a trainer checkpoint's files are read once: verified, their hashes then taken from its manifest
    if kind == "official":
        model = EgoVLPv2.from_official_checkpoint(path, num_frames=frames)
    else:
        model = EgoVLPv2.from_pretrained(path, verified=kind == "trainer")
        if kind == "trainer":
            known = checkpoint_hashes(path)
        if frames:
            model = model_at_frames(model, frames)
    # absolute: the info travels into manifests read from wherever their folder ends up
    return model.eval(), {"path": str(path.resolve()), "kind": kind, "sha256": sha256_tree(path, known=known)}
