"""Video files as users have them, through the public reading paths (`egovlp_deploy.decoding` and the runtime's
window planning): MPEG-TS, several video streams, cover art, still images under a video name, repeated or missing
timestamps, empty video streams, unusual pixel formats and sample aspect ratios, and folders with hidden entries.

Each numbered test file carries its frame number in every frame (`video_files.numbered_image`); expected frames and
timestamps are hand-computed from how the file was written, or PyAV's own plain front-to-back decoding.
"""

from __future__ import annotations

import os
from fractions import Fraction

import numpy as np
import pytest

from egovlp_deploy import decoding as V
from egovlp_deploy.decoding import VideoReadError, read_clip, read_frames, stream_frames, video_timeline
from egovlp_deploy.runtime.clip_pipeline import decodable_timeline, expand_inputs, plan_windows

av = pytest.importorskip("av")
from video_files import (  # noqa: E402
    write_audio_with_cover,
    write_duplicate_pts,
    write_numbered,
    write_video_stream_without_frames,
    write_with_thumbnail_track,
)

if "libx264" not in av.codecs_available:
    pytest.skip("this PyAV build has no libx264 encoder to write the test videos", allow_module_level=True)
BACKENDS = ["pyav"] + (["decord"] if V._decord_available() else [])


def numbers(frames) -> list[int]:
    """The number each decoded frame (F, H, W, 3) carries."""
    blocks = np.asarray(frames)[:, :8, :64].astype(float).mean(axis=(1, 3)).reshape(-1, 8, 8).mean(-1)
    return [sum(int(b > 128) << bit for bit, b in enumerate(row)) for row in blocks]


def streamed(path, indices, backend="pyav") -> list[int]:
    got = list(stream_frames(path, indices, backend))
    assert [i for i, _ in got] == sorted(set(indices))
    return numbers(np.stack([frame for _, frame in got]))


def pyav_plain(path, stream_index: int = 0) -> np.ndarray:
    """Every frame of one stream, as PyAV decodes it front to back (rgb24), the reference pixels."""
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(container.streams[stream_index])])


@pytest.fixture(autouse=True)
def fresh_readers():
    """Readers and learned key-frame gaps from other tests' files stay out of these."""
    V._open_video._evict_all()
    yield
    V._open_video._evict_all()


# -- MPEG-TS (camcorder .MTS / .m2ts, broadcast recordings) -----------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_mpegts_random_access_gives_the_frames_asked_for(tmp_path, backend):
    """The TS demuxer seeks by an estimated byte position: a seek lands after the key frame before the target,
    and the decoder starts at the next key frame. Reads must still give frame i for index i."""
    path = write_numbered(tmp_path / "cam.MTS", 90, fps=30, fmt="mpegts", options={"qp": "0", "g": "15"})
    assert video_timeline(path, backend).num_frames == 90
    picks = [5, 40, 77, 3, 89]
    assert numbers(read_frames(path, picks, backend)) == picks
    assert numbers(read_frames(path, list(range(90)), backend)) == list(range(90))
    assert streamed(path, [40, 41, 77]) == [40, 41, 77]
    frames, indices = read_clip(path, 1.0, 2.0, 4, "uniform", backend=backend)
    # frames [30, 60): boundaries int(linspace(30, 60, 5)) = 30, 37, 45, 52, 60; segment middles (b_i + b_i+1 - 1) // 2
    assert indices == [33, 40, 48, 55] and numbers(frames) == indices


def test_a_short_mpegts_file_is_windowed_whole(tmp_path):
    """A 2 s TS file whose first timestamp is not 0: no seek finds its frames, a read from the start does."""
    path = write_numbered(tmp_path / "clip.ts", 20, fmt="mpegts")
    notes = []
    assert decodable_timeline(path, notes=notes).num_frames == 20 and notes == []
    windows, fps = plan_windows(path, 4, window_sec=1.0, stride_sec=1.0)
    assert fps == 10 and [w.indices for w in windows] == [(0, 3, 5, 8), (10, 13, 15, 18)]
    assert numbers(read_frames(path, [0, 3, 5, 8, 19], "pyav")) == [0, 3, 5, 8, 19]


# -- which stream --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_the_main_video_stream_is_read_not_a_thumbnail_track(tmp_path, backend):
    """Both decoders read FFmpeg's best video stream (decord asks av_find_best_stream), here the second one."""
    path = write_with_thumbnail_track(tmp_path / "two_tracks.mkv", 20)
    timeline = video_timeline(path, backend)
    assert (timeline.num_frames, timeline.fps) == (20, 10.0)
    frames = read_frames(path, list(range(20)), backend)
    assert tuple(frames.shape) == (20, 32, 64, 3) and numbers(frames) == list(range(20))
    np.testing.assert_array_equal(frames.numpy(), pyav_plain(path, stream_index=1))
    assert streamed(path, range(20)) == list(range(20))
    windows, fps = plan_windows(path, 4, window_sec=1.0, stride_sec=1.0)
    assert fps == 10 and len(windows) == 2


@pytest.mark.parametrize("backend", ["pyav", "auto"])
def test_audio_with_cover_art_is_not_a_video(tmp_path, backend):
    path = write_audio_with_cover(tmp_path / "podcast.mp4")
    with pytest.raises(VideoReadError, match=r"podcast\.mp4") as err:
        read_frames(path, [0], backend)
    assert err.value.reason == V.CORRUPT
    with pytest.raises(VideoReadError, match="cover picture"):
        plan_windows(path, 4, window_sec=1.0, stride_sec=1.0)


@pytest.mark.parametrize("image_format", ["JPEG", "PNG"])
@pytest.mark.parametrize("backend", ["pyav", "auto"])
def test_a_still_image_named_like_a_video_is_refused(tmp_path, image_format, backend):
    """FFmpeg opens a picture as a one-frame 25 fps 'video'; decord (the official reader) refuses it, and so does
    PyAV here, with one clear error."""
    from PIL import Image

    path = tmp_path / "photo.mp4"
    Image.fromarray(np.full((32, 64, 3), 90, np.uint8)).save(path, format=image_format)
    with pytest.raises(VideoReadError, match=r"photo\.mp4") as err:
        read_clip(path, None, None, 4, "uniform", backend=backend)
    assert err.value.reason == V.CORRUPT
    with pytest.raises(VideoReadError, match="still image"):
        plan_windows(path, 4, window_sec=1.0, stride_sec=1.0)


def test_an_animated_gif_is_a_video(tmp_path):
    path = write_numbered(tmp_path / "loop.gif", 12, codec="gif", pix_fmt="rgb8", fmt="gif")
    timeline = video_timeline(path, "auto")  # decord refuses GIF; 'auto' reads it with PyAV
    assert (timeline.num_frames, timeline.fps) == (12, 10.0)
    assert numbers(read_frames(path, [0, 7, 11], "auto")) == [0, 7, 11]


# -- timestamps ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_repeated_timestamp_keeps_every_frame(tmp_path, backend):
    """Frames 10 and 11 share a timestamp: both are frames (PyAV's plain decoding gives 20, decord counts 20),
    numbered in the order they are shown; timestamps that do not increase fall back to the rate grid."""
    path = write_duplicate_pts(tmp_path / "recorder.mkv", 20, repeated=10)
    assert len(pyav_plain(path)) == 20
    timeline = video_timeline(path, backend)
    assert timeline.num_frames == 20 and timeline.constant_rate and timeline.duration == 2.0
    assert numbers(read_frames(path, list(range(20)), backend)) == list(range(20))
    assert numbers(read_frames(path, [19, 11, 10, 12], backend)) == [19, 11, 10, 12]
    assert streamed(path, [9, 10, 11, 12, 19]) == [9, 10, 11, 12, 19]
    assert decodable_timeline(path, backend).num_frames == 20


def test_a_raw_elementary_stream_without_timestamps(tmp_path):
    """A raw H.264 stream (a Raspberry Pi camera's .h264, renamed .mp4) has no timestamps and cannot seek: frames
    are numbered in order from the start, at the rate FFmpeg reports for it (25 fps when the stream declares
    none). decord refuses such a file; 'auto' reads it with PyAV."""
    path = write_numbered(tmp_path / "raspivid.mp4", 20, fmt="h264")
    with av.open(str(path)) as container:
        rate = container.streams.video[0].average_rate or container.streams.video[0].guessed_rate
    timeline = video_timeline(path, "auto")
    assert (timeline.num_frames, timeline.fps) == (20, float(rate))
    assert numbers(read_frames(path, list(range(20)), "auto")) == list(range(20))
    assert numbers(read_frames(path, [15, 3, 3, 19], "pyav")) == [15, 3, 3, 19]
    assert streamed(path, [4, 5, 17]) == [4, 5, 17]
    windows, _ = plan_windows(path, 4, window_frames=10, stride_frames=10)
    # [0, 10): boundaries int(linspace(0, 10, 5)) = 0, 2, 5, 7, 10; segment middles (b_i + b_i+1 - 1) // 2
    assert [w.indices for w in windows] == [(0, 3, 5, 8), (10, 13, 15, 18)]


@pytest.mark.parametrize("backend", ["pyav", "auto"])
def test_a_video_stream_without_frames_is_empty(tmp_path, backend):
    path = write_video_stream_without_frames(tmp_path / "no_frames.mkv")
    with pytest.raises(VideoReadError, match=r"no_frames\.mkv") as err:
        video_timeline(path, backend)
    assert err.value.reason == V.EMPTY
    with pytest.raises(VideoReadError) as err:
        plan_windows(path, 4, window_sec=1.0, stride_sec=1.0)
    assert err.value.reason == V.EMPTY


@pytest.mark.parametrize("backend", BACKENDS)
def test_matroska_without_a_declared_duration(tmp_path, backend):
    """A live-written Matroska file (no duration, no cues): frames and times from its packets."""
    path = write_numbered(tmp_path / "live.mkv", 20, fmt="matroska", container_options={"live": "1"})
    timeline = video_timeline(path, "auto" if backend == "decord" else backend)
    assert (timeline.num_frames, timeline.duration) == (20, 2.0)
    assert numbers(read_frames(path, [0, 13, 19], "auto" if backend == "decord" else backend)) == [0, 13, 19]


# -- pixels ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name, codec, pix_fmt, options",
    [
        ("high10.mkv", "libx265", "yuv420p10le", {"x265-params": "lossless=1:log-level=error"}),
        ("full_chroma.mp4", "libx264", "yuv444p", None),
        ("mono.mkv", "ffv1", "gray", {}),
        ("alpha.mov", "png", "rgba", {}),
        ("alpha.webm", "libvpx-vp9", "yuva420p", {"lossless": "1"}),
    ],
)
@pytest.mark.parametrize("backend", BACKENDS)
def test_pixel_formats_give_plain_rgb(tmp_path, name, codec, pix_fmt, options, backend):
    """10-bit, 4:4:4, grey and alpha video: RGB frames, alpha dropped, equal to PyAV's own rgb24 conversion."""
    if codec not in av.codecs_available:
        pytest.skip(f"no {codec} encoder in this PyAV build")
    path = write_numbered(tmp_path / name, 10, codec=codec, pix_fmt=pix_fmt, options=options)
    frames = read_frames(path, list(range(10)), backend)
    assert tuple(frames.shape) == (10, 32, 64, 3) and numbers(frames) == list(range(10))
    if backend == "pyav":
        np.testing.assert_array_equal(frames.numpy(), pyav_plain(path))


@pytest.mark.parametrize("backend", BACKENDS)
def test_anamorphic_frames_keep_their_stored_size(tmp_path, backend):
    """A 64x32 frame with sample aspect ratio 2:1 (shown 128x32): the frames are the stored 64x32 pixels, as decord
    and OpenCV (the official EgoVLPv2 readers) return them; the transform's resize and crop then see the same
    pixels as in the official pipeline."""
    path = write_numbered(tmp_path / "anamorphic.mp4", 10, sample_aspect_ratio=Fraction(2, 1))
    with av.open(str(path)) as container:
        assert container.streams.video[0].sample_aspect_ratio == Fraction(2, 1)
    frames = read_frames(path, [0, 9], backend)
    assert tuple(frames.shape) == (2, 32, 64, 3) and numbers(frames) == [0, 9]


# -- folders ---------------------------------------------------------------------------------------------------------
def test_folders_leave_hidden_entries_out_and_take_any_extension_case(tmp_path):
    root = tmp_path / "videos"
    clip = write_numbered(tmp_path / "clip.mp4", 2)
    for name in ["a.MP4", "b.MoV", "c.mkv", ".d.mp4", "._a.MP4", ".Trash-1000/files/old.mp4", "sub/e.webm"]:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(clip.read_bytes())
    (root / "folder.mp4").mkdir()  # a directory with a video name
    os.symlink(root, root / "sub" / "loop")  # a symbolic link back up: a loop
    os.symlink(root / "a.MP4", root / "sub" / "same.mp4")  # the same file twice
    paths, failures = expand_inputs([str(root)])
    assert [p.relative_to(root).as_posix() for p in paths] == ["a.MP4", "b.MoV", "c.mkv", "sub/e.webm"]
    assert failures == []
    hidden, _ = expand_inputs([str(root / ".d.mp4"), str(root / ".Trash-1000")])  # named: read
    assert [p.name for p in hidden] == [".d.mp4", "old.mp4"]
    none, failures = expand_inputs([str(root / "folder.mp4")])
    assert none == [] and [f.reason for f in failures] == ["no video files in this folder"]


# -- memory ----------------------------------------------------------------------------------------------------------
def test_streamed_batches_hold_about_one_windows_frames(tmp_path, monkeypatch):
    """Full-size frames (a 4K or 8K video's are 25-200 MB each) are held only until they are preprocessed, not for
    a window or a batch: with frames as large as the preprocessing group (ClipPipeline.GROUP_BYTES), 4-frame windows
    in batches of 8, never more than the frame just decoded and the one before are alive."""
    import weakref

    from egovlp_deploy.runtime import clip_pipeline as C

    path = write_numbered(tmp_path / "long.mp4", 80)
    windows, _ = plan_windows(path, 4, window_frames=5, stride_frames=5)  # 16 windows, 4 of 5 frames each
    refs, peak = [], [0]
    real = C.stream_frames

    class Frame(np.ndarray):  # a plain ndarray cannot be weakly referenced
        pass

    def counting(*args, **kwargs):
        for index, frame in real(*args, **kwargs):
            frame = frame.view(Frame)
            refs.append(weakref.ref(frame))
            peak[0] = max(peak[0], sum(ref() is not None for ref in refs))
            yield index, frame

    monkeypatch.setattr(C, "stream_frames", counting)
    monkeypatch.setattr(C.ClipPipeline, "GROUP_BYTES", 32 * 64 * 3)  # one frame
    pipe = C.ClipPipeline(4, 16, backend="pyav")
    batches = list(pipe.batches(path, windows, batch=8))
    assert [first for first, _ in batches] == [0, 8] and sum(len(b) for _, b in batches) == 16
    np.testing.assert_allclose(np.concatenate([b for _, b in batches]), pipe.clips(path, windows), atol=1e-5)
    assert peak[0] <= 1 + 1


def test_decord_leaves_ffmpeg_log_lines_off_stderr(tmp_path, capfd):
    """A file that is no video: the caller gets one VideoReadError, and FFmpeg's own line ('moov atom not found')
    does not appear on stderr beside the command's one-line message."""
    pytest.importorskip("decord")
    bad = tmp_path / "not_a_video.mp4"
    bad.write_bytes(b"garbage" * 200)
    with pytest.raises(VideoReadError):
        read_frames(bad, [0], "decord")
    assert "moov atom" not in capfd.readouterr().err
