"""Video reading: which frames the official EgoVLPv2 loaders sample, and decoding them with decord or PyAV.

The module reads top to bottom:
  1. `VideoReadError`, the one exception a bad file raises (its message names the file, `.reason` classifies it).
  2. Frame-index rules, pure functions: `sample_frame_indices` (official `sample_frames_start_end`, EgoClip / EgoMCQ /
     Charades) and `epic_frame_indices` (the LaViLa-style EK-100 `get_frame_ids`).
  3. Backends: decord (default where importable) and PyAV (the fallback: decord has no aarch64 wheel).
  4. Public readers: `video_info`, `read_frames`, `read_clip` (the file's real fps, like the official Charades reader).
  5. The chunked EgoClip layout `{root}/{video_uid}/{chunk}.mp4` (600 s chunks): `egoclip_chunk`, `read_egoclip_clip`.
  6. `ClipLoader`: the strict/lax policy of the official datasets, with failure counts.

Frames are torch.uint8 (F, H, W, 3), RGB, as decord returns them. Deliberate differences from the official readers
are listed in `read_egoclip_clip`.
"""

from __future__ import annotations

import bisect
import collections
import ctypes
import functools
import inspect
import itertools
import math
import os
import random as _random
import sys
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .errors import error_line

if TYPE_CHECKING:
    from types import ModuleType

BACKENDS = ("auto", "decord", "pyav")
EGOCLIP_CHUNK_SEC = 600  # utils/video_chunk.py cuts every Ego4D video into 600-second files

# Failure reasons (the keys of `ClipLoader.failures`).
MISSING = "missing"  # no such file
CORRUPT = "corrupt"  # cannot be opened or decoded (truncated, not a video, ...)
OUT_OF_RANGE = "out_of_range"  # clip times (or frame indices) outside the video
EMPTY = "empty"  # the video, or the clip, has zero frames
TOO_SHORT = "too_short"  # 'rand' sampling found an empty segment (the official code raises IndexError)
UNREADABLE = "unreadable"  # the file is there but cannot be opened (permissions)


# -- 1. errors --------------------------------------------------------------------------------------------------
class VideoReadError(ValueError):
    """A video cannot be read as asked. `str(err)` names the file; `err.reason` is one of the reasons above."""

    def __init__(self, path: str | os.PathLike, reason: str, detail: str) -> None:
        self.path, self.reason, self.detail = str(path), reason, detail
        super().__init__(f"{path}: {detail} [{reason}]")

    def __reduce__(
        self,
    ) -> tuple[
        type[VideoReadError], tuple[str, str, str]
    ]:  # keep the exception picklable (DataLoader workers send it to the main process)
        return type(self), (self.path, self.reason, self.detail)


# -- 2. frame-index rules ---------------------------------------------------------------------------------------
def sample_frame_indices(
    num_frames: int,
    start_frame: int,
    end_frame: int,
    sample: str,
    rng: _random.Random | None = None,
    fix_start: int | None = None,
) -> list[int]:
    """The official `sample_frames_start_end` (EgoVLPv2/base/base_dataset.py), reproduced with its edge cases.

    K = min(num_frames, end_frame) frames -- `end_frame`, not the clip length, so a clip that ends in the first
    F frames of the video yields fewer than F indices (and end_frame == 0 yields none). The boundaries are
    `linspace(start, end, K + 1)` truncated to int; segment i is [b_i, b_{i+1} - 1].
      'rand'    (training): `rng.choice(range(b_i, b_{i+1} - 1))`, i.e. uniform on [b_i, b_{i+1} - 2]; a segment
                narrower than 2 frames has nothing to choose from and raises ValueError (official: IndexError).
                `fix_start` is ignored, as in the official code.
      fix_start (with 'uniform'): b_i + fix_start.
      'uniform' (evaluation): the segment middle (b_i + b_{i+1} - 1) // 2.
    `rng` defaults to the global `random` module, which the official code uses.
    """
    if sample not in ("rand", "uniform"):
        raise ValueError(f"sample must be 'rand' or 'uniform', got {sample!r}")
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    if start_frame < 0 or end_frame < start_frame:
        raise ValueError(f"need 0 <= start_frame <= end_frame, got [{start_frame}, {end_frame}]")
    count = min(num_frames, end_frame)
    bounds = np.linspace(start=start_frame, stop=end_frame, num=count + 1).astype(int).tolist()
    segments = [(bounds[i], bounds[i + 1] - 1) for i in range(count)]
    if sample == "rand":
        rng = _random if rng is None else rng
        indices = []
        for first, last in segments:
            if last - first < 1:
                raise ValueError(
                    f"frames [{start_frame}, {end_frame}) are too few for {count} 'rand' segments "
                    f"(segment [{first}, {last}] has no frame to choose)"
                )
            indices.append(rng.choice(range(first, last)))
        return indices
    if fix_start is not None:
        return [first + fix_start for first, _ in segments]
    return [(first + last) // 2 for first, last in segments]


def epic_frame_indices(
    start_frame: int, end_frame: int, num_segments: int, jitter: bool, rng: _random.Random | None = None
) -> list[int]:
    """EK-100 `get_frame_ids` (LaViLa style, data_loader/EpicKitchens_MIR_dataset.py).

    The span is cut into `num_segments` segments of (end - start - 1) / n frames; segment i covers
    [round(s*i) + start, min(round(s*(i+1)) + start, end)] (numpy round: half to even). jitter (training): a
    uniform frame in that closed range (official: np.random.randint(lo, hi + 1)); otherwise its middle (lo+hi)//2.
    Note the last index may equal `end_frame` itself, as in the official code.
    """
    if num_segments < 1:
        raise ValueError(f"num_segments must be >= 1, got {num_segments}")
    if start_frame < 0 or end_frame <= start_frame:
        raise ValueError(f"need 0 <= start_frame < end_frame, got [{start_frame}, {end_frame}]")
    rng = _random if rng is None else rng
    seg_size = float(end_frame - start_frame - 1) / num_segments
    indices = []
    for i in range(num_segments):
        lo = int(np.round(seg_size * i) + start_frame)
        hi = min(int(np.round(seg_size * (i + 1)) + start_frame), end_frame)
        indices.append(rng.randint(lo, hi) if jitter else (lo + hi) // 2)
    return indices


def epic_frame_range(start_sec: float, end_sec: float, fps: float) -> tuple[int, int]:
    """EK-100 start/end frame from timestamps: round(fps * start), ceil(fps * end) (official __getitem__)."""
    return int(np.round(fps * start_sec)), int(np.ceil(fps * end_sec))


# -- 2b. presentation times -------------------------------------------------------------------------------------
class Timeline:
    """When each frame of a video is shown: `times[i]` is frame i's presentation time in seconds, frames in
    presentation order (the order both backends number them), time 0 at the first frame.

    Constant-rate files (every frame within a quarter frame of i / fps) keep the exact grid i / fps, so their frame
    numbers are the official `int(t * fps)` ones. Variable-rate files (phones, wearables) use the container's
    timestamps: frame i is not at i / fps there, and a time maps to the frames actually shown then.
    """

    # Timestamps closer than this to a window edge count as on it (decord reports float32 seconds).
    EPS = 1e-4

    def __init__(self, times: Sequence[float] | np.ndarray, fps: float) -> None:
        times = np.asarray(times, dtype=np.float64)
        if times.ndim != 1 or fps <= 0 or not math.isfinite(fps):
            raise ValueError(f"a timeline needs 1-D times and a positive fps, got shape {times.shape}, fps {fps}")
        self.fps, self.num_frames = float(fps), len(times)
        grid = np.arange(self.num_frames, dtype=np.float64) / self.fps
        relative = times - times[0] if self.num_frames else times
        increasing = bool(np.all(np.diff(relative) > 0)) and bool(np.all(np.isfinite(relative)))
        # Timestamps that do not increase (missing or broken in the container) say nothing: the rate grid it is.
        self.constant_rate = (
            not increasing or self.num_frames < 2 or float(np.max(np.abs(relative - grid))) <= 0.25 / self.fps
        )
        self.times = grid if self.constant_rate else relative
        if self.constant_rate or self.num_frames < 2:
            self.duration = self.num_frames / self.fps
        else:  # the last frame lasts as long as the interval before it
            self.duration = float(2 * self.times[-1] - self.times[-2])

    @classmethod
    def constant(cls, num_frames: int, fps: float) -> Timeline:
        return cls(np.arange(num_frames) / fps, fps)

    def first_at_or_after(self, t: float) -> int:
        """Index of the first frame shown at or after time t (num_frames when none is)."""
        return int(np.searchsorted(self.times, t - self.EPS, side="left"))

    def frames_in(self, start_sec: float, end_sec: float) -> tuple[int, int]:
        """[a, b): the frames whose presentation time lies in [start_sec, end_sec)."""
        return self.first_at_or_after(start_sec), self.first_at_or_after(end_sec)

    def official_range(self, start_sec: float, end_sec: float) -> tuple[int, int]:
        """[a, b) of a clip by the official readers' rule on constant-rate files (a = max(0, int(start * fps)),
        b = min(int(end * fps), num_frames): the frame on screen at `start` up to the one on screen at `end`,
        exclusive); the frames shown in [start, end) on variable-rate files."""
        if self.constant_rate:
            return max(0, int(start_sec * self.fps)), min(int(end_sec * self.fps), self.num_frames)
        return self.frames_in(start_sec, end_sec)

    def time_of(self, index: int) -> float:
        """Start time of frame `index`; num_frames gives the end of the video."""
        return float(self.times[index]) if index < self.num_frames else self.duration

    def truncated(self, num_frames: int) -> Timeline:
        """The first `num_frames` frames (a file that decodes only so far)."""
        return (
            Timeline(self.times[:num_frames] if not self.constant_rate else np.arange(num_frames) / self.fps, self.fps)
            if num_frames < self.num_frames
            else self
        )


# -- 3. backends ------------------------------------------------------------------------------------------------
@functools.cache
def _libstdcxx_global() -> None:
    """The system libstdc++ into the process's global symbol scope (once; Linux; absent is fine)."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libstdc++.so.6", mode=ctypes.RTLD_GLOBAL)
        except OSError:  # no system libstdc++ (a static-only environment): nothing to put first
            pass


def import_decord() -> ModuleType:
    """`import decord`, with the system libstdc++ in the process's global symbol scope first.

    Why: libdecord.so carries its own copy of `__cxa_thread_atexit` (a static libstdc++) and decord loads it with
    RTLD_GLOBAL, so C++ code loaded after it — AOTInductor packages — registers its thread_local destructors with
    decord's copy, and the process dies at exit ("double free or corruption" / SIGSEGV inside decord's exit handler;
    BENCHMARKS.md). A global libstdc++ loaded first wins those lookups.
    Only effective when decord is first imported through here.

    decord's FFmpeg logs go quiet ("moov atom not found" printed beside the one-line error that names the file):
    every failure reaches the caller as an exception, whose message `--verbose` shows."""
    _libstdcxx_global()
    import decord

    decord.logging.set_level(decord.logging.QUIET)
    return decord


def _decord_available() -> bool:
    try:
        import_decord()
    except ImportError:
        return False
    return True


def resolve_backend(backend: str = "auto") -> str:
    """'auto' -> 'decord' when importable, else 'pyav'. An explicitly named backend must be importable."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "decord" if _decord_available() else "pyav"
    if backend == "decord" and not _decord_available():
        raise ImportError(
            "backend 'decord' was asked for but decord is not installed (no aarch64 wheel: use backend='pyav')"
        )
    return backend


def _first_line(exc: BaseException) -> str:
    return error_line(exc, 300)[:300]  # decord appends a long C++ stack trace after its first line


class _DecordVideo:
    """decord.VideoReader behind the small interface both backends share: num_frames, fps, get(indices),
    each(indices)."""

    # `each` reads at most this many frames, and bytes of them, per decord call (a 4K frame is 25 MB, an 8K one 200)
    CALL_FRAMES = 32
    CALL_BYTES = 64 << 20
    # What an open reader holds once it has decoded, in RGB frames of its size (decoded frames queued besides the
    # codec's reference frames: measured ~250 MB for a 3840x2160 file, ~68 MB for 1920x1080; ~3 MB before decoding)
    HELD_FRAMES = 11
    frame_bytes = 0  # H x W x 3 of its frames, known from the first frame it decodes

    def __init__(self, path: Path) -> None:
        decord = import_decord()
        self._errors = (RuntimeError, decord.DECORDError)
        self.path = path
        self._fd = None
        name = str(path)
        if not _utf8(name):
            # decord hands the name to C as UTF-8, which a name in another encoding (os.fsdecode's surrogates)
            # cannot be: open the file and give decord the descriptor's ASCII /proc path instead (Linux).
            try:
                self._fd = os.open(path, os.O_RDONLY)
            except OSError as exc:
                raise VideoReadError(path, UNREADABLE, f"cannot open the file ({exc.strerror})") from exc
            name = f"/proc/self/fd/{self._fd}"
            if not os.path.exists(name):
                self.close()
                raise VideoReadError(
                    path,
                    CORRUPT,
                    "decord cannot open a file whose name is not UTF-8 on this system; use the PyAV decoder",
                )
        try:
            self._reader = decord.VideoReader(name, num_threads=1)
            self.num_frames = len(self._reader)
            self.fps = float(self._reader.get_avg_fps())
            times = self._reader.get_frame_timestamp(np.arange(self.num_frames))[:, 0] if self.num_frames else []
            self.timeline = Timeline(times, self.fps if self.fps > 0 else 30.0)
        except self._errors as exc:
            self.close()
            raise VideoReadError(path, CORRUPT, f"cannot open the video ({_first_line(exc)})") from exc

    def get(self, indices: Sequence[int]) -> np.ndarray:
        """uint8 (n, H, W, 3) for increasing, distinct `indices`."""
        # decord miscomputes the frame buffer of some sizes: rotated frames (a 48x64 frame turned by 90 degrees
        # fails its size check, a 64x48 one comes back as (64, 48, 4)) and tiny ones (2x2); PyAV decodes them.
        rotated_hint = (
            "decord cannot convert this video's frames at their size (a rotated or very small frame); decode it "
            "with the PyAV decoder (--decoder pyav)"
        )
        try:
            frames = self._reader.get_batch(list(indices)).asnumpy()
        except self._errors as exc:
            if "size must exactly match" in str(exc):
                raise VideoReadError(self.path, CORRUPT, rotated_hint) from exc
            raise VideoReadError(
                self.path, CORRUPT, f"cannot decode frames {list(indices)} ({_first_line(exc)})"
            ) from exc
        if frames.ndim != 4 or frames.shape[-1] != 3:
            raise VideoReadError(self.path, CORRUPT, f"{rotated_hint} (frames of shape {frames.shape[1:]})")
        if len(frames):
            self.frame_bytes = frames[0].nbytes
        return frames

    @property
    def held_bytes(self) -> int:
        """An estimate of the memory this open reader holds (`HELD_FRAMES`; 0 before it has decoded)."""
        return self.HELD_FRAMES * self.frame_bytes

    def each(self, indices: Sequence[int]) -> Iterator[np.ndarray]:
        """uint8 (H, W, 3) for each of increasing, distinct `indices`, decoded in calls of up to CALL_FRAMES frames
        and CALL_BYTES bytes (one frame at least): a caller that keeps only what it makes of each frame holds about
        one call's frames, however large they are."""
        at, per_call = 0, 1  # the first call reads one frame, whose size sets the others'
        while at < len(indices):
            chunk = self.get(indices[at : at + per_call])
            at += len(chunk)
            per_call = max(1, min(self.CALL_FRAMES, self.CALL_BYTES // max(chunk[0].nbytes, 1)))
            yield from chunk
            del chunk

    def close(self) -> None:
        self._reader = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _utf8(name: str) -> bool:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _upright_rgb(reformatter, frame) -> np.ndarray:
    """A PyAV frame -> uint8 (H, W, 3) RGB, turned as its display matrix says (a portrait phone clip is stored
    landscape with a rotation the player applies)."""
    rgb = reformatter.reformat(frame, format="rgb24").to_ndarray()
    turns = round(getattr(frame, "rotation", 0) / 90) % 4  # the display matrix's counter-clockwise angle
    return np.ascontiguousarray(np.rot90(rgb, turns)) if turns else rgb


def _video_stream(container, path):
    """The video stream a file is read from: FFmpeg's best video stream (`av_find_best_stream`, which decord reads
    too), never an attached picture (an mp4's or mkv's cover art, an audio file's album art). A file with no moving
    picture, or a still image under a video name (FFmpeg's image demuxers), raises VideoReadError."""
    import av

    if container.format.name == "image2" or container.format.name.endswith("_pipe"):
        raise VideoReadError(
            path, CORRUPT, f"a still image ({container.format.name.removesuffix('_pipe')}), not a video"
        )
    attached = av.stream.Disposition.attached_pic
    moving = [s for s in container.streams.video if not s.disposition & attached]
    if not moving:
        only = " (only a cover picture)" if container.streams.video else ""
        raise VideoReadError(path, CORRUPT, f"the file has no video stream{only}")
    try:
        best = container.streams.best("video")
    except (av.error.FFmpegError, ValueError):
        best = None
    return best if best is not None and best.index in {s.index for s in moving} else moving[0]


def _numbered(timing: _PyAVVideo, frames, from_start: bool = False):
    """(index, frame) for the decoded frames of one run of decoding, numbered as the packet-time table says.
    A frame that repeats the previous frame's timestamp is the next frame (the table lists the timestamp twice).
    A stream without timestamps is numbered by its order from the start of the file."""
    previous = None  # (index, pts) of the frame before
    for frame in frames:
        if timing._pts is None and (from_start or frame.pts is None):
            if not from_start:
                return  # no timestamps to number a run that starts mid-file by
            index = 0 if previous is None else previous[0] + 1
        elif frame.pts is None:
            continue
        else:
            index = timing._index_of(frame)
            if previous is not None and index <= previous[0] and frame.pts == previous[1]:
                index = previous[0] + 1
        previous = (index, frame.pts)
        yield index, frame


def _run_reaching(target: int, key_gap: int, seek_to, from_start):
    """A run of decoding whose first frame is at or before `target` -> ((index, frame) iterator, its first pair or
    None). seek_to(start) starts a run at the key frame at or before frame `start` and returns (iterator, first pair),
    or None where seeking cannot help; from_start() starts one at the first frame of the file.

    A seek may land after the target (MPEG-TS: the demuxer seeks by an estimated position and the decoder starts at
    the next key frame it finds) or on nothing: then it seeks further back, `key_gap` frames (at least one) the first
    time and twice as far each time after, and finally decodes from the start of the file."""
    back = 0
    while True:
        start = max(target - back, 0)
        run = seek_to(start)
        if run is None:
            break
        if run[1] is not None and run[1][0] <= target:
            return run
        if start == 0:
            break
        back = max(2 * back, key_gap, 1)
    return from_start()


class _PyAVVideo:
    """PyAV with seeking. Frame i is the i-th frame in presentation order, as decord numbers them: the stream's
    packet timestamps, sorted, give each frame's index and time (`timeline`), read once when the file opens (the
    demuxer reads packets without decoding them, as decord does when it opens a file). Seeking keeps a read from a
    600 s chunk from decoding every frame before the clip. Rotation metadata (a phone's portrait clip) is applied,
    as decord does."""

    # A target at most this many frames ahead is reached by decoding on rather than seeking (one GOP of a 30 fps
    # Ego4D video). Once two key frames have been seen, the observed key-frame interval replaces it: in an
    # all-intra file a seek lands on the target itself, so decoding on through the frames before it is wasted work.
    SEEK_GAP = 64
    _KEY_GAPS: dict[str, int] = {}  # path -> observed key-frame interval; outlives the readers the LRU cache closes
    # (path, size, mtime_ns) -> (sorted packet timestamps as int64 array, or None; packet count). Reading the table
    # demuxes the whole file (~110 ms for a 600 s 30 fps chunk, six times a 16-frame clip read at 224 px), and
    # training reopens the same chunks long after the reader LRU closed them; a changed file has another key. Kept
    # under a total of PACKET_TABLE_BUDGET timestamps (8 bytes each), least recently used first out.
    PACKET_TABLE_BUDGET = 4_000_000
    _packet_tables: OrderedDict = OrderedDict()
    _packet_tables_lock = threading.Lock()  # the clip pipeline's decode thread opens files beside the caller
    # What an open reader holds once it has decoded, in RGB frames of its size (the codec's reference and threading
    # frames: measured ~95 MB for a 3840x2160 file, ~27 MB for 1920x1080; ~6 MB before decoding)
    HELD_FRAMES = 4
    frame_bytes = 0  # H x W x 3 of its frames, known from the first frame it decodes

    def __init__(self, path: Path) -> None:
        import av
        from av.video.reformatter import VideoReformatter

        self._errors = (av.error.FFmpegError, OSError, EOFError)
        self.path = path
        try:
            self._container = av.open(str(path))
            # One converter per reader: frame.to_ndarray(format=...) builds a new swscale context for every frame,
            # which costs several times the conversion itself (the same pixels either way).
            self._reformatter = VideoReformatter()
            stream = self._stream = _video_stream(self._container, path)
            self._stream_index = stream.index
            rate = stream.average_rate or stream.guessed_rate or stream.codec_context.framerate
            if not rate:
                raise VideoReadError(path, CORRUPT, "the video stream declares no frame rate")
            self._rate = Fraction(rate)
            self._time_base = Fraction(stream.time_base)
            self.fps = float(self._rate)
            times = self._packet_times()
            self._pts = None if times is None else times.tolist()  # sorted presentation timestamps, or None
            if self._pts is None:
                # `self._stream`, not `stream`: the packet scan reopened the file, and the old stream died with it
                self._start = self._stream.start_time or 0
                self.num_frames = self._stream.frames or self._packets
                self.timeline = Timeline.constant(self.num_frames, self.fps)
            else:
                self._start = self._pts[0] if self._pts else 0  # a list: empty for a stream without packets
                # A timestamp two frames share maps to the first of them (`_numbered` counts on from there).
                self._index_by_pts = dict(zip(reversed(self._pts), range(len(self._pts) - 1, -1, -1)))
                self.num_frames = len(self._pts)
                # int / int is correctly rounded, so this equals float(Fraction(p - start) * time_base), 10x faster
                num, den = self._time_base.numerator, self._time_base.denominator
                self.timeline = Timeline([(p - self._start) * num / den for p in self._pts], self.fps)
            self._last_key = None  # index of the last key frame decoded
            self._key_gap = self._KEY_GAPS.get(str(path), self.SEEK_GAP)  # frames between key frames, once seen
        except VideoReadError:
            self.close()
            raise
        except self._errors as exc:
            self.close()
            raise VideoReadError(path, CORRUPT, f"cannot open the video ({_first_line(exc)})") from exc

    def _packet_times(self) -> np.ndarray | None:
        """The video packets' presentation timestamps, sorted and distinct (None when a packet has none, as in raw
        elementary streams); `_packets` counts the packets. Only packets the demuxer can read are counted, so a
        truncated file lists the frames that are there. Remembered per file identity (`_packet_tables`)."""
        try:
            st = os.stat(self.path)
            key = (str(self.path), st.st_size, st.st_mtime_ns)
        except OSError:
            key = None
        cls = type(self)
        with cls._packet_tables_lock:
            found = cls._packet_tables.get(key)
            if found is not None:
                cls._packet_tables.move_to_end(key)
        if found is not None:
            times, self._packets = found
            return times
        times, self._packets = self._demux_packet_times()
        if key is not None:
            with cls._packet_tables_lock:
                tables = cls._packet_tables
                tables[key] = (times, self._packets)
                held = sum(0 if t is None else len(t) for t, _ in tables.values())
                while held > self.PACKET_TABLE_BUDGET and len(tables) > 1:
                    old, _ = tables.popitem(last=False)[1]
                    held -= 0 if old is None else len(old)
        return times

    def _demux_packet_times(self) -> tuple[np.ndarray | None, int]:
        """Reads every video packet (no decoding): (sorted timestamps or None, packet count). A timestamp two
        packets share counts twice: each packet is a frame (decord counts them so too), shown one after the other."""
        times, missing, count = [], False, 0
        try:
            for packet in self._container.demux(self._stream):
                if packet.size > 0:
                    count += 1
                    if packet.pts is None:
                        missing = True
                    else:
                        times.append(packet.pts)
        except self._errors:  # a damaged tail: the packets before it are the video
            pass
        self._reopen()
        return (None if missing else np.sort(np.array(times, dtype=np.int64))), count

    def _reopen(self) -> None:
        """A fresh demuxer at the start of the file (a raw elementary stream, or a stream without packets, cannot
        seek back to its start)."""
        import av

        index = self._stream_index
        self._container.close()
        self._container = av.open(str(self.path))
        self._stream = self._container.streams.get(index)[0]
        self._last_key = None

    def _index_of(self, frame) -> int:
        if self._pts is None:
            return round((frame.pts - self._start) * self._time_base * self._rate)
        index = self._index_by_pts.get(frame.pts)
        if index is None:  # a frame whose timestamp no packet declared: the last listed one at or before it
            index = max(0, bisect.bisect_right(self._pts, frame.pts) - 1)
        return index

    def _pts_of(self, index: int) -> int:
        if self._pts is None:
            return self._start + math.floor(Fraction(index) / (self._rate * self._time_base))
        return self._pts[min(index, len(self._pts) - 1)]

    def _seek(self, index: int):
        self._container.seek(self._pts_of(index), stream=self._stream, backward=True, any_frame=False)
        self._last_key = None  # key frames are consecutive only within one run of decoding
        return self._container.decode(self._stream)

    def _run_to(self, target: int):
        """A run of decoding whose first frame is at or before `target` -> ((index, frame) iterator, its first pair
        or None), by `_run_reaching`: a seek that fails, or that finds no frame in a stream without timestamps, goes
        straight to decoding from the start of the file, which is also the way through a stream that cannot seek at
        all (a raw elementary stream)."""

        def seek_to(start: int):
            try:
                numbered = _numbered(self, self._seek(start))
                first = next(numbered, None)
            except self._errors:
                return None
            return None if first is None and self._pts is None else (numbered, first)

        def from_start():
            self._reopen()
            numbered = _numbered(self, self._container.decode(self._stream), from_start=True)
            return numbered, next(numbered, None)

        return _run_reaching(target, self._key_gap, seek_to, from_start)

    def _rgb(self, frame) -> np.ndarray:
        rgb = _upright_rgb(self._reformatter, frame)
        self.frame_bytes = rgb.nbytes
        return rgb

    @property
    def held_bytes(self) -> int:
        """An estimate of the memory this open reader holds (`HELD_FRAMES`; 0 before it has decoded)."""
        return self.HELD_FRAMES * self.frame_bytes

    def get(self, indices: Sequence[int]) -> np.ndarray:
        """uint8 (n, H, W, 3) for increasing, distinct `indices`."""
        return _stacked(self.each(indices), len(indices))

    def each(self, indices: Sequence[int]) -> Iterator[np.ndarray]:
        """uint8 (H, W, 3) for each of increasing, distinct `indices`, decoded one at a time."""
        decoded = None  # the (index, frame) iterator; restarted by every seek
        current = None  # (index, frame) of the last decoded frame
        try:
            for target in indices:
                if current is None or target < current[0] or target - current[0] > max(self._key_gap, 1):
                    decoded, current = self._run_to(target)
                    if current is not None and current[1].key_frame:
                        self._note_key_frame(current[0])
                while current is None or current[0] < target:
                    pair = None if decoded is None else next(decoded, None)
                    if pair is None:
                        reached = "no frame" if current is None else f"frame {current[0]}"
                        raise VideoReadError(
                            self.path,
                            CORRUPT,
                            f"the stream ends at {reached} before frame {target} of {self.num_frames} (truncated?)",
                        )
                    current = pair
                    if pair[1].key_frame:
                        self._note_key_frame(pair[0])
                # A timestamp gap (frames the decoder drops) gives the next frame that exists.
                yield self._rgb(current[1])
        except self._errors as exc:
            raise VideoReadError(self.path, CORRUPT, f"cannot decode frames ({_first_line(exc)})") from exc

    def _note_key_frame(self, index: int) -> None:
        if self._last_key is not None and index > self._last_key:
            self._key_gap = self._KEY_GAPS[str(self.path)] = index - self._last_key
        self._last_key = index

    def close(self) -> None:
        container = getattr(self, "_container", None)
        if container is not None:
            container.close()
            self._container = None


def _stacked(frames: Iterator[np.ndarray], count: int) -> np.ndarray:
    """`count` arrays of one shape -> one (count, ...) array, each copied in as it comes (a list and np.stack would
    hold every frame twice). Arrays of different shapes raise ValueError, as np.stack does."""
    out = None
    for row, frame in enumerate(frames):
        if out is None:
            out = np.empty((count, *frame.shape), frame.dtype)
        elif frame.shape != out.shape[1:]:
            raise ValueError(f"all input arrays must have the same shape: {out.shape[1:]} and {frame.shape}")
        out[row] = frame
    if out is None or row + 1 != count:
        raise ValueError(f"expected {count} arrays, got {0 if out is None else row + 1}")
    return out


class _DecodedVideo:
    """Every frame of a video, decoded once (front to back, no seeks) and kept as uint8 (N, H, W, 3)."""

    def __init__(self, reader: _DecordVideo | _PyAVVideo) -> None:
        self.path, self.fps, self.num_frames, self.timeline = (
            reader.path,
            reader.fps,
            reader.num_frames,
            reader.timeline,
        )
        self.frames = reader.get(range(reader.num_frames))

    @property
    def nbytes(self) -> int:
        return self.frames.nbytes

    def get(self, indices: Sequence[int]) -> np.ndarray:
        return self.frames[list(indices)]

    def each(self, indices: Sequence[int]) -> Iterator[np.ndarray]:
        return (self.frames[i] for i in indices)

    def close(self) -> None:
        pass


class _DecodedCache:
    """Per-process LRU of fully decoded videos under a byte budget (`frame_cache_bytes` of the readers below).

    Why: a training epoch reads each clip of a small dataset again (the synthetic set: 2,400 clips of 240 20-second
    videos, 1.8 GB decoded at 64 px), and seeking + decoding + colour conversion for every clip costs DataLoader
    worker CPU that a machine with few cores takes from the training step. The same frames come back, so the same
    bits. A video whose decoded size alone exceeds the budget is read from the file, uncached.
    """

    def __init__(self) -> None:
        self._videos: OrderedDict = OrderedDict()
        self._refused: set = set()  # files too large for the budget, or not decodable to the end
        self._pid, self.nbytes = os.getpid(), 0

    def _own(self) -> None:
        if self._pid != os.getpid():  # a forked worker starts empty (the parent's arrays stay the parent's)
            self._videos, self._refused, self._pid, self.nbytes = OrderedDict(), set(), os.getpid(), 0

    def get(self, key: tuple[str, str, int, int], budget: int) -> _DecodedVideo | None:
        self._own()
        video = self._videos.get(key)
        if video is not None:
            self._videos.move_to_end(key)
            self._shrink(budget)
        return self._videos.get(key)

    def worth_trying(self, key: tuple[str, str, int, int], reader: _DecordVideo | _PyAVVideo, budget: int) -> bool:
        """Would the whole video fit in the budget (judged once per file, from its first frame)?"""
        self._own()
        if key not in self._refused:
            if reader.get([0]).nbytes * reader.num_frames <= budget:
                return True
            self.refuse(key)
        return False

    def refuse(self, key: tuple[str, str, int, int]) -> None:
        self._refused.add(key)

    def add(self, key: tuple[str, str, int, int], video: _DecodedVideo, budget: int) -> _DecodedVideo:
        self._own()
        self._videos[key] = video
        self.nbytes += video.nbytes
        self._shrink(budget)
        return video

    def _shrink(self, budget: int) -> None:
        while self.nbytes > budget and self._videos:
            self.nbytes -= self._videos.popitem(last=False)[1].nbytes

    def clear(self) -> None:
        self._videos.clear()
        self._refused.clear()
        self.nbytes = 0


_DECODED = _DecodedCache()


def release_frame_cache() -> None:
    """Free this process's decoded videos (with num_workers=0 they live in the training process itself)."""
    _DECODED.clear()


class _open_video:
    """Context manager: the opened video (missing file and zero frames raise VideoReadError).

    Opened readers are kept in a small per-process LRU cache keyed by path, size and mtime: re-opening costs more
    than the read itself (opening a file and its first seek take longer than a short read on an open reader), and
    training reads many clips of the same chunk files. A changed file gets a fresh reader. The cache keeps at most
    CAPACITY readers holding at most HELD_BYTES together (`held_bytes`); a reader in use is never closed for it.
    """

    CAPACITY = 32
    HELD_BYTES = 1 << 30  # by `held_bytes`: an open 4K decord reader holds ~250 MB, 32 would hold 8 GB a worker
    _cache: OrderedDict = OrderedDict()
    _in_use: collections.Counter = collections.Counter()  # id(reader) -> `with` blocks using it now
    # the cache's bookkeeping, one thread at a time (the clip pipeline's decode thread reads beside its caller, and a
    # service may run pipelines in several threads): another thread's `_shrink` never closes a reader just taken
    _lock = threading.RLock()
    _inherited: list = []  # readers a forked process got from its parent: kept, never used or closed
    _decord_refused: set = set()  # files decord could not open and PyAV could (backend 'auto' reads them with PyAV)
    _pid = os.getpid()

    def __init__(self, path: str | os.PathLike, backend: str, frame_cache_bytes: int = 0) -> None:
        self.path, self.backend = Path(path), resolve_backend(backend)
        # 'auto' may fall back per file: a file decord cannot open (a truncated mp4 whose index lists frames that
        # are not there) is often still readable by PyAV as far as its data goes.
        self.fallback = backend == "auto" and self.backend == "decord"
        self.frame_cache_bytes = frame_cache_bytes

    @classmethod
    def _after_fork(cls) -> None:
        """In a forked process (a DataLoader worker): never share the parent's decoder state, and never destroy it
        either: a decord reader's destructor joins its decoding thread, which does not exist in the fork, so dropping
        the inherited readers hangs the worker. They stay referenced, unused. The locks start afresh: a thread of the
        parent may have held them at the fork."""
        cls._inherited.append(cls._cache)
        cls._cache, cls._in_use, cls._pid = OrderedDict(), collections.Counter(), os.getpid()
        cls._lock = threading.RLock()
        _PyAVVideo._packet_tables_lock = threading.Lock()

    @classmethod
    def _evict_all(cls) -> None:
        while cls._cache:
            cls._cache.popitem(last=False)[1].close()

    def __enter__(self) -> _DecordVideo | _PyAVVideo:
        cache = type(self)
        if cache._pid != os.getpid():  # a process forked some other way than os.fork (which runs _after_fork)
            cache._after_fork()
        try:
            stat = self.path.stat()
        except FileNotFoundError:
            raise VideoReadError(self.path, MISSING, "no such video file") from None
        except OSError as exc:
            raise VideoReadError(self.path, UNREADABLE, f"cannot open the file ({exc.strerror})") from None
        if not self.path.is_file():
            raise VideoReadError(self.path, MISSING, "no such video file")
        if not os.access(self.path, os.R_OK):
            raise VideoReadError(self.path, UNREADABLE, "cannot open the file (Permission denied)")
        key = (self.backend, str(self.path.resolve()), stat.st_size, stat.st_mtime_ns)
        if self.fallback and key in cache._decord_refused:
            key = ("pyav", *key[1:])
        if self.frame_cache_bytes > 0:
            decoded = _DECODED.get(key, self.frame_cache_bytes)
            if decoded is not None:
                self.video = decoded
                return decoded
        with cache._lock:
            video = cache._cache.pop(key, None)
            if video is not None and cache._in_use[id(video)]:
                # In use by another `with` block (another thread's, or a paused frame iterator's): a reader serves
                # one use at a time (decord's crashes when two threads call it), so this one gets a reader of its
                # own, which takes the cache slot; the other is closed by its garbage collection.
                cache._cache[key] = video
                video = None
        if video is None:
            video = self._new_reader(key)
            if isinstance(video, _PyAVVideo):
                key = ("pyav", *key[1:])
            if video.num_frames <= 0:
                video.close()
                raise VideoReadError(self.path, EMPTY, "the video has zero frames")
        # The reader is out of the LRU here (new, or popped): a video that goes whole into the decoded cache never
        # takes a slot there, so it pushes out no reader still in use.
        if self.frame_cache_bytes > 0:
            try:
                if _DECODED.worth_trying(key, video, self.frame_cache_bytes):
                    decoded = _DECODED.add(key, _DecodedVideo(video), self.frame_cache_bytes)
                    video.close()  # every frame is in memory now
                    self.video = decoded
                    return decoded
            except (VideoReadError, ValueError, MemoryError):
                # Not decodable to the end (truncated? the frame size changes midway, which np.stack refuses? too
                # large after all?): never cached; its clips read from the file, as without the cache. The reader
                # that failed starts afresh.
                _DECODED.refuse(key)
                video.close()
                return self.__enter__()
        with cache._lock:
            cache._cache[key] = video  # most recently used last
            cache._in_use[id(video)] += 1
            self.video = video
            cache._shrink()
        return video

    @classmethod
    def _shrink(cls) -> None:
        """Close least recently used readers, none in use, until at most CAPACITY are open, holding at most HELD_BYTES
        together."""
        with cls._lock:
            readers = list(cls._cache.items())  # least recently used first
            count, held = len(readers), sum(video.held_bytes for _, video in readers)
            for key, video in readers:
                if count <= cls.CAPACITY and held <= cls.HELD_BYTES:
                    return
                if cls._in_use[id(video)] == 0 and cls._cache.pop(key, None) is not None:
                    count, held = count - 1, held - video.held_bytes
                    video.close()

    def _new_reader(self, key) -> _DecordVideo | _PyAVVideo:
        if key[0] == "pyav":
            return _PyAVVideo(self.path)
        try:
            return _DecordVideo(self.path)
        except VideoReadError as exc:
            if not self.fallback or exc.reason != CORRUPT:
                raise
            try:
                video = _PyAVVideo(self.path)
            except VideoReadError:
                raise exc from None  # neither decoder reads it: decord's reason stands
            type(self)._decord_refused.add(key)
            return video

    @classmethod
    def _drop(cls, video) -> None:
        with cls._lock:
            for key, cached in list(cls._cache.items()):
                if cached is video:
                    del cls._cache[key]
        video.close()

    def __exit__(self, exc_type: type[BaseException] | None, *exc_info: object) -> None:
        if isinstance(self.video, _DecodedVideo):
            return
        cache = type(self)
        with cache._lock:  # one block: between the count and the drop, another use could take the reader
            if cache._in_use[id(self.video)] > 1:
                cache._in_use[id(self.video)] -= 1
                return
            cache._in_use.pop(id(self.video), None)
            if exc_type is not None:
                self._drop(self.video)  # a reader that failed may be in a bad state
            elif not any(cached is self.video for cached in cache._cache.values()):
                self.video.close()  # a second use's reader took its cache slot: nothing else refers to it
            else:
                cache._shrink()  # its first read has told the reader's frame size (`held_bytes`)


os.register_at_fork(after_in_child=_open_video._after_fork)


def _gather(video, indices: Sequence[int], max_short_side: int | None = None) -> torch.Tensor:
    """Frames at `indices` (any order, repeats allowed) -> uint8 (len(indices), H, W, 3); each frame decoded once.

    `max_short_side`: frames with a longer short side are scaled down to it as they are decoded
    (`transforms.shrink_frames`), one decoder call's worth at a time (`each`), so the full-size frames of the clip
    are never all held; smaller frames come back as `get` decodes them."""
    _check_indices(video, indices)
    unique = sorted(set(indices))
    if max_short_side is None:
        frames = video.get(unique)  # (U, H, W, 3)
    else:
        from .transforms import shrink_frames

        shrunk = (shrink_frames(torch.from_numpy(f), max_short_side).numpy() for f in video.each(unique))
        frames = _stacked(shrunk, len(unique))
    if list(indices) == unique:
        return torch.from_numpy(frames)  # already in order: no second copy
    where = {index: row for row, index in enumerate(unique)}
    return torch.from_numpy(frames[[where[i] for i in indices]])  # (len(indices), H, W, 3)


def _check_indices(video, indices: Sequence[int]) -> None:
    bad = [i for i in indices if not 0 <= i < video.num_frames]
    if bad:
        raise VideoReadError(
            video.path, OUT_OF_RANGE, f"frame indices {bad[:5]} outside the video's {video.num_frames} frames"
        )


# -- 4. public readers ------------------------------------------------------------------------------------------
def video_info(path: str | os.PathLike, backend: str = "auto") -> tuple[int, float]:
    """(num_frames, fps) of a video file, as the backend reports them (decord: len(), get_avg_fps())."""
    with _open_video(path, backend) as video:
        return video.num_frames, video.fps


def video_timeline(path: str | os.PathLike, backend: str = "auto") -> Timeline:
    """The presentation time of every frame of a video file (`Timeline`), as the backend numbers the frames."""
    with _open_video(path, backend) as video:
        return video.timeline


def decodable_frames(path: str | os.PathLike, backend: str = "auto") -> int:
    """How many frames, from the first, actually decode (the container may list more: a truncated or damaged
    file). The last frame is tried first (one seek), so an intact file costs one read; otherwise a binary search
    over single-frame reads finds the first frame that fails. 0 when not even the first frame decodes."""
    with _open_video(path, backend) as video:
        n = video.num_frames

    def decodes(index: int) -> bool:
        try:
            with _open_video(path, backend) as video:  # a fresh reader after a failure (__exit__ drops it)
                video.get([index])
            return True
        except VideoReadError:
            return False

    if decodes(n - 1):
        return n
    good, bad = -1, n - 1  # invariant: frame `good` decodes (or -1), frame `bad` does not
    while bad - good > 1:
        middle = (good + bad) // 2
        good, bad = (middle, bad) if decodes(middle) else (good, middle)
    return good + 1


def read_frames(
    path: str | os.PathLike, indices: list[int], backend: str = "auto", max_short_side: int | None = None
) -> torch.Tensor:
    """Decode the frames at `indices` (0-based, any order, repeats allowed) -> uint8 (len(indices), H, W, 3) RGB.
    `max_short_side`: frames whose short side is longer are scaled down to it as they are decoded (`_gather`)."""
    if len(indices) == 0:
        raise ValueError("read_frames needs at least one frame index")
    with _open_video(path, backend) as video:
        return _gather(video, indices, max_short_side)


def iter_frames(
    path: str | os.PathLike, indices: Sequence[int], backend: str = "auto"
) -> Iterator[tuple[int, np.ndarray]]:
    """Every distinct frame of `indices`, read as `read_frames` reads them (seeking between distant frames): yields
    (index, uint8 (H, W, 3) RGB) in increasing index order, one frame at a time (decord: one call's worth,
    `_DecordVideo.each`), so a caller that keeps only what it makes of each frame never holds them all.
    The file's open reader is in use until the iterator ends: read no other frames of that file meanwhile."""
    wanted = sorted(set(indices))
    if not wanted:
        return
    with _open_video(path, backend) as video:
        _check_indices(video, wanted)
        yield from zip(wanted, video.each(wanted))


def whole_video_backend(backend: str = "auto") -> str:
    """The decoder for work that reads whole videos front to back (the runtime's index, features and demo): 'auto'
    is PyAV there, whose single threaded pass is faster than decord's reads between seeks (bench index), and
    which opens files decord refuses (a truncated mp4). Both number and decode frames identically."""
    return "pyav" if backend == "auto" else resolve_backend(backend)


def stream_frames(
    path: str | os.PathLike, indices: Sequence[int], backend: str = "auto", threads: int = 0
) -> Iterator[tuple[int, np.ndarray]]:
    """Every distinct frame of `indices`, decoded in one pass front to back: yields (index, uint8 (H, W, 3) RGB) in
    increasing index order. For many frames of one video (indexing, features), where `read_frames`' seeks and
    per-call set-up would dominate.

    PyAV (and 'auto', which streams with PyAV: one sequential pass with the codec's own frame threading is the
    fastest way through a whole file, and both decoders number and decode frames identically) starts at the key
    frame before the first wanted frame, decodes every frame once with `threads` decoder threads (0: FFmpeg's
    choice) and converts only the wanted ones to RGB. decord reads the wanted frames in increasing chunks from one
    reader, which decodes on between them; a chunk is small enough to hold (`_DecordVideo.each`)."""
    wanted = sorted(set(indices))
    if not wanted:
        return
    backend = whole_video_backend(backend)
    with _open_video(path, backend) as video:
        if wanted[0] < 0 or wanted[-1] >= video.num_frames:
            raise VideoReadError(
                path,
                OUT_OF_RANGE,
                f"frame indices {wanted[0]}..{wanted[-1]} outside the video's {video.num_frames} frames",
            )
        if backend == "decord":
            yield from zip(wanted, video.each(wanted))
            return
        timing = video  # the reader's packet-time table numbers the frames
    yield from _stream_pyav(Path(path), timing, wanted, threads)


def _stream_pyav(path: Path, timing: _PyAVVideo, wanted: list[int], threads: int):
    import av
    from av.video.reformatter import VideoReformatter

    errors = (av.error.FFmpegError, OSError, EOFError)
    reformatter, pos, current = VideoReformatter(), 0, None
    wanted_pts = None if timing._pts is None else {timing._pts_of(i) for i in wanted}
    container = None

    def run(start: int | None):
        """A fresh demuxer and decoder, at the key frame at or before frame `start` (None: the first frame)."""
        nonlocal container
        if container is not None:
            container.close()
        container = av.open(str(path))
        stream = container.streams.get(timing._stream_index)[0]
        stream.thread_type = "AUTO"  # frame + slice threads
        stream.codec_context.thread_count = threads
        if start is not None:
            container.seek(timing._pts_of(start), stream=stream, backward=True, any_frame=False)
        frames = _numbered(timing, _decode_skipping(container, stream, wanted_pts), from_start=start is None)
        return frames, next(frames, None)

    try:
        # The run starts at the key frame before the first wanted frame (`_run_reaching`); the first frames of the
        # file, and a stream without timestamps, are read from its start without a seek.
        frames, first = _run_reaching(
            wanted[0],
            timing._key_gap,
            lambda start: run(start) if start > 0 and timing._pts is not None else None,
            lambda: run(None),
        )
        for current, frame in itertools.chain([first] if first is not None else [], frames):
            if current < wanted[pos]:
                continue
            rgb = _upright_rgb(reformatter, frame)
            # A wanted index this frame passed (a timestamp the decoder skipped) gets the next frame there is.
            while pos < len(wanted) and wanted[pos] <= current:
                yield wanted[pos], rgb
                pos += 1
            del rgb  # not held while the next frame decodes: the consumer keeps it as long as it needs it
            if pos == len(wanted):
                return
    except errors as exc:
        raise VideoReadError(path, CORRUPT, f"cannot decode frames ({_first_line(exc)})") from exc
    finally:
        if container is not None:
            container.close()
    reached = "no frame" if current is None else f"frame {current}"
    raise VideoReadError(
        path, CORRUPT, f"the stream ends at {reached} before frame {wanted[pos]} of {timing.num_frames} (truncated?)"
    )


def _decode_skipping(container, stream, wanted_pts):
    """Every frame of `stream` from where `container` stands, to the end (the decoder flushed), leaving H.264
    frames nothing is predicted from undecoded unless their timestamp is wanted."""
    nal_length = _avc_nal_length_size(stream)
    for packet in itertools.chain(container.demux(stream), [None]):
        if packet is not None and (
            packet.size == 0
            or (
                nal_length
                and wanted_pts is not None
                and packet.pts not in wanted_pts
                and _unreferenced_h264(bytes(packet), nal_length)
            )
        ):
            continue  # a frame nothing else is predicted from, and not wanted: never decoded
        yield from stream.decode(packet)  # None flushes the decoder at the end


def _avc_nal_length_size(stream) -> int:
    """Bytes of each NAL unit's length prefix in an H.264 stream stored as in mp4/mkv (an avcC record as extradata);
    0 for anything else (other codecs, Annex-B byte streams as in .ts files), whose packets are never inspected."""
    extradata = bytes(stream.codec_context.extradata or b"")
    if stream.codec_context.name != "h264" or len(extradata) < 7 or extradata[0] != 1:
        return 0
    return (extradata[4] & 3) + 1


def _unreferenced_h264(data: bytes, nal_length: int) -> bool:
    """Whether an H.264 access unit is a picture no other picture is predicted from (its slices' nal_ref_idc is 0,
    as for most B-frames): such a frame can be left undecoded without changing any other frame."""
    at = 0
    while at + nal_length < len(data):
        size = int.from_bytes(data[at : at + nal_length], "big")
        header = data[at + nal_length]
        if header & 0x1F in (1, 5):  # the first slice: non-IDR or IDR
            return header & 0x60 == 0
        at += nal_length + size
    return False


def _sample_or_raise(path, num_frames, start_f, end_f, sample, rng) -> list[int]:
    try:
        indices = sample_frame_indices(num_frames, start_f, end_f, sample, rng=rng)
    except ValueError as exc:
        raise VideoReadError(path, TOO_SHORT, str(exc)) from exc
    if not indices:  # K = min(F, end_f) = 0
        raise VideoReadError(path, EMPTY, f"frames [{start_f}, {end_f}) give zero sampled frames")
    return indices


def read_clip(
    path: str | os.PathLike,
    start_sec: float | None,
    end_sec: float | None,
    num_frames: int,
    sample: str,
    backend: str = "auto",
    rng: _random.Random | None = None,
    frame_cache_bytes: int = 0,
    max_short_side: int | None = None,
) -> tuple[torch.Tensor, list[int]]:
    """Sample and decode the clip [start_sec, end_sec] of one video file at the file's real fps.

    Returns (uint8 (K, H, W, 3), the K frame indices) with K = min(num_frames, end_frame) <= num_frames (official
    K rule; the official datasets zero-pad to F after the transform). Official `read_frames_cv2_charades` rules on
    constant-rate files: start_frame = max(0, int(start_sec * fps)), end_frame = min(int(end_sec * fps),
    num_frames); on variable-rate files the frames shown in [start_sec, end_sec) (`Timeline.official_range`). No
    times (None, or both 0 as in the official `if not start_sec and not end_sec`) means the whole video.
    Raises VideoReadError: missing / corrupt file, zero frames, a clip that starts at or after the end of the
    video or ends before it starts, or a clip too short for 'rand'.
    `frame_cache_bytes` > 0: keep whole decoded videos in this process, up to that many bytes (`_DecodedCache`).
    `max_short_side`: frames whose short side is longer are scaled down to it as they are decoded (`_gather`).
    """
    with _open_video(path, backend, frame_cache_bytes) as video:
        if end_sec is None or (not start_sec and not end_sec):
            start_f, end_f = 0, video.num_frames
        else:
            start_sec = start_sec or 0.0
            if end_sec < start_sec or end_sec < 0:
                raise VideoReadError(path, OUT_OF_RANGE, f"clip [{start_sec}, {end_sec}] s ends before it starts")
            start_f, end_f = video.timeline.official_range(start_sec, end_sec)
            if start_f >= video.num_frames:
                raise VideoReadError(
                    path,
                    OUT_OF_RANGE,
                    f"clip [{start_sec}, {end_sec}] s starts after the end of "
                    f"the video ({video.num_frames} frames at {video.fps:g} fps = "
                    f"{video.timeline.duration:.3f} s)",
                )
        indices = _sample_or_raise(path, num_frames, start_f, end_f, sample, rng)
        return _gather(video, indices, max_short_side), indices


# -- 5. the chunked EgoClip layout ------------------------------------------------------------------------------
def egoclip_chunk(
    video_root: str | os.PathLike, video_uid: str, start_sec: float, end_sec: float, chunk_sec: int = EGOCLIP_CHUNK_SEC
) -> tuple[list[Path], list[float], float]:
    """Official `EgoClip_EgoMCQ._get_video_path`: ([start chunk file, end chunk file], [start, end] clamped at 0,
    the end time of the start chunk). Chunk c holds [c * chunk_sec, (c + 1) * chunk_sec) s of the video."""
    start = max(float(start_sec), 0.0)
    end = max(float(end_sec), 0.0)
    first, last = int(start // chunk_sec), int(end // chunk_sec)
    root = Path(video_root) / video_uid
    return [root / f"{first}.mp4", root / f"{last}.mp4"], [start, end], float((first + 1) * chunk_sec)


def read_egoclip_clip(
    video_root: str | os.PathLike,
    video_uid: str,
    start_sec: float,
    end_sec: float,
    num_frames: int,
    sample: str,
    rng: _random.Random | None = None,
    backend: str = "auto",
    chunk_sec: int = EGOCLIP_CHUNK_SEC,
    frame_cache_bytes: int = 0,
    max_short_side: int | None = None,
) -> torch.Tensor:
    """Official `read_frames_cv2_egoclip` on the chunked layout -> uint8 (num_frames, H, W, 3).

    Frame indices are sampled on the whole video's timeline (start_f = int(start * fps), end_f = int(end * fps),
    `sample_frame_indices`); a frame at or after the chunk boundary comes from the next chunk file. Frames past
    the end of a chunk file are clamped to its last frame, and fewer than num_frames frames (K = min(F, end_f))
    are padded by repeating the last one, as in the official reader.
    Deliberate differences from the official OpenCV reader:
      * fps is the start chunk file's real fps, not an assumed 30 (chunk c starts at frame int(c * chunk_sec * fps));
      * frame i is frame i: the official OpenCV seek `CAP_PROP_POS_FRAMES = i - 1` reads one frame earlier;
      * the frame exactly at the boundary comes from the next chunk (official `index > bound_f` sends it to the
        first file, where `index % 18000` wraps to that chunk's frame 0);
      * strict errors instead of OpenCV's silently skipped reads: a missing chunk file, a clip starting after the
        end of its chunk, a clip spanning more than two chunks.
    `frame_cache_bytes` > 0: keep whole decoded chunk files in this process, up to that many bytes (small datasets
    such as the synthetic one; a 600 s Ego4D chunk is far larger than any sensible budget and is read as without).
    `max_short_side`: frames whose short side is longer are scaled down to it as they are decoded (`_gather`).
    """
    paths, (start, end), bound_sec = egoclip_chunk(video_root, video_uid, start_sec, end_sec, chunk_sec)
    first_chunk, last_chunk = int(start // chunk_sec), int(end // chunk_sec)
    if end < start:
        raise VideoReadError(paths[0], OUT_OF_RANGE, f"clip [{start}, {end}] s ends before it starts")
    if last_chunk > first_chunk + 1:
        raise VideoReadError(
            paths[0], OUT_OF_RANGE, f"clip [{start}, {end}] s spans more than two {chunk_sec} s chunks"
        )
    for path in paths:
        if not path.is_file():
            raise VideoReadError(path, MISSING, f"no such chunk file (clip [{start}, {end}] s of {video_uid})")
    spans = last_chunk > first_chunk
    with _open_video(paths[0], backend, frame_cache_bytes) as first:
        variable = not first.timeline.constant_rate
    if spans and not variable:
        with _open_video(paths[1], backend, frame_cache_bytes) as second:
            variable = not second.timeline.constant_rate
    if variable:  # read by time, after the readers above are back in the cache (a reader serves one use at a time)
        return _egoclip_clip_by_time(
            paths,
            start,
            end,
            bound_sec - chunk_sec,
            bound_sec,
            spans,
            num_frames,
            sample,
            rng,
            backend,
            frame_cache_bytes,
            max_short_side,
        )
    with _open_video(paths[0], backend, frame_cache_bytes) as first:
        fps = first.fps
        start_f, end_f = max(0, int(start * fps)), max(0, int(end * fps))
        # int() like start_f, so start_f >= offset for any fps (official: bound_f = int(bound_sec * 30))
        bound_f = int(bound_sec * fps)  # first frame of the next chunk
        offset = int((bound_sec - chunk_sec) * fps)  # first frame of the start chunk
        if start_f - offset >= first.num_frames:
            raise VideoReadError(
                paths[0],
                OUT_OF_RANGE,
                f"clip [{start}, {end}] s starts after the end of the chunk ({first.num_frames} frames at {fps:g} fps)",
            )
        indices = _sample_or_raise(paths[0], num_frames, start_f, end_f, sample, rng)
        in_first = [i for i in indices if i < bound_f]
        in_second = [i for i in indices if i >= bound_f]
        parts = []
        if in_first:
            parts.append(_gather(first, [min(i - offset, first.num_frames - 1) for i in in_first], max_short_side))
        if in_second:
            with _open_video(paths[1], backend, frame_cache_bytes) as second:
                picks = [min(i - bound_f, second.num_frames - 1) for i in in_second]
                parts.append(_gather(second, picks, max_short_side))
    if len(parts) == 2 and parts[0].shape[1:] != parts[1].shape[1:]:
        raise VideoReadError(
            paths[1],
            CORRUPT,
            f"frame size {tuple(parts[1].shape[1:3])} differs from the previous chunk's {tuple(parts[0].shape[1:3])}",
        )
    frames = torch.cat(parts)  # (K, H, W, 3), indices are increasing so order is kept
    if frames.shape[0] < num_frames:  # official: frames.append(frames[-1]) until F
        frames = torch.cat([frames, frames[-1:].expand(num_frames - frames.shape[0], -1, -1, -1)])
    return frames


def _egoclip_clip_by_time(
    paths,
    start,
    end,
    chunk_start,
    bound_sec,
    spans,
    num_frames,
    sample,
    rng,
    backend,
    frame_cache_bytes,
    max_short_side,
) -> torch.Tensor:
    """`read_egoclip_clip` on variable-rate chunk files: the frames shown in [start, end) s of the whole video (chunk
    c's frame at time t is at c * chunk_sec + t), sampled by the official rule over that list of frames."""
    shown = []  # (chunk position 0/1, frame index in that chunk file), in presentation order
    with _open_video(paths[0], backend, frame_cache_bytes) as first:
        a, b = first.timeline.frames_in(start - chunk_start, end - chunk_start)
        shown += [(0, i) for i in range(a, b)]
        if a >= first.num_frames:
            raise VideoReadError(
                paths[0],
                OUT_OF_RANGE,
                f"clip [{start}, {end}] s starts after the end of the chunk ({first.timeline.duration:.3f} s)",
            )
    if spans:
        with _open_video(paths[1], backend, frame_cache_bytes) as second:
            a, b = second.timeline.frames_in(0.0, end - bound_sec)
            shown += [(1, i) for i in range(a, b)]
    picks = [shown[k] for k in _sample_or_raise(paths[0], num_frames, 0, len(shown), sample, rng)]
    parts = []
    for chunk in (0, 1):
        wanted = [i for c, i in picks if c == chunk]
        if wanted:
            with _open_video(paths[chunk], backend, frame_cache_bytes) as video:
                parts.append(_gather(video, wanted, max_short_side))
    if len(parts) == 2 and parts[0].shape[1:] != parts[1].shape[1:]:
        raise VideoReadError(
            paths[1],
            CORRUPT,
            f"frame size {tuple(parts[1].shape[1:3])} differs from the previous chunk's {tuple(parts[0].shape[1:3])}",
        )
    frames = torch.cat(parts)
    if frames.shape[0] < num_frames:  # official: the last frame repeated until F
        frames = torch.cat([frames, frames[-1:].expand(num_frames - frames.shape[0], -1, -1, -1)])
    return frames


@functools.lru_cache(maxsize=64)
def _parameters(fn: Callable[..., Any]) -> frozenset[str]:
    return frozenset(inspect.signature(fn).parameters)


# -- 6. strict / lax policy -------------------------------------------------------------------------------------
class ClipLoader:
    """The official `video_params['loading']` policy around any reader of this module.

    strict: a VideoReadError propagates (its message names the file).
    lax:    `load` returns None and counts the failure by reason; the caller substitutes
            `transforms.black_clip(F, size)` (the official black frame, normalised, zero-padded to F).
    Only VideoReadError is absorbed: a programming error still raises in lax mode.
    """

    def __init__(self, strict: bool = True, backend: str = "auto", frame_cache_bytes: int = 0) -> None:
        if frame_cache_bytes < 0:
            raise ValueError(f"frame_cache_bytes must be >= 0, got {frame_cache_bytes}")
        self.strict = strict
        self.backend = resolve_backend(backend)
        self.frame_cache_bytes = frame_cache_bytes
        self.failures: collections.Counter[str] = collections.Counter()
        self.first_errors: dict[str, str] = {}  # reason -> the first message seen, for the run report
        self.loads = 0

    def load(self, loader_fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """loader_fn(*args, **kwargs), with backend= and frame_cache_bytes= set to this loader's when loader_fn
        takes them."""
        try:
            takes = _parameters(loader_fn)
        except TypeError:  # an unhashable callable (e.g. a dataclass instance with __call__)
            takes = frozenset(inspect.signature(loader_fn).parameters)
        if "backend" not in kwargs and "backend" in takes:
            kwargs["backend"] = self.backend
        if self.frame_cache_bytes and "frame_cache_bytes" not in kwargs and "frame_cache_bytes" in takes:
            kwargs["frame_cache_bytes"] = self.frame_cache_bytes
        self.loads += 1
        try:
            return loader_fn(*args, **kwargs)
        except VideoReadError as exc:
            if self.strict:
                raise
            self.failures[exc.reason] += 1
            self.first_errors.setdefault(exc.reason, str(exc))
            return None
