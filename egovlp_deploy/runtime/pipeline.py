"""Video file -> decoded frames -> preprocessed clips -> encoder: for whole videos (sliding windows with timestamps)
and for single clips.

Windows are planned on the file's own timeline (its real fps, `video.video_info`); each window's F model frames are
the official 'uniform' samples of its frame range (segment middles, `video.sample_frame_indices`), so a window that
is an annotated clip gives exactly the frames the EgoMCQ/EgoClip evaluation readers give. Decoding goes through
`egovlp_deploy.video` (decord, PyAV where decord is missing), one open reader per file for all its windows; the
preprocessing is the C++ extension when built (`preprocess.preprocess_clips`: all B x F frames of a batch in one
parallel call) and the torch reference transform otherwise, with the same numbers (1e-5).
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from egovlp_deploy.video import VideoReadError, read_frames, sample_frame_indices, video_info


@dataclass(frozen=True)
class Window:
    start_sec: float
    end_sec: float
    indices: tuple[int, ...]  # the F decoded frames
    label: str | None = None  # the narration of an annotated segment


def plan_windows(path: str | os.PathLike, frames: int, window_sec: float | None = None,
                 stride_sec: float | None = None, window_frames: int | None = None,
                 stride_frames: int | None = None, backend: str = "auto") -> tuple[list[Window], float]:
    """Sliding windows over a whole video -> ([Window], fps).

    Give the window and stride in seconds (`window_sec`, `stride_sec`) or in source frames (`window_frames`,
    `stride_frames`, the EgoMQ/EgoNLQ feature convention). The last window is clipped at the end of the video; a
    video shorter than one window gives one window over all of it."""
    n, fps = video_info(path, backend)
    if window_frames is None:
        if not window_sec or window_sec <= 0 or not stride_sec or stride_sec <= 0:
            raise ValueError(f"window and stride must be positive, got {window_sec} s, {stride_sec} s")
        window_frames, stride_frames = max(1, round(window_sec * fps)), max(1, round(stride_sec * fps))
    if window_frames < 1 or not stride_frames or stride_frames < 1:
        raise ValueError(f"window and stride must be positive, got {window_frames}, {stride_frames} frames")
    out = []
    for start in range(0, max(1, n - window_frames + stride_frames), stride_frames):
        end = min(n, start + window_frames)
        if end <= start:
            break
        idx = _uniform(frames, start, end)
        out.append(Window(round(start / fps, 4), round(end / fps, 4), idx))
        if end >= n:
            break
    return out, fps


def _uniform(frames: int, start: int, end: int) -> tuple[int, ...]:
    """F indices in [start, end): the official segment middles; a range shorter than F repeats frames (the official
    K = min(F, end) rule would return fewer, which a fixed-F engine cannot take)."""
    if end - start >= frames:
        return tuple(sample_frame_indices(frames, start, end, "uniform"))
    return tuple(int(x) for x in np.linspace(start, end - 1, frames).round())


def segment_windows(path: str | os.PathLike, segments: list[tuple[float, float, str | None]], frames: int,
                    backend: str = "auto") -> tuple[list[Window], float]:
    """Windows at given (start_sec, end_sec, label) segments, frame ranges by the official rule
    (start = int(start_sec * fps), end = min(int(end_sec * fps), frames))."""
    n, fps = video_info(path, backend)
    out = []
    for start_sec, end_sec, label in segments:
        start_f, end_f = max(0, int(start_sec * fps)), min(int(end_sec * fps), n)
        if start_f >= n or end_f <= start_f:
            raise VideoReadError(path, "out_of_range", f"segment [{start_sec}, {end_sec}] s is outside the video "
                                 f"({n} frames at {fps:g} fps)")
        out.append(Window(float(start_sec), float(end_sec), _uniform(frames, start_f, end_f), label))
    return out, fps


@dataclass
class StageTimes:
    """Seconds spent per stage, accumulated (for summaries and the demo's latency table)."""

    seconds: dict[str, float] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)

    def add(self, stage: str, seconds: float, count: int = 1) -> None:
        self.seconds[stage] = self.seconds.get(stage, 0.0) + seconds
        self.counts[stage] = self.counts.get(stage, 0) + count

    def per_item_ms(self, stage: str) -> float:
        return 1e3 * self.seconds.get(stage, 0.0) / max(1, self.counts.get(stage, 0))


class ClipPipeline:
    """Decode + preprocess for one model input size; `clips(path, windows)` -> float32 (B, F, 3, S, S)."""

    def __init__(self, frames: int, size: int, backend: str = "auto", variant: str = "egoclip",
                 times: StageTimes | None = None):
        from egovlp_deploy import preprocess

        self.frames, self.size, self.backend, self.variant = frames, size, backend, variant
        self.native = preprocess.available()
        self.times = times or StageTimes()

    @property
    def preprocessing(self) -> str:
        return "C++ (egovlp_deploy._C)" if self.native else "torch reference (C++ extension not built)"

    def decode(self, path: str | os.PathLike, windows: list[Window]) -> torch.Tensor:
        """uint8 (B, F, H, W, 3); every distinct frame decoded once."""
        t0 = time.perf_counter()
        flat = [i for w in windows for i in w.indices]
        frames = read_frames(path, flat, self.backend)  # (B*F, H, W, 3)
        out = frames.view(len(windows), self.frames, *frames.shape[1:])
        self.times.add("decode", time.perf_counter() - t0, len(windows))
        return out

    def preprocess(self, frames: torch.Tensor) -> np.ndarray:
        from egovlp_deploy import preprocess
        from egovlp_deploy.transforms import eval_transform

        t0 = time.perf_counter()
        if self.native:
            clips = preprocess.preprocess_clips(frames, self.size, self.variant)
        else:
            clips = torch.stack([eval_transform(c, self.size, self.variant) for c in frames])
        self.times.add("preprocess", time.perf_counter() - t0, len(frames))
        return clips.numpy()

    def clips(self, path: str | os.PathLike, windows: list[Window]) -> np.ndarray:
        return self.preprocess(self.decode(path, windows))

    def clip(self, path: str | os.PathLike, start_sec: float, end_sec: float) -> np.ndarray:
        """One clip [start_sec, end_sec] of a file -> float32 (F, 3, S, S)."""
        windows, _ = segment_windows(path, [(start_sec, end_sec, None)], self.frames, self.backend)
        return self.clips(path, windows)[0]


# -- inputs: files, folders and globs ----------------------------------------------------------------------------
VIDEO_EXTENSIONS = (".mp4", ".mkv", ".mov", ".avi", ".webm", ".m4v", ".mpg", ".mpeg", ".ts", ".mts", ".m2ts",
                    ".3gp", ".wmv", ".flv")

# VideoReadError.reason -> what a user reads; the decoder's own message only with --verbose.
PLAIN_REASONS = {
    "missing": "no such file",
    "corrupt": "not a readable video (damaged, truncated, not a video, or no video stream)",
    "empty": "the video has no frames",
    "out_of_range": "the requested times lie outside the video",
    "too_short": "too short for the requested clip",
    "unreadable": "cannot be opened (permissions?)",
    "no_segments": "no segments given for this video",
}


@dataclass
class InputFailure:
    path: str
    reason: str  # plain words
    detail: str = ""  # the decoder's message

    def line(self) -> str:
        return f"{self.path}: {self.reason}"


def failure_of(path, exc: VideoReadError) -> InputFailure:
    return InputFailure(str(path), PLAIN_REASONS.get(exc.reason, exc.reason), exc.detail)


def failures_summary(failures: list[InputFailure]) -> list[dict]:
    """The `failed` list of an index/features summary (the CLI prints it, --json emits it)."""
    return [asdict(f) for f in failures]


def _videos_in(folder: Path) -> list[Path]:
    """The video files under `folder`, sorted; macOS resource-fork twins (`._name.mp4`) are not videos."""
    return sorted(q for q in folder.rglob("*")
                  if q.suffix.lower() in VIDEO_EXTENSIONS and not q.name.startswith("._") and q.is_file())


def expand_inputs(items: list[str | os.PathLike]) -> tuple[list[Path], list[InputFailure]]:
    """Video files from files (any extension), folders (recursively, the files with a video extension, in sorted
    order) and glob patterns; the same file reached twice is listed once. Paths that are not there are failures."""
    import glob

    found: dict[Path, Path] = {}  # resolved -> as given, first reached first
    failures = []

    def add(files):
        for f in files:
            found.setdefault(f.resolve(), f)

    for item in items:
        p = Path(item)
        if p.is_file():
            add([p])
        elif p.is_dir():
            videos = _videos_in(p)
            add(videos)
            if not videos:
                failures.append(InputFailure(str(item), "no video files in this folder"))
        elif any(c in str(item) for c in "*?["):
            matches = sorted(Path(m) for m in glob.glob(str(item), recursive=True))
            for m in matches:
                add([m] if m.is_file() else _videos_in(m))
            if not matches:
                failures.append(InputFailure(str(item), "no file matches this pattern"))
        else:
            failures.append(InputFailure(str(item), "no such file or folder"))
    return list(found.values()), failures
