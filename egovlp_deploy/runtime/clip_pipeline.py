"""Video file -> decoded frames -> preprocessed clips -> encoder: for whole videos (sliding windows with timestamps)
and for single clips.

Windows are planned on the file's own timeline (each frame's presentation time, `video.Timeline`), so their labels
hold on variable-frame-rate files; each window's F model frames are the official 'uniform' samples of its frame
range (segment middles, `video.sample_frame_indices`), so a window that is an annotated clip gives exactly the
frames the EgoMCQ/EgoClip evaluation readers give. Decoding goes through
`egovlp_deploy.decoding` (decord, PyAV where decord is missing), one open reader per file for all its windows; the
preprocessing is the C++ extension when built (`preprocess.preprocess_clip`, parallel within a frame) and the torch
reference transform otherwise, with the same numbers (1e-5). Each frame is preprocessed as soon as it is decoded
(the transform treats every frame alone), so full-size frames are held one at a time, not a window or a batch of
them: an 8K frame is 200 MB.
"""

from __future__ import annotations

import atexit
import itertools
import math
import os
import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from egovlp_deploy.decoding import (
    Timeline,
    VideoReadError,
    decodable_frames,
    iter_frames,
    read_frames,
    sample_frame_indices,
    stream_frames,
    video_timeline,
    whole_video_backend,
)
from egovlp_deploy.path_text import some_names


@dataclass(frozen=True)
class Window:
    start_sec: float
    end_sec: float
    indices: tuple[int, ...]  # the F decoded frames
    label: str | None = None  # the narration of an annotated segment


def decodable_timeline(path: str | os.PathLike, backend: str = "auto", notes: list[str] | None = None) -> Timeline:
    """The file's timeline, cut to the frames that decode: a truncated or damaged file is used as far as it decodes
    (with a line saying so appended to `notes`); nothing decodable raises VideoReadError."""
    whole = video_timeline(path, backend)
    usable = decodable_frames(path, backend)
    if usable == 0:
        raise VideoReadError(path, "corrupt", "not even the first frame decodes")
    if usable == whole.num_frames:
        return whole
    timeline = whole.truncated(usable)
    if notes is not None:
        notes.append(
            f"only the first {timeline.duration:.2f} s of {whole.duration:.2f} s decode ({usable} of "
            f"{whole.num_frames} frames; damaged or truncated file): used those"
        )
    return timeline


MIN_SECONDS = 1e-3  # the shortest window or stride: finer than any camera's frame interval


def check_seconds(value, name: str) -> float:
    """`value` as a window length or stride in seconds: a finite number >= MIN_SECONDS (NaN would never end the
    window loop; 1e-9 s would plan billions of windows), else ValueError."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number of seconds, got {value!r}")
    if value < MIN_SECONDS:
        raise ValueError(f"{name} must be at least {MIN_SECONDS} s, got {value!r}")
    return float(value)


# The version of how a video's windows are planned (`plan_windows`, `decodable_timeline`): raised with any change
# to the windows a file gets. An index records the version its videos were planned with; a rerun under another one
# plans every video again (re-indexing those whose windows changed), instead of skipping the unchanged files.
PLANNER_VERSION = 1


def plan_windows(
    path: str | os.PathLike,
    frames: int,
    window_sec: float | None = None,
    stride_sec: float | None = None,
    window_frames: int | None = None,
    stride_frames: int | None = None,
    backend: str = "auto",
    notes: list[str] | None = None,
) -> tuple[list[Window], float]:
    """Sliding windows over a whole video -> ([Window], fps).

    In seconds (`window_sec`, `stride_sec`): window k is [k * stride, k * stride + window) s of presentation time
    and samples only frames shown in it, so its label is true on variable-frame-rate files too; a window no frame
    falls in (a gap in a variable-rate recording) is left out. In source frames (`window_frames`,
    `stride_frames`, the EgoMQ/EgoNLQ feature convention): windows of that many frames, labelled with the real
    times of their first frame and of the frame after their last. The last window is clipped at the end of the
    video; a video shorter than one window gives one window over all of it. A file that decodes only partly is
    windowed as far as it decodes (`decodable_timeline`; the reason goes to `notes`)."""
    timeline = decodable_timeline(path, whole_video_backend(backend), notes)
    n, fps = timeline.num_frames, timeline.fps
    out = []
    if window_frames is None:
        window_sec, stride_sec = check_seconds(window_sec, "window"), check_seconds(stride_sec, "stride")
        for k in itertools.count():
            start_sec = k * stride_sec
            end_sec = min(start_sec + window_sec, timeline.duration)
            first, stop = timeline.frames_in(start_sec, end_sec)
            if stop > first:
                out.append(Window(round(start_sec, 4), round(end_sec, 4), _uniform(frames, first, stop)))
            if end_sec >= timeline.duration - Timeline.EPS:  # this window reaches the end of the video
                break
        return out, fps
    if window_frames < 1 or not stride_frames or stride_frames < 1:
        raise ValueError(f"window and stride must be positive, got {window_frames}, {stride_frames} frames")
    for start in range(0, max(1, n - window_frames + stride_frames), stride_frames):
        end = min(n, start + window_frames)
        if end <= start:
            break
        out.append(
            Window(round(timeline.time_of(start), 4), round(timeline.time_of(end), 4), _uniform(frames, start, end))
        )
        if end >= n:
            break
    return out, fps


def _uniform(frames: int, start: int, end: int) -> tuple[int, ...]:
    """F indices in [start, end): the official segment middles; a range shorter than F repeats frames (the official
    K = min(F, end) rule would return fewer, which a fixed-F engine cannot take)."""
    if end - start >= frames:
        return tuple(sample_frame_indices(frames, start, end, "uniform"))
    return tuple(int(x) for x in np.linspace(start, end - 1, frames).round())


def segment_windows(
    path: str | os.PathLike,
    segments: list[tuple[float, float, str | None]],
    frames: int,
    backend: str = "auto",
    notes: list[str] | None = None,
    skip_outside: bool = False,
) -> tuple[list[Window], float]:
    """Windows at given (start_sec, end_sec, label) segments, with the frame ranges the evaluation readers use
    (`Timeline.official_range`: start = int(start_sec * fps), end = min(int(end_sec * fps), frames) on
    constant-rate files; the frames shown in the segment on variable-rate ones).

    A segment outside the video raises VideoReadError; with skip_outside (indexing a video's many annotated
    segments) it is left out with a note, and only a video with no segment inside it raises."""
    timeline = decodable_timeline(path, whole_video_backend(backend), notes)
    n, fps = timeline.num_frames, timeline.fps
    out, outside = [], []
    for start_sec, end_sec, label in segments:
        start_f, end_f = timeline.official_range(start_sec, end_sec)
        if start_f >= n or end_f <= start_f:
            outside.append(f"[{start_sec}, {end_sec}]")
            continue
        out.append(Window(float(start_sec), float(end_sec), _uniform(frames, start_f, end_f), label))
    if outside:
        where = f"outside the video ({n} frames, {timeline.duration:.3f} s)"
        if not skip_outside or len(outside) == 1 == len(segments):
            raise VideoReadError(path, "out_of_range", f"segment {outside[0]} s is {where}")
        if not out:
            raise VideoReadError(path, "out_of_range", f"all {len(outside)} segments are {where} (e.g. {outside[0]} s)")
        if notes is not None:
            left_out = some_names(outside, 3)
            notes.append(f"{len(outside)} of {len(segments)} segments are {where}, left out: {left_out} s")
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

    # Decoded frames are preprocessed in groups of up to this many bytes, one frame at least (a 4K frame is 25 MB,
    # an 8K one 200 MB): one call per group keeps every thread busy on small frames.
    GROUP_BYTES = 64 << 20

    def __init__(
        self, frames: int, size: int, backend: str = "auto", variant: str = "egoclip", times: StageTimes | None = None
    ):
        from egovlp_deploy import preprocess

        self.frames, self.size, self.variant = frames, size, variant
        self.backend = whole_video_backend(backend)  # the decoder that planned the windows numbers their frames
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

    def preprocessed(self, decoded: Iterator[tuple[int, np.ndarray]]) -> Iterator[tuple[int, np.ndarray]]:
        """(index, uint8 (H, W, 3)) -> (index, float32 (3, S, S)): decoded frames are preprocessed in groups of up to
        GROUP_BYTES (one frame at least), as they come, each group in one call (parallel over its frames). The
        transform treats every frame alone, so the numbers are those `preprocess` gives the frame inside a clip."""
        group, held = [], 0
        for index, frame in decoded:
            group.append((index, frame))
            held += frame.nbytes
            del frame  # the group holds it until it is preprocessed
            if held >= self.GROUP_BYTES:
                yield from self._preprocess_group(group)
                group, held = [], 0
        if group:
            yield from self._preprocess_group(group)

    def _preprocess_group(self, group: list[tuple[int, np.ndarray]]) -> list[tuple[int, np.ndarray]]:
        from egovlp_deploy import preprocess
        from egovlp_deploy.transforms import eval_transform

        t0 = time.perf_counter()
        frames = [torch.from_numpy(frame[None]) for _, frame in group]  # one-frame clips (sizes may differ)
        if self.native:
            out = preprocess.preprocess_clips(frames, self.size, self.variant)  # (G, 1, 3, S, S)
        else:
            out = torch.stack([eval_transform(f, self.size, self.variant) for f in frames])
        self.times.add("preprocess", time.perf_counter() - t0, 0)  # callers count clips
        out = out.numpy()
        return [(index, out[g, 0]) for g, (index, _) in enumerate(group)]

    def clips(self, path: str | os.PathLike, windows: list[Window]) -> np.ndarray:
        """float32 (B, F, 3, S, S): `preprocess(decode(...))`, with frames preprocessed as they are decoded
        (`preprocessed`): at most GROUP_BYTES of full-size frames (one frame at least) are held, not B x F frames."""
        frames = iter_frames(path, [i for w in windows for i in w.indices], self.backend)
        done = dict(self.preprocessed(_timed(frames, self.times)))
        self.times.add("decode", 0.0, len(windows))
        self.times.add("preprocess", 0.0, len(windows))
        return np.stack([np.stack([done[i] for i in w.indices]) for w in windows])

    def batches(
        self, path: str | os.PathLike, windows: list[Window], batch: int, threads: int = 0, cut_every: int | None = None
    ) -> Iterator[tuple[int, np.ndarray]]:
        """(number of the batch's first window, float32 clips (b, F, 3, S, S)) for consecutive batches of up to
        `batch` windows; no batch spans a multiple of `cut_every` (a caller's commit boundary).

        Windows in time order (sliding windows) are decoded in one pass over the file (`video.stream_frames`, each
        frame once, `threads` decoder threads) and decoded + preprocessed in a background thread while the caller
        encodes the batch before: the caller's engine and the decoder run at the same time. Windows in any other
        order (annotated segments) are read batch by batch, as `clips` does."""
        if batch < 1 or (cut_every is not None and cut_every < 1):
            raise ValueError(f"batch and cut_every must be >= 1, got {batch}, {cut_every}")
        ranges, first = [], 0
        while first < len(windows):
            end = min(first + batch, len(windows))
            if cut_every is not None:
                end = min(end, (first // cut_every + 1) * cut_every)
            ranges.append((first, end))
            first = end
        starts = [min(w.indices) for w in windows]
        if starts != sorted(starts):
            return ((first, self.clips(path, windows[first:end])) for first, end in ranges)
        return in_background(self._streamed_batches(path, windows, ranges, threads))

    def _streamed_batches(self, path, windows: list[Window], ranges: list[tuple[int, int]], threads: int):
        """Frames are preprocessed as they are decoded (`preprocessed`) and only the preprocessed frame is kept, until
        no later window needs it: at most GROUP_BYTES of full-size frames (one frame at least) are held, however
        large the frames (16 frames of an 8K video are 3.2 GB), plus the decoder's own."""
        frames: dict[int, np.ndarray] = {}  # preprocessed frames some window not yet assembled still needs
        stream = self.preprocessed(
            _timed(stream_frames(path, [i for w in windows for i in w.indices], self.backend, threads), self.times)
        )
        for first, end in ranges:
            clips = []
            for k in range(first, end):
                window = windows[k]
                last = max(window.indices)
                while last not in frames:  # frames arrive in increasing order: all of the window's are in then
                    index, frame = next(stream)
                    frames[index] = frame
                clips.append(np.stack([frames[i] for i in window.indices]))
                if k + 1 < len(windows):  # windows start in time order: the next one needs the earliest frame
                    keep_from = min(windows[k + 1].indices)
                    for index in [i for i in frames if i < keep_from]:
                        del frames[index]
                self.times.add("decode", 0.0)
                self.times.add("preprocess", 0.0)
            yield first, np.stack(clips)

    def clip(self, path: str | os.PathLike, start_sec: float, end_sec: float) -> np.ndarray:
        """One clip [start_sec, end_sec] of a file -> float32 (F, 3, S, S)."""
        windows, _ = segment_windows(path, [(start_sec, end_sec, None)], self.frames, self.backend)
        return self.clips(path, windows)[0]


def _timed(decoded: Iterator, times: StageTimes) -> Iterator:
    """`decoded`, with the time each item takes to come added to the 'decode' stage (clips are counted apart)."""
    while True:
        t0 = time.perf_counter()
        item = next(decoded, None)
        times.add("decode", time.perf_counter() - t0, 0)
        if item is None:
            return
        yield item
        del item


def in_background(items: Iterator, depth: int = 2) -> Iterator:
    """`items`, produced by a background thread up to `depth` ahead of the consumer (decoding while the caller
    encodes; decoders and the C++ preprocessing release the GIL). An exception in the producer is raised in the
    consumer. A consumer that stops early (an error, Ctrl-C) stops the producer at its next item and waits for it to
    close `items` (its decoder): a thread left decoding while the interpreter exits aborts the process."""
    slots: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def offer(entry) -> bool:
        """Put `entry` in a slot unless the consumer has stopped; False when it has."""
        while not stop.is_set():
            try:
                slots.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce():
        try:
            for item in items:
                if not offer((item, None)):
                    return
            offer((done, None))
        except BaseException as exc:  # handed to the consumer, which raises it
            offer((done, exc))
        finally:
            close = getattr(items, "close", None)
            if close is not None:
                close()

    worker = threading.Thread(target=produce, name="egovlp-decode", daemon=True)
    _running.add((stop, worker))
    worker.start()
    try:
        while True:
            item, error = slots.get()
            if error is not None:
                raise error
            if item is done:
                return
            yield item
    finally:
        stop.set()
        worker.join()
        _running.discard((stop, worker))


# Producers whose consumer has not stopped them: a consumer can outlive its caller (an exception that ends the
# program while the batches generator is still referenced). The interpreter's exit stops them first, from atexit:
# a daemon thread still inside the C++ preprocessing when Python finalizes is unwound by pthread_exit through a
# noexcept frame, which aborts the process ("terminate called without an active exception").
_running: set[tuple[threading.Event, threading.Thread]] = set()


@atexit.register
def _stop_producers() -> None:
    running = list(_running)
    for stop, _ in running:
        stop.set()
    for _, worker in running:
        worker.join()


# -- inputs: files, folders and globs ----------------------------------------------------------------------------
VIDEO_EXTENSIONS = (
    ".mp4",
    ".mkv",
    ".mov",
    ".avi",
    ".webm",
    ".m4v",
    ".mpg",
    ".mpeg",
    ".ts",
    ".mts",
    ".m2ts",
    ".3gp",
    ".wmv",
    ".flv",
)

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
    """The video files under `folder`, sorted, any case of extension (.MP4, .MoV). Hidden entries below `folder` (a
    name starting with '.') are left out, as a shell glob leaves them out: macOS resource-fork twins (`._name.mp4`,
    not videos), a desktop's trash (`.Trash-1000/files/`: deleted videos), editors' and players' caches. A hidden
    file or folder named on the command line is read. Symbolic links to folders are not followed (no loops)."""
    return sorted(
        q
        for q in folder.rglob("*")
        if q.suffix.lower() in VIDEO_EXTENSIONS
        and not any(part.startswith(".") for part in q.relative_to(folder).parts)
        and q.is_file()
    )


def video_uid(path: Path) -> str:
    """The video's id: its folder's name in the EgoClip chunked layout ROOT/<uid>/<chunk number>.mp4, else its
    file stem (how --segments rows and search results name it)."""
    return path.parent.name if path.stem.isdigit() else path.stem


def expand_inputs(items: list[str | os.PathLike]) -> tuple[list[Path], list[InputFailure]]:
    """Video files from files (any extension), folders (recursively, the files with a video extension, in sorted
    order) and glob patterns (the files they match with a video extension, or, where none has one, every file they
    match: `clips/*.dat`); the same file reached twice is listed once. Paths that are not there are failures. A
    pattern such as `in/**` thus leaves out what is not a video, a features or index output inside `in/` included."""
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
            files = [m for m in matches if m.is_file()]
            videos = [m for m in files if m.suffix.lower() in VIDEO_EXTENSIONS]
            add(videos or files)
            for m in matches:
                if m.is_dir():
                    add(_videos_in(m))
            if not matches:
                failures.append(InputFailure(str(item), "no file matches this pattern"))
        else:
            failures.append(InputFailure(str(item), "no such file or folder"))
    return list(found.values()), failures
