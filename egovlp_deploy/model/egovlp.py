"""EgoVLPv2: one set of weights, run as a dual encoder or as a fusion encoder.

Dual mode (`encode_video`, `encode_text`) runs each tower alone, with no cross-attention work at all.
Fusion mode (`fuse`, `mlm_logits`) runs the official `FrozenInTime.infer` path:
- the video stream starts from its own CLS token (`self.cls_token`, not `video_model.cls_token`);
- the lower layers of both towers run independently;
- in the top `num_fuse_blocks` layers the update is simultaneous: layer l of each tower attends to the other
  tower's layer l-1 output;
- the video output is `self.norm` (eps 1e-6) of the CLS, not `video_model.norm` (eps 1e-5).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..config import EgoVLPv2Config
from .attention import extended_attention_mask, run_layer
from .heads import MLMHead, Pooler, VTMHead, projections
from .text_tower import RobertaTextModel
from .video_tower import SpaceTimeTransformer

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
# The weights' header records the digest of the config they were saved with (`EgoVLPv2Config.digest`): an edited
# config.json (another eps, activation or head count) would load and silently change every output.
CONFIG_DIGEST_KEY = "egovlp.config_sha256"


class InputError(ValueError):
    """An input tensor does not fit the model (shape, dtype, length, batch)."""


@dataclass
class FusionOutput:
    video_cls: torch.Tensor  # (B, Dv) fused video CLS after the fusion norm
    text_hidden: torch.Tensor  # (B, L, Dt) fused text states
    vtm_logits: torch.Tensor  # (B, 2) video-text matching logits, class 1 = match


def _init_head(module: nn.Module) -> None:
    """The official `init_weights` for heads: N(0, 0.02) weights, zero bias, LayerNorm 1/0."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class EgoVLPv2(nn.Module):
    """The EgoVLPv2 model. Attribute names follow the official state dict (minus DDP's `module.` prefix)."""

    def __init__(self, config: EgoVLPv2Config) -> None:
        super().__init__()
        config.validate()
        self.config = config
        v, t = config.video, config.text
        self.video_model = SpaceTimeTransformer(v, config.num_fuse_blocks, text_width=t.hidden_size)
        self.text_model = RobertaTextModel(t, config.num_fuse_blocks, video_width=v.width)
        self.txt_proj, self.vid_proj = projections(config.projection, v.width, t.hidden_size, config.projection_dim)

        hidden = t.hidden_size
        self.cross_modal_text_transform = nn.Linear(hidden, hidden)
        self.cross_modal_video_transform = nn.Linear(v.width, hidden)
        self.cross_modal_text_pooler = Pooler(hidden)
        self.cross_modal_video_pooler = Pooler(hidden)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, v.width))  # fusion-mode video CLS, zero-initialised
        self.norm = nn.LayerNorm(v.width, eps=config.fusion_layer_norm_eps)  # fusion-mode video final norm
        self.mlm_score = MLMHead(hidden, t.vocab_size, t.hidden_act, config.mlm_layer_norm_eps)
        self.itm_score = VTMHead(2 * hidden)
        for head in (
            self.cross_modal_text_transform,
            self.cross_modal_video_transform,
            self.cross_modal_text_pooler,
            self.cross_modal_video_pooler,
            self.mlm_score,
            self.itm_score,
        ):
            _init_head(head)
        self.set_attention_backend(config.attention_backend)
        self._apply_init_options()

    def _apply_init_options(self) -> None:
        """The config's from-scratch init options, applied last (after every default init): the temporal
        embedding's trunc-normal std and the cross-attention gates' start value."""
        std = self.config.video.temporal_embed_std
        if std:
            nn.init.trunc_normal_(self.video_model.temporal_embed, std=std, a=-2 * std, b=2 * std)
        if self.config.cross_gate_init:
            with torch.no_grad():
                for name, param in self.named_parameters():
                    if name.endswith(("alpha_i2t", "alpha_t2i")):
                        param.fill_(self.config.cross_gate_init)

    # -- attention backend --------------------------------------------------------------------------------------
    @property
    def attention_backend(self) -> str:
        return self.config.attention_backend

    def set_attention_backend(self, name: str) -> EgoVLPv2:
        """Choose how every attention core runs: 'auto', 'reference', 'sdpa', 'triton' or 'tuned' (per shape, from a
        measured plan; see model/attention.py and model/attention_plan.py). Takes effect on the next forward; stored
        in the config, so `save_pretrained` keeps it."""
        from ..config import check_attention_backend

        check_attention_backend(name)
        self.config.attention_backend = name
        for module in self.modules():
            if hasattr(module, "attention_backend") and module is not self:
                module.attention_backend = name
        return self

    @property
    def gradient_checkpointing(self) -> bool:
        return self.video_model.gradient_checkpointing

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, enabled: bool) -> None:
        """Recompute layer activations in backward (official `use_checkpoint`): less memory, ~30% more compute."""
        self.video_model.gradient_checkpointing = bool(enabled)
        self.text_model.gradient_checkpointing = bool(enabled)

    # -- input checks -------------------------------------------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        return self.cls_token.dtype

    def _check_video(self, video: torch.Tensor) -> None:
        v = self.config.video
        if not isinstance(video, torch.Tensor):
            raise InputError(f"video must be a torch.Tensor, got {type(video).__name__}")
        if video.dim() != 5:
            raise InputError(f"video must be (B, F, C, H, W), got shape {tuple(video.shape)}")
        B, F, C, H, W = video.shape
        if B == 0:
            raise InputError("video batch is empty")
        if not video.is_floating_point():
            raise InputError(f"video must be a floating-point tensor, got dtype {video.dtype}")
        if video.dtype != self.dtype and not torch.is_autocast_enabled(video.device.type):
            raise InputError(f"video dtype {video.dtype} does not match the model dtype {self.dtype}")
        if F != v.num_frames:
            raise InputError(
                f"video has {F} frames but the model was built for {v.num_frames} "
                f"(load it with num_frames={F}; the temporal embedding is interpolated at load time)"
            )
        if C != v.in_chans:
            raise InputError(f"video has {C} channels, the model expects {v.in_chans}")
        if (H, W) != (v.img_size, v.img_size):
            raise InputError(f"video resolution is {H}x{W}, the model expects {v.img_size}x{v.img_size}")

    def _check_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
        t = self.config.text
        for name, x in (("input_ids", input_ids), ("attention_mask", attention_mask)):
            if not isinstance(x, torch.Tensor):
                raise InputError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if input_ids.dim() != 2 or input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
            raise InputError(f"input_ids must be a non-empty (B, L) tensor, got shape {tuple(input_ids.shape)}")
        if input_ids.is_floating_point() or input_ids.dtype == torch.bool or input_ids.is_complex():
            raise InputError(f"input_ids must be an integer tensor, got dtype {input_ids.dtype}")
        if attention_mask.shape != input_ids.shape:
            raise InputError(
                f"attention_mask shape {tuple(attention_mask.shape)} differs from input_ids {tuple(input_ids.shape)}"
            )
        if input_ids.shape[1] > t.max_text_length:
            raise InputError(
                f"text has {input_ids.shape[1]} tokens but the position table holds at most {t.max_text_length}"
            )
        lo, hi = int(input_ids.min()), int(input_ids.max())
        if lo < 0 or hi >= t.vocab_size:
            raise InputError(f"token ids must be in [0, {t.vocab_size}), got values in [{lo}, {hi}]")

    def _check_pair(self, video: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
        self._check_video(video)
        self._check_text(input_ids, attention_mask)
        if video.shape[0] != input_ids.shape[0]:
            raise InputError(f"batch sizes differ: video {video.shape[0]}, text {input_ids.shape[0]}")

    # -- dual encoder -------------------------------------------------------------------------------------------
    def encode_video(self, video: torch.Tensor, project: bool = True) -> torch.Tensor:
        """(B, F, C, H, W) normalised frames -> (B, P) embedding (official `compute_video`); (B, D) if not project."""
        self._check_video(video)
        cls = self.video_model(video)
        return self.vid_proj(cls) if project else cls

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, project: bool = True) -> torch.Tensor:
        """(B, L) ids and mask -> (B, P) embedding of `<s>` (official `compute_text`); (B, D) if not project."""
        self._check_text(input_ids, attention_mask)
        hidden = self.text_model(input_ids, extended_attention_mask(attention_mask, self.dtype))
        cls = hidden[:, 0]
        return self.txt_proj(cls) if project else cls

    # -- fusion encoder -----------------------------------------------------------------------------------------
    # The fusion encoder splits where the first fused layer begins. Below it, the video stream depends only on the
    # clip (in fusion mode: with the fusion CLS token) and the text stream only on the sentence (the same states in
    # dual and fusion mode), so both prefixes can be computed once and reused for every pairing: by the trainer's
    # MLM and VTM passes over the same clips, and by a re-ranker over cached clips (the exported fusion head).
    def fusion_video_prefix(self, video: torch.Tensor) -> torch.Tensor:
        """(B, F, C, H, W) -> (B, 1 + F*N, Dv): fusion-mode video states after the last unfused block."""
        self._check_video(video)
        vm, F, ckpt = self.video_model, self.config.video.num_frames, self.gradient_checkpointing
        v = vm.embed(video, self.cls_token)  # (B, T, Dv)
        for block in vm.blocks[: vm.first_fused]:
            v = run_layer(block, v, F, checkpoint=ckpt)
        return v

    def text_prefix(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, L) ids and mask -> (B, L, Dt): text states after the last unfused layer (same in both modes)."""
        self._check_text(input_ids, attention_mask)
        tm, ckpt = self.text_model, self.gradient_checkpointing
        bias = extended_attention_mask(attention_mask, self.dtype)  # (B, 1, 1, L)
        t = tm.embeddings(input_ids)  # (B, L, Dt)
        for layer in tm.encoder.layer[: tm.encoder.first_fused]:
            t = run_layer(layer, t, bias, checkpoint=ckpt)
        return t

    def fused_from_prefixes(
        self, video_prefix: torch.Tensor, text_prefix: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The fused top layers over the two prefixes -> (video CLS after the fusion norm (B, Dv), text (B, L, Dt))."""
        vm, tm, F = self.video_model, self.text_model, self.config.video.num_frames
        expected_t = 1 + F * (self.config.video.img_size // self.config.video.patch_size) ** 2
        if (
            video_prefix.dim() != 3
            or video_prefix.shape[1] != expected_t
            or video_prefix.shape[2] != self.config.video.width
        ):
            raise InputError(
                f"video_prefix must be (B, {expected_t}, {self.config.video.width}), got {tuple(video_prefix.shape)}"
            )
        if text_prefix.dim() != 3 or text_prefix.shape[2] != self.config.text.hidden_size:
            raise InputError(
                f"text_prefix must be (B, L, {self.config.text.hidden_size}), got {tuple(text_prefix.shape)}"
            )
        if attention_mask.shape != text_prefix.shape[:2] or video_prefix.shape[0] != text_prefix.shape[0]:
            raise InputError(
                f"batch/length mismatch: video_prefix {tuple(video_prefix.shape)}, text_prefix "
                f"{tuple(text_prefix.shape)}, attention_mask {tuple(attention_mask.shape)}"
            )
        bias = extended_attention_mask(attention_mask, self.dtype)  # (B, 1, 1, L)
        ckpt, v, t = self.gradient_checkpointing, video_prefix, text_prefix
        for block, layer in zip(vm.blocks[vm.first_fused :], tm.encoder.layer[tm.encoder.first_fused :]):
            # simultaneous update: both read the other stream's previous-layer output
            v, t = (
                run_layer(block, v, F, text=t, text_bias=bias, checkpoint=ckpt),
                run_layer(layer, t, bias, video=v, checkpoint=ckpt),
            )
        return self.norm(v)[:, 0], t

    def fused_streams(
        self, video: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The fusion-mode backbones: (video CLS after the fusion norm (B, Dv), text states (B, L, Dt))."""
        self._check_pair(video, input_ids, attention_mask)
        return self.fused_from_prefixes(
            self.fusion_video_prefix(video), self.text_prefix(input_ids, attention_mask), attention_mask
        )

    def vtm_head(self, video_cls: torch.Tensor, text_hidden: torch.Tensor) -> torch.Tensor:
        text_feat = self.cross_modal_text_pooler(self.cross_modal_text_transform(text_hidden[:, 0]))
        video_feat = self.cross_modal_video_pooler(self.cross_modal_video_transform(video_cls))
        return self.itm_score(torch.cat((text_feat, video_feat), dim=-1))  # text first: the official order

    def fuse(self, video: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> FusionOutput:
        """Fusion-encoder forward (official `infer(task_names='ITM')`)."""
        video_cls, text_hidden = self.fused_streams(video, input_ids, attention_mask)
        return FusionOutput(video_cls, text_hidden, self.vtm_head(video_cls, text_hidden))

    def mlm_logits(self, video: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, L, vocab) masked-language-model logits on fused text (official `infer(task_names='MLM')`)."""
        _, text_hidden = self.fused_streams(video, input_ids, attention_mask)
        return self.mlm_head(text_hidden)

    def mlm_head(self, text_hidden: torch.Tensor) -> torch.Tensor:
        """Fused text states (B, L, Dt) -> (B, L, vocab) MLM logits."""
        return self.mlm_score(self.cross_modal_text_transform(text_hidden))

    # -- persistence --------------------------------------------------------------------------------------------
    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write `config.json` and `model.safetensors` into `directory`, each atomically (temp file + rename)."""
        from ..checkpoint import atomic_write_bytes, save_safetensors

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        metadata = {"format": "egovlp-deploy", CONFIG_DIGEST_KEY: self.config.digest()}
        save_safetensors(self.state_dict(), directory / WEIGHTS_FILE, metadata=metadata)
        atomic_write_bytes(directory / CONFIG_FILE, self.config.to_json().encode())
        return directory

    @classmethod
    def from_pretrained(
        cls, directory: str | os.PathLike, map_location: str | torch.device = "cpu", *, verified: bool = False
    ) -> EgoVLPv2:
        """Load a directory written by `save_pretrained` (safetensors + JSON; nothing is unpickled).

        A training checkpoint (a directory with MANIFEST.json) is verified against its manifest first: every file
        listed there with its size and sha256, else CheckpointError (`verified=True`: the caller has just done so,
        e.g. with `latest_valid_checkpoint`). Elsewhere the weights file's own data digest is checked; weights that
        neither covers (written by another tool) load with a warning that corruption cannot be detected. A config.json
        that differs from the one the weights were saved with (their header records its digest) raises
        CheckpointError; only `attention_backend` may be changed there."""
        from ..checkpoint import (
            DIGEST_KEY,
            MANIFEST,
            CheckpointError,
            load_safetensors,
            safetensors_metadata,
            verify_checkpoint,
        )
        from ..config import ConfigError

        directory = Path(directory)
        for name in (CONFIG_FILE, WEIGHTS_FILE):
            if not (directory / name).is_file():
                raise CheckpointError(f"{directory}: missing {name} (not a directory written by save_pretrained)")
        manifest = (directory / MANIFEST).is_file()
        header = safetensors_metadata(directory / WEIGHTS_FILE)
        if manifest and not verified:
            verify_checkpoint(directory)
        elif DIGEST_KEY not in header:
            warnings.warn(
                f"{directory / WEIGHTS_FILE} carries no checksum and no {MANIFEST} covers it: corruption "
                "of the weights cannot be detected",
                stacklevel=2,
            )
        try:
            config = EgoVLPv2Config.from_json_file(directory / CONFIG_FILE)
        except ConfigError as exc:
            raise CheckpointError(f"{directory / CONFIG_FILE}: {exc}") from exc
        recorded = header.get(CONFIG_DIGEST_KEY)
        if recorded is not None and recorded != config.digest():
            raise CheckpointError(
                f"{directory / CONFIG_FILE} is not the config {directory / WEIGHTS_FILE} was saved with (edited? only "
                "attention_backend may be changed there): its settings would change every output; restore it, or "
                "save the model again with the config you want"
            )
        state_dict = load_safetensors(directory / WEIGHTS_FILE, map_location, check_digest=not manifest)
        return cls._from_state_dict(config, state_dict, str(directory))

    @classmethod
    def from_official_checkpoint(
        cls, path: str | os.PathLike, num_frames: int | None = None, config: EgoVLPv2Config | None = None
    ) -> EgoVLPv2:
        """Load an official `.pth` (EgoVLPv2.pth, EgoVLPv2_smallproj*.pth) without executing pickled code.

        The projection kind and sizes are read from the weights (heads of 64 channels, as in every released model,
        unless `config` is given). `num_frames` (default: the checkpoint's) rebuilds the temporal embedding by the
        official rule: truncate when fewer, bilinear (align_corners) interpolation when more.
        """
        from ..checkpoint import load_official_state_dict

        state_dict, config = load_official_state_dict(path, num_frames=num_frames, config=config)
        return cls._from_state_dict(config, state_dict, str(path))

    @classmethod
    def _from_state_dict(cls, config: EgoVLPv2Config, state_dict: dict, source: str) -> EgoVLPv2:
        """Build on the meta device and adopt the loaded tensors: no time is spent on a random init."""
        from ..checkpoint import load_state_dict_strict

        with torch.device("meta"):
            model = cls(config)
        load_state_dict_strict(model, state_dict, source, assign=True)
        return model.eval()
