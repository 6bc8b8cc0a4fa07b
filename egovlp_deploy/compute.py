"""Compute accounting: parameter counts and multiply-accumulates (GMACs) of the dual and fusion forwards.

MACs are counted with `torch.utils.flop_counter` (matmul, bmm, linear and conv FLOPs / 2) on the meta device, so
even the base model is counted without allocating its weights. Softmax, LayerNorm and GELU are not counted (they
are O(tokens x width), not O(tokens x width^2)).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

from .config import EgoVLPv2Config
from .model import EgoVLPv2

CROSS_ATTENTION_MARKERS = ("_i2t", "crossattention_t2i")  # the gated cross-attention modules of both towers


@dataclass
class ComputeReport:
    config_name: str
    num_frames: int
    text_length: int
    params: dict[str, int]  # group -> parameter count
    gmacs: dict[str, float]  # forward -> GMACs per clip / sentence / pair (batch 1)
    cross_attention_gmacs: dict[str, float]  # forward -> GMACs spent in cross-attention modules

    def rows(self) -> list[tuple[str, str]]:
        out = [(f"params: {k}", f"{v / 1e6:.2f} M") for k, v in self.params.items()]
        out += [(f"GMACs: {k}", _fmt(v)) for k, v in self.gmacs.items()]
        out += [(f"GMACs in cross-attention: {k}", _fmt(v)) for k, v in self.cross_attention_gmacs.items()]
        return out


def _fmt(gmacs: float) -> str:
    return f"{gmacs:.2f}" if gmacs >= 1 or gmacs == 0 else f"{gmacs:.4f}"


def parameter_groups(model: EgoVLPv2) -> dict[str, int]:
    def count(pred):
        return sum(p.numel() for n, p in model.named_parameters() if pred(n))

    def is_cross(n):
        return any(m in n for m in CROSS_ATTENTION_MARKERS)

    return {
        "video tower": count(lambda n: n.startswith("video_model.")),
        "video tower, cross-attention": count(lambda n: n.startswith("video_model.") and is_cross(n)),
        "text tower": count(lambda n: n.startswith("text_model.")),
        "text tower, cross-attention": count(lambda n: n.startswith("text_model.") and is_cross(n)),
        "projections": count(lambda n: n.startswith(("txt_proj.", "vid_proj."))),
        "fusion heads (VTM, MLM, poolers)": count(
            lambda n: not n.startswith(("video_model.", "text_model.", "txt_proj.", "vid_proj."))
        ),
        "total": count(lambda n: True),
    }


def _count(fn) -> tuple[float, float]:
    """(total GMACs, GMACs inside cross-attention modules) of running fn()."""
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        fn()
    per_module = counter.get_flop_counts()
    total = sum(per_module.get("Global", {}).values())
    cross = 0
    for name, ops in per_module.items():
        parts = name.split(".")
        marked = [any(m in part for m in CROSS_ATTENTION_MARKERS) for part in parts]
        # a module's count includes its children's: add only the outermost cross-attention modules
        if marked[-1] and not any(marked[:-1]):
            cross += sum(ops.values())
    return total / 2e9, cross / 2e9


def compute_report(config: EgoVLPv2Config, text_length: int = 15, config_name: str = "custom") -> ComputeReport:
    """Params and batch-1 GMACs of: dual video (tower + projection), dual text, and the fusion pass (VTM)."""
    with torch.device("meta"):
        model = EgoVLPv2(config).eval()
        v = config.video
        video = torch.zeros(1, v.num_frames, v.in_chans, v.img_size, v.img_size)
        ids = torch.zeros(1, text_length, dtype=torch.long)
        mask = torch.ones(1, text_length, dtype=torch.long)
    # The meta device has no values, so skip the value-dependent id-range check during counting.
    model._check_text = lambda input_ids, attention_mask: None
    video_macs, video_cross = _count(lambda: model.encode_video(video))
    text_macs, text_cross = _count(lambda: model.encode_text(ids, mask))
    fuse_macs, fuse_cross = _count(lambda: model.fuse(video, ids, mask))
    return ComputeReport(
        config_name=config_name,
        num_frames=v.num_frames,
        text_length=text_length,
        params=parameter_groups(model),
        gmacs={
            "dual video": video_macs,
            "dual text": text_macs,
            "dual video + text": video_macs + text_macs,
            "fusion (VTM)": fuse_macs,
        },
        cross_attention_gmacs={"dual video": video_cross, "dual text": text_cross, "fusion (VTM)": fuse_cross},
    )
