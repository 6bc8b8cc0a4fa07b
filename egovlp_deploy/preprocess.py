"""Clip preprocessing through the C++ extension `egovlp_deploy._C`: decoded uint8 frames -> model input in one call.

The numbers are those of `egovlp_deploy.transforms.eval_transform` (the reference: the official eval transform) to
float32 rounding (the tests hold the max abs error after normalisation to 1e-5; BENCHMARKS.md): resize the short
side, center-crop, resize to S x S, bilinear without antialias, ImageNet normalisation. The extension reads the uint8
frames in place (any strides, no float copy of the full frame), computes only the crop window of the intermediate image,
writes each output value once, runs on several threads and releases the GIL.

    from egovlp_deploy import preprocess
    clip = preprocess.preprocess_clip(frames)                     # uint8 (T, H, W, 3) -> float32 (T, 3, 224, 224)
    clip = preprocess.preprocess_clip(frames, 224, "epic", dtype=torch.float16, layout="CTHW")  # (3, T, 224, 224)
    batch = preprocess.preprocess_clips([a, b, c])                # (3, T, 3, 224, 224); frame sizes may differ

Inputs are torch uint8 CPU tensors, numpy arrays, or any object with `__dlpack__` (read zero-copy). Outputs are
torch tensors; `out=` writes into a caller's contiguous tensor instead (e.g. a pinned staging buffer).
`available()` says whether the extension is built; `eval_clip` picks it or the reference.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .transforms import EVAL_CROP_OVER_SIZE, IMAGENET_MEAN, IMAGENET_STD, VARIANTS, eval_transform

LAYOUTS = ("TCHW", "CTHW")  # per clip: (T, 3, S, S) as the model takes it, or (3, T, S, S) as 3D-conv models do
DTYPES = (torch.float32, torch.float16)
# Ceilings checked before the output is allocated: sides far above any model input (224 px), and an output size
# (one call's tensor) that keeps a bad argument a ValueError instead of an allocation failure. Assign to raise them.
MAX_SIDE = 16_384
MAX_OUTPUT_BYTES = 16 << 30


def _load_extension():
    try:
        return importlib.import_module("egovlp_deploy._C"), None
    except ImportError as exc:  # a source tree without the build, or a wheel built without a compiler
        return None, exc


_C, _IMPORT_ERROR = _load_extension()


def available() -> bool:
    """True when the C++ extension is built and importable."""
    return _C is not None


def unavailable_reason() -> str | None:
    """Why the C++ extension cannot be imported (its ImportError), or None when it is available."""
    return None if _C is not None else str(_IMPORT_ERROR)


@dataclass(frozen=True)
class ClipSpec:
    """Resize the short side to `short_side`, center-crop `crop` x `crop`, resize to `size` x `size`, then
    (x * pixel_scale - mean) / std per channel. `crop == size` skips the second resize (exactly, as torch's same-size
    resize is a copy)."""

    size: int
    crop: int
    short_side: int
    pixel_scale: float
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @classmethod
    def official(cls, size: int = 224, variant: str = "egoclip") -> ClipSpec:
        """The eval transform of `transforms.eval_transform(frames, size, variant)`.

        'egoclip' (EgoClip / EgoMCQ / Charades): Resize(c) -> CenterCrop(c) -> Resize(size), c = round(size*256/224),
        pixels / 255, ImageNet mean/std. 'epic' (EK-100): Resize(size) -> CenterCrop(size) on 0..255 pixels,
        ImageNet statistics x 255.
        """
        if variant == "egoclip":
            crop = round(size * EVAL_CROP_OVER_SIZE)
            return cls(size, crop, crop, 1.0 / 255.0, IMAGENET_MEAN, IMAGENET_STD)
        if variant == "epic":
            return cls(
                size, size, size, 1.0, tuple(m * 255 for m in IMAGENET_MEAN), tuple(s * 255 for s in IMAGENET_STD)
            )
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")

    def check(self) -> None:
        for name in ("size", "crop", "short_side"):
            value = getattr(self, name)
            if not _is_int(value) or not 1 <= value <= MAX_SIDE:
                raise ValueError(
                    f"{name} must be a positive int at most {MAX_SIDE} (preprocess.MAX_SIDE), got {value!r:.40}"
                )
        if self.crop > self.short_side:
            raise ValueError(
                f"cannot center-crop {self.crop}x{self.crop} from a frame whose short side is resized "
                f"to {self.short_side}"
            )
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ValueError(f"mean and std need 3 values (RGB), got {self.mean!r} and {self.std!r}")
        # Named here: the extension only sees the folded per-channel scale and bias, so it cannot say which
        # number was NaN or infinite.
        for name, values in (("pixel_scale", (self.pixel_scale,)), ("mean", self.mean), ("std", self.std)):
            if not all(math.isfinite(float(v)) for v in values):
                raise ValueError(f"{name} must be finite, got {getattr(self, name)!r}")
        if any(s == 0 for s in self.std):
            raise ValueError(f"std must be non-zero, got {self.std!r}")


def _is_int(value) -> bool:
    """An integer, Python's or numpy's (a size read from an array or a config), but not a bool."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _require_extension() -> None:
    if _C is None:
        raise RuntimeError(
            "the C++ extension egovlp_deploy._C is not built (reinstall the package with a C++17 "
            f"compiler and CMake; use egovlp_deploy.transforms for the reference): {_IMPORT_ERROR}"
        )


def _frames_array(frames, name: str) -> np.ndarray:
    """A zero-copy numpy view of uint8 frames (T, H, W, 3), with the checks that give a clear message."""
    if isinstance(frames, torch.Tensor):
        if frames.device.type != "cpu":
            raise ValueError(f"{name} must be on the CPU, got a tensor on {frames.device}")
        if frames.dtype != torch.uint8:
            raise TypeError(f"{name} must be uint8 frames (T, H, W, 3), got dtype {frames.dtype}")
        array = frames.detach().numpy()  # shares memory, keeps the strides
    elif isinstance(frames, np.ndarray):
        array = frames
    elif hasattr(frames, "__dlpack__"):
        array = np.from_dlpack(frames)
    else:
        raise TypeError(f"{name} must be a torch.Tensor, a numpy array or a DLPack tensor, got {type(frames).__name__}")
    if array.dtype != np.uint8:
        raise TypeError(f"{name} must be uint8 frames (T, H, W, 3), got dtype {array.dtype}")
    if array.ndim != 4:
        raise ValueError(f"{name} must have 4 dimensions (T, H, W, 3), got shape {tuple(array.shape)}")
    if array.shape[3] != 3:
        raise ValueError(f"{name} must have 3 channels (RGB) last, got shape {tuple(array.shape)}")
    if array.shape[0] == 0:
        raise ValueError(f"{name} is an empty clip (0 frames)")
    if array.shape[1] == 0 or array.shape[2] == 0:
        raise ValueError(f"{name} has zero-size frames: shape {tuple(array.shape)}")
    return array


def _output(shape: tuple[int, ...], dtype: torch.dtype, out: torch.Tensor | None) -> torch.Tensor:
    if dtype not in DTYPES:
        raise TypeError(f"dtype must be torch.float32 or torch.float16, got {dtype}")
    if out is None:
        nbytes = math.prod(shape) * (4 if dtype == torch.float32 else 2)
        if nbytes > MAX_OUTPUT_BYTES:
            raise ValueError(
                f"the output {shape} {dtype} would take {nbytes} bytes, above preprocess.MAX_OUTPUT_BYTES "
                f"= {MAX_OUTPUT_BYTES}; preprocess fewer frames per call"
            )
        return torch.empty(shape, dtype=dtype)
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"out must be a torch.Tensor, got {type(out).__name__}")
    if out.device.type != "cpu":
        raise ValueError(f"out must be on the CPU, got a tensor on {out.device}")
    if out.dtype != dtype:
        raise TypeError(f"out has dtype {out.dtype}, expected {dtype} (the dtype argument)")
    if tuple(out.shape) != shape:
        raise ValueError(f"out has shape {tuple(out.shape)}, expected {shape}")
    if not out.is_contiguous():
        raise ValueError("out must be contiguous")
    if out.requires_grad:
        raise ValueError("out must not require grad (it is written in place)")
    return out


def _threads(num_threads: int | None) -> int:
    if num_threads is None:  # the same budget torch ops get (1 inside DataLoader workers)
        return torch.get_num_threads()
    if isinstance(num_threads, bool) or not isinstance(num_threads, int) or num_threads < 1:
        raise ValueError(f"num_threads must be a positive int or None, got {num_threads!r}")
    return num_threads


def _spec_kwargs(spec: ClipSpec) -> dict:
    return dict(
        short_side=spec.short_side,
        crop=spec.crop,
        size=spec.size,
        pixel_scale=float(spec.pixel_scale),
        mean=[float(m) for m in spec.mean],
        std=[float(s) for s in spec.std],
    )


def _clip_shape(frames: int, size: int, layout: str) -> tuple[int, int, int, int]:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    return (frames, 3, size, size) if layout == "TCHW" else (3, frames, size, size)


def preprocess_clip(
    frames: torch.Tensor | np.ndarray | object,
    size: int = 224,
    variant: str = "egoclip",
    *,
    spec: ClipSpec | None = None,
    dtype: torch.dtype = torch.float32,
    layout: str = "TCHW",
    out: torch.Tensor | None = None,
    num_threads: int | None = None,
) -> torch.Tensor:
    """uint8 frames (T, H, W, 3) of any size -> the eval transform, float (T, 3, S, S) or (3, T, S, S).

    size, variant: the official transform `transforms.eval_transform(frames, size, variant)`; `spec` replaces both
    with another short side / crop / size / normalisation (see ClipSpec). dtype: torch.float32 or torch.float16 (the
    float32 result rounded to nearest). layout: 'TCHW' or 'CTHW'. out: a contiguous CPU tensor of exactly that shape
    and dtype to write into (returned). num_threads: default torch.get_num_threads().
    Raises TypeError (not uint8, wrong types) or ValueError (shape, empty clip, zero-size frames, bad spec or out).
    Non-contiguous frames (slices, transposes, expanded frames) are read through their strides, without a copy.
    """
    _require_extension()
    spec = spec or ClipSpec.official(size, variant)
    spec.check()
    array = _frames_array(frames, "frames")
    result = _output(_clip_shape(array.shape[0], spec.size, layout), dtype, out)
    _C.preprocess(array, result.numpy(), layout=layout, threads=_threads(num_threads), **_spec_kwargs(spec))
    return result


def preprocess_clips(
    clips: Sequence,
    size: int = 224,
    variant: str = "egoclip",
    *,
    spec: ClipSpec | None = None,
    dtype: torch.dtype = torch.float32,
    layout: str = "TCHW",
    out: torch.Tensor | None = None,
    num_threads: int | None = None,
) -> torch.Tensor:
    """Many clips in one call: B uint8 clips (T, H, W, 3) with the same T -> (B, T, 3, S, S) or (B, 3, T, S, S).

    Frame sizes may differ between clips. All B x T frames share one parallel region, so a batch of short clips
    keeps every thread busy. Arguments and errors as `preprocess_clip`.
    """
    _require_extension()
    spec = spec or ClipSpec.official(size, variant)
    spec.check()
    if isinstance(clips, (torch.Tensor, np.ndarray)) and clips.ndim == 5:
        clips = list(clips)  # a (B, T, H, W, 3) stack: one view per clip, no copy
    if not isinstance(clips, Sequence) or isinstance(clips, (str, bytes)):
        raise TypeError(f"clips must be a sequence of clips, got {type(clips).__name__}")
    if len(clips) == 0:
        raise ValueError("clips is empty")
    arrays = [_frames_array(c, f"clips[{i}]") for i, c in enumerate(clips)]
    frames = arrays[0].shape[0]
    for i, a in enumerate(arrays):
        if a.shape[0] != frames:
            raise ValueError(
                f"all clips must have the same number of frames: clips[0] has {frames}, clips[{i}] has {a.shape[0]}"
            )
    result = _output((len(arrays), *_clip_shape(frames, spec.size, layout)), dtype, out)
    _C.preprocess_batch(arrays, result.numpy(), layout=layout, threads=_threads(num_threads), **_spec_kwargs(spec))
    return result


def eval_clip(frames_uint8: torch.Tensor, size: int, variant: str = "egoclip") -> torch.Tensor:
    """`transforms.eval_transform` through the C++ extension when it is built, else the reference itself.

    The two agree to float32 rounding (tests/test_preprocess.py holds them to 1e-5); the C++ path reads the uint8
    frames in place instead of widening whole frames to float (far faster on large frames, BENCHMARKS.md). The data
    readers' eval path and the runtime call this.
    """
    if (
        available()
        and isinstance(frames_uint8, torch.Tensor)
        and frames_uint8.device.type == "cpu"
        and frames_uint8.dtype == torch.uint8
    ):
        return preprocess_clip(frames_uint8, size, variant)
    return eval_transform(frames_uint8, size, variant)
