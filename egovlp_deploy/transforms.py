"""Clip transforms of the official EgoVLPv2 data loaders, in plain torch (the reference for the C++ fast path).

Facts (the official EgoVLPv2/data_loader/transforms.py and EpicKitchens_MIR_dataset.py), with the
torchvision 0.14 semantics they rely on (torchvision itself is not a dependency):
  * EgoClip / EgoMCQ / Charades pixels are uint8 / 255; EK-100 pixels stay 0..255 and are normalised with the
    ImageNet statistics x 255 (numerically the same result).
  * train: RandomResizedCrop(S, scale=(0.5, 1), ratio=(3/4, 4/3), bilinear) with ONE crop for all frames of the
    clip, then horizontal flip with p = 0.5 (not in EK-100), then normalisation.
  * eval: Resize(256) -> CenterCrop(256) -> Resize(224) (EK-100: Resize(224) -> CenterCrop(224)).
  * every resize is bilinear, align_corners=False, WITHOUT antialias (torchvision 0.14's tensor default): a
    downscale samples 4 pixels per output pixel, it does not average an area.
  * Resize(int) scales the SHORT side to `size` and the long side to int(size * long / short) (truncation).
  * CenterCrop's offset is int(round((H - S) / 2)) with Python's round, half to even: 85 / 2 -> 42, 3 / 2 -> 2.
Layout: frames uint8 (F, H, W, 3) in, float32 (F, 3, S, S) out. The frames of a clip are a batch for
`interpolate`, which is what the official [C, T, H, W] calls compute as well (each plane is resized alone).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TRAIN_SCALE = (0.5, 1.0)  # init_video_transform_dict(randcrop_scale=(0.5, 1.0))
TRAIN_RATIO = (3.0 / 4.0, 4.0 / 3.0)  # torchvision's RandomResizedCrop default
FLIP_P = 0.5  # RandomHorizontalFlipVideo default
CROP_ATTEMPTS = 10  # torchvision RandomResizedCrop.get_params
EVAL_CROP_OVER_SIZE = 256 / 224  # Resize(256) -> CenterCrop(256) -> Resize(224), scaled to other sizes
# Training frames are scaled down to a short side of at most this many times the crop size as they are decoded
# (`shrink_frames`); an official Ego4D chunk (256-px short side, crop 224) is below it and stays as it is.
TRAIN_SHORT_SIDE_OVER_SIZE = 2
VARIANTS = ("egoclip", "epic")


# -- building blocks --------------------------------------------------------------------------------------------
def to_float_clip(frames_uint8: torch.Tensor, scale: float = 1.0 / 255.0) -> torch.Tensor:
    """uint8 (F, H, W, 3) -> float32 (F, 3, H, W) times `scale` (1/255: pixels in [0, 1]; 1: pixels in 0..255)."""
    if frames_uint8.dtype != torch.uint8 or frames_uint8.ndim != 4 or frames_uint8.shape[-1] != 3:
        raise ValueError(f"expected uint8 frames (F, H, W, 3), got {frames_uint8.dtype} {tuple(frames_uint8.shape)}")
    if frames_uint8.shape[0] == 0:
        raise ValueError("expected at least one frame, got an empty clip")
    return frames_uint8.permute(0, 3, 1, 2).to(torch.float32) * scale


def short_side_size(height: int, width: int, size: int) -> tuple[int, int]:
    """torchvision Resize(size: int): (new_h, new_w) with the short side = size, long side = int(size*long/short)."""
    short, long = (height, width) if height <= width else (width, height)
    new_long = int(size * long / short)
    return (size, new_long) if height <= width else (new_long, size)


def resize(clip: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Bilinear resize of float (..., C, H, W) to (..., C, height, width): align_corners=False, no antialias."""
    if tuple(clip.shape[-2:]) == (height, width):
        return clip
    return F.interpolate(clip, size=(height, width), mode="bilinear", align_corners=False, antialias=False)


def resize_short_side(clip: torch.Tensor, size: int) -> torch.Tensor:
    """torchvision Resize(size) on a float (F, C, H, W) clip."""
    return resize(clip, *short_side_size(clip.shape[-2], clip.shape[-1], size))


def train_short_side(size: int) -> int:
    """The largest short side, in pixels, training frames are decoded at for a `size` x `size` crop."""
    return TRAIN_SHORT_SIDE_OVER_SIZE * size


def shrink_frames(frames_uint8: torch.Tensor, max_short_side: int) -> torch.Tensor:
    """uint8 (..., H, W, 3) frames whose short side exceeds `max_short_side` -> uint8 frames with that short side
    (`short_side_size`), by antialiased bilinear resampling (an area average, as a video scaler does); frames within
    it are returned as they are, the same tensor.

    Why: RandomResizedCrop takes a fraction of the frame's area at a random aspect, so its crop is the same part of a
    4K frame as of the frame scaled down, and the crop is resized to `size` either way; scaled down right after
    decoding, a clip of a 4K or 5.7K source holds frames of a bounded size instead of F full-size ones (and their
    float copies). The antialiasing keeps a large reduction from skipping pixels.
    """
    height, width = frames_uint8.shape[-3], frames_uint8.shape[-2]
    if min(height, width) <= max_short_side:
        return frames_uint8
    new_h, new_w = short_side_size(height, width, max_short_side)
    planes = frames_uint8.reshape(-1, height, width, 3).permute(0, 3, 1, 2)  # (N, 3, H, W) views, no copy
    small = F.interpolate(planes, size=(new_h, new_w), mode="bilinear", align_corners=False, antialias=True)
    return small.permute(0, 2, 3, 1).reshape(*frames_uint8.shape[:-3], new_h, new_w, 3).contiguous()


def center_crop(clip: torch.Tensor, size: int) -> torch.Tensor:
    """torchvision CenterCrop(size) on (..., H, W); the image must be at least size x size (our resizes ensure it)."""
    height, width = clip.shape[-2:]
    if height < size or width < size:
        raise ValueError(f"cannot center-crop {size}x{size} from a {height}x{width} image")
    top = int(round((height - size) / 2.0))
    left = int(round((width - size) / 2.0))
    return clip[..., top : top + size, left : left + size]


def random_resized_crop_params(
    height: int,
    width: int,
    scale: tuple[float, float] = TRAIN_SCALE,
    ratio: tuple[float, float] = TRAIN_RATIO,
    generator: torch.Generator | None = None,
) -> tuple[int, int, int, int]:
    """torchvision RandomResizedCrop.get_params: (top, left, crop_h, crop_w).

    Up to 10 tries: area fraction ~ U(scale), log aspect (w/h) ~ U(log ratio); the first crop that fits wins and
    gets a uniform position. Otherwise the fallback: the largest centred crop whose aspect is clamped to `ratio`.
    The draws are the same calls torchvision makes, taken from `generator` (the global torch RNG when None).
    """
    area = height * width
    log_ratio = torch.log(torch.tensor(ratio))  # float32, as torchvision computes it
    for _ in range(CROP_ATTEMPTS):
        target_area = area * torch.empty(1).uniform_(scale[0], scale[1], generator=generator).item()
        # exp in float32 as torchvision takes it (torch.exp(...).item()): math.exp in double moves the aspect by up
        # to an ulp of float32, enough to round a side that sits near x.5 the other way
        log_aspect = torch.empty(1).uniform_(log_ratio[0].item(), log_ratio[1].item(), generator=generator)
        aspect = torch.exp(log_aspect).item()
        crop_w = int(round(math.sqrt(target_area * aspect)))
        crop_h = int(round(math.sqrt(target_area / aspect)))
        if 0 < crop_w <= width and 0 < crop_h <= height:
            top = int(torch.randint(0, height - crop_h + 1, size=(1,), generator=generator).item())
            left = int(torch.randint(0, width - crop_w + 1, size=(1,), generator=generator).item())
            return top, left, crop_h, crop_w
    in_ratio = width / height
    if in_ratio < min(ratio):
        crop_w, crop_h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        crop_h, crop_w = height, int(round(height * max(ratio)))
    else:
        crop_h, crop_w = height, width
    return (height - crop_h) // 2, (width - crop_w) // 2, crop_h, crop_w


def resized_crop(clip: torch.Tensor, top: int, left: int, crop_h: int, crop_w: int, size: int) -> torch.Tensor:
    """Crop (..., C, H, W) to the box, then bilinear-resize it to size x size (no antialias)."""
    return resize(clip[..., top : top + crop_h, left : left + crop_w], size, size)


def hflip(clip: torch.Tensor) -> torch.Tensor:
    """Mirror left-right (the last axis)."""
    return clip.flip(-1)


def normalize(clip: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """(x - mean[c]) / std[c] on float (F, C, H, W)."""
    mean_t = torch.tensor(mean, dtype=clip.dtype).view(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=clip.dtype).view(1, -1, 1, 1)
    return (clip - mean_t) / std_t


def _pixel_scale_and_stats(variant: str) -> tuple[float, tuple[float, ...], tuple[float, ...]]:
    if variant == "egoclip":
        return 1.0 / 255.0, IMAGENET_MEAN, IMAGENET_STD
    if variant == "epic":  # EK-100 keeps 0..255 pixels: mean=[123.675, 116.28, 103.53], std=[58.395, 57.12, 57.375]
        return 1.0, tuple(m * 255 for m in IMAGENET_MEAN), tuple(s * 255 for s in IMAGENET_STD)
    raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")


# -- the official pipelines -------------------------------------------------------------------------------------
def train_transform(
    frames_uint8: torch.Tensor, size: int, generator: torch.Generator | None = None, variant: str = "egoclip"
) -> torch.Tensor:
    """Official training transform: uint8 (F, H, W, 3) -> float32 (F, 3, size, size).

    'egoclip': RandomResizedCropVideo(size, scale=(0.5, 1)) -> RandomHorizontalFlipVideo(0.5) -> Normalize.
    'epic':    RandomResizedCrop(size, scale=(0.5, 1)) -> Normalize(x255 stats) on 0..255 pixels (no flip).
    One crop box and one flip decision for the whole clip. Draws, in order: the crop (see
    `random_resized_crop_params`), then one U(0, 1) for the flip, all from `generator`.
    """
    pixel_scale, mean, std = _pixel_scale_and_stats(variant)
    clip = to_float_clip(frames_uint8, pixel_scale)  # (F, 3, H, W)
    top, left, crop_h, crop_w = random_resized_crop_params(clip.shape[-2], clip.shape[-1], generator=generator)
    clip = resized_crop(clip, top, left, crop_h, crop_w, size)  # (F, 3, size, size)
    if variant == "egoclip" and torch.rand(1, generator=generator).item() < FLIP_P:
        clip = hflip(clip)
    return normalize(clip, mean, std)


def eval_transform(frames_uint8: torch.Tensor, size: int, variant: str = "egoclip") -> torch.Tensor:
    """Official evaluation transform: uint8 (F, H, W, 3) -> float32 (F, 3, size, size).

    'egoclip' (EgoClip / EgoMCQ / Charades): Resize(c) -> CenterCrop(c) -> Resize(size) -> Normalize, with
              c = round(size * 256 / 224) (256 for the official 224).
    'epic'    (EK-100): Resize(size) -> CenterCrop(size) -> Normalize(x255 stats) on 0..255 pixels.
    """
    pixel_scale, mean, std = _pixel_scale_and_stats(variant)
    clip = to_float_clip(frames_uint8, pixel_scale)  # (F, 3, H, W)
    if variant == "egoclip":
        crop = round(size * EVAL_CROP_OVER_SIZE)
        clip = center_crop(resize_short_side(clip, crop), crop)  # (F, 3, crop, crop)
        clip = resize(clip, size, size)  # (F, 3, size, size)
    else:
        clip = center_crop(resize_short_side(clip, size), size)  # (F, 3, size, size)
    return normalize(clip, mean, std).contiguous()


def black_clip(num_frames: int, size: int) -> torch.Tensor:
    """The official lax-loading fallback, float32 (num_frames, 3, size, size).

    A failed read becomes ONE black frame (zeros in [0, 1]), which goes through the transform -- any crop or resize
    of a constant image is that constant, so it ends as -mean / std per channel -- and is then zero-padded to F
    (`final = zeros(F, 3, S, S); final[:1] = frame`). Frames 1..F-1 are therefore 0, not black.
    """
    clip = torch.zeros(num_frames, 3, size, size)
    clip[0] = normalize(torch.zeros(1, 3, size, size), IMAGENET_MEAN, IMAGENET_STD)[0]
    return clip
