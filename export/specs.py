"""What each exported artifact is: its role, its inputs and outputs, and the module that computes it.

One table (`ROLES`) declares every artifact's IO names, symbolic shapes and dtypes; the ONNX, TensorRT and
AOTInductor exporters, the validator, the manifest and the session wrapper all read it, so an IO name is written
in exactly one place.

The split follows how a device uses the model: the dual encoders index clips and sentences
cheaply; the fusion encoder splits where the first fused layer begins, so a re-ranker caches each clip's
`video_prefix` and each sentence's `text_prefix` (from the text encoder, identical in both modes) and runs only
the fused top layers (`fusion_head`) per pair. `fusion` is the whole fusion pass in one graph, for simple use.

Shape symbols: `batch` and `text_len` are dynamic; the others are fixed by the model config (`static_dims`).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

DYNAMIC_DIMS = ("batch", "text_len")
FLOAT = "float"  # a float tensor: float32 in fp32/int8 artifacts, float16 in fp16 ones
PRECISIONS = ("fp32", "fp16", "int8")
FORMATS = ("onnx", "tensorrt", "aoti", "program")


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dims: tuple[str | int, ...]  # shape symbols (see module docstring) or fixed sizes
    dtype: str  # FLOAT or a numpy dtype name ("int64")

    def shape(self, sizes: dict[str, int]) -> tuple[int, ...]:
        return tuple(d if isinstance(d, int) else sizes[d] for d in self.dims)

    def numpy_dtype(self, precision: str) -> str:
        if self.dtype != FLOAT:
            return self.dtype
        return "float16" if precision == "fp16" else "float32"


@dataclass(frozen=True)
class RoleSpec:
    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    summary: str
    # parameter-name fragments that must NOT appear in this graph (dual mode never runs cross-attention)
    forbidden_weights: tuple[str, ...] = ()

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    @property
    def uses_text(self) -> bool:
        return any("text_len" in t.dims for t in self.inputs)


_VIDEO = TensorSpec("video", ("batch", "frames", "channels", "size", "size"), FLOAT)
_IDS = TensorSpec("input_ids", ("batch", "text_len"), "int64")
_MASK = TensorSpec("attention_mask", ("batch", "text_len"), "int64")
_VIDEO_PREFIX = TensorSpec("video_prefix", ("batch", "video_tokens", "video_width"), FLOAT)
_TEXT_PREFIX = TensorSpec("text_prefix", ("batch", "text_len", "text_width"), FLOAT)
_FUSED = (
    TensorSpec("vtm_logits", ("batch", 2), FLOAT),
    TensorSpec("video_cls", ("batch", "video_width"), FLOAT),
    TensorSpec("text_hidden", ("batch", "text_len", "text_width"), FLOAT),
)

ROLES: dict[str, RoleSpec] = {
    r.name: r
    for r in (
        RoleSpec(
            "video_encoder",
            (_VIDEO,),
            (TensorSpec("video_embedding", ("batch", "embed_dim"), FLOAT),),
            "video -> dual video embedding (no cross-attention in the graph)",
            forbidden_weights=("i2t",),
        ),
        RoleSpec(
            "text_encoder",
            (_IDS, _MASK),
            (TensorSpec("text_embedding", ("batch", "embed_dim"), FLOAT), _TEXT_PREFIX),
            "ids, mask -> dual text embedding + text states after the last unfused layer",
            forbidden_weights=("t2i",),
        ),
        RoleSpec(
            "video_fusion_prefix",
            (_VIDEO,),
            (_VIDEO_PREFIX,),
            "video -> fusion-mode video states after the last unfused block (cacheable per clip)",
            forbidden_weights=("i2t", "t2i"),
        ),
        RoleSpec(
            "fusion_head",
            (_VIDEO_PREFIX, _TEXT_PREFIX, _MASK),
            _FUSED,
            "cached video and text prefixes + mask -> vtm_logits, fused video CLS, fused text",
        ),
        RoleSpec("fusion", (_VIDEO, _IDS, _MASK), _FUSED, "video, ids, mask -> vtm_logits in one graph"),
    )
}
AOTI_ROLES = ("video_encoder", "text_encoder", "video_fusion_prefix", "fusion_head")


def static_dims(config) -> dict[str, int]:
    """Sizes of the fixed shape symbols for a model config."""
    v, t = config.video, config.text
    return {
        "frames": v.num_frames,
        "channels": v.in_chans,
        "size": v.img_size,
        "video_tokens": v.num_tokens,
        "video_width": v.width,
        "text_width": t.hidden_size,
        "embed_dim": config.projection_dim,
    }


def check_roles(names) -> list[str]:
    unknown = [n for n in names if n not in ROLES]
    if unknown:
        raise ValueError(f"unknown role(s) {unknown}; choose from {list(ROLES)}")
    return list(names)


# -- the modules that compute each role ------------------------------------------------------------------------
# Each is a thin nn.Module over the model's public API; its forward's argument names are the role's input names
# (torch.onnx.export and torch.export key dynamic shapes by them).
class VideoEncoderGraph(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, video):
        return self.model.encode_video(video)  # (B, P)


class TextEncoderGraph(nn.Module):
    """Both outputs from one pass: the lower layers run once (as `text_prefix`), the unfused top layers continue
    from the prefix in dual mode. Calling `encode_text` and `text_prefix` separately would put the lower layers in
    the graph twice."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        from egovlp_deploy.model.attention import extended_attention_mask

        m = self.model
        prefix = m.text_prefix(input_ids, attention_mask)  # (B, L, Dt)
        bias = extended_attention_mask(attention_mask, prefix.dtype)  # (B, 1, 1, L)
        x = prefix
        for layer in m.text_model.encoder.layer[m.text_model.encoder.first_fused :]:
            x = layer(x, bias)  # dual mode: no video states, no cross-attention
        return m.txt_proj(x[:, 0]), prefix  # (B, P), (B, L, Dt)


class VideoFusionPrefixGraph(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, video):
        return self.model.fusion_video_prefix(video)  # (B, T, Dv)


class FusionHeadGraph(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, video_prefix, text_prefix, attention_mask):
        video_cls, text_hidden = self.model.fused_from_prefixes(video_prefix, text_prefix, attention_mask)
        return self.model.vtm_head(video_cls, text_hidden), video_cls, text_hidden


class FusionGraph(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, video, input_ids, attention_mask):
        out = self.model.fuse(video, input_ids, attention_mask)
        return out.vtm_logits, out.video_cls, out.text_hidden


ROLE_MODULES = {
    "video_encoder": VideoEncoderGraph,
    "text_encoder": TextEncoderGraph,
    "video_fusion_prefix": VideoFusionPrefixGraph,
    "fusion_head": FusionHeadGraph,
    "fusion": FusionGraph,
}


def role_module(model, role: str) -> nn.Module:
    return ROLE_MODULES[role](model).eval()


# -- example inputs -------------------------------------------------------------------------------------------
def example_inputs(
    model, role: str, batch: int, text_len: int, seed: int = 0, dtype: torch.dtype = torch.float32, device="cpu"
) -> dict[str, torch.Tensor]:
    """Random inputs of a role (never zeros); texts have `<s>` ... `</s>` and the last row is padded, so the mask
    matters. The prefixes of `fusion_head` are the model's own (random numbers would be off its distribution)."""
    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    v, t = cfg.video, cfg.text
    video = torch.randn(batch, v.num_frames, v.in_chans, v.img_size, v.img_size, generator=g)
    ids = torch.randint(5, t.vocab_size, (batch, text_len), generator=g)
    ids[:, 0] = t.bos_token_id
    ids[:, -1] = t.eos_token_id
    if batch > 1 and text_len > 3:
        cut = max(2, text_len // 2)
        ids[-1, cut - 1] = t.eos_token_id
        ids[-1, cut:] = t.pad_token_id
    mask = ids.ne(t.pad_token_id).long()
    video = video.to(device=device, dtype=dtype)
    ids, mask = ids.to(device), mask.to(device)
    if role in ("video_encoder", "video_fusion_prefix"):
        return {"video": video}
    if role == "text_encoder":
        return {"input_ids": ids, "attention_mask": mask}
    if role == "fusion":
        return {"video": video, "input_ids": ids, "attention_mask": mask}
    if role == "fusion_head":
        with torch.no_grad(), export_patches(model):
            return {
                "video_prefix": model.fusion_video_prefix(video),
                "text_prefix": model.text_prefix(ids, mask),
                "attention_mask": mask,
            }
    raise ValueError(f"unknown role {role!r}")


_INPUT_CHECKS = ("_check_video", "_check_text", "_check_pair")


def skip_input_checks(model) -> None:
    """The model's data-dependent input checks become no-ops on this instance (see `export_patches`)."""
    noop = lambda *args, **kwargs: None  # noqa: E731
    for name in _INPUT_CHECKS:
        setattr(model, name, noop)


TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@contextlib.contextmanager
def converted(model, device: str, precision: str):
    """The model on `device` in `precision`'s dtype for the block, back on its own device and dtype after (the
    torch-level exporters build on the device and dtype they deploy to)."""
    if precision not in TORCH_DTYPES:
        raise ValueError(f"precision must be one of {list(TORCH_DTYPES)}, got {precision!r}")
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"building for {device} needs a CUDA device")
    # Read now: `Module.to` converts parameters in place, so a parameter object read after it reports the new
    # device and dtype, and the restore below would leave the model converted.
    param = next(model.parameters())
    original_device, original_dtype = param.device, param.dtype
    try:
        yield model.to(device=device, dtype=TORCH_DTYPES[precision])
    finally:
        model.to(device=original_device, dtype=original_dtype)


# -- the export patcher ---------------------------------------------------------------------------------------
@contextlib.contextmanager
def export_patches(model, attention_backend: str = "reference"):
    """Export-only changes, undone on exit (the model code is never edited for export):
    - the attention backend is `attention_backend` ('reference' by default: plain torch ops, so the ONNX graph is
      standard operators any runtime runs);
    - the model's input checks are skipped: `int(input_ids.min())` is data-dependent and breaks torch.export, and
      an exported graph cannot raise Python errors anyway. The artifacts' inputs are checked instead by the
      session wrapper against the manifest (export/session.py)."""
    previous = model.attention_backend
    model.set_attention_backend(attention_backend)
    skip_input_checks(model)
    try:
        yield model
    finally:
        for name in _INPUT_CHECKS:
            model.__dict__.pop(name, None)
        model.set_attention_backend(previous)
